"""Encoder outputs of provisional windows, kept for their finals.

A window's final usually differs from its provisional only in the transcript: the same
frames and the same audio, with more text. Its video and audio encoders would compute
again exactly what they computed for the provisional, so the provisional's rows are kept
here (per stream and window start) and the final takes every modality whose input is
unchanged, running only the encoders whose input did change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from streamproc.config import MODALITIES
from streamproc.models.encoders import Encoded

#: Provisional windows whose encodings are kept at most (the oldest go first): a final
#: comes seconds after its provisional (a few dozen windows per stream), and a final whose
#: provisional was evicted just runs every encoder.
MEMO_WINDOWS = 1024


def signature(window: Any, modality: str) -> Hashable:
    """What a window gives one modality's encoder, as a value equal exactly when the
    encoder's input is (the same records, cut the same way)."""
    present = bool(window.present.get(modality))
    if modality == "video":
        return present, tuple((f.seq, f.ts_ns) for f in window.frames)
    if modality == "audio":
        # the bytes' own hash (SipHash, keyed per process: the memo lives in one), not
        # hashlib's, which lets go of the interpreter lock for inputs this size: the model
        # thread then waited for the busy event loop to hand it back, twice a window
        # (docs/benchmarks.md, *Pipeline: streams per worker*)
        return (present, window.sample_rate, hash(window.audio.tobytes()),
                hash(window.audio_mask.tobytes()))
    return present, tuple((s.seq, s.start_ns, s.end_ns, s.final, s.text)
                          for s in window.segments)


class Kept(NamedTuple):
    """One window's row of one encoder's output, and whether the modality was present
    in it (after decoding: what the fusion is told)."""

    encoded: Encoded
    present: bool


class EncodingMemo:
    """Per-row encoder outputs of provisional windows of one model, for their finals."""

    def __init__(self, capacity: int = MEMO_WINDOWS) -> None:
        self.capacity = capacity
        self._model: Any = None
        # (stream, window start) -> modality -> (signature, that window's row of it)
        self._rows: OrderedDict[tuple[str, int], dict[str, tuple[Hashable, Kept]]] = \
            OrderedDict()
        #: per window of the last batch: the modalities whose encoding it reused
        self.reused: list[tuple[str, ...]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def reusable(self, model: Any, windows: Sequence[Any]) -> dict[str, dict[int, Kept]]:
        """For each modality, the rows of ``windows`` (final ones) whose input is what the
        kept provisional of the same window had: row index -> what it had."""
        if model is not self._model:  # another model: nothing kept is its own
            self._rows.clear()
            self._model = model
        out: dict[str, dict[int, Kept]] = {}
        self.reused = []
        for i, w in enumerate(windows):
            kept = self._rows.pop((w.stream_id, w.start_ns), None) if w.final else None
            same = tuple(m for m, (sig, _) in (kept or {}).items() if sig == signature(w, m))
            for m in same:
                out.setdefault(m, {})[i] = kept[m][1]  # type: ignore[index]
            self.reused.append(same)
        return out

    def keep(self, windows: Sequence[Any], encoded: Mapping[str, Encoded],
             present: torch.Tensor) -> None:
        """Keep the rows of the provisional windows among ``windows`` (``present``: the
        batch's bool [B, modalities])."""
        rows = self._rows
        flags = present.tolist()  # one call, not one per row and modality
        col = {m: MODALITIES.index(m) for m in encoded}
        for i, w in enumerate(windows):
            if w.final:
                continue
            # each row its own copy: a view would keep the whole batch's tensor alive
            rows[(w.stream_id, w.start_ns)] = {
                m: (signature(w, m), Kept(Encoded(*(part[i].clone() for part in enc)),
                                          bool(flags[i][col[m]])))
                for m, enc in encoded.items()}
            rows.move_to_end((w.stream_id, w.start_ns))
        while len(rows) > self.capacity:
            rows.popitem(last=False)
