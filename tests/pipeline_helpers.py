"""AV-Digits clips replayed live through the real producer path, for the end-to-end and
metrics tests (test_pipeline, test_metrics_endpoint).

Clips come from ``avdigits.write_clip`` with the tiny preset's test-split settings, so a
clip's windows are drawn from the same distribution as the tiny model's held-out test
windows and its checkpoint accuracy says what to expect. Records go through
``sources.replay_many`` and the real :class:`~streamproc.capture.publisher.Publisher`; a recording
sink keeps each record's delivery future, so the tests know every record's Kafka offset
and can build the oracle's windows (worker_helpers.oracle_windows) with provenance.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamproc import kafka
from streamproc.align.aligner import Window
from streamproc.capture.publisher import Publisher
from streamproc.capture.sources import ReplaySpec, replay_many
from streamproc.capture.transcripts import load_transcript
from streamproc.config import Settings
from streamproc.dev.localkafka import free_port
from streamproc.inference.predictor import Predictor, Scored
from streamproc.ml import avdigits as av
from streamproc.ml.dataset import read_labels
from streamproc.testing import MS, S
from streamproc.wire import codec as wire

#: The tiny model's test split: held-out voices and images, the same difficulty.
CLIP_CFG = av.PRESETS["tiny"]
#: Every latency stage an inference prediction reports (docs/pipeline.md).
STAGES = ("total", "close", "queue", "inference", "preprocess", "model", "added", "publish")


def make_clips(out_dir: Path, digits: dict[str, list[int]], tts: Path) -> list[av.Clip]:
    return [av.write_clip(out_dir, ds, stream_id=sid, cfg=CLIP_CFG, cache_dir=tts)
            for sid, ds in digits.items()]


def transcript_silence_ms(clips: Iterable[av.Clip]) -> int:
    """The longest stretch (from a clip's start) in which its replay sends no transcript.

    A worker's idle deadline above it never closes a window while a transcript for it is
    still to come, so the live windows equal the oracle's whatever the machine's load.
    """
    gaps = [0]
    for c in clips:
        ends = [0] + [cue.end_ns for cue in load_transcript(c.transcript).cues]
        gaps += [b - a for a, b in itertools.pairwise(ends)]
    return math.ceil(max(gaps) / MS)


def pipeline_settings(bootstrap: str, tmp: Path, model: Path, clips: list[av.Clip],
                      **changes: object) -> Settings:
    """A worker serving ``model`` on CPU with the default windows (W 1 s, hop 0.5 s: what
    the model was trained on), on fresh topics, its idle deadline above every transcript
    silence of ``clips``."""
    prefix = f"p{uuid.uuid4().hex[:10]}"
    idle = max(3000, transcript_silence_ms(clips) + 1500)
    return Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, app_id=prefix,
                    partitions=4, model=str(model), device="cpu", idle_deadline_video_ms=idle,
                    idle_deadline_audio_ms=idle, idle_deadline_text_ms=idle,
                    metrics_port=0, web_port=free_port(), session_timeout_ms=6000,
                    data_dir=str(tmp / f"data-{prefix}")).replace(**changes)


def live_origin(settings: Settings, lead_s: float = 1.0) -> int:
    """A hop boundary ``lead_s`` or a little more from now: the clips' event time origin.

    Hop-aligned, so each 2 s digit holds three whole windows, cut as the dataset's were.
    """
    hop = settings.hop_ms * MS
    return (time.time_ns() + int(lead_s * S)) // hop * hop + hop


class RecordingSink:
    """The real Publisher, remembering every record it sends with its delivery future."""

    def __init__(self, publisher: Publisher,
                 on_publish: Callable[[wire.MediaRecord], None] | None = None) -> None:
        self.publisher = publisher
        self.on_publish = on_publish
        self._sent: list[tuple[wire.MediaRecord, object]] = []
        self._lock = threading.Lock()

    def publish(self, record: wire.MediaRecord) -> object:
        fut = self.publisher.publish(record)
        assert fut is not None, self.publisher.stats.last_error
        with self._lock:
            self._sent.append((record, fut))
        if self.on_publish is not None:
            self.on_publish(record)
        return fut

    def records(self, timeout: float = 30) -> list[wire.MediaRecord]:
        """Every record sent, with the Kafka source the broker gave it."""
        out = []
        for rec, fut in self._sent:
            md = fut.get(timeout)
            out.append(dataclasses.replace(rec, source=wire.Source(md.topic, md.partition,
                                                                   md.offset)))
        return out


def replay_clips(settings: Settings, clips: list[av.Clip], origin_ns: int,
                 on_publish: Callable[[wire.MediaRecord], None] | None = None,
                 realtime: bool = True) -> list[wire.MediaRecord]:
    """Replay the clips from ``origin_ns`` (one thread per stream, as ``streamproc demo``
    does; in real time, or as fast as they go); return every record sent, with its source."""
    with Publisher(settings) as pub:
        sink = RecordingSink(pub, on_publish)
        replay_many(sink, [ReplaySpec(c.stream_id, c.video, c.audio, c.transcript)
                           for c in clips], realtime=realtime, start_at_ns=origin_ns)
    return sink.records()


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


@dataclass
class Bad:
    """A record that must be dead-lettered; ``words`` must appear in the reason."""

    what: str
    modality: str  # the topic it goes to
    rec: wire.KafkaRecord
    words: str
    kind: str = "decode"
    source: wire.Source | None = None

    def error(self, max_bytes: int) -> wire.WireError:
        """What wire.decode (the worker's door) says about it."""
        try:
            wire.decode(self.rec, expect_modality=self.modality, max_bytes=max_bytes)
        except wire.WireError as e:
            return e
        raise AssertionError(f"{self.what}: wire.decode accepts it")


def bad_records(sid: str, ts_ns: int, max_bytes: int) -> list[Bad]:
    """One record of each kind of bad input, built from good records of stream ``sid``
    at event time ``ts_ns`` (sequence numbers far above the clip's)."""
    rng = np.random.default_rng(5)
    frame = wire.encode(wire.VideoFrame.from_image(
        sid, ts_ns, 90_000, rng.integers(0, 255, (64, 64, 3), np.uint8), quality=85))
    chunk = wire.encode(wire.AudioChunk.from_samples(
        sid, ts_ns, 90_000, 0.1 * rng.standard_normal(1600), 16000))
    seg = wire.encode(wire.TranscriptSegment(sid, 90_000, "seven", ts_ns, ts_ns + 500 * MS))
    # real noise JPEG over the worker's limit (the topics take it: they allow more)
    side = 64
    while True:
        big = wire.VideoFrame.from_image(sid, ts_ns, 90_001,
                                         rng.integers(0, 255, (side, side, 3), np.uint8),
                                         quality=100)
        if len(big.data) > max_bytes:
            break
        side *= 2

    def with_headers(r: wire.KafkaRecord, change: dict[str, bytes]) -> wire.KafkaRecord:
        return dataclasses.replace(r, headers=tuple((k, change.get(k, v)) for k, v in r.headers))

    return [
        Bad("corrupt JPEG", "video",  # its second half lost (no end-of-image marker)
            dataclasses.replace(frame, value=frame.value[:len(frame.value) // 2]), "JPEG"),
        Bad("odd PCM length", "audio", dataclasses.replace(chunk, value=chunk.value + b"\x01"),
            "PCM length"),
        Bad("unknown version", "video", with_headers(frame, {"sp-v": b"2"}),
            "unknown wire format version"),
        Bad("non-UTF-8 text", "text", dataclasses.replace(seg, value=b"\xff\xfe seven"),
            "not UTF-8"),
        Bad("missing headers", "audio", dataclasses.replace(chunk, headers=()),
            "missing header sp-v"),
        Bad("oversized record", "video", wire.encode(big), "over the", "oversize"),
    ]


def send_raw(settings: Settings, bad: list[Bad]) -> None:
    """Send records as they are (the Publisher only sends valid typed records)."""
    producer = kafka.producer(settings)
    try:
        futs = [producer.send(settings.topic(b.modality), key=b.rec.key, value=b.rec.value,
                              headers=list(b.rec.headers), timestamp_ms=b.rec.timestamp_ms)
                for b in bad]
        producer.flush(30)
        for b, fut in zip(bad, futs, strict=True):
            md = fut.get(30)
            b.source = wire.Source(md.topic, md.partition, md.offset)
    finally:
        producer.close()


# ---------------------------------------------------------------------------------------
# model and labels
# ---------------------------------------------------------------------------------------


def offline_scores(model: Path, windows: dict[tuple[str, int], Window]
                   ) -> tuple[Predictor, dict[tuple[str, int], Scored]]:
    """The checkpoint run directly (no Kafka, no batching) on the oracle's windows."""
    predictor = Predictor(str(model), "cpu", threads=1)
    keys = sorted(windows)
    return predictor, dict(zip(keys, predictor([windows[k] for k in keys]), strict=True))


def same_label(live: dict, offline: Scored, tie: float = 1e-3) -> bool:
    """The live label is the offline one, unless the offline top two are a near tie
    (batches of other sizes change the last float bits)."""
    if live["label"] == offline.label:
        return True
    top = sorted(offline.scores.values(), reverse=True)
    return top[0] - top[1] < tie and offline.scores[live["label"]] >= top[0] - tie


def truths(clips: list[av.Clip], origin_ns: int,
           keys: Iterable[tuple[str, int]], window_ns: int) -> dict[tuple[str, int], str]:
    """The known label of every window that lies wholly inside one digit of its clip."""
    spans = {c.stream_id: read_labels(c.labels) for c in clips}
    out = {}
    for sid, start in keys:
        label = spans[sid].label_for(sid, start, start + window_ns, origin_ns, min_overlap=1.0)
        if label is not None:
            out[(sid, start)] = label
    return out


def accuracy_floor(heldout: float, n: int) -> float:
    """The held-out accuracy minus three binomial standard errors for ``n`` windows."""
    return heldout - 3 * math.sqrt(heldout * (1 - heldout) / n)
