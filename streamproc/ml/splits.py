"""Train / validation / test splits by time blocks, so neighbouring windows do not leak.

Windows of one stream overlap (a 1 s window every 0.5 s) and windows a few seconds apart
look almost alike; a random split puts near copies of test windows into training and
reports an accuracy the model will not have on new footage. Instead each stream's time is
cut into blocks of ``block_s`` seconds of event time (``floor(start / block)``; the same
grid for every recording of a stream, so an appended recording's blocks never mix with
earlier ones), and whole blocks go to a split:

- blocks are grouped by their most frequent label, and within each group shuffled with
  ``seed`` and dealt out: ``round(n * test)`` to test, ``round(n * val)`` to val, the rest
  to train (with at least one block of a group in each split whose fraction is above 0
  once the group has 3 blocks), so every class appears in every split when it can;
- a window that reaches into a block of another split is dropped (it would share
  frames with that split's windows): with W = 1 s, H = 0.5 s, one window per boundary.

Deterministic: the same windows and settings give the same splits, whatever their order.
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamproc.errors import UserError
from streamproc.wire.codec import NS_PER_S

#: How a dataset is split for training: ``stored`` (the split each window was written
#: with), ``blocks`` (time blocks, below) or ``auto`` (stored when the dataset holds more
#: than one split, as AV-Digits does; blocks for a recording, whose windows all say train).
SPLIT_MODES = ("auto", "stored", "blocks")


@dataclass(frozen=True)
class BlockSplit:
    block_s: float = 10.0
    val: float = 0.15
    test: float = 0.15
    seed: int = 0

    def check(self, window_ns: int | None = None) -> None:
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise UserError(f"split fractions must be in [0, 1) and leave some for train: "
                            f"val {self.val}, test {self.test}")
        if self.block_s <= 0:
            raise UserError(f"--block-s must be positive, got {self.block_s}")
        if window_ns is not None and self.block_s * NS_PER_S < window_ns:
            raise UserError(f"--block-s {self.block_s:g} is shorter than a window "
                            f"({window_ns / NS_PER_S:g} s): a window would span three blocks")


def _counts(n: int, cfg: BlockSplit) -> tuple[int, int]:
    """(test, val) blocks of a group of ``n``."""
    if n >= 3:
        n_test = max(1, round(n * cfg.test)) if cfg.test > 0 else 0
        n_val = max(1, round(n * cfg.val)) if cfg.val > 0 else 0
        while n_test + n_val > n - 1:  # keep a block for train
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        return n_test, n_val
    if n == 2:  # one for train; the other where it is most wanted
        return (1, 0) if cfg.test > 0 else (0, 1 if cfg.val > 0 else 0)
    return 0, 0


def block_splits(windows: Sequence[tuple[str, int, int, str]], cfg: BlockSplit
                 ) -> list[str | None]:
    """The split of each ``(stream_id, start_ns, end_ns, label)``; None for a window
    dropped at a boundary between blocks of different splits."""
    block_ns = round(cfg.block_s * NS_PER_S)
    longest = max((e - s for _, s, e, _ in windows), default=0)
    cfg.check(longest or None)
    labels_in: dict[tuple[str, int], Counter[str]] = defaultdict(Counter)
    for sid, start, _, label in windows:
        labels_in[(sid, start // block_ns)][label] += 1
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for block, counts in labels_in.items():
        top = max(counts.values())
        groups[min(lab for lab, c in counts.items() if c == top)].append(block)
    split_of: dict[tuple[str, int], str] = {}
    for label in sorted(groups):
        blocks = sorted(groups[label])
        order = np.random.default_rng([cfg.seed, zlib.crc32(label.encode())]).permutation(
            len(blocks))
        n_test, n_val = _counts(len(blocks), cfg)
        for rank, i in enumerate(order.tolist()):
            split_of[blocks[i]] = ("test" if rank < n_test else
                                   "val" if rank < n_test + n_val else "train")
    out: list[str | None] = []
    for sid, start, end, _ in windows:
        own = split_of[(sid, start // block_ns)]
        touched = {split_of.get((sid, b), own)
                   for b in range(start // block_ns, (end - 1) // block_ns + 1)}
        out.append(own if touched == {own} else None)
    return out
