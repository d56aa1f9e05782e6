"""The one producer path: every streamproc source publishes through :class:`Publisher`.

One kafka-python producer per process (:func:`streamproc.kafka.producer`, tuned for media
records), keyed by stream id so the three input topics stay co-partitioned
(docs/design.md §1, §2). Records are encoded only by :func:`streamproc.wire.codec.encode`.
Delivery failures are counted and logged with their reason, never silently dropped;
``publish`` never raises for a failed record so one bad frame cannot stop a camera.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from kafka.errors import KafkaError

from streamproc import kafka
from streamproc.config import MODALITIES, Modality, Settings
from streamproc.errors import UserError
from streamproc.kafka import DEFAULT_BATCH_BYTES, DEFAULT_LINGER_MS, MiB
from streamproc.topics import check_topics as check_topic_state
from streamproc.wire import codec as wire

log = logging.getLogger(__name__)

# kafka-python 3 has no buffer_memory cap: without our own bound a slow broker would grow
# the producer's buffer without limit instead of making the sources drop frames.
DEFAULT_MAX_IN_FLIGHT_BYTES = 64 * MiB
HEADER_ALLOWANCE = 128  # bytes counted per record for key framing and wire headers

# numbers in a failure's text (timestamps, offsets, limits) that vary record by record;
# "[Error 87]" names the kind and stays
_VARYING_NUMBER = re.compile(r"(?<!Error )\b\d+\b")


def failure_kind(exc: BaseException) -> str:
    """What a delivery failure is, not which record it hit: the error class and its
    message with every number but the error code masked as N, so a flood of failures
    that differ only in timestamps or offsets counts as one kind."""
    return f"{type(exc).__name__}: {_VARYING_NUMBER.sub('N', str(exc))}"


class Outbox(Protocol):
    """Where sources put their typed records to be sent: a Publisher, or a ListOutbox."""

    def publish(self, record: wire.MediaRecord) -> object: ...


class ListOutbox:
    """Collects records in memory: the offline outbox for tests and tools without Kafka."""

    def __init__(self) -> None:
        self.records: list[wire.MediaRecord] = []
        self._lock = threading.Lock()

    def publish(self, record: wire.MediaRecord) -> None:
        with self._lock:
            self.records.append(record)


@dataclass
class ModalityCounts:
    sent: int = 0  # handed to the producer
    acked: int = 0  # acknowledged by the broker (acks=all)
    failed: int = 0  # delivery failed: counted and logged, never retried by us
    bytes: int = 0  # payload bytes acknowledged


@dataclass
class PublisherStats:
    """A consistent copy of the publisher's counters."""

    by_modality: dict[str, ModalityCounts] = field(
        default_factory=lambda: {m: ModalityCounts() for m in MODALITIES})
    in_flight_bytes: int = 0
    peak_in_flight_bytes: int = 0
    blocked_s: float = 0.0  # time publish() waited on the in-flight cap (backpressure)
    last_error: str = ""

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.by_modality.values())

    @property
    def acked(self) -> int:
        return sum(c.acked for c in self.by_modality.values())

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.by_modality.values())


