"""The worker refuses faust-streaming and aiokafka versions its patches were not tested
against, with one clear line; the ack handle of a batched record; ranges with nothing to
process made committable as faust's own commit logic reads them."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import conn as aiokafka_conn
from aiokafka.protocol.fetch import FetchResponse_v4
from aiokafka.protocol.types import Int32
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from faust.transport.consumer import Consumer
from faust.types import TP
from intervaltree import IntervalTree

from streamproc.errors import UserError
from streamproc.worker.patches import (
    TESTED_VERSIONS,
    RecordAck,
    _LenientMemoryRecords,
    check_versions,
    mark_gap,
    patch_connections,
    patch_fetcher,
)


def test_the_installed_versions_are_the_tested_ones() -> None:
    check_versions()


@pytest.mark.parametrize("name", sorted(TESTED_VERSIONS))
def test_another_version_is_refused_with_one_line(name: str) -> None:
    installed = dict(TESTED_VERSIONS, **{name: "99.0.0"})
    with pytest.raises(UserError) as err:
        check_versions(installed)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{name} 99.0.0 is installed" in msg and f"{name}=={TESTED_VERSIONS[name]}" in msg


def test_the_pins_in_pyproject_are_the_tested_versions() -> None:
    pyproject = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    for name, version in TESTED_VERSIONS.items():
        assert f'"{name}=={version}"' in pyproject



def test_a_batched_record_acks_through_the_consumers_ack_once_released() -> None:
    acked: list[tuple[tuple[str, int], int]] = []
    consumer = SimpleNamespace(ack=lambda m: acked.append((m.tp, m.offset)))
    handle = RecordAck(consumer, ("t.video", 2), 17)
    assert (handle.topic, handle.partition, handle.offset, handle.acked) == ("t.video", 2, 17,
                                                                             False)
    handle.ack()
    assert acked == [(("t.video", 2), 17)]


V = TP("t.video", 0)


def _faust_offsets(committed: int | None) -> Any:
    """The part of a faust consumer its commit logic reads, resumed at ``committed``."""
    return SimpleNamespace(_committed_offset=defaultdict(lambda: None, {V: committed}),
                           _acked=defaultdict(list), _acked_index=defaultdict(set),
                           _gap=defaultdict(IntervalTree))


def _ack(consumer: Any, offsets: range) -> None:
    for o in offsets:  # what faust's ack does for an offset at or past the committed one
        consumer._acked[V].append(o)
        consumer._acked_index[V].add(o)


def _commits(consumer: Any) -> list[int]:
    """The offsets faust's own logic commits, one commit after another, until it stops."""
    out = []
    while (offset := Consumer._new_offset(consumer, V)) is not None and offset not in out:
        out.append(offset)
        consumer._committed_offset[V] = offset
    return out


def test_a_range_stepped_over_at_a_resume_commits_to_the_end_at_once() -> None:
    """Resumed at 10 with 10..17 processed before the revocation (a range) and 18..39
    processed since: one commit reaches 40."""
    c = _faust_offsets(10)
    mark_gap(c, V, 10, 18)
    _ack(c, range(18, 40))
    assert _commits(c) == [40]


def test_a_range_leaves_out_offsets_acked_already() -> None:
    """11..17 came again and were acked before the range was marked: had the range
    repeated them, faust would commit one offset per commit (12, 13, 14, ...)."""
    c = _faust_offsets(10)
    _ack(c, range(11, 18))
    mark_gap(c, V, 10, 18)
    _ack(c, range(18, 40))
    assert _commits(c) == [40]
    c = _faust_offsets(10)
    _ack(c, range(11, 18))
    _ack(c, range(18, 40))
    c._gap[V].addi(11, 18)  # faust's own _add_gap(10, 17) does this
    assert _commits(c)[:3] == [12, 13, 14]  # why repeats must be left out


def test_a_range_alone_commits_to_its_end() -> None:
    """Nothing came after it (a resume with no new record, a transaction marker at the log
    end): faust commits nothing for a gap alone, so its last offset is an ack."""
    c = _faust_offsets(10)
    mark_gap(c, V, 10, 18)
    assert _commits(c) == [18]
    c = _faust_offsets(10)
    mark_gap(c, V, 10, 11)  # a marker right at the committed offset
    assert _commits(c) == [11]
    c = _faust_offsets(10)
    mark_gap(c, V, 4, 10)  # committed already: nothing to do
    assert _commits(c) == [] and not c._gap[V]


