"""Real media made inside the tests (OpenCV video, WAV, speech, SRT) and a topic reader.

Shared by the source and producer tests; nothing here is committed media.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import wave
from pathlib import Path

import cv2
import numpy as np
from kafka import KafkaConsumer, TopicPartition

from streamproc import wire
from streamproc.config import Settings
from streamproc.sources import Clock

VIDEO_FPS = 10.0
T0 = 1_700_000_000 * 1_000_000_000


class ManualClock(Clock):
    """A clock the test moves by hand."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def now_ns(self) -> int:
        return self.now

VIDEO_SIZE = (160, 120)  # w, h


def make_frames(n: int, size: tuple[int, int] = VIDEO_SIZE) -> list[np.ndarray]:
    """Smooth, clearly different frames (a moving gradient, a colour per index, a number)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(n):
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = (xx * 255 // max(w - 1, 1) + i * 23) % 256
        img[..., 1] = (yy * 255 // max(h - 1, 1) + i * 41) % 256
        img[..., 2] = (i * 67) % 256
        cv2.putText(img, str(i), (w // 4, 3 * h // 4), cv2.FONT_HERSHEY_SIMPLEX, h / 60,
                    (255, 255, 255), 3)
        frames.append(img)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = VIDEO_FPS) -> Path:
    """MJPG in AVI: this OpenCV build writes and reads it back without extra codecs."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """samples: int16 (n,) or (n, ch) for width 2; int32 full-scale for width 3/4."""
    arr = samples if samples.ndim == 2 else samples[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(arr.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 2:
            w.writeframes(arr.astype("<i2").tobytes())
        elif width == 3:
            b = arr.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
            w.writeframes(b.tobytes())
        else:
            w.writeframes(arr.astype("<i4").tobytes())
    return path


def speech_wav(path: Path, text: str = "seven three one five") -> Path:
    """Real speech from espeak-ng (22050 Hz) or flite (8000 Hz)."""
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    else:
        subprocess.run(["flite", "-t", text, "-o", str(path)], check=True, capture_output=True)
    return path


def wav_pcm(path: Path) -> tuple[bytes, int, int]:
    with wave.open(str(path), "rb") as w:
        return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()


SRT = """1
00:00:00,100 --> 00:00:00,800
seven

2
00:00:00,900 --> 00:00:01,450
three
one

3
00:00:01,500 --> 00:00:01,900
five
"""
SRT_SPANS_NS = [(100_000_000, 800_000_000), (900_000_000, 1_450_000_000),
                (1_500_000_000, 1_900_000_000)]
SRT_TEXTS = ["seven", "three\none", "five"]


def read_topic(settings: Settings, topic: str, n: int, timeout: float = 30.0,
               settle: float = 0.5) -> list[wire.KafkaRecord]:
    """Every record on ``topic`` from the beginning: waits for ``n`` (fails the test if
    fewer come), then ``settle`` seconds more so extra records are seen too."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             enable_auto_commit=False,
                             max_partition_fetch_bytes=settings.max_message_bytes,
                             fetch_max_bytes=settings.max_message_bytes * 2)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[wire.KafkaRecord] = []
        deadline = time.monotonic() + timeout
        settle_until = None
        while time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=200).values():
                out.extend(wire.KafkaRecord.from_client(m) for m in msgs)
            if len(out) >= n:
                settle_until = settle_until or time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
        assert len(out) >= n, f"{topic}: {len(out)} records after {timeout}s, expected {n}"
        return out
    finally:
        consumer.close()


def decode_all(records: list[wire.KafkaRecord], modality: str) -> list:
    """Decode with the wire format; ordered by sequence number."""
    out = [wire.decode(r, expect_modality=modality) for r in records]
    return sorted(out, key=lambda r: (r.stream_id, r.seq))
