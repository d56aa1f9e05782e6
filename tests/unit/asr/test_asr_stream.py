"""One stream's utterance cutting, segments, times and checkpoints (no Kafka, no clock)."""

from __future__ import annotations

import numpy as np
import pytest
from asr_helpers import NS, RATE, CountingEngine, chunks

from streamproc.asr.stream import Checkpoint, CutConfig, StreamTranscriber
from streamproc.asr.vad import EnergyVad
from streamproc.wire import codec as wire

T0 = 1_700_000_000 * NS


def tone(seconds: float, level: float = 0.3, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def run(x: np.ndarray, cfg: CutConfig | None = None, chunk_s: float = 0.1,
        resume: Checkpoint | None = None, t0: int = T0, flush: bool = False
        ) -> tuple[StreamTranscriber, list[wire.TranscriptSegment]]:
    tr = StreamTranscriber("s", cfg or CutConfig(), CountingEngine(), EnergyVad(), resume)
    out = []
    for k, c in enumerate(chunks("s", t0, x, chunk_s)):
        out += tr.add(c, k)
    if flush:
        out += tr.flush()
    return tr, out


def test_voice_between_silences_gives_partials_then_one_final_inside_it() -> None:
    x = np.concatenate([silence(2), tone(2.5), silence(3)])
    tr, segs = run(x)
    finals = [s for s in segs if s.final]
    assert len(finals) == 1 and [s.seq for s in segs] == list(range(len(segs)))
    assert [s.final for s in segs[:-1]] == [False] * (len(segs) - 1) and len(segs) >= 3
    f = finals[0]
    # the final's span is its words', inside the voiced audio plus the pre-roll
    assert T0 + int(1.65 * NS) <= f.start_ns <= T0 + 2 * NS
    assert T0 + int(4.4 * NS) <= f.end_ns <= T0 + int(5.1 * NS)
    assert f.words and f.words[0].start_ns == f.start_ns and f.words[-1].end_ns == f.end_ns
    wire.decode(wire.encode(f))  # the word timings follow the wire rules
    assert not tr.in_utterance and tr.checkpoint == Checkpoint(len(segs), tr.checkpoint.epoch_ns)


def test_silence_gives_no_segment_and_moves_the_checkpoint_on() -> None:
    tr, segs = run(silence(10))
    assert segs == []
    assert tr.checkpoint is not None and tr.checkpoint.epoch_ns >= T0 + 8 * NS
    # only the records after the checkpoint are needed again
    assert tr.needed_token is None or tr.needed_token >= 80


def test_a_long_utterance_is_cut_at_the_bound() -> None:
    cfg = CutConfig(max_utterance_ms=2000, partial_interval_ms=0)
    _, segs = run(np.concatenate([silence(1), tone(7), silence(2)]), cfg)
    assert len(segs) >= 3 and all(s.final for s in segs)
    assert all(s.end_ns - s.start_ns <= 2 * NS for s in segs)


def test_audio_that_stops_mid_utterance_is_flushed_and_a_gap_ends_it_alike() -> None:
    x = np.concatenate([silence(1), tone(1.5)])
    _, flushed = run(x, flush=True)
    assert flushed[-1].final and flushed[-1].end_ns <= T0 + int(2.5 * NS)
    # the same audio, then more after a gap: the gap ends the utterance at the same place
    tr = StreamTranscriber("s", CutConfig(), CountingEngine(), EnergyVad())
    gapped = []
    for k, c in enumerate(chunks("s", T0, x)):
        gapped += tr.add(c, k)
    gapped += tr.add(wire.AudioChunk.from_samples("s", T0 + 10 * NS, 99, silence(0.1), RATE), 99)
    assert gapped == flushed


def test_a_replay_from_any_checkpoint_repeats_the_same_segments() -> None:
    x = np.concatenate([silence(1.3), tone(1.7), silence(2.2), tone(3.1), silence(1.5),
                        tone(0.8), silence(3)])
    cs = chunks("s", T0, x, 0.07)
    tr = StreamTranscriber("s", CutConfig(), CountingEngine(), EnergyVad())
    out: list[wire.TranscriptSegment] = []
    seen: list[tuple[Checkpoint, int | None, int]] = []
    for k, c in enumerate(cs):
        out += tr.add(c, k)
        assert tr.checkpoint is not None
        seen.append((tr.checkpoint, tr.needed_token, k))
    assert sum(s.final for s in out) == 3
    for cp, needed, k in seen[::5]:
        # a restart reads from the needed record on (none: from the next one), and a few
        # earlier records, which it skips
        start = k + 1 if needed is None else needed
        again = StreamTranscriber("s", CutConfig(), CountingEngine(), EnergyVad(), cp)
        redo = []
        for j, c in enumerate(cs[max(0, start - 3):], start=max(0, start - 3)):
            redo += again.add(c, j)
        published_after = [s for s in out if s.seq >= cp.next_seq]
        assert redo == published_after


def test_a_replay_flushes_where_the_checkpoint_says_an_idle_flush_happened() -> None:
    """The producer stalls mid-utterance, the stream is flushed, then its audio goes on
    without a gap. A replay from the checkpoint the flush was committed with (the state
    before it, plus where it happened) repeats the flushed run's segments; without that
    mark it ends the utterance elsewhere (the case the mark is for)."""
    x = np.concatenate([silence(1), tone(3), silence(1.5), tone(1), silence(2)])
    cs = chunks("s", T0, x)
    stall = 22  # chunks before the stall: mid-tone
    tr = StreamTranscriber("s", CutConfig(), CountingEngine(), EnergyVad())
    out = []
    for k, c in enumerate(cs[:stall]):
        out += tr.add(c, k)
    assert tr.in_utterance and tr.checkpoint is not None and tr.position_ns is not None
    committed = Checkpoint(tr.checkpoint.next_seq, tr.checkpoint.epoch_ns, tr.position_ns)
    needed = tr.needed_token
    out += tr.flush()
    assert tr.checkpoint is not None and tr.checkpoint.flush_at_ns is None
    for k, c in enumerate(cs[stall:], start=stall):
        out += tr.add(c, k)
    published_after = [s for s in out if s.seq >= committed.next_seq]
    assert sum(s.final for s in published_after) == 3  # the cut tone's two parts, the next

    def replay(cp: Checkpoint) -> tuple[list[wire.TranscriptSegment], list[Checkpoint]]:
        again = StreamTranscriber("s", CutConfig(), CountingEngine(), EnergyVad(), cp)
        redo, cps = [], []
        for j, c in enumerate(cs[needed:], start=needed):
            redo += again.add(c, j)
            assert again.checkpoint is not None
            cps.append(again.checkpoint)
        return redo, cps

    redo, cps = replay(committed)
    assert redo == published_after
    # until the replay reaches the flush, its checkpoint keeps the mark (a second crash
    # flushes there too); after it, the mark is spent
    assert cps[stall - needed - 2] == committed and cps[stall - needed - 1].flush_at_ns is None
    unmarked, _ = replay(Checkpoint(committed.next_seq, committed.epoch_ns))
    assert unmarked != published_after


def test_copies_and_overlaps_are_skipped_sample_exactly() -> None:
    x = np.concatenate([silence(1), tone(1.5), silence(2)])
    cs = chunks("s", T0, x)
    _, plain = run(x)
    tr = StreamTranscriber("s", CutConfig(), CountingEngine(), EnergyVad())
    out = []
    for k, c in enumerate(cs):
        out += tr.add(c, k)
        out += tr.add(c, k)  # a copy (a producer retry)
    assert out == plain and tr.stats.skipped["old"] == len(cs)


def test_other_rates_and_channels_keep_the_event_times() -> None:
    x = np.concatenate([silence(1), tone(1.5), silence(2)])
    x48 = np.repeat(x, 3)  # 48 kHz, stereo below
    tr = StreamTranscriber("s", CutConfig(), CountingEngine(), EnergyVad())
    segs = []
    step = 4800
    for k, i in enumerate(range(0, len(x48), step)):
        part = np.stack([x48[i:i + step]] * 2, axis=1)
        segs += tr.add(wire.AudioChunk.from_samples("s", T0 + i * NS // 48_000, k, part,
                                                    48_000), k)
    f = [s for s in segs if s.final]
    assert len(f) == 1
    assert T0 + int(0.65 * NS) <= f[0].start_ns <= T0 + NS + NS // 10
    assert abs(f[0].end_ns - (T0 + int(2.5 * NS))) < NS // 2


@pytest.mark.parametrize("bad", [CutConfig(partial_interval_ms=0), CutConfig(onset_ms=30)])
def test_settings_variants_still_give_one_final(bad: CutConfig) -> None:
    _, segs = run(np.concatenate([silence(1), tone(1.5), silence(2)]), bad)
    assert sum(s.final for s in segs) == 1
