"""Voice activity per 30 ms frame of 16 kHz mono s16le audio.

Two detectors: webrtc-style (pocketsphinx's ``Vad``: spectral features and a small
Gaussian model, the default) and a plain energy gate (a fixed loudness threshold, the
baseline docs/benchmarks.md measures it against).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

import numpy as np

FRAME_SAMPLES = 480  # 30 ms at 16 kHz: a frame length webrtc's detector takes
FRAME_BYTES = FRAME_SAMPLES * 2


class VadKind(StrEnum):
    WEBRTC = "webrtc"
    ENERGY = "energy"


class Vad(Protocol):
    def is_speech(self, frame: bytes) -> bool:
        """One frame of FRAME_BYTES bytes."""

    def reset(self) -> None:
        """Back to the state it was made in (a stream's checkpoint: see stream.py)."""


class WebrtcVad:
    """pocketsphinx's webrtc-style detector; ``mode`` 0 (loose) to 3 (strict)."""

    def __init__(self, mode: int = 2) -> None:
        self._mode = mode
        self.reset()

    def reset(self) -> None:
        # the detector adapts to what it hears: a new one, not a rewound one
        from pocketsphinx import Vad as PsVad

        self._vad = PsVad(self._mode, 16_000, FRAME_SAMPLES / 16_000)
        if self._vad.frame_bytes != FRAME_BYTES:
            raise RuntimeError(f"pocketsphinx Vad wants {self._vad.frame_bytes}-byte frames")

    def is_speech(self, frame: bytes) -> bool:
        return bool(self._vad.is_speech(frame))


class EnergyVad:
    """Speech when the frame's RMS is above ``threshold_dbfs`` (dB below full scale)."""

    def __init__(self, threshold_dbfs: float = -40.0) -> None:
        self._min_power = (32768.0 * 10 ** (threshold_dbfs / 20)) ** 2

    def is_speech(self, frame: bytes) -> bool:
        x = np.frombuffer(frame, "<i2").astype(np.float32)
        return float(np.mean(x * x)) > self._min_power

    def reset(self) -> None:
        pass  # no state


def make_vad(kind: VadKind | str, mode: int = 2) -> Vad:
    if VadKind(kind) is VadKind.ENERGY:
        return EnergyVad()
    return WebrtcVad(mode)
