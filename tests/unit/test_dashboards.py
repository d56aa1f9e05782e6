"""The operators' dashboards cannot run here (no Docker engine for Prometheus and Grafana),
so check what can be checked: the dashboard queries only metrics the worker exports, and
the compose services that serve it are provisioned from files that exist and agree with
each other. (tests/e2e/test_view_browser.py also checks the dashboard's metrics against a
live worker's /metrics.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dashboard_helpers import (
    DASHBOARD,
    ROOT,
    counter_names,
    dashboard,
    grouping_labels,
    metric_names,
    queries,
    registry_names,
)

from streamproc.cli import build_parser
from streamproc.config import Settings


def test_the_dashboard_queries_only_metrics_the_worker_exports() -> None:
    exported = registry_names() | counter_names()
    used = set()
    for expr in queries():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        used |= names
    assert used <= exported, f"not exported by the worker: {sorted(used - exported)}"
    # what an operator looks for first is all there
    for name in ("streamproc_consumer_lag", "streamproc_windows_published_total",
                 "streamproc_added_latency_seconds_bucket",
                 "streamproc_end_to_end_latency_seconds_bucket",
                 "streamproc_batch_size_bucket", "streamproc_dead_letters_total",
                 "streamproc_windows_masked_total"):
        assert name in used, name
    groups: dict[str, set[str]] = {}
    for expr in queries():
        for name, labels in grouping_labels(expr).items():
            groups.setdefault(name, set()).update(labels)
    assert "kind" in groups["streamproc_dead_letters_total"]
    assert "modality" in groups["streamproc_windows_masked_total"]
    assert "topic" in groups["streamproc_consumer_lag"]


def test_the_metric_name_reader_understands_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(streamproc_x_bucket{job="a"}[5m]))) '
            '/ sum without (instance) (streamproc_y)')
    assert metric_names(expr) == {"streamproc_x_bucket", "streamproc_y"}
    assert grouping_labels("sum by (kind, topic) (increase(streamproc_d_total[1m]))") == {
        "streamproc_d_total": {"kind", "topic"}}
    assert "streamproc_late_total" in counter_names()  # counted under the aligner's outcome


def test_every_panel_uses_the_provisioned_datasource() -> None:
    dash = dashboard()
    (source,) = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/"
                                "prometheus.yml").read_text())["datasources"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == source["uid"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == source["uid"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
    # no two panels overlap on the grid
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        here = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & here, p["title"]
        cells |= here


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (./...)."""
    out = {}
    for v in service.get("volumes", []):
        host, target = v.split(":")[:2]
        if host.startswith("./"):
            out[target] = ROOT / host
    return out


def test_prometheus_scrapes_every_worker_on_its_metrics_port(compose) -> None:
    prom = compose["services"]["prometheus"]
    mounts = _mounts(prom)
    config = mounts["/etc/prometheus/prometheus.yml"]
    assert config.is_file()
    assert any(a.startswith("--config.file=/etc/prometheus/prometheus.yml")
               for a in prom["command"])
    (job,) = yaml.safe_load(config.read_text())["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    worker = compose["services"]["worker"]
    args = build_parser().parse_args(worker["command"])
    metrics_port = Settings.load(args, environ=worker["environment"]).metrics_port
    assert sd["names"] == ["worker"] and sd["port"] == metrics_port > 0


def test_grafana_is_provisioned_from_files_with_the_dashboard(compose) -> None:
    graf = compose["services"]["grafana"]
    mounts = _mounts(graf)
    prov = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())[
        "datasources"]
    prom_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{prom_port}"
    (provider,) = yaml.safe_load((prov / "dashboards/streamproc.yml").read_text())[
        "providers"]
    dash_dir = mounts[provider["options"]["path"]]
    assert (dash_dir / DASHBOARD.name).is_file() and dash_dir == DASHBOARD.parent
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    for port in (*graf["ports"], *compose["services"]["prometheus"]["ports"]):
        assert port.startswith("127.0.0.1:")  # published on the host's loopback only


def test_the_view_service_reads_the_worker_and_is_published_on_loopback(compose) -> None:
    view = compose["services"]["view"]
    args = build_parser().parse_args(view["command"])
    s = Settings.load(args, environ=view["environment"])
    assert args.command == "view" and s.view_host == "0.0.0.0"
    worker = compose["services"]["worker"]
    w = Settings.load(build_parser().parse_args(worker["command"]),
                      environ=worker["environment"])
    assert s.view_metrics_url == f"http://worker:{w.metrics_port}/metrics"
    (port,) = view["ports"]
    assert port == f"127.0.0.1:{s.view_port}:{s.view_port}"


def test_every_bind_mount_of_the_stack_exists(compose) -> None:
    for name, svc in compose["services"].items():
        for target, host in _mounts(svc).items():
            assert host.exists(), f"{name}: {host} (mounted at {target}) is missing"
