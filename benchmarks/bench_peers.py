"""streamproc's align-only worker against Quix Streams, Bytewax and a bare consume loop.

One job, four implementations, the same broker and the same bytes. A W1 backlog
(benchmarks/README.md; bench_agent.produce_backlog) is read from the three input topics;
each record's wire headers are decoded (docs/design.md §2), records are grouped by stream
into W / H hopping event-time windows (streamproc's defaults, 1 s / 0.5 s) that hold each
window's video, audio and text records, and one small JSON record per window is published
to PREFIX.predictions. Rounds alternate between, each in a fresh child process:

- ``streamproc``: the align-only worker (``create_app`` with no predictor, through
  bench_agent.run_agent), default window and lateness settings, final predictions only;
- ``quix``: Quix Streams 3.x: the three topics concatenated (Quix then reads co-partitioned
  topics in timestamp order), a timestamp extractor reading ``sp-ts``,
  ``hopping_window(...).collect().final()``;
- ``bytewax``: Bytewax 0.21: ``collect_window`` with an ``EventClock`` and a
  ``SlidingWindower``; its input merges each partition's three topics by timestamp (what
  Quix does inside; Bytewax's own KafkaSource reads every topic-partition on its own, and
  one clock per stream then finds most video and audio late: ``bytewax-kafkasource``,
  only with ``--only``, shows it);
- ``bare``: a confluent-kafka consume loop that only reads each record's headers: the floor;
- ``core-librdkafka`` (only with ``--only``): streamproc's worker core without faust, fed by
  a confluent-kafka consumer in a thread and publishing with its producer: what a
  librdkafka fetch path would cost (no consumer group or commits, so not a worker).

The peers have one event clock per stream where streamproc has one per stream and
modality, so their grace is streamproc's largest lateness (the transcripts', 3 s): windows
close about as long after their end in all three. A span (an audio chunk, a transcript
segment) belongs to every window it overlaps, as in streamproc; the peers' windows place a
record by one timestamp, so a span goes in once per hop it touches and windows count
distinct records. After the backlog each stream gets one empty transcript segment 10 s
later (the live data that would follow): it closes the peers' last windows, which
otherwise wait for a later record forever; its own windows are left out of the check.

Every implementation's windows are checked against the windows computed from the records
themselves (every record in every window it overlaps: streamproc's AlignConfig): the same
(stream, window start) set and the same record counts per modality.

Per run: events/s from the first record to the last one handled (start-up excluded; for
the peers, the last window written too), process CPU per event over the same span
(the Kafka clients' threads included), the child's peak RSS, and within each round
streamproc's events/s ÷ each one's.

    .venv-bench/bin/python benchmarks/bench_peers.py [--seconds 60] [--rounds 3] [--write-docs]
                                                     [--only streamproc,bytewax] [--profile F]

``make bench-env`` makes .venv-bench (the runtime packages plus the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamproc.align.aligner import AlignConfig
from streamproc.config import MODALITIES, Settings
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agent import keep_backlog, peak_rss_kb, produce_backlog, run_agent, write_section
from bench_align import w1_records
from bench_producer import machine

IMPLEMENTATIONS = ("streamproc", "quix", "bytewax", "bare")
# Only with --only: Bytewax fed by its own KafkaSource, which reads each topic-partition on
# its own, to show what one event clock per stream makes of that (many records late).
EXTRA = ("bytewax-kafkasource", "core-librdkafka")
MS = 1_000_000
# End marks are this far after the backlog's last event time: past every window of it plus
# the peers' grace.
END_MARK_AFTER_NS = 10 * wire.NS_PER_S
# Records per confluent-kafka consume() of the bare loop and of Bytewax's input, and how
# long one waits for that many: a short wait, so that neither idles while records are there.
BATCH = 500
POLL_S = 0.05
# After its last record streamproc runs on until every window is published (idle deadlines
# close the last ones, 1 s of wall clock later), or nothing new came for this long.
SETTLE_S = 20.0
RUN_TIMEOUT_S = 300

#: (modality, seq, start_ns, end_ns, at_ns, payload): one record as a peer's window holds
#: it; ``at_ns`` is the event time it is placed at (a span's copies differ only there).
Item = tuple[str, int, int, int, int, bytes]
#: (stream_id, window_start_ns) -> records per modality (video, audio, text)
Windows = dict[tuple[str, int], tuple[int, int, int]]


# ---------------------------------------------------------------------------------------
# the job's pure parts, shared by every peer
# ---------------------------------------------------------------------------------------


def parse_record(key: bytes | str | None, headers: Iterable[tuple[str, bytes]],
                 value: bytes) -> tuple[str, str, int, int, int]:
    """(stream_id, modality, seq, start_ns, end_ns) from a wire-format v1 record's key,
    headers and value (a transcript's end is in its JSON value, an audio chunk's follows
    from its length). No payload is checked: the peers only read headers."""
    h = dict(headers)
    if h.get("sp-v") != b"1":
        raise ValueError(f"not wire format v1: sp-v={h.get('sp-v')!r}")
    mod = h["sp-mod"].decode("ascii")
    start, seq = int(h["sp-ts"]), int(h["sp-seq"])
    if mod == "video":
        end = start
    elif mod == "audio":
        frame = wire.AUDIO_FORMATS[h["sp-fmt"].decode("ascii")].itemsize * int(h["sp-ch"])
        end = start + wire.samples_to_ns(len(value) // frame, int(h["sp-sr"]))
    elif mod == "text":
        end = int(json.loads(value)["end_ns"])
    else:
        raise ValueError(f"unknown modality {mod!r}")
    sid = key.decode("utf-8") if isinstance(key, bytes) else str(key)
    return sid, mod, seq, start, end


def hop_copies(start_ns: int, end_ns: int, hop_ns: int) -> list[int]:
    """Event times at which a record spanning ``[start_ns, end_ns)`` (a point when
    ``end_ns <= start_ns``) is placed so that hopping windows that place records by one
    timestamp give it to every window it overlaps: one copy per hop it touches. Exact when
    the window length is a multiple of the hop; a window may get two copies of a record."""
    if end_ns <= start_ns:
        return [start_ns]
    first, last = start_ns // hop_ns, (end_ns - 1) // hop_ns
    return [start_ns, *(k * hop_ns for k in range(first + 1, last + 1))]


def items_of(key: bytes | str | None, headers: Iterable[tuple[str, bytes]], value: bytes,
             hop_ns: int) -> tuple[str, list[Item]]:
    """A Kafka record as the items a peer's windows take, and its stream."""
    sid, mod, seq, start, end = parse_record(key, headers, value)
    return sid, [(mod, seq, start, end, at, value) for at in hop_copies(start, end, hop_ns)]


