"""What the web view shows, in memory and bounded: per stream a tile (newest prediction,
modalities, transcript words, frame) and a timeline of windows and dead letters; a
dead-letter panel; the workers' health.

Pure: records come in through ``on_*`` methods with the wall clock passed in, and the page
gets a :meth:`ViewState.snapshot` when it connects, then :meth:`ViewState.take_delta`
(what changed since the last one) a few times a second. Every collection is capped, so a
view left open on an endless topic, or one with thousands of streams, keeps its size.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from streamproc.config import MODALITIES, Modality
from streamproc.readers import revision_tag
from streamproc.wire.codec import Prediction

NS_PER_MS = 1_000_000
#: Streams the view keeps; past it the stream that was updated least recently is dropped.
MAX_STREAMS = 256
#: Windows kept per stream, whatever the history length (10 minutes of 0.5 s hops).
MAX_WINDOWS = 1200
#: Dead-letter marks kept per stream for its timeline.
MAX_MARKS = 200
#: Transcript segments kept per stream for the tile's words.
MAX_SEGMENTS = 8
#: Characters of transcript a tile shows (the newest words).
WORDS_CHARS = 120
#: Distinct dead-letter groups (kind and reason with its numbers blanked) in the panel.
MAX_GROUPS = 100
#: Dead-letter groups sent to the page, newest first.
PANEL_ROWS = 50
#: Labels remembered for the colour key (their order gives each one its colour).
MAX_LABELS = 64
#: A modality with no record for this long (wall clock) shows as quiet.
QUIET_NS = 3_000_000_000
#: How often every tile's badges are looked at again, changed or not (they age).
BADGE_CHECK_NS = 1_000_000_000
#: A stream's transcript is shown while it is this recent (event time, against its frames).
WORDS_MAX_AGE_NS = 15_000_000_000


class Presence(StrEnum):
    """A modality's badge on a tile."""

    PRESENT = "present"  # records arriving, and the newest prediction used it
    MASKED = "masked"  # the newest prediction was made without it
    QUIET = "quiet"  # seen before, but nothing for QUIET_NS
    ABSENT = "absent"  # never seen on this stream


#: A missing modality's bit in a timeline entry's mask.
MASK_BITS: dict[str, int] = {m: 1 << i for i, m in enumerate(MODALITIES)}


@dataclass(frozen=True, slots=True)
class Entry:
    """One window on a timeline: its latest revision."""

    start_ms: int
    end_ms: int
    label: str
    score: float | None
    rev: int
    final: bool
    missing: int  # MASK_BITS of the masked modalities
    reused: bool

    def to_json(self) -> list[Any]:
        return [self.start_ms, self.end_ms, self.label, self.score, self.rev,
                int(self.final), self.missing, int(self.reused)]


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """The stream's newest thumbnail: ``version`` changes with each new one."""

    version: int
    width: int
    height: int
    ts_ns: int


