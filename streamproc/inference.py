"""Micro-batched inference off the event loop (design.md section 5).

Windows from every stream a worker owns queue up; a batch leaves when it holds
``max_batch`` windows or its oldest window has waited ``max_wait_ms``. The model runs in
one dedicated thread (torch releases the GIL), so the faust event loop keeps consuming
while a batch computes, and batches run one at a time in arrival order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's result plus the timing of the batch that computed it."""

    result: R
    queue_ms: float  # submitted -> its batch started computing
    compute_ms: float  # the whole batch's model time
    batch_size: int


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
        self._queue: asyncio.Queue[tuple[T, asyncio.Future, float]] | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish what was submitted, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    @property
    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def submit(self, item: T) -> asyncio.Future:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut, time.perf_counter()))
        return fut

    async def _next_batch(self) -> list[tuple[T, asyncio.Future, float]]:
        first = await self._queue.get()
        batch = [first]
        deadline = first[2] + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                # take what is already queued without waiting
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            items = [b[0] for b in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results "
                                       f"for {len(items)} items")
            except Exception as e:  # fail this batch's futures, keep serving
                log.exception("inference batch of %d failed", len(items))
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                compute_ms = (time.perf_counter() - started) * 1000
                if self.on_batch is not None:
                    self.on_batch(len(items), compute_ms)
                for (_, fut, t0), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(Batched(res, (started - t0) * 1000, compute_ms,
                                               len(items)))
            finally:
                for _ in batch:
                    self._queue.task_done()


# ---------------------------------------------------------------------------------------
# the model side: windows -> (label, scores)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One window's outcome from the model."""

    label: str
    scores: dict[str, float]
    preprocess_ms: float  # the batch's JPEG decode + resize + log-mel + hashing
    model_ms: float  # the batch's forward pass


class Predictor:
    """A model loaded once, called from the model thread with a batch of windows.

    ``spec`` is a checkpoint directory or ``package.module:factory`` (docs/models.md);
    preprocessing is the model's own (``model.preprocess``), the same code as training.
    """

    def __init__(self, spec: str, device: str = "auto", threads: int | None = None) -> None:
        import torch

        from streamproc.models import load_model, resolve_device

        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(spec, self.device)
        self.labels = [str(x) for x in self.model.labels]
        self.preprocess = self.model.preprocess
        self.info = {"name": str(self.model.name), "version": str(self.model.version)}

    def check_windows(self, window_ms: int, sample_rate: int) -> None:
        """Refuse window settings the model was not trained for, before any data flows."""
        from streamproc.errors import UserError

        pre = self.preprocess
        if window_ms != pre.window_ms:
            raise UserError(
                f"model {self.info['name']} was trained on {pre.window_ms} ms windows but the "
                f"worker makes {window_ms} ms windows: set --window-ms {pre.window_ms}")
        if sample_rate != pre.sample_rate:
            raise UserError(
                f"model {self.info['name']} expects audio at {pre.sample_rate} Hz but the "
                f"worker resamples to {sample_rate} Hz: set --sample-rate {pre.sample_rate}")

    def __call__(self, windows: Sequence) -> list[Scored]:
        import torch

        from streamproc.batch import make_batch

        t0 = time.perf_counter()
        batch = make_batch(windows, self.preprocess).to(self.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            probs = torch.softmax(self.model(batch).float(), dim=-1).cpu()
        t2 = time.perf_counter()
        pre_ms, model_ms = (t1 - t0) * 1000, (t2 - t1) * 1000
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Scored(self.labels[best],
                              {lab: round(p, 6) for lab, p in zip(self.labels, row, strict=True)},
                              pre_ms, model_ms))
        return out
