"""Wire format version 1 (docs/design.md §2): typed records <-> Kafka records.

Metadata rides in record headers and the value is the payload itself, so frames are
never base64-inflated and ``kcat -J`` shows readable headers. Every decode failure is a
:class:`WireError` whose message says which header or field, what was expected and
what came, so a dead letter's reason is enough to fix the producer. No pickle: values
are raw media, PCM or UTF-8 JSON.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from streamproc.config import MODALITIES
from streamproc.frozen import quick_init
from streamproc.wire.jpeg import JpegError
from streamproc.wire.jpeg import check_structure as check_jpeg_structure

WIRE_VERSION = 1
VIDEO_FORMATS = ("jpeg", "png")
AUDIO_FORMATS: dict[str, np.dtype[Any]] = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
MAX_STREAM_ID_BYTES = 255
MAX_IMAGE_SIDE = 16384
# Audio rates outside this range are refused at the door: telephony to studio. A rate of
# 1 Hz would make a 55-sample chunk span 55 s and hold every window of it open.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 32
# Most word timings one transcript segment may carry: a 30 s segment of fast speech has
# under 200 words, and the door checks every word of a record one by one.
MAX_WORDS = 10_000
NS_PER_S = 1_000_000_000
INT64_MAX = 2**63 - 1

Headers = tuple[tuple[str, bytes], ...]


class DeadLetterKind(StrEnum):
    """Why a record went to the dead-letter topic: its ``sp-error-kind`` header."""

    DECODE = "decode"  # not wire format v1 (WireError)
    LATE = "late"  # every window it belongs to had closed
    OVERSIZE = "oversize"  # over the value-size or pixel limit
    CAPACITY = "capacity"  # dropped by a buffer cap, or a span longer than allowed
    CLOCK = "clock"  # event time too far ahead of the worker's clock
    INTERNAL = "internal"  # the worker failed on it (a bug, not the producer's fault)
    PARTITION = "partition"  # its key belongs to another partition


class WireError(ValueError):
    """A record that does not follow wire format v1. ``str(err)`` is for people."""

    def __init__(self, reason: str, header: str | None = None,
                 kind: DeadLetterKind = DeadLetterKind.DECODE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header
        self.kind = kind  # DECODE, or OVERSIZE for the size limits


@quick_init
@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from: provenance for windows and dead letters."""

    topic: str
    partition: int
    offset: int


@quick_init
@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """A Kafka record as any client sees it: what we produce and what we consume."""

    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp_ms: int | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1

    @property
    def source(self) -> Source:
        return Source(self.topic, self.partition, self.offset)

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @classmethod
    def from_client(cls, msg: Any) -> KafkaRecord:
        """Adapt a kafka-python or aiokafka ``ConsumerRecord`` (or faust ``Message``)."""
        ts = msg.timestamp
        if isinstance(ts, float):  # faust hands over seconds (ms / 1000.0); round-trips exactly
            ts = round(ts * 1000.0)
        return cls(msg.key, msg.value, normalize_headers(msg.headers), ts, msg.topic,
                   msg.partition, msg.offset)


def normalize_headers(headers: Any) -> Headers:
    """Headers as a tuple of (str, bytes), whatever shape the client handed over."""
    if headers is None:
        return ()
    if type(headers) is list or type(headers) is tuple:
        # aiokafka's and confluent-kafka's shape already: kept as it is, without a new
        # pair per header (about 1 µs here against 4.7 for a W1 frame's seven)
        for kv in headers:
            if type(kv) is not tuple or len(kv) != 2 or type(kv[0]) is not str \
                    or type(kv[1]) is not bytes:
                break
        else:
            return tuple(headers)
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for k, v in items:
        if isinstance(k, bytes):
            k = k.decode("utf-8", "replace")
        out.append((str(k), b"" if v is None else bytes(v)))
    return tuple(out)


# ---------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------


