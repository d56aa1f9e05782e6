"""What a worker reports: counters and histograms served for Prometheus at ``/metrics``,
the gauges, and a summarised log of the Kafka client's errors.

:class:`Counters` is the one place every worker count goes (plain dict, no Prometheus
types in the agent's hot path); :class:`Metrics` exports it as ``streamproc_<name>_total``
counters next to the latency and batch histograms and the consumer-lag gauge. One
registry per worker object, never the global default, so tests and several workers in one
process never share numbers.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

from streamproc.config import Settings

if TYPE_CHECKING:
    from streamproc.worker.core import FetchState

log = logging.getLogger("streamproc.worker")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Counters:
    """Every worker counter in one place.

    Names: events_in, decode_errors, late, duplicates, replayed, capped (label modality);
    dead_letters (label kind: decode, late, oversize, capacity, clock, internal,
    partition); windows_emitted, windows_published, windows_masked
    (label modality), windows_provisional, windows_revised (revised finals),
    revisions_too_late (transcript segments late even for a revision),
    label_flips, predictions_reused, encodings_reused (label modality: a final that took
    that encoder's output from its provisional), internal_errors, inference_errors;
    model_reloads
    (label result: ok, refused, unchanged); ignored (label reason: records of a rebalance
    that Kafka delivers again, see acks.OffsetGate); acks_refused (acks faust tried on its
    own, see patches.guard_consumer).
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

    def collect(self) -> Iterator[CounterMetricFamily]:
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
            "Window end (event time) -> final prediction published (wall clock).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.provisional_latency_seconds = Histogram(
            "streamproc_provisional_latency_seconds",
            "Window end (event time) -> provisional prediction published (wall clock).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.provisional_to_final_seconds = Histogram(
            "streamproc_provisional_to_final_seconds",
            "A window's provisional prediction published -> its final one published.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge(
            "streamproc_consumer_lag",
            "Records between the committed offset and the log end, those held until "
            "their windows pass the revision horizon included (steady when keeping up).",
            ["topic", "partition"], registry=r)
        self.buffered = Gauge("streamproc_buffered", "Data held by the aligners.",
                              ["kind"], registry=r)
        self.model_info = Gauge(
            "streamproc_model_info", "The model being served: 1 for its name, version and "
            "checkpoint digest (hot reload moves it to the new model).",
            ["name", "version", "checkpoint"], registry=r)
        self._model_labels: tuple[str, str, str] | None = None

    def serving(self, info: Mapping[str, str]) -> None:
        """Export ``info`` as the model being served (only it: the one before is removed)."""
        labels = (info.get("name", ""), info.get("version", ""), info.get("checkpoint", ""))
        if self._model_labels is not None and self._model_labels != labels:
            self.model_info.remove(*self._model_labels)
        self.model_info.labels(*labels).set(1)
        self._model_labels = labels

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP (port 0: not at all)."""
        if port:
            start_http_server(port, addr=addr, registry=self.registry)


#: Seconds between updates of the lag and buffer gauges.
GAUGES_EVERY_S = 5.0


def update_gauges(consumer: Any, fetch_state: FetchState | None, settings: Settings,
                  metrics: Metrics, buffered: Mapping[str, float]) -> None:
    """Consumer lag (end offset minus committed offset, per assigned input partition; left
    as it was while the end is unknown) and what the aligners hold."""
    for tp in list(consumer.assignment()):
        if tp.topic not in settings.input_topics or fetch_state is None:
            continue
        end, _ = fetch_state((tp.topic, tp.partition))
        if end is None:
            continue
        committed = consumer._committed_offset.get(tp)  # faust keeps it; no public API
        lag = end - (committed if committed is not None else 0)
        metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, lag))
    for kind, value in buffered.items():
        metrics.buffered.labels(kind).set(value)


class ClientFaults(logging.Filter):
    """The Kafka client's errors and warnings while something is wrong (a broker away logs
    thousands of lines a minute): the first is logged, then a summary every
    ``summary_s``, then one line once none came for ``quiet_s`` (the recovery)."""

    def __init__(self, summary_s: float = 10.0, quiet_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.summary_s, self.quiet_s, self._clock = summary_s, quiet_s, clock
        self._lock = threading.Lock()  # the consumer's client logs from faust's thread
        self._since: float | None = None
        self._last = self._summary_at = 0.0
        self._kinds: Counter[str] = Counter()
        self._total = 0

    def install(self, prefix: str = "aiokafka") -> None:
        """Filter every logger of ``prefix`` (idempotent)."""
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if (name == prefix or name.startswith(prefix + ".")) \
                    and isinstance(logger, logging.Logger) and self not in logger.filters:
                logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self._clock()
        with self._lock:
            self._last = now
            if self._since is None:
                self._since, self._summary_at = now, now + self.summary_s
                record.msg = (f"{record.getMessage()} (Kafka client errors are summarised "
                              f"every {self.summary_s:.0f} s until they stop)")
                record.args = ()
                return True
            self._kinds[re.sub(r"\d+", "N", record.getMessage())[:120]] += 1
            self._total += 1
            return False

    def tick(self) -> None:
        """Log the summary or the recovery when due (from a timer)."""
        now = self._clock()
        with self._lock:
            if self._since is None:
                return
            if now - self._last >= self.quiet_s:
                log.warning("Kafka client errors stopped after %.0f s (%d lines summarised)",
                            self._last - self._since, self._total)
                self._since, self._total = None, 0
                self._kinds.clear()
            elif now >= self._summary_at and self._kinds:
                top = "; ".join(f"{n} x {k}" for k, n in self._kinds.most_common(3))
                log.warning("Kafka client errors go on (%.0f s): %d lines in the last %.0f s: "
                            "%s", now - self._since, sum(self._kinds.values()),
                            self.summary_s, top)
                self._kinds.clear()
                self._summary_at = now + self.summary_s
