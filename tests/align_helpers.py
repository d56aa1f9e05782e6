"""A live feed for the pure aligner on a manual clock, shared by test_aligner and
test_oracle."""

from __future__ import annotations

import numpy as np

from streamproc.align.aligner import Aligner, Window
from streamproc.testing import MS, SAMPLE_RATE, chunk, frame


def feed_live(a: Aligner, t0: int, t1: int, audio: bool, seqs: dict[str, list[int]],
              out: list[tuple[int, Window]], step: int = 100) -> None:
    """Feed stream "cam" from ``t0`` to ``t1`` ms as it happens, the clock at the end of each
    step: 20 fps video, ``step`` ms audio chunks (unless ``audio`` is off), a poll per step.
    ``seqs`` carries the sequence numbers from one call to the next; ``out`` collects
    (clock, window)."""
    for t in range(t0, t1, step):
        now = (t + step) * MS  # everything of [t, t+step) is there by t+step
        for j in range(0, step, 50):
            a.add(frame("cam", (t + j) * MS, seqs.setdefault("v", [0])[0]), now)
            seqs["v"][0] += 1
        if audio:
            a.add(chunk("cam", t * MS, seqs.setdefault("a", [0])[0],
                        np.full(step * SAMPLE_RATE // 1000, 800, np.int16)), now)
            seqs["a"][0] += 1
        for w in a.poll(now):
            out.append((now, w))
