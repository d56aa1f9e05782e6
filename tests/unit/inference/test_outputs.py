"""Window outputs: windows -> (model) -> prediction records, each stream in window order."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from streamproc.align.aligner import Window
from streamproc.inference.outputs import InferenceOutput, StreamChain, SummaryOutput
from streamproc.inference.predictor import Scored
from streamproc.wire import codec as wire
from streamproc.worker.metrics import Metrics


def _window(sid: str, start_s: int, text: str = "seven") -> Window:
    ns = 1_763_000_000_000_000_000 + start_s * 1_000_000_000
    img = np.full((32, 32, 3), 40 * start_s % 255, np.uint8)
    frames = [wire.VideoFrame.from_image(sid, ns + i * 100_000_000, i, img) for i in range(4)]
    seg = wire.TranscriptSegment(sid, 0, text, ns, ns + 500_000_000)
    return Window(sid, ns, ns + 1_000_000_000, frames, 4, np.zeros(16000, np.float32),
                  np.ones(16000, bool), 16000, [seg],
                  {"video": True, "audio": True, "text": True},
                  {"closed_by": "watermark"},
                  {"video": [wire.Source("p.video", 1, i) for i in range(4)]},
                  ingest_ms={"video": 12.5})


class _Labeller:
    """A stand-in model function: the label is the window's transcript; 'boom' fails."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, windows):
        self.batches.append(len(windows))
        if any(w.text == "boom" for w in windows):
            raise RuntimeError("model exploded on 'boom'")
        return [Scored(w.text, {w.text: 0.9, "other": 0.1}, 1.5, 2.5) for w in windows]


def _queued(publish):
    """An ``enqueue`` whose delivery is ``publish(rec)`` running on its own."""
    async def enqueue(rec):
        return asyncio.ensure_future(publish(rec))
    return enqueue


def _run_inference(windows, max_batch=8, max_wait_ms=20):
    published: list[wire.KafkaRecord] = []
    metrics = Metrics()
    fn = _Labeller()

    async def publish(rec):
        await asyncio.sleep(0.001)
        published.append(rec)

    async def main():
        output = InferenceOutput(fn, _queued(publish), model_info={"name": "m", "version": "3"},
                                 max_batch=max_batch, max_wait_ms=max_wait_ms,
                                 metrics=metrics, headers=(("sp-worker", b"w1"),))
        await output.start()
        await asyncio.wait_for(asyncio.gather(*(output.submit(w) for w in windows)), 10)
        await output.stop()

    asyncio.run(main())
    return published, metrics, fn


def test_inference_publishes_one_prediction_per_window_with_a_latency_breakdown() -> None:
    windows = [_window("cam1", i, "seven") for i in range(3)] + [_window("cam2", 0, "three")]
    published, metrics, fn = _run_inference(windows)
    assert fn.batches == [4]  # every stream's windows shared one micro-batch
    preds = [wire.decode_prediction(r) for r in published]
    assert sorted(p.key for p in preds) == sorted(w.key for w in windows)
    for p, r in zip(preds, published, strict=True):
        assert p.label == ("three" if p.stream_id == "cam2" else "seven")
        assert p.model == {"name": "m", "version": "3"}
        assert dict(r.headers)["sp-worker"] == b"w1" and r.key == p.stream_id.encode()
        lat = p.latency_ms
        for key in ("capture_to_worker_video", "close", "queue", "inference", "preprocess",
                    "model", "added", "publish", "total"):
            assert lat[key] >= 0, key
        assert lat["preprocess"] == 1.5 and lat["model"] == 2.5
        assert lat["capture_to_worker_video"] == 12.5
        assert "ingest_video_ms" not in p.quality  # moved into the latency breakdown
        assert p.provenance["video"] == [[1, i] for i in range(4)]
        json.dumps(p.to_json())
    scrape = metrics.registry.get_sample_value
    assert scrape("streamproc_batch_size_count") == 1
    assert scrape("streamproc_batch_size_sum") == 4
    assert scrape("streamproc_added_latency_seconds_count") == 4


