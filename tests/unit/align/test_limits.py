"""Hostile but well-formed records against the pure aligner, on a manual clock.

One record must not make a stream's real data late or multiply the work (spans, how far it
moves a watermark), a producer that restarts its sequence numbers must not lose records,
and a stream that went quiet must not keep its state forever. The aligner runs with the
settings' defaults (AlignConfig.from_settings, final windows only) unless a test says
otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamproc.align import aligner as align
from streamproc.align.aligner import AlignConfig, Aligner, Window
from streamproc.config import Settings
from streamproc.testing import MS, S, align_config, chunk, frame, segment
from streamproc.wire.codec import AudioChunk

T0 = 1_800_000_000 * S  # hop-aligned; the wall clock is event time in these tests


def defaults(**changes) -> Aligner:
    """The settings' defaults, final windows only (provisional ones have their own tests)."""
    return Aligner(AlignConfig.from_settings(Settings(**{"provisional_on": ""} | changes)))


def live(a: Aligner, t0: int, t1: int, sid: str, seqs: dict, outcomes: list,
         windows: list) -> None:
    """A healthy stream from t0 to t1 (ns): 10 fps video, 100 ms audio chunks, a 1 s
    transcript segment every 2 s sent 200 ms after it ends; the clock is event time."""
    events = []
    for t in range(t0, t1, 100 * MS):
        events.append((t, frame(sid, t, seqs.setdefault("video", 0))))
        seqs["video"] += 1
        events.append((t + 100 * MS, chunk(sid, t, seqs.setdefault("audio", 0),
                                           np.full(1600, 100, np.int16))))
        seqs["audio"] += 1
        if (t - T0) % (2 * S) == 0:
            events.append((t + 1200 * MS, segment(sid, seqs.setdefault("text", 0), t, t + S)))
            seqs["text"] += 1
    for now, rec in sorted(events, key=lambda x: x[0]):
        outcomes.append(a.add(rec, now))
        windows += a.poll(now)


# --- one record must not make real data late ---------------------------------------------


def test_three_records_far_ahead_do_not_make_the_next_ten_seconds_late() -> None:
    a = defaults()
    seqs: dict = {}
    before: list = []
    windows: list[Window] = []
    live(a, T0, T0 + 10 * S, "cam", seqs, before, windows)
    now = T0 + 10 * S
    hostile = [
        frame("cam", now + 55 * S, 10_000),                            # 55 s ahead
        AudioChunk("cam", now, 10_000, np.zeros(55, "<i2").tobytes(),  # 55 samples at 1 Hz
                   "s16le", 1, 1),
        segment("cam", 10_000, now, now + 55 * S, "a 55 s segment"),
    ]
    refused = [a.add(r, now) for r in hostile]
    assert [o.status for o in refused] == ["future", "capped", "capped"], refused
    assert "55.0 s ahead" in refused[0].reason and "max_lead_ms" in refused[0].reason
    assert "spans 55.0 s" in refused[1].reason and "max_span_audio_ms" in refused[1].reason
    assert "spans 55.0 s" in refused[2].reason and "max_span_text_ms" in refused[2].reason
    after: list = []
    live(a, now, now + 10 * S, "cam", seqs, after, windows)
    assert [o.status for o in before + after] == ["accepted"] * len(before + after)
    assert a.stats["late"] == 0 and a.stats["late_partial"] == 0
    windows += a.flush()
    full = [w for w in windows if w.start_ns >= T0 + S and w.end_ns <= now + 9 * S]
    assert len(full) == 2 * 18 - 1
    assert all(w.frame_count == 10 and w.audio_mask.all() for w in full)


def test_a_span_is_checked_at_its_end_against_the_clock() -> None:
    a = Aligner(align_config(1000, expected=("text",), max_buffer_audio_s=600.0,
                       max_future_ns=60 * S))
    out = a.add(segment("s", 0, T0, T0 + 61 * S), T0)  # starts now, ends 61 s ahead
    assert out.status == "future" and "61.0 s ahead" in out.reason
    assert "a span ending" in out.reason and a.streams == []


def test_fifty_long_segments_on_new_streams_make_no_windows() -> None:
    a = defaults()
    now = T0 + 60 * S
    outs = [a.add(segment(f"new-{i}", 0, now - 59 * S, now), now) for i in range(50)]
    assert {o.status for o in outs} == {"capped"}
    assert all("max_span_text_ms" in o.reason for o in outs)
    assert a.poll(now + 10 * S) == [] and a.flush() == []
    assert a.streams == [] and a.stats["too_long"] == 50


