"""Every Kafka client is built from the settings the same way (no broker: the client
classes are replaced by recorders of their options)."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError

from streamproc import kafka
from streamproc.config import Settings
from streamproc.errors import CONNECT_TIMEOUT_S, BrokerError

SASL = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_username": "u", "sasl_password": "p"}


class Recorder:
    """Stands in for a client class: keeps the options it was built with."""

    def __init__(self, **options: Any) -> None:
        self.options = options


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "AIOKafkaConsumer"):
        monkeypatch.setattr(kafka, name, Recorder)


def test_every_client_gets_the_servers_the_security_settings_and_a_client_id(
        recorded: None) -> None:
    s = Settings(bootstrap_servers="a:9092, b:9093", app_id="grp", **SASL)
    clients = {"producer": kafka.producer(s), "reader": kafka.consumer(s),
               "admin": kafka.admin(s), "worker": kafka.aio_consumer(s),
               "view": kafka.aio_reader(s)}
    for role, client in clients.items():
        options = client.options
        assert options["bootstrap_servers"] == ["a:9092", "b:9093"], role
        assert options["client_id"] == f"streamproc-{role}-grp"
        assert options["security_protocol"] == "SASL_PLAINTEXT", role
        assert options["sasl_plain_username"] == "u", role
        assert options["sasl_mechanism"] == "SCRAM-SHA-256", role
    for role in ("producer", "reader", "admin"):  # kafka-python: a bounded bootstrap
        assert clients[role].options["bootstrap_timeout_ms"] == CONNECT_TIMEOUT_S * 1000


def test_readers_see_committed_records_only_and_never_commit(recorded: None) -> None:
    s = Settings(max_message_bytes=80_000_000)
    options = kafka.consumer(s).options
    assert options["isolation_level"] == "read_committed"
    assert options["group_id"] is None and options["enable_auto_commit"] is False
    assert options["max_partition_fetch_bytes"] == 80_000_000 <= options["fetch_max_bytes"]
    assert kafka.aio_consumer(s).options["enable_auto_commit"] is False
    view = kafka.aio_reader(s).options  # the web view's reader, on an event loop
    assert view["isolation_level"] == "read_committed"
    assert view["group_id"] is None and view["enable_auto_commit"] is False
    assert view["max_partition_fetch_bytes"] == 80_000_000 <= view["fetch_max_bytes"]


def test_producer_options_are_the_config_and_batches_fit_the_topics(recorded: None) -> None:
    s = Settings(max_message_bytes=300_000)
    assert kafka.producer(s, linger_ms=2).options == kafka.producer_config(s, linger_ms=2)
    cfg = kafka.producer_config(s, batch_bytes=4 * kafka.MiB)
    assert cfg["batch_size"] == 300_000 and cfg["allow_auto_create_topics"] is False


def test_faust_gets_the_same_servers_as_urls() -> None:
    s = Settings(bootstrap_servers="a:9092, b:9093")
    assert kafka.faust_brokers(s) == ["kafka://a:9092", "kafka://b:9093"]


def test_a_client_that_cannot_bootstrap_becomes_a_broker_error_with_the_cause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Unreachable:
        def __init__(self, **options: Any) -> None:
            raise KafkaTimeoutError("Unable to bootstrap from [('127.0.0.1', 1)]")

    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka, name, Unreachable)
    s = Settings(bootstrap_servers="127.0.0.1:1")  # nothing listens on port 1
    for build in (kafka.producer, kafka.consumer, kafka.admin):
        with pytest.raises(BrokerError, match=r"no Kafka broker reachable at 127\.0\.0\.1:1"):
            build(s)
