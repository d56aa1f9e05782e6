"""Pure parts of the worker: ack-after-emit bookkeeping, the offset gate, the agent's
state fed hand-made events (records that must not stop it, idle clocks), the window
summary that predictions carry, the counters and the gauges. No broker needed (the broker
tests of the same behaviour are in tests/broker/test_worker.py and test_worker_faults.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest
from faust.types import TP

from streamproc.config import Settings
from streamproc.testing import ListOutput, consumed
from streamproc.wire.codec import (
    AudioChunk,
    KafkaRecord,
    VideoFrame,
    decode_dead_letter,
    encode,
)
from streamproc.worker.acks import AckLedger, OffsetGate
from streamproc.worker.core import Consumed, SkippedOffsets, WorkerCore
from streamproc.worker.metrics import ClientFaults, Counters, Metrics, update_gauges
from streamproc.worker.progress import ProgressWriter, StreamProgress

V, A, T = ("p.video", 0), ("p.audio", 0), ("p.text", 0)
MS = 1_000_000


# ---------------------------------------------------------------------------------------
# AckLedger
# ---------------------------------------------------------------------------------------


def test_record_waits_for_its_last_window_to_close_and_publish() -> None:
    led: AckLedger[str] = AckLedger()
    led.track(V, 10, "v10", "s", after_start=500)
    assert led.closed("s", 500, 0) == []  # window 500 not closed yet
    t500 = led.window_started("s", 500, 0)
    assert led.closed("s", 1000, 0) == []  # closed, but not published
    done = led.window_published(t500)
    assert done.acks == ["v10"] and done.progress == {"s": 500}
    assert led.held() == 0 and led.inflight() == 0


def test_acks_leave_in_offset_order_per_partition() -> None:
    """A later record whose window is done waits behind an earlier one still needed:
    faust would otherwise commit past the earlier one."""
    led: AckLedger[str] = AckLedger()
    led.track(V, 1, "old", "s", after_start=1000)
    led.track(V, 2, "new", "s", after_start=0)
    t0 = led.window_started("s", 0, 0)
    assert led.closed("s", 500, 0) == []
    assert led.window_published(t0).acks == []  # "new" is free, "old" is not: nothing yet
    t1 = led.window_started("s", 1000, 0)
    led.closed("s", 1500, 0)
    assert led.window_published(t1).acks == ["old", "new"]


def test_progress_only_advances_over_contiguous_published_windows() -> None:
    led: AckLedger[str] = AckLedger()
    led.track(A, 5, "a5", "s", after_start=1000)
    t0, t1 = led.window_started("s", 0, 0), led.window_started("s", 500, 0)
    t2 = led.window_started("s", 1000, 0)
    led.closed("s", 1500, 0)
    out = led.window_published(t2)  # confirmed first, but 0 and 500 are still in flight
    assert out.progress == {} and out.acks == []
    assert led.window_published(t1).progress == {}
    out = led.window_published(t0)
    assert out.progress == {"s": 1000} and out.acks == ["a5"]


def test_windows_that_close_empty_release_records_without_publishing() -> None:
    """The aligner never emits an empty window (e.g. its only frame was dropped by the
    buffer cap); closed_before moving past it frees the records."""
    led: AckLedger[str] = AckLedger()
    led.track(V, 1, "v1", "s", after_start=500)
    assert led.closed("s", 1000, 0) == ["v1"]
    assert led.published_through("s") is None  # nothing was published: no progress


def test_dead_letters_and_done_records_keep_their_turn() -> None:
    led: AckLedger[str] = AckLedger()
    e = led.track(T, 1, "bad")  # dead letter being sent
    assert led.track_done(T, 2, "dup") == []  # behind the unsent dead letter
    assert led.release(e) == ["bad", "dup"]
    assert led.track_done(T, 3, "dup2") == ["dup2"]


def test_revoked_partitions_are_forgotten_and_late_confirmations_ignored() -> None:
    led: AckLedger[str] = AckLedger()
    led.track(V, 1, "v1", "s", after_start=0)
    dl = led.track(A, 7, "a7")
    t = led.window_started("s", 0, 0)
    assert led.drop_partitions({0}) == 2
    assert led.held() == 0 and led.inflight() == 0
    assert led.window_published(t).acks == [] and led.release(dl) == []
    # the partition comes back: a new window with the same start is a new ticket
    led.track(V, 1, "v1-again", "s", after_start=0)
    t2 = led.window_started("s", 0, 0)
    assert led.window_published(t).acks == []  # the stale ticket still does nothing
    led.closed("s", 500, 0)
    assert led.window_published(t2).acks == ["v1-again"]


def test_misuse_is_refused() -> None:
    led: AckLedger[str] = AckLedger()
    led.track(V, 5, "x")
    with pytest.raises(ValueError, match="consumption order"):
        led.track(V, 5, "y")
    led.window_started("s", 500, 0)
    with pytest.raises(ValueError, match="start order"):
        led.window_started("s", 0, 0)
    with pytest.raises(ValueError, match="co-partitioned"):
        led.track(("p.video", 1), 1, "z", "s", after_start=0)


# ---------------------------------------------------------------------------------------
# OffsetGate
# ---------------------------------------------------------------------------------------


def _gate(start: int = 0, **kw) -> OffsetGate:
    g = OffsetGate(**kw)
    g.assign({V, A})
    g.start(V, start)
    g.start(A, start)
    return g


def test_gate_waits_for_the_assignment_to_resume() -> None:
    g = OffsetGate()
    assert g.admit(V, 0) == "unassigned"
    g.assign({V, A})
    assert g.admit(V, 5) == "rebalancing" and g.catching_up(0)  # leftovers before the resume
    g.start(V, 5)
    assert g.catching_up(0)  # audio not started yet
    g.start(A, 0)
    assert not g.catching_up(0)
    assert g.admit(V, 5) == "ok" and g.admit(A, 0) == "ok"
    assert g.admit(("p.video", 1), 0) == "unassigned"


def test_gate_processes_each_offset_once_in_order() -> None:
    """faust resumes a partition before it seeks to the committed offset: the same
    records can come twice; the first copy is processed, the second ignored."""
    g = _gate()
    assert [g.admit(V, o) for o in (0, 1, 2, 1, 2, 3)] == ["ok", "ok", "ok", "redelivered",
                                                         "redelivered", "ok"]
    assert g.next_offset(V) == 4


def test_gate_seeks_back_over_a_hole_and_blocks_the_partition_meanwhile() -> None:
    now = [0.0]
    g = _gate(clock=lambda: now[0])
    assert g.admit(V, 0) == "ok"
    assert g.admit(V, 2) == "hole"  # faust dropped offset 1
    assert g.catching_up(0) and g.seeks() == {V: 1} and g.seeks() == {}
    assert g.admit(V, 3) == "hole" and g.seeks() == {}  # asked once per SEEK_EVERY_S
    now[0] += OffsetGate.SEEK_EVERY_S
    assert g.admit(V, 4) == "hole" and g.seeks() == {V: 1} and g.tries(V) == 2
    assert [g.admit(V, o) for o in (1, 2, 3)] == ["ok"] * 3
    assert not g.catching_up(0) and g.tries(V) == 0


def test_gate_after_reassignment_starts_at_the_oldest_unacked_record() -> None:
    """10..12 held at revocation (7..9 acked, only 8 committed). Back on this worker
    faust hands over leftovers 13, 14, then 8, 9 again (already processed), then 10.."""
    g = _gate(start=7)
    for o in range(7, 13):
        assert g.admit(V, o) == "ok"
    g.revoke({V, A}, lambda tp: 10 if tp == V else None)
    assert g.admit(V, 13) == "unassigned"
    g.assign({V, A})
    g.start(V, 8)
    g.start(A, 0)
    assert [g.admit(V, o) for o in (13, 14)] == ["hole", "hole"]
    assert g.seeks() == {V: 10}
    assert [g.admit(V, o) for o in (8, 9)] == ["redelivered"] * 2
    # 8, 9 were acked before the revocation, which made the consumer forget those acks:
    # they are acked again, in their turn (else the committed offset stays at 8)
    # (A's 0..6 the same: processed before the revocation, nothing held)
    assert sorted(g.jumps()) == sorted([(V, 8, 10), (A, 0, 7)]) and g.jumps() == []
    assert [g.admit(V, o) for o in range(10, 16)] == ["ok"] * 6


def test_gate_reads_again_what_was_committed_but_never_acked() -> None:
    g = _gate(start=0)
    g.admit(V, 0)
    g.revoke({V}, lambda tp: 1)
    g.assign({V, A})
    g.start(V, 5)  # committed past offset 1 although it was never acked
    assert g.next_offset(V) == 1  # the agent seeks there


def test_gate_catches_up_with_the_backlog_before_idle_deadlines_count() -> None:
    g = OffsetGate()
    g.assign({V, A})
    g.start(V, 3, end=6)  # offsets 3, 4, 5 were written while nobody read them
    g.start(A, 0, end=0)  # nothing to read: a silent source must not hold the partition
    assert g.catching_up(0)
    assert [g.admit(V, o) for o in (3, 4)] == ["ok", "ok"] and g.catching_up(0)
    assert g.admit(V, 5) == "ok" and not g.catching_up(0)


def test_gate_skips_records_deleted_by_retention() -> None:
    g = _gate(start=0)
    assert g.admit(V, 40) == "hole"
    g.skip_to(V, 40)
    assert g.seeks() == {V: 40} and not g.catching_up(0)
    assert g.jumps() == [(V, 0, 40)]  # acked in their turn: the commit may pass them
    assert g.admit(V, 40) == "ok"


def test_gate_forgets_floors_of_partitions_that_moved_away() -> None:
    g = _gate()
    g.admit(V, 0)
    g.revoke({V, A}, lambda tp: 0)
    g.assign(set())  # went to another worker
    g.assign({V})  # and came back later: read from wherever the committed offset is
    g.start(V, 40)
    assert g.admit(V, 40) == "ok" and g.seeks() == {}


def test_gate_steps_over_offsets_the_fetcher_skipped() -> None:
    """Transaction markers and aborted records are never delivered (read_committed): the
    fetcher reports them and the gate steps over them, in order, without seeking."""
    g = _gate(start=0)
    assert g.admit(V, 0) == "ok"
    g.skipped(V, 1, 2)  # a commit marker
    g.skipped(V, 5, 9)  # an aborted transaction and its marker, not reached yet
    g.settle()
    assert g.jumps() == [(V, 1, 2)] and g.next_offset(V) == 2
    assert [g.admit(V, o) for o in (2, 3, 4)] == ["ok"] * 3
    assert g.admit(V, 9) == "ok" and g.seeks() == {} and g.jumps() == [(V, 5, 9)]
    g.skipped(V, 10, 11)  # a marker after the last record
    assert g.jumps() == [(V, 10, 11)] and g.next_offset(V) == 11
    g.skipped(V, 3, 6)  # behind the gate (a re-fetch): nothing to do
    g.skipped(("p.video", 3), 0, 4)  # not ours
    assert g.jumps() == [] and not g.catching_up(0)


def test_gate_without_a_skip_report_still_treats_a_gap_as_a_hole() -> None:
    g = _gate(start=0)
    g.skipped(V, 3, 4)
    assert g.admit(V, 0) == "ok" and g.admit(V, 2) == "hole"  # 1..2 never reported
    assert g.seeks() == {V: 1} and g.jumps() == []


def test_skipped_offsets_are_acked_in_their_turn() -> None:
    """An aborted transaction between two records is acked after the first record's
    window and before the second record: faust's commit never passes a held record."""
    led: AckLedger[object] = AckLedger()
    marks: list[tuple] = []
    led.track(V, 4, "v4", "s", after_start=0)
    skip = SkippedOffsets(V[0], V[1], 5, 9, lambda tp, a, b: marks.append((tp, a, b)))
    assert led.track_done(V, 5, skip) == []  # waits behind v4
    led.track(V, 9, "v9", "s", after_start=500)
    t0 = led.window_started("s", 0, 0)
    led.closed("s", 500, 0)
    acks = led.window_published(t0).acks
    assert acks == ["v4", skip]
    for a in acks:
        if isinstance(a, SkippedOffsets):
            a.ack()
    assert marks == [(V, 5, 9)] and skip.message.offset == 5


