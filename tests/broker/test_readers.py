"""Reading predictions: duplicates from worker restarts are collapsed by prediction key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kafka import KafkaProducer

from streamproc.config import Settings
from streamproc.readers import ConsumeStats, Deduper, PredictionTable, consume, format_row
from streamproc.wire import codec as wire


def _pred(stream: str, start_s: int, label: str = "7") -> wire.Prediction:
    base = 1_763_000_000_000_000_000
    return wire.Prediction(
        stream, base + start_s * 500_000_000, base + start_s * 500_000_000 + 1_000_000_000,
        label, {label: 0.9, "other": 0.1},
        {"video": {"frames": 15}, "audio": {"seconds": 1.0}, "text": {"segments": 1},
         "missing": []},
        {"name": "lmf", "version": "1"}, base, {"total": 42.0})


def test_deduper_collapses_same_key_and_flags_conflicts() -> None:
    d = Deduper()
    assert d.check(_pred("a", 0)) == "new"
    assert d.check(_pred("a", 1)) == "new"
    assert d.check(_pred("b", 0)) == "new"  # another stream, same start: distinct key
    assert d.check(_pred("a", 0)) == "duplicate"
    assert d.check(_pred("a", 1, label="3")) == "conflicting"


def test_deduper_memory_is_bounded_by_its_horizon() -> None:
    d = Deduper(horizon_ns=10 * 500_000_000)
    for i in range(1000):
        assert d.check(_pred("a", i)) == "new"
    assert len(d._seen["a"]) < 100
    assert d.check(_pred("a", 3)) == "duplicate"  # far behind the horizon: a replay


def test_format_row_is_readable() -> None:
    row = format_row(_pred("cam-1", 0))
    assert "cam-1" in row and " 7 " in row and "0.90" in row and "15f" in row
    assert "42ms" in row


def test_table_never_cuts_stream_ids_and_widens_its_column_for_them() -> None:
    long_id = "warehouse-door-camera-17"
    assert long_id in format_row(_pred(long_id, 0))
    table = PredictionTable()
    first = table.lines(_pred("cam-1", 0))
    assert len(first) == 2 and first[0].split()[2] == "stream"  # header, then the row
    assert len(table.lines(_pred("cam-1", 1))) == 1
    wider = table.lines(_pred(long_id, 0))  # a longer id: a wider header, then its row
    assert len(wider) == 2 and long_id in wider[1]
    header, row = wider
    assert header.index("label") == row.index(" 7 ") + 1  # columns still line up
    assert table.lines(_pred("cam-1", 2))[0].index(" 7 ") + 1 == header.index("label")
    # with --stream the width is known from the start: one header
    only = PredictionTable(long_id)
    assert only.header().index("label") == 28 + len(long_id) + 1
    assert len(only.lines(_pred(long_id, 0))) == 1


@pytest.mark.broker
def test_consume_collapses_duplicates_from_kafka(topics: Settings) -> None:
    preds = [_pred("cam-1", i) for i in range(5)] + [_pred("cam-2", i) for i in range(3)]
    replayed = [_pred("cam-1", 3), _pred("cam-1", 4)]  # a restarted worker re-published
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap_servers, acks="all")
    for p in preds + replayed:
        kr = wire.encode_prediction(p)
        producer.send(topics.topic("predictions"), key=kr.key, value=kr.value,
                      headers=list(kr.headers), timestamp_ms=kr.timestamp_ms)
    producer.send(topics.topic("predictions"), key=b"cam-1", value=b"\xffnot json")
    producer.flush(30)
    producer.close()

    stats = ConsumeStats()
    got = list(consume(topics, stats=stats))
    assert sorted(p.key for p in got) == sorted(p.key for p in preds)
    assert stats.duplicates == 2 and stats.conflicting == 0 and stats.undecodable == 1
    assert [p.key for p in consume(topics, stream="cam-2")] == [p.key for p in preds[5:]]

    cli = subprocess.run(
        [sys.executable, "-m", "streamproc.cli", "consume", "--json", "--stream", "cam-1",
         "--bootstrap-servers", topics.bootstrap_servers, "--topic-prefix",
         topics.topic_prefix], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [(x["stream_id"], x["window_start_ns"]) for x in lines] == [p.key for p in preds[:5]]
    assert "2 duplicates collapsed" in cli.stderr


@pytest.mark.broker
def test_consume_without_topics_says_so(settings: Settings) -> None:
    from streamproc.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        list(consume(settings))
