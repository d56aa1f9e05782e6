"""Each stream's progress: the start of its last published window, in a compacted topic.

The worker core records progress after a window is published and before its inputs are
acked; a worker taking over a partition reads it back, so replayed input does not emit a
published window again (docs/worker.md). With a revision horizon it also records which
revision of each still revisable window was published, and the floor below which inputs
may be acked (:class:`StreamProgress`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import TopicPartition

from streamproc import kafka
from streamproc.config import Settings
from streamproc.topics import describe

log = logging.getLogger("streamproc.worker")

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class StreamProgress:
    """One stream's progress record.

    ``through``: start of its newest final window published with every earlier one.
    ``revising``: written by a worker with a revision horizon, which also records
    ``floor``, every input record whose last window starts at or after it is not acked yet
    (a restart's replay brings them all back; None: no record acked for that reason yet),
    and ``revs``, window start -> (rev published last, the record ids of its transcript
    records) for the windows from the floor on. ``seq`` orders this worker's values (not
    written).
    """

    through: int | None
    revising: bool = False
    floor: int | None = None
    revs: Mapping[int, tuple[int, frozenset[int]]] = field(default_factory=dict)
    seq: int = 0

    def encode(self) -> bytes:
        """A plain number without revisions (as every worker before them wrote), else JSON."""
        if not self.revising:
            return str(self.through).encode("ascii")
        return json.dumps({"through": self.through, "floor": self.floor,
                           "revs": {str(k): [r, sorted(ids)] for k, (r, ids)
                                    in self.revs.items()}},
                          separators=(",", ":")).encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> StreamProgress:
        """Raises ValueError for anything that is not a progress value."""
        text = raw.decode("ascii")
        if not text.lstrip().startswith("{"):
            return cls(int(text))
        obj = json.loads(text)
        through, floor = obj["through"], obj["floor"]
        return cls(None if through is None else int(through), True,
                   None if floor is None else int(floor),
                   {int(k): (int(r), frozenset(int(i) for i in ids))
                    for k, (r, ids) in obj["revs"].items()})


def _same(value: Any) -> Any:
    return value


class ProgressWriter(Generic[V]):
    """Writes each stream's progress to its topic one record at a time, newest value last.

    Sends are awaited one after the other per stream (concurrent sends can reach the
    broker out of order, and the compacted topic keeps the last one); values that pile
    up meanwhile are coalesced into one record. ``record`` resolves once the stream's
    durable progress is at least the given value, by ``order`` (the value itself, or e.g.
    a :class:`StreamProgress`'s ``seq``).
    """

    def __init__(self, send: Callable[[str, V], Awaitable[None]],
                 order: Callable[[V], Any] = _same) -> None:
        self._send = send
        self._order = order
        self._wanted: dict[str, V] = {}
        self._durable: dict[str, V] = {}
        self._waiters: dict[str, list[tuple[V, asyncio.Future]]] = defaultdict(list)
        self._tasks: dict[str, asyncio.Task] = {}
        self._forget_after: set[str] = set()

    def _newer(self, a: V, b: V | None) -> bool:
        return b is None or self._order(a) > self._order(b)

    def record(self, stream_id: str, value: V) -> asyncio.Future:
        self._forget_after.discard(stream_id)  # it is back
        fut = asyncio.get_running_loop().create_future()
        if not self._newer(value, self._durable.get(stream_id)):
            fut.set_result(None)
            return fut
        self._waiters[stream_id].append((value, fut))
        if self._newer(value, self._wanted.get(stream_id)):
            self._wanted[stream_id] = value
        if stream_id not in self._tasks:
            self._tasks[stream_id] = asyncio.ensure_future(self._write(stream_id))
        return fut

    def forget(self, stream_id: str) -> None:
        """Drop an expired stream's values (once a write of it under way has ended)."""
        if stream_id in self._tasks:
            self._forget_after.add(stream_id)
        else:
            self._drop(stream_id)

    def _drop(self, sid: str) -> None:
        self._wanted.pop(sid, None)
        self._durable.pop(sid, None)

    async def _write(self, sid: str) -> None:
        try:
            while self._newer(self._wanted[sid], self._durable.get(sid)):
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
                    if not self._newer(v, value):
                        if not fut.done():
                            fut.set_result(None)
                    else:
                        still.append((v, fut))
                if still:
                    self._waiters[sid] = still
        finally:
            del self._tasks[sid]
            if sid in self._forget_after and not self._waiters.get(sid):
                self._forget_after.discard(sid)
                self._drop(sid)


def progress_topic(settings: Settings) -> str:
    """The worker group's progress topic (compacted; created by the worker)."""
    return f"{settings.app_id}-progress"


async def read_progress(settings: Settings) -> dict[str, StreamProgress]:
    """Every stream's progress, read from the progress topic to its end."""
    topic = progress_topic(settings)
    (state,) = await asyncio.get_running_loop().run_in_executor(
        None, describe, settings, (topic,))
    if not state.partitions:
        return {}
    tps = [TopicPartition(topic, p) for p in range(state.partitions)]
    consumer = kafka.aio_consumer(settings)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: dict[str, StreamProgress] = {}
        pending = {tp for tp in tps if end[tp] > 0}
        while pending:
            for msgs in (await consumer.getmany(*pending, timeout_ms=1000)).values():
                for m in msgs:
                    if m.key and m.value:
                        # a record that is not ours must not stop every resume
                        try:
                            out[m.key.decode("utf-8")] = StreamProgress.decode(m.value)
                        except (ValueError, KeyError, TypeError):
                            log.warning("ignoring a record of %s that is not progress: "
                                        "%r=%r", topic, m.key[:64], m.value[:64])
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()
