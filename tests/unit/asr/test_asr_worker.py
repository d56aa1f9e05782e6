"""The ASR worker's pure parts: settings to cut config, checkpoints in commit metadata."""

from __future__ import annotations

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
