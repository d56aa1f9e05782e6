"""Every Kafka client streamproc uses, built from :class:`Settings` in one place.

Each builder applies the same bootstrap servers, security settings (SASL, TLS), a client
id naming the role and the app, and, where the library has one, the bounded bootstrap
timeout (:data:`streamproc.errors.CONNECT_TIMEOUT_S`). The kafka-python builders turn a
failed bootstrap into a :class:`BrokerError` that names the cause
(:func:`connection_error`). Options that only one role needs (the producer's tuning for
media, the reader's ``read_committed``) are set here too, so no caller spells a client's
configuration itself. It also holds the one change made inside kafka-python, to its group
membership (:func:`_need_rejoin_held`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.errors import KafkaError

from streamproc.config import Settings
from streamproc.errors import CONNECT_TIMEOUT_S, BrokerError, broker_error, classify

MiB = 1024 * 1024
# A 320x240 JPEG is ~10-20 KB and a 720p one ~100-200 KB: a 1 MiB batch holds a burst of
# small frames (or one large one) per partition request.
DEFAULT_BATCH_BYTES = 1 * MiB
# 5 ms lets the frames, chunks and segments of a moment share a request without adding
# latency a 33 ms frame interval would notice.
DEFAULT_LINGER_MS = 5
# kafka-python's fetch_max_bytes default (50 MiB); raised when one record may be larger
FETCH_MAX_BYTES = 52428800
_BOOTSTRAP_TIMEOUT_MS = int(CONNECT_TIMEOUT_S * 1000)


def bootstrap_servers(settings: Settings) -> list[str]:
    """The ``host:port`` addresses of ``settings.bootstrap_servers``."""
    return [a.strip() for a in settings.bootstrap_servers.split(",") if a.strip()]


def _common(settings: Settings, role: str) -> dict[str, Any]:
    """What every client gets: where the brokers are, who it is, how it authenticates."""
    return {
        "bootstrap_servers": bootstrap_servers(settings),
        "client_id": f"streamproc-{role}-{settings.app_id}",
        **settings.security_kwargs(),
    }


# --- kafka-python: the publisher, readers, topic administration -------------------------


_need_rejoin = ConsumerCoordinator.need_rejoin


def _need_rejoin_held(self: ConsumerCoordinator) -> bool:
    """kafka-python's ConsumerCoordinator.need_rejoin, made to hold a rejoin it reports
    until a join completes (Kafka's Java client does the same, KAFKA-9815).

    A group's leader rejoins when the metadata of its topics changes (a topic grows, a
    topic created a moment ago fills in), but kafka-python does not record that a rejoin is
    due: once the leader's JoinGroup and SyncGroup have run (on the client's I/O thread),
    the metadata matches again and ``need_rejoin`` says no. A consumer that polls with a
    short timeout and was busy when they finished then never applies the new assignment:
    it stops heartbeating and is dropped from the group (tests/broker/test_group_rejoin.py).
    Checked against kafka-python 3.0.12 (pinned).
    """
    due = bool(_need_rejoin(self))
    if due:
        self.request_rejoin()
    return due


ConsumerCoordinator.need_rejoin = _need_rejoin_held


def producer_config(settings: Settings, *, linger_ms: int = DEFAULT_LINGER_MS,
                    batch_bytes: int = DEFAULT_BATCH_BYTES) -> dict[str, Any]:
    """kafka-python producer options for media records (the benchmark's raw baseline and
    tests that publish raw records use them too)."""
    return {
        **_common(settings, "producer"),
        # every replica in sync must have the record before it counts as sent
        "acks": "all",
        # kafka-python 3.0 puts an idempotent producer into a permanent fatal state on
        # any non-retriable batch error (say one record outside the topic's timestamp
        # bounds), failing every later record. So: no idempotence, and one request in
        # flight per broker so retries cannot reorder a partition. A retry after a lost
        # ack may duplicate a record; the worker counts a (stream, modality, sp-seq) once.
        "enable_idempotence": False,
        "max_in_flight_requests_per_connection": 1,
        "linger_ms": linger_ms,
        # a batch may never exceed what the topic accepts (max.message.bytes bounds a batch)
        "batch_size": min(batch_bytes, settings.max_message_bytes),
        "max_request_size": settings.max_message_bytes,
        # No compression: JPEG/PNG payloads are already entropy coded (a codec saves ~1%
        # and costs CPU on every frame); PCM chunks are small next to the frames.
        "compression_type": None,
        "bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS,
        # topics are created on purpose by `streamproc topics create`, never by a send
        "allow_auto_create_topics": False,
    }


def producer(settings: Settings, *, linger_ms: int = DEFAULT_LINGER_MS,
             batch_bytes: int = DEFAULT_BATCH_BYTES) -> KafkaProducer:
    """A producer with :func:`producer_config`; BrokerError when no broker can be used."""
    try:
        return KafkaProducer(**producer_config(settings, linger_ms=linger_ms,
                                               batch_bytes=batch_bytes))
    except KafkaError as e:  # kafka-python 3.x: KafkaTimeoutError "Unable to bootstrap"
        raise connection_error(settings, e) from None


def consumer(settings: Settings) -> KafkaConsumer:
    """A group-less, read_committed consumer sized for streamproc records (the caller
    assigns partitions); BrokerError when no broker can be used."""
    try:
        return KafkaConsumer(
            **_common(settings, "reader"),
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
            max_partition_fetch_bytes=settings.max_message_bytes,
            fetch_max_bytes=max(settings.max_message_bytes, FETCH_MAX_BYTES),
            bootstrap_timeout_ms=_BOOTSTRAP_TIMEOUT_MS,
        )
    except KafkaError as e:
        raise connection_error(settings, e) from None


def group_consumer(settings: Settings, group_id: str, role: str) -> KafkaConsumer:
    """A read_committed consumer of group ``group_id`` that commits only when told (the
    caller subscribes); BrokerError when no broker can be used."""
    try:
        return KafkaConsumer(
            **_common(settings, role),
            group_id=group_id,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            # Kafka's advice: a third of the session timeout at most
            heartbeat_interval_ms=max(300, settings.session_timeout_ms // 4),
            max_partition_fetch_bytes=settings.max_message_bytes,
            fetch_max_bytes=max(settings.max_message_bytes, FETCH_MAX_BYTES),
            bootstrap_timeout_ms=_BOOTSTRAP_TIMEOUT_MS,
        )
    except KafkaError as e:
        raise connection_error(settings, e) from None


def admin(settings: Settings, *, request_timeout_ms: int = 15000) -> KafkaAdminClient:
    """An admin client; BrokerError when no broker can be used."""
    try:
        return KafkaAdminClient(**_common(settings, "admin"),
                                request_timeout_ms=request_timeout_ms,
                                bootstrap_timeout_ms=_BOOTSTRAP_TIMEOUT_MS)
    except KafkaError as e:
        raise connection_error(settings, e) from None


# --- aiokafka and faust: the worker ------------------------------------------------------


def aio_consumer(settings: Settings) -> AIOKafkaConsumer:
    """A group-less aiokafka consumer that never commits, for a worker that reads a topic
    by assignment (start it with ``await consumer.start()``)."""
    return AIOKafkaConsumer(**_common(settings, "worker"), enable_auto_commit=False)


def aio_reader(settings: Settings, role: str = "view") -> AIOKafkaConsumer:
    """A group-less, read_committed aiokafka consumer sized for streamproc records, for a
    reader on an event loop (``streamproc view``): the caller assigns partitions; with no
    group it can commit nothing, so it never moves a worker group's offsets."""
    return AIOKafkaConsumer(
        **_common(settings, role),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=settings.max_message_bytes,
        fetch_max_bytes=max(settings.max_message_bytes, FETCH_MAX_BYTES),
    )


