"""The one error type a person can fix: the CLI prints its message, not a traceback.

Also the words for a broker that cannot be used: the Kafka clients retry a refused password
or an untrusted certificate until their bootstrap timeout and then say only "unable to
bootstrap"; :func:`broker_error` names the cause a probe found
(:func:`streamproc.kafka.connection_error`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
from enum import IntEnum

# How long any command waits for a first answer from the bootstrap servers before it gives
# up with a reason (a few seconds: a wrong address should fail fast, a live broker answers
# in milliseconds).
CONNECT_TIMEOUT_S = 5.0


class UserError(Exception):
    """Bad settings, missing topics, unreachable broker, missing system library..."""


class BrokerError(UserError):
    """No broker could be used at the bootstrap servers; the message says why."""


class Fault(IntEnum):
    """How much a connection failure says about its cause (more is better)."""

    UNKNOWN = 0
    CLOSED = 1  # the broker closed the connection: often the wrong security protocol
    UNREACHABLE = 2  # refused, timed out, unknown host
    SSL = 3  # a TLS handshake failed
    SASL = 4  # the listener does not speak SASL, or not this mechanism
    CREDENTIALS = 5  # authentication failed


def classify(exc: BaseException) -> Fault:
    """The kind of one connection failure of kafka-python or aiokafka (same class names)."""
    chain = [exc]
    while chain[-1].__context__ is not None and len(chain) < 5:
        chain.append(chain[-1].__context__)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if names & {"SaslAuthenticationFailedError", "SaslAuthenticationFailed"} or (
            "Authentication failed" in text):
        return Fault.CREDENTIALS
    if names & {"IllegalSaslStateError", "UnsupportedSaslMechanismError"}:
        return Fault.SASL
    if any(isinstance(e, ssl.SSLError) for e in chain) or "[SSL" in text:
        return Fault.SSL
    if any(isinstance(e, (ConnectionRefusedError, TimeoutError, socket.gaierror))
           for e in chain) or any(
            s in text for s in ("ECONNREFUSED", "refused", "timed out", "Name or service",
                                "nodename nor servname", "name resolution", "getaddrinfo")):
        return Fault.UNREACHABLE
    if any(isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))
           for e in chain) or "disconnected" in text or "closed" in text.lower():
        return Fault.CLOSED
    return Fault.UNKNOWN


def _hint(kind: Fault) -> str:
    return {
        Fault.CREDENTIALS: "check --sasl-username, --sasl-password and --sasl-mechanism",
        Fault.SASL: "the listener does not accept this SASL mechanism, or no SASL at all: "
                    "check --security-protocol and --sasl-mechanism",
        Fault.SSL: "check --ssl-cafile, the CA that signed the broker's certificate, and "
                   "that this listener speaks SSL: --security-protocol",
        Fault.CLOSED: "the broker closed the connection: its listener may need another "
                      "--security-protocol, one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
    }.get(kind, "set --bootstrap-servers or STREAMPROC_BOOTSTRAP; `streamproc broker start` "
                "runs a local one")


def broker_error(bootstrap: str, cause: BaseException | None) -> BrokerError:
    """A one-line BrokerError naming why no connection to ``bootstrap`` worked.

    ``cause``: the most telling failure seen (a probe's, or what the client raised);
    None when a probe connected and the broker answered, which leaves only the timeout.
    """
    kind = Fault.UNKNOWN if cause is None else classify(cause)
    if cause is None or kind in (Fault.UNREACHABLE, Fault.UNKNOWN):
        listening = [a for a in bootstrap.split(",") if _accepts_tcp(a.strip())]
        if not listening:
            return BrokerError(f"no Kafka broker reachable at {bootstrap} within "
                               f"{CONNECT_TIMEOUT_S:g}s ({_hint(Fault.UNREACHABLE)})")
        return BrokerError(f"Kafka at {bootstrap}: {', '.join(listening)} accepts connections "
                           f"but no Kafka session was set up within {CONNECT_TIMEOUT_S:g}s "
                           f"(is it a Kafka listener? {_hint(Fault.CLOSED)})")
    what = {Fault.CREDENTIALS: "authentication failed", Fault.SASL: "SASL failed",
            Fault.SSL: "SSL handshake failed",
            Fault.CLOSED: "connection closed by the broker"}[kind]
    return BrokerError(f"Kafka at {bootstrap}: {what}: {describe(cause)} ({_hint(kind)})")


def _accepts_tcp(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout):
            return True
    except (OSError, ValueError):
        return False


def describe(exc: BaseException) -> str:
    """``Type: message`` of a client exception on one line, without the error code and the
    class names the clients repeat inside their messages."""
    chain = [exc]
    while chain[-1].__context__ is not None and len(chain) < 5:
        chain.append(chain[-1].__context__)
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"SSL certificate verify failed: {e.verify_message}"
    name = type(exc).__name__
    text = re.sub(r"\[Error -?\d+\]\s*", "", " ".join(str(exc).split()))
    # kafka-python and aiokafka repeat the class name, or name the connection object
    parts = [part for part in text.split(": ")
             if not re.fullmatch(r"[A-Z]\w+(Error|Exception|Failed)|<.*>", part)]
    return ": ".join([name, *parts]) if parts and parts != [""] else name


class _RetriedLookups(logging.Filter):
    """Drops aiokafka's coordinator-lookup lines for errors it retries by itself.

    On every fresh worker start the broker is still creating its offsets topic: the first
    lookup fails with a retriable error, logged as an ERROR, and the coordinator is marked
    dead, both followed by a successful retry. What aiokafka cannot retry it raises; a
    broker that stays away shows in the client's connection errors.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Marking the coordinator dead"):
            return False
        if msg.startswith("Group Coordinator Request failed"):
            args = record.args if isinstance(record.args, tuple) else ()
            return not any(getattr(a, "retriable", False) for a in args)
        return True


_RETRIED_LOOKUPS = _RetriedLookups()


def quiet_client_logs(level: str) -> None:
    """Keep the Kafka clients' routine chatter out of a command's output below ``debug``.

    kafka-python logs every failed connection attempt (an unreachable broker: 20 lines in
    5 s) and retries; a lasting failure is reported once, with its cause, by
    :func:`broker_error`. aiokafka's retried coordinator lookups: see _RetriedLookups. At
    ``debug`` every client logger speaks.
    """
    debug = level == "debug"
    for name in ("kafka.net", "kafka.cluster"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    logging.getLogger("kafka").setLevel(logging.DEBUG if debug else logging.WARNING)
    # a refused batch, warned once per batch: the Publisher reports each of its records
    # (by kind, with a count), so a flood of refusals does not print twice
    logging.getLogger("kafka.producer.producer_batch").setLevel(
        logging.DEBUG if debug else logging.ERROR)
    # group joins and subscription updates at INFO: the worker logs its assignments itself
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:  # OpenCV's own [ WARN ] lines (a camera that cannot be opened): read at
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # its import, which comes later
    # warns "sending username and password in the clear" on every SASL_PLAINTEXT connection
    logging.getLogger("aiokafka.conn").setLevel(logging.DEBUG if debug else logging.ERROR)
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    if debug:
        coordinator.removeFilter(_RETRIED_LOOKUPS)
    else:
        coordinator.addFilter(_RETRIED_LOOKUPS)
