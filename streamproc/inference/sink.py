"""Micro-batched inference off the event loop (docs/design.md §5).

Windows from every stream a worker owns queue up; a batch leaves when it holds
``max_batch`` windows or its oldest window has waited ``max_wait_ms``. The model runs in
one dedicated thread (torch releases the GIL), so the faust event loop keeps consuming
while a batch computes, and batches run one at a time in arrival order. A stream's
predictions are published in window order (each after the stream's previous one is in
the broker), so a reader of one partition sees each stream's windows in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kafka import TopicPartition
from kafka.errors import KafkaError

from streamproc.align.aligner import Window
from streamproc.config import MODALITIES, Settings
from streamproc.readers import kafka_consumer
from streamproc.wire import codec as wire

log = logging.getLogger(__name__)

ALIGN_ONLY_MODEL = {"name": "align-only", "version": "1"}
#: A prediction from another worker group counts as recent (a group still writing) when
#: it was emitted less than this long ago.
RECENT_OTHER_GROUP_S = 600.0
#: Records read from the end of each predictions partition at start-up.
TAIL_RECORDS = 50

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

    async def run_alone(self, item: T) -> R:
        """Run ``fn`` on one item in the model thread (used to isolate a failing batch)."""
        loop = asyncio.get_running_loop()
        (result,) = await loop.run_in_executor(self._executor, self.fn, [item])
        return result

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
# windows -> prediction records
# ---------------------------------------------------------------------------------------


def window_summary(window: Window) -> dict[str, Any]:
    """Window -> the prediction fields every sink shares (all but label, scores, model).

    ``modalities`` says what each modality contributed and which were missing;
    ``provenance`` lists ``[partition, offset]`` per modality (the topic is the modality's).
    """
    present = dict(window.present)
    audio_s = float(window.audio_mask.sum()) / window.sample_rate if window.sample_rate else 0.0
    modalities: dict[str, Any] = {
        "video": {"present": bool(present.get("video", False)), "frames": window.frame_count,
                  "sampled": len(window.frames)},
        "audio": {"present": bool(present.get("audio", False)), "seconds": round(audio_s, 6)},
        "text": {"present": bool(present.get("text", False)), "segments": len(window.segments)},
        "missing": [m for m in MODALITIES if not present.get(m, False)],
    }
    provenance = {m: [[s.partition, s.offset] for s in srcs]
                  for m, srcs in window.provenance.items()}
    return {
        "stream_id": window.stream_id,
        "window_start_ns": window.start_ns,
        "window_end_ns": window.end_ns,
        "modalities": modalities,
        "quality": {k: _jsonable(v) for k, v in window.quality.items()
                    if not k.startswith("ingest_")},  # those go to the latency breakdown
        "provenance": provenance,
    }


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalar
        return v.item()
    return v


def summary_prediction(window: Window, *, label: str = "", scores: Mapping[str, float] | None = None,
                       model: Mapping[str, str] = ALIGN_ONLY_MODEL,
                       latency_ms: Mapping[str, float] | None = None,
                       emitted_at_ns: int | None = None) -> wire.Prediction:
    """A Prediction for a window; the align-only sink leaves label and scores empty.

    ``latency_ms`` always has ``total`` (window end in event time -> emitted, wall clock)
    and ``capture_to_worker_<modality>`` (the stream's newest record of that modality:
    captured -> received by the worker); sinks add their own stages.
    """
    now = time.time_ns() if emitted_at_ns is None else emitted_at_ns
    lat = {f"capture_to_worker_{m}": float(window.quality[f"ingest_{m}_ms"])
           for m in MODALITIES if f"ingest_{m}_ms" in window.quality}
    lat["total"] = round((now - window.end_ns) / 1e6, 3)
    lat.update(latency_ms or {})
    return wire.Prediction(label=label, scores=dict(scores or {}), model=dict(model),
                           emitted_at_ns=now, latency_ms=lat, **window_summary(window))



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

    def __call__(self, windows: Sequence) -> list[Scored]:
        from streamproc.models import predict_proba

        timings: dict[str, float] = {}
        probs = predict_proba(self.model, windows, timings)
        pre_ms, model_ms = timings["preprocess_ms"], timings["model_ms"]
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Scored(self.labels[best],
                              {lab: round(p, 6) for lab, p in zip(self.labels, row, strict=True)},
                              pre_ms, model_ms))
        return out


# ---------------------------------------------------------------------------------------
# the sink: windows -> batched model -> predictions topic
# ---------------------------------------------------------------------------------------


class StreamChain:
    """Tasks whose last step runs per stream in submit order.

    The producer may reorder records sent concurrently (a smaller record fills the room
    left in a full batch that an earlier one waits on), so each stream's windows are
    published one after the other; different streams still overlap.
    """

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future] = {}
        self.pending: set[asyncio.Future] = set()

    def start(self, stream_id: str,
              step: Callable[[asyncio.Future | None], Awaitable[None]]) -> asyncio.Future:
        """Run ``step(previous)``, where ``previous`` is the stream's task before it (to
        be awaited before publishing) or None."""
        fut = asyncio.ensure_future(step(self._last.get(stream_id)))
        self._last[stream_id] = fut
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)
        fut.add_done_callback(lambda f: self._last.pop(stream_id, None)
                              if self._last.get(stream_id) is f else None)
        return fut

    async def drain(self, timeout: float) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=timeout)

    @staticmethod
    async def after(previous: asyncio.Future | None) -> None:
        """Wait for ``previous`` to end; its failure is reported by its own task."""
        if previous is not None:
            await asyncio.wait([previous])


class InferenceSink:
    """The worker's window sink (app.WindowSink) when a model is loaded.

    Windows from every stream queue into one micro-batcher; each result becomes a
    prediction published with ``publish`` (which resolves once the broker has it). A
    batch that fails is retried window by window, so one bad window cannot sink its
    neighbours; a window that fails alone is published with an empty label and the
    reason in ``quality["error"]`` (counted as ``inference_errors``) and the stream goes on.
    """

    def __init__(self, predictor: Callable[[Sequence[Window]], Sequence[Scored]],
                 publish: Callable[[wire.KafkaRecord], Awaitable[None]], *,
                 model_info: Mapping[str, str], max_batch: int, max_wait_ms: float,
                 metrics: Any = None, headers: tuple[tuple[str, bytes], ...] = ()) -> None:
        self.publish = publish
        self.model_info = dict(model_info)
        self.metrics = metrics
        self.headers = headers
        self.batcher: MicroBatcher[Window, Scored] = MicroBatcher(
            predictor, max_batch, max_wait_ms, on_batch=self._on_batch)
        self._chain = StreamChain()
        self._last_publish_ms = 0.0

    async def start(self) -> None:
        await self.batcher.start()

    def submit(self, window: Window) -> Awaitable[None]:
        closed_ns = time.time_ns()
        scored = self.batcher.submit(window)
        return self._chain.start(window.stream_id, lambda previous: self._finish(
            window, scored, closed_ns, previous))

    async def stop(self) -> None:
        await self._chain.drain(timeout=30)
        await self.batcher.stop()

    def _on_batch(self, size: int, compute_ms: float) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)
            self.metrics.inference_seconds.observe(compute_ms / 1000)

    async def _finish(self, window: Window, fut: asyncio.Future, closed_ns: int,
                      previous: asyncio.Future | None) -> None:
        quality_extra: dict[str, str] = {}
        try:
            done: Batched[Scored] = await fut
            scored, queue_ms, compute_ms = done.result, done.queue_ms, done.compute_ms
        except Exception as batch_error:
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
        emitted_ns = time.time_ns()
        pred = summary_prediction(
            window, label=scored.label, scores=scored.scores, model=self.model_info,
            emitted_at_ns=emitted_ns,
            latency_ms={"close": round((closed_ns - window.end_ns) / 1e6, 3),
                        "queue": round(queue_ms, 3), "inference": round(compute_ms, 3),
                        "preprocess": round(scored.preprocess_ms, 3),
                        "model": round(scored.model_ms, 3),
                        "added": round((emitted_ns - closed_ns) / 1e6, 3),
                        # a record cannot carry its own delivery time: the worker's most
                        # recent publish round trip stands in for it
                        "publish": round(self._last_publish_ms, 3)})
        pred.quality.update(quality_extra)
        rec = wire.encode_prediction(pred)
        rec = wire.KafkaRecord(rec.key, rec.value, (*rec.headers, *self.headers),
                               rec.timestamp_ms)
        t_pub = time.perf_counter()
        await self.publish(rec)
        publish_ms = self._last_publish_ms = (time.perf_counter() - t_pub) * 1000
        if self.metrics is not None:
            now = time.time_ns()
            self.metrics.added_latency_seconds.observe((now - closed_ns) / 1e9)
            self.metrics.e2e_latency_seconds.observe((now - window.end_ns) / 1e9)
        log.debug("window %s@%d -> %s (publish %.1f ms)", window.stream_id, window.start_ns,
                  scored.label, publish_ms)


# ---------------------------------------------------------------------------------------
# who wrote a prediction: headers, and other groups on the same predictions topic
# ---------------------------------------------------------------------------------------


def window_settings(settings: Settings) -> str:
    """The settings that decide a worker group's windows, as the ``sp-window`` header."""
    return (f"window_ms={settings.window_ms},hop_ms={settings.hop_ms},"
            f"lateness_video_ms={settings.lateness_video_ms},"
            f"lateness_audio_ms={settings.lateness_audio_ms},"
            f"lateness_text_ms={settings.lateness_text_ms},"
            f"frames_per_window={settings.frames_per_window}")