def faust_brokers(settings: Settings) -> list[str]:
    """The bootstrap servers as faust's broker URLs."""
    return [f"kafka://{address}" for address in bootstrap_servers(settings)]


# --- why a client could not connect --------------------------------------------------------


def connection_error(settings: Settings, raised: BaseException | None = None) -> BrokerError:
    """The one-line error for a client that could not bootstrap: why, as a probe found it.

    kafka-python reports only "unable to bootstrap" after retrying, and can lose the cause
    on the way (it drops a response that arrives together with the broker closing the
    connection, as after a refused password). One aiokafka connection per bootstrap
    address, with the same security settings and a metadata request, names it: refused,
    authentication failed, certificate not trusted, no SASL on that listener, closed.
    """
    failures = _probe(settings)
    best = max(failures, key=classify, default=raised)
    if raised is not None and best is not None and classify(raised) > classify(best):
        best = raised
    return broker_error(settings.bootstrap_servers, best)


def _probe(settings: Settings, timeout_s: float = 3.0) -> list[BaseException]:
    """Connect once to every bootstrap address as the clients would; the failures."""
    kw = settings.security_kwargs()

    async def one(address: str) -> None:
        host, _, port = address.rpartition(":")
        conn = await create_conn(host.strip("[]"), int(port),
                                 request_timeout_ms=int(timeout_s * 1000), **kw)
        try:
            await conn.send(MetadataRequest([]))
        finally:
            conn.close()

    async def every() -> list[Any]:
        return await asyncio.gather(
            *(asyncio.wait_for(one(a), timeout_s) for a in bootstrap_servers(settings)),
            return_exceptions=True)

    results: list[Any] = []
    # its own thread and loop: callers may be inside an event loop (the worker) or not
    probe = threading.Thread(target=lambda: results.extend(asyncio.run(every())),
                             name="broker-probe", daemon=True)
    probe.start()
    probe.join(timeout_s + 2)
    return [r for r in results if isinstance(r, BaseException)]
