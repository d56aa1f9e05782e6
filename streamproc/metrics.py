"""Prometheus metrics of a worker, served on ``--metrics-port`` at ``/metrics``.

One registry per worker object (not the global default), so tests and several workers in
one process never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events_in = Counter("streamproc_events_in", "Input records received.",
                                 ["modality"], registry=r)
        self.windows = Counter("streamproc_windows_emitted", "Windows closed and published.",
                               ["closed_by"], registry=r)
        self.missing = Counter("streamproc_windows_missing_modality",
                               "Windows published with a modality masked.", ["modality"],
                               registry=r)
        self.late = Counter("streamproc_late_events", "Records for already closed windows.",
                            ["modality"], registry=r)
        self.duplicates = Counter("streamproc_duplicate_events",
                                  "Records seen twice (same stream, modality, seq).",
                                  ["modality"], registry=r)
        self.dropped = Counter("streamproc_dropped",
                               "Buffered data dropped by the per-stream memory cap.",
                               ["modality"], registry=r)
        self.dead_letters = Counter("streamproc_dead_letters", "Records sent to dead letter.",
                                    ["kind"], registry=r)
        self.batch_size = Histogram("streamproc_batch_size", "Windows per inference batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.inference_seconds = Histogram("streamproc_inference_seconds",
                                           "Model time per batch.", buckets=LATENCY_BUCKETS,
                                           registry=r)
        self.added_latency_seconds = Histogram(
            "streamproc_added_latency_seconds",
            "Window close -> prediction published (queue + inference + publish).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_latency_seconds = Histogram(
            "streamproc_end_to_end_latency_seconds",
            "Window end (event time) -> prediction published (wall clock).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge("streamproc_consumer_lag",
                                  "Records between the committed offset and the log end.",
                                  ["topic", "partition"], registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP (port 0: not at all)."""
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
