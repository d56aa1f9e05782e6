"""Encoders and the fusion zoo: shapes, presence masks, the registry, LMF = factored TFN."""

from __future__ import annotations

import itertools

import pytest
import torch
from model_helpers import LABELS, windows

from streamproc.config import MODALITIES
from streamproc.errors import UserError
from streamproc.models import (
    FUSION_MODELS,
    SINGLE_MODELS,
    MultimodalModel,
    count_parameters,
    create_model,
    list_models,
    register_model,
)
from streamproc.models.encoders import EncoderConfig, Pool
from streamproc.models.fusion import LowRankFusion, TensorFusion
from streamproc.models.preprocess import Preprocess, WindowBatch, make_batch

PRE = Preprocess()
PATTERNS = list(itertools.product([True, False], repeat=3))  # all 8, incl. none present


@pytest.fixture(scope="module")
def batch() -> WindowBatch:
    """8 windows, row r with presence PATTERNS[r] (row 7: nothing present)."""
    b = make_batch(windows(8), PRE)
    return b.mask_modalities(torch.tensor(PATTERNS))


def _perturbed(b: WindowBatch, modality: str, rows: torch.Tensor) -> WindowBatch:
    """The same batch with new content for ``modality`` in ``rows`` (masks unchanged)."""
    g = torch.Generator().manual_seed(7)
    out = b.select(torch.arange(len(b)))
    r = rows[:, None]
    if modality == "video":
        noise = torch.rand(out.video.shape, generator=g) - 0.5
        out.video = torch.where(r[..., None, None, None], noise, out.video)
    elif modality == "audio":
        out.audio = torch.where(r[..., None], torch.randn(out.audio.shape, generator=g),
                                out.audio)
    else:
        ids = torch.randint(2, PRE.text_buckets, out.text.shape, generator=g)
        out.text = torch.where(r & out.text_mask, ids, out.text)
        out.texts = [("zzz" if flag else t) for t, flag in zip(out.texts, rows.tolist(),
                                                                strict=True)]
    return out


def test_registry_names_every_architecture() -> None:
    assert set(list_models()) >= {*FUSION_MODELS, *SINGLE_MODELS}
    with pytest.raises(UserError, match="unknown model 'nope'"):
        create_model("nope", LABELS)


@pytest.mark.parametrize("name", [*FUSION_MODELS, *SINGLE_MODELS])
def test_shapes_with_every_presence_pattern(name: str, batch: WindowBatch) -> None:
    torch.manual_seed(0)
    model = create_model(name, LABELS, PRE).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (len(PATTERNS), len(LABELS))
    assert torch.isfinite(out).all()
    # training mode, backward through rows with all-but-one (and no) modality present
    model.train()
    loss = torch.nn.functional.cross_entropy(model(batch), torch.arange(8) % len(LABELS))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", FUSION_MODELS)
@pytest.mark.parametrize("modality", MODALITIES)
def test_an_absent_modality_cannot_change_the_output(name: str, modality: str,
                                                     batch: WindowBatch) -> None:
    """Masks are honoured: new content in a masked modality leaves logits unchanged,
    new content in a present one changes them."""
    torch.manual_seed(1)
    model = create_model(name, LABELS, PRE).eval()
    i = MODALITIES.index(modality)
    absent, present = ~batch.present[:, i], batch.present[:, i]
    with torch.no_grad():
        base = model(batch)
        out_absent = model(_perturbed(batch, modality, absent))
        out_present = model(_perturbed(batch, modality, present))
    assert torch.allclose(base, out_absent, atol=1e-5)
    changed = (base - out_present).abs().amax(1) > 1e-4
    assert changed[present].all() and not changed[absent].any()


def test_late_fusion_renormalises_over_present_modalities(batch: WindowBatch) -> None:
    model = create_model("late", LABELS, PRE).eval()
    with torch.no_grad():
        model.fusion.weight_logits.copy_(torch.tensor([0.3, -1.0, 2.0]))
        w = model.fusion.modality_weights(batch.present)
        out = model(batch)
        enc = {m: e(batch) for m, e in model.encoders.items()}
    assert torch.allclose(w.sum(1)[:-1], torch.ones(7))  # rows with something present
    assert (w[~batch.present] == 0).all() and (w[-1] == 0).all()
    # a row with one modality: exactly that head's log-probabilities
    for row, m in ((3, "video"), (5, "audio"), (6, "text")):
        assert batch.present[row].sum() == 1
        head = torch.log_softmax(model.fusion.heads[m](enc[m].pooled[row:row + 1]), 1)
        assert torch.allclose(out[row:row + 1], head, atol=1e-5)