def test_spans_up_to_the_limits_are_accepted() -> None:
    a = defaults()
    now = T0 + 60 * S
    assert a.add(segment("s", 0, now - 30 * S, now), now).status == "accepted"
    five_s = chunk("s", now - 5 * S, 0, np.zeros(5 * 16_000, np.int16))
    assert a.add(five_s, now).status == "accepted"
    longer = chunk("s", now - 6 * S, 1, np.zeros(5 * 16_000 + 16, np.int16))
    assert a.add(longer, now).status == "capped"


def test_the_lead_is_measured_from_the_clock_or_the_streams_watermarks() -> None:
    a = defaults()
    now = T0
    assert a.add(frame("s", now, 0), now).status == "accepted"
    assert a.add(frame("s", now + 2 * S, 1), now).status == "accepted"  # at the limit
    assert a.add(frame("s", now + 5 * S, 2), now).status == "future"  # 3 s past both
    assert a.stats["ahead"] == 1
    # a producer whose clock runs 3 s ahead of the worker's: its first record is held to
    # max_future_ms only, and each later one moves the stream's time by one frame
    skew = defaults()
    outs = [skew.add(frame("k", now + 3 * S + i * 66 * MS, i), now + i * 66 * MS)
            for i in range(60)]
    outs += [skew.add(chunk("k", now + 3 * S, 0, np.zeros(1600, np.int16)), now)]
    assert {o.status for o in outs} == {"accepted"}
    # a single-modality replay sent faster than real time
    fast = defaults()
    outs = [fast.add(frame("f", now + i * 100 * MS, i), now) for i in range(100)]
    assert {o.status for o in outs} == {"accepted"}
    # a subtitle file alone, sent at once: cues of 2.5-4 s, each a moment after the last
    subs = defaults()
    cues = [(0, 2500), (2800, 5800), (6000, 10_000), (10_300, 12_800)]
    outs = [subs.add(segment("t", i, now + a * MS, now + b * MS), now)
            for i, (a, b) in enumerate(cues)]
    assert {o.status for o in outs} == {"accepted"}
    # but a cue that starts 3 s past everything the stream has is refused
    out = subs.add(segment("t", 9, now + 15_800 * MS, now + 16_000 * MS), now)
    assert out.status == "future" and "starts 3.0 s ahead" in out.reason
    # a fast replay runs ahead of the clock, its modalities together: each record is
    # within the lead of the others
    b = defaults()
    outs = []
    for i in range(100):  # 10 s of records, all sent at once
        t = now + i * 100 * MS
        outs.append(b.add(frame("r", t, i), now))
        outs.append(b.add(chunk("r", t, i, np.zeros(1600, np.int16)), now))
    assert {o.status for o in outs} == {"accepted"}
    assert b.stats["future"] == 0
    # a microphone ten minutes behind does not make the camera's frames look ahead
    c = defaults()
    late = T0 + 600 * S
    assert c.add(chunk("s", T0, 0, np.zeros(1600, np.int16)), late).status == "accepted"
    assert c.add(frame("s", late, 0), late).status == "accepted"
    # --max-future-ms 0: the wall clock says nothing about event time (a fixed origin on a
    # fake clock), so nothing is measured against it
    d = defaults(max_future_ms=0)
    assert d.add(frame("s", T0 + 55 * S, 0), 0).status == "accepted"


# --- sequence numbers that restart ---------------------------------------------------------


def test_a_producer_that_restarts_its_seqs_loses_no_frame() -> None:
    a = Aligner(align_config(1000, expected=("video",)))
    first = [frame("s", T0 + i * 100 * MS, 100 + i) for i in range(5)]
    # restarted at 100 in the same window: seqs 100..104 again, later frames, other pixels
    again = [dataclasses.replace(frame("s", T0 + (5 + i) * 100 * MS, 100 + i),
                                 data=first[0].data + b"\0") for i in range(5)]
    outs = [a.add(r, T0) for r in first + again]
    assert [o.status for o in outs] == ["accepted"] * 10
    assert a.add(first[2], T0).status == "duplicate"  # a real copy is still one
    (w,) = a.flush()
    assert w.frame_count == 10 and w.quality["frames_dropped"] == 0
    assert a.stats["duplicates"] == 1


def test_a_restarted_seq_for_a_closed_window_is_late_not_a_duplicate() -> None:
    a = Aligner(align_config(1000, expected=("video",)))
    a.add(frame("s", T0, 0), T0)
    a.add(frame("s", T0 + 2 * S, 1), T0)
    assert [w.start_ns for w in a.poll(T0)] == [T0]
    # seq 0 again, another frame whose window closed: reported late (a dead letter), not
    # taken for a copy of the retired seq 0 and dropped without a word
    out = a.add(frame("s", T0 + 500 * MS, 0), T0)
    assert out.status == "late", out
    assert a.add(frame("s", T0, 0), T0).status == "duplicate"  # the retired one's copy


