"""The development broker: `streamproc broker start|status|stop` runs a real KRaft Kafka."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer

from streamproc.capture.publisher import Publisher
from streamproc.capture.sources import StreamWriter
from streamproc.config import Settings
from streamproc.dev import localkafka
from streamproc.dev.localkafka import LocalBroker, free_port, port_open
from streamproc.wire import codec as wire

pytestmark = pytest.mark.broker


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamproc.cli", "broker", *args],
                          capture_output=True, text=True, timeout=180)


def test_broker_daemon_starts_serves_and_stops(tmp_path) -> None:
    port = free_port()
    d = str(tmp_path / "broker")
    started = _cli("start", "--dir", d, "--port", str(port))
    assert started.returncode == 0, started.stderr
    assert f"STREAMPROC_BOOTSTRAP=127.0.0.1:{port}" in started.stdout
    # the stop command it prints is one that stops this broker
    assert f"stop with `streamproc broker stop --dir {d}`" in started.stdout
    try:
        elsewhere = _cli("stop", "--dir", str(tmp_path / "other"))
        assert "started with --dir is stopped with the same --dir" in elsewhere.stdout
        status = _cli("status", "--dir", d)
        assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout
        assert "already running" in _cli("start", "--dir", d).stdout
        assert "already running" in _cli("start", "--dir", d, "--port", "0").stdout  # any
        # another port for the running broker, or its port for another one: refused, not
        # reported as running (the second broker would die failing to bind the port)
        moved = _cli("start", "--dir", d, "--port", str(port + 1))
        assert moved.returncode == 2 and f"not port {port + 1}" in moved.stderr
        taken = _cli("start", "--dir", str(tmp_path / "second"), "--port", str(port))
        assert taken.returncode == 2, taken.stdout
        assert f"port {port} is already in use" in taken.stderr
        assert _cli("status", "--dir", str(tmp_path / "second")).returncode == 1
        bad = _cli("start", "--dir", str(tmp_path / "third"), "--port", "99999")
        assert bad.returncode == 2 and "not a TCP port" in bad.stderr
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


def _gone(pid: int) -> bool:
    """The process ended (a zombie nobody reaped yet counts: it serves nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv (Linux's util-linux)")
def test_a_broker_stops_when_the_process_that_started_it_is_killed(tmp_path) -> None:
    """A benchmark or test run killed outright must not leave its broker running."""
    starter = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from streamproc.dev.localkafka import LocalBroker\n"
         f"b = LocalBroker({str(tmp_path / 'b')!r}).start()\n"
         "print(b.proc.pid, b.port, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    pid = 0
    try:
        pid, port = map(int, starter.stdout.readline().split())  # type: ignore[union-attr]
        assert port_open("127.0.0.1", port)
        starter.kill()  # SIGKILL: no finally, no atexit in the starter
        starter.wait()
        deadline = time.monotonic() + 60
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(pid), "the broker outlived the process that started it"
        assert not port_open("127.0.0.1", port)
    finally:
        starter.kill()
        if pid and not _gone(pid):  # the check failed: no orphan left to the next tests
            os.kill(pid, signal.SIGKILL)


def _tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamproc.cli", "broker", "tool", *args],
                          capture_output=True, text=True, timeout=120, input=stdin)


def test_kafka_console_consumer_prints_the_sp_headers(topics: Settings) -> None:
    """What the README shows: Kafka's own console consumer, run by `broker tool`."""
    with Publisher(topics) as pub:
        StreamWriter(pub, "door").text("seven", 1_000_000_000, 1_500_000_000, final=True)
    out = _tool("console-consumer", "--bootstrap-server", topics.bootstrap_servers,
                "--topic", topics.topic("text"), "--from-beginning", "--max-messages", "1",
                "--property", "print.headers=true", "--property", "print.key=true")
    assert out.returncode == 0, out.stderr
    headers, key, value = out.stdout.strip().split("\t")
    assert headers.split(",") == ["sp-v:1", "sp-mod:text", "sp-ts:1000000000", "sp-seq:0"]
    assert key == "door" and json.loads(value)["text"] == "seven"


def test_kafka_console_producer_writes_a_record_the_wire_format_decodes(
        topics: Settings) -> None:
    """The README's hand-written record, run as the README has it (its broker and topic
    swapped for the test's): the worker's decoder takes it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = re.search(r"to write one by hand.*?```sh\n(.*?)```", readme, re.S)
    assert snippet is not None
    script = (snippet.group(1).replace("127.0.0.1:9092", topics.bootstrap_servers)
              .replace("streamproc.text", topics.topic("text"))
              .replace("streamproc broker tool", f"{sys.executable} -m streamproc.cli broker tool"))
    out = subprocess.run(["bash", "-eo", "pipefail", "-c", script], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    consumer = KafkaConsumer(topics.topic("text"), bootstrap_servers=topics.bootstrap_servers,
                             auto_offset_reset="earliest", consumer_timeout_ms=30_000)
    try:
        msg = next(iter(consumer))  # the topic holds only this record
    finally:
        consumer.close()
    rec = wire.decode(wire.KafkaRecord.from_client(msg))
    assert (rec.stream_id, rec.text, rec.seq) == ("cam1", "hi", 0)
    assert rec.end_ns - rec.start_ns == 500_000_000


def test_the_local_broker_keeps_old_event_times_and_bounds_by_size(topics: Settings) -> None:
    """Replayed media carries event times (record timestamps) years old: the local broker
    keeps records by size, never by age, so nothing is deleted while a test reads it
    (asked of the broker with Kafka's own configs tool)."""
    if os.environ.get("STREAMPROC_BOOTSTRAP"):
        pytest.skip("STREAMPROC_BOOTSTRAP names an existing broker: its settings are its own")
    out = _tool("configs", "--bootstrap-server", topics.bootstrap_servers, "--describe",
                "--all", "--entity-type", "topics", "--entity-name", topics.topic("audio"))
    assert out.returncode == 0, out.stderr
    found = dict(re.findall(r"^\s*(retention\.(?:ms|bytes))=(-?\d+)", out.stdout, re.M))
    assert found == {"retention.ms": "-1",
                     "retention.bytes": str(localkafka.LOCAL_RETENTION_BYTES)}, out.stdout