def window_json(stream_id: str, start_ns: int, window_ns: int,
                items: Iterable[Item]) -> dict[str, Any]:
    """A peer's output record for one window: distinct records per modality."""
    distinct = Counter(mod for mod, _seq in {(it[0], it[1]) for it in items})
    return {"stream_id": stream_id, "window_start_ns": start_ns,
            "window_end_ns": start_ns + window_ns,
            "records": {m: distinct.get(m, 0) for m in MODALITIES}}


def counts_of(prediction: Mapping[str, Any]) -> tuple[int, int, int]:
    """Records per modality of one output record: a peer's, or an align-only streamproc
    prediction (frames seen; audio chunks used, from its provenance; segments)."""
    if "records" in prediction:
        r = prediction["records"]
        return r["video"], r["audio"], r["text"]
    mods = prediction["modalities"]
    return (mods["video"]["frames"], len(prediction["provenance"].get("audio", ())),
            mods["text"]["segments"])


def expected_windows(records: Iterable[wire.MediaRecord], cfg: AlignConfig) -> Windows:
    """Every record in every window it overlaps (streamproc's rule), nothing late."""
    held: dict[tuple[str, int], Counter[str]] = {}
    for r in records:
        start, end = (r.start_ns, r.end_ns) if isinstance(r, wire.TranscriptSegment) else (
            r.ts_ns, r.end_ns)
        for k in cfg.window_starts(start, end):
            held.setdefault((r.stream_id, k), Counter())[r.modality] += 1
    return {key: (c["video"], c["audio"], c["text"]) for key, c in held.items()}