@quick_init
@dataclass(frozen=True, slots=True, weakref_slot=True)  # decoded copies refer to it weakly
class VideoFrame:
    """One encoded frame. ``ts_ns`` is its capture time on the wall clock."""

    stream_id: str
    ts_ns: int
    seq: int
    data: bytes
    fmt: str = "jpeg"
    width: int = 0
    height: int = 0
    source: Source | None = field(default=None, compare=False)

    modality: Literal["video"] = field(default="video", init=False, repr=False, compare=False)

    @property
    def end_ns(self) -> int:
        return self.ts_ns

    @classmethod
    def from_image(
        cls,
        stream_id: str,
        ts_ns: int,
        seq: int,
        image: np.ndarray,
        fmt: str = "jpeg",
        quality: int = 90,
    ) -> VideoFrame:
        """Encode a BGR (or grey) uint8 image with OpenCV."""
        return cls(stream_id, ts_ns, seq, encode_image(image, fmt, quality), fmt,
                   int(image.shape[1]), int(image.shape[0]))

    def image(self) -> np.ndarray:
        """Decode to a BGR uint8 array; raises WireError when the bytes do not decode."""
        return decode_image(self.data, self.fmt)


@quick_init
@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Interleaved PCM spanning ``[ts_ns, ts_ns + n_samples / sample_rate)``."""

    stream_id: str
    ts_ns: int
    seq: int
    data: bytes
    fmt: str = "s16le"
    sample_rate: int = 16000
    channels: int = 1
    source: Source | None = field(default=None, compare=False)

    modality: Literal["audio"] = field(default="audio", init=False, repr=False, compare=False)

    @property
    def n_samples(self) -> int:
        return len(self.data) // (AUDIO_FORMATS[self.fmt].itemsize * self.channels)

    @property
    def end_ns(self) -> int:
        return self.ts_ns + samples_to_ns(self.n_samples, self.sample_rate)

    @classmethod
    def from_samples(
        cls,
        stream_id: str,
        ts_ns: int,
        seq: int,
        samples: np.ndarray,
        sample_rate: int,
        fmt: str = "s16le",
    ) -> AudioChunk:
        """From float samples in [-1, 1] (or int16), shaped (n,) or (n, channels)."""
        arr = np.asarray(samples)
        if arr.ndim == 1:
            arr = arr[:, None]
        return cls(stream_id, ts_ns, seq, pcm_bytes(arr, fmt), fmt, int(sample_rate),
                   int(arr.shape[1]))

    def samples(self) -> np.ndarray:
        """float32 array shaped (n_samples, channels), full scale = 1.0."""
        return pcm_samples(self.data, self.fmt, self.channels)


@dataclass(frozen=True, slots=True)
class Word:
    """One recognised word timed at ``[start_ns, end_ns)`` inside its segment's span."""

    text: str
    start_ns: int
    end_ns: int

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "start_ns": self.start_ns, "end_ns": self.end_ns}


@quick_init
@dataclass(frozen=True, slots=True)
class TranscriptSegment:
    """A transcript span ``[start_ns, end_ns)``; partial (``final=False``) ones may be revised.

    ``words``: optional word timings inside the span, starts and ends in time order; with
    them the aligner gives each window only the words that overlap it (docs/alignment.md).
    """

    stream_id: str
    seq: int
    text: str
    start_ns: int
    end_ns: int
    final: bool = True
    confidence: float | None = None
    lang: str | None = None
    source: Source | None = field(default=None, compare=False)
    # after source, so callers that pass the older fields by position keep working
    words: tuple[Word, ...] | None = None

    modality: Literal["text"] = field(default="text", init=False, repr=False, compare=False)

    @property
    def ts_ns(self) -> int:
        return self.start_ns

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"text": self.text, "start_ns": self.start_ns,
                             "end_ns": self.end_ns, "final": self.final}
        if self.confidence is not None:
            d["confidence"] = self.confidence
        if self.lang is not None:
            d["lang"] = self.lang
        if self.words is not None:
            d["words"] = [w.to_json() for w in self.words]
        return d


MediaRecord = VideoFrame | AudioChunk | TranscriptSegment


