"""final_within: a window's final waits for the slow modality (the transcript) at most
that long after its provisional went out, on poll()'s clock; segments that come later
revise it, so the last revision of every window is the final an aligner without the
bound emits. While the clock stands still (a worker catching up) and while a restart
replays its backlog (no provisional windows), the bound does nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from streamproc.align.aligner import AlignConfig, Aligner, ClosedBy, Window
from streamproc.config import ConfigError, Settings
from streamproc.testing import MS, S, chunk, frame, segment

T0 = 1_800_000_000 * S  # the wall clock is event time here


def cfg(**changes) -> AlignConfig:
    """The settings with ``changes``; without a ``final_within_ms``: no bound."""
    changes.setdefault("final_within_ms", 0)
    return AlignConfig.from_settings(Settings(**changes))


def stream(seconds: int, *, lag_ms: int = 1000, seed: int = 0, sid: str = "cam") -> list:
    """(arrival, record): 10 fps video and 100 ms chunks arriving as they end, and 1-2 s
    transcript segments with 0-1 s gaps, each arriving ``lag_ms`` (+- 200 ms) after it
    ends, as a recogniser sends them (``lag_ms`` at most 2600: the first segment must come
    within the text's idle deadline plus lateness of the stream's start)."""
    rng = random.Random(seed)
    events = []
    for i, t in enumerate(range(T0, T0 + seconds * S, 100 * MS)):
        events.append((t, frame(sid, t, i)))
        events.append((t + 100 * MS, chunk(sid, t, i, np.full(1600, i % 50, np.int16))))
    t, seq = T0 + 100 * MS, 0
    while t < T0 + (seconds - 3) * S:
        # the first one short: it comes before the stream stops waiting for a transcript
        end = t + (1000 if seq == 0 else rng.randrange(1000, 2000)) * MS
        arrive = end + (lag_ms + rng.randrange(-200, 200)) * MS
        events.append((arrive, segment(sid, seq, t, end, text=f"w{seq}")))
        t, seq = end + rng.randrange(0, 1000) * MS, seq + 1
    return sorted(events, key=lambda e: e[0])


def run(a: Aligner, events: list, until: int,
        provisional: bool = True) -> list[tuple[int, Window]]:
    """Add each record at its arrival, polling every 50 ms of clock up to ``until``
    (``provisional`` False: as a restarted worker replaying its backlog)."""
    out: list[tuple[int, Window]] = []
    now, i = events[0][0], 0
    while now <= until:
        while i < len(events) and events[i][0] <= now:
            a.add(events[i][1], events[i][0])
            i += 1
        out += [(now, w) for w in a.poll(now, provisional)]
        now += 50 * MS
    return out


def last_finals(out: list[tuple[int, Window]]) -> dict[int, Window]:
    """Window start -> its last final (revision), and check revs only grow."""
    by: dict[int, Window] = {}
    for _, w in out:
        if w.final:
            if w.start_ns in by:
                assert w.rev > by[w.start_ns].rev
            by[w.start_ns] = w
    return by


def content(w: Window) -> tuple:
    return ([f.seq for f in w.frames], w.audio.tobytes(), w.audio_mask.tobytes(),
            [(s.seq, s.start_ns, s.end_ns, s.text) for s in w.segments], w.present)


@pytest.mark.parametrize("lag_ms", [500, 1000, 2000])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_final_is_due_within_the_bound_and_its_last_revision_is_the_unbounded_final(
        lag_ms: int, seed: int) -> None:
    events = stream(40, lag_ms=lag_ms, seed=seed)
    until = T0 + 60 * S
    plain_out = run(Aligner(cfg()), events, until)
    plain = last_finals(plain_out)
    out = run(Aligner(cfg(final_within_ms=1500)), events, until)
    bounded = last_finals(out)
    assert plain.keys() == bounded.keys() and len(plain) > 60
    # every window's last revision holds exactly what the final that waited had
    for k, w in plain.items():
        assert content(bounded[k]) == content(w), k
    # each window's first final came within the bound (plus one poll) of its provisional;
    # finals that waited for the text watermark plus its 3 s lateness came later
    delays = [at - prov for prov, at in provisional_to_final(out)]
    assert delays and max(delays) <= 1500 * MS + 50 * MS
    plain_delay = [at - prov for prov, at in provisional_to_final(plain_out)]
    assert sum(d > 2 * S for d in plain_delay) > len(plain_delay) // 2


@pytest.mark.parametrize("seed", [1, 2])
def test_by_default_a_final_comes_about_the_text_lateness_after_its_window_ends(
        seed: int) -> None:
    events = stream(40, lag_ms=2000, seed=seed)
    until = T0 + 60 * S
    plain = last_finals(run(Aligner(cfg()), events, until))
    defaults = Settings()
    out = run(Aligner(AlignConfig.from_settings(defaults)), events, until)
    assert {k: content(w) for k, w in last_finals(out).items()} == \
        {k: content(w) for k, w in plain.items()}
    first: dict[int, tuple[int, Window]] = {}
    for now, w in out:
        if w.final:
            first.setdefault(w.start_ns, (now, w))
    prov = {w.start_ns for _, w in out if not w.final}
    # (the last windows' provisionals wait for the idle deadline of media that stopped)
    late = [now - w.end_ns for k, (now, w) in first.items()
            if k in prov and w.end_ns <= T0 + 38 * S]
    assert len(late) > 60
    # the provisional comes 100-200 ms after the end here (lateness 100 ms, the chunk)
    assert max(late) <= defaults.lateness_text_ms * MS + 200 * MS
    assert any(w.quality["closed_by"] == ClosedBy.BOUND for _, w in first.values())


def provisional_to_final(out: list[tuple[int, Window]]) -> list[tuple[int, int]]:
    """(provisional emitted, first final emitted) of each window that had a provisional."""
    prov: dict[int, int] = {}
    first: dict[int, int] = {}
    for now, w in out:
        if not w.final:
            prov.setdefault(w.start_ns, now)
        else:
            first.setdefault(w.start_ns, now)
    return [(at, first[k]) for k, at in prov.items() if k in first]


def test_no_bound_while_the_clock_stands_still_or_a_replay_has_no_provisionals() -> None:
    events = stream(30, lag_ms=1000, seed=6)
    until = T0 + 50 * S
    plain = {k: content(w) for k, w in last_finals(run(Aligner(cfg()), events, until)).items()}
    # a restarted worker replaying its backlog polls without provisional windows
    a = Aligner(cfg(final_within_ms=500))
    out = run(a, events, until, provisional=False)
    assert {w.quality["closed_by"] for _, w in out} <= {ClosedBy.WATERMARK, ClosedBy.DEADLINE}
    assert {k: content(w) for k, w in last_finals(out).items()} == plain
    assert a.stats["revisions"] == 0
    # a worker catching up: every record read at one clock reading, nothing waits for it
    b = Aligner(cfg(final_within_ms=500))
    for _, rec in events:
        b.add(rec, until)
    caught = b.poll(until)
    assert not any(w.quality["closed_by"] == ClosedBy.BOUND for w in caught)
    assert not any(w.final and w.present["text"] is False and w.start_ns < T0 + 20 * S
                   for w in caught)


def test_a_final_closed_by_the_bound_says_so_and_one_that_waited_for_the_text_does_not(
        ) -> None:
    events = stream(20, lag_ms=2500, seed=4)
    out = run(Aligner(cfg(final_within_ms=1000)), events, T0 + 40 * S)
    whys = {w.quality["closed_by"] for _, w in out if w.final and w.rev == 1}
    assert ClosedBy.BOUND in whys
    revised = [w for _, w in out if w.final and w.rev > 1]
    assert revised and all(w.quality["closed_by"] == ClosedBy.REVISION for w in revised)
    # a transcript that arrives before the bound (and is never silent): its watermark
    quick = stream(20, lag_ms=200, seed=4)
    out = run(Aligner(cfg(final_within_ms=10_000, idle_deadline_text_ms=5000)), quick,
              T0 + 40 * S)
    whys = [w.quality["closed_by"] for _, w in out
            if w.final and T0 + 2 * S <= w.start_ns < T0 + 12 * S]
    assert whys and set(whys) == {ClosedBy.WATERMARK}


def test_a_silent_transcript_is_a_deadline_not_the_bound() -> None:
    media_only = [e for e in stream(20, seed=5) if e[1].modality != "text"]
    text = segment("cam", 0, T0 + 100 * MS, T0 + 900 * MS)
    out = run(Aligner(cfg(final_within_ms=5000)), [(T0 + S, text), *media_only], T0 + 30 * S)
    whys = [w.quality["closed_by"] for _, w in out if w.final and w.start_ns >= T0 + 3 * S]
    assert whys and set(whys) == {ClosedBy.DEADLINE}


def test_the_bound_needs_a_provisional_modality_and_a_slower_one() -> None:
    for bad in ({"provisional_on": "none"},
                {"provisional_on": "video,audio", "expected_modalities": "video,audio"}):
        with pytest.raises(ConfigError, match="final_within_ms"):
            Settings(final_within_ms=2000, **bad)
    with pytest.raises(ConfigError, match="final_within_ns"):
        AlignConfig(window_ns=S, hop_ns=S // 2, lateness_ns={}, idle_ns={},
                    final_within_ns=S)


def test_the_bound_fires_on_the_clock_when_nothing_more_arrives() -> None:
    """A provisional, and nothing after the record that completed it: its final comes
    the bound after it, not at the sources' idle deadlines."""
    a = Aligner(cfg(final_within_ms=800, idle_deadline_video_ms=5000,
                    idle_deadline_audio_ms=5000, idle_deadline_text_ms=5000))
    events = [e for e in stream(1, seed=7)
              if e[1].modality != "text" and e[0] <= T0 + 600 * MS]
    events.append((T0 + 200 * MS, segment("cam", 0, T0, T0 + 100 * MS)))
    out = run(a, sorted(events, key=lambda e: e[0]), T0 + 4 * S)
    prov = {w.start_ns: now for now, w in out if not w.final}
    finals = {w.start_ns: now for now, w in out if w.final and w.rev == 1}
    # media up to 0.6 s: only the window [-0.5 s, 0.5 s) is complete, at 0.6 s
    assert list(prov) == [T0 - 500 * MS]
    k = T0 - 500 * MS
    assert finals[k] - prov[k] <= 800 * MS + 50 * MS
    assert [w.quality["closed_by"] for now, w in out if w.final and w.start_ns == k] == \
        [ClosedBy.BOUND]


