"""Real ``streamproc worker`` subprocesses, what they are sent and what they publish, for
the broker and end-to-end tests: the workers' settings, a paced workload of real media,
senders (kafka-python, librdkafka), start/stop/kill a worker, read a topic read_committed,
and compare published windows with an oracle.

The oracle is the pure Aligner fed the records that were sent (with the offsets the broker
gave them), sorted by event time and flushed: independent of arrival order and timing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cv2
import numpy as np
import pytest
from confluent_kafka import Producer as ConfluentProducer
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from streamproc.align.aligner import AlignConfig, Aligner, Window
from streamproc.config import Settings, env_name
from streamproc.dev.localkafka import free_port
from streamproc.inference.predictions import window_summary
from streamproc.testing import MS, SAMPLE_RATE, S, segment
from streamproc.wire import codec as wire

REPO = Path(__file__).resolve().parents[1]


class WorkerProc:
    """One ``streamproc worker`` (or another ``command``) subprocess with its log in a file;
    ``append``: a restart adds to the same log."""

    def __init__(self, settings: Settings, log_path: Path, command: str = "worker",
                 append: bool = False) -> None:
        env = dict(os.environ)
        for f in dataclasses.fields(Settings):
            env[env_name(f)] = str(getattr(settings, f.name))
        self.log_path = log_path
        self.command = command
        with open(log_path, "ab" if append else "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "streamproc.cli", command],
                                         env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60, count: int = 1) -> list[str]:
        """Wait until the log matches ``pattern`` ``count`` times; return the matches."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"{self.command} exited with {self.proc.returncode} while waiting for "
                            f"{pattern!r}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timeout waiting for {pattern!r}:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def abandon(self) -> None:
        """End a worker a failed test leaves behind, its task stacks logged first."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # mode's Worker logs every thread's stack
            time.sleep(0.5)
            self.kill()


def oracle_windows(settings: Settings,
                   records: Iterable[wire.MediaRecord]) -> dict[tuple[str, int], Window]:
    """The windows of ``records`` (each with its Kafka source), sorted by event time, then
    flushed: what a worker must publish when nothing is late."""
    recs = sorted(records, key=lambda r: (r.ts_ns, r.modality, r.seq))
    aligner = Aligner(AlignConfig.from_settings(settings))
    for r in recs:
        assert aligner.add(r, time.time_ns()).status == "accepted"
    return {w.key: w for w in aligner.flush()}


@dataclass
class Pred:
    body: dict
    worker: str
    partition: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.body["stream_id"], self.body["window_start_ns"])

    @property
    def final(self) -> bool:
        return bool(self.body.get("final", True))

    @property
    def revision_key(self) -> tuple[str, int, int]:
        return (*self.key, int(self.body.get("rev", 0)))

    def content(self) -> str:
        """What must be identical between copies of one window (not times, not quality)."""
        return json.dumps({k: self.body[k] for k in ("modalities", "provenance")},
                          sort_keys=True)


def expected_content(w: Window) -> str:
    s = window_summary(w)
    return json.dumps({k: s[k] for k in ("modalities", "provenance")}, sort_keys=True)


def read_all(settings: Settings, topic: str, done: Callable[[list], bool],
             timeout: float = 40) -> list:
    """Every record of ``topic`` (read_committed) once ``done(records)`` or at timeout."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             isolation_level="read_committed", enable_auto_commit=False,
                             max_partition_fetch_bytes=settings.max_message_bytes)
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(out):
            for msgs in consumer.poll(timeout_ms=300).values():
                out.extend(msgs)
        return out
    finally:
        consumer.close()


def read_to_end(settings: Settings, topic: str, timeout: float = 30) -> list:
    """Every record of ``topic`` (read_committed) up to its end as of this call; fails
    when the end is not reached in ``timeout`` (never a partial read taken for all)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             isolation_level="read_committed", enable_auto_commit=False,
                             max_partition_fetch_bytes=settings.max_message_bytes)
    try:
        parts = [TopicPartition(topic, p)
                 for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert parts, f"no topic {topic}"
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: list = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            assert time.monotonic() < deadline, (
                f"{topic}: read to {[consumer.position(tp) for tp in parts]} of "
                f"{[ends[tp] for tp in parts]} in {timeout} s")
            for msgs in consumer.poll(timeout_ms=300).values():
                out.extend(msgs)
        return out
    finally:
        consumer.close()


def committed_and_ends(settings: Settings, partitions: Iterable[int]
                       ) -> tuple[dict[TopicPartition, int | None], dict[TopicPartition, int]]:
    """The worker group's committed offsets of the input topics' ``partitions``, and
    their end offsets."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             group_id=settings.app_id, enable_auto_commit=False)
    try:
        tps = [TopicPartition(settings.topic(m), p) for m in ("video", "audio", "text")
               for p in partitions]
        ends = consumer.end_offsets(tps)
        return {tp: consumer.committed(tp) for tp in tps}, ends
    finally:
        consumer.close()


