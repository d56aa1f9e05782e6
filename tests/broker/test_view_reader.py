"""The web view's Kafka reader on the real broker, without a browser: where it starts on
each topic, what it takes from each, and that it refuses topics that are not there."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from streamproc import kafka
from streamproc.config import Settings
from streamproc.dev.localkafka import free_port
from streamproc.errors import UserError
from streamproc.testing import MS, S
from streamproc.view.server import ViewServer
from streamproc.wire import codec as wire

pytestmark = pytest.mark.broker


def _send(settings: Settings, recs: list[tuple[str, wire.KafkaRecord]]) -> None:
    producer = kafka.producer(settings)
    try:
        for topic, r in recs:
            producer.send(settings.topic(topic), key=r.key, value=r.value,
                          headers=list(r.headers), timestamp_ms=r.timestamp_ms)
        producer.flush(30)
    finally:
        producer.close()


def _prediction(sid: str, start_ns: int, label: str) -> wire.KafkaRecord:
    p = wire.Prediction(sid, start_ns, start_ns + S, label, {label: 0.9},
                        {"missing": ["audio"]}, {"name": "m", "version": "1"}, start_ns + 2 * S,
                        {"total": 1000.0}, rev=1, final=True)
    return wire.encode_prediction(p)


def test_the_reader_starts_a_history_back_and_takes_each_topic(topics: Settings) -> None:
    settings = topics.replace(view_port=free_port(), view_history_s=120)
    now = time.time_ns()
    img = np.zeros((48, 64, 3), np.uint8)
    old_frame = wire.VideoFrame.from_image("cam", now - 60 * S, 0, img)
    new_frame = wire.VideoFrame.from_image("cam", now - S, 1, img + 200)
    seg = wire.TranscriptSegment("cam", 0, "seven eight", now - 2 * S, now - S)
    chunk = wire.AudioChunk.from_samples("cam", now - S, 0, np.zeros(1600), 16000)
    bad = wire.make_dead_letter(dataclasses.replace(
        wire.encode(new_frame), topic=settings.topic("video"), partition=0, offset=7),
        "value is not a decodable JPEG", wire.DeadLetterKind.DECODE)
    _send(settings, [
        ("predictions", _prediction("cam", now - 600 * S, "old")),  # before the history
        ("predictions", _prediction("cam", now - 10 * S, "recent")),
        ("video", wire.encode(old_frame)), ("video", wire.encode(new_frame)),
        ("text", wire.encode(seg)), ("audio", wire.encode(chunk)), ("deadletter", bad),
        ("text", wire.KafkaRecord(b"cam", b"not json", (("sp-v", b"1"),),
                                  (now - S) // MS)),
    ])

    read_by: list[int] = []  # when the view had read everything sent

    async def run() -> ViewServer:
        view = ViewServer(settings, health_urls=[])
        await view.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = view.state
                if (st.dead.total and "cam" in view.thumbs and st.stats["audio"]
                        and st.stats["unreadable"] and "cam" in st.streams
                        and st.streams["cam"].windows):
                    read_by.append(time.time_ns())
                    break
                await asyncio.sleep(0.05)
        finally:
            await view.stop()
        return view

    view = asyncio.run(run())
    assert read_by, f"the view did not read every topic in 30 s: {view.state.stats}"
    cam = view.state.streams["cam"]
    assert [e.label for e in cam.windows.values()] == ["recent"]
    assert cam.words() == "seven eight"
    assert view.state.stats["video"] == 1  # the frame of a minute ago was not read
    assert cam.frame is not None and cam.frame.ts_ns == new_frame.ts_ns
    assert view.thumbs["cam"].width == 64
    assert cam.badges(read_by[0]) == {"video": "present", "audio": "masked",
                                          "text": "present"}
    assert view.state.dead.by_kind == {"decode": 1}
    assert list(cam.marks) == [(new_frame.ts_ns // MS, "decode")]
    assert view.state.stats["unreadable"] == 1  # the broken transcript, counted and passed


def test_the_view_refuses_topics_that_do_not_exist(settings: Settings) -> None:
    async def run() -> None:
        await ViewServer(settings.replace(view_port=free_port()), health_urls=[]).start()

    with pytest.raises(UserError, match=r"topic\(s\) .*\.video.* do not exist .*topics create"):
        asyncio.run(run())
