"""Unit tests of the pure aligner: one test (or a few) per rule of docs/alignment.md.

No broker: the aligner is pure logic. Records carry real media (an OpenCV JPEG, real PCM)
even though the aligner never decodes images, so window contents are what a model gets.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest
from align_helpers import feed_live

from streamproc.align.aligner import AlignConfig, Aligner, ClosedBy, OutcomeStatus, Window
from streamproc.config import ConfigError, Settings
from streamproc.testing import MS, SAMPLE_RATE, S, align_config, chunk, frame, segment
from streamproc.wire.codec import AudioChunk, Source

NS_PER_SAMPLE = S // SAMPLE_RATE  # 62_500: 16 kHz sample times are whole nanoseconds


# --- helpers ------------------------------------------------------------------------------


def run(aligner: Aligner, records, now: int = 0, poll_each: bool = True) -> list[Window]:
    """Feed records in order (polling after each), then flush; return every window."""
    out: list[Window] = []
    for r in records:
        aligner.add(r, now)
        if poll_each:
            out += aligner.poll(now)
    return out + aligner.flush()


def ramp(n: int, first: int = 0) -> np.ndarray:
    """int16 samples first, first+1, ...: every sample says where it came from."""
    return (np.arange(n) + first).astype(np.int16)


# --- configuration -------------------------------------------------------------------------


def test_config_from_settings_converts_every_field():
    s = Settings(window_ms=800, hop_ms=400, lateness_video_ms=100, lateness_audio_ms=200,
                 lateness_text_ms=2500, idle_deadline_video_ms=1500, idle_deadline_audio_ms=1600,
                 idle_deadline_text_ms=0, expected_modalities="video,text",
                 frames_per_window=4, sample_rate=22050, max_buffer_frames=50,
                 max_buffer_audio_s=7.5, max_future_ms=5000, max_lead_ms=1500,
                 max_span_audio_ms=2000, max_span_text_ms=20_000, stream_expiry_ms=60_000)
    c = AlignConfig.from_settings(s)
    assert (c.window_ns, c.hop_ns) == (800 * MS, 400 * MS)
    assert c.idle_ns == {"video": 1500 * MS, "audio": 1600 * MS, "text": 0}
    assert c.lateness_ns == {"video": 100 * MS, "audio": 200 * MS, "text": 2500 * MS}
    assert c.expected == ("video", "text")
    assert (c.frames_per_window, c.sample_rate) == (4, 22050)
    assert (c.max_buffer_frames, c.max_buffer_audio_s) == (50, 7.5)
    assert c.window_samples == round(0.8 * 22050)
    assert c.max_future_ns == 5000 * MS
    assert (c.max_lead_ns, c.max_span_audio_ns, c.max_span_text_ns) == (
        1500 * MS, 2000 * MS, 20_000 * MS)
    assert c.stream_expiry_ns == 60_000 * MS


@pytest.mark.parametrize("change, words", [
    ({"hop_ns": 2 * S}, "hop_ns"),
    ({"window_ns": 0}, "window_ns"),
    ({"idle_ns": {"audio": -1}}, "idle_ns"),
    ({"expected": ("video", "smell")}, "expected"),
    ({"lateness_ns": {"video": -1}}, "lateness"),
])
def test_config_rejects_impossible_values(change, words):
    kw = {"window_ns": S, "hop_ns": S, "lateness_ns": {}, "idle_ns": {}} | change
    with pytest.raises(ConfigError, match=words):
        AlignConfig(**kw)


def test_window_starts_are_epoch_aligned_and_cover_exactly_the_overlap():
    c = align_config(1000, 500)
    # a point belongs to the W/H windows that contain it
    assert list(c.window_starts(1200 * MS, 1200 * MS)) == [500 * MS, 1000 * MS]
    # a point on a window edge starts that window and is outside the one ending there
    assert list(c.window_starts(1000 * MS, 1000 * MS)) == [500 * MS, 1000 * MS]
    # a span [0.9, 1.0) ends exactly where windows 1.0.. start: not in them
    assert list(c.window_starts(900 * MS, 1000 * MS)) == [0, 500 * MS]
    assert list(c.window_starts(900 * MS, 1000 * MS + 1)) == [0, 500 * MS, 1000 * MS]
    t = align_config(1000)
    assert list(t.window_starts(999 * MS, 2001 * MS)) == [0, S, 2 * S]


# --- video ---------------------------------------------------------------------------------


def test_frames_go_to_every_window_containing_them_in_time_order():
    a = Aligner(align_config(1000, 500))
    recs = [frame("s", ts * MS, i) for i, ts in enumerate([1200, 100, 700, 1499])]
    got = {w.start_ns: [f.ts_ns // MS for f in w.frames] for w in run(a, recs, poll_each=False)}
    assert got == {-500 * MS: [100], 0: [100, 700], 500 * MS: [700, 1200, 1499],
                   1000 * MS: [1200, 1499]}


def test_k_frames_are_the_nearest_to_the_stretch_centres_and_the_count_is_kept():
    a = Aligner(align_config(1000, frames_per_window=4))
    recs = [frame("s", i * 50 * MS, i) for i in range(20)]
    (w,) = run(a, recs)
    assert w.frame_count == 20
    # stretches of 250 ms, centres 125, 375, 625, 875 ms: two frames 25 ms from each,
    # the earlier taken
    assert [f.seq for f in w.frames] == [2, 7, 12, 17]
    b = Aligner(align_config(1000, frames_per_window=8))
    (w,) = run(b, recs[:5])
    assert [f.seq for f in w.frames] == [0, 1, 2, 3, 4] and w.frame_count == 5


def test_frames_dropped_counts_sequence_gaps_inside_the_window():
    a = Aligner(align_config(1000))
    recs = [frame("s", i * 100 * MS, i) for i in range(10) if i not in (3, 4, 8)]
    (w,) = run(a, recs)
    assert w.quality["frames_dropped"] == 3
    assert w.frame_count == 7


# --- audio ---------------------------------------------------------------------------------


def test_audio_is_cut_sample_exactly_at_window_edges():
    a = Aligner(align_config(1000, 500))
    # 3 chunks of 0.3 s = 4800 samples from t = 0.3 s: samples numbered 0.. by value
    recs = [chunk("s", (300 + 300 * i) * MS, i, ramp(4800, 4800 * i)) for i in range(3)]
    wins = {w.start_ns: w for w in run(a, recs)}
    assert sorted(wins) == [-500 * MS, 0, 500 * MS, 1000 * MS]
    w0 = wins[0]
    assert w0.audio.shape == (SAMPLE_RATE,) and w0.audio.dtype == np.float32
    first = 300 * MS // NS_PER_SAMPLE  # input sample 0 sits at output index 4800
    assert not w0.audio_mask[:first].any() and w0.audio_mask[first:].all()
    np.testing.assert_array_equal(w0.audio[first:] * 32768, np.arange(SAMPLE_RATE - first))
    w1 = wins[500 * MS]  # [0.5, 1.5): input samples from t=0.5 (number 3200) to 1.2 (14400)
    n_in = 14400 - 3200
    np.testing.assert_array_equal(w1.audio[:n_in] * 32768, np.arange(3200, 14400))
    assert w1.audio_mask[:n_in].all() and not w1.audio_mask[n_in:].any()
    assert w1.quality["audio_missing_s"] == pytest.approx((SAMPLE_RATE - n_in) / SAMPLE_RATE)
    assert w0.quality["audio_missing_s"] == pytest.approx(first / SAMPLE_RATE)


def test_audio_gap_is_zeros_with_a_false_mask():
    a = Aligner(align_config(1000))
    recs = [chunk("s", i * 100 * MS, i, np.full(1600, 1000, np.int16)) for i in range(10)
            if i != 4]
    (w,) = run(a, recs)
    gap = slice(4 * 1600, 5 * 1600)
    assert not w.audio_mask[gap].any() and (w.audio[gap] == 0).all()
    assert w.audio_mask.sum() == 9 * 1600
    assert w.quality["audio_missing_s"] == pytest.approx(0.1)
    assert np.allclose(w.audio[w.audio_mask], 1000 / 32768)


def test_stereo_is_mixed_to_mono():
    left = np.full(1600, 0.5)
    right = np.full(1600, -0.25)
    a = Aligner(align_config(100))
    (w,) = run(a, [chunk("s", 0, 0, np.stack([left, right], axis=1))])
    assert np.allclose(w.audio, 0.125, atol=1e-4) and w.audio_mask.all()


def test_f32le_and_s16le_chunks_side_by_side_and_an_odd_window_length():
    """W * rate need not be whole: the window still has round(W * rate) samples, and
    chunks of either PCM format land where their timestamps say."""
    sr = 44100
    a = Aligner(align_config(333, sample_rate=sr))
    n = round(0.333 * sr)  # 14685.3 -> 14685
    first = np.full(4410, 0.25)
    second = np.full(4410, -0.5)
    recs = [AudioChunk.from_samples("s", 0, 0, first, sr, fmt="f32le"),
            AudioChunk.from_samples("s", 100 * MS, 1, second, sr, fmt="s16le")]
    wins = run(a, recs)
    assert [w.audio.shape for w in wins] == [(n,)]
    (w,) = wins
    np.testing.assert_array_equal(w.audio[:4410], np.float32(0.25))
    np.testing.assert_allclose(w.audio[4410:8820], -0.5, atol=1 / 32768)
    assert w.audio_mask[:8820].all() and not w.audio_mask[8820:].any()


@pytest.mark.parametrize("sr_in", [44100, 48000, 44101, 191999])
def test_other_sample_rates_are_resampled_without_edge_artefacts(sr_in: int):
    """A sine in 100 ms chunks -> 16 kHz windows: the same 440 Hz sine, full amplitude
    everywhere (no dips at chunk boundaries or window edges). Odd rates, whose exact ratio
    to 16 kHz would need a filter of tens of thousands of phases, come out as well."""
    f = 440.0
    n = sr_in // 10
    a = Aligner(align_config(1000, 500))
    recs = []
    for i in range(40):  # 4 s of audio
        t = np.arange(i * n, (i + 1) * n) / sr_in
        ts = round(i * n * S / sr_in)  # on the input's sample grid
        recs.append(chunk("s", ts, i, np.sin(2 * np.pi * f * t) * 0.5, sample_rate=sr_in))
    wins = {w.start_ns: w for w in run(a, recs)}
    # a run's first sample goes to the nearest 16 kHz grid point: with chunks off that grid
    # the sine may be shifted by up to half a sample (0.043 at 440 Hz, amplitude 0.5)
    tolerance = 0.01 if sr_in % 100 == 0 else 0.05
    for start in (500 * MS, S, 1500 * MS, 2 * S, 2500 * MS):
        w = wins[start]
        assert w.audio.shape == (SAMPLE_RATE,) and w.audio_mask.all()
        expect = 0.5 * np.sin(2 * np.pi * f * (start / S + np.arange(SAMPLE_RATE) / SAMPLE_RATE))
        assert np.max(np.abs(w.audio - expect)) < tolerance, start


@pytest.mark.parametrize("sr_in", [44100, 48000])
@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_resampling_context_opens_no_window_of_its_own(sr_in: int, order: str):
    """Audio at another rate joins the windows next to it as filter context. A stream whose
    first chunk starts on a hop boundary has no window before it: the context alone is no
    data, and no window with every modality missing comes out, in either arrival order."""
    n = sr_in // 10
    a = Aligner(align_config(1000, 500))
    recs = [chunk("s", 10 * S + round(i * n * S / sr_in), i, np.full(n, 0.1), sample_rate=sr_in)
            for i in range(30)]  # 10.0 .. 13.0 s
    wins = run(a, recs if order == "in order" else recs[::-1])
    assert [w.start_ns // MS for w in wins] == list(range(9_500, 12_501, 500))
    assert all(w.present["audio"] for w in wins)


# --- text ----------------------------------------------------------------------------------


def test_segments_belong_to_every_window_they_overlap_by_start_time():
    a = Aligner(align_config(1000))
    recs = [segment("s", 0, 1500 * MS, 2500 * MS, "late words"),  # arrives first, starts later
            segment("s", 1, 200 * MS, 1800 * MS, "spanning"),
            segment("s", 2, 3000 * MS, 3000 * MS, "blip"),  # zero length: the window of its start
            segment("s", 3, 2500 * MS, 3000 * MS, "edge")]  # ends where window 3 s starts
    wins = {w.start_ns // S: w for w in run(a, recs)}
    assert {k: [s.seq for s in w.segments] for k, w in wins.items()} == {
        0: [1], 1: [1, 0], 2: [0, 3], 3: [2]}
    assert wins[1].text == "spanning late words"
    assert wins[3].present == {"video": False, "audio": False, "text": True}


# --- closing: watermarks, lateness, idleness ----------------------------------------------


def test_window_closes_only_when_every_expected_modality_passed_end_plus_lateness():
    a = Aligner(align_config(1000, lateness_ns={"video": 200 * MS, "audio": 100 * MS,
                                          "text": 3000 * MS}))
    a.add(frame("s", 500 * MS, 0), 0)
    a.add(chunk("s", 0, 0, ramp(16000)), 0)
    a.add(segment("s", 0, 0, 800 * MS), 0)
    a.add(frame("s", 1200 * MS, 1), 0)  # video watermark 1.2 = end + lateness
    a.add(chunk("s", S, 1, ramp(1600)), 0)  # audio watermark 1.1 = end + lateness
    assert a.poll(0) == []  # text watermark 0.8 < 1.0 + 3.0
    a.add(segment("s", 1, 3000 * MS, 3999 * MS), 0)
    assert a.poll(0) == []  # text watermark 3.999 < 4.0
    a.add(segment("s", 2, 3999 * MS, 4000 * MS), 0)
    (w,) = a.poll(0)
    assert w.start_ns == 0 and w.quality["closed_by"] == "watermark"
    assert w.present == {"video": True, "audio": True, "text": True}
    assert a.closed_before("s") == S


def test_only_expected_modalities_hold_windows_back():
    a = Aligner(align_config(1000, expected=("video",)))
    a.add(segment("s", 0, 0, 500 * MS), 0)
    a.add(frame("s", 100 * MS, 0), 0)
    a.add(frame("s", S, 1), 0)
    (w,) = a.poll(0)
    assert w.present == {"video": True, "audio": False, "text": True}
    assert w.quality["closed_by"] == "watermark"


def test_mic_unplugged_masked_windows_keep_coming_and_full_ones_resume():
    a = Aligner(align_config(1000, 500, late_ms=250, idle_ms=1000, expected=("video", "audio")))
    out: list[tuple[int, Window]] = []
    seqs: dict = {}
    feed_live(a, 0, 3000, True, seqs, out)
    feed_live(a, 3000, 6000, False, seqs, out)  # unplugged for 3 s
    during = [(now, w) for now, w in out if w.start_ns >= 3000 * MS]
    # silent from 3.0 s, past its deadline from 4.0 s: the audio watermark moves on with the
    # clock from 3.0 s, so each window closes masked 2.25 s after its end (deadline +
    # lateness + the 1 s it had been silent), one hop at a time, before the mic returns
    assert [(now // MS, w.start_ns // MS) for now, w in during] == [(5300, 3000), (5800, 3500)]
    for _, w in during:
        assert w.present == {"video": True, "audio": False, "text": False}
        assert w.quality["closed_by"] == "deadline" and w.frame_count == 20
        assert not w.audio_mask.any()
    feed_live(a, 6000, 9000, True, seqs, out)  # plugged back in
    wins = {w.start_ns // MS: w for _, w in out}
    assert len(wins) == len(out)  # nothing twice
    for k in (4000, 4500, 5000):  # still open when it came back: masked, nothing was lost
        assert not wins[k].audio_mask.any() and wins[k].frame_count == 20
    assert wins[5500].present["audio"] and wins[5500].audio_mask.sum() == SAMPLE_RATE // 2
    for k in (6000, 6500, 7000, 7500):
        assert wins[k].audio_mask.all() and wins[k].quality["closed_by"] == "watermark"
    assert a.stats["late"] == 0 and a.stats["late_partial"] == 0


def test_a_modality_that_never_arrives_goes_idle_from_the_streams_first_record():
    a = Aligner(align_config(1000, idle_ms=3000, expected=("video", "audio")))
    for i in range(25):
        a.add(frame("s", i * 100 * MS, i), 10 * S + i * 100 * MS)
        assert a.poll(10 * S + i * 100 * MS) == []  # audio not idle yet: it may still come
    assert a.poll(13 * S - 1) == []
    wins = a.poll(13 * S)  # 3 s after the stream's first record
    assert [w.start_ns for w in wins] == [0, S]
    assert all(not w.present["audio"] and w.quality["closed_by"] == "deadline" for w in wins)


def test_when_every_modality_falls_silent_windows_still_close_with_the_clock():
    """A stream that stops: nothing waits for ever, and nothing closes before each
    modality's watermark, moved on by the clock after its deadline, passed the window."""
    a = Aligner(align_config(1000, late_ms=500, idle_ms=1000, expected=("video", "audio")))
    a.add(frame("s", 100 * MS, 0), 0)
    a.add(chunk("s", 0, 0, ramp(1600)), 0)  # audio watermark 100 ms
    a.add(frame("s", 1100 * MS, 1), 0)
    # audio: 100 ms + (now - 1 s) - 500 ms lateness reaches 1 s at 2.4 s, 2 s at 3.4 s
    assert a.poll(2399 * MS) == []
    assert [w.start_ns for w in a.poll(2400 * MS)] == [0]
    assert a.poll(3399 * MS) == []
    wins = a.poll(3400 * MS)
    assert [w.start_ns for w in wins] == [S] and wins[0].quality["closed_by"] == "deadline"
    assert a.poll(50 * S) == [] and a.flush() == []


