"""Fakes and builders for tests of streamproc and of code built on it."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamproc.align.aligner import AlignConfig, Window
from streamproc.capture.sources import Clock
from streamproc.config import MODALITIES
from streamproc.wire.codec import (
    AudioChunk,
    KafkaRecord,
    MediaRecord,
    Prediction,
    Source,
    TranscriptSegment,
    VideoFrame,
    Word,
    encode,
)
from streamproc.worker.core import Consumed

# --- records: real wire records, small enough to build by the thousand -------------------

#: Nanoseconds per millisecond and per second: event times are nanoseconds.
MS = 1_000_000
S = 1_000_000_000
#: The default sample rate (Settings.sample_rate) that :func:`chunk` assumes.
SAMPLE_RATE = 16_000


@functools.cache
def _base_frame() -> VideoFrame:
    img = np.zeros((12, 16, 3), np.uint8)
    img[:, :, 1] = np.arange(16, dtype=np.uint8) * 16
    return VideoFrame.from_image("s", 0, 0, img)


def frame(stream_id: str, ts_ns: int, seq: int, source: Source | None = None) -> VideoFrame:
    """A real 16x12 JPEG frame (encoded once, then shared) at ``ts_ns``."""
    return dataclasses.replace(_base_frame(), stream_id=stream_id, ts_ns=ts_ns, seq=seq,
                               source=source)


def chunk(stream_id: str, ts_ns: int, seq: int, samples: np.ndarray,
          sample_rate: int = SAMPLE_RATE, source: Source | None = None) -> AudioChunk:
    """Real s16le PCM from int16 (or float in [-1, 1]) samples, shaped (n,) or (n, channels)."""
    c = AudioChunk.from_samples(stream_id, ts_ns, seq, samples, sample_rate)
    return dataclasses.replace(c, source=source) if source is not None else c


def segment(stream_id: str, seq: int, start_ns: int, end_ns: int, text: str | None = None,
            source: Source | None = None,
            words: Sequence[Word | tuple[str, int, int]] | None = None) -> TranscriptSegment:
    """A final transcript segment over ``[start_ns, end_ns)``; its text is ``word<seq>``
    unless given, or its words joined when ``words`` (Words or (text, start_ns, end_ns))
    are."""
    timed = None if words is None else tuple(
        w if isinstance(w, Word) else Word(*w) for w in words)
    if text is None:
        text = f"word{seq}" if timed is None else " ".join(w.text for w in timed)
    return TranscriptSegment(stream_id, seq, text, start_ns, end_ns, source=source,
                             words=timed)


def align_config(window_ms: int = 1000, hop_ms: int | None = None, late_ms: int = 0,
                 idle_ms: int = 10**9, **changes: Any) -> AlignConfig:
    """An AlignConfig from milliseconds: tumbling unless ``hop_ms``, the same lateness and
    idle deadline for every modality unless ``lateness_ns`` / ``idle_ns`` is given (idle
    deadlines practically off by default); other AlignConfig fields as keywords."""
    lateness = changes.pop("lateness_ns", {m: late_ms * MS for m in MODALITIES})
    idle = changes.pop("idle_ns", {m: idle_ms * MS for m in MODALITIES})
    return AlignConfig(window_ns=window_ms * MS, hop_ns=(hop_ms or window_ms) * MS,
                       lateness_ns=lateness, idle_ns=idle, **changes)


#: Where :func:`prediction`'s windows start (a realistic epoch time).
PREDICTIONS_T0 = 1_763_000_000 * S


def prediction(stream_id: str, hop: int, label: str = "7") -> Prediction:
    """The prediction for a stream's window number ``hop`` (1 s windows every 0.5 s from
    PREDICTIONS_T0): ``label`` scored 0.9, every modality present."""
    start = PREDICTIONS_T0 + hop * 500 * MS
    return Prediction(
        stream_id, start, start + S, label, {label: 0.9, "other": 0.1},
        {"video": {"frames": 15}, "audio": {"seconds": 1.0}, "text": {"segments": 1},
         "missing": []},
        {"name": "lmf", "version": "1"}, PREDICTIONS_T0, {"total": 42.0})


# --- the worker core: a manual clock, consumed records and their acks, a list output -----


#: A wall time to start manual clocks at (2023-11-14), so event times look like real ones.
T0 = 1_700_000_000 * S


class ManualClock(Clock):
    """Wall time in nanoseconds that moves only when told: a capture source's ``clock``,
    or, called, the worker core's."""

    def __init__(self, start_ns: int = T0) -> None:
        self.now = start_ns

    def __call__(self) -> int:
        return self.now

    def now_ns(self) -> int:
        return self.now

    def advance(self, ms: float) -> int:
        """Move ``ms`` milliseconds on; the new time."""
        self.now += round(ms * MS)
        return self.now


@dataclasses.dataclass(eq=False)
class FakeAck:
    """The ack handle of one consumed record: counts its acks."""

    topic: str
    partition: int
    offset: int
    acks: int = 0

    def ack(self) -> None:
        self.acks += 1


def consumed(record: KafkaRecord | MediaRecord, topic: str, partition: int,
             offset: int) -> Consumed:
    """``record`` (a wire record, or media encoded into one) as consumed from
    ``topic:partition`` at ``offset``, with a :class:`FakeAck` handle."""
    rec = record if isinstance(record, KafkaRecord) else encode(record)
    rec = dataclasses.replace(rec, topic=topic, partition=partition, offset=offset)
    return Consumed(topic, partition, offset, rec, FakeAck(topic, partition, offset))


class ListOutput:
    """A window output that keeps every window it is given.

    Windows are durably published at once, or, with ``hold=True``, only when
    :meth:`publish` (or :meth:`fail`) says so, oldest first.
    """

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.windows: list[Window] = []
        self.pending: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        pass

    def submit(self, window: Window) -> asyncio.Future[None]:
        self.windows.append(window)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hold:
            self.pending.append(fut)
        else:
            fut.set_result(None)
        return fut

    def publish(self, n: int | None = None) -> None:
        """Publish the ``n`` oldest held windows (all when None)."""
        done, self.pending = self.pending[:n], self.pending[len(self.pending[:n]):]
        for fut in done:
            fut.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """Fail the oldest held window's publish."""
        self.pending.pop(0).set_exception(exc)

    async def stop(self) -> None:
        pass
