"""Training and evaluation: tiny AV-Digits trains on CPU and recognises held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamproc.align.aligner import AlignConfig, Aligner
from streamproc.capture.sources import file_records
from streamproc.cli import main
from streamproc.config import MODALITIES, Settings
from streamproc.errors import UserError
from streamproc.ml import avdigits as av
from streamproc.ml.dataset import Dataset, read_labels
from streamproc.ml.recording import WindowLabeler
from streamproc.ml.train import (
    Split,
    TrainConfig,
    accuracy,
    benchmark,
    load_split,
    macro_f1,
    modality_keep,
    predict_logits,
    preprocess_for,
    train_model,
)
from streamproc.models import create_model, load_model
from streamproc.models.preprocess import make_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(avdigits_tiny: Path) -> Path:
    return avdigits_tiny  # generated once per session (conftest.py)


@pytest.fixture(scope="module")
def trained(tiny_model: Path) -> Path:
    """`streamproc train` on tiny AV-Digits, once per session (conftest.py; the pipeline
    tests serve the same checkpoint)."""
    return tiny_model


def test_tiny_avdigits_beats_chance_on_held_out_test(tiny: Path, trained: Path) -> None:
    """Test windows: voices, noise seeds and digit images never seen in training."""
    model = load_model(str(trained), "cpu")
    ds = Dataset(tiny)
    test = load_split(ds, "test", model.preprocess, model.labels)
    acc = accuracy(test.y, predict_logits(model, test.batch))
    chance = 1 / len(model.labels)
    assert acc >= 3 * chance, f"held-out accuracy {acc:.3f} is not far above chance {chance}"
    extra = model.checkpoint_extra
    assert extra["test"]["accuracy"] == pytest.approx(acc)  # what train reported is real
    assert extra["train"]["best_epoch"] >= 1 and model.name == "avdigits-late"


def test_eval_of_a_checkpoint_prints_a_table(tiny: Path, trained: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tiny), "--model", str(trained), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("| model | split | windows | accuracy | macro_f1 | without_video | "
                      "without_audio | without_text |")
    row = out[2].split("|")
    assert row[2].strip() == "test" and int(row[3]) == Dataset(tiny).splits["test"]
    acc = load_model(str(trained)).checkpoint_extra["test"]["accuracy"]
    assert float(row[4]) == pytest.approx(100 * acc, abs=0.05)


def test_the_trained_model_recognises_a_replayed_clip(trained: Path, tmp_path: Path) -> None:
    """The demo path: clip files -> file source records -> aligner -> batch -> model."""
    model = load_model(str(trained), "cpu")
    digits = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    clip = av.write_clip(tmp_path / "clip", digits, stream_id="demo-1",
                         cfg=av.PRESETS["tiny"], cache_dir=tmp_path / "tts")
    settings = Settings(max_future_ms=0)  # a fixed origin, replayed on a fake clock
    assert model.preprocess.mismatches(settings) == []
    aligner = Aligner(AlignConfig.from_settings(settings))
    labeler = WindowLabeler(read_labels(clip.labels))
    origin = 1_800_000_000 * 10**9
    for rec in file_records("demo-1", clip.video, clip.audio, clip.transcript,
                            origin_ns=origin):
        labeler.observe(rec)
        aligner.add(rec, 0)
    windows, labels = [], []
    for w in aligner.flush():
        label = labeler.label(w)
        if label is not None:
            windows.append(w)
            labels.append(model.labels.index(label))
    assert len(windows) == 3 * len(digits)  # the windows wholly inside each digit
    with torch.no_grad():
        pred = model(make_batch(windows, model.preprocess)).argmax(1)
    acc = float((pred == torch.tensor(labels)).float().mean())
    assert acc >= 0.3, f"clip accuracy {acc:.2f}"


def test_modality_keep_never_drops_everything() -> None:
    gen = torch.Generator().manual_seed(0)
    present = torch.rand(4000, 3, generator=gen) < 0.7
    keep = modality_keep(present, 0.5, MODALITIES, gen)
    left = (present & keep).any(1)
    assert (left | ~present.any(1)).all()  # rows with input keep some of it
    # a row with k modalities drops each with p, unless all k would go (then none does)
    k = present.sum(1).double()
    expected = (k * (0.5 - 0.5 ** k)).sum() / k.sum()
    dropped = (present & ~keep).sum() / present.sum()
    assert float(dropped) == pytest.approx(float(expected), abs=0.02)
    assert modality_keep(present, 0.5, ("video",), gen).all()  # unimodal: nothing to drop
    assert modality_keep(present, 0.0, MODALITIES, gen).all()


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 300)
    logits = torch.from_numpy(rng.normal(size=(300, 6)))
    logits[torch.arange(300), torch.from_numpy(y)] += torch.from_numpy(rng.normal(1, 1, 300))
    ours = macro_f1(torch.from_numpy(y), logits, 6)
    assert ours == pytest.approx(f1_score(y, logits.argmax(1).numpy(), average="macro"))


def test_early_stopping_restores_the_best_weights(tiny: Path) -> None:
    ds = Dataset(tiny)
    pre = preprocess_for(ds)
    train = load_split(ds, "train", pre)
    val = load_split(ds, "val", pre)
    rng = torch.Generator().manual_seed(1)
    noisy_val = Split(val.batch, val.y[torch.randperm(len(val), generator=rng)], val.info)
    model = create_model("text", ds.labels, pre)
    res = train_model(model, train, noisy_val, TrainConfig(epochs=30, patience=2,
                                                           progress=False), log=lambda m: None)
    assert len(res.history) < 30  # labels that cannot be learned: it stopped
    assert res.best_epoch == 1 + max(range(len(res.history)),
                                     key=lambda i: (res.history[i].val_acc, -i))
    assert accuracy(noisy_val.y, predict_logits(model, noisy_val.batch)) == \
        pytest.approx(res.best_val_acc)


def test_eval_writes_table_plot_and_goals(tiny: Path, tmp_path: Path) -> None:
    res = benchmark(tiny, tmp_path, methods=["video", "text", "late", "lmf", "tfn"],
                    seeds=[0, 1], cfg=TrainConfig(epochs=2, progress=False),
                    ensemble_size=2, log=lambda m: None)
    md = (tmp_path / "results.md").read_text()
    for name in ("video (single)", "text (single)", "late (fusion)", "lmf (fusion)",
                 "ensemble 2×", "preprocessing (shared"):
        assert name in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoints" / "late" / "model.json").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    runs = saved["runs"]
    assert len(runs) == 5 * 2
    rows = saved["summary"]["rows"]
    for m in ("video", "text", "late"):
        accs = [r["metrics"]["accuracy"] for r in runs if r["method"] == m]
        assert rows[m]["accuracy"][0] == pytest.approx(np.mean(accs))
        assert rows[m]["accuracy"][1] == pytest.approx(np.std(accs, ddof=1))
    g = saved["summary"]["goals"]["fusion_gain"]
    best_f = max(("late", "lmf", "tfn"), key=lambda m: rows[m]["accuracy"][0])
    best_s = max(("video", "text"), key=lambda m: rows[m]["accuracy"][0])
    assert (g["best_fusion"], g["best_single"]) == (best_f, best_s)
    assert g["gap"] == pytest.approx(rows[best_f]["accuracy"][0] - rows[best_s]["accuracy"][0])
    assert g["met"] == (g["gap"] >= 0.05 and g["gap"] > g["spread"])
    lt = saved["summary"]["goals"]["lmf_vs_tfn"]
    assert lt["lmf_params"] < lt["tfn_params"]
    assert set(saved["timing_ms"]) >= {"video", "text", "late", "preprocess"}
    assert len(saved["ensemble"]["accuracy"]) == 2
    assert res["markdown"] == md


def test_cli_errors_are_readable(tiny: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "not a streamproc dataset" in capsys.readouterr().err
    assert main(["train", str(tiny), "--model", "bogus", "--out", str(tmp_path / "o")]) == 2
    assert "unknown model 'bogus'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", str(tiny), "--out", str(tmp_path / "o"), "--device",
                     "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(UserError, match="--option takes KEY=VALUE"):
        from streamproc.cli import _options

        _options(["rank"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda(tiny: Path) -> None:
    ds = Dataset(tiny)
    pre = preprocess_for(ds)
    train, val = load_split(ds, "train", pre), load_split(ds, "val", pre)
    model = create_model("attention", ds.labels, pre)
    res = train_model(model, train, val, TrainConfig(epochs=3, device="cuda", progress=False),
                      log=lambda m: None)
    assert next(model.parameters()).is_cuda and res.best_val_acc > 0.15
