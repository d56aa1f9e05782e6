"""Idle deadlines and records that come after them: a modality's watermark never moves
backwards. Once its idle clock moved it on, a record behind it (late, a revision, or a
source coming back with a longer lag) does not pull it back, so windows keep closing at
the pace they had, and records that come back are still in every window still open."""

from __future__ import annotations

import numpy as np
import pytest

from streamproc.align.aligner import AlignConfig, Aligner, ClosedBy, Outcome, OutcomeStatus, Window
from streamproc.config import Settings
from streamproc.testing import MS, S, chunk, frame, segment
from streamproc.wire.codec import MediaRecord

T0 = 1_800_000_000 * S  # the wall clock is event time here
STEP = 100 * MS


def media(t0_ms: int, t1_ms: int, video: bool = True, audio: bool = True,
          first_seq: int = 0) -> list[tuple[int, MediaRecord]]:
    """(arrival, record): 10 fps video and 100 ms chunks from ``t0_ms`` to ``t1_ms``,
    each arriving as it ends."""
    events: list[tuple[int, MediaRecord]] = []
    for i, t in enumerate(range(T0 + t0_ms * MS, T0 + t1_ms * MS, STEP), first_seq):
        if video:
            events.append((t, frame("cam", t, i)))
        if audio:
            events.append((t + STEP, chunk("cam", t, i, np.full(1600, 100, np.int16))))
    return events


def said(seq: int, start_ms: int, end_ms: int, at_ms: int) -> tuple[int, MediaRecord]:
    """(arrival, record): a final transcript segment over [start_ms, end_ms) sent at at_ms."""
    return T0 + at_ms * MS, segment("cam", seq, T0 + start_ms * MS, T0 + end_ms * MS)


def run(a: Aligner, events: list[tuple[int, MediaRecord]], until_ms: int
        ) -> tuple[list[tuple[int, Window]], dict[int, Outcome]]:
    """Add each record at its arrival, polling every 100 ms of clock up to ``until_ms``:
    the windows with the clock they came at, and the outcome of every record (by id)."""
    events = sorted(events, key=lambda e: e[0])
    out: list[tuple[int, Window]] = []
    outcomes: dict[int, Outcome] = {}
    i = 0
    for now in range(events[0][0], T0 + until_ms * MS + 1, STEP):
        while i < len(events) and events[i][0] <= now:
            outcomes[id(events[i][1])] = a.add(events[i][1], events[i][0])
            i += 1
        out += [(now, w) for w in a.poll(now)]
    return out, outcomes