def prediction_headers(settings: Settings, model_info: Mapping[str, str]
                       ) -> tuple[tuple[str, bytes], ...]:
    """Headers naming who wrote a prediction: ``sp-app`` (the worker group), ``sp-model``
    (name/version) and ``sp-window`` (:func:`window_settings`)."""
    return (("sp-app", settings.app_id.encode("utf-8")),
            ("sp-model", f"{model_info['name']}/{model_info['version']}".encode()),
            ("sp-window", window_settings(settings).encode("ascii")))


def other_groups(settings: Settings, model_info: Mapping[str, str], *,
                 now_ns: int | None = None, timeout_s: float = 10.0) -> list[str]:
    """Warnings about other worker groups writing this group's predictions topic.

    Reads the last :data:`TAIL_RECORDS` records of each partition (blocking: call it
    before the app starts, never on the event loop). A group other than
    ``settings.app_id`` that emitted a prediction in the last
    :data:`RECENT_OTHER_GROUP_S` seconds gets one line, saying how its model and window
    settings differ from ours.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    topic = settings.topic("predictions")
    mine = {k: v.decode("utf-8") for k, v in prediction_headers(settings, model_info)}
    seen: dict[str, dict[str, Any]] = {}
    try:
        _read_writers(settings, topic, mine["sp-app"], now_ns, timeout_s, seen)
    except KafkaError as e:  # a check, not a reason to stay down
        return [f"could not read the end of {topic} to look for other worker groups: {e!r}"]
    out = []
    for app, info in sorted(seen.items()):
        diffs = [f"{name} {info[h]!r} (this worker: {mine[h]!r})"
                 for h, name in (("sp-model", "model"), ("sp-window", "windows"))
                 if info[h] != mine[h]]
        what = ("; ".join(diffs) + ": readers get both groups' windows mixed, and where "
                "both publish the same window they keep whichever copy came first"
                if diffs else "with the same model and windows: every window is computed "
                "and published twice")
        out.append(f"predictions topic {topic} has {info['count']} prediction(s) from worker "
                   f"group {app!r} in the last {RECENT_OTHER_GROUP_S:.0f} s, {what}. Give "
                   "each group its own --topic-prefix, or stop the other group.")
    return out


def _read_writers(settings: Settings, topic: str, app_id: str, now_ns: int, timeout_s: float,
                  seen: dict[str, dict[str, Any]]) -> None:
    """Note the writers of the last records of every partition of ``topic``."""
    consumer = kafka_consumer(settings)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or ())]
        if not tps:
            return
        consumer.assign(tps)
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begin[tp], end[tp] - TAIL_RECORDS))
        deadline = time.monotonic() + timeout_s
        while (any(consumer.position(tp) < end[tp] for tp in tps)
               and time.monotonic() < deadline):
            for msgs in consumer.poll(timeout_ms=200).values():
                for m in msgs:
                    _note_writer(m, app_id, now_ns, seen)
    finally:
        consumer.close()


def _note_writer(m: Any, app_id: str, now_ns: int, seen: dict[str, dict[str, Any]]) -> None:
    """Remember the writer of one predictions record if it is another, recent group."""
    headers = {k: v for k, v in (m.headers or ())}
    app = headers.get("sp-app", b"").decode("utf-8", "replace")
    if not app or app == app_id:
        return
    try:
        pred = wire.decode_prediction(wire.KafkaRecord.from_client(m))
    except wire.WireError:
        return
    if now_ns - pred.emitted_at_ns > RECENT_OTHER_GROUP_S * 1e9:
        return
    info = seen.setdefault(app, {"count": 0})
    info["count"] += 1
    for h in ("sp-model", "sp-window"):
        info[h] = headers.get(h, b"").decode("utf-8", "replace")


def log_when_started(app: Any, lines: Sequence[tuple[int, str]]) -> None:
    """Log ``(level, message)`` lines from a task of the faust ``app``: faust sets up
    logging only when its worker starts, and drops anything logged before."""

    @app.task
    async def announce() -> None:
        for level, msg in lines:
            log.log(level, "%s", msg)
