"""Splits by time blocks: no window of val or test shares time (or a block) with a train
window of its stream; deterministic; every class in every split when it can be."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamproc.errors import UserError
from streamproc.ml.splits import BlockSplit, block_splits

S = 1_000_000_000


def recording(streams: dict[str, list[str]], seconds_per_label: float = 6.0,
              window_s: float = 1.0, hop_s: float = 0.5, t0: int = 1_800_000_000 * S
              ) -> list[tuple[str, int, int, str]]:
    """Hopping windows of each stream, labelled by which span of ``seconds_per_label`` they
    start in (windows across two spans skipped, as record does)."""
    out = []
    for k, (sid, labels) in enumerate(streams.items()):
        base = t0 + k * 7_777 * S // 1000
        span = round(seconds_per_label * S)
        start = base
        while start + window_s * S <= base + span * len(labels):
            i, j = (start - base) // span, (start - base + round(window_s * S) - 1) // span
            if i == j:
                out.append((sid, start, start + round(window_s * S), labels[i]))
            start += round(hop_s * S)
    return out


def assert_no_leak(windows: list[tuple[str, int, int, str]], splits: list[str | None],
                   block_s: float) -> None:
    block = round(block_s * S)
    train = [w for w, s in zip(windows, splits, strict=True) if s == "train"]
    blocks_of = {}
    for w, s in zip(windows, splits, strict=True):
        if s is None:
            continue
        for b in range(w[1] // block, (w[2] - 1) // block + 1):
            assert blocks_of.setdefault((w[0], b), s) == s, f"block {w[0]}:{b} in two splits"
    for w, s in zip(windows, splits, strict=True):
        if s in ("val", "test"):
            for t in train:
                assert not (t[0] == w[0] and t[1] < w[2] and w[1] < t[2]), (w, t)


def test_blocks_keep_val_and_test_apart_from_train() -> None:
    labels = ["speaking", "silent", "radio", "empty"]
    windows = recording({"cam-a": labels * 3, "cam-b": labels[::-1] * 3})
    cfg = BlockSplit(block_s=6.0, val=0.2, test=0.2)
    splits = block_splits(windows, cfg)
    assert_no_leak(windows, splits, cfg.block_s)
    for s in ("train", "val", "test"):  # every class in every split
        assert {w[3] for w, x in zip(windows, splits, strict=True) if x == s} == set(labels), s
    # about the fractions asked for (of the blocks of each class)
    n = len(windows)
    assert 0.1 * n < splits.count("test") < 0.35 * n
    assert 0.1 * n < splits.count("val") < 0.35 * n
    # one window dropped at most per block boundary
    assert splits.count(None) <= 2 * 12


def test_deterministic_in_any_order_and_by_seed() -> None:
    windows = recording({"a": ["x", "y"] * 6, "b": ["y", "x"] * 6})
    cfg = BlockSplit(block_s=5.0)
    first = dict(zip(windows, block_splits(windows, cfg), strict=True))
    shuffled = windows[:]
    random.Random(1).shuffle(shuffled)
    assert dict(zip(shuffled, block_splits(shuffled, cfg), strict=True)) == first
    other = dict(zip(windows, block_splits(windows, BlockSplit(block_s=5.0, seed=3)),
                     strict=True))
    assert other != first


def test_an_appended_recording_lands_on_the_same_grid() -> None:
    """Blocks are cut from absolute event time: windows recorded later (another time of
    the same stream) never share a block with earlier ones."""
    early = recording({"a": ["x", "y"] * 3}, t0=1_800_000_000 * S)
    late = recording({"a": ["y", "x"] * 3}, t0=1_800_000_100 * S)
    cfg = BlockSplit(block_s=4.0, val=0.25, test=0.25)
    both = block_splits(early + late, cfg)
    assert_no_leak(early + late, both, cfg.block_s)


def test_small_groups_and_bad_settings() -> None:
    two = recording({"a": ["x"] * 2}, seconds_per_label=5.0)  # 2 blocks of 5 s
    splits = block_splits(two, BlockSplit(block_s=5.0))
    assert set(splits) - {None} == {"train", "test"}
    one = recording({"a": ["x"]}, seconds_per_label=5.0)
    assert set(block_splits(one, BlockSplit(block_s=5.0))) == {"train"}
    with pytest.raises(UserError, match="shorter than a window"):
        block_splits(two, BlockSplit(block_s=0.5))
    with pytest.raises(UserError, match="fractions"):
        BlockSplit(val=0.5, test=0.5).check()


@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=30),
       st.sampled_from([1.0, 2.5, 4.0, 10.0]), st.floats(0, 0.4), st.floats(0, 0.4),
       st.integers(0, 5), st.sampled_from([(1.0, 0.5), (1.0, 1.0), (2.0, 0.5)]))
def test_no_leak_for_any_recording(labels: list[str], block_s: float, val: float, test: float,
                                   seed: int, shape: tuple[float, float]) -> None:
    window_s, hop_s = shape
    if block_s < window_s:
        block_s = window_s
    windows = recording({"s1": labels, "s2": labels[::-1]}, seconds_per_label=3.0,
                        window_s=window_s, hop_s=hop_s)
    if not windows:
        return
    splits = block_splits(windows, BlockSplit(block_s, val, test, seed))
    assert_no_leak(windows, splits, block_s)
