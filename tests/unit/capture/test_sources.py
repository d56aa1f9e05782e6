"""Source logic without Kafka: clock, queue, throttle, audio continuity, files, mic, camera."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import io
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from media_helpers import (
    SRT,
    SRT_SPANS_NS,
    SRT_TEXTS,
    VIDEO_FPS,
    container_times,
    decoded_audio,
    make_frames,
    pcm24,
    speech_wav,
    tone,
    wav_pcm,
    write_av,
    write_video,
    write_wav,
    write_wav_bytes,
)

from streamproc.capture.publisher import ListOutbox
from streamproc.capture.sources import (
    CameraSource,
    Clock,
    DropOldestQueue,
    FileSource,
    FrameThrottle,
    MicSource,
    StreamWriter,
    audio_chunks,
    continue_or_resync,
    file_records,
    import_sounddevice,
    publish_transcript_lines,
    replay,
    stdin_lines,
)
from streamproc.errors import UserError
from streamproc.testing import T0, ManualClock
from streamproc.wire.codec import NS_PER_S as NS

MS = 1_000_000
S = 1_000_000_000
REPO = Path(__file__).resolve().parents[3]


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- clock, queue, throttle, continuity ---------------------------------------------------


def test_clock_follows_the_monotonic_clock_not_later_wall_clock_jumps(monkeypatch) -> None:
    clock = Clock()
    before = clock.now_ns()
    assert abs(before - time.time_ns()) < S  # it is wall-clock time
    # the system clock is set back an hour: event times must keep increasing
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - 3600 * S)
    readings = [clock.now_ns() for _ in range(100)]
    assert readings[0] >= before
    assert all(b >= a for a, b in itertools.pairwise(readings))
    assert readings[-1] - before < 5 * S


def test_drop_oldest_queue_never_blocks_and_returns_what_it_evicts() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(3)
    evicted = [q.put(i) for i in range(7)]
    assert evicted == [None, None, None, 0, 1, 2, 3]
    assert q.dropped == 4 and len(q) == 3
    assert [q.get(0), q.get(0), q.get(0)] == [4, 5, 6]
    t0 = time.monotonic()
    assert q.get(0.05) is None
    assert time.monotonic() - t0 >= 0.04


@pytest.mark.parametrize(("target", "expected"), [(15, 150), (10, 100), (7.5, 75)])
def test_throttle_keeps_the_target_rate_despite_jitter(target: float, expected: int) -> None:
    rng = np.random.default_rng(1)
    ts = [T0 + round(i * S / 30) + int(rng.integers(-3 * MS, 3 * MS)) for i in range(300)]
    th = FrameThrottle(target)
    kept = [t for t in ts if th.keep(t)]
    assert abs(len(kept) - expected) <= 1
    gaps = np.diff(kept) / MS
    period = 1000 / target
    # every kept frame is the camera frame nearest its slot: gaps are whole 33 ms steps
    assert gaps.min() > period - 34 and gaps.max() < period + 34


def test_throttle_passes_everything_when_the_source_is_slower_or_unthrottled() -> None:
    ts = [T0 + i * 100 * MS for i in range(50)]  # 10 fps source
    assert all(FrameThrottle(30).keep(t) for t in ts)
    assert all(FrameThrottle(None).keep(t) for t in ts)


def test_continue_or_resync() -> None:
    assert continue_or_resync(None, 123) == (123, False)
    assert continue_or_resync(1000 * MS, 1010 * MS) == (1000 * MS, False)  # jitter absorbed
    assert continue_or_resync(1000 * MS, 1100 * MS) == (1100 * MS, True)  # real jump


# --- StreamWriter: the user API ------------------------------------------------------------


def test_stream_writer_numbers_each_modality_and_keeps_audio_continuous() -> None:
    outbox, clock = ListOutbox(), ManualClock()
    w = StreamWriter(outbox, "cam-1", clock=clock)
    img = make_frames(1)[0]
    f0, f1 = w.frame(img), w.frame(img, ts_ns=T0 + 5)
    assert (f0.seq, f1.seq, f0.ts_ns, f1.ts_ns) == (0, 1, T0, T0 + 5)
    block = (np.arange(1600) % 300).astype(np.int16)
    chunks = []
    for k in range(5):  # blocks arrive every 100 ms, +-2 ms of scheduling jitter
        clock.now = T0 + (k + 1) * 100 * MS + (2 * MS if k % 2 else -2 * MS)
        chunks.append(w.audio(block, 16000))
    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4]
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(chunks))
    assert w.resyncs == 0
    clock.now += 2 * S  # capture paused: the next block is re-anchored, not stretched
    late = w.audio(block, 16000)
    assert late.ts_ns == clock.now - 100 * MS and w.resyncs == 1
    seg = w.text("hello", T0, T0 + S, final=False)
    assert (seg.seq, seg.final) == (0, False)
    assert outbox.records == [f0, f1, *chunks, late, seg]
    with pytest.raises(UserError, match="stream id"):
        StreamWriter(outbox, " bad id")


def test_transcript_lines_are_stamped_on_arrival_and_bad_jsonl_lines_skipped() -> None:
    outbox, clock = ListOutbox(), ManualClock()
    w = StreamWriter(outbox, "s", clock=clock)

    def arriving(lines: list[str], step_s: float):
        for line in lines:
            clock.now += round(step_s * S)
            yield line

    st = publish_transcript_lines(w, arriving(["first\n", "\n", "second\n"], 1.0),
                                  max_span_ns=3 * S)
    segs = outbox.records
    assert st.segments == 2 and not st.issues
    assert [(s.text, s.start_ns - T0, s.end_ns - T0) for s in segs] == [
        ("first", 0, 1 * S), ("second", 2 * S, 3 * S)]
    outbox.records.clear()
    lines = ['{"text": "partial", "final": false}',
             "{oops",
             f'{{"text": "exact", "start_ns": {T0}, "end_ns": {T0 + 7}}}']
    st = publish_transcript_lines(w, arriving(lines, 10.0), jsonl=True, max_span_ns=3 * S)
    assert (st.segments, st.partial) == (2, 1)
    assert [(i.line, i.message[:8]) for i in st.issues] == [(2, "not JSON")]
    partial, exact = outbox.records
    assert partial.end_ns - partial.start_ns == 3 * S and not partial.final  # capped span
    assert (exact.start_ns, exact.end_ns, exact.seq) == (T0, T0 + 7, 3)


def test_transcript_lines_that_are_not_utf8_are_skipped_and_the_rest_published() -> None:
    # stdin read as bytes (the CLI), and text read with surrogateescape (a C locale)
    outbox, clock = ListOutbox(), ManualClock()
    w = StreamWriter(outbox, "s", clock=clock)
    stdin = io.BytesIO(b"before\n\xff\xfebad\nafter\r\n")
    st = publish_transcript_lines(w, stdin_lines(stdin, threading.Event()))
    assert [str(i) for i in st.issues] == [
        "<stdin>:2: not UTF-8 (bad byte at column 1); line skipped"]
    assert [s.text for s in outbox.records] == ["before", "after"]
    outbox.records.clear()
    escaped = b"ok\n\xff\xfebad\n".decode("utf-8", "surrogateescape").splitlines(True)
    st = publish_transcript_lines(w, escaped, jsonl=True)
    assert [(i.line, i.message[:10]) for i in st.issues] == [(1, "not JSON: "), (2, "not UTF-8 ")]
    assert outbox.records == []


# --- files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("media")
    frames = make_frames(12)
    rng = np.random.default_rng(3)
    pcm = rng.integers(-20000, 20000, 16000 + 123, dtype=np.int16)  # 1.0077 s
    return SimpleNamespace(
        frames=frames,
        video=write_video(d / "clip.avi", frames),
        pcm=pcm,
        wav=write_wav(d / "noise.wav", pcm, 16000),
        srt=(d / "talk.srt"),
        speech=speech_wav(d / "speech.wav"),
        dir=d,
    )


@pytest.fixture(autouse=True)
def _srt(media: SimpleNamespace) -> None:
    media.srt.write_text(SRT)


def test_file_records_share_one_clock_origin_and_come_out_in_due_order(media) -> None:
    recs = list(file_records("s1", media.video, media.wav, media.srt, origin_ns=T0))
    video = [r for r in recs if r.modality == "video"]
    audio = [r for r in recs if r.modality == "audio"]
    text = [r for r in recs if r.modality == "text"]
    assert [r.seq for r in video] == list(range(12))
    assert [r.ts_ns - T0 for r in video] == [round(i * S / VIDEO_FPS) for i in range(12)]
    assert [r.seq for r in audio] == list(range(len(audio)))
    assert audio[0].ts_ns == T0 and all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(audio))
    assert b"".join(a.data for a in audio) == media.pcm.astype("<i2").tobytes()
    assert [(s.start_ns - T0, s.end_ns - T0) for s in text] == SRT_SPANS_NS
    assert [s.text for s in text] == SRT_TEXTS
    due = [r.ts_ns if r.modality == "video" else r.end_ns for r in recs]
    assert due == sorted(due)
    for got, want in zip(video, media.frames, strict=True):
        assert mean_abs_diff(got.image(), want) < 8


@pytest.mark.parametrize("ahead_s", [0, 5])
def test_realtime_replay_never_sends_a_record_before_its_event_time(media, ahead_s) -> None:
    """With a start in the future (``--start-at``, the demo) the replay waits for it:
    each record goes out when its span has ended, as from a live source."""

    class Instant(ManualClock):  # waiting moves the clock at once
        def wait_until(self, wall_ns: int, stop=None) -> bool:
            self.now = max(self.now, wall_ns)
            return True

    clock = Instant()
    sent: list[tuple[int, object]] = []

    class Outbox:
        def publish(self, rec) -> None:
            sent.append((clock.now, rec))

    start = T0 + ahead_s * S
    replay(Outbox(), "s1", media.video, media.wav, media.srt, start_at_ns=start, clock=clock)
    assert {r.modality for _, r in sent} == {"video", "audio", "text"}
    assert all(now >= rec.end_ns for now, rec in sent)
    first_audio = next(now for now, r in sent if r.modality == "audio")
    assert first_audio == start + 100 * MS  # sent as its 100 ms span ends, not earlier or later


def test_wav_keeps_its_own_rate_and_speech_is_sample_exact(media) -> None:
    pcm, rate, _ = wav_pcm(media.speech)
    chunks = list(audio_chunks(media.speech, "s", T0, chunk_ms=100))
    assert {c.sample_rate for c in chunks} == {rate} and rate != 16000
    assert all(c.n_samples == rate // 10 for c in chunks[:-1])
    assert b"".join(c.data for c in chunks) == pcm
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(chunks))


@pytest.mark.parametrize("width", [1, 3, 4])
def test_wav_8_24_32_bit_samples_convert_to_full_scale(media, width: int) -> None:
    full = {1: 127, 3: (1 << 23) - 1, 4: (1 << 31) - 1}[width]
    values = np.array([0, full // 2, -full // 2, full], dtype=np.int64)
    path = media.dir / f"w{width}.wav"
    if width == 1:
        import wave

        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(1)
            w.setframerate(8000)
            w.writeframes((values + 128).astype(np.uint8).tobytes())
    else:
        write_wav(path, values.astype(np.int32), 8000, width)
    (chunk,) = audio_chunks(path, "s", T0)
    got = chunk.samples()[:, 0]
    assert chunk.fmt == ("s16le" if width == 1 else "f32le")
    np.testing.assert_allclose(got, values / full, atol=1 / 128)


def test_loop_restarts_each_pass_where_the_longest_modality_ended(media) -> None:
    src = FileSource("s1", media.video, media.wav, media.srt, loop=True)
    recs = [r for _, r in itertools.islice(src.records(T0), 200)]
    video = [r for r in recs if r.modality == "video"]
    audio = [r for r in recs if r.modality == "audio"]
    pass_ns = 1_900_000_000  # the SRT's last cue ends after the video (1.2 s) and WAV (1.008 s)
    assert video[12].ts_ns == T0 + pass_ns and video[12].seq == 12
    assert audio[11].ts_ns == T0 + pass_ns and audio[11].seq == 11
    assert src.stats.loops >= 1


def test_file_source_errors_are_readable(media, tmp_path) -> None:
    with pytest.raises(UserError, match="video file not found"):
        FileSource("s", tmp_path / "nope.avi")
    (tmp_path / "junk.avi").write_bytes(b"not a video at all" * 10)
    with pytest.raises(UserError, match="not a media file FFmpeg can read"):
        FileSource("s", tmp_path / "junk.avi")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(UserError, match="not a media file FFmpeg can read"):
        FileSource("s", media.video, tmp_path / "junk.wav")
    with pytest.raises(UserError, match="nothing to replay"):
        FileSource("s")


def test_bad_transcript_lines_are_counted_and_the_rest_replayed(media, tmp_path) -> None:
    bad = tmp_path / "bad.srt"
    bad.write_text(SRT.replace("00:00:00,900 --> 00:00:01,450", "00:00:00,900 --> 1,450"))
    src = FileSource("s", transcript=bad)
    texts = [r.text for _, r in src.records(T0)]
    assert texts == ["seven", "five"]
    assert [(i.line, "bad timing line" in i.message) for i in src.stats.transcript_issues] == [
        (6, True)]


def _mka(path, hole_after: int | None, frames: int = 200) -> None:
    """48 kHz mono PCM in Matroska (timestamps rounded to 1 ms), frames of 1024 samples;
    a 0.5 s hole in the track after frame ``hole_after``."""
    import fractions

    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("pcm_s16le", rate=48_000)
        pts = 0
        for i in range(frames):
            x = (np.sin(np.arange(1024) * 0.05) * 3000).astype(np.int16).reshape(1, -1)
            fr = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
            fr.sample_rate = 48_000
            if i == hole_after:
                pts += 24_000
            fr.pts, fr.time_base = pts, fractions.Fraction(1, 48_000)
            pts += 1024
            for packet in st.encode(fr):
                out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)


def test_audio_after_a_hole_in_the_track_keeps_its_time(tmp_path) -> None:
    """Samples after a 0.5 s hole are stamped where the track has them (they were
    stamped 0.5 s early, and every later chunk with them); a track without holes stays
    one sample-continuous run despite its timestamps rounded to 1 ms."""
    from streamproc.capture.sources import audio_chunks

    plain, holed = tmp_path / "plain.mka", tmp_path / "holed.mka"
    _mka(plain, None)
    _mka(holed, 47)
    cs = list(audio_chunks(plain, "s", T0))
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(cs))
    assert [c.n_samples for c in cs[:-1]] == [4800] * (len(cs) - 1)
    hs = list(audio_chunks(holed, "s", T0))
    breaks = [(a, b) for a, b in itertools.pairwise(hs) if b.ts_ns != a.end_ns]
    assert len(breaks) == 1
    before, after = breaks[0]
    assert before.end_ns == T0 + 47 * 1024 * NS // 48_000  # the samples up to the hole
    assert abs(after.ts_ns - (T0 + (47 * 1024 + 24_000) * NS // 48_000)) <= 1_000_000
    assert sum(c.n_samples for c in hs) == 200 * 1024  # no sample lost or made up
    assert hs[-1].end_ns - T0 >= (200 * 1024 + 24_000) * NS // 48_000 - 1_000_000


def test_several_streams_fail_together_before_any_starts(media, tmp_path) -> None:
    """A missing file of one stream fails the replay before any stream has sent a
    record (with --loop the others used to run on and the error never showed); one that
    fails mid-way stops the others, looping or not."""
    from streamproc.capture.sources import ReplaySpec, replay_many

    outbox = ListOutbox()
    with pytest.raises(UserError, match=r"nope\.wav"):
        replay_many(outbox, [ReplaySpec("ok", audio=media.wav),
                             ReplaySpec("bad", audio=tmp_path / "nope.wav")],
                    realtime=False, loop=True)
    assert outbox.records == []

    class Breaks(ListOutbox):
        def publish(self, record) -> None:
            if record.stream_id == "bad" and record.seq == 3:
                raise RuntimeError("the outbox broke")
            super().publish(record)

    stop = threading.Event()
    with pytest.raises(RuntimeError, match="the outbox broke"):
        replay_many(Breaks(), [ReplaySpec("ok", audio=media.wav),
                               ReplaySpec("bad", audio=media.wav)],
                    realtime=True, loop=True, stop_event=stop)
    assert stop.is_set()


def test_a_long_caption_does_not_hold_back_the_cues_inside_it(tmp_path) -> None:
    """Cues go out when they end, in that order: one held on screen for 20 s (a station
    logo, a speaker's name) no longer delays the lines spoken meanwhile past the text
    lateness."""
    srt = tmp_path / "overlap.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:20,000\nNEWS AT NINE\n\n"
                   "2\n00:00:02,000 --> 00:00:03,000\ngood evening\n\n"
                   "3\n00:00:04,000 --> 00:00:05,500\nour top story\n")
    got = [(due - T0, r.seq, r.text) for due, r in FileSource("s", transcript=srt).records(T0)]
    assert got == [(3 * NS, 0, "good evening"), (5_500_000_000, 1, "our top story"),
                   (20 * NS, 2, "NEWS AT NINE")]


def test_a_fast_replay_never_runs_further_ahead_than_the_broker_takes(media) -> None:
    """--fast with a broker that takes event times up to 61 s ahead (a 60 s margin is
    kept): a record is sent once its time is at most 1 s ahead, instead of a long clip
    (or --loop) running ahead of the clock by its length until every record is refused."""
    from streamproc.capture.sources import replay_source

    class Jumping(ManualClock):
        def wait_until(self, wall_ns: int, stop: threading.Event | None = None) -> bool:
            self.now = max(self.now, wall_ns)
            return True

    clock = Jumping()
    sent_at: list[tuple[int, int]] = []  # (clock when sent, record's end)
    src = FileSource("s", audio=media.wav, chunk_ms=100)
    replay_source(ListOutbox(), src, realtime=False, start_at_ns=T0, clock=clock,
                  max_ahead_ms=61_000,
                  on_record=lambda r: sent_at.append((clock.now, r.end_ns)))
    assert len(sent_at) == 11
    assert all(end - now <= NS for now, end in sent_at)
    assert sent_at[0][0] == T0 and sent_at[-1][0] > T0  # the first at once, later ones held
    # without the broker's limit known, --fast is as fast as ever
    clock = Jumping()
    sent_at.clear()
    replay_source(ListOutbox(), FileSource("s", audio=media.wav), realtime=False,
                  start_at_ns=T0, clock=clock,
                  on_record=lambda r: sent_at.append((clock.now, r.end_ns)))
    assert {now for now, _ in sent_at} == {T0}


def test_a_sample_rate_the_wire_cannot_carry_is_refused_before_anything_is_sent(
        tmp_path) -> None:
    """A 6 kHz recording would be 'delivered', then every chunk a dead letter."""
    import wave

    path = tmp_path / "phone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(6000)
        w.writeframes(b"\x00\x00" * 6000)
    with pytest.raises(UserError, match=r"1 channels at 6000 Hz .* 8000\.\.192000 Hz"):
        FileSource("s", audio=path)


def test_a_transcript_with_no_readable_cue_is_refused_when_it_is_all_there_is(
        media, tmp_path, caplog) -> None:
    """Alone it would replay nothing and say "delivered 0 of 0"; beside audio it is a
    warning and the audio goes."""
    bad = tmp_path / "bad.srt"
    bad.write_text("1\n00:00:00,900 --> 1,450\nseven\n")
    with pytest.raises(UserError, match=r"bad\.srt: no cue could be read \(1 skipped"):
        FileSource("s", transcript=bad)
    src = FileSource("s", audio=media.wav, transcript=bad)
    assert {r.modality for _, r in src.records(T0)} == {"audio"}
    assert "no cue could be read" in caplog.text


# --- containers, variable frame rate, WAV variants ------------------------------------------

VFR_PTS_MS = [0, 40, 70, 200, 230, 500, 533, 1000, 1010, 1400]  # irregular on purpose


@pytest.fixture(scope="module")
def av_media(media: SimpleNamespace) -> SimpleNamespace:
    """Containers as cameras and editors write them: MP4 (H.264 + AAC 48 kHz stereo, a
    variable frame rate), MKV (H.264 + AAC 44.1 kHz stereo), AVI (MJPEG + 16-bit PCM
    44.1 kHz stereo)."""
    d = media.dir
    frames = make_frames(len(VFR_PTS_MS), (64, 48))
    pcm = tone(1.5, 44100)
    return SimpleNamespace(
        frames=frames,
        mp4=write_av(d / "vfr.mp4", frames, VFR_PTS_MS, audio=tone(1.5, 48000), rate=48000),
        mkv=write_av(d / "cfr.mkv", frames, fps=10, audio=pcm, rate=44100),
        avi=write_av(d / "cfr.avi", frames, fps=10, audio=pcm, rate=44100, vcodec="mjpeg",
                     acodec="pcm_s16le"),
        avi_pcm=np.round(pcm * 32767).astype("<i2"),
    )


@pytest.mark.parametrize("kind", ["mp4", "mkv", "avi"])
def test_a_containers_own_audio_track_is_replayed_unless_overridden(av_media, media,
                                                                    kind: str) -> None:
    path = getattr(av_media, kind)
    recs = list(file_records("s1", path, origin_ns=T0))
    audio = [r for r in recs if r.modality == "audio"]
    want, rate = decoded_audio(path)
    assert audio, "the container's audio track was ignored"
    assert {(a.sample_rate, a.channels) for a in audio} == {(rate, 2)}
    assert rate == (48000 if kind == "mp4" else 44100)
    assert [a.seq for a in audio] == list(range(len(audio)))
    assert all(a.n_samples == rate // 10 for a in audio[:-1])
    assert sum(a.n_samples for a in audio) == len(want)
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(audio))
    assert audio[0].ts_ns == T0 + container_times(path, "audio")[0]
    got = np.concatenate([a.samples() for a in audio])
    if kind == "avi":  # 16-bit PCM stays 16-bit, byte for byte
        assert {a.fmt for a in audio} == {"s16le"}
        assert b"".join(a.data for a in audio) == av_media.avi_pcm.tobytes()
    else:  # AAC decodes to float
        assert {a.fmt for a in audio} == {"f32le"}
        np.testing.assert_allclose(got, want, atol=1e-6)
    # --audio replaces the container's track; container_audio=False drops it
    over = [r for r in file_records("s1", path, media.wav, origin_ns=T0)
            if r.modality == "audio"]
    assert {a.sample_rate for a in over} == {16000}
    assert b"".join(a.data for a in over) == media.pcm.astype("<i2").tobytes()
    silent = list(file_records("s1", path, origin_ns=T0, container_audio=False))
    assert {r.modality for r in silent} == {"video"}


def test_variable_frame_rate_frames_keep_the_containers_timestamps(av_media) -> None:
    recs = list(file_records("s1", av_media.mp4, origin_ns=T0, container_audio=False))
    want = container_times(av_media.mp4, "video")
    assert want == [p * MS for p in VFR_PTS_MS]  # the file really is variable rate
    assert [r.ts_ns - T0 for r in recs] == want
    assert [r.seq for r in recs] == list(range(len(VFR_PTS_MS)))
    for got, img in zip(recs, av_media.frames, strict=True):
        assert mean_abs_diff(got.image(), img) < 12  # H.264, then JPEG: close, not equal


def test_variable_frame_rate_loop_continues_after_the_last_frames_duration(av_media) -> None:
    src = FileSource("s1", av_media.mp4, loop=True, container_audio=False)
    recs = [r for _, r in itertools.islice(src.records(T0), 2 * len(VFR_PTS_MS))]
    second = recs[len(VFR_PTS_MS)]
    # pass 2 starts after pass 1's last frame and its own display time, never on it
    assert second.ts_ns > recs[len(VFR_PTS_MS) - 1].ts_ns
    assert [r.ts_ns - second.ts_ns for r in recs[len(VFR_PTS_MS):]] == [
        p * MS for p in VFR_PTS_MS]


WAV_CASES = {
    # name: (rate, bits, float, extensible)
    "pcm24-extensible-44k1": (44100, 24, False, True),
    "pcm24-plain-48k": (48000, 24, False, False),
    "pcm16-extensible-48k": (48000, 16, False, True),
    "pcm32-extensible-48k": (48000, 32, False, True),
    "float32-48k": (48000, 32, True, False),
    "float32-extensible-44k1": (44100, 32, True, True),
    "float64-48k": (48000, 64, True, False),
}


@pytest.mark.parametrize("case", list(WAV_CASES))
def test_extensible_24_bit_and_float_wavs_are_read_exactly(media, case: str) -> None:
    rate, bits, is_float, ext = WAV_CASES[case]
    x = tone(0.35, rate) * np.array([1.0, -0.8])  # stereo, two different channels
    x[5] = [0.999, -1.0]  # near full scale on both sides
    if is_float:
        data = x.astype("<f4" if bits == 32 else "<f8").tobytes()
        want = x.astype(np.float32)
    elif bits == 24:
        data, ints = pcm24(x)
        want = (ints / float(1 << 23)).astype(np.float32)
    elif bits == 16:
        ints = np.round(x * 32767).astype("<i2")
        data, want = ints.tobytes(), ints
    else:
        ints = np.round(x * ((1 << 31) - 1)).astype("<i4")
        data, want = ints.tobytes(), (ints / float(1 << 31)).astype(np.float32)
    path = write_wav_bytes(media.dir / f"{case}.wav", data, rate, 2, bits, float_=is_float,
                           extensible=ext)
    chunks = list(audio_chunks(path, "s", T0, chunk_ms=100))
    assert {(c.sample_rate, c.channels) for c in chunks} == {(rate, 2)}
    assert {c.fmt for c in chunks} == {"s16le" if bits == 16 else "f32le"}
    assert [c.n_samples for c in chunks[:-1]] == [rate // 10] * (len(chunks) - 1)
    assert chunks[0].ts_ns == T0 and all(b.ts_ns == a.end_ns
                                         for a, b in itertools.pairwise(chunks))
    got = np.concatenate([c.samples() for c in chunks])
    assert got.shape == want.shape
    if bits == 16:
        assert b"".join(c.data for c in chunks) == data  # byte for byte
    else:
        np.testing.assert_array_equal(got, want)


def test_a_broken_wav_says_what_is_wrong(media, tmp_path) -> None:
    cut = tmp_path / "cut.wav"
    cut.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00")  # fmt cut short
    with pytest.raises(UserError, match=r"cut\.wav: not a media file FFmpeg can read"):
        FileSource("s", audio=cut)
    with pytest.raises(UserError, match="no audio track"):
        FileSource("s", audio=media.video)  # a silent video given as the audio
    with pytest.raises(UserError, match=r"no video track \(give an audio file with --audio"):
        FileSource("s", media.wav)  # audio given where the video goes
    srt = tmp_path / "talk.SRT"
    srt.write_bytes(b"\xef\xbb\xbf1\r\n00:00:00,000 --> 00:00:01,000\r\nhello\r\n")
    with pytest.raises(UserError, match=r"talk\.SRT is a transcript: give it with --transcript"):
        FileSource("s", srt)  # a transcript given where the video goes
    with pytest.raises(UserError, match="audio file not found"):
        FileSource("s", audio=tmp_path / "nope.wav")


def test_audio_and_transcript_replay_without_a_video(media) -> None:
    recs = list(file_records("s1", audio=media.wav, transcript=media.srt, origin_ns=T0))
    assert {r.modality for r in recs} == {"audio", "text"}
    assert b"".join(r.data for r in recs if r.modality == "audio") == \
        media.pcm.astype("<i2").tobytes()


def test_stats_count_only_what_was_handed_to_the_sink(media) -> None:
    """A stop (Ctrl-C) between reading a record and publishing it must not count it."""
    stop = threading.Event()

    class StopAfter(ListOutbox):
        def publish(self, rec) -> None:
            super().publish(rec)
            if len(self.records) == 7:
                stop.set()

    outbox = StopAfter()
    stats = replay(outbox, "s1", media.video, media.wav, media.srt, realtime=False,
                   stop_event=stop)
    by = {m: sum(r.modality == m for r in outbox.records) for m in ("video", "audio", "text")}
    assert len(outbox.records) == 7 == stats.published
    assert (stats.frames, stats.chunks, stats.segments) == (by["video"], by["audio"],
                                                            by["text"])
    assert f"published {by['video']} frames, {by['audio']} audio chunks" in stats.summary()


# --- microphone ----------------------------------------------------------------------------


def _time_info(adc: float, latency: float = 0.005, block_s: float = 0.1) -> SimpleNamespace:
    return SimpleNamespace(inputBufferAdcTime=adc, currentTime=adc + block_s + latency,
                           outputBufferDacTime=0.0)


def test_mic_callback_chunks_are_sample_continuous_and_losses_counted() -> None:
    clock, outbox = ManualClock(), ListOutbox()
    mic = MicSource(outbox, "mic-1", rate=16000, chunk_ms=100, queue_blocks=4, clock=clock)
    rng = np.random.default_rng(5)
    blocks = [rng.integers(-3000, 3000, (1600, 1), dtype=np.int16) for _ in range(12)]
    stream_t0 = 5000.0  # PortAudio's own time base

    def feed(k: int, adc_extra: float = 0.0, overflow: bool = False) -> None:
        adc = stream_t0 + k * 0.1 + adc_extra
        # the callback runs 105 ms after the block's first sample, with 1 ms of jitter
        clock.now = T0 + round((k * 0.1 + adc_extra + 0.105) * S) + int(rng.integers(-MS, MS))
        mic.callback(blocks[k], 1600, _time_info(adc), SimpleNamespace(input_overflow=overflow))

    for k in range(4):
        feed(k)
        mic.publish_pending()
    feed(4, adc_extra=0.3, overflow=True)  # PortAudio lost 300 ms before block 4
    feed(5, adc_extra=0.3)
    mic.publish_pending()
    for k in range(6, 12):  # publishing stalls: 6 blocks into a 4-block queue
        feed(k, adc_extra=0.3)
    mic.publish_pending()

    chunks = outbox.records
    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]  # 6, 7 dropped: a gap
    assert (mic.stats.overflows, mic.stats.queue_drops, mic.stats.drops) == (1, 2, 3)
    assert mic.stats.resyncs == 2  # after the overflow and after the drop
    first_ts = chunks[0].ts_ns
    assert abs(first_ts - T0) <= MS  # the ADC time of the first sample, on the wall clock
    for a, b in itertools.pairwise(chunks):
        if b.seq == a.seq + 1 and b.seq != 4:
            assert b.ts_ns == a.end_ns  # continuous, jitter ignored
        else:
            assert b.ts_ns > a.end_ns  # a real loss leaves a time gap too
    assert abs(chunks[4].ts_ns - (T0 + 700 * MS)) <= MS
    assert abs(chunks[6].ts_ns - (T0 + 1100 * MS)) <= MS
    for c in chunks:
        assert c.data == blocks[c.seq].astype("<i2").tobytes()
        assert (c.sample_rate, c.channels, c.fmt) == (16000, 1, "s16le")


def test_mic_callback_without_host_timing_falls_back_to_arrival_time() -> None:
    clock, outbox = ManualClock(), ListOutbox()
    mic = MicSource(outbox, "m", rate=8000, channels=2, chunk_ms=50, fmt="f32le", clock=clock)
    block = np.zeros((400, 2), np.float32)
    mic.callback(block, 400, SimpleNamespace(inputBufferAdcTime=0.0, currentTime=0.0), None)
    mic.publish_pending()
    (chunk,) = outbox.records
    assert chunk.ts_ns == T0 - 50 * MS and (chunk.channels, chunk.fmt) == (2, "f32le")


class _PortAudioMissing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``sounddevice`` the way it fails on a machine without libportaudio."""

    def find_spec(self, name, path, target=None):
        if name == "sounddevice":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("PortAudio library not found")


def test_missing_portaudio_gives_a_message_naming_the_package(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_PortAudioMissing(), *sys.meta_path])
    with pytest.raises(UserError) as err:
        import_sounddevice()
    msg = str(err.value)
    assert "PortAudio library not found" in msg and "libportaudio2" in msg
    assert "brew install portaudio" in msg


