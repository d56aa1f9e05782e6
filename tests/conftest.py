"""Shared fixtures: one real Kafka broker per test session, unique topics per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings as hypothesis_settings

from streamproc.config import Settings

# CI runs a moderate number of examples; `HYPOTHESIS_PROFILE=thorough` digs deeper locally.
hypothesis_settings.register_profile("ci", max_examples=60, deadline=None)
hypothesis_settings.register_profile("thorough", max_examples=2000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_BROKER = None


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Apache Kafka: STREAMPROC_BOOTSTRAP if set, else a local KRaft broker."""
    global _BROKER
    existing = os.environ.get("STREAMPROC_BOOTSTRAP")
    if existing:
        yield existing
        return
    from streamproc.localkafka import LocalBroker

    _BROKER = LocalBroker(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield _BROKER.bootstrap
    finally:
        _BROKER.stop()


@pytest.fixture
def settings(kafka_bootstrap: str) -> Settings:
    """Settings on the session broker with a topic prefix no other test uses."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, app_id=prefix,
                    partitions=4)


@pytest.fixture
def topics(settings: Settings) -> Settings:
    """``settings`` with every streamproc topic created."""
    from streamproc.topics import create_topics

    create_topics(settings)
    return settings


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if exitstatus not in (0, 5) and _BROKER is not None:
        terminalreporter.write_line(f"Kafka broker log kept at {_BROKER.log_file}")
