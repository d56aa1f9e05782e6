"""Property tests: the aligner against a brute-force oracle.

Random streams of video frames, audio chunks and transcript segments with random jitter,
gaps, duplicates and out-of-order arrival. The oracle is written independently of the
aligner and as plainly as possible: it decides membership by checking every candidate
window against the definition (every audio sample's own time), sorts, and slices.
Nothing here calls AlignConfig.window_starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import defaultdict

import numpy as np
from align_helpers import feed_live
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamproc.align.aligner import AlignConfig, Aligner, Window
from streamproc.testing import MS, SAMPLE_RATE, S, align_config, chunk, frame, segment
from streamproc.wire.codec import Source

MODS = ("video", "audio", "text")
NS_PER_SAMPLE = S // SAMPLE_RATE  # 62_500: 16 kHz sample times are whole nanoseconds
T0 = 1_700_000_000 * 1_000_000_000  # a realistic epoch time, on the 16 kHz sample grid
SETTINGS = settings(max_examples=100, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the oracle ----------------------------------------------------------------------------


def sample_times(c) -> np.ndarray:
    return c.ts_ns + np.arange(c.n_samples, dtype=np.int64) * NS_PER_SAMPLE


def member(rec, start: int, w: int) -> bool:
    """Does the window [start, start + w) hold (part of) this record? By definition."""
    if rec.modality == "video":
        return start <= rec.ts_ns < start + w
    if rec.modality == "audio":
        t = sample_times(rec)
        return bool(np.any((t >= start) & (t < start + w)))
    if rec.start_ns == rec.end_ns:
        return start <= rec.start_ns < start + w
    return rec.start_ns < start + w and rec.end_ns > start


def oracle_picks(frames: list, start: int, w: int, kk: int) -> list:
    """In each of kk equal stretches of the window the frame nearest its centre (the
    earliest of the nearest); by place (centres of kk equal groups) if one is empty."""
    picks = []
    for i in range(kk):
        lo, hi = start + i * w // kk, start + (i + 1) * w // kk
        inside = [f for f in frames if lo <= f.ts_ns < hi]
        if not inside:
            return [frames[int((j + 0.5) * len(frames) / kk)] for j in range(kk)]
        centre = lo + (hi - lo) // 2
        picks.append(min(inside, key=lambda f: (abs(f.ts_ns - centre), f.ts_ns, f.seq)))
    return picks


def oracle_windows(cfg: AlignConfig, records) -> dict[tuple[str, int], dict]:
    """records: (record, allowed window starts or None = all). Sort, then slice."""
    w, h = cfg.window_ns, cfg.hop_ns
    held: dict[tuple[str, int], dict[str, list]] = defaultdict(
        lambda: {"video": [], "audio": [], "text": []})
    for rec, allowed in records:
        lo = rec.ts_ns
        hi = rec.end_ns if rec.modality != "video" else rec.ts_ns
        for k in range(lo // h - w // h - 2, hi // h + 2):
            if member(rec, k * h, w) and (allowed is None or k * h in allowed):
                held[(rec.stream_id, k * h)][rec.modality].append(rec)
    out = {}
    n_out = w * SAMPLE_RATE // 1_000_000_000
    kk = cfg.frames_per_window
    for (sid, start), recs in held.items():
        frames = sorted(recs["video"], key=lambda f: (f.ts_ns, f.seq))
        n = len(frames)
        picked = frames if n <= kk else oracle_picks(frames, start, w, kk)
        audio = np.zeros(n_out, np.float32)
        mask = np.zeros(n_out, bool)
        for c in sorted(recs["audio"], key=lambda c: (c.ts_ns, c.seq)):
            idx = (sample_times(c) - start) // NS_PER_SAMPLE
            inside = (idx >= 0) & (idx < n_out)
            audio[idx[inside]] = c.samples()[:, 0][inside]
            mask[idx[inside]] = True
        segs = sorted(recs["text"], key=lambda s: (s.start_ns, s.seq))
        seqs = sorted(f.seq for f in frames)
        out[(sid, start)] = {
            "frames": [(f.ts_ns, f.seq) for f in picked],
            "frame_count": n,
            "frames_dropped": sum(b - a - 1 for a, b in itertools.pairwise(seqs)),
            "audio": audio, "mask": mask,
            "segments": [(s.seq, s.start_ns, s.end_ns, s.text) for s in segs],
            "present": {"video": n > 0, "audio": bool(mask.any()), "text": bool(segs)},
        }
    return out


def as_oracle(win: Window) -> dict:
    return {
        "frames": [(f.ts_ns, f.seq) for f in win.frames],
        "frame_count": win.frame_count,
        "frames_dropped": win.quality["frames_dropped"],
        "audio": win.audio, "mask": win.audio_mask,
        "segments": [(s.seq, s.start_ns, s.end_ns, s.text) for s in win.segments],
        "present": win.present,
    }


def assert_same(got: list[Window], want: dict[tuple[str, int], dict]) -> None:
    keys = [w.key for w in got]
    assert len(keys) == len(set(keys)), "a window was emitted twice"
    assert sorted(keys) == sorted(want), "different windows"
    for w in got:
        g, o = as_oracle(w), want[w.key]
        for name in ("frames", "frame_count", "frames_dropped", "segments", "present"):
            assert g[name] == o[name], (w.key, name)
        np.testing.assert_array_equal(g["mask"], o["mask"], err_msg=str(w.key))
        np.testing.assert_array_equal(g["audio"], o["audio"], err_msg=str(w.key))
        assert round(w.quality["audio_missing_s"] * SAMPLE_RATE) == (~o["mask"]).sum()


def assert_start_order(got: list[Window]) -> None:
    last: dict[str, int] = {}
    for w in got:
        assert w.start_ns > last.get(w.stream_id, -(2**63)), "windows out of order"
        last[w.stream_id] = w.start_ns


# --- random scenarios ----------------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    cfg: AlignConfig
    arrivals: list  # records in arrival order, duplicates included
    originals: list  # every distinct record once
    poll_p: float
    rnd: random.Random

    def __repr__(self) -> str:  # the records themselves are too long to print
        counts = {m: sum(r.modality == m for r in self.originals) for m in MODS}
        return (f"Scenario(W={self.cfg.window_ns // MS}ms, H={self.cfg.hop_ns // MS}ms, "
                f"lateness={ {m: v // MS for m, v in self.cfg.lateness_ns.items()} }, "
                f"K={self.cfg.frames_per_window}, records={counts}, "
                f"arrivals={len(self.arrivals)}, poll_p={self.poll_p})")


@st.composite
def scenarios(draw, tumbling: bool = False, with_text: bool = True) -> Scenario:
    # the bulk of the randomness comes from a seeded generator: small examples, fast runs;
    # the structural choices below stay separate draws so hypothesis can shrink them
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    rng = np.random.default_rng(rnd.getrandbits(32))
    window_ms = draw(st.sampled_from([100, 200, 250, 400, 500]))
    hop_ms = window_ms if tumbling else draw(st.integers(max(1, window_ms // 4), window_ms))
    chunk_max = draw(st.sampled_from([5, 20, 50, 100]))  # ms
    seg_max = draw(st.sampled_from([0, 100, 300]))
    lateness = {"video": draw(st.integers(0, 200)), "audio": chunk_max + draw(st.integers(0, 200)),
                "text": seg_max + draw(st.integers(0, 400))}
    jitter = {"video": lateness["video"], "audio": lateness["audio"] - chunk_max,
              "text": lateness["text"] - seg_max}  # arrival delay that keeps within budget
    cfg = align_config(window_ms, hop_ms, lateness_ns={m: v * MS for m, v in lateness.items()},
                 frames_per_window=draw(st.integers(1, 12)))
    drop_p = draw(st.sampled_from([0.0, 0.1, 0.4]))
    queues = []
    originals = []
    for n in range(draw(st.integers(1, 3))):
        sid = f"cam-{n}"
        dur = draw(st.integers(1, 4)) * 500 * MS
        start = T0 + draw(st.integers(0, 1000)) * MS
        recs = {m: [] for m in MODS}
        period = draw(st.integers(20, 100)) * MS
        for i in range(dur // period):
            if rnd.random() >= drop_p:
                ts = start + i * period + rnd.randrange(period // 2)
                recs["video"].append(frame(sid, ts, i, Source(f"{sid}.v", 0, i)))
        t, i = start, 0
        while t < start + dur:
            n_samples = rnd.randint(1, chunk_max * 16)
            if rnd.random() >= drop_p:
                pcm = rng.integers(-32768, 32767, n_samples, dtype=np.int16)
                recs["audio"].append(chunk(sid, t, i, pcm, source=Source(f"{sid}.a", 0, i)))
            t += n_samples * NS_PER_SAMPLE
            i += 1
        if with_text:
            starts = sorted(start + rnd.randrange(dur) for _ in range(rnd.randint(0, 6)))
            for i, s0 in enumerate(starts):
                recs["text"].append(segment(sid, i, s0, s0 + rnd.randint(0, seg_max) * MS,
                                        source=Source(f"{sid}.t", 0, i)))
        for m in MODS:
            originals += recs[m]
            delayed = sorted(recs[m], key=lambda r: r.ts_ns + rnd.randint(0, jitter[m] * MS))
            queues.append(delayed)
    arrivals = []
    while any(queues):  # a random interleaving that keeps each queue's order
        q = rnd.choices([q for q in queues if q], [len(q) for q in queues if q])[0]
        arrivals.append(q.pop(0))
    for _ in range(draw(st.integers(0, max(0, len(arrivals) // 10)))):
        if not arrivals:
            break
        i = rnd.randrange(len(arrivals))
        copy = dataclasses.replace(arrivals[i], source=Source("retry", 0, i))
        arrivals.insert(rnd.randint(i + 1, len(arrivals)), copy)
    return Scenario(cfg, arrivals, originals, draw(st.sampled_from([0.0, 0.3, 1.0])), rnd)


def feed(a: Aligner, arrivals, poll_p: float, rnd: random.Random, now: int = 0):
    """Add in arrival order, polling at random points; return (windows, outcomes)."""
    out, outcomes = [], []
    for r in arrivals:
        outcomes.append(a.add(r, now))
        if rnd.random() < poll_p:
            out += a.poll(now)
    return out + a.flush(), outcomes


def first_copies(arrivals):
    seen, firsts = set(), []
    for r in arrivals:
        key = (r.stream_id, r.modality, r.seq)
        firsts.append(key not in seen)
        seen.add(key)
    return firsts


# --- properties ----------------------------------------------------------------------------


@SETTINGS
@given(scenarios())
def test_out_of_order_within_budget_gives_exactly_the_oracles_windows(sc: Scenario):
    a = Aligner(sc.cfg)
    got, outcomes = feed(a, sc.arrivals, sc.poll_p, sc.rnd)
    firsts = first_copies(sc.arrivals)
    assert [o.status for o in outcomes] == ["accepted" if f else "duplicate" for f in firsts]
    assert a.stats["accepted"] == len(sc.originals)
    assert a.stats["duplicates"] == len(sc.arrivals) - len(sc.originals)
    assert_start_order(got)
    assert_same(got, oracle_windows(sc.cfg, [(r, None) for r in sc.originals]))
    # and in-order arrival gives the very same windows
    in_order = sorted(sc.originals, key=lambda r: (r.ts_ns, r.modality, r.seq))
    b = Aligner(sc.cfg)
    again, _ = feed(b, in_order, sc.poll_p, sc.rnd)
    assert sorted(w.key for w in again) == sorted(w.key for w in got)
    by_key = {w.key: as_oracle(w) for w in again}
    assert_same(got, by_key)


@SETTINGS
@given(scenarios(tumbling=True))
def test_audio_over_tumbling_windows_sums_to_the_input(sc: Scenario):
    a = Aligner(sc.cfg)
    got, _ = feed(a, sc.arrivals, sc.poll_p, sc.rnd)
    chunks = [r for r in sc.originals if r.modality == "audio"]
    total_in = sum(int(np.round(c.samples()[:, 0] * 32768).astype(np.int64).sum()) for c in chunks)
    total_out = sum(int(np.round(w.audio * 32768).astype(np.int64).sum()) for w in got)
    assert total_out == total_in
    assert sum(int(w.audio_mask.sum()) for w in got) == sum(c.n_samples for c in chunks)


@SETTINGS
@given(scenarios(), st.data())
def test_records_beyond_the_budget_are_all_accounted_for(sc: Scenario, data):
    """Delay some records far beyond their lateness. Every record then is accepted into
    exactly the windows still open when it came, or reported late; windows close exactly
    when the watermark rule says, never earlier, never later."""
    arrivals = list(sc.arrivals)
    for _ in range(data.draw(st.integers(1, max(1, len(arrivals) // 4)))):
        i = sc.rnd.randrange(len(arrivals))
        arrivals.insert(sc.rnd.randint(i, len(arrivals)), arrivals.pop(i))
    a = Aligner(sc.cfg)
    w_ns, h_ns, late = sc.cfg.window_ns, sc.cfg.hop_ns, sc.cfg.lateness_ns
    wm: dict[str, dict[str, int]] = defaultdict(dict)
    got: list[Window] = []
    allowed: list = []
    n_late = 0
    for r, first in zip(arrivals, first_copies(arrivals), strict=True):
        sid = r.stream_id
        cb = a.closed_before(sid)
        out = a.add(r, 0)
        if not first:
            assert out.status == "duplicate"
            continue
        end = r.ts_ns if r.modality == "video" else r.end_ns
        wm[sid][r.modality] = max(wm[sid].get(r.modality, end), end)
        windows = [k for k in range(r.ts_ns // h_ns - w_ns // h_ns - 2,
                                    (end // h_ns) + 2) if member(r, k * h_ns, w_ns)]
        open_ = {k * h_ns for k in windows if cb is None or k * h_ns >= cb}
        if not open_:
            assert out.status == "late", (r, cb, out)
            assert "already closed" in out.reason and r.modality in out.reason
            n_late += 1
        else:
            assert out.status == "accepted"
            assert out.release_after_ns == max(open_)
            assert ("partly late" in out.reason) == (len(open_) < len(windows))
            allowed.append((r, open_))
        polled = a.poll(0)
        marks = wm[sid]
        if len(marks) == 3:
            limit = min(marks[m] - late[m] for m in MODS)
            k_max = (limit - w_ns) // h_ns * h_ns
            assert a.closed_before(sid) == max(k_max + h_ns, cb or k_max + h_ns)
            assert all(w.start_ns <= k_max for w in polled)  # never early
        else:
            assert polled == [] and a.closed_before(sid) is None
        got += polled
    got += a.flush()
    assert a.stats["late"] == n_late
    event(f"late records: {min(n_late, 3)}+, partly late: {min(a.stats['late_partial'], 3)}+")
    assert_start_order(got)
    assert_same(got, oracle_windows(sc.cfg, allowed))


@SETTINGS
@given(scenarios(), st.data())
def test_resume_after_a_crash_gives_every_window_exactly_once(sc: Scenario, data):
    """Run A to a random point, 'crash', work out what an ack-after-emit agent committed
    (per modality topic: the offsets before the first unacked record), and replay the rest
    into a fresh aligner resumed at the last emitted windows."""
    ref, _ = feed(Aligner(sc.cfg), sc.arrivals, 1.0, sc.rnd)
    crash = data.draw(st.integers(len(sc.arrivals) // 3, len(sc.arrivals)))
    a1 = Aligner(sc.cfg)
    published: list[Window] = []
    outcomes = []
    for r in sc.arrivals[:crash]:
        outcomes.append(a1.add(r, 0))
        published += a1.poll(0)

    def acked(r, out) -> bool:
        if out.status != "accepted":
            return True
        cb = a1.closed_before(r.stream_id)
        return cb is not None and out.release_after_ns < cb

    # a topic-partition per modality: each commits up to its first unacked record
    first_unacked: dict[str, int] = {}
    for i, (r, out) in enumerate(zip(sc.arrivals[:crash], outcomes, strict=True)):
        if not acked(r, out):
            first_unacked.setdefault(r.modality, i)
    replay = [r for i, r in enumerate(sc.arrivals)
              if i >= crash or i >= first_unacked.get(r.modality, crash)]
    resume = {}
    for w in published:
        resume[w.stream_id] = max(resume.get(w.stream_id, w.start_ns), w.start_ns)
    a2 = Aligner(sc.cfg, resume=resume)
    rest = []
    for r in replay:
        out = a2.add(r, 0)
        assert out.status != "late", (r, out)
        rest += a2.poll(0)
    rest += a2.flush()
    event(f"replayed outcomes: {min(a2.stats['replayed'], 3)}+, resumed streams: {len(resume)}")
    assert_same(published + rest, {w.key: as_oracle(w) for w in ref})


@settings(max_examples=40, deadline=None)
@given(window_ms=st.sampled_from([300, 500, 1000, 2000]), hop_div=st.sampled_from([1, 2, 4]),
       late_ms=st.integers(0, 300), idle_ms=st.integers(300, 2000),
       outage_at=st.integers(5, 30), outage_len=st.integers(0, 60), late_chunk=st.booleans())
def test_mic_unplugged_then_back_with_a_fake_clock(window_ms, hop_div, late_ms, idle_ms,
                                                   outage_at, outage_len, late_chunk):
    """Live feed (clock = event time): 20 fps video, 100 ms audio chunks; the microphone
    is silent from outage_at to outage_at + outage_len (in 100 ms steps). With
    ``late_chunk``, a stale chunk from before the outage arrives during it, once its
    windows closed: it is late, and windows keep closing on the clock as before."""
    hop_ms = max(50, window_ms // hop_div)
    a = Aligner(align_config(window_ms, hop_ms, late_ms=late_ms, idle_ms=idle_ms,
                       expected=("video", "audio")))
    off, on = outage_at * 100, (outage_at + outage_len) * 100
    out: list[tuple[int, Window]] = []
    seqs: dict = {}
    feed_live(a, 0, off, True, seqs, out)
    # the stale chunk's windows end by off + W; they close lateness + deadline after that
    stale_at = -(-(off + window_ms + late_ms + idle_ms) // 100) * 100 + 100
    n_late = int(late_chunk and off >= 100 and stale_at < on)
    if n_late:
        feed_live(a, off, stale_at, False, seqs, out)
        stale = chunk("cam", (off - 100) * MS, 10**6, np.full(1600, 7, np.int16))
        assert a.add(stale, stale_at * MS).status == "late"
        feed_live(a, stale_at, on, False, seqs, out)
    else:
        feed_live(a, off, on, False, seqs, out)
    feed_live(a, on, on + 3000, True, seqs, out)
    out += [(None, w) for w in a.flush()]
    keys = [w.key for _, w in out]
    assert len(keys) == len(set(keys))
    assert_start_order([w for _, w in out])
    assert a.stats["late"] == n_late and a.stats["late_partial"] == 0
    for now, w in out:
        s, e = w.start_ns // MS, w.end_ns // MS
        if s < 0 or e > on + 3000:
            continue  # the edges of the recording
        assert w.frame_count == window_ms // 50  # video never stopped
        if e <= off or s >= on:  # the microphone was there throughout
            assert w.audio_mask.all(), (s, e)
            if now is not None and (s >= on or e + late_ms + 50 <= off):
                assert w.quality["closed_by"] == "watermark"  # both had passed its end
        if s >= off and e <= on:  # unplugged throughout: masked ...
            assert not w.present["audio"] and not w.audio_mask.any()
            # ... and it did not wait for the microphone to come back
            # the audio watermark moves with the clock from `off` once silent past its
            # deadline: it passes e + lateness at e + lateness + idle; video a step after e
            due = e + late_ms + max(idle_ms, 50)
            if due <= on:
                assert now is not None and now <= -(-due // 100) * 100 * MS, (s, e, now)
                assert w.quality["closed_by"] == "deadline"
