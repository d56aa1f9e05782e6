"""The worker's Counters collector on its own: counts by name and labels, exported as one
Prometheus counter per name, read at scrape time."""

from __future__ import annotations

from metrics_helpers import parse, series, value
from prometheus_client import generate_latest

from streamproc.worker.metrics import Counters, Metrics


def test_counters_export_one_prometheus_counter_per_name() -> None:
    m = Metrics()
    c = m.counters
    c.inc("events_in", modality="video")
    c.inc("events_in", 2, modality="video")
    c.inc("events_in", modality="audio")
    c.inc("dead_letters", kind="late")
    c.inc("records_lost", 3)
    c.inc("records_lost", 2, topic="x.video")  # a label only some series have
    assert c.get("events_in", modality="video") == 3
    assert c.get("events_in") == 4 and c.get("never") == 0
    assert c.snapshot() == {"dead_letters{kind=late}": 1, "events_in{modality=audio}": 1,
                            "events_in{modality=video}": 3, "records_lost": 3,
                            "records_lost{topic=x.video}": 2}
    text = generate_latest(m.registry).decode()
    assert "# TYPE streamproc_events_in_total counter" in text
    s = parse(text)
    assert value(s, "streamproc_events_in_total", modality="video") == 3
    assert value(s, "streamproc_events_in_total", modality="audio") == 1
    assert value(s, "streamproc_dead_letters_total", kind="late") == 1
    assert series(s, "streamproc_records_lost_total") == {
        frozenset({("topic", "")}): 3, frozenset({("topic", "x.video")}): 2}
    # read at scrape time: a later count shows in the next scrape
    c.inc("events_in", modality="audio")
    assert value(parse(generate_latest(m.registry).decode()),
                 "streamproc_events_in_total", modality="audio") == 2
    # histograms and gauges exist before anything happened; every worker object has its
    # own registry, so two in one process never share numbers
    fresh = parse(generate_latest(Metrics().registry).decode())
    assert value(fresh, "streamproc_batch_size_count") == 0
    assert not series(fresh, "streamproc_events_in_total")
    for name in ("streamproc_inference_seconds_count", "streamproc_added_latency_seconds_count",
                 "streamproc_end_to_end_latency_seconds_count"):
        assert (name, frozenset()) in fresh
    shared = Counters()
    a, b = Metrics(shared), Metrics(shared)
    shared.inc("windows_published")
    for reg in (a.registry, b.registry):
        assert value(parse(generate_latest(reg).decode()),
                     "streamproc_windows_published_total") == 1