# ---------------------------------------------------------------------------------------
# media helpers (OpenCV / PCM)
# ---------------------------------------------------------------------------------------


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    import cv2

    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video format must be one of {VIDEO_FORMATS}, got {fmt!r}")
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes, fmt: str = "jpeg") -> np.ndarray:
    """BGR uint8, as stored: an EXIF orientation tag is ignored, so the array is always
    sp-w x sp-h (OpenCV would otherwise turn a phone photo tagged 5-8 on its side)."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise WireError(f"value is not a decodable {fmt} image ({len(data)} bytes)")
    return img


def pcm_bytes(samples: np.ndarray, fmt: str = "s16le") -> bytes:
    """Interleave (n, channels) samples as PCM; floats are clipped to [-1, 1]."""
    if fmt not in AUDIO_FORMATS:
        raise ValueError(f"audio format must be one of {tuple(AUDIO_FORMATS)}, got {fmt!r}")
    arr = np.asarray(samples)
    if fmt == "s16le":
        if arr.dtype != np.int16:
            arr = np.clip(np.round(arr.astype(np.float64) * 32767.0), -32768, 32767)
        return arr.astype("<i2").tobytes()
    if arr.dtype == np.int16:
        arr = arr.astype(np.float32) / 32768.0
    return arr.astype("<f4").tobytes()


def pcm_samples(data: bytes, fmt: str, channels: int) -> np.ndarray:
    """Interleaved PCM -> float32 (n_samples, channels), full scale = 1.0.

    Also used on several chunks' bytes joined, so the aligner decodes a run at once.
    """
    out = np.frombuffer(data, dtype=AUDIO_FORMATS[fmt]).astype(np.float32)
    if fmt == "s16le":
        out /= 32768.0
    return out.reshape(-1, channels)


def samples_to_ns(n: int, sample_rate: int) -> int:
    """Duration of n samples in integer nanoseconds (floor), the same everywhere."""
    return n * NS_PER_S // sample_rate


def _check_image(data: bytes, fmt: str, width: int, height: int) -> None:
    """The door check: a frame the worker admits is one OpenCV will decode (a PNG: one
    whose chunks libpng reads), checked without decoding it (the event loop runs this
    for every frame).

    A JPEG's markers, tables and scans are checked the way libjpeg reads them
    (streamproc.wire.jpeg: about 15 µs for a 50 KB frame, against 340 µs to decode it even at
    1/8 scale); a PNG's chunks the way libpng reads them (:func:`png_size`).
    """
    if fmt == "jpeg":
        try:
            size = check_jpeg_structure(data)
        except JpegError as e:
            raise WireError(f"value is not a decodable JPEG ({len(data)} bytes): {e}") from None
    else:
        size = png_size(data)
    if size != (width, height):
        raise WireError(
            f"image is {size[0]}x{size[1]} but headers sp-w/sp-h say {width}x{height}", "sp-w"
        )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG whose chunks libpng reads, else :class:`WireError`.

    Checks the signature, the header's fields, every chunk's length and the CRC of every
    critical chunk (libpng stops at a bad one), their order, and that IEND ends the value.
    The compressed pixels are not inflated: that is decoding, which never runs on the
    event loop. A PNG whose pixel data is damaged behind valid CRCs passes here and is
    masked in its window like a dropped frame when the model's preprocessing decodes it.
    """
    n = len(data)
    if not data.startswith(_PNG_SIGNATURE) or n < 33:
        raise WireError("value is not a PNG (bad signature)", "sp-fmt")
    if data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise WireError("PNG does not start with a 13-byte IHDR chunk")
    width, height, depth, color, compression, filtering, interlace = struct.unpack_from(
        ">IIBBBBB", data, 16)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise WireError(f"PNG header says {width}x{height} pixels")
    if depth not in _PNG_DEPTHS.get(color, ()):
        raise WireError(f"PNG colour type {color} with bit depth {depth} is not valid")
    if compression or filtering or interlace > 1:
        raise WireError(f"PNG header has compression {compression}, filter {filtering}, "
                        f"interlace {interlace}")
    i, seen = 8, []
    while True:
        if i + 12 > n:
            raise WireError(f"PNG is truncated: no IEND chunk in its {n} bytes")
        length = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        end = i + 12 + length
        if length >= 2**31 or end > n:
            raise WireError(f"PNG is truncated: chunk {kind!r} at byte {i} needs {length} "
                            f"bytes, {n - i - 12} left")
        if not kind.isalpha():
            raise WireError(f"PNG chunk at byte {i} has an invalid type {kind!r}")
        if kind[0] & 0x20 == 0:  # upper-case first letter: critical, libpng must know it
            if kind not in _PNG_CRITICAL:
                raise WireError(f"PNG has an unknown critical chunk {kind!r} at byte {i}")
            if zlib.crc32(memoryview(data)[i + 4:end - 4]) != int.from_bytes(
                    data[end - 4:end], "big"):
                raise WireError(f"PNG chunk {kind.decode()} at byte {i} fails its CRC "
                                "(damaged)")
            if (kind == b"IHDR" and i != 8) or (kind == b"PLTE" and b"IDAT" in seen):
                raise WireError(f"PNG chunk {kind.decode()} at byte {i} is out of order")
            seen.append(kind)
        if kind == b"IEND":
            break
        i = end
    if b"IDAT" not in seen:
        raise WireError("PNG has no image data (IDAT chunk)")
    if color == 3 and b"PLTE" not in seen[:seen.index(b"IDAT")]:
        raise WireError("palette PNG has no PLTE chunk before its image data")
    if end != n:
        raise WireError(f"PNG has {n - end} bytes after its IEND chunk")
    return width, height