def read_predictions(settings: Settings, want: set[tuple[str, int]],
                     timeout: float = 40, finals_only: bool = True) -> list[Pred]:
    """Predictions until every window of ``want`` has its final; the finals (or every
    revision, provisional ones too)."""
    def done(msgs: list) -> bool:
        return want <= {p.key for p in map(pred_of, msgs) if p.final}

    preds = [pred_of(m) for m in read_all(settings, settings.topic("predictions"), done,
                                          timeout)]
    return [p for p in preds if p.final] if finals_only else preds


def pred_of(m) -> Pred:
    p = wire.decode_prediction(wire.KafkaRecord.from_client(m))
    headers = dict(m.headers or [])
    return Pred(p.to_json(), headers.get("sp-worker", b"").decode(), m.partition)


def assert_windows_equal(preds: list[Pred], expected: dict[tuple[str, int], Window],
                         streams: set[str]) -> dict[tuple[str, int], list[Pred]]:
    """Every expected window of ``streams`` has a final prediction, nothing else does, every
    copy of a final is identical to the oracle's window (frames counted, audio seconds,
    segments, presence, offsets); a provisional one (rev 0) is only for an expected window,
    and its final then says rev 1. Returns the finals by window."""
    by_key: dict[tuple[str, int], list[Pred]] = defaultdict(list)
    provisional: set[tuple[str, int]] = set()
    for p in preds:
        if p.key[0] in streams:
            if p.final:
                by_key[p.key].append(p)
            else:
                assert p.body["rev"] == 0, p.body
                provisional.add(p.key)
    want = {k for k in expected if k[0] in streams}
    assert provisional <= want, sorted(provisional - want)[:5]
    for key in provisional & set(by_key):
        assert {c.body["rev"] for c in by_key[key]} == {1}, key
    assert set(by_key) == want, (f"missing {sorted(want - set(by_key))[:5]}, "
                                 f"unexpected {sorted(set(by_key) - want)[:5]}")
    for key, copies in by_key.items():
        exp = expected_content(expected[key])
        for c in copies:
            assert c.content() == exp, (f"window {key} differs from the oracle's (published by "
                                        f"{c.worker}, {c.body['quality']})")
    return by_key


# ---------------------------------------------------------------------------------------
# settings: hopping windows short enough that a few seconds of streams make many
# ---------------------------------------------------------------------------------------

W_MS, H_MS = 500, 250  # hopping: every record belongs to two windows
LATENESS_MS = {"video": 150, "audio": 150, "text": 300}
IDLE_MS = 1000  # above any gap between two records of one modality (text: 500 ms + jitter)
# A worker's record limit below what the topics accept (8 MiB): a record between the two
# reaches the worker and is dead-lettered as oversized.
WORKER_MAX_BYTES = 256 * 1024
FPS, CHUNK_MS, SEG_MS = 10, 100, 500  # what stream_plan sends
# Send delay after a record's span ends. A record is never late when the watermark of its
# modality at its arrival stays below (start of its span + lateness): video frames 100 ms
# apart with up to 140 ms jitter arrive out of order yet in time; audio chunks (100 ms
# spans) may lag 50 ms; transcript segments, 500 ms apart, never overtake each other.
JITTER_MS = {"video": 140, "audio": 50, "text": 250}


def worker_settings(bootstrap: str, tmp: Path) -> Settings:
    """A worker of the settings above on topics (and a group) no other test uses."""
    prefix = f"w{uuid.uuid4().hex[:10]}"
    return Settings(
        bootstrap_servers=bootstrap, topic_prefix=prefix, app_id=prefix, partitions=4,
        window_ms=W_MS, hop_ms=H_MS, idle_deadline_video_ms=IDLE_MS,
        idle_deadline_audio_ms=IDLE_MS, idle_deadline_text_ms=IDLE_MS, frames_per_window=4,
        lateness_video_ms=LATENESS_MS["video"], lateness_audio_ms=LATENESS_MS["audio"],
        lateness_text_ms=LATENESS_MS["text"], metrics_port=0, web_port=free_port(),
        session_timeout_ms=6000,  # the broker's minimum: a killed worker's partitions move fast
        data_dir=str(tmp / f"data-{prefix}"))