def test_a_failing_window_is_isolated_and_published_with_its_error() -> None:
    windows = [_window("cam1", 0, "seven"), _window("cam1", 1, "boom"),
               _window("cam2", 0, "three")]
    published, metrics, fn = _run_inference(windows)
    assert fn.batches[0] == 3 and sorted(fn.batches[1:]) == [1, 1, 1]  # retried alone
    preds = {p.key: p for p in map(wire.decode_prediction, published)}
    assert len(preds) == 3
    bad = preds[windows[1].key]
    assert bad.label == "" and bad.scores == {}
    assert "model exploded on 'boom'" in bad.quality["error"]
    assert preds[windows[0].key].label == "seven" and preds[windows[2].key].label == "three"
    assert metrics.counters.get("inference_errors") == 1


class _Producer:
    """An ``enqueue`` whose deliveries the test settles; cam1's queueing is slow (a full
    producer queue), which must not hold up cam2."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, int]] = []
        self.published: list[wire.KafkaRecord] = []
        self.deliveries: dict[tuple[str, int], asyncio.Future[None]] = {}

    async def enqueue(self, rec):
        p = wire.decode_prediction(rec)
        if p.stream_id == "cam1":
            await asyncio.sleep(0.01)
        self.queued.append(p.key)
        self.published.append(rec)
        fut = self.deliveries[p.key] = asyncio.get_running_loop().create_future()
        return fut


async def _queued_in_window_order(output, producer: _Producer, windows: list[Window]) -> None:
    """Every window is queued while none is delivered, cam1's in window order and cam2's
    first; each window's future resolves with its own delivery."""
    done = [output.submit(w) for w in windows]
    for _ in range(400):
        if len(producer.queued) == len(windows):
            break
        await asyncio.sleep(0.005)
    assert len(producer.queued) == len(windows) and not any(d.done() for d in done)
    assert producer.queued[0][0] == "cam2"
    cam1 = [w.key for w in windows if w.stream_id == "cam1"]
    assert [k for k in producer.queued if k[0] == "cam1"] == cam1
    producer.deliveries[cam1[1]].set_result(None)
    await asyncio.sleep(0)
    assert [d.done() for d in done] == [w.key == cam1[1] for w in windows]
    for fut in producer.deliveries.values():
        if not fut.done():
            fut.set_result(None)
    await asyncio.wait_for(asyncio.gather(*done), 10)
    await output.stop()


def test_a_streams_predictions_are_queued_in_window_order() -> None:
    """A stream's predictions go into the producer's queue in window order, each without
    waiting for the one before to be delivered; streams do not wait for each other."""
    producer = _Producer()

    async def main():
        output = InferenceOutput(_Labeller(), producer.enqueue,
                                 model_info={"name": "m", "version": "1"},
                                 max_batch=8, max_wait_ms=20)
        await output.start()
        await _queued_in_window_order(output, producer, [
            *(_window("cam1", i, "seven") for i in range(4)), _window("cam2", 0, "one")])

    asyncio.run(main())


def test_a_prediction_that_is_not_delivered_fails_its_window_alone() -> None:
    async def main():
        async def enqueue(rec):
            fut = asyncio.get_running_loop().create_future()
            if wire.decode_prediction(rec).window_start_ns == _window("cam1", 0).start_ns:
                fut.set_exception(RuntimeError("broker gone"))
            else:
                fut.set_result(None)
            return fut

        output = InferenceOutput(_Labeller(), enqueue, model_info={"name": "m", "version": "1"},
                                 max_batch=8, max_wait_ms=5)
        await output.start()
        first, second = output.submit(_window("cam1", 0)), output.submit(_window("cam1", 1))
        with pytest.raises(RuntimeError, match="broker gone"):
            await asyncio.wait_for(first, 5)
        await asyncio.wait_for(second, 5)
        await output.stop()

    asyncio.run(main())


