"""Tiles' pictures: each stream's newest frame, decoded and downscaled to a small JPEG at
most a few times a second.

Decoding is the only heavy work the view does, so it never runs on the event loop: the
server hands :func:`thumbnail` to a thread pool (OpenCV releases the GIL while it
decodes, resizes and encodes). :class:`FrameThrottle` decides what to decode: only the
newest frame of a stream, at most ``fps`` per stream, and a bounded number at once, so a
camera at 30 frames/s costs the view no more than one at 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from streamproc.wire.codec import WireError, png_size
from streamproc.wire.jpeg import JpegError
from streamproc.wire.jpeg import check_structure as check_jpeg_structure

#: A thumbnail's largest size: a tile is about this wide on a desktop screen.
THUMB_WIDTH = 320
THUMB_HEIGHT = 240
THUMB_QUALITY = 75
#: Frames being decoded at once, across all streams (the pool's queue stays this short).
MAX_IN_FLIGHT = 4

# libjpeg scales by 1/2, 1/4 or 1/8 while it decodes, far cheaper than a full decode
# followed by a resize: a 1080p frame decodes at 1/4 for a 320-wide tile.
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(frozen=True, slots=True)
class Thumbnail:
    jpeg: bytes
    width: int
    height: int


def thumbnail(data: bytes, fmt: str, max_pixels: int, max_width: int = THUMB_WIDTH,
              max_height: int = THUMB_HEIGHT, quality: int = THUMB_QUALITY) -> Thumbnail:
    """An encoded frame -> a JPEG at most ``max_width`` x ``max_height``, aspect kept.

    The image's own header is read first (as the worker's door does), so a frame of more
    than ``max_pixels`` is refused before anything allocates it, and a large JPEG is
    decoded at a reduced scale. Raises ValueError when the bytes do not decode. Blocking:
    call it from a thread.
    """
    try:
        width, height = check_jpeg_structure(data) if fmt == "jpeg" else png_size(data)
    except (JpegError, WireError) as e:
        raise ValueError(f"not a decodable {fmt} image: {e}") from None
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} is over max_frame_pixels={max_pixels}")
    flag = cv2.IMREAD_COLOR
    if fmt == "jpeg":
        for factor, reduced in _REDUCED:
            if width // factor >= max_width and height // factor >= max_height:
                flag = reduced
                break
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError(f"not a decodable {fmt} image ({len(data)} bytes)")
    h, w = img.shape[:2]
    scale = min(1.0, max_width / w, max_height / h)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode the thumbnail")
    return Thumbnail(buf.tobytes(), int(img.shape[1]), int(img.shape[0]))


@dataclass(slots=True)
class PendingFrame:
    """The newest undecoded frame of a stream."""

    data: bytes
    fmt: str
    ts_ns: int


class FrameThrottle:
    """Which frames to decode now: per stream only the newest one, at most ``fps`` per
    stream, at most ``max_in_flight`` at once. Times are monotonic seconds."""

    def __init__(self, fps: float, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.interval = 1.0 / fps
        self.max_in_flight = max_in_flight
        self._pending: dict[str, PendingFrame] = {}
        self._next: dict[str, float] = {}
        self._in_flight: set[str] = set()

    def offer(self, sid: str, frame: PendingFrame) -> None:
        """A frame arrived; it replaces the stream's undecoded one, if any."""
        old = self._pending.get(sid)
        if old is None or frame.ts_ns >= old.ts_ns:
            self._pending[sid] = frame

    def due(self, now: float) -> list[tuple[str, PendingFrame]]:
        """Frames to decode now (marked in flight until :meth:`done`)."""
        out: list[tuple[str, PendingFrame]] = []
        room = self.max_in_flight - len(self._in_flight)
        if room <= 0:
            return out
        # the streams that waited longest first, so none starves when many are due
        for sid in sorted(self._pending, key=lambda s: self._next.get(s, 0.0)):
            if len(out) >= room:
                break
            if sid in self._in_flight or self._next.get(sid, 0.0) > now:
                continue
            out.append((sid, self._pending.pop(sid)))
            self._in_flight.add(sid)
            self._next[sid] = now + self.interval
        return out

    def done(self, sid: str) -> None:
        self._in_flight.discard(sid)

    def forget(self, sid: str) -> None:
        self._pending.pop(sid, None)
        self._next.pop(sid, None)

    @property
    def pending(self) -> int:
        return len(self._pending)
