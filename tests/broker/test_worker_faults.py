"""Records and faults that must never stop the worker, against a real broker: a stream
whose records land on two partitions (a librdkafka producer on its default partitioner),
a header name that is not UTF-8, transactions (committed and aborted) written into the
input topics by another application, and a broker that goes away mid-stream.

Each test runs real ``streamproc worker`` subprocesses and the same paced workload and
oracle as tests/broker/test_worker.py (worker_helpers).
"""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer as ConfluentProducer
from worker_helpers import (
    Planned,
    RawName,
    WorkerProc,
    assert_windows_equal,
    committed_and_ends,
    confluent_producer,
    oracle,
    partition_of,
    produce,
    read_all,
    read_predictions,
    read_to_end,
    send_confluent,
    start_time,
    stream_plan,
    worker_settings,
)

from streamproc.config import Settings
from streamproc.dev.localkafka import LocalBroker
from streamproc.testing import MS, S
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _misplaced_id(n: int) -> str:
    """A stream id that librdkafka's default partitioner (CRC32) puts on another partition
    than Kafka's default (murmur2)."""
    i = 0
    while (zlib.crc32(f"lib{i}".encode()) % n) == partition_of(f"lib{i}", n):
        i += 1
    return f"lib{i}"


def _letters(settings: Settings, n: int, timeout: float = 30) -> dict[tuple, wire.DeadLetter]:
    msgs = read_all(settings, settings.topic("deadletter"), lambda m: len(m) >= n, timeout)
    out = {}
    for m in msgs:
        d = wire.decode_dead_letter(wire.KafkaRecord.from_client(m))
        out[(d.source.topic, d.source.partition, d.source.offset)] = d
    assert len(out) == len(msgs)  # each dead-lettered once
    return out


def _bad_name_copy(p: Planned, seq: int) -> wire.KafkaRecord:
    """A well-formed frame (a new seq) with one more header whose name is ff fe."""
    frame = dataclasses.replace(p.media, seq=seq)
    rec = wire.encode(frame)
    return wire.KafkaRecord(rec.key, rec.value, (*rec.headers, (RawName(b"\xff\xfe"), b"v")),
                            rec.timestamp_ms)


def test_misplaced_stream_and_bad_header_name_are_dead_lettered(kafka_bootstrap: str,
                                                                tmp_path: Path) -> None:
    """One stream's transcripts go through librdkafka (default partitioner: another
    partition than its video and audio), and a frame carries a header named ff fe. Both
    become dead letters with readable reasons (kind `partition` naming the stream, both
    partitions and the partitioner; kind `decode` naming the bytes); every window of
    every stream comes out once, as the oracle says. A restarted worker that finds more
    such records unacked dead-letters them too and keeps serving."""
    settings = worker_settings(kafka_bootstrap, tmp_path)
    create_topics(settings)
    lib = _misplaced_id(settings.partitions)
    confluent = confluent_producer(settings)  # librdkafka's default partitioner: consistent_random
    first = WorkerProc(settings, tmp_path / "first.log")
    workers = [first]
    try:
        first.wait_for(r"Worker ready")
        t0 = start_time()
        rng = np.random.default_rng(7)
        plan = [p for sid in ("cam-a", "cam-b", lib) for p in stream_plan(sid, t0, 4.0, rng)]
        for p in plan:  # the stream's transcripts from 1.5 s on come from librdkafka
            if p.rec.key == lib.encode() and p.modality == "text" \
                    and p.media.start_ns >= t0 + 1500 * MS:
                p.role = "partition"
        frame = next(p for p in plan if p.rec.key == b"cam-a" and p.modality == "video"
                     and p.media.ts_ns >= t0 + 2000 * MS)
        plan.append(Planned(frame.send_at_ns + 10 * MS, "video", _bad_name_copy(frame, 9001),
                            None, "badname"))
        produce(settings, plan, confluent=confluent, via_confluent={"partition"})
        home = partition_of(lib, settings.partitions)
        moved = [p for p in plan if p.role == "partition"]
        assert moved and all(p.source.partition != home for p in moved)

        expected = oracle(settings, plan)
        preds = read_predictions(settings, set(expected))
        by_key = assert_windows_equal(preds, expected, {"cam-a", "cam-b", lib})
        assert all(len(copies) == 1 for copies in by_key.values())
        bad = [p for p in plan if p.role in ("partition", "badname")]
        letters = _letters(settings, len(bad))
        assert set(letters) == {(p.source.topic, p.source.partition, p.source.offset)
                                for p in bad}
        for p in bad:
            d = letters[(p.source.topic, p.source.partition, p.source.offset)]
            if p.role == "partition":
                assert d.kind == "partition"
                assert f"stream {lib!r} seen on partitions {home} and {p.source.partition}" \
                    in d.reason
                assert "partitioner" in d.reason and "murmur2_random" in d.reason
                assert d.original.value == p.rec.value
            else:
                assert d.kind == "decode"
                assert r"b'\xff\xfe'" in d.reason and "not UTF-8" in d.reason
                # the name as Java clients read it: replacement characters
                assert ("\ufffd\ufffd", b"v") in d.original.headers
        assert first.stop() == 0, first.log()[-3000:]

        # more of the same while no worker runs: the next one meets them unacked at once;
        # it keeps whichever partition of the stream it reads first
        tail = t0 + 6 * S
        lib_frame = dataclasses.replace(frame.media, stream_id=lib, seq=500, ts_ns=tail)
        lib_seg = wire.TranscriptSegment(lib, 500, "late words", tail, tail + 100 * MS)
        later = [Planned(0, "video", wire.encode(lib_frame), lib_frame, "window"),
                 Planned(0, "text", wire.encode(lib_seg), lib_seg, "partition"),
                 Planned(0, "video", _bad_name_copy(frame, 9002), None, "badname")]
        produce(settings, later, confluent=confluent, via_confluent={"partition"})
        assert later[1].source.partition != later[0].source.partition
        second = WorkerProc(settings, tmp_path / "second.log")
        workers.append(second)
        second.wait_for(r"Worker ready")
        letters = _letters(settings, len(bad) + 2)
        new = {k: d for k, d in letters.items()
               if k in {(p.source.topic, p.source.partition, p.source.offset) for p in later}}
        assert sorted(d.kind for d in new.values()) == ["decode", "partition"]
        time.sleep(2)
        assert second.proc.poll() is None, second.log()[-3000:]
        assert second.stop() == 0
        assert "Traceback" not in first.log() + second.log()
    finally:
        confluent.flush(5)
        for w in workers:
            w.abandon()


