"""The pipeline benchmark moves its prepared records to the schedule's start as it
publishes them: the windows of the moved records must be the prepared windows, moved.
Its judgement of a live run and its consumer of the predictions are checked here too."""

from __future__ import annotations

import dataclasses
import json
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamproc.config import Settings
from streamproc.testing import prediction
from streamproc.wire.codec import Prediction, TranscriptSegment, Word

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_pipeline
from bench_align import w1_records
from bench_pipeline import _collect_to_file, kept_up, later, windows_of

S = 1_000_000_000
MS = 1_000_000


def test_moved_records_give_the_prepared_windows_moved() -> None:
    settings = Settings()
    base = 1_700_000_000 * S
    recs = [r for _, r in w1_records(6, 2, t0=base, pauses=True)]
    recs.append(TranscriptSegment("cam-0", 99, "two words", base + 2 * S, base + 3 * S,
                                  words=(Word("two", base + 2 * S, base + 2500 * MS),
                                         Word("words", base + 2500 * MS, base + 3 * S))))
    shift = 12_345 * settings.hop_ms * MS
    prepared = windows_of(settings, recs)
    moved = windows_of(settings, [later(r, shift) for r in recs])
    assert sorted(moved) == sorted((sid, start + shift) for sid, start in prepared)
    for (sid, start), w in prepared.items():
        m = moved[(sid, start + shift)]
        assert m.end_ns == w.end_ns + shift
        assert m.frames == [later(f, shift) for f in w.frames] and m.text == w.text
        assert np.array_equal(m.audio, w.audio) and np.array_equal(m.audio_mask, w.audio_mask)
    assert any("two" in w.text for w in moved.values())


def test_kept_up_needs_every_window_on_time_and_nothing_growing() -> None:
    live = {"records": 8_160, "seconds": 10}  # 816 records a second
    flat = {"missing": 0, "rate": 64.0, "due": 64.0, "lag_first": 11_447.0,
            "lag_second": 11_572.0, "total_first": 2_910.0, "total_second": 2_914.0}
    assert kept_up(live, flat)
    assert not kept_up(live, flat | {"missing": 1})
    assert not kept_up(live, flat | {"rate": 62.0})
    assert not kept_up(live, flat | {"lag_second": 11_447.0 + 817})
    assert not kept_up(live, flat | {"total_second": 3_011.0})
    assert not kept_up(live, flat | {"lag_first": float("nan")})


def test_the_windows_of_a_long_recording_are_every_window_it_overlaps() -> None:
    # 50 s of one stream is more than its aligner may hold at once (600 frames)
    settings = Settings()
    hop = settings.hop_ms * MS
    base = 1_700_000_000 * S
    recs = [r for _, r in w1_records(50, 1, t0=base)]
    windows = windows_of(settings, recs)
    last = max(r.end_ns for r in recs)
    assert sorted(start for _, start in windows) == list(range(base - hop, last, hop))
    assert all(w.quality["closed_by"] != "flush" for w in windows.values()
               if w.end_ns < last - 5 * S)


class _Tracked(Prediction):
    """A prediction a weak reference can follow (Prediction has slots)."""

    __slots__ = ("__weakref__",)


def test_the_consumer_writes_each_prediction_as_read_and_stops_at_the_distinct_finals(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Prediction] = []
    for hop in range(4):
        p = prediction("cam-0", hop)
        sent += [dataclasses.replace(p, final=False), dataclasses.replace(p, rev=1)]
    # a later revision of the first window's final comes before the third window's final
    sent.insert(5, dataclasses.replace(prediction("cam-0", 0), rev=2))
    refs: list[weakref.ref] = []

    def consume(settings: Settings, **kw: object) -> Iterator[Prediction]:
        for p in sent:
            # the one in hand may live; one written before it must be gone: kept, every
            # prediction of a long run made the interpreter's full collections pause it
            assert len(refs) < 2 or refs[-2]() is None
            t = _Tracked(*(getattr(p, f.name) for f in dataclasses.fields(Prediction)))
            refs.append(weakref.ref(t))
            yield t
            del t

    monkeypatch.setattr(bench_pipeline, "consume", consume)
    path = tmp_path / "predictions.txt"
    _collect_to_file({}, 3, 5.0, str(path))
    lines = [line.split(" ", 1) for line in path.read_text(encoding="utf-8").splitlines()]
    # three distinct windows' finals end it (the repeat of the first counts once)
    assert [json.loads(obj) for _, obj in lines] == [p.to_json() for p in sent[:7]]
    times = [int(t) for t, _ in lines]
    assert times == sorted(times) and times[0] > 1_700_000_000 * S
