"""A worker's counters and histograms, served for Prometheus at ``/metrics``.

:class:`Counters` is the one place every worker count goes (plain dict, no Prometheus
types in the agent's hot path); :class:`Metrics` exports it as ``streamproc_<name>_total``
counters next to the latency and batch histograms and the consumer-lag gauge. One
registry per worker object, never the global default, so tests and several workers in one
process never share numbers.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Counters:
    """Every worker counter in one place.

    Names: events_in, decode_errors, late, duplicates, replayed, capped (label modality);
    dead_letters (label kind: decode, late, oversize, capacity, clock, internal,
    partition); windows_emitted, windows_published, windows_masked
    (label modality), internal_errors, inference_errors; ignored (label reason: records of a
    rebalance that Kafka delivers again, see acks.OffsetGate); acks_refused (acks faust
    tried on its own, see app.AlignState.guard_consumer).
    """

    def __init__(self) -> None:
        self._c: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        self._c[(name, tuple(sorted(labels.items())))] += n

    def get(self, name: str, **labels: str) -> float:
        """One series, or the sum over all label values when no labels are given."""
        if labels:
            return self._c.get((name, tuple(sorted(labels.items()))), 0)
        return sum(v for (n, _), v in self._c.items() if n == name)

    def items(self) -> list[tuple[str, dict[str, str], float]]:
        return [(n, dict(lbl), v) for (n, lbl), v in sorted(self._c.items())]

    def snapshot(self) -> dict[str, float]:
        """``name{label=value}`` -> value, for logs and tests."""
        out = {}
        for n, lbl, v in self.items():
            tag = ",".join(f"{k}={x}" for k, x in lbl.items())
            out[f"{n}{{{tag}}}" if tag else n] = v
        return out


class _CountersCollector:
    """Reads :class:`Counters` at scrape time: one counter family per name."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def collect(self):
        items = self.counters.items()
        # a family's labels are every label any of its series uses (a series without one
        # gets ""), so series never collide: one duplicate fails the whole scrape
        label_names: dict[str, set[str]] = defaultdict(set)
        for name, labels, _ in items:
            label_names[name].update(labels)
        families = {name: CounterMetricFamily(f"streamproc_{name}",
                                              f"streamproc worker counter {name}",
                                              labels=sorted(keys))
                    for name, keys in label_names.items()}
        for name, labels, value in items:
            families[name].add_metric([labels.get(k, "") for k in sorted(label_names[name])],
                                      value)
        yield from families.values()


class Metrics:
    """Counters plus histograms and gauges of one worker."""

    def __init__(self, counters: Counters | None = None) -> None:
        self.counters = counters if counters is not None else Counters()
        r = self.registry = CollectorRegistry()
        r.register(_CountersCollector(self.counters))
        self.batch_size = Histogram("streamproc_batch_size", "Windows per inference batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.inference_seconds = Histogram(
            "streamproc_inference_seconds", "Model time per batch (preprocess + forward).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.added_latency_seconds = Histogram(
            "streamproc_added_latency_seconds",
            "Window closed -> prediction published (queue + inference + publish).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_latency_seconds = Histogram(
            "streamproc_end_to_end_latency_seconds",
            "Window end (event time) -> prediction published (wall clock).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge("streamproc_consumer_lag",
                                  "Records between the committed offset and the log end.",
                                  ["topic", "partition"], registry=r)
        self.buffered = Gauge("streamproc_buffered", "Data held by the aligners.",
                              ["kind"], registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP (port 0: not at all)."""
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
