"""Hostile input for the fuzz-run test (test_fuzz): valid streams paced on the wall clock,
a few thousand bad records of every category interleaved with them, the rule each category
must follow, and readers that survive whatever the topics hold.

Every bad record carries its :class:`Category`; :data:`RULES` says what the worker must do
with a record of that category (dead-letter it with some kinds, use it in a window, skip
it). Records are sent with kafka-python (any header name: worker_helpers.RawName writes bytes
that are not UTF-8), confluent-kafka with its default partitioner (a stream split across
partitions) and a confluent-kafka transactional producer (committed and aborted batches).
"""

from __future__ import annotations

import dataclasses
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import cv2
import numpy as np
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as CkTopicPartition
from worker_helpers import (
    SEG_MS,
    KafkaSender,
    RawName,
    camera_frame,
    confluent_producer,
    keys_on_partitions,
    paced,
    partition_of,
    send_confluent,
    stream_plan,
    tone_chunk,
)

from streamproc.config import Settings
from streamproc.testing import MS, S, segment
from streamproc.wire import codec as wire

# Send delay after a record's span ends, below each modality's lateness
# (worker_helpers.LATENESS_MS), so a valid record is never late however the jitter
# reorders it.
JITTER_MS = {"video": 120, "audio": 40, "text": 200}
LIVE_SEQ = 10_000_000  # bad records on a live key take sequence numbers it never uses


class Category(Enum):
    """What is wrong with a bad record."""

    HEADER_MISSING = "header missing"
    HEADER_VALUE = "header value of any bytes"
    HEADER_DUPLICATE = "header twice"
    HEADER_EXTRA = "extra headers, any UTF-8 name"
    HEADER_NAME_NOT_UTF8 = "header name not UTF-8"
    KEY = "bad key"
    RANDOM = "random bytes everywhere"
    JPEG_TRUNCATED = "truncated JPEG"
    JPEG_CORRUPT = "JPEG with damaged bytes"
    IMAGE_16384 = "JPEG or PNG claiming 16384x16384"
    PNG_DIMENSIONS = "PNG with absurd or mismatched IHDR dimensions"
    OVERSIZE = "value over the size limit"
    PCM = "bad PCM"
    TRANSCRIPT = "bad transcript JSON"
    SPAN_AUDIO = "absurd audio span or rate"
    SPAN_TEXT = "absurd transcript span"
    CLOCK_AHEAD_FAR = "clock far ahead"
    CLOCK_AHEAD_NEAR = "clock 55 s ahead on a live stream"
    CLOCK_BEHIND_LIVE = "clock an hour behind on a live stream"
    CLOCK_BEHIND_NEW = "clock far behind on a new stream"
    CLOCK_EPOCH = "event time at the epoch"
    SEQ_REUSE = "sp-seq restarted at 0, other content"
    SPLIT_STREAM = "stream split across partitions"
    TXN_COMMITTED = "committed transaction"
    TXN_ABORTED = "aborted transaction"


class Expect(Enum):
    """What the worker must do with a record."""

    DEAD = "dead-lettered once"
    USED = "used in a published window"
    DEAD_OR_USED = "dead-lettered once or used"
    SKIPPED = "neither used nor dead-lettered"
    DOOR = "dead-lettered when wire.decode refuses it, else used"


#: every dead-letter kind but the two that never fit a hostile record: ``late`` (it is not
#: late, it is wrong) and ``internal`` (a worker bug)
REFUSALS = frozenset(k.value for k in wire.DeadLetterKind) - {"late", "internal"}


@dataclass(frozen=True)
class Rule:
    expect: Expect
    kinds: frozenset[str] = frozenset()  # allowed dead-letter kinds
    why: str = ""
    at_door: bool = False  # wire.decode alone refuses it (checked when planning)


def _dead(*kinds: str, why: str) -> Rule:
    return Rule(Expect.DEAD, frozenset(kinds), why, at_door=True)


