"""The worker core: what the agent, its timers and the rebalance handlers share, with no
faust in it.

:class:`WorkerCore` takes consumed input records, timer ticks and assignment, resume and
revocation events; it decodes, dead-letters, aligns and emits windows, and acks inputs in
the order the commit guarantee needs (docs/design.md §6): a record is acked only once every
window that needs it is durably published and its stream's progress recorded. It acts
only through the callables it is given (submit a window, send a dead letter, record
progress, ack a record, crash), so tests drive it with a manual clock and fakes
(:mod:`streamproc.testing`); worker/app.py wires it to faust.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from streamproc.align.aligner import (
    AlignConfig,
    Aligner,
    ClosedBy,
    OutcomeStatus,
    Revisable,
    Window,
)
from streamproc.config import MODALITIES, Settings
from streamproc.errors import UserError
from streamproc.wire import codec as wire
from streamproc.wire.codec import DeadLetterKind
from streamproc.worker.acks import AckLedger, Admit, Entry, OffsetGate, Ticket
from streamproc.worker.metrics import Counters
from streamproc.worker.progress import StreamProgress

log = logging.getLogger("streamproc.worker")

#: Windows handed to the output and not yet durable before the agent waits (backpressure).
MAX_INFLIGHT_WINDOWS = 1024
#: Dead letters of one kind logged one by one before only every 100th is.
DEAD_LETTERS_LOGGED = 20
#: A partition none of whose input fetches completed for this long is stalled (broker
#: away, fetches failing; fetches complete every FETCH_MAX_WAIT_MS when all is well): that
#: time does not count toward idle deadlines.
FETCH_STALL_NS = 1_000_000_000
#: Seeks for one hole in an input partition before checking whether retention deleted it.
HOLE_SEEKS_BEFORE_CHECK = 3
#: Bytes a dead letter needs beyond key, value and headers (record batch framing, our headers).
DEAD_LETTER_OVERHEAD = 1024

TP = tuple[str, int]
#: (end offset to read up to, wall time in ns of the consumer's last fetch of it) of one
#: input topic-partition; None where not known yet.
FetchState = Callable[[TP], tuple[int | None, int | None]]
#: Offset ranges ``(topic, partition, start, end)`` in which the fetcher found nothing to
#: deliver (transaction markers, aborted transactions, compacted records).
FetchSkips = deque[tuple[str, int, int, int]]


# Not frozen: made twice for most records (as read, then without its record while it
# waits for its windows), and a frozen dataclass costs three times as much to make
@dataclasses.dataclass(slots=True, eq=False)
class Consumed:
    """One consumed input record and the client's handle that acks it."""

    topic: str
    partition: int
    offset: int
    record: wire.KafkaRecord
    handle: Any


@dataclasses.dataclass(frozen=True, slots=True)
class SkippedOffsets:
    """Offsets ``offset..end-1`` with nothing to process, acked in their turn like a record
    (``message`` and ``ack()`` as a consumed record's handle has them)."""

    topic: str
    partition: int
    offset: int
    end: int
    mark: Callable[[TP, int, int], object]

    @property
    def message(self) -> SkippedOffsets:
        return self

    def ack(self) -> None:
        self.mark((self.topic, self.partition), self.offset, self.end)


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


def assigned_input_partitions(settings: Settings, assigned: Iterable[TP]) -> set[int]:
    """The input partitions of an assignment; raises UserError unless every input topic
    got the same ones (a stream's records are spread over its topics' partition p)."""
    by_topic: dict[str, set[int]] = {t: set() for t in settings.input_topics}
    for topic, partition in assigned:
        if topic in by_topic:
            by_topic[topic].add(partition)
    parts: set[int] = set().union(*by_topic.values())
    if any(p != parts for p in by_topic.values()):
        raise UserError("input partitions assigned to this worker are not co-partitioned: "
                        + ", ".join(f"{t}={sorted(p)}" for t, p in by_topic.items()))
    return parts


