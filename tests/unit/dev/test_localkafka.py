"""The development broker without running it: its jars and the `broker tool` refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from streamproc.dev.localkafka import KAFKA_VERSION, jars_dir


def test_jars_are_the_official_kafka_artifacts_cached_outside_the_repo() -> None:
    libs = jars_dir()
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").exists()
    assert (libs / f"kafka-clients-{KAFKA_VERSION}.jar").exists()
    assert (libs / f"kafka-tools-{KAFKA_VERSION}.jar").exists()  # the console tools
    repo = Path(__file__).resolve().parents[3]
    assert not libs.resolve().is_relative_to(repo)  # a clean clone never holds them


def test_an_unknown_tool_is_refused_with_the_list() -> None:
    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "broker", "tool",
                          "console-consume"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown Kafka tool 'console-consume'; one of: console-consumer" in out.stderr
