"""Decoding in a pool of processes gives what decoding in the worker's own process gives."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from asr_helpers import NS, RATE, CountingEngine

from streamproc.asr.pool import (
    FLUSHED,
    DecodingError,
    LocalDecoding,
    ProcessPool,
    Result,
    pcm_bytes,
)
from streamproc.asr.stream import Checkpoint, CutConfig, to_16k_mono
from streamproc.errors import UserError
from streamproc.wire import codec as wire

ENGINE = "asr_helpers:counting_engine"
T0 = 1_700_000_000 * NS


def _speech(seconds: float, level: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (level * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _audio(k: int) -> list[wire.AudioChunk]:
    """Silence, a tone (voice to the energy gate) of a length of its own, silence."""
    x = np.concatenate([np.zeros(RATE, np.float32), _speech(1.5 + 0.5 * k, 0.3),
                        np.zeros(2 * RATE, np.float32)])
    step = RATE // 10
    return [wire.AudioChunk.from_samples(f"s{k}", T0 + i * NS // RATE, j, x[i:i + step], RATE)
            for j, i in enumerate(range(0, len(x), step))]


class _Collect:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def on_results(self, rs: list[Result]) -> None:
        with self.lock:
            self.results += rs

    def on_error(self, e: BaseException) -> None:
        self.errors.append(e)


def _drive(dec, streams: dict[int, list[wire.AudioChunk]], resume: Checkpoint | None) -> None:
    for h, chunks in streams.items():
        dec.open(h, chunks[0].stream_id, resume)
    # interleaved in time, as a partition delivers them
    for c in sorted((c for cs in streams.values() for c in cs), key=lambda c: c.ts_ns):
        h = int(c.stream_id[1:])
        dec.add(h, c.seq, c.ts_ns, pcm_bytes(to_16k_mono(c)))
    for h in streams:
        dec.flush(h)


def _sans_cpu(r: Result) -> Result:
    return dataclasses.replace(r, cpu_s=0.0)


def _wait_idle(dec, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while dec.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dec.in_flight == 0


def test_a_pool_gives_what_local_decoding_gives_in_each_streams_order() -> None:
    streams = {k: _audio(k) for k in range(3)}
    local, pooled = _Collect(), _Collect()
    ld = LocalDecoding(CountingEngine(), CutConfig(), "energy", 2)
    ld.start(local.on_results, local.on_error)
    _drive(ld, streams, None)
    pool = ProcessPool(2, ENGINE, CutConfig(), "energy", 2)
    try:
        pool.start(pooled.on_results, pooled.on_error)
        _drive(pool, streams, None)
        _wait_idle(pool)
        # three streams on two processes: the fewest-streams rule spreads them
        assert sorted(c.handles for c in pool._children) == [1, 2]
        for h in streams:
            pool.close(h)
    finally:
        pool.shutdown()
    assert not pooled.errors and not local.errors
    for h, chunks in streams.items():
        mine = [r for r in pooled.results if r.handle == h]
        # one result per add, then the flush's, in the order they were asked for
        assert [r.token for r in mine] == [c.seq for c in chunks] + [FLUSHED]
        assert [_sans_cpu(r) for r in mine] == [_sans_cpu(r) for r in local.results
                                                if r.handle == h]
        finals = [s for r in mine for s in r.segments if s.final]
        assert len(finals) == 1 and not mine[-1].in_utterance
        seg = wire.decode(wire.KafkaRecord(finals[0].key, finals[0].value,
                                           tuple(finals[0].headers), finals[0].timestamp_ms))
        assert isinstance(seg, wire.TranscriptSegment) and seg.stream_id == f"s{h}"
        assert all(r.cpu_s >= 0 for r in mine)


def test_a_resumed_stream_keeps_its_seq_in_the_pool() -> None:
    got = _Collect()
    pool = ProcessPool(1, ENGINE, CutConfig(), "energy", 2)
    try:
        pool.start(got.on_results, got.on_error)
        _drive(pool, {0: _audio(0)}, Checkpoint(7, T0))
        _wait_idle(pool)
    finally:
        pool.shutdown()
    seqs = [s.seq for r in got.results for s in r.segments]
    assert seqs and seqs[0] == 7 and seqs == list(range(7, 7 + len(seqs)))


def test_an_engine_that_cannot_load_stops_the_pool_at_start() -> None:
    with pytest.raises(UserError, match="cannot load"):
        ProcessPool(1, "no_such_module:engine", CutConfig(), "energy", 2)


def test_a_decoding_process_that_dies_is_reported() -> None:
    got = _Collect()
    pool = ProcessPool(1, ENGINE, CutConfig(), "energy", 2)
    try:
        pool.start(got.on_results, got.on_error)
        pool._children[0].proc.kill()
        deadline = time.monotonic() + 10
        while not got.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got.errors and isinstance(got.errors[0], DecodingError)
    finally:
        pool.shutdown()
