"""The faust worker against a real broker: every test runs real
``streamproc worker`` subprocesses, produces real JPEG frames, PCM chunks and transcript
segments with kafka-python + wire.encode, paced on the wall clock with event times near
"now" (so watermarks, idle deadlines and the timer all run for real), and reads the
predictions and dead-letter topics back with a read_committed consumer.

Expected windows come from the pure Aligner fed the same records (with the offsets the
broker gave them) sorted by event time and flushed: an independent, order-free oracle.
"""

from __future__ import annotations

import itertools
import platform
import re
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from worker_helpers import (
    H_MS,
    IDLE_MS,
    LATENESS_MS,
    W_MS,
    Planned,
    Pred,
    WorkerProc,
    assert_windows_equal,
    committed_and_ends,
    expected_content,
    keys_on_partitions,
    oracle,
    partition_of,
    pred_of,
    produce,
    read_all,
    read_predictions,
    read_to_end,
    start_time,
    stream_plan,
    worker_settings,
)

from streamproc.align.aligner import AlignConfig, Window
from streamproc.config import Settings
from streamproc.dev.localkafka import free_port
from streamproc.testing import MS, S, segment
from streamproc.topics import create_topics
from streamproc.wire import codec as wire
from streamproc.worker.progress import StreamProgress, progress_topic

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# ---------------------------------------------------------------------------------------
# one worker, five streams: alignment, a dead microphone, corrupt and late records
# ---------------------------------------------------------------------------------------

# mic-off's audio is missing over this part of the run: long enough that the windows
# closed on its deadline are out well before the microphone is back, on a slow machine too
GAP = (1500 * MS, 4500 * MS)
DUR_S = 6.0


