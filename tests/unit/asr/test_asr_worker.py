"""The ASR worker's pure parts: settings to cut config, checkpoints in commit metadata."""

from __future__ import annotations

import json

from streamproc.asr.stream import Checkpoint
from streamproc.asr.worker import cut_config, decode_checkpoints, encode_checkpoints
from streamproc.config import Settings


def test_checkpoints_round_trip_through_commit_metadata() -> None:
    cps = {"door": Checkpoint(12, 1_700_000_000_123_456_789), "cäm 2": Checkpoint(0, 5),
           "flushed": Checkpoint(3, 1_700_000_000_000_000_000, 1_700_000_002_250_000_000)}
    meta = encode_checkpoints(cps)
    assert decode_checkpoints(meta) == cps
    assert len(meta.encode()) < 160
    # metadata another application wrote, or none, resumes nothing
    for other in (None, "", "hello", '{"v": 9, "s": {}}', '{"v": 1, "s": {"a": [1]}}', "[]"):
        assert decode_checkpoints(other) == {}


def test_settings_become_the_cut_config() -> None:
    s = Settings(asr_end_silence_ms=700, asr_partial_interval_ms=0, asr_max_utterance_ms=9000,
                 asr_gap_ms=2000, asr_lang="")
    c = cut_config(s)
    assert (c.end_silence_ms, c.partial_interval_ms, c.max_utterance_ms, c.gap_ms, c.lang) == (
        700, 0, 9000, 2000, None)


def test_asr_processes_is_auto_or_a_count() -> None:
    import os

    import pytest

    from streamproc.asr.pool import resolve_processes
    from streamproc.config import ConfigError

    assert resolve_processes(Settings().asr_processes) == len(os.sched_getaffinity(0))
    assert [resolve_processes(Settings(asr_processes=v).asr_processes)
            for v in ("0", "1", "4")] == [0, 1, 4]
    for bad in ("", "-1", "two", "1.5", "257"):
        with pytest.raises(ConfigError, match="asr_processes"):
            Settings(asr_processes=bad)


class _Future:
    exception = None

    def failed(self) -> bool:
        return False


class _Producer:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, topic: str, **kw: object) -> _Future:
        self.sent.append(kw)
        return _Future()

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


class _Consumer:
    """What the worker asks of kafka-python's consumer, with its commits kept."""

    def __init__(self) -> None:
        self.owned: set = set()
        self.high: dict = {}
        self.commits: list[dict[int, tuple[int, str]]] = []
        self.refuse = False

    def assignment(self) -> set:
        return self.owned

    def committed(self, tp: object, metadata: bool = False) -> None:
        return None

    def seek_to_beginning(self, tp: object) -> None:
        pass

    def highwater(self, tp: object) -> int | None:
        return self.high.get(tp)

    def commit(self, offsets: dict) -> None:
        from kafka.errors import CommitFailedError

        if self.refuse:
            raise CommitFailedError("rebalancing")
        self.commits.append({tp.partition: (o.offset, o.metadata) for tp, o in offsets.items()})

    def close(self, autocommit: bool = False) -> None:
        pass


def test_an_idle_flush_is_committed_with_its_mark_before_it_is_made(monkeypatch) -> None:
    """The commit naming where a stream is flushed comes before the flush; the mark goes
    once the flush is back; a commit that fails leaves the stream unflushed and unmarked
    for a commit interval."""
    from types import SimpleNamespace

    import numpy as np
    from asr_helpers import NS, CountingEngine, chunks
    from kafka import TopicPartition

    from streamproc import kafka as kafka_mod
    from streamproc.asr import worker as asr_worker
    from streamproc.asr.pool import LocalDecoding
    from streamproc.wire import codec as wire

    consumer, producer = _Consumer(), _Producer()
    monkeypatch.setattr(kafka_mod, "group_consumer", lambda *a, **k: consumer)
    monkeypatch.setattr(kafka_mod, "producer", lambda *a, **k: producer)
    settings = Settings(partitions=1)
    cut = cut_config(settings)
    w = asr_worker.AsrWorker(settings, LocalDecoding(CountingEngine(), cut, "energy", 0))
    w.decoding.start(w._on_results, w._on_failure)
    tp = TopicPartition(w.topic_in, 0)
    consumer.owned = {tp}
    w.assigned([tp])
    t0 = 1_700_000_000 * NS
    tone = 0.3 * np.sin(np.arange(24_000) * 2 * np.pi * 220 / 16_000)
    x = np.concatenate([np.zeros(16_000), tone]).astype(np.float32)  # stops mid-tone
    for k, c in enumerate(chunks("mic", t0, x)):
        key, value, headers, ts_ms = wire.encode_parts(c)
        w._handle(w.parts[0], SimpleNamespace(key=key, value=value, headers=headers,
                                              timestamp=ts_ms, topic=w.topic_in,
                                              partition=0, offset=k), now=0.0)
    consumer.high[tp] = k + 1
    st = w.parts[0].streams["mic"]
    assert st.in_utterance and st.position_ns == t0 + int(2.5 * NS)
    before = decode_checkpoints(w._commit_point(w.parts[0])[1])["mic"]
    assert before.flush_at_ns is None
    needed = st.needed
    assert needed is not None and needed < k
    assert w._idle(now=0.5) == {}  # quiet for less than asr_gap_ms

    # a commit refused: no flush, no mark, and no new try for a commit interval
    consumer.refuse = True
    w._flush(w._idle(now=2.0), now=2.0)
    assert st.in_utterance and st.flush_at is None and not consumer.commits
    assert w._idle(now=2.5) == {}
    consumer.refuse = False

    flushed_after: list[int] = []
    ask = w.decoding.flush
    monkeypatch.setattr(w.decoding, "flush",
                        lambda h: (flushed_after.append(len(consumer.commits)), ask(h)))
    idle = w._idle(now=2.0 + asr_worker.COMMIT_INTERVAL_S)
    assert idle == {0: ["mic"]}
    w._flush(idle, now=2.0 + asr_worker.COMMIT_INTERVAL_S)
    assert flushed_after == [1]  # one commit, made before the flush was asked for
    offset, meta = consumer.commits[0][0]
    assert decode_checkpoints(meta)["mic"] == Checkpoint(before.next_seq, before.epoch_ns,
                                                         t0 + int(2.5 * NS))
    assert offset == needed  # and the commit still covers the utterance's audio
    # the flush is back (decoding here is done when asked): its final went out, the mark
    # is spent, and the next commit holds the checkpoint after the flush
    assert not st.in_utterance and st.flush_at is None and not st.flushing
    assert json.loads(producer.sent[-1]["value"])["final"] is True
    w.commit()
    after = decode_checkpoints(consumer.commits[-1][0][1])["mic"]
    assert after == Checkpoint(after.next_seq, t0 + int(2.5 * NS))
    assert after.next_seq > before.next_seq
