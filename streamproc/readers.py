"""Read predictions: the Python API behind ``streamproc consume``.

Workers guarantee at-least-once input and effectively-once output: after a crash a
window may be published a second time (docs/design.md §6). Readers therefore collapse
predictions by their key ``(stream_id, window_start_ns)``; the first copy wins and later
copies are counted (``duplicates``, and ``conflicting`` when their label differs).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kafka import TopicPartition

from streamproc import kafka
from streamproc.config import Settings
from streamproc.errors import UserError
from streamproc.wire.codec import KafkaRecord, Prediction, WireError, decode_prediction

log = logging.getLogger(__name__)


@dataclass
class ConsumeStats:
    received: int = 0
    yielded: int = 0
    duplicates: int = 0
    conflicting: int = 0
    undecodable: int = 0


@dataclass
class Deduper:
    """Remembers recent prediction keys per stream.

    Keys older than ``horizon_ns`` behind a stream's newest window are forgotten, so memory
    stays bounded on an endless topic; anything that old arriving again is a replay and
    counts as a duplicate.
    """

    horizon_ns: int = 3600 * 1_000_000_000
    _seen: dict[str, dict[int, str]] = field(default_factory=dict)
    _newest: dict[str, int] = field(default_factory=dict)

    def check(self, p: Prediction) -> str:
        """'new', 'duplicate' (same label) or 'conflicting' (same key, other label)."""
        seen = self._seen.setdefault(p.stream_id, {})
        newest = self._newest.get(p.stream_id)
        if p.window_start_ns in seen:
            return "duplicate" if seen[p.window_start_ns] == p.label else "conflicting"
        if newest is not None and p.window_start_ns < newest - self.horizon_ns:
            return "duplicate"
        seen[p.window_start_ns] = p.label
        if newest is None or p.window_start_ns > newest:
            self._newest[p.stream_id] = p.window_start_ns
            floor = p.window_start_ns - self.horizon_ns
            if len(seen) > 64 and min(seen) < floor:
                for k in [k for k in seen if k < floor]:
                    del seen[k]
        return "new"


def consume(
    settings: Settings | None = None,
    *,
    stream: str | None = None,
    follow: bool = False,
    from_beginning: bool = True,
    timeout_s: float | None = None,
    stats: ConsumeStats | None = None,
) -> Iterator[Prediction]:
    """Yield each prediction once, collapsing duplicates by (stream_id, window_start_ns).

    Without ``follow`` it stops at the end of the topic as it was when called; with it,
    it waits for new predictions until ``timeout_s`` (None: forever). Only committed
    records are read (``read_committed``).

    >>> for p in consume(Settings(), stream="cam-1"):   # doctest: +SKIP
    ...     print(p.window_start_ns, p.label, p.scores[p.label])
    """
    settings = settings or Settings.load()
    stats = stats if stats is not None else ConsumeStats()
    topic = settings.topic("predictions")
    consumer = kafka.consumer(settings)
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise UserError(f"topic {topic} does not exist (run `streamproc topics create`)")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        end = consumer.end_offsets(tps) if not follow else {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        dedup = Deduper()
        while True:
            if not follow and all(consumer.position(tp) >= end[tp] for tp in tps):
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            batch = consumer.poll(timeout_ms=500)
            for msgs in batch.values():
                for msg in msgs:
                    stats.received += 1
                    try:
                        p = decode_prediction(KafkaRecord.from_client(msg))
                    except WireError as e:
                        stats.undecodable += 1
                        log.warning("skipping undecodable prediction at %s[%d]@%d: %s",
                                    msg.topic, msg.partition, msg.offset, e)
                        continue
                    if stream is not None and p.stream_id != stream:
                        continue
                    verdict = dedup.check(p)
                    if verdict != "new":
                        stats.duplicates += 1
                        stats.conflicting += verdict == "conflicting"
                        continue
                    stats.yielded += 1
                    yield p
    finally:
        consumer.close()


# --- presentation ------------------------------------------------------------------------


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]


STREAM_WIDTH = 12  # the stream column's width until a longer id comes


def table_header(stream_width: int = STREAM_WIDTH) -> str:
    return (f"{'window (UTC)':<27} {'stream':<{stream_width}} {'label':<8} {'score':>5}  "
            f"{'video':>5} {'audio':>6} {'text':>4}  {'missing':<11} {'latency':>8}")


TABLE_HEADER = table_header()


def format_row(p: Prediction, stream_width: int = STREAM_WIDTH) -> str:
    """One human-readable line per prediction for the live table; the stream id is
    never cut (a longer one only shifts the columns after it)."""
    m = p.modalities
    video = m.get("video", {}).get("frames", 0)
    audio = m.get("audio", {}).get("seconds", 0.0)
    text = m.get("text", {}).get("segments", 0)
    missing = ",".join(m.get("missing", [])) or "-"
    score = p.scores.get(p.label)
    score_s = f"{score:5.2f}" if isinstance(score, (int, float)) else "    -"
    total = p.latency_ms.get("total")
    lat = f"{total:6.0f}ms" if isinstance(total, (int, float)) else "       -"
    window = f"{_clock(p.window_start_ns)}-{_clock(p.window_end_ns)[:8]}"
    return (f"{window:<27} {p.stream_id:<{stream_width}} {p.label[:8]:<8} {score_s}  "
            f"{video:>4}f {audio:>5.2f}s {text:>4}  {missing:<11} {lat}")


class PredictionTable:
    """The live table: the stream column is as wide as the longest id seen so far, and
    the header is printed again when a longer id widens it (rows already printed stay)."""

    def __init__(self, stream: str | None = None) -> None:
        self.width = max(STREAM_WIDTH, len(stream or ""))
        self._header_due = True

    def lines(self, p: Prediction) -> list[str]:
        """The lines to print for ``p``: a (new) header when due, then its row."""
        out = []
        if len(p.stream_id) > self.width:
            self.width, self._header_due = len(p.stream_id), True
        if self._header_due:
            out.append(self.header())
        out.append(format_row(p, self.width))
        return out

    def header(self) -> str:
        self._header_due = False
        return table_header(self.width)


def format_json(p: Prediction) -> str:
    return json.dumps(p.to_json(), ensure_ascii=False, separators=(",", ":"))