# ---------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------


def _h(v: int | str) -> bytes:
    return str(v).encode("ascii")


_VERSION_HEADER = ("sp-v", str(WIRE_VERSION).encode("ascii"))
_MOD_HEADERS = {m: ("sp-mod", m.encode("ascii")) for m in MODALITIES}
_FMT_BYTES = {f: f.encode("ascii") for f in (*VIDEO_FORMATS, *AUDIO_FORMATS)}


def _fmt_bytes(fmt: str) -> bytes:
    return _FMT_BYTES.get(fmt) or fmt.encode("ascii")


def encode_parts(record: MediaRecord) -> tuple[bytes, bytes, list[tuple[str, bytes]], int]:
    """(key, value, headers, timestamp_ms): :func:`encode` without the KafkaRecord, in the
    list form kafka-python's ``send`` takes.

    The producer's hot path (thousands of frames a second): constant headers are built
    once, numbers formatted with bytes %-formatting.
    """
    if isinstance(record, VideoFrame):
        fmt = _fmt_bytes(record.fmt)
        headers = [_VERSION_HEADER, _MOD_HEADERS["video"], ("sp-ts", b"%d" % record.ts_ns),
                   ("sp-seq", b"%d" % record.seq), ("sp-fmt", fmt),
                   ("sp-w", b"%d" % record.width), ("sp-h", b"%d" % record.height)]
        value = record.data
    elif isinstance(record, AudioChunk):
        fmt = _fmt_bytes(record.fmt)
        headers = [_VERSION_HEADER, _MOD_HEADERS["audio"], ("sp-ts", b"%d" % record.ts_ns),
                   ("sp-seq", b"%d" % record.seq), ("sp-fmt", fmt),
                   ("sp-sr", b"%d" % record.sample_rate), ("sp-ch", b"%d" % record.channels)]
        value = record.data
    elif isinstance(record, TranscriptSegment):
        headers = [_VERSION_HEADER, _MOD_HEADERS["text"], ("sp-ts", b"%d" % record.ts_ns),
                   ("sp-seq", b"%d" % record.seq)]
        value = json.dumps(record.to_json(), ensure_ascii=False).encode("utf-8")
    else:
        raise TypeError(f"cannot encode {type(record).__name__}")
    return record.stream_id.encode("utf-8"), value, headers, record.ts_ns // 1_000_000