@dataclass
class WindowCheck:
    """How one implementation's windows differ from the expected ones."""

    windows: int
    duplicates: int  # output records for a window already seen
    missing: list[tuple[str, int]] = field(default_factory=list)
    extra: list[tuple[str, int]] = field(default_factory=list)
    # per modality: windows whose count differs, and the records short (negative: more)
    differ: dict[str, int] = field(default_factory=dict)
    short: dict[str, int] = field(default_factory=dict)

    @property
    def same(self) -> bool:
        return not (self.missing or self.extra or self.differ or self.duplicates)

    def describe(self) -> str:
        if self.same:
            return f"{self.windows} windows, all as expected"
        parts = [f"{self.windows} windows"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (first {self.missing[0]})")
        if self.extra:
            parts.append(f"{len(self.extra)} extra (first {self.extra[0]})")
        for m, n in self.differ.items():
            parts.append(f"{n} with other {m} counts ({self.short[m]:+d} records short)")
        if self.duplicates:
            parts.append(f"{self.duplicates} published twice")
        return ", ".join(parts)


def check_windows(expected: Windows, got: Iterable[tuple[tuple[str, int],
                                                         tuple[int, int, int]]]) -> WindowCheck:
    """Compare (key, counts) output records with the expected windows."""
    seen: Windows = {}
    dups = 0
    for key, counts in got:
        if key in seen:
            dups += 1
        seen[key] = counts
    check = WindowCheck(windows=len(seen), duplicates=dups,
                        missing=sorted(expected.keys() - seen.keys()),
                        extra=sorted(seen.keys() - expected.keys()))
    for key in expected.keys() & seen.keys():
        for i, m in enumerate(MODALITIES):
            if expected[key][i] != seen[key][i]:
                check.differ[m] = check.differ.get(m, 0) + 1
                check.short[m] = check.short.get(m, 0) + expected[key][i] - seen[key][i]
    return check


def end_marks(records: Iterable[wire.MediaRecord]) -> list[wire.TranscriptSegment]:
    """One empty transcript segment per stream, END_MARK_AFTER_NS after the last event."""
    last: dict[str, int] = {}
    for r in records:
        last[r.stream_id] = max(last.get(r.stream_id, 0), r.end_ns)
    at = max(last.values()) + END_MARK_AFTER_NS
    return [wire.TranscriptSegment(sid, 1_000_000_000, "", at, at + MS) for sid in sorted(last)]


# ---------------------------------------------------------------------------------------
# the children: one implementation each, timed from inside
# ---------------------------------------------------------------------------------------


@dataclass
class Span:
    """Wall and process CPU time from the first record to the last thing handled."""

    t0: float = 0.0
    c0: float = 0.0
    t1: float = 0.0
    c1: float = 0.0

    def start(self) -> None:
        if not self.t0:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.t1, self.c1 = time.perf_counter(), time.process_time()

    def result(self, n: int, **extra: Any) -> dict[str, Any]:
        return {"events_s": n / (self.t1 - self.t0), "cpu_run_s": self.c1 - self.c0,
                "maxrss_kb": peak_rss_kb(), **extra}


def _consumer_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"bootstrap.servers": cfg["bootstrap"], "group.id": f"peers{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "fetch.message.max.bytes": cfg["max_bytes"]}


def child_bare(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    consumer = Consumer(_consumer_config(cfg))
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in cfg["topics"]
                     for p in range(cfg["partitions"])])
    span, seen, n = Span(), 0, cfg["n"]
    while seen < n:
        msgs = consumer.consume(BATCH, POLL_S)
        if msgs:
            span.start()
        for m in msgs:
            if m.error() is not None:
                raise KafkaException(m.error())
            m.headers()
        seen += len(msgs)
    span.stop()
    consumer.close()
    return span.result(n)


class _Fetched:
    """A record as the librdkafka reader hands it to the event loop (what the Interleaver
    reads, and the record)."""

    __slots__ = ("offset", "partition", "record", "timestamp", "topic")

    def __init__(self, record: wire.KafkaRecord) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.timestamp = record.timestamp_ms
        self.record = record


