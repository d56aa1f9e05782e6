"""The model side of inference: a batch of windows -> one :class:`Scored` per window.

The :class:`Predictor` serves one model at a time and can be handed another
(:meth:`Predictor.swap`, what the hot reload of inference/reload.py does): each batch
takes the model being served when it starts and keeps it to its end, so a swap falls
between two batches, and every :class:`Scored` names the model that computed it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamproc.align.aligner import AlignConfig, Window
from streamproc.config import MODALITIES
from streamproc.wire.codec import VideoFrame

if TYPE_CHECKING:  # torch comes with it: loaded only when a model is served
    from streamproc.models.memo import EncodingMemo


@dataclass(frozen=True)
class Scored:
    """One window's outcome from the model."""

    label: str
    scores: dict[str, float]
    preprocess_ms: float  # the batch's JPEG decode + resize + log-mel + hashing
    model_ms: float  # the batch's forward pass
    #: name, version (and checkpoint digest) of the model that scored it; None: unknown
    model: Mapping[str, str] | None = None
    #: modalities whose encoder output it took from its provisional window (unchanged input)
    reused: tuple[str, ...] = ()


@dataclass(frozen=True)
class Served:
    """A loaded model and what predictions say about it."""

    model: Any
    labels: list[str]
    info: Mapping[str, str] = field(default_factory=dict)
    spec: str = ""

    @property
    def preprocess(self) -> Any:
        return self.model.preprocess

    def describe(self) -> str:
        extra = f" ({self.info['checkpoint']})" if "checkpoint" in self.info else ""
        return f"{self.info['name']} version {self.info['version']}{extra}"


def load_served(spec: str, device: Any) -> Served:
    """Load ``spec`` (a checkpoint or ``package.module:factory``) ready to serve."""
    from streamproc.models import load_model

    model = load_model(spec, device)
    info = {"name": str(model.name), "version": str(model.version)}
    digest = getattr(model, "checkpoint_digest", None)
    if isinstance(digest, str):
        # "sha256:" and 12 hex digits: tells two checkpoints that share name and version apart
        info["checkpoint"] = digest[:19]
    return Served(model, [str(x) for x in model.labels], info, spec)


class Predictor:
    """The model being served, called from the model thread with a batch of windows.

    ``spec`` is a checkpoint directory or ``package.module:factory`` (docs/models.md);
    preprocessing is the model's own (``model.preprocess``), the same code as training.
    """

    def __init__(self, spec: str, device: str = "auto", threads: int | None = None) -> None:
        # torch loads only when a model is served: an align-only worker never pays for it
        import torch

        from streamproc.models import resolve_device
        from streamproc.models.memo import EncodingMemo
        from streamproc.models.preprocess import decode_early

        self.spec = spec
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self._served = load_served(spec, self.device)
        self._decode_early = decode_early
        # touched by the model thread only (every batch runs there)
        self._memo = EncodingMemo()

    # what is served now; each read is one reference, so it is never half of two models
    @property
    def served(self) -> Served:
        return self._served

    @property
    def model(self) -> Any:
        return self._served.model

    @property
    def labels(self) -> list[str]:
        return self._served.labels

    @property
    def preprocess(self) -> Any:
        return self._served.preprocess

    @property
    def info(self) -> Mapping[str, str]:
        return self._served.info

    def load(self, spec: str | None = None) -> Served:
        """Load a model (this checkpoint again by default) without serving it."""
        return load_served(spec or self.spec, self.device)

    def swap(self, served: Served) -> Served:
        """Serve ``served`` from the next batch on; returns the model it replaces."""
        old, self._served = self._served, served
        return old

    def warm_up(self, max_batch: int, cfg: AlignConfig, served: Served | None = None) -> float:
        """Run the model once for every batch size up to ``max_batch`` (empty windows of
        ``cfg``), so no live batch pays for a shape's first use (CPU kernels are set up per
        shape, tens of ms each). ``served``: a model loaded but not yet served. Returns the
        seconds it took."""
        import numpy as np

        t0 = time.perf_counter()
        n = cfg.window_samples
        blank = Window(stream_id="", start_ns=0, end_ns=cfg.window_ns, frames=[],
                       frame_count=0, audio=np.zeros(n, np.float32),
                       audio_mask=np.zeros(n, np.bool_), sample_rate=cfg.sample_rate,
                       segments=[], present=dict.fromkeys(MODALITIES, True))
        for size in range(1, max_batch + 1):
            self._score(served or self._served, [blank] * size)
        return time.perf_counter() - t0

    def decode_early(self, frame: VideoFrame) -> None:
        """Start decoding an accepted frame now, so its window's batch finds it decoded."""
        self._decode_early(frame, self.preprocess)

    def __call__(self, windows: Sequence[Window]) -> list[Scored]:
        return self._score(self._served, windows, self._memo)

    @staticmethod
    def _score(served: Served, windows: Sequence[Window],
               memo: EncodingMemo | None = None) -> list[Scored]:
        from streamproc.models import predict_proba

        timings: dict[str, float] = {}
        if memo is not None:
            memo.reused = []
        probs = predict_proba(served.model, windows, timings, memo)
        pre_ms, model_ms = timings["preprocess_ms"], timings["model_ms"]
        labels = served.labels
        reused = memo.reused if memo is not None and memo.reused else [()] * len(windows)
        out = []
        for row, same in zip(probs.tolist(), reused, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Scored(labels[best],
                              {lab: round(p, 6) for lab, p in zip(labels, row, strict=True)},
                              pre_ms, model_ms, served.info, same))
        return out
