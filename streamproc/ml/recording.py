"""``streamproc record``: input topics -> aligner -> labelled windows -> a dataset directory.

A plain kafka-python consumer (no group, nothing committed: recording is a read-only
copy) reads the three input topics from the beginning, records go through the same
:class:`~streamproc.align.aligner.Aligner` the worker runs, and each closed window gets the label
whose span in the labels file covers enough of it. Windows without a label (between
spans, or of streams the file does not name) are counted and skipped; undecodable and
late records are counted and reported, never silently dropped.

With ``append`` the windows go into an existing dataset (same window settings; windows it
already holds are skipped, so recording the topics again adds only what is new). With
``to_end`` recording stops at the end the topics had when it started, even while other
streams go on publishing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from streamproc.align.aligner import AlignConfig, Aligner, OutcomeStatus, Window
from streamproc.config import Settings
from streamproc.errors import UserError
from streamproc.ml.dataset import DatasetWriter, LabelSpans, read_labels
from streamproc.wire.codec import NS_PER_S, KafkaRecord, MediaRecord, WireError, decode


@dataclass
class RecordStats:
    records: int = 0
    undecodable: int = 0
    late: int = 0
    duplicates: int = 0
    capped: int = 0  # refused by the aligner's memory cap
    capped_frames: int = 0  # buffered frames the memory cap dropped (the oldest)
    capped_audio_s: float = 0.0
    future: int = 0  # event time too far ahead of the clock (--max-future-ms)
    windows: int = 0
    labelled: int = 0
    unlabelled: int = 0
    already: int = 0  # labelled, but the dataset held the window already
    reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        out = (f"{self.records} records, {self.windows} windows: {self.labelled} labelled "
               f"and written, {self.already} already in the dataset, {self.unlabelled} "
               "without a label skipped; "
               f"{self.undecodable} undecodable, {self.late} late, {self.duplicates} "
               f"duplicate, {self.capped} capped (memory cap) and {self.future} future "
               "(clock) records")
        if self.capped_frames or self.capped_audio_s:
            out += (f"\nthe memory cap dropped {self.capped_frames} buffered frames and "
                    f"{self.capped_audio_s:.1f} s of buffered audio: windows are missing or "
                    "masked (raise --max-buffer-frames / --max-buffer-audio-s)")
        if self.reasons:
            out += "\nundecodable: " + "; ".join(f"{n}x {r}" for r, n in self.reasons.items())
        return out


class WindowLabeler:
    """Labels windows from a labels file (pure: no Kafka).

    ``origin``: ``"first"`` puts time 0 of each stream at the earliest event time seen
    for it (a clip replayed from its start), or an absolute epoch time in ns.
    """

    def __init__(self, spans: LabelSpans, origin: str | int = "first",
                 min_overlap: float = 0.75) -> None:
        if not 0 < min_overlap <= 1:
            raise UserError("min_overlap must be in (0, 1]")
        self.spans = spans
        self.origin = origin
        self.min_overlap = min_overlap
        self.first_ns: dict[str, int] = {}

    def observe(self, rec: MediaRecord) -> None:
        t = rec.ts_ns
        if t < self.first_ns.get(rec.stream_id, t + 1):
            self.first_ns[rec.stream_id] = t

    def label(self, w: Window) -> str | None:
        if self.origin == "first":
            origin = self.first_ns.get(w.stream_id)
            if origin is None:
                return None
        else:
            origin = int(self.origin)
        return self.spans.label_for(w.stream_id, w.start_ns, w.end_ns, origin, self.min_overlap)


def parse_origin(text: str) -> str | int:
    """``first`` or seconds since the epoch -> the WindowLabeler origin."""
    if text == "first":
        return "first"
    try:
        return round(float(text) * NS_PER_S)
    except ValueError:
        raise UserError(f"--origin must be 'first' or seconds since the epoch, got {text!r}"
                        ) from None


def record(settings: Settings, labels: str | Path, out: str | Path, *,
           origin: str | int = "first", min_overlap: float = 0.75, split: str = "train",
           idle_exit_s: float = 10.0, max_windows: int | None = None,
           stop: threading.Event | None = None, overwrite: bool = False,
           append: bool = False, add_labels: bool = False, to_end: bool = False,
           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> RecordStats:
    """Record labelled windows until the topics stay quiet for ``idle_exit_s`` seconds
    (or ``max_windows`` are written, or ``stop`` is set, or with ``to_end`` every input
    partition is read up to where it ended at the start); then flush what is buffered."""
    from kafka import TopicPartition

    from streamproc import kafka
    from streamproc.topics import check_topics

    spans = read_labels(labels)
    labeler = WindowLabeler(spans, origin, min_overlap)
    check_topics(settings, inputs_only=True)
    stats = RecordStats()
    # a dataset holds each window once, complete: final windows only
    aligner = Aligner(AlignConfig.from_settings(
        settings.replace(provisional_on="", final_within_ms=0)))
    consumer = kafka.consumer(settings)
    modality = {settings.topic(m): m for m in ("video", "audio", "text")}
    source = {"recorded_from": settings.bootstrap_servers, "topics": list(modality),
              "labels_file": str(labels), "origin": str(origin), "min_overlap": min_overlap,
              "window_ms": settings.window_ms, "hop_ms": settings.hop_ms,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    window = {"window_ms": settings.window_ms, "hop_ms": settings.hop_ms,
              "frames_per_window": settings.frames_per_window,
              "sample_rate": settings.sample_rate}
    writer = DatasetWriter(out, labels=spans.labels, source=source, window=window,
                           overwrite=overwrite, append=append, add_labels=add_labels)
    if append and writer.shards:
        log(f"appending to {writer.path}: {writer.count} windows, labels {writer.labels}")

    def emit(windows: list[Window]) -> None:
        for w in windows:
            stats.windows += 1
            label = labeler.label(w)
            if label is None:
                stats.unlabelled += 1
                continue
            if writer.add(w, label, split, {"quality": dict(w.quality)}):
                stats.labelled += 1
            else:
                stats.already += 1

    try:
        tps = [TopicPartition(t, p) for t in modality
               for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps) if to_end else {}
        quiet_since = time.monotonic()
        while not (stop is not None and stop.is_set()):
            polled = consumer.poll(timeout_ms=200)
            now = time.time_ns()
            got = 0
            for msgs in polled.values():
                for msg in msgs:
                    got += 1
                    stats.records += 1
                    kr = KafkaRecord.from_client(msg)
                    try:
                        rec = decode(kr, expect_modality=modality[msg.topic],
                                     max_bytes=settings.max_message_bytes)
                    except WireError as e:
                        stats.undecodable += 1
                        why = str(e) if len(stats.reasons) < 20 else "(other reasons)"
                        stats.reasons[why] = stats.reasons.get(why, 0) + 1
                        continue
                    labeler.observe(rec)
                    outcome = aligner.add(rec, now)
                    if outcome.status is OutcomeStatus.LATE:
                        stats.late += 1
                    elif outcome.status is OutcomeStatus.DUPLICATE:
                        stats.duplicates += 1
                    elif outcome.status is OutcomeStatus.CAPPED:
                        stats.capped += 1
                    elif outcome.status is OutcomeStatus.FUTURE:
                        stats.future += 1
            emit(aligner.poll(now))
            if got:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > idle_exit_s:
                log(f"no new records for {idle_exit_s:g}s: finishing")
                break
            if max_windows is not None and stats.labelled >= max_windows:
                break
            if to_end and all(consumer.position(tp) >= end for tp, end in ends.items()):
                log("read the topics up to where they ended at the start: finishing")
                break
        emit(aligner.flush())
        stats.capped_frames = int(aligner.stats.get("capped_frames", 0))
        stats.capped_audio_s = float(aligner.stats.get("capped_audio_s", 0.0))
    finally:
        consumer.close()
        writer.recording_source["origins_ns"] = dict(labeler.first_ns)
        writer.close()
    log(stats.summary())
    log(f"dataset written to {writer.path} ({writer.count} windows)")
    return stats