#: The documented rule for each category (README *Wire format*, docs/worker.md).
RULES: dict[Category, Rule] = {
    Category.HEADER_MISSING: _dead("decode", why="every sp-* header of its modality is required"),
    Category.HEADER_VALUE: _dead("decode", why="values are ASCII decimals / known names"),
    Category.HEADER_DUPLICATE: _dead("decode", why="a header may appear once"),
    Category.HEADER_EXTRA: Rule(Expect.USED, why="headers the wire format does not name "
                                "(tracing, other tools) are ignored"),
    Category.HEADER_NAME_NOT_UTF8: Rule(
        Expect.DEAD_OR_USED, frozenset({"decode"}),
        "names are decoded leniently (replacement characters, as the Java client does) and "
        "ignored like any unknown header, or the record is dead-lettered at the fetch; "
        "either way the worker goes on"),
    Category.KEY: _dead("decode", why="the key is the stream id: UTF-8, printable, <= 255 bytes"),
    Category.RANDOM: _dead("decode", "oversize", why="not wire format v1"),
    Category.JPEG_TRUNCATED: _dead("decode", why="no end-of-image marker"),
    Category.JPEG_CORRUPT: Rule(Expect.DOOR, frozenset({"decode"}),
                                "damage libjpeg refuses is dead-lettered; damage inside the "
                                "entropy data that it decodes (grey blocks) passes "
                                "(docs/worker.md)"),
    Category.IMAGE_16384: Rule(Expect.DEAD, frozenset({"decode", "oversize"}),
                               "decoded pixels per frame are capped (a setting sized for real "
                               "cameras), checked before any decode"),
    Category.PNG_DIMENSIONS: _dead("decode", "oversize",
                                   why="IHDR must match sp-w/sp-h and be in range"),
    Category.OVERSIZE: _dead("oversize", why="value over --max-message-bytes"),
    Category.PCM: _dead("decode", why="partial samples, NaN/inf, empty"),
    Category.TRANSCRIPT: _dead("decode", why="UTF-8 JSON object with a valid span"),
    Category.SPAN_AUDIO: Rule(Expect.DEAD, REFUSALS,
                              "chunks longer than a few seconds and sample rates outside a "
                              "sane range are refused, so one record cannot make a live "
                              "stream's data late"),
    Category.SPAN_TEXT: Rule(Expect.DEAD, REFUSALS,
                             "segments longer than tens of seconds are refused"),
    Category.CLOCK_AHEAD_FAR: Rule(Expect.DEAD, frozenset({"clock"}),
                                   "event time beyond --max-future-ms"),
    Category.CLOCK_AHEAD_NEAR: Rule(Expect.DEAD, REFUSALS,
                                    "one record may move a watermark only a bounded way ahead "
                                    "of the stream's other modalities and the wall clock"),
    Category.CLOCK_BEHIND_LIVE: Rule(Expect.DEAD, frozenset({"late"}),
                                     "its windows closed long ago"),
    Category.CLOCK_BEHIND_NEW: Rule(Expect.USED, why="event time has no lower bound: a new "
                                    "stream starts where its records are"),
    Category.CLOCK_EPOCH: Rule(Expect.DEAD_OR_USED, REFUSALS,
                               "a window before the epoch (negative start) is refused or "
                               "published; never a crash"),
    Category.SEQ_REUSE: Rule(Expect.USED, why="a restarted producer's records are new data, "
                             "not duplicates of other content with the same sp-seq"),
    Category.SPLIT_STREAM: Rule(Expect.DEAD, REFUSALS,
                                "a stream is aligned on one partition: its records on any "
                                "other are dead-lettered, or its windows would be published "
                                "once per partition"),
    Category.TXN_COMMITTED: Rule(Expect.USED, why="read_committed: committed data is data; "
                                 "control records are skipped without stalling the partition"),
    Category.TXN_ABORTED: Rule(Expect.SKIPPED, why="read_committed: aborted data never arrives"),
}


#: a split stream's records on the one partition the worker aligns it on
SPLIT_CHOSEN_PARTITION = Rule(Expect.USED, why="a split stream's records on the partition it is "
                              "aligned on are its data")


class Via(Enum):
    """Which client sends a record."""

    KAFKA = "kafka-python, murmur2"
    DEFAULT_PARTITIONER = "confluent-kafka, its default partitioner"
    TXN_COMMIT = "confluent-kafka transaction, committed"
    TXN_ABORT = "confluent-kafka transaction, aborted"


@dataclass
class Sent:
    """One planned record; ``source`` is where the broker put it."""

    send_at_ns: int
    modality: str  # the topic it goes to
    rec: wire.KafkaRecord
    category: Category | None = None  # None: a record of a valid stream
    media: wire.MediaRecord | None = None
    via: Via = Via.KAFKA
    batch: int = -1  # transactional batch it belongs to
    rule: Rule | None = None  # set from RULES, except SPLIT_STREAM (by partition)
    source: wire.Source | None = None


# ---------------------------------------------------------------------------------------
# media
# ---------------------------------------------------------------------------------------


