"""A backlog read in event-time order, however the fetches split it.

One fetch of a partition's audio can hold a minute of a stream's audio while the fetch of
its video holds seconds (the fetch size is in bytes and frames are big). Handed on as
fetched, the audio would run ahead of the video by the difference and the aligner, whose
buffers are capped, would drop what ran furthest ahead. So the fetch loop holds back what a
topic-partition brought more than :data:`AHEAD_MS` ahead of a sibling topic (the same
partition of another input topic) that has more to read, stops fetching it meanwhile, and
hands records on merged by event time (the record timestamp, which the wire format sets to
the event time). A sibling that has nothing more to read (live input, a dead source) holds
nothing back, and a partition none of whose records could go for :data:`MAX_HOLD_NS` of
wall time is released whole.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

TP = tuple[str, int]

#: How far (event time, ms) one input topic may run ahead of a sibling with more to read.
AHEAD_MS = 1000
#: Longest a partition's records are held back while none of them can go (wall clock, ns):
#: a sibling that cannot be fetched (a broker away) must not stop the others.
MAX_HOLD_NS = 2_000_000_000


class Timestamped(Protocol):
    """A fetched record: its topic-partition, offset and timestamp (ms)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None


class Interleaver:
    """Pending fetched records per topic-partition, released in event-time order.

    ``topics``: the input topics (a partition's siblings are its partitions of these).
    ``clock``: wall time in ns (the hold limit).
    """

    def __init__(self, topics: Iterable[str], *, ahead_ms: int = AHEAD_MS,
                 max_hold_ns: int = MAX_HOLD_NS,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.topics = tuple(topics)
        self.ahead_ms = ahead_ms
        self.max_hold_ns = max_hold_ns
        self.clock = clock
        self._pending: dict[TP, deque[Any]] = {}
        self._released_ts: dict[TP, int] = {}  # tp -> timestamp of the last record released
        self._holding_since: dict[int, int] = {}  # partition -> wall ns

    def put(self, tp: TP, records: Sequence[Timestamped]) -> None:
        """Records of one fetch of ``tp``, in offset order."""
        if records:
            self._pending.setdefault(tp, deque()).extend(records)

    def take(self, behind: Callable[[TP], bool]) -> list[Any]:
        """Every record that may go now, each partition's merged by timestamp (each
        topic-partition in offset order). ``behind(tp)``: whether ``tp`` has records
        beyond those handed on (asked only of topic-partitions with nothing pending)."""
        out: list[Any] = []
        now = self.clock()
        for partition in sorted({p for (_, p), q in self._pending.items() if q}):
            self._take_partition(partition, behind, now, out)
        return out

    def is_held(self, tp: TP) -> bool:
        """Whether ``tp`` has records held back."""
        return bool(self._pending.get(tp))

    def held(self) -> set[TP]:
        """Topic-partitions with records held back: not to be fetched until they go."""
        return {tp for tp, q in self._pending.items() if q}

    def drop(self, tps: Iterable[TP] | None = None) -> None:
        """Forget what is pending for ``tps`` (all when None): a rebalance or a seek; the
        consumer reads those records again."""
        for tp in list(self._pending) if tps is None else tps:
            self._pending.pop(tp, None)
            self._released_ts.pop(tp, None)
            self._holding_since.pop(tp[1], None)

    def _take_partition(self, partition: int, behind: Callable[[TP], bool], now: int,
                        out: list[Any]) -> None:
        tps = [(t, partition) for t in self.topics]
        since = self._holding_since.get(partition)
        forced = since is not None and now - since >= self.max_hold_ns
        bound = float("inf")  # nothing may go past this timestamp (ms)

        def limit(tp: TP) -> None:
            nonlocal bound
            if not forced and behind(tp):
                last = self._released_ts.get(tp)
                bound = min(bound, float("-inf") if last is None else last + self.ahead_ms)

        heads: list[tuple[int, int, TP]] = []
        for i, tp in enumerate(tps):
            q = self._pending.get(tp)
            if q:
                heads.append((_ts(q[0]), i, tp))
            else:
                limit(tp)
        heapq.heapify(heads)
        released = len(out)
        while heads:
            ts, i, tp = heads[0]
            if ts > bound:
                break
            q = self._pending[tp]
            out.append(q.popleft())
            self._released_ts[tp] = ts
            if q:
                heapq.heapreplace(heads, (_ts(q[0]), i, tp))
            else:
                heapq.heappop(heads)
                limit(tp)
        if not heads:
            self._holding_since.pop(partition, None)
        elif len(out) > released or since is None:
            # the limit is on time without progress: a sibling read steadily holds the
            # others back for as long as its backlog takes
            self._holding_since[partition] = now


def _ts(record: Timestamped) -> int:
    # a record without a timestamp (or -1: none set by its producer) goes first
    return record.timestamp if record.timestamp is not None else -1