def test_align_only_output_queues_each_streams_summaries_in_window_order() -> None:
    """A stream's summaries are queued one after the other in window order, without
    waiting for the one before to be delivered; streams do not wait for each other."""
    producer = _Producer()

    async def main():
        output = SummaryOutput(producer.enqueue, (("sp-worker", b"w1"),))
        await output.start()
        await _queued_in_window_order(output, producer, [
            *(_window("cam1", i) for i in range(3)), _window("cam2", 2)])

    asyncio.run(main())
    for rec in producer.published:
        p = wire.decode_prediction(rec)
        assert p.label == "" and p.scores == {} and p.model == {"name": "align-only",
                                                                 "version": "1"}
        assert rec.headers[-1] == ("sp-worker", b"w1")
        assert p.latency_ms["capture_to_worker_video"] == 12.5


def test_a_failed_publish_fails_its_window_and_the_stream_goes_on() -> None:
    """The worker crashes on the failed window; the stream's next window is still queued
    and published. A window that cannot be queued fails the same way."""
    attempts: list[int] = []

    async def enqueue(rec):
        start = wire.decode_prediction(rec).window_start_ns
        attempts.append(start)
        if len(attempts) == 2:
            raise RuntimeError("producer closed")
        fut = asyncio.get_running_loop().create_future()
        if len(attempts) == 1:
            fut.set_exception(RuntimeError("broker gone"))
        else:
            fut.set_result(None)
        return fut

    async def main():
        output = SummaryOutput(enqueue)
        await output.start()
        first = output.submit(_window("cam1", 0))
        second = output.submit(_window("cam1", 1))
        third = output.submit(_window("cam1", 2))
        with pytest.raises(RuntimeError, match="broker gone"):
            await asyncio.wait_for(first, 5)
        with pytest.raises(RuntimeError, match="producer closed"):
            await asyncio.wait_for(second, 5)
        await asyncio.wait_for(third, 5)
        await output.stop()

    asyncio.run(main())
    assert attempts == sorted(attempts) and len(attempts) == 3


def test_a_window_submitted_as_its_streams_task_ends_is_still_published() -> None:
    """The stream's task has queued everything and ended, its done callbacks not yet run:
    a window submitted then gets a task of its own (and is not left in the old deque)."""
    async def main():
        queued: list[int] = []

        async def enqueue(rec):  # never suspends: the task ends in its first step
            queued.append(wire.decode_prediction(rec).window_start_ns)
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        output = SummaryOutput(enqueue)
        first = output.submit(_window("cam1", 0))
        await asyncio.sleep(0)  # the task ran and ended; its callbacks run next time round
        second = output.submit(_window("cam1", 1))
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert len(queued) == 2
        await output.stop()

    asyncio.run(main())


def test_a_cancelled_enqueue_fails_its_window_and_a_cancelled_task_leaves_nothing_behind(
) -> None:
    """A cancellation out of the client (not of the output's own task) fails the window,
    so the worker crashes instead of waiting for its inputs for ever; the next window of
    the stream is still published. A stream's task cancelled before it ran cancels its
    windows (shutting down) and the stream's next window gets a new one."""
    async def main():
        calls: list[int] = []

        async def enqueue(rec):
            calls.append(wire.decode_prediction(rec).window_start_ns)
            if len(calls) == 1:
                raise asyncio.CancelledError("the client's own future")
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        output = SummaryOutput(enqueue)
        first, second = output.submit(_window("cam1", 0)), output.submit(_window("cam1", 1))
        with pytest.raises(RuntimeError, match="cancelled"):
            await asyncio.wait_for(first, 5)
        await asyncio.wait_for(second, 5)

        third = output.submit(_window("cam2", 0))
        for task in list(output._tasks):
            task.cancel()  # before its first step
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert third.cancelled()
        fourth = output.submit(_window("cam2", 1))
        await asyncio.wait_for(fourth, 5)
        await output.stop()

    asyncio.run(main())


