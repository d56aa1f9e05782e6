"""Checkpoints: a directory with ``model.safetensors`` (weights) and ``model.json`` (the rest).

Loading never unpickles: safetensors holds raw tensors only, and the JSON names a
registered architecture rather than code. The JSON records a SHA-256 digest over its
own content and the weights bytes, checked before anything is built, so a modified or
truncated file is refused with a message instead of becoming a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from streamproc.errors import UserError

FORMAT = "streamproc-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says which file and why."""


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(meta: dict[str, Any], weights: bytes) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    h = hashlib.sha256(_canonical(body))
    h.update(b"\0")
    h.update(weights)
    return "sha256:" + h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(model: Any, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a :class:`~streamproc.models.MultimodalModel`) to directory ``path``.

    ``extra`` (JSON-able: metrics, training settings, dataset) is stored and covered by
    the digest. Returns the directory.
    """
    from importlib.metadata import PackageNotFoundError, version

    from safetensors.torch import save

    try:
        sp_version = version("streamproc")
    except PackageNotFoundError:
        sp_version = "unknown"
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "streamproc_version": sp_version,
        "torch_version": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extra": extra or {},
    }
    meta["digest"] = _digest(meta, weights)
    _atomic_write(out / WEIGHTS_FILE, weights)
    _atomic_write(out / CONFIG_FILE, json.dumps(meta, indent=2).encode() + b"\n")
    return out


def _checkpoint_dir(path: Path) -> Path:
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        return path.parent
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """(metadata, weights bytes) after checking format, version and digest."""
    d = _checkpoint_dir(Path(path))
    cfg_file, w_file = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise CheckpointError(f"{d} is not a streamproc checkpoint: it needs both "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(cfg_file.read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} is not a streamproc checkpoint "
                              f"(format {meta.get('format') if isinstance(meta, dict) else '?'!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file} has checkpoint format version {version!r}; this streamproc reads "
            f"version {FORMAT_VERSION} only (re-train, or use the streamproc that wrote it)")
    weights = w_file.read_bytes()  # hashed and parsed from the same bytes: no swap between
    want = meta.get("digest")
    got = _digest(meta, weights)
    if want != got:
        raise CheckpointError(
            f"checkpoint {d} failed its integrity check: {CONFIG_FILE} records digest "
            f"{str(want)[:23]}... but the files hash to {got[:23]}...; one of them was "
            "modified or corrupted after saving. Refusing to load it.")
    return meta, weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Rebuild the model from a checkpoint directory and load its weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from streamproc.models import ModelConfig, MultimodalModel

    meta, weights = read_checkpoint(path)
    try:
        config = ModelConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its model config is incomplete: {e}") from None
    model = MultimodalModel(config)
    try:
        state = load(weights)
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS_FILE} is not readable: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the architecture "
                              f"{config.architecture!r}: {e}") from None
    model.checkpoint_extra = meta.get("extra", {})
    model.checkpoint_digest = meta["digest"]
    return model.to(device).eval()
