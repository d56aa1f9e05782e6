"""Window classifiers: per-modality encoders -> fusion -> logits, in a registry of names.

In the style of timm: ``create_model("lmf", labels=[...])`` builds a named architecture,
``list_models()`` names them, ``register_model`` adds yours, and ``load_model(spec)``
returns a ready model from a checkpoint or from a user factory ``package.module:factory``.

Every model, ours or a user's, follows one protocol (docs/models.md):

- ``labels: list[str]``, ``preprocess: Preprocess``, ``name: str``, ``version: str``;
- ``model(batch: WindowBatch) -> logits [B, len(labels)]``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from streamproc.config import MODALITIES
from streamproc.errors import UserError
from streamproc.models.encoders import (
    DEFAULT_ENCODERS,
    Encoded,
    EncoderConfig,
    FrozenEncoder,
    build_encoder,
    encoder_preprocess,
)
from streamproc.models.fusion import FUSIONS, build_fusion, count_parameters
from streamproc.models.memo import EncodingMemo
from streamproc.models.preprocess import Preprocess, WindowBatch, make_batch
from streamproc.plugins import import_factory

__all__ = [
    "FUSIONS",
    "MODELS",
    "EncodingMemo",
    "ModelConfig",
    "MultimodalModel",
    "cache_frozen_features",
    "check_protocol",
    "count_parameters",
    "create_model",
    "list_models",
    "load_model",
    "model_device",
    "predict_proba",
    "register_model",
    "resolve_device",
]


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model's architecture (weights live elsewhere)."""

    architecture: str
    labels: list[str]
    preprocess: Preprocess
    modalities: tuple[str, ...]
    fusion: str
    fusion_options: dict[str, Any] = field(default_factory=dict)
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)
    name: str = ""
    version: str = "1"

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture, "labels": list(self.labels),
            "preprocess": self.preprocess.to_json(), "modalities": list(self.modalities),
            "fusion": self.fusion, "fusion_options": dict(self.fusion_options),
            "encoders": {m: e.to_json() for m, e in self.encoders.items()},
            "name": self.name, "version": self.version,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ModelConfig:
        return cls(
            architecture=obj["architecture"], labels=list(obj["labels"]),
            preprocess=Preprocess.from_json(obj["preprocess"]),
            modalities=tuple(obj["modalities"]), fusion=obj["fusion"],
            fusion_options=dict(obj.get("fusion_options", {})),
            encoders={m: EncoderConfig.from_json(e) for m, e in obj["encoders"].items()},
            name=obj.get("name", ""), version=str(obj.get("version", "1")),
        )


