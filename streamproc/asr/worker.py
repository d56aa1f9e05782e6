"""``streamproc asr``: the Kafka shell around :class:`StreamTranscriber` (docs/asr.md).

A plain consumer loop (kafka-python, no asyncio): heartbeats run in the client's own
thread, so decoding on the loop's thread delays nothing that has a deadline.

Guarantees, per partition of ``PREFIX.audio``:

- segments are sent with acks=all, and an offset is committed only after every segment
  sent so far is acknowledged (flush, then commit): a committed offset never covers audio
  whose final segment could still be lost;
- the offset committed is the oldest record any stream of the partition still needs (the
  audio since its last checkpoint), and the commit's metadata holds every stream's
  checkpoint ``(next_seq, epoch_ns)``. Offset and checkpoints are committed in one
  request, so they always agree. A worker that takes the partition over (after ``kill
  -9``, a restart or a rebalance) resumes each stream at its checkpoint and publishes
  the same segments again with the same ``sp-seq`` and spans, which the aligner counts
  once;
- a record that is not wire-format audio is counted and skipped with its reason: the
  alignment worker dead-letters it already.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from streamproc import kafka
from streamproc.asr.engine import Engine, load_engine
from streamproc.asr.stream import Checkpoint, CutConfig, StreamTranscriber
from streamproc.asr.vad import make_vad
from streamproc.config import Settings
from streamproc.errors import UserError
from streamproc.wire import codec as wire

log = logging.getLogger("streamproc.asr")

COMMIT_INTERVAL_S = 1.0
STATUS_INTERVAL_S = 30.0
# Kafka's default offset.metadata.max.bytes is 4096; one stream's checkpoint takes about
# 40 bytes plus its id, so a partition holds ~80 streams' checkpoints before this matters.
MAX_METADATA_BYTES = 4000
METADATA_VERSION = 1


class AsrError(RuntimeError):
    """A segment could not be published: the worker stops with its audio uncommitted."""


def cut_config(settings: Settings) -> CutConfig:
    return CutConfig(end_silence_ms=settings.asr_end_silence_ms,
                     partial_interval_ms=settings.asr_partial_interval_ms,
                     max_utterance_ms=settings.asr_max_utterance_ms,
                     gap_ms=settings.asr_gap_ms, lang=settings.asr_lang or None)


def encode_checkpoints(checkpoints: dict[str, Checkpoint]) -> str:
    return json.dumps({"v": METADATA_VERSION,
                       "s": {sid: [c.next_seq, c.epoch_ns] for sid, c in checkpoints.items()}},
                      separators=(",", ":"), ensure_ascii=False)


def decode_checkpoints(metadata: str | None) -> dict[str, Checkpoint]:
    """The checkpoints a commit's metadata holds; {} for none or for what we did not write."""
    if not metadata:
        return {}
    try:
        obj = json.loads(metadata)
        if obj.get("v") != METADATA_VERSION:
            return {}
        return {str(sid): Checkpoint(int(v[0]), int(v[1])) for sid, v in obj["s"].items()}
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        log.warning("ignoring commit metadata that is not ours: %.80r", metadata)
        return {}


@dataclass
class _Partition:
    tp: TopicPartition
    resume: dict[str, Checkpoint]  # checkpoints read back for streams not seen yet
    streams: dict[str, StreamTranscriber] = field(default_factory=dict)
    last_audio: dict[str, float] = field(default_factory=dict)  # wall clock, monotonic
    position: int | None = None  # the offset after the last record handled
    committed: tuple[int, str] | None = None


@dataclass
class AsrStats:
    records: int = 0
    audio_s: float = 0.0
    decode_s: float = 0.0  # CPU time in the transcribers
    partials: int = 0
    finals: int = 0
    idle_flushes: int = 0
    commits: int = 0
    bad: Counter = field(default_factory=Counter)  # skipped records by reason kind
    # (streams left out by asr_streams are not counted: they are not ours to transcribe)