def encode(record: MediaRecord) -> KafkaRecord:
    """Typed record -> Kafka record (key = stream id, timestamp = event time in ms)."""
    key, value, headers, ts_ms = encode_parts(record)
    return KafkaRecord(key, value, tuple(headers), ts_ms)


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------


def _headers(rec: KafkaRecord) -> dict[str, bytes]:
    out = dict(rec.headers)
    if len(out) != len(rec.headers):
        seen: set[str] = set()
        for k, _ in rec.headers:
            if k in seen:
                raise WireError(f"header {k} appears twice", k)
            seen.add(k)
    return out


def _text_header(h: dict[str, bytes], name: str) -> str:
    if name not in h:
        raise WireError(f"missing header {name}", name)
    try:
        return h[name].decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"header {name} is not ASCII: {h[name][:32]!r}", name) from None


def _int_header(h: dict[str, bytes], name: str, lo: int = 0, hi: int | None = None) -> int:
    raw = h.get(name)
    # bytes.isdigit knows ASCII digits only: the header as it should be, read without
    # decoding it (every record has four or five of these)
    if raw is not None and raw.isdigit() and (len(raw) == 1 or raw[0] != 0x30):
        v = int(raw)
        if v >= lo and (hi is None or v <= hi):
            return v
    return _checked_int_header(h, name, lo, hi)


def _checked_int_header(h: dict[str, bytes], name: str, lo: int, hi: int | None) -> int:
    """:func:`_int_header` for a header that is not as it should be: says why."""
    raw = _text_header(h, name)
    if not raw.isdigit() or (len(raw) > 1 and raw[0] == "0"):
        raise WireError(f"header {name} must be a non-negative ASCII decimal, got {raw[:32]!r}",
                        name)
    v = int(raw)
    if v < lo or (hi is not None and v > hi):
        raise WireError(f"header {name}={v} is out of range [{lo}, {hi}]", name)
    return v


#: Stream ids already checked, by key: a stream's every record has the same key.
_STREAM_IDS: dict[bytes, str] = {}
_STREAM_IDS_MAX = 4096


def stream_id_of(key: bytes | None) -> str:
    if type(key) is bytes:
        sid = _STREAM_IDS.get(key)
        if sid is not None:
            return sid
    if not key:
        raise WireError("record has no key: the key must be the stream id")
    if len(key) > MAX_STREAM_ID_BYTES:
        raise WireError(f"stream id key is {len(key)} bytes; at most {MAX_STREAM_ID_BYTES}")
    try:
        sid = key.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"stream id key is not UTF-8: {key[:32]!r}") from None
    if not sid.isprintable() or sid.strip() != sid:
        raise WireError(f"stream id {sid!r} has control or surrounding space characters")
    if type(key) is bytes:
        if len(_STREAM_IDS) >= _STREAM_IDS_MAX:
            _STREAM_IDS.clear()
        _STREAM_IDS[key] = sid
    return sid


_MODALITY_OF = {m.encode("ascii"): m for m in MODALITIES}
_VIDEO_FORMAT_OF = {f.encode("ascii"): f for f in VIDEO_FORMATS}
_AUDIO_FORMAT_OF = {f.encode("ascii"): f for f in AUDIO_FORMATS}


