"""Real ``streamproc worker`` subprocesses and what they publish, for the broker tests
(test_worker, test_pipeline, test_metrics): start/stop/kill a worker, read a topic
read_committed, and compare published windows with an oracle.

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
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from streamproc.align.aligner import AlignConfig, Aligner, Window
from streamproc.config import Settings, env_name
from streamproc.inference.sink import window_summary
from streamproc.wire import codec as wire

REPO = Path(__file__).resolve().parents[1]


class WorkerProc:
    """One ``streamproc worker`` subprocess with its log in a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        env = dict(os.environ)
        for f in dataclasses.fields(Settings):
            env[env_name(f)] = str(getattr(settings, f.name))
        self.log_path = log_path
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "streamproc.cli", "worker"],
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
                pytest.fail(f"worker exited with {self.proc.returncode} while waiting for "
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


def read_predictions(settings: Settings, want: set[tuple[str, int]],
                     timeout: float = 40) -> list[Pred]:
    def done(msgs: list) -> bool:
        return want <= {pred_of(m).key for m in msgs}

    return [pred_of(m) for m in read_all(settings, settings.topic("predictions"), done, timeout)]


def pred_of(m) -> Pred:
    p = wire.decode_prediction(wire.KafkaRecord.from_client(m))
    headers = dict(m.headers or [])
    return Pred(p.to_json(), headers.get("sp-worker", b"").decode(), m.partition)


def assert_windows_equal(preds: list[Pred], expected: dict[tuple[str, int], Window],
                         streams: set[str]) -> dict[tuple[str, int], list[Pred]]:
    """Every expected window of ``streams`` published, nothing else, every copy identical
    to the oracle's window (frames counted, audio seconds, segments, presence, offsets)."""
    by_key: dict[tuple[str, int], list[Pred]] = defaultdict(list)
    for p in preds:
        if p.key[0] in streams:
            by_key[p.key].append(p)
    want = {k for k in expected if k[0] in streams}
    assert set(by_key) == want, (f"missing {sorted(want - set(by_key))[:5]}, "
                                 f"unexpected {sorted(set(by_key) - want)[:5]}")
    for key, copies in by_key.items():
        exp = expected_content(expected[key])
        for c in copies:
            assert c.content() == exp, (f"window {key} differs from the oracle's (published by "
                                        f"{c.worker}, {c.body['quality']})")
    return by_key