def child_core_librdkafka(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """streamproc's worker core without faust or aiokafka: a confluent-kafka (librdkafka)
    consumer read in a thread of its own, records interleaved by event time and handed to
    ``WorkerCore.on_records`` in batches as the worker's fetch loop does, window summaries
    and stream progress published with a librdkafka producer. What a librdkafka fetch path
    would cost; not a worker (no consumer group, no commits, no rebalances)."""
    import asyncio
    import threading
    from operator import attrgetter

    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer
    from confluent_kafka import TopicPartition as CTP
    from confluent_kafka.admin import AdminClient, NewTopic

    from streamproc.inference.outputs import SummaryOutput
    from streamproc.worker.core import Consumed, WorkerCore
    from streamproc.worker.interleave import Interleaver
    from streamproc.worker.metrics import Counters
    from streamproc.worker.patches import BATCH_RECORDS, RecordAck
    from streamproc.worker.progress import ProgressWriter

    settings = Settings(provisional_on="none", partitions=cfg["partitions"],
                        topic_prefix=cfg["prefix"], bootstrap_servers=cfg["bootstrap"])
    progress_topic = f"{cfg['prefix']}-proto-progress-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": cfg["bootstrap"]})
    for f in admin.create_topics([NewTopic(progress_topic, cfg["partitions"], 1)]).values():
        f.result()
    consumer = Consumer({**_consumer_config(cfg), "isolation.level": "read_committed"})
    tps = [(t, p) for t in cfg["topics"] for p in range(cfg["partitions"])]
    consumer.assign([CTP(t, p, OFFSET_BEGINNING) for t, p in tps])
    producer = Producer({"bootstrap.servers": cfg["bootstrap"], "acks": "all",
                         "linger.ms": 2, "message.max.bytes": cfg["max_bytes"]})
    stop = threading.Event()

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        fetched: asyncio.Queue[list[_Fetched]] = asyncio.Queue()
        room = threading.Semaphore(8)  # fetched batches not yet handled: the read-ahead

        def read() -> None:
            while not stop.is_set():
                if not room.acquire(timeout=POLL_S):
                    continue
                msgs = consumer.consume(BATCH, POLL_S)
                batch = []
                for m in msgs:
                    if m.error() is not None:
                        raise KafkaException(m.error())
                    batch.append(_Fetched(wire.KafkaRecord(
                        m.key(), m.value(), wire.normalize_headers(m.headers()),
                        m.timestamp()[1], m.topic(), m.partition(), m.offset())))
                if batch:
                    loop.call_soon_threadsafe(fetched.put_nowait, batch)
                else:
                    room.release()

        def poll_producer() -> None:
            while not stop.is_set():
                producer.poll(POLL_S)

        def produce(topic: str, rec: wire.KafkaRecord) -> asyncio.Future[None]:
            fut = loop.create_future()

            def done(err: Any, _msg: Any) -> None:
                loop.call_soon_threadsafe(
                    fut.set_exception if err else fut.set_result,
                    KafkaException(err) if err else None)
            producer.produce(topic, rec.value, rec.key, headers=list(rec.headers),
                             timestamp=rec.timestamp_ms or 0, on_delivery=done)
            return fut

        async def enqueue(rec: wire.KafkaRecord) -> asyncio.Future[None]:
            return produce(cfg["out_topic"], rec)

        async def send_dead_letter(rec: wire.KafkaRecord) -> None:
            await produce(settings.topic("deadletter"), rec)

        async def send_progress(stream_id: str, value: Any) -> None:
            await produce(progress_topic, wire.KafkaRecord(stream_id.encode(), value.encode()))

        class Acks:
            def ack(self, handle: RecordAck) -> None:
                handle.acked = True

        acks = Acks()
        writer = ProgressWriter(send_progress, order=attrgetter("seq"))
        counters = Counters()
        marks: dict[str, float] = {}

        def crash(exc: BaseException) -> None:
            marks["crash"] = 1
            print(f"core crashed: {exc!r}", file=sys.stderr)

        def fetch_state(tp: tuple[str, int]) -> tuple[int | None, int | None]:
            _low, high = consumer.get_watermark_offsets(CTP(*tp), cached=True)
            return (None if high < 0 else high), time.time_ns()

        core = WorkerCore(settings, submit=SummaryOutput(enqueue).submit,
                          send_dead_letter=send_dead_letter, record_progress=writer.record,
                          forget_progress=writer.forget, counters=counters, crash=crash,
                          fetch_state=fetch_state)
        core.on_assigned(tps)
        core.on_resume(dict.fromkeys(tps, 0), {})
        # The worker's 2 s hold limit (for a sibling that cannot be fetched) is too short
        # here: with it, windows came out short of audio (up to 350 in a run), audio
        # released past the aligner's cap, most likely because librdkafka left a video
        # partition unfetched that long. A worker on this path would need the limit
        # counted from the sibling's last fetch.
        interleave = Interleaver(settings.input_topics, max_hold_ns=60_000_000_000)
        paused: set[tuple[str, int]] = set()

        def behind(tp: tuple[str, int]) -> bool:
            end, nxt = fetch_state(tp)[0], core.gate.next_offset(tp)
            return end is None or nxt is None or nxt < end

        threads = [threading.Thread(target=read, daemon=True),
                   threading.Thread(target=poll_producer, daemon=True)]
        for t in threads:
            t.start()
        span, seen, n, want = Span(), 0, cfg["n"], cfg["windows"]
        last_tick = time.monotonic()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and "crash" not in marks:
            try:
                batch = await asyncio.wait_for(fetched.get(), 0.1)
            except TimeoutError:
                batch = []
            else:
                room.release()
                span.start()
                by_tp: dict[tuple[str, int], list[_Fetched]] = {}
                for f in batch:
                    by_tp.setdefault((f.topic, f.partition), []).append(f)
                for tp, recs in by_tp.items():
                    interleave.put(tp, recs)
            ready = interleave.take(behind)
            held = interleave.held()
            if held - paused:
                consumer.pause([CTP(*tp) for tp in held - paused])
            if paused - held:
                consumer.resume([CTP(*tp) for tp in paused - held])
            paused.clear()
            paused.update(held)
            for i in range(0, len(ready), BATCH_RECORDS):
                core.on_records([Consumed(f.topic, f.partition, f.offset, f.record,
                                          RecordAck(acks, (f.topic, f.partition), f.offset))
                                 for f in ready[i:i + BATCH_RECORDS]])
                await asyncio.sleep(0)
                seen += len(ready[i:i + BATCH_RECORDS])
                if seen >= n and not span.t1:
                    span.stop()
            if time.monotonic() - last_tick >= 0.1:  # the worker's idle-window timer
                core.on_tick()
                last_tick = time.monotonic()
            if span.t1 and counters.get("windows_published") >= want:
                break
        stop.set()
        for t in threads:
            t.join()
        producer.flush(10)
        consumer.close()
        if not span.t1:
            raise RuntimeError(f"handled {seen} of {n} records before the deadline")
        return span.result(n, late_placements=int(counters.get("dead_letters")))

    return asyncio.run(main())


