"""`train` and `eval` with frozen pretrained encoders: features computed once per split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import LABELS, windows

from streamproc.ml.dataset import Dataset, DatasetWriter
from streamproc.ml.train import TrainConfig, benchmark, load_split, preprocess_for
from streamproc.models import create_model

ENCODERS = {"video_encoder": "efficientnet-lite0", "audio_encoder": "silero-vad"}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "ds"
    ws = windows(30, seed=5)
    with DatasetWriter(path, labels=LABELS[:3], window={"hop_ms": 500,
                                                       "frames_per_window": 8}) as w:
        for i, win in enumerate(ws):
            w.add(win, LABELS[i % 3], ("train", "train", "val", "train", "test")[i % 5], {})
    return path


@pytest.fixture(autouse=True)
def one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_load_split_caches_frozen_features_in_chunks(small: Path) -> None:
    ds = Dataset(small)
    model = create_model("lmf", ds.labels, preprocess_for(ds), **ENCODERS)
    split = load_split(ds, "train", model.preprocess, model=model, chunk=7)
    assert split is not None and len(split) == 18
    b = split.batch
    assert b.video.numel() == 0 and b.waveform.numel() == 0  # only the features are kept
    assert b.features["video/efficientnet-lite0/2"].shape == (18, 2, 1280)
    assert b.features["audio/silero-vad/31"].shape == (18, 31, 256)
    plain = load_split(ds, "train", model.preprocess)
    assert plain is not None
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(b), model(plain.batch), atol=1e-5)


@pytest.mark.slow
def test_eval_benchmark_with_pretrained_encoders(small: Path, tmp_path: Path) -> None:
    benchmark(small, tmp_path, methods=["audio", "late"], seeds=[0],
              cfg=TrainConfig(epochs=2, progress=False), ensemble_size=1,
              log=lambda m: None, **ENCODERS)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["video_encoder"], saved["audio_encoder"]) == ("efficientnet-lite0",
                                                                "silero-vad")
    meta = json.loads((tmp_path / "checkpoints" / "late" / "model.json").read_text())
    assert meta["config"]["encoders"]["video"]["kind"] == "efficientnet-lite0"
    assert meta["config"]["preprocess"]["frame_size"] == 96
    # timed on raw windows, so the frozen networks are in the figure
    assert saved["timing_ms"]["late"]["b32"] > saved["timing_ms"]["audio"]["b32"]
