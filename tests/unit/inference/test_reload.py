"""Hot reload of a checkpoint directory: a new checkpoint is loaded off the event loop and
swapped in; a bad one is refused with its reason and the served model goes on."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from model_helpers import windows

from streamproc.config import Settings
from streamproc.inference.predictor import Predictor, Served
from streamproc.inference.reload import ModelReloader, checkpoint_dir, signature
from streamproc.models import create_model
from streamproc.models.checkpoint import save_checkpoint
from streamproc.models.preprocess import Preprocess
from streamproc.worker.app import fits_worker, model_reloader
from streamproc.worker.metrics import Metrics


def _save(path: Path, version: str, frames: int = 8, labels=("a", "b")) -> Path:
    model = create_model("late", list(labels), Preprocess(frames_per_window=frames),
                         name="tiny", version=version, dim=8)
    return save_checkpoint(model, path)


def _reloader(predictor: Predictor, path: Path, results: list[str],
              check=lambda served: None) -> ModelReloader:
    return ModelReloader(predictor, path, poll_s=0.05, check=check,
                         on_result=lambda r, s: results.append(r),
                         loaded=signature(path), settle_s=0.05)


def test_a_new_checkpoint_is_swapped_in_and_predictions_name_it(tmp_path: Path) -> None:
    ck = _save(tmp_path / "model", "1")
    predictor = Predictor(str(ck), "cpu")
    assert predictor.info["version"] == "1" and predictor.info["checkpoint"].startswith("sha256:")
    results: list[str] = []
    reloader = _reloader(predictor, ck, results)
    assert reloader.poll() is None  # nothing changed
    _save(ck, "2", labels=("a", "b", "c"))  # a new class too: fine
    assert reloader.poll() == "ok"
    assert predictor.info["version"] == "2" and predictor.labels == ["a", "b", "c"]
    scored = predictor(windows(3))
    assert {s.model["version"] for s in scored} == {"2"} and len(scored[0].scores) == 3
    assert results == ["ok"]
    # the same files looked at again (SIGHUP): nothing to do
    assert reloader.poll(forced=True) == "unchanged"


def test_a_bad_checkpoint_is_refused_and_the_old_model_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = _save(tmp_path / "model", "1")
    predictor = Predictor(str(ck), "cpu")
    results: list[str] = []
    reloader = _reloader(predictor, ck, results)
    meta = json.loads((ck / "model.json").read_text())
    meta["config"]["version"] = "evil"  # edited after saving: the digest no longer fits
    (ck / "model.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.ERROR, "streamproc.worker"):
        assert reloader.poll() == "refused"
    assert "failed its integrity check" in caplog.text and "still serving tiny version 1" \
        in caplog.text
    assert predictor.info["version"] == "1"
    assert {s.model["version"] for s in predictor(windows(2))} == {"1"}
    assert reloader.poll() is None  # not tried again until the files change
    (ck / "model.safetensors").write_bytes(b"truncated")
    assert reloader.poll() == "refused"
    _save(ck, "3")  # a good one after the bad ones
    assert reloader.poll() == "ok" and predictor.info["version"] == "3"
    assert results == ["refused", "refused", "ok"]


class _RefusingSwap(Predictor):
    """A predictor that cannot swap a model in (a model process that fails to load it)."""

    def swap(self, served: Served) -> Served:
        raise RuntimeError("model process: could not load it")


def test_a_swap_that_fails_refuses_the_reload(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    ck = _save(tmp_path / "model", "1")
    predictor = _RefusingSwap(str(ck), "cpu")
    results: list[str] = []
    reloader = _reloader(predictor, ck, results)
    _save(ck, "2")
    with caplog.at_level(logging.ERROR, "streamproc.worker"):
        assert reloader.poll() == "refused"
    assert "could not load it; still serving tiny version 1" in caplog.text
    assert predictor.info["version"] == "1" and results == ["refused"]


def test_a_checkpoint_that_does_not_fit_the_running_windows_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = _save(tmp_path / "model", "1")
    settings = Settings(model=str(ck), frames_per_window=8, model_reload_s=1)
    predictor = Predictor(str(ck), "cpu")
    metrics = Metrics()
    reloader = model_reloader(settings, predictor, metrics, signature(ck))
    assert reloader is not None and reloader.directory == ck
    reloader.settle_s = 0.05
    _save(ck, "2", frames=4)
    with caplog.at_level(logging.ERROR, "streamproc.worker"):
        assert reloader.poll() == "refused"
    assert "samples 4 frames per window and the running worker's windows have 8" in caplog.text
    _save(ck, "3")
    assert reloader.poll() == "ok"
    scrape = metrics.registry.get_sample_value
    assert scrape("streamproc_model_reloads_total", {"result": "refused"}) == 1
    assert scrape("streamproc_model_reloads_total", {"result": "ok"}) == 1
    assert scrape("streamproc_model_info", {"name": "tiny", "version": "3",
                                            "checkpoint": predictor.info["checkpoint"]}) == 1
    assert fits_worker(settings, predictor.served) == []


def test_the_watcher_thread_waits_for_the_files_to_settle(tmp_path: Path) -> None:
    ck = _save(tmp_path / "model", "1")
    predictor = Predictor(str(ck), "cpu")
    results: list[str] = []
    seen: list[Served] = []
    reloader = _reloader(predictor, ck, results, check=seen.append)
    reloader.start()
    try:
        _save(ck, "2")
        deadline = time.monotonic() + 20
        while predictor.info["version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert predictor.info["version"] == "2"
        assert [s.info["version"] for s in seen] == ["2"]
    finally:
        reloader.stop()
    assert results == ["ok"]


def test_only_checkpoint_directories_are_watched(tmp_path: Path) -> None:
    ck = _save(tmp_path / "model", "1")
    assert checkpoint_dir(str(ck)) == ck
    assert checkpoint_dir(str(ck / "model.json")) == ck
    assert checkpoint_dir("mypkg.models:factory") is None
    assert signature(tmp_path / "nothing") is None
