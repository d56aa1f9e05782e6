"""The model side of inference: a batch of windows -> one :class:`Scored` per window."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from streamproc.align.aligner import AlignConfig, Window
from streamproc.config import MODALITIES
from streamproc.wire.codec import VideoFrame


@dataclass(frozen=True)
class Scored:
    """One window's outcome from the model."""

    label: str
    scores: dict[str, float]
    preprocess_ms: float  # the batch's JPEG decode + resize + log-mel + hashing
    model_ms: float  # the batch's forward pass


class Predictor:
    """A model loaded once, called from the model thread with a batch of windows.

    ``spec`` is a checkpoint directory or ``package.module:factory`` (docs/models.md);
    preprocessing is the model's own (``model.preprocess``), the same code as training.
    """

    def __init__(self, spec: str, device: str = "auto", threads: int | None = None) -> None:
        # torch loads only when a model is served: an align-only worker never pays for it
        import torch

        from streamproc.models import load_model, resolve_device
        from streamproc.models.preprocess import decode_early

        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.model = load_model(spec, self.device)
        self.labels = [str(x) for x in self.model.labels]
        self.preprocess = self.model.preprocess
        self.info = {"name": str(self.model.name), "version": str(self.model.version)}
        self._decode_early = decode_early

    def warm_up(self, max_batch: int, cfg: AlignConfig) -> float:
        """Run the model once for every batch size up to ``max_batch`` (empty windows of
        ``cfg``), so no live batch pays for a shape's first use (CPU kernels are set up per
        shape, tens of ms each). Returns the seconds it took."""
        import numpy as np

        t0 = time.perf_counter()
        n = cfg.window_samples
        blank = Window(stream_id="", start_ns=0, end_ns=cfg.window_ns, frames=[],
                       frame_count=0, audio=np.zeros(n, np.float32),
                       audio_mask=np.zeros(n, np.bool_), sample_rate=cfg.sample_rate,
                       segments=[], present=dict.fromkeys(MODALITIES, True))
        for size in range(1, max_batch + 1):
            self([blank] * size)
        return time.perf_counter() - t0

    def decode_early(self, frame: VideoFrame) -> None:
        """Start decoding an accepted frame now, so its window's batch finds it decoded."""
        self._decode_early(frame, self.preprocess)

    def __call__(self, windows: Sequence[Window]) -> list[Scored]:
        from streamproc.models import predict_proba

        timings: dict[str, float] = {}
        probs = predict_proba(self.model, windows, timings)
        pre_ms, model_ms = timings["preprocess_ms"], timings["model_ms"]
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Scored(self.labels[best],
                              {lab: round(p, 6) for lab, p in zip(self.labels, row, strict=True)},
                              pre_ms, model_ms))
        return out
