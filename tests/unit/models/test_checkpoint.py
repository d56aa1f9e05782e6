"""Checkpoints (safetensors + JSON, digest-checked, never unpickled) and load_model specs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from model_helpers import LABELS, windows

from streamproc.errors import UserError
from streamproc.models import create_model, load_model
from streamproc.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from streamproc.models.preprocess import Preprocess, make_batch

PRE = Preprocess(frame_size=20, n_mels=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_model("lmf", LABELS, PRE, rank=3, name="digits", version="2.1")
    # move BatchNorm statistics away from their defaults so buffers are tested too
    model.train()
    model(make_batch(windows(6, seed=2), PRE))
    model.eval()
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "lmf", {"note": "test"})
    return path, model


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.mark.parametrize("name", ["early", "late", "lmf", "tfn", "attention", "audio"])
def test_round_trip_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = create_model(name, LABELS, PRE)
    model.train()
    model(make_batch(windows(4, seed=1), PRE))  # non-default BatchNorm buffers
    model.eval()
    save_checkpoint(model, tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), "cpu")
    batch = make_batch(windows(5, seed=3), PRE)
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))
    assert loaded.labels == LABELS and loaded.preprocess == PRE
    assert not loaded.training


def test_metadata_survives_and_either_file_path_works(saved) -> None:
    path, model = saved
    for spec in (path, path / CONFIG_FILE, path / WEIGHTS_FILE):
        m = load_model(str(spec))
        assert (m.name, m.version, m.labels) == ("digits", "2.1", LABELS)
        assert m.config == model.config
        assert m.checkpoint_extra == {"note": "test"}


def test_loading_never_calls_torch_load(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(saved[0])


def test_tampered_weights_are_refused(saved, tmp_path: Path) -> None:
    path = _copy(saved[0], tmp_path / "t")
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0x01  # one bit inside a tensor
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"failed its integrity check.*Refusing to load"):
        load_model(str(path))


def test_tampered_config_is_refused(saved, tmp_path: Path) -> None:
    path = _copy(saved[0], tmp_path / "t")
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["config"]["labels"][0] = "renamed"
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(path)


def test_truncated_weights_are_refused(saved, tmp_path: Path) -> None:
    path = _copy(saved[0], tmp_path / "t")
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(path)


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_wrong_format_version_is_refused(saved, tmp_path: Path, version) -> None:
    path = _copy(saved[0], tmp_path / "t")
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["format_version"] = version
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"format version {version!r}; this streamproc "
                                              "reads version 1"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"needs both model\.json and model\.safetensors"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_FILE).write_text("{not json")
    (tmp_path / "bad" / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(str(tmp_path / "bad"))
    with pytest.raises(UserError, match="no such checkpoint file or directory"):
        load_model(str(tmp_path / "missing"))


USER_MODULE = """
import torch
from torch import nn
from streamproc.models.preprocess import Preprocess

class CountFrames(nn.Module):
    '''Scores label i by how many frames a window has, a toy user model.'''

    labels = ["few", "many"]
    preprocess = Preprocess(frame_size=12)
    name = "count-frames"
    version = "0.1"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, batch):
        n = batch.video_mask.sum(1).float()
        return torch.stack([4 - n, n - 4], 1) * self.scale

def make():
    return CountFrames()

def broken():
    return object()
"""


def test_user_model_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("my_models:make", "cpu")
    assert model.name == "count-frames" and model.labels == ["few", "many"]
    assert not model.training
    ws = windows(6, seed=9)
    logits = model(make_batch(ws, model.preprocess))
    want = [0 if min(w.frame_count, 8) < 4 else 1 for w in ws]
    assert logits.argmax(1).tolist() == want


def test_user_model_errors_are_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models2.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"does not follow the streamproc model protocol.*"
                                        r"no attribute \.labels"):
        load_model("my_models2:broken")
    with pytest.raises(UserError, match="has no 'missing'"):
        load_model("my_models2:missing")
    with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:make")


def test_cuda_without_cuda_is_a_clear_error(saved) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="torch sees no CUDA device"):
        load_model(str(saved[0]), "cuda")