def finals(out: list[tuple[int, Window]]) -> dict[int, tuple[int, Window]]:
    """Window end (ms after T0) -> (clock in ms after T0, window) of its first final; no
    window has two."""
    by: dict[int, tuple[int, Window]] = {}
    for now, w in out:
        if w.final and w.quality["closed_by"] != ClosedBy.REVISION:
            end = (w.end_ns - T0) // MS
            assert end not in by, f"window ending at {end} ms closed twice"
            by[end] = ((now - T0) // MS, w)
    return by


def aligner(**changes: object) -> Aligner:
    """The default settings (1 s windows every 0.5 s, text lateness 3 s, idle deadlines
    1 s), no provisionals and no revisions unless asked."""
    kw = {"provisional_on": "none", "revision_horizon_ms": 0} | changes
    return Aligner(AlignConfig.from_settings(Settings(**kw)))


# Video and audio live for 20 s; the transcript says two segments (1 s of recogniser lag)
# and falls silent at 2.9 s: past its deadline from 3.9 s, its watermark moves on from
# 1.9 s with the clock, so a window ending at E closes at E + 5 s (lateness 3 s, the 1 s
# deadline and the 1 s the segments lagged), masked where the text has nothing.
SPOKEN = [said(0, 0, 900, 1900), said(1, 1000, 1900, 2900)]
PACE_MS = 5000


def assert_paced(out: list[tuple[int, Window]], pace_ms: int = PACE_MS,
                 until_ms: int = 20_000) -> dict[int, tuple[int, Window]]:
    """Every window ending by ``until_ms - pace_ms`` closed ``pace_ms`` after its end;
    returns the finals by end (ms)."""
    by_end = finals(out)
    for end in range(500, until_ms - pace_ms + 1, 500):
        assert end in by_end, f"window ending at {end} ms never closed by {until_ms} ms"
        at, _ = by_end[end]
        assert at == end + pace_ms, f"window ending at {end} ms closed at {at} ms"
    return by_end


@pytest.mark.parametrize("revision_ms", [0, 10_000])
def test_a_late_segment_after_the_text_fell_silent_does_not_stall_the_stream(
        revision_ms: int) -> None:
    # at 12 s the windows up to the one ending at 7 s closed on the idle clock; a segment
    # over 3.0..3.5 s (its windows long closed) then says nothing about the present
    late = said(9, 3000, 3500, 12_000)
    a = aligner(revision_horizon_ms=revision_ms)
    out, outcomes = run(a, media(0, 20_000) + SPOKEN + [late], 20_000)
    # every window closes at the pace the idle clock set, before the segment and after it
    by_end = assert_paced(out)
    for end in range(500, 20_000 - PACE_MS + 1, 500):
        w = by_end[end][1]
        if end >= 3000:  # nothing of the transcript's: closed on its deadline
            assert w.quality["closed_by"] == ClosedBy.DEADLINE and not w.present["text"]
    # and the segment itself is handled as it always was
    outcome = outcomes[id(late[1])]
    if not revision_ms:
        assert outcome.status == OutcomeStatus.LATE and a.stats["late"] == 1
        # the watermark it names is the one its windows closed on
        assert "text watermark 1800000009.900s (silent, moved on with the clock)" \
            in outcome.reason
        (first_after,) = [w for end, (at, w) in by_end.items() if at == 12_000]
        assert first_after.quality["late_events"] == 1
    else:
        assert outcome.status == OutcomeStatus.ACCEPTED and "revises 2" in outcome.reason
        revised = [(now, w) for now, w in out if w.quality["closed_by"] == ClosedBy.REVISION]
        assert [((now - T0) // MS, (w.start_ns - T0) // MS) for now, w in revised] == [
            (12_000, 2500), (12_000, 3000)]
        assert all(w.present["text"] and w.rev == 1 for _, w in revised)
        assert a.stats["late"] == 0 and a.stats["revisions"] == 2


def test_late_segments_now_and_then_while_the_text_is_silent() -> None:
    """Stragglers: late segments more than the idle deadline apart never hold the stream
    back (each one is reported late); a source is followed at a new lag only when it sends
    late records steadily (the camera test below)."""
    lagging = [said(10 + i, 500 + i * 500, 900 + i * 500, 8000 + i * 1200) for i in range(9)]
    a = aligner()
    out, outcomes = run(a, media(0, 20_000) + SPOKEN + lagging, 20_000)
    assert_paced(out)
    assert all(outcomes[id(r)].status == OutcomeStatus.LATE for _, r in lagging)
    assert a.stats["late"] == len(lagging)


def test_a_transcript_that_comes_back_behind_the_idle_clock_loses_nothing() -> None:
    """The recogniser comes back at 12 s with 4.6 s of lag (more than it had): its segments
    are in every window they overlap (none closed on the idle clock before them), and its
    watermark, which the idle clock had moved to 9.9 s, does not fall back to theirs: when
    it falls silent again, windows wait no longer than its live spell added."""
    back = [said(10, 6500, 7400, 12_000), said(11, 7400, 8400, 13_000)]
    a = aligner()
    out, outcomes = run(a, media(0, 25_000) + SPOKEN + back, 25_000)
    for _, r in back:
        o = outcomes[id(r)]
        assert o.status == OutcomeStatus.ACCEPTED and not o.reason, o
    assert a.stats["late"] == 0 and a.stats["late_partial"] == 0
    by_end = finals(out)
    for end, (_, w) in by_end.items():
        want = {r.seq for _, r in SPOKEN + back
                if r.start_ns < w.end_ns and r.end_ns > w.start_ns}
        assert {s.seq for s in w.segments} == want, end
    for end in range(500, 7000, 500):  # before it came back: the idle clock's pace
        assert by_end[end][0] == end + PACE_MS, end
    # it was live from 12 s (the last poll before: 11.9 s) to its deadline after its last
    # segment (14 s); the watermark stood still meanwhile and then moved on with the clock
    # again from where it stood
    live_ms = 14_000 - 11_900
    for end in range(7000, 25_000 - PACE_MS - live_ms + 1, 500):
        at, w = by_end[end]
        assert at == end + PACE_MS + live_ms, f"window ending at {end} ms closed at {at} ms"


def test_a_late_frame_after_the_camera_fell_silent_stalls_neither_provisionals_nor_finals(
        ) -> None:
    """The same for video, and for provisional windows (here they close on the video
    alone, finals on the audio's longer lateness too)."""
    late = (T0 + 8000 * MS, frame("cam", T0 + 1000 * MS, 999))
    a = aligner(provisional_on="video", expected_modalities="video,audio",
                lateness_video_ms=250, lateness_audio_ms=2000)
    out, outcomes = run(a, media(0, 3000) + media(3000, 15_000, video=False, first_seq=30)
                        + [late], 15_000)
    assert outcomes[id(late[1])].status == OutcomeStatus.LATE
    # the camera's watermark moves on from 2.9 s with the clock once it is silent past
    # 3.9 s: a window ending at E >= 3 s has its provisional at the first poll after
    # E + 1.25 s (video lateness 250 ms and the 1 s deadline), its final at E + 2 s (the
    # audio's lateness)
    for final, pace in ((False, 1300), (True, 2000)):
        closed = {(w.end_ns - T0) // MS: (now - T0) // MS for now, w in out if w.final == final}
        for end in range(4000, 15_000 - pace + 1, 500):
            assert closed.get(end) == end + pace, (final, end, closed.get(end))


def test_a_camera_back_with_a_steady_longer_lag_is_followed_again() -> None:
    """A source that comes back 3 s behind its own past pace sends only late records at
    first; once it has done so steadily for its idle deadline, the stream follows it at
    the new lag (one stall), instead of finding every one of its frames late for ever."""
    a = aligner(expected_modalities="video,audio")
    events = media(0, 30_000, video=False)  # audio live for 30 s
    events += [(T0 + t * MS, frame("cam", T0 + t * MS, t // 100)) for t in range(0, 3000, 100)]
    # silent from 3 s, back at 8 s with frames from 5 s on: 3 s behind
    back = [(T0 + (t + 3000) * MS, frame("cam", T0 + t * MS, 1000 + t // 100))
            for t in range(5000, 27_000, 100)]
    out, outcomes = run(a, events + back, 34_000)
    late = [r for _, r in back if outcomes[id(r)].status == OutcomeStatus.LATE]
    # the frames of its first idle deadline behind the closed windows, then none
    assert 0 < len(late) <= 25 and late == [r for _, r in back[:len(late)]]
    by = finals(out)
    followed = [by[end][1] for end in range(8000, 27_000, 500)]
    assert all(w.present["video"] and len(w.frames) == 8 for w in followed)


@pytest.mark.parametrize("replay_over", [True, False])
def test_after_a_restart_late_segments_hold_the_stream_only_while_replaying(
        replay_over: bool) -> None:
    """A restarted aligner rebuilds watermarks from replayed records (windows published
    before the restart). Once the replay is over (the worker has read its backlog), a
    recogniser far behind sending segments for those windows is late like any other and
    holds nothing back."""
    # further apart than the text's idle deadline: stragglers, not a source to follow
    lagging = [said(10 + i, 5000 + i * 300, 5300 + i * 300, 10_500 + i * 1200)
               for i in range(13)]

    def go(text: bool) -> tuple[dict[int, tuple[int, Window]], dict[int, Outcome]]:
        a = Aligner(AlignConfig.from_settings(Settings(provisional_on="none",
                                                       revision_horizon_ms=0)),
                    resume={"cam": T0 + 9500 * MS})  # published through the window at 9.5 s
        if replay_over:
            a.replay_done()
        out, outcomes = run(a, media(10_000, 30_000, first_seq=100) +
                            (lagging if text else []), 30_000)
        return finals(out), outcomes

    base, _ = go(False)
    held, outcomes = go(True)
    if replay_over:
        assert {e: c for e, (c, _) in held.items()} == {e: c for e, (c, _) in base.items()}
    else:  # a replay: the segments rebuild the text watermark, which then holds
        assert all(outcomes[id(r)].status == OutcomeStatus.REPLAYED for _, r in lagging)
        assert held.get(11_000, (30_001, None))[0] > base[11_000][0]  # or not by 30 s


def test_a_copy_of_a_late_segment_is_not_a_source_lagging() -> None:
    """A late segment and a copy of it (a producer retry, one idle deadline later): the
    copy is a duplicate, counted once; neither is the source sending, so the stream keeps
    the pace the idle clock set (as with the late segment alone)."""
    late = said(9, 3000, 3500, 12_000)
    copy = (T0 + 13_000 * MS, segment("cam", 9, T0 + 3000 * MS, T0 + 3500 * MS))
    a = aligner()
    out, outcomes = run(a, media(0, 20_000) + SPOKEN + [late, copy], 20_000)
    assert outcomes[id(late[1])].status == OutcomeStatus.LATE
    assert outcomes[id(copy[1])].status == OutcomeStatus.DUPLICATE
    assert_paced(out)


@pytest.mark.parametrize("stragglers", [1, 3])
def test_with_a_zero_idle_deadline_stragglers_are_no_lagging_source(stragglers: int) -> None:
    """idle_deadline_text_ms=0 (allowed: "must not be negative"): the text watermark moves
    with the clock as soon as the recogniser is quiet. Late segments, alone or several in
    one fetched batch (one clock reading for all of them), are stragglers; they must not
    pull the watermark back to their own event time."""
    pace = 4000  # text lateness 3 s + the 1 s the segments lagged, no deadline
    late = [said(9 + i, 3000 + 100 * i, 3100 + 100 * i, 12_000) for i in range(stragglers)]
    a = aligner(idle_deadline_text_ms=0)
    out, outcomes = run(a, media(0, 20_000) + SPOKEN + late, 20_000)
    assert all(outcomes[id(r)].status == OutcomeStatus.LATE for _, r in late)
    assert_paced(out, pace)


def _restart_run(straggler: bool) -> tuple[dict, dict]:
    """A worker restarted at 10 s (published through the window at 9.5 s) reads a backlog
    for 1.5 s of its clock: a recogniser far behind, segments every 300 ms for windows
    published before the restart (replayed). The backlog is read by 11.5 s and the
    worker says so (replay_done) at its next poll; media are live from 10 s. With
    ``straggler``, one more segment for a published window comes at 12.2 s, and no
    other text for the rest of the run."""
    a = Aligner(AlignConfig.from_settings(Settings(provisional_on="none",
                                                   revision_horizon_ms=0)),
                resume={"cam": T0 + 9500 * MS})
    backlog = [said(10 + i, 4000 + i * 300, 4300 + i * 300, 10_000 + i * 300)
               for i in range(6)]  # arrive 10.0 .. 11.5 s
    extra = [said(30, 3000, 3300, 12_200)] if straggler else []
    events = sorted(media(10_000, 30_000, first_seq=100) + backlog + extra,
                    key=lambda e: e[0])
    out, outcomes, i = [], {}, 0
    replaying = True
    for now in range(T0 + 10_000 * MS, T0 + 30_000 * MS + 1, 100 * MS):
        while i < len(events) and events[i][0] <= now:
            outcomes[id(events[i][1])] = a.add(events[i][1], events[i][0])
            i += 1
        if replaying and now >= T0 + 11_600 * MS:
            replaying = False
            a.replay_done()
        # as the worker does: the poll clock stands still while it reads the backlog
        out += [(now, w) for w in a.poll(T0 + 10_000 * MS if replaying else now,
                                         not replaying)]
    return finals(out), {**outcomes, "extra": [outcomes[id(r)] for _, r in extra]}


def test_a_straggler_just_after_the_replay_is_late_like_any_other() -> None:
    """docs/alignment.md: after the replay 'such a record is late like any other'. A
    single straggler holds nothing back, whatever the replay before it: the windows
    close when they do without it."""
    base, _ = _restart_run(False)
    held, outcomes = _restart_run(True)
    assert [o.status for o in outcomes["extra"]] == [OutcomeStatus.REPLAYED]
    diff = {e: (base[e][0], held.get(e, (None,))[0]) for e in base
            if held.get(e, (None,))[0] != base[e][0]}
    assert not diff, f"window end -> (closed at without, with the straggler): {diff}"


def test_a_camera_whose_clock_steps_back_does_not_stop_the_stream() -> None:
    """At 5 s the camera's clock steps back 10 minutes (NTP, a reboot): every frame it
    sends from then on is for windows closed long ago. That is no lag to follow (more
    than max_future_ms behind): its frames stay late, the windows keep closing without
    video, and the late keys remembered stay bounded."""
    a = aligner(expected_modalities="video,audio")
    events = media(0, 60_000, video=False)  # audio live for 60 s
    events += [(T0 + t * MS, frame("cam", T0 + t * MS, t // 100)) for t in range(0, 5000, 100)]
    back = [(T0 + t * MS, frame("cam", T0 + (t - 600_000) * MS, 1000 + t // 100))
            for t in range(5000, 60_000, 100)]
    out, outcomes = run(a, events + back, 60_000)
    assert all(outcomes[id(r)].status == OutcomeStatus.LATE for _, r in back)
    by_end = finals(out)
    st = a._streams["cam"]
    missing = [end for end in range(500, 50_000, 500) if end not in by_end]
    assert not missing, (f"{len(missing)} windows never closed, from {missing[0]} ms; "
                         f"video wm {(st.wm['video'] - T0) / S:.1f} s, "
                         f"retired[-1] holds {len(st.retired[-1])} keys")


def _camera_back(outage: bool) -> int:
    """test_idle's camera, back 6 s behind (from 11 s); with ``outage`` the broker is away
    from 11.45 s to 13.45 s: what was produced meanwhile is read at 13.45 s, after
    Aligner.pause(2 s), as the worker does. Returns how many of its frames were late."""
    a = aligner(expected_modalities="video,audio")
    events = media(0, 30_000, video=False)
    events += [(T0 + t * MS, frame("cam", T0 + t * MS, t // 100)) for t in range(0, 3000, 100)]
    back = [(T0 + (t + 6000) * MS, frame("cam", T0 + t * MS, 1000 + t // 100))
            for t in range(5000, 27_000, 100)]
    events = sorted(events + back, key=lambda e: e[0])
    lo, hi = T0 + 11_450 * MS, T0 + 13_450 * MS
    outcomes, i, paused = {}, 0, False
    for now in range(T0, T0 + 34_000 * MS + 1, 50 * MS):
        if outage and lo < now < hi:
            continue  # nothing read, no poll (the worker's poll clock stands still)
        if outage and now >= hi and not paused:
            a.pause(hi - lo)
            paused = True
        while i < len(events) and events[i][0] <= now:
            at = now if outage and lo < events[i][0] < hi else events[i][0]
            outcomes[id(events[i][1])] = a.add(events[i][1], at)
            i += 1
        a.poll(now)
    return sum(outcomes[id(r)].status == OutcomeStatus.LATE for _, r in back)


def test_time_the_input_could_not_be_read_does_not_break_a_late_run() -> None:
    """docs/alignment.md / worker.md: time in which the worker could not read its input
    does not count toward idleness. A camera sending late frames steadily is followed
    after its idle deadline of them; an outage of the input in the middle of that run
    is no gap in the source's sending, so it should not start the run again."""
    assert _camera_back(True) == _camera_back(False), "late frames with / without outage"
