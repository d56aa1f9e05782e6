"""Reading predictions without a broker: copies from worker restarts are collapsed by
revision, provisional predictions can be skipped, and the table shows each window's
latest revision readably."""

from __future__ import annotations

from dataclasses import replace

from streamproc.readers import (
    ConsumeStats,
    Deduper,
    PredictionTable,
    Selection,
    format_row,
    revision_tag,
)
from streamproc.testing import prediction
from streamproc.wire.codec import Prediction


def provisional(stream_id: str, hop: int, label: str = "7") -> Prediction:
    return replace(prediction(stream_id, hop, label), rev=0, final=False)


def final(stream_id: str, hop: int, label: str = "7", rev: int = 1,
          reused: bool = False) -> Prediction:
    return replace(prediction(stream_id, hop, label), rev=rev, final=True, reused=reused)


def test_deduper_collapses_same_key_and_flags_conflicts() -> None:
    d = Deduper()
    assert d.check(prediction("a", 0)) == "new"
    assert d.check(prediction("a", 1)) == "new"
    assert d.check(prediction("b", 0)) == "new"  # another stream, same start: distinct key
    assert d.check(prediction("a", 0)) == "duplicate"
    assert d.check(prediction("a", 1, label="3")) == "conflicting"


def test_deduper_keeps_every_revision_of_a_window_once() -> None:
    d = Deduper()
    assert d.check(provisional("a", 0)) == "new"
    assert d.check(final("a", 0, label="3")) == "new"  # another revision, another label
    assert d.check(final("a", 0, label="3", rev=2)) == "new"
    assert d.check(provisional("a", 0)) == "duplicate"  # a replayed copy of rev 0
    assert d.check(final("a", 0)) == "conflicting"  # rev 1 again, with another label
    assert d.check(final("a", 0, label="3", rev=2)) == "duplicate"


def test_deduper_memory_is_bounded_by_its_horizon() -> None:
    d = Deduper(horizon_ns=10 * 500_000_000)
    for i in range(1000):
        assert d.check(prediction("a", i)) == "new"
    assert len(d._seen["a"]) < 100
    assert d.check(prediction("a", 3)) == "duplicate"  # far behind the horizon: a replay
    assert d.check(final("a", 3, rev=5)) == "duplicate"  # any revision of it


def test_selection_yields_every_revision_once_in_arrival_order() -> None:
    sel = Selection()
    arrivals = [provisional("a", 0), provisional("a", 1), final("a", 0), provisional("a", 0),
                final("a", 1, label="3"), final("a", 1, label="3")]
    assert [(p.window_start_ns, p.rev) for p in arrivals if sel.accept(p)] == [
        (arrivals[0].window_start_ns, 0), (arrivals[1].window_start_ns, 0),
        (arrivals[0].window_start_ns, 1), (arrivals[1].window_start_ns, 1)]
    s = sel.stats
    assert (s.yielded, s.provisional, s.duplicates, s.conflicting) == (4, 2, 2, 0)


def test_selection_finals_only_skips_provisional_predictions() -> None:
    stats = ConsumeStats()
    sel = Selection(stream="a", finals_only=True, stats=stats)
    arrivals = [provisional("a", 0), provisional("b", 0), final("a", 0), final("b", 0),
                prediction("a", 1), final("a", 0)]  # prediction(): an old record, final rev 0
    kept = [p for p in arrivals if sel.accept(p)]
    assert [(p.stream_id, p.rev, p.final) for p in kept] == [("a", 1, True), ("a", 0, True)]
    assert (stats.yielded, stats.provisional, stats.skipped_provisional) == (2, 0, 1)
    assert stats.duplicates == 1
    assert stats.summary() == ("2 predictions (0 provisional, 2 final), 1 duplicates "
                               "collapsed (0 with another label), 0 undecodable, "
                               "1 provisional skipped")


def test_revision_tags_are_short() -> None:
    assert [revision_tag(p) for p in (provisional("a", 0), final("a", 0, rev=0),
                                      final("a", 0), final("a", 0, rev=2),
                                      final("a", 0, rev=3))] == ["P", "F", "F", "F2", "F3"]


def test_format_row_is_readable() -> None:
    row = format_row(prediction("cam-1", 0))
    assert "cam-1" in row and " F   7 " in row and "0.90" in row and "15f" in row
    assert row.endswith("42ms")
    assert " P   7 " in format_row(provisional("cam-1", 0))
    assert format_row(prediction("cam-1", 0), note="replaces P, was 3").endswith(
        "42ms  replaces P, was 3")


