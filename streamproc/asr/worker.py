"""``streamproc asr``: the Kafka shell around the stream transcribers (docs/asr.md).

A plain consumer loop (kafka-python, no asyncio): heartbeats run in the client's own
thread, so decoding delays nothing that has a deadline. Decoding happens in a pool of
processes (``asr_processes``, :mod:`streamproc.asr.pool`), or on the loop's own thread
with ``asr_processes`` 0; the loop hands each stream's audio to its process, and the
pool's receiving thread publishes the segments that come back (one lock keeps the two
threads' view of the streams whole).

Guarantees, per partition of ``PREFIX.audio``:

- segments are sent with acks=all, and an offset is committed only after every segment
  sent so far is acknowledged (flush, then commit): a committed offset never covers audio
  whose final segment could still be lost;
- the offset committed is the oldest record any stream of the partition still needs (the
  audio since its last checkpoint, and every record still being decoded), and the commit's metadata holds every stream's
  checkpoint ``(next_seq, epoch_ns)``. Offset and checkpoints are committed in one
  request, so they always agree. A worker that takes the partition over (after ``kill
  -9``, a restart or a rebalance) resumes each stream at its checkpoint and publishes
  the same segments again with the same ``sp-seq`` and spans, which the aligner counts
  once;
- an idle flush (a stream's audio stopped mid-utterance) is the one decision taken on
  the wall clock, so it is committed before it is made: the stream's checkpoint names
  the event time it is flushed at (``flush_at_ns``), and a worker that replays the
  stream flushes it there too, publishing the same final;
- a record that is not wire-format audio is counted and skipped with its reason: the
  alignment worker dead-letters it already.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from streamproc import kafka
from streamproc.asr.pool import (
    FLUSHED,
    Decoding,
    Encoded,
    Result,
    make_decoding,
    pcm_bytes,
    resolve_processes,
)
from streamproc.asr.stream import Checkpoint, CutConfig, to_16k_mono
from streamproc.config import Settings
from streamproc.wire import codec as wire

log = logging.getLogger("streamproc.asr")

COMMIT_INTERVAL_S = 1.0
STATUS_INTERVAL_S = 30.0
# Kafka's default offset.metadata.max.bytes is 4096; one stream's checkpoint takes about
# 40 bytes plus its id, so a partition holds ~80 streams' checkpoints before this matters.
MAX_METADATA_BYTES = 4000
METADATA_VERSION = 1
# Records handed to decoding and not yet back, at most: past it the worker pauses its
# partitions until decoding catches up (100 ms chunks: 100 s of one stream's audio).
MAX_IN_FLIGHT = 1000
DRAIN_S = 10.0  # how long a stopping worker waits for the audio it handed to decoding


class AsrError(RuntimeError):
    """A segment could not be published: the worker stops with its audio uncommitted."""


def cut_config(settings: Settings) -> CutConfig:
    return CutConfig(end_silence_ms=settings.asr_end_silence_ms,
                     partial_interval_ms=settings.asr_partial_interval_ms,
                     max_utterance_ms=settings.asr_max_utterance_ms,
                     gap_ms=settings.asr_gap_ms, lang=settings.asr_lang or None)


def encode_checkpoints(checkpoints: dict[str, Checkpoint]) -> str:
    def plain(c: Checkpoint) -> list[int]:
        return [c.next_seq, c.epoch_ns] + ([] if c.flush_at_ns is None else [c.flush_at_ns])

    return json.dumps({"v": METADATA_VERSION,
                       "s": {sid: plain(c) for sid, c in checkpoints.items()}},
                      separators=(",", ":"), ensure_ascii=False)


def decode_checkpoints(metadata: str | None) -> dict[str, Checkpoint]:
    """The checkpoints a commit's metadata holds; {} for none or for what we did not write."""
    if not metadata:
        return {}
    try:
        obj = json.loads(metadata)
        if obj.get("v") != METADATA_VERSION:
            return {}
        return {str(sid): Checkpoint(int(v[0]), int(v[1]), int(v[2]) if len(v) > 2 else None)
                for sid, v in obj["s"].items()}
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        log.warning("ignoring commit metadata that is not ours: %.80r", metadata)
        return {}


