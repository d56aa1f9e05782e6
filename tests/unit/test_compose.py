"""The compose stack cannot run here (no Docker engine), so check what can be checked:
the file parses, every service runs a real `streamproc` subcommand with valid settings,
and the broker/topic limits agree with the code's defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from streamproc.cli import build_parser
from streamproc.config import Settings
from streamproc.dev.demo import Layout, stream_ids
from streamproc.dev.localkafka import BROKER_MESSAGE_MAX_BYTES, KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _ours(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("image", "").startswith(
        "streamproc")}


def test_broker_is_the_official_image_of_our_kafka_version(compose) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) == BROKER_MESSAGE_MAX_BYTES
    assert "healthcheck" in kafka


def test_every_service_runs_a_real_streamproc_subcommand(compose) -> None:
    services = _ours(compose)
    assert {"topics", "prepare", "worker", "consumer"} <= set(services)
    assert any(n.startswith("producer") for n in services)
    parser = build_parser()
    for name, svc in services.items():
        args = parser.parse_args(svc["command"])  # SystemExit (fails) on an unknown command
        settings = Settings.load(args, environ=svc["environment"])
        assert settings.bootstrap_servers == "kafka:19092", name
    assert parser.parse_args(services["worker"]["command"]).command == "worker"


def test_stack_settings_fit_the_broker_and_the_defaults(compose) -> None:
    env = next(iter(_ours(compose).values()))["environment"]
    s = Settings.load(environ=env)
    assert s.max_message_bytes <= BROKER_MESSAGE_MAX_BYTES
    assert s.max_message_bytes == Settings().max_message_bytes
    assert s.partitions >= 2  # room to scale workers


def test_worker_can_scale(compose) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_producers_replay_what_prepare_writes(compose) -> None:
    services = _ours(compose)
    prep = build_parser().parse_args(services["prepare"]["command"])
    layout = Layout(Path(prep.dir))
    producers = {n: s for n, s in services.items() if n.startswith("producer")}
    assert len(producers) == prep.streams
    asr = Settings.load(environ=services["asr"]["environment"])
    transcribed = set(asr.asr_streams.split(","))
    for sid, (_, svc) in zip(stream_ids(prep.streams), sorted(producers.items()), strict=True):
        args = build_parser().parse_args(svc["command"])
        assert (args.command, args.stream_id) == ("produce", sid)
        assert Path(args.video) == layout.clips / f"{sid}.avi"
        assert Path(args.audio) == layout.clips / f"{sid}.wav"
        # a stream's transcript comes from its producer or from the asr service, never both
        if sid in transcribed:
            assert args.transcript is None
        else:
            assert Path(args.transcript) == layout.clips / f"{sid}.srt"
    assert transcribed and transcribed <= set(stream_ids(prep.streams))
    worker = build_parser().parse_args(services["worker"]["command"])
    assert Path(worker.model) == layout.model


def test_dockerfile_installs_the_locked_torch_on_cpu() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lock = (ROOT / "requirements.lock").read_text()
    torch_pin = re.search(r"^torch==(\S+)$", lock, re.M).group(1)
    assert f"torch=={torch_pin} --index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert "requirements.lock" in dockerfile
    assert 'ENTRYPOINT ["streamproc"]' in dockerfile
