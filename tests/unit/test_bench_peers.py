"""The peer benchmark's window check: its pure parts agree with streamproc's windows.

benchmarks/bench_peers.py says the peers did the same job when their windows equal those
computed from the records; these tests pin that the rule it uses (hop copies, distinct
records) is streamproc's, and that it reads streamproc's own predictions right. No peer
and no broker is needed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from streamproc.align.aligner import AlignConfig, Aligner
from streamproc.config import Settings
from streamproc.inference.predictions import summary_prediction
from streamproc.wire import codec as wire

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_align import w1_records
from bench_peers import (
    check_windows,
    counts_of,
    end_marks,
    expected_windows,
    hop_copies,
    items_of,
    window_json,
)

MS = 1_000_000


@given(start=st.integers(0, 10**10), length=st.integers(0, 5 * 10**9),
       hop_ms=st.sampled_from([100, 250, 500, 1000]), per_window=st.integers(1, 4))
def test_hop_copies_land_in_exactly_the_windows_a_span_overlaps(
        start: int, length: int, hop_ms: int, per_window: int) -> None:
    cfg = AlignConfig(window_ns=hop_ms * per_window * MS, hop_ns=hop_ms * MS,
                      lateness_ns={}, idle_ns={})
    placed = {k for at in hop_copies(start, start + length, cfg.hop_ns)
              for k in cfg.window_starts(at, at)}
    assert placed == set(cfg.window_starts(start, start + length))


def _w1() -> tuple[list[tuple[int, wire.MediaRecord]], AlignConfig]:
    arrivals = w1_records(3, streams=3)
    # sources as the worker has them: window provenance counts audio chunks
    recs = [(t, dataclasses.replace(r, source=wire.Source(r.modality, 0, i)))
            for i, (t, r) in enumerate(arrivals)]
    return recs, AlignConfig.from_settings(Settings(provisional_on="none"))


def test_streamproc_predictions_read_as_the_expected_windows() -> None:
    recs, cfg = _w1()
    aligner = Aligner(cfg)
    windows = []
    for now, r in recs:
        aligner.add(r, now)
        windows += aligner.poll(now)
    windows += aligner.flush()
    published = [json.loads(wire.encode_prediction(summary_prediction(w)).value)
                 for w in windows]
    got = [((p["stream_id"], p["window_start_ns"]), counts_of(p)) for p in published]
    check = check_windows(expected_windows([r for _t, r in recs], cfg), got)
    assert check.same, check.describe()


def test_a_peer_placing_records_by_one_timestamp_gets_the_expected_windows() -> None:
    recs, cfg = _w1()
    records = [r for _t, r in recs] + end_marks(r for _t, r in recs)
    held: dict[tuple[str, int], list] = {}
    for r in records:
        k = wire.encode(r)
        sid, items = items_of(k.key, k.headers, k.value or b"", cfg.hop_ns)
        for it in items:
            for start in cfg.window_starts(it[4], it[4]):
                held.setdefault((sid, start), []).append(it)
    out = [window_json(sid, start, cfg.window_ns, items) for (sid, start), items in held.items()]
    got = [((p["stream_id"], p["window_start_ns"]), counts_of(p)) for p in out]
    check = check_windows(expected_windows(records, cfg), got)
    assert check.same, check.describe()


def test_check_windows_names_each_difference() -> None:
    expected = {("a", 0): (15, 10, 1), ("a", 500): (15, 10, 0), ("b", 0): (1, 1, 1)}
    got = [(("a", 0), (15, 10, 1)), (("a", 0), (15, 10, 1)), (("a", 500), (14, 10, 0)),
           (("c", 0), (1, 0, 0))]
    check = check_windows(expected, got)
    assert not check.same
    assert (check.windows, check.duplicates) == (3, 1)
    assert check.missing == [("b", 0)] and check.extra == [("c", 0)]
    assert check.differ == {"video": 1} and check.short == {"video": 1}
    assert "1 missing" in check.describe() and "1 published twice" in check.describe()
