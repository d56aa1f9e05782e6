"""Word error rate: (substitutions + deletions + insertions) / reference words."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped."""
    return _WORD.findall(text.lower())


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class Wer:
    errors: int
    ref_words: int

    @property
    def rate(self) -> float:
        return self.errors / self.ref_words if self.ref_words else 0.0

    def __add__(self, other: Wer) -> Wer:
        return Wer(self.errors + other.errors, self.ref_words + other.ref_words)

    def __str__(self) -> str:
        return f"{self.rate:.1%} ({self.errors} errors / {self.ref_words} words)"


def wer(reference: str, hypothesis: str) -> Wer:
    ref = words(reference)
    return Wer(edit_distance(ref, words(hypothesis)), len(ref))


def total(pairs: Iterable[tuple[str, str]]) -> Wer:
    out = Wer(0, 0)
    for ref, hyp in pairs:
        out = out + wer(ref, hyp)
    return out
