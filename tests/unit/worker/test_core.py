"""The worker core without faust or a broker: ack order, progress, revocation and resume,
backpressure, holes and replays, idle closes, driven by hand with a manual clock.

The broker tests of the same guarantees with a real worker are in tests/broker/."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any

import pytest

from streamproc.align import aligner as align_module
from streamproc.config import Settings
from streamproc.testing import MS, FakeAck, ListOutput, ManualClock, S, consumed, frame, segment
from streamproc.wire.codec import KafkaRecord, decode_dead_letter
from streamproc.worker import core as core_module
from streamproc.worker.core import WorkerCore
from streamproc.worker.metrics import Counters
from streamproc.worker.progress import StreamProgress

V = "p.video"
T0 = 100 * S  # event time of the first frame; the clock starts there too


class Harness:
    """A WorkerCore on partitions of ``p.*`` with 1 s tumbling video-only windows, no
    lateness and a 1 s idle deadline; what it acks, publishes and dead-letters is kept.

    ``hold_windows`` / ``hold_dead_letters``: publishes and dead-letter sends complete
    only when the test says so.
    """

    def __init__(self, partitions: tuple[int, ...] = (0,), *, hold_windows: bool = False,
                 hold_dead_letters: bool = False, progress: dict[str, int] | None = None,
                 resume: dict[str, StreamProgress] | None = None, committed: int = 0,
                 stream_expiry_ms: int = 0, **changes: Any) -> None:
        self.settings = Settings(topic_prefix="p", window_ms=1000, hop_ms=1000,
                                 lateness_video_ms=0, idle_deadline_video_ms=1000,
                                 expected_modalities="video",
                                 stream_expiry_ms=stream_expiry_ms).replace(**changes)
        self.clock = ManualClock(T0)
        self.out = ListOutput(hold=hold_windows)
        self.hold_dead_letters = hold_dead_letters
        self.dead_letters: list[tuple[KafkaRecord, asyncio.Future[None]]] = []
        self.progress: list[tuple[str, int]] = []
        self.values: list[tuple[str, StreamProgress]] = []
        self.acks: list[tuple[str, int, int]] = []  # (topic, partition, offset) in ack order
        self.crashes: list[BaseException] = []
        self.fetch_skips: deque[tuple[str, int, int, int]] = deque()
        self.core = WorkerCore(self.settings, submit=self.out.submit,
                               send_dead_letter=self._send_dead_letter,
                               record_progress=self._record_progress, counters=Counters(),
                               crash=self.crashes.append, ack=self._ack, clock=self.clock,
                               fetch_skips=self.fetch_skips)
        self.core.ack_skipped = lambda tp, start, end: self.acks.extend(
            (tp[0], tp[1], o) for o in range(start, end))
        self.assign(partitions, progress, committed, resume)

    def assign(self, partitions: tuple[int, ...], progress: dict[str, int] | None = None,
               committed: int = 0, resume: dict[str, StreamProgress] | None = None) -> None:
        """A rebalance gives this worker ``partitions``, resuming at ``committed`` with
        ``progress`` (each stream's last published window) or ``resume`` (progress as
        the progress topic has it)."""
        tps = [(self.settings.topic(m), p) for m in ("video", "audio", "text")
               for p in partitions]
        self.core.on_assigned(tps)
        if resume is not None:
            self.core.resume_from(resume)
        else:
            self.core.progress = dict(progress or {})
        self.core.on_resume(dict.fromkeys(tps, committed), {})

    def revoke(self, partitions: tuple[int, ...]) -> None:
        self.core.on_revoked((self.settings.topic(m), p) for m in ("video", "audio", "text")
                             for p in partitions)

    def frame(self, offset: int, at_ms: int, *, partition: int = 0, seq: int | None = None,
              stream: str = "cam") -> None:
        """Consume a video frame of ``stream`` at ``T0 + at_ms`` from ``p.video``."""
        media = frame(stream, T0 + at_ms * MS, offset if seq is None else seq)
        self.core.on_record(consumed(media, V, partition, offset))

    def junk(self, offset: int, partition: int = 0) -> None:
        """Consume a record that is not in the wire format (a dead letter)."""
        self.core.on_record(consumed(KafkaRecord(b"cam", b"junk"), V, partition, offset))

    def offsets(self, partition: int = 0) -> list[int]:
        return [o for t, p, o in self.acks if (t, p) == (V, partition)]

    def _ack(self, handle: FakeAck) -> None:
        handle.ack()
        self.acks.append((handle.topic, handle.partition, handle.offset))

    def _send_dead_letter(self, rec: KafkaRecord) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.dead_letters.append((rec, fut))
        if not self.hold_dead_letters:
            fut.set_result(None)
        return fut

    def _record_progress(self, stream_id: str, value: StreamProgress) -> asyncio.Future[None]:
        self.progress.append((stream_id, value.through))  # type: ignore[arg-type]
        self.values.append((stream_id, value))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def settle() -> None:
    """Let the completion callbacks of publishes and sends run."""
    for _ in range(5):
        await asyncio.sleep(0)


def run(test: Coroutine[Any, Any, None]) -> None:
    asyncio.run(test)


def test_a_record_is_acked_after_its_window_is_published_and_its_progress_recorded() -> None:
    async def main() -> None:
        h = Harness(hold_windows=True)
        for offset, at in enumerate((0, 300, 600)):
            h.frame(offset, at)
        h.frame(3, 1200)  # the watermark closes [0 s, 1 s)
        await settle()
        assert len(h.out.windows) == 1 and h.acks == [] and h.progress == []
        h.out.publish()
        await settle()
        assert h.progress == [("cam", T0)] and h.offsets() == [0, 1, 2]  # 3: next window
        assert h.core.ledger.held() == 1 and h.crashes == []

    run(main())


def test_revoke_mid_window_acks_nothing_and_the_next_owner_replays() -> None:
    """Records held by an open window, and a window still being published, are not acked
    when their partition is revoked: the committed offset stays before them."""
    async def main() -> None:
        h = Harness(hold_windows=True)
        for offset, at in enumerate((0, 300, 600, 1200, 1500)):
            h.frame(offset, at)  # [0 s, 1 s) in flight, [1 s, 2 s) open
        assert len(h.out.windows) == 1
        h.revoke((0,))
        assert h.core.aligners == {} and h.core.ledger.held() == 0
        h.out.publish()  # confirmation of a revoked partition's window
        await settle()
        assert h.acks == [] and h.progress == [] and h.crashes == []
        # the partition comes back from the committed offset: everything is read again
        h.assign((0,), committed=0)
        for offset, at in enumerate((0, 300, 600, 1200, 1500)):
            h.frame(offset, at)
        h.out.publish()
        await settle()
        assert len(h.out.windows) == 2 and h.offsets() == [0, 1, 2]

    run(main())


def test_records_acked_before_a_revocation_are_acked_once_more_as_one_range() -> None:
    """0..2 acked but not committed when the partition went and came back (the consumer
    forgot those acks): the resume acks 0..2 as one range, and their copies that Kafka
    delivers again are acked no second time (the consumer would then commit one offset
    per commit)."""
    async def main() -> None:
        h = Harness()
        for offset, at in enumerate((0, 300, 600, 1200)):
            h.frame(offset, at)  # [0 s, 1 s) published: 0..2 acked, 3 held
        await settle()
        assert h.offsets() == [0, 1, 2]
        h.revoke((0,))
        h.acks.clear()
        h.assign((0,), committed=0)
        for offset, at in enumerate((0, 300, 600, 1200, 1500, 2100)):
            h.frame(offset, at)  # 0..2 again (faust read them before the seek), then 3..
        await settle()
        assert h.offsets() == [0, 1, 2, 3, 4]
        assert h.core.counters.get("ignored", reason="redelivered") == 3

    run(main())


def test_revoking_several_partitions_drops_every_one_of_their_aligners() -> None:
    """The partitions come back from the committed offset: a replayed record is a new
    record for a fresh aligner (a stale one would call it a duplicate and ack it before
    its window is published)."""
    async def main() -> None:
        h = Harness(partitions=(0, 1, 2), hold_windows=True)
        for p in (0, 1, 2):
            h.frame(0, 0, partition=p, stream=f"cam{p}")
        assert sorted(h.core.aligners) == [0, 1, 2]
        h.revoke((0, 1, 2))
        assert h.core.aligners == {}
        h.assign((0, 1, 2), committed=0)
        for p in (0, 1, 2):
            h.frame(0, 0, partition=p, stream=f"cam{p}")
        await settle()
        assert h.acks == [] and h.core.counters.get("duplicates", modality="video") == 0

    run(main())


def test_a_dead_letter_keeps_its_turn_among_acks() -> None:
    """A dead letter is acked once it is sent and never before a record in front of it:
    the commit must not pass a record whose window is still open."""
    async def main() -> None:
        h = Harness(hold_dead_letters=True)
        h.frame(0, 0)  # held by [0 s, 1 s)
        h.junk(1)  # dead letter, not sent yet
        h.frame(2, 1200)  # closes [0 s, 1 s); held by [1 s, 2 s)
        await settle()
        assert h.offsets() == [0]  # 1 waits for its dead letter
        (rec, sent), = h.dead_letters
        assert decode_dead_letter(rec).kind == "decode"
        sent.set_result(None)
        await settle()
        assert h.offsets() == [0, 1]

        h.junk(3)  # behind 2, which its window still holds
        h.dead_letters[-1][1].set_result(None)
        await settle()
        assert h.offsets() == [0, 1]
        h.clock.advance(3000)
        h.core.on_tick()  # [1 s, 2 s) closes idle
        await settle()
        assert h.offsets() == [0, 1, 2, 3]

    run(main())


def test_a_dead_letter_that_cannot_be_sent_crashes_without_an_ack() -> None:
    async def main() -> None:
        h = Harness(hold_dead_letters=True)
        h.junk(0)
        h.dead_letters[0][1].set_exception(RuntimeError("broker said no"))
        await settle()
        assert h.acks == [] and [str(e) for e in h.crashes] == ["broker said no"]

    run(main())


def test_backpressure_at_the_in_flight_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_module, "MAX_INFLIGHT_WINDOWS", 2)

    async def main() -> None:
        h = Harness(hold_windows=True)
        for offset, at in enumerate((0, 1000, 2000)):  # each frame closes the window before
            h.frame(offset, at)
        assert h.core.ledger.inflight() == 2
        room = asyncio.ensure_future(h.core.wait_for_room())
        await settle()
        assert not room.done()  # the agent takes no further record
        h.out.publish(1)
        await settle()
        assert room.done() and h.core.ledger.inflight() == 1
        await asyncio.wait_for(h.core.wait_for_room(), 1)  # below the cap: at once

    run(main())


def test_resume_from_progress_does_not_emit_a_published_window_again() -> None:
    """A worker taking over reads the last published window per stream; replayed records
    of that window are acked without emitting it again."""
    async def main() -> None:
        h = Harness(progress={"cam": T0})  # [0 s, 1 s) was published before the crash
        h.frame(0, 0)
        h.frame(1, 500)
        await settle()
        assert h.offsets() == [0, 1] and h.core.counters.get("replayed") == 2
        h.frame(2, 1000)
        h.frame(3, 2100)
        await settle()
        assert [w.start_ns for w in h.out.windows] == [T0 + S]
        assert h.progress == [("cam", T0 + S)] and h.offsets() == [0, 1, 2]

    run(main())


def test_a_hole_in_offsets_is_read_again_before_anything_after_it() -> None:
    async def main() -> None:
        h = Harness()
        seeks: list[tuple[tuple[str, int], int]] = []

        async def earliest(tp: tuple[str, int]) -> int:
            return 0

        async def seek(tp: tuple[str, int], offset: int) -> None:
            seeks.append((tp, offset))

        h.frame(0, 0)
        h.frame(2, 300)  # offset 1 never came
        await h.core.seek_back(earliest, seek)
        assert seeks == [((V, 0), 1)]
        assert h.core.counters.get("ignored", reason="hole") == 1
        assert h.core.counters.get("events_in") == 1
        h.frame(1, 100)
        h.frame(2, 300)  # read again after the seek
        h.frame(3, 1200)
        await settle()
        assert h.core.counters.get("events_in") == 4
        assert [len(w.frames) for w in h.out.windows] == [3]
        assert h.offsets() == [0, 1, 2]

    run(main())


def test_retention_that_deleted_a_hole_is_skipped_after_a_few_seeks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_module, "HOLE_SEEKS_BEFORE_CHECK", 0)

    async def main() -> None:
        h = Harness()
        seeks: list[int] = []

        async def earliest(tp: tuple[str, int]) -> int:
            return 5

        async def seek(tp: tuple[str, int], offset: int) -> None:
            seeks.append(offset)

        h.frame(5, 0)  # 0..4 deleted by retention
        await h.core.seek_back(earliest, seek)
        assert seeks == [5] and h.core.counters.get("records_lost") == 5
        h.frame(5, 0)
        h.frame(6, 1200)
        await settle()
        # the deleted range is acked in its turn (the consumer commits nothing while its
        # oldest ack is beyond the committed offset), then 5
        assert h.offsets() == [0, 1, 2, 3, 4, 5]

    run(main())


def test_duplicate_and_late_replays() -> None:
    """A redelivered offset is ignored; the same frame at a new offset is a duplicate,
    acked in its turn; a frame for a window already closed is a late dead letter."""
    async def main() -> None:
        h = Harness()
        h.frame(0, 0)
        h.frame(1, 300)
        h.frame(1, 300)  # Kafka delivers offset 1 again (a seek, a rebalance)
        assert h.core.counters.get("ignored", reason="redelivered") == 1
        h.frame(2, 300, seq=1)  # a producer retry: the same frame at a new offset
        assert h.core.counters.get("duplicates") == 1
        h.frame(3, 1200)  # closes [0 s, 1 s)
        h.frame(4, 500)  # too late for it
        await settle()
        assert [len(w.frames) for w in h.out.windows] == [2]
        assert [decode_dead_letter(r).kind for r, _ in h.dead_letters] == ["late"]
        assert h.offsets() == [0, 1, 2]  # 4 waits behind 3, held by [1 s, 2 s)
        h.clock.advance(3000)
        h.core.on_tick()
        await settle()
        assert h.offsets() == [0, 1, 2, 3, 4]

    run(main())


def test_ticks_close_idle_windows_by_the_clock() -> None:
    async def main() -> None:
        h = Harness()
        h.frame(0, 0)
        h.frame(1, 300)
        h.clock.advance(900)
        h.core.on_tick()
        assert h.out.windows == []  # the stream was heard from 900 ms ago
        # silent past its 1 s deadline, the video watermark moves on with the clock from
        # 300 ms: it reaches the window's end (1 s) at 1.7 s
        h.clock.advance(799)
        h.core.on_tick()
        assert h.out.windows == []
        h.clock.advance(1)
        h.core.on_tick()
        await settle()
        assert [w.quality["closed_by"] for w in h.out.windows] == ["deadline"]
        assert h.offsets() == [0, 1] and h.progress == [("cam", T0)]

    run(main())


def test_a_stream_on_a_second_partition_becomes_a_dead_letter_acked_on_its_own() -> None:
    async def main() -> None:
        h = Harness(partitions=(0, 1))
        h.frame(0, 0, partition=0)  # held by its open window
        h.frame(0, 300, partition=1)  # the same stream on another partition
        await settle()
        (rec, _), = h.dead_letters
        assert decode_dead_letter(rec).kind == "partition"
        assert h.acks == [(V, 1, 0)]  # its partition's order only: nothing waits before it
        h.frame(1, 600, partition=0)
        assert h.core.counters.get("dead_letters") == 1

    run(main())


def test_a_bug_of_ours_on_one_record_is_an_internal_dead_letter_and_the_stream_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        h = Harness()
        h.frame(0, 0)
        aligner = h.core.aligners[0]
        real_add = aligner.add

        def add(media: Any, now: int) -> Any:
            if media.seq == 1:
                raise RuntimeError("boom")
            return real_add(media, now)

        monkeypatch.setattr(aligner, "add", add)
        h.frame(1, 300)  # the aligner raises on this one
        h.frame(2, 600)
        await settle()
        (rec, _), = h.dead_letters
        letter = decode_dead_letter(rec)
        assert letter.kind == "internal"
        assert "aligner error: RuntimeError('boom')" in letter.reason
        assert h.core.counters.get("internal_errors") == 1
        h.frame(3, 1200)  # closes [0 s, 1 s) with frames 0 and 2
        await settle()
        (window,) = h.out.windows
        assert window.frame_count == 2
        assert h.crashes == []

    run(main())


def test_fetch_skips_are_acked_in_their_turn() -> None:
    """Offsets the fetcher skipped (a transaction's markers, aborted records) are not a
    hole: they are acked after the records before them and before those after them."""
    async def main() -> None:
        h = Harness()
        h.frame(0, 0)  # held by [0 s, 1 s)
        h.fetch_skips.append((V, 0, 1, 3))  # an aborted record and its marker
        h.frame(3, 300)
        h.fetch_skips.append((V, 0, 4, 5))  # a commit marker
        h.frame(5, 1200)
        await settle()
        assert h.core.counters.get("ignored") == 0
        assert h.offsets() == [0, 1, 2, 3, 4]  # 5: held by [1 s, 2 s)

    run(main())


def test_acks_wait_for_durable_progress() -> None:
    """Inputs are acked only after their window's progress record is durable; a progress
    record that fails stops the worker with nothing acked."""
    async def main() -> None:
        h = Harness()
        pending: list[asyncio.Future[None]] = []

        def record_progress(stream_id: str, value: StreamProgress) -> asyncio.Future[None]:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            pending.append(fut)
            return fut

        h.core.record_progress = record_progress
        h.frame(0, 0)
        h.frame(1, 1200)
        h.frame(2, 2200)
        await settle()
        assert len(pending) == 2 and h.acks == []
        pending[0].set_result(None)
        await settle()
        assert h.offsets() == [0]
        pending[1].set_exception(RuntimeError("progress topic gone"))
        await settle()
        assert h.offsets() == [0] and [str(e) for e in h.crashes] == ["progress topic gone"]

    run(main())


def test_expired_streams_leave_no_state_in_the_worker_and_stay_closed() -> None:
    """Many short-lived stream ids: once the aligner expires them, the worker drops what it
    kept per stream too (home partition, ingest delay, progress, ledger entry); a late
    record of one is still late, a new one starts it afresh."""
    async def main() -> None:
        h = Harness(stream_expiry_ms=10_000, hold_windows=True)
        for i in range(200):
            h.frame(i, i, stream=f"id-{i}")
        h.clock.advance(2000)
        h.core.on_tick()  # every stream silent: its watermark reached its window's end
        await settle()
        assert len(h.out.windows) == 200
        h.clock.advance(20_000)
        h.core.on_tick()  # expired, but its window is not published yet
        assert len(h.core._expiring) == 200 and len(h.core._home) == 200
        h.out.publish()
        await settle()
        assert sorted(o for o in h.offsets()) == list(range(200))
        h.clock.advance(1000)
        h.core.on_tick()
        core = h.core
        assert (core._home, core.ingest_ns, core._expiring) == ({}, {}, set())
        assert len(core.progress) == 200  # one number per stream, as in the progress topic
        assert core.ledger._streams == {} and core.ledger.held() == 0
        h.frame(200, 5, stream="id-5")  # belongs to a window already published
        await settle()
        (dead, _), = h.dead_letters
        assert decode_dead_letter(dead).kind == "late"
        h.frame(201, 22_600, stream="id-5")  # the stream comes back
        h.clock.advance(2000)
        h.core.on_tick()
        h.out.publish()
        await settle()
        assert [w.stream_id for w in h.out.windows[200:]] == ["id-5"]
        assert h.offsets()[-2:] == [200, 201] and h.crashes == []

    run(main())


def test_accepted_frames_and_only_those_are_handed_on_for_early_decoding() -> None:
    async def main() -> None:
        h = Harness()
        seen: list = []
        h.core.on_frame = seen.append
        h.frame(0, 100)
        h.frame(1, 100, seq=0)  # a copy: duplicate
        h.junk(2)
        h.frame(3, 1500)  # closes [0 s, 1 s)
        h.frame(4, 200)  # late
        await settle()
        assert [(f.seq, f.ts_ns) for f in seen] == [(0, T0 + 100 * MS), (3, T0 + 1500 * MS)]

    run(main())


def test_a_provisional_window_acks_nothing_and_its_final_acks_the_records() -> None:
    """Video is fast, text slow: the provisional goes out when video passed the window;
    the records are acked only once the final is published."""
    async def main() -> None:
        h = Harness(hold_windows=True, expected_modalities="video,text", revision_horizon_ms=0,
                    provisional_on="video", lateness_text_ms=2000)
        h.frame(0, 100)
        h.core.on_record(consumed(segment("cam", 0, T0, T0 + 500 * MS), "p.text", 0, 0))
        h.frame(1, 1100)  # video passed [0 s, 1 s): its provisional
        await settle()
        (p,) = h.out.windows
        assert (p.final, p.rev, p.start_ns) == (False, 0, T0)
        h.out.publish()
        await settle()
        assert h.acks == [] and h.progress == []  # a provisional acks nothing
        h.core.on_record(consumed(segment("cam", 1, T0 + 2 * S, T0 + 3100 * MS), "p.text",
                                  0, 1))  # text passed [0 s, 1 s) + 2 s lateness
        await settle()
        f = h.out.windows[-1]
        assert (f.final, f.rev, f.unchanged) == (True, 1, True)
        h.out.publish()
        await settle()
        assert h.progress == [("cam", T0)] and h.offsets() == [0]
        assert ("p.text", 0, 0) in h.acks
        assert h.core.counters.get("windows_provisional") == 1

    run(main())


def test_provisional_windows_are_skipped_while_a_partition_replays_its_backlog() -> None:
    """A rebalance gives the partition back: the provisional of [0 s, 1 s) went out
    before; the replay (text read before the frames this time) sends none again, and the
    final does not claim to be unchanged since a provisional this assignment never sent."""
    async def main() -> None:
        h = Harness(expected_modalities="video,text", revision_horizon_ms=0, provisional_on="video",
                    lateness_text_ms=2000, idle_deadline_text_ms=100_000)
        h.frame(0, 100)
        h.frame(1, 1100)
        await settle()
        assert [(w.final, w.start_ns) for w in h.out.windows] == [(False, T0)]
        h.revoke((0,))
        tps = [(h.settings.topic(m), 0) for m in ("video", "audio", "text")]
        h.core.on_assigned(tps)
        h.core.on_resume(dict.fromkeys(tps, 0), {tps[0]: 2, tps[2]: 2})
        h.core.on_record(consumed(segment("cam", 0, T0, T0 + 500 * MS), "p.text", 0, 0))
        h.frame(0, 100)
        h.frame(1, 1100)
        assert len(h.out.windows) == 1  # no provisional again while replaying
        assert h.core.aligner_stats()["provisional_skipped"] == 1
        h.core.on_record(consumed(segment("cam", 1, T0 + 2 * S, T0 + 3100 * MS), "p.text",
                                  0, 1))
        await settle()
        final = h.out.windows[-1]
        assert (final.final, final.rev, final.unchanged, len(final.segments)) == (
            True, 1, False, 1)

    run(main())


def test_a_stream_back_before_it_was_forgotten_keeps_its_state() -> None:
    """It expires while its last window is still being published, then sends again
    before the worker could forget it: its new record waits for its own window."""
    async def main() -> None:
        h = Harness(stream_expiry_ms=10_000, hold_windows=True)
        h.frame(0, 0)
        h.clock.advance(2000)
        h.core.on_tick()
        await settle()
        assert len(h.out.windows) == 1
        h.clock.advance(20_000)
        h.core.on_tick()  # expired in the aligner; its window is still in flight
        assert h.core._expiring == {"cam"}
        h.frame(1, 22_600)  # back: window [22 s, 23 s) open
        h.out.publish()
        await settle()
        assert h.offsets() == [0]
        h.core.on_tick()
        assert h.core._expiring == set() and "cam" in h.core._home
        h.junk(2)  # a later record of the partition drains what is free
        await settle()
        assert h.offsets() == [0]  # offset 1 waits for [22 s, 23 s)

    run(main())


def test_windows_of_expired_streams_stay_published_once_past_the_aligners_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(align_module, "EXPIRED_STREAMS_KEPT", 1)

    async def main() -> None:
        h = Harness(stream_expiry_ms=10_000)
        h.frame(0, 100, stream="a")
        h.frame(1, 100, stream="b")
        h.clock.advance(2000)
        h.core.on_tick()
        await settle()
        assert sorted(w.stream_id for w in h.out.windows) == ["a", "b"]
        h.clock.advance(20_000)
        h.core.on_tick()  # both expire; the aligner remembers only one
        h.frame(2, 200, stream="a")  # records of windows already published
        h.frame(3, 200, stream="b")
        h.clock.advance(2000)
        h.core.on_tick()
        await settle()
        assert h.out.windows[2:] == []

    run(main())


def test_a_batch_gives_what_its_records_give_one_by_one() -> None:
    """The fetch loop hands records over in batches; the aligners are polled once per batch,
    which changes no window, ack or dead letter."""
    async def main() -> None:
        plan = [(o, at, stream) for o, (at, stream) in enumerate(
            [(0, "cam"), (0, "door"), (300, "cam"), (700, "door"), (1200, "cam"), (1300, "door"),
             (2600, "cam"), (2700, "door"), (2800, "cam")])]
        one, many = Harness(), Harness()
        for offset, at, stream in plan:
            one.frame(offset, at, stream=stream)
        one.junk(len(plan))
        records = [consumed(frame(stream, T0 + at * MS, offset), V, 0, offset)
                   for offset, at, stream in plan]
        records.append(consumed(KafkaRecord(b"cam", b"junk"), V, 0, len(plan)))
        many.core.on_records(records[:4])
        many.core.on_records(records[4:])
        await settle()
        for h in (one, many):
            h.out.publish()
        await settle()
        assert len(one.out.windows) == 4
        assert sorted((w.stream_id, w.start_ns, w.frame_count) for w in many.out.windows) == \
            sorted((w.stream_id, w.start_ns, w.frame_count) for w in one.out.windows)
        assert many.acks == one.acks and sorted(many.progress) == sorted(one.progress)
        assert [r.value for r, _ in many.dead_letters] == [r.value for r, _ in one.dead_letters]

    run(main())


class Revising(Harness):
    """Video and text, 1 s tumbling windows, no lateness, a 2 s revision horizon."""

    def __init__(self, resume: dict[str, StreamProgress] | None = None,
                 committed: int = 0) -> None:
        # ``resume``: a restart, with progress read back and the inputs replayed
        super().__init__(expected_modalities="video,text", provisional_on="",
                         lateness_text_ms=0, idle_deadline_text_ms=1000,
                         revision_horizon_ms=2000, resume=resume, committed=committed)
        self.next = {"video": committed, "text": committed}

    def second(self, s: int) -> None:
        """A frame at s + 0.1 s and a transcript segment over [s, s + 0.5 s), each at the
        next offset of its topic."""
        self.frame(self.next["video"], s * 1000 + 100)
        self.next["video"] += 1
        self.text(s * 1000, s * 1000 + 500)

    def text(self, start_ms: int, end_ms: int) -> None:
        offset = self.next["text"]
        self.next["text"] += 1
        seg = segment("cam", offset, T0 + start_ms * MS, T0 + end_ms * MS)
        self.core.on_record(consumed(seg, "p.text", 0, offset))

    def text_acks(self) -> list[int]:
        return [o for t, _, o in self.acks if t == "p.text"]


def test_with_a_revision_horizon_records_are_acked_once_their_windows_left_it() -> None:
    async def main() -> None:
        h = Revising()
        for s in range(5):
            h.second(s)
        await settle()
        # windows [0 s, 1 s) .. [3 s, 4 s) published; 4 s closed, 2 s of them revisable
        assert [w.start_ns for w in h.out.windows] == [T0 + s * S for s in range(4)]
        assert h.offsets() == [0, 1] and h.text_acks() == [0, 1]
        sid, last = h.values[-1]
        assert sid == "cam" and last.through == T0 + 3 * S and last.floor == T0 + 2 * S
        assert sorted(last.revs) == [T0 + 2 * S, T0 + 3 * S]
        assert all(rev == 0 and len(ids) == 1 for rev, ids in last.revs.values())

        h.text(2600, 2800)  # a final segment 2 s late: a revision of [2 s, 3 s)
        await settle()
        revised = h.out.windows[-1]
        assert (revised.start_ns, revised.rev, len(revised.segments)) == (T0 + 2 * S, 1, 2)
        assert revised.frame_count == 1 and h.core.counters.get("windows_revised") == 1
        assert h.values[-1][1].revs[T0 + 2 * S] == (1, revised.text_ids)
        assert h.text_acks() == [0, 1]  # it waits for its window to leave the horizon

        h.second(5)
        await settle()
        assert h.offsets() == [0, 1, 2] and h.text_acks() == [0, 1, 2]
        assert h.crashes == []

    run(main())


def test_after_a_restart_the_replay_publishes_nothing_again_and_revisions_go_on() -> None:
    async def main() -> None:
        first = Revising()
        for s in range(5):
            first.second(s)
        first.text(2600, 2800)
        await settle()
        published = {(w.start_ns, w.rev) for w in first.out.windows}
        assert (T0 + 2 * S, 1) in published
        # kill -9: progress as last recorded, inputs committed up to the first unacked
        resume = {"cam": first.values[-1][1]}
        h = Revising(resume, committed=2)
        for s in range(2, 5):
            h.second(s)
        h.text(2600, 2800)
        h.second(5)
        await settle()
        # the windows published before come back neither as finals nor as revisions
        assert [(w.start_ns, w.rev) for w in h.out.windows] == [(T0 + 4 * S, 0)]
        h.text(3200, 3300)  # late for [3 s, 4 s): revised from the replayed window
        await settle()
        w = h.out.windows[-1]
        assert (w.start_ns, w.rev, w.frame_count, len(w.segments)) == (T0 + 3 * S, 1, 1, 2)
        assert (w.start_ns, w.rev) not in published and h.crashes == []

    run(main())


def test_a_revision_lost_in_a_crash_comes_from_the_replay() -> None:
    async def main() -> None:
        first = Revising()
        for s in range(5):
            first.second(s)
        await settle()
        resume = {"cam": first.values[-1][1]}  # then the late segment, and the crash
        h = Revising(resume, committed=2)
        for s in range(2, 5):
            h.second(s)
        h.text(2600, 2800)
        await settle()
        assert [(w.start_ns, w.rev, len(w.segments)) for w in h.out.windows] == [
            (T0 + 2 * S, 1, 2)]

    run(main())


def test_a_stop_gives_up_revisions_so_the_last_commit_covers_what_is_published() -> None:
    async def main() -> None:
        h = Revising()
        for s in range(5):
            h.second(s)
        await settle()
        assert h.offsets() == [0, 1]  # 2 s of windows still revisable
        floors = h.core.stop_revising()
        await asyncio.gather(*floors)
        await settle()
        # every record of the published windows [0 s, 4 s); [4 s, 5 s) is still open
        assert h.offsets() == [0, 1, 2, 3] and h.text_acks() == [0, 1, 2, 3]
        assert h.values[-1][1].floor == T0 + 4 * S  # a restart rebuilds nothing of them

    run(main())


def test_a_second_stop_after_a_restart_commits_what_it_published() -> None:
    """A stop soon after a restart from a stop acks every record of the windows the
    restarted worker published (the floor read back at the resume is where it starts)."""
    async def main() -> None:
        first = Revising()
        for s in range(5):
            first.second(s)
        await settle()
        await asyncio.gather(*first.core.stop_revising())
        await settle()
        assert first.offsets() == [0, 1, 2, 3]
        h = Revising({"cam": first.values[-1][1]}, committed=4)
        for s in range(4, 7):
            h.second(s)
        await settle()
        await asyncio.gather(*h.core.stop_revising())
        await settle()
        assert h.offsets() == [4, 5] and h.text_acks() == [4, 5] and h.crashes == []

    run(main())
