"""The faust worker: one agent aligns video, audio and transcripts.

Shape::

    PREFIX.video ─┐
    PREFIX.audio ─┼─> agent `align` (concurrency 1) ─> Aligner per partition ─> WindowSink
    PREFIX.text  ─┘        │ undecodable / late / capped records              (-> PREFIX.predictions)
                           └─> PREFIX.deadletter (reason in sp-error)

Guarantee (docs/design.md §6): a consumed record is acked only when every window that
needs it has been durably published and its stream's progress recorded
("ack-after-emit"), so offsets never commit past data an unfinished window still needs
and a crash replays exactly that. Progress (last published window per stream) lives in a
compacted topic, APPID-progress; a replacement Aligner resumes from it, so replayed input
does not emit a window again. Order per window: publish output -> record progress -> ack
inputs. docs/worker.md explains the choices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import struct
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import faust
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy
from faust.types import TP
from faust.types.auth import CredentialsT

from streamproc.align.aligner import AlignConfig, Aligner, Window
from streamproc.config import MODALITIES, Settings
from streamproc.errors import UserError
from streamproc.inference.sink import (
    ALIGN_ONLY_MODEL,
    InferenceSink,
    Predictor,
    StreamChain,
    log_when_started,
    other_groups,
    prediction_headers,
    summary_prediction,
)
from streamproc.wire import codec as wire
from streamproc.worker.acks import AckLedger, Entry, OffsetGate, Ticket
from streamproc.worker.metrics import Counters, Metrics

log = logging.getLogger("streamproc.worker")

#: How often the wall-clock timer polls the aligners (idle deadlines close windows).
TICK_S = 0.1
#: Windows handed to the sink and not yet durable before the agent waits (backpressure).
MAX_INFLIGHT_WINDOWS = 1024
#: Seconds between the worker's one-line status logs.
STATUS_EVERY_S = 30.0
#: Seconds between updates of the lag and buffer gauges.
GAUGES_EVERY_S = 5.0
#: Dead letters of one kind logged one by one before only every 100th is.
DEAD_LETTERS_LOGGED = 20
#: A partition none of whose input fetches completed for this long is stalled (broker
#: away, fetches failing; fetches complete every FETCH_MAX_WAIT_MS when all is well): that
#: time does not count toward idle deadlines.
FETCH_STALL_NS = 1_000_000_000
#: Seeks for one hole in an input partition before checking whether retention deleted it.
HOLE_SEEKS_BEFORE_CHECK = 3
#: Longest the broker holds a fetch whose partitions have nothing new (faust hard-codes
#: 1500 ms). See :func:`shorten_fetch_wait`.
FETCH_MAX_WAIT_MS = 100
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
#: Bytes a dead letter needs beyond key, value and headers (record batch framing, our headers).
DEAD_LETTER_OVERHEAD = 1024


def shorten_fetch_wait(consumer: Any, wait_ms: int = FETCH_MAX_WAIT_MS) -> None:
    """Let the broker hold an empty fetch at most ``wait_ms`` instead of faust's 1500 ms.

    faust takes a partition whose stream buffer is under pressure out of the fetches
    (records of a big fetch pile up quickly); the next fetch then asks only for partitions
    with nothing new, the broker holds it for the whole wait, and aiokafka sends no other
    fetch to that broker meanwhile. A worker catching up on a backlog stalled that way
    again and again (benchmarks/bench_pipeline.py: 78 -> about 140 windows/s align-only).
    An idle worker now fetches ten times a second instead of once in 1.5 s: negligible.
    """
    inner = getattr(getattr(consumer, "_thread", None), "_consumer", None)
    fetcher = getattr(inner, "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "_fetch_max_wait_ms"):
        log.warning("cannot shorten the fetch wait: faust/aiokafka internals changed")
        return
    inner._fetch_max_wait_ms = fetcher._fetch_max_wait_ms = wait_ms


# ---------------------------------------------------------------------------------------
# what the fetcher must survive and report (patches of aiokafka 0.14 internals)
# ---------------------------------------------------------------------------------------

#: Offset ranges ``(topic, partition, start, end)`` in which the fetcher found nothing to
#: deliver (transaction markers, aborted transactions, compacted records). Appended by the
#: consumer's fetcher, drained by the agent (:meth:`AlignState.take_fetch_skips`).
#: Bounded: a report lost to the bound only costs a seek back, which fetches (and reports)
#: the range again.
FETCH_SKIPS: deque[tuple[str, int, int, int]] = deque(maxlen=100_000)


class _ReportingPartitionRecords(aiokafka_fetcher.PartitionRecords):
    """aiokafka's records of one fetched partition, reporting the offsets it skips.

    The agent processes each input offset in turn (acks.OffsetGate); without this, an
    offset the fetcher legitimately never delivers looks like a hole to seek back over.
    """

    def _unpack_records(self):  # type: ignore[override]
        tp, expected = self._tp, self.next_fetch_offset  # the position fetched from
        for rec in super()._unpack_records():
            if rec.offset > expected:
                FETCH_SKIPS.append((tp.topic, tp.partition, expected, rec.offset))
            expected = rec.offset + 1
            yield rec
        if self.next_fetch_offset > expected:  # e.g. a commit marker after the last record
            FETCH_SKIPS.append((tp.topic, tp.partition, expected, self.next_fetch_offset))


class _SurrogateBytes(bytearray):
    """A header name read back as text whatever its bytes (undecodable bytes become
    surrogates, as ``os.fsdecode`` does), so the record can be dead-lettered."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytearray.decode(self, encoding, "surrogateescape")


class _LenientBuffer(bytearray):
    def __getitem__(self, i):  # type: ignore[override]
        v = bytearray.__getitem__(self, i)
        return _SurrogateBytes(v) if isinstance(i, slice) else v


class _LenientBatch(_DefaultRecordBatchPy):  # type: ignore[misc]
    """aiokafka's pure-Python record batch, reading header names that are not UTF-8.

    aiokafka decodes header names strictly, and one record with a name like ``ff fe``
    crashes the fetcher (and the worker again after every restart). Its Python batch
    slices header names from ``self._buffer``; this buffer's slices decode leniently.
    """

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        super().__init__(buffer)
        self._buffer = _LenientBuffer(self._buffer)

    def _maybe_uncompress(self) -> None:
        super()._maybe_uncompress()
        if type(self._buffer) is not _LenientBuffer:
            self._buffer = _LenientBuffer(self._buffer)


