"""Settings: defaults < environment < flags, validated with messages that name the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamproc.cli import build_parser
from streamproc.config import ConfigError, Settings


def test_defaults_env_and_flags_in_that_order() -> None:
    env = {"STREAMPROC_BOOTSTRAP": "k1:9092", "STREAMPROC_WINDOW_MS": "2000",
           "STREAMPROC_HOP_MS": "1000"}
    args = build_parser().parse_args(["config", "--hop-ms", "500"])
    s = Settings.load(args, environ=env)
    assert s.bootstrap_servers == "k1:9092"  # env
    assert s.window_ms == 2000  # env
    assert s.hop_ms == 500  # the flag beats the env
    assert s.partitions == Settings().partitions  # default
    sources = {name: src for name, _, src in Settings.describe(args, environ=env)}
    assert sources["bootstrap_servers"] == "env STREAMPROC_BOOTSTRAP"
    assert sources["hop_ms"] == "flag"
    assert sources["partitions"] == "default"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hop_ms": 1500}, "hop_ms=1500: must be positive and at most window_ms=1000"),
        ({"partitions": 0}, "partitions=0: must be at least 1"),
        # what the help says brokers allow (group.min.session.timeout.ms)
        ({"session_timeout_ms": 5999}, "session_timeout_ms=5999: must be at least 6000 "
                                       "(.*brokers allow 6000 and up"),
        ({"device": "tpu"}, "device='tpu': must be auto, cpu, cuda or cuda:N"),
        ({"switch_interval_us": 10}, "switch_interval_us=10: must be 50 to 100000"),
        ({"model_in": "gpu"}, "model_in='gpu': must be thread or process"),
        ({"expected_modalities": "video,smell"}, "expected_modalities='video,smell'"),
        ({"final_within_ms": -2}, "final_within_ms=-2: must be -1 "),
        ({"final_within_ms": 3000, "provisional_on": "none"},
         "final_within_ms=3000: it bounds how long a final waits"),
    ],
)
def test_invalid_settings_are_refused_with_the_rule(changes, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings(**changes)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="STREAMPROC_PARTITIONS: expected int"):
        Settings.load(environ={"STREAMPROC_PARTITIONS": "four"})


def test_derived_topic_names_and_lateness() -> None:
    s = Settings(topic_prefix="acme", lateness_text_ms=2500)
    assert s.input_topics == ("acme.video", "acme.audio", "acme.text")
    assert s.all_topics[-2:] == ("acme.predictions", "acme.deadletter")
    assert s.lateness_ns("text") == 2_500_000_000
    assert s.modalities == ("video", "audio", "text")


def test_config_command_prints_effective_settings_and_hides_secrets() -> None:
    env = {"STREAMPROC_SASL_PASSWORD": "hunter2", "STREAMPROC_PARTITIONS": "6", "PATH": ""}
    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "config", "--json",
                          "--window-ms", "3000"], capture_output=True, text=True, env=env,
                         check=True).stdout
    shown = json.loads(out)
    assert shown["partitions"] == {"value": 6, "source": "env STREAMPROC_PARTITIONS"}
    assert shown["window_ms"] == {"value": 3000, "source": "flag"}
    assert shown["sasl_password"] == {"value": "***", "source": "env STREAMPROC_SASL_PASSWORD"}
    assert shown["hop_ms"]["source"] == "default"
    table = subprocess.run([sys.executable, "-m", "streamproc.cli", "config"],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert "hunter2" not in table
    assert any(line.startswith("partitions") and "(env STREAMPROC_PARTITIONS)" in line
               for line in table.splitlines())


def test_invalid_setting_exits_2_without_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "streamproc.cli", "config", "--hop-ms", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid setting hop_ms=0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_setting_is_documented_in_the_readme() -> None:
    from pathlib import Path

    from streamproc.config import settings_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "README settings table is stale: paste " \
        "`streamproc config --markdown` into it"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u", "sasl_password": "p"},
         "security_protocol=SASL_PLAINTEXT needs sasl_mechanism"),
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
         "sasl_mechanism=PLAIN needs security_protocol SASL_PLAINTEXT or SASL_SSL, not "
         "PLAINTEXT"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256"},
         "security_protocol=SASL_SSL needs sasl_username and sasl_password"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u",
          "sasl_password": "p"}, "sasl_mechanism='GSSAPI': must be PLAIN, SCRAM-SHA-256"),
        ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
         "cannot load the SSL files"),
    ],
)
def test_incomplete_security_settings_are_refused(changes, message) -> None:
    """Each client would otherwise fill the gap its own way (faust's SASL default protocol,
    kafka-python's default mechanism) or fail only at connect time."""
    with pytest.raises(ConfigError, match=message):
        Settings(**changes).security_kwargs()


@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("PLAINTEXT", ""), ("SSL", ""), ("SASL_PLAINTEXT", "PLAIN"),
    ("SASL_SSL", "SCRAM-SHA-256"), ("SASL_PLAINTEXT", "SCRAM-SHA-512"),
])
def test_security_kwargs_mean_the_same_to_kafka_python_aiokafka_and_faust(
        protocol: str, mechanism: str) -> None:
    import inspect

    from aiokafka import AIOKafkaConsumer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    from streamproc.worker.app import faust_credentials

    login = {"sasl_mechanism": mechanism, "sasl_username": "u", "sasl_password": "p"}
    s = Settings(security_protocol=protocol, **(login if mechanism else {}))
    kw = s.security_kwargs()
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(kw) <= set(client.DEFAULT_CONFIG), client
    assert set(kw) <= set(inspect.signature(AIOKafkaConsumer).parameters)
    faust_kw = credentials_to_aiokafka_auth(faust_credentials(s))  # what the worker's faust uses
    assert faust_kw["security_protocol"] == protocol
    for key in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
        assert faust_kw.get(key) == kw.get(key), key
    assert (faust_kw.get("ssl_context") is None) == (kw.get("ssl_context") is None)


