"""The health panel's numbers, from the worker's own metrics registry served over real
HTTP (prometheus_client's server, as ``streamproc worker --metrics-port`` serves it)."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from prometheus_client import generate_latest

from streamproc.dev.localkafka import free_port
from streamproc.view.health import HealthPoller, merge, parse, quantile, summarize
from streamproc.worker.metrics import Metrics


def _worker_metrics() -> Metrics:
    m = Metrics()
    m.counters.inc("windows_published", 10)
    m.counters.inc("events_in", 100, modality="video")
    m.counters.inc("dead_letters", 2, kind="decode")
    m.counters.inc("windows_masked", 3, modality="text")
    m.consumer_lag.labels("p.video", "0").set(7)
    m.consumer_lag.labels("p.audio", "0").set(1)
    return m


def test_rates_histograms_and_counts_from_two_scrapes() -> None:
    m = _worker_metrics()
    first = parse(generate_latest(m.registry).decode())
    m.counters.inc("windows_published", 20)
    m.counters.inc("events_in", 50, modality="audio")
    for size in (1, 2, 3, 4):
        m.batch_size.observe(size)
    for s in (0.02, 0.03, 0.04, 0.2):
        m.added_latency_seconds.observe(s)
    h = summarize(parse(generate_latest(m.registry).decode()), first, 2.0)
    assert h["windows_per_s"] == 10.0 and h["records_per_s"] == 25.0
    assert h["windows_published"] == 30
    assert h["lag"] == 8 and h["lag_by_topic"] == {"p.audio": 1, "p.video": 7}
    assert h["batch_size"]["mean"] == 2.5 and h["batch_size"]["count"] == 4
    added = h["added_ms"]
    assert added["mean"] == pytest.approx(72.5) and 25 <= added["p50"] <= 50
    assert 150 <= added["p99"] <= 250
    assert h["dead_letters"] == {"decode": 2} and h["masked"] == {"text": 3}
    assert not added["since_start"]
    m.batch_size.observe(64)  # before the first scrape's interval: only since-start holds it
    quiet = parse(generate_latest(m.registry).decode())
    h2 = summarize(quiet, quiet, 2.0)
    assert h2["batch_size"]["since_start"] and h2["batch_size"]["count"] == 5
    assert h2["batch_size"]["mean"] == pytest.approx(74 / 5)
    assert h["end_to_end_ms"]["p50"] is None  # nothing observed at all
    assert summarize(first, None, 0)["windows_per_s"] is None  # one scrape: no rate yet


def test_quantile_interpolates_within_a_bucket_as_prometheus_does() -> None:
    buckets = [(1.0, 0.0), (2.0, 10.0), (4.0, 20.0), (math.inf, 20.0)]
    assert quantile(0.5, buckets) == 2.0
    assert quantile(0.25, buckets) == 1.5
    assert quantile(0.75, buckets) == 3.0
    assert quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert quantile(0.99, [(1.0, 0.0), (math.inf, 5.0)]) == 1.0  # highest finite bound


def test_two_workers_add_up() -> None:
    a, b = _worker_metrics(), _worker_metrics()
    b.consumer_lag.labels("p.video", "1").set(5)
    both = merge([parse(generate_latest(x.registry).decode()) for x in (a, b)])
    h = summarize(both, None, 0)
    assert h["lag"] == 8 + 8 + 5
    assert h["dead_letters"] == {"decode": 4} and h["windows_published"] == 20


def test_poller_reads_live_endpoints_and_names_the_one_that_does_not_answer() -> None:
    m = _worker_metrics()
    port = free_port()
    m.serve(port, addr="127.0.0.1")
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    seen: list[dict] = []

    async def run(urls: list[str]) -> None:
        with ThreadPoolExecutor(1) as pool:
            poller = HealthPoller(urls, seen.append, pool)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
                await poller.poll(http)
                m.counters.inc("windows_published", 5)
                await poller.poll(http)

    asyncio.run(run([f"http://127.0.0.1:{port}/metrics"]))
    assert [h["status"] for h in seen] == ["ok", "ok"]
    assert seen[0]["windows_per_s"] is None and seen[1]["windows_per_s"] > 0
    assert seen[1]["dead_letters"] == {"decode": 2}
    seen.clear()
    asyncio.run(run([f"http://127.0.0.1:{port}/metrics", dead]))
    assert seen[-1]["status"] == "partial" and seen[-1]["lag"] == 8
    assert "cannot connect" in seen[-1]["errors"][0] and dead in seen[-1]["errors"][0]
    seen.clear()
    asyncio.run(run([dead]))
    assert seen[-1]["status"] == "unreachable" and "lag" not in seen[-1]

    async def off() -> None:
        await HealthPoller([], seen.append, ThreadPoolExecutor(1)).run()
    asyncio.run(off())
    assert seen[-1] == {"status": "off"}
