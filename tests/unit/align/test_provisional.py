"""Provisional and final windows: the fast modalities' completion emits a provisional
window at once, every window still ends with exactly one final window, and the finals are
the very windows an aligner without provisionals emits."""

from __future__ import annotations

import numpy as np
import pytest

from streamproc.align.aligner import AlignConfig, Aligner, Window
from streamproc.config import ConfigError, Settings
from streamproc.testing import MS, S, chunk, frame, segment

T0 = 1_800_000_000 * S  # the wall clock is event time here


def talk(seconds: int, lag_ms: int = 1200, gaps: tuple[int, ...] = ()) -> list:
    """(arrival, record): 10 fps video and 100 ms chunks arriving as they end, a 1 s
    transcript segment every 2 s (but at the seconds in ``gaps``) arriving ``lag_ms``
    after it ends."""
    events = []
    for i, t in enumerate(range(T0, T0 + seconds * S, 100 * MS)):
        events.append((t, frame("cam", t, i)))
        events.append((t + 100 * MS, chunk("cam", t, i, np.full(1600, 100, np.int16))))
    for i, s in enumerate(range(0, seconds, 2)):
        if s not in gaps:
            start = T0 + s * S
            events.append((start + S + lag_ms * MS, segment("cam", i, start, start + S)))
    return sorted(events, key=lambda e: e[0])


def feed(a: Aligner, events: list, replayed: int = 0) -> list[tuple[int, Window]]:
    """Add each record at its arrival and poll; then let 20 s of clock pass. Records that
    end by ``replayed`` may belong only to windows emitted before a restart."""
    out: list[tuple[int, Window]] = []
    for now, rec in events:
        want = {"accepted", "replayed"} if rec.end_ns <= replayed else {"accepted"}
        assert a.add(rec, now).status in want, rec
        out += [(now, w) for w in a.poll(now)]
    end = events[-1][0]
    for now in range(end, end + 20 * S, 100 * MS):
        out += [(now, w) for w in a.poll(now)]
    return out


def aligner(provisional: str = "video,audio", **changes) -> Aligner:
    """Finals that wait for the transcript's watermark (tests/unit/align/test_final_within.py
    has the bound on that wait, on by default)."""
    changes.setdefault("final_within_ms", 0)
    return Aligner(AlignConfig.from_settings(Settings(provisional_on=provisional, **changes)))


def test_a_provisional_comes_when_video_and_audio_are_complete_and_one_final_later() -> None:
    out = feed(aligner(), talk(20))
    finals = {w.start_ns: (now, w) for now, w in out if w.final}
    provisional = {w.start_ns: (now, w) for now, w in out if not w.final}
    assert len(finals) == len([w for _, w in out if w.final])  # one final per window
    assert set(provisional) <= set(finals)
    inner = [k for k in finals if T0 + S <= k <= T0 + 17 * S]
    assert inner and all(k in provisional for k in inner)
    for k in inner:
        p_at, p = provisional[k]
        f_at, f = finals[k]
        assert (p.rev, p.final, f.rev, f.final) == (0, False, 1, True)
        assert p_at < f_at
        # video and audio lateness 250 ms; the chunk ending at the window's end arrives then
        assert p_at - p.end_ns <= 250 * MS + 100 * MS
        assert f_at - f.end_ns >= 3 * S  # the transcript's lateness
        assert p.frame_count == f.frame_count and np.array_equal(p.audio, f.audio)
    # a provisional has the text that had arrived: never more than its final
    assert all(len(provisional[k][1].segments) <= len(finals[k][1].segments) for k in inner)
    assert any(len(provisional[k][1].segments) < len(finals[k][1].segments) for k in inner)