@dataclass
class StreamView:
    """One stream's part of the page."""

    stream_id: str
    windows: dict[int, Entry] = field(default_factory=dict)  # window start ns -> entry
    newest_ns: int | None = None  # start of the newest window
    current: Prediction | None = None  # the newest window's latest revision
    predictions: int = 0
    last_seen_ns: dict[str, int] = field(default_factory=dict)  # modality -> wall ns
    segments: deque[tuple[int, int, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_SEGMENTS))
    frame: FrameInfo | None = None
    marks: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=MAX_MARKS))
    dead_letters: int = 0
    touched_ns: int = 0  # wall clock of the latest record, for eviction
    # what the next delta carries
    new_windows: dict[int, Entry] = field(default_factory=dict)
    new_marks: list[tuple[int, str]] = field(default_factory=list)
    tile_dirty: bool = True
    shown_badges: dict[str, str] = field(default_factory=dict)

    def badges(self, now_ns: int) -> dict[str, str]:
        masked = set(self.current.modalities.get("missing", ())) if self.current else set()
        out: dict[str, str] = {}
        for m in MODALITIES:
            seen = self.last_seen_ns.get(m)
            if m in masked:
                out[m] = Presence.MASKED.value
            elif seen is not None and now_ns - seen <= QUIET_NS:
                out[m] = Presence.PRESENT.value
            elif seen is not None:
                out[m] = Presence.QUIET.value
            elif self.current is not None:  # the view started after its records came
                out[m] = Presence.PRESENT.value
            else:
                out[m] = Presence.ABSENT.value
        return out

    def words(self) -> str:
        if not self.segments:
            return ""
        newest_end = max(e for _, e, _ in self.segments)
        text = " ".join(t for s, e, t in sorted(self.segments)
                        if newest_end - e <= WORDS_MAX_AGE_NS and t)
        if len(text) <= WORDS_CHARS:
            return text
        cut = text[-WORDS_CHARS:]
        return "…" + cut[cut.find(" ") + 1:] if " " in cut else "…" + cut

    def tile(self, now_ns: int) -> dict[str, Any]:
        p = self.current
        score = p.scores.get(p.label) if p is not None else None
        total = p.latency_ms.get("total") if p is not None else None
        return {
            "label": p.label if p is not None else None,
            "score": score if isinstance(score, (int, float)) else None,
            "rev": p.rev if p is not None else None,
            "tag": revision_tag(p) if p is not None else None,
            "final": p.final if p is not None else None,
            "start_ms": p.window_start_ns // NS_PER_MS if p is not None else None,
            "end_ms": p.window_end_ns // NS_PER_MS if p is not None else None,
            "latency_ms": total if isinstance(total, (int, float)) else None,
            "model": "/".join(str(v) for v in p.model.values()) if p is not None else None,
            "badges": self.badges(now_ns),
            "words": self.words(),
            "frame": None if self.frame is None else {
                "v": self.frame.version, "w": self.frame.width, "h": self.frame.height,
                "ts_ms": self.frame.ts_ns // NS_PER_MS},
            "dead": self.dead_letters,
            "predictions": self.predictions,
        }


@dataclass
class DeadLetterGroup:
    kind: str
    reason: str  # the newest example
    count: int
    stream: str
    topic: str
    last_ns: int  # wall clock it was read


_NUMBERS = re.compile(r"\d+")


class DeadLetterBook:
    """Dead letters by kind and reason; reasons that differ only in their numbers (sizes,
    offsets, times) count as one group."""

    def __init__(self, max_groups: int = MAX_GROUPS) -> None:
        self.max_groups = max_groups
        self.groups: OrderedDict[tuple[str, str], DeadLetterGroup] = OrderedDict()
        self.by_kind: Counter[str] = Counter()
        self.total = 0
        self.folded = 0  # dead letters of groups dropped to stay within max_groups

    def add(self, kind: str, reason: str, stream: str, topic: str, now_ns: int) -> None:
        self.total += 1
        self.by_kind[kind] += 1
        key = (kind, _NUMBERS.sub("N", reason)[:200])
        g = self.groups.get(key)
        if g is None:
            if len(self.groups) >= self.max_groups:
                _, old = self.groups.popitem(last=False)
                self.folded += old.count
            g = self.groups[key] = DeadLetterGroup(kind, reason, 0, stream, topic, now_ns)
        g.count += 1
        g.reason, g.stream, g.topic, g.last_ns = reason[:500], stream, topic, now_ns
        self.groups.move_to_end(key)

    def to_json(self) -> dict[str, Any]:
        rows = list(self.groups.values())[-PANEL_ROWS:][::-1]
        return {
            "total": self.total, "by_kind": dict(self.by_kind), "folded": self.folded,
            "groups": [{"kind": g.kind, "reason": g.reason, "count": g.count,
                        "stream": g.stream, "topic": g.topic, "last_ms": g.last_ns // NS_PER_MS}
                       for g in rows],
        }


def _entry(p: Prediction) -> Entry:
    score = p.scores.get(p.label)
    missing = 0
    for m in p.modalities.get("missing", ()):
        missing |= MASK_BITS.get(m, 0)
    return Entry(p.window_start_ns // NS_PER_MS, p.window_end_ns // NS_PER_MS, p.label,
                 round(float(score), 4) if isinstance(score, (int, float)) else None,
                 p.rev, p.final, missing, p.reused)


class ViewState:
    """Everything the page shows. ``history_ns``: how far behind a stream's newest window
    its timeline reaches (event time)."""

    def __init__(self, history_ns: int, max_streams: int = MAX_STREAMS,
                 max_windows: int = MAX_WINDOWS) -> None:
        self.history_ns = history_ns
        self.max_streams = max_streams
        self.max_windows = max_windows
        self.streams: dict[str, StreamView] = {}
        self.dead = DeadLetterBook()
        self.labels: list[str] = []
        self.health: dict[str, Any] = {"status": "off"}
        self.stats: Counter[str] = Counter()
        self._removed: list[str] = []
        self._dead_dirty = self._labels_dirty = self._health_dirty = False
        self._badges_checked_ns = 0

    # --- records in ----------------------------------------------------------------------

    def _stream(self, sid: str, now_ns: int) -> StreamView:
        s = self.streams.get(sid)
        if s is None:
            if len(self.streams) >= self.max_streams:
                oldest = min(self.streams.values(), key=lambda v: v.touched_ns)
                self.forget(oldest.stream_id)
            s = self.streams[sid] = StreamView(sid)
        s.touched_ns = now_ns
        return s

    def forget(self, sid: str) -> None:
        if self.streams.pop(sid, None) is not None:
            self._removed.append(sid)

    def on_prediction(self, p: Prediction, now_ns: int) -> bool:
        """Take a prediction record; False when it adds nothing (a copy, or a revision
        older than the one shown, or a window already out of the history)."""
        s = self._stream(p.stream_id, now_ns)
        old = s.windows.get(p.window_start_ns)
        if old is not None and p.rev <= old.rev:
            return False
        if s.newest_ns is not None and p.window_start_ns < s.newest_ns - self.history_ns:
            return False
        entry = _entry(p)
        s.windows[p.window_start_ns] = s.new_windows[p.window_start_ns] = entry
        s.predictions += 1
        self.stats["predictions"] += 1
        if s.newest_ns is None or p.window_start_ns >= s.newest_ns:
            s.newest_ns = p.window_start_ns
            s.current = p
            s.tile_dirty = True
            self._trim(s)
        self._learn_labels(p)
        return True

    def _trim(self, s: StreamView) -> None:
        assert s.newest_ns is not None
        floor = s.newest_ns - self.history_ns
        # windows come in start order (a revision keeps its window's place), so the
        # oldest are at the front of the dict and trimming looks at no other
        while s.windows:
            first = next(iter(s.windows))
            if first >= floor and len(s.windows) <= self.max_windows:
                break
            del s.windows[first]
            s.new_windows.pop(first, None)

    def _learn_labels(self, p: Prediction) -> None:
        if len(self.labels) >= MAX_LABELS:
            return
        known = set(self.labels)
        for label in (*p.scores, p.label):
            if label and label not in known and len(self.labels) < MAX_LABELS:
                self.labels.append(label)
                known.add(label)
                self._labels_dirty = True

    def on_media(self, sid: str, modality: Modality, now_ns: int) -> None:
        """A record of ``modality`` arrived for ``sid`` (its badge shows it live)."""
        s = self._stream(sid, now_ns)
        if s.last_seen_ns.get(modality) is None:
            s.tile_dirty = True
        s.last_seen_ns[modality] = now_ns
        self.stats[modality] += 1

    def on_text(self, sid: str, start_ns: int, end_ns: int, text: str, now_ns: int) -> None:
        """A transcript segment: a later one with the same start replaces it (a partial
        result revised)."""
        self.on_media(sid, "text", now_ns)
        s = self.streams[sid]
        kept = [seg for seg in s.segments if seg[0] != start_ns]
        s.segments.clear()
        s.segments.extend(sorted([*kept, (start_ns, end_ns, text.strip())])[-MAX_SEGMENTS:])
        s.tile_dirty = True

    def on_frame(self, sid: str, frame: FrameInfo, now_ns: int) -> None:
        """A new thumbnail of ``sid`` is ready to be fetched."""
        s = self.streams.get(sid)
        if s is None:
            return  # forgotten while its frame was being decoded
        s.frame = frame
        s.tile_dirty = True

    def on_dead_letter(self, sid: str | None, kind: str, reason: str, topic: str,
                       event_ns: int | None, now_ns: int) -> None:
        """A dead letter; ``sid`` None when its key is no stream id (it is only counted)."""
        self.dead.add(kind, reason, sid or "", topic, now_ns)
        self._dead_dirty = True
        if sid is None:
            return
        s = self._stream(sid, now_ns)
        s.dead_letters += 1
        s.tile_dirty = True
        if event_ns is not None:
            mark = (event_ns // NS_PER_MS, kind)
            s.marks.append(mark)
            s.new_marks.append(mark)
            del s.new_marks[:-MAX_MARKS]

    def on_health(self, health: dict[str, Any]) -> None:
        if health != self.health:
            self.health = health
            self._health_dirty = True

    # --- to the page ---------------------------------------------------------------------

    def snapshot(self, now_ns: int, config: dict[str, Any]) -> dict[str, Any]:
        """Everything, for a page that just connected. Built from copies, so it can be
        serialised on another thread while records keep coming."""
        return {
            "type": "snapshot", "now_ms": now_ns // NS_PER_MS, "config": dict(config),
            "labels": list(self.labels),
            "streams": {sid: {"tile": s.tile(now_ns),
                              "windows": [e.to_json() for e in s.windows.values()],
                              "marks": [list(m) for m in s.marks]}
                        for sid, s in self.streams.items()},
            "deadletters": self.dead.to_json(), "health": dict(self.health),
            "stats": dict(self.stats),
        }

    def take_delta(self, now_ns: int) -> dict[str, Any] | None:
        """What changed since the last call (None: nothing), and forget it was new."""
        check_badges = now_ns - self._badges_checked_ns >= BADGE_CHECK_NS
        if check_badges:
            self._badges_checked_ns = now_ns
        streams: dict[str, Any] = {}
        for sid, s in self.streams.items():
            part: dict[str, Any] = {}
            if check_badges and not s.tile_dirty and s.badges(now_ns) != s.shown_badges:
                s.tile_dirty = True
            if s.tile_dirty:
                tile = part["tile"] = s.tile(now_ns)
                s.shown_badges = tile["badges"]
                s.tile_dirty = False
            if s.new_windows:
                part["windows"] = [e.to_json() for e in s.new_windows.values()]
                s.new_windows = {}
            if s.new_marks:
                part["marks"] = [list(m) for m in s.new_marks]
                s.new_marks = []
            if part:
                streams[sid] = part
        out: dict[str, Any] = {}
        if streams:
            out["streams"] = streams
        if self._removed:
            out["removed"], self._removed = self._removed, []
        if self._labels_dirty:
            out["labels"], self._labels_dirty = list(self.labels), False
        if self._dead_dirty:
            out["deadletters"], self._dead_dirty = self.dead.to_json(), False
        if self._health_dirty:
            out["health"], self._health_dirty = dict(self.health), False
        if not out:
            return None
        out["type"] = "delta"
        out["now_ms"] = now_ns // NS_PER_MS
        out["stats"] = dict(self.stats)
        return out