def decode(
    rec: KafkaRecord,
    *,
    expect_modality: str | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> MediaRecord:
    """Kafka record -> typed record, or WireError saying what is wrong.

    Images are checked to decode (``_check_image``), so a corrupt JPEG is caught at the door
    rather than inside a model batch. ``max_pixels``: frames with more pixels (by their
    sp-w/sp-h, which must match the image's own header) are refused before any check that
    reads the image (kind ``oversize``).
    """
    h = _headers(rec)
    # each text header is first looked up as the bytes it should be; what differs is
    # read again as text to say why
    if h.get("sp-v") != _VERSION_HEADER[1]:
        version = _text_header(h, "sp-v")
        raise WireError(f"unknown wire format version sp-v={version[:16]!r}; this worker reads 1",
                        "sp-v")
    mod = _MODALITY_OF.get(h.get("sp-mod", b""))
    if mod is None:
        got = _text_header(h, "sp-mod")
        raise WireError(f"header sp-mod must be one of {', '.join(MODALITIES)}, got {got[:32]!r}",
                        "sp-mod")
    if expect_modality is not None and mod != expect_modality:
        raise WireError(f"sp-mod={mod} record on the {expect_modality} topic", "sp-mod")
    sid = stream_id_of(rec.key)
    ts = _int_header(h, "sp-ts", 0, INT64_MAX)
    seq = _int_header(h, "sp-seq", 0, INT64_MAX)
    value = rec.value if rec.value is not None else b""
    if max_bytes is not None and len(value) > max_bytes:
        raise WireError(f"value is {len(value)} bytes, over the {max_bytes}-byte limit",
                        kind=DeadLetterKind.OVERSIZE)
    if not value:
        raise WireError(f"{mod} record has an empty value")
    src = rec.source if rec.topic else None

    if mod == "video":
        fmt = _VIDEO_FORMAT_OF.get(h.get("sp-fmt", b""))
        if fmt is None:
            got = _text_header(h, "sp-fmt")
            raise WireError(f"video sp-fmt must be jpeg or png, got {got[:32]!r}", "sp-fmt")
        w = _int_header(h, "sp-w", 1, MAX_IMAGE_SIDE)
        hh = _int_header(h, "sp-h", 1, MAX_IMAGE_SIDE)
        if max_pixels is not None and w * hh > max_pixels:
            raise WireError(f"frame is {w}x{hh} = {w * hh / 1e6:.1f} Mpx, over the limit of "
                            f"{max_pixels / 1e6:.1f} Mpx (max_frame_pixels)", "sp-w",
                            kind=DeadLetterKind.OVERSIZE)
        _check_image(value, fmt, w, hh)
        return VideoFrame(sid, ts, seq, value, fmt, w, hh, src)

    if mod == "audio":
        fmt = _AUDIO_FORMAT_OF.get(h.get("sp-fmt", b""))
        if fmt is None:
            got = _text_header(h, "sp-fmt")
            raise WireError(f"audio sp-fmt must be s16le or f32le, got {got[:32]!r}", "sp-fmt")
        sr = _int_header(h, "sp-sr", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
        ch = _int_header(h, "sp-ch", 1, MAX_CHANNELS)
        frame = AUDIO_FORMATS[fmt].itemsize * ch
        if len(value) % frame:
            raise WireError(
                f"PCM length {len(value)} is not a multiple of {frame} bytes "
                f"({fmt}, {ch} channel(s)): a partial sample"
            )
        if fmt == "f32le" and not np.isfinite(np.frombuffer(value, "<f4")).all():
            raise WireError("f32le PCM holds NaN or infinite samples")
        return AudioChunk(sid, ts, seq, value, fmt, sr, ch, src)

    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"transcript value is not UTF-8 (bad byte at {e.start})") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise WireError(f"transcript value is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise WireError(f"transcript JSON must be an object, got {type(obj).__name__}")
    seg = _segment_from_json(obj, sid, seq, src)
    if seg.start_ns != ts:
        raise WireError(f"sp-ts={ts} differs from the segment's start_ns={seg.start_ns}", "sp-ts")
    return seg


def _segment_from_json(obj: dict, sid: str, seq: int, src: Source | None) -> TranscriptSegment:
    def need(name: str, kinds: tuple[type, ...], what: str) -> Any:
        if name not in obj:
            raise WireError(f"transcript JSON lacks field {name!r}")
        v = obj[name]
        if not isinstance(v, kinds) or (bool not in kinds and isinstance(v, bool)):
            raise WireError(f"transcript field {name!r} must be {what}, got {v!r:.40}")
        return v

    text = need("text", (str,), "a string")
    start = need("start_ns", (int,), "an integer")
    end = need("end_ns", (int,), "an integer")
    final = need("final", (bool,), "true or false") if "final" in obj else True
    if start < 0 or end < start or end > INT64_MAX:
        raise WireError(f"transcript span [{start}, {end}) is not a valid time span")
    conf = obj.get("confidence")
    if conf is not None and (isinstance(conf, bool) or not isinstance(conf, (int, float))
                             or not 0.0 <= conf <= 1.0 or math.isnan(conf)):
        raise WireError(f"transcript confidence must be a number in [0, 1], got {conf!r:.40}")
    lang = obj.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise WireError(f"transcript lang must be a string, got {lang!r:.40}")
    words = obj.get("words")
    return TranscriptSegment(sid, seq, text, start, end, final,
                             None if conf is None else float(conf), lang, src,
                             None if words is None else _words_from_json(words, start, end))


def _words_from_json(raw: Any, start: int, end: int) -> tuple[Word, ...]:
    """The ``words`` list of a transcript segment spanning ``[start, end)``, checked."""
    if not isinstance(raw, list):
        raise WireError(f"transcript field 'words' must be a list, got {raw!r:.40}")
    if len(raw) > MAX_WORDS:
        raise WireError(f"transcript field 'words' has {len(raw)} words; at most {MAX_WORDS}")
    out: list[Word] = []
    prev, prev_end = start, start
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise WireError(f"transcript words[{i}] must be an object, got {item!r:.40}")
        text = _word_field(item, i, "text", str, "a string")
        ws = _word_field(item, i, "start_ns", int, "an integer")
        we = _word_field(item, i, "end_ns", int, "an integer")
        if we < ws:
            raise WireError(f"transcript words[{i}] span [{ws}, {we}) ends before it starts")
        # a zero-length word is the point ws, which a span [start, end) holds only
        # before its end: at the end it would belong to windows its segment is not in
        if ws < start or we > end or (ws == end and start < end):
            raise WireError(f"transcript words[{i}] span [{ws}, {we}) lies outside its "
                            f"segment's span [{start}, {end})")
        # starts and ends both in order: a window's words are then one run of the list,
        # found by bisection (a segment may carry MAX_WORDS words)
        if ws < prev:
            raise WireError(f"transcript words are not in time order: words[{i}] starts at "
                            f"{ws}, before words[{i - 1}] at {prev}")
        if we < prev_end:
            raise WireError(f"transcript words are not in time order: words[{i}] ends at "
                            f"{we}, before words[{i - 1}] at {prev_end}")
        prev, prev_end = ws, we
        out.append(Word(text, ws, we))
    return tuple(out)


def _word_field(item: dict, i: int, name: str, kind: type, what: str) -> Any:
    if name not in item:
        raise WireError(f"transcript words[{i}] lacks field {name!r}")
    v = item[name]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise WireError(f"transcript words[{i}] field {name!r} must be {what}, got {v!r:.40}")
    return v


# ---------------------------------------------------------------------------------------
# predictions
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Prediction:
    """One window's result; ``(stream_id, window_start_ns, rev)`` identifies the record.

    A window may get a *provisional* prediction (``final`` False, ``rev`` 0) before its
    *final* one (``rev`` 1 after a provisional, else 0); later revisions of a final count
    up from there. ``reused``: a final whose scores repeat its provisional's because
    nothing was added since (the model was not called again). The three default to a
    final rev 0, so records written before they existed decode as what they were.
    """

    stream_id: str
    window_start_ns: int
    window_end_ns: int
    label: str
    scores: dict[str, float]
    modalities: dict[str, Any]
    model: dict[str, str]
    emitted_at_ns: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, list] = field(default_factory=dict)
    rev: int = 0
    final: bool = True
    reused: bool = False

    @property
    def key(self) -> tuple[str, int]:
        """The window this prediction is for (every revision of it shares the key)."""
        return (self.stream_id, self.window_start_ns)

    @property
    def revision_key(self) -> tuple[str, int, int]:
        """One prediction record: a replayed copy of a revision has the same one."""
        return (self.stream_id, self.window_start_ns, self.rev)

    def to_json(self) -> dict[str, Any]:
        # a shallow dict: dataclasses.asdict deep-copies every nested dict and list, a
        # cost paid once per window on the worker's event loop for nothing
        return {f: getattr(self, f) for f in _PREDICTION_FIELDS}


_PREDICTION_FIELDS = tuple(f.name for f in fields(Prediction))
_PRED_REQUIRED = {"stream_id": str, "window_start_ns": int, "window_end_ns": int, "label": str,
                  "scores": dict, "modalities": dict, "model": dict, "emitted_at_ns": int}


def encode_prediction(p: Prediction) -> KafkaRecord:
    """Prediction -> record; ``sp-ts`` and ``sp-rev`` let tools see which record it is
    without parsing the JSON."""
    return KafkaRecord(
        key=p.stream_id.encode("utf-8"),
        value=json.dumps(p.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        headers=(_VERSION_HEADER, ("sp-mod", b"prediction"),
                 ("sp-ts", _h(p.window_start_ns)), ("sp-rev", _h(p.rev))),
        timestamp_ms=p.window_start_ns // 1_000_000,
    )


def decode_prediction(rec: KafkaRecord) -> Prediction:
    try:
        obj = json.loads((rec.value or b"").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"prediction value is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("prediction JSON must be an object")
    for name, kind in _PRED_REQUIRED.items():
        if not isinstance(obj.get(name), kind) or (kind is int and isinstance(obj[name], bool)):
            raise WireError(f"prediction field {name!r} must be {kind.__name__}")
    # optional: absent in records written before revisions existed (a final rev 0)
    rev = obj.get("rev", 0)
    if not isinstance(rev, int) or isinstance(rev, bool) or not 0 <= rev <= INT64_MAX:
        raise WireError(f"prediction field 'rev' must be a non-negative int, got {rev!r:.40}")
    for name in ("final", "reused"):
        if name in obj and not isinstance(obj[name], bool):
            raise WireError(f"prediction field {name!r} must be true or false, "
                            f"got {obj[name]!r:.40}")
    known = {k: obj[k] for k in Prediction.__dataclass_fields__ if k in obj}
    return Prediction(**known)


# ---------------------------------------------------------------------------------------
# dead letters
# ---------------------------------------------------------------------------------------

_DEAD_LETTER_VALUES = tuple(k.value for k in DeadLetterKind)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    kind: str  # a DeadLetterKind value; kept as read, so a newer worker's kind still decodes
    source: Source
    original: KafkaRecord


def make_dead_letter(rec: KafkaRecord, reason: str,
                     kind: DeadLetterKind = DeadLetterKind.DECODE) -> KafkaRecord:
    """The original key, value and headers, plus why and where from (docs/design.md §2)."""
    if kind not in _DEAD_LETTER_VALUES:
        raise ValueError(f"dead-letter kind must be one of {_DEAD_LETTER_VALUES}")
    ours = {"sp-error", "sp-error-kind", "sp-src-topic", "sp-src-partition", "sp-src-offset"}
    headers = (
        *((k, v) for k, v in rec.headers if k not in ours),
        ("sp-error", reason.encode("utf-8")),
        ("sp-error-kind", kind.encode("ascii")),
        ("sp-src-topic", rec.topic.encode("utf-8")),
        ("sp-src-partition", _h(rec.partition)),
        ("sp-src-offset", _h(rec.offset)),
    )
    return KafkaRecord(rec.key, rec.value, headers, rec.timestamp_ms)


def decode_dead_letter(rec: KafkaRecord) -> DeadLetter:
    h = dict(rec.headers)
    try:
        reason = h["sp-error"].decode("utf-8")
        kind = h["sp-error-kind"].decode("ascii")
        src = Source(h["sp-src-topic"].decode("utf-8"), int(h["sp-src-partition"]),
                     int(h["sp-src-offset"]))
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise WireError(f"not a streamproc dead letter: {e}") from None
    ours = ("sp-error", "sp-error-kind", "sp-src-topic", "sp-src-partition", "sp-src-offset")
    orig = KafkaRecord(rec.key, rec.value, tuple((k, v) for k, v in rec.headers if k not in ours),
                       rec.timestamp_ms, src.topic, src.partition, src.offset)
    return DeadLetter(reason, kind, src, orig)
