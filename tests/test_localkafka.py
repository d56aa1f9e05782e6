"""The development broker: `streamproc broker start|status|stop` runs a real KRaft Kafka."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kafka import KafkaAdminClient

from streamproc import localkafka
from streamproc.localkafka import KAFKA_VERSION, LocalBroker, free_port, jars_dir, port_open


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamproc.cli", "broker", *args],
                          capture_output=True, text=True, timeout=180)


def test_broker_daemon_starts_serves_and_stops(tmp_path) -> None:
    port = free_port()
    d = str(tmp_path / "broker")
    started = _cli("start", "--dir", d, "--port", str(port))
    assert started.returncode == 0, started.stderr
    assert f"STREAMPROC_BOOTSTRAP=127.0.0.1:{port}" in started.stdout
    try:
        status = _cli("status", "--dir", d)
        assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout
        assert "already running" in _cli("start", "--dir", d).stdout
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        try:
            assert admin.describe_cluster()["brokers"]
        finally:
            admin.close()
    finally:
        stopped = _cli("stop", "--dir", d)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not port_open("127.0.0.1", port)
    assert _cli("status", "--dir", d).returncode == 1
    assert (tmp_path / "broker" / "logs" / "server.log").stat().st_size > 0  # kept for failures


def test_jars_are_the_official_kafka_artifacts_cached_outside_the_repo() -> None:
    libs = jars_dir()
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").exists()
    assert (libs / f"kafka-clients-{KAFKA_VERSION}.jar").exists()
    repo = Path(__file__).resolve().parents[1]
    assert not libs.resolve().is_relative_to(repo)  # a clean clone never holds them


def test_a_temporary_broker_removes_its_data_on_a_clean_stop(tmp_path, monkeypatch) -> None:
    """Benchmarks write gigabytes into a temporary broker; nothing of it may outlive the run.
    (Its cluster id starts with "-", as one random id in 64 does: not an option to the tool.)"""
    monkeypatch.setattr(localkafka, "_cluster_id", lambda: "-t0m0Q7vQwGyKjw2b8pzrw")
    broker = LocalBroker().start()
    d = broker.data_dir
    assert (d / "data" / "meta.properties").exists()
    broker.stop()
    assert not d.exists()
    named = LocalBroker(tmp_path / "named").start()  # a directory the caller chose stays
    named.stop()
    assert (tmp_path / "named" / "logs" / "server.log").exists()
