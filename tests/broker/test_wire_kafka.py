"""Wire records through a real broker: kafka-python in, aiokafka (faust's client) out."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from kafka import KafkaProducer
from kafka.admin import NewTopic

from streamproc import kafka
from streamproc.config import Settings
from streamproc.topics import TopicError, check_topics, create_topics, topic_configs
from streamproc.wire import codec as wire

pytestmark = pytest.mark.broker


def _produce(settings: Settings, topic: str, records: list[wire.KafkaRecord]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                             max_request_size=settings.max_message_bytes)
    try:
        for r in records:
            producer.send(topic, key=r.key, value=r.value, headers=list(r.headers),
                          timestamp_ms=r.timestamp_ms)
        producer.flush(30)
    finally:
        producer.close()


def _consume(settings: Settings, topic: str, n: int) -> list[wire.KafkaRecord]:
    async def run() -> list[wire.KafkaRecord]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest",
            enable_auto_commit=False, max_partition_fetch_bytes=settings.max_message_bytes,
            fetch_max_bytes=settings.max_message_bytes * 2)
        await consumer.start()
        out: list[wire.KafkaRecord] = []
        try:
            async with asyncio.timeout(30):
                while len(out) < n:
                    for msgs in (await consumer.getmany(timeout_ms=1000)).values():
                        out.extend(wire.KafkaRecord.from_client(m) for m in msgs)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


def _sample_records() -> list:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return [
        wire.VideoFrame.from_image("cam-1", 1_763_000_000_000_000_000, 0, img, fmt="jpeg"),
        wire.VideoFrame.from_image("cam-1", 1_763_000_000_066_666_666, 1, img, fmt="png"),
        wire.AudioChunk.from_samples("cam-1", 1_763_000_000_000_000_001, 0,
                                     rng.uniform(-1, 1, 1600), 16000, "s16le"),
        wire.AudioChunk.from_samples("cam-2", 1_763_000_000_000_000_000, 0,
                                     rng.uniform(-1, 1, (441, 2)), 44100, "f32le"),
        wire.TranscriptSegment("cam-1", 0, "seven, then — «three»", 1_763_000_000_100_000_000,
                               1_763_000_001_200_000_000, False, 0.62, "en"),
    ]


def test_every_record_type_is_byte_exact_through_kafka(topics: Settings) -> None:
    originals = _sample_records()
    sent = {}
    for rec in originals:
        kr = wire.encode(rec)
        _produce(topics, topics.topic(rec.modality), [kr])
        sent[(rec.modality, rec.stream_id, rec.seq, rec.ts_ns)] = (rec, kr)
    pred = wire.Prediction("cam-1", 10, 20, "7", {"7": 0.9, "3": 0.1},
                           {"video": {"frames": 8}, "missing": ["text"]},
                           {"name": "lmf", "version": "1"}, 30, {"inference": 1.5})
    _produce(topics, topics.topic("predictions"), [wire.encode_prediction(pred)])

    got = []
    for m in ("video", "audio", "text"):
        got += _consume(topics, topics.topic(m), sum(r.modality == m for r in originals))
    assert len(got) == len(originals)
    for kr in got:
        rec = wire.decode(kr)
        orig, orig_kr = sent[(rec.modality, rec.stream_id, rec.seq, rec.ts_ns)]
        assert (kr.key, kr.value, kr.headers, kr.timestamp_ms) == (
            orig_kr.key, orig_kr.value, orig_kr.headers, orig_kr.timestamp_ms)
        assert rec == orig
        assert rec.source == wire.Source(kr.topic, kr.partition, kr.offset)

    (pkr,) = _consume(topics, topics.topic("predictions"), 1)
    assert wire.decode_prediction(pkr) == pred
    assert pkr.key == b"cam-1"

    dl = wire.make_dead_letter(got[0], "test reason: bad thing", "decode")
    _produce(topics, topics.topic("deadletter"), [dl])
    (dkr,) = _consume(topics, topics.topic("deadletter"), 1)
    back = wire.decode_dead_letter(dkr)
    assert back.reason == "test reason: bad thing"
    assert back.source == wire.Source(got[0].topic, got[0].partition, got[0].offset)
    assert (back.original.key, back.original.value, back.original.headers) == (
        got[0].key, got[0].value, got[0].headers)


def test_same_stream_lands_on_the_same_partition_in_every_input_topic(topics: Settings) -> None:
    """Co-partitioning: kafka-python's murmur2 puts a key on the same partition everywhere."""
    recs = [r for r in _sample_records() if r.stream_id == "cam-1"]
    for r in recs:
        _produce(topics, topics.topic(r.modality), [wire.encode(r)])
    parts = set()
    for m in ("video", "audio", "text"):
        parts |= {kr.partition for kr in _consume(topics, topics.topic(m),
                                                  sum(r.modality == m for r in recs))}
    assert len(parts) == 1


def test_two_megabyte_frame_passes_with_shipped_topic_settings(topics: Settings) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    frame = wire.VideoFrame.from_image("cam-big", 1_763_000_000_000_000_000, 0, noise,
                                       fmt="png")
    assert len(frame.data) > 2 * 1024 * 1024
    kr = wire.encode(frame)
    _produce(topics, topics.topic("video"), [kr])
    (got,) = _consume(topics, topics.topic("video"), 1)
    assert got.value == kr.value
    assert np.array_equal(wire.decode(got).image(), noise)


