"""The fetch loop's interleaver: a partition's topics reach the core in event-time order
whatever each fetch held, with bounded holds."""

from __future__ import annotations

from types import SimpleNamespace

from streamproc.testing import ManualClock
from streamproc.worker.interleave import AHEAD_MS, MAX_HOLD_NS, Interleaver

V, A, T = "p.video", "p.audio", "p.text"


def recs(topic: str, partition: int, stamps: list[int], first: int = 0) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic=topic, partition=partition, offset=first + i, timestamp=ts)
            for i, ts in enumerate(stamps)]


def keys(out: list[SimpleNamespace]) -> list[tuple[str, int, int]]:
    return [(r.topic, r.partition, r.offset) for r in out]


def caught_up(tp: tuple[str, int]) -> bool:
    return False


def test_records_go_merged_by_time_per_partition_each_topic_in_offset_order() -> None:
    il = Interleaver((V, A, T))
    video, audio = recs(V, 0, [0, 66, 133, 200]), recs(A, 0, [0, 100, 200])
    other = recs(V, 1, [50, 10])  # its own timestamps out of order: offsets still rule
    il.put((V, 0), video)
    il.put((A, 0), audio)
    il.put((V, 1), other)
    out = il.take(caught_up)
    assert sorted(keys(out)) == sorted(keys(video + audio + other))
    part0 = [r for r in out if r.partition == 0]
    assert [r.timestamp for r in part0] == sorted(r.timestamp for r in video + audio)
    assert keys([r for r in out if r.partition == 1]) == keys(other)
    assert il.held() == set()


def test_what_runs_ahead_of_a_sibling_with_more_to_read_waits_for_it() -> None:
    clock = ManualClock(0)
    il = Interleaver((V, A, T), clock=clock)
    il.put((A, 0), recs(A, 0, list(range(0, 60_000, 100))))  # a minute of audio
    il.put((V, 0), recs(V, 0, list(range(0, 3_000, 66))))  # three seconds of video
    behind = {(V, 0), (T, 0)}  # video and text have more in their logs
    out = il.take(lambda tp: tp in behind)
    # text has released nothing yet: nothing may go before it shows where it is
    assert out == [] and il.held() == {(A, 0), (V, 0)}
    il.put((T, 0), recs(T, 0, [0, 2000, 3500]))
    out = il.take(lambda tp: tp in behind)
    last_video = max(r.timestamp for r in out if r.topic == V)
    assert last_video == 2970
    # the audio stops AHEAD_MS past where the video and text stopped
    assert max(r.timestamp for r in out if r.topic == A) <= last_video + AHEAD_MS
    assert il.held() == {(A, 0)}
    il.put((V, 0), recs(V, 0, list(range(3_000, 6_000, 66)), first=46))
    out = il.take(lambda tp: tp in behind)
    assert max(r.timestamp for r in out if r.topic == A) <= 5_970 + AHEAD_MS
    behind.clear()  # video and text are read to their ends (live, or dead sources)
    out = il.take(lambda tp: tp in behind)
    assert out[-1].timestamp == 59_900 and il.held() == set()


def test_a_sibling_that_never_delivers_holds_the_others_for_a_bounded_time() -> None:
    clock = ManualClock(0)
    il = Interleaver((V, A, T), clock=clock)
    il.put((A, 0), recs(A, 0, [0, 100, 200]))
    assert il.take(lambda tp: tp == (V, 0)) == [] and il.held() == {(A, 0)}
    clock.now += MAX_HOLD_NS - 1
    assert il.take(lambda tp: tp == (V, 0)) == []
    clock.now += 1
    assert len(il.take(lambda tp: tp == (V, 0))) == 3 and il.held() == set()


def test_drop_forgets_what_was_pending() -> None:
    il = Interleaver((V, A, T))
    il.put((A, 0), recs(A, 0, [0, 100]))
    il.put((A, 1), recs(A, 1, [0, 100]))
    il.drop([(A, 0)])
    assert keys(il.take(caught_up)) == [(A, 1, 0), (A, 1, 1)]
    il.put((A, 1), recs(A, 1, [200], first=2))
    il.drop()
    assert il.take(caught_up) == [] and il.held() == set()


def test_a_sibling_read_steadily_holds_the_others_longer_than_the_hold_limit() -> None:
    """The hold limit is on time without progress: a minute of audio waits while its
    video's backlog is read fetch after fetch, however long that takes."""
    clock = ManualClock(0)
    il = Interleaver((V, A, T), clock=clock)
    il.put((A, 0), recs(A, 0, list(range(0, 60_000, 100))))
    behind = {(V, 0)}
    video_at, offset = 0, 0
    for _ in range(20):  # 20 fetches of 1 s of video, 0.5 s of wall time apart: 10 s
        stamps = list(range(video_at, video_at + 1000, 66))
        il.put((V, 0), recs(V, 0, stamps, first=offset))
        offset += len(stamps)
        video_at += 1000
        out = il.take(lambda tp: tp in behind)
        assert max(r.timestamp for r in out if r.topic == A) <= stamps[-1] + AHEAD_MS
        clock.now += MAX_HOLD_NS // 4
    assert il.held() == {(A, 0)} and il.is_held((A, 0)) and not il.is_held((V, 0))