def _same_partition_id(prefix: str, partition: int, n: int) -> str:
    i = 0
    while partition_of(f"{prefix}{i}", n) != partition:
        i += 1
    return f"{prefix}{i}"


def _transactions(settings: Settings, txn: ConfluentProducer, partition: int, ok: str,
                  ghost: str, t: int, rng: np.random.Generator) -> list[Planned]:
    """Into every input topic's ``partition``: one committed transaction holding 0.5 s of
    stream ``ok``, then one aborted transaction holding 0.5 s of stream ``ghost``."""
    committed = sorted(stream_plan(ok, t, 0.5, rng), key=lambda p: p.send_at_ns)
    txn.begin_transaction()
    for p in committed:
        send_confluent(txn, settings, p)
    txn.commit_transaction(30)
    txn.begin_transaction()
    for p in stream_plan(ghost, t, 0.5, rng):
        send_confluent(txn, settings, p, partition=partition)
    txn.abort_transaction(30)
    return committed


def test_transactions_in_the_input_topics_are_read_committed(kafka_bootstrap: str,
                                                             tmp_path: Path) -> None:
    """Another application writes a committed and an aborted transaction into every input
    topic, on the partition of a live stream. The live stream's windows all come out once,
    the committed stream's windows come out, aborted data never appears (no window, no
    dead letter), no offset is taken for a hole; the same after a restart."""
    settings = worker_settings(kafka_bootstrap, tmp_path)
    create_topics(settings)
    part = 2
    live, ok, ghost = (_same_partition_id(x, part, settings.partitions)
                       for x in ("live", "txn-ok", "ghost"))
    txn = confluent_producer(settings,
                             **{"transactional.id": f"other-app-{uuid.uuid4().hex[:8]}",
                                "partitioner": "murmur2_random"})
    txn.init_transactions(30)
    rng = np.random.default_rng(11)
    workers: list[WorkerProc] = []
    records: list[Planned] = []
    streams = {live}
    try:
        for run in ("first", "second"):
            worker = WorkerProc(settings, tmp_path / f"{run}.log")
            workers.append(worker)
            worker.wait_for(r"Worker ready")
            t0 = start_time()
            plan = stream_plan(live, t0, 3.0, rng)
            ok = _same_partition_id(f"txn-ok-{run}-", part, settings.partitions)
            streams.add(ok)
            sent: list[Planned] = []
            # the transactions (a flush per send, a commit, an abort) go out beside the
            # live stream, not in its send loop: a stall there would make it idle
            other_app: list[threading.Thread] = []

            def at(send_at: int, t0: int = t0, ok: str = ok, sent: list = sent,
                   other_app: list = other_app) -> None:
                if send_at >= t0 + 1000 * MS and not other_app:
                    at_ns = time.time_ns() - 600 * MS
                    other_app.append(threading.Thread(target=lambda: sent.extend(
                        _transactions(settings, txn, part, ok, ghost, at_ns, rng))))
                    other_app[0].start()

            produce(settings, plan, at)
            other_app[0].join(90)
            assert sent and {p.source.partition for p in sent} == {part}
            records += plan + sent
            expected = oracle(settings, records)
            preds = read_predictions(settings, set(expected))
            by_key = assert_windows_equal(preds, expected, streams)
            assert all(len(c) == 1 for c in by_key.values())
            assert not [p for p in preds if p.key[0] == ghost]
            assert worker.stop() == 0, worker.log()[-3000:]
            log = worker.log()
            assert re.search(r"final status: .* ignored=0 ", log), log[-2000:]
            assert "seeking" not in log and "Traceback" not in log
        dead = read_to_end(settings, settings.topic("deadletter"))
        assert dead == []
        # the group committed past the transactions' markers and aborted records: a next
        # worker starts at the log end, nothing to re-read
        committed, ends = committed_and_ends(settings, [part])
        assert committed == ends
    finally:
        for w in workers:
            w.abandon()


