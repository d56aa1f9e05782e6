"""Tile pictures: real JPEG and PNG frames downscaled to thumbnails, and the throttle that
decides which frames are decoded at all."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from streamproc.config import Settings
from streamproc.view.frames import (
    THUMB_HEIGHT,
    THUMB_WIDTH,
    FrameThrottle,
    PendingFrame,
    thumbnail,
)
from streamproc.wire.codec import encode_image

MAX_PIXELS = Settings().max_frame_pixels


def _image(w: int, h: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (0, 0, 255)  # left half red, right half black
    return img


@pytest.mark.parametrize(("w", "h", "fmt"), [(1920, 1080, "jpeg"), (640, 480, "png"),
                                             (160, 120, "jpeg"), (4096, 2160, "jpeg")])
def test_a_frame_becomes_a_small_jpeg_of_the_same_picture(w: int, h: int, fmt: str) -> None:
    thumb = thumbnail(encode_image(_image(w, h), fmt), fmt, MAX_PIXELS)
    assert thumb.width <= THUMB_WIDTH and thumb.height <= THUMB_HEIGHT
    assert abs(thumb.width / thumb.height - w / h) < 0.02  # the aspect is kept
    if w <= THUMB_WIDTH:
        assert (thumb.width, thumb.height) == (w, h)  # never enlarged
    back = cv2.imdecode(np.frombuffer(thumb.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert back.shape[:2] == (thumb.height, thumb.width)
    assert back[thumb.height // 2, thumb.width // 4, 2] > 200  # still red on the left
    assert back[thumb.height // 2, 3 * thumb.width // 4].max() < 50


def test_a_frame_over_the_pixel_limit_is_refused_before_it_is_decoded() -> None:
    for fmt in ("jpeg", "png"):
        data = encode_image(_image(1280, 720), fmt)
        with pytest.raises(ValueError, match="1280x720 is over max_frame_pixels"):
            thumbnail(data, fmt, 1280 * 720 - 1)


def test_an_undecodable_frame_is_a_value_error() -> None:
    data = encode_image(_image(320, 240))
    with pytest.raises(ValueError, match="not a decodable jpeg"):
        thumbnail(data[: len(data) // 2], "jpeg", MAX_PIXELS)
    with pytest.raises(ValueError, match="not a decodable png"):
        thumbnail(data, "png", MAX_PIXELS)


def _pending(ts: int) -> PendingFrame:
    return PendingFrame(b"x", "jpeg", ts)


def test_throttle_decodes_only_the_newest_frame_at_most_fps_per_stream() -> None:
    t = FrameThrottle(fps=2.0, max_in_flight=8)
    for ts in range(10):
        t.offer("cam", _pending(ts))
    t.offer("cam", _pending(3))  # an older frame arriving late does not replace a newer
    (due,) = t.due(0.0)
    assert due[0] == "cam" and due[1].ts_ns == 9
    t.offer("cam", _pending(11))
    assert t.due(0.1) == []  # in flight
    t.done("cam")
    assert t.due(0.3) == []  # 2 fps: not before 0.5 s
    assert [f.ts_ns for _, f in t.due(0.5)] == [11]
    t.done("cam")
    assert t.due(5.0) == []  # nothing new arrived


def test_throttle_bounds_the_frames_in_flight_and_serves_every_stream() -> None:
    t = FrameThrottle(fps=5.0, max_in_flight=4)
    for i in range(10):
        t.offer(f"s{i}", _pending(i))
    first = t.due(0.0)
    assert len(first) == 4 and t.due(0.0) == []
    for sid, _ in first:
        t.done(sid)
    second = t.due(0.0)
    assert len(second) == 4 and not {s for s, _ in first} & {s for s, _ in second}
    t.forget("s9")
    for sid, _ in second:
        t.done(sid)
    assert [s for s, _ in t.due(0.0)] == ["s8"]  # s9 was forgotten
    assert t.pending == 0
