"""Everything the worker changes inside faust-streaming and aiokafka, in one place.

These replace or wrap private parts of the two libraries, so they are written against the
pinned versions and :func:`check_versions` refuses others at start-up:

- the fetcher survives header names that are not UTF-8, reports the offsets it skips and
  checksums batches with the CPU's CRC instruction (:func:`patch_fetcher`,
  :data:`FETCH_SKIPS`);
- the consumer reads committed data only (:func:`read_committed`) and holds empty fetches
  briefly (:func:`shorten_fetch_wait`);
- the consumer's ``ack``, ``_add_gap``, ``seek_to_committed`` and ``_read_offset`` leave
  the input topics' commits to the worker core (:func:`guard_consumer`);
- the consumer's fetch loop hands the worker core whole batches of input records instead
  of one record at a time through faust's streams (:func:`drain_in_batches`);
- aiokafka's connections receive a large response straight into a buffer of its size,
  and a fetch's record batches are read in place from it (:func:`patch_connections`,
  :func:`patch_fetcher`).

docs/worker.md says why each is needed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from importlib import metadata
from types import SimpleNamespace
from typing import Any, SupportsIndex

import crc32c
import faust
import numpy as np
from aiokafka import conn as aiokafka_conn
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.protocol import fetch as aiokafka_fetch
from aiokafka.protocol import types as aiokafka_types
from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchPy
from aiokafka.record.legacy_records import LegacyRecordBatch
from faust.types import TP
from numpy._core import multiarray as np_multiarray

from streamproc.errors import UserError
from streamproc.wire.codec import KafkaRecord
from streamproc.worker.core import TP as TopicPartition
from streamproc.worker.core import Consumed, FetchState, WorkerCore
from streamproc.worker.interleave import Interleaver

log = logging.getLogger("streamproc.worker")

#: The versions these patches were written and tested against (pyproject.toml pins them).
TESTED_VERSIONS = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}


def check_versions(installed: Mapping[str, str] | None = None) -> None:
    """Refuse faust-streaming or aiokafka versions the patches were not tested against
    (``installed``: name -> version; the installed distributions when None)."""
    for name, tested in TESTED_VERSIONS.items():
        have = installed[name] if installed is not None else metadata.version(name)
        if have != tested:
            raise UserError(f"{name} {have} is installed, but the worker patches its internals "
                            f"and was tested with {name}=={tested} only: install that "
                            f"version (pip install '{name}=={tested}')")


#: Longest the broker holds a fetch whose partitions have nothing new (faust hard-codes
#: 1500 ms). See :func:`shorten_fetch_wait`.
FETCH_MAX_WAIT_MS = 100


def shorten_fetch_wait(consumer: Any, wait_ms: int = FETCH_MAX_WAIT_MS) -> None:
    """Let the broker hold an empty fetch at most ``wait_ms`` instead of faust's 1500 ms.

    faust takes a partition whose stream buffer is under pressure out of the fetches
    (records of a big fetch pile up quickly); the next fetch then asks only for partitions
    with nothing new, the broker holds it for the whole wait, and aiokafka sends no other
    fetch to that broker meanwhile. A worker catching up on a backlog stalled that way
    again and again (benchmarks/bench_pipeline.py: 78 -> about 140 windows/s align-only).
    An idle worker now fetches ten times a second instead of once in 1.5 s: negligible.
    """
    inner: Any = getattr(getattr(consumer, "_thread", None), "_consumer", None)
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
#: consumer's fetcher, drained by the worker core (``WorkerCore.take_fetch_skips``).
#: Bounded: a report lost to the bound only costs a seek back, which fetches (and reports)
#: the range again.
FETCH_SKIPS: deque[tuple[str, int, int, int]] = deque(maxlen=100_000)


class _ReportingPartitionRecords(aiokafka_fetcher.PartitionRecords):
    """aiokafka's records of one fetched partition, reporting the offsets it skips.

    The agent processes each input offset in turn (acks.OffsetGate); without this, an
    offset the fetcher legitimately never delivers looks like a hole to seek back over.
    """

    def _unpack_records(self):
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
    def __getitem__(self, i):
        v = bytearray.__getitem__(self, i)
        return _SurrogateBytes(v) if isinstance(i, slice) else v


class _LenientBatch(_DefaultRecordBatchPy):
    """aiokafka's pure-Python record batch, reading header names that are not UTF-8.

    aiokafka decodes header names strictly, and one record with a name like ``ff fe``
    crashes the fetcher (and the worker again after every restart). Its Python batch
    slices header names from ``self._buffer``; this buffer's slices decode leniently.
    """

    _buffer: bytearray

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        super().__init__(buffer)
        self._buffer = _LenientBuffer(self._buffer)

    def _maybe_uncompress(self) -> None:
        super()._maybe_uncompress()
        if type(self._buffer) is not _LenientBuffer:
            self._buffer = _LenientBuffer(self._buffer)


class _LenientBatchView:
    """One batch: read whole by aiokafka's fast (C) reader, or, if that refuses a header
    name, by the lenient Python reader of the same bytes. Iterating it is iterating a list
    (no Python call per record: this is the fetch's hot path)."""

    def __init__(self, batch: Any, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._records: Iterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def validate_crc(self) -> bool:
        # The same check as aiokafka's C reader, whose CRC-32C is table-driven (about
        # 0.6 ms per MB here, a quarter of the consumer thread on W1); the crc32c package
        # uses the CPU's CRC instruction (0.04 ms per MB). It covers the batch from its
        # attributes (byte 21) to its end; the checksum is stored at bytes 17-20.
        raw = self._raw
        return crc32c.crc32c(raw[21:]) == struct.unpack_from(">I", raw, 17)[0]

    def _read(self) -> Iterator[Any]:
        if self._records is None:
            try:
                records = list(self._batch)
            except UnicodeDecodeError:
                records = list(_LenientBatch(self._raw))
            self._records = iter(records)
        return self._records

    def __iter__(self) -> Iterator[Any]:
        return self._read()

    def __next__(self) -> Any:
        return next(self._read())


class _LenientMemoryRecords:
    """aiokafka's MemoryRecords walked in place: batches are views into the fetched bytes
    (no copy), read by aiokafka's C batch reader, and survive header names that are not
    UTF-8. The walk is aiokafka's own (``_MemoryRecordsPy``): every format keeps a
    batch's length at byte 8 and its magic at byte 16."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = data if type(data) is memoryview else memoryview(data)
        self._pos = 0  # where the next batch starts: batches lie back to back
        self._next: memoryview | None = None
        self._cache_next()

    def _cache_next(self) -> None:
        data, pos = self._data, self._pos
        if len(data) - pos < _LOG_OVERHEAD:  # a partial batch ends a fetch: fetched again
            self._next = None
            return
        end = pos + _LOG_OVERHEAD + struct.unpack_from(">i", data, pos + 8)[0]
        if end > len(data):
            self._next = None
            return
        self._next, self._pos = data[pos:end], end

    def size_in_bytes(self) -> int:
        return len(self._data)

    def has_next(self) -> bool:
        return self._next is not None

    def next_batch(self) -> Any:
        raw = self._next
        if raw is None:
            return None
        if len(raw) < _MIN_BATCH:
            raise CorruptRecordException("Record size is less than the minimum record "
                                         f"overhead ({_MIN_BATCH - _LOG_OVERHEAD})")
        self._cache_next()
        magic = raw[16]
        if magic < 2:
            return LegacyRecordBatch(raw, magic)  # message format v0/v1 has no headers
        return _LenientBatchView(DefaultRecordBatch(raw), raw)


_LOG_OVERHEAD = 12  # a batch's offset and length fields
_MIN_BATCH = _LOG_OVERHEAD + 14  # the smallest record (format v0): aiokafka's bound


class _ResponseReader:
    """A response as aiokafka's parsers read it (``read(n)``, as from a BytesIO), except
    that a fetch's record batches are taken as a view into the response, not copied out
    of it (:class:`_RecordBatches`). That copy was a twentieth of the worker's time on W1
    (docs/benchmarks.md, *Peers*); the batch reader copies each record's value anyway."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)  # a large response is a view of a buffer (FrameReader)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        return self.view(len(self._data) if n < 0 else n).tobytes()

    def view(self, n: int) -> memoryview:
        start = self._pos
        self._pos = min(start + n, len(self._data))
        return self._data[start:self._pos]


class _RecordBatches(aiokafka_types.Bytes):
    """A fetch response's record batches (its ``message_set``): a view into the response
    when it is read by a :class:`_ResponseReader`."""

    @classmethod
    def decode(cls, data: Any) -> bytes | memoryview | None:
        if type(data) is not _ResponseReader:
            return super().decode(data)
        length = aiokafka_types.Int32.decode(data)
        if length < 0:
            return None
        value = data.view(length)
        if len(value) != length:
            raise ValueError("Buffer underrun decoding Bytes")
        return value

    @classmethod
    def repr(cls, value: Any) -> str:  # aiokafka's debug log of a response
        return super().repr(None if value is None else bytes(value[:101]))


def _read_batches_in_place(schema: Any) -> None:
    """Every ``message_set`` field under ``schema`` read as :class:`_RecordBatches`."""
    if isinstance(schema, aiokafka_types.Array):
        _read_batches_in_place(schema.array_of)
    elif isinstance(schema, aiokafka_types.Schema):
        schema.fields = tuple(
            _RecordBatches if name == "message_set" and field is aiokafka_types.Bytes else field
            for name, field in zip(schema.names, schema.fields, strict=True))
        for field in schema.fields:
            _read_batches_in_place(field)


def patch_fetcher() -> None:
    """Make aiokafka's fetcher survive any header bytes, report the offsets it skips and
    read record batches where they lie in the response (idempotent; process-wide: one
    worker per process)."""
    aiokafka_fetcher.MemoryRecords = _LenientMemoryRecords
    for name, response in vars(aiokafka_fetch).items():
        if name.startswith("FetchResponse_v"):
            _read_batches_in_place(response.SCHEMA)
    aiokafka_fetcher.PartitionRecords = _ReportingPartitionRecords


#: A read at least this long is received straight into a buffer of its own size.
DIRECT_READ_MIN = 64 * 1024


# numpy's switch for asking the kernel for transparent huge pages (madvise) for arrays of
# 4 MiB and more, set at import from NUMPY_MADVISE_HUGEPAGE (None in a numpy without it)
_set_madvise_hugepage: Callable[[bool], bool] | None = getattr(
    np_multiarray, "_set_madvise_hugepage", None)


def receive_buffer(n: int) -> memoryview:
    """``n`` writable bytes for a response to be received into, not zero-filled.

    numpy's empty array is malloc'd, not zero-filled as a bytearray is: filling megabytes
    with zeros cost about as much as the copy a direct read saves. numpy would also ask
    for huge pages for it; a buffer written once and dropped gains nothing from them, and
    each 2 MiB page is zeroed whole at its first touch: without them the worker's CPU per
    record was about 5 % lower over 12 alternated pairs, within the spread of single runs
    (docs/benchmarks.md, *Peers*). Other arrays keep numpy's default.
    """
    if _set_madvise_hugepage is None:
        return np.empty(n, np.uint8).data
    was = _set_madvise_hugepage(False)
    try:
        return np.empty(n, np.uint8).data
    finally:
        _set_madvise_hugepage(was)


class FrameReader(asyncio.StreamReader):
    """aiokafka's connection reader: a large response is received straight into a buffer
    of its size, smaller reads are copied once.

    aiokafka reads a response as ``readexactly(4)`` then ``readexactly(size)``. asyncio's
    reader copies every byte received three more times on the way (into its buffer, out
    as a slice, into bytes, then moves the rest down), and past 128 KiB held pauses and
    resumes the socket for each chunk: on a stream of large fetch responses that was
    about half of the consumer thread's time (docs/benchmarks.md, *Peers*). This one
    keeps small chunks as they arrive and joins a read's chunks once; a read of
    :data:`DIRECT_READ_MIN` bytes or more gets a buffer of its size that the socket
    fills itself (``recv_into``, through :class:`_FrameProtocol`), so a fetch response's
    megabytes are not copied in Python at all. aiokafka only reads whole responses it
    asked for, so nothing piles up unread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into the first chunk: where the unread bytes begin
        self._held = 0  # unread bytes in the chunks
        self._scratch = bytearray(DIRECT_READ_MIN)  # what the socket fills between reads
        self._target: memoryview | None = None  # the large read being received, if any
        self._filled = 0  # of the target
        self._into_target = False  # the buffer the transport fills is the target's rest

    # --- what the transport calls --------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        target = self._target
        # a full target waits for its reader to resume: the next bytes are another read's
        if target is not None and self._filled < len(target):
            self._into_target = True
            return target[self._filled:]
        self._into_target = False
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_target:
            assert self._target is not None
            self._filled += nbytes
            if self._filled == len(self._target):
                self._wakeup_waiter()  # type: ignore[attr-defined]
        else:
            self.feed_data(bytes(memoryview(self._scratch)[:nbytes]))

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        if not data:
            return
        if type(data) is not bytes:  # a transport's own buffer would change under us
            data = bytes(data)
        target = self._target
        if target is not None:
            k = min(len(target) - self._filled, len(data))
            target[self._filled:self._filled + k] = memoryview(data)[:k]
            self._filled += k
            data = data[k:]
            if self._filled == len(target):
                self._wakeup_waiter()  # type: ignore[attr-defined]
            if not data:
                return
        self._chunks.append(data)
        self._held += len(data)
        self._wakeup_waiter()  # type: ignore[attr-defined]

    # --- what aiokafka calls --------------------------------------------------------
    def at_eof(self) -> bool:
        return self._eof and not self._held  # type: ignore[attr-defined]

    async def readexactly(self, n: int) -> bytes | memoryview:  # type: ignore[override]
        if n < 0:  # a length prefix with its top bit set: the stream is out of step
            raise ValueError("readexactly size can not be less than zero")
        if self._exception is not None:  # type: ignore[attr-defined]
            raise self._exception  # type: ignore[attr-defined]
        if self._held < n and n >= DIRECT_READ_MIN:
            return await self._receive(n)
        while self._held < n:
            if self._eof:  # type: ignore[attr-defined]
                raise asyncio.IncompleteReadError(self._take(self._held), n)
            await self._wait_for_data("readexactly")  # type: ignore[attr-defined]
        return self._take(n)

    async def _receive(self, n: int) -> memoryview:
        """A large read: what is held, then the socket's bytes received in place."""
        target = receive_buffer(n)
        held = self._held
        target[:held] = self._take(held)
        self._target, self._filled = target, held
        try:
            while self._filled < n:
                if self._eof:  # type: ignore[attr-defined]
                    raise asyncio.IncompleteReadError(bytes(target[:self._filled]), n)
                await self._wait_for_data("readexactly")  # type: ignore[attr-defined]
        finally:  # cancelled or failed: the connection is closing, its bytes are moot
            self._target = None
        return target

    async def read(self, n: int = -1) -> bytes:
        raise NotImplementedError("FrameReader reads whole responses: readexactly only")

    async def readline(self) -> bytes:
        raise NotImplementedError("FrameReader reads whole responses: readexactly only")

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        raise NotImplementedError("FrameReader reads whole responses: readexactly only")

    def _take(self, n: int) -> bytes:
        if n == 0:
            return b""
        chunks, start = self._chunks, self._offset
        self._held -= n
        first = chunks[0]
        end = start + n
        if end <= len(first):
            if end == len(first):
                chunks.popleft()
                self._offset = 0
                return first if start == 0 else first[start:]
            self._offset = end
            return first[start:end]
        parts: list[bytes | memoryview] = [memoryview(first)[start:]]
        chunks.popleft()
        need = end - len(first)
        self._offset = 0
        while need:
            chunk = chunks[0]
            if len(chunk) <= need:
                parts.append(chunks.popleft())
                need -= len(chunk)
            else:
                parts.append(memoryview(chunk)[:need])
                self._offset, need = need, 0
        return b"".join(parts)


class _FrameProtocol(aiokafka_conn.AIOKafkaProtocol, asyncio.BufferedProtocol):
    """aiokafka's connection protocol, letting the socket write into its
    :class:`FrameReader`'s buffers (asyncio's transports read with ``recv_into`` for a
    buffered protocol)."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._stream_reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._stream_reader.buffer_updated(nbytes)


async def _connect(self: Any) -> Any:
    # aiokafka.conn.AIOKafkaConnection.connect, reading with a FrameReader
    loop = self._loop
    self._closed_fut = aiokafka_conn.create_future()
    if self._security_protocol in ["PLAINTEXT", "SASL_PLAINTEXT"]:
        ssl = None
    else:
        assert self._security_protocol in ["SSL", "SASL_SSL"]
        assert self._ssl_context is not None
        ssl = self._ssl_context
    reader = FrameReader(loop)
    protocol = _FrameProtocol(self._closed_fut, reader, loop=loop)
    async with aiokafka_conn.async_timeout.timeout(self._request_timeout):
        transport, _ = await loop.create_connection(
            lambda: protocol, self.host, self.port, ssl=ssl)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    self._reader, self._writer, self._protocol = reader, writer, protocol
    self._read_task = self._create_reader_task()
    if self._max_idle_ms is not None:
        self._idle_handle = loop.call_soon(self._idle_check, aiokafka_conn.weakref.ref(self))
    try:
        await self._do_version_lookup()
        if self._security_protocol in ["SASL_SSL", "SASL_PLAINTEXT"]:
            await self._do_sasl_handshake()
    except BaseException:
        self.close()
        raise
    return reader, writer


def patch_connections() -> None:
    """Make aiokafka's connections read responses with a :class:`FrameReader` and parse
    them from a :class:`_ResponseReader` (idempotent; process-wide: every aiokafka client
    in the worker's process)."""
    aiokafka_conn.AIOKafkaConnection.connect = _connect
    # conn.py names ``io`` only to wrap each response in a BytesIO for its parsers
    aiokafka_conn.io = SimpleNamespace(BytesIO=_ResponseReader)


def read_committed(consumer: Any) -> None:
    """Read only committed data, as Kafka's own consumers of transactional topics do.

    Another application may write transactions into the input topics; aborted records must
    never reach a window. faust picks read_committed only for its exactly-once mode, so it
    is set on aiokafka's consumer here, before the first fetch of the assignment.
    """
    inner: Any = getattr(getattr(consumer, "_thread", None), "_consumer", None)
    fetcher = getattr(inner, "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "_isolation_level"):
        log.warning("cannot read committed data only: faust/aiokafka internals changed")
        return
    fetcher._isolation_level = aiokafka_fetcher.READ_COMMITTED
    inner._isolation_level = "read_committed"



def consumer_fetch_state(app: faust.App) -> FetchState:
    """Read from the app's aiokafka consumer how far each input partition can be read and
    when it was last fetched (never raises: unknown is "not known yet")."""

    def state(tp: TopicPartition) -> tuple[int | None, int | None]:
        try:
            # faust's Consumer keeps its aiokafka consumer in its thread: no public API
            inner = app.consumer._thread._consumer  # type: ignore[attr-defined]
            ktp = TP(*tp)
            # the log end, not the last stable offset: records behind another
            # application's open transaction exist and will come, so nothing is idle
            end = inner.highwater(ktp)
            fetched_ms = inner.last_poll_timestamp(ktp)
        except Exception:  # not assigned (yet), or mid-rebalance
            return None, None
        return end, None if fetched_ms is None else fetched_ms * 1_000_000

    return state




def take_over(consumer: Any, core: WorkerCore) -> None:
    """Everything the worker changes in faust's consumer when partitions are assigned,
    before any record of the assignment flows (idempotent)."""
    guard_consumer(consumer, core)
    shorten_fetch_wait(consumer)
    read_committed(consumer)


def guard_consumer(consumer: Any, core: WorkerCore) -> None:
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
        if message.topic in core.modality_of and not core.releasing:
            core.counters.inc("acks_refused")
            return False
        return faust_ack(message)

    async def add_gap(tp: Any, offset_from: int, offset_to: int) -> None:
        # faust marks offsets it did not see (compaction, transaction markers) as
        # committable; around a rebalance it also "sees" gaps that are only leftovers
        # arriving after its seek, and would commit records nobody processed. For the
        # input topics the worker core marks the real ones itself, in their turn (the
        # fetcher reports them: FETCH_SKIPS): ignore faust's guesses.
        if tp.topic in core.modality_of:
            core.counters.inc("gaps_ignored")
            return
        await faust_add_gap(tp, offset_from, offset_to)

    async def seek_to_committed() -> Mapping[Any, int]:
        # faust calls this when it resumes an assignment (right after
        # on_rebalance_complete), to seek to the committed offsets: that is where each
        # input partition starts again. (It also calls it from its fetch loop while
        # its flow is stopped; nothing to learn then.)
        committed = await faust_seek_to_committed()
        tps = [tp for tp in consumer.assignment() if tp.topic in core.modality_of]
        if tps and core.resuming:
            core.resuming = False
            start = {tp: committed.get(tp) for tp in tps}
            missing = [tp for tp, off in start.items() if off is None]
            if missing:  # nothing committed yet: the group starts at the earliest
                start.update(await consumer.earliest_offsets(*missing))
            end = await consumer.highwaters(*tps)
            core.on_resume({(tp.topic, tp.partition): off for tp, off in start.items()},
                           {(tp.topic, tp.partition): off for tp, off in end.items()})
            for tp in tps:  # what came while this ran was ignored: read it again
                nxt = core.gate.next_offset((tp.topic, tp.partition))
                if nxt is not None:
                    await consumer.seek(tp, nxt)
        return committed

    def ack_skipped(tp: tuple[str, int], start: int, end: int) -> None:
        mark_gap(consumer, TP(*tp), start, end)

    core.ack_skipped = ack_skipped
    consumer.ack = ack
    consumer._add_gap = add_gap
    consumer.seek_to_committed = seek_to_committed
    # faust drops a fetched record whose offset is below the last one it handed on
    # (_read_offset); around seeks that silently drops the re-read of records the
    # core still needs. For the input topics it hands on everything and the gate
    # decides (its fetch loop binds the mapping when it starts, after this).
    consumer._read_offset = _HandOnEverything(set(core.modality_of), consumer._read_offset)
    consumer._streamproc_guarded = True


def mark_gap(consumer: Any, tp: TP, start: int, end: int) -> None:
    """Make offsets ``start..end-1`` of ``tp`` committable, as faust's ``_add_gap`` would,
    but at once (a commit right after this must see them), with the last offset an ack
    (faust commits nothing for a partition that holds only a gap) and leaving out offsets
    already acked (faust merges gaps into its acked offsets without removing repeats, and
    a repeated offset makes it commit one offset per commit from there)."""
    committed = consumer._committed_offset[tp]
    acked = consumer._acked_index[tp]
    last = end - 1
    if last < (committed or 0):
        return  # committed already
    if last not in acked:
        acked.add(last)
        consumer._acked[tp].append(last)
    if committed is not None:
        start = max(start, committed + 1)  # faust's own reading of its committed offset
    gap = consumer._gap[tp]
    for offset in sorted(o for o in acked if start <= o < last):
        if start < offset:
            gap.addi(start, offset)
        start = offset + 1
    if start < last:
        gap.addi(start, last)
    gap.merge_overlaps()


def uncommitted(consumer: Any, topics: set[str]) -> dict[str, str]:
    """Input topic-partitions whose acked records the consumer has not committed:
    ``"topic:partition"`` -> committed offset, acked offsets and gaps as faust holds them."""
    out = {}
    for tp in sorted(set(consumer._acked) | set(consumer._gap)):
        acked = consumer._acked.get(tp, ())
        gaps = sorted((i.begin, i.end) for i in consumer._gap.get(tp, ()))
        if tp.topic in topics and (acked or gaps):
            out[f"{tp.topic}:{tp.partition}"] = (
                f"committed={consumer._committed_offset.get(tp)} "
                f"acked={min(acked, default=None)}..{max(acked, default=None)} "
                f"({len(acked)}) gaps={gaps}")
    return out


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
# the hot path: fetched records to the worker core in batches
# ---------------------------------------------------------------------------------------

#: Records handed to the worker core at once. Between two such chunks the event loop runs
#: timers and publish callbacks, so a large fetch never holds it for long.
BATCH_RECORDS = 256


class RecordAck:
    """The ack handle of one input record read in a batch: what faust's ``Consumer.ack``
    reads of a message (its commit bookkeeping), nothing of faust's per-record event."""

    __slots__ = ("__weakref__", "_consumer", "acked", "offset", "partition", "topic", "tp")

    def __init__(self, consumer: Any, tp: Any, offset: int) -> None:
        self.topic, self.partition = tp
        self.offset = offset
        self.tp = tp
        self.acked = False
        self._consumer = consumer

    def ack(self) -> None:
        self._consumer.ack(self)


def drain_in_batches(consumer: Any, core: WorkerCore,
                     on_batch: Callable[[list[Consumed]], Awaitable[None]],
                     interleave: Interleaver) -> None:
    """Replace faust's fetch loop (``Consumer._drain_messages``) with one that hands the
    input records of each fetch to ``on_batch`` in chunks of :data:`BATCH_RECORDS`,
    in event-time order across a partition's topics (worker/interleave.py; what runs
    ahead is held back and not fetched meanwhile) (idempotent; before the fetcher starts).

    faust hands records over one at a time: per record it builds a message, waits on two
    tasks (the delivery and a flow-control event), passes the conductor, a stream queue,
    an event object and the stream's sensors. That cost the worker more than aligning did
    (benchmarks/bench_agent.py). What faust's loop does that matters is kept: it waits
    while flow is stopped (a rebalance), re-reads from the committed offsets when records
    arrive while stopped, and drops the rest of a fetch once flow stops or the consumer
    generation changes (Kafka delivers those again). Records of other topics, if any,
    still go through faust's conductor.
    """
    if getattr(consumer, "_streamproc_batched", False):
        return
    inputs = set(core.modality_of)
    app = consumer.app
    paused: set[Any] = set()  # what the interleaver holds back is not fetched meanwhile

    def behind(tp: TopicPartition) -> bool:
        end = None if core.fetch_state is None else core.fetch_state(tp)[0]
        nxt = core.gate.next_offset(tp)
        return end is None or nxt is None or nxt < end

    def pause_held() -> None:
        held = {TP(*tp) for tp in interleave.held()}
        if held - paused:
            consumer.pause_partitions(held - paused)
        gone = paused - held
        if gone:
            assigned = consumer.assignment()
            consumer.resume_partitions({tp for tp in gone if tp in assigned})
        paused.clear()
        paused.update(held)

    generation = [app.consumer_generation_id]

    def rebalanced() -> None:
        # faust resumed every assigned partition and may have moved positions: what was
        # held is read again, and nothing is paused by us any more
        generation[0] = app.consumer_generation_id
        interleave.drop()
        paused.clear()

    tps: dict[tuple[str, int], TP] = {}  # one TP per partition, not one per record

    def handed(records: list[Any]) -> list[Consumed]:
        out = []
        seen = set()
        for r in records:
            key = (r.topic, r.partition)
            tp = tps.get(key)
            if tp is None:
                tp = tps[key] = TP(*key)
            seen.add(tp)
            out.append(Consumed(r.topic, r.partition, r.offset, KafkaRecord.from_client(r),
                                RecordAck(consumer, tp, r.offset)))
        if app.monitor is not None:  # faust's stalled-stream check reads this (no stream here)
            app.monitor.stream_inbound_time.update(dict.fromkeys(seen, time.monotonic()))
        return out

    async def drain(fetcher: Any) -> None:
        consumer_stopped = consumer._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        callback = consumer.callback
        interleave.drop()  # started after a rebalance: the consumer reads those again
        pause_held()
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                # while records are held, look again soon: the hold has a time limit
                records, _active = await consumer._wait_next_records(0.1 if paused else 1.0)
                await asyncio.sleep(0)  # a fetch can return at once again and again
                if consumer.should_stop:
                    continue
                if app.consumer_generation_id != generation[0]:
                    rebalanced()
                if not consumer.flow_active:
                    interleave.drop()
                    pause_held()
                    if records:
                        try:
                            await consumer.perform_seek()
                        except Exception as exc:  # mid-rebalance; faust's loop goes on too
                            log.warning("seek to the committed offsets failed: %r", exc)
                    continue
                gen = app.consumer_generation_id
                for tp, recs in (records or {}).items():
                    if tp.topic in inputs:
                        interleave.put((tp.topic, tp.partition), recs)
                    else:
                        for r in recs:
                            await callback(consumer._to_message(tp, r))
                ready = interleave.take(behind)
                pause_held()
                for i in range(0, len(ready), BATCH_RECORDS):
                    if not consumer.flow_active or app.consumer_generation_id != gen:
                        break  # a rebalance began: the rest is read again after it
                    await on_batch(handed(ready[i:i + BATCH_RECORDS]))
                    await asyncio.sleep(0)  # timers, publish callbacks, commits between
        except consumer.consumer_stopped_errors:
            if app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if app.should_stop:
                return
            raise
        except Exception as exc:
            log.exception("fetch loop failed: %r", exc)
            raise

    consumer._drain_messages = drain
    consumer._streamproc_batched = True