def test_table_never_cuts_stream_ids_and_widens_its_column_for_them() -> None:
    long_id = "warehouse-door-camera-17"
    assert long_id in format_row(prediction(long_id, 0))
    table = PredictionTable()
    first = table.lines(prediction("cam-1", 0))
    assert len(first) == 2 and first[0].split()[2] == "stream"  # header, then the row
    assert first[0].split()[3] == "rev"
    assert len(table.lines(prediction("cam-1", 1))) == 1
    wider = table.lines(prediction(long_id, 0))  # a longer id: a wider header, then its row
    assert len(wider) == 2 and long_id in wider[1]
    header, row = wider
    assert header.index("label") == row.index(" 7 ") + 1  # columns still line up
    assert header.index("rev") == row.index(" F ") + 1
    assert table.lines(prediction("cam-1", 2))[0].index(" 7 ") + 1 == header.index("label")
    # with --stream the width is known from the start: one header
    only = PredictionTable(long_id)
    assert only.header().index("label") == 28 + len(long_id) + 1 + 4
    assert len(only.lines(prediction(long_id, 0))) == 1


def _rows(table: PredictionTable, *preds: Prediction) -> list[str]:
    table.header()  # printed once before the first prediction, as the CLI does
    return [line for p in preds for line in table.lines(p)]


def test_table_shows_the_final_as_an_update_of_the_provisional() -> None:
    rows = _rows(PredictionTable(), provisional("cam-1", 0), provisional("cam-1", 1),
                 final("cam-1", 0, label="3"), final("cam-1", 1))
    assert len(rows) == 4
    assert " P   7 " in rows[0] and not rows[0].endswith("  ")
    # the label flipped: a full row that says what it replaces and what the label was
    assert " F   3 " in rows[2] and "15f" in rows[2]
    assert rows[2].endswith("42ms  replaces P, was 7")
    # the label held: a short confirmation, not a second full row
    assert " F   7 " in rows[3] and rows[3].endswith("0.90  confirms P")
    assert "15f" not in rows[3]
    assert rows[3].index(" F ") == rows[1].index(" P ")  # same columns as the rows


def test_table_with_revisions_shows_every_revision_as_a_full_row() -> None:
    table = PredictionTable(revisions=True)
    rows = _rows(table, provisional("cam-1", 0), final("cam-1", 0, reused=True),
                 final("cam-1", 0, label="3", rev=2))
    assert len(rows) == 3 and all("15f" in r for r in rows)
    assert rows[1].endswith("replaces P, same label, scores reused")
    assert " F2  3 " in rows[2] and rows[2].endswith("replaces F, was 7")


def test_table_compares_with_the_latest_revision_shown() -> None:
    rows = _rows(PredictionTable(), provisional("a", 0, "7"), final("a", 0, "3"),
                 final("a", 0, "3", rev=2), final("a", 0, "7", rev=3))
    assert rows[1].endswith("replaces P, was 7")
    assert rows[2].endswith("confirms F")
    assert rows[3].endswith("replaces F2, was 3")


def test_table_leaves_out_copies_and_revisions_older_than_the_one_shown() -> None:
    table = PredictionTable()
    rows = _rows(table, final("a", 0), provisional("a", 0), final("a", 0))
    assert len(rows) == 1  # a late provisional, then a copy: nothing new to show
    shown = PredictionTable(revisions=True)
    rows = _rows(shown, final("a", 0), provisional("a", 0), final("a", 0))
    assert len(rows) == 2 and rows[1].endswith("older than F shown before")


def test_a_final_without_a_provisional_is_a_plain_row() -> None:
    rows = _rows(PredictionTable(), final("a", 0, rev=0), final("b", 0, rev=0))
    assert len(rows) == 2 and all(r.endswith("42ms") for r in rows)


def test_table_memory_is_bounded_by_its_horizon() -> None:
    table = PredictionTable(horizon_ns=10 * 500_000_000)
    for i in range(1000):
        table.lines(provisional("a", i))
    assert len(table._shown["a"]) < 100
    assert not table.lines(final("a", 999)).pop().endswith("42ms")  # still remembered
    assert table.lines(final("a", 3)).pop().endswith("42ms")  # forgotten: a plain row