class AsrWorker:
    """Reads ``PREFIX.audio`` in consumer group ``APPID-asr``, publishes to ``PREFIX.text``."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.group = f"{settings.app_id}-asr"
        self.topic_in = settings.topic("audio")
        self.topic_out = settings.topic("text")
        self.cut = cut_config(settings)
        self.engine = engine if engine is not None else load_engine(settings.asr_engine)
        self.stats = AsrStats()
        self.parts: dict[int, _Partition] = {}
        self._sent: list[Any] = []  # producer futures since the last flush
        self._consumer = kafka.group_consumer(settings, self.group, "asr")
        self._producer = kafka.producer(settings)
        self._bad_logged: Counter = Counter()
        self._only = {x.strip() for x in settings.asr_streams.split(",") if x.strip()}
        # what the group coordinator changed during the last poll, in order
        self._changes: list[tuple[bool, list[TopicPartition]]] = []

    # --- lifecycle -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._consumer.subscribe([self.topic_in], listener=_Listener(self))
        log.info("asr worker: group %s, %s -> %s, engine %s", self.group, self.topic_in,
                 self.topic_out, getattr(self.engine, "name", type(self.engine).__name__))
        last_commit = last_status = time.monotonic()
        try:
            while not stop.is_set():
                batch = self._consumer.poll(timeout_ms=100, max_records=200)
                self._rebalanced()
                now = time.monotonic()
                for tp, records in batch.items():
                    part = self.parts.get(tp.partition)
                    if part is None:
                        continue
                    for rec in records:
                        self._handle(part, rec, now)
                self._idle_flush(now)
                if now - last_commit >= COMMIT_INTERVAL_S:
                    self.commit()
                    last_commit = now
                if now - last_status >= STATUS_INTERVAL_S:
                    self._log_status()
                    last_status = now
            self.commit()
            self._log_status()
        finally:
            self.close()

    def close(self) -> None:
        for part in self.parts.values():
            for tr in part.streams.values():
                tr.close()
        self._producer.close(timeout=30)
        self._consumer.close(autocommit=False)

    # --- records ---------------------------------------------------------------------

    def _handle(self, part: _Partition, msg: Any, now: float) -> None:
        part.position = msg.offset + 1
        self.stats.records += 1
        rec = wire.KafkaRecord.from_client(msg)
        try:
            chunk = wire.decode(rec, expect_modality="audio",
                                max_bytes=self.settings.max_message_bytes)
        except wire.WireError as e:
            self._skip(rec, e.kind.value, e.reason)
            return
        assert isinstance(chunk, wire.AudioChunk)
        sid = chunk.stream_id
        if self._only and sid not in self._only:
            return
        tr = part.streams.get(sid)
        if tr is None:
            tr = StreamTranscriber(sid, self.cut, self.engine,
                                   make_vad(self.settings.asr_vad, self.settings.asr_vad_mode),
                                   part.resume.pop(sid, None))
            part.streams[sid] = tr
        part.last_audio[sid] = now
        t0 = time.process_time()
        try:
            segments = tr.add(chunk, msg.offset)
        except Exception as e:  # a bug must not stop every other stream
            log.exception("asr failed on %s offset %d of stream %r", self.topic_in, msg.offset,
                          sid)
            self._skip(rec, wire.DeadLetterKind.INTERNAL.value, f"{type(e).__name__}: {e}")
            return
        finally:
            self.stats.decode_s += time.process_time() - t0
        self.stats.audio_s += chunk.n_samples / chunk.sample_rate
        self._publish(segments)

    def _skip(self, rec: wire.KafkaRecord, kind: str, reason: str) -> None:
        self.stats.bad[kind] += 1
        self._bad_logged[reason] += 1
        seen = self._bad_logged[reason]
        if seen <= 3 or seen % 100 == 0:
            log.warning("skipped %s offset %d partition %d (%s, %d so far): %s", rec.topic,
                        rec.offset, rec.partition, kind, seen, reason)

    def _publish(self, segments: list[wire.TranscriptSegment]) -> None:
        for seg in segments:
            key, value, headers, ts_ms = wire.encode_parts(seg)
            self._sent.append(self._producer.send(self.topic_out, value=value, key=key,
                                                  headers=headers, timestamp_ms=ts_ms))
            if seg.final:
                self.stats.finals += 1
                log.debug("final %s seq %d [%d, %d): %s", seg.stream_id, seg.seq,
                          seg.start_ns, seg.end_ns, seg.text)
            else:
                self.stats.partials += 1

    def _idle_flush(self, now: float) -> None:
        """End the utterances of streams whose audio stopped, once nothing is left to read."""
        idle_s = self.settings.asr_gap_ms / 1000
        for part in self.parts.values():
            high = self._consumer.highwater(part.tp)
            if high is not None and part.position is not None and part.position < high:
                continue  # records of this partition are still to be read: not idle
            for sid, tr in part.streams.items():
                if tr.in_utterance and now - part.last_audio.get(sid, now) >= idle_s:
                    self.stats.idle_flushes += 1
                    self._publish(tr.flush())

    # --- commits ---------------------------------------------------------------------

    def commit(self, partitions: list[int] | None = None) -> None:
        """Flush the segments sent, then commit each partition's offset and checkpoints."""
        self._producer.flush(timeout=60)
        failed = [f.exception for f in self._sent if f.failed()]
        self._sent = []
        if failed:
            raise AsrError(f"{len(failed)} transcript segment(s) not published to "
                           f"{self.topic_out}: {failed[0]}")
        offsets = {}
        for p in (partitions if partitions is not None else list(self.parts)):
            part = self.parts.get(p)
            if part is None or part.position is None:
                continue
            offset, meta = self._commit_point(part)
            if part.committed != (offset, meta):
                offsets[part.tp] = OffsetAndMetadata(offset, meta, -1)
                part.committed = (offset, meta)
        if offsets:
            try:
                self._consumer.commit(offsets)
            except KafkaError as e:
                # a rebalance took a partition: its new owner resumes from the last commit
                # (older, and as consistent), so nothing is lost, only replayed
                log.warning("commit failed (%s); the partitions' next owner replays from "
                            "the previous commit", e)
                for tp in offsets:
                    if (part := self.parts.get(tp.partition)) is not None:
                        part.committed = None
                return
            self.stats.commits += 1

    def _commit_point(self, part: _Partition) -> tuple[int, str]:
        assert part.position is not None
        needed = [t for tr in part.streams.values() if (t := tr.needed_token) is not None]
        offset = min([part.position, *needed])
        checkpoints = dict(part.resume)
        for sid, tr in part.streams.items():
            if (c := tr.checkpoint) is not None:
                checkpoints[sid] = c
        self._expire(part, checkpoints)
        meta = encode_checkpoints(checkpoints)
        while len(meta.encode()) > MAX_METADATA_BYTES and checkpoints:
            # the oldest checkpoint goes: its stream restarts at seq 0 if replayed
            oldest = min(checkpoints, key=lambda s: checkpoints[s].epoch_ns)
            log.warning("partition %d: too many streams for the commit metadata; dropped "
                        "the checkpoint of %r", part.tp.partition, oldest)
            del checkpoints[oldest]
            part.resume.pop(oldest, None)
            meta = encode_checkpoints(checkpoints)
        return offset, meta

    def _expire(self, part: _Partition, checkpoints: dict[str, Checkpoint]) -> None:
        """Forget streams whose checkpoint is far behind the partition's newest one."""
        if not checkpoints or not self.settings.stream_expiry_ms:
            return
        horizon = max(c.epoch_ns for c in checkpoints.values()) - \
            self.settings.stream_expiry_ms * 1_000_000
        for sid in [s for s, c in checkpoints.items() if c.epoch_ns < horizon]:
            tr = part.streams.get(sid)
            if tr is not None and (tr.in_utterance or tr.needed_token is not None):
                continue
            del checkpoints[sid]
            part.resume.pop(sid, None)
            part.streams.pop(sid, None)
            part.last_audio.pop(sid, None)

    # --- rebalances ------------------------------------------------------------------
    # The coordinator calls the listener on the client's IO thread, where kafka-python 3
    # allows no blocking call (commit, committed): it only notes the change, and the
    # loop applies it after poll() returns, before the records poll() fetched.

    def _rebalanced(self) -> None:
        changes, self._changes = self._changes, []
        for added, tps in changes:
            if added:
                self.assigned(tps)
            else:
                self.revoked(tps)

    def assigned(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            if tp.topic != self.topic_in or tp.partition in self.parts:
                continue
            committed = self._consumer.committed(tp, metadata=True)
            resume = decode_checkpoints(committed.metadata if committed else None)
            self.parts[tp.partition] = _Partition(tp, resume)
        log.info("assigned partitions %s", sorted(self.parts))

    def revoked(self, tps: list[TopicPartition]) -> None:
        """Drop the partitions' state: their next owner replays from the last commit."""
        gone = [tp.partition for tp in tps if tp.partition in self.parts]
        for p in gone:
            for tr in self.parts.pop(p).streams.values():
                tr.close()
        if gone:
            log.info("revoked partitions %s", gone)

    def _log_status(self) -> None:
        s = self.stats
        streams = sum(len(p.streams) for p in self.parts.values())
        rtf = s.decode_s / s.audio_s if s.audio_s else 0.0
        log.info("asr: %d streams, %.0f s audio (RTF %.2f), %d partials, %d finals, "
                 "%d idle flushes, skipped %s", streams, s.audio_s, rtf, s.partials,
                 s.finals, s.idle_flushes, dict(s.bad) or "none")


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: AsrWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.worker._changes.append((False, list(revoked)))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker._changes.append((True, list(assigned)))


def run_asr(settings: Settings) -> int:
    """``streamproc asr``: run until SIGINT/SIGTERM."""
    import signal

    from streamproc.topics import check_topics

    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_topics(settings, inputs_only=True)
    import faulthandler

    faulthandler.enable()  # a crash inside the engine's C code still says where
    faulthandler.register(signal.SIGUSR1)  # every thread's stack, for a worker that hangs
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        worker = AsrWorker(settings)
    except ImportError as e:
        raise UserError(f"asr engine {settings.asr_engine!r} cannot load: {e}") from None
    worker.run(stop)
    log.info("asr worker stopped")
    return 0
