"""Micro-batching: batches fill up to max size or leave after max wait, off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streamproc.inference.batcher import MicroBatcher


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


def test_without_a_wait_a_batch_takes_what_is_queued_and_the_next_fills_meanwhile() -> None:
    """max_wait 0: windows closed together go in one batch at once; what comes while it
    computes forms the next batch (no timer anywhere)."""
    sizes: list[int] = []
    computing = threading.Event()
    release = threading.Event()

    def model(items):
        sizes.append(len(items))
        computing.set()
        release.wait(5)
        return items

    async def main():
        b = MicroBatcher(model, max_batch=32, max_wait_ms=0)
        await b.start()
        first = [b.submit(i) for i in range(5)]  # one poll's windows: the same tick
        while not computing.is_set():
            await asyncio.sleep(0.001)
        later = [b.submit(i) for i in range(5, 8)]  # closed while the model computes
        release.set()
        out = await asyncio.wait_for(asyncio.gather(*first, *later), 5)
        await b.stop()
        return out

    out = _run(main())
    assert sizes == [5, 3]
    assert [o.result for o in out] == list(range(8))
    assert all(o.queue_ms < 1000 for o in out[:5])


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


def test_stop_waits_for_a_stuck_model_call_within_a_bound_and_off_the_event_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model call that does not finish: stop() gives up on the windows still queued
    after STOP_TIMEOUT_S, and waits for the call in progress without blocking the loop."""
    from streamproc.inference import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "STOP_TIMEOUT_S", 0.2)
    started, release = threading.Event(), threading.Event()

    def stuck(items):
        started.set()
        release.wait(10)
        return list(items)

    async def main() -> tuple[float, int]:
        b = MicroBatcher(stuck, max_batch=1, max_wait_ms=0)
        await b.start()
        b.submit("a")
        b.submit("b")  # queued behind the stuck call
        await asyncio.to_thread(started.wait, 5)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.5, release.set)  # the call ends at last
        t0 = time.monotonic()
        await b.stop()
        took = time.monotonic() - t0
        t.cancel()
        return took, ticks

    took, ticks = _run(main())
    assert 0.4 <= took < 5  # the queue wait gave up at 0.2 s; then the call in progress
    assert ticks >= 20  # the loop kept running meanwhile (it stood still before)
