"""Micro-batching: batches fill up to max size or leave after max wait, off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from streamproc.align.aligner import Window
from streamproc.inference.sink import InferenceSink, MicroBatcher, Scored
from streamproc.wire import codec as wire
from streamproc.worker.metrics import Metrics


def _run(coro):
    return asyncio.run(coro)


def test_full_batches_leave_at_max_size_and_results_map_back() -> None:
    sizes: list[int] = []

    def double(items):
        sizes.append(len(items))
        return [2 * x for x in items]

    async def main():
        b = MicroBatcher(double, max_batch=4, max_wait_ms=10_000)
        await b.start()
        futs = [b.submit(i) for i in range(8)]
        out = await asyncio.wait_for(asyncio.gather(*futs), 5)
        await b.stop()
        return out

    out = _run(main())
    assert [o.result for o in out] == [2 * i for i in range(8)]
    assert sizes == [4, 4]  # a 10 s max wait never triggered: both batches were full
    assert all(o.batch_size == 4 for o in out)


def test_partial_batch_leaves_after_max_wait() -> None:
    async def main():
        b = MicroBatcher(lambda xs: list(xs), max_batch=32, max_wait_ms=50)
        await b.start()
        fut = b.submit("only")
        res = await asyncio.wait_for(fut, 5)  # would hang if it waited for 31 more
        await b.stop()
        return res

    res = _run(main())
    assert res.result == "only" and res.batch_size == 1
    assert res.queue_ms >= 40  # it did wait for company before running alone


def test_model_runs_off_the_event_loop() -> None:
    """While a slow batch computes, the loop keeps serving other coroutines."""
    release = threading.Event()
    model_thread: list[str] = []

    def slow(items):
        model_thread.append(threading.current_thread().name)
        release.wait(5)
        return items

    async def main():
        b = MicroBatcher(slow, max_batch=1, max_wait_ms=0)
        await b.start()
        fut = b.submit(1)
        ticks = 0
        t0 = time.monotonic()
        while not model_thread and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.001)
        for _ in range(20):  # the loop is free although the batch is still computing
            await asyncio.sleep(0.001)
            ticks += 1
        assert not fut.done()
        release.set()
        await asyncio.wait_for(fut, 5)
        await b.stop()
        return ticks

    assert _run(main()) == 20
    assert model_thread and model_thread[0].startswith("model")
    assert model_thread[0] != threading.main_thread().name


def test_failing_batch_fails_its_futures_and_the_next_batch_still_runs() -> None:
    def picky(items):
        if "bad" in items:
            raise ValueError("model exploded")
        return items

    async def main():
        b = MicroBatcher(picky, max_batch=2, max_wait_ms=1000)
        await b.start()
        f1, f2 = b.submit("bad"), b.submit("x")
        f3, f4 = b.submit("y"), b.submit("z")
        with pytest.raises(ValueError, match="model exploded"):
            await asyncio.wait_for(f1, 5)
        with pytest.raises(ValueError):
            await f2
        ok = await asyncio.wait_for(asyncio.gather(f3, f4), 5)
        await b.stop()
        return [o.result for o in ok]

    assert _run(main()) == ["y", "z"]


# --- the inference sink: windows -> predictions ---------------------------------------------

def _window(sid: str, start_s: int, text: str = "seven") -> Window:
    ns = 1_763_000_000_000_000_000 + start_s * 1_000_000_000
    img = np.full((32, 32, 3), 40 * start_s % 255, np.uint8)
    frames = [wire.VideoFrame.from_image(sid, ns + i * 100_000_000, i, img) for i in range(4)]
    seg = wire.TranscriptSegment(sid, 0, text, ns, ns + 500_000_000)
    return Window(sid, ns, ns + 1_000_000_000, frames, 4, np.zeros(16000, np.float32),
                  np.ones(16000, bool), 16000, [seg],
                  {"video": True, "audio": True, "text": True},
                  {"closed_by": "watermark", "ingest_video_ms": 12.5},
                  {"video": [wire.Source("p.video", 1, i) for i in range(4)]})


class _Labeller:
    """A stand-in model function: the label is the window's transcript; 'boom' fails."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, windows):
        self.batches.append(len(windows))
        if any(w.text == "boom" for w in windows):
            raise RuntimeError("model exploded on 'boom'")
        return [Scored(w.text, {w.text: 0.9, "other": 0.1}, 1.5, 2.5) for w in windows]


