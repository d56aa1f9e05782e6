"""The model in a process of its own: windows cross the pipe whole (no pickle), the child
scores exactly as the model thread does, loads what a hot reload swaps in, and is started
again when it dies."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from model_helpers import windows

from streamproc.align.aligner import AlignConfig, ClosedBy, Window
from streamproc.config import Settings
from streamproc.inference import process
from streamproc.inference.predictor import Predictor
from streamproc.inference.process import ModelDied, ProcessPredictor, decode_windows, encode_windows
from streamproc.models import create_model
from streamproc.models.checkpoint import save_checkpoint
from streamproc.models.preprocess import Preprocess
from streamproc.wire.codec import TranscriptSegment, Word


def _save(path: Path, version: str, labels=("a", "b")) -> Path:
    model = create_model("late", list(labels), Preprocess(frames_per_window=8),
                         name="tiny", version=version, dim=8)
    return save_checkpoint(model, path)


def _fields(w: Window) -> dict:
    d = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
    d["audio"], d["audio_mask"] = d["audio"].tolist(), d["audio_mask"].tolist()
    d["frames"] = [(f.stream_id, f.ts_ns, f.seq, f.data, f.fmt, f.width, f.height)
                   for f in w.frames]
    return d


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, ProcessPredictor]]:
    """A checkpoint (version 1) and a ProcessPredictor serving it, closed afterwards."""
    ck = _save(tmp_path / "model", "1")
    predictor = ProcessPredictor(str(ck), "cpu", 1)
    yield ck, predictor
    predictor.close()


def _signal_child(predictor: ProcessPredictor, sig: signal.Signals) -> int:
    """Send ``sig`` to the predictor's child (after SIGKILL, wait until it has exited);
    the child's pid."""
    pid = predictor.pid
    assert pid is not None
    os.kill(pid, sig)
    if sig == signal.SIGKILL:
        _wait_dead(pid)
    return pid


