"""The door's JPEG check (streamproc.wire.jpeg) against what OpenCV's libjpeg actually decodes."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from streamproc.wire import codec as wire
from streamproc.wire.jpeg import JpegError, check_structure


def _decodes(data: bytes) -> bool:
    """Whether the model's preprocessing can decode it (wire.decode_image's flags)."""
    try:
        return wire.decode_image(data) is not None
    except (wire.WireError, cv2.error):
        return False


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    smooth = np.dstack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256]).astype(np.uint8)
    smooth[::7] = rng.integers(0, 255, smooth[::7].shape, np.uint8)
    noise = rng.integers(0, 256, (240, 320, 3), np.uint8)  # W1's frames: the worst case
    return [smooth, noise, cv2.cvtColor(smooth, cv2.COLOR_BGR2GRAY), smooth[:37, :53]]


_OPENCV_PARAMS = [
    [], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], [cv2.IMWRITE_JPEG_OPTIMIZE, 1],
    [cv2.IMWRITE_JPEG_RST_INTERVAL, 3], [cv2.IMWRITE_JPEG_QUALITY, 30],
    [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
    [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422],
    [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 2],
]
SOURCES = [cv2.imencode(".jpg", im, p)[1].tobytes() for im in _images() for p in _OPENCV_PARAMS]


def _pil(img: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).convert(mode).save(out, "JPEG", **kw)
    return out.getvalue()


def _without_tables(data: bytes) -> bytes:
    """The same JPEG with its Huffman tables (DHT) before the first scan removed, as
    Motion-JPEG cameras send frames."""
    out, i = bytearray(data[:2]), 2
    while data[i + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", data, i + 2)
        if data[i + 1] != 0xC4:
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out + data[i:])


def test_every_intact_jpeg_passes_with_its_size() -> None:
    smooth = _images()[0]
    others = [_pil(smooth), _pil(smooth, progressive=True), _pil(smooth, optimize=True),
              _pil(smooth, subsampling=0), _pil(smooth, quality=95, comment=b"camera 3"),
              _pil(smooth, exif=Image.Exif().tobytes()), _pil(smooth, "CMYK"),
              _pil(smooth, "L", progressive=True),
              _without_tables(SOURCES[0]),  # sequential: libjpeg uses the standard tables
              SOURCES[0] + b"\x00" * 100]  # bytes after the end-of-image marker are ignored
    for data in SOURCES + others:
        img = wire.decode_image(data)
        assert check_structure(data) == (img.shape[1], img.shape[0])


def test_exif_orientation_is_ignored_so_the_frame_is_as_its_headers_say() -> None:
    """OpenCV turns a JPEG tagged with orientation 5-8 on its side unless told not to; a
    frame is used as stored, sp-w x sp-h."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _pil(_images()[0][:9, :17], exif=exif.tobytes())
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (17, 9, 3)
    assert check_structure(data) == (17, 9)
    frame = wire.decode(wire.encode(wire.VideoFrame("cam", 0, 0, data, "jpeg", 17, 9)))
    assert frame.image().shape == (9, 17, 3)


def test_more_pixels_than_opencv_decodes_is_rejected() -> None:
    d = bytearray(SOURCES[0])
    k = d.find(b"\xff\xc0")
    d[k + 5:k + 9] = struct.pack(">HH", 32768, 32769)  # height, width: over 2**30 pixels
    assert not _decodes(bytes(d))
    with pytest.raises(JpegError, match="over OpenCV's limit"):
        check_structure(bytes(d))


def _damage(data: bytes, rng: np.random.Generator, how: int) -> bytes:
    d = bytearray(data)
    if how == 0:  # the headers and tables
        for _ in range(int(rng.integers(1, 3))):
            d[int(rng.integers(0, min(700, len(d))))] = int(rng.integers(0, 256))
    elif how == 1:  # anywhere
        for _ in range(int(rng.integers(1, 4))):
            d[int(rng.integers(0, len(d)))] = int(rng.integers(0, 256))
    elif how == 2:  # a stretch lost
        a = int(rng.integers(2, len(d) - 2))
        d = d[:a] + d[min(len(d) - 2, a + int(rng.integers(1, 1500))):]
    elif how == 3:  # cut short
        d = d[:int(rng.integers(2, len(d)))]
    else:  # a stray marker
        a = int(rng.integers(2, len(d)))
        d = d[:a] + bytes([0xFF, int(rng.integers(0, 256))]) + d[a:]
    return bytes(d)


def test_every_damaged_jpeg_opencv_cannot_decode_is_rejected() -> None:
    """No false accept: a frame past the door always decodes in the model. The check may be
    stricter (a JPEG cut short decodes, grey-filled, but is still refused)."""
    rng = np.random.default_rng(1)
    undecodable = rejected_decodable = 0
    for i in range(3000):
        data = _damage(SOURCES[i % len(SOURCES)], rng, i % 5)
        try:
            check_structure(data)
            passed = True
        except JpegError as e:
            passed = False
            assert str(e)
        decodes = _decodes(data)
        assert decodes or not passed, f"damaged JPEG {i} passed the check but does not decode"
        undecodable += not decodes
        rejected_decodable += decodes and not passed
    assert undecodable > 600, undecodable  # the corpus really exercises libjpeg's failures
    assert rejected_decodable < 600, rejected_decodable


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d[:-2], "truncated: no end-of-image marker"),
        (lambda d: b"\x00" + d[1:], "no FFD8 start-of-image marker"),
        (lambda d: d.replace(b"\xff\xc4", b"\xff\xcc", 1), "arithmetic-coded"),
        (lambda d: d.replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1), "12-bit"),
        (lambda d: d[:2] + b"\xff\xd9", "end-of-image marker before any image data"),
        (lambda d: d.replace(b"\xff\xc4", b"\xff\x07\xff\xc4", 1), "unknown marker 0x07"),
    ],
)
def test_reasons_name_what_is_wrong(change, message) -> None:
    data = SOURCES[0]
    assert data.startswith(b"\xff\xd8") and b"\xff\xc0\x00\x11\x08" in data
    with pytest.raises(JpegError, match=message):
        check_structure(change(data))


def test_a_progressive_jpeg_without_its_tables_is_rejected() -> None:
    """libjpeg-turbo substitutes standard Huffman tables in sequential scans only."""
    progressive = SOURCES[1]
    assert _decodes(progressive) and not _decodes(_without_tables(progressive))
    with pytest.raises(JpegError, match="Huffman table"):
        check_structure(_without_tables(progressive))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SOURCES), st.integers(0, 10**6), st.binary(max_size=40))
def test_arbitrary_damage_raises_only_jpeg_error(source, at, junk) -> None:
    at %= len(source)
    data = source[:at] + junk + source[at + len(junk) // 2:]
    try:
        check_structure(data)
    except JpegError:
        return
    assert _decodes(data)


def test_a_known_header_decides_nothing_the_full_check_would_not() -> None:
    """Frames sharing a header that already passed skip its tables; every answer (size or
    refusal, and its reason) is still the full check's."""
    from streamproc.wire import jpeg

    rng = np.random.default_rng(2)
    for source in SOURCES:
        assert check_structure(source) == jpeg._check(source)  # the header is now known
        for i in range(60):
            data = _damage(source, rng, i % 5)
            try:
                got: object = check_structure(data)
            except JpegError as e:
                got = str(e)
            try:
                want: object = jpeg._check(data)
            except JpegError as e:
                want = str(e)
            assert got == want, i
    assert jpeg._PASSED, "single-scan frames were remembered"