def test_finals_are_the_windows_of_an_aligner_without_provisionals() -> None:
    events = talk(30, gaps=(8, 10, 12))  # a 5 s pause in the speech too
    with_p = [w for _, w in feed(aligner(), events) if w.final]
    without = [w for _, w in feed(aligner(""), events)]
    assert [w.key for w in with_p] == [w.key for w in without]
    for a, b in zip(with_p, without, strict=True):
        assert (a.frame_count, a.present, a.quality) == (b.frame_count, b.present, b.quality)
        assert [s.seq for s in a.segments] == [s.seq for s in b.segments]
        assert np.array_equal(a.audio_mask, b.audio_mask) and np.array_equal(a.audio, b.audio)
        assert [f.seq for f in a.frames] == [f.seq for f in b.frames]
        assert b.rev == 0 and not b.unchanged


def test_a_final_with_nothing_added_since_its_provisional_says_unchanged() -> None:
    out = feed(aligner(), talk(20, gaps=(8, 10)))
    finals = {w.start_ns: w for _, w in out if w.final}
    provisional = {w.start_ns: w for _, w in out if not w.final}
    for k, f in finals.items():
        if k in provisional:
            added = len(f.segments) - len(provisional[k].segments)
            assert f.unchanged == (added == 0), (k, added)
    silent = [finals[T0 + s * MS] for s in (9000, 9500, 10_000)]  # only the pause's silence
    assert all(f.unchanged and not f.segments for f in silent)


def test_no_provisionals_when_only_fast_modalities_are_expected_or_none_are_named() -> None:
    assert aligner("video,audio", expected_modalities="video,audio").cfg.provisional == ()
    assert aligner("").cfg.provisional == ()
    assert aligner("video", expected_modalities="video,text").cfg.provisional == ("video",)
    events = [(t, r) for t, r in talk(5) if r.modality != "text"]
    out = feed(aligner("video,audio", expected_modalities="video,audio"), events)
    assert out and all(w.final and w.rev == 0 for _, w in out)


def test_windows_emitted_before_a_restart_get_no_provisional_again() -> None:
    events = talk(10)
    resume = {"cam": T0 + 4 * S}
    a = Aligner(AlignConfig.from_settings(Settings(provisional_on="video,audio")), resume=resume)
    out = feed(a, events, replayed=T0 + 5 * S)
    assert all(w.start_ns > T0 + 4 * S for _, w in out)
    assert any(not w.final for _, w in out)
    # a final is rev 1 whether or not this aligner emitted its provisional: the rev names
    # the same record after a restart as before it
    assert all(w.rev == 1 for _, w in out if w.final)


def test_provisional_on_names_modalities_or_none() -> None:
    with pytest.raises(ConfigError, match="provisional_on"):
        Settings(provisional_on="video,smell")
    # an empty environment value counts as unset, so "none" says it from the environment
    s = Settings.load(environ={"STREAMPROC_PROVISIONAL_ON": "none"})
    assert s.provisional_modalities == () and aligner("none").cfg.provisional == ()
    assert Settings(provisional_on="Video, AUDIO").provisional_modalities == ("video", "audio")


def test_a_window_the_cap_emptied_after_its_provisional_still_gets_its_final() -> None:
    a = aligner("video", expected_modalities="video,text", max_buffer_frames=4,
                lateness_video_ms=0)
    a.add(segment("s", 0, T0, T0 + 100 * MS), T0)  # text seen: windows wait for it
    out: list[Window] = []
    for i in range(10):  # 2 frames a second, more than the cap holds
        now = T0 + i * 500 * MS
        a.add(frame("s", now, i), now)
        out += a.poll(now)
    now = T0 + 100 * S
    a.add(segment("s", 1, now - 10 * MS, now), now)
    out += a.poll(now) + a.flush()
    provisional = {w.start_ns for w in out if not w.final}
    finals = {w.start_ns: w for w in out if w.final}
    assert provisional and provisional <= set(finals)
    emptied = [finals[k] for k in provisional if finals[k].frame_count == 0]
    assert emptied and all(w.quality["capped_frames"] > 0 for w in emptied)
