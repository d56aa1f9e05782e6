"""Event-time alignment of video, audio and transcripts into windows (docs/design.md §3).

Pure logic: no Kafka, no asyncio, no clock of its own. The faust agent feeds decoded records
in with :meth:`Aligner.add` and takes closed windows out with :meth:`Aligner.poll`; wall-clock
time is passed in as integer nanoseconds so tests drive it with a fake clock.

Why it is shaped this way:

- Records go into per-window buckets when they arrive (a few appends) and every per-window
  job (sorting, K-frame sampling, audio assembly, resampling) happens once, when the window
  closes. That keeps :meth:`Aligner.add` cheap, which is what the worker's throughput is.
- A stream's windows close strictly in start order and ``closed_before`` only moves forward,
  so a window can never be emitted twice by one aligner and "late" has one clear meaning:
  every window the record belongs to has already closed.
- Watermarks are per stream and modality. A modality that has sent nothing for its idle
  deadline (wall clock) does not hold its watermark still: from then on the watermark
  moves with the clock from where the last record left it, so a dead microphone never
  stalls a stream, windows keep closing one hop at a time rather than in a burst when a
  source falls silent, and a source's own delay (a recogniser's lag) is kept; windows
  closed without a modality say so (``present`` and ``quality``).
- A watermark never moves backwards. A record whose windows all closed (late, or a
  revision) is not counted as the modality sending: it says nothing about the present, and
  its old event time must not hold the stream back. A silent modality that comes back
  behind where the clock had moved its watermark takes it up from there.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from itertools import pairwise
from operator import attrgetter
from typing import Any

import numpy as np

# Imported with the module, never inside a window: importing scipy.signal takes 1-2 s,
# which on the worker's event loop would stall every stream at the first resampled window.
from scipy.signal import firwin, resample_poly

from streamproc.config import MODALITIES, ConfigError, Modality, Settings
from streamproc.wire.codec import (
    AUDIO_FORMATS,
    NS_PER_S,
    AudioChunk,
    MediaRecord,
    Source,
    TranscriptSegment,
    VideoFrame,
    pcm_samples,
)


class OutcomeStatus(StrEnum):
    """What :meth:`Aligner.add` did with a record (:attr:`Outcome.status`)."""

    ACCEPTED = "accepted"  # buffered for its windows (perhaps only the open ones)
    DUPLICATE = "duplicate"  # a copy of a record already had: counted, not buffered
    LATE = "late"  # every window it belongs to has closed
    REPLAYED = "replayed"  # only belongs to windows emitted before a restart
    CAPPED = "capped"  # refused or dropped by a buffer cap or the span limit
    FUTURE = "future"  # ends too far ahead of the wall clock or the stream's watermarks


class ClosedBy(StrEnum):
    """Why a window closed: its ``quality["closed_by"]``."""

    WATERMARK = "watermark"  # every expected modality's data for it had arrived
    DEADLINE = "deadline"  # closed while an expected modality was idle
    BOUND = "bound"  # a final due (final_within) before a slower modality's data arrived
    FLUSH = "flush"  # end of input or shutdown
    REVISION = "revision"  # a final revised: transcript segments came after it

# The identity (modality, seq, span) of records whose windows closed is remembered for this
# many closed windows per stream, so a copy that comes after its windows closed is still
# reported as a duplicate, not late. Looked up only on that rare path, so add() pays nothing
# for it.
RETIRED_WINDOWS_KEPT = 512
# Keys remembered per closed window at most: while nothing closes (a stream held), late
# records keep adding theirs to the newest set, and a flood of them must not grow it for
# ever; past this a new set starts (the oldest drops out of the deque).
RETIRED_KEYS_PER_SET = 4096
# Late records a modality must send, steadily, before it counts as a source lagging more
# than before (with its idle deadline of them): two stragglers are no source.
LATE_RUN_RECORDS = 3
# Audio at another rate than the model's is resampled with its neighbours as filter context:
# chunks this close to a window join its bucket, so no filter edge falls inside the window.
RESAMPLE_PAD_NS = 10_000_000
# Windows whose every record the cap dropped keep their quality marks (capped_*) for when
# other data for them arrives later; at most this many such windows per stream.
MARKED_WINDOWS_KEPT = 4096
# Largest up/down factor given to the polyphase resampler. A rate whose exact ratio to
# sample_rate has larger terms (44101 Hz -> 16000/44101) would need a filter with that many
# phases: 0.26 s of work per 100 ms chunk at 44101 Hz, 1.8 s at 191999 Hz, on the event
# loop. Such a ratio is approximated instead, by the nearest fraction with terms up to this
# (typically within a few parts per million: a fraction of a sample per second).
MAX_RESAMPLE_TERM = 2000
# Where each expired stream had closed is remembered for this many streams (the oldest
# forgotten first), so a late record of an expired stream is reported late.
EXPIRED_STREAMS_KEPT = 100_000

# final_within counts on the poll clock, in steps of at most this: the worker polls every
# 100 ms while it is caught up, and its clock stands still while it is behind its input,
# so a longer step is mostly time in which the transcript may have been unread.
BOUND_STEP_MAX_NS = 250_000_000

_INF = float("inf")
_by_ts_seq = attrgetter("ts_ns", "seq")
_end_ns = attrgetter("end_ns")


@dataclass
class Window:
    """One closed window of one stream: what the model sees, plus how good it is.

    - ``frames``: up to K frames spread over the window (:func:`pick_indices`), in time
      order, still encoded (JPEG/PNG); ``frame_count`` is how many it really had.
    - ``audio``: float32 mono at ``sample_rate``, exactly ``round(W * sample_rate)``
      samples, zeros where nothing arrived; ``audio_mask`` is True where a real sample is.
    - ``segments``: every transcript segment that overlaps the window, by start time; one
      with word timings as a copy cut to the window (only its words that overlap it).
    - ``present``: per modality, whether it contributed anything (the model's mask).
    - ``quality``: closed_by (a :class:`ClosedBy`), frames_dropped
      (sequence gaps between this window's frames), audio_missing_s, duplicates (copies
      received for this window), late_events (records of the stream found late since its
      previous window), capped_frames / capped_audio_s / capped_segments (dropped from this
      window by the memory cap). docs/alignment.md has the details.
    - ``provenance``: per modality, the Kafka source of every input record used.
    - ``ingest_ms``: per modality, capture -> worker of the stream's newest record of it
      (ms); the worker fills it in, the aligner leaves it empty.
    - ``rev``, ``final``: a *provisional* window (``final`` False, ``rev`` 0) is emitted
      when the fast modalities are complete, before the slow ones; the *final* one comes
      when every modality is (``rev`` 1 when provisional windows are configured, else 0).
      A transcript segment that comes after the final, within the revision horizon,
      makes a *revised* final (``rev`` + 1, ``closed_by`` revision, ``segments_added``).
      ``unchanged``: a final with nothing added since its provisional (its prediction can
      be reused).
    - ``text_ids``: the identities of the window's transcript records (:func:`record_id`),
      which a restarted worker compares with what it had published.
    """

    stream_id: str
    start_ns: int
    end_ns: int
    frames: list[VideoFrame]
    frame_count: int
    audio: np.ndarray
    audio_mask: np.ndarray
    sample_rate: int
    segments: list[TranscriptSegment]
    present: dict[Modality, bool]
    quality: dict[str, float | int | str] = field(default_factory=dict)
    provenance: dict[Modality, list[Source]] = field(default_factory=dict)
    ingest_ms: dict[Modality, float] = field(default_factory=dict)
    rev: int = 0
    final: bool = True
    unchanged: bool = False
    text_ids: frozenset[int] = frozenset()

    @property
    def key(self) -> tuple[str, int]:
        return (self.stream_id, self.start_ns)

    @property
    def text(self) -> str:
        """The transcript words of the window, segments joined in time order.

        A partial segment (``final=False``) is left out when a final segment overlaps it:
        recognisers revise partials, so the final words replace them rather than repeat.
        """
        finals = [f for f in self.segments if f.final]
        words = []
        for s in self.segments:
            if not s.final and any(f.start_ns <= s.end_ns and s.start_ns <= f.end_ns
                                   for f in finals):
                continue
            if s.text.strip():
                words.append(s.text.strip())
        return " ".join(words)


def even_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), each the centre of its n/k stretch (all of
    them when n <= k)."""
    if n <= k:
        return list(range(n))
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def pick_indices(ts: Sequence[int], start_ns: int, window_ns: int, k: int) -> list[int]:
    """Which k of a window's frames (their times ``ts``, in order) it hands the model: in
    each of k equal stretches of the window, the frame nearest the stretch's centre (the
    earlier of two as near); all of them when there are at most k, and
    :func:`even_indices` when a stretch holds none. Here, in batches and AV-Digits.

    Stretches are of event time, so where hopping windows overlap (the hop a whole number
    of stretches: 0.5 s of 1 s / 8) they pick the same frames, each decoded once; picks by
    place among a window's frames are shared only when the hop is a whole number of
    frames (30 fps, not 15 or 25)."""
    n = len(ts)
    if n <= k:
        return list(range(n))
    out: list[int] = []
    j = 0
    for i in range(k):
        lo = start_ns + i * window_ns // k
        hi = start_ns + (i + 1) * window_ns // k
        centre = lo + (hi - lo) // 2
        while j < n and ts[j] < lo:
            j += 1
        best, near = -1, 0
        while j < n and ts[j] < hi:
            d = abs(ts[j] - centre)
            if best < 0 or d < near:
                best, near = j, d
            j += 1
        if best < 0:
            return even_indices(n, k)
        out.append(best)
    return out


def pick_frames(frames: Sequence[VideoFrame], start_ns: int, window_ns: int,
                k: int) -> list[VideoFrame]:
    """The frames :func:`pick_indices` picks from a window's ``frames`` (in time order)."""
    return [frames[i] for i in pick_indices([f.ts_ns for f in frames], start_ns, window_ns, k)]


# ---------------------------------------------------------------------------------------
# configuration and outcomes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignConfig:
    """Everything the aligner needs, in nanoseconds; built from Settings in one place."""

    window_ns: int
    hop_ns: int
    lateness_ns: Mapping[Modality, int]
    idle_ns: Mapping[Modality, int]
    expected: tuple[Modality, ...] = MODALITIES
    frames_per_window: int = 8
    sample_rate: int = 16000
    max_buffer_frames: int = 600
    max_buffer_audio_s: float = 60.0
    # Not a Settings option: segments are tiny, this only stops unbounded growth.
    max_buffer_segments: int = 1000
    # A record ending this far ahead of the wall clock is refused (0: no limit, and the
    # wall clock says nothing about event time): one frame from a producer with a wrong
    # clock would otherwise push a watermark into the future.
    max_future_ns: int = 0
    # A record may move its modality's watermark at most this far ahead of both the wall
    # clock and the stream's other modalities (0, or max_future_ns 0: no limit).
    max_lead_ns: int = 0
    # Longest audio chunk / transcript segment accepted (0: only the buffer caps bound it).
    max_span_audio_ns: int = 0
    max_span_text_ns: int = 0
    # A stream with no open window and no record for this long is forgotten (0: never).
    stream_expiry_ns: int = 0
    # When these (expected) modalities are complete, a provisional window is emitted
    # before the others are; empty (or every expected one): final windows only.
    provisional: tuple[Modality, ...] = ()
    # Final windows stay revisable by late transcript segments while they start at most
    # this long before the stream's oldest open window (a multiple of hop_ns once built;
    # 0, or text not expected: no revisions).
    revision_ns: int = 0
    # A final window waits for the modalities not in ``provisional`` at most this long after
    # its provisional window went out (on poll()'s clock); what comes later revises it (0:
    # it waits for every watermark plus its lateness).
    final_within_ns: int = 0

    def __post_init__(self) -> None:
        lateness = {m: int(self.lateness_ns.get(m, 0)) for m in MODALITIES}
        object.__setattr__(self, "lateness_ns", lateness)
        idle = {m: int(self.idle_ns.get(m, 0)) for m in MODALITIES}
        object.__setattr__(self, "idle_ns", idle)
        object.__setattr__(self, "expected", tuple(self.expected))
        fast = tuple(m for m in self.expected if m in self.provisional)
        object.__setattr__(self, "provisional",
                           () if len(fast) == len(self.expected) else fast)
        if self.revision_ns > 0 and self.hop_ns > 0:
            horizon = 0 if "text" not in self.expected else \
                -(-self.revision_ns // self.hop_ns) * self.hop_ns
            object.__setattr__(self, "revision_ns", horizon)
        rules = [
            (self.window_ns > 0, "window_ns must be positive"),
            (0 < self.hop_ns <= self.window_ns, "hop_ns must be positive and at most window_ns"),
            (all(v >= 0 for v in lateness.values()), "lateness must not be negative"),
            (all(v >= 0 for v in idle.values()), "idle_ns must not be negative"),
            (bool(self.expected) and set(self.expected) <= set(MODALITIES),
             f"expected must be a non-empty subset of {MODALITIES}"),
            (self.frames_per_window >= 1, "frames_per_window must be at least 1"),
            (self.sample_rate >= 1, "sample_rate must be positive"),
            (self.max_buffer_frames >= 1, "max_buffer_frames must be at least 1"),
            (self.max_buffer_audio_s > 0, "max_buffer_audio_s must be positive"),
            (self.max_buffer_segments >= 1, "max_buffer_segments must be at least 1"),
            (self.max_future_ns >= 0, "max_future_ns must not be negative"),
            (self.max_lead_ns >= 0, "max_lead_ns must not be negative"),
            (self.max_span_audio_ns >= 0 and self.max_span_text_ns >= 0,
             "max_span_*_ns must not be negative"),
            (self.stream_expiry_ns >= 0, "stream_expiry_ns must not be negative"),
            (self.revision_ns >= 0, "revision_ns must not be negative"),
            (self.final_within_ns >= 0, "final_within_ns must not be negative"),
            (not self.final_within_ns or bool(self.provisional),
             "final_within_ns needs provisional modalities (it counts from their "
             "provisional window), and at least one expected modality outside them"),
        ]
        for ok, rule in rules:
            if not ok:
                raise ConfigError(f"invalid alignment config: {rule} ({self!r})")

    @classmethod
    def from_settings(cls, s: Settings) -> AlignConfig:
        ms = 1_000_000
        return cls(
            window_ns=s.window_ms * ms,
            hop_ns=s.hop_ms * ms,
            lateness_ns={m: s.lateness_ns(m) for m in MODALITIES},
            idle_ns={m: s.idle_deadline_ns(m) for m in MODALITIES},
            expected=s.modalities,
            frames_per_window=s.frames_per_window,
            sample_rate=s.sample_rate,
            max_buffer_frames=s.max_buffer_frames,
            max_buffer_audio_s=s.max_buffer_audio_s,
            max_future_ns=s.max_future_ms * ms,
            max_lead_ns=s.max_lead_ms * ms,
            max_span_audio_ns=s.max_span_audio_ms * ms,
            max_span_text_ns=s.max_span_text_ms * ms,
            stream_expiry_ns=s.stream_expiry_ms * ms,
            provisional=s.provisional_modalities,
            revision_ns=s.revision_horizon_ms * ms,
            final_within_ns=s.final_within_ns(),
        )

    @property
    def window_samples(self) -> int:
        """Audio samples in every window: round(W * sample_rate)."""
        return (self.window_ns * self.sample_rate + NS_PER_S // 2) // NS_PER_S

    def window_starts(self, start_ns: int, end_ns: int) -> range:
        """Starts of the windows overlapping ``[start_ns, end_ns)``, in order.

        A zero-length span (a frame, an empty segment) is the point ``start_ns``: the
        windows that contain it.
        """
        w, h = self.window_ns, self.hop_ns
        if end_ns <= start_ns:
            end_ns = start_ns + 1
        return range(((start_ns - w) // h + 1) * h, ((end_ns - 1) // h) * h + 1, h)


@dataclass(frozen=True, slots=True)
class Revisable:
    """What a restarted worker knows of a stream's windows that may still be revised.

    ``floor_ns``: every record whose last window starts at or after this was still unacked
    at the crash, so the replay brings every record of those windows back (None: no
    record was acked for having left the horizon). ``revs``:
    window start -> (the rev published last, the :func:`record_id` of its transcript
    records).
    """

    floor_ns: int | None
    revs: Mapping[int, tuple[int, frozenset[int]]] = field(default_factory=dict)


def record_id(rec: TranscriptSegment) -> int:
    """A transcript record's identity (its seq and span, as duplicates are told apart),
    as one stable 63-bit number: what progress records to tell a window's published
    transcript records from those a replay brings."""
    digest = hashlib.blake2b(f"{rec.seq}:{rec.start_ns}:{rec.end_ns}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one record given to :meth:`Aligner.add`.

    ``release_after_ns`` (accepted only): start of the last window that needs the record.
    The agent may ack the record once ``Aligner.closed_before(stream) > release_after_ns``
    (that window and every earlier one of the stream closed and was published).
    """

    status: OutcomeStatus
    reason: str = ""
    release_after_ns: int | None = None


# ---------------------------------------------------------------------------------------
# per-stream state
# ---------------------------------------------------------------------------------------


class _Bucket:
    """Records of one open window, in arrival order; sorted once when the window closes."""

    __slots__ = ("capped_audio_ns", "capped_frames", "capped_segments", "dups", "provisional",
                 "recs", "retire", "version")

    def __init__(self) -> None:
        # per modality; Any: the aligner knows each modality's record type by its key
        self.recs: dict[Modality, list[Any]] = {m: [] for m in MODALITIES}
        self.retire: list[MediaRecord] = []  # records whose LAST window this is
        self.dups = 0
        self.capped_frames = 0
        self.capped_audio_ns = 0
        self.capped_segments = 0
        self.version = 0  # moves with every record added or dropped
        self.provisional: int | None = None  # the version its provisional window had

    def empty(self) -> bool:
        return not any(self.recs.values())

    def holds_data(self, start: int, end: int) -> bool:
        """Whether any record has data inside ``[start, end)``: audio at another rate joins
        the windows next to it as resampling context only (RESAMPLE_PAD_NS), and a window
        with nothing else is no window of the stream."""
        recs = self.recs
        return bool(recs["video"] or recs["text"]) or any(
            r.ts_ns < end and r.end_ns > start for r in recs["audio"])


class _Kept:
    """A final window that late transcript segments may still revise.

    Its revisions are numbered by content: ``rev`` of the last published one plus the
    transcript records added since, so a restart that finds several revisions' records
    in its replay gives the same (rev, content) pair the crashed worker published, never
    a rev it used for other content.
    """

    __slots__ = ("keys", "pending", "published", "rev", "texts", "window")

    def __init__(self, window: Window, texts: list[TranscriptSegment], rev: int,
                 published: frozenset[int]) -> None:
        self.window = window  # as published last (or as a replay rebuilt it)
        self.texts = texts  # its transcript records, uncut, in (ts, seq) order
        # (seq, start, end) of its transcript records: the dedup set
        self.keys = {(r.seq, r.start_ns, r.end_ns) for r in texts}
        self.rev = rev  # of the last published revision, whose records are ``published``
        self.published = published
        self.pending: list[TranscriptSegment] = []  # came since, not in ``window`` yet


class _Stream:
    __slots__ = (
        "audio_ns",
        "blocker",
        "bound",
        "buckets",
        "buffered",
        "closed_before",
        "dropped_any",
        "due",
        "fast_blocker",
        "first_seen",
        "frames_per_window",
        "heard",
        "kept",
        "last_seen",
        "late_pending",
        "late_run",
        "marked",
        "provisional_at",
        "provisional_before",
        "published_before",
        "restore",
        "resume_before",
        "retired",
        "revise",
        "sid",
        "wm",
    )

    def __init__(self, sid: str, now_ns: int, resume_before: int | None) -> None:
        self.sid = sid
        self.first_seen = now_ns
        self.heard = now_ns  # its last record of any kind (for expiry)
        # per modality: (first, last, count) of its records whose windows had all closed,
        # while nothing live came between them
        self.late_run: dict[Modality, tuple[int, int, int]] = {}
        self.due = _INF  # when poll() looks at it again without a record (in Aligner._due)
        self.last_seen: dict[Modality, int] = {}
        self.wm: dict[Modality, int] = {}
        self.buckets: dict[int, _Bucket] = {}
        self.marked: dict[int, _Bucket] = {}  # open windows emptied by the cap: marks only
        # (seq, start, end) -> record for every record still held by an open window (also
        # the dedup set)
        self.buffered: dict[Modality, dict[tuple[int, int, int], MediaRecord]] = {
            m: {} for m in MODALITIES}
        self.retired: deque[set[tuple[str, int, int, int]]] = deque(maxlen=RETIRED_WINDOWS_KEPT)
        self.dropped_any = False  # a cap dropped data: buffered no longer has every seq
        self.audio_ns = 0
        # every window with start < closed_before is closed (emitted, empty, or before resume)
        self.closed_before = resume_before
        self.resume_before = resume_before
        self.late_pending = 0  # late records since this stream last emitted a window
        # the expected modality whose watermark limited closing at the last look, None when
        # all are idle or one was never seen (then every record may change things)
        self.blocker: Modality | None = None
        self.fast_blocker: Modality | None = None  # the same for the provisional limit
        # every window with start < this had its provisional emitted, or needs none
        self.provisional_before = resume_before
        # with final_within: (bound clock, window start) of each provisional emitted,
        # oldest first, until its final is due; and the end of the last window whose final
        # came due (a floor for the slower modalities' closing limit)
        self.provisional_at: deque[tuple[int, int]] = deque()
        self.bound: float = -_INF
        self.frames_per_window: int | None = None  # frames in its last final window
        self.kept: dict[int, _Kept] = {}  # closed final windows still revisable
        self.revise: set[int] = set()  # kept windows with segments pending
        # after a restart: windows below this were published before it, and what of them
        # (window start -> rev, record ids) progress had
        self.published_before: int | None = None
        self.restore: Mapping[int, tuple[int, frozenset[int]]] = {}

    def open_bucket(self, k: int) -> _Bucket:
        """The bucket of a window that gets its first record, with the cap's marks if any."""
        b = self.marked.pop(k, None) if self.marked else None
        if b is None:
            b = _Bucket()
        self.buckets[k] = b
        return b


def _span(rec: MediaRecord) -> tuple[int, int]:
    """Event-time span of a record: a point for frames, [start, end) for audio and text."""
    if rec.modality == "video":
        return rec.ts_ns, rec.ts_ns
    if rec.modality == "audio":
        return rec.ts_ns, rec.end_ns
    return rec.start_ns, rec.end_ns


def _remove(lst: list, rec: MediaRecord) -> None:
    """Remove this very object (records that compare equal may be different copies)."""
    for i, x in enumerate(lst):
        if x is rec:
            del lst[i]
            return


def _fmt_ns(ns: int | None) -> str:
    return "none" if ns is None else f"{ns / NS_PER_S:.3f}s"


# ---------------------------------------------------------------------------------------
# the aligner
# ---------------------------------------------------------------------------------------


class Aligner:
    """Aligns any number of streams (the agent keeps one per Kafka partition).

    ``resume``: stream_id -> start of the last window already emitted (e.g. before a crash).
    Windows with start <= that are never emitted again, and a replayed record that only
    belongs to such windows gets status ``REPLAYED``, not ``LATE``. It is read whenever a
    stream opens, so the caller may keep updating it. ``revisable``: stream_id -> what
    was published of its windows that may still be revised (:class:`Revisable`); the
    replay rebuilds those windows without emitting them again, unless the replay holds
    transcript records their last published revision did not.
    """

    def __init__(self, cfg: AlignConfig, resume: Mapping[str, int] | None = None,
                 revisable: Mapping[str, Revisable] | None = None) -> None:
        self.cfg = cfg
        self._w = cfg.window_ns
        self._h = cfg.hop_ns
        self._late = dict(cfg.lateness_ns)
        self._sr = cfg.sample_rate
        self._n_out = cfg.window_samples
        self._audio_cap_ns = int(cfg.max_buffer_audio_s * NS_PER_S)
        self._idle = dict(cfg.idle_ns)
        # a span longer than this would pin that many windows open: refused, not buffered
        buffer_span = max(self._w, self._audio_cap_ns)
        self._max_span = {"video": buffer_span,
                          "audio": min(cfg.max_span_audio_ns or buffer_span, buffer_span),
                          "text": min(cfg.max_span_text_ns or buffer_span, buffer_span)}
        self._lead = cfg.max_lead_ns
        self._expiry = cfg.stream_expiry_ns
        self._expiry_check_at = 0
        # stream_id -> closed_before of streams forgotten by expiry (oldest first)
        self._expired: dict[str, int] = {}
        self._gone: list[str] = []  # expired since the last take_expired()
        self._expected = cfg.expected
        self._within = cfg.final_within_ns
        # the clock final_within counts on: poll()'s, in steps of at most BOUND_STEP_MAX_NS
        self._bound_clock = 0
        # read when a stream opens (also again after it expired), so a map the caller
        # keeps current (the worker's published progress) is used as it is, not copied
        self._resume = resume if resume is not None else {}
        self._revisable = revisable if revisable is not None else {}
        self._rev_ns = cfg.revision_ns
        self._keep = bool(cfg.revision_ns)  # closed windows are kept for revisions
        self._streams: dict[str, _Stream] = {}
        self._dirty: set[str] = set()
        # (when, stream): streams to look at without a record, because a silent
        # modality's watermark moves with the clock or a modality's deadline comes
        self._due: list[tuple[int, str]] = []
        # the clock of the latest poll(): add() finds a silent modality's watermark where
        # poll() had moved it (add()'s own clock may run ahead, while a backlog is read)
        self._polled: float = -_INF
        # True until the caller says the replay after a resume is over (replay_done())
        self._replaying = True
        self._accepted: dict[int, Outcome] = {}
        self.stats: dict[str, int | float] = dict.fromkeys(
            ("accepted", "duplicates", "late", "late_partial", "late_windows_missed", "replayed",
             "capped", "capped_frames", "capped_segments", "too_long", "future", "ahead",
             "expired", "windows", "provisional", "provisional_skipped",
             "revisions", "revision_late", "revisions_restored", "windows_deadline",
             "windows_bound", "windows_flush", "windows_masked"), 0)
        self.stats["capped_audio_s"] = 0.0

    # --- public API --------------------------------------------------------------------

    def add(self, rec: MediaRecord, now_ns: int) -> Outcome:
        """Take one decoded record; ``now_ns`` is the wall clock (for the idle deadline)."""
        sid = rec.stream_id
        mod = rec.modality
        if rec.modality == "video":
            s = e = rec.ts_ns
        elif rec.modality == "audio":
            s, e = rec.ts_ns, rec.end_ns
        else:
            s, e = rec.start_ns, rec.end_ns
        if self.cfg.max_future_ns and e - now_ns > self.cfg.max_future_ns:
            return self._future(rec, e - now_ns)
        if e - s > self._max_span[mod]:
            return self._too_long(rec, e - s)
        st = self._streams.get(sid)
        if self._lead and s - now_ns > self._lead and self.cfg.max_future_ns:
            ahead = self._ahead(st, rec, s, now_ns)
            if ahead is not None:
                return ahead
        if st is None:
            st = self._open(sid, now_ns)
        h = self._h
        if rec.modality == "video":
            lo, hi = s, s + 1
        else:
            lo, hi = s, (e if e > s else s + 1)
            if rec.modality == "audio" and rec.sample_rate != self._sr:
                lo, hi = lo - RESAMPLE_PAD_NS, hi + RESAMPLE_PAD_NS
        k_first = ((lo - self._w) // h + 1) * h
        k_last = ((hi - 1) // h) * h

        buffered = st.buffered[mod]
        # A record is its seq and its span: a producer that restarts its sequence numbers
        # sends new records under old seqs, and only a copy has the same span too.
        key = (rec.seq, s, e)
        cb = st.closed_before
        # a copy of a record whose windows had all closed (late, a revision, a replay) is
        # a duplicate before anything else: the source sent it once
        if key in buffered or ((st.dropped_any or (cb is not None and k_last < cb))
                               and self._seen(st, mod, key)):
            return self._duplicate(st, rec, k_first, k_last)

        st.heard = now_ns
        last_seen = st.last_seen
        seen = last_seen.get(mod)
        wm = st.wm.get(mod)
        x = self._clock_wm(st, mod)
        rb = st.resume_before
        # A record whose windows all closed (late, or a revision) is not the source sending:
        # it is alive, but the record says nothing about the present, and counting it would
        # end a silence and take the watermark back to the modality's newest event time,
        # holding the stream until the modality fell silent again (or for as long as a
        # recogniser far behind sends late segments now and then). A restart's replay (windows
        # published before it) counts where it moves the watermark on, until the caller
        # says it is over: it rebuilds the watermarks the restarted aligner lacks.
        live = cb is None or k_last >= cb
        replayed = self._replaying and rb is not None and k_last < rb
        lagging = False
        if not live and not replayed:
            # ... unless the modality sends nothing else, steadily (no gap over its idle
            # deadline) for its idle deadline: then it is not a straggler but a source now
            # lagging more than before. Its watermark follows its records again (the stream
            # waits for them from their own time, once), as for any source's steady delay;
            # otherwise all it sends would be late for as long as the lag lasts. Not when it
            # is further behind than max_future_ms: that is a clock that stepped back, and
            # following it would hold the stream for as long.
            run = st.late_run.get(mod)
            if run is None or now_ns - run[1] > self._idle[mod]:
                run = (now_ns, now_ns, 1)
            else:
                run = (run[0], now_ns, run[2] + 1)
            st.late_run[mod] = run
            # lasting some time too: a batch's records share one clock reading, and with a
            # deadline of 0 a run is never more than one batch
            lagging = (run[2] >= LATE_RUN_RECORDS
                       and now_ns - run[0] >= max(self._idle[mod], 1)
                       and not (self.cfg.max_future_ns and x is not None
                                and x - e > self.cfg.max_future_ns))
        elif live and mod in st.late_run:
            del st.late_run[mod]
        if lagging:
            if wm is None or e > wm:
                st.wm[mod] = e
            self._dirty.add(sid)
            last_seen[mod] = now_ns
        elif live or (replayed and (x is None or e > x)):
            # Never below where the clock had moved it: windows after those that closed
            # on the clock wait for its records from there, not from an older event time.
            if x is None or e > x:
                st.wm[mod] = e
            elif x != wm:
                st.wm[mod] = x
            # Only a record that can move one of the stream's closing limits (final or
            # provisional) makes poll() look at the stream: one of the modality that limits
            # it, or one that comes back from idle.
            if mod == st.blocker or st.blocker is None or \
                    now_ns - (st.first_seen if seen is None else seen) >= self._idle[mod] or \
                    (self.cfg.provisional and (mod == st.fast_blocker or st.fast_blocker is None)):
                self._dirty.add(sid)
            last_seen[mod] = now_ns

        reason = ""
        if cb is not None and k_first < cb:
            revised = 0
            if st.kept and mod == "text" and rec.final:  # type: ignore[union-attr]
                revised = self._revise(st, rec, key, k_first, min(k_last, cb - h))  # type: ignore[arg-type]
                if revised < 0:
                    return self._duplicate(st, rec, k_first, k_last)
            if k_last < cb:
                if revised:
                    self._remember(st, (mod, *key))  # a later copy is a duplicate
                    return Outcome(OutcomeStatus.ACCEPTED,
                                   f"revises {revised} closed window(s)", k_last)
                return self._too_old(st, rec, key, s, e, k_first, k_last)
            rb = st.resume_before
            lo = k_first if rb is None else max(k_first, rb)
            missed = (cb - lo) // h
            if revised:
                missed -= sum(1 for k in range(lo, cb, h) if k in st.kept)
            if missed > 0:
                self.stats["late_partial"] += 1
                self.stats["late_windows_missed"] += missed
                st.late_pending += 1
                reason = (f"partly late: {missed} of its windows already closed "
                          f"(stream closed before {_fmt_ns(cb)})")
            k_first = cb

        buffered[key] = rec
        buckets = st.buckets
        for k in range(k_first, k_last + h, h):
            b = buckets.get(k) or st.open_bucket(k)
            b.recs[mod].append(rec)
            b.version += 1
        b.retire.append(rec)  # b is the bucket of k_last

        if mod == "video":
            if len(buffered) > self.cfg.max_buffer_frames and self._cap(st, "video", rec):
                return self._refused(rec, "frames", self.cfg.max_buffer_frames)
        elif mod == "audio":
            st.audio_ns += e - s
            if st.audio_ns > self._audio_cap_ns and self._cap(st, "audio", rec):
                return self._refused(rec, "audio seconds", self.cfg.max_buffer_audio_s)
        elif len(buffered) > self.cfg.max_buffer_segments and self._cap(st, "text", rec):
            return self._refused(rec, "segments", self.cfg.max_buffer_segments)
        self.stats["accepted"] += 1
        if reason:
            return Outcome(OutcomeStatus.ACCEPTED, reason, k_last)
        # Outcomes are immutable: records released by the same window share one (building
        # a frozen dataclass is ~15% of add())
        out = self._accepted.get(k_last)
        if out is None:
            if len(self._accepted) >= 64:
                self._accepted.clear()
            out = self._accepted[k_last] = Outcome(OutcomeStatus.ACCEPTED, "", k_last)
        return out

    def replay_done(self) -> None:
        """The records of windows published before a restart have all been read again.
        From now on such a record is an ordinary late one (a recogniser far behind): it no
        longer moves its modality's watermark, which only a replay needs rebuilt."""
        if not self._replaying:
            return
        self._replaying = False
        for st in self._streams.values():
            st.late_run.clear()  # replayed records are no source lagging

    def poll(self, now_ns: int, provisional: bool = True) -> list[Window]:
        """Windows that may close now (watermark or idle deadline), per stream in start order.

        ``provisional`` False: windows whose provisional is due get none (the caller
        replays a backlog whose provisional windows went out before), and their finals
        then say nothing about a provisional (never ``unchanged``).

        Only streams that received records since the last poll are looked at, plus those
        whose time came (a deadline, or a window that a clock-driven watermark reaches), so
        calling this after each record is cheap.
        """
        if now_ns > self._polled:
            if self._polled > -_INF:
                self._bound_clock += min(int(now_ns - self._polled), BOUND_STEP_MAX_NS)
            self._polled = now_ns
        if self._expiry and now_ns >= self._expiry_check_at:
            self._expire(now_ns)
        ids = self._dirty
        self._dirty = set()
        due, streams = self._due, self._streams
        while due and due[0][0] <= now_ns:
            when, sid = heapq.heappop(due)
            st = streams.get(sid)
            if st is not None and st.due == when:
                st.due = _INF
                ids.add(sid)
        out: list[Window] = []
        for sid in ids:
            st = self._streams.get(sid)
            if st is not None:
                self._close_ready(st, now_ns, out, provisional)
        return out

    def flush(self) -> list[Window]:
        """End of input: close every buffered window of every stream."""
        out: list[Window] = []
        for st in self._streams.values():
            if st.revise:
                self._emit_revisions(st, out)
            if st.buckets:
                self._close_upto(st, sorted(st.buckets), ClosedBy.FLUSH, out)
        return out

    def take_expired(self) -> list[str]:
        """Streams forgotten by expiry since the last call, so the caller can drop what it
        keeps per stream too (every window of each closed before it expired)."""
        out, self._gone = self._gone, []
        return out

    def forget(self, stream_id: str) -> None:
        """Drop a stream's state (its partition was revoked; the new owner replays it)."""
        self._streams.pop(stream_id, None)
        self._expired.pop(stream_id, None)
        self._dirty.discard(stream_id)

    def pause(self, ns: int) -> None:
        """The input could not be read for ``ns`` (broker away, fetches failing): idleness
        means the source sent nothing, so that time does not count toward any idle
        deadline; every stream's last-seen times move on by it."""
        # so does the clock add() measures silences on, which then still finds a silent
        # modality's watermark where the last poll() had moved it
        self._polled += ns
        for st in self._streams.values():
            st.first_seen += ns
            st.heard += ns
            for m in st.last_seen:
                st.last_seen[m] += ns
            for m, (first, last, n) in st.late_run.items():
                st.late_run[m] = (first + ns, last + ns, n)

    def closed_before(self, stream_id: str) -> int | None:
        """Every window of the stream with start < this has closed (published or empty).

        The agent acks an accepted record once this is > its ``release_after_ns``; that
        also covers windows that end up with no data (never published). None: nothing
        closed yet.
        """
        st = self._streams.get(stream_id)
        if st is not None:
            return st.closed_before
        r = self._resume.get(stream_id)
        cb = self._expired.get(stream_id)
        resumed = None if r is None else (r // self._h + 1) * self._h
        return cb if resumed is None or (cb is not None and cb > resumed) else resumed

    def likely_sampled(self, frame: VideoFrame) -> bool:
        """Whether an accepted ``frame`` is likely one of the K frames its windows will pick
        (:func:`pick_indices`): the nearest to its stretch's centre, against the frame
        spacing of the stream's last window (every frame while that is unknown). Decoding
        ahead of the close only these saves the frames no window reads (about half at
        15 fps, K = 8, 1 s / 0.5 s windows); a miss is decoded when its window closes.
        ``frame`` must be accepted: its windows are open."""
        st = self._streams.get(frame.stream_id)
        n = None if st is None else st.frames_per_window
        kk = self.cfg.frames_per_window
        if st is None or n is None or n <= kk:
            return True
        w, h, ts = self._w, self._h, frame.ts_ns
        # within half the spacing of a centre: the nearest of evenly spaced frames; an
        # eighth more for jittered timestamps (a second frame decoded now and then)
        spacing = w // n
        near = spacing + spacing // 8
        # every window holding it (they share their stretches only when the hop is a whole
        # number of stretches)
        for start in range(((ts - w) // h + 1) * h, ts // h * h + h, h):
            i = (ts - start) * kk // w  # its stretch there, cut as pick_indices cuts
            lo = start + i * w // kk
            hi = start + (i + 1) * w // kk
            if 2 * abs(ts - (lo + (hi - lo) // 2)) <= near:
                return True
        return False

    @property
    def streams(self) -> list[str]:
        return list(self._streams)

    def has_stream(self, stream_id: str) -> bool:
        """Whether the stream is open (not expired or forgotten)."""
        return stream_id in self._streams

    def buffered(self) -> dict[str, float]:
        """What is held in memory now, summed over streams (for gauges)."""
        return {
            "frames": sum(len(st.buffered["video"]) for st in self._streams.values()),
            "audio_s": sum(st.audio_ns for st in self._streams.values()) / NS_PER_S,
            "segments": sum(len(st.buffered["text"]) for st in self._streams.values()),
            "windows": sum(len(st.buckets) for st in self._streams.values()),
            "revisable": sum(len(st.kept) for st in self._streams.values()),
        }

    # --- add() helpers -----------------------------------------------------------------

    def _open(self, sid: str, now_ns: int) -> _Stream:
        r = self._resume.get(sid)
        h = self._h
        st = _Stream(sid, now_ns, None if r is None else (r // h + 1) * h)
        cb = self._expired.pop(sid, None)
        if cb is not None:
            # expired here, not resumed after a restart: what closed stays closed, and a
            # record for it is late (not a replay), whatever the progress map says
            st.resume_before = None
            if st.closed_before is None or cb > st.closed_before:
                st.closed_before = cb
        elif st.resume_before is not None and self._rev_ns:
            rv = self._revisable.get(sid)
            if rv is not None:
                # the replay rebuilds the published windows still revisable: from the
                # floor (below it records may be acked, so windows may come back partly)
                rb = st.resume_before
                lo = rb - self._rev_ns
                if rv.floor_ns is not None:
                    lo = max(-(-rv.floor_ns // h) * h, lo)
                if lo < rb:
                    st.closed_before = lo
                    st.published_before = rb
                    st.restore = rv.revs
        self._streams[sid] = st
        return st

    def _expire(self, now_ns: int) -> None:
        """Forget streams with no open window that sent nothing for ``stream_expiry_ns``,
        remembering only where each had closed."""
        expiry = self._expiry
        expired = self._expired
        for sid, st in list(self._streams.items()):
            if st.buckets or now_ns - st.heard < expiry:
                continue
            del self._streams[sid]
            self._dirty.discard(sid)
            self._gone.append(sid)
            self.stats["expired"] += 1
            if st.closed_before is not None:
                expired[sid] = st.closed_before
                if len(expired) > EXPIRED_STREAMS_KEPT:
                    del expired[next(iter(expired))]
        # looked at every eighth of the expiry: a stream goes within 9/8 of it
        self._expiry_check_at = now_ns + max(expiry // 8, 1)

    def _duplicate(self, st: _Stream, rec: MediaRecord, k_first: int, k_last: int) -> Outcome:
        self.stats["duplicates"] += 1
        for k, b in st.buckets.items():  # the open ones only, however long the span
            if k_first <= k <= k_last:
                b.dups += 1
        return Outcome(OutcomeStatus.DUPLICATE,
                       f"duplicate of {rec.modality} seq {rec.seq} of stream "
                       f"{rec.stream_id!r}: counted once")

    def _revise(self, st: _Stream, rec: TranscriptSegment, key: tuple[int, int, int],
                k_first: int, k_last: int) -> int:
        """Add a final transcript segment that came after its windows closed to those of
        them still kept (revisable); their revisions go out at the next poll. Returns how
        many windows it revises; -1: it is a copy of a segment they have."""
        kept = st.kept
        hits = [kp for k in range(k_first, k_last + self._h, self._h)
                if (kp := kept.get(k)) is not None]
        if any(key in kp.keys for kp in hits):
            return -1
        for kp in hits:
            kp.keys.add(key)
            kp.pending.append(rec)
            st.revise.add(kp.window.start_ns)
        if hits:
            self._dirty.add(st.sid)
        return len(hits)

    def _too_old(self, st: _Stream, rec: MediaRecord, key: tuple[int, int, int], s: int, e: int,
                 k_first: int, k_last: int) -> Outcome:
        mod = rec.modality
        self._remember(st, (mod, *key))  # a copy of it is a duplicate, not late again
        if st.resume_before is not None and k_last < st.resume_before:
            self.stats["replayed"] += 1
            return Outcome(OutcomeStatus.REPLAYED,
                           f"{mod} seq {rec.seq} only belongs to windows emitted "
                           f"before the restart (up to {_fmt_ns(k_last)})")
        self.stats["late"] += 1
        if mod == "text" and self._rev_ns:
            self.stats["revision_late"] += 1  # too late even to revise
        st.late_pending += 1
        what = f"at {_fmt_ns(s)}" if s == e else f"spanning {_fmt_ns(s)}..{_fmt_ns(e)}"
        windows = (f"window {_fmt_ns(k_last)}..{_fmt_ns(k_last + self._w)}" if k_first == k_last
                   else f"windows {_fmt_ns(k_first)}..{_fmt_ns(k_last + self._w)}")
        horizon = f", revision horizon {self._rev_ns // 1_000_000} ms" \
            if mod == "text" and self._rev_ns else ""
        return Outcome(OutcomeStatus.LATE, (
            f"late {mod} record seq {rec.seq} of stream {rec.stream_id!r} {what}: its "
            f"{windows} already closed (stream closed before {_fmt_ns(st.closed_before)}; "
            f"{mod} watermark {self._standing(st, mod)}, allowed lateness "
            f"{self._late[mod] // 1_000_000} ms{horizon})"))

    def _clock_wm(self, st: _Stream, mod: Modality) -> int | None:
        """Where a modality's watermark stands on poll()'s clock (the one windows closed on;
        add()'s may run ahead while a backlog is read): its newest event time, or past it
        by as long as the modality has been silent past its idle deadline."""
        wm, seen = st.wm.get(mod), st.last_seen.get(mod)
        if wm is None or seen is None:
            return wm
        silent = self._polled - seen - self._idle[mod]
        return wm + int(silent) if silent > 0 else wm

    def _standing(self, st: _Stream, mod: Modality) -> str:
        """Where a modality's watermark stood at the last poll, for a late record's reason
        (the watermark its windows closed on)."""
        wm, x = st.wm.get(mod), self._clock_wm(st, mod)
        if x == wm:
            return _fmt_ns(wm)
        return f"{_fmt_ns(x)} (silent, moved on with the clock)"

    def _future(self, rec: MediaRecord, ahead_ns: int) -> Outcome:
        self.stats["future"] += 1
        what = "an event time" if rec.modality == "video" else "a span ending"
        return Outcome(OutcomeStatus.FUTURE, f"{rec.modality} record seq {rec.seq} of stream "
                       f"{rec.stream_id!r} has {what} {ahead_ns / NS_PER_S:.1f} s ahead of this "
                       f"worker's clock (limit {self.cfg.max_future_ns / NS_PER_S:.0f} s, "
                       "max_future_ms): is the producer's clock wrong?")

    def _ahead(self, st: _Stream | None, rec: MediaRecord, s: int,
               now_ns: int) -> Outcome | None:
        """Refuse a record that starts more than ``max_lead_ns`` ahead of both the wall
        clock and every watermark the stream has (its own modality's included); None:
        fine. From its start: a long span (a subtitle cue of 3 s) is no jump ahead, and
        the span limits bound how far its end reaches.

        A stream's first record is held only to ``max_future_ns``: a producer whose clock
        runs a few seconds ahead of the worker's then keeps streaming (each record moves
        its watermark by one record's length), while one record far ahead of a live
        stream is refused.
        """
        if st is None or not st.wm:
            return None
        mod = rec.modality
        ref = max(now_ns, max(st.wm.values()))
        if s - ref <= self._lead:
            return None  # a replay faster than real time: its modalities come together
        self.stats["future"] += 1
        self.stats["ahead"] += 1
        return Outcome(OutcomeStatus.FUTURE,
                       f"{mod} record seq {rec.seq} of stream {rec.stream_id!r} starts "
                       f"{(s - ref) / NS_PER_S:.1f} s ahead of this worker's clock and the "
                       "stream's other modalities (limit "
                       f"{self._lead / NS_PER_S:g} s, max_lead_ms): one record may not move "
                       "a watermark that far, it would make the stream's real data late; "
                       "is the producer's clock wrong?")

    def _too_long(self, rec: MediaRecord, span_ns: int) -> Outcome:
        mod = rec.modality
        self.stats["capped"] += 1
        self.stats["too_long"] += 1
        limit = self._max_span[mod]
        setting = ("max_buffer_audio_s" if limit == max(self._w, self._audio_cap_ns)
                   else f"max_span_{mod}_ms")
        return Outcome(OutcomeStatus.CAPPED,
                       f"{mod} record seq {rec.seq} of stream {rec.stream_id!r} "
                       f"spans {span_ns / NS_PER_S:.1f} s, longer than a {mod} "
                       f"record may ({limit / NS_PER_S:.1f} s, {setting}): dropped")

    def _refused(self, rec: MediaRecord, what: str, cap: float) -> Outcome:
        self.stats["capped"] += 1
        return Outcome(OutcomeStatus.CAPPED,
                       f"{rec.modality} seq {rec.seq} of stream {rec.stream_id!r} "
                       f"dropped: buffer cap of {cap} {what} per stream reached and "
                       f"it is the oldest buffered (its windows cannot close yet)")

    def _cap(self, st: _Stream, mod: Modality, new: MediaRecord) -> bool:
        """Drop the oldest buffered records of ``mod`` until under the cap.

        Returns True when the record just added was itself dropped.
        """
        buffered = st.buffered[mod]
        new_dropped = False
        while True:
            if mod == "video":
                over = len(buffered) > self.cfg.max_buffer_frames
            elif mod == "audio":
                over = st.audio_ns > self._audio_cap_ns
            else:
                over = len(buffered) > self.cfg.max_buffer_segments
            if not over or not buffered:
                return new_dropped
            victim = min(buffered.values(), key=lambda r: (_span(r)[0], r.seq))
            new_dropped |= victim is new
            self._drop(st, victim)

    def _drop(self, st: _Stream, rec: MediaRecord) -> None:
        mod = rec.modality
        s, e = _span(rec)
        del st.buffered[mod][(rec.seq, s, e)]
        st.dropped_any = True
        self._remember(st, (mod, rec.seq, s, e))
        lo, hi = s, (e if e > s else s + 1)
        if rec.modality == "audio":
            dur = e - s
            st.audio_ns -= dur
            self.stats["capped_audio_s"] += dur / NS_PER_S
            if rec.sample_rate != self._sr:
                lo, hi = lo - RESAMPLE_PAD_NS, hi + RESAMPLE_PAD_NS
        else:
            self.stats["capped_frames" if mod == "video" else "capped_segments"] += 1
        ks = self.cfg.window_starts(lo, hi)
        for k in ks:
            b = st.buckets.get(k)
            if b is None:
                continue
            _remove(b.recs[mod], rec)
            b.version += 1
            if k == ks[-1]:
                _remove(b.retire, rec)  # hold no reference to what was dropped
            if mod == "video":
                b.capped_frames += 1
            elif mod == "audio":
                b.capped_audio_ns += max(0, min(e, k + self._w) - max(s, k))
            else:
                b.capped_segments += 1
            if b.empty() and b.provisional is None:
                # nothing left to emit: keep only its marks, and only so many, so memory
                # stays bounded even when windows cannot close (a window whose provisional
                # went out stays, so it still gets its final, empty and saying what the cap
                # dropped)
                del st.buckets[k]
                if len(st.marked) < MARKED_WINDOWS_KEPT:
                    st.marked[k] = b

    def _remember(self, st: _Stream, key: tuple[str, int, int, int]) -> None:
        if not st.retired or len(st.retired[-1]) >= RETIRED_KEYS_PER_SET:
            st.retired.append(set())
        st.retired[-1].add(key)

    def _seen(self, st: _Stream, mod: Modality, key: tuple[int, int, int]) -> bool:
        """Was this record (seq, start, end) retired, dropped or reported late recently?"""
        mkey = (mod, *key)
        return any(mkey in keys for keys in st.retired)

    # --- closing -----------------------------------------------------------------------

    def _close_ready(self, st: _Stream, now_ns: int, out: list[Window],
                     provisional: bool = True) -> None:
        if st.revise:  # before closing moves the horizon past them
            self._emit_revisions(st, out)
        idle, late, fast = self._idle, self._late, self.cfg.provisional
        last_seen, wms = st.last_seen, st.wm
        # min over waited-for expected modalities of watermark - lateness: over all of them
        # (final windows) and over the fast ones (provisional windows)
        limit: float = _INF
        fast_limit: float = _INF
        blocker = fast_blocker = None  # whose next record can move it (None: the clock)
        blocked = fast_blocked = False
        due: float = _INF  # when to look again without a record
        # with final_within: the windows whose final is due (their provisional went out
        # final_within ago on poll()'s clock), as a limit for the slower modalities
        pending, within, clock = st.provisional_at, self._within, self._bound_clock
        while pending and pending[0][0] + within <= clock:
            st.bound = max(st.bound, pending.popleft()[1] + self._w)
        bound = st.bound
        for m in self._expected:
            seen = last_seen.get(m)
            bounded = bound > -_INF and m not in fast
            by: Modality | None
            if seen is None:
                # never sent: waited for until its deadline plus its lateness from the
                # stream's first record (a first transcript segment comes a segment and the
                # recogniser's lag after the stream starts), then not at all until it sends:
                # a stream without transcripts is not held back for ever
                wait = st.first_seen + idle[m] + late[m]
                if now_ns >= wait:
                    continue
                due = min(due, wait)
                if not bounded:
                    blocked = True
                    fast_blocked |= m in fast
                    continue
                lim, by = bound, None
            else:
                silent = now_ns - seen - idle[m]
                if silent > 0:
                    # silent past its deadline: the watermark moves on with the clock from
                    # where its last record left it (so a recogniser's lag is kept, and
                    # windows close one hop at a time rather than in a burst)
                    lim, by = wms[m] + silent - late[m], None
                else:
                    lim, by = wms[m] - late[m], m
                    due = min(due, seen + idle[m])
                if bounded and bound > lim:
                    lim, by = bound, None  # its final is due: it waits no longer
            if lim < limit:
                limit, blocker = lim, by
            if m in fast and lim < fast_limit:
                fast_limit, fast_blocker = lim, by
        st.blocker = None if blocked else blocker
        st.fast_blocker = None if fast_blocked else fast_blocker
        w, h = self._w, self._h
        if not blocked:
            if limit == _INF:
                # no expected modality to wait for (none of them ever came): close all
                if st.buckets:
                    self._close_upto(st, sorted(st.buckets), None, out)
            else:
                k_max = int((limit - w) // h * h)  # the last window whose end <= limit
                cb = st.closed_before
                if cb is None or k_max >= cb:
                    ready = sorted(k for k in st.buckets if k <= k_max)
                    if ready:
                        self._close_upto(st, ready, None, out)
                    self._advance(st, k_max + h)
                if blocker is None:
                    # the clock moves the limit: come back when it reaches the next window's end
                    due = min(due, now_ns + int(k_max + h + w - limit))
        if fast and not fast_blocked and fast_limit != _INF:
            k_fast = int((fast_limit - w) // h * h)
            done = max((x for x in (st.provisional_before, st.closed_before) if x is not None),
                       default=None)
            if done is None or k_fast >= done:
                # (a replay's rebuilt windows were published before the restart: none)
                lo = st.published_before if st.published_before is not None else -_INF
                for k in sorted(k for k in st.buckets if lo <= k <= k_fast):
                    b = st.buckets[k]
                    if b.provisional is not None or not b.holds_data(k, k + w):
                        continue
                    if not provisional:
                        self.stats["provisional_skipped"] += 1
                        continue
                    b.provisional = b.version
                    out.append(self._build(st, k, b, self._closed_by(st, k, fast), False))
                    if within:
                        pending.append((clock, k))
                st.provisional_before = k_fast + h
            if fast_blocker is None:
                due = min(due, now_ns + int(k_fast + h + w - fast_limit))
        if pending:  # the next final due (one emitted just now included)
            due = min(due, now_ns + pending[0][0] + within - clock)
        if due < st.due:
            st.due = int(due)
            heapq.heappush(self._due, (st.due, st.sid))

    def _closed_by(self, st: _Stream, k: int, modalities: Iterable[Modality]) -> ClosedBy:
        """WATERMARK when every one of ``modalities``' own watermark has passed the end of
        window ``k`` plus its lateness; else DEADLINE when one short of it was silent past
        its deadline (or never sent), BOUND when only final_within closed it."""
        end = k + self._w
        why = ClosedBy.WATERMARK
        for m in modalities:
            late = self._late[m]
            wm = st.wm.get(m)
            if wm is None or wm - late < end:
                if not self._within or m in self.cfg.provisional:
                    return ClosedBy.DEADLINE
                # did its silence get it there (the clock-moved watermark), or the bound?
                x = self._clock_wm(st, m)
                if (st.first_seen + self._idle[m] + late <= self._polled if x is None
                        else x - late >= end):
                    return ClosedBy.DEADLINE
                why = ClosedBy.BOUND
        return why

    def _close_upto(self, st: _Stream, ready: list[int], closed_by: ClosedBy | None,
                    out: list[Window]) -> None:
        restored = st.published_before
        for k in ready:
            b = st.buckets.pop(k)
            why = self._closed_by(st, k, self.cfg.expected) if closed_by is None else closed_by
            if not b.holds_data(k, k + self._w) and b.provisional is None:
                pass  # resampling context only: closed, and nothing to publish
            elif restored is not None and k < restored:
                self._restore(st, k, b, why, out)
            else:
                w = self._build(st, k, b, why)
                out.append(w)
                if self._keep:
                    st.kept[k] = _Kept(w, b.recs["text"], w.rev, w.text_ids)
            self._retire(st, b)
        self._advance(st, ready[-1] + self._h)

    def _restore(self, st: _Stream, k: int, b: _Bucket, why: ClosedBy,
                 out: list[Window]) -> None:
        """A window a restarted worker's replay rebuilt, published before the restart: kept
        for revisions, and emitted again only as a revision, when the replay holds
        transcript records its last published revision did not have."""
        w = self._build(st, k, b, why, count=False)
        self.stats["revisions_restored"] += 1
        rev, published = st.restore.get(k, (w.rev, w.text_ids))
        added = len(w.text_ids - published)
        if not added:
            w = replace(w, rev=rev)
        else:
            rev += added
            w = replace(w, rev=rev, quality=dict(
                w.quality, closed_by=ClosedBy.REVISION, segments_added=added))
            published = w.text_ids
            self.stats["revisions"] += 1
            out.append(w)
        if self._keep:
            st.kept[k] = _Kept(w, b.recs["text"], rev, published)

    def _emit_revisions(self, st: _Stream, out: list[Window]) -> None:
        """The revised finals of kept windows that got transcript segments since the last
        look, in start order: what was published plus the new segments (no revision when
        the segments were all in the last published one, as after a restart's replay)."""
        w_ns = self._w
        for k in sorted(st.revise):
            kp = st.kept.get(k)
            if kp is None or not kp.pending:
                continue
            # everything from the records, in the order a window built at once has them
            texts = kp.texts + kp.pending
            kp.pending = []
            texts.sort(key=_by_ts_seq)
            kp.texts = texts
            ids = frozenset(record_id(x) for x in texts)
            prev = kp.window
            provenance = dict(prev.provenance)
            provenance["text"] = [x.source for x in texts if x.source is not None]
            present = dict(prev.present)
            present["text"] = True
            added = len(ids - kp.published)
            quality = prev.quality if not added else dict(
                prev.quality, closed_by=ClosedBy.REVISION, segments_added=added)
            w = replace(prev, segments=[_clip_words(x, k, k + w_ns) if x.words else x
                                        for x in texts],
                        present=present, quality=quality, provenance=provenance,
                        ingest_ms={}, text_ids=ids, final=True, unchanged=False,
                        rev=kp.rev + added)
            if added:
                kp.rev, kp.published = w.rev, ids
                self.stats["revisions"] += 1
                out.append(w)
            kp.window = w
        st.revise.clear()

    def stop_revising(self) -> None:
        """Keep no more windows for revisions (the worker stops): a transcript segment for
        a closed window is late from now on."""
        self._keep = False
        for st in self._streams.values():
            st.kept.clear()
            st.revise.clear()

    def _advance(self, st: _Stream, closed_before: int) -> None:
        if st.closed_before is None or st.closed_before < closed_before:
            st.closed_before = closed_before
            if st.marked:
                for k in [k for k in st.marked if k < closed_before]:
                    del st.marked[k]
            if st.kept:
                horizon = closed_before - self._rev_ns
                for k in [k for k in st.kept if k < horizon]:
                    del st.kept[k]
                    st.revise.discard(k)

    def _retire(self, st: _Stream, b: _Bucket) -> None:
        """Forget the records whose last window this was (remembering their seqs)."""
        keys: set[tuple[str, int, int, int]] = set()
        buffered = st.buffered
        for rec in b.retire:
            mod = rec.modality
            s, e = _span(rec)
            if buffered[mod].pop((rec.seq, s, e), None) is None:
                continue  # dropped by the cap earlier
            keys.add((mod, rec.seq, s, e))
            if mod == "audio":
                st.audio_ns -= e - s
        st.retired.append(keys)

    # --- building a window -------------------------------------------------------------

    def _build(self, st: _Stream, k: int, b: _Bucket, closed_by: ClosedBy,
               final: bool = True, count: bool = True) -> Window:
        """Window ``k`` from its bucket: the final one, or a provisional one (the bucket
        stays open and the stream's late count and window stats are left for the final);
        ``count`` False: a window rebuilt by a replay, not a new one."""
        frames = b.recs["video"]
        frames.sort(key=_by_ts_seq)
        n = len(frames)
        kk = self.cfg.frames_per_window
        picked = pick_frames(frames, k, self._w, kk)
        # gaps between consecutive frames' seqs; a seq going back (a producer restarted)
        # is no gap
        frames_dropped = sum(max(0, y.seq - x.seq - 1) for x, y in pairwise(frames))

        chunks = b.recs["audio"]
        chunks.sort(key=_by_ts_seq)
        audio, mask = self._assemble_audio(k, chunks)
        have = int(np.count_nonzero(mask))

        segs = b.recs["text"]
        segs.sort(key=_by_ts_seq)  # ts_ns of a segment is its start
        # a copy for the window: the bucket's list keeps the records as they came, and a
        # provisional window's bucket stays open to more
        segs = [_clip_words(s, k, k + self._w) if s.words else s for s in segs]

        present: dict[Modality, bool] = {"video": n > 0, "audio": have > 0, "text": bool(segs)}
        quality: dict[str, float | int | str] = {
            "closed_by": closed_by,
            "frames_dropped": frames_dropped,
            "audio_missing_s": (self._n_out - have) / self._sr,
            "late_events": st.late_pending,
            "duplicates": b.dups,
            "capped_frames": b.capped_frames,
            "capped_audio_s": b.capped_audio_ns / NS_PER_S,
            "capped_segments": b.capped_segments,
        }
        stats = self.stats
        if final and count:
            st.late_pending = 0
            if n:
                st.frames_per_window = n
            stats["windows"] += 1
            if closed_by is not ClosedBy.WATERMARK:
                stats["windows_" + closed_by] += 1
            if not all(present[m] for m in self.cfg.expected):
                stats["windows_masked"] += 1
        elif not final:
            stats["provisional"] += 1
        return Window(
            stream_id=st.sid, start_ns=k, end_ns=k + self._w,
            frames=picked, frame_count=n,
            audio=audio, audio_mask=mask, sample_rate=self._sr,
            segments=segs, present=present, quality=quality,
            provenance={m: [r.source for r in recs if r.source is not None]
                        for m, recs in b.recs.items()},
            # the final's rev depends on the settings only, never on whether this worker
            # emitted the provisional (a restarted one skips them while it catches up):
            # (stream, window, rev) names the same record across a crash
            rev=int(final and bool(self.cfg.provisional)), final=final,
            unchanged=final and b.provisional == b.version,
            text_ids=frozenset(record_id(x) for x in b.recs["text"]) if self._rev_ns
            else frozenset(),
        )

    def _assemble_audio(self, k: int, chunks: list[AudioChunk]) -> tuple[np.ndarray, np.ndarray]:
        """Cut the chunks sample-exactly at the window's edges onto the output sample grid.

        The output grid is global: sample g is at time g / sample_rate, and the window
        holds samples ceil(start * sr) .. +round(W * sr), so tumbling windows partition
        the input exactly. A chunk's first sample lands on the grid point nearest its ts.
        Back-to-back chunks are decoded as one run (one numpy pass per window, not one per
        chunk); runs at another rate are resampled whole, so no filter edge falls at a
        chunk boundary.
        """
        sr, n_out = self._sr, self._n_out
        out = np.zeros(n_out, np.float32)
        mask = np.zeros(n_out, np.bool_)
        if not chunks:
            return out, mask
        gs = -((-k * sr) // NS_PER_S)
        for ts, rate, fmt, ch, datas in _runs(chunks):
            frame = AUDIO_FORMATS[fmt].itemsize * ch
            if rate == sr:
                g0 = (ts * sr + NS_PER_S // 2) // NS_PER_S
                n = sum(len(d) for d in datas) // frame
                lo, hi = max(g0, gs), min(g0 + n, gs + n_out)
                if lo >= hi:
                    continue
                raw = b"".join(datas) if len(datas) > 1 else datas[0]
                x = _mono(pcm_samples(raw[(lo - g0) * frame:(hi - g0) * frame], fmt, ch))
                out[lo - gs:hi - gs] = x
                mask[lo - gs:hi - gs] = True
            else:
                up, down, fir = _resampler(sr, rate)
                x = _mono(pcm_samples(b"".join(datas), fmt, ch))
                y = resample_poly(x, up, down, window=fir).astype(np.float32, copy=False)
                g0 = (ts * sr + NS_PER_S // 2) // NS_PER_S
                lo, hi = max(g0, gs), min(g0 + len(y), gs + n_out)
                if lo < hi:
                    out[lo - gs:hi - gs] = y[lo - g0:hi - g0]
                    mask[lo - gs:hi - gs] = True
        return out, mask


def _clip_words(seg: TranscriptSegment, start: int, end: int) -> TranscriptSegment:
    """A word-timed segment cut to the window ``[start, end)`` the way audio is: its span
    clipped to the window, only the words that overlap the window, its text those words.

    A word ``[s, e)`` overlaps iff ``s < end and e > start``; a zero-length word is the
    point ``s`` and overlaps iff ``start <= s < end`` (as ``AlignConfig.window_starts``
    treats spans): a word crossing no edge is in exactly one tumbling window.
    """
    timed = seg.words or ()
    # starts and ends are in order (the decoder checks it), so the window's words are the
    # run from the first one ending at or after its start to the last starting before its end
    words = []
    for i in range(bisect_left(timed, start, key=_end_ns), len(timed)):
        w = timed[i]
        if w.start_ns >= end:
            break
        if w.end_ns > start or w.start_ns == w.end_ns:  # a point at start is in the window
            words.append(w)
    return replace(
        seg, start_ns=max(seg.start_ns, start), end_ns=min(seg.end_ns, end),
        text=" ".join(t for w in words if (t := w.text.strip())), words=tuple(words))


@functools.lru_cache(maxsize=32)
def _resampler(sr: int, rate: int) -> tuple[int, int, np.ndarray]:
    """(up, down, low-pass FIR) taking ``rate`` to ``sr``: the filter resample_poly
    designs itself (Kaiser window, beta 5), designed once per pair of rates rather than
    for every window (that was 60% of resampling 44.1 kHz)."""
    g = math.gcd(sr, rate)
    up, down = sr // g, rate // g
    if max(up, down) > MAX_RESAMPLE_TERM:
        m = MAX_RESAMPLE_TERM
        if up < down:
            ratio = Fraction(up, down).limit_denominator(m)
            up, down = ratio.numerator, ratio.denominator
        else:
            ratio = Fraction(down, up).limit_denominator(m)
            up, down = ratio.denominator, ratio.numerator
    m = max(up, down)
    return up, down, firwin(2 * 10 * m + 1, 1.0 / m, window=("kaiser", 5.0))


def _mono(x: np.ndarray) -> np.ndarray:
    """(n, channels) -> (n,): channels averaged."""
    return x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)


def _runs(chunks: list[AudioChunk]) -> list[tuple[int, int, str, int, list[bytes]]]:
    """Group time-sorted chunks into back-to-back runs of one rate, format and layout:
    (ts of the first, rate, fmt, channels, the chunks' PCM bytes)."""
    runs: list[tuple[int, int, str, int, list[bytes]]] = []
    next_g = 0  # where, on the run's own sample grid, a back-to-back chunk starts
    for c in chunks:
        r = runs[-1] if runs else None
        g = (c.ts_ns * c.sample_rate + NS_PER_S // 2) // NS_PER_S
        if r is not None and r[1] == c.sample_rate and r[2] == c.fmt and r[3] == c.channels \
                and g == next_g:
            r[4].append(c.data)
        else:
            runs.append((c.ts_ns, c.sample_rate, c.fmt, c.channels, [c.data]))
        next_g = g + c.n_samples
    return runs