# --- idle streams expire -------------------------------------------------------------------


def test_an_idle_stream_expires_and_a_late_record_after_that_is_still_late() -> None:
    a = defaults(stream_expiry_ms=60_000)
    seqs: dict = {}
    outcomes: list = []
    windows: list[Window] = []
    live(a, T0, T0 + 5 * S, "gone", seqs, outcomes, windows)
    end = T0 + 5 * S
    windows += a.poll(end + 10 * S)  # silent: the watermarks moved past every window
    assert a.streams == ["gone"] and a.buffered()["windows"] == 0
    a.poll(end + 30 * S)
    assert a.streams == ["gone"]  # not yet
    a.poll(end + 70 * S)
    assert a.streams == [] and a.stats["expired"] == 1
    assert a.closed_before("gone") is not None  # still known where it had closed
    late = a.add(frame("gone", end - S, 9999), end + 71 * S)
    assert late.status == "late"
    again = a.add(frame("gone", end + 70 * S, 10_000), end + 71 * S)
    assert again.status == "accepted"  # the stream starts afresh after what closed
    windows += a.flush()
    keys = [w.key for w in windows]
    assert len(keys) == len(set(keys))


def test_state_of_many_short_streams_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(align, "EXPIRED_STREAMS_KEPT", 100)
    a = defaults(stream_expiry_ms=10_000, expected_modalities="video")
    now = T0
    for i in range(1000):
        now += MS
        a.add(frame(f"id-{i}", now, 0), now)
        a.add(frame(f"id-{i}", now + 600 * MS, 1), now)
        a.poll(now)
    a.poll(now + 5 * S)
    assert len(a.streams) == 1000  # idle, windows closed, not expired yet
    a.poll(now + 20 * S)
    assert a.streams == [] and len(a._expired) == 100


def test_past_the_expired_memory_the_callers_live_progress_prevents_re_emission(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(align, "EXPIRED_STREAMS_KEPT", 0)
    progress: dict[str, int] = {}  # the worker's: updated as windows are published
    a = Aligner(AlignConfig.from_settings(Settings(stream_expiry_ms=60_000,
                                                   expected_modalities="video")),
                resume=progress)
    for i in range(20):
        a.add(frame("s", T0 + i * 100 * MS, i), T0 + i * 100 * MS)
    published = a.poll(T0 + 10 * S)  # idle: every window closes
    assert published
    progress["s"] = max(w.start_ns for w in published)
    a.poll(T0 + 100 * S)
    assert a.streams == [] and a.closed_before("s") == progress["s"] + S // 2
    again = a.add(frame("s", T0 + 500 * MS, 5), T0 + 101 * S)  # a copy read again
    assert again.status == "replayed"
    assert a.flush() == []


# --- idle transcripts --------------------------------------------------------------------


def test_the_first_segment_after_a_text_silence_keeps_its_first_windows() -> None:
    """Text goes idle in a silence; the next segment arrives when it ends (300 ms ASR lag),
    its start 1.8 s back. Windows still wait the text lateness on the clock for it, but a
    stream that never sent text is not held back at all."""
    a = defaults()
    events = []
    for i, t in enumerate(range(T0, T0 + 14 * S, 100 * MS)):
        events.append((t, frame("talk", t, i)))
        events.append((t + 100 * MS, chunk("talk", t, i, np.full(1600, 100, np.int16))))
        events.append((t, frame("mute", t, i)))
    for i, (s0, e0) in enumerate([(0, 1000), (2000, 3000), (8200, 9700), (10_000, 11_000)]):
        events.append((T0 + (e0 + 300) * MS, segment("talk", i, T0 + s0 * MS, T0 + e0 * MS)))
    windows: list[tuple[int, Window]] = []
    for now, rec in sorted(events, key=lambda x: x[0]):
        out = a.add(rec, now)
        assert out.status == "accepted" and not out.reason, (rec, out)
        windows += [(now, w) for w in a.poll(now)]
    windows += [(T0 + 99 * S, w) for w in a.flush()]
    talk = {(w.start_ns - T0) // MS: w for _, w in windows if w.stream_id == "talk"}
    for start in (7500, 8000, 8500, 9000):
        assert talk[start].present["text"], start
    mute = [(now - w.end_ns) // MS for now, w in windows
            if w.stream_id == "mute" and T0 + 4 * S <= w.start_ns <= T0 + 12 * S]
    assert mute and max(mute) <= 250 + 100  # video lateness, one record's step