def test_frame_over_the_topic_limit_is_refused_by_the_broker(settings: Settings) -> None:
    """The reason max_message_bytes is one setting: a smaller topic limit rejects frames."""
    small = settings.replace(max_message_bytes=512 * 1024)
    create_topics(small)
    big = np.random.default_rng(2).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    kr = wire.encode(wire.VideoFrame.from_image("cam", 1, 0, big, fmt="png"))
    producer = KafkaProducer(bootstrap_servers=small.bootstrap_servers, acks="all",
                             max_request_size=4 * 1024 * 1024)
    try:
        fut = producer.send(small.topic("video"), key=kr.key, value=kr.value,
                            headers=list(kr.headers))
        with pytest.raises(Exception, match=r"MessageSizeTooLarge|RecordTooLarge|too large"):
            fut.get(30)
    finally:
        producer.close()


def _one_topic_with(settings: Settings, modality: str, partitions: int) -> None:
    """``modality``'s topic with ``partitions``, then the rest as configured (4)."""
    admin = kafka.admin(settings)
    try:
        admin.create_topics([NewTopic(settings.topic(modality), partitions, 1,
                                      topic_configs=topic_configs(settings))])
    finally:
        admin.close()
    create_topics(settings)


def test_topics_check_detects_mismatched_partition_counts(settings: Settings) -> None:
    _one_topic_with(settings, "video", 3)
    with pytest.raises(TopicError) as err:
        check_topics(settings)
    text = str(err.value)
    assert "not co-partitioned" in text
    assert f"{settings.topic('video')}=3" in text and f"{settings.topic('audio')}=4" in text

    cli = subprocess.run(
        [sys.executable, "-m", "streamproc.cli", "topics", "check",
         "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix",
         settings.topic_prefix],
        capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1
    assert "not co-partitioned" in cli.stderr


def _topics_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPROC_")}
    return subprocess.run(
        [sys.executable, "-m", "streamproc.cli", "topics", *args,
         "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix",
         settings.topic_prefix], capture_output=True, text=True, timeout=60, env=env)


def test_topics_create_with_another_partition_count_than_the_existing_topics_says_so(
        settings: Settings) -> None:
    create_topics(settings)  # 4 partitions each
    for action in ("create", "check"):
        cli = _topics_cli(settings, action, "--partitions", "8")
        assert cli.returncode == 1, (action, cli.stdout, cli.stderr)
        assert "ok:" not in cli.stdout
        assert (f"{settings.topic('video')}, {settings.topic('audio')}, "
                f"{settings.topic('text')}, {settings.topic('predictions')} and "
                f"{settings.topic('deadletter')} have 4 partitions, not the 8 asked for "
                "(--partitions)") in cli.stderr, cli.stderr
    # the count they have, asked for or not asked for at all: fine
    for flags in (("--partitions", "4"), ()):
        cli = _topics_cli(settings, "check", *flags)
        assert cli.returncode == 0, cli.stderr
        assert "ok: topics exist and are co-partitioned" in cli.stdout


def test_topics_check_names_the_input_that_is_not_co_partitioned(settings: Settings) -> None:
    _one_topic_with(settings, "audio", 6)
    cli = _topics_cli(settings, "check")
    assert cli.returncode == 1
    assert f"{settings.topic('audio')} differs" in cli.stderr
    assert "the inputs have 6" not in cli.stderr  # the outputs agree with the other inputs
    assert "predictions has" not in cli.stderr


def test_topics_create_then_check_is_clean(settings: Settings) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "streamproc.cli", "topics", "create",
         "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix",
         settings.topic_prefix, "--partitions", "3"],
        capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "ok: topics exist and are co-partitioned" in cli.stdout
    states = check_topics(settings.replace(partitions=3))
    assert {s.partitions for s in states} == {3}
    assert {s.max_message_bytes for s in states} == {settings.max_message_bytes}


def test_missing_topics_and_unreachable_broker_are_readable(settings: Settings) -> None:
    with pytest.raises(TopicError, match="missing topic"):
        check_topics(settings)
    cli = subprocess.run(
        [sys.executable, "-m", "streamproc.cli", "topics", "check",
         "--bootstrap-servers", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2
    assert "no Kafka broker reachable at 127.0.0.1:1" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_hostile_frame_sizes_are_refused_at_the_door_after_kafka(topics: Settings) -> None:
    """Frames whose headers claim 16384x16384 pixels (a fuzzer's PNG of 784 KB decoded to
    3.7 GB on the event loop): read back from the broker, the door refuses them from
    their headers (kind oversize) with the settings' cap, before reading the image; a
    camera frame passes."""
    import zlib

    side = 16384

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(
            4, "big")

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", side.to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0")
           + chunk(b"IDAT", zlib.compress(bytes(side * 3 + 1) * 64)) + chunk(b"IEND", b""))
    camera = np.random.default_rng(3).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    records = [wire.VideoFrame("big", 1_763_000_000_000_000_000, 0, png, "png", side, side),
               wire.VideoFrame("big", 1_763_000_000_000_000_000, 1, b"\xff\xd8" + bytes(1000),
                               "jpeg", side, side),
               wire.VideoFrame.from_image("big", 1_763_000_000_000_000_000, 2, camera)]
    _produce(topics, topics.topic("video"), [wire.encode(r) for r in records])
    got = sorted(_consume(topics, topics.topic("video"), 3), key=lambda r: r.offset)
    cap = topics.max_frame_pixels
    for kr in got[:2]:
        with pytest.raises(wire.WireError, match=r"268\.4 Mpx, over the limit of 8\.8 Mpx") \
                as e:
            wire.decode(kr, expect_modality="video", max_pixels=cap)
        assert e.value.kind == "oversize"
    assert wire.decode(got[2], expect_modality="video", max_pixels=cap).width == 1280
