"""Real synthesized speech for the ASR tests: sentences spoken by flite or espeak-ng (the
AV-Digits synthesizer and its cache) with pauses between them, cut into audio chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from worker_helpers import WorkerProc

from streamproc import kafka
from streamproc.asr.engine import Engine, Hypothesis, WordTiming
from streamproc.config import Settings
from streamproc.ml.avdigits import Voice, synthesize
from streamproc.wire import codec as wire

RATE = 16_000
NS = 1_000_000_000
SENTENCES = ("please open the door", "seven three one five", "the weather is nice today",
             "turn left at the next light")
# pocketsphinx understands flite voices well and espeak-ng voices poorly (docs/benchmarks.md)
VOICES = (Voice("flite", "slt", True), Voice("flite", "kal16"))


@dataclass(frozen=True)
class Spoken:
    text: str
    start_ns: int  # from the track's first sample
    end_ns: int


def speech_track(sentences: tuple[str, ...], voice: Voice, cache: Path | None,
                 pauses_s: tuple[float, ...] = (3.0, 4.0, 5.0), lead_s: float = 0.5,
                 tail_s: float = 2.0, level: float = 0.5) -> tuple[np.ndarray, list[Spoken]]:
    """Mono float samples at RATE: silence, then each sentence followed by a pause."""
    parts, spoken, n = [np.zeros(int(lead_s * RATE), np.float32)], [], int(lead_s * RATE)
    for i, text in enumerate(sentences):
        x = level * synthesize(voice, text, 1.0, 0, RATE, cache)
        spoken.append(Spoken(text, n * NS // RATE, (n + len(x)) * NS // RATE))
        pause = pauses_s[i % len(pauses_s)] if i < len(sentences) - 1 else tail_s
        parts += [x, np.zeros(int(pause * RATE), np.float32)]
        n += len(x) + int(pause * RATE)
    return np.concatenate(parts), spoken


def chunks(sid: str, t0_ns: int, x: np.ndarray, chunk_s: float = 0.1, seq0: int = 0,
           rate: int = RATE) -> list[wire.AudioChunk]:
    step = int(chunk_s * rate)
    return [wire.AudioChunk.from_samples(sid, t0_ns + i * NS // rate, seq0 + k,
                                         x[i:i + step], rate)
            for k, i in enumerate(range(0, len(x), step))]


class CountingEngine:
    """A stand-in recogniser: the text says how many samples the utterance got, one word
    per 0.5 s; deterministic, like the protocol asks."""

    name = "counting"

    def __init__(self) -> None:
        self.open = 0

    def start(self) -> _CountingUtterance:
        self.open += 1
        return _CountingUtterance(self)


class _CountingUtterance:
    def __init__(self, engine: CountingEngine) -> None:
        self.engine = engine
        self.n = 0

    def feed(self, pcm: bytes) -> None:
        self.n += len(pcm) // 2

    def partial(self) -> str:
        return f"n{self.n}"

    def finish(self) -> Hypothesis:
        self.engine.open -= 1
        half = RATE // 2
        words = tuple(WordTiming(f"w{i}", i * half, min(self.n, (i + 1) * half))
                      for i in range(max(1, self.n // half)))
        return Hypothesis(f"n{self.n}", words)

    def abort(self) -> None:
        self.engine.open -= 1


def counting_engine() -> Engine:
    return CountingEngine()


class AsrProc(WorkerProc):
    """One ``streamproc asr`` subprocess; its restarts add to the same log."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        super().__init__(settings, log_path, command="asr", append=True)


def asr_settings(bootstrap: str) -> Settings:
    prefix = f"a{uuid.uuid4().hex[:10]}"
    return Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, app_id=prefix,
                    partitions=2, session_timeout_ms=6000)


def publish(settings: Settings, records: list[wire.AudioChunk]) -> None:
    producer = kafka.producer(settings)
    try:
        for r in records:
            key, value, headers, ts_ms = wire.encode_parts(r)
            producer.send(settings.topic("audio"), value=value, key=key, headers=headers,
                          timestamp_ms=ts_ms)
        producer.flush(30)
    finally:
        producer.close()


@dataclass(frozen=True)
class Published:
    segment: wire.TranscriptSegment
    partition: int
    headers: tuple[tuple[str, bytes], ...]


def read_segments(settings: Settings, done: Callable[[list[Published]], bool],
                  timeout: float = 90) -> list[Published]:
    """Every transcript segment on PREFIX.text once ``done(them)`` or at timeout."""
    topic = settings.topic("text")
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             isolation_level="read_committed", enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[Published] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(out):
            for msgs in consumer.poll(timeout_ms=300).values():
                for m in msgs:
                    rec = wire.KafkaRecord.from_client(m)
                    seg = wire.decode(rec, expect_modality="text")
                    assert isinstance(seg, wire.TranscriptSegment)
                    out.append(Published(seg, m.partition, rec.headers))
        return out
    finally:
        consumer.close()


def finals_of(pubs: list[Published], sid: str | None = None) -> list[wire.TranscriptSegment]:
    return [p.segment for p in pubs if p.segment.final
            and (sid is None or p.segment.stream_id == sid)]
