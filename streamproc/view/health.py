"""The workers' health as the web view shows it: read from their Prometheus endpoints
(``streamproc worker --metrics-port``), the same numbers the Grafana dashboard charts.

Two scrapes a few seconds apart give rates (windows/s, records/s) and what the latency
and batch-size histograms gathered in between (mean, p50, p99, interpolated within a
bucket as Prometheus' ``histogram_quantile`` does). Several workers' scrapes are added up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from enum import StrEnum
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

#: (sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
#: Seconds between scrapes.
INTERVAL_S = 2.0
SCRAPE_TIMEOUT_S = 2.0
#: The largest scrape read (a worker's is a few tens of KB).
MAX_SCRAPE_BYTES = 4 * 1024 * 1024


class HealthStatus(StrEnum):
    OFF = "off"  # no metrics URL given
    OK = "ok"  # every endpoint answered
    PARTIAL = "partial"  # some did not
    UNREACHABLE = "unreachable"  # none did


def parse(text: str) -> Samples:
    """Exposition text -> samples (``_created`` timestamps left out). Blocking for a large
    scrape: call it from a thread."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def merge(scrapes: Iterable[Samples]) -> Samples:
    """Several workers' samples added up, series by series."""
    out: Samples = {}
    for samples in scrapes:
        for k, v in samples.items():
            out[k] = out.get(k, 0.0) + v
    return out


def total(samples: Samples, name: str, **match: str) -> float | None:
    """The sum of ``name``'s series whose labels include ``match``; None: no such series."""
    values = [v for (n, labels), v in samples.items()
              if n == name and all((k, x) in labels for k, x in match.items())]
    return sum(values) if values else None


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def _buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of histogram ``name``, every label summed."""
    les = by_label(samples, f"{name}_bucket", "le")
    return sorted((float(le), v) for le, v in les.items())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` of cumulative ``buckets``; None when they hold nothing."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # as Prometheus: the highest finite bound
            span = count - below
            return lower + (upper - lower) * ((rank - below) / span if span else 1.0)
        lower, below = upper, count
    return lower


def _delta(cur: Samples, prev: Samples | None) -> Samples:
    """Counter increases since ``prev`` (a series that went down restarted: its value)."""
    if prev is None:
        return dict(cur)
    out = {}
    for k, v in cur.items():
        before = prev.get(k, 0.0)
        out[k] = v - before if v >= before else v
    return out


def summarize(cur: Samples, prev: Samples | None, seconds: float) -> dict[str, Any]:
    """What the health panel shows, from the newest scrape and the one before."""
    d = _delta(cur, prev)

    def rate(name: str) -> float | None:
        increase = total(d, name)
        if prev is None or seconds <= 0 or increase is None:
            return None
        return round(increase / seconds, 2)

    def hist(name: str, scale: float) -> dict[str, Any]:
        # what the last interval gathered; once a worker goes quiet, everything since it
        # started (a panel that goes blank when traffic pauses tells nothing)
        since_start = not total(d, f"{name}_count")
        src = cur if since_start else d
        b = _buckets(src, name)
        count, s = total(src, f"{name}_count"), total(src, f"{name}_sum")
        mean = s / count * scale if count and s is not None else None
        p50, p99 = quantile(0.5, b), quantile(0.99, b)
        return {"mean": None if mean is None else round(mean, 2),
                "p50": None if p50 is None else round(p50 * scale, 2),
                "p99": None if p99 is None else round(p99 * scale, 2),
                "count": count, "since_start": since_start}

    lag = by_label(cur, "streamproc_consumer_lag", "topic")
    return {
        "lag": None if not lag else round(sum(lag.values())),
        "lag_by_topic": {t: round(v) for t, v in sorted(lag.items())},
        "windows_per_s": rate("streamproc_windows_published_total"),
        "provisional_per_s": rate("streamproc_windows_provisional_total"),
        "records_per_s": rate("streamproc_events_in_total"),
        "windows_published": total(cur, "streamproc_windows_published_total"),
        "batch_size": hist("streamproc_batch_size", 1.0),
        "added_ms": hist("streamproc_added_latency_seconds", 1000.0),
        "end_to_end_ms": hist("streamproc_end_to_end_latency_seconds", 1000.0),
        "provisional_ms": hist("streamproc_provisional_latency_seconds", 1000.0),
        "inference_ms": hist("streamproc_inference_seconds", 1000.0),
        "dead_letters": {k: round(v) for k, v in
                         sorted(by_label(cur, "streamproc_dead_letters_total", "kind").items())},
        "masked": {k: round(v) for k, v in sorted(
            by_label(cur, "streamproc_windows_masked_total", "modality").items())},
    }


class HealthPoller:
    """Scrapes ``urls`` every ``interval_s`` and hands each summary to ``publish``.

    The HTTP requests are asynchronous; parsing a scrape runs on ``executor``.
    """

    def __init__(self, urls: list[str], publish: Callable[[dict[str, Any]], None],
                 executor: Executor, interval_s: float = INTERVAL_S) -> None:
        self.urls = urls
        self.publish = publish
        self.executor = executor
        self.interval_s = interval_s
        self._prev: Samples | None = None
        self._prev_at = 0.0
        self._prev_ok = False

    async def run(self) -> None:
        if not self.urls:
            self.publish({"status": HealthStatus.OFF.value})
            return
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                await self.poll(http)
                await asyncio.sleep(self.interval_s)

    async def _scrape(self, http: aiohttp.ClientSession, url: str) -> Samples:
        async with http.get(url) as r:
            r.raise_for_status()
            body = await r.content.read(MAX_SCRAPE_BYTES)
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, parse, body.decode("utf-8", "replace"))

    async def poll(self, http: aiohttp.ClientSession) -> None:
        results = await asyncio.gather(*(self._scrape(http, u) for u in self.urls),
                                       return_exceptions=True)
        good = [r for r in results if isinstance(r, dict)]
        errors = [f"{u}: {_reason(r)}" for u, r in zip(self.urls, results, strict=True)
                  if not isinstance(r, dict)]
        now = time.monotonic()
        status = (HealthStatus.OK if not errors else
                  HealthStatus.PARTIAL if good else HealthStatus.UNREACHABLE)
        health: dict[str, Any] = {"status": status.value, "targets": len(self.urls),
                                  "errors": errors[:4]}
        if good:
            cur = merge(good)
            # a rate across a change of who answered would compare different sums
            prev = self._prev if status == HealthStatus.OK and self._prev_ok else None
            health.update(summarize(cur, prev, now - self._prev_at))
            self._prev, self._prev_at = cur, now
        self._prev_ok = status == HealthStatus.OK
        self.publish(health)


def _reason(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientResponseError):
        return f"HTTP {e.status}"
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer in {SCRAPE_TIMEOUT_S:.0f} s"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect ({e.os_error.strerror or e.os_error})"
    return str(e) or type(e).__name__
