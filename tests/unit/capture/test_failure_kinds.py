"""Publisher parts that need no broker (tests/broker/test_publisher.py has the rest)."""

from __future__ import annotations

import logging

from kafka.errors import InvalidRecordError, MessageSizeTooLargeError

from streamproc.capture.publisher import _power_of_ten, failure_kind
from streamproc.errors import quiet_client_logs


def test_failures_that_differ_only_in_their_numbers_are_one_kind() -> None:
    def refused(ts: int, offset: int) -> InvalidRecordError:
        return InvalidRecordError(f"Timestamp {ts} of message "
                                  f"with offset {offset} is out of range. The timestamp should "
                                  "be within [-9223370240805325139, 1796053050668]")

    kinds = {failure_kind(refused(1796056650634 + i, i)) for i in range(280)}
    assert kinds == {"InvalidRecordError: [Error 87] InvalidRecordError: Timestamp N of message "
                     "with offset N is out of range. The timestamp should be within [-N, N]"}
    # another class is another kind, and topic names keep their digits
    assert failure_kind(MessageSizeTooLargeError("t2024.video: 9000000 bytes")) == \
        "MessageSizeTooLargeError: [Error 10] MessageSizeTooLargeError: t2024.video: N bytes"


def test_a_flood_is_logged_at_powers_of_ten() -> None:
    assert [n for n in range(1, 2001) if _power_of_ten(n)] == [1, 10, 100, 1000]


def test_kafka_pythons_warning_per_refused_batch_is_left_to_the_publisher() -> None:
    batch = logging.getLogger("kafka.producer.producer_batch")
    try:
        quiet_client_logs("info")
        assert not batch.isEnabledFor(logging.WARNING)
        assert logging.getLogger("kafka.producer.sender").isEnabledFor(logging.WARNING)
        quiet_client_logs("debug")
        assert batch.isEnabledFor(logging.WARNING)
    finally:
        batch.setLevel(logging.NOTSET)
        logging.getLogger("kafka").setLevel(logging.NOTSET)


def test_close_with_records_the_broker_never_took_counts_them_and_does_not_raise(
        monkeypatch, caplog) -> None:
    """kafka-python's close() flushes again and raises when records are still unsent (a
    broker gone): the Publisher still closes, counts them failed and stops the client's
    I/O thread, instead of a traceback in place of its summary."""
    import numpy as np
    from kafka.errors import KafkaTimeoutError

    from streamproc import kafka as kafka_mod
    from streamproc.capture.publisher import Publisher
    from streamproc.config import Settings
    from streamproc.wire import codec as wire

    class Never:
        is_done = False
        exception = None

        def get(self, timeout: float | None = None) -> None:
            raise KafkaTimeoutError("not yet")

    class Sender:
        stopped = False

        def force_close(self) -> None:
            self.stopped = True

    class GoneBroker:
        """What kafka-python's producer does with no broker left to take records."""

        def __init__(self) -> None:
            self._sender = Sender()

        def send(self, *a: object, **k: object) -> Never:
            return Never()

        def flush(self, timeout: float | None = None) -> None:
            raise KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")

        close = flush

    producer = GoneBroker()
    monkeypatch.setattr(kafka_mod, "producer", lambda *a, **k: producer)
    monkeypatch.setattr(GoneBroker, "partitions_for", lambda self, t: {0}, raising=False)
    pub = Publisher(Settings(), check_topics=False)
    pub.publish(wire.AudioChunk.from_samples("mic", 1_700_000_000 * 10**9, 0,
                                             np.zeros(160), 16000))
    pub.close(timeout=0.01)  # would raise KafkaTimeoutError
    assert pub.stats.failed == 1 and producer._sender.stopped
    assert "did not close cleanly" in caplog.text


def test_a_record_stuck_on_one_partition_does_not_block_the_others(monkeypatch) -> None:
    """The oldest record waits for a partition without a leader; the ones after it are
    acknowledged. They leave the in-flight count at once, so publishing goes on instead
    of blocking every stream until the stuck one times out."""
    import threading

    import numpy as np
    from kafka.errors import KafkaTimeoutError

    from streamproc import kafka as kafka_mod
    from streamproc.capture.publisher import Publisher
    from streamproc.config import Settings
    from streamproc.wire import codec as wire

    class Future:
        def __init__(self, done: bool) -> None:
            self.is_done, self.exception = done, None

        def get(self, timeout: float | None = None) -> None:
            if not self.is_done:
                raise KafkaTimeoutError("no leader")

    class Producer:
        sent = 0

        def send(self, *a: object, **k: object) -> Future:
            self.sent += 1
            return Future(done=self.sent > 1)  # the first one is stuck

        def partitions_for(self, topic: str) -> set[int]:
            return {0}

    monkeypatch.setattr(kafka_mod, "producer", lambda *a, **k: Producer())
    chunk = wire.AudioChunk.from_samples("mic", 1_700_000_000 * 10**9, 0, np.zeros(1600),
                                         16000)
    pub = Publisher(Settings(), check_topics=False, max_in_flight_bytes=4 * 4096)
    done = threading.Event()

    def publish_many() -> None:
        for _ in range(200):
            pub.publish(chunk)
        done.set()

    threading.Thread(target=publish_many, daemon=True).start()
    assert done.wait(10), "publish() blocked behind the stuck record"
    s = pub.stats
    assert s.sent == 200 and s.acked >= 190  # (the stats settle from the queue's head)