def test_a_cancelled_enqueue_fails_a_models_window_too() -> None:
    async def main():
        async def enqueue(rec):
            raise asyncio.CancelledError("the client's own future")

        output = InferenceOutput(_Labeller(), enqueue, model_info={"name": "m", "version": "1"},
                                 max_batch=8, max_wait_ms=5)
        await output.start()
        with pytest.raises(RuntimeError, match="cancelled"):
            await asyncio.wait_for(output.submit(_window("cam1", 0)), 5)
        await output.stop()

    asyncio.run(main())


def test_stopping_waits_for_the_deliveries_under_way() -> None:
    async def main():
        delivery = asyncio.get_running_loop().create_future()

        async def enqueue(rec):
            return delivery

        output = SummaryOutput(enqueue)
        done = output.submit(_window("cam1", 0))
        stopping = asyncio.ensure_future(output.stop())
        await asyncio.sleep(0.02)
        assert not stopping.done() and not done.done()
        delivery.set_result(None)
        await asyncio.wait_for(stopping, 5)
        assert done.done() and done.exception() is None

    asyncio.run(main())


def test_stream_chain_forgets_a_stream_once_its_last_step_is_done() -> None:
    async def main():
        chain = StreamChain()
        seen: list[object] = []

        async def step(previous):
            seen.append(previous)
            await StreamChain.after(previous)

        a = chain.start("s", step)
        b = chain.start("s", step)
        await asyncio.wait_for(asyncio.gather(a, b), 5)
        c = chain.start("s", step)  # nothing left to wait for
        await asyncio.wait_for(c, 5)
        await chain.drain(timeout=1)
        return seen, a, chain

    seen, a, chain = asyncio.run(main())
    assert seen == [None, a, None]
    assert not chain.pending


def test_waiting_for_the_previous_step_is_cancelled_alone() -> None:
    """Cancelling a step that waits for the stream's previous one leaves that one running;
    a step whose previous one is done (or failed) goes on at once."""
    async def main():
        gate = asyncio.Event()

        async def slow() -> None:
            await gate.wait()

        previous = asyncio.ensure_future(slow())
        waiting = asyncio.ensure_future(StreamChain.after(previous))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not previous.done()
        gate.set()
        await asyncio.wait_for(StreamChain.after(previous), 5)
        assert previous.done()

        async def fail() -> None:
            raise RuntimeError("broker gone")

        failed = asyncio.ensure_future(fail())
        await asyncio.wait([failed])
        await asyncio.wait_for(StreamChain.after(failed), 5)  # its failure is not raised here
        await asyncio.wait_for(StreamChain.after(None), 5)

    asyncio.run(main())


def test_provisional_then_final_reuses_the_scores_when_nothing_changed() -> None:
    """Each window: a provisional prediction, then its final. An unchanged final repeats
    the provisional's scores without a model call; a changed one is scored again, and a
    label that differs from the provisional's counts as a flip."""
    import dataclasses as dc

    same_p = dc.replace(_window("a", 0), rev=0, final=False)
    same_f = dc.replace(_window("a", 0), rev=1, final=True, unchanged=True)
    flip_p = dc.replace(_window("a", 1, "three"), rev=0, final=False)
    flip_f = dc.replace(_window("a", 1, "eight"), rev=1, final=True, unchanged=False)
    published, metrics, fn = _run_inference([same_p, flip_p, same_f, flip_f])
    preds = [wire.decode_prediction(r) for r in published]
    assert [(p.window_start_ns, p.rev, p.final, p.reused, p.label) for p in preds] == [
        (same_p.start_ns, 0, False, False, "seven"), (flip_p.start_ns, 0, False, False, "three"),
        (same_f.start_ns, 1, True, True, "seven"), (flip_f.start_ns, 1, True, False, "eight")]
    assert sum(fn.batches) == 3  # the unchanged final was not scored again
    reused = preds[2]
    assert reused.scores == preds[0].scores and reused.latency_ms["inference"] == 0.0
    c = metrics.counters
    assert c.get("label_flips") == 1 and c.get("predictions_reused") == 1
    r = metrics.registry
    assert r.get_sample_value("streamproc_provisional_to_final_seconds_count") == 2
    assert r.get_sample_value("streamproc_provisional_latency_seconds_count") == 2
    assert r.get_sample_value("streamproc_end_to_end_latency_seconds_count") == 2


