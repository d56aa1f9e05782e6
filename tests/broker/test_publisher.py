"""The one producer path against the real broker: delivery, start checks, failures, caps."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from kafka.admin import ConfigResource, ConfigResourceType
from media_helpers import make_frames, read_topic

from streamproc import kafka
from streamproc.capture.publisher import Publisher, StatusLine, format_status
from streamproc.config import MODALITIES, Settings
from streamproc.errors import UserError
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

pytestmark = pytest.mark.broker

S = 1_000_000_000


def test_records_go_to_their_modality_topic_keyed_and_co_partitioned(topics: Settings) -> None:
    now = time.time_ns()
    img = make_frames(1)[0]
    records: list[wire.MediaRecord] = []
    for sid in ("cam-a", "cam-b", "cam-c"):
        records += [wire.VideoFrame.from_image(sid, now + i, i, img) for i in range(3)]
        records += [wire.AudioChunk.from_samples(sid, now + i * S // 10, i,
                                                 np.zeros(1600, np.int16), 16000)
                    for i in range(2)]
        records.append(wire.TranscriptSegment(sid, 0, f"hi {sid}", now, now + S))
    with Publisher(topics) as pub:
        for r in records:
            pub.publish(r)
    st = pub.stats
    assert (st.sent, st.acked, st.failed, st.in_flight_bytes) == (18, 18, 0, 0)
    assert [st.by_modality[m].acked for m in MODALITIES] == [9, 6, 3]
    partitions: dict[str, set[int]] = {}
    got = []
    for mod, n in (("video", 9), ("audio", 6), ("text", 3)):
        for kr in read_topic(topics, topics.topic(mod), n):
            rec = wire.decode(kr, expect_modality=mod)
            assert kr.key == rec.stream_id.encode()
            assert kr.timestamp_ms == rec.ts_ns // 1_000_000
            partitions.setdefault(rec.stream_id, set()).add(kr.partition)
            got.append(rec)
    # one worker owns a stream: its three modalities land on the same partition number
    assert all(len(p) == 1 for p in partitions.values())
    assert sorted(got, key=repr) == sorted(records, key=repr)


def test_start_refuses_missing_topics_with_what_to_do(settings: Settings) -> None:
    with pytest.raises(UserError, match=r"missing topic\(s\).*streamproc topics create"):
        Publisher(settings)


def test_start_refuses_topics_that_would_reject_large_frames(settings: Settings) -> None:
    create_topics(settings.replace(max_message_bytes=200_000))
    with pytest.raises(UserError, match=r"max\.message\.bytes=200000 is below"):
        Publisher(settings)


def test_config_matches_topics_and_does_not_compress_frames(settings: Settings) -> None:
    cfg = kafka.producer_config(settings.replace(max_message_bytes=300_000))
    assert cfg["acks"] == "all" and cfg["compression_type"] is None
    assert cfg["max_request_size"] == 300_000 and cfg["batch_size"] <= 300_000
    assert cfg["max_in_flight_requests_per_connection"] == 1  # retries keep order


def test_delivery_failures_are_counted_with_reasons_and_later_records_still_go(
        topics: Settings) -> None:
    # the broker refuses records older than an hour on this topic
    admin = kafka.admin(topics)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics.topic("text"),
                                            configs={"message.timestamp.before.max.ms":
                                                     "3600000"})])
    finally:
        admin.close()
    now = time.time_ns()
    pub = Publisher(topics)
    try:
        old = wire.TranscriptSegment("s", 0, "from 2001", 1_000_000_000 * S, 1_000_000_001 * S)
        pub.publish(old)
        assert pub.flush(30)
        huge = wire.VideoFrame("s", now, 0, b"\xff\xd8" + bytes(topics.max_message_bytes) +
                               b"\xff\xd9", "jpeg", 1, 1)
        assert pub.publish(huge) is None  # refused before sending, still counted
        fresh = wire.TranscriptSegment("s", 1, "now", now, now + S)
        assert pub.publish(fresh).get(timeout=30).offset >= 0
    finally:
        pub.close()
    st = pub.stats
    assert (st.by_modality["text"].failed, st.by_modality["text"].acked) == (1, 1)
    assert st.by_modality["video"].failed == 1 and st.failed == 2
    reasons = " | ".join(pub.error_reasons)
    assert "InvalidTimestampError" in reasons and "MessageSizeTooLargeError" in reasons
    texts = [wire.decode(r).text for r in read_topic(topics, topics.topic("text"), 1)]
    assert texts == ["now"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_flood_of_one_failure_is_one_kind_with_a_count(topics: Settings) -> None:
    pub = Publisher(topics)
    limit = pub.max_ahead_ms  # the topics' message.timestamp.after.max.ms
    if limit is None or limit > 10 * 365 * 86_400_000:
        pub.close()
        pytest.skip("this broker accepts any timestamp ahead")
    ahead = time.time_ns() + (limit + 3_600_000) * 1_000_000
    logged = _Records()
    logger = logging.getLogger("streamproc.capture.publisher")
    logger.addHandler(logged)
    try:
        for i in range(30):  # each refusal names its own timestamp and offset
            pub.publish(wire.TranscriptSegment("fut", i, "x", ahead + i * S, ahead + i * S + 1))
        pub.close()
    finally:
        logger.removeHandler(logged)
    assert pub.stats.failed == 30
    [(kind, n)] = pub.error_reasons.items()
    assert n == 30 and "Timestamp N of message with offset N is out of range" in kind
    # the first in full, then at 10: not one line per record
    assert [m[m.index("("):m.index(")") + 1] for m in logged.messages] == [
        "(1 so far of this kind)", "(10 so far of this kind)"]


def test_in_flight_cap_bounds_buffered_bytes(topics: Settings) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)  # ~100+ KB as JPEG
    frames = [wire.VideoFrame.from_image("cap", time.time_ns() + i, i, noisy, quality=95)
              for i in range(40)]
    size = len(frames[0].data)
    cap = 3 * size
    peaks = {}
    for name, limit in (("capped", cap), ("uncapped", 1 << 40)):
        with Publisher(topics, max_in_flight_bytes=limit) as pub:
            for f in frames:
                pub.publish(f)
        assert pub.stats.acked == 40
        peaks[name] = pub.stats.peak_in_flight_bytes
    assert 2 * size < peaks["capped"] <= cap
    # without the cap, send() never waits: far more piles up (so the check above can fail)
    assert peaks["uncapped"] > 2 * cap


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_only_on_a_terminal(topics: Settings) -> None:
    assert format_status({"video": 14.96, "audio": 10}, 3, 1, 2 * 1024 * 1024) == (
        "video  15.0 frames/s | audio  10.0 chunks/s | text  0.0 seg/s | drops 3 | "
        "errors 1 | in flight 2.0 MiB")
    with Publisher(topics) as pub:
        tty, pipe = _Tty(), io.StringIO()
        lines = [StatusLine(pub, lambda: 7, stream=s, interval=0.05).start() for s in (tty, pipe)]
        pub.publish(wire.TranscriptSegment("s", 0, "x", time.time_ns(), time.time_ns()))
        deadline = time.monotonic() + 10
        while "drops 7" not in tty.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a few more intervals: the pipe must still be silent
        for line in lines:
            line.stop()
    assert "frames/s" in tty.getvalue() and "drops 7" in tty.getvalue()
    assert pipe.getvalue() == ""