def test_a_range_with_acked_offsets_inside_is_split_around_them() -> None:
    c = _faust_offsets(None)
    _ack(c, range(3, 5))
    mark_gap(c, V, 0, 8)
    assert sorted((i.begin, i.end) for i in c._gap[V]) == [(0, 3), (5, 7)]
    assert 7 in c._acked_index[V]
    _ack(c, range(8, 9))
    assert _commits(c) == [9]



def _batch(values: list[bytes]) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1,
        base_sequence=-1, batch_size=1 << 24)
    for i, value in enumerate(values):
        builder.append(offset=i, timestamp=None, key=b"cam-a", value=value,
                       headers=[("sp-v", b"1")])
    return bytes(builder.build())


def test_batch_checksums_are_judged_as_aiokafkas_reader_judges_them() -> None:
    rng = random.Random(7)
    data = _batch([rng.randbytes(3000) for _ in range(3)]) + _batch([rng.randbytes(40)])
    refused = 0
    for trial in range(600):
        damaged, at = bytearray(data), -1
        if trial:  # trial 0: intact
            at = rng.randrange(len(damaged))
            damaged[at] ^= 1 << rng.randrange(8)
        theirs, ours = MemoryRecords(bytes(damaged)), _LenientMemoryRecords(bytes(damaged))
        while True:
            try:
                a, b = theirs.next_batch(), ours.next_batch()
            except Exception:  # a length field hit: neither reads on
                break
            if a is None:
                assert b is None
                break
            assert b.validate_crc() == a.validate_crc(), (trial, at)
            refused += not a.validate_crc()
        if trial == 0:
            assert refused == 0
    assert refused > 400  # most single-bit flips land in checksummed bytes


def _fetch_response(message_set: bytes) -> bytes:
    response = FetchResponse_v4(throttle_time_ms=0, topics=[
        ("cams.video", [(3, 0, 10, 10, [], message_set)])])
    return Int32.encode(42) + response.encode()  # the response header: a correlation id


def test_a_fetched_record_set_is_read_in_place_with_the_records_aiokafka_reads() -> None:
    patch_fetcher()
    patch_connections()
    batches = _batch([b"a" * 3000, b"b" * 70_000]) + _batch([b"c" * 10])
    raw = _fetch_response(batches + batches[:40])  # a fetch may end inside a batch
    reader = aiokafka_conn.io.BytesIO(raw)  # what each connection now parses from
    assert Int32.decode(reader) == 42
    response = FetchResponse_v4.decode(reader)
    message_set = response.topics[0][1][0][-1]
    assert type(message_set) is memoryview and message_set.obj is raw  # a view, no copy
    assert bytes(message_set) == batches + batches[:40]
    ours, theirs = _LenientMemoryRecords(message_set), MemoryRecords(bytes(message_set))
    read = []
    while theirs.has_next():
        assert ours.has_next()
        a, b = theirs.next_batch(), ours.next_batch()
        assert b.validate_crc() and (b.base_offset, b.next_offset) == (a.base_offset,
                                                                       a.next_offset)
        records = [(r.offset, r.key, r.value, r.headers) for r in b]
        assert records == [(r.offset, r.key, r.value, r.headers) for r in a]
        read += records
    assert not ours.has_next() and ours.next_batch() is None
    assert [v for _o, _k, v, _h in read] == [b"a" * 3000, b"b" * 70_000, b"c" * 10]
    assert "b'\\x00" in repr(response)  # aiokafka's debug line of a response still formats


def test_other_responses_parse_from_the_reader_as_from_a_bytes_buffer() -> None:
    patch_connections()
    response = FetchResponse_v4(throttle_time_ms=7, topics=[("t", [(0, 0, 5, 5, [], None)])])
    assert FetchResponse_v4.decode(aiokafka_conn.io.BytesIO(response.encode())).topics == \
        FetchResponse_v4.decode(response.encode()).topics == [("t", [(0, 0, 5, 5, [], None)])]
