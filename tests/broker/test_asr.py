"""``streamproc asr`` against the real broker, with real synthesized speech."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from asr_helpers import (
    NS,
    RATE,
    SENTENCES,
    VOICES,
    AsrProc,
    Published,
    asr_settings,
    chunks,
    finals_of,
    publish,
    read_segments,
    speech_track,
)
from worker_helpers import keys_on_partitions, partition_of

from streamproc import kafka
from streamproc.asr.engine import SphinxEngine
from streamproc.asr.stream import StreamTranscriber
from streamproc.asr.vad import make_vad
from streamproc.asr.worker import cut_config
from streamproc.config import Settings
from streamproc.ml.avdigits import synthesize
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _overlap(text: str, said: str) -> int:
    return len(set(text.split()) & set(said.split()))


def test_speech_becomes_timed_segments_silence_none_and_a_dead_mic_its_final(
        kafka_bootstrap: str, avdigits_tts: Path, tmp_path: Path) -> None:
    settings = asr_settings(kafka_bootstrap)
    create_topics(settings)
    t0 = (time.time_ns() // NS - 60) * NS
    tracks = {}
    for sid, voice in (("cam-a", VOICES[0]), ("cam-b", VOICES[1])):
        tracks[sid] = speech_track(SENTENCES[:3], voice, avdigits_tts, pauses_s=(3.0, 5.0))
    cut_x, cut_spoken = speech_track(SENTENCES[3:4], VOICES[0], avdigits_tts, tail_s=0)
    mic_dies = cut_x[:len(cut_x) - int(0.4 * RATE)]  # the microphone stops mid-word
    records = [c for sid, (x, _) in tracks.items() for c in chunks(sid, t0, x)]
    records += chunks("quiet", t0, np.zeros(8 * RATE, np.float32))
    records += chunks("cut", t0, mic_dies)
    publish(settings, sorted(records, key=lambda r: r.ts_ns))
    # bad records among them: a partial sample, and no wire headers at all
    producer = kafka.producer(settings)
    key, _, headers, ts_ms = wire.encode_parts(records[0])
    producer.send(settings.topic("audio"), key=key, value=b"\x01\x02\x03", headers=headers,
                  timestamp_ms=ts_ms)
    producer.send(settings.topic("audio"), key=b"cam-a", value=b"not audio")
    producer.flush(10)
    producer.close()

    asr = AsrProc(settings, tmp_path / "asr.log")
    try:
        want = {"cam-a": 3, "cam-b": 3, "cut": 1}
        pubs = read_segments(settings, lambda ps: all(
            len(finals_of(ps, sid)) >= n for sid, n in want.items()), timeout=120)
    finally:
        assert asr.stop() == 0
    for sid, (_, spoken) in tracks.items():
        finals = finals_of(pubs, sid)
        assert len(finals) == 3, [f.text for f in finals]
        for f, said in zip(finals, spoken, strict=True):
            assert _overlap(f.text, said.text) >= 2, (f.text, said.text)
            # on the audio's timeline, inside the speech (give or take pre-roll and edges)
            assert t0 + said.start_ns - NS // 3 <= f.start_ns < f.end_ns
            assert f.end_ns <= t0 + said.end_ns + NS // 3
            assert f.words and f.lang == "en"
        mine = [p for p in pubs if p.segment.stream_id == sid]
        assert [p.segment.seq for p in mine] == list(range(len(mine)))  # one copy each
        assert any(not p.segment.final for p in mine)  # partials while speech went on
        assert {p.partition for p in mine} == {partition_of(sid, settings.partitions)}
    assert not [p for p in pubs if p.segment.stream_id == "quiet"]
    log = asr.log()  # each bad record skipped with its reason; the alignment worker
    assert "skipped" in log and "partial sample" in log and "missing header sp-v" in log
    (dead,) = finals_of(pubs, "cut")  # flushed once the worker saw no more of its audio
    assert _overlap(dead.text, cut_spoken[0].text) >= 1
    assert t0 + cut_spoken[0].start_ns - NS // 3 <= dead.start_ns
    assert dead.end_ns <= t0 + len(mic_dies) * NS // RATE


def test_kill_9_and_restart_lose_no_final_and_replay_identical_copies(
        kafka_bootstrap: str, avdigits_tts: Path, tmp_path: Path) -> None:
    # The producer stalls between the halves, with cam-b mid-sentence. A worker that saw no
    # audio for gap_ms of wall time would end that utterance there (the idle flush, which
    # the oracle's one continuous feed never does), racing the kill: the stall must not
    # count as the microphone going quiet.
    settings = asr_settings(kafka_bootstrap).replace(asr_gap_ms=600_000)
    create_topics(settings)
    t0 = (time.time_ns() // NS - 60) * NS
    x, spoken = speech_track(SENTENCES[:3], VOICES[1], avdigits_tts, pauses_s=(3.0, 4.0))
    y, _ = speech_track(SENTENCES[1:][::-1], VOICES[0], avdigits_tts, pauses_s=(4.0, 3.0))
    records = chunks("cam-a", t0, x) + chunks("cam-b", t0, y)
    # the oracle: the same transcriber, with the worker's settings, on the same chunks
    engine = SphinxEngine()
    expected: dict[str, list[wire.TranscriptSegment]] = {}
    for sid in ("cam-a", "cam-b"):
        tr = StreamTranscriber(sid, cut_config(settings), engine,
                               make_vad(settings.asr_vad, settings.asr_vad_mode))
        expected[sid] = [s for c in records if c.stream_id == sid for s in tr.add(c)]
    # the first half ends inside the second pause of cam-a
    cut = t0 + spoken[1].end_ns + int(1.5 * NS)
    first = sorted((r for r in records if r.ts_ns < cut), key=lambda r: r.ts_ns)
    rest = sorted((r for r in records if r.ts_ns >= cut), key=lambda r: r.ts_ns)
    publish(settings, first)
    asr = AsrProc(settings, tmp_path / "asr.log")
    try:
        read_segments(settings, lambda ps: len(finals_of(ps)) >= 2, timeout=90)
    finally:
        asr.kill()
    resume_and_compare(settings, rest, expected, tmp_path / "asr.log")


def test_kill_9_right_after_an_idle_flush_replays_the_same_final(
        kafka_bootstrap: str, avdigits_tts: Path, tmp_path: Path) -> None:
    """The producer stalls with cam-b mid-sentence: the worker flushes cam-b's utterance
    (the one decision it takes on the wall clock), publishes that final and is killed at
    once, most likely before its next commit. The audio then goes on without a gap. The
    replay flushes where the first worker did, so every copy of every segment is the
    same as a transcriber's that was flushed at the stall."""
    settings = asr_settings(kafka_bootstrap)
    create_topics(settings)
    t0 = (time.time_ns() // NS - 60) * NS
    x, _ = speech_track(SENTENCES[:3], VOICES[1], avdigits_tts, pauses_s=(3.0, 4.0))
    y, spoken_b = speech_track(SENTENCES[1:][::-1], VOICES[0], avdigits_tts,
                               pauses_s=(4.0, 3.0))
    records = chunks("cam-a", t0, x) + chunks("cam-b", t0, y)
    said = spoken_b[1]
    cut = t0 + (said.start_ns + said.end_ns) // 2  # the middle of cam-b's second sentence
    first = sorted((r for r in records if r.ts_ns < cut), key=lambda r: r.ts_ns)
    rest = sorted((r for r in records if r.ts_ns >= cut), key=lambda r: r.ts_ns)
    engine = SphinxEngine()
    expected: dict[str, list[wire.TranscriptSegment]] = {}
    before_stall: dict[str, list[wire.TranscriptSegment]] = {}
    for sid in ("cam-a", "cam-b"):
        tr = StreamTranscriber(sid, cut_config(settings), engine,
                               make_vad(settings.asr_vad, settings.asr_vad_mode))
        segs = [s for c in first if c.stream_id == sid for s in tr.add(c)]
        segs += tr.flush()  # what the idle flush does (nothing for a stream in a pause)
        before_stall[sid] = segs
        expected[sid] = segs + [s for c in rest if c.stream_id == sid for s in tr.add(c)]
    assert sum(s.final for s in before_stall["cam-b"]) >= 2  # the flushed final among them
    publish(settings, first)
    asr = AsrProc(settings, tmp_path / "asr.log")
    try:
        # the flushed final itself, by seq: a replayed copy of an earlier final (a
        # rebalance, a producer retry) must not stand in for it
        flushed_final = every_final(before_stall)
        flushed = read_segments(settings, flushed_final, timeout=90)
    finally:
        asr.kill()
    assert flushed_final(flushed), \
        f"no idle flush before the kill:\n{asr.log()[-2000:]}"
    resume_and_compare(settings, rest, expected, tmp_path / "asr.log")


def resume_and_compare(settings: Settings, rest: list[wire.AudioChunk],
                       expected: dict[str, list[wire.TranscriptSegment]], log: Path) -> None:
    """Publish the rest of the audio and start a worker again: every final arrives, and
    every copy of a segment is the oracle's, so the aligner counts it once (same seq,
    span, text and words)."""
    publish(settings, rest)
    asr = AsrProc(settings, log)
    try:
        pubs = read_segments(settings, every_final(expected), timeout=120)
    finally:
        assert asr.stop() == 0
    for sid, segs in expected.items():
        got = [p.segment for p in pubs if p.segment.stream_id == sid]
        by_seq = {s.seq: s for s in segs}
        assert {s.seq for s in got if s.final} == {s.seq for s in segs if s.final}, sid
        differ = [(s, by_seq.get(s.seq)) for s in got if not same_segment(s, by_seq.get(s.seq))]
        assert not differ, f"{sid}: {differ}"


def every_final(expected: dict[str, list[wire.TranscriptSegment]]
                ) -> Callable[[list[Published]], bool]:
    """Done once every stream has each of its expected finals (a stream's extra final
    must not make up for another's missing one)."""
    want = {(sid, s.seq) for sid, segs in expected.items() for s in segs if s.final}
    return lambda ps: want <= {(p.segment.stream_id, p.segment.seq) for p in ps
                               if p.segment.final}


def same_segment(got: wire.TranscriptSegment, want: wire.TranscriptSegment | None) -> bool:
    """The copy the aligner counts once: the same seq and span (its duplicate key), and the
    same text, finality and word times (a decoder's history changes none of them)."""
    return want is not None and (got.seq, got.start_ns, got.end_ns, got.text, got.final,
                                 got.words) == (want.seq, want.start_ns, want.end_ns,
                                                want.text, want.final, want.words)


def _final_count(log: str) -> int:
    """Finals the worker published, from its last status line."""
    counts = re.findall(r"(\d+) finals", log)
    assert counts, log[-2000:]
    return int(counts[-1])


def test_a_worker_joining_and_one_leaving_mid_stream_lose_no_final(
        kafka_bootstrap: str, avdigits_tts: Path, tmp_path: Path) -> None:
    """Two `streamproc asr` in one group on a 4-partition audio topic: the second joins
    while the first works through the audio, then the first leaves before the last of it.
    Every final arrives, and every copy of a segment is the oracle's (same seq, same span,
    same text), so the aligner counts each once."""
    settings = asr_settings(kafka_bootstrap).replace(partitions=4, asr_processes="2")
    create_topics(settings)
    t0 = (time.time_ns() // NS - 120) * NS
    slot = 6 * RATE  # a sentence starts every 6 s: each phase ends in a pause of every stream
    sids = keys_on_partitions("mic", settings.partitions)
    records = []
    for k, sid in enumerate(sids):
        x = np.zeros(3 * slot + RATE // 2, np.float32)
        for i in range(3):
            said = 0.5 * synthesize(VOICES[(k + i) % 2], SENTENCES[(k + i) % 4], 1.0, 0, RATE,
                                    avdigits_tts)
            assert len(said) < 3.5 * RATE  # its final is out before the phase's end
            at = i * slot + RATE // 2 + k * RATE // 5
            x[at:at + len(said)] = said
        records += chunks(sid, t0, x)
    engine = SphinxEngine()
    expected: dict[str, dict[int, wire.TranscriptSegment]] = {}
    for sid in sids:
        tr = StreamTranscriber(sid, cut_config(settings), engine,
                               make_vad(settings.asr_vad, settings.asr_vad_mode))
        expected[sid] = {s.seq: s for c in records if c.stream_id == sid for s in tr.add(c)}
        assert sum(s.final for s in expected[sid].values()) == 3, sid
    records.sort(key=lambda r: r.ts_ns)
    phase = [[r for r in records if a * slot * NS // RATE <= r.ts_ns - t0 < b * slot * NS // RATE]
             for a, b in ((0, 2), (2, 4))]

    def finals_by_stream(pubs: list, n: int) -> bool:
        return all(len({p.segment.seq for p in pubs if p.segment.final
                        and p.segment.stream_id == sid}) >= n for sid in sids)

    publish(settings, phase[0])
    a = AsrProc(settings, tmp_path / "asr-a.log")
    b = None
    try:
        # the second worker joins once the first has begun: a rebalance mid-stream
        read_segments(settings, lambda ps: len(finals_of(ps)) >= 1, timeout=120)
        b = AsrProc(settings, tmp_path / "asr-b.log")
        b.wait_for(r"assigned partitions \[\d", timeout=120)
        read_segments(settings, lambda ps: finals_by_stream(ps, 2), timeout=120)
        # the first leaves; the rest of the audio comes while the group hands its
        # partitions over
        assert a.stop() == 0
        publish(settings, phase[1])
        pubs = read_segments(settings, lambda ps: finals_by_stream(ps, 3), timeout=120)
    finally:
        a.abandon()
        if b is not None:
            assert b.stop() == 0
    assert b is not None
    assert "revoked partitions" in a.log()  # both workers held partitions, in turn
    assert len(re.findall(r"assigned partitions \[\d", b.log())) >= 2
    assert _final_count(a.log()) > 0 and _final_count(b.log()) > 0
    for sid in sids:
        got = [p.segment for p in pubs if p.segment.stream_id == sid]
        assert {s.seq for s in got if s.final} == {s.seq for s in expected[sid].values()
                                                   if s.final}, sid
        # duplicates only as copies of the oracle's segments
        differ = [(s, expected[sid].get(s.seq)) for s in got
                  if not same_segment(s, expected[sid].get(s.seq))]
        assert not differ, f"{sid}: {differ}"