def _corrupt(plan: list[Planned], sid: str, t0: int) -> list[Planned]:
    """Bad records sent mid-stream on each topic, one late frame and one duplicate."""
    at = t0 + 2000 * MS
    frame = next(p for p in plan if p.modality == "video" and p.media.ts_ns >= at)
    chunk = next(p for p in plan if p.modality == "audio" and p.media.ts_ns >= at)
    seg = next(p for p in plan if p.modality == "text" and p.media.start_ns >= at)

    def variant(p: Planned, value: bytes | None = None, key: bytes | None = b"",
                drop: str = "", change: dict[str, bytes] | None = None) -> wire.KafkaRecord:
        headers = tuple((k, (change or {}).get(k, v)) for k, v in p.rec.headers if k != drop)
        return wire.KafkaRecord(p.rec.key if key == b"" else key,
                                p.rec.value if value is None else value, headers,
                                p.rec.timestamp_ms)

    bad = [
        ("video", variant(frame, value=frame.rec.value[: len(frame.rec.value) // 2])),
        ("video", variant(frame, change={"sp-v": b"2"})),
        ("video", variant(frame, key=None)),
        ("audio", variant(chunk, value=chunk.rec.value + b"\x01")),
        ("audio", variant(chunk, drop="sp-seq")),
        ("text", variant(seg, value=b"\xff\xfe not utf-8")),
    ]
    out = [Planned(at + i * 20 * MS, m, r, None, "decode") for i, (m, r) in enumerate(bad)]
    # a frame for windows that closed seconds ago (new seq, so not a duplicate)
    late = wire.VideoFrame.from_image(sid, t0 + 200 * MS, 9000,
                                      np.zeros((48, 64, 3), np.uint8))
    out.append(Planned(t0 + 3000 * MS, "video", wire.encode(late), late, "late"))
    dup = next(p for p in plan if p.modality == "video" and p.media.ts_ns >= t0 + 2500 * MS)
    out.append(Planned(dup.send_at_ns + 30 * MS, "video", dup.rec, dup.media, "duplicate"))
    return out


@dataclass
class LiveRun:
    t0: int
    plan: list[Planned]
    expected: dict[tuple[str, int], Window]
    preds: list[Pred]
    dead: list
    worker: WorkerProc


@pytest.fixture(scope="module")
def live_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("worker")
    settings = worker_settings(kafka_bootstrap, tmp)
    create_topics(settings)
    worker = WorkerProc(settings, tmp / "worker.log")
    try:
        worker.wait_for(r"Worker ready")
        t0 = start_time()
        rng = np.random.default_rng(42)
        plan: list[Planned] = []
        for sid in ("cam-1", "cam-2", "cam-3", "bad"):
            plan += stream_plan(sid, t0, DUR_S, rng)
        plan += stream_plan("mic-off", t0, DUR_S, rng, audio_gap=(t0 + GAP[0], t0 + GAP[1]))
        plan += _corrupt([p for p in plan if p.rec.key == b"bad"], "bad", t0)
        produce(settings, plan)
        expected = oracle(settings, plan)
        preds = read_predictions(settings, set(expected))
        n_dead = sum(p.role in ("decode", "late") for p in plan)
        dead = read_all(settings, settings.topic("deadletter"), lambda m: len(m) >= n_dead, 20)
        time.sleep(0.5)  # anything extra (it must not be) would show up in the final read
        dead = read_to_end(settings, settings.topic("deadletter"))
        assert worker.stop() == 0, worker.log()[-3000:]
        yield LiveRun(t0, plan, expected, preds, dead, worker)
    finally:
        worker.abandon()


def test_windows_equal_the_oracle(live_run) -> None:
    """Three streams with jitter and reordering within lateness: the published windows
    are exactly the oracle's (keys, frame/segment counts, audio seconds, source offsets)."""
    plan, expected, preds, worker = live_run.plan, live_run.expected, live_run.preds, live_run.worker
    by_key = assert_windows_equal(preds, expected, {"cam-1", "cam-2", "cam-3"})
    # every frame and chunk of the run reached a window: offsets cover all that was sent
    used = {(m, tuple(o)) for ps in by_key.values() for m, offs in ps[0].body["provenance"].items()
            for o in offs}
    sent = {(p.modality, (p.source.partition, p.source.offset)) for p in plan
            if p.role == "window" and p.rec.key.decode() in {"cam-1", "cam-2", "cam-3"}}
    assert used == sent
    # reordering really happened in the input (otherwise this test proves little)
    by_stream = defaultdict(list)
    for p in sorted(plan, key=lambda p: p.sent_wall_ns):
        if p.role == "window" and p.modality == "video":
            by_stream[p.rec.key].append(p.media.ts_ns)
    assert any(a > b for ts in by_stream.values() for a, b in itertools.pairwise(ts))
    assert "final status" in worker.log()


def test_a_started_worker_freezes_its_start_up_heap(live_run) -> None:
    """The collector skips what start-up made (imports, faust, aiokafka): the worker logs
    how many objects it froze once it had started, and that glibc's malloc was tuned."""
    log = live_run.worker.log()
    frozen = re.findall(r"heap: ([\d,]+) start-up objects frozen", log)
    assert len(frozen) == 1
    assert int(frozen[0].replace(",", "")) > 50_000
    if platform.libc_ver()[0] == "glibc":
        assert "malloc reuses freed memory up to 512 MB" in log


def test_dead_microphone_masks_audio_and_recovers(live_run) -> None:
    """Audio stops for 2 s: windows keep coming, audio masked, as the audio watermark moves
    on with the clock once silent past its deadline, before the microphone is back;
    afterwards windows are full again."""
    t0, plan, expected, preds = live_run.t0, live_run.plan, live_run.expected, live_run.preds
    by_key = assert_windows_equal(preds, expected, {"mic-off"})
    back_wall = min(p.sent_wall_ns for p in plan if p.rec.key == b"mic-off"
                    and p.modality == "audio" and p.media.ts_ns >= t0 + GAP[1])
    w, gap_windows, after, checked = W_MS * MS, 0, 0, 0
    for (_, start), copies in sorted(by_key.items()):
        body = copies[0].body
        mods = body["modalities"]
        if t0 + GAP[0] <= start and start + w <= t0 + GAP[1]:
            gap_windows += 1
            assert not mods["audio"]["present"] and mods["missing"] == ["audio"]
            assert mods["video"]["present"] and mods["text"]["present"]
            # a window closes its deadline + lateness after its end (the watermark moves on
            # from the gap's start once audio is silent past its deadline), plus the audio
            # send jitter, a timer tick and a margin
            due = start + w + (IDLE_MS + LATENESS_MS["audio"] + 250) * MS
            if due <= t0 + GAP[1]:
                # closed without waiting for the microphone to return
                checked += 1
                assert body["quality"]["closed_by"] == "deadline"
                assert body["emitted_at_ns"] < back_wall, (start - t0) / MS
        elif start >= t0 + GAP[1] and start + w <= t0 + int(DUR_S * S):
            after += 1
            assert mods["audio"]["present"] and mods["missing"] == []
            assert mods["audio"]["seconds"] == pytest.approx(W_MS / 1000)
    assert gap_windows == (GAP[1] - GAP[0] - w) // (H_MS * MS) + 1
    assert checked >= 1 and after >= 2


def test_corrupt_and_late_records_are_dead_lettered(live_run) -> None:
    """A corrupt record of each kind mid-stream and a late frame go to the dead-letter
    topic with a readable reason and their source; the stream's windows are unaffected
    (equal to the oracle of its good records), a duplicate is counted once."""
    plan, preds, dead, worker = live_run.plan, live_run.preds, live_run.dead, live_run.worker
    expected = live_run.expected
    assert_windows_equal(preds, expected, {"bad"})
    letters = {(d.source.topic, d.source.partition, d.source.offset): d
               for d in (wire.decode_dead_letter(wire.KafkaRecord.from_client(m)) for m in dead)}
    assert len(letters) == len(dead)  # each bad record dead-lettered once
    want = {p.source: p for p in plan if p.role in ("decode", "late")}
    assert set(letters) == {(s.topic, s.partition, s.offset) for s in want}
    for src, p in want.items():
        d = letters[(src.topic, src.partition, src.offset)]
        assert d.original.value == p.rec.value and d.original.key == p.rec.key
        if p.role == "decode":
            assert d.kind == "decode"
            with pytest.raises(wire.WireError) as err:
                wire.decode(p.rec, expect_modality=p.modality)
            assert d.reason == str(err.value)
        else:
            assert d.kind == "late"
            assert "late video record seq 9000" in d.reason and "already closed" in d.reason
    reasons = " | ".join(d.reason for d in letters.values())
    for words in ("JPEG", "sp-v=", "no key", "PCM length", "sp-seq", "not UTF-8"):
        assert words in reasons
    log = worker.log()
    assert log.count("dead letter (decode)") == 6 and log.count("dead letter (late)") == 1


# ---------------------------------------------------------------------------------------
# crashes and rebalancing
# ---------------------------------------------------------------------------------------


def restart_at(at_ns: int, settings: Settings, workers: list[WorkerProc], log: Path,
               killed_at: list[int] | None = None) -> Callable[[int], None]:
    """A callback for produce(): once the schedule passes ``at_ns``, kill -9 the one
    worker in ``workers`` and start the next at once (appended to ``workers``; the kill's
    wall time to ``killed_at``)."""

    def at(send_at: int) -> None:
        if send_at >= at_ns and len(workers) == 1:
            workers[0].kill()
            if killed_at is not None:
                killed_at.append(time.time_ns())
            workers.append(WorkerProc(settings, log))

    return at


def test_kill_9_and_restart_publishes_every_window(kafka_bootstrap: str, tmp_path: Path) -> None:
    """kill -9 mid-run, restart at once. Asserted, reading predictions read_committed
    (the worker's producer is not transactional, so that is every acknowledged record):
    every oracle window is published at least once, nothing else is, and every copy of a
    window is identical to the oracle's, so collapsing copies by (stream_id,
    window_start_ns), as the consumer API does, leaves each window exactly once."""
    settings = worker_settings(kafka_bootstrap, tmp_path)
    create_topics(settings)
    streams = keys_on_partitions("s", 4)[:3]
    first = WorkerProc(settings, tmp_path / "first.log")
    workers = [first]
    try:
        first.wait_for(r"Worker ready")
        t0 = start_time()
        rng = np.random.default_rng(3)
        plan = [p for sid in streams for p in stream_plan(sid, t0, 4.0, rng)]

        killed_at: list[int] = []
        at = restart_at(t0 + 2300 * MS, settings, workers, tmp_path / "second.log", killed_at)
        produce(settings, plan, at)
        expected = oracle(settings, plan)
        preds = read_predictions(settings, set(expected), timeout=60)
        second = workers[1]
        by_key = assert_windows_equal(preds, expected, set(streams))
        producers = {c.worker for copies in by_key.values() for c in copies}
        assert producers == {f"{socket.gethostname()}:{first.pid}", f"{socket.gethostname()}:{second.pid}"}
        dups = sum(len(c) - 1 for c in by_key.values())
        print(f"kill -9: {len(by_key)} windows, {dups} published twice (identical)")
        assert second.stop() == 0
        # the restart resumed from recorded progress and re-read what the first worker
        # had consumed but not finished (more records than were sent after the kill)
        assert re.search(r"progress known for [1-9]", second.log())
        events_in = int(re.search(r"final status: .* events_in=(\d+)", second.log())[1])
        assert events_in > sum(p.sent_wall_ns > killed_at[0] for p in plan)
    finally:
        for w in workers:
            w.abandon()


def read_revised(settings: Settings, want: dict[tuple[str, int], str]
                 ) -> tuple[list[Pred], dict[tuple[str, int], Pred]]:
    """Predictions until every window's newest final has ``want``'s content (or a minute),
    and those newest finals. Asserted: no (stream, window, rev) came with two contents,
    and the newest final of every window is ``want``'s."""

    def newest(preds: list[Pred]) -> dict[tuple[str, int], Pred]:
        out: dict[tuple[str, int], Pred] = {}
        for p in preds:
            if p.final and (p.key not in out or p.body["rev"] > out[p.key].body["rev"]):
                out[p.key] = p
        return out

    def done(msgs: list) -> bool:
        last = newest([pred_of(m) for m in msgs])
        return all(k in last and last[k].content() == c for k, c in want.items())

    preds = [pred_of(m) for m in read_all(settings, settings.topic("predictions"), done,
                                          timeout=60)]
    contents: dict[tuple[str, int, int], set[str]] = defaultdict(set)
    for p in preds:
        contents[p.revision_key].add(p.content())
    assert all(len(c) == 1 for c in contents.values()), \
        [k for k, c in contents.items() if len(c) > 1]
    last = newest(preds)
    assert set(last) == set(want)
    for key, p in last.items():
        assert p.content() == want[key], (key, p.body["quality"])
    return preds, last


def test_late_transcripts_revise_finals_across_a_kill_9(kafka_bootstrap: str,
                                                         tmp_path: Path) -> None:
    """Transcript segments sent seconds after the finals of their first windows (past the
    text lateness, within the revision horizon) revise those finals; the worker is killed
    with kill -9 between the two late segments and restarted at once. Asserted: every
    window's newest final is the oracle's window of every record, the late segments
    included; no (stream, window, rev) comes with two different contents; each late
    segment revised its first window (rev 2, closed_by revision); windows no late segment
    touches have only their final; and a window whose provisional the first worker
    published got its final from the second."""
    settings = worker_settings(kafka_bootstrap, tmp_path)
    assert settings.revision_horizon_ms >= 5000  # the default
    create_topics(settings)
    streams = keys_on_partitions("r", 4)[:2]
    first = WorkerProc(settings, tmp_path / "first.log")
    workers = [first]
    try:
        first.wait_for(r"Worker ready")
        t0 = start_time()
        rng = np.random.default_rng(11)
        plan = [p for sid in streams for p in stream_plan(sid, t0, 5.0, rng)]
        cfg = AlignConfig.from_settings(settings)
        touched: list[list[tuple[str, int]]] = []  # per late segment, its windows in order
        for i, (sid, at_ms, send_ms) in enumerate(
                [(streams[0], 1100, 3400), (streams[1], 1600, 4400)]):
            late = segment(sid, 1000 + i, t0 + at_ms * MS, t0 + (at_ms + 200) * MS,
                           f"{sid} late words {i}")
            plan.append(Planned(t0 + send_ms * MS, "text", wire.encode(late), late))
            touched.append([(sid, k) for k in cfg.window_starts(late.start_ns, late.end_ns)])

        # a late segment goes out over a second after the transcript that closes its first
        # window, and the kill comes over a second after the one that closes the second
        # late segment's first window: a slow machine has that long to publish those finals
        at = restart_at(t0 + 3800 * MS, settings, workers, tmp_path / "second.log")
        produce(settings, plan, at)
        expected = oracle(settings, plan)
        want = {k: expected_content(w) for k, w in expected.items() if k[0] in streams}
        preds, last = read_revised(settings, want)
        second = workers[1]
        revised = {k for k, p in last.items() if p.body["rev"] == 2}
        for windows in touched:
            assert windows[0] in revised
            assert last[windows[0]].body["quality"]["closed_by"] == "revision"
        assert revised <= {k for ws in touched for k in ws}
        assert all(p.body["rev"] <= 2 for p in preds)
        first_id = f"{socket.gethostname()}:{first.pid}"
        second_id = f"{socket.gethostname()}:{second.pid}"
        handed_over = {p.key for p in preds if not p.final and p.worker == first_id} & \
            {p.key for p in preds if p.final and p.body["rev"] == 1 and p.worker == second_id}
        assert handed_over, "no window had its provisional before the kill, its final after"
        print(f"revisions: {len(revised)} windows revised; {len(handed_over)} windows "
              "provisional before the kill, final after it")
        assert second.stop() == 0
    finally:
        for w in workers:
            w.abandon()


def test_final_within_publishes_finals_before_a_lagging_transcript_and_revises_them(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """With final_within_ms a final waits for the transcript at most that long after its
    provisional; a recogniser lagging more than that sends its segments after the finals
    of their first windows, which they then revise. The worker is killed with kill -9
    half way and restarted at once. Asserted: every window's newest final is the
    oracle's window of every record; no (stream, window, rev) comes with two different
    contents; finals closed on the bound exist, and so do revisions."""
    settings = worker_settings(kafka_bootstrap, tmp_path).replace(final_within_ms=200)
    create_topics(settings)
    streams = keys_on_partitions("b", 4)[:2]
    first = WorkerProc(settings, tmp_path / "first.log")
    workers = [first]
    try:
        first.wait_for(r"Worker ready")
        t0 = start_time()
        rng = np.random.default_rng(5)
        plan = []
        for sid in streams:
            for p in stream_plan(sid, t0, 6.0, rng):
                if p.modality == "text":  # sent 700 ms after it ends: past the bound
                    p.send_at_ns = p.media.end_ns + 700 * MS  # type: ignore[union-attr]
                plan.append(p)

        at = restart_at(t0 + 3000 * MS, settings, workers, tmp_path / "second.log")
        produce(settings, plan, at)
        want = {k: expected_content(w) for k, w in oracle(settings, plan).items()}
        preds, _ = read_revised(settings, want)
        first_finals = [p for p in preds if p.final and p.body["rev"] == 1]
        bound = [p for p in first_finals if p.body["quality"]["closed_by"] == "bound"]
        revised = [p for p in preds if p.body["quality"]["closed_by"] == "revision"]
        print(f"final_within: {len(first_finals)} finals, {len(bound)} closed on the bound, "
              f"{len(revised)} revisions")
        assert bound and revised
        assert workers[1].stop() == 0
    finally:
        for w in workers:
            w.abandon()


def test_two_workers_split_partitions_and_take_over(kafka_bootstrap: str,
                                                    tmp_path: Path) -> None:
    """Two workers in one group on 4 partitions: each stream's windows come from one
    worker at a time (never interleaved), both workers take part, and after one is stopped
    the other takes over its streams with no window lost. No revisions: records are
    acked as soon as their windows are out, so b has acked records it has not committed
    yet when a leaves (the commits must go on after that rebalance)."""
    settings = worker_settings(kafka_bootstrap, tmp_path).replace(revision_horizon_ms=0)
    create_topics(settings)
    streams = keys_on_partitions("s", 4)
    a = WorkerProc(settings, tmp_path / "a.log")
    workers = [a]
    try:
        a.wait_for(r"partitions assigned: \[0, 1, 2, 3\]")
        a.wait_for(r"Worker ready")
        b = WorkerProc(settings.replace(web_port=free_port()), tmp_path / "b.log")
        workers.append(b)
        b_parts = b.wait_for(r"partitions assigned: \[([\d, ]+)\]")[0]
        a.wait_for(r"partitions assigned: \[", count=2)
        a.wait_for(r"Worker ready", count=2)  # recovered its share after b joined
        b.wait_for(r"Worker ready")
        t0 = start_time()
        plan = [p for sid in streams for p in stream_plan(sid, t0, 4.0,
                                                          np.random.default_rng(5))]
        stopper: list[threading.Thread] = []

        def at(send_at: int) -> None:
            if send_at >= t0 + 2000 * MS and not stopper:
                stopper.append(threading.Thread(target=a.stop))  # graceful, off the producer
                stopper[0].start()

        produce(settings, plan, at)
        stopper[0].join(30)
        assert a.proc.returncode == 0, a.log()[-3000:]
        expected = oracle(settings, plan)
        preds = read_predictions(settings, set(expected), timeout=60)
        by_key = assert_windows_equal(preds, expected, set(streams))
        ida, idb = f"{socket.gethostname()}:{a.pid}", f"{socket.gethostname()}:{b.pid}"
        b_first = {int(x) for x in b_parts.split(", ")}
        assert 0 < len(b_first) < 4
        for sid in streams:
            seq = [c.worker for (s, _), copies in sorted(by_key.items()) if s == sid
                   for c in sorted(copies, key=lambda c: c.body["emitted_at_ns"])]
            runs = [w for i, w in enumerate(seq) if i == 0 or seq[i - 1] != w]
            if partition_of(sid, 4) in b_first:
                assert runs == [idb], (sid, runs)
            else:
                assert runs == [ida, idb], (sid, runs)  # a's stream, then b took it over
        assert b.stop() == 0
        # the progress topic (on each stream's own partition) ends at each stream's last
        # window: what a next owner would resume from
        last: dict[str, int] = {}
        for m in read_to_end(settings, progress_topic(settings)):
            sid = m.key.decode()
            assert m.partition == partition_of(sid, 4), sid
            last[sid] = StreamProgress.decode(m.value).through  # type: ignore[assignment]
        assert last == {sid: max(start for s, start in expected if s == sid) for sid in streams}
        # every input record was processed, and the commits say so, also on the partitions
        # b kept through a's leave (acked before that rebalance, not committed yet)
        committed, ends = committed_and_ends(settings, range(4))
        assert committed == ends, b.log()[-6000:]
    finally:
        for w in workers:
            w.abandon()


# ---------------------------------------------------------------------------------------
# refusal
# ---------------------------------------------------------------------------------------


def test_refuses_topics_that_are_not_co_partitioned(kafka_bootstrap: str,
                                                    tmp_path: Path) -> None:
    settings = worker_settings(kafka_bootstrap, tmp_path)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(settings.topic("audio"), 3, 1)])
    finally:
        admin.close()
    create_topics(settings)  # the others with 4 partitions
    w = WorkerProc(settings, tmp_path / "refused.log")
    rc = w.proc.wait(60)
    out = w.log()
    assert rc == 2, out
    assert "streamproc worker: topics are not ready" in out
    assert "input topics are not co-partitioned: partition counts differ" in out
    assert f"{settings.topic('audio')}=3" in out and "Traceback" not in out


# ---------------------------------------------------------------------------------------
# a backlog whose fetches bring different spans of each topic
# ---------------------------------------------------------------------------------------


def test_a_backlog_longer_than_the_buffer_caps_gives_the_oracles_windows(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """A fresh worker reads a 30 s backlog with small fetches (64 KiB a partition): a fetch
    of 640x480 frames spans under a second, one of audio two, one of transcripts all 30 s.
    Handed on as fetched, audio and text would run ahead of the video by far more than the
    buffer caps (3 s of audio, 30 frames) and the aligner would cap them. The fetch loop
    interleaves the topics by event time, so every window is the oracle's and nothing
    becomes a dead letter."""
    settings = worker_settings(kafka_bootstrap, tmp_path).replace(
        max_message_bytes=64 * 1024, max_buffer_audio_s=3.0, max_buffer_frames=30)
    create_topics(settings)
    t0 = start_time() - 60 * S
    rng = np.random.default_rng(7)
    plan: list[Planned] = []
    for sid in ("deep-1", "deep-2"):
        plan += stream_plan(sid, t0, 30.0, rng, frame_size=(480, 640))
    assert max(len(p.rec.value) for p in plan if p.modality == "video") < 64 * 1024
    produce(settings, plan)  # every send time is in the past: all at once
    # the oracle holds all 30 s before it closes a window: it must not be capped itself
    expected = oracle(settings.replace(max_buffer_audio_s=60.0, max_buffer_frames=600), plan)
    worker = WorkerProc(settings, tmp_path / "worker.log")
    try:
        preds = read_predictions(settings, set(expected), timeout=120)
        dead = read_to_end(settings, settings.topic("deadletter"))
        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        worker.abandon()
    assert_windows_equal(preds, expected, {"deep-1", "deep-2"})
    assert dead == []
