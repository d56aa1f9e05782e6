"""Read predictions: the Python API behind ``streamproc consume``.

A window may get a provisional prediction (``final`` False) and then its final one, each
a record of its own: ``(stream_id, window_start_ns, rev)`` identifies a record. Workers
guarantee at-least-once input and effectively-once output: after a crash a record may be
published a second time (docs/design.md §6). Readers therefore collapse copies of a
revision; the first copy wins and later copies are counted (``duplicates``, and
``conflicting`` when their label differs).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka import TopicPartition

from streamproc import kafka
from streamproc.config import Settings
from streamproc.errors import UserError
from streamproc.wire.codec import KafkaRecord, Prediction, WireError, decode_prediction

log = logging.getLogger(__name__)

#: How far behind a stream's newest window readers still remember a window.
HORIZON_NS = 3600 * 1_000_000_000


@dataclass
class ConsumeStats:
    received: int = 0
    yielded: int = 0
    provisional: int = 0  # of those yielded
    duplicates: int = 0
    conflicting: int = 0
    undecodable: int = 0
    skipped_provisional: int = 0  # left out by ``finals_only``

    def summary(self) -> str:
        """The one-line account ``streamproc consume`` prints on stderr."""
        line = (f"{self.yielded} predictions ({self.provisional} provisional, "
                f"{self.yielded - self.provisional} final), {self.duplicates} duplicates "
                f"collapsed ({self.conflicting} with another label), "
                f"{self.undecodable} undecodable")
        if self.skipped_provisional:
            line += f", {self.skipped_provisional} provisional skipped"
        return line


def _forget_before(windows: dict[int, Any], floor: int) -> None:
    """Drop windows that start before ``floor``; checked only once a stream holds a few,
    so the scan is rare."""
    if len(windows) > 64 and min(windows) < floor:
        for k in [k for k in windows if k < floor]:
            del windows[k]


@dataclass
class Deduper:
    """Remembers recent prediction records per stream, by window and revision.

    Windows older than ``horizon_ns`` behind a stream's newest window are forgotten, so
    memory stays bounded on an endless topic; anything that old arriving again is a replay
    and counts as a duplicate.
    """

    horizon_ns: int = HORIZON_NS
    # stream -> window start -> rev -> label
    _seen: dict[str, dict[int, dict[int, str]]] = field(default_factory=dict)
    _newest: dict[str, int] = field(default_factory=dict)

    def check(self, p: Prediction) -> str:
        """'new', 'duplicate' (a revision seen before, same label) or 'conflicting' (the
        same revision with another label). Other revisions of a window are new."""
        seen = self._seen.setdefault(p.stream_id, {})
        newest = self._newest.get(p.stream_id)
        revs = seen.get(p.window_start_ns)
        if revs is not None and p.rev in revs:
            return "duplicate" if revs[p.rev] == p.label else "conflicting"
        if newest is not None and p.window_start_ns < newest - self.horizon_ns:
            return "duplicate"
        seen.setdefault(p.window_start_ns, {})[p.rev] = p.label
        if newest is None or p.window_start_ns > newest:
            self._newest[p.stream_id] = p.window_start_ns
            _forget_before(seen, p.window_start_ns - self.horizon_ns)
        return "new"


@dataclass
class Selection:
    """Which decoded predictions :func:`consume` yields, counted in ``stats``: those of
    ``stream`` (None: all), only finals with ``finals_only``, each revision once."""

    stream: str | None = None
    finals_only: bool = False
    stats: ConsumeStats = field(default_factory=ConsumeStats)
    dedup: Deduper = field(default_factory=Deduper)

    def accept(self, p: Prediction) -> bool:
        if self.stream is not None and p.stream_id != self.stream:
            return False
        if self.finals_only and not p.final:
            self.stats.skipped_provisional += 1
            return False
        verdict = self.dedup.check(p)
        if verdict != "new":
            self.stats.duplicates += 1
            self.stats.conflicting += verdict == "conflicting"
            return False
        self.stats.yielded += 1
        self.stats.provisional += not p.final
        return True


def check_predictions_topic(settings: Settings) -> None:
    """UserError, in one line, when the broker cannot be used or the predictions topic
    does not exist (before a reader prints anything)."""
    consumer = kafka.consumer(settings)
    try:
        _partitions(consumer, settings.topic("predictions"))
    finally:
        consumer.close()


def _partitions(consumer: Any, topic: str) -> list[int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise UserError(f"topic {topic} does not exist (run `streamproc topics create`)")
    return sorted(parts)


def consume(
    settings: Settings | None = None,
    *,
    stream: str | None = None,
    follow: bool = False,
    from_beginning: bool = True,
    timeout_s: float | None = None,
    stats: ConsumeStats | None = None,
    finals_only: bool = False,
) -> Iterator[Prediction]:
    """Yield each prediction record once, collapsing copies by
    ``(stream_id, window_start_ns, rev)``.

    Every revision is yielded, in arrival order: a window's provisional prediction
    (``final`` False), later its final one, and any later revision; ``p.key`` says which
    window a record is for. With ``finals_only`` provisional predictions are skipped.

    Without ``follow`` it stops at the end of the topic as it was when called; with it,
    it waits for new predictions until ``timeout_s`` (None: forever). Only committed
    records are read (``read_committed``).

    >>> for p in consume(Settings(), stream="cam-1", finals_only=True):   # doctest: +SKIP
    ...     print(p.window_start_ns, p.label, p.scores[p.label])
    """
    settings = settings or Settings.load()
    stats = stats if stats is not None else ConsumeStats()
    selection = Selection(stream, finals_only, stats)
    topic = settings.topic("predictions")
    consumer = kafka.consumer(settings)
    try:
        tps = [TopicPartition(topic, p) for p in _partitions(consumer, topic)]
        consumer.assign(tps)
        if from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        end = consumer.end_offsets(tps) if not follow else {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
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
                    if selection.accept(p):
                        yield p
    finally:
        consumer.close()


# --- presentation ------------------------------------------------------------------------


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]


STREAM_WIDTH = 12  # the stream column's width until a longer id comes


def table_header(stream_width: int = STREAM_WIDTH) -> str:
    return (f"{'window (UTC)':<27} {'stream':<{stream_width}} {'rev':<3} {'label':<8} "
            f"{'score':>5}  {'video':>5} {'audio':>6} {'text':>4}  {'missing':<11} "
            f"{'latency':>8}")



def revision_tag(p: Prediction) -> str:
    """The table's revision column: ``P`` a provisional prediction, ``F`` a window's
    final, ``F2``, ``F3``, ... a final revised again (the number is its ``rev``)."""
    if not p.final:
        return "P" if p.rev == 0 else f"P{p.rev}"
    return "F" if p.rev <= 1 else f"F{p.rev}"


def _row_start(p: Prediction, stream_width: int) -> str:
    score = p.scores.get(p.label)
    score_s = f"{score:5.2f}" if isinstance(score, (int, float)) else "    -"
    window = f"{_clock(p.window_start_ns)}-{_clock(p.window_end_ns)[:8]}"
    return (f"{window:<27} {p.stream_id:<{stream_width}} {revision_tag(p):<3} "
            f"{p.label[:8]:<8} {score_s}")


def format_row(p: Prediction, stream_width: int = STREAM_WIDTH, note: str = "") -> str:
    """One human-readable line per prediction for the live table, ``note`` at its end;
    the stream id is never cut (a longer one only shifts the columns after it)."""
    m = p.modalities
    video = m.get("video", {}).get("frames", 0)
    audio = m.get("audio", {}).get("seconds", 0.0)
    text = m.get("text", {}).get("segments", 0)
    missing = ",".join(m.get("missing", [])) or "-"
    total = p.latency_ms.get("total")
    lat = f"{total:6.0f}ms" if isinstance(total, (int, float)) else "       -"
    row = (f"{_row_start(p, stream_width)}  "
           f"{video:>4}f {audio:>5.2f}s {text:>4}  {missing:<11} {lat}")
    return f"{row}  {note}" if note else row


def format_confirmation(p: Prediction, stream_width: int = STREAM_WIDTH,
                        note: str = "") -> str:
    """The short line for a revision that keeps the label shown: window, stream,
    revision, label and score, then ``note``."""
    return f"{_row_start(p, stream_width)}  {note}"


class PredictionTable:
    """The live table: one row per window, and a row again when a later revision comes.

    A terminal stream cannot rewrite lines already printed, so a later revision of a
    window (its final after its provisional) is a new line whose note names what it
    replaces: ``replaces P, was three`` when the label changed. A revision that keeps
    the label is a short ``confirms P`` line, or with ``revisions`` a full row
    (``replaces P, same label``). A revision older than one already shown (a copy
    re-published after a crash) is left out, or with ``revisions`` shown and marked.

    The stream column is as wide as the longest id seen so far, and the header is
    printed again when a longer id widens it (rows already printed stay).
    """

    def __init__(self, stream: str | None = None, *, revisions: bool = False,
                 horizon_ns: int = HORIZON_NS) -> None:
        self.width = max(STREAM_WIDTH, len(stream or ""))
        self.revisions = revisions
        self.horizon_ns = horizon_ns
        self._header_due = True
        # stream -> window start -> (rev, tag, label) of the latest revision shown
        self._shown: dict[str, dict[int, tuple[int, str, str]]] = {}
        self._newest: dict[str, int] = {}

    def lines(self, p: Prediction) -> list[str]:
        """The lines to print for ``p``: a (new) header when due, then its row; none
        when it adds nothing to what is shown."""
        how = self._place(p)
        if how is None:
            return []
        full, note = how
        out = []
        if len(p.stream_id) > self.width:
            self.width, self._header_due = len(p.stream_id), True
        if self._header_due:
            out.append(self.header())
        fmt = format_row if full else format_confirmation
        out.append(fmt(p, self.width, note))
        return out

    def header(self) -> str:
        self._header_due = False
        return table_header(self.width)

    def _place(self, p: Prediction) -> tuple[bool, str] | None:
        """(full row?, note) for ``p`` against what is shown of its window; None: skip."""
        shown = self._shown.setdefault(p.stream_id, {})
        prev = shown.get(p.window_start_ns)
        if prev is not None and p.rev <= prev[0]:
            if p.rev == prev[0] or not self.revisions:
                return None  # a copy, or older than what is shown: not the latest
            return True, f"older than {prev[1]} shown before"
        tag = revision_tag(p)
        shown[p.window_start_ns] = (p.rev, tag, p.label)
        newest = self._newest.get(p.stream_id)
        if newest is None or p.window_start_ns > newest:
            self._newest[p.stream_id] = p.window_start_ns
            _forget_before(shown, p.window_start_ns - self.horizon_ns)
        if prev is None:
            return True, ""
        if p.label != prev[2]:
            return True, f"replaces {prev[1]}, was {prev[2] or '-'}"
        reused = ", scores reused" if p.reused else ""
        if self.revisions:
            return True, f"replaces {prev[1]}, same label{reused}"
        return False, f"confirms {prev[1]}{reused}"


def format_json(p: Prediction) -> str:
    return json.dumps(p.to_json(), ensure_ascii=False, separators=(",", ":"))
