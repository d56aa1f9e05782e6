"""Each stream's progress: the start of its last published window, in a compacted topic.

The worker core records progress after a window is published and before its inputs are
acked; a worker taking over a partition reads it back, so replayed input does not emit a
published window again (docs/worker.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

from aiokafka import TopicPartition

from streamproc import kafka
from streamproc.config import Settings
from streamproc.topics import describe

log = logging.getLogger("streamproc.worker")


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
        self._forget_after: set[str] = set()

    def record(self, stream_id: str, start_ns: int) -> asyncio.Future:
        self._forget_after.discard(stream_id)  # it is back
        fut = asyncio.get_running_loop().create_future()
        if self._durable.get(stream_id, -1) >= start_ns:
            fut.set_result(None)
            return fut
        self._waiters[stream_id].append((start_ns, fut))
        self._wanted[stream_id] = max(start_ns, self._wanted.get(stream_id, -1))
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
            if sid in self._forget_after and not self._waiters.get(sid):
                self._forget_after.discard(sid)
                self._drop(sid)


def progress_topic(settings: Settings) -> str:
    """The worker group's progress topic (compacted; created by the worker)."""
    return f"{settings.app_id}-progress"


async def read_progress(settings: Settings) -> dict[str, int]:
    """Every stream's last published window, read from the progress topic to its end."""
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