def _wait_dead(pid: int) -> None:
    """Until ``pid`` has exited (a zombie, not reaped: its parent does that)."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline, f"{pid} still running"
        time.sleep(0.01)


def _around_writes(monkeypatch: pytest.MonkeyPatch, predictor: ProcessPredictor,
                   before: Callable[[], object] = lambda: None,
                   after: Callable[[], object] = lambda: None) -> None:
    """Run ``before`` and ``after`` around each request the predictor writes to its child."""
    write = predictor._write

    def around(parts: Sequence[bytes], timeout: float) -> None:
        before()
        write(parts, timeout)
        after()

    monkeypatch.setattr(predictor, "_write", around)


def test_windows_cross_the_pipe_whole() -> None:
    base = windows(3)
    # as the aligner cuts a word-timed segment to a window: its span clipped, a word
    # reaching past it kept whole (the wire format would refuse that)
    words = (Word("uh", 50, 200), Word("two", 300, 1200))
    partial = TranscriptSegment("s", 7, "uh two", 100, 900, final=False, confidence=0.5,
                                lang="en", words=words)
    mask = np.ones(16000, bool)
    mask[4000:6000] = False
    odd = dataclasses.replace(
        base[1], segments=[partial, *base[1].segments], audio_mask=mask,
        present={"video": True, "audio": False, "text": True}, rev=2, final=False,
        unchanged=True,
        quality={"closed_by": ClosedBy.BOUND, "audio_missing_s": np.float64(0.125),
                 "frames_dropped": np.int64(3)})
    sent = [base[0], odd, dataclasses.replace(base[2], frames=[], frame_count=0)]
    got = decode_windows(encode_windows(sent))
    for a, b in zip(sent, got, strict=True):
        want = _fields(a)
        want["provenance"], want["ingest_ms"] = {}, {}  # not sent: no model reads them
        assert _fields(b) == want
    assert got[1].quality == {"closed_by": "bound", "audio_missing_s": 0.125,
                              "frames_dropped": 3}
    assert got[1].text == odd.text


def test_bytes_after_the_last_window_are_refused() -> None:
    with pytest.raises(ValueError, match="2 bytes after the last window"):
        decode_windows(encode_windows(windows(2)) + b"xx")


def test_the_child_scores_as_the_model_thread_does(served: tuple[Path, ProcessPredictor]
                                                   ) -> None:
    ck, there = served
    here = Predictor(str(ck), "cpu", 1)
    assert there.info == here.info
    assert there.warm_up(3, AlignConfig.from_settings(Settings())) > 0
    ws = [dataclasses.replace(w, final=False, stream_id=f"s{i}")
          for i, w in enumerate(windows(5))]
    a, b = here(ws), there(ws)
    assert [s.label for s in b] == [s.label for s in a]
    for x, y in zip(a, b, strict=True):
        assert y.scores == pytest.approx(x.scores, abs=1e-6)
        assert y.model == dict(here.info)
    # the finals of those windows, same inputs: every encoder output taken from the
    # provisional kept in the child
    finals = [dataclasses.replace(w, final=True) for w in ws]
    assert [s.reused for s in there(finals)] == [s.reused for s in here(finals)] == \
        [("video", "audio", "text")] * 5


def test_a_swapped_in_checkpoint_is_loaded_by_the_child(
        served: tuple[Path, ProcessPredictor]) -> None:
    ck, predictor = served
    predictor.warm_up(2, AlignConfig.from_settings(Settings()))
    _save(ck, "2", labels=("a", "b", "c"))
    new = predictor.load()
    predictor.warm_up(2, AlignConfig.from_settings(Settings()), new)
    predictor.swap(new)
    scored = predictor(windows(2))
    assert {s.model["version"] for s in scored} == {"2"} and len(scored[0].scores) == 3


def test_a_dead_child_is_started_again(served: tuple[Path, ProcessPredictor],
                                       caplog: pytest.LogCaptureFixture) -> None:
    _, predictor = served
    first = _signal_child(predictor, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, "streamproc.inference.process"):
        scored = predictor(windows(2))
    assert len(scored) == 2 and predictor.pid not in (None, first)
    assert "model process gone (exit code -9): starting it again" in caplog.text


def test_a_child_dying_during_a_request_fails_that_request_only(
        served: tuple[Path, ProcessPredictor], monkeypatch: pytest.MonkeyPatch) -> None:
    _, predictor = served
    cfg = AlignConfig.from_settings(Settings())
    written = threading.Event()
    _around_writes(monkeypatch, predictor, after=written.set)
    pid = _signal_child(predictor, signal.SIGSTOP)  # it gets the request, cannot answer it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        request = pool.submit(predictor.warm_up, 2, cfg)
        assert written.wait(30)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ModelDied, match=r"exited \(code -9\) during a request"):
            request.result(timeout=30)
    assert predictor.pid is None and len(predictor(windows(1))) == 1  # a new child


def test_a_batch_sent_to_a_child_gone_before_reading_it_is_computed_by_a_new_one(
        served: tuple[Path, ProcessPredictor], monkeypatch: pytest.MonkeyPatch) -> None:
    _, predictor = served
    killed: list[int] = []

    def kill_first() -> None:
        if not killed:  # it dies between the check that it runs and the write
            killed.append(_signal_child(predictor, signal.SIGKILL))

    _around_writes(monkeypatch, predictor, before=kill_first)
    assert len(predictor(windows(4))) == 4
    assert killed and predictor.pid not in (None, killed[0])


def test_a_child_that_stops_answering_is_killed_and_replaced(
        served: tuple[Path, ProcessPredictor], monkeypatch: pytest.MonkeyPatch) -> None:
    _, predictor = served
    # hung while the batch is written (it is bigger than the pipe holds)
    pid = _signal_child(predictor, signal.SIGSTOP)
    monkeypatch.setattr(process, "SCORE_TIMEOUT_S", 0.5)
    with pytest.raises(ModelDied, match=r"read nothing for 0.5 s \(killed\)"):
        predictor(windows(1))
    monkeypatch.setattr(process, "SCORE_TIMEOUT_S", 120.0)
    assert len(predictor(windows(2))) == 2 and predictor.pid not in (None, pid)
    # hung after reading a (small) request
    pid = _signal_child(predictor, signal.SIGSTOP)
    monkeypatch.setattr(process, "LOAD_TIMEOUT_S", 0.5)
    with pytest.raises(ModelDied, match=r"did not answer within 0.5 s \(killed\) during"):
        predictor.warm_up(1, AlignConfig.from_settings(Settings()))
    monkeypatch.setattr(process, "LOAD_TIMEOUT_S", 600.0)
    assert len(predictor(windows(2))) == 2 and predictor.pid not in (None, pid)


def test_a_new_child_serves_what_the_worker_serves_not_the_newest_checkpoint(
        served: tuple[Path, ProcessPredictor]) -> None:
    ck, predictor = served
    _save(ck, "2")  # written after the start, not (yet) reloaded
    _signal_child(predictor, signal.SIGKILL)
    assert {s.model["version"] for s in predictor(windows(2))} == {"1"}
    assert predictor.info["version"] == "1"
    predictor.close()
    assert predictor.pid is None
    with pytest.raises(RuntimeError, match="the model process was closed"):
        predictor(windows(1))
