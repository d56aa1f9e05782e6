"""Revised finals: a final transcript segment that comes after its window's final, within
the revision horizon, makes one more final of that window (rev + 1) with everything the
last one had plus the segment; beyond the horizon it is late as before. After a restart,
the replay rebuilds the revisable windows without emitting them again, unless it holds
segments their last published revision did not."""

from __future__ import annotations

import dataclasses

import numpy as np

from streamproc.align.aligner import (
    AlignConfig,
    Aligner,
    ClosedBy,
    OutcomeStatus,
    Revisable,
    Window,
)
from streamproc.config import Settings
from streamproc.testing import MS, S, chunk, frame, segment

T0 = 1_800_000_000 * S  # the wall clock is event time here


def cfg(**changes) -> AlignConfig:
    return AlignConfig.from_settings(Settings(**({"revision_horizon_ms": 10_000} | changes)))


def media(seconds: int) -> list:
    """(arrival, record): 10 fps video and 100 ms chunks arriving as they end."""
    events = []
    for i, t in enumerate(range(T0, T0 + seconds * S, 100 * MS)):
        events.append((t, frame("cam", t, i)))
        events.append((t + 100 * MS, chunk("cam", t, i, np.full(1600, 100, np.int16))))
    return events


def run(a: Aligner, events: list, until: int) -> list[tuple[int, Window]]:
    """Add each record at its arrival, polling every 100 ms of clock up to ``until``."""
    events = sorted(events, key=lambda e: e[0])
    out: list[tuple[int, Window]] = []
    now = events[0][0]
    i = 0
    while now <= until:
        while i < len(events) and events[i][0] <= now:
            a.add(events[i][1], events[i][0])
            i += 1
        out += [(now, w) for w in a.poll(now)]
        now += 100 * MS
    return out


def finals(out: list[tuple[int, Window]]) -> dict[int, list[Window]]:
    """Window start -> its finals (the final and its revisions), in emission order."""
    by: dict[int, list[Window]] = {}
    for _, w in out:
        if w.final:
            by.setdefault(w.start_ns, []).append(w)
    return by