class _LenientBatchView:
    """One batch: aiokafka's fast (C) reader, or, once that refuses a header name, the
    lenient Python reader of the same bytes from the record it stopped at."""

    def __init__(self, batch: Any, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._slow: _LenientBatch | None = None
        self._read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> _LenientBatchView:
        return self

    def __next__(self) -> Any:
        if self._slow is None:
            try:
                rec = next(self._batch)
            except UnicodeDecodeError:
                self._slow = iter(_LenientBatch(self._raw))
                for _ in range(self._read):
                    next(self._slow)
            else:
                self._read += 1
                return rec
        return next(self._slow)


class _LenientMemoryRecords:
    """aiokafka's MemoryRecords whose batches survive header names that are not UTF-8."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._records = _MEMORY_RECORDS(data)
        self._pos = 0  # where the next batch starts: batches lie back to back

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if batch is None:
            return None
        start = self._pos
        self._pos = start + 12 + struct.unpack_from(">i", self._data, start + 8)[0]
        if getattr(batch, "magic", 2) < 2:
            return batch  # message format v0/v1 has no headers
        return _LenientBatchView(batch, self._data[start:self._pos])


_MEMORY_RECORDS = aiokafka_fetcher.MemoryRecords


def patch_fetcher() -> None:
    """Make aiokafka's fetcher survive any header bytes and report the offsets it skips
    (idempotent; process-wide: one worker per process)."""
    aiokafka_fetcher.MemoryRecords = _LenientMemoryRecords
    aiokafka_fetcher.PartitionRecords = _ReportingPartitionRecords


def read_committed(consumer: Any) -> None:
    """Read only committed data, as Kafka's own consumers of transactional topics do.

    Another application may write transactions into the input topics; aborted records must
    never reach a window. faust picks read_committed only for its exactly-once mode, so it
    is set on aiokafka's consumer here, before the first fetch of the assignment.
    """
    inner = getattr(getattr(consumer, "_thread", None), "_consumer", None)
    fetcher = getattr(inner, "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "_isolation_level"):
        log.warning("cannot read committed data only: faust/aiokafka internals changed")
        return
    fetcher._isolation_level = aiokafka_fetcher.READ_COMMITTED
    inner._isolation_level = "read_committed"


def undecodable_header_names(rec: wire.KafkaRecord) -> list[bytes]:
    """Header names that are not UTF-8 (the fetcher hands them over with surrogates)."""
    out = []
    for k, _ in rec.headers:
        if k.isascii():  # every wire-format header name: no encoding needed to know
            continue
        try:
            k.encode("utf-8")
        except UnicodeEncodeError:
            out.append(k.encode("utf-8", "surrogateescape"))
    return out


def _printable_headers(rec: wire.KafkaRecord) -> wire.KafkaRecord:
    """Invalid bytes of header names as replacement characters, as Java clients read them,
    so the dead letter can be sent."""
    headers = tuple((k.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), v)
                    for k, v in rec.headers)
    return dataclasses.replace(rec, headers=headers)


def misplaced_reason(stream_id: str, home: int, partition: int) -> str:
    """Why a stream's record on a second partition is a dead letter."""
    return (f"stream {stream_id!r} seen on partitions {home} and {partition} of the input "
            f"topics; its records on partition {home} came first and are used. A stream's "
            "records must all be on one partition: the key must be the stream id and every "
            "producer must use the same partitioner (likely cause: a producer with another "
            "partitioner, e.g. librdkafka's default consistent_random; set "
            "partitioner=murmur2_random there to match Kafka's Java and Python clients)")


#: (end offset to read up to, wall time in ns of the consumer's last fetch of it) of one
#: input topic-partition; None where not known yet.
FetchState = Callable[[tuple[str, int]], tuple[int | None, int | None]]


@dataclasses.dataclass(frozen=True, slots=True)
class SkippedOffsets:
    """Offsets ``offset..end-1`` with nothing to process, acked in their turn like a record
    (quacks like a faust event: ``message.topic`` etc., ``ack()``)."""

    topic: str
    partition: int
    offset: int
    end: int
    mark: Callable[[tuple[str, int], int, int], object]

    @property
    def message(self) -> SkippedOffsets:
        return self

    def ack(self) -> None:
        self.mark((self.topic, self.partition), self.offset, self.end)


def consumer_fetch_state(app: faust.App) -> FetchState:
    """Read from the app's aiokafka consumer how far each input partition can be read and
    when it was last fetched (never raises: unknown is "not known yet")."""

    def state(tp: tuple[str, int]) -> tuple[int | None, int | None]:
        try:
            inner = app.consumer._thread._consumer
            ktp = TP(*tp)
            # the log end, not the last stable offset: records behind another
            # application's open transaction exist and will come, so nothing is idle
            end = inner.highwater(ktp)
            fetched_ms = inner.last_poll_timestamp(ktp)
        except Exception:  # not assigned (yet), or mid-rebalance
            return None, None
        return end, None if fetched_ms is None else fetched_ms * 1_000_000

    return state


class ClientFaults(logging.Filter):
    """The Kafka client's errors and warnings while something is wrong (a broker away logs
    thousands of lines a minute): the first is logged, then a summary every
    ``summary_s``, then one line once none came for ``quiet_s`` (the recovery)."""

    def __init__(self, summary_s: float = 10.0, quiet_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.summary_s, self.quiet_s, self._clock = summary_s, quiet_s, clock
        self._lock = threading.Lock()  # the consumer's client logs from faust's thread
        self._since: float | None = None
        self._last = self._summary_at = 0.0
        self._kinds: Counter[str] = Counter()
        self._total = 0

    def install(self, prefix: str = "aiokafka") -> None:
        """Filter every logger of ``prefix`` (idempotent)."""
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if (name == prefix or name.startswith(prefix + ".")) \
                    and isinstance(logger, logging.Logger) and self not in logger.filters:
                logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self._clock()
        with self._lock:
            self._last = now
            if self._since is None:
                self._since, self._summary_at = now, now + self.summary_s
                record.msg = (f"{record.getMessage()} (Kafka client errors are summarised "
                              f"every {self.summary_s:.0f} s until they stop)")
                record.args = ()
                return True
            self._kinds[re.sub(r"\d+", "N", record.getMessage())[:120]] += 1
            self._total += 1
            return False

    def tick(self) -> None:
        """Log the summary or the recovery when due (from a timer)."""
        now = self._clock()
        with self._lock:
            if self._since is None:
                return
            if now - self._last >= self.quiet_s:
                log.warning("Kafka client errors stopped after %.0f s (%d lines summarised)",
                            self._last - self._since, self._total)
                self._since, self._total = None, 0
                self._kinds.clear()
            elif now >= self._summary_at and self._kinds:
                top = "; ".join(f"{n} x {k}" for k, n in self._kinds.most_common(3))
                log.warning("Kafka client errors go on (%.0f s): %d lines in the last %.0f s: "
                            "%s", now - self._since, sum(self._kinds.values()),
                            self.summary_s, top)
                self._kinds.clear()
                self._summary_at = now + self.summary_s


def _fit_dead_letter(rec: wire.KafkaRecord, reason: str,
                     max_bytes: int) -> tuple[wire.KafkaRecord, str]:
    """Leave out the value of a record whose dead letter would exceed ``max_bytes``.

    The producer refuses such a record, and a dead letter that cannot be sent crashes the
    worker on every restart (the record is never acked). The source offset in the dead
    letter still leads to the value, which stays in its topic until retention.
    """
    size = (len(rec.key or b"") + len(rec.value or b"") + len(reason.encode())
            + sum(len(k) + len(v) for k, v in rec.headers) + DEAD_LETTER_OVERHEAD)
    if size <= max_bytes:
        return rec, reason
    note = (f"; its {len(rec.value or b'')}-byte value is not copied into the dead letter "
            "(too large), read it at the source offset")
    return dataclasses.replace(rec, value=b""), reason + note


# ---------------------------------------------------------------------------------------
# the seam to inference
# ---------------------------------------------------------------------------------------


class WindowSink(Protocol):
    """Where closed windows go. Issue 6 replaces the default with micro-batched inference.

    ``submit`` must return at once (the agent never waits on one window); the awaitable
    resolves only when the window's output is durably published (the agent then records
    progress and acks the inputs) and raises if it cannot be (the worker then crashes and
    a restart replays the window).
    """

    async def start(self) -> None: ...

    def submit(self, window: Window) -> Awaitable[None]: ...

    async def stop(self) -> None: ...


async def publish(topic: faust.TopicT, rec: wire.KafkaRecord) -> None:
    """Send one record and wait until the broker has it (acks=all)."""
    ts = None if rec.timestamp_ms is None else (rec.timestamp_ms + 0.5) / 1000.0  # exact ms back
    fut = await topic.send(key=rec.key, value=rec.value, headers=list(rec.headers), timestamp=ts)
    await fut


class SummarySink:
    """The align-only sink: each window's summary to the predictions topic, per stream in
    window order."""

    def __init__(self, topic: faust.TopicT, headers: tuple[tuple[str, bytes], ...] = ()) -> None:
        self.topic = topic
        self.headers = headers
        self._chain = StreamChain()

    async def start(self) -> None:
        pass

    def submit(self, window: Window) -> Awaitable[None]:
        return self._chain.start(window.stream_id,
                                 lambda previous: self._publish(window, previous))

    async def _publish(self, window: Window, previous: asyncio.Future | None) -> None:
        rec = wire.encode_prediction(summary_prediction(window))
        await StreamChain.after(previous)
        await publish(self.topic, wire.KafkaRecord(rec.key, rec.value,
                                                   (*rec.headers, *self.headers),
                                                   rec.timestamp_ms))

    async def stop(self) -> None:
        await self._chain.drain(timeout=30)


class ProgressWriter:
    """Writes each stream's progress to its topic one record at a time, newest value last.

    Sends are awaited one after the other per stream (concurrent sends can reach the
    broker out of order, and the compacted topic keeps the last one); values that pile
    up meanwhile are coalesced into one record. ``record`` resolves once the stream's
    durable progress is at least the given value.
    """

    def __init__(self, send: Callable[[str, int], Awaitable[None]]) -> None:
        self._send = send
        self._wanted: dict[str, int] = {}
        self._durable: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = defaultdict(list)
        self._tasks: dict[str, asyncio.Task] = {}

    def record(self, stream_id: str, start_ns: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._durable.get(stream_id, -1) >= start_ns:
            fut.set_result(None)
            return fut
        self._waiters[stream_id].append((start_ns, fut))
        self._wanted[stream_id] = max(start_ns, self._wanted.get(stream_id, -1))
        if stream_id not in self._tasks:
            self._tasks[stream_id] = asyncio.ensure_future(self._write(stream_id))
        return fut

    async def _write(self, sid: str) -> None:
        try:
            while self._wanted[sid] > self._durable.get(sid, -1):
                value = self._wanted[sid]
                try:
                    await self._send(sid, value)
                except Exception as exc:
                    for _, fut in self._waiters.pop(sid, []):
                        if not fut.done():
                            fut.set_exception(exc)
                    return
                self._durable[sid] = value
                still = []
                for v, fut in self._waiters.pop(sid, []):
                    if v <= value:
                        if not fut.done():
                            fut.set_result(None)
                    else:
                        still.append((v, fut))
                if still:
                    self._waiters[sid] = still
        finally:
            del self._tasks[sid]


# ---------------------------------------------------------------------------------------
# the agent's state
# ---------------------------------------------------------------------------------------


class AlignState:
    """What the agent, the timer and the rebalance handler share.

    Every method runs to the end without awaiting, so an aligner is never seen half
    updated by the other two (they share one event loop). Publishing happens in tasks;
    their completion callbacks record progress and ack inputs.
    """

    def __init__(self, settings: Settings, sink: WindowSink,
                 send_dead_letter: Callable[[wire.KafkaRecord], Awaitable[None]],
                 record_progress: Callable[[str, int], asyncio.Future],
                 counters: Counters, crash: Callable[[BaseException], None],
                 clock: Callable[[], int] = time.time_ns,
                 flowing: Callable[[], bool] = lambda: True,
                 fetch_state: FetchState | None = None) -> None:
        self.settings = settings
        self.cfg = AlignConfig.from_settings(settings)
        self.sink = sink
        self.send_dead_letter = send_dead_letter
        self.record_progress = record_progress
        # last published window per stream: read from the progress topic when an
        # assignment resumes, then kept current by this worker's own publishes
        self.progress: dict[str, int] = {}
        self.resuming = False  # set by on_rebalance_complete, taken by seek_to_committed
        self.counters = counters
        self.crash = crash
        self.clock = clock
        self.flowing = flowing
        self.fetch_state = fetch_state
        self.aligners: dict[int, Aligner] = {}
        self.ledger: AckLedger[Any] = AckLedger()
        self.gate = OffsetGate()
        self._ignoring: set[tuple[tuple[str, int], str]] = set()  # logged once per rebalance
        self._releasing = False  # True only while the ledger's acks are handed to faust
        # partition -> its idle clock: the wall time up to which every input of the
        # partition is known to be read (stands still while anything is left to read)
        self._read_through: dict[int, int] = {}
        self._fetched_at: dict[int, int] = {}  # partition -> oldest last fetch of its inputs
        self._ends: dict[tuple[str, int], int | None] = {}  # log ends at the last look
        # stream -> the partition its records come on (while that partition is ours)
        self._home: dict[str, int] = {}
        # acks offsets the fetcher skipped (faust's gap bookkeeping); set by guard_consumer
        self._ack_skipped: Callable[[tuple[str, int], int, int], object] = lambda *a: None
        # acks released by the ledger, in release order, each batch behind the progress
        # records that must be durable first
        self._acks: deque[tuple[list[asyncio.Future], list[Any]]] = deque()
        self.modality_of = {settings.topic(m): m for m in MODALITIES}
        self._room = asyncio.Event()
        self._retired_stats: dict[str, float] = defaultdict(float)
        self.ingest_ns: dict[tuple[str, str], int] = {}

    # --- input ---------------------------------------------------------------------
    def on_event(self, event: Any) -> None:
        """Decode, align, dead-letter or hold one consumed record; emit what closed."""
        msg = event.message
        tp, offset = (msg.topic, msg.partition), msg.offset
        modality = self.modality_of[msg.topic]
        self.take_fetch_skips()
        admitted = self.gate.admit(tp, offset)
        self._track_jumps()  # stepped-over offsets come before this record
        if admitted != "ok":
            self.counters.inc("ignored", reason=admitted)
            last = self.ledger.last_tracked(tp)
            if admitted == "redelivered" and (last is None or offset > last):
                # processed and acked before a revocation, not committed yet: ack it again
                # (in order) so the commit can move; otherwise the earlier copy acks it
                self._queue_acks(self.ledger.track_done(tp, offset, event))
            if (tp, admitted) not in self._ignoring:
                self._ignoring.add((tp, admitted))
                log.info("ignoring %s records of %s:%d from offset %d (Kafka delivers them "
                         "again; see docs/worker.md)", admitted, *tp, offset)
            return
        self.counters.inc("events_in", modality=modality)
        rec = wire.KafkaRecord.from_client(msg)
        bad_names = undecodable_header_names(rec)
        if bad_names:
            self.counters.inc("decode_errors", modality=modality)
            self._dead_letter(tp, offset, event, rec, "header name(s) "
                              + ", ".join(repr(b[:64]) for b in bad_names)
                              + " not UTF-8: Kafka header names are UTF-8 strings", "decode")
            return
        try:
            media = wire.decode(rec, expect_modality=modality,
                                max_bytes=self.settings.max_message_bytes,
                                max_pixels=self.settings.max_frame_pixels)
        except wire.WireError as e:
            self.counters.inc("decode_errors", modality=modality)
            self._dead_letter(tp, offset, event, rec, str(e), e.kind)
            return
        except Exception as e:  # a decoder bug must not stop every stream; keep the record
            log.exception("decoding %s record %s:%d/%d failed", modality, *tp, offset)
            self.counters.inc("internal_errors")
            self._dead_letter(tp, offset, event, rec, f"decoder error: {e!r}", "internal")
            return
        home = self._home.setdefault(media.stream_id, msg.partition)
        if home != msg.partition:
            self._dead_letter(tp, offset, event, rec, misplaced_reason(
                media.stream_id, home, msg.partition), "partition")
            return
        aligner = self._aligner(msg.partition)
        reading = self._note_stall(msg.partition, aligner, fast=True)
        now = self.clock()
        # capture -> worker delay of the stream's newest record of each modality
        self.ingest_ns[(media.stream_id, modality)] = now - media.end_ns
        try:
            out = aligner.add(media, now)
        except Exception as e:  # an aligner bug must not stop every stream; keep the record
            log.exception("aligner rejected %s record %s:%d/%d", modality, *tp, offset)
            self.counters.inc("internal_errors")
            self._dead_letter(tp, offset, event, rec, f"aligner error: {e!r}", "internal")
            return
        status = out.status
        if status == "accepted" and out.release_after_ns is not None:
            self.ledger.track(tp, offset, event, media.stream_id, out.release_after_ns)
        elif status in ("accepted", "duplicate", "replayed"):
            if status != "accepted":
                self.counters.inc(status if status == "replayed" else "duplicates",
                                  modality=modality)
            self._queue_acks(self.ledger.track_done(tp, offset, event))
        elif status in ("late", "capped", "future"):
            self.counters.inc(status, modality=modality)
            kind = {"late": "late", "capped": "capacity", "future": "clock"}[status]
            self._dead_letter(tp, offset, event, rec, out.reason or status, kind)
        else:
            raise RuntimeError(f"aligner returned unknown outcome {status!r}")
        self._poll(msg.partition, aligner, now, reading)

    def on_tick(self) -> None:
        """Wall clock: close windows whose idle deadline passed, even with no input."""
        self.take_fetch_skips()
        self._track_jumps()
        now = self.clock()
        for partition, aligner in list(self.aligners.items()):
            self._poll(partition, aligner, now)

    def take_fetch_skips(self) -> None:
        """Tell the gate which offsets the fetcher found nothing at (:data:`FETCH_SKIPS`)."""
        while FETCH_SKIPS:
            topic, partition, start, end = FETCH_SKIPS.popleft()
            if topic in self.modality_of:
                self.gate.skipped((topic, partition), start, end)
        self.gate.settle()

    async def seek_back(self, consumer: Any) -> None:
        """Seek input partitions back over holes in what faust delivered (acks.OffsetGate);
        after a few tries, check whether retention deleted the missing records."""
        for (topic, partition), offset in self.gate.seeks().items():
            tp = TP(topic, partition)
            if self.gate.tries((topic, partition)) > HOLE_SEEKS_BEFORE_CHECK:
                earliest = (await consumer.earliest_offsets(tp)).get(tp, 0)
                if earliest > offset:
                    log.error("%s:%d: offsets %d..%d were deleted (retention) before they "
                              "were processed", topic, partition, offset, earliest - 1)
                    self.counters.inc("records_lost", earliest - offset)
                    self.gate.skip_to((topic, partition), earliest)
                    offset = earliest
            log.info("seeking %s:%d back to offset %d", topic, partition, offset)
            await consumer.seek(tp, offset)

    def on_assigned(self, tps: Iterable[tuple[str, int]]) -> None:
        self.gate.assign({tp for tp in tps if tp[0] in self.modality_of})
        self._ignoring.clear()

    def on_resume(self, committed: Mapping[tuple[str, int], int],
                  end: Mapping[tuple[str, int], int]) -> None:
        """faust resumes the assignment; Kafka delivers each topic-partition from
        ``committed``; ``end``: its end offsets now."""
        for tp, offset in committed.items():
            if tp[0] in self.modality_of:
                self.gate.start(tp, offset, end.get(tp))

    def on_revoked(self, tps: Iterable[tuple[str, int]]) -> None:
        """Forget revoked partitions: their held records are not acked; the new owner
        replays them from the committed offsets and resumes from the progress topic."""
        revoked = {tp for tp in tps if tp[0] in self.modality_of}
        waiting: dict[tuple[str, int], int] = {}
        kept: deque[tuple[list[asyncio.Future], list[Any]]] = deque()
        for waits, events in self._acks:
            mine = []
            for ev in events:
                tp = (ev.message.topic, ev.message.partition)
                if tp in revoked:
                    waiting[tp] = min(waiting.get(tp, ev.message.offset), ev.message.offset)
                else:
                    mine.append(ev)
            kept.append((waits, mine))
        self._acks = kept

        def lowest_unacked(tp: tuple[str, int]) -> int | None:
            held = self.ledger.lowest_held(tp)
            queued = waiting.get(tp)
            return queued if held is None else held if queued is None else min(held, queued)

        floors = {tp: lowest_unacked(tp) for tp in revoked}
        self.gate.revoke(revoked, floors.__getitem__)
        log.info("revoked: oldest unacked offsets %s", {f"{t}:{p}": o for (t, p), o
                                                         in sorted(floors.items()) if o is not None})
        parts = {p for _, p in revoked}
        for sid in [s for s, p in self._home.items() if p in parts]:
            del self._home[sid]
        for p in parts:
            self._read_through.pop(p, None)
            self._fetched_at.pop(p, None)
        for tp in revoked:
            self._ends.pop(tp, None)
            aligner = self.aligners.pop(p, None)
            if aligner is not None:
                for k, v in aligner.stats.items():
                    self._retired_stats[k] += v
        dropped = self.ledger.drop_partitions(parts)
        if parts:
            log.info("partitions %s revoked: dropped %d held record(s); the owner replays them",
                     sorted(parts), dropped)

    async def flush_acks(self, timeout: float) -> None:
        """Wait until acks waiting for progress records are released (shutdown)."""
        waits = [w for ws, _ in self._acks for w in ws if not w.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)

    async def wait_for_room(self) -> None:
        """Backpressure: wait while too many windows are in flight in the sink."""
        while self.ledger.inflight() >= MAX_INFLIGHT_WINDOWS:
            self._room.clear()
            await self._room.wait()

    # --- introspection -------------------------------------------------------------
    def buffered(self) -> dict[str, float]:
        """What every aligner of this worker holds in memory (for the gauges)."""
        total: dict[str, float] = defaultdict(float)
        for a in self.aligners.values():
            for k, v in a.buffered().items():
                total[k] += v
        return dict(total)

    def aligner_stats(self) -> dict[str, float]:
        total: dict[str, float] = defaultdict(float, self._retired_stats)
        for a in self.aligners.values():
            for k, v in a.stats.items():
                total[k] += v
        return dict(total)

    def status_line(self) -> str:
        c = self.counters
        parts = sorted({p for _, p in self.gate.assigned})
        return (f"partitions={parts} events_in={c.get('events_in'):.0f} "
                f"windows={c.get('windows_published'):.0f}/{c.get('windows_emitted'):.0f} "
                f"held={self.ledger.held()} inflight={self.ledger.inflight()} "
                f"late={c.get('late'):.0f} duplicates={c.get('duplicates'):.0f} "
                f"replayed={c.get('replayed'):.0f} ignored={c.get('ignored'):.0f} "
                f"acks_refused={c.get('acks_refused'):.0f} "
                f"dead_letters={c.get('dead_letters'):.0f}")

    # --- internals -----------------------------------------------------------------
    def _aligner(self, partition: int) -> Aligner:
        aligner = self.aligners.get(partition)
        if aligner is None:
            # progress was read when the assignment resumed, before any record was let in;
            # the aligner reads this live map whenever a stream (re)opens, so an expired
            # stream never emits a published window again
            resume = self.progress
            aligner = self.aligners[partition] = Aligner(self.cfg, resume=resume)
            log.info("partition %d: aligner started (progress known for %d stream(s))",
                     partition, len(resume))
        return aligner

    def _poll(self, partition: int, aligner: Aligner, now: int,
              reading: tuple[bool, int | None] | None = None) -> None:
        # Idleness means "the source sent nothing", never "we could not read it". The
        # idle deadlines run on a clock that stands still while anything of the partition
        # is left to read (a backlog, records fetched but not yet processed, a re-read
        # after a hole, faust not fetching during a rebalance); watermarks still close
        # windows meanwhile. Time in which no fetch completed at all (broker away,
        # fetches failing) does not count toward idleness afterwards either: producers
        # deliver what they kept once the broker is back.
        behind, fetched = reading or self._note_stall(partition, aligner)
        last = self._read_through.get(partition)
        if not (behind or self.gate.catching_up(partition) or not self.flowing()):
            known = now if fetched is None else min(now, fetched)
            if last is None or known > last:
                last = self._read_through[partition] = known
        if last is None:
            last = self._read_through[partition] = now
        self._emit(partition, aligner.poll(last))

    def _note_stall(self, partition: int, aligner: Aligner,
                    fast: bool = False) -> tuple[bool, int | None]:
        """:meth:`_reading`, after pausing the aligner's idle clocks by the time in which
        no fetch of the partition completed (before records fetched after it are added)."""
        behind, fetched = self._reading(partition, fast)
        if fetched is not None:
            before = self._fetched_at.get(partition)
            if before is not None and fetched - before > FETCH_STALL_NS:
                aligner.pause(fetched - before)
                log.info("partition %d: nothing could be read for %.1f s; idle deadlines do "
                         "not count that time", partition, (fetched - before) / 1e9)
            self._fetched_at[partition] = fetched
        return behind, fetched

    def _reading(self, partition: int, fast: bool = False) -> tuple[bool, int | None]:
        """Whether anything fetched for ``partition``'s inputs (or known to exist) is left
        to process, and the oldest of their last fetches (ns; None: not known).

        ``fast`` (per record): below the end the consumer reported at the last look, the
        answer is "behind" without asking it again (the timer always asks)."""
        if self.fetch_state is None:
            return False, None
        if fast:
            for topic in self.modality_of:
                nxt = self.gate.next_offset((topic, partition))
                end = self._ends.get((topic, partition))
                if nxt is not None and end is not None and nxt < end:
                    return True, self._fetched_at.get(partition)
        behind, oldest = False, None
        for topic in self.modality_of:
            tp = (topic, partition)
            end, fetched_ns = self.fetch_state(tp)
            self._ends[tp] = end
            nxt = self.gate.next_offset(tp)
            if end is None or fetched_ns is None or nxt is None or nxt < end:
                behind = True
            if fetched_ns is None:
                return True, None
            oldest = fetched_ns if oldest is None else min(oldest, fetched_ns)
        return behind, oldest

    def _track_jumps(self) -> None:
        """Offsets the gate stepped over are acked in their turn, like a record."""
        for tp, start, end in self.gate.jumps():
            token = SkippedOffsets(tp[0], tp[1], start, end, self._ack_skipped)
            self._queue_acks(self.ledger.track_done(tp, start, token))

    def _emit(self, partition: int, windows: list[Window]) -> None:
        """Hand closed windows to the sink, then tell the ledger how far each stream closed
        (records needed only by windows that closed empty are free once earlier ones are
        published)."""
        for w in windows:
            for m in MODALITIES:
                if (w.stream_id, m) in self.ingest_ns:
                    w.quality[f"ingest_{m}_ms"] = round(self.ingest_ns[(w.stream_id, m)] / 1e6, 3)
            ticket = self.ledger.window_started(w.stream_id, w.start_ns, partition)
            self.counters.inc("windows_emitted")
            for m, ok in w.present.items():
                if not ok:
                    self.counters.inc("windows_masked", modality=m)
            fut = asyncio.ensure_future(self.sink.submit(w))
            fut.add_done_callback(lambda f, t=ticket: self._published(t, f))
        aligner = self.aligners[partition]
        for sid in self.ledger.waiting_streams(partition):
            self._queue_acks(self.ledger.closed(sid, aligner.closed_before(sid), partition))

    def _published(self, ticket: Ticket, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return  # shutting down: the inputs stay unacked and are replayed
        exc = fut.exception()
        if exc is not None:
            log.error("could not publish window %s@%d: %r", ticket.stream_id, ticket.start_ns,
                      exc)
            self.crash(exc)
            return
        self.counters.inc("windows_published")
        done = self.ledger.window_published(ticket)
        # progress must be durable before the inputs are acked (so committed input never
        # runs ahead of recorded progress)
        waits = []
        for sid, start in done.progress.items():
            self.progress[sid] = start
            waits.append(self.record_progress(sid, start))
        self._queue_acks(done.acks, waits)
        if self.ledger.inflight() < MAX_INFLIGHT_WINDOWS:
            self._room.set()

    def _dead_letter(self, tp: tuple[str, int], offset: int, event: Any,
                     rec: wire.KafkaRecord, reason: str, kind: str) -> None:
        entry = self.ledger.track(tp, offset, event)
        rec, reason = _fit_dead_letter(_printable_headers(rec), reason,
                                       self.settings.max_message_bytes)
        self.counters.inc("dead_letters", kind=kind)
        n = int(self.counters.get("dead_letters", kind=kind))
        if n <= DEAD_LETTERS_LOGGED or n % 100 == 0:  # a broken producer must not flood the log
            log.warning("dead letter (%s) #%d %s:%d/%d: %s", kind, n, tp[0], tp[1], offset,
                        reason)
            if n == DEAD_LETTERS_LOGGED:
                log.warning("from now on every 100th %s dead letter is logged; the counters "
                            "and the dead-letter topic have them all", kind)
        fut = asyncio.ensure_future(self.send_dead_letter(wire.make_dead_letter(rec, reason, kind)))
        fut.add_done_callback(lambda f, e=entry: self._dead_letter_sent(e, f))

    def _dead_letter_sent(self, entry: Entry, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.error("could not send a dead letter: %r", fut.exception())
            self.crash(fut.exception())  # type: ignore[arg-type]
            return
        self._queue_acks(self.ledger.release(entry))

    def _queue_acks(self, events: list[Any], waits: list[asyncio.Future] | None = None) -> None:
        """Ack in the order the ledger released, each batch once its progress is durable."""
        if not events and not waits:
            return
        self._acks.append((waits or [], events))
        for w in waits or ():
            w.add_done_callback(self._release_acks)
        self._release_acks()

    def _release_acks(self, _fut: asyncio.Future | None = None) -> None:
        while self._acks:
            waits, events = self._acks[0]
            if not all(w.done() for w in waits):
                return
            for w in waits:
                exc = w.exception() if not w.cancelled() else asyncio.CancelledError()
                if exc is not None:
                    log.error("could not record progress: %r", exc)
                    self.crash(exc)
                    return  # never ack past a progress record that is not durable
            self._acks.popleft()
            self._releasing = True
            try:
                for ev in events:
                    ev.ack()
            finally:
                self._releasing = False

    def guard_consumer(self, consumer: Any) -> None:
        """Let only the ledger make input offsets committable; learn where each input
        partition resumes.

        faust acks a record it skips itself (flow control suspended by a rebalance or a
        shutdown, or a record of an older consumer generation) and would then commit past
        it while the record was never processed; it also treats offsets it believes it
        skipped as committable. Both are refused here for the input topics, so a record
        stays uncommitted until its windows are done, and Kafka delivers it again.
        """
        if getattr(consumer, "_streamproc_guarded", False):
            return
        faust_ack = consumer.ack
        faust_add_gap = consumer._add_gap
        faust_seek_to_committed = consumer.seek_to_committed

        def ack(message: Any) -> bool:
            if message.topic in self.modality_of and not self._releasing:
                self.counters.inc("acks_refused")
                return False
            return faust_ack(message)

        async def add_gap(tp: Any, offset_from: int, offset_to: int) -> None:
            # faust marks offsets it did not see (compaction, transaction markers) as
            # committable; around a rebalance it also "sees" gaps that are only leftovers
            # arriving after its seek, and would commit records nobody processed. For the
            # input topics the agent marks the real ones itself, in their turn (the
            # fetcher reports them: FETCH_SKIPS): ignore faust's guesses.
            if tp.topic in self.modality_of:
                self.counters.inc("gaps_ignored")
                return
            await faust_add_gap(tp, offset_from, offset_to)

        async def seek_to_committed() -> Mapping[Any, int]:
            # faust calls this when it resumes an assignment (right after
            # on_rebalance_complete), to seek to the committed offsets: that is where each
            # input partition starts again. (It also calls it from its fetch loop while
            # its flow is stopped; nothing to learn then.)
            committed = await faust_seek_to_committed()
            tps = [tp for tp in consumer.assignment() if tp.topic in self.modality_of]
            if tps and self.resuming:
                self.resuming = False
                start = {tp: committed.get(tp) for tp in tps}
                missing = [tp for tp, off in start.items() if off is None]
                if missing:  # nothing committed yet: the group starts at the earliest
                    start.update(await consumer.earliest_offsets(*missing))
                end = await consumer.highwaters(*tps)
                self.on_resume({(tp.topic, tp.partition): off for tp, off in start.items()},
                               {(tp.topic, tp.partition): off for tp, off in end.items()})
                for tp in tps:  # what came while this ran was ignored: read it again
                    nxt = self.gate.next_offset((tp.topic, tp.partition))
                    if nxt is not None:
                        await consumer.seek(tp, nxt)
            return committed

        def ack_skipped(tp: tuple[str, int], start: int, end: int) -> object:
            return asyncio.ensure_future(faust_add_gap(TP(*tp), start, end - 1))

        self._ack_skipped = ack_skipped
        consumer.ack = ack
        consumer._add_gap = add_gap
        consumer.seek_to_committed = seek_to_committed
        # faust drops a fetched record whose offset is below the last one it handed on
        # (_read_offset); around seeks that silently drops the re-read of records the
        # agent still needs. For the input topics it hands on everything and the gate
        # decides (its fetch loop binds the mapping when it starts, after this).
        consumer._read_offset = _HandOnEverything(set(self.modality_of), consumer._read_offset)
        consumer._streamproc_guarded = True


class _HandOnEverything(defaultdict):
    """faust's per-partition read positions, reading as "none" for the input topics."""

    def __init__(self, topics: set[str], current: Mapping[Any, int | None]) -> None:
        super().__init__(lambda: None, current)
        self.topics = topics

    def __getitem__(self, tp: Any) -> int | None:
        if tp.topic in self.topics:
            return None
        return super().__getitem__(tp)


# ---------------------------------------------------------------------------------------
# the faust app
# ---------------------------------------------------------------------------------------


def _credentials(settings: Settings) -> CredentialsT | None:
    kw = settings.security_kwargs()
    ctx = kw.get("ssl_context")
    if settings.sasl_mechanism:
        return faust.SASLCredentials(username=settings.sasl_username,
                                     password=settings.sasl_password, ssl_context=ctx,
                                     mechanism=settings.sasl_mechanism)
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def data_dir(settings: Settings) -> Path:
    return Path(settings.data_dir).expanduser() if settings.data_dir else (
        Path.home() / ".cache" / "streamproc" / "worker")


def create_app(settings: Settings, *, partitions: int | None = None,
               sink: WindowSink | None = None, predictor: Predictor | None = None,
               metrics: Metrics | None = None) -> faust.App:
    """The worker's faust app; ``app.streamproc`` is its :class:`AlignState`.

    ``partitions``: the input topics' partition count (the progress topic gets the
    same, so progress for a stream lives on its stream's partition). With a
    ``predictor`` windows go through micro-batched inference (:class:`InferenceSink`);
    without one the worker is align-only and publishes window summaries.
    """
    n = partitions or settings.partitions
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.bootstrap_servers.split(",")],
        broker_credentials=_credentials(settings),
        store="memory://",
        autodiscover=False,
        datadir=str(data_dir(settings)),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=n,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,  # no extra 1-partition topic in our consumer group
        # No tables here; with standby replicas > 0 faust still uses its own assignor,
        # which gives co-partitioned topics' partitions p to one worker (aiokafka's
        # round-robin, its choice otherwise, does not).
        table_standby_replicas=1,
        # Held (unacked) records are ours to release; never block a rebalance on them, and
        # never let faust ack a record behind our back (it would commit past held ones).
        stream_wait_empty=False,
        stream_ack_exceptions=False,
        stream_ack_cancelled_tasks=False,
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_ms / 1000 / 5),
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=settings.max_message_bytes,
        consumer_max_fetch_size=settings.max_message_bytes,
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,
    )
    metrics = metrics if metrics is not None else Metrics()
    counters = metrics.counters
    inputs = app.topic(*settings.input_topics, key_type=bytes, value_type=bytes)
    predictions = app.topic(settings.topic("predictions"), key_type=bytes, value_type=bytes)
    dead_letters = app.topic(settings.topic("deadletter"), key_type=bytes, value_type=bytes)
    # Per stream (key: the stream id, UTF-8), the start of its last published window
    # (value: ASCII decimal ns). Compacted: the latest value per stream stays.
    progress = app.topic(progress_topic(settings), key_type=bytes, value_type=bytes,
                         partitions=n, replicas=settings.replication_factor,
                         compacting=True, deleting=False, internal=True)
    headers = (("sp-worker", WORKER_ID.encode()),
               *prediction_headers(settings, ALIGN_ONLY_MODEL if predictor is None
                                   else predictor.info))
    if sink is None and predictor is not None:
        sink = InferenceSink(
            predictor, lambda rec: publish(predictions, rec), model_info=predictor.info,
            max_batch=settings.batch_size, max_wait_ms=settings.batch_max_wait_ms,
            metrics=metrics, headers=headers)
    sink = sink or SummarySink(predictions, headers)
    app.streamproc_metrics = metrics  # type: ignore[attr-defined]
    patch_fetcher()
    client_faults = ClientFaults()
    client_faults.install()

    crashing: list[asyncio.Future] = []

    def crash(exc: BaseException) -> None:
        if not crashing:  # the first error is the one worth reporting
            crashing.append(asyncio.ensure_future(app.crash(exc)))

    async def send_progress(stream_id: str, start_ns: int) -> None:
        rec = wire.KafkaRecord(stream_id.encode("utf-8"), str(start_ns).encode("ascii"))
        await publish(progress, rec)

    state = AlignState(settings, sink, lambda rec: publish(dead_letters, rec),
                       ProgressWriter(send_progress).record, counters, crash,
                       flowing=lambda: app.flow_control.is_active(),
                       fetch_state=consumer_fetch_state(app))
    app.streamproc = state  # type: ignore[attr-defined]

    @app.agent(inputs, concurrency=1)
    async def align(stream: faust.StreamT) -> None:
        try:
            async for event in stream.noack().events():
                state.on_event(event)
                await state.seek_back(app.consumer)
                await state.wait_for_room()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let faust restart us with acks in disorder
            log.exception("agent failed; stopping the worker so a restart replays safely")
            await app.crash(exc)
            raise

    @app.timer(interval=TICK_S)
    async def close_idle_windows() -> None:
        state.on_tick()

    @app.timer(interval=1.0)
    async def client_fault_log() -> None:
        client_faults.tick()

    @app.timer(interval=STATUS_EVERY_S)
    async def status() -> None:
        log.info("status: %s", state.status_line())

    fetch_state = state.fetch_state
    gauge_failed: list[bool] = []

    @app.timer(interval=GAUGES_EVERY_S)
    async def gauges() -> None:
        # Metrics must never take the worker down: the consumer's numbers are missing
        # around an assignment (highwater None before the first fetch) and its internals
        # may change; a failure is logged once and the gauges keep their last values.
        try:
            update_gauges(app.consumer, fetch_state, settings, metrics, state.buffered())
        except Exception:
            if not gauge_failed:
                gauge_failed.append(True)
                log.exception("could not update the gauges (logged once; the worker goes on)")

    @app.task
    async def start_sink() -> None:
        await sink.start()

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: faust.App, revoked: set, **kwargs: Any) -> None:
        state.on_revoked((tp.topic, tp.partition) for tp in revoked)

    declared: list[bool] = []

    @app.on_rebalance_complete.connect
    async def on_resume(sender: faust.App, **kwargs: Any) -> None:
        # faust is about to resume the assignment (partitions still paused): read every
        # stream's durable progress, so new aligners start after what was published.
        if not declared:
            await progress.maybe_declare()
            declared.append(True)
        state.progress = await read_progress(settings)
        state.resuming = True

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: faust.App, assigned: set, **kwargs: Any) -> None:
        by_topic: dict[str, set[int]] = {t: set() for t in settings.input_topics}
        for tp in assigned:
            if tp.topic in by_topic:
                by_topic[tp.topic].add(tp.partition)
        parts = set().union(*by_topic.values())
        if any(p != parts for p in by_topic.values()):
            exc = UserError("input partitions assigned to this worker are not co-partitioned: "
                            + ", ".join(f"{t}={sorted(p)}" for t, p in by_topic.items()))
            log.error("%s", exc)
            await app.crash(exc)
            return
        state.guard_consumer(app.consumer)  # before any record of this assignment flows
        shorten_fetch_wait(app.consumer)
        read_committed(app.consumer)
        state.on_assigned((tp.topic, tp.partition) for tp in assigned)
        log.info("partitions assigned: %s", sorted(parts))

    @app.on_before_shutdown.connect
    async def drain(sender: faust.App, **kwargs: Any) -> None:
        # Let in-flight windows finish so their inputs are acked before the last commit.
        await sink.stop()
        await state.flush_acks(timeout=30)
        log.info("final status: %s", state.status_line())
        try:
            await app.producer.flush()
            await app.consumer.commit()
        except Exception as exc:  # best effort: uncommitted input is replayed on restart
            log.warning("final commit failed (%r); records will be replayed", exc)

    return app


