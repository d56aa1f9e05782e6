"""Real media made inside the tests (OpenCV video, WAV, speech, SRT) and a topic reader.

Shared by the source and producer tests; nothing here is committed media.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from kafka import KafkaConsumer, TopicPartition

from streamproc.config import Settings
from streamproc.wire import codec as wire

VIDEO_FPS = 10.0
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


def write_av(path: Path, frames: list[np.ndarray] | None, pts_ms: list[int] | None = None, *,
             fps: int = 25, audio: np.ndarray | None = None, rate: int = 48000,
             vcodec: str = "libx264", acodec: str = "aac") -> Path:
    """A container written with PyAV: ``frames`` (BGR) at ``pts_ms`` (irregular for a
    variable frame rate; default 1/fps apart) and ``audio`` (float32 (n, channels) in
    [-1, 1]) as its own track. The container follows the suffix: mp4, mkv, avi."""
    out = av.open(str(path), "w")
    tb = Fraction(1, 1000)
    v = None
    if frames:
        v = out.add_stream(vcodec, rate=fps)
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt = "yuvj420p" if vcodec == "mjpeg" else "yuv420p"
        v.time_base = tb
        v.codec_context.time_base = tb
    a = None
    if audio is not None:
        a = out.add_stream(acodec, rate=rate)
        a.layout = "stereo" if audio.shape[1] == 2 else "mono"
    if v is not None and frames:
        pts = pts_ms or [round(i * 1000 / fps) for i in range(len(frames))]
        for img, p in zip(frames, pts, strict=True):
            f = av.VideoFrame.from_ndarray(img, format="bgr24")
            f.pts, f.time_base = p, tb
            for pkt in v.encode(f):
                out.mux(pkt)
        for pkt in v.encode():
            out.mux(pkt)
    if a is not None and audio is not None:
        fmt = "fltp" if acodec == "aac" else "s16"
        block = 1024
        for k in range(0, len(audio), block):
            part = audio[k:k + block]
            if fmt == "fltp":
                arr = np.ascontiguousarray(part.T.astype(np.float32))
            else:
                arr = np.round(part * 32767).astype(np.int16).reshape(1, -1)
            f = av.AudioFrame.from_ndarray(arr, format=fmt, layout=a.layout.name)
            f.sample_rate, f.pts, f.time_base = rate, k, Fraction(1, rate)
            for pkt in a.encode(f):
                out.mux(pkt)
        for pkt in a.encode():
            out.mux(pkt)
    out.close()
    return path


def container_times(path: Path, kind: str) -> list[int]:
    """Presentation times (ns from the file's first audio/video start) of every decoded
    frame of the first ``kind`` track, as the container says: what replays must stamp."""
    with av.open(str(path)) as c:
        starts = [s.start_time * s.time_base for s in c.streams
                  if s.type in ("video", "audio") and s.start_time is not None]
        zero = min(starts, default=0)
        stream = c.streams.video[0] if kind == "video" else c.streams.audio[0]
        return [round((f.pts * stream.time_base - zero) * 1_000_000_000)
                for f in c.decode(stream)]


def decoded_audio(path: Path) -> tuple[np.ndarray, int]:
    """The first audio track decoded by PyAV as float32 (n, channels), and its rate."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        parts = []
        for f in c.decode(s):
            arr = f.to_ndarray()
            arr = arr.T if f.format.is_planar else arr.reshape(-1, s.channels)
            if arr.dtype == np.int16:
                arr = arr / 32768.0
            parts.append(arr.astype(np.float32))
        return np.concatenate(parts), s.rate


def tone(seconds: float, rate: int, channels: int = 2) -> np.ndarray:
    """A stereo test signal: a different tone per channel, float32 in [-0.5, 0.5]."""
    t = np.arange(round(seconds * rate)) / rate
    chans = [0.5 * np.sin(2 * np.pi * (330 + 110 * c) * t) for c in range(channels)]
    return np.stack(chans, axis=1).astype(np.float32)


KSDATAFORMAT_PCM = bytes.fromhex("0100000000001000800000aa00389b71")
KSDATAFORMAT_FLOAT = bytes.fromhex("0300000000001000800000aa00389b71")


def write_wav_bytes(path: Path, data: bytes, rate: int, channels: int, bits: int, *,
                    float_: bool = False, extensible: bool = False) -> Path:
    """A WAV written byte for byte: PCM (tag 1), IEEE float (tag 3) or
    WAVE_FORMAT_EXTENSIBLE (tag 65534, with the PCM or float sub-format GUID), the
    shapes ffmpeg and audio editors write and Python's ``wave`` refuses."""
    block = channels * bits // 8
    if extensible:
        mask = 0x3 if channels == 2 else 0x4
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22,
                          bits, mask) + (KSDATAFORMAT_FLOAT if float_ else KSDATAFORMAT_PCM)
    else:
        fmt = struct.pack("<HHIIHH", 3 if float_ else 1, channels, rate, rate * block, block,
                          bits)
        if float_:
            fmt += struct.pack("<H", 0)  # cbSize: non-PCM formats carry it
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)
    if len(data) % 2:
        body += b"\0"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def pcm24(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """float (n, ch) -> 24-bit little-endian PCM bytes and the int values they hold."""
    ints = np.round(np.clip(x, -1, 1) * ((1 << 23) - 1)).astype("<i4")
    return ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes(), ints
