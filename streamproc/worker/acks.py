"""Ack-after-emit bookkeeping: which consumed records may be acked now (docs/design.md §6).

Pure logic, no Kafka and no asyncio: the faust agent feeds it what it consumed and what
got durably published, and acks exactly the tokens this hands back.

Why acks go out in offset order per topic-partition: faust 0.15's
``Consumer._new_offset`` commits the first run of consecutive acked offsets and only
checks ``min(acked) - committed > 1``, so an ack for offset ``c + 1`` while ``c`` is
still held would commit past ``c`` (and with no committed offset there is no check at
all). Handing acks to faust strictly in offset order keeps every commit at or below the
oldest record an unfinished window still needs, so a crash replays exactly that.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")
TP = tuple[str, int]  # (topic, partition)


@dataclass(eq=False, slots=True)
class Entry(Generic[T]):
    """One consumed record waiting to be acked.

    It is ready when ``released`` is set (a dead letter was sent, nothing to wait for) or,
    for a record windows need, once every window of its stream up to ``after_start`` has
    closed and every one of them that was emitted is published.
    """

    tp: TP
    offset: int
    token: T
    stream_id: str | None = None
    after_start: int | None = None
    released: bool = False


@dataclass(eq=False, slots=True)
class Ticket:
    """One window handed to the output; ``window_published(ticket)`` when it is durable.
    ``revision``: a revised final of a window published before."""

    stream_id: str
    start_ns: int
    epoch: int
    done: bool = False
    revision: bool = False


@dataclass(slots=True)
class _Stream:
    stream_id: str
    partition: int
    epoch: int
    published_through: int | None = None  # start of the newest window with all earlier durable
    closed_before: int | None = None  # the aligner closed every window starting before this
    inflight: deque[Ticket] = field(default_factory=deque)
    revising: list[Ticket] = field(default_factory=list)  # revisions not durable yet
    last_started: int | None = None
    waiting_tps: set[TP] = field(default_factory=set)
    floor: int | None = None  # the durable progress floor (with a revision horizon)

    def wanted(self, horizon: int) -> int | None:
        """Records whose last window starts before this need no window any more: every
        window they belong to closed, was published and can no longer be revised."""
        if self.closed_before is None:
            return None
        bound = self.closed_before - horizon
        if self.inflight:
            bound = min(bound, self.inflight[0].start_ns)
        for t in self.revising:
            bound = min(bound, t.start_ns)
        return bound

    def bound(self, horizon: int, floors: bool) -> int | None:
        """Records whose last window starts before this may be acked: with ``floors`` (a
        revision horizon), also only once progress says so (a restart rebuilds the
        revisable windows from the replay, so their records must all come back)."""
        bound = self.wanted(horizon)
        if bound is None or not floors:
            return bound
        return None if self.floor is None else min(bound, self.floor)


@dataclass(slots=True)
class Published(Generic[T]):
    """What one publish confirmation unlocked: progress to record, then tokens to ack."""

    progress: dict[str, int] = field(default_factory=dict)
    acks: list[T] = field(default_factory=list)


class AckLedger(Generic[T]):
    """Held records per topic-partition and in-flight windows per stream.

    Records must be tracked in the order they were consumed (offset order per
    topic-partition, as Kafka delivers them). Windows of a stream must be started in
    start order (the aligner emits them that way); they may be confirmed in any order.

    ``horizon_ns``: the aligner's revision horizon. A record is then held until no window
    of it can be revised any more, and until the stream's progress records a floor above
    its last window (:meth:`floor_wanted`, :meth:`floor_durable`).
    """

    def __init__(self, horizon_ns: int = 0) -> None:
        self.horizon = horizon_ns
        self._keep = horizon_ns  # 0 once revisions are given up (stop_revising)
        self._held: dict[TP, deque[Entry[T]]] = {}
        self._streams: dict[str, _Stream] = {}
        self._waiting: dict[int, set[str]] = {}  # partition -> streams with waiting records
        self._last_tracked: dict[TP, int] = {}
        self._inflight = 0
        self._epoch = 0

    # --- records -------------------------------------------------------------------
    def track(self, tp: TP, offset: int, token: T, stream_id: str | None = None,
              after_start: int | None = None) -> Entry[T]:
        """Hold a record: until ``release(entry)`` when ``stream_id`` is None, else until
        every window of ``stream_id`` up to the one starting at ``after_start`` is closed
        and, if emitted, published."""
        last = self._last_tracked.get(tp)
        if last is not None and offset <= last:
            raise ValueError(f"{tp}: offset {offset} tracked after {last}; "
                             "records must be tracked in consumption order")
        self._last_tracked[tp] = offset
        # get, not setdefault: its default would be a new deque (and set) every record
        held = self._held.get(tp)
        if held is None:
            held = self._held[tp] = deque()
        entry = Entry(tp, offset, token, stream_id, after_start)
        if stream_id is not None:
            if after_start is None:
                raise ValueError("a record waiting for a window needs after_start")
            st = self._stream(stream_id, tp[1])
            st.waiting_tps.add(tp)
            waiting = self._waiting.get(tp[1])
            if waiting is None:
                waiting = self._waiting[tp[1]] = set()
            waiting.add(stream_id)
        held.append(entry)
        return entry

    def track_done(self, tp: TP, offset: int, token: T) -> list[T]:
        """A record with nothing to wait for (duplicate, replayed): ack it in its turn."""
        entry = self.track(tp, offset, token)
        entry.released = True
        return self._drain(tp)

    def release(self, entry: Entry[T]) -> list[T]:
        """The record's own work is done (e.g. its dead letter was sent)."""
        entry.released = True
        if entry.tp not in self._held:  # partition revoked meanwhile: nothing to ack
            return []
        return self._drain(entry.tp)

    # --- windows -------------------------------------------------------------------
    def window_started(self, stream_id: str, start_ns: int, partition: int) -> Ticket:
        st = self._stream(stream_id, partition)
        if st.last_started is not None and start_ns <= st.last_started:
            raise ValueError(f"stream {stream_id!r}: window {start_ns} started after "
                             f"{st.last_started}; windows must be started in start order")
        st.last_started = start_ns
        ticket = Ticket(stream_id, start_ns, st.epoch)
        st.inflight.append(ticket)
        self._inflight += 1
        return ticket

    def revision_started(self, stream_id: str, start_ns: int, partition: int) -> Ticket:
        """A revised final of a window started before (any order)."""
        st = self._stream(stream_id, partition)
        ticket = Ticket(stream_id, start_ns, st.epoch, revision=True)
        st.revising.append(ticket)
        self._inflight += 1
        return ticket

    def window_published(self, ticket: Ticket) -> Published[T]:
        """A window is durable. Returns the stream's new progress (if it advanced) and the
        records that no unfinished window needs any more, in offset order per partition."""
        out: Published[T] = Published()
        st = self._streams.get(ticket.stream_id)
        if st is None or st.epoch != ticket.epoch:
            return out  # from before a revocation: the new owner redoes it
        ticket.done = True
        if ticket.revision:
            st.revising.remove(ticket)
            self._inflight -= 1
            out.acks = self._drain_stream(st)
            return out
        advanced = False
        while st.inflight and st.inflight[0].done:
            st.published_through = st.inflight.popleft().start_ns
            self._inflight -= 1
            advanced = True
        if not advanced:
            return out
        out.progress[ticket.stream_id] = st.published_through  # type: ignore[assignment]
        out.acks = self._drain_stream(st)
        return out

    def closed(self, stream_id: str, closed_before: int | None, partition: int) -> list[T]:
        """The aligner closed every window of the stream starting before ``closed_before``
        (emitted ones, and empty ones it never emits). Returns records now free to ack."""
        st = self._stream(stream_id, partition)
        if closed_before is None or (st.closed_before is not None
                                     and closed_before <= st.closed_before):
            return []
        st.closed_before = closed_before
        return self._drain_stream(st)

    def stop_revising(self) -> list[str]:
        """Give up revisions (shutting down): a record then waits only for its windows to
        be published, and for progress to record a floor above them. Returns the streams
        whose floor to record now."""
        self._keep = 0
        return [sid for sids in self._waiting.values() for sid in sids]

    def floor_wanted(self, stream_id: str, frees_now: bool = True) -> int | None:
        """With a revision horizon: the floor progress should record so that the
        stream's records below it may be acked (None: nothing to record, or, with
        ``frees_now``, recording it would free no record now)."""
        st = self._streams.get(stream_id)
        if st is None or not self.horizon:
            return None
        wanted = st.wanted(self._keep)
        if wanted is None or (st.floor is not None and wanted <= st.floor):
            return None
        if not frees_now:
            return wanted
        # only when it frees a record now: the oldest held one of one of its partitions
        for tp in st.waiting_tps:
            held = self._held.get(tp)
            if held and held[0].stream_id == stream_id and \
                    held[0].after_start < wanted:  # type: ignore[operator]
                return wanted
        return None

    def floor_durable(self, stream_id: str, floor: int) -> list[T]:
        """Progress with this floor is durable. Returns records now free to ack."""
        st = self._streams.get(stream_id)
        if st is None or (st.floor is not None and floor <= st.floor):
            return []
        st.floor = floor
        return self._drain_stream(st)

    def waiting_streams(self, partition: int) -> list[str]:
        """Streams of a partition with records waiting for their windows to close."""
        return list(self._waiting.get(partition, ()))

    def forget(self, stream_id: str) -> list[T] | None:
        """Drop an expired stream (every window of it closed and published): its records
        still held wait for nothing, so they are released. Returns the tokens now free to
        ack, or None while a window of it is still in flight (it is kept until then)."""
        st = self._streams.get(stream_id)
        if st is None:
            return []
        if st.inflight or st.revising:
            return None
        out: list[T] = []
        for tp in sorted(st.waiting_tps):
            for e in self._held.get(tp, ()):
                if e.stream_id == stream_id:
                    e.released = True
            out.extend(self._drain(tp))
        del self._streams[stream_id]
        waiting = self._waiting.get(st.partition)
        if waiting is not None:
            waiting.discard(stream_id)
        return out

    # --- rebalancing ---------------------------------------------------------------
    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget held records and in-flight windows of revoked partitions; they are
        never acked here (the new owner replays them). Returns how many were held."""
        dropped = 0
        for tp in [tp for tp in self._held if tp[1] in partitions]:
            dropped += len(self._held.pop(tp))
        for tp in [tp for tp in self._last_tracked if tp[1] in partitions]:
            del self._last_tracked[tp]
        for sid in [s for s, st in self._streams.items() if st.partition in partitions]:
            gone = self._streams.pop(sid)
            self._inflight -= len(gone.inflight) + len(gone.revising)
        for p in partitions:
            self._waiting.pop(p, None)
        return dropped

    # --- introspection -------------------------------------------------------------
    def held(self) -> int:
        return sum(len(d) for d in self._held.values())

    def lowest_held(self, tp: TP) -> int | None:
        """Offset of the oldest record of ``tp`` not acked yet (None: nothing held)."""
        held = self._held.get(tp)
        return held[0].offset if held else None

    def inflight(self) -> int:
        """Windows handed out and not yet durable (in start order per stream)."""
        return self._inflight

    def published_through(self, stream_id: str) -> int | None:
        st = self._streams.get(stream_id)
        return None if st is None else st.published_through

    # --- internals -----------------------------------------------------------------
    def _stream(self, stream_id: str, partition: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            self._epoch += 1
            st = self._streams[stream_id] = _Stream(stream_id, partition, self._epoch)
        elif st.partition != partition:
            raise ValueError(f"stream {stream_id!r} seen on partitions {st.partition} and "
                             f"{partition}: the input topics are not co-partitioned")
        return st

    def _ready(self, e: Entry[T]) -> bool:
        if e.released:
            return True
        if e.stream_id is None:
            return False
        st = self._streams.get(e.stream_id)
        if st is None:
            return False
        bound = st.bound(self._keep, bool(self.horizon))
        return bound is not None and e.after_start < bound  # type: ignore[operator]

    def _drain_stream(self, st: _Stream) -> list[T]:
        out: list[T] = []
        for tp in sorted(st.waiting_tps):
            out.extend(self._drain(tp))
            if tp not in self._held:
                st.waiting_tps.discard(tp)
        if not st.waiting_tps:
            waiting = self._waiting.get(st.partition)
            if waiting is not None:
                waiting.discard(st.stream_id)
        return out

    def _drain(self, tp: TP) -> list[T]:
        held = self._held.get(tp)
        out: list[T] = []
        while held and self._ready(held[0]):
            out.append(held.popleft().token)
        if not held:
            self._held.pop(tp, None)
        return out


class Admit(StrEnum):
    """What :meth:`OffsetGate.admit` says of a consumed record; only OK is processed."""

    OK = "ok"
    UNASSIGNED = "unassigned"  # its partition is not ours (any more)
    REBALANCING = "rebalancing"  # assigned, but the resume position is not known yet
    REDELIVERED = "redelivered"  # an offset already processed
    HOLE = "hole"  # past the next offset: faust skipped records, the gate seeks back


class OffsetGate:
    """Which consumed records the agent may process: each input topic-partition strictly
    in offset order, without holes.

    faust 0.15 hands the agent records at awkward moments around a rebalance: leftovers
    of a fetch made before it (its fetch loop finishes the batch it had), records from
    before its seek back to the committed offset, which then come again, and a leftover
    arriving after that seek moves its read position so that it silently drops the
    re-read. Processing what arrives as it arrives would lose records or build windows
    while older records are still to come. So the gate knows, per topic-partition, the
    next offset to process and lets only that one through:

    - ``start(tp, committed)`` sets it when faust has recovered the tables of an
      assignment and is about to resume it (from ``on_rebalance_complete``): the committed
      offset, or, for a partition revoked from this worker and given back, its oldest
      record that was not acked yet (everything before it was acked and committed, or is
      about to be);
    - a record below it is a re-delivery of one already processed: ignored;
    - a record above it means records in between were skipped: ignored, and
      :meth:`seeks` asks the agent to seek back. Until the hole is filled the partition
      is *catching up*: the agent lets no idle deadline of it fire, so a modality still
      being re-read never looks idle (the same while the backlog that accumulated before the
      resume is read: :meth:`catching_up`).

    Offsets with nothing to deliver are legitimate holes: transaction markers and
    aborted records (the consumer reads committed data only) or compacted records. The
    fetcher reports each such range (:meth:`skipped`); the gate then steps over it, and
    :meth:`jumps` tells the agent, which acks the range in its turn. Records deleted by
    retention are the other legitimate hole: :meth:`skip_to`. Ignored records are never
    acked: Kafka delivers them again.
    """

    #: Seconds between two seeks of one topic-partition (leftovers may keep coming).
    SEEK_EVERY_S = 0.5

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.assigned: set[TP] = set()
        self._clock = clock
        self._next: dict[TP, int] = {}
        self._target: dict[TP, int] = {}  # end offset at the resume: caught up from there
        self._floor: dict[TP, int] = {}  # from a revocation: where to read again
        self._hole: dict[TP, int] = {}  # first offset seen beyond a hole, per tp
        self._tries: dict[TP, int] = {}
        self._want_seek: dict[TP, int] = {}
        self._sought_at: dict[TP, float] = {}
        self._skips: dict[TP, dict[int, int]] = {}  # start -> end of offsets with no record
        self._jumped: list[tuple[TP, int, int]] = []

    def assign(self, tps: set[TP]) -> None:
        self.assigned = set(tps)
        self._floor = {tp: f for tp, f in self._floor.items() if tp in self.assigned}
        for d in (self._next, self._target, self._hole, self._tries, self._want_seek,
                  self._skips):
            for tp in [tp for tp in d if tp not in self.assigned]:
                del d[tp]
        self._jumped = [j for j in self._jumped if j[0] in self.assigned]

    def revoke(self, tps: set[TP], lowest_unacked: Callable[[TP], int | None]) -> None:
        for tp in tps:
            pending = lowest_unacked(tp)
            nxt = self._next.pop(tp, None)
            floor = pending if pending is not None else nxt
            if floor is not None:
                self._floor[tp] = floor
            for d in (self._target, self._hole, self._tries, self._want_seek, self._skips):
                d.pop(tp, None)
        self.assigned -= tps
        self._jumped = [j for j in self._jumped if j[0] in self.assigned]

    def start(self, tp: TP, committed: int, end: int | None = None) -> None:
        """The assignment resumes from ``committed``; ``end`` is the end offset now (what
        was written while nobody read it: a backlog). The caller then seeks ``tp`` to
        :meth:`next_offset`: what faust delivered before this was ignored."""
        if tp in self._next or tp not in self.assigned:
            return  # already started (faust announces completion twice)
        if end is not None:
            self._target[tp] = end
        floor = self._floor.pop(tp, None)
        # floor < committed: committed past a record never acked: it is read again.
        # floor > committed: committed..floor-1 were processed and acked before the
        # revocation but not committed yet; they come again as 'redelivered'. The
        # consumer forgot those acks with the revocation, and it commits nothing while
        # its oldest ack is beyond the committed offset: they are acked again, as a
        # range stepped over, in their turn.
        self._next[tp] = committed if floor is None else floor
        if floor is not None and floor > committed:
            self._jumped.append((tp, committed, floor))
        self._step_over_skips(tp)

    def admit(self, tp: TP, offset: int) -> Admit:
        """OK to process the record at ``offset``; anything else: ignore it."""
        if tp not in self.assigned:
            return Admit.UNASSIGNED
        nxt = self._next.get(tp)
        if nxt is None:
            return Admit.REBALANCING
        if offset > nxt and tp in self._skips:
            nxt = self._step_over_skips(tp) or nxt  # not None: the partition has a next offset
        if offset < nxt:
            return Admit.REDELIVERED
        if offset > nxt:
            self._hole.setdefault(tp, offset)
            now = self._clock()
            if now - self._sought_at.get(tp, -1e9) >= self.SEEK_EVERY_S:
                self._want_seek[tp] = nxt
                self._sought_at[tp] = now
                self._tries[tp] = self._tries.get(tp, 0) + 1
            return Admit.HOLE
        self._next[tp] = offset + 1
        self._hole.pop(tp, None)
        self._tries.pop(tp, None)
        return Admit.OK

    def skipped(self, tp: TP, start: int, end: int) -> None:
        """The fetcher found no record to deliver at offsets ``start..end-1`` of ``tp``
        (transaction markers, aborted or compacted records): a fact about the log, so the
        gate steps over them whenever it reaches them."""
        if tp not in self.assigned or end <= start:
            return
        nxt = self._next.get(tp)
        if nxt is not None and end <= nxt:
            return
        ranges = self._skips.setdefault(tp, {})
        ranges[start] = max(end, ranges.get(start, end))
        self._step_over_skips(tp)

    def settle(self) -> None:
        """Step over every reported range the gate has reached (call before admitting)."""
        for tp in list(self._skips):
            self._step_over_skips(tp)

    def jumps(self) -> list[tuple[TP, int, int]]:
        """Ranges ``(tp, start, end)`` stepped over since the last call, in order per tp:
        nothing there to process, acked in their turn like a record."""
        out, self._jumped = self._jumped, []
        return out

    def _step_over_skips(self, tp: TP) -> int | None:
        nxt = self._next.get(tp)
        ranges = self._skips.get(tp)
        if nxt is None or not ranges:
            return nxt
        to = nxt
        while True:
            end = max((e for s, e in ranges.items() if s <= to < e), default=None)
            if end is None:
                break
            to = end
        for s in [s for s, e in ranges.items() if e <= to]:
            del ranges[s]
        if not ranges:
            del self._skips[tp]
        if to > nxt:
            self._jumped.append((tp, nxt, to))
            self._next[tp] = to
            self._hole.pop(tp, None)
            self._tries.pop(tp, None)
        return to

    def seeks(self) -> dict[TP, int]:
        """Topic-partitions to seek back to their next offset (each asked once)."""
        out, self._want_seek = self._want_seek, {}
        return out

    def tries(self, tp: TP) -> int:
        """Seeks made for the current hole of ``tp``."""
        return self._tries.get(tp, 0)

    def next_offset(self, tp: TP) -> int | None:
        return self._next.get(tp)

    def skip_to(self, tp: TP, offset: int) -> None:
        """The records before ``offset`` are gone (deleted by retention): go on from it,
        the range they held acked in its turn (nothing there to process)."""
        nxt = self._next.get(tp)
        if nxt is not None and offset > nxt:
            self._jumped.append((tp, nxt, offset))
        self._next[tp] = offset
        self._hole.pop(tp, None)
        self._tries.pop(tp, None)
        self._want_seek[tp] = offset

    def catching_up(self, partition: int) -> bool:
        """A topic of this partition has not started, has a hole, or has not yet read the
        backlog it had when the assignment resumed. Meanwhile its modality is behind
        through no fault of its source, so the agent lets no idle deadline fire."""
        for tp in self.assigned:
            if tp[1] != partition:
                continue
            nxt = self._next.get(tp)
            if nxt is None or tp in self._hole or nxt < self._target.get(tp, 0):
                return True
        return False