class MultimodalModel(nn.Module):
    """Encoders for ``config.modalities`` + one fusion module."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bad = [m for m in config.modalities if m not in MODALITIES]
        if bad or not config.modalities:
            raise UserError(f"modalities must be a non-empty subset of {MODALITIES}, "
                            f"got {config.modalities}")
        if len(set(config.labels)) != len(config.labels) or len(config.labels) < 2:
            raise UserError("a model needs at least two distinct labels")
        self.config = config
        self.encoders = nn.ModuleDict({
            m: build_encoder(m, config.encoders.get(m, DEFAULT_ENCODERS[m]), config.preprocess)
            for m in config.modalities})
        for m, enc in self.encoders.items():
            if isinstance(enc, FrozenEncoder):  # records the frozen weights it was built on
                config.encoders[m] = enc.config
        pre = config.preprocess
        token_lens = {"video": pre.frames_per_window, "audio": pre.n_audio_frames // 4,
                      "text": pre.max_text_tokens if self._text_kind() != "minilm" else 1}
        token_lens.update({m: e.n_tokens for m, e in self.encoders.items()
                           if isinstance(e, FrozenEncoder)})
        self.fusion = build_fusion(
            config.fusion, config.modalities,
            # nn.ModuleDict yields nn.Module (torch types its other attributes Tensor |
            # Module); every encoder of ENCODERS sets an int `dim`
            {m: cast(int, e.dim) for m, e in self.encoders.items()},
            token_lens, len(config.labels), **config.fusion_options)
        self._index = [MODALITIES.index(m) for m in config.modalities]

    def _text_kind(self) -> str:
        return self.config.encoders.get("text", DEFAULT_ENCODERS["text"]).kind

    # --- the protocol ------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def preprocess(self) -> Preprocess:
        return self.config.preprocess

    @property
    def name(self) -> str:
        return self.config.name or self.config.architecture

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def forward(self, batch: WindowBatch) -> torch.Tensor:
        return self.fuse(batch, self.encode(batch))

    def encode(self, batch: WindowBatch,
               reuse: Mapping[str, Mapping[int, Encoded]] | None = None) -> dict[str, Encoded]:
        """Every encoder's output for ``batch``; ``reuse[m][i]``: row i's output of encoder
        m computed before (one row each), so that encoder runs only on the other rows."""
        out = {}
        for m, enc in self.encoders.items():
            have = (reuse or {}).get(m) or {}
            if not have:
                out[m] = enc(batch)
                continue
            rest = [i for i in range(len(batch)) if i not in have]
            new = iter(zip(*(part.unbind(0) for part in enc(batch.select(rest))),
                           strict=True)) if rest else iter(())
            rows = [have[i] if i in have else Encoded(*next(new)) for i in range(len(batch))]
            out[m] = Encoded(*(torch.stack(part) for part in zip(*rows, strict=True)))
        return out

    def fuse(self, batch: WindowBatch, encoded: Mapping[str, Encoded]) -> torch.Tensor:
        """Logits from the encoders' outputs (:meth:`encode`)."""
        return self.fusion(encoded, batch.present[:, self._index])

    # --- conveniences ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def predict_proba(self, windows: Sequence[Any]) -> torch.Tensor:
        """Windows -> class probabilities [B, n_labels] (eval mode, no grad)."""
        return predict_proba(self, windows)


