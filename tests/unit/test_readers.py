"""Reading predictions without a broker: duplicates from worker restarts are collapsed by
prediction key, and rows and the table stay readable."""

from __future__ import annotations

from streamproc.readers import Deduper, PredictionTable, format_row
from streamproc.testing import prediction


def test_deduper_collapses_same_key_and_flags_conflicts() -> None:
    d = Deduper()
    assert d.check(prediction("a", 0)) == "new"
    assert d.check(prediction("a", 1)) == "new"
    assert d.check(prediction("b", 0)) == "new"  # another stream, same start: distinct key
    assert d.check(prediction("a", 0)) == "duplicate"
    assert d.check(prediction("a", 1, label="3")) == "conflicting"


def test_deduper_memory_is_bounded_by_its_horizon() -> None:
    d = Deduper(horizon_ns=10 * 500_000_000)
    for i in range(1000):
        assert d.check(prediction("a", i)) == "new"
    assert len(d._seen["a"]) < 100
    assert d.check(prediction("a", 3)) == "duplicate"  # far behind the horizon: a replay


def test_format_row_is_readable() -> None:
    row = format_row(prediction("cam-1", 0))
    assert "cam-1" in row and " 7 " in row and "0.90" in row and "15f" in row
    assert "42ms" in row


def test_table_never_cuts_stream_ids_and_widens_its_column_for_them() -> None:
    long_id = "warehouse-door-camera-17"
    assert long_id in format_row(prediction(long_id, 0))
    table = PredictionTable()
    first = table.lines(prediction("cam-1", 0))
    assert len(first) == 2 and first[0].split()[2] == "stream"  # header, then the row
    assert len(table.lines(prediction("cam-1", 1))) == 1
    wider = table.lines(prediction(long_id, 0))  # a longer id: a wider header, then its row
    assert len(wider) == 2 and long_id in wider[1]
    header, row = wider
    assert header.index("label") == row.index(" 7 ") + 1  # columns still line up
    assert table.lines(prediction("cam-1", 2))[0].index(" 7 ") + 1 == header.index("label")
    # with --stream the width is known from the start: one header
    only = PredictionTable(long_id)
    assert only.header().index("label") == 28 + len(long_id) + 1
    assert len(only.lines(prediction(long_id, 0))) == 1