def test_a_late_final_segment_revises_the_closed_windows_it_overlaps() -> None:
    a = Aligner(cfg())
    late = segment("cam", 1, T0 + 2 * S + 200 * MS, T0 + 2 * S + 700 * MS, text="hello")
    # the segment comes 6 s after its end: past the 3 s text lateness, within the horizon
    out = run(a, [*media(12), (T0 + 8 * S + 700 * MS, late)], T0 + 20 * S)
    by = finals(out)
    # it overlaps the windows starting at 1.5, 2.0 and 2.5 s: each gets one revision
    touched = (T0 + 3 * S // 2, T0 + 2 * S, T0 + 5 * S // 2)
    for k in touched:
        first, revised = by[k]
        assert (first.rev, revised.rev) == (1, 2) and first.final and revised.final
        assert first.segments == [] and not first.present["text"]
        assert revised.text == "hello" and revised.present["text"]
        assert revised.quality["closed_by"] == ClosedBy.REVISION
        assert revised.quality["segments_added"] == 1
        # everything else is the final's own
        assert revised.frame_count == first.frame_count
        assert np.array_equal(revised.audio, first.audio)
        assert [f.seq for f in revised.frames] == [f.seq for f in first.frames]
    assert all(len(ws) == 1 for k, ws in by.items() if k not in touched)
    assert a.stats["revisions"] == 3 and a.stats["late"] == 0


def test_a_copy_of_a_revising_segment_is_a_duplicate_and_revises_nothing() -> None:
    a = Aligner(cfg())
    seg = segment("cam", 1, T0 + 2 * S + 200 * MS, T0 + 2 * S + 700 * MS)
    run(a, media(12), T0 + 8 * S)
    assert a.add(seg, T0 + 8 * S).status == OutcomeStatus.ACCEPTED
    assert len(a.poll(T0 + 8 * S)) == 3
    copy = dataclasses.replace(seg, text="another copy")
    assert a.add(copy, T0 + 8 * S).status == OutcomeStatus.DUPLICATE
    assert a.poll(T0 + 8 * S) == [] and a.stats["revisions"] == 3


def test_beyond_the_horizon_a_segment_is_late_and_a_late_partial_revises_nothing() -> None:
    a = Aligner(cfg(revision_horizon_ms=2000))
    run(a, media(12), T0 + 14 * S)
    old = segment("cam", 1, T0 + 2 * S, T0 + 2 * S + 500 * MS)
    out = a.add(old, T0 + 14 * S)
    assert out.status == OutcomeStatus.LATE and "revision horizon 2000 ms" in out.reason
    assert a.stats["revision_late"] == 1
    partial = dataclasses.replace(segment("cam", 2, T0 + 10 * S, T0 + 10 * S + 300 * MS),
                                  final=False)
    assert a.add(partial, T0 + 14 * S).status == OutcomeStatus.LATE
    assert a.poll(T0 + 14 * S) == []


def test_no_horizon_no_revisions() -> None:
    a = Aligner(cfg(revision_horizon_ms=0))
    run(a, media(12), T0 + 9 * S)
    late = segment("cam", 1, T0 + 2 * S, T0 + 2 * S + 500 * MS)
    assert a.add(late, T0 + 9 * S).status == OutcomeStatus.LATE
    assert a.buffered()["revisable"] == 0


def test_revisable_windows_stay_bounded_by_the_horizon() -> None:
    a = Aligner(cfg(revision_horizon_ms=3000))
    run(a, media(30), T0 + 32 * S)
    # 3 s of 0.5 s hops behind the oldest open window
    assert a.buffered()["revisable"] == 6
    cb = a.closed_before("cam")
    # exactly the newest six, oldest first (expiry walks them in that order)
    assert list(a._streams["cam"].kept) == [cb - 3 * S + i * 500 * MS for i in range(6)]


def test_a_segment_partly_late_revises_the_closed_windows_and_joins_the_open_ones() -> None:
    a = Aligner(cfg())
    run(a, media(12), T0 + 7 * S + 300 * MS)
    # text silent: closed up to about the watermark; the segment spans closed and open ones
    cb = a.closed_before("cam")
    assert cb is not None
    seg = segment("cam", 1, cb - S, cb + S)
    assert a.add(seg, T0 + 7 * S + 300 * MS).status == OutcomeStatus.ACCEPTED
    revised = [w for w in a.poll(T0 + 7 * S + 300 * MS) if w.rev == 2]
    assert [w.start_ns for w in revised] == [cb - 3 * S // 2, cb - S, cb - S // 2]
    assert a.stats["late_partial"] == 0


# --- after a restart -----------------------------------------------------------------


def published(out: list[tuple[int, Window]]) -> dict[int, tuple[int, frozenset[int]]]:
    """What progress records of a run: each window's last final (rev, transcript ids)."""
    return {k: (ws[-1].rev, ws[-1].text_ids) for k, ws in finals(out).items()}


def restart(out: list[tuple[int, Window]], crashed_at: int, **changes) -> Aligner:
    """An aligner resuming after a crash at ``crashed_at``: it knows what ``out`` published
    up to then, and every record of the revisable windows comes back in the replay."""
    before = [(t, w) for t, w in out if t <= crashed_at]
    through = max(w.start_ns for _, w in before if w.final)
    c = cfg(**changes)
    floor = through + c.hop_ns - c.revision_ns
    revs = {k: v for k, v in published(before).items() if k >= floor}
    return Aligner(c, resume={"cam": through}, revisable={"cam": Revisable(floor, revs)})


def test_a_replay_emits_no_published_window_again_and_revises_what_comes_late() -> None:
    events = media(12)
    first = run(Aligner(cfg()), events, T0 + 8 * S)
    b = restart(first, T0 + 8 * S)
    again = run(b, events, T0 + 8 * S)  # the replay, then the clock as before
    assert not any(w.start_ns in published(first) for _, w in again)
    late = segment("cam", 1, T0 + 5 * S + 200 * MS, T0 + 5 * S + 700 * MS, text="hi")
    assert b.add(late, T0 + 8 * S).status == OutcomeStatus.ACCEPTED
    out = b.poll(T0 + 8 * S)
    assert [(w.start_ns, w.rev, w.text) for w in out] == [
        (T0 + 9 * S // 2, 2, "hi"), (T0 + 5 * S, 2, "hi"), (T0 + 11 * S // 2, 2, "hi")]
    originals = {w.start_ns: w for _, w in first}
    for w in out:  # the rebuilt window is the published one plus the segment
        o = originals[w.start_ns]
        assert w.frame_count == o.frame_count and np.array_equal(w.audio, o.audio)


def test_a_replay_does_not_publish_a_revision_again() -> None:
    events = media(12)
    late = (T0 + 8 * S, segment("cam", 1, T0 + 5 * S + 200 * MS, T0 + 5 * S + 700 * MS))
    first = run(Aligner(cfg()), [*events, late], T0 + 9 * S)
    assert sorted(w.rev for _, w in first if w.rev == 2) == [2, 2, 2]
    # the replay brings the segment back in event-time order (as the interleaver reads
    # it), or after its windows closed again: neither publishes anything again
    for replay in ([*events, (T0 + 5 * S + 700 * MS, late[1])], [*events, late]):
        b = restart(first, T0 + 9 * S)
        # (provisionals of the windows not final yet may come again, as after any restart)
        assert [w for _, w in run(b, replay, T0 + 9 * S) if w.final] == []
        assert b.stats["revisions"] == 0 and b.stats["revisions_restored"] > 0


def test_a_revision_lost_in_a_crash_is_published_by_the_replay() -> None:
    events = media(12)
    late = (T0 + 8 * S, segment("cam", 1, T0 + 5 * S + 200 * MS, T0 + 5 * S + 700 * MS))
    first = run(Aligner(cfg()), events, T0 + 8 * S)  # crashed before the revision went out
    b = restart(first, T0 + 8 * S)
    out = [w for _, w in run(b, [*events, late], T0 + 9 * S) if w.start_ns in published(first)]
    assert sorted((w.start_ns, w.rev) for w in out) == [
        (T0 + 9 * S // 2, 2), (T0 + 5 * S, 2), (T0 + 11 * S // 2, 2)]
    assert all(w.quality["closed_by"] == ClosedBy.REVISION for w in out)


def test_without_a_floor_the_replay_rebuilds_the_whole_horizon() -> None:
    """A worker killed before it recorded any floor had acked nothing for leaving the
    horizon: every published window of the last horizon comes back and stays revisable."""
    events = media(12)
    first = run(Aligner(cfg()), events, T0 + 8 * S)
    through = max(w.start_ns for _, w in first if w.final)
    b = Aligner(cfg(), resume={"cam": through},
                revisable={"cam": Revisable(None, published(first))})
    assert [w for _, w in run(b, events, T0 + 8 * S) if w.final] == []
    late = segment("cam", 1, T0 + 1 * S + 200 * MS, T0 + 1 * S + 300 * MS)
    assert b.add(late, T0 + 8 * S).status == OutcomeStatus.ACCEPTED
    assert [(w.start_ns, w.rev) for w in b.poll(T0 + 8 * S)] == [
        (T0 + S // 2, 2), (T0 + S, 2)]


def test_revisions_are_numbered_by_content_so_a_replay_reuses_no_rev() -> None:
    """Two late segments make rev 2 and rev 3; a worker killed before it recorded either
    finds both in its replay and publishes rev 3 with both: the content the crashed
    worker published as rev 3, and not a second rev 2."""
    events = media(12)
    l1 = (T0 + 8 * S, segment("cam", 1, T0 + 5 * S + 200 * MS, T0 + 5 * S + 400 * MS))
    l2 = (T0 + 8 * S + 500 * MS, segment("cam", 2, T0 + 5 * S + 600 * MS,
                                         T0 + 5 * S + 800 * MS))
    k = T0 + 5 * S
    first = run(Aligner(cfg()), [*events, l1, l2], T0 + 9 * S)
    revs = {w.rev: w for _, w in first if w.start_ns == k and w.final}
    assert sorted(revs) == [1, 2, 3]
    before = [(t, w) for t, w in first if t < T0 + 8 * S]  # progress as it was then
    through = max(w.start_ns for _, w in before if w.final)
    b = Aligner(cfg(), resume={"cam": through},
                revisable={"cam": Revisable(None, published(before))})
    # the replay reads them in event-time order, as the interleaver does
    replay = [*events, *((seg.end_ns, seg) for _, seg in (l1, l2))]
    again = [w for _, w in run(b, replay, T0 + 12 * S) if w.start_ns == k and w.final]
    assert [w.rev for w in again] == [3]
    assert again[0].text_ids == revs[3].text_ids and again[0].text == revs[3].text
    assert again[0].provenance == revs[3].provenance


def test_a_revision_orders_its_segments_as_a_window_built_at_once() -> None:
    """A late segment that starts before the window's own one: the revision lists the
    segments (and their sources) in time order, as the window built with every record
    would, also when both start before the window and are cut to its start."""
    from streamproc.wire.codec import Source

    def src(seq: int) -> Source:
        return Source("t.text", 0, seq)

    own = segment("cam", 1, T0 + 4 * S + 800 * MS, T0 + 5 * S + 300 * MS, source=src(1))
    late = segment("cam", 2, T0 + 4 * S + 600 * MS, T0 + 5 * S + 200 * MS, source=src(2))
    events = [*media(12), (T0 + 5 * S + 400 * MS, own), (T0 + 11 * S, late)]
    out = run(Aligner(cfg()), events, T0 + 12 * S)
    k = T0 + 5 * S
    (revised,) = [w for _, w in out if w.start_ns == k and w.rev == 2]
    # the oracle: every record in time order, the late one on time
    oracle = run(Aligner(cfg()), [*events[:-1], (T0 + 5 * S + 400 * MS, late)], T0 + 12 * S)
    (built,) = [w for _, w in oracle if w.start_ns == k and w.final]
    assert [s.seq for s in revised.segments] == [s.seq for s in built.segments] == [2, 1]
    assert revised.provenance["text"] == built.provenance["text"]
    assert revised.text_ids == built.text_ids
