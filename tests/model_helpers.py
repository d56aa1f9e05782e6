"""Small real windows (random JPEG frames, noise audio, transcripts) for model tests."""

from __future__ import annotations

import numpy as np

from streamproc.align.aligner import Window
from streamproc.wire.codec import TranscriptSegment, VideoFrame

LABELS = [f"c{i}" for i in range(5)]


def windows(n: int, seed: int = 0) -> list[Window]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = [VideoFrame.from_image("s", j, j, rng.integers(0, 255, (32, 32, 3), np.uint8))
                  for j in range(int(rng.integers(1, 12)))]
        audio = rng.normal(0, 0.2, 16000).astype(np.float32)
        segs = [TranscriptSegment("s", i, str(rng.choice(["one", "uh two", "sevn"])), 0, 9)]
        out.append(Window("s", i, i + 10**9, frames, len(frames), audio,
                          np.ones(16000, bool), 16000, segs,
                          {"video": True, "audio": True, "text": True}))
    return out