def valid_stream(sid: str, t0: int, dur_s: float, rng: np.random.Generator) -> list[Sent]:
    """worker_helpers.stream_plan's stream, each record sent with a jitter below the
    modality's lateness."""
    return [Sent(p.send_at_ns, p.modality, p.rec, media=p.media)
            for p in stream_plan(sid, t0, dur_s, rng, jitter_ms=JITTER_MS)]


def forged_png(width: int, height: int) -> bytes:
    """An 8x8 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed, data unchanged)."""
    _, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    b = bytearray(buf.tobytes())
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def forged_jpeg(width: int, height: int) -> bytes:
    """A 64x64 JPEG whose SOF claims ``width`` x ``height``: libjpeg decodes it at that size
    (the missing data comes out grey)."""
    _, buf = cv2.imencode(".jpg", np.zeros((64, 64, 3), np.uint8))
    b = bytearray(buf.tobytes())
    i = b.find(b"\xff\xc0")
    b[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(b)


# ---------------------------------------------------------------------------------------
# the bad records
# ---------------------------------------------------------------------------------------

REQUIRED = {"video": ("sp-v", "sp-mod", "sp-ts", "sp-seq", "sp-fmt", "sp-w", "sp-h"),
            "audio": ("sp-v", "sp-mod", "sp-ts", "sp-seq", "sp-fmt", "sp-sr", "sp-ch"),
            "text": ("sp-v", "sp-mod", "sp-ts", "sp-seq")}
KNOWN_HEADERS = {h for hs in REQUIRED.values() for h in hs}


def _set_headers(rec: wire.KafkaRecord, headers: list[tuple[str, bytes]]) -> wire.KafkaRecord:
    return dataclasses.replace(rec, headers=tuple(headers))


def _bad_value(rng: np.random.Generator, name: str) -> bytes:
    """A value no header ``name`` accepts: any bytes, or a near miss of a valid one."""
    near = {
        "sp-v": [b"2", b"0", b"1.0", b" 1", b"v1", b""],
        "sp-mod": [b"Video", b"prediction", b"", b"video\x00", b"aud io"],
        "sp-fmt": [b"gif", b"JPEG", b"s24le", b"", b"jpeg "],
    }.get(name, [b"-1", b"01", b"1.5", b"1e3", b" 7", b"7 ", b"", b"0x10", b"+3",
                 b"99999999999999999999", b"\xd9\xa3", b"\xef\xbc\x91"])  # Arabic-Indic, fullwidth
    near = [*near, *{"sp-w": [b"0", b"16385"], "sp-h": [b"0", b"16385"],
                     "sp-sr": [b"0", b"384001"], "sp-ch": [b"0", b"33"]}.get(name, [])]
    if rng.random() < 0.5:
        return near[int(rng.integers(len(near)))]
    while True:  # any bytes, not all ASCII digits
        raw = rng.integers(0, 256, int(rng.integers(1, 24)), np.uint8).tobytes()
        if not raw.isdigit():
            return raw


def _random_name(rng: np.random.Generator) -> str:
    """Any UTF-8 header name a tool might use: ASCII, unicode, empty, long, control chars."""
    pick = rng.random()
    if pick < 0.1:
        return ""
    if pick < 0.2:
        return "x" * int(rng.integers(200, 2000))
    cps = rng.integers(1, 0x2FFFF, int(rng.integers(1, 12)))
    name = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
    return name if name not in KNOWN_HEADERS else name + "!"


@dataclass
class Planner:
    """Builds the bad records of a run: ``t0`` the event-time origin, ``dur_ns`` the span
    over which they are sent, ``live`` the valid streams' ids."""

    rng: np.random.Generator
    t0: int
    dur_ns: int
    live: list[str]
    partitions: int
    max_bytes: int
    out: list[Sent] = field(default_factory=list)
    _n: int = 0
    _base: dict[str, wire.KafkaRecord] = field(default_factory=dict)

    def add(self, category: Category, modality: str, rec: wire.KafkaRecord, at: int,
            media: wire.MediaRecord | None = None, via: Via = Via.KAFKA, batch: int = -1) -> None:
        self.out.append(Sent(at, modality, rec, category, media, via, batch,
                             None if category is Category.SPLIT_STREAM else RULES[category]))

    def when(self, lo: float = 0.05, hi: float = 0.95) -> int:
        return self.t0 + int(self.rng.uniform(lo, hi) * self.dur_ns)

    def any_key(self) -> bytes:
        return (self.live[int(self.rng.integers(len(self.live)))] if self.rng.random() < 0.5
                else f"fz-{int(self.rng.integers(50))}").encode()

    def base(self, modality: str, key: bytes, at: int) -> wire.KafkaRecord:
        """A valid record of ``modality`` (a fresh sequence number) to damage."""
        self._n += 1
        sid, seq = key.decode(), LIVE_SEQ + self._n
        if modality == "video":
            media: wire.MediaRecord = camera_frame(sid, seq, at)
        elif modality == "audio":
            media = tone_chunk(sid, seq, at)
        else:
            media = segment(sid, seq, at, at + SEG_MS * MS)
        return wire.encode(media)

    # --- categories -----------------------------------------------------------------
    def header_missing(self) -> None:
        mod = self.modality()
        at = self.when()
        rec = self.base(mod, self.any_key(), at)
        drop = REQUIRED[mod][int(self.rng.integers(len(REQUIRED[mod])))]
        self.add(Category.HEADER_MISSING, mod,
                 _set_headers(rec, [(k, v) for k, v in rec.headers if k != drop]), at)

    def header_value(self) -> None:
        mod = self.modality()
        at = self.when()
        rec = self.base(mod, self.any_key(), at)
        name = REQUIRED[mod][int(self.rng.integers(len(REQUIRED[mod])))]
        bad = _bad_value(self.rng, name)
        self.add(Category.HEADER_VALUE, mod,
                 _set_headers(rec, [(k, bad if k == name else v) for k, v in rec.headers]), at)

    def header_duplicate(self) -> None:
        mod = self.modality()
        at = self.when()
        rec = self.base(mod, self.any_key(), at)
        k, v = rec.headers[int(self.rng.integers(len(rec.headers)))]
        extra = v if self.rng.random() < 0.5 else _bad_value(self.rng, k)
        headers = list(rec.headers)
        headers.insert(int(self.rng.integers(len(headers) + 1)), (k, extra))
        self.add(Category.HEADER_DUPLICATE, mod, _set_headers(rec, headers), at)

    def key(self) -> None:
        mod = self.modality()
        at = self.when()
        rec = self.base(mod, b"fz-key", at)
        key = [None, b"", b"\xff\xfe", b"k" * 300, b"cam\n1", b" cam", b"cam\x00",
               b"\xff" + bytes(self.rng.integers(128, 256, 8, np.uint8))][int(self.rng.integers(8))]
        self.add(Category.KEY, mod, dataclasses.replace(rec, key=key), at)

    def random(self) -> None:
        mod = self.modality()
        rb = self.rng.integers
        headers = [(n, rb(0, 256, int(rb(0, 20)), np.uint8).tobytes())
                   for n in [*REQUIRED[mod], *(_random_name(self.rng) for _ in range(int(rb(3))))]
                   if self.rng.random() < 0.8]
        rec = wire.KafkaRecord(rb(0, 256, int(rb(1, 40)), np.uint8).tobytes(),
                               rb(0, 256, int(rb(0, 4000)), np.uint8).tobytes(), tuple(headers),
                               (self.t0 + int(rb(-10**6, 10**6)) * MS) // MS)
        self.add(Category.RANDOM, mod, rec, self.when())

    def jpeg_truncated(self) -> None:
        at = self.when()
        rec = self.base("video", self.any_key(), at)
        cut = int(self.rng.integers(1, len(rec.value) - 2))
        self.add(Category.JPEG_TRUNCATED, "video", dataclasses.replace(rec, value=rec.value[:cut]),
                 at)

    def pcm(self) -> None:
        at = self.when()
        rec = self.base("audio", self.any_key(), at)
        pick = int(self.rng.integers(3))
        if pick == 0:
            value = rec.value + b"\x01"
        elif pick == 1:
            value = b""
        else:
            samples = np.zeros(160, "<f4")
            samples[int(self.rng.integers(160))] = [np.nan, np.inf, -np.inf][int(self.rng.integers(3))]
            value = samples.tobytes()
            rec = _set_headers(rec, [(k, b"f32le" if k == "sp-fmt" else v) for k, v in rec.headers])
        self.add(Category.PCM, "audio", dataclasses.replace(rec, value=value), at)

    def transcript(self) -> None:
        at = self.when()
        rec = self.base("text", self.any_key(), at)
        values = [b"\xff\xfe seven", b"not json", b"[1, 2]", b'{"text": "x"}',
                  b'{"text": 1, "start_ns": %d, "end_ns": %d}' % (at, at + 1),
                  b'{"text": "x", "start_ns": %d, "end_ns": %d}' % (at, at - 1),
                  b'{"text": "x", "start_ns": %d, "end_ns": %d}' % (at + 1, at + 2),
                  b'{"text": "x", "start_ns": %d, "end_ns": %d, "confidence": 2}' % (at, at + 1),
                  b'{"text": "x", "start_ns": %d, "end_ns": %d, "final": "yes"}' % (at, at + 1),
                  rec.value[: len(rec.value) // 2]]
        self.add(Category.TRANSCRIPT, "text",
                 dataclasses.replace(rec, value=values[int(self.rng.integers(len(values)))]), at)

    def modality(self) -> str:
        return ("video", "audio", "text")[int(self.rng.integers(3))]

    def plan(self, n_bad: int) -> list[Sent]:
        """``n_bad`` bad records: the rare, heavy categories a fixed few, the cheap refusals
        filling the rest."""
        self.dedicated_streams()
        self.media_heavy()
        self.clocks_and_spans()
        fillers = [self.header_missing, self.header_value, self.header_duplicate, self.key,
                   self.random, self.jpeg_truncated, self.pcm, self.transcript]
        while len(self.out) < n_bad:
            fillers[int(self.rng.integers(len(fillers)))]()
        return self.out

    # --- dedicated streams: records that must be used, in order per stream --------------
    def dedicated_streams(self) -> None:
        rng = self.rng
        step = self.dur_ns // 40
        # extra headers, any UTF-8 name and any bytes value; and header names not UTF-8
        for cat, n_streams in ((Category.HEADER_EXTRA, 3), (Category.HEADER_NAME_NOT_UTF8, 2)):
            for s in range(n_streams):
                sid = f"fz-{cat.name.lower()}-{s}"
                for i in range(10):
                    at = self.t0 + i * step * 3 + s * MS
                    rec = wire.encode(camera_frame(sid, i, at))
                    if cat is Category.HEADER_EXTRA:  # names distinct: see wire._headers
                        extra = list({_random_name(rng): rng.integers(
                            0, 256, int(rng.integers(0, 64)), np.uint8).tobytes()
                            for _ in range(int(rng.integers(1, 4)))}.items())
                    else:
                        # 0xFF never occurs in UTF-8: every such name is invalid
                        raw = b"\xff" + bytes(rng.integers(0, 0x100, int(rng.integers(0, 6)),
                                                            np.uint8))
                        extra = [(RawName(b"\xff\xfe" if i == 0 else raw), b"x")]
                    headers = list(rec.headers)
                    for h in extra:
                        headers.insert(int(rng.integers(len(headers) + 1)), h)
                    self.add(cat, "video", _set_headers(rec, headers), at)
        # damaged JPEGs: what the door admits must be used, so each lane is in order
        for s in range(3):
            sid = f"fz-corrupt-{s}"
            for i in range(15):
                at = self.t0 + i * step * 2 + s * MS
                rec = wire.encode(camera_frame(sid, i, at, s * 40))
                data = bytearray(rec.value)
                for _ in range(int(rng.integers(1, 4))):
                    data[int(rng.integers(2, len(data)))] = int(rng.integers(256))
                self.add(Category.JPEG_CORRUPT, "video", dataclasses.replace(rec, value=bytes(data)),
                         at)
        # a producer restarting sp-seq at 0 with other content while the first run is held
        for mod in ("video", "audio"):
            sid = f"fz-reuse-{mod}"
            for run in range(2):
                for i in range(5):
                    at = self.t0 + (run * 6 + i) * 100 * MS + 3 * self.dur_ns // 10
                    media: wire.MediaRecord = (
                        camera_frame(sid, i, at, 100 * run) if mod == "video"
                        else tone_chunk(sid, i, at, 330.0 + 200 * run))
                    self.add(Category.SEQ_REUSE, mod, wire.encode(media), at + 120 * MS, media)
        # new streams far in the past (in order per stream)
        day = 86_400 * S
        for s, origin in enumerate((day, 946_684_800 * S, self.t0 - day, self.t0 - 3600 * S)):
            sid = f"fz-past-{s}"
            for i in range(4):
                ts = origin + i * 100 * MS
                self.add(Category.CLOCK_BEHIND_NEW, "video",
                         wire.encode(camera_frame(sid, i, ts)), self.t0 + (2 + i) * step)
        for s, mod in enumerate(("video", "audio", "text")):
            sid = f"fz-epoch-{mod}"
            media = (camera_frame(sid, 0, 0) if mod == "video"
                     else tone_chunk(sid, 0, 0) if mod == "audio"
                     else segment(sid, 0, 0, 100 * MS))
            self.add(Category.CLOCK_EPOCH, mod, wire.encode(media), self.t0 + (3 + s) * step)
        # a stream whose video a librdkafka producer sends with its default partitioner
        # (CRC32: another partition than murmur2's), its audio and text with murmur2; which
        # partition's records are used is the worker's choice (test_fuzz judges after the run)
        for sid in self.split_ids(2):
            for r in valid_stream(sid, self.t0 + self.dur_ns // 5, 2.0, rng):
                via = Via.DEFAULT_PARTITIONER if r.modality == "video" else Via.KAFKA
                self.add(Category.SPLIT_STREAM, r.modality, r.rec, r.send_at_ns, r.media, via)
        # transactions into every partition of every input topic, committed and aborted
        batch = 0
        for k, at in enumerate((self.when(0.2, 0.25), self.when(0.45, 0.5), self.when(0.7, 0.75))):
            for cat, via, prefix in ((Category.TXN_COMMITTED, Via.TXN_COMMIT, "fz-txn-c"),
                                     (Category.TXN_ABORTED, Via.TXN_ABORT, "fz-txn-a")):
                for sid in keys_on_partitions(prefix, self.partitions):
                    for media in (camera_frame(sid, k, at), tone_chunk(sid, k, at),
                                  segment(sid, k, at, at + 200 * MS)):
                        self.add(cat, media.modality, wire.encode(media), at + 250 * MS + k,
                                 media, via, batch)
                batch += 1

    def split_ids(self, n: int) -> list[str]:
        out, i = [], 0
        while len(out) < n:
            sid = f"fz-split-{i}"
            if zlib.crc32(sid.encode()) % self.partitions != partition_of(sid.encode(),
                                                                          self.partitions):
                out.append(sid)
            i += 1
        return out

    # --- heavy media: a fixed few ---------------------------------------------------------
    def media_heavy(self) -> None:
        for w, h, sw, sh in ((16384, 16384, 16384, 16384), (16384, 16384, 16384, 16384),
                             (100_000, 100_000, 16384, 16384), (1 << 31, 1 << 31, 8, 8),
                             (0, 0, 8, 8), (16384, 16384, 8, 8), (8, 8, 16384, 16384)):
            at = self.when()
            rec = self.base("video", self.any_key(), at)
            headers = [(k, b"png" if k == "sp-fmt" else b"%d" % sw if k == "sp-w"
                        else b"%d" % sh if k == "sp-h" else v) for k, v in rec.headers]
            cat = (Category.IMAGE_16384 if (w, h, sw, sh) == (16384,) * 4
                   else Category.PNG_DIMENSIONS)
            self.add(cat, "video", wire.KafkaRecord(rec.key, forged_png(w, h), tuple(headers),
                                                    rec.timestamp_ms), at)
        for _ in range(3):
            at = self.when()
            rec = self.base("video", self.any_key(), at)
            headers = [(k, b"16384" if k in ("sp-w", "sp-h") else v) for k, v in rec.headers]
            self.add(Category.IMAGE_16384, "video",
                     wire.KafkaRecord(rec.key, forged_jpeg(16384, 16384), tuple(headers),
                                      rec.timestamp_ms), at)
        for mod in ("video", "audio"):
            at = self.when()
            rec = self.base(mod, self.any_key(), at)
            big = self.rng.integers(0, 256, self.max_bytes + 2 + 4 * int(self.rng.integers(100)),
                                    np.uint8).tobytes()
            self.add(Category.OVERSIZE, mod, dataclasses.replace(rec, value=big), at)

    # --- absurd spans and clocks, on live streams and new ones ----------------------------
    def clocks_and_spans(self) -> None:
        rng = self.rng
        for i in range(8):
            at = self.when(0.2, 0.8)
            sid = self.live[i % len(self.live)] if i % 2 == 0 else f"fz-span-{i}"
            sr = int(rng.integers(1, 8))
            c = wire.AudioChunk(sid, at, LIVE_SEQ + 900 + i, np.zeros(55 * sr, "<i2").tobytes(),
                                "s16le", sr, 1)
            self.add(Category.SPAN_AUDIO, "audio", wire.encode(c), at + 20 * MS, c)
        for i in range(8):
            at = self.when(0.2, 0.8)
            sid = self.live[i % len(self.live)] if i % 2 == 0 else f"fz-span-{i}"
            seg = segment(sid, LIVE_SEQ + 900 + i, at, at + int(rng.integers(55, 60)) * S)
            self.add(Category.SPAN_TEXT, "text", wire.encode(seg), at + 20 * MS, seg)
        for i in range(12):
            at = self.when()
            ahead = [86_400 * S, 365 * 86_400 * S, wire.INT64_MAX - at][i % 3]
            mod = self.modality()
            rec = self.base(mod, self.any_key(), at + ahead)
            if mod == "text":  # the segment's span starts where sp-ts says
                seg = segment(rec.key.decode(), LIVE_SEQ + 800 + i, at + ahead,
                              min(at + ahead + SEG_MS * MS, wire.INT64_MAX))
                rec = wire.encode(seg)
            # the broker refuses Kafka timestamps over an hour ahead (Kafka 4's
            # log.message.timestamp.after.max.ms); the worker reads sp-ts
            self.add(Category.CLOCK_AHEAD_FAR, mod,
                     dataclasses.replace(rec, timestamp_ms=at // MS), at)
        for i in range(6):
            at = self.when(0.3, 0.8)
            sid = self.live[i % len(self.live)]
            media = [camera_frame(sid, LIVE_SEQ + 700 + i, at + 55 * S),
                     tone_chunk(sid, LIVE_SEQ + 700 + i, at + 55 * S),
                     segment(sid, LIVE_SEQ + 700 + i, at + 55 * S, at + 56 * S)][i % 3]
            self.add(Category.CLOCK_AHEAD_NEAR, media.modality, wire.encode(media), at, media)
        for i in range(8):
            at = self.when(0.5, 0.9)  # the live streams' first windows closed long before
            sid = self.live[i % len(self.live)]
            media = [camera_frame(sid, LIVE_SEQ + 600 + i, at - 3600 * S),
                     tone_chunk(sid, LIVE_SEQ + 600 + i, at - 3600 * S)][i % 2]
            self.add(Category.CLOCK_BEHIND_LIVE, media.modality, wire.encode(media), at, media)


# ---------------------------------------------------------------------------------------
# sending
# ---------------------------------------------------------------------------------------


def send_all(settings: Settings, plan: list[Sent]) -> None:
    """Send every record at its ``send_at_ns`` on the wall clock, each by its client, and
    note where the broker put it. Transactional batches go out whole at their time."""
    max_bytes = settings.max_message_bytes * 2  # oversized records must reach the worker
    cp = confluent_producer(settings, **{"message.max.bytes": max_bytes})  # CRC32 partitioner
    tp = confluent_producer(settings, **{"message.max.bytes": max_bytes,
                                         "transactional.id": f"{settings.topic_prefix}-fuzz",
                                         "partitioner": "murmur2_random"})
    tp.init_transactions(30)
    batches: dict[int, list[Sent]] = {}
    for s in plan:
        if s.batch >= 0:
            batches.setdefault(s.batch, []).append(s)
    done_batches: set[int] = set()
    # the other application's transactions (a flush, then a commit or an abort) go out
    # from a thread of their own: in the paced loop they would stall the valid streams
    txns: queue.Queue[tuple[int, Via] | None] = queue.Queue()
    failed: list[BaseException] = []

    def other_app() -> None:
        try:
            while (item := txns.get()) is not None:
                batch, via = item
                tp.begin_transaction()
                for b in batches[batch]:
                    send_confluent(tp, settings, b, wait=False)
                tp.flush(30)  # every record has its offset, also the ones aborted next
                if via is Via.TXN_COMMIT:
                    tp.commit_transaction(30)
                else:
                    tp.abort_transaction(30)
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=other_app, name="other-app")
    thread.start()
    try:
        with KafkaSender(settings, max_request_size=max_bytes) as kp:
            for s in paced(plan):
                if s.via is Via.KAFKA:
                    kp.send(s)
                elif s.via is Via.DEFAULT_PARTITIONER:
                    send_confluent(cp, settings, s, wait=False)
                    cp.poll(0)
                elif s.batch not in done_batches:
                    done_batches.add(s.batch)
                    txns.put((s.batch, s.via))
            cp.flush(60)
    finally:
        txns.put(None)
        thread.join(120)
    if failed:
        raise failed[0]
    missing = [s for s in plan if s.source is None]
    assert not missing, f"{len(missing)} records not delivered, e.g. {missing[0]}"


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


@dataclass
class Read:
    """A record read back. ``headers`` is None when a client cannot decode them."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None


def read_topic(settings: Settings, topic: str, done: Callable[[list[Read]], bool] | None,
               timeout: float) -> list[Read]:
    """Every record of ``topic`` (read_committed, librdkafka: it survives header names that
    are not UTF-8, which kafka-python and aiokafka refuse) once ``done`` or at timeout;
    ``done`` None: up to the end of the topic as it is now."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "unused",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "fetch.max.bytes": settings.max_message_bytes * 4})
    try:
        tps = [CkTopicPartition(topic, p, 0) for p in range(settings.partitions)]
        c.assign(tps)
        end = {tp.partition: c.get_watermark_offsets(tp, 10)[1] for tp in tps}
        at = dict.fromkeys(end, 0)
        out: list[Read] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(out) if done is not None else all(at[p] >= end[p] for p in end):
                break
            for m in c.consume(500, 0.3):
                if m.error():
                    continue
                try:
                    headers = list(m.headers() or [])
                except (SystemError, UnicodeDecodeError):
                    headers = None
                at[m.partition()] = m.offset() + 1
                out.append(Read(m.partition(), m.offset(), m.key(), m.value(), headers))
        return out
    finally:
        c.close()


# ---------------------------------------------------------------------------------------
# judging
# ---------------------------------------------------------------------------------------


def door_refuses(s: Sent, max_bytes: int) -> wire.WireError | None:
    """What the worker's door (wire.decode) says about a record; None: admitted."""
    try:
        wire.decode(s.rec, expect_modality=s.modality, max_bytes=max_bytes)
    except wire.WireError as e:
        return e
    return None


def check_plan(plan: list[Sent], max_bytes: int) -> None:
    """The plan is what it claims: records the rules say the door refuses are refused by
    wire.decode, records that must be used are admitted."""
    for s in plan:
        if s.rule is None:
            continue
        refused = door_refuses(s, max_bytes)
        if s.rule.at_door:
            assert refused is not None, f"{s.category}: wire.decode admits {s.rec.headers}"
        elif s.rule.expect in (Expect.USED, Expect.SKIPPED):
            assert refused is None, f"{s.category}: wire.decode refuses it: {refused}"


@dataclass
class Letter:
    kind: str
    reason: str


def dead_letters(reads: list[Read]) -> tuple[dict[tuple[str, int, int], list[Letter]], list[str]]:
    """Dead letters by source, and what is wrong with any that cannot be read."""
    by_src: dict[tuple[str, int, int], list[Letter]] = {}
    unreadable = []
    for r in reads:
        if r.headers is None:
            unreadable.append(f"dead letter at offset {r.partition}/{r.offset}: its header "
                              "names are not UTF-8 (consumers of the topic cannot read it)")
            continue
        rec = wire.KafkaRecord(r.key, r.value, tuple(r.headers))
        try:
            d = wire.decode_dead_letter(rec)
        except wire.WireError as e:
            unreadable.append(f"dead letter at offset {r.partition}/{r.offset}: {e}")
            continue
        src = (d.source.topic, d.source.partition, d.source.offset)
        by_src.setdefault(src, []).append(Letter(d.kind, d.reason))
    return by_src, unreadable


def readable(reason: str) -> bool:
    return 10 <= len(reason) <= 2000 and reason.isprintable()


def expected_outcome(s: Sent, max_bytes: int) -> Expect:
    """The outcome ``s`` must have, with the door's verdict for :attr:`Expect.DOOR`."""
    assert s.rule is not None
    if s.rule.expect is Expect.DOOR:
        return Expect.DEAD if door_refuses(s, max_bytes) is not None else Expect.USED
    return s.rule.expect


def verdict(s: Sent, letters: list[Letter], used: bool, max_bytes: int) -> str | None:
    """Why ``s`` breaks its rule, or None."""
    assert s.rule is not None
    expect = expected_outcome(s, max_bytes)
    kinds = s.rule.kinds
    got = ("used" if used else "") + "".join(f" dead-lettered ({d.kind}: {d.reason[:150]})"
                                             for d in letters)
    got = got.strip() or "neither used nor dead-lettered"
    dead_ok = (len(letters) == 1 and not used and letters[0].kind in kinds
               and readable(letters[0].reason))
    used_ok = used and not letters
    ok = {Expect.DEAD: dead_ok, Expect.USED: used_ok, Expect.DEAD_OR_USED: dead_ok or used_ok,
          Expect.SKIPPED: not used and not letters}[expect]
    if ok:
        return None
    want = expect.value + (f" as {'/'.join(sorted(kinds))}" if expect is not Expect.USED
                           and expect is not Expect.SKIPPED else "")
    return f"expected {want}; got {got}"