def model_device(model: Any) -> torch.device:
    """Where a model's weights are (CPU for parameter-free user models)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.inference_mode()
def predict_proba(model: Any, windows: Sequence[Any],
                  timings: dict[str, float] | None = None,
                  encodings: EncodingMemo | None = None) -> torch.Tensor:
    """Any protocol model: windows -> preprocessing -> logits -> probabilities on CPU.

    What the inference stage runs per micro-batch; the model's own ``preprocess`` decides
    the tensors, so serving matches training. ``timings`` (if given) receives
    ``preprocess_ms`` and ``model_ms``. ``encodings``: a :class:`MultimodalModel`'s
    encoder outputs of provisional windows are kept there, and a later window of the same
    stream and start whose input of a modality is the same takes that one's instead of
    running the encoder again (other models, and subclasses with a forward of their own:
    called whole).
    """
    if hasattr(model, "eval"):
        model.eval()
    t0 = time.perf_counter()
    memo = encodings if encodings is not None and _plain_multimodal(model) else None
    # a reused encoding's input is not prepared either: a final's frames are not decoded
    # again, nor its audio's log-mel computed
    kept = memo.reusable(model, windows) if memo is not None else {}
    host = make_batch(windows, model.preprocess,
                      {m: {i: k.present for i, k in rows.items()} for m, rows in kept.items()})
    batch = host.to(model_device(model))
    t1 = time.perf_counter()
    if memo is not None:
        encoded = model.encode(batch, {m: {i: k.encoded for i, k in rows.items()}
                                       for m, rows in kept.items()})
        memo.keep(windows, encoded, host.present)  # read on the host: no device sync
        logits = model.fuse(batch, encoded)
    else:
        logits = model(batch)
    if logits.shape != (len(windows), len(model.labels)):
        raise UserError(f"model {getattr(model, 'name', '?')!r} returned logits of shape "
                        f"{tuple(logits.shape)}, expected ({len(windows)}, {len(model.labels)})")
    probs = torch.softmax(logits.float(), dim=1).cpu()
    if timings is not None:
        timings["preprocess_ms"] = (t1 - t0) * 1000
        timings["model_ms"] = (time.perf_counter() - t1) * 1000
    return probs


def _plain_multimodal(model: Any) -> bool:
    """A MultimodalModel whose call is encode + fuse: not a subclass with a forward of its
    own, and no hooks on the call (those would be skipped)."""
    return (isinstance(model, MultimodalModel)
            and type(model).forward is MultimodalModel.forward
            and not (model._forward_hooks or model._forward_pre_hooks))


def cache_frozen_features(model: Any, batch: WindowBatch,
                          device: str | torch.device | None = None,
                          chunk: int = 64) -> WindowBatch:
    """``batch`` with the outputs of the model's frozen encoders computed once
    (``batch.features``) and the raw input only they read (frames, waveform) emptied.

    Training calls this per split: every epoch then costs only the trained layers, and a
    split's memory is its features (a few KB per window), not its decoded frames. Any model
    with the same frozen encoders can use the result; ``device`` runs the backbones there
    (default: where the model is).
    """
    frozen = {m: e for m, e in getattr(model, "encoders", {}).items()
              if isinstance(e, FrozenEncoder)}
    if not frozen:
        return batch
    dev = torch.device(device) if device is not None else model_device(model)
    feats: dict[str, torch.Tensor] = dict(batch.features)
    for enc in frozen.values():
        if enc.feature_key in feats:
            continue
        parts = [enc.features(batch.select(slice(i, i + chunk)).to(dev)).cpu()
                 for i in range(0, len(batch), chunk)]
        feats[enc.feature_key] = torch.cat(parts)
    video, wave = batch.video, batch.waveform
    if "video" in frozen:
        video = video[:, :, :, :0, :0]
    if "audio" in frozen:
        wave = wave[:, :0]
    return dataclasses.replace(batch, video=video, waveform=wave, features=feats)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

ModelFactory = Callable[..., MultimodalModel]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(labels, preprocess=None, **options) -> MultimodalModel``."""
    def deco(fn: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(arch: str, /, labels: Sequence[str], preprocess: Preprocess | None = None,
                 **options: Any) -> MultimodalModel:
    """A fresh (untrained) model of a registered architecture; ``options`` go to its
    factory (``name``, ``version``, ``dim``, ``text_encoder``, fusion options...)."""
    if arch not in MODELS:
        raise UserError(f"unknown model {arch!r}; one of {', '.join(list_models())}")
    return MODELS[arch](list(labels), preprocess or Preprocess(), **options)


#: Encoder settings of the pretrained encoders, by name (``dim`` comes from the model).
PRETRAINED_ENCODERS = {
    # two of the K frames: each costs a network pass, and a window's frames barely differ
    "efficientnet-lite0": EncoderConfig("efficientnet-lite0", frames=2, dropout=0.2),
    "haar-face": EncoderConfig("haar-face", frames=2, dropout=0.2),
    "silero-vad": EncoderConfig("silero-vad", dropout=0.2),
}


def _builtin(arch: str, fusion: str, modalities: tuple[str, ...],
             defaults: dict[str, Any]) -> ModelFactory:
    def factory(labels: list[str], preprocess: Preprocess | None = None, *,
                text_encoder: str = "gru", video_encoder: str = "cnn",
                audio_encoder: str = "cnn", video_frames: int | None = None,
                video_size: int | None = None, dim: int = 64, name: str = "",
                version: str = "1", encoders: dict[str, EncoderConfig] | None = None,
                **fusion_options: Any) -> MultimodalModel:
        enc = {m: dataclasses.replace(DEFAULT_ENCODERS[m], dim=dim) for m in modalities}
        for m, kind in (("video", video_encoder), ("audio", audio_encoder),
                        ("text", text_encoder)):
            if m in enc:
                base = PRETRAINED_ENCODERS.get(kind, enc[m])
                enc[m] = dataclasses.replace(base, kind=kind, dim=dim)
        if "video" in enc:
            video: dict[str, Any] = {"frames": video_frames, "input_size": video_size}
            enc["video"] = dataclasses.replace(
                enc["video"], **{k: v for k, v in video.items() if v is not None})
        enc.update(encoders or {})
        pre = encoder_preprocess(preprocess or Preprocess(), enc)
        cfg = ModelConfig(arch, list(labels), pre, modalities, fusion,
                          {**defaults, **fusion_options}, enc, name, version)
        return MultimodalModel(cfg)
    factory.__name__ = arch
    factory.__doc__ = f"{arch}: {fusion} fusion over {', '.join(modalities)}."
    return factory


for _arch, _fusion, _mods, _defaults in (
    ("early", "early", MODALITIES, {}),
    ("late", "late", MODALITIES, {}),
    ("lmf", "lmf", MODALITIES, {"rank": 8, "proj": 16}),
    ("tfn", "tfn", MODALITIES, {"proj": 16}),
    ("attention", "attention", MODALITIES, {}),
    ("video", "unimodal", ("video",), {}),
    ("audio", "unimodal", ("audio",), {}),
    ("text", "unimodal", ("text",), {}),
):
    register_model(_arch)(_builtin(_arch, _fusion, _mods, _defaults))

FUSION_MODELS = ("early", "late", "lmf", "tfn", "attention")
SINGLE_MODELS = ("video", "audio", "text")


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for CUDA without one is an error."""
    d = str(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {d!r} asked for, but torch sees no CUDA device "
                        "(use --device cpu or auto)")
    return torch.device(d)


_PROTOCOL = {"labels": "a list of label strings", "preprocess": "a streamproc.models.preprocess.Preprocess",
             "name": "a string", "version": "a string"}


def check_protocol(model: Any, where: str) -> None:
    """Raise a UserError naming what a model object lacks to serve windows."""
    problems = []
    for attr, what in _PROTOCOL.items():
        if not hasattr(model, attr):
            problems.append(f"no attribute .{attr} ({what})")
    if not problems:
        if (not isinstance(model.labels, (list, tuple)) or len(model.labels) < 2
                or not all(isinstance(x, str) for x in model.labels)):
            problems.append(".labels must be a list of at least two strings")
        if not isinstance(model.preprocess, Preprocess):
            problems.append(f".preprocess must be a Preprocess, got "
                            f"{type(model.preprocess).__name__}")
        if not isinstance(model.name, str) or not isinstance(model.version, str):
            problems.append(".name and .version must be strings")
    if not callable(model):
        problems.append("it is not callable (model(batch) -> logits)")
    if problems:
        raise UserError(f"{where} does not follow the streamproc model protocol "
                        f"(docs/models.md): {'; '.join(problems)}")




def load_model(spec: str, device: str | torch.device = "cpu") -> Any:
    """A ready model (eval mode, on ``device``) from a checkpoint path or an import path.

    - a directory (or its ``model.json`` / ``model.safetensors``) written by
      ``save_checkpoint``: verified against its digest, never unpickled;
    - ``package.module:factory``: ``factory()`` is called with no arguments and must
      return an object following the protocol (docs/models.md).
    """
    from streamproc.models.checkpoint import load_checkpoint

    if not spec:
        raise UserError("no model given: pass a checkpoint directory or package.module:factory")
    dev = resolve_device(device)
    path = Path(spec).expanduser()
    if path.exists():
        model = load_checkpoint(path, dev)
    elif ":" in spec and "/" not in spec.partition(":")[0]:
        model = import_factory(spec, "model")()
        if isinstance(model, nn.Module):
            model = model.to(dev)
    else:
        raise UserError(f"model {spec!r}: no such checkpoint file or directory, and not an "
                        "import path of the form package.module:factory")
    check_protocol(model, f"model {spec!r}")
    if hasattr(model, "eval"):
        model.eval()
    return model
