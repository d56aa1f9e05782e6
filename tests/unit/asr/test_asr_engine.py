"""The pocketsphinx engine on real synthesized speech, and loading engines by import path."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from asr_helpers import NS, RATE, SENTENCES, VOICES, chunks, speech_track

from streamproc.asr.engine import SphinxEngine, load_engine
from streamproc.asr.stream import CutConfig, StreamTranscriber
from streamproc.asr.vad import EnergyVad, VadKind, WebrtcVad, make_vad
from streamproc.errors import UserError

T0 = 1_700_000_000 * NS


@pytest.fixture(scope="module")
def engine() -> SphinxEngine:
    return SphinxEngine()


@pytest.mark.slow
def test_spoken_words_come_out_timed_inside_the_speech(engine: SphinxEngine,
                                                      avdigits_tts: Path) -> None:
    x, spoken = speech_track(SENTENCES[:2], VOICES[0], avdigits_tts, pauses_s=(3.5,))
    tr = StreamTranscriber("cam1", CutConfig(), engine, WebrtcVad())
    segs = []
    for k, c in enumerate(chunks("cam1", T0, x)):
        segs += tr.add(c, k)
    finals = [s for s in segs if s.final]
    assert len(finals) == len(spoken)
    for f, said in zip(finals, spoken, strict=True):
        hits = set(f.text.split()) & set(said.text.split())
        assert len(hits) >= len(said.text.split()) // 2, (f.text, said.text)
        # inside the speech, give or take the detector's pre-roll and the word edges
        assert T0 + said.start_ns - NS // 3 <= f.start_ns < f.end_ns
        assert f.end_ns <= T0 + said.end_ns + NS // 3
        assert f.words and all(f.start_ns <= w.start_ns < w.end_ns <= f.end_ns
                               for w in f.words)
    assert any(not s.final for s in segs)  # partials while the speech went on


@pytest.mark.slow
def test_each_utterance_is_independent_of_the_decoders_history(avdigits_tts: Path) -> None:
    """A pooled decoder that heard other audio first (speech of both voices, quiet and loud,
    and noise) gives the same words, to the frame, as a fresh one: a replayed final keeps
    its span, so the aligner counts it once."""

    def pcm(sentence: int, voice: int, lead_s: float, level: float = 0.5) -> bytes:
        x, _ = speech_track(SENTENCES[sentence:sentence + 1], VOICES[voice], avdigits_tts,
                            lead_s=lead_s, tail_s=0.5, level=level)
        return (x * 32767).astype("<i2").tobytes()

    def decode(engine: SphinxEngine, audio: bytes) -> object:
        u = engine.start()
        for i in range(0, len(audio), 960):
            u.feed(audio[i:i + 960])
            u.partial()
        return u.finish()

    noise = (np.random.default_rng(0).normal(0, 0.05, 2 * RATE) * 32767).astype("<i2")
    heard = [pcm(s, v, lead, level) for s in range(4) for v in range(2) for lead in (0.1, 0.6)
             for level in (0.2, 0.9)] + [noise.tobytes()]
    target = pcm(0, 1, 0.3)
    fresh = decode(SphinxEngine(), target)
    used = SphinxEngine()
    for k in range(2):
        for audio in random.Random(10 + k).sample(heard, 3):
            decode(used, audio)  # the pool hands the same decoder back each time
        assert decode(used, target) == fresh
    assert used.pooled >= 1


def test_vad_kinds() -> None:
    assert isinstance(make_vad(VadKind.ENERGY), EnergyVad)
    assert isinstance(make_vad("webrtc", 3), WebrtcVad)
    assert not WebrtcVad().is_speech(bytes(960)) and not EnergyVad().is_speech(bytes(960))


def test_engines_load_by_import_path() -> None:
    eng = load_engine("asr_helpers:counting_engine")
    assert eng.name == "counting"
    for bad, why in [("nope", "package.module:factory"), ("no_such_mod:f", "cannot import"),
                     ("asr_helpers:missing", "has no"), ("asr_helpers:RATE", "not callable"),
                     ("asr_helpers:Spoken", "Spoken")]:
        with pytest.raises((UserError, TypeError), match=why):
            load_engine(bad)


def test_a_grammar_engine_serves_utterances_at_once(avdigits_tts: Path) -> None:
    from streamproc.asr.engine import pocketsphinx_digits

    engine = pocketsphinx_digits()
    x, _ = speech_track(("seven three one five",), VOICES[0], avdigits_tts, tail_s=0.5)
    pcm = (x * 32767).astype("<i2").tobytes()
    a, b = engine.start(), engine.start()  # two streams speaking: a second decoder
    for u in (a, b):
        u.feed(pcm)
    assert a.finish().text == b.finish().text == "seven three one five"
    assert engine.pooled == 2


@pytest.mark.slow
def test_streams_decoded_side_by_side_give_what_each_gives_alone(avdigits_tts: Path) -> None:
    """Utterances of four streams overlap, so the pooled decoders change hands between
    streams: each stream's segments are still those it gets decoded on its own (what a
    worker that replays one stream after a crash relies on)."""
    from streamproc.ml.avdigits import synthesize

    records = []
    for k in range(4):
        x = np.zeros(11 * RATE, np.float32)
        for i in range(2):
            said = 0.5 * synthesize(VOICES[(k + i) % 2], SENTENCES[(k + i) % 4], 1.0, 0, RATE,
                                    avdigits_tts)
            at = i * 6 * RATE + RATE // 2 + k * RATE // 5
            x[at:at + len(said)] = said
        records += chunks(f"s{k}", T0, x)
    alone = {}
    one_by_one = SphinxEngine()
    for k in range(4):
        tr = StreamTranscriber(f"s{k}", CutConfig(), one_by_one, WebrtcVad())
        alone[f"s{k}"] = [s for c in records if c.stream_id == f"s{k}" for s in tr.add(c)]
    shared = SphinxEngine()
    trs = {sid: StreamTranscriber(sid, CutConfig(), shared, WebrtcVad()) for sid in alone}
    together: dict[str, list] = {sid: [] for sid in alone}
    for c in sorted(records, key=lambda r: r.ts_ns):
        together[c.stream_id] += trs[c.stream_id].add(c)
    assert together == alone
    assert all(any(s.final for s in segs) for segs in alone.values())


@pytest.mark.slow
def test_a_stream_resumed_at_a_checkpoint_publishes_the_same_segments(
        avdigits_tts: Path) -> None:
    """What a worker that takes a partition over does: resume at a checkpoint, read the
    audio again from the oldest record it needs, and publish copies of what was published
    (the voice detector starts afresh at every checkpoint, so it must here too)."""
    from streamproc.ml.avdigits import synthesize

    engine = SphinxEngine()
    x = np.zeros(17 * RATE, np.float32)
    for i in range(3):
        said = 0.5 * synthesize(VOICES[(1 + i) % 2], SENTENCES[(1 + i) % 4], 1.0, 0, RATE,
                                avdigits_tts)
        at = i * 6 * RATE + RATE // 2 + RATE // 5
        x[at:at + len(said)] = said
    records = chunks("s", T0, x)
    tr = StreamTranscriber("s", CutConfig(), engine, WebrtcVad())
    segs, states = [], []
    for k, c in enumerate(records):
        segs += tr.add(c, k)
        states.append((tr.checkpoint, tr.needed_token))
    published = {s.seq: s for s in segs}
    assert sum(s.final for s in segs) == 3
    replayed = 0
    for cut in range(20, 160, 20):
        checkpoint, needed = states[cut]
        again = StreamTranscriber("s", CutConfig(), engine, WebrtcVad(), checkpoint)
        start = cut + 1 if needed is None else needed
        replay = [s for k, c in enumerate(records[start:], start) for s in again.add(c, k)]
        assert all(s == published.get(s.seq) for s in replay), cut
        replayed += len(replay)
    assert replayed > len(segs)