def test_time_the_clock_stood_still_counts_at_most_one_step() -> None:
    """A worker behind its input: poll()'s clock stands still for 10 s while records are
    read, then jumps. Provisionals that went out meanwhile get their full bound after the
    jump, less one step, not nothing."""
    events = stream(20, lag_ms=1500, seed=8)
    a = Aligner(cfg(final_within_ms=2000))
    frozen, jump = T0 + 5 * S, T0 + 15 * S
    out: list[tuple[int, Window]] = []
    now, i = events[0][0], 0
    while now <= T0 + 25 * S:
        while i < len(events) and events[i][0] <= now:
            a.add(events[i][1], events[i][0])
            i += 1
        clock = frozen if frozen <= now < jump else now
        out += [(now, w) for w in a.poll(clock)]
        now += 50 * MS
    # provisionals of the frozen time went out on the frozen clock; after the jump their
    # finals still waited the bound (less the one step the jump counts)
    prov = {w.start_ns: at for at, w in out if not w.final}
    for at, w in out:
        if w.final and w.rev == 1 and w.quality["closed_by"] == ClosedBy.BOUND \
                and frozen <= prov.get(w.start_ns, 0) < jump:
            assert at >= jump + 2000 * MS - 250 * MS, (w.start_ns - T0, at - T0)
    assert any(w.quality["closed_by"] == ClosedBy.BOUND for _, w in out)