def test_cli_mic_without_portaudio_exits_2_without_a_traceback(tmp_path) -> None:
    (tmp_path / "sounddevice.py").write_text('raise OSError("PortAudio library not found")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(REPO / ".venv/bin/streamproc"), "produce", "mic",
                           "--stream-id", "m1"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2
    assert "libportaudio2" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_mic_with_a_device_that_does_not_exist_lists_the_inputs() -> None:
    proc = subprocess.run([str(REPO / ".venv/bin/streamproc"), "produce", "mic",
                           "--stream-id", "m1", "--device", "97"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot record from audio device 97" in proc.stderr
    assert "Input devices:" in proc.stderr and "Traceback" not in proc.stderr


# --- camera --------------------------------------------------------------------------------


def test_which_camera_sources_come_back_after_a_failure(media, tmp_path) -> None:
    """Device indices, device nodes and network URLs are reopened after a failure (a
    USB glitch); a local file or a path that is not there ends the capture."""
    from streamproc.capture.sources import _is_live

    assert _is_live(0) and _is_live("rtsp://cam/stream") and _is_live("http://x/mjpg")
    assert _is_live("/dev/null")  # a character device, as /dev/video0 is
    assert not _is_live(str(media.video)) and not _is_live(media.video.as_uri())
    assert not _is_live(str(tmp_path / "typo.mp44"))


def test_camera_on_a_video_file_url_publishes_every_frame_in_order(media) -> None:
    outbox = ListOutbox()
    # a file:// URL goes through the same OpenCV/FFmpeg path as rtsp:// or http://
    cam = CameraSource(outbox, "cam-1", media.video.as_uri(), jpeg_quality=95)
    assert not cam.reconnect  # a local file ends; a live URL would be reopened
    t_before = time.time_ns()
    st = cam.run()
    frames = outbox.records
    assert (st.captured, st.published, st.dropped, st.skipped) == (12, 12, 0, 0)
    assert [f.seq for f in frames] == list(range(12))
    assert all(b.ts_ns > a.ts_ns for a, b in itertools.pairwise(frames))
    assert t_before - 50 * MS <= frames[0].ts_ns <= time.time_ns() + 50 * MS
    for f, want in zip(frames, media.frames, strict=True):
        assert (f.width, f.height) == (want.shape[1], want.shape[0])
        assert mean_abs_diff(f.image(), want) < 8


def test_camera_resizes_and_refuses_a_device_it_cannot_open(media, tmp_path) -> None:
    outbox = ListOutbox()
    CameraSource(outbox, "c", str(media.video), size=(80, 60)).run()
    assert {(f.width, f.height) for f in outbox.records} == {(80, 60)}
    with pytest.raises(UserError, match="cannot open camera"):
        CameraSource(outbox, "c", str(tmp_path / "no-such-camera.avi")).open()


def test_camera_reconnects_with_backoff_when_the_source_goes_away(media, tmp_path) -> None:
    path = tmp_path / "cam.avi"
    write_video(path, media.frames[:5])
    outbox = ListOutbox()
    cam = CameraSource(outbox, "c", str(path), reconnect=True, backoff_s=(0.05, 0.2))
    stop = threading.Event()
    runner = threading.Thread(target=cam.run, args=(stop,))
    cam.open()
    hidden = tmp_path / "away.avi"
    path.rename(hidden)  # the source vanishes while open: reads end, reopening fails
    runner.start()
    deadline = time.monotonic() + 20
    while cam.stats.open_failures < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    hidden.rename(path)  # it comes back
    while cam.stats.published < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    runner.join(20)
    assert not runner.is_alive()
    assert cam.stats.open_failures >= 2 and cam.stats.reconnects >= 1
    assert cam.stats.published >= 8
    seqs = [f.seq for f in outbox.records]
    assert seqs == list(range(len(seqs)))
    assert all(b.ts_ns > a.ts_ns for a, b in itertools.pairwise(outbox.records))


def test_camera_on_a_file_is_paced_and_stamped_by_the_files_timestamps(av_media) -> None:
    """A file played as a camera goes out at its own pace, each frame stamped with its
    presentation time (variable frame rate kept), never before that time."""
    sent: list[tuple[int, object]] = []

    class Recording(ListOutbox):
        def publish(self, rec) -> None:
            sent.append((time.time_ns(), rec))
            super().publish(rec)

    cam = CameraSource(Recording(), "cam-vfr", av_media.mp4.as_uri())
    assert cam.pace
    st = cam.run()
    assert (st.captured, st.published, st.skipped) == (len(VFR_PTS_MS),) * 2 + (0,)
    ts = [r.ts_ns for _, r in sent]
    assert [t - ts[0] for t in ts] == [p * MS for p in VFR_PTS_MS]
    assert all(wall >= r.ts_ns for wall, r in sent)  # released when its time came


@pytest.mark.parametrize(("fps", "kept"), [(25, 25), (12.5, 13)])
def test_camera_fps_on_a_file_keeps_frames_by_their_timestamps(media, fps, kept) -> None:
    frames = make_frames(25, (64, 48))
    path = write_video(media.dir / "cam25.avi", frames, fps=25)
    outbox = ListOutbox()
    st = CameraSource(outbox, "c", str(path), fps=fps, queue_size=32).run()
    assert (st.captured, st.skipped) == (kept, 25 - kept)
    step = round(S / 25) * round(25 / fps)
    assert [b.ts_ns - a.ts_ns for a, b in itertools.pairwise(outbox.records)] == \
        [step] * (kept - 1)


# --- command line -------------------------------------------------------------------------


def _help(*argv: str) -> str:
    import contextlib
    import io

    from streamproc.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("source", ["camera", "mic", "file", "transcript"])
def test_produce_help_lists_only_the_settings_producers_use(source: str) -> None:
    # the whole table of commands and settings: tests/unit/test_cli_settings.py
    text = _help("produce", source)
    for flag in ("--bootstrap-servers", "--security-protocol", "--topic-prefix",
                 "--max-message-bytes", "--log-level", "--app-id", "--stream-id"):
        assert flag in text
    for flag in ("--window-ms", "--model", "--batch-size", "--partitions", "--data-dir",
                 "--asr-vad", "--view-port"):
        assert flag + " " not in text, f"produce {source} --help offers {flag}"
    assert "CUDA" not in text  # camera and mic use --device for their own device


def test_produce_file_help_says_the_video_brings_its_audio_and_all_are_optional() -> None:
    text = " ".join(_help("produce", "file").split())
    assert "its audio track is sent too unless --audio or --no" in text
    assert "any of them as long as one is given" in text


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_camera_that_cannot_be_opened_says_so_in_one_line(level: str) -> None:
    """OpenCV prints its own [ WARN ] lines for a device index it cannot open; below debug
    the CLI's logging set-up keeps them out, so the command's one-line reason stands alone."""
    code = ("import sys\n"
            "from streamproc.errors import UserError, quiet_client_logs\n"
            f"quiet_client_logs({level!r})\n"
            "from streamproc.capture.sources import CameraSource\n"
            "try:\n"
            "    CameraSource(None, 'c', 7).open()\n"
            "except UserError as e:\n"
            "    print(e, file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("cannot open camera 7 "), out.stderr
    if level == "info":
        assert len(lines) == 1, out.stderr
    else:
        assert any("WARN" in x for x in lines[:-1]), out.stderr  # OpenCV's, as it says them
