"""A wrong bootstrap address: every command says so in one line, exits 2, and does not hang.

The time bound in these tests is a hang check (a command that waited for the Kafka
clients' default timeouts took 30 s and more), not a timing goal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from streamproc.dev.localkafka import free_port
from streamproc.errors import CONNECT_TIMEOUT_S, BrokerError, Fault, broker_error, classify

HANG_S = 15


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPROC_")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "streamproc.cli", *args], env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("command", [
    ["produce", "transcript", "--stream-id", "door"],
    ["consume"],
    ["topics", "check"],
    ["worker"],
], ids=["produce", "consume", "topics", "worker"])
def test_a_wrong_address_is_one_line_exit_2_and_no_hang(command: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc, took = _cli(*command, "--bootstrap-servers", address)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines == [f"streamproc {command[0]}: no Kafka broker reachable at {address} within "
                     f"{CONNECT_TIMEOUT_S:g}s (set --bootstrap-servers or STREAMPROC_BOOTSTRAP; "
                     "`streamproc broker start` runs a local one)"], proc.stderr
    assert proc.stdout == ""  # no table header, no summary of nothing
    assert took < HANG_S


def test_debug_shows_the_kafka_clients_own_log() -> None:
    address = f"127.0.0.1:{free_port()}"
    proc, _ = _cli("produce", "transcript", "--stream-id", "door", "--bootstrap-servers",
                   address, "--log-level", "debug")
    assert proc.returncode == 2
    assert "kafka.net" in proc.stderr  # what the quiet default leaves out
    assert proc.stderr.strip().splitlines()[-1].startswith("streamproc produce: no Kafka broker")


def test_log_level_accepts_only_the_documented_levels() -> None:
    proc, _ = _cli("config", "--log-level", "verbose")
    assert proc.returncode == 2
    assert "invalid choice: 'verbose'" in proc.stderr
    env = {**os.environ, "STREAMPROC_LOG_LEVEL": "verbose"}
    from_env = subprocess.run([sys.executable, "-m", "streamproc.cli", "config"], env=env,
                              capture_output=True, text=True)
    assert from_env.returncode == 2
    assert "invalid setting log_level='verbose'" in from_env.stderr
    assert "Traceback" not in from_env.stderr
    # a documented level in capitals is that level, from a flag or the environment
    upper = subprocess.run([sys.executable, "-m", "streamproc.cli", "config", "--log-level",
                            "WARNING"], env={**os.environ, "STREAMPROC_LOG_LEVEL": "DEBUG"},
                           capture_output=True, text=True)
    assert upper.returncode == 0, upper.stderr
    assert re.search(r"log_level\s+warning\s+\(flag\)", upper.stdout)


@pytest.mark.parametrize(("exc", "kind"), [
    (ConnectionRefusedError(111, "Connection refused"), Fault.UNREACHABLE),
    (ConnectionResetError(), Fault.CLOSED),
    (TimeoutError(), Fault.UNREACHABLE),
])
def test_stdlib_connection_failures_are_classified(exc: BaseException, kind: Fault) -> None:
    assert classify(exc) == kind


def test_a_refused_password_is_named_not_called_unreachable() -> None:
    from kafka.errors import SaslAuthenticationFailedError

    exc = SaslAuthenticationFailedError(
        "SaslAuthenticationFailedError: Authentication failed: Invalid username or password")
    err = broker_error("127.0.0.1:9093", exc)
    assert isinstance(err, BrokerError)
    assert str(err).startswith("Kafka at 127.0.0.1:9093: authentication failed: "
                               "SaslAuthenticationFailedError: Authentication failed: "
                               "Invalid username or password (check --sasl-username")


def test_quiet_logs_drop_only_the_coordinator_lookups_aiokafka_retries() -> None:
    """A fresh worker start logged `[ERROR] Group Coordinator Request failed`; a failure
    aiokafka does not retry, or any other coordinator error, must still show."""
    import logging

    from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError

    from streamproc.errors import quiet_client_logs

    names = ("kafka", "kafka.net", "kafka.cluster", "aiokafka", "aiokafka.conn",
             "aiokafka.consumer.group_coordinator")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    coordinator.addHandler(handler)
    root, root_level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.INFO)  # what --log-level info gives the worker
    try:
        quiet_client_logs("info")
        coordinator.error("Group Coordinator Request failed: %s",
                          GroupCoordinatorNotAvailableError())
        coordinator.warning("Marking the coordinator dead (node %s)for group %s.", 1, "g")
        coordinator.error("Group Coordinator Request failed: %s",
                          GroupAuthorizationFailedError())
        coordinator.error("OffsetCommit failed for group %s", "g")
        assert [m.split(":")[0] for m in seen] == ["Group Coordinator Request failed",
                                                   "OffsetCommit failed for group g"]
        assert "GroupAuthorizationFailedError" in seen[0]
        # routine INFO (group joins, "Updating subscribed topics") stays out below debug
        coordinator.info("Joined group %s", "g")
        assert len(seen) == 2
        quiet_client_logs("debug")
        coordinator.warning("Marking the coordinator dead (node %s)for group %s.", 1, "g")
        coordinator.info("Joined group %s", "g")
        assert len(seen) == 4
    finally:
        root.setLevel(root_level)
        coordinator.removeHandler(handler)
        for n, (level, filters) in saved.items():
            logging.getLogger(n).setLevel(level)
            logging.getLogger(n).filters[:] = filters