def test_lmf_is_tfn_with_a_low_rank_weight(batch: WindowBatch) -> None:
    """Build TFN's weight tensor from LMF's factors: both fusions then agree exactly."""
    torch.manual_seed(3)
    dims, lens = {m: 64 for m in MODALITIES}, {"video": 8, "audio": 12, "text": 48}
    lmf = LowRankFusion(MODALITIES, dims, lens, 5, rank=3, proj=4, hidden=6).eval()
    tfn = TensorFusion(MODALITIES, dims, lens, 5, proj=4, hidden=6).eval()
    tfn.proj.load_state_dict(lmf.proj.state_dict())
    a, b, c = (lmf.factor[m] for m in MODALITIES)  # [rank, p+1, hidden]
    w = torch.einsum("r,rih,rjh,rkh->hijk", lmf.alpha, a, b, c).reshape(6, -1)
    with torch.no_grad():
        tfn.head[0].weight.copy_(w)
        tfn.head[0].bias.copy_(lmf.bias)
        for k in (1, 4):  # LayerNorm and output layer
            tfn.head[k].load_state_dict(lmf.head[k - 1].state_dict())
    model = create_model("lmf", LABELS, PRE).eval()
    with torch.no_grad():
        enc = {m: e(batch) for m, e in model.encoders.items()}
        assert torch.allclose(lmf(enc, batch.present), tfn(enc, batch.present), atol=1e-5)
    assert count_parameters(lmf) < count_parameters(tfn)


def test_lmf_has_far_fewer_fusion_parameters_than_tfn() -> None:
    lmf, tfn = create_model("lmf", LABELS, PRE), create_model("tfn", LABELS, PRE)
    assert count_parameters(lmf.fusion) * 5 < count_parameters(tfn.fusion)


def test_attention_pool_of_nothing_is_zero_not_nan() -> None:
    pool = Pool(4, "attention")
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[False] * 3, [True, False, False]])
    out = pool(x, mask)
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.allclose(out[1], x[1, 0])


@pytest.mark.parametrize("kind", ["gru", "transformer"])
def test_text_encoders(kind: str, batch: WindowBatch) -> None:
    model = create_model("text", LABELS, PRE, text_encoder=kind).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (8, len(LABELS)) and torch.isfinite(out).all()
    assert model.config.encoders["text"].kind == kind


def test_options_and_readable_errors() -> None:
    m = create_model("lmf", LABELS, PRE, rank=2, dim=32, name="digits", version="7")
    assert m.fusion.rank == 2 and m.name == "digits" and m.version == "7"
    assert m.labels == LABELS and m.preprocess == PRE
    with pytest.raises(UserError, match=r"fusion 'lmf'.*unexpected keyword"):
        create_model("lmf", LABELS, PRE, bogus=1)
    with pytest.raises(UserError, match="unknown text encoder 'bert'"):
        create_model("text", LABELS, PRE, text_encoder="bert")
    with pytest.raises(UserError, match="two distinct labels"):
        create_model("early", ["a", "a"], PRE)


def test_register_a_custom_architecture(batch: WindowBatch) -> None:
    from streamproc.models import MODELS, ModelConfig

    @register_model("test-video-mean")
    def factory(labels, preprocess=None, **kw):
        cfg = ModelConfig("test-video-mean", list(labels), preprocess or Preprocess(),
                          ("video",), "unimodal", {},
                          {"video": EncoderConfig("cnn", width=4, pooling="mean")})
        return MultimodalModel(cfg)

    try:
        m = create_model("test-video-mean", LABELS, PRE)
        assert m(batch).shape == (8, 5)
        with pytest.raises(ValueError, match="already registered"):
            register_model("test-video-mean")(factory)
    finally:
        MODELS.pop("test-video-mean")


def test_predict_proba_runs_the_shared_preprocessing() -> None:
    model = create_model("early", LABELS, PRE)
    p = model.predict_proba(windows(3, seed=5))
    assert p.shape == (3, 5) and torch.allclose(p.sum(1), torch.ones(3))
