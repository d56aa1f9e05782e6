"""Where the worker's closed windows go: the :class:`WindowOutput` seam and its two kinds.

:class:`SummaryOutput` (align-only) publishes each window's summary; :class:`InferenceOutput`
runs the windows of every stream through one micro-batched model first. Both publish a
stream's predictions in window order, so a reader of one partition sees each stream's
windows in order: each goes into the producer's queue once the stream's previous one is
queued (not delivered), and the producer sends a partition's records in the order they
were queued. A window's awaitable resolves once its own prediction is delivered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from streamproc.align.aligner import Window
from streamproc.inference.batcher import Batched, MicroBatcher
from streamproc.inference.predictions import prediction_record, summary_prediction
from streamproc.inference.predictor import Scored
from streamproc.wire import codec as wire

if TYPE_CHECKING:
    from streamproc.worker.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Puts one record in the producer's queue; resolves, once it is queued, to the awaitable
#: of its delivery (done once the broker has it).
Enqueue = Callable[[wire.KafkaRecord], Awaitable[Awaitable[object]]]


class WindowOutput(Protocol):
    """Where closed windows go.

    ``submit`` must return at once (the agent never waits on one window); the awaitable
    resolves only when the window's output is durably published (the agent then records
    progress and acks the inputs) and raises if it cannot be (the worker then crashes and
    a restart replays the window).
    """

    async def start(self) -> None: ...

    def submit(self, window: Window) -> Awaitable[None]: ...

    async def stop(self) -> None: ...


class StreamChain:
    """Tasks whose last step runs per stream in submit order.

    The producer may reorder records sent concurrently (a smaller record fills the room
    left in a full batch that an earlier one waits on), so each stream's windows are
    queued one after the other; different streams still overlap.
    """

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future[Any]] = {}
        self.pending: set[asyncio.Future[Any]] = set()

    def start(self, stream_id: str,
              step: Callable[[asyncio.Future[Any] | None], Awaitable[T]]
              ) -> asyncio.Future[T]:
        """Run ``step(previous)``, where ``previous`` is the stream's task before it (to
        be awaited before queueing) or None."""
        fut = asyncio.ensure_future(step(self._last.get(stream_id)))
        self._last[stream_id] = fut
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)

        def forget(done: asyncio.Future[T]) -> None:
            if self._last.get(stream_id) is done:
                del self._last[stream_id]

        fut.add_done_callback(forget)
        return fut

    async def drain(self, timeout: float) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=timeout)

    @staticmethod
    async def after(previous: asyncio.Future[Any] | None) -> None:
        """Wait for ``previous`` to end; its failure is reported by its own task.

        Not ``await previous``: cancelling this wait must not cancel it. Not
        ``asyncio.wait`` either, which costs as much per window as the rest of the
        chain (a set, a counter, a callback per future): one waiter, one callback."""
        if previous is None or previous.done():
            return
        waiter = asyncio.get_running_loop().create_future()

        def wake(_: asyncio.Future[Any]) -> None:
            if not waiter.done():
                waiter.set_result(None)

        previous.add_done_callback(wake)
        try:
            await waiter
        finally:
            previous.remove_done_callback(wake)


class _Undelivered:
    """The futures of windows handed to an output and not yet delivered (or failed), so
    that stopping waits for them."""

    def __init__(self) -> None:
        self._futures: set[asyncio.Future[None]] = set()

    def new(self) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.add(done)
        done.add_done_callback(self._futures.discard)
        return done

    async def wait(self, timeout: float) -> None:
        if self._futures:
            await asyncio.wait(list(self._futures), timeout=timeout)


class SummaryOutput:
    """The align-only output: each window's summary, published with ``enqueue``.

    A stream's summaries go into the producer's queue one after the other, each once the
    one before it is queued (not delivered): the producer sends a partition's records in
    the order they were queued, so they reach the broker in window order, and a burst of
    windows goes out in few requests. One task per stream with summaries waiting, not
    one per window: per window, a record, a future and a callback.
    """

    def __init__(self, enqueue: Enqueue, headers: wire.Headers = ()) -> None:
        self.enqueue = enqueue
        self.headers = headers
        self._waiting: dict[str, deque[tuple[wire.KafkaRecord, asyncio.Future[None]]]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._undelivered = _Undelivered()

    async def start(self) -> None:
        pass

    def submit(self, window: Window) -> asyncio.Future[None]:
        done = self._undelivered.new()
        rec = prediction_record(summary_prediction(window), self.headers)
        waiting = self._waiting.get(window.stream_id)
        if waiting is None:
            waiting = self._waiting[window.stream_id] = deque()
            task = asyncio.ensure_future(self._queue(window.stream_id, waiting))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._ended, window.stream_id, waiting))
        waiting.append((rec, done))
        return done

    async def _queue(self, stream_id: str,
                     waiting: deque[tuple[wire.KafkaRecord, asyncio.Future[None]]]) -> None:
        while waiting:
            rec, done = waiting[0]
            try:
                delivery = asyncio.ensure_future(await _enqueued(self.enqueue, rec))
            except Exception as exc:  # this window fails (the worker crashes); not the next
                if not done.done():
                    done.set_exception(exc)
            else:
                delivery.add_done_callback(functools.partial(_settle, done))
            waiting.popleft()
        # Here, with no await since the loop found the deque empty, and not in a done
        # callback (which runs later): a window submitted in between would join a deque
        # that nothing drains any more.
        del self._waiting[stream_id]

    def _ended(self, stream_id: str,
               waiting: deque[tuple[wire.KafkaRecord, asyncio.Future[None]]],
               task: asyncio.Future[None]) -> None:
        """The stream's task ended; if it did not empty its deque (cancelled, even before
        its first step, or failed), its windows end with it."""
        self._tasks.discard(task)
        if self._waiting.get(stream_id) is not waiting:
            return
        del self._waiting[stream_id]
        exc = None if task.cancelled() else task.exception()
        for _, done in waiting:
            if done.done():
                continue
            if exc is None:
                done.cancel()  # cancelled while queueing: shutting down
            else:
                done.set_exception(exc)

    async def stop(self) -> None:
        await self._undelivered.wait(timeout=30)


async def _enqueued(enqueue: Enqueue, rec: wire.KafkaRecord) -> Awaitable[object]:
    """``enqueue(rec)``; a cancellation that is not this task's own (the client's, say)
    fails the window instead: cancelled, it would read as shutting down, and its inputs
    would wait for ever."""
    try:
        return await enqueue(rec)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise RuntimeError(f"queueing a prediction was cancelled: {exc!r}") from exc


def _when_delivered(done: asyncio.Future[None],
                    queued: asyncio.Future[tuple[asyncio.Future[object], Callable[[], None]]]
                    ) -> None:
    """Settle ``done`` once the prediction ``queued`` put in the producer's queue is
    delivered, after its ``delivered`` step (latencies, counts)."""
    if queued.cancelled() or queued.exception() is not None:
        _settle(done, queued)
        return
    delivery, delivered = queued.result()

    def landed(d: asyncio.Future[object]) -> None:
        if not d.cancelled() and d.exception() is None:
            try:
                delivered()
            except Exception:  # a metrics bug must not leave the window unacked
                log.exception("recording a delivered prediction failed")
        _settle(done, d)

    delivery.add_done_callback(landed)


def _settle(done: asyncio.Future[None], delivery: asyncio.Future[Any]) -> None:
    """``done`` as ``delivery`` ended (unless it was settled already)."""
    if done.done():
        if not delivery.cancelled():
            delivery.exception()  # seen: no "never retrieved" log line
        return
    if delivery.cancelled():
        done.cancel()
    elif delivery.exception() is not None:
        done.set_exception(delivery.exception())  # type: ignore[arg-type]
    else:
        done.set_result(None)


class _Provisional:
    """A provisional prediction of a window whose final has not come yet."""

    __slots__ = ("label", "published_ns", "scored")

    def __init__(self, scored: asyncio.Future[Batched[Scored]]) -> None:
        self.scored = scored
        self.label: str | None = None
        self.published_ns: int | None = None


class InferenceOutput:
    """The output when a model is loaded: windows -> micro-batched model -> predictions.

    Windows from every stream queue into one micro-batcher; each result becomes a
    prediction published with ``enqueue``. A batch that fails is retried window by
    window, so one bad window cannot take its neighbours down; a window that fails alone is
    published with an empty label and the reason in ``quality["error"]`` (counted as
    ``inference_errors``) and the stream goes on.
    """

    #: Provisional predictions remembered until their final (the oldest forgotten first: a
    #: final that never comes, its partition revoked, must not hold memory for ever).
    PROVISIONAL_KEPT = 65_536

    def __init__(self, predictor: Callable[[Sequence[Window]], Sequence[Scored]],
                 enqueue: Enqueue, *, model_info: Mapping[str, str], max_batch: int,
                 max_wait_ms: float, metrics: Metrics | None = None,
                 headers: wire.Headers = (),
                 current_model: Callable[[], Mapping[str, str]] | None = None) -> None:
        self.enqueue = enqueue
        self.model_info = dict(model_info)
        self.current_model = current_model
        self.metrics = metrics
        self.headers = headers
        self._headers_by_model: dict[tuple[tuple[str, str], ...], wire.Headers] = {}
        self.batcher: MicroBatcher[Window, Scored] = MicroBatcher(
            predictor, max_batch, max_wait_ms, on_batch=self._on_batch)
        self._chain = StreamChain()
        self._undelivered = _Undelivered()
        self._last_publish_ms = 0.0
        self._provisional: dict[tuple[str, int], _Provisional] = {}

    async def start(self) -> None:
        await self.batcher.start()

    def submit(self, window: Window) -> asyncio.Future[None]:
        """Score and publish a window. A final window with nothing added since its
        provisional one reuses the provisional's scores (no second model call)."""
        closed_ns = time.time_ns()
        earlier = self._provisional.pop(window.key, None) if window.final else None
        reused = earlier is not None and window.unchanged
        scored = earlier.scored if earlier is not None and reused else \
            self.batcher.submit(window)
        if not window.final:
            if len(self._provisional) >= self.PROVISIONAL_KEPT:
                del self._provisional[next(iter(self._provisional))]
            earlier = self._provisional[window.key] = _Provisional(scored)
        done = self._undelivered.new()
        queued = self._chain.start(window.stream_id, lambda previous: self._finish(
            window, scored, closed_ns, previous, earlier, reused))
        queued.add_done_callback(functools.partial(_when_delivered, done))
        return done

    async def stop(self) -> None:
        await self._chain.drain(timeout=30)
        await self._undelivered.wait(timeout=30)
        await self.batcher.stop()

    def _model_now(self) -> Mapping[str, str]:
        return self.current_model() if self.current_model is not None else self.model_info

    def _headers_for(self, model: Mapping[str, str]) -> wire.Headers:
        """The output's headers with ``sp-model`` naming ``model``."""
        key = tuple(sorted(model.items()))
        headers = self._headers_by_model.get(key)
        if headers is None:
            value = f"{model['name']}/{model['version']}".encode()
            headers = self._headers_by_model[key] = tuple(
                (k, value) if k == "sp-model" else (k, v) for k, v in self.headers)
        return headers

    async def _score_again(self, window: Window, scored: Scored, queue_ms: float,
                           compute_ms: float) -> tuple[Scored, float, float, bool]:
        """Score ``window`` with the model served now when ``scored`` came from an earlier
        one (it was in flight when the model was swapped); else leave it."""
        now = self._model_now()
        if self.current_model is None or scored.model is None or scored.model == now:
            return scored, queue_ms, compute_ms, False
        try:
            done = await self.batcher.submit(window)
        except Exception as e:  # the earlier model's prediction stands, and says so
            log.warning("window %s@%d: scoring again with the new model failed (%r); "
                        "publishing the previous model's prediction", window.stream_id,
                        window.start_ns, e)
            return scored, queue_ms, compute_ms, False
        return done.result, done.queue_ms, done.compute_ms, True

    def _on_batch(self, size: int, compute_ms: float) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)
            self.metrics.inference_seconds.observe(compute_ms / 1000)

    async def _finish(self, window: Window, fut: asyncio.Future[Batched[Scored]],
                      closed_ns: int, previous: asyncio.Future[Any] | None,
                      provisional: _Provisional | None, reused: bool
                      ) -> tuple[asyncio.Future[object], Callable[[], None]]:
        """Score the window and queue its prediction once the stream's previous one is
        queued; returns its delivery and what to do once it is delivered."""
        quality_extra: dict[str, str] = {}
        try:
            done = await fut
            scored, queue_ms, compute_ms = done.result, done.queue_ms, done.compute_ms
            if reused:  # computed for the provisional: this final cost no model time
                scored = Scored(scored.label, scored.scores, 0.0, 0.0, scored.model)
                queue_ms = compute_ms = 0.0
        except Exception as batch_error:
            reused = False  # scored here, alone, after all
            t0 = time.perf_counter()
            try:
                scored = await self.batcher.run_alone(window)
            except Exception as e:
                log.error("inference failed for window %s@%d: %r", window.stream_id,
                          window.start_ns, e)
                if self.metrics is not None:
                    self.metrics.counters.inc("inference_errors")
                scored = Scored("", {}, 0.0, 0.0)
                quality_extra["error"] = f"inference failed: {e!r}"[:500]
            else:
                log.warning("window %s@%d scored alone after its batch failed: %r",
                            window.stream_id, window.start_ns, batch_error)
            queue_ms, compute_ms = 0.0, (time.perf_counter() - t0) * 1000
        await StreamChain.after(previous)
        # after the stream's previous prediction is queued: a swap it saw is seen here too
        scored, queue_ms, compute_ms, again = await self._score_again(
            window, scored, queue_ms, compute_ms)
        if again:
            reused = False
        model = scored.model if scored.model is not None else self._model_now()
        emitted_ns = time.time_ns()
        pred = summary_prediction(
            window, label=scored.label, scores=scored.scores, model=model,
            emitted_at_ns=emitted_ns, reused=reused,
            latency_ms={"close": round((closed_ns - window.end_ns) / 1e6, 3),
                        "queue": round(queue_ms, 3), "inference": round(compute_ms, 3),
                        "preprocess": round(scored.preprocess_ms, 3),
                        "model": round(scored.model_ms, 3),
                        "added": round((emitted_ns - closed_ns) / 1e6, 3),
                        # a record cannot carry its own delivery time: the worker's most
                        # recent publish round trip stands in for it
                        "publish": round(self._last_publish_ms, 3)})
        pred.quality.update(quality_extra)
        rec = prediction_record(pred, self._headers_for(model))
        t_pub = time.perf_counter()
        return (asyncio.ensure_future(await _enqueued(self.enqueue, rec)),
                functools.partial(self._delivered, window, scored, closed_ns, provisional,
                                  reused, t_pub))

    def _delivered(self, window: Window, scored: Scored, closed_ns: int,
                   provisional: _Provisional | None, reused: bool, t_pub: float) -> None:
        """The window's prediction is in the broker: its latencies and counts."""
        publish_ms = self._last_publish_ms = (time.perf_counter() - t_pub) * 1000
        now = time.time_ns()
        if not window.final and provisional is not None:
            provisional.label, provisional.published_ns = scored.label, now
        if self.metrics is not None:
            m = self.metrics
            m.added_latency_seconds.observe((now - closed_ns) / 1e9)
            if not window.final:
                m.provisional_latency_seconds.observe((now - window.end_ns) / 1e9)
            elif window.quality.get("closed_by") != "revision":  # a revision: its own count
                m.e2e_latency_seconds.observe((now - window.end_ns) / 1e9)
                if provisional is not None and provisional.published_ns is not None:
                    m.provisional_to_final_seconds.observe(
                        (now - provisional.published_ns) / 1e9)
                    if provisional.label != scored.label:
                        m.counters.inc("label_flips")
                if reused:
                    m.counters.inc("predictions_reused")
            for modality in scored.reused:
                m.counters.inc("encodings_reused", modality=modality)
        log.debug("window %s@%d -> %s (publish %.1f ms)", window.stream_id, window.start_ns,
                  scored.label, publish_ms)