def start_time() -> int:
    """Event time origin: a hop boundary shortly after now."""
    h = H_MS * MS
    return (time.time_ns() + 600 * MS) // h * h + h


def partition_of(key: str | bytes, n: int) -> int:
    """The partition every streamproc client picks for a key (murmur2, as Java's)."""
    raw = key.encode() if isinstance(key, str) else key
    return (murmur2(raw) & 0x7FFFFFFF) % n


def keys_on_partitions(prefix: str, n: int) -> list[str]:
    """One stream id per partition, in partition order."""
    out: dict[int, str] = {}
    i = 0
    while len(out) < n:
        sid = f"{prefix}{i}"
        out.setdefault(partition_of(sid, n), sid)
        i += 1
    return [out[p] for p in range(n)]


# ---------------------------------------------------------------------------------------
# workload: real media, paced on the wall clock with jitter
# ---------------------------------------------------------------------------------------


def camera_frame(sid: str, seq: int, ts: int, shade: int = 0,
                 size: tuple[int, int] = (48, 64)) -> wire.VideoFrame:
    """A real JPEG (height, width ``size``): a plain colour and a bar that moves with seq."""
    img = np.full((*size, 3), (shade % 200, 60 + seq % 100, 90), np.uint8)
    cv2.rectangle(img, (seq % (size[1] - 8), 4), (seq % (size[1] - 8) + 6, 20), (255, 255, 255), -1)
    return wire.VideoFrame.from_image(sid, ts, seq, img, quality=80)


def tone_chunk(sid: str, seq: int, ts: int, hz: float = 330.0) -> wire.AudioChunk:
    """CHUNK_MS of a sine tone, continuous from one seq to the next."""
    n = SAMPLE_RATE * CHUNK_MS // 1000
    t = (np.arange(n) + seq * n) / SAMPLE_RATE
    return wire.AudioChunk.from_samples(sid, ts, seq, 0.3 * np.sin(2 * np.pi * hz * t),
                                        SAMPLE_RATE)


@dataclass
class Planned:
    """One record to send at ``send_at_ns``; ``source`` is where the broker put it."""

    send_at_ns: int
    modality: str  # the topic it goes to
    rec: wire.KafkaRecord
    media: wire.MediaRecord | None  # None: corrupt on purpose
    role: str = "window"  # window | decode | late | duplicate, or what a test names
    source: wire.Source | None = None
    sent_wall_ns: int = 0