class Publisher:
    """Publishes typed records to ``settings.topic(modality)``, keyed by stream id.

    At start it checks that the broker answers and the input topics exist, are
    co-partitioned and accept records of ``max_message_bytes``; otherwise it raises
    :class:`UserError` with what to do. ``publish`` blocks only while more than
    ``max_in_flight_bytes`` await acknowledgement, which is how a slow broker reaches
    the sources' drop-oldest queues instead of growing memory. Thread-safe.
    """

    def __init__(self, settings: Settings, *, check_topics: bool = True,
                 linger_ms: int = DEFAULT_LINGER_MS, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES) -> None:
        self.settings = settings
        self.max_in_flight_bytes = max_in_flight_bytes
        self._topics = {m: settings.topic(m) for m in MODALITIES}
        self._stats = PublisherStats()
        self._lock = threading.Lock()
        self._closed = False
        self._error_counts: dict[str, int] = {}  # by failure_kind
        # the topics' message.timestamp.after.max.ms, the least of them (None: not known)
        self.max_ahead_ms: int | None = None
        # (future, modality, size, payload bytes) of every record not settled yet, in send order
        self._pending: collections.deque[tuple[Any, Modality, int, int]] = collections.deque()
        if check_topics:
            limits = [s.timestamp_after_max_ms
                      for s in check_topic_state(settings, inputs_only=True)
                      if s.timestamp_after_max_ms is not None]
            self.max_ahead_ms = min(limits, default=None)
        self._producer = kafka.producer(settings, linger_ms=linger_ms, batch_bytes=batch_bytes)
        try:
            # fetch metadata now so the first frame never waits for it
            for topic in self._topics.values():
                self._producer.partitions_for(topic)
        except KafkaError as e:
            self._producer.close(timeout=0)
            raise UserError(f"no metadata for the input topics on {settings.bootstrap_servers}: "
                            f"{e} (do they exist? `streamproc topics create`)") from None

    # --- publishing ---------------------------------------------------------------------

    def publish(self, record: wire.MediaRecord) -> Any:
        """Send one record; returns kafka-python's future, or None when it failed at once.

        Never raises for a record Kafka refuses: the failure is counted and logged.
        """
        if self._closed:
            raise RuntimeError("publish() on a closed Publisher")
        key, value, headers, timestamp_ms = wire.encode_parts(record)
        mod = record.modality
        # the cap is a memory bound, not an invoice: headers are small and roughly constant
        size = len(value) + len(key) + HEADER_ALLOWANCE
        stats = self._stats
        with self._lock:
            failures = self._drain()
            if stats.in_flight_bytes + size > self.max_in_flight_bytes:
                failures += self._wait_for_room(size)
            stats.in_flight_bytes += size
            if stats.in_flight_bytes > stats.peak_in_flight_bytes:
                stats.peak_in_flight_bytes = stats.in_flight_bytes
            stats.by_modality[mod].sent += 1
        self._log_failures(failures)
        try:
            future = self._producer.send(self._topics[mod], value=value, key=key,
                                         headers=headers, timestamp_ms=timestamp_ms)
        except (KafkaError, ValueError, TypeError) as e:
            with self._lock:
                stats.in_flight_bytes -= size
                failures = [self._count_failure(mod, e)]
            self._log_failures(failures)
            return None
        # No callback per record: kafka-python would run it in its sender thread for every
        # acknowledgement, and at 20,000 small frames a second that costs more than all the
        # rest of publish(). Futures wait here in send order; whoever next publishes, reads
        # the stats, flushes or waits for room settles those that are done (deque appends
        # are thread-safe; a record is in flight until it is settled).
        self._pending.append((future, mod, size, len(value)))
        return future

    def _wait_for_room(self, size: int) -> list[tuple[Modality, str, int]]:
        """Block (the lock held on entry and exit) until ``size`` more bytes fit the cap."""
        stats = self._stats
        failures: list[tuple[Modality, str, int]] = []
        t0 = time.monotonic()
        # size > cap alone must still go through once nothing else is in flight
        while (stats.in_flight_bytes > 0 and not self._closed
               and stats.in_flight_bytes + size > self.max_in_flight_bytes):
            oldest = self._pending[0][0] if self._pending else None
            self._lock.release()
            try:
                if oldest is None:  # counted by another thread, not queued yet
                    time.sleep(0.001)
                else:
                    with contextlib.suppress(Exception):  # its failure is counted in _drain
                        oldest.get(timeout=0.1)
            finally:
                self._lock.acquire()
            # everywhere in the queue, not only at its head: a record stuck on one
            # partition (no leader for a while) must not keep the acknowledged records of
            # every other stream counted in flight, and every camera blocked
            failures += self._drain(everywhere=True)
        stats.blocked_s += time.monotonic() - t0
        return failures

    def _drain(self, everywhere: bool = False) -> list[tuple[Modality, str, int]]:
        """Settle the settled futures at the head of the queue, or ``everywhere`` in it
        (caller holds the lock); the failures, for :meth:`_log_failures` once the lock is
        released."""
        pending, stats = self._pending, self._stats
        failures: list[tuple[Modality, str, int]] = []
        done: list[tuple[Any, Modality, int, int]] = []
        if everywhere:
            # one turn of the queue; publish() appends without the lock, behind the items
            # put back, so exactly the items there now are looked at
            for _ in range(len(pending)):
                item = pending.popleft()
                if item[0].is_done:
                    done.append(item)
                else:
                    pending.append(item)
        else:
            while pending and pending[0][0].is_done:
                done.append(pending.popleft())
        for future, mod, size, payload in done:
            stats.in_flight_bytes -= size
            if future.exception is None:
                counts = stats.by_modality[mod]
                counts.acked += 1
                counts.bytes += payload
            else:
                failures.append(self._count_failure(mod, future.exception))
        return failures

    def _count_failure(self, mod: Modality, exc: BaseException) -> tuple[Modality, str, int]:
        self._stats.by_modality[mod].failed += 1
        reason = f"{type(exc).__name__}: {exc}"
        self._stats.last_error = reason
        kind = failure_kind(exc)
        seen = self._error_counts.get(kind, 0) + 1
        self._error_counts[kind] = seen
        return mod, reason, seen

    def _log_failures(self, failures: list[tuple[Modality, str, int]]) -> None:
        for mod, reason, seen in failures:
            # every kind logged once in full; a flood of one kind only at 10, 100, 1000, ...
            if seen == 1 or _power_of_ten(seen):
                log.error("%s record to %s not delivered (%d so far of this kind): %s",
                          mod, self._topics[mod], seen, reason)

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters (safe to read from any thread)."""
        with self._lock:
            failures = self._drain()
            s = self._stats
            snapshot = PublisherStats(
                {m: ModalityCounts(c.sent, c.acked, c.failed, c.bytes)
                 for m, c in s.by_modality.items()},
                s.in_flight_bytes, s.peak_in_flight_bytes, s.blocked_s, s.last_error)
        self._log_failures(failures)
        return snapshot

    @property
    def error_reasons(self) -> dict[str, int]:
        """Every kind of delivery failure (:func:`failure_kind`) and how often it happened."""
        self._settle()
        with self._lock:
            return dict(self._error_counts)

    def _settle(self) -> None:
        with self._lock:
            failures = self._drain()
        self._log_failures(failures)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every record sent so far is acknowledged or failed; False on timeout."""
        try:
            self._producer.flush(timeout)
        except KafkaError as e:  # KafkaTimeoutError
            log.error("flush did not finish in %ss: %s", timeout, e)
            return False
        finally:
            self._settle()
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Flush, then close; records still unacknowledged after ``timeout`` count as failed."""
        if self._closed:
            return
        self.flush(timeout)
        with self._lock:
            self._closed = True
        try:
            self._producer.close(timeout=timeout)
        except KafkaError as e:
            # kafka-python's close flushes again, unguarded: with records still unsent (a
            # broker gone) it raises; what was not sent is counted below all the same
            log.error("the producer did not close cleanly in %ss: %s", timeout, e)
            sender = getattr(self._producer, "_sender", None)  # kafka-python's I/O thread
            if sender is not None:
                sender.force_close()
        with self._lock:
            failures = self._drain()
            while self._pending:  # never settled, not even by close(): lost with the producer
                _, mod, size, _ = self._pending.popleft()
                self._stats.in_flight_bytes -= size
                failures.append(self._count_failure(
                    mod, KafkaError(f"not acknowledged when the producer closed after {timeout}s")))
        self._log_failures(failures)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


# --- status line -----------------------------------------------------------------------


def format_status(rates: dict[Modality, float], drops: int, errors: int,
                  in_flight_bytes: int = 0) -> str:
    """One status line: per-modality rates, drops and delivery errors."""
    return (f"video {rates.get('video', 0.0):5.1f} frames/s | "
            f"audio {rates.get('audio', 0.0):5.1f} chunks/s | "
            f"text {rates.get('text', 0.0):4.1f} seg/s | "
            f"drops {drops} | errors {errors} | in flight {in_flight_bytes / MiB:.1f} MiB")


class StatusLine:
    """Rewrites one status line on a terminal every ``interval`` seconds; silent otherwise.

    ``drops`` returns the sources' drop count (queue drops, overflows) at call time.
    """

    def __init__(self, publisher: Publisher, drops: Callable[[], int] = lambda: 0,
                 stream: IO[str] | None = None, interval: float = 1.0) -> None:
        self.publisher = publisher
        self.drops = drops
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StatusLine:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="status-line", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        prev = self.publisher.stats
        t_prev = time.monotonic()
        while not self._stop.wait(self.interval):
            now_stats, t = self.publisher.stats, time.monotonic()
            dt = max(t - t_prev, 1e-9)
            rates = {m: (now_stats.by_modality[m].acked - prev.by_modality[m].acked) / dt
                     for m in MODALITIES}
            line = format_status(rates, self.drops(), now_stats.failed,
                                 now_stats.in_flight_bytes)
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            prev, t_prev = now_stats, t

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.stream.write("\r\x1b[K")
            self.stream.flush()


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set ``stop`` so sources finish and the producer flushes cleanly.

    A second signal raises KeyboardInterrupt for a user who does not want to wait.
    Only usable from the main thread (Python delivers signals there).
    """
    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("%s: stopping, flushing what was captured", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class PublishSession:
    """What every ``streamproc produce`` command does around its source.

    Opens the Publisher (checked start), turns SIGINT/SIGTERM into ``stop`` so the
    source ends and everything captured is flushed, shows the status line on a terminal,
    and on exit flushes and prints what was sent and what failed.
    """

    def __init__(self, settings: Settings, out: IO[str] | None = None) -> None:
        self.settings = settings
        self.out = out if out is not None else sys.stdout
        self.stop = threading.Event()
        self.publisher = Publisher(settings)
        self._signals = stop_on_signals(self.stop)
        self._status: StatusLine | None = None

    def show_status(self, drops: Callable[[], int] = lambda: 0) -> None:
        self._status = StatusLine(self.publisher, drops).start()

    def __enter__(self) -> PublishSession:
        self._signals.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if self._status is not None:
                self._status.stop()
            # a second Ctrl-C means "do not wait": give the broker a second, not a minute
            self.publisher.close(timeout=1.0 if exc_type is KeyboardInterrupt else 60.0)
        finally:
            self._signals.__exit__(None, None, None)

    def report(self) -> int:
        """Print delivery totals; exit code 1 when any record was not delivered."""
        s = self.publisher.stats
        parts = ", ".join(f"{m} {c.acked}" for m, c in s.by_modality.items())
        print(f"delivered {s.acked} of {s.sent} records ({parts})", file=self.out)
        if s.failed:
            print(f"{s.failed} record(s) NOT delivered:", file=sys.stderr)
            for reason, n in self.publisher.error_reasons.items():
                print(f"  {n} x {reason}", file=sys.stderr)
            return 1
        return 0