# Quix keeps window contents in RocksDB through these: a collected record is stored
# binary (its payload cannot go into JSON); every other state value as Quix's JSON.
_ITEM_HEAD = struct.Struct(">Bqqqq")
_MOD_CODE = {m: i for i, m in enumerate(MODALITIES)}


def state_dumps(value: Any) -> bytes:
    from quixstreams.utils.json import dumps

    if type(value) is tuple:
        mod, seq, start, end, at, payload = value
        return b"\x01" + _ITEM_HEAD.pack(_MOD_CODE[mod], seq, start, end, at) + payload
    return b"\x00" + dumps(value)


def state_loads(raw: bytes) -> Any:
    from quixstreams.utils.json import loads

    if raw[:1] == b"\x01":
        code, seq, start, end, at = _ITEM_HEAD.unpack_from(raw, 1)
        return (MODALITIES[code], seq, start, end, at, raw[1 + _ITEM_HEAD.size:])
    return loads(raw[1:])


def child_quix(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from quixstreams import Application
    from quixstreams.state.rocksdb import RocksDBOptions

    hop, window, n = cfg["hop_ns"], cfg["window_ns"], cfg["n"]
    span, seen, late = Span(), [0], [0]
    app: Application

    def processed(_topic: str, _partition: int, _offset: int) -> None:
        seen[0] += 1
        if seen[0] == 1:
            span.start()
        elif seen[0] == n:
            span.stop()
            app.stop()

    def on_late(*_args: Any) -> bool:
        late[0] += 1
        return False  # counted, not logged

    app = Application(
        broker_address=cfg["bootstrap"], consumer_group=f"quix{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", state_dir=cfg["state_dir"], loglevel="WARNING",
        # streamproc never writes media to Kafka a second time; Quix's changelog would
        use_changelog_topics=False,
        rocksdb_options=RocksDBOptions(dumps=state_dumps, loads=state_loads),
        consumer_extra_config={"fetch.message.max.bytes": cfg["max_bytes"]},
        on_message_processed=processed)

    def event_ms(_value: Any, headers: Any, _timestamp: float, _kind: Any) -> int:
        return int(dict(headers)["sp-ts"]) // MS

    inputs = [app.dataframe(app.topic(t, key_deserializer="bytes", value_deserializer="bytes",
                                      timestamp_extractor=event_ms))
              for t in cfg["topics"]]
    sdf = inputs[0].concat(inputs[1]).concat(inputs[2])
    sdf = sdf.apply(lambda value, key, _ts, headers: items_of(key, headers, value, hop)[1],
                    expand=True, metadata=True)
    sdf = sdf.set_timestamp(lambda item, _key, _ts, _headers: item[4] // MS)
    sdf = sdf.hopping_window(duration_ms=window // MS, step_ms=hop // MS,
                             grace_ms=cfg["grace_ns"] // MS, on_late=on_late).collect().final()
    sdf = sdf.apply(lambda w, key, _ts, _headers: window_json(
        key.decode("utf-8"), w["start"] * MS, window, w["value"]), metadata=True)
    sdf.to_topic(app.topic(cfg["out_topic"], key_serializer="bytes", value_serializer="json"))
    app.run()
    return span.result(n, late_placements=late[0])


def child_bytewax(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    import bytewax.operators as op
    import bytewax.operators.windowing as win
    from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage
    from bytewax.dataflow import Dataflow
    from bytewax.run import cli_main

    hop, window, n = cfg["hop_ns"], cfg["window_ns"], cfg["n"]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    span, seen, late = Span(), [0], [0]

    def parse(msg: tuple[bytes, list[tuple[str, bytes]], bytes]) -> list[tuple[str, Item]]:
        span.start()
        seen[0] += 1
        if seen[0] == n:
            span.stop()
        sid, items = items_of(*msg, hop)
        return [(sid, it) for it in items]

    def out(kv: tuple[str, tuple[int, list[Item]]]) -> KafkaSinkMessage:
        sid, (window_id, items) = kv
        span.stop()  # the last window written ends the span
        value = json.dumps(window_json(sid, window_id * hop, window, items))
        return KafkaSinkMessage(sid.encode("utf-8"), value.encode("utf-8"))

    def count_late(_step: str, _item: Any) -> None:
        late[0] += 1

    flow = Dataflow("peers")
    if cfg["impl"] == "bytewax-kafkasource":  # Bytewax's own source: topics read apart
        from bytewax.connectors.kafka import KafkaSource

        stock = op.input("kafka", flow, KafkaSource([cfg["bootstrap"]], cfg["topics"],
                                                    tail=False, batch_size=BATCH))
        records = op.map("fields", stock, lambda m: (m.key, m.headers, m.value))
    else:
        records = op.input("kafka", flow, merged_source(cfg))
    keyed = op.flat_map("parse", records, parse)
    clock = win.EventClock(lambda it: epoch + timedelta(microseconds=it[4] // 1000),
                           wait_for_system_duration=timedelta(microseconds=cfg["grace_ns"] // 1000))
    windower = win.SlidingWindower(length=timedelta(microseconds=window // 1000),
                                   offset=timedelta(microseconds=hop // 1000), align_to=epoch)
    windows = win.collect_window("window", keyed, clock, windower)
    op.inspect("late", windows.late, count_late)
    op.output("out", op.map("json", windows.down, out),
              KafkaSink([cfg["bootstrap"]], cfg["out_topic"]))
    cli_main(flow, workers_per_process=1)
    return span.result(n, late_placements=late[0])


def merged_source(cfg: Mapping[str, Any]) -> Any:
    """A Bytewax source whose partition p reads partition p of every input topic, merged
    by record timestamp (a topic whose buffer is empty holds the others back until it has
    data or is at its end), as Quix reads concatenated topics; it yields (key, headers,
    value)."""
    from collections import deque

    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
    from confluent_kafka import TopicPartition as TP

    topics, batch = list(cfg["topics"]), BATCH

    class Part(StatefulSourcePartition[Any, None]):
        def __init__(self, p: int) -> None:
            self.consumer = Consumer({**_consumer_config(cfg), "enable.partition.eof": True})
            self.tps = {t: TP(t, p) for t in topics}
            self.consumer.assign([TP(t, p, OFFSET_BEGINNING) for t in topics])
            self.buf: dict[str, deque] = {t: deque() for t in topics}
            self.at_end: set[str] = set()
            self.paused: set[str] = set()

        def next_batch(self) -> list[Any]:
            if len(self.at_end) == len(topics) and not any(self.buf.values()):
                raise StopIteration
            for m in self.consumer.consume(batch, POLL_S):
                err = m.error()
                if err is None:
                    self.buf[m.topic()].append(m)
                    self.at_end.discard(m.topic())
                elif err.code() == KafkaError._PARTITION_EOF:
                    self.at_end.add(m.topic())
                else:
                    raise KafkaException(err)
            out = []
            while True:
                if any(not self.buf[t] and t not in self.at_end for t in topics):
                    break
                heads = [t for t in topics if self.buf[t]]
                if not heads:
                    break
                t = min(heads, key=lambda t: self.buf[t][0].timestamp()[1])
                m = self.buf[t].popleft()
                out.append((m.key(), m.headers(), m.value()))
            # a topic far ahead of the others stops fetching until they catch up
            for t in topics:
                full = len(self.buf[t]) > 4 * batch
                if full and t not in self.paused:
                    self.consumer.pause([self.tps[t]])
                    self.paused.add(t)
                elif not full and t in self.paused:
                    self.consumer.resume([self.tps[t]])
                    self.paused.discard(t)
            return out

        def snapshot(self) -> None:
            return None

        def close(self) -> None:
            self.consumer.close()

    class Source(FixedPartitionedSource[Any, None]):
        def list_parts(self) -> list[str]:
            return [str(p) for p in range(cfg["partitions"])]

        def build_part(self, _step_id: str, for_part: str, _resume: None) -> Part:
            return Part(int(for_part))

    return Source()


CHILDREN = {"bare": child_bare, "quix": child_quix, "bytewax": child_bytewax,
            "bytewax-kafkasource": child_bytewax, "core-librdkafka": child_core_librdkafka}


def run_child(impl: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One peer in a child process of this interpreter; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, BENCH_PEER=json.dumps(
            {**cfg, "impl": impl, "result": str(out), "state_dir": tmp}))
        proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if not out.exists():
            raise RuntimeError(f"{impl} child failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def child_main() -> None:
    cfg = json.loads(os.environ["BENCH_PEER"])
    result = CHILDREN[cfg["impl"]](cfg)
    Path(cfg["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# the parent: produce once, run rounds, check windows, report
# ---------------------------------------------------------------------------------------


def missing_peers() -> list[str]:
    missing = []
    for module in ("quixstreams", "bytewax", "confluent_kafka"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


def output_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "peers-offsets"})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)]
    finally:
        c.close()


def read_output(bootstrap: str, topic: str, start: list[int],
                end: list[int]) -> list[dict[str, Any]]:
    """The JSON records of ``topic`` between two sets of offsets."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    want = sum(e - s for s, e in zip(start, end, strict=True))
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "peers-read",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, s) for p, s in enumerate(start) if end[p] > s])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    try:
        while len(out) < want and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error() is not None:
                    raise KafkaException(m.error())
                if m.offset() < end[m.partition()]:
                    out.append(json.loads(m.value()))
    finally:
        c.close()
    return out


def delete_topics(settings: Settings) -> None:
    """The run's topics (a 60 s backlog is about 400 MB), once every run is read back."""
    from streamproc import kafka

    admin = kafka.admin(settings)
    try:
        admin.delete_topics(list(settings.all_topics))
    finally:
        admin.close()


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


@dataclass
class Run:
    impl: str
    round: int
    events_s: float
    cpu_us: float
    rss_mb: float
    load: str
    check: WindowCheck | None
    late: int | None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="seconds of W1 traffic (8 streams)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(IMPLEMENTATIONS),
                    help="comma separated subset of " + ", ".join(IMPLEMENTATIONS) +
                         " (or " + ", ".join(EXTRA) + ")")
    ap.add_argument("--write-docs", action="store_true",
                    help="record the table in docs/benchmarks.md (## Peers)")
    ap.add_argument("--profile", default="",
                    help="after the rounds, one more streamproc run under cProfile, written "
                         "here (its figures are not reported)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main()
        return 0
    missing = missing_peers()
    if missing:
        print(f"bench_peers needs {', '.join(missing)} (the `bench` extra): run `make "
              "bench-env`, then .venv-bench/bin/python benchmarks/bench_peers.py",
              file=sys.stderr)
        return 2
    impls = [i for i in (*IMPLEMENTATIONS, *EXTRA) if i in args.only.split(",")]
    from streamproc.dev.localkafka import existing_or_local

    # default windows and lateness; one final prediction per window, as the peers publish
    base = Settings(provisional_on="none")
    cfg_align = AlignConfig.from_settings(base)
    grace_ns = max(base.lateness_ns(m) for m in MODALITIES)
    records = [r for _arrival, r in w1_records(args.seconds)]
    marks = end_marks(records)
    expected = expected_windows(records, cfg_align)
    cut = marks[0].start_ns - cfg_align.window_ns  # windows after this hold an end mark
    del records
    runs: list[Run] = []
    with existing_or_local() as bootstrap:
        settings = base.replace(bootstrap_servers=bootstrap,
                                topic_prefix=f"peers{uuid.uuid4().hex[:8]}", partitions=4)
        create_topics(settings)
        # window predictions are stamped with their (2023) event time too
        keep_backlog(settings, [settings.topic("predictions")])
        n = produce_backlog(settings, args.seconds, then=marks)
        print(f"{n} W1 events ({args.seconds} s of 8 streams, {len(marks)} end marks) "
              f"produced; {len(expected)} windows expected; {machine()}", file=sys.stderr)
        out_topic = settings.topic("predictions")
        cfg = {"bootstrap": bootstrap, "topics": list(settings.input_topics),
               "partitions": settings.partitions, "out_topic": out_topic, "n": n,
               "window_ns": cfg_align.window_ns, "hop_ns": cfg_align.hop_ns,
               "grace_ns": grace_ns, "max_bytes": settings.max_message_bytes,
               "prefix": settings.topic_prefix}
        # streamproc publishes the windows of the end marks too (two per stream)
        out_windows = len(expected) + sum(
            len(cfg_align.window_starts(m.start_ns, m.end_ns)) for m in marks)
        cfg["windows"] = out_windows
        failed: list[str] = []
        for r in range(args.rounds):
            order = impls[r % len(impls):] + impls[:r % len(impls)]  # who goes first rotates
            for impl in order:
                load = loadavg()
                before = output_offsets(bootstrap, out_topic, settings.partitions)
                try:
                    if impl == "streamproc":
                        res = run_agent(settings, n, settle_s=SETTLE_S, windows=out_windows,
                                        timeout_s=RUN_TIMEOUT_S)
                        late = int(res["dead_letters"])
                    else:
                        res = run_child(impl, cfg)
                        late = res.get("late_placements")
                except (subprocess.TimeoutExpired, RuntimeError) as e:
                    tail = e.stderr if isinstance(e, subprocess.TimeoutExpired) else str(e)
                    if isinstance(tail, bytes):
                        tail = tail.decode("utf-8", "replace")
                    print(f"round {r + 1} {impl}: FAILED ({type(e).__name__}); its last "
                          f"output:\n{(tail or '')[-2000:]}", file=sys.stderr)
                    failed.append(f"round {r + 1} {impl}: {type(e).__name__} (load {load})")
                    continue
                check = None
                if impl != "bare":
                    after = output_offsets(bootstrap, out_topic, settings.partitions)
                    got = [((p["stream_id"], p["window_start_ns"]), counts_of(p))
                           for p in read_output(bootstrap, out_topic, before, after)]
                    check = check_windows(expected, [g for g in got if g[0][1] <= cut])
                run = Run(impl, r + 1, res["events_s"], res["cpu_run_s"] / n * 1e6,
                          res["maxrss_kb"] / 1024, f"{load}-{loadavg()}", check,
                          None if impl == "bare" else late)
                runs.append(run)
                print(f"round {r + 1} {impl:10} {run.events_s:8,.0f} events/s "
                      f"{run.cpu_us:6,.0f} CPU µs/event {run.rss_mb:6,.0f} MB  load "
                      f"{run.load}  {check.describe() if check else ''}"
                      f"{'' if run.late is None else f'; late {run.late}'}", file=sys.stderr)
        if args.profile:
            run_agent(settings, n, profile=str(Path(args.profile).resolve()),
                      settle_s=SETTLE_S, windows=out_windows, timeout_s=RUN_TIMEOUT_S)
            print(f"cProfile of one streamproc run: {args.profile}", file=sys.stderr)
        delete_topics(settings)
    body = report(runs, impls, n, args, len(expected))
    if failed:
        body += "\n\nFailed runs (not in the tables): " + "; ".join(failed) + "."
    print(body)
    if args.write_docs:
        write_section("Peers", body)
        print("\nwritten to docs/benchmarks.md (## Peers)", file=sys.stderr)
    return 0


LABELS = {"streamproc": "streamproc align-only worker", "quix": "Quix Streams 3.28.1",
          "bytewax": "Bytewax 0.21.1", "bare": "bare confluent-kafka loop (headers only)",
          "bytewax-kafkasource": "Bytewax 0.21.1 with its own KafkaSource",
          "core-librdkafka": "streamproc's core on librdkafka (no faust; not a worker)"}


def _span(values: list[float], fmt: str = ",.0f") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}–{hi:{fmt}}"


NOTES = """\
All of them read the same backlog and publish one JSON record per window; the windows
column checks each run's against the windows computed from the records (every record in
every window it overlaps). The peers' grace is streamproc's largest lateness (3 s, the
transcripts'): they have one event clock per stream, streamproc one per stream and
modality. Quix reads concatenated topics in timestamp order; Bytewax gets a source that
does the same per partition (`bytewax-kafkasource`, with `--only`, is Bytewax's own
KafkaSource: it reads each topic-partition on its own, and one clock per stream then puts
most video and audio behind the transcripts, late). What differs beyond the windowing:
streamproc checks each JPEG's structure, assembles each window's audio on the model's
sample grid, samples K frames, keeps provenance, publishes progress and acks inputs only
after their windows are published; the peers read headers and count records. Quix keeps
window contents (payloads included) in RocksDB, with its changelog topics off (streamproc
writes no media back to Kafka either); Bytewax and streamproc keep them in memory. The
machine is shared with other work, so events/s moves with the load; CPU µs per event (the
child's process time over the same span, Kafka client threads included) is the steadier
figure."""


def report(runs: list[Run], impls: list[str], n: int, args: argparse.Namespace,
           expected: int) -> str:
    """Every run, then the ranges per implementation and streamproc ÷ each per round."""
    rows = ["| round | implementation | events/s | CPU µs/event | peak RSS (MB) | load "
            "(1 min, before–after) | windows |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        rows.append(f"| {run.round} | {run.impl} | {run.events_s:,.0f} | {run.cpu_us:,.0f} | "
                    f"{run.rss_mb:,.0f} | {run.load} | "
                    f"{run.check.describe() if run.check else '—'} |")
    by = {i: [r for r in runs if r.impl == i] for i in impls}
    summary = ["| implementation | events/s | CPU µs/event | peak RSS (MB) | "
               "streamproc ÷ it (events/s, per round) |", "|---|---|---|---|---|"]
    for i in impls:
        if not by[i]:
            summary.append(f"| {LABELS[i]} | every run failed | | | |")
            continue
        ratio = "—"
        if "streamproc" in by and i != "streamproc":
            sp = {r.round: r.events_s for r in by["streamproc"]}
            ratio = _span([sp[r.round] / r.events_s for r in by[i] if r.round in sp], ".2f")
        elif i == "streamproc":
            ratio = "1"
        summary.append(f"| {LABELS[i]} | {_span([r.events_s for r in by[i]])} "
                       f"(median {statistics.median(r.events_s for r in by[i]):,.0f}) | "
                       f"{_span([r.cpu_us for r in by[i]])} | {_span([r.rss_mb for r in by[i]])} "
                       f"| {ratio} |")
    return (f"Machine: {machine()}. {n} events ({args.seconds} s of W1, 8 streams, plus one "
            f"end mark per stream) read as a backlog from 4 partitions per topic; "
            f"{expected} windows expected; {args.rounds} rounds, the order rotated each "
            f"round; niceness {os.nice(0)}; {time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(summary) +
            "\n\nEvery run:\n\n" + "\n".join(rows) + "\n\n" + NOTES)


if __name__ == "__main__":
    sys.exit(main())
