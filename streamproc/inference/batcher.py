"""Micro-batching: items from many callers share one model call in a dedicated thread.

A batch leaves when it holds ``max_batch`` items or its oldest item has waited
``max_wait_ms``. The function runs in one thread (torch releases the GIL), so the event
loop keeps serving while a batch computes, and batches run one at a time in arrival order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # how long a stopping worker waits for windows handed to the model

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's result plus the timing of the batch that computed it."""

    result: R
    queue_ms: float  # submitted -> its batch started computing
    compute_ms: float  # the whole batch's model time
    batch_size: int


class _Pending(NamedTuple, Generic[T, R]):
    """A submitted item waiting for its batch."""

    item: T
    future: asyncio.Future[Batched[R]]
    submitted: float  # perf_counter seconds


class MicroBatcher(Generic[T, R]):
    """Collect items into batches for ``fn(items) -> results`` run in a worker thread.

    ``submit`` returns at once with a future resolving to :class:`Batched`; an exception in
    ``fn`` fails every future of that batch and the batcher keeps going.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish what was submitted (for up to ``STOP_TIMEOUT_S``), then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._started_queue().join(), STOP_TIMEOUT_S)
        except TimeoutError:
            # their windows are not published, so their records are never acked: the
            # next owner of the partitions replays them
            log.warning("stopping with %d window(s) not scored after %.0f s", self.pending,
                        STOP_TIMEOUT_S)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._executor is not None:
            # a model call may still be running: wait for it off the event loop
            await asyncio.to_thread(self._executor.shutdown, True)
        self._task = None

    @property
    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def submit(self, item: T) -> asyncio.Future[Batched[R]]:
        queue = self._started_queue()
        fut: asyncio.Future[Batched[R]] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Pending(item, fut, time.perf_counter()))
        return fut

    async def run_alone(self, item: T) -> R:
        """Run ``fn`` on one item in the model thread (used to isolate a failing batch)."""
        loop = asyncio.get_running_loop()
        (result,) = await loop.run_in_executor(self._executor, self.fn, [item])
        return result

    def _started_queue(self) -> asyncio.Queue[_Pending[T, R]]:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        return self._queue

    async def _next_batch(self) -> list[_Pending[T, R]]:
        queue = self._started_queue()
        first = await queue.get()
        batch = [first]
        deadline = first.submitted + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                # take what is already queued without waiting
                while len(batch) < self.max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._started_queue()
        while True:
            batch = await self._next_batch()
            items = [b.item for b in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results "
                                       f"for {len(items)} items")
            except Exception as e:  # fail this batch's futures, keep serving
                log.exception("inference batch of %d failed", len(items))
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(e)
            else:
                compute_ms = (time.perf_counter() - started) * 1000
                if self.on_batch is not None:
                    self.on_batch(len(items), compute_ms)
                for b, res in zip(batch, results, strict=True):
                    if not b.future.done():
                        b.future.set_result(Batched(res, (started - b.submitted) * 1000,
                                                    compute_ms, len(items)))
            finally:
                for _ in batch:
                    queue.task_done()