def _run_sink(windows, max_batch=8, max_wait_ms=20):
    published: list[wire.KafkaRecord] = []
    metrics = Metrics()
    fn = _Labeller()

    async def publish(rec):
        await asyncio.sleep(0.001)
        published.append(rec)

    async def main():
        sink = InferenceSink(fn, publish, model_info={"name": "m", "version": "3"},
                             max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=metrics,
                             headers=(("sp-worker", b"w1"),))
        await sink.start()
        await asyncio.wait_for(asyncio.gather(*(sink.submit(w) for w in windows)), 10)
        await sink.stop()

    asyncio.run(main())
    return published, metrics, fn


def test_sink_publishes_one_prediction_per_window_with_a_latency_breakdown() -> None:
    windows = [_window("cam1", i, "seven") for i in range(3)] + [_window("cam2", 0, "three")]
    published, metrics, fn = _run_sink(windows)
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
    published, metrics, fn = _run_sink(windows)
    assert fn.batches[0] == 3 and sorted(fn.batches[1:]) == [1, 1, 1]  # retried alone
    preds = {p.key: p for p in map(wire.decode_prediction, published)}
    assert len(preds) == 3
    bad = preds[windows[1].key]
    assert bad.label == "" and bad.scores == {}
    assert "model exploded on 'boom'" in bad.quality["error"]
    assert preds[windows[0].key].label == "seven" and preds[windows[2].key].label == "three"
    assert metrics.counters.get("inference_errors") == 1


def test_a_streams_predictions_are_published_in_window_order() -> None:
    """A publish whose records complete out of order (later, smaller ones first) still
    hands each stream's windows over one after the other; streams do not wait for each
    other."""
    started: list[tuple[str, int]] = []
    done: list[tuple[str, int]] = []

    async def publish(rec):
        p = wire.decode_prediction(rec)
        started.append(p.key)
        # cam1's earlier windows take longer: concurrent sends would finish reversed
        i = (p.window_start_ns - _window("cam1", 0).start_ns) // 1_000_000_000
        await asyncio.sleep(0.05 - 0.01 * i if p.stream_id == "cam1" else 0)
        done.append(p.key)

    async def main():
        sink = InferenceSink(_Labeller(), publish, model_info={"name": "m", "version": "1"},
                             max_batch=8, max_wait_ms=20)
        await sink.start()
        windows = [_window("cam1", i, "seven") for i in range(4)] + [_window("cam2", 0, "one")]
        await asyncio.wait_for(asyncio.gather(*(sink.submit(w) for w in windows)), 10)
        await sink.stop()

    asyncio.run(main())
    cam1 = [k for k in done if k[0] == "cam1"]
    assert cam1 == sorted(cam1) and len(cam1) == 4
    assert [k for k in started if k[0] == "cam1"] == cam1  # each began after the last ended
    assert done[0][0] == "cam2"  # not held up behind cam1's slow sends


def test_other_groups_on_the_predictions_topic_are_named(topics) -> None:
    """Recent predictions of another group are reported with what differs; this group's
    own, and another group's older than the recent span, are not."""
    from kafka import KafkaProducer

    from streamproc.capture.publisher import producer_config
    from streamproc.inference.sink import RECENT_OTHER_GROUP_S, other_groups, prediction_headers

    settings = topics
    now = time.time_ns()
    model = {"name": "m", "version": "2"}

    def rec(app: str, emitted_ns: int, hop_ms: int) -> wire.KafkaRecord:
        p = wire.Prediction("cam", 0, 10**9, "x", {"x": 1.0}, {}, model, emitted_ns)
        r = wire.encode_prediction(p)
        return wire.KafkaRecord(r.key, r.value, (*r.headers, *prediction_headers(
            settings.replace(app_id=app, hop_ms=hop_ms), model)), r.timestamp_ms)

    old = now - int((RECENT_OTHER_GROUP_S + 60) * 1e9)
    producer = KafkaProducer(**producer_config(settings))
    for r in (rec(settings.app_id, now, 500), rec("other", now, 1000), rec("other", now, 1000),
              rec("gone", old, 250)):
        producer.send(settings.topic("predictions"), key=r.key, value=r.value,
                      headers=list(r.headers))
    producer.flush(30)
    producer.close()
    assert other_groups(settings.replace(app_id="fresh"), model) != []  # all but "gone"
    (line,) = other_groups(settings, model)
    assert "2 prediction(s) from worker group 'other'" in line
    assert "hop_ms=1000" in line and "hop_ms=500" in line and "'m/2'" not in line
    assert other_groups(settings.replace(app_id="other", hop_ms=1000), model) == [
        line.replace("'other'", repr(settings.app_id)).replace("2 prediction", "1 prediction")
        .replace("hop_ms=1000", "@").replace("hop_ms=500", "hop_ms=1000").replace("@", "hop_ms=500")]