#: What a held record keeps of its consumed record: nothing (its bytes are the aligner's
#: now; with a revision horizon a record is held for that long, frames and all otherwise).
_NO_RECORD = wire.KafkaRecord(None, None)

#: Outcomes whose record is acked at once (in its turn).
_DONE = (OutcomeStatus.ACCEPTED, OutcomeStatus.DUPLICATE, OutcomeStatus.REPLAYED)
#: Outcomes whose record becomes a dead letter, and the dead letter's kind.
_REFUSED = {OutcomeStatus.LATE: DeadLetterKind.LATE, OutcomeStatus.CAPPED: DeadLetterKind.CAPACITY,
            OutcomeStatus.FUTURE: DeadLetterKind.CLOCK}


def _ack_handle(handle: Any) -> None:
    handle.ack()


def _no_skips(tp: TP, start: int, end: int) -> None:
    return None


class WorkerCore:
    """What the agent, the timers and the rebalance handlers share.

    Every method runs to the end without awaiting (but :meth:`seek_back`,
    :meth:`wait_for_room`, :meth:`flush_acks`), so an aligner is never seen half updated
    by the others (they share one event loop). Publishing happens in tasks; their
    completion callbacks record progress and ack inputs.

    Callables: ``submit`` hands a window to the output (resolves once it is durably
    published, raises if it cannot be); ``send_dead_letter`` sends one dead letter;
    ``record_progress(stream_id, value)`` resolves once that :class:`StreamProgress` (or a
    newer one) is durable;
    ``forget_progress(stream_id)`` drops what the progress writer keeps of an expired stream;
    ``on_frame`` sees every accepted video frame a window will likely pick
    (``Aligner.likely_sampled``; the model's preprocessing starts decoding it, off the
    event loop);
    ``ack`` acks a consumed record's handle; ``crash`` stops the worker; ``flowing``: False
    while the consumer does not fetch (a rebalance); ``fetch_state``: how far each input
    partition can be read (None: never behind); ``fetch_skips``: offset ranges the
    fetcher skipped, drained here. :attr:`ack_skipped` acks such a range; the app sets it
    once it has taken over the consumer's gap bookkeeping.
    """

    def __init__(self, settings: Settings, *,
                 submit: Callable[[Window], Awaitable[None]],
                 send_dead_letter: Callable[[wire.KafkaRecord], Awaitable[None]],
                 record_progress: Callable[[str, StreamProgress], asyncio.Future],
                 forget_progress: Callable[[str], None] = lambda stream_id: None,
                 on_frame: Callable[[wire.VideoFrame], None] | None = None,
                 counters: Counters, crash: Callable[[BaseException], None],
                 ack: Callable[[Any], object] = _ack_handle,
                 clock: Callable[[], int] = time.time_ns,
                 flowing: Callable[[], bool] = lambda: True,
                 fetch_state: FetchState | None = None,
                 fetch_skips: FetchSkips | None = None) -> None:
        self.settings = settings
        self.cfg = AlignConfig.from_settings(settings)
        self.submit = submit
        self.send_dead_letter = send_dead_letter
        self.record_progress = record_progress
        self.forget_progress = forget_progress
        self.on_frame = on_frame
        # last published window per stream: read from the progress topic when an
        # assignment resumes, then kept current by this worker's own publishes
        self.progress: dict[str, int] = {}
        # with a revision horizon: what the restarted aligners rebuild (from progress),
        # each stream's published revisions still revisable, and the floor asked for
        self.revisable: dict[str, Revisable] = {}
        self._revs: dict[str, dict[int, tuple[int, frozenset[int]]]] = {}
        self._floor_asked: dict[str, int] = {}
        self._floor_seed: dict[str, int] = {}
        self._progress_seq = itertools.count(1)
        self.resuming = False  # set when an assignment resumes, taken by the consumer's seek
        self.counters = counters
        self.crash = crash
        self.ack = ack
        self.ack_skipped: Callable[[TP, int, int], object] = _no_skips
        self.clock = clock
        self.flowing = flowing
        self.fetch_state = fetch_state
        self.fetch_skips: FetchSkips = fetch_skips if fetch_skips is not None else deque()
        self.aligners: dict[int, Aligner] = {}
        self.ledger: AckLedger[Consumed | SkippedOffsets] = AckLedger(self.cfg.revision_ns)
        self.gate = OffsetGate()
        self._ignoring: set[tuple[TP, str]] = set()  # logged once per rebalance
        self._releasing = False  # True only while the ledger's acks are handed on
        # partition -> its idle clock: the wall time up to which every input of the
        # partition is known to be read (stands still while anything is left to read)
        self._read_through: dict[int, int] = {}
        self._fetched_at: dict[int, int] = {}  # partition -> oldest last fetch of its inputs
        self._ends: dict[TP, int | None] = {}  # log ends at the last look
        # stream -> the partition its records come on (while that partition is ours)
        self._home: dict[str, int] = {}
        # acks released by the ledger, in release order, each batch behind the progress
        # records that must be durable first
        self._acks: deque[tuple[list[asyncio.Future], list[Consumed | SkippedOffsets]]] = deque()
        self.modality_of = {settings.topic(m): m for m in MODALITIES}
        self._room = asyncio.Event()
        self._retired_stats: dict[str, float] = defaultdict(float)
        self.ingest_ns: dict[tuple[str, str], int] = {}
        self._expiring: set[str] = set()  # expired, windows still in flight in the ledger

    def resume_from(self, progress: Mapping[str, StreamProgress]) -> None:
        """Every stream's durable progress, read when an assignment resumes."""
        self.progress = {sid: p.through for sid, p in progress.items()
                         if p.through is not None}
        self.revisable = {sid: Revisable(p.floor, p.revs) for sid, p in progress.items()
                          if p.revising}
        self._revs = {sid: dict(p.revs) for sid, p in progress.items() if p.revs}
        self._floor_asked = {sid: p.floor for sid, p in progress.items()
                             if p.floor is not None}
        # durable already: the ledger learns it once the stream has records held
        self._floor_seed = dict(self._floor_asked)

    @property
    def releasing(self) -> bool:
        """True only while acks released by the ledger are handed to the client: any other
        ack of an input record is not ours and must be refused."""
        return self._releasing

    # --- input ---------------------------------------------------------------------
    def on_record(self, event: Consumed) -> None:
        """Decode, align, dead-letter or hold one consumed record; emit what closed."""
        self.on_records((event,))

    def on_records(self, events: Iterable[Consumed]) -> None:
        """:meth:`on_record` for a batch, each partition's records in offset order: the
        aligners are polled once per batch, not once per record."""
        self.take_fetch_skips()
        now = self.clock()
        readings: dict[int, tuple[bool, int | None]] = {}
        # events_in is counted once per batch: a labelled count per record cost about as
        # much as adding the record to its aligner
        admitted = dict.fromkeys(self.modality_of, 0)
        try:
            for event in events:
                partition = event.partition
                aligner = self._admit(event)
                if aligner is None:
                    continue
                admitted[event.topic] += 1
                if partition not in readings:
                    readings[partition] = self._note_stall(partition, aligner, fast=True)
                self._align(event, aligner, now)
        finally:
            for topic, n in admitted.items():
                if n:
                    self.counters.inc("events_in", n, modality=self.modality_of[topic])
        for partition, reading in readings.items():
            self._poll(partition, self.aligners[partition], now, reading)

    def _admit(self, event: Consumed) -> Aligner | None:
        """The aligner of an admitted record that decodes, else None (the record is
        ignored, acked or dead-lettered here)."""
        tp, offset = (event.topic, event.partition), event.offset
        admitted = self.gate.admit(tp, offset)
        self._track_jumps()  # stepped-over offsets come before this record
        if admitted is not Admit.OK:
            # Never acked: processed before (its ack, or the range the gate stepped over
            # at the resume, covers it), or read again after a seek. The consumer must
            # not see an offset twice: it would commit one offset per commit from there.
            self.counters.inc("ignored", reason=admitted)
            if (tp, admitted) not in self._ignoring:
                self._ignoring.add((tp, admitted))
                log.info("ignoring %s records of %s:%d from offset %d (Kafka delivers them "
                         "again; see docs/worker.md)", admitted, *tp, offset)
            return None
        return self._aligner(event.partition)

    def _align(self, event: Consumed, aligner: Aligner, now: int) -> None:
        tp, offset = (event.topic, event.partition), event.offset
        modality = self.modality_of[event.topic]
        rec = event.record
        bad_names = undecodable_header_names(rec)
        if bad_names:
            self.counters.inc("decode_errors", modality=modality)
            self._dead_letter(tp, offset, event, rec, "header name(s) "
                              + ", ".join(repr(b[:64]) for b in bad_names)
                              + " not UTF-8: Kafka header names are UTF-8 strings",
                              DeadLetterKind.DECODE)
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
            self._internal_error(event, rec, "decoder", e)
            return
        home = self._home.setdefault(media.stream_id, event.partition)
        if home != event.partition:
            self._dead_letter(tp, offset, event, rec, misplaced_reason(
                media.stream_id, home, event.partition), DeadLetterKind.PARTITION)
            return
        # capture -> worker delay of the stream's newest record of each modality
        self.ingest_ns[(media.stream_id, modality)] = now - media.end_ns
        try:
            out = aligner.add(media, now)
        except Exception as e:  # an aligner bug must not stop every stream; keep the record
            self._internal_error(event, rec, "aligner", e)
            return
        status = out.status
        if status == OutcomeStatus.ACCEPTED and out.release_after_ns is not None:
            held = Consumed(event.topic, event.partition, offset, _NO_RECORD, event.handle)
            self.ledger.track(tp, offset, held, media.stream_id, out.release_after_ns)
            if self.on_frame is not None and media.modality == "video" and \
                    aligner.likely_sampled(media):
                self.on_frame(media)
        elif status in _DONE:
            if status != OutcomeStatus.ACCEPTED:
                self.counters.inc("replayed" if status == OutcomeStatus.REPLAYED
                                  else "duplicates", modality=modality)
            self._queue_acks(self.ledger.track_done(tp, offset, event))
        elif status in _REFUSED:
            self.counters.inc(status, modality=modality)
            if status == OutcomeStatus.LATE and modality == "text" and self.cfg.revision_ns:
                self.counters.inc("revisions_too_late")  # beyond the revision horizon
            self._dead_letter(tp, offset, event, rec, out.reason or status, _REFUSED[status])
        else:
            raise RuntimeError(f"aligner returned unknown outcome {status!r}")

    def on_tick(self) -> None:
        """Wall clock: close windows whose idle deadline passed, even with no input."""
        self.take_fetch_skips()
        self._track_jumps()
        now = self.clock()
        for partition, aligner in list(self.aligners.items()):
            self._poll(partition, aligner, now)

    def take_fetch_skips(self) -> None:
        """Tell the gate which offsets the fetcher found nothing at (``fetch_skips``)."""
        while self.fetch_skips:
            topic, partition, start, end = self.fetch_skips.popleft()
            if topic in self.modality_of:
                self.gate.skipped((topic, partition), start, end)
        self.gate.settle()

    async def seek_back(self, earliest_offset: Callable[[TP], Awaitable[int]],
                        seek: Callable[[TP, int], Awaitable[object]]) -> None:
        """Seek input partitions back over holes in what the consumer delivered
        (acks.OffsetGate); after a few tries, check whether retention deleted the missing
        records (``earliest_offset``: the partition's first offset still in the log)."""
        for tp, offset in self.gate.seeks().items():
            topic, partition = tp
            if self.gate.tries(tp) > HOLE_SEEKS_BEFORE_CHECK:
                earliest = await earliest_offset(tp)
                if earliest > offset:
                    log.error("%s:%d: offsets %d..%d were deleted (retention) before they "
                              "were processed", topic, partition, offset, earliest - 1)
                    self.counters.inc("records_lost", earliest - offset)
                    self.gate.skip_to(tp, earliest)
                    offset = earliest
            log.info("seeking %s:%d back to offset %d", topic, partition, offset)
            await seek(tp, offset)

    def on_assigned(self, tps: Iterable[TP]) -> None:
        """Partitions were assigned; their records wait for :meth:`on_resume`."""
        self.gate.assign({tp for tp in tps if tp[0] in self.modality_of})
        self._ignoring.clear()

    def on_resume(self, committed: Mapping[TP, int], end: Mapping[TP, int]) -> None:
        """The consumer resumes the assignment; Kafka delivers each topic-partition from
        ``committed``; ``end``: its end offsets now."""
        for tp, offset in committed.items():
            if tp[0] in self.modality_of:
                self.gate.start(tp, offset, end.get(tp))

    def on_revoked(self, tps: Iterable[TP]) -> None:
        """Forget revoked partitions: their held records are not acked; the new owner
        replays them from the committed offsets and resumes from the progress topic."""
        revoked = {tp for tp in tps if tp[0] in self.modality_of}
        waiting: dict[TP, int] = {}
        kept: deque[tuple[list[asyncio.Future], list[Consumed | SkippedOffsets]]] = deque()
        for waits, events in self._acks:
            mine = []
            for ev in events:
                tp = (ev.topic, ev.partition)
                if tp in revoked:
                    waiting[tp] = min(waiting.get(tp, ev.offset), ev.offset)
                else:
                    mine.append(ev)
            kept.append((waits, mine))
        self._acks = kept

        def lowest_unacked(tp: TP) -> int | None:
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
            self._revs.pop(sid, None)
            self._floor_asked.pop(sid, None)
        for p in parts:
            self._read_through.pop(p, None)
            self._fetched_at.pop(p, None)
            aligner = self.aligners.pop(p, None)
            if aligner is not None:
                for k, v in aligner.stats.items():
                    self._retired_stats[k] += v
        for tp in revoked:
            self._ends.pop(tp, None)
        dropped = self.ledger.drop_partitions(parts)
        self._wake_if_room()  # their windows no longer count
        if parts:
            log.info("partitions %s revoked: dropped %d held record(s); the owner replays them",
                     sorted(parts), dropped)

    def stop_revising(self) -> list[asyncio.Future]:
        """Shutting down: give up revising published windows, so the last commit covers
        every record whose windows are published and a restart replays nothing this
        worker finished (a late transcript for them is then late). Returns the progress
        writes (a floor above those records) the acks wait for."""
        if not self.ledger.horizon:
            return []
        for aligner in self.aligners.values():
            aligner.stop_revising()
        return [self._write_progress(sid, frees_now=False)
                for sid in self.ledger.stop_revising()
                if self.ledger.floor_wanted(sid, frees_now=False) is not None]

    async def flush_acks(self, timeout: float) -> None:
        """Wait until acks waiting for progress records are released (shutdown)."""
        waits = [w for ws, _ in self._acks for w in ws if not w.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)

    async def wait_for_room(self) -> None:
        """Backpressure: wait while too many windows are in flight in the output."""
        while self.ledger.inflight() >= MAX_INFLIGHT_WINDOWS:
            self._room.clear()
            await self._room.wait()

    def _wake_if_room(self) -> None:
        """Let :meth:`wait_for_room` go on once fewer windows are in flight."""
        if self.ledger.inflight() < MAX_INFLIGHT_WINDOWS:
            self._room.set()

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
            aligner = self.aligners[partition] = Aligner(self.cfg, resume=resume,
                                                         revisable=self.revisable)
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
        live = not self.gate.catching_up(partition)
        last = self._read_through.get(partition)
        if live and not behind and self.flowing():
            known = now if fetched is None else min(now, fetched)
            if last is None or known > last:
                last = self._read_through[partition] = known
        if last is None:
            last = self._read_through[partition] = now
        # while a partition replays its backlog after a resume, its provisional windows went
        # out before (from this worker or the previous owner): none again
        if live:
            aligner.replay_done()
        self._emit(partition, aligner.poll(last, live))

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
            token = SkippedOffsets(tp[0], tp[1], start, end, self.ack_skipped)
            self._queue_acks(self.ledger.track_done(tp, start, token))

    def _emit(self, partition: int, windows: list[Window]) -> None:
        """Hand closed windows to the output, then tell the ledger how far each stream closed
        (records needed only by windows that closed empty are free once earlier ones are
        published)."""
        for w in windows:
            for m in MODALITIES:
                if (w.stream_id, m) in self.ingest_ns:
                    w.ingest_ms[m] = round(self.ingest_ns[(w.stream_id, m)] / 1e6, 3)
            if not w.final:
                # A provisional window acks nothing and records no progress: a crash can
                # only publish it again (the same rev), never lose a final.
                self.counters.inc("windows_provisional")
                asyncio.ensure_future(self.submit(w)).add_done_callback(self._provisional_sent)
                continue
            if w.quality.get("closed_by") == ClosedBy.REVISION:
                # a revised final of a window published before: its records stay held
                # (the ledger's horizon) until it is durable and progress records it
                ticket = self.ledger.revision_started(w.stream_id, w.start_ns, partition)
                self.counters.inc("windows_revised")
            else:
                ticket = self.ledger.window_started(w.stream_id, w.start_ns, partition)
                self.counters.inc("windows_emitted")
                for m, ok in w.present.items():
                    if not ok:
                        self.counters.inc("windows_masked", modality=m)
            fut = asyncio.ensure_future(self.submit(w))
            fut.add_done_callback(functools.partial(self._published, ticket, w.rev, w.text_ids))
        aligner = self.aligners[partition]
        horizon = self.ledger.horizon
        for sid in self.ledger.waiting_streams(partition):
            if horizon and sid in self._floor_seed:
                self._queue_acks(self.ledger.floor_durable(sid, self._floor_seed.pop(sid)))
            self._queue_acks(self.ledger.closed(sid, aligner.closed_before(sid), partition))
            if horizon:
                floor = self.ledger.floor_wanted(sid)
                if floor is not None and floor > self._floor_asked.get(sid, floor - 1):
                    self._write_progress(sid)
        expired = aligner.take_expired()
        if expired or self._expiring:
            self._forget(expired)

    def _forget(self, expired: list[str]) -> None:
        """Drop what the worker keeps per stream once the aligner expired the stream, so
        state stays bounded however many stream ids come and go. The aligner remembers
        where each had closed (late records stay late); a later record starts it afresh,
        on whichever partition it comes."""
        self._expiring.update(expired)
        for sid in list(self._expiring):
            home = self._home.get(sid)
            aligner = None if home is None else self.aligners.get(home)
            if aligner is not None and aligner.has_stream(sid):
                self._expiring.discard(sid)  # it came back before it could be forgotten
                continue
            forgotten = self.ledger.forget(sid)
            if forgotten is None:
                continue  # a window of it is still being published: next time
            waits = []
            if self.ledger.horizon and forgotten:
                # its records go now, revisable or not: progress says so first, so a
                # restart rebuilds none of its windows from a replay that lacks them
                floor = None if aligner is None else aligner.closed_before(sid)
                waits.append(self.record_progress(sid, StreamProgress(
                    self.progress.get(sid), True, floor, {}, next(self._progress_seq))))
            self._queue_acks(forgotten, waits)
            self._expiring.discard(sid)
            self._home.pop(sid, None)
            # progress stays: one number per stream, as in the compacted progress topic
            # read back at every resume; it keeps published windows from being emitted
            # again however many streams expired
            self.forget_progress(sid)
            self._revs.pop(sid, None)
            self._floor_asked.pop(sid, None)
            self._floor_seed.pop(sid, None)
            self.revisable.pop(sid, None)
            for m in MODALITIES:
                self.ingest_ns.pop((sid, m), None)

    def _write_progress(self, sid: str, frees_now: bool = True) -> asyncio.Future:
        """Record the stream's progress as it is now: how far its finals are published,
        and with a revision horizon the floor below which its records may be acked once
        this is durable, and the revisions published from there on."""
        floor = self.ledger.floor_wanted(sid, frees_now)
        asked = self._floor_asked.get(sid)
        if floor is None or (asked is not None and floor <= asked):
            floor = asked
        else:
            self._floor_asked[sid] = floor
        revs = self._revs.get(sid, {})
        if floor is not None and any(k < floor for k in revs):
            revs = self._revs[sid] = {k: v for k, v in revs.items() if k >= floor}
        value = StreamProgress(self.progress.get(sid), bool(self.ledger.horizon), floor,
                               dict(revs), next(self._progress_seq))
        fut = self.record_progress(sid, value)
        if floor is not None and floor != asked:
            fut.add_done_callback(functools.partial(self._floor_written, sid, floor))
        return fut

    def _floor_written(self, sid: str, floor: int, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("could not record progress: %r", exc)
            self.crash(exc)
            return
        self._queue_acks(self.ledger.floor_durable(sid, floor))

    def _published(self, ticket: Ticket, rev: int, text_ids: frozenset[int],
                   fut: asyncio.Future) -> None:
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
        for sid, start in done.progress.items():
            self.progress[sid] = start
        waits = []
        if self.ledger.horizon and ticket.done:
            # which revision of the window is out: a restart then publishes none again
            self._revs.setdefault(ticket.stream_id, {})[ticket.start_ns] = (rev, text_ids)
            waits.append(self._write_progress(ticket.stream_id))
        else:
            waits.extend(self._write_progress(sid) for sid in done.progress)
        self._queue_acks(done.acks, waits)
        self._wake_if_room()

    def _provisional_sent(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:  # the output is broken: its finals would fail the same way
            log.error("could not publish a provisional window: %r", exc)
            self.crash(exc)

    def _internal_error(self, event: Consumed, rec: wire.KafkaRecord, stage: str,
                        exc: Exception) -> None:
        """A bug of ours met this record: log it, count it, dead-letter the record."""
        log.exception("%s failed on %s record %s:%d/%d", stage,
                      self.modality_of[event.topic], event.topic, event.partition, event.offset)
        self.counters.inc("internal_errors")
        self._dead_letter((event.topic, event.partition), event.offset, event, rec,
                          f"{stage} error: {exc!r}", DeadLetterKind.INTERNAL)

    def _dead_letter(self, tp: TP, offset: int, event: Consumed,
                     rec: wire.KafkaRecord, reason: str, kind: DeadLetterKind) -> None:
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
        fut.add_done_callback(functools.partial(self._dead_letter_sent, entry))

    def _dead_letter_sent(self, entry: Entry[Consumed | SkippedOffsets],
                          fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.error("could not send a dead letter: %r", fut.exception())
            self.crash(fut.exception())  # type: ignore[arg-type]
            return
        self._queue_acks(self.ledger.release(entry))

    def _queue_acks(self, events: list[Consumed | SkippedOffsets],
                    waits: list[asyncio.Future] | None = None) -> None:
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
                    if isinstance(ev, SkippedOffsets):
                        ev.ack()
                    else:
                        self.ack(ev.handle)
            finally:
                self._releasing = False
