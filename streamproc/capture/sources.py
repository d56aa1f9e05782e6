"""Sources: live camera, live microphone, media files and transcripts -> typed records.

Every source hands :mod:`streamproc.wire.codec` records to an *outbox* (anything with
``publish(record)``: a :class:`streamproc.capture.publisher.Publisher`, or a
:class:`~streamproc.capture.publisher.ListOutbox` offline), so capture logic never touches
Kafka.

Time: event times are wall-clock nanoseconds read from a :class:`Clock` that is anchored
to the monotonic clock once, so an NTP step or a manual clock change never reorders a
stream. Sequence numbers count per stream and modality from 0; a record dropped under
load leaves a gap, which is how consumers see the loss.

Capture never waits for Kafka: the camera and microphone threads put into a bounded
:class:`DropOldestQueue` and a separate loop encodes and publishes.
"""

from __future__ import annotations

import heapq
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, TypeVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from streamproc.capture.publisher import Outbox
from streamproc.capture.transcripts import (
    Cue,
    LineError,
    ParseIssue,
    load_transcript,
    parse_json_cue,
    suffix_format,
)
from streamproc.config import MODALITIES, Modality
from streamproc.errors import UserError
from streamproc.wire import codec as wire
from streamproc.wire.codec import NS_PER_S, AudioChunk, TranscriptSegment, VideoFrame, samples_to_ns

log = logging.getLogger(__name__)

T = TypeVar("T")

# Audio whose device clock disagrees with the wall clock by more than this is re-anchored
# (a counted "resync") instead of being stretched to stay sample-continuous.
DEFAULT_MAX_DRIFT_NS = 50_000_000
FUTURE_LIMIT_NS = 3600 * NS_PER_S


# ---------------------------------------------------------------------------------------
# time, queues, numbering (pure)
# ---------------------------------------------------------------------------------------


class Clock:
    """Wall-clock nanoseconds that advance with the monotonic clock.

    Read once at creation, the wall clock gives the epoch; afterwards only the monotonic
    clock moves it, so event times never jump backwards when the system clock is set.
    """

    def __init__(self) -> None:
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()

    def now_ns(self) -> int:
        return self._wall0 + time.monotonic_ns() - self._mono0

    def wait_until(self, wall_ns: int, stop: threading.Event | None = None) -> bool:
        """Sleep until ``now_ns() >= wall_ns``; False if ``stop`` was set first."""
        while True:
            delay = (wall_ns - self.now_ns()) / NS_PER_S
            if delay <= 0:
                return not (stop is not None and stop.is_set())
            if stop is not None:
                if stop.wait(delay):
                    return False
            else:
                time.sleep(delay)