# ---------------------------------------------------------------------------------------
# the agent's state: records that must not stop the worker, idle clocks
# ---------------------------------------------------------------------------------------


def _state(fetch_state=None, clock=None):
    sent: list = []

    async def send(rec) -> None:
        sent.append(rec)

    def progress(sid: str, start: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    settings = Settings(topic_prefix="p", idle_deadline_video_ms=1000,
                        idle_deadline_audio_ms=1000, expected_modalities="video,audio")
    out = ListOutput()
    st = WorkerCore(settings, submit=out.submit, send_dead_letter=send,
                    record_progress=progress, counters=Counters(),
                    crash=lambda e: (_ for _ in ()).throw(e), clock=clock or time.time_ns,
                    fetch_state=fetch_state)
    tps = {(settings.topic(m), p) for m in ("video", "audio", "text") for p in range(4)}
    st.on_assigned(tps)
    st.on_resume(dict.fromkeys(tps, 0), {})
    return st, sent, out


def _frame_event(sid: str, seq: int, ts: int, partition: int, offset: int) -> Consumed:
    img = np.zeros((16, 16, 3), np.uint8)
    return consumed(VideoFrame.from_image(sid, ts, seq, img), "p.video", partition, offset)


def test_a_stream_on_a_second_partition_is_dead_lettered_and_the_worker_goes_on() -> None:
    async def run() -> None:
        st, sent, _ = _state()
        now = time.time_ns()
        st.on_record(_frame_event("cam", 0, now, 1, 0))
        st.on_record(_frame_event("cam", 1, now + 100 * MS, 2, 0))  # another partition
        st.on_record(_frame_event("cam", 2, now + 200 * MS, 1, 1))
        await asyncio.sleep(0)
        assert len(sent) == 1 and st.counters.get("dead_letters", kind="partition") == 1
        dead = decode_dead_letter(sent[0])
        assert dead.kind == "partition" and "seen on partitions 1 and 2" in dead.reason
        assert "partitioner" in dead.reason
        st.on_revoked([("p.video", 1), ("p.audio", 1), ("p.text", 1)])
        st.on_record(_frame_event("cam", 3, now + 300 * MS, 2, 1))  # partition 1 gone: fine
        assert st.counters.get("dead_letters") == 1

    asyncio.run(run())


def test_a_header_name_that_is_not_utf8_is_dead_lettered_readably() -> None:
    async def run() -> None:
        st, sent, _ = _state()
        ev = _frame_event("cam", 0, time.time_ns(), 0, 0)
        bad = b"\xff\xfe".decode("utf-8", "surrogateescape")  # as the lenient fetcher reads it
        rec = ev.record
        ev = consumed(KafkaRecord(rec.key, rec.value, (*rec.headers, (bad, b"v")),
                                  rec.timestamp_ms), ev.topic, ev.partition, ev.offset)
        st.on_record(ev)
        await asyncio.sleep(0)
        dead = decode_dead_letter(sent[0])
        assert dead.kind == "decode" and r"b'\xff\xfe'" in dead.reason
        assert ("\ufffd\ufffd", b"v") in dead.original.headers  # sendable, as Java reads it

    asyncio.run(run())


def test_idle_clock_stands_still_while_records_wait_and_while_nothing_is_fetched() -> None:
    """Audio goes silent; video keeps coming. Idle deadlines count only time in which the
    partition's inputs were fetched and processed to their end."""
    now = [time.time_ns()]
    fetch = {"end": 1, "at": now[0]}

    def fetch_state(tp):
        if tp[1] != 0:
            return None, None
        ends = {"p.video": fetch["end"], "p.audio": 1, "p.text": 0}
        return ends[tp[0]], fetch["at"]

    async def run() -> None:
        st, _, out = _state(fetch_state, clock=lambda: now[0])
        windows = out.windows

        def ticks(ms: int, fetching: bool = True) -> None:
            for _ in range(ms // 100):  # the worker's timer
                now[0] += 100 * MS
                if fetching:
                    fetch["at"] = now[0]
                st.on_tick()

        t0 = now[0]
        audio = encode(AudioChunk("cam", t0, 0, b"\0\0" * 1600, "s16le", 16000, 1))
        st.on_record(consumed(audio, "p.audio", 0, 0))
        st.on_record(_frame_event("cam", 0, t0, 0, 0))
        fetch["end"] = 2  # a video record fetched, not processed yet (faust's buffers)
        ticks(3000)
        assert windows == []
        ticks(20_000, fetching=False)  # broker away: no fetch completes
        assert windows == []
        ticks(100)
        st.on_record(_frame_event("cam", 1, t0 + 100 * MS, 0, 1))
        ticks(500)
        assert windows == []  # the stall does not count: audio is not idle yet
        # silent past its 1 s deadline, the audio watermark moves on with the clock; the
        # first window ends at most 0.9 s after the chunk, lateness 250 ms: 2.15 s at most
        ticks(1700)
        assert windows and windows[0].quality["closed_by"] == "deadline"

    asyncio.run(run())


def test_client_errors_are_logged_once_summarised_then_recovered(caplog) -> None:
    now = [0.0]
    faults = ClientFaults(summary_s=10, quiet_s=5, clock=lambda: now[0])
    logger = logging.getLogger("aiokafka.test_faults")
    logger.addFilter(faults)
    # its own level: below debug the CLI keeps aiokafka's loggers at WARNING
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger=logger.name):
        for i in range(3000):  # a broker away for 30 s: 100 lines a second
            now[0] = i / 100
            logger.error("Unable connect to node with id %d", 1)
            faults.tick()
        now[0] += 6
        faults.tick()
        logger.info("routine")  # below warning: untouched
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 + 2 + 1 + 1, lines
    assert "Unable connect to node with id 1 (Kafka client errors are summarised" in lines[0]
    assert "Kafka client errors go on" in lines[1] and "x Unable connect to node" in lines[1]
    assert "Kafka client errors stopped after 30 s (2999 lines summarised)" in lines[3]


def test_gauges_skip_partitions_whose_end_is_not_known_yet() -> None:
    """Right after an assignment the consumer has no highwater for a partition: the lag
    gauge leaves it alone instead of failing (which took a worker down)."""
    settings = Settings(topic_prefix="p")

    class _Consumer:
        def __init__(self) -> None:
            self._committed_offset = {TP("p.video", 0): 3, TP("p.audio", 0): None}

        def assignment(self):
            return {TP("p.video", 0), TP("p.audio", 0), TP("other", 0)}

    metrics = Metrics()
    ends = {("p.video", 0): 10, ("p.audio", 0): None}
    update_gauges(_Consumer(), lambda tp: (ends[tp], None), settings, metrics, {"frames": 2})
    assert metrics.consumer_lag.labels("p.video", "0")._value.get() == 7
    assert metrics.buffered.labels("frames")._value.get() == 2


# ---------------------------------------------------------------------------------------
# counters
# ---------------------------------------------------------------------------------------


def test_counters_by_label_and_in_total() -> None:
    c = Counters()
    c.inc("events_in", modality="video")
    c.inc("events_in", 2, modality="audio")
    c.inc("windows_emitted")
    assert c.get("events_in") == 3 and c.get("events_in", modality="audio") == 2
    assert c.snapshot() == {"events_in{modality=audio}": 2, "events_in{modality=video}": 1,
                            "windows_emitted": 1}
    assert ("events_in", {"modality": "video"}, 1) in c.items()


# ---------------------------------------------------------------------------------------
# progress writes
# ---------------------------------------------------------------------------------------


def test_progress_is_written_in_order_coalesced_and_awaited() -> None:
    """Concurrent sends could reach the compacted topic out of order (the last record
    wins there): one send at a time per stream, newest value last."""
    sent: list[tuple[str, int]] = []

    async def send(sid: str, value: int) -> None:
        await asyncio.sleep(0.01)
        sent.append((sid, value))

    async def main() -> None:
        w = ProgressWriter(send)
        f1 = w.record("a", 10)
        await asyncio.sleep(0.001)  # the send of 10 is under way
        f2, f3 = w.record("a", 20), w.record("a", 30)
        g = w.record("b", 5)
        await f1
        assert [v for s, v in sent if s == "a"] == [10] and not f3.done()  # 20, 30 wait
        await asyncio.gather(f2, f3, g)
        assert [v for s, v in sent if s == "a"] == [10, 30]  # 20 coalesced into 30
        assert ("b", 5) in sent
        assert w.record("a", 25).done()  # already durable

    asyncio.run(main())


def test_progress_writer_forgets_an_expired_stream_but_not_during_a_write() -> None:
    release = asyncio.Event()

    async def send(sid: str, value: int) -> None:
        await release.wait()

    async def main() -> None:
        w = ProgressWriter(send)
        fut = w.record("a", 10)
        await asyncio.sleep(0)
        w.forget("a")  # a write is under way: forgotten once it ends
        assert w._durable == {} and w._wanted == {"a": 10}
        release.set()
        await fut
        assert w._durable == {} and w._wanted == {}
        assert not w.record("a", 10).done()  # unknown again: written anew
        await asyncio.sleep(0)
        w.forget("b")
        assert "a" in w._wanted

    asyncio.run(main())


def test_progress_send_failure_fails_the_waiters() -> None:
    async def send(sid: str, value: int) -> None:
        raise RuntimeError("broker said no")

    async def main() -> None:
        fut = ProgressWriter(send).record("a", 1)
        with pytest.raises(RuntimeError, match="broker said no"):
            await fut

    asyncio.run(main())


@pytest.mark.parametrize("raw", [
    b"", b"abc", b"1.5", b"{}", b'{"through": 1}', b'{"through": 1, "floor": null, "revs": []}',
    b'{"through": 1, "floor": null, "revs": null}', b'{"through": 1e400, "floor": 1, "revs": {}}',
    b'{"through": Infinity, "floor": 1, "revs": {}}', b'{"through": true, "floor": 1, "revs": {}}',
    b'{"through": 1, "floor": 1, "revs": {"x": [1, [2]]}}',
    b'{"through": 1, "floor": 1, "revs": {"5": [1, 2]}}', b"[" * 100_000, b"\xff\xfe",
])
def test_a_progress_value_of_another_shape_is_a_value_error(raw: bytes) -> None:
    """read_progress skips what it cannot read: anything else would stop every resume."""
    with pytest.raises(ValueError):
        StreamProgress.decode(raw)


def test_progress_values_round_trip() -> None:
    for p in (StreamProgress(5), StreamProgress(None, True),
              StreamProgress(7, True, 3, {4: (2, frozenset({1, 2**62}))})):
        assert StreamProgress.decode(p.encode()) == p
    assert StreamProgress(5).encode() == b"5"  # as workers without revisions wrote it