@dataclass
class _Stream:
    """What the loop knows of one stream: its state as of its last result back."""

    handle: int
    checkpoint: Checkpoint | None
    needed: int | None = None  # the oldest offset its transcriber still needs
    in_utterance: bool = False
    in_flight: int = 0  # records handed to decoding, not back yet
    flushing: bool = False  # an idle flush not back yet
    flush_at: int | None = None  # event time of that flush, committed before it is asked
    position_ns: int | None = None  # event time just after its last sample decoded
    last_audio: float = 0.0  # wall clock (monotonic) of its last record read


@dataclass
class _Partition:
    tp: TopicPartition
    resume: dict[str, Checkpoint]  # checkpoints read back for streams not seen yet
    streams: dict[str, _Stream] = field(default_factory=dict)
    position: int | None = None  # the offset after the last record read
    committed: tuple[int, str] | None = None
    # offsets handed to decoding in order, and those of them back (in any order)
    decoding: deque[int] = field(default_factory=deque)
    decoded: set[int] = field(default_factory=set)

    def oldest_decoding(self) -> int | None:
        while self.decoding and self.decoding[0] in self.decoded:
            self.decoded.discard(self.decoding.popleft())
        return self.decoding[0] if self.decoding else None


@dataclass
class AsrStats:
    records: int = 0
    audio_s: float = 0.0
    decode_s: float = 0.0  # CPU time in the transcribers (of every decoding process)
    partials: int = 0
    finals: int = 0
    idle_flushes: int = 0
    commits: int = 0
    bad: Counter = field(default_factory=Counter)  # skipped records by reason kind
    # (streams left out by asr_streams are not counted: they are not ours to transcribe)