class DropOldestQueue(Generic[T]):
    """A bounded queue whose ``put`` never blocks: when full it evicts the oldest item.

    The producer side (a capture thread) must never wait for the consumer (Kafka);
    the evicted item is returned so the caller can count it.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: T) -> T | None:
        with self._cond:
            evicted = None
            if len(self._items) >= self.maxsize:
                evicted = self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()
            return evicted

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, or None when nothing arrived within ``timeout``."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            return self._items.popleft()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class FrameThrottle:
    """Keeps frames at ``fps`` on average by dropping, never by sleeping the device.

    A frame is kept when it is at most a fifth of a period early for its slot, so a
    30 fps camera throttled to 15 keeps every other frame despite timestamp jitter.
    """

    def __init__(self, fps: float | None) -> None:
        self.period_ns = None if not fps else round(NS_PER_S / fps)
        self._due: int | None = None

    def keep(self, ts_ns: int) -> bool:
        if self.period_ns is None:
            return True
        p = self.period_ns
        if self._due is None or ts_ns - self._due >= p:  # first frame, or fell a slot behind
            self._due = ts_ns + p
            return True
        if ts_ns >= self._due - p // 5:
            self._due += p
            return True
        return False


def continue_or_resync(expected_ns: int | None, measured_ns: int,
                       max_drift_ns: int = DEFAULT_MAX_DRIFT_NS) -> tuple[int, bool]:
    """Start time of an audio block: continue the previous one exactly, unless it cannot.

    ``expected_ns`` is where the previous chunk ended (None after a loss); ``measured_ns``
    is the block's own timestamp. Returns (start, resynced).
    """
    if expected_ns is not None and abs(measured_ns - expected_ns) <= max_drift_ns:
        return expected_ns, False
    return measured_ns, expected_ns is not None


def check_stream_id(stream_id: str) -> str:
    """The stream id as the wire format accepts it, or a UserError saying why not."""
    try:
        return wire.stream_id_of(stream_id.encode("utf-8"))
    except wire.WireError as e:
        raise UserError(f"invalid stream id {stream_id!r}: {e}") from None


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (w, h)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"size must look like 640x480, got {text!r}") from None
    if not (0 < w <= wire.MAX_IMAGE_SIDE and 0 < h <= wire.MAX_IMAGE_SIDE):
        raise UserError(f"size {w}x{h} is out of range (1..{wire.MAX_IMAGE_SIDE} per side)")
    return w, h


# ---------------------------------------------------------------------------------------
# the Python API for your own capture code
# ---------------------------------------------------------------------------------------


class StreamWriter:
    """Publish one stream's frames, audio and transcript from your own capture code.

    Numbers each modality from 0 and stamps event times from a :class:`Clock` when you
    do not pass them. Audio blocks passed without ``ts_ns`` continue the previous block
    sample-exactly as long as the clock agrees within ``max_drift_ns``.

    >>> w = StreamWriter(publisher, "cam-1")          # doctest: +SKIP
    >>> w.frame(bgr_image)                            # doctest: +SKIP
    >>> w.audio(int16_block, 16000)                   # doctest: +SKIP
    >>> w.text("hello", start_ns, end_ns, final=False)  # doctest: +SKIP
    """

    def __init__(self, outbox: Outbox, stream_id: str, *, clock: Clock | None = None,
                 image_format: str = "jpeg", jpeg_quality: int = 90,
                 max_drift_ns: int = DEFAULT_MAX_DRIFT_NS) -> None:
        self.outbox = outbox
        self.stream_id = check_stream_id(stream_id)
        self.clock = clock or Clock()
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.max_drift_ns = max_drift_ns
        self._seq = dict.fromkeys(MODALITIES, 0)
        self._audio_end: int | None = None
        self._audio_shape: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.resyncs = 0

    def next_seq(self, modality: Modality) -> int:
        with self._lock:
            seq = self._seq[modality]
            self._seq[modality] = seq + 1
            return seq

    def frame(self, image: np.ndarray, ts_ns: int | None = None) -> VideoFrame:
        """Encode a BGR uint8 image and publish it; ``ts_ns`` defaults to now."""
        ts = self.clock.now_ns() if ts_ns is None else ts_ns
        rec = VideoFrame.from_image(self.stream_id, ts, self.next_seq("video"), image,
                                    self.image_format, self.jpeg_quality)
        self.outbox.publish(rec)
        return rec

    def audio(self, samples: np.ndarray, sample_rate: int, ts_ns: int | None = None,
              fmt: str = "s16le") -> AudioChunk:
        """Publish samples shaped (n,) or (n, channels); without ``ts_ns`` they end now."""
        arr = np.asarray(samples)
        shape = (int(sample_rate), 1 if arr.ndim == 1 else int(arr.shape[1]))
        if ts_ns is None:
            measured = self.clock.now_ns() - samples_to_ns(len(arr), sample_rate)
            expected = self._audio_end if shape == self._audio_shape else None
            ts_ns, resynced = continue_or_resync(expected, measured, self.max_drift_ns)
            self.resyncs += resynced
        rec = AudioChunk.from_samples(self.stream_id, ts_ns, self.next_seq("audio"), arr,
                                      sample_rate, fmt)
        self._audio_end, self._audio_shape = rec.end_ns, shape
        self.outbox.publish(rec)
        return rec

    def text(self, text: str, start_ns: int | None = None, end_ns: int | None = None, *,
             final: bool = True, confidence: float | None = None,
             lang: str | None = None) -> TranscriptSegment:
        """Publish a transcript span; without times it is the instant of the call."""
        if start_ns is None or end_ns is None:
            now = self.clock.now_ns()
            start_ns = now if start_ns is None else start_ns
            end_ns = now if end_ns is None else end_ns
        if end_ns < start_ns:
            raise ValueError(f"transcript span ends before it starts ({start_ns} > {end_ns})")
        rec = TranscriptSegment(self.stream_id, self.next_seq("text"), text, start_ns, end_ns,
                                final, confidence, lang)
        self.outbox.publish(rec)
        return rec


# ---------------------------------------------------------------------------------------
# camera
# ---------------------------------------------------------------------------------------


@dataclass
class CameraStats:
    captured: int = 0  # frames kept after throttling (each took a sequence number)
    skipped: int = 0  # frames the fps throttle left out (no sequence number)
    dropped: int = 0  # captured frames evicted because publishing fell behind
    published: int = 0
    errors: int = 0  # frames that could not be decoded from the device or encoded
    reconnects: int = 0
    open_failures: int = 0
    capture_finished: threading.Event = field(default_factory=threading.Event, repr=False)


def _is_live(device: int | str) -> bool:
    """Device indices, device nodes (``/dev/video0``) and network URLs come back after a
    failure (a USB glitch, a dropped connection); local files do not."""
    if isinstance(device, int):
        return True
    if "://" in device:
        return not device.startswith("file://")
    return Path(device).is_char_device()


def _is_file(device: int | str) -> bool:
    """A local media file (a path or a file:// URL), not a device node or a stream."""
    if isinstance(device, int):
        return False
    if device.startswith("file://"):
        return True
    return "://" not in device and Path(device).is_file()


class CameraSource:
    """OpenCV capture of a device index or a URL (RTSP/HTTP/file), published as frames.

    A capture thread grabs frames, stamps them, throttles to ``fps`` by skipping and puts
    raw images into a :class:`DropOldestQueue`; :meth:`run` encodes (JPEG) and publishes
    from the calling thread. When a live source fails it is reopened with exponential
    backoff; a local file ends the capture at its end unless ``reconnect=True``.

    A local file (path or ``file://`` URL) is stamped with its own frame timestamps from
    the moment it is opened, and ``pace`` (default for files) releases each frame when
    its time comes, as a camera would; ``produce file`` is the fuller replay (audio,
    transcript, ``--start-at``).
    """

    def __init__(self, outbox: Outbox, stream_id: str, device: int | str = 0, *,
                 fps: float | None = None, size: tuple[int, int] | None = None,
                 jpeg_quality: int = 90, queue_size: int = 8, reconnect: bool | None = None,
                 backoff_s: tuple[float, float] = (0.5, 10.0), clock: Clock | None = None,
                 pace: bool | None = None) -> None:
        self.outbox = outbox
        self.stream_id = check_stream_id(stream_id)
        self.device = device
        self.size = size
        self.jpeg_quality = jpeg_quality
        self.reconnect = _is_live(device) if reconnect is None else reconnect
        self.is_file = _is_file(device)
        self.pace = self.is_file if pace is None else pace
        self.backoff_s = backoff_s
        self.clock = clock or Clock()
        self.throttle = FrameThrottle(fps)
        self.queue: DropOldestQueue[tuple[int, int, np.ndarray]] = DropOldestQueue(queue_size)
        self.stats = CameraStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> Any:
        import cv2

        cap = cv2.VideoCapture(self.device)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def open(self) -> None:
        """Open the device now; UserError when it cannot be opened at all."""
        cap = self._open()
        if cap is None:
            raise UserError(f"cannot open camera {self.device!r} (no such device, URL not "
                            "reachable or format not supported by this OpenCV build)")
        self._cap = cap

    def _file_time(self, cap: Any, prev_rel: int | None) -> int:
        """The grabbed frame's presentation time in the file (ns), never before the last."""
        import cv2

        rel = round(cap.get(cv2.CAP_PROP_POS_MSEC) * 1_000_000)
        if prev_rel is not None and rel <= prev_rel:  # backends without timestamps
            fps = cap.get(cv2.CAP_PROP_FPS)
            rel = prev_rel + (round(NS_PER_S / fps) if fps and math.isfinite(fps) and fps > 0
                              else 1)
        return rel

    def _capture(self) -> None:
        cap, seq, last_ts = self._cap, 0, 0
        delay = self.backoff_s[0]
        # a file's frames are at base + their own timestamp; base is set by the first
        # frame after each (re)open, so a reopened file continues after the last frame
        base: int | None = None
        prev_rel: int | None = None
        try:
            while not self._stop.is_set():
                if cap is None:
                    if self._stop.wait(delay):
                        break
                    delay = min(delay * 2, self.backoff_s[1])
                    cap = self._open()
                    if cap is None:
                        self.stats.open_failures += 1
                        log.warning("camera %r: reopen failed, next try in %.1fs",
                                    self.device, delay)
                        continue
                    self.stats.reconnects += 1
                    log.info("camera %r: reconnected", self.device)
                if not cap.grab():
                    cap.release()
                    cap = None
                    base = prev_rel = None
                    if not self.reconnect:
                        break
                    log.warning("camera %r: no frame, reconnecting", self.device)
                    continue
                if self.is_file:
                    prev_rel = self._file_time(cap, prev_rel)
                    if base is None:
                        base = max(self.clock.now_ns(), last_ts + 1) - prev_rel
                    ts = max(base + prev_rel, last_ts + 1)
                else:  # stamped at grab: the frame exists now; decoding comes after
                    ts = max(self.clock.now_ns(), last_ts + 1)
                if not self.throttle.keep(ts):
                    self.stats.skipped += 1
                    continue
                ok, image = cap.retrieve()
                if not ok:
                    self.stats.errors += 1
                    continue
                if self.pace and not self.clock.wait_until(ts, self._stop):
                    break
                delay = self.backoff_s[0]
                last_ts = ts
                self.stats.captured += 1
                if self.queue.put((seq, ts, image)) is not None:
                    self.stats.dropped += 1
                seq += 1
        finally:
            if cap is not None:
                cap.release()
            self.stats.capture_finished.set()

    def run(self, stop: threading.Event | None = None) -> CameraStats:
        """Capture and publish until ``stop`` is set or the source ends.

        Frames already captured when it stops are still published; a capture thread
        stuck in a hung device read is abandoned (it is a daemon) after ``join_s``.
        """
        if not hasattr(self, "_cap"):
            self.open()
        stop = stop or self._stop
        self._thread = threading.Thread(target=self._capture, name=f"camera-{self.stream_id}",
                                        daemon=True)
        self._thread.start()
        try:
            while not (stop.is_set() or self._stop.is_set()):
                item = self.queue.get(timeout=0.1)
                if item is not None:
                    self._publish(item)
                elif self.stats.capture_finished.is_set() and not len(self.queue):
                    break
        finally:
            self._stop.set()
            self._thread.join(self.join_s)
            while (item := self.queue.get(0)) is not None:
                self._publish(item)
        return self.stats

    join_s = 5.0

    def _publish(self, item: tuple[int, int, np.ndarray]) -> None:
        import cv2

        seq, ts, image = item
        try:
            if self.size is not None and (image.shape[1], image.shape[0]) != self.size:
                image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
            frame = VideoFrame.from_image(self.stream_id, ts, seq, image, "jpeg",
                                          self.jpeg_quality)
        except (ValueError, cv2.error) as e:
            self.stats.errors += 1
            log.error("camera %r: frame %d not encoded: %s", self.device, seq, e)
            return
        self.outbox.publish(frame)
        self.stats.published += 1

    def stop(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------------------------------
# microphone
# ---------------------------------------------------------------------------------------

PORTAUDIO_HELP = (
    "the microphone needs the PortAudio library, which could not be loaded ({err}). "
    "Install it: `sudo apt-get install libportaudio2` (Debian/Ubuntu), "
    "`sudo dnf install portaudio` (Fedora), `brew install portaudio` (macOS)"
)


def import_sounddevice() -> Any:
    """``sounddevice``, or a UserError naming what to install (it raises OSError at import
    when the PortAudio shared library is missing)."""
    try:
        import sounddevice
    except OSError as e:
        raise UserError(PORTAUDIO_HELP.format(err=e)) from None
    except ImportError:
        raise UserError("the microphone needs the Python package sounddevice: "
                        "pip install sounddevice") from None
    return sounddevice


@dataclass
class MicStats:
    blocks: int = 0  # callback blocks received
    published: int = 0
    overflows: int = 0  # PortAudio said input samples were lost before a block
    queue_drops: int = 0  # blocks evicted because publishing fell behind
    resyncs: int = 0  # chunks re-anchored to the device clock (after a loss or drift)

    @property
    def drops(self) -> int:
        return self.overflows + self.queue_drops


@dataclass(frozen=True)
class AudioBlock:
    seq: int
    samples: np.ndarray  # (frames, channels), a copy owned by us
    ts_ns: int  # first sample, from the ADC time mapped to the wall clock
    overflow: bool


class MicSource:
    """``sounddevice.InputStream`` -> bounded queue -> audio chunks.

    The PortAudio callback (:meth:`callback`) only copies and stamps the block; one
    block is one chunk (``blocksize`` = ``chunk_ms``), so a dropped block leaves a
    sequence gap. Chunk k+1 starts exactly where chunk k ended unless samples were
    really lost (overflow, queue drop) or the device clock drifted past
    ``max_drift_ns``; then it is re-anchored and counted.
    """

    def __init__(self, outbox: Outbox, stream_id: str, device: int | str | None = None, *,
                 rate: int = 16000, channels: int = 1, chunk_ms: int = 100,
                 fmt: str = "s16le", queue_blocks: int = 50, clock: Clock | None = None,
                 max_drift_ns: int = DEFAULT_MAX_DRIFT_NS) -> None:
        if fmt not in wire.AUDIO_FORMATS:
            raise UserError(f"audio format must be s16le or f32le, got {fmt!r}")
        if not 1 <= channels <= wire.MAX_CHANNELS:
            raise UserError(f"channels must be 1..{wire.MAX_CHANNELS}, got {channels}")
        self.chunk_frames = rate * chunk_ms // 1000
        if self.chunk_frames < 1:
            raise UserError(f"--chunk-ms {chunk_ms} holds no sample at {rate} Hz")
        self.outbox = outbox
        self.stream_id = check_stream_id(stream_id)
        self.device = device
        self.rate, self.channels, self.fmt = rate, channels, fmt
        self.clock = clock or Clock()
        self.max_drift_ns = max_drift_ns
        self.queue: DropOldestQueue[AudioBlock] = DropOldestQueue(queue_blocks)
        self.stats = MicStats()
        self._next_block = 0
        self._last: tuple[int, int] | None = None  # (seq, end_ns) of the last chunk

    # PortAudio's thread: copy, stamp, enqueue; nothing that can block
    def callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        now = self.clock.now_ns()
        adc = float(getattr(time_info, "inputBufferAdcTime", 0.0) or 0.0)
        cur = float(getattr(time_info, "currentTime", 0.0) or 0.0)
        if adc > 0 and cur > 0 and 0 <= cur - adc < 1.0:
            ts = now - round((cur - adc) * NS_PER_S)
        else:  # host API without timing: the block ends about now
            ts = now - samples_to_ns(frames, self.rate)
        overflow = bool(getattr(status, "input_overflow", False))
        self.stats.blocks += 1
        if overflow:
            self.stats.overflows += 1
        block = AudioBlock(self._next_block, np.array(indata, copy=True), ts, overflow)
        self._next_block += 1
        if self.queue.put(block) is not None:
            self.stats.queue_drops += 1

    def chunk_of(self, block: AudioBlock) -> AudioChunk:
        """The chunk for a block, continuing the previous one when nothing was lost."""
        expected = None
        if self._last is not None and self._last[0] == block.seq - 1 and not block.overflow:
            expected = self._last[1]
        ts, _ = continue_or_resync(expected, block.ts_ns, self.max_drift_ns)
        if self._last is not None and ts != self._last[1]:
            self.stats.resyncs += 1
        chunk = AudioChunk.from_samples(self.stream_id, ts, block.seq, block.samples, self.rate,
                                        self.fmt)
        self._last = (block.seq, chunk.end_ns)
        return chunk

    def publish_pending(self, timeout: float = 0.0) -> int:
        """Publish every queued block (waiting up to ``timeout`` for the first)."""
        n = 0
        block = self.queue.get(timeout)
        while block is not None:
            self.outbox.publish(self.chunk_of(block))
            self.stats.published += 1
            n += 1
            block = self.queue.get(0)
        return n

    def open_stream(self) -> Any:
        """The PortAudio input stream (not started); UserError with the device list when
        the device does not exist or cannot record."""
        sd = check_input_device(self.device, self.rate, self.channels, self.fmt)
        try:
            return sd.InputStream(samplerate=self.rate, channels=self.channels,
                                  dtype="int16" if self.fmt == "s16le" else "float32",
                                  blocksize=self.chunk_frames, device=self.device,
                                  callback=self.callback)
        except (ValueError, sd.PortAudioError) as e:
            raise UserError(f"cannot record from audio device {self.device!r}: {e}. "
                            f"Input devices: {input_devices(sd) or 'none found'}") from None

    def run(self, stop: threading.Event) -> MicStats:
        """Record and publish until ``stop`` is set (or the device goes away)."""
        stream = self.open_stream()
        with stream:
            while not stop.is_set():
                self.publish_pending(timeout=0.1)
                if not stream.active:
                    log.error("audio input %r stopped delivering (device gone?)", self.device)
                    break
        self.publish_pending()
        return self.stats


def check_input_device(device: int | str | None, rate: int, channels: int,
                       fmt: str = "s16le") -> Any:
    """``sounddevice`` once PortAudio agrees the device can record like this; otherwise a
    UserError that lists the input devices there are."""
    sd = import_sounddevice()
    try:
        sd.check_input_settings(device=device, channels=channels, samplerate=rate,
                                dtype="int16" if fmt == "s16le" else "float32")
    except (ValueError, sd.PortAudioError) as e:
        name = "the default input device" if device is None else f"audio device {device!r}"
        raise UserError(f"cannot record from {name}: {e}. "
                        f"Input devices: {input_devices(sd) or 'none found'}") from None
    return sd


def input_devices(sd: Any) -> str:
    try:
        devs = sd.query_devices()
    except Exception:  # PortAudio without any host API
        return ""
    return ", ".join(f"{i}: {d['name']}" for i, d in enumerate(devs)
                     if d.get("max_input_channels", 0) > 0)


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------

# Decoded sample formats (FFmpeg's names) that stay 16-bit PCM on the wire; every other
# format (24/32-bit integer, float, double) becomes f32le in [-1, 1].
_S16_FORMATS = frozenset({"u8", "u8p", "s16", "s16p"})


@dataclass(frozen=True)
class AudioInfo:
    """The audio track a file replay publishes: its own rate and channels, unchanged."""

    sample_rate: int
    channels: int
    fmt: str  # wire format: s16le or f32le


def _open_media(path: str | Path, what: str) -> av.container.InputContainer:
    """An opened PyAV container, or a UserError naming the file and the reason."""
    if not Path(path).is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise UserError(f"{path}: not a media file FFmpeg can read ({e})") from None


def _ns(value: int, time_base: Fraction) -> int:
    """``value`` ticks of ``time_base`` in integer nanoseconds (exact up to rounding)."""
    return round(value * time_base.numerator * NS_PER_S / time_base.denominator)


def _media_zero_ns(container: av.container.InputContainer) -> int:
    """Media time 0 of a file: its earliest audio or video start, so tracks of one
    container keep their offset to each other and the first of them starts at 0."""
    starts = [_ns(s.start_time, s.time_base) for s in container.streams
              if s.type in ("video", "audio") and s.start_time is not None
              and s.time_base is not None]
    return min(starts, default=0)


def _decoded(container: av.container.InputContainer, stream: Any, path: str | Path,
             ) -> Iterator[Any]:
    """Frames of one stream in presentation order; a packet that does not decode is
    logged and skipped, so one corrupt packet does not end the replay."""
    errors = 0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.FFmpegError as e:
            errors += 1
            if errors <= 3:
                log.warning("%s: %s packet at pts %s not decoded, skipped: %s", path,
                            stream.type, packet.pts, e)
            continue
        yield from frames


def audio_info(path: str | Path, stream: Any) -> AudioInfo:
    """What :func:`audio_chunks` will publish for ``stream``; UserError when the wire
    format cannot carry it."""
    rate, channels = int(stream.rate or 0), int(stream.channels or 0)
    if (not 1 <= channels <= wire.MAX_CHANNELS
            or not wire.MIN_SAMPLE_RATE <= rate <= wire.MAX_SAMPLE_RATE):
        raise UserError(f"{path}: {channels} channels at {rate} Hz is outside what the wire "
                        f"format carries (1..{wire.MAX_CHANNELS} channels, "
                        f"{wire.MIN_SAMPLE_RATE}..{wire.MAX_SAMPLE_RATE} Hz)")
    fmt_name = stream.codec_context.format.name if stream.codec_context.format else ""
    return AudioInfo(rate, channels, "s16le" if fmt_name in _S16_FORMATS else "f32le")


def _samples(frame: Any, channels: int) -> np.ndarray:
    """A decoded audio frame as (n, channels): int16 for 8/16-bit PCM (8-bit shifted to
    full scale), float32 in [-1, 1] for 24/32-bit integer, float and double."""
    arr = frame.to_ndarray()
    arr = arr.T if frame.format.is_planar else arr.reshape(-1, channels)
    if arr.dtype == np.uint8:
        return ((arr.astype(np.int16) - 128) << 8).astype(np.int16)
    if arr.dtype == np.int16:
        return arr
    if arr.dtype == np.int32:  # 24-bit PCM arrives shifted into the top 24 bits
        return (arr / float(1 << 31)).astype(np.float32)
    if arr.dtype == np.int64:
        return (arr / float(1 << 63)).astype(np.float32)
    return arr.astype(np.float32)


# Audio frames whose timestamps run this far past their samples start a new run (a
# container rounds timestamps to its time base: 1 ms for Matroska)
AUDIO_GAP_NS = 2_000_000


def audio_chunks(path: str | Path, stream_id: str, origin_ns: int, chunk_ms: int = 100,
                 seq0: int = 0) -> Iterator[AudioChunk]:
    """The first audio track of a file (WAV of any PCM or float format, or any container
    FFmpeg reads) as chunks of ``chunk_ms`` at the track's own rate and channels.

    Chunks are sample-continuous from the track's first timestamp (relative to the
    file's media time 0, see :func:`_media_zero_ns`) shifted to ``origin_ns``, until a
    frame starts more than ``AUDIO_GAP_NS`` after the samples before it (a hole in the
    track, a packet that did not decode): the samples pending are sent as a short chunk
    and timing goes on from that frame's timestamp, so later audio keeps its place
    beside the video. 16-bit PCM is published byte for byte (s16le); other formats as
    f32le.
    """
    with _open_media(path, "audio") as container:
        if not container.streams.audio:
            raise UserError(f"{path}: no audio track")
        stream = container.streams.audio[0]
        info = audio_info(path, stream)
        zero = _media_zero_ns(container)
        n = max(1, info.sample_rate * chunk_ms // 1000)
        pending: list[np.ndarray] = []
        have, ts, seq = 0, None, seq0
        for frame in _decoded(container, stream, path):
            at = (None if frame.pts is None or stream.time_base is None
                  else origin_ns + _ns(frame.pts, stream.time_base) - zero)
            if ts is None:
                ts = max(origin_ns, at) if at is not None else origin_ns
            elif at is not None and at - (ts + samples_to_ns(have, info.sample_rate)) > \
                    AUDIO_GAP_NS:
                if have:
                    buf = np.concatenate(pending)
                    yield AudioChunk.from_samples(stream_id, ts, seq, buf, info.sample_rate,
                                                  info.fmt)
                    seq += 1
                pending, have, ts = [], 0, at
            block = _samples(frame, info.channels)
            pending.append(block)
            have += len(block)
            while have >= n:
                buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending = [buf[n:]] if len(buf) > n else []
                have -= n
                chunk = AudioChunk.from_samples(stream_id, ts, seq, buf[:n], info.sample_rate,
                                                info.fmt)
                yield chunk
                ts, seq = chunk.end_ns, seq + 1
        if have and ts is not None:
            buf = np.concatenate(pending)
            yield AudioChunk.from_samples(stream_id, ts, seq, buf, info.sample_rate, info.fmt)


@dataclass
class ReplayStats:
    """What a replay published (counted when handed to the outbox, so a stop in between
    never counts a record that was not sent)."""

    stream_id: str
    origin_ns: int = 0
    frames: int = 0
    chunks: int = 0
    segments: int = 0
    audio_samples: int = 0
    loops: int = 0  # passes completed
    transcript_issues: list[ParseIssue] = field(default_factory=list)
    published: int = 0

    def count(self, rec: wire.MediaRecord) -> None:
        self.published += 1
        if rec.modality == "video":
            self.frames += 1
        elif rec.modality == "audio":
            self.chunks += 1
            self.audio_samples += rec.n_samples
        else:
            self.segments += 1

    def summary(self) -> str:
        s = (f"{self.stream_id}: published {self.frames} frames, {self.chunks} audio chunks, "
             f"{self.segments} transcript segments from clock origin {self.origin_ns}")
        if self.transcript_issues:
            s += f"; {len(self.transcript_issues)} transcript line(s) skipped"
        return s


class FileSource:
    """One stream's media files as records: video, audio and a transcript, each optional.

    Video and audio are decoded with PyAV (FFmpeg): MP4, MKV, AVI, WebM, WAV (PCM 8 to
    32-bit, float, WAVE_FORMAT_EXTENSIBLE), ... The audio is ``audio`` when given, else
    the video file's own audio track (unless ``container_audio=False``).

    All modalities share one clock origin: a frame is at ``origin`` + its presentation
    timestamp (so variable-frame-rate video keeps the container's timing), audio is
    sample-continuous from its first timestamp, transcript spans are shifted by the
    origin. Records come out ordered by when a live source would have them: a frame at
    its timestamp, an audio chunk or transcript span at its end. With ``loop`` each pass
    starts where the previous one ended (its longest modality).
    """

    def __init__(self, stream_id: str, video: str | Path | None = None,
                 audio: str | Path | None = None, transcript: str | Path | None = None, *,
                 chunk_ms: int = 100, jpeg_quality: int = 90, size: tuple[int, int] | None = None,
                 loop: bool = False, container_audio: bool = True) -> None:
        if video is None and audio is None and transcript is None:
            raise UserError("nothing to replay: give a video, an audio file or a transcript")
        self.stream_id = check_stream_id(stream_id)
        self.chunk_ms, self.jpeg_quality, self.size, self.loop = chunk_ms, jpeg_quality, size, loop
        self.stats = ReplayStats(self.stream_id)
        self.video, self.transcript = video, transcript
        self.audio: str | Path | None = None
        self.audio_info: AudioInfo | None = None
        if video is not None:
            if suffix_format(video) is not None:
                raise UserError(f"{video} is a transcript: give it with --transcript")
            with _open_media(video, "video") as c:
                if not c.streams.video:
                    hint = " (give an audio file with --audio)" if c.streams.audio else ""
                    raise UserError(f"{video}: no video track{hint}")
                if audio is None and container_audio and c.streams.audio:
                    try:
                        self.audio_info = audio_info(video, c.streams.audio[0])
                        self.audio = video
                    except UserError as e:  # not asked for: the video still goes
                        log.warning("%s; its audio track is not sent", e)
        if audio is not None:
            with _open_media(audio, "audio") as c:
                if not c.streams.audio:
                    raise UserError(f"{audio}: no audio track")
                self.audio, self.audio_info = audio, audio_info(audio, c.streams.audio[0])
        self.cues: list[Cue] = []
        if transcript is not None:
            parsed = load_transcript(transcript)
            for issue in parsed.issues:
                log.warning("transcript %s", issue)
            self.stats.transcript_issues = parsed.issues
            # in the order they end, which is when they are sent: a long cue (a caption
            # held for 20 s) must not hold back the short ones that end inside it
            self.cues = sorted(parsed.cues, key=lambda c: (c.end_ns, c.start_ns))
            if not self.cues:
                reason = f"{transcript}: no cue could be read" + (
                    f" ({len(parsed.issues)} skipped, see above)" if parsed.issues else "")
                if self.video is None and self.audio is None:
                    raise UserError(reason)  # else the replay ends "delivered 0 of 0"
                log.warning("%s", reason)

    # --- one pass per modality, each yields (due_ns, record) in order ---------------------

    def _video_pass(self, video: str | Path, origin: int, seq0: int,
                    out: dict[str, int]) -> Iterator[tuple[int, Any]]:
        import cv2

        with _open_media(video, "video") as container:
            stream = container.streams.video[0]
            zero = _media_zero_ns(container)
            # one reformatter keeps its scaler between frames (a new one per frame costs
            # more than decoding a 320x240 frame)
            to_bgr = VideoReformatter()
            rate = stream.average_rate or stream.guessed_rate
            period = round(NS_PER_S / rate) if rate else 0
            tb = stream.time_base
            prev: int | None = None
            for i, frame in enumerate(_decoded(container, stream, video)):
                if frame.pts is None or tb is None:  # no timestamp: a nominal period after the last
                    rel = 0 if prev is None else prev + period
                else:
                    rel = _ns(frame.pts, tb) - zero
                # a broken file's timestamps may go back; the stream's never do
                rel = max(rel, 0 if prev is None else prev + 1)
                image: np.ndarray = to_bgr.reformat(frame, format="bgr24").to_ndarray()
                if self.size is not None and (image.shape[1], image.shape[0]) != self.size:
                    image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
                rec = VideoFrame.from_image(self.stream_id, origin + rel, seq0 + i, image,
                                            "jpeg", self.jpeg_quality)
                duration = _ns(frame.duration, tb) if frame.duration and tb is not None else 0
                out["video"] = i + 1
                out["video_end"] = rel + (duration or period or (rel - (prev or 0)))
                prev = rel
                yield origin + rel, rec

    def _audio_pass(self, audio: str | Path, origin: int, seq0: int,
                    out: dict[str, int]) -> Iterator[tuple[int, Any]]:
        for chunk in audio_chunks(audio, self.stream_id, origin, self.chunk_ms, seq0):
            out["audio"] = out.get("audio", 0) + 1
            out["audio_end"] = chunk.end_ns - origin
            yield chunk.end_ns, chunk

    def _text_pass(self, origin: int, seq0: int, out: dict[str, int]) -> Iterator[tuple[int, Any]]:
        due = origin
        for i, cue in enumerate(self.cues):
            assert cue.start_ns is not None and cue.end_ns is not None
            rec = TranscriptSegment(self.stream_id, seq0 + i, cue.text, origin + cue.start_ns,
                                    origin + cue.end_ns, cue.final, cue.confidence, cue.lang)
            due = max(due, rec.end_ns)  # keeps segments in sequence order
            out["text"] = i + 1
            yield due, rec

    def records(self, origin_ns: int) -> Iterator[tuple[int, wire.MediaRecord]]:
        """(due time, record) for every record, in due order; loops when configured."""
        self.stats.origin_ns = origin_ns
        origin = origin_ns
        seqs = dict.fromkeys(MODALITIES, 0)
        while True:
            out: dict[str, int] = {}
            passes = []
            if self.video is not None:
                passes.append(self._video_pass(self.video, origin, seqs["video"], out))
            if self.audio is not None:
                passes.append(self._audio_pass(self.audio, origin, seqs["audio"], out))
            if self.cues:
                passes.append(self._text_pass(origin, seqs["text"], out))
            yield from heapq.merge(*passes, key=lambda item: item[0])
            self.stats.loops += 1
            seqs["video"] += out.get("video", 0)
            seqs["audio"] += out.get("audio", 0)
            seqs["text"] += out.get("text", 0)
            duration = max(out.get("video_end", 0), out.get("audio_end", 0),
                           max((c.end_ns or 0 for c in self.cues), default=0))
            if not self.loop or duration <= 0:
                return
            origin += duration


def file_records(stream_id: str, video: str | Path | None = None,
                 audio: str | Path | None = None, transcript: str | Path | None = None, *,
                 origin_ns: int, **options: Any) -> Iterator[wire.MediaRecord]:
    """The records a file replay would publish, without Kafka (for tests and tools)."""
    src = FileSource(stream_id, video, audio, transcript, **options)
    for _, rec in src.records(origin_ns):
        yield rec


def replay(outbox: Outbox, stream_id: str, video: str | Path | None = None,
           audio: str | Path | None = None, transcript: str | Path | None = None, *,
           realtime: bool = True, start_at_ns: int | None = None, loop: bool = False,
           stop_event: threading.Event | None = None, clock: Clock | None = None,
           on_record: Callable[[wire.MediaRecord], None] | None = None,
           **options: Any) -> ReplayStats:
    """Replay one stream's files through ``outbox`` (a Publisher); thread-safe per stream.

    ``realtime`` paces records by event time (a 10 s clip takes 10 s); otherwise they go
    as fast as the outbox takes them. Event times start at ``start_at_ns`` (default: now).
    Returns when the files end (never with ``loop``) or ``stop_event`` is set.
    """
    src = FileSource(stream_id, video, audio, transcript, loop=loop, **options)
    return replay_source(outbox, src, realtime=realtime, start_at_ns=start_at_ns,
                         stop_event=stop_event, clock=clock, on_record=on_record)


def replay_source(outbox: Outbox, src: FileSource, *, realtime: bool = True,
                  start_at_ns: int | None = None, stop_event: threading.Event | None = None,
                  clock: Clock | None = None,
                  on_record: Callable[[wire.MediaRecord], None] | None = None,
                  max_ahead_ms: int | None = None) -> ReplayStats:
    """:func:`replay` for an already opened (validated) :class:`FileSource`.

    ``max_ahead_ms``: how far ahead of now the broker takes event times (the topics'
    ``message.timestamp.after.max.ms``). Without ``realtime``, a record that would be
    further ahead waits until it is not (a long clip or ``--loop`` sent fast runs ahead
    of the clock by its length), instead of being refused."""
    clock = clock or Clock()
    origin = clock.now_ns() if start_at_ns is None else start_at_ns
    pace0 = clock.now_ns()
    if not realtime and origin - pace0 > FUTURE_LIMIT_NS:  # realtime: records wait
        log.warning("event times start %.1f h ahead of now: brokers refuse records more than "
                    "message.timestamp.after.max.ms ahead (1 h by default since Kafka 4.0)",
                    (origin - pace0) / 3600 / NS_PER_S)
    if realtime and origin > pace0:
        # a start in the future is waited for: a live source sends a record when its event
        # time has come, never ahead of it (latencies measured downstream depend on it)
        pace0 = origin
    # what the broker takes, less a margin for the clocks of this host and the broker's
    ahead_ns = None if max_ahead_ms is None else max(0, max_ahead_ms - 60_000) * 1_000_000
    for due, rec in src.records(origin):
        if stop_event is not None and stop_event.is_set():
            break
        if realtime and not clock.wait_until(pace0 + (due - origin), stop_event):
            break
        if (not realtime and ahead_ns is not None and due - clock.now_ns() > ahead_ns
                and not clock.wait_until(due - ahead_ns, stop_event)):
            break
        outbox.publish(rec)
        src.stats.count(rec)
        if on_record is not None:
            on_record(rec)
    return src.stats


@dataclass(frozen=True)
class ReplaySpec:
    stream_id: str
    video: str | Path | None = None
    audio: str | Path | None = None
    transcript: str | Path | None = None


def replay_many(outbox: Outbox, specs: Iterable[ReplaySpec], *, realtime: bool = True,
                start_at_ns: int | None = None, loop: bool = False,
                stop_event: threading.Event | None = None, **options: Any) -> list[ReplayStats]:
    """Replay several streams at once, one thread each, sharing one clock origin.

    Every stream's files are opened first (a missing one fails before any stream
    starts); a stream that fails later stops the others (``stop_event`` is set), and its
    error is raised here."""
    specs = list(specs)
    sources = [FileSource(s.stream_id, s.video, s.audio, s.transcript, loop=loop, **options)
               for s in specs]
    stop = stop_event if stop_event is not None else threading.Event()
    clock = Clock()
    origin = clock.now_ns() if start_at_ns is None else start_at_ns
    results: list[ReplayStats | None] = [None] * len(specs)
    errors: list[BaseException] = []

    def one(i: int, src: FileSource) -> None:
        try:
            results[i] = replay_source(outbox, src, realtime=realtime, start_at_ns=origin,
                                       stop_event=stop, clock=clock)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)
            stop.set()  # with --loop the others would run on forever

    threads = [threading.Thread(target=one, args=(i, src), name=f"replay-{src.stream_id}",
                                daemon=True) for i, src in enumerate(sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------
# transcript lines (stdin)
# ---------------------------------------------------------------------------------------


@dataclass
class TranscriptStats:
    segments: int = 0
    partial: int = 0  # of which final=false
    issues: list[ParseIssue] = field(default_factory=list)


def _utf8_line(raw: str | bytes) -> str:
    """``raw`` as text; LineError when it is not UTF-8 (bytes that do not decode, or text
    read with surrogateescape that carries undecodable bytes as surrogates)."""
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineError(f"not UTF-8 (bad byte at column {e.start + 1})") from None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LineError(f"not UTF-8 (bad byte at column {e.start + 1})") from None
    return raw


def publish_transcript_lines(writer: StreamWriter, lines: Iterable[str | bytes], *,
                             jsonl: bool = False, max_span_ns: int = 5 * NS_PER_S,
                             source: str = "<stdin>") -> TranscriptStats:
    """Publish transcript lines as they arrive.

    Plain text: each line is a final segment ending at its arrival and starting at the
    previous line's arrival (at most ``max_span_ns`` earlier). JSONL: each line is a
    segment object; its span is used as given (absolute epoch time) or, when absent,
    stamped like a text line. Lines are UTF-8 (bytes, or text); bad lines, also those
    that are not UTF-8, are logged with their number and skipped.
    """
    stats = TranscriptStats()
    prev = writer.clock.now_ns()
    for no, raw in enumerate(lines, start=1):
        arrival = writer.clock.now_ns()
        start = max(prev, arrival - max_span_ns)
        prev = arrival  # a blank line too says "nothing was said before this"
        try:
            line = _utf8_line(raw).rstrip("\r\n")
        except LineError as e:
            issue = ParseIssue(source, no, f"{e}; line skipped")
            log.warning("transcript %s", issue)
            stats.issues.append(issue)
            continue
        if not line.strip():
            continue
        if jsonl:
            try:
                cue = parse_json_cue(line, no)
            except LineError as e:
                issue = ParseIssue(source, no, f"{e}; line skipped")
                log.warning("transcript %s", issue)
                stats.issues.append(issue)
                continue
        else:
            cue = Cue(None, None, line)
        if cue.start_ns is None or cue.end_ns is None:
            span = (start, arrival)
        else:
            span = (cue.start_ns, cue.end_ns)
        writer.text(cue.text, *span, final=cue.final, confidence=cue.confidence, lang=cue.lang)
        stats.segments += 1
        stats.partial += not cue.final
    return stats


def stdin_lines(stream: Any, stop: threading.Event) -> Iterator[Any]:
    """Lines from a blocking stream, ending at EOF or when ``stop`` is set.

    A daemon thread does the blocking reads so a signal can end the loop at once.
    """
    lines: queue.Queue[Any] = queue.Queue()
    eof = object()

    def reader() -> None:
        try:
            for line in stream:
                lines.put(line)
        finally:
            lines.put(eof)

    threading.Thread(target=reader, name="stdin-reader", daemon=True).start()
    while not stop.is_set():
        try:
            item = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if item is eof:
            return
        yield item