def update_gauges(consumer: Any, fetch_state: FetchState | None, settings: Settings,
                  metrics: Metrics, buffered: Mapping[str, float]) -> None:
    """Consumer lag (end offset minus committed offset, per assigned input partition; left
    as it was while the end is unknown) and what the aligners hold."""
    for tp in list(consumer.assignment()):
        if tp.topic not in settings.input_topics or fetch_state is None:
            continue
        end, _ = fetch_state((tp.topic, tp.partition))
        if end is None:
            continue
        committed = consumer._committed_offset.get(tp)  # faust keeps it; no public API
        lag = end - (committed if committed is not None else 0)
        metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, lag))
    for kind, value in buffered.items():
        metrics.buffered.labels(kind).set(value)


def progress_topic(settings: Settings) -> str:
    """The worker group's progress topic (compacted; created by the worker)."""
    return f"{settings.app_id}-progress"


async def read_progress(settings: Settings) -> dict[str, int]:
    """Every stream's last published window, read from the progress topic to its end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streamproc.topics import describe

    topic = progress_topic(settings)
    (state,) = await asyncio.get_running_loop().run_in_executor(
        None, describe, settings, (topic,))
    if not state.partitions:
        return {}
    tps = [TopicPartition(topic, p) for p in range(state.partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers.split(","),
                                enable_auto_commit=False, **settings.security_kwargs())
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: dict[str, int] = {}
        pending = {tp for tp in tps if end[tp] > 0}
        while pending:
            for msgs in (await consumer.getmany(*pending, timeout_ms=1000)).values():
                for m in msgs:
                    if m.key and m.value:
                        try:
                            out[m.key.decode("utf-8")] = int(m.value)
                        except ValueError:  # not ours: must not stop every resume
                            log.warning("ignoring a record of %s that is not progress: "
                                        "%r=%r", topic, m.key[:64], m.value[:64])
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


def input_partitions(settings: Settings) -> int:
    """Check the topics (co-partitioned, present) and return the input partition count."""
    from streamproc.topics import check_topics

    states = check_topics(settings)
    return next(s.partitions for s in states if s.name == settings.topic("video"))


def run_worker(settings: Settings) -> int:
    """``streamproc worker``: check topics, load the model, then run until SIGTERM / Ctrl-C."""
    n = input_partitions(settings)
    predictor = None
    notes: list[tuple[int, str]] = []  # logged once faust has set up logging
    if settings.model:
        predictor = Predictor(settings.model, settings.device)
        k = predictor.preprocess.frames_per_window
        if k != settings.frames_per_window:
            notes.append((logging.INFO, f"frames_per_window: using the model's K={k} "
                                        f"(settings said {settings.frames_per_window})"))
            settings = settings.replace(frames_per_window=k)
        mismatches = predictor.preprocess.mismatches(settings)
        if mismatches:
            raise UserError(f"model {settings.model} does not fit these window settings: "
                            + "; ".join(mismatches) + " (change the settings to match)")
        notes.append((logging.INFO, f"serving model {predictor.info['name']} version "
                                    f"{predictor.info['version']} from {settings.model} on "
                                    f"{predictor.device}"))
    else:
        notes.append((logging.WARNING, "NO MODEL: --model is empty, so this worker is "
                      "ALIGN-ONLY: its predictions are window summaries with empty labels "
                      "and scores. Give --model a checkpoint (`streamproc demo` trains one "
                      "into ~/.cache/streamproc/demo/model) to get labels."))
    model_info = predictor.info if predictor is not None else ALIGN_ONLY_MODEL
    notes += [(logging.WARNING, line) for line in other_groups(settings, model_info)]
    metrics = Metrics()
    try:
        metrics.serve(settings.metrics_port)
    except OSError as e:
        raise UserError(f"cannot serve metrics on port {settings.metrics_port}: {e} "
                        "(--metrics-port 0 turns the endpoint off)") from None
    app = create_app(settings, partitions=n, predictor=predictor, metrics=metrics)
    notes.insert(0, (logging.INFO, f"worker {WORKER_ID}: app {settings.app_id} on "
                                   f"{settings.bootstrap_servers}, {n} partitions"))
    log_when_started(app, notes)
    from faust.worker import Worker

    worker = Worker(app, loglevel=settings.log_level.upper(), quiet=True)
    worker.execute_from_commandline()  # exits the process (0, or 1 after a crash)
    return 0