class AsrWorker:
    """Reads ``PREFIX.audio`` in consumer group ``APPID-asr``, publishes to ``PREFIX.text``."""

    def __init__(self, settings: Settings, decoding: Decoding | None = None) -> None:
        self.settings = settings
        self.group = f"{settings.app_id}-asr"
        self.topic_in = settings.topic("audio")
        self.topic_out = settings.topic("text")
        self.cut = cut_config(settings)
        # decoding starts (and loads its models) before the worker joins its group
        self.decoding = decoding if decoding is not None else make_decoding(
            resolve_processes(settings.asr_processes), settings.asr_engine, self.cut,
            settings.asr_vad, settings.asr_vad_mode)
        self.stats = AsrStats()
        self.parts: dict[int, _Partition] = {}
        self._handles: dict[int, tuple[int, str]] = {}  # handle -> (partition, stream id)
        self._next_handle = 0
        self._sent: list[Any] = []  # producer futures since the last flush
        # held by the loop and by the pool's receiving thread (re-entered when decoding is
        # local: results then come back inside the loop's own call)
        self._lock = threading.RLock()
        self._failure: BaseException | None = None
        self._paused = False
        self._flush_after = 0.0  # no idle flush before this (monotonic): a commit failed
        self._consumer = kafka.group_consumer(settings, self.group, "asr")
        self._producer = kafka.producer(settings)
        self._bad_logged: Counter = Counter()
        self._only = {x.strip() for x in settings.asr_streams.split(",") if x.strip()}
        # what the group coordinator changed during the last poll, in order
        self._changes: list[tuple[bool, list[TopicPartition]]] = []

    # --- lifecycle -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        # a group joined before the client has the topic's metadata (a topic created a
        # moment ago) assigns this worker nothing, and kafka-python does not always rejoin
        # once the metadata comes: have it first
        deadline = time.monotonic() + 30
        while (not self._consumer.partitions_for_topic(self.topic_in)
               and time.monotonic() < deadline and not stop.is_set()):
            time.sleep(0.2)
        self._consumer.subscribe([self.topic_in], listener=_Listener(self))
        log.info("asr worker: group %s, %s -> %s, engine %s, %s", self.group, self.topic_in,
                 self.topic_out, self.settings.asr_engine,
                 f"{self.decoding.processes} decoding processes" if self.decoding.processes
                 else "decoding in this process")
        self.decoding.start(self._on_results, self._on_failure)
        last_commit = last_status = time.monotonic()
        try:
            while not stop.is_set():
                self._throttle()
                # a plain poll with a timeout: kafka-python's group membership needs it
                # (polls of 0 ms never finish a rejoin); segments go out meanwhile from
                # the pool's receiving thread
                batch = self._consumer.poll(timeout_ms=100, max_records=200)
                self._check()
                with self._lock:
                    fresh = self._rebalanced()
                    now = time.monotonic()
                    for tp, records in batch.items():
                        part = self.parts.get(tp.partition)
                        if part is None or tp.partition in fresh:
                            continue  # a partition just (re)assigned is read from its commit
                        for rec in records:
                            self._handle(part, rec, now)
                    idle = self._idle(now)
                if idle:
                    self._flush(idle, now)
                    last_commit = now
                if now - last_commit >= COMMIT_INTERVAL_S:
                    self.commit()
                    last_commit = now
                if now - last_status >= STATUS_INTERVAL_S:
                    self._log_status()
                    last_status = now
            # what was handed to decoding is published before the last commit
            deadline = time.monotonic() + DRAIN_S
            while self.decoding.in_flight and time.monotonic() < deadline:
                self._check()
                time.sleep(0.05)
            self.commit()
            self._log_status()
        finally:
            self.close()

    def _on_failure(self, e: BaseException) -> None:
        self._failure = e

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _throttle(self) -> None:
        """Pause reading while decoding is far behind; the group membership goes on."""
        over = self.decoding.in_flight >= MAX_IN_FLIGHT
        if over == self._paused:
            return
        self._paused = over
        if over:
            log.warning("decoding is %d records behind: reading paused", MAX_IN_FLIGHT)
            self._consumer.pause(*self._consumer.assignment())
        else:
            self._consumer.resume(*self._consumer.paused())

    def close(self) -> None:
        self.decoding.shutdown()
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
            self._skip(rec.topic, rec.partition, rec.offset, e.kind.value, e.reason)
            return
        assert isinstance(chunk, wire.AudioChunk)
        sid = chunk.stream_id
        if self._only and sid not in self._only:
            return
        st = part.streams.get(sid)
        if st is None:
            resume = part.resume.pop(sid, None)
            st = _Stream(self._next_handle, resume)
            self._next_handle += 1
            part.streams[sid] = st
            self._handles[st.handle] = (part.tp.partition, sid)
            self.decoding.open(st.handle, sid, resume)
        st.last_audio = now
        st.in_flight += 1
        part.decoding.append(msg.offset)
        self.stats.audio_s += chunk.n_samples / chunk.sample_rate
        self.decoding.add(st.handle, msg.offset, chunk.ts_ns, pcm_bytes(to_16k_mono(chunk)))

    def _on_results(self, results: list[Result]) -> None:
        with self._lock:
            for r in results:
                self._apply(r)

    def _apply(self, r: Result) -> None:
        self.stats.decode_s += r.cpu_s
        where = self._handles.get(r.handle)
        if where is None:
            return  # a stream of a revoked partition: its next owner replays it
        part = self.parts[where[0]]
        st = part.streams[where[1]]
        if r.token == FLUSHED:
            st.flushing, st.flush_at = False, None
        else:
            st.in_flight -= 1
            part.decoded.add(r.token)
        if r.error is not None:
            log.error("asr failed on %s offset %d of stream %r: %s", self.topic_in, r.token,
                      where[1], r.error)
            self._skip(self.topic_in, part.tp.partition, r.token,
                       wire.DeadLetterKind.INTERNAL.value, r.error.splitlines()[0])
        self._publish(where[1], r.segments)
        st.checkpoint, st.needed, st.in_utterance = r.checkpoint, r.needed, r.in_utterance
        st.position_ns = r.position_ns

    def _skip(self, topic: str, partition: int, offset: int, kind: str, reason: str) -> None:
        self.stats.bad[kind] += 1
        self._bad_logged[reason] += 1
        seen = self._bad_logged[reason]
        if seen <= 3 or seen % 100 == 0:
            log.warning("skipped %s offset %d partition %d (%s, %d so far): %s", topic,
                        offset, partition, kind, seen, reason)

    def _publish(self, sid: str, segments: tuple[Encoded, ...]) -> None:
        for seg in segments:
            self._sent.append(self._producer.send(self.topic_out, value=seg.value,
                                                  key=seg.key, headers=seg.headers,
                                                  timestamp_ms=seg.timestamp_ms))
            if seg.final:
                self.stats.finals += 1
                log.debug("final %s seq %d: %s", sid, seg.seq, seg.text)
            else:
                self.stats.partials += 1

    def _idle(self, now: float) -> dict[int, list[str]]:
        """Streams whose audio stopped mid-utterance, once nothing is left to read, by
        partition; each is marked to be flushed where its audio stopped."""
        idle_s = self.settings.asr_gap_ms / 1000
        out: dict[int, list[str]] = {}
        if now < self._flush_after:
            return out
        for p, part in self.parts.items():
            high = self._consumer.highwater(part.tp)
            if high is not None and part.position is not None and part.position < high:
                continue  # records of this partition are still to be read: not idle
            for sid, st in part.streams.items():
                # in_utterance is as of the stream's last result: wait for those on the way
                if (st.in_utterance and not st.in_flight and not st.flushing
                        and st.flush_at is None and st.position_ns is not None
                        and now - st.last_audio >= idle_s):
                    st.flush_at = st.position_ns
                    out.setdefault(p, []).append(sid)
        return out

    def _flush(self, idle: dict[int, list[str]], now: float) -> None:
        """Commit where the idle streams will be flushed, then flush them: a worker that
        replays them flushes them at the same event time, so their finals are copies.
        Every partition is committed (the periodic commit this stands in for)."""
        done = self.commit()
        with self._lock:
            for p, sids in idle.items():
                part = self.parts.get(p)
                for sid in sids:
                    st = part.streams.get(sid) if part is not None else None
                    if st is None or st.flush_at is None:
                        continue  # revoked meanwhile: its next owner has the commit
                    if p not in done:
                        # not committed (a rebalance, most likely): try again a commit
                        # interval later, not on every poll
                        st.flush_at = None
                        self._flush_after = now + COMMIT_INTERVAL_S
                        continue
                    self.stats.idle_flushes += 1
                    st.flushing = True
                    self.decoding.flush(st.handle)

    # --- commits ---------------------------------------------------------------------

    def commit(self, partitions: list[int] | None = None) -> set[int]:
        """Commit each partition's offset and checkpoints once the segments they need are
        acknowledged; the partitions whose commit holds their current state.

        The state is taken first, with the segments sent for it; the flush after it waits
        for those (and for any sent since, which the next commit covers)."""
        offsets = {}
        current = set()
        with self._lock:
            sent, self._sent = self._sent, []
            for p in (partitions if partitions is not None else list(self.parts)):
                part = self.parts.get(p)
                if part is None or part.position is None:
                    continue
                offset, meta = self._commit_point(part)
                if part.committed == (offset, meta):
                    current.add(p)
                else:
                    offsets[part.tp] = OffsetAndMetadata(offset, meta, -1)
                    part.committed = (offset, meta)
                    log.debug("commit partition %d offset %d (read to %d): %s", p, offset,
                              part.position, meta)
        self._producer.flush(timeout=60)
        failed = [f.exception for f in sent if f.failed()]
        if failed:
            raise AsrError(f"{len(failed)} transcript segment(s) not published to "
                           f"{self.topic_out}: {failed[0]}")
        if offsets:
            try:
                self._consumer.commit(offsets)
            except KafkaError as e:
                # a rebalance took a partition: its new owner resumes from the last commit
                # (older, and as consistent), so nothing is lost, only replayed
                log.warning("commit failed (%s); the partitions' next owner replays from "
                            "the previous commit", e)
                with self._lock:
                    for tp in offsets:
                        if (part := self.parts.get(tp.partition)) is not None:
                            part.committed = None
                return current
            self.stats.commits += 1
        return current | {tp.partition for tp in offsets}

    def _commit_point(self, part: _Partition) -> tuple[int, str]:
        assert part.position is not None
        # each stream's state is as of its last result: its records after that are still
        # being decoded, and the oldest of those is needed again too
        needed = [t for st in part.streams.values() if (t := st.needed) is not None]
        if (t := part.oldest_decoding()) is not None:
            needed.append(t)
        offset = min([part.position, *needed])
        checkpoints = dict(part.resume)
        for sid, st in part.streams.items():
            if (c := st.checkpoint) is not None:
                if st.flush_at is not None:
                    c = replace(c, flush_at_ns=st.flush_at)
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
            st = part.streams.get(sid)
            if st is not None and (st.in_utterance or st.needed is not None or st.in_flight
                                   or st.flushing):
                continue
            del checkpoints[sid]
            part.resume.pop(sid, None)
            if st is not None:
                del part.streams[sid]
                self._drop(st)

    # --- rebalances ------------------------------------------------------------------
    # The coordinator calls the listener on the client's IO thread, where kafka-python 3
    # allows no blocking call (commit, committed): it only notes the change, and the
    # loop applies it after poll() returns, before the records poll() fetched.

    def _rebalanced(self) -> set[int]:
        """Apply what the coordinator changed; the partitions (re)assigned."""
        fresh: set[int] = set()
        while self._changes:
            added, tps = self._changes.pop(0)
            if added:
                fresh |= self.assigned(tps)
            else:
                self.revoked(tps)
                fresh -= {tp.partition for tp in tps}
        return fresh

    def assigned(self, tps: list[TopicPartition]) -> set[int]:
        """Take partitions on at their last commit; the ones taken."""
        owned = self._consumer.assignment()
        taken = set()
        for tp in tps:
            if tp.topic != self.topic_in or tp.partition in self.parts or tp not in owned:
                continue
            committed = self._consumer.committed(tp, metadata=True)
            resume = decode_checkpoints(committed.metadata if committed else None)
            # kafka-python keeps the read position of a partition that stays assigned
            # across a rebalance; its streams restart at their checkpoints, whose audio
            # is at the committed offset, so reading must go back there
            if committed is not None:
                self._consumer.seek(tp, committed.offset)
            else:
                self._consumer.seek_to_beginning(tp)
            log.debug("partition %d resumes at %s", tp.partition, committed)
            self.parts[tp.partition] = _Partition(tp, resume)
            taken.add(tp.partition)
        log.info("assigned partitions %s", sorted(self.parts))
        return taken

    def revoked(self, tps: list[TopicPartition]) -> None:
        """Drop the partitions' state: their next owner replays from the last commit."""
        gone = [tp.partition for tp in tps if tp.partition in self.parts]
        for p in gone:
            for st in self.parts.pop(p).streams.values():
                self._drop(st)  # results on their way for it are dropped when they come
        if gone:
            log.info("revoked partitions %s", gone)

    def _drop(self, st: _Stream) -> None:
        self._handles.pop(st.handle, None)
        self.decoding.close(st.handle)

    def _log_status(self) -> None:
        s = self.stats
        with self._lock:
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
    worker = AsrWorker(settings)
    worker.run(stop)
    log.info("asr worker stopped")
    return 0