class _Swapping:
    """A served model that is replaced after its ``swap_after``-th batch, the way the hot
    reload swaps one in: each batch keeps the model it started with."""

    def __init__(self, swap_after: int) -> None:
        self.current = {"name": "m", "version": "A"}
        self.swap_after = swap_after
        self.batches: list[tuple[str, int]] = []

    def __call__(self, windows):
        model = self.current  # the batch's model, read once
        self.batches.append((model["version"], len(windows)))
        if len(self.batches) == self.swap_after:
            self.current = {"name": "m", "version": "B", "checkpoint": "sha256:bbb"}
        return [Scored(f"by-{model['version']}", {"x": 1.0}, 0.0, 0.0, model) for w in windows]


def _run_swapping(model: _Swapping, waves: list[list[Window]]) -> list[wire.KafkaRecord]:
    published: list[wire.KafkaRecord] = []

    async def publish(rec):
        await asyncio.sleep(0.002)
        published.append(rec)

    async def main():
        output = InferenceOutput(model, _queued(publish), model_info={"name": "m", "version": "A"},
                                 max_batch=4, max_wait_ms=5,
                                 headers=(("sp-worker", b"w1"), ("sp-model", b"m/A")),
                                 current_model=lambda: model.current)
        await output.start()
        for wave in waves:
            await asyncio.wait_for(asyncio.gather(*(output.submit(w) for w in wave)), 10)
        await output.stop()

    asyncio.run(main())
    return published


def test_after_a_model_swap_every_stream_switches_once_and_names_its_model() -> None:
    windows = {sid: [_window(sid, i) for i in range(12)] for sid in ("cam1", "cam2")}
    model = _Swapping(swap_after=3)
    interleaved = [w for i in range(12) for w in (windows["cam1"][i], windows["cam2"][i])]
    published = _run_swapping(model, [interleaved[i:i + 4] for i in range(0, 24, 4)])
    preds = [wire.decode_prediction(r) for r in published]
    assert sorted(p.key for p in preds) == sorted(w.key for w in interleaved)  # each once
    for sid in windows:
        mine = sorted((p for p in preds if p.stream_id == sid), key=lambda p: p.window_start_ns)
        versions = [p.model["version"] for p in mine]
        assert versions == sorted(versions) and versions[-1] == "B", versions  # A..A B..B
        assert versions[0] == "A"
    for p, r in zip(preds, published, strict=True):
        assert p.label == f"by-{p.model['version']}"  # the model named is the one that scored
        assert dict(r.headers)["sp-model"] == f"m/{p.model['version']}".encode()
        assert dict(r.headers)["sp-worker"] == b"w1"
    assert next(p for p in preds if p.model["version"] == "B").model["checkpoint"] == "sha256:bbb"


def test_windows_scored_before_the_swap_but_published_after_it_are_scored_again() -> None:
    """The swap lands right after a batch computed: its windows are not out yet, and go out
    scored by the new model (the old model's scores are not published once it is gone)."""
    model = _Swapping(swap_after=1)
    ws = [_window("cam1", i) for i in range(4)]
    published = _run_swapping(model, [ws])
    preds = [wire.decode_prediction(r) for r in published]
    assert [p.model["version"] for p in preds] == ["B"] * 4
    assert model.batches[0] == ("A", 4) and sum(n for v, n in model.batches if v == "B") == 4
