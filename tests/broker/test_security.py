"""SASL (PLAIN, SCRAM-SHA-256) and SSL brokers: every command works through each, and a
wrong login, certificate or protocol is named in one line.

One real broker serves all listeners (PLAINTEXT, SASL_PLAINTEXT, SSL, SASL_SSL), with a
key and certificate made by the JDK's keytool in the test's directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from worker_helpers import REPO, WorkerProc

from streamproc.capture.publisher import Publisher
from streamproc.capture.sources import StreamWriter
from streamproc.config import Settings, env_name
from streamproc.dev.localkafka import Listener, LocalBroker, free_port, make_keystore

pytestmark = [pytest.mark.broker, pytest.mark.slow]

USER, PASSWORD = "alice", "alice-secret"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    tmp = tmp_path_factory.mktemp("secure-kafka")
    broker = LocalBroker(tmp / "broker", heap="512m",
                         listeners=(Listener.SASL_PLAINTEXT, Listener.SSL, Listener.SASL_SSL),
                         sasl_users={USER: PASSWORD}, keystore=make_keystore(tmp / "keys"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _settings(broker: LocalBroker, listener: Listener, tmp: Path, **changes) -> Settings:
    prefix = f"sec{uuid.uuid4().hex[:8]}"
    values = {"bootstrap_servers": broker.bootstrap_for(listener),
              "security_protocol": str(listener), "topic_prefix": prefix, "app_id": prefix,
              "partitions": 2, "expected_modalities": "video", "metrics_port": 0,
              "web_port": free_port(), "data_dir": str(tmp / "worker")}
    if listener.ssl:
        values["ssl_cafile"] = str(broker.keystore.ca_pem)
    return Settings(**{**values, **changes})


def _env(settings: Settings, **raw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPROC_")}
    for f in dataclasses.fields(Settings):
        env[env_name(f)] = str(getattr(settings, f.name))
    env.update(raw)
    return env


def _cli(args: list[str], env: dict[str, str], timeout: float = 60,
         stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamproc.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, input=stdin)


def _publish_frames(settings: Settings, stream: str, seconds: float = 2.5) -> None:
    """10 frames/s of a small image, ending 2 s in the past (no clock check can refuse it)."""
    t0 = time.time_ns() - round((seconds + 2) * 1e9)
    image = np.full((32, 32, 3), 128, np.uint8)
    with Publisher(settings) as pub:
        w = StreamWriter(pub, stream)
        for k in range(round(seconds * 10)):
            w.frame(image, t0 + k * 100_000_000)
    assert pub.stats.acked == round(seconds * 10)


@pytest.mark.parametrize(("listener", "mechanism"), [
    (Listener.SASL_PLAINTEXT, "PLAIN"),
    (Listener.SASL_SSL, "SCRAM-SHA-256"),
    (Listener.SSL, ""),
], ids=["sasl-plain", "sasl-ssl-scram", "ssl"])
def test_topics_producer_worker_and_consume_through_a_secured_listener(
        secure_broker: LocalBroker, tmp_path: Path, listener: Listener, mechanism: str) -> None:
    login = {"sasl_mechanism": mechanism, "sasl_username": USER,
             "sasl_password": PASSWORD} if mechanism else {}
    settings = _settings(secure_broker, listener, tmp_path, **login)
    env = _env(settings)
    created = _cli(["topics", "create"], env)
    assert created.returncode == 0, created.stderr
    _publish_frames(settings, "door")
    worker = WorkerProc(settings, tmp_path / "worker.log")
    try:
        worker.wait_for(r"Worker ready")
        deadline = time.monotonic() + 60
        preds: list[dict] = []
        while not preds and time.monotonic() < deadline:
            out = _cli(["consume", "--json"], env)
            assert out.returncode == 0, out.stderr
            preds = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
            time.sleep(0.5)
        assert preds, f"no prediction within 60 s; worker log:\n{worker.log()[-3000:]}"
        assert {p["stream_id"] for p in preds} == {"door"}
        assert all(p["modalities"]["video"]["frames"] > 0 for p in preds)
    finally:
        worker.stop()
    # A fresh broker makes aiokafka's first coordinator lookup fail and retry; that is
    # routine and must not show as an error in the worker's log.
    errors = [line for line in worker.log().splitlines() if "[ERROR]" in line]
    assert not errors, errors


def test_wrong_logins_certificates_and_protocols_are_named_in_one_line(
        secure_broker: LocalBroker, tmp_path: Path) -> None:
    """Each command, each wrong setting: exit 2 and one line that names the real cause."""
    b = secure_broker
    other_ca = make_keystore(tmp_path / "other", name="other").ca_pem
    sasl = {"sasl_username": USER, "sasl_password": PASSWORD}
    cases = {
        # name: (command, settings, words the one line must contain)
        "plain-password": (
            ["topics", "check"],
            _settings(b, Listener.SASL_PLAINTEXT, tmp_path, sasl_mechanism="PLAIN",
                      sasl_username=USER, sasl_password="wrong"),
            ["authentication failed", "Invalid username or password"]),
        "scram-password": (
            ["produce", "transcript", "--stream-id", "x"],
            _settings(b, Listener.SASL_SSL, tmp_path, sasl_mechanism="SCRAM-SHA-256",
                      sasl_username=USER, sasl_password="wrong"),
            ["authentication failed", "SCRAM-SHA-256"]),
        "wrong-ca": (
            ["consume"],
            _settings(b, Listener.SSL, tmp_path, ssl_cafile=str(other_ca)),
            ["SSL certificate verify failed", "--ssl-cafile"]),
        "sasl-on-plaintext": (
            ["worker"],
            _settings(b, Listener.PLAINTEXT, tmp_path).replace(
                security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", **sasl),
            ["SASL failed", "IllegalSaslStateError"]),
        "plaintext-on-ssl": (
            ["topics", "check"],
            _settings(b, Listener.SSL, tmp_path).replace(security_protocol="PLAINTEXT"),
            ["closed", "--security-protocol"]),
    }
    procs = {}
    for name, (cmd, settings, _) in cases.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "streamproc.cli", *cmd], env=_env(settings), cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1, (name, err)
        for words in cases[name][2]:
            assert words in lines[0], (name, lines[0])
        assert "no Kafka broker reachable" not in lines[0], (name, lines[0])


def test_sasl_without_a_mechanism_is_a_setting_error(secure_broker: LocalBroker,
                                                     tmp_path: Path) -> None:
    settings = _settings(secure_broker, Listener.PLAINTEXT, tmp_path)
    env = _env(settings, STREAMPROC_SECURITY_PROTOCOL="SASL_PLAINTEXT",
               STREAMPROC_SASL_USERNAME=USER, STREAMPROC_SASL_PASSWORD=PASSWORD)
    proc = _cli(["topics", "check"], env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "streamproc topics: security_protocol=SASL_PLAINTEXT needs sasl_mechanism "
        "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"]