def stream_plan(sid: str, t0: int, dur_s: float, rng: np.random.Generator,
                audio_gap: tuple[int, int] | None = None,
                jitter_ms: dict[str, int] = JITTER_MS,
                frame_size: tuple[int, int] = (48, 64)) -> list[Planned]:
    """Video FPS, CHUNK_MS audio chunks, back-to-back SEG_MS transcript segments; each sent
    when its span ends plus a random jitter below ``jitter_ms`` (under the lateness).
    ``frame_size``: (height, width) of the frames."""
    out: list[Planned] = []
    end = t0 + int(dur_s * S)

    def plan(media: wire.MediaRecord, ready_ns: int) -> None:
        jitter = int(rng.uniform(0, jitter_ms[media.modality])) * MS
        out.append(Planned(ready_ns + jitter, media.modality, wire.encode(media), media))

    for i, ts in enumerate(range(t0, end, S // FPS)):
        plan(camera_frame(sid, i, ts, zlib.crc32(sid.encode()), frame_size), ts)
    seq = 0
    for ts in range(t0, end, CHUNK_MS * MS):
        if audio_gap and audio_gap[0] <= ts < audio_gap[1]:
            continue  # mic unplugged: nothing sent, the sequence goes on afterwards
        c = tone_chunk(sid, seq, ts)
        seq += 1
        plan(c, c.end_ns)
    for k, ts in enumerate(range(t0, end, SEG_MS * MS)):
        s = segment(sid, k, ts, ts + SEG_MS * MS, f"{sid} says segment {k}")
        plan(s, s.end_ns)
    return out


def oracle(settings: Settings, plan: list[Planned]) -> dict[tuple[str, int], Window]:
    """The windows of every record meant for a window (``role`` "window")."""
    return oracle_windows(settings, [dataclasses.replace(p.media, source=p.source)
                                     for p in plan if p.role == "window" and p.media is not None])


# ---------------------------------------------------------------------------------------
# sending: kafka-python (murmur2, as every streamproc client) or librdkafka
# ---------------------------------------------------------------------------------------


class Outgoing(Protocol):
    """A record to send at ``send_at_ns``; ``source`` is set once the broker has it."""

    send_at_ns: int
    modality: str
    rec: wire.KafkaRecord
    source: wire.Source | None


Item = TypeVar("Item", bound=Outgoing)


class RawName(str):
    """A header name sent as any bytes (kafka-python writes ``name.encode("utf-8")``): Kafka's
    own clients cannot write a name that is not UTF-8, but the protocol carries any bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        obj = super().__new__(cls, raw.decode("utf-8", "replace"))
        obj.raw = raw
        return obj

    def encode(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
        return self.raw


def paced(plan: Iterable[Item]) -> Iterator[Item]:
    """``plan`` in ``send_at_ns`` order, each as the wall clock reaches its time."""
    for p in sorted(plan, key=lambda p: p.send_at_ns):
        delay = (p.send_at_ns - time.time_ns()) / S
        if delay > 0:
            time.sleep(delay)
        yield p


class KafkaSender:
    """kafka-python onto the input topics; on a clean exit every record sent is delivered
    and has its ``source``."""

    def __init__(self, settings: Settings, max_request_size: int | None = None) -> None:
        self.settings = settings
        self.producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=2,
            max_request_size=max_request_size or settings.max_message_bytes)
        self._futures: list[tuple[Outgoing, Any]] = []

    def send(self, item: Outgoing) -> None:
        self._futures.append((item, self.producer.send(
            self.settings.topic(item.modality), key=item.rec.key, value=item.rec.value,
            headers=list(item.rec.headers), timestamp_ms=item.rec.timestamp_ms)))

    def __enter__(self) -> KafkaSender:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.producer.flush(60)
                for item, fut in self._futures:
                    md = fut.get(60)
                    item.source = wire.Source(md.topic, md.partition, md.offset)
        finally:
            self.producer.close()


def confluent_producer(settings: Settings, **conf: object) -> ConfluentProducer:
    """A librdkafka producer (its default partitioner unless ``conf`` names one)."""
    return ConfluentProducer({"bootstrap.servers": settings.bootstrap_servers, "acks": "all",
                              "message.max.bytes": settings.max_message_bytes, **conf})


def send_confluent(producer: ConfluentProducer, settings: Settings, item: Outgoing,
                   partition: int | None = None, wait: bool = True) -> None:
    """Send one record with librdkafka; its ``source`` is set on delivery, before this
    returns when ``wait`` (then a failed delivery fails the test)."""
    errors: list[object] = []

    def delivered(err: object, msg: Any) -> None:
        if err is None:
            item.source = wire.Source(msg.topic(), msg.partition(), msg.offset())
        else:
            errors.append(err)

    kw: dict[str, Any] = {} if partition is None else {"partition": partition}
    producer.produce(settings.topic(item.modality), key=item.rec.key, value=item.rec.value,
                     headers=list(item.rec.headers), timestamp=item.rec.timestamp_ms or 0,
                     on_delivery=delivered, **kw)
    if wait:
        producer.flush(30)
        assert not errors and item.source is not None, errors


def produce(settings: Settings, plan: list[Planned],
            at: Callable[[int], None] | None = None,
            confluent: ConfluentProducer | None = None,
            via_confluent: Collection[str] = ()) -> None:
    """Send ``plan`` on the wall clock with kafka-python, except records whose role is in
    ``via_confluent``: those go through ``confluent``. Every record's source is noted.

    ``at(send_at_ns)`` is called as the schedule passes each planned record (the tests
    kill or stop workers from it).
    """
    with KafkaSender(settings) as sender:
        for p in paced(plan):
            if at is not None:
                at(p.send_at_ns)
            p.sent_wall_ns = time.time_ns()
            if p.role in via_confluent:
                assert confluent is not None
                send_confluent(confluent, settings, p)
            else:
                sender.send(p)
