"""Fusion methods: named ``nn.Module`` classes in a registry.

Each takes the encoders' outputs and a presence mask and returns logits::

    fusion(encoded: dict[modality, Encoded], present: bool [B, M]) -> [B, n_classes]

``present[:, i]`` is ``modalities[i]``. A missing modality is normal input: every method
has a defined answer with any subset present (also none: then it returns a constant).
Register your own with ``@register_fusion("name")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from streamproc.models.encoders import Encoded

FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(name: str) -> Callable[[type[Fusion]], type[Fusion]]:
    def deco(cls: type[Fusion]) -> type[Fusion]:
        if name in FUSIONS:
            raise ValueError(f"fusion {name!r} is already registered")
        FUSIONS[name] = cls
        cls.name = name
        return cls
    return deco


class Fusion(nn.Module):
    """Base: remembers the modality order; subclasses implement ``forward``."""

    name = "?"

    def __init__(self, modalities: Sequence[str], dims: Mapping[str, int],
                 token_lens: Mapping[str, int], n_classes: int) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.dims = dict(dims)
        self.token_lens = dict(token_lens)
        self.n_classes = n_classes

    def pooled(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> list[torch.Tensor]:
        """Pooled vectors in modality order, zeroed where the modality is absent."""
        return [enc[m].pooled * present[:, i:i + 1].to(enc[m].pooled.dtype)
                for i, m in enumerate(self.modalities)]


def _mlp(din: int, hidden: int, dout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(din, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, dout))


@register_fusion("unimodal")
class UnimodalHead(Fusion):
    """One modality, an MLP head: the single-modality baselines."""

    def __init__(self, modalities, dims, token_lens, n_classes, hidden: int = 64,
                 dropout: float = 0.2) -> None:
        super().__init__(modalities, dims, token_lens, n_classes)
        if len(self.modalities) != 1:
            raise ValueError("the unimodal head takes exactly one modality")
        self.head = _mlp(dims[self.modalities[0]], hidden, n_classes, dropout)

    def forward(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(enc, present)[0])


@register_fusion("early")
class EarlyFusion(Fusion):
    """Concatenate the pooled vectors (zeros when absent) and the presence flags; MLP."""

    def __init__(self, modalities, dims, token_lens, n_classes, hidden: int = 128,
                 dropout: float = 0.2) -> None:
        super().__init__(modalities, dims, token_lens, n_classes)
        din = sum(dims[m] for m in self.modalities) + len(self.modalities)
        self.head = _mlp(din, hidden, n_classes, dropout)

    def forward(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> torch.Tensor:
        x = torch.cat([*self.pooled(enc, present), present.float()], dim=1)
        return self.head(x)


@register_fusion("late")
class LateFusion(Fusion):
    """Per-modality heads; their log-probabilities are averaged with learned weights
    renormalised over the modalities present (softmax of the weights of present ones)."""

    def __init__(self, modalities, dims, token_lens, n_classes, hidden: int = 64,
                 dropout: float = 0.2) -> None:
        super().__init__(modalities, dims, token_lens, n_classes)
        self.heads = nn.ModuleDict({m: _mlp(dims[m], hidden, n_classes, dropout)
                                    for m in self.modalities})
        self.weight_logits = nn.Parameter(torch.zeros(len(self.modalities)))

    def modality_weights(self, present: torch.Tensor) -> torch.Tensor:
        """[B, M] weights: softmax over present modalities, zero elsewhere."""
        s = self.weight_logits.expand(present.shape[0], -1).masked_fill(~present, float("-inf"))
        return torch.softmax(s, dim=1).nan_to_num(0.0)

    def forward(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(self.heads[m](enc[m].pooled), dim=1)
                            for m in self.modalities], dim=1)  # [B, M, C]
        w = self.modality_weights(present)
        return (w.unsqueeze(-1) * logp).sum(1)


class _Projected(Fusion):
    """Shared by LMF and TFN: project each modality linearly to ``proj`` dims, append a 1.

    With the 1 appended, an absent modality (vector zeroed) still contributes its
    constant factor, so the fused tensor keeps the other modalities' terms: absence is
    ordinary input, not a zero product. The projection is linear (no ReLU) and the fused
    vector is layer-normalised: products of rectified, dropped-out factors are mostly
    zeros and trained several points worse here.
    """

    def __init__(self, modalities, dims, token_lens, n_classes, proj: int):
        super().__init__(modalities, dims, token_lens, n_classes)
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], proj) for m in self.modalities})

    def factors(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, m in enumerate(self.modalities):
            h = self.proj[m](enc[m].pooled) * present[:, i:i + 1].to(enc[m].pooled.dtype)
            out.append(torch.cat([h, torch.ones_like(h[:, :1])], dim=1))  # [B, p+1]
        return out


@register_fusion("lmf")
class LowRankFusion(_Projected):
    """Low-rank multimodal fusion (Liu et al. 2018):
    ``F = Σ_i α_i Π_m W_m^(i) [z_m; 1]`` with ``rank`` factors per modality: TFN's weight
    tensor in factored form, so its size grows with the sum, not the product, of dims."""

    def __init__(self, modalities, dims, token_lens, n_classes, rank: int = 8, proj: int = 16,
                 hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__(modalities, dims, token_lens, n_classes, proj)
        self.rank = rank
        std = (1.0 / (proj + 1)) ** 0.5
        self.factor = nn.ParameterDict({
            m: nn.Parameter(torch.randn(rank, proj + 1, hidden) * std) for m in self.modalities})
        self.alpha = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_classes))

    def forward(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> torch.Tensor:
        prod = None
        for m, z in zip(self.modalities, self.factors(enc, present), strict=True):
            f = torch.einsum("bp,rph->brh", z, self.factor[m])  # [B, rank, hidden]
            prod = f if prod is None else prod * f
        fused = torch.einsum("brh,r->bh", prod, self.alpha) + self.bias
        return self.head(fused)


@register_fusion("tfn")
class TensorFusion(_Projected):
    """Tensor fusion (Zadeh et al. 2017): the full outer product ``⊗_m [z_m; 1]``,
    flattened, into an MLP. Size (proj+1)^M, so keep ``proj`` small; it is the exact
    model LMF approximates, a check on LMF."""

    def __init__(self, modalities, dims, token_lens, n_classes, proj: int = 16,
                 hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__(modalities, dims, token_lens, n_classes, proj)
        self.head = nn.Sequential(nn.Linear((proj + 1) ** len(self.modalities), hidden),
                                  nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_classes))

    def forward(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> torch.Tensor:
        zs = self.factors(enc, present)
        t = zs[0]
        for z in zs[1:]:
            t = torch.einsum("bi,bj->bij", t, z).flatten(1)
        return self.head(t)


@register_fusion("attention")
class CrossModalAttention(Fusion):
    """Masked cross-modal attention: every modality's tokens (frames, audio time steps,
    n-grams) plus a summary token go through a small transformer; tokens of absent
    modalities and padding are masked out of attention; the summary token is classified."""

    def __init__(self, modalities, dims, token_lens, n_classes, d_model: int = 64,
                 heads: int = 4, layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__(modalities, dims, token_lens, n_classes)
        self.inp = nn.ModuleDict({m: nn.Linear(dims[m], d_model) for m in self.modalities})
        self.pos = nn.ParameterDict({
            m: nn.Parameter(torch.randn(token_lens[m], d_model) * 0.02) for m in self.modalities})
        self.kind = nn.Parameter(torch.randn(len(self.modalities), d_model) * 0.02)
        self.summary = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model,
                                           dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, enc: Mapping[str, Encoded], present: torch.Tensor) -> torch.Tensor:
        b = present.shape[0]
        seqs = [self.summary.expand(b, -1, -1)]
        masks = [present.new_ones((b, 1))]
        for i, m in enumerate(self.modalities):
            e = enc[m]
            t = e.tokens.shape[1]
            seqs.append(self.inp[m](e.tokens) + self.pos[m][:t] + self.kind[i])
            masks.append(e.mask & present[:, i:i + 1])
        x = self.encoder(torch.cat(seqs, 1), src_key_padding_mask=~torch.cat(masks, 1))
        return self.head(self.norm(x[:, 0]))


def build_fusion(name: str, modalities: Sequence[str], dims: Mapping[str, int],
                 token_lens: Mapping[str, int], n_classes: int, **options: object) -> Fusion:
    from streamproc.errors import UserError

    if name not in FUSIONS:
        raise UserError(f"unknown fusion {name!r}; one of {', '.join(sorted(FUSIONS))}")
    try:
        return FUSIONS[name](modalities, dims, token_lens, n_classes, **options)
    except TypeError as e:
        raise UserError(f"fusion {name!r}: {e}") from None


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (frozen pretrained weights are not counted)."""
    return sum(math.prod(p.shape) for p in module.parameters() if p.requires_grad)