def test_windows_without_data_are_not_emitted():
    a = Aligner(align_config(1000))
    wins = run(a, [frame("s", 100 * MS, 0), frame("s", 5100 * MS, 1), frame("s", 9 * S, 2)])
    assert [w.start_ns // S for w in wins] == [0, 5, 9]


# --- late data, duplicates -----------------------------------------------------------------


def test_late_record_is_reported_with_the_window_and_watermark_and_counted_on_the_next():
    a = Aligner(align_config(1000, late_ms=100, expected=("video",)))
    for i, ts in enumerate((100, 900, 1150)):
        a.add(frame("s", ts * MS, i), 0)
    (w0,) = a.poll(0)
    assert w0.start_ns == 0
    out = a.add(frame("s", 950 * MS, 9), 0)
    assert out.status == "late" and out.release_after_ns is None
    assert "window 0.000s..1.000s already closed" in out.reason
    assert "video watermark 1.150s" in out.reason and "100 ms" in out.reason
    assert a.stats["late"] == 1
    a.add(frame("s", 2200 * MS, 3), 0)
    (w1,) = a.poll(0)
    assert w1.quality["late_events"] == 1 and w1.frame_count == 1  # the late frame is not in it


def test_span_partly_in_closed_windows_feeds_the_open_ones_and_counts_the_loss():
    a = Aligner(align_config(1000, 500, expected=("video",)))
    for i, ts in enumerate((200, 1400)):
        a.add(frame("s", ts * MS, i), 0)
    assert [w.start_ns for w in a.poll(0)] == [-500 * MS, 0]  # windows ending <= 1.4 s
    assert a.closed_before("s") == 500 * MS
    out = a.add(chunk("s", 800 * MS, 0, ramp(8000)), 0)  # [0.8, 1.3): windows 0, 0.5, 1.0
    assert out.status == "accepted" and "partly late" in out.reason
    assert out.release_after_ns == S
    assert a.stats["late_partial"] == 1 and a.stats["late_windows_missed"] == 1
    wins = {w.start_ns: w for w in a.flush()}
    np.testing.assert_array_equal(wins[500 * MS].audio[4800:12800] * 32768, np.arange(8000))
    assert wins[S].audio_mask.sum() == 4800


def test_duplicates_are_counted_once_even_after_their_window_closed():
    a = Aligner(align_config(1000, expected=("video",)))
    f = frame("s", 100 * MS, 0, Source("v", 0, 10))
    assert a.add(f, 0).status == "accepted"
    again = dataclasses.replace(f, source=Source("v", 0, 11))  # a producer retry
    assert a.add(again, 0).status == "duplicate"
    a.add(frame("s", 1100 * MS, 1), 0)
    (w,) = a.poll(0)
    assert w.frame_count == 1 and w.quality["duplicates"] == 1
    assert w.provenance["video"] == [Source("v", 0, 10)]
    assert a.add(again, 0).status == "duplicate"  # not "late": we have had it
    assert a.stats["duplicates"] == 2 and a.stats["late"] == 0 and a.stats["accepted"] == 2


# --- memory cap ------------------------------------------------------------------------------


def test_frame_cap_drops_the_oldest_counts_it_and_marks_the_windows():
    a = Aligner(align_config(1000, expected=("video", "audio"), max_buffer_frames=10))
    outs = [a.add(frame("s", i * 100 * MS, i), 0) for i in range(25)]  # audio never came
    assert all(o.status == "accepted" for o in outs)
    assert a.buffered()["frames"] == 10
    assert a.stats["capped_frames"] == 15
    # the newest 10 are kept: frames 15..24, windows 1 s and 2 s
    old = a.add(frame("s", 50 * MS, 99), 0)  # older than anything buffered: refused
    assert old.status == "capped" and "cap of 10 frames" in old.reason
    wins = {w.start_ns // S: w for w in a.flush()}
    assert sorted(wins) == [1, 2]
    assert [f.seq for f in wins[1].frames] == [15, 16, 17, 18, 19]  # K=8 > 5
    assert wins[1].quality["capped_frames"] == 5 and wins[2].quality["capped_frames"] == 0
    assert a.stats["capped"] == 1 and a.stats["capped_frames"] == 16


def test_audio_cap_drops_the_oldest_seconds():
    a = Aligner(align_config(1000, expected=("video", "audio"), max_buffer_audio_s=1.0))
    for i in range(15):
        assert a.add(chunk("s", i * 100 * MS, i, ramp(1600)), 0).status == "accepted"
    assert a.buffered()["audio_s"] == pytest.approx(1.0)
    assert a.stats["capped_audio_s"] == pytest.approx(0.5)
    wins = {w.start_ns // S: w for w in a.flush()}
    assert wins[0].audio_mask.sum() == 5 * 1600
    assert wins[0].quality["capped_audio_s"] == pytest.approx(0.5)


# --- provenance, release, resume, forget ---------------------------------------------------


def test_provenance_lists_every_record_used_in_time_order():
    a = Aligner(align_config(1000))
    recs = [frame("s", 300 * MS, 1, Source("p.video", 2, 41)),
            frame("s", 100 * MS, 0, Source("p.video", 2, 40)),
            chunk("s", 0, 0, ramp(16000), source=Source("p.audio", 2, 7)),
            segment("s", 0, 0, 10, source=Source("p.text", 2, 3))]
    (w,) = run(a, recs)
    assert w.provenance == {"video": [Source("p.video", 2, 40), Source("p.video", 2, 41)],
                            "audio": [Source("p.audio", 2, 7)],
                            "text": [Source("p.text", 2, 3)]}


def test_release_after_is_the_last_window_and_closed_before_tells_when():
    a = Aligner(align_config(1000, 500, expected=("video",)))
    out = a.add(chunk("s", 900 * MS, 0, ramp(3200)), 0)  # [0.9, 1.1): windows 0, 0.5, 1.0
    assert out.release_after_ns == S
    assert a.closed_before("s") is None
    a.add(frame("s", 1700 * MS, 0), 0)
    assert [w.start_ns for w in a.poll(0)] == [0, 500 * MS]
    assert a.closed_before("s") == S  # window 1.0 still open: not releasable yet
    a.add(frame("s", 2500 * MS, 1), 0)
    a.poll(0)
    assert a.closed_before("s") > out.release_after_ns


def test_resume_never_emits_a_window_again_and_replays_are_not_late():
    a = Aligner(align_config(1000, expected=("video",)), resume={"s": S})
    assert a.closed_before("s") == 2 * S
    assert a.add(frame("s", 500 * MS, 0), 0).status == "replayed"
    assert a.add(frame("s", 1500 * MS, 1), 0).status == "replayed"
    assert a.add(chunk("s", 1900 * MS, 0, ramp(3200)), 0).status == "accepted"
    assert a.add(frame("s", 2500 * MS, 2), 0).status == "accepted"
    wins = a.flush()
    assert [w.start_ns for w in wins] == [2 * S]
    assert wins[0].audio_mask.sum() == 1600
    assert a.stats["replayed"] == 2 and a.stats["late"] == 0 and a.stats["late_partial"] == 0


def test_forget_drops_a_streams_state():
    a = Aligner(align_config(1000, expected=("video",)))
    a.add(frame("s", 100 * MS, 0), 0)
    a.add(frame("t", 100 * MS, 0), 0)
    a.forget("s")
    assert a.streams == ["t"]
    assert [w.stream_id for w in a.flush()] == ["t"]
    assert a.add(frame("s", 100 * MS, 0), 0).status == "accepted"  # a fresh start


def test_streams_are_independent():
    a = Aligner(align_config(1000, expected=("video",)))
    a.add(frame("a", 100 * MS, 0), 0)
    a.add(frame("b", 100 * MS, 0), 0)
    a.add(frame("a", 1100 * MS, 1), 0)  # closes a's first window only
    assert [w.key for w in a.poll(0)] == [("a", 0)]
    assert a.add(frame("b", 200 * MS, 1), 0).status == "accepted"


def test_memory_stays_bounded_when_a_modality_lags_far_behind():
    """Audio stamped 30 s behind video keeps every window open: the frame cap holds the
    buffer (and the open windows) bounded, counts what it drops, and windows still come."""
    a = Aligner(align_config(1000, 500, expected=("video", "audio"), max_buffer_frames=40))
    wins = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1500):  # 100 s of 15 fps video, audio 30 s behind
            f = frame("s", i * S // 15, i)
            big = dataclasses.replace(f, data=f.data + bytes(20_000))
            a.add(big, 0)
            if i % 3 == 0:
                a.add(chunk("s", i * S // 15 - 30 * S, i // 3, ramp(3200)), 0)
            wins += [(w.start_ns, w.frame_count, w.present["audio"], w.quality["capped_frames"])
                     for w in a.poll(0)]  # nothing big kept here
            assert a.buffered()["frames"] <= 40
            assert a.buffered()["windows"] <= 80
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 40 frames of 20 kB and 30 s of audio; nothing dropped stays referenced (1500 frames
    # would be 30 MB)
    assert held < 40 * 20_000 + 30 * 32_000 + 2_000_000, held
    assert a.stats["capped_frames"] == 1500 - 40 - sum(n for start, n, _, _ in wins
                                                        if start % S == 0)
    assert wins and all(audio for _, _, audio, _ in wins)
    assert any(capped > 0 for _, _, _, capped in wins)


def test_a_copy_of_a_late_or_capped_record_is_a_duplicate():
    a = Aligner(align_config(1000, expected=("video",), max_buffer_frames=2))
    a.add(frame("s", 2100 * MS, 0), 0)
    a.poll(0)
    late = frame("s", 100 * MS, 7)
    assert a.add(late, 0).status == "late"
    assert a.add(late, 0).status == "duplicate"
    a.add(frame("s", 3100 * MS, 1), 0)
    old = frame("s", 2050 * MS, 2)  # oldest of three buffered with a cap of two
    assert a.add(old, 0).status == "capped"
    assert a.add(old, 0).status == "duplicate"
    assert a.stats["late"] == 1 and a.stats["capped"] == 1 and a.stats["duplicates"] == 2


def test_a_span_longer_than_the_buffer_is_refused_not_buffered():
    a = Aligner(align_config(1000, expected=("text",), max_buffer_audio_s=10.0))
    out = a.add(segment("s", 0, 0, 3600 * S, "an hour-long segment"), 0)
    assert out.status == "capped" and "3600.0 s" in out.reason and "10.0 s" in out.reason
    assert a.buffered()["windows"] == 0 and a.stats["capped"] == 1
    assert a.add(segment("s", 1, 0, 10 * S), 0).status == "accepted"  # 10 s is allowed


def test_window_text_prefers_final_segments_over_the_partials_they_revise() -> None:
    import numpy as np

    from streamproc.align.aligner import Window
    from streamproc.wire.codec import TranscriptSegment

    segs = [
        TranscriptSegment("s", 0, "sev", 100, 300, final=False),
        TranscriptSegment("s", 1, "seven", 100, 400, final=True),
        TranscriptSegment("s", 2, "and thr", 600, 800, final=False),  # not revised yet
    ]
    w = Window("s", 0, 1000, [], 0, np.zeros(0, np.float32), np.zeros(0, bool), 16000, segs,
               {"video": False, "audio": False, "text": True})
    assert w.text == "seven and thr"


def test_records_from_a_clock_far_in_the_future_are_refused_not_buffered() -> None:
    import numpy as np

    from streamproc.align.aligner import AlignConfig, Aligner
    from streamproc.wire.codec import AudioChunk

    cfg = AlignConfig(window_ns=1_000_000_000, hop_ns=1_000_000_000,
                      lateness_ns={"audio": 0}, idle_ns={"audio": 5_000_000_000}, expected=("audio",),
                      max_future_ns=60_000_000_000)
    a = Aligner(cfg)
    now = 1_763_000_000_000_000_000
    ahead = AudioChunk.from_samples("s", now + 120_000_000_000, 0, np.zeros(160), 16000)
    out = a.add(ahead, now)
    assert out.status == "future" and "120.0 s ahead" in out.reason
    assert a.streams == [] and a.stats["future"] == 1  # nothing buffered, no watermark moved
    fine = AudioChunk.from_samples("s", now + 30_000_000_000, 1, np.zeros(160), 16000)
    assert a.add(fine, now).status == "accepted"


def test_statuses_and_closed_by_are_enums_equal_to_their_strings() -> None:
    a = Aligner(align_config(window_ms=1000, expected=("video",)))
    out = a.add(frame("s", 100 * MS, 0), 0)
    assert out.status is OutcomeStatus.ACCEPTED and out.status == "accepted"
    (w,) = a.flush()
    assert w.quality["closed_by"] is ClosedBy.FLUSH
    assert json.loads(json.dumps(w.quality))["closed_by"] == "flush"
    assert a.add(frame("s", 100 * MS, 0), 0).status is OutcomeStatus.DUPLICATE
    assert {str(s) for s in OutcomeStatus} == {
        "accepted", "duplicate", "late", "replayed", "capped", "future"}


def test_ingest_timings_are_a_field_the_aligner_leaves_empty() -> None:
    a = Aligner(align_config(window_ms=1000))
    a.add(frame("s", 100 * MS, 0), 0)
    (w,) = a.flush()
    assert w.ingest_ms == {} and not any(k.startswith("ingest") for k in w.quality)
    assert list(w.provenance) == ["video", "audio", "text"]


@pytest.mark.parametrize(("fps", "jitter_ms", "k", "hop_ms"), [
    (30, 0, 8, 500), (30, 8, 8, 500), (15, 0, 8, 500), (15, 20, 8, 500), (25, 12, 8, 500),
    # hops that are no whole number of stretches: a window's stretches are not its
    # neighbour's
    (30, 0, 5, 500), (15, 0, 3, 500), (30, 0, 1, 500), (30, 0, 8, 300), (30, 8, 8, 300)])
def test_frames_likely_sampled_are_the_ones_windows_pick(fps: int, jitter_ms: int, k: int,
                                                          hop_ms: int) -> None:
    """What the worker decodes ahead of the close: once a window told the stream's frame
    count, every frame a later window picks was flagged (a regular stream) or nearly every
    one (jittered timestamps), and frames no window reads mostly were not."""
    cfg = align_config(1000, hop_ms, expected=("video",), frames_per_window=k)
    al = Aligner(cfg)
    rng = np.random.default_rng(fps + jitter_ms)
    flagged: set[int] = set()
    picked: set[int] = set()
    first_close = None
    n = 20 * fps
    for seq in range(n):
        ts = 100 * S + seq * S // fps + int(rng.integers(0, jitter_ms + 1)) * MS
        f = frame("cam", ts, seq)
        assert al.add(f, ts).status == "accepted"
        if al.likely_sampled(f):
            flagged.add(seq)
        for w in al.poll(ts):
            first_close = seq if first_close is None else first_close
            picked.update(p.seq for p in w.frames)
    assert first_close is not None
    later = {s for s in picked if s > first_close + fps}  # windows after the first told n
    missed = later - flagged
    assert len(missed) <= (0 if jitter_ms == 0 else len(later) // 20), sorted(missed)
    unread = set(range(first_close + fps, n)) - picked
    shared = hop_ms * k % 1000 == 0
    # without shared stretches a frame is near the centres of more than one window's
    assert len(unread & flagged) <= len(unread) * (1 if shared else 2) // 5 + 1
    assert len(flagged) < n  # frames were left to decode only if picked
    if shared:
        # hopping windows pick the same frames where they overlap, at any frame rate:
        # about K frames a second are read (and decoded), not up to 2K
        seconds = (n - first_close - fps) / fps
        assert len(later) <= k * seconds + k
        assert len({s for s in flagged if s > first_close + fps}) <= 1.25 * k * seconds