def test_unknown_streamproc_variables_are_named_with_the_setting_meant() -> None:
    """A misspelt setting variable would be ignored without a word: every command warns."""
    from streamproc.config import unknown_env

    env = {"STREAMPROC_BOOTSTRAP_SERVERS": "x", "STREAMPROC_BOOTSTRAP": "y",
           "STREAMPROC_CACHE": "/tmp", "STREAMPROC_LOGLEVEL": "debug", "PATH": "/bin"}
    assert unknown_env(env) == [
        "STREAMPROC_BOOTSTRAP_SERVERS is not a setting and is ignored (did you mean "
        "STREAMPROC_BOOTSTRAP?)",
        "STREAMPROC_LOGLEVEL is not a setting and is ignored (did you mean "
        "STREAMPROC_LOG_LEVEL?)"]
    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "config"],
                         env={**os.environ, "STREAMPROC_PARTITON": "8"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert ("streamproc: warning: STREAMPROC_PARTITON is not a setting and is ignored (did "
            "you mean STREAMPROC_PARTITIONS?)") in out.stderr


@pytest.mark.parametrize(
    ("changes", "bound_ms"),
    [
        ({}, 3000 - 100 - 200),  # the defaults: a final about the text lateness after the end
        ({"lateness_text_ms": 10_000, "lateness_audio_ms": 300}, 10_000 - 300 - 200),
        ({"lateness_text_ms": 250}, 0),  # no room left after the provisional's own delay
        ({"provisional_on": "none"}, 0),  # finals only: nothing to count from
        ({"expected_modalities": "video,audio"}, 0),  # no slower modality to bound
        ({"provisional_on": "video"}, 0),  # late audio could not revise the final
        ({"revision_horizon_ms": 0}, 0),  # a segment after the bound could only be late
        ({"final_within_ms": 0}, 0),
        ({"final_within_ms": 1234}, 1234),
    ],
)
def test_the_final_bound_resolves_auto_from_the_lateness(changes, bound_ms) -> None:
    assert Settings(**changes).final_within_ns() == bound_ms * 1_000_000
