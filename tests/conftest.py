"""Shared fixtures: one real Kafka broker per test session, unique topics per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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
    from streamproc.dev.localkafka import LocalBroker

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


@pytest.fixture(scope="session")
def avdigits_tts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One speech cache per session: the tiny dataset and the tests' clips share voices."""
    return tmp_path_factory.mktemp("avdigits-tts")


@pytest.fixture(scope="session")
def avdigits_tiny(tmp_path_factory: pytest.TempPathFactory, avdigits_tts: Path) -> Path:
    """The tiny AV-Digits dataset, generated once per session."""
    from streamproc.ml import avdigits as av

    return av.generate(tmp_path_factory.mktemp("avdigits-tiny") / "ds", av.PRESETS["tiny"],
                       avdigits_tts)


@pytest.fixture(scope="session")
def tiny_model(avdigits_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`streamproc train` (the CLI, as a user runs it) on tiny AV-Digits, once per session:
    late fusion, 12 epochs, seed 0. Training and pipeline tests share it."""
    from streamproc.cli import main

    out = tmp_path_factory.mktemp("tiny-model") / "late"
    rc = main(["train", str(avdigits_tiny), "--model", "late", "--out", str(out), "--epochs",
               "12", "--seed", "0", "--device", "cpu", "--name", "avdigits-late"])
    assert rc == 0
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if exitstatus not in (0, 5) and _BROKER is not None:
        terminalreporter.write_line(f"Kafka broker log kept at {_BROKER.log_file}")