def test_broker_outages_make_no_record_late_and_are_logged_briefly(tmp_path: Path) -> None:
    """A broker of our own (1) stops answering (SIGSTOP) for 15 s mid-stream while the
    producers keep their records, then goes on (SIGCONT) and they deliver the backlog: the
    idle deadlines must not run while nothing can be read, so no valid record becomes a
    late dead letter and every window equals the oracle's (full frames, audio, text);
    (2) is stopped and started again (connections refused meanwhile): the worker logs the
    client's first error, a summary every 10 s and the recovery instead of every failed
    connection, and serves streams again afterwards."""
    broker = LocalBroker(tmp_path / "kafka").start()
    worker = None
    try:
        # a session outlasting the 15 s pause: else the broker, resumed, may expire the
        # worker's membership first, and the rebalance's resume (not the stall) is tested
        settings = worker_settings(broker.bootstrap, tmp_path).replace(
            session_timeout_ms=30_000)
        create_topics(settings)
        worker = WorkerProc(settings, tmp_path / "worker.log")
        worker.wait_for(r"Worker ready")
        t0 = start_time()
        rng = np.random.default_rng(13)
        plan = [p for sid in ("cam-x", "cam-y") for p in stream_plan(sid, t0, 19.0, rng)]
        paused: list[bool] = []

        def at(send_at: int) -> None:
            if send_at >= t0 + 2 * S and not paused:
                paused.append(True)
                broker.proc.send_signal(signal.SIGSTOP)
                threading.Timer(15, broker.proc.send_signal, (signal.SIGCONT,)).start()

        produce(settings, plan, at)
        expected = oracle(settings, plan)
        preds = read_predictions(settings, set(expected), timeout=60)
        assert_windows_equal(preds, expected, {"cam-x", "cam-y"})
        assert read_to_end(settings, settings.topic("deadletter")) == []
        assert "nothing could be read for 1" in worker.log()  # ~15 s not counted as idle

        began = time.monotonic()
        broker.stop()
        time.sleep(3)
        broker.start()
        away = time.monotonic() - began
        worker.wait_for(r"Kafka client errors stopped after", timeout=60)
        t1 = start_time()
        after = stream_plan("cam-z", t1, 2.0, rng)
        produce(settings, after)
        expected = oracle(settings, plan + after)
        preds = read_predictions(settings, set(expected), timeout=60)
        assert_windows_equal(preds, expected, {"cam-x", "cam-y", "cam-z"})
        log = worker.log()
        noisy = [ln for ln in log.splitlines()
                 if re.search(r"\[(ERROR|WARNING)\]", ln) and "NO MODEL" not in ln]
        print(f"broker away {away:.0f} s: {len(noisy)} error/warning lines")
        assert "(Kafka client errors are summarised every 10 s until they stop)" in log
        # the first error, a summary per 10 s, the recovery; a few of the SIGSTOP pause
        assert len(noisy) <= 2 + away / 10 + 8, "\n".join(noisy[:40])
        assert worker.stop() == 0, log[-3000:]
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGCONT)
        if worker is not None:
            worker.abandon()
        broker.stop()
