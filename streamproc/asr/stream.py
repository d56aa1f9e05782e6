"""One stream's speech recognition: audio chunks in, transcript segments out (pure logic).

Audio is cut into 30 ms frames on a grid that starts at the stream's last *checkpoint*;
voice activity cuts utterances; each utterance is fed to the engine as it grows, with a
partial segment every ``partial_interval_ms`` of utterance audio and one final segment
when it ends (``end_silence_ms`` without voice, ``max_utterance_ms`` reached, or the
audio stops: a jump forward in event time of more than ``gap_ms``, or :meth:`flush`).

Segment times are sample times: sample ``i`` of a chunk is at ``ts_ns + i / rate``.

Replays. After each final, and after each ``checkpoint_ms`` of silence, the transcriber
is back in its initial state at a known sample time: a :class:`Checkpoint` ``(next_seq,
epoch_ns)``. Everything that follows is a function of the audio from ``epoch_ns`` on, so
a transcriber restored from a checkpoint and fed the same records again (those before
the checkpoint are skipped sample-exactly) publishes the same segments with the same
``sp-seq`` and spans: copies the aligner counts once. Only the idle :meth:`flush` looks
at no audio; it ends an utterance where a gap in the audio would have ended it too. A
checkpoint can name where a flush happened (``flush_at_ns``, the stream's position then):
a transcriber resumed from it flushes when its audio reaches that point again, so even
the segments of a flush replay as copies.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from streamproc.asr.engine import SAMPLE_RATE, Engine, Hypothesis, Utterance
from streamproc.asr.vad import FRAME_SAMPLES, Vad
from streamproc.wire.codec import AudioChunk, TranscriptSegment, Word, samples_to_ns


@dataclass(frozen=True, slots=True)
class CutConfig:
    """How utterances are cut (milliseconds of audio, i.e. of event time)."""

    end_silence_ms: int = 500
    onset_ms: int = 90  # voice this long starts an utterance
    preroll_ms: int = 300  # audio kept before the onset (word starts are quiet)
    partial_interval_ms: int = 1000  # 0: finals only
    max_utterance_ms: int = 15_000
    gap_ms: int = 1000
    checkpoint_ms: int = 1000
    lang: str | None = "en"

    def frames(self, ms: int) -> int:
        return max(1, round(ms * SAMPLE_RATE / 1000 / FRAME_SAMPLES))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a stream can resume: nothing before ``epoch_ns`` is needed again;
    ``flush_at_ns``: an idle flush happened once the audio reached this event time."""

    next_seq: int
    epoch_ns: int
    flush_at_ns: int | None = None


class SkipReason(StrEnum):
    """Why (part of) an audio chunk was not transcribed."""

    OLD = "old"  # every sample is before the stream's position (a replay or a copy)
    EMPTY = "empty"  # no samples


@dataclass
class StreamStats:
    chunks: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    utterances: int = 0
    partials: int = 0
    finals: int = 0
    empty_finals: int = 0  # nothing recognised after partials said something
    cut_at_max: int = 0
    ended_by_gap: int = 0


def to_16k_mono(chunk: AudioChunk) -> np.ndarray:
    """The chunk's samples as 16 kHz mono int16 (channels averaged, rate converted)."""
    x = chunk.samples()
    mono = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)
    if chunk.sample_rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        g = np.gcd(chunk.sample_rate, SAMPLE_RATE)
        mono = resample_poly(mono, SAMPLE_RATE // g, chunk.sample_rate // g)
    return np.clip(np.round(mono * 32767.0), -32768, 32767).astype("<i2")


class StreamTranscriber:
    """Transcribes one stream; see the module docstring. Not thread-safe.

    ``add(chunk, token)``: ``token`` is where the chunk came from (its Kafka offset);
    :attr:`needed_token` is the oldest token whose audio a restart would need again.
    """

    def __init__(self, stream_id: str, cfg: CutConfig, engine: Engine, vad: Vad,
                 resume: Checkpoint | None = None) -> None:
        self.stream_id = stream_id
        self.cfg = cfg
        self.engine = engine
        self.vad = vad
        self.stats = StreamStats()
        self._next_seq = resume.next_seq if resume else 0
        self._epoch_seq = self._next_seq  # the seq the stream had at its checkpoint
        self._pos_ns: int | None = resume.epoch_ns if resume else None
        self._epoch_ns: int | None = self._pos_ns
        self._flush_at = resume.flush_at_ns if resume else None
        self._n = 0  # 16 kHz samples accepted so far (an index of this object's own)
        self._epoch = 0
        # (first sample, sample 0 of its chunk, chunk ts_ns): sample times, by bisection
        self._anchors: list[tuple[int, int, int]] = []
        self._tokens: collections.deque[tuple[int, int]] = collections.deque()
        self._pending = np.zeros(0, "<i2")  # samples short of a full frame
        self._onset = cfg.frames(cfg.onset_ms)
        self._pre: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=max(self._onset, cfg.frames(cfg.preroll_ms)))
        self._voiced_run = 0
        self._utt: Utterance | None = None
        self._utt_start = 0
        self._utt_end = 0
        self._last_voiced_end = 0
        self._trailing = 0
        self._next_partial = 0
        self._last_partial = ""
        self._partials_sent = 0

    # --- state -----------------------------------------------------------------------

    @property
    def checkpoint(self) -> Checkpoint | None:
        if self._epoch_ns is None:
            return None
        return Checkpoint(self._epoch_seq, self._epoch_ns, self._flush_at)

    @property
    def position_ns(self) -> int | None:
        """Event time just after the last sample had; None before any."""
        return self._pos_ns

    @property
    def needed_token(self) -> int | None:
        return self._tokens[0][0] if self._tokens else None

    @property
    def in_utterance(self) -> bool:
        return self._utt is not None

    def close(self) -> None:
        """Drop the utterance in progress (a revoked partition: another worker replays it)."""
        if self._utt is not None:
            self._utt.abort()
            self._utt = None

    # --- input -----------------------------------------------------------------------

    def add(self, chunk: AudioChunk, token: int = -1) -> list[TranscriptSegment]:
        return self.add_pcm(chunk.ts_ns, to_16k_mono(chunk), token)

    def add_pcm(self, ts: int, x: np.ndarray, token: int = -1) -> list[TranscriptSegment]:
        """A chunk already converted by :func:`to_16k_mono`: its first sample is at ``ts``
        (ns). Decoding processes get audio in this form, not as wire records."""
        self.stats.chunks += 1
        m = len(x)
        if m == 0:
            self.stats.skipped[SkipReason.EMPTY] += 1
            return []
        out: list[TranscriptSegment] = []
        i0 = 0
        if self._pos_ns is None:
            self._epoch_ns = ts
        else:
            pos = self._pos_ns
            if ts + samples_to_ns(m, SAMPLE_RATE) <= pos:
                self.stats.skipped[SkipReason.OLD] += 1
                return []
            if ts > pos + self.cfg.gap_ms * 1_000_000:
                out += self._end_utterance(gap=True)
                self._reset(self._n, ts)
            elif ts < pos:  # overlaps what was had: its first samples are copies
                i0 = _first_at_or_after(ts, pos, m)
        base = self._n - i0
        self._anchors.append((self._n, base, ts))
        self._n += m - i0
        self._pos_ns = ts + samples_to_ns(m, SAMPLE_RATE)
        self._tokens.append((token, self._n))
        buf = np.concatenate([self._pending, x[i0:]]) if len(self._pending) else x[i0:]
        start = self._n - len(buf)
        k = 0
        while k + FRAME_SAMPLES <= len(buf):
            out += self._frame(start + k, buf[k:k + FRAME_SAMPLES].tobytes())
            k += FRAME_SAMPLES
        self._pending = buf[k:].copy()
        if self._flush_at is not None and self._pos_ns >= self._flush_at:
            out += self.flush()  # where the flush this checkpoint names happened
        return out

    def flush(self) -> list[TranscriptSegment]:
        """The stream's audio stopped (idle): end the utterance in progress, if any."""
        self._flush_at = None
        if self._utt is None:
            return []
        out = self._end_utterance(gap=True)
        self._reset(self._n, self._pos_ns)
        return out

    # --- frames ----------------------------------------------------------------------

    def _frame(self, f0: int, frame: bytes) -> list[TranscriptSegment]:
        cfg = self.cfg
        f1 = f0 + FRAME_SAMPLES
        voiced = self.vad.is_speech(frame)
        if self._utt is None:
            self._pre.append((f0, frame))
            self._voiced_run = self._voiced_run + 1 if voiced else 0
            if self._voiced_run >= self._onset:
                self._start_utterance()
            elif not self._voiced_run and f1 - self._epoch >= _samples(cfg.checkpoint_ms):
                self._reset(f1)
            return []
        self._utt.feed(frame)
        self._utt_end = f1
        if voiced:
            self._trailing = 0
            self._last_voiced_end = f1
        else:
            self._trailing += 1
        if self._trailing >= cfg.frames(cfg.end_silence_ms):
            out = self._end_utterance()
        elif f1 - self._utt_start >= _samples(cfg.max_utterance_ms):
            self.stats.cut_at_max += 1
            out = self._end_utterance()
        else:
            if cfg.partial_interval_ms and f1 - self._utt_start >= self._next_partial:
                self._next_partial += _samples(cfg.partial_interval_ms)
                return self._partial()
            return []
        self._reset(f1)
        return out

    def _start_utterance(self) -> None:
        self.stats.utterances += 1
        utt = self.engine.start()
        self._utt = utt
        self._utt_start = self._pre[0][0]
        for _, fr in self._pre:
            utt.feed(fr)
        self._utt_end = self._last_voiced_end = self._pre[-1][0] + FRAME_SAMPLES
        self._pre.clear()
        self._trailing = 0
        self._next_partial = _samples(self.cfg.partial_interval_ms)
        self._last_partial = ""
        self._partials_sent = 0

    def _partial(self) -> list[TranscriptSegment]:
        assert self._utt is not None
        text = self._utt.partial()
        if not text or text == self._last_partial:
            return []
        self._last_partial = text
        self._partials_sent += 1
        self.stats.partials += 1
        return [self._segment(text, self._time(self._utt_start), self._time(self._utt_end),
                              final=False)]

    def _end_utterance(self, gap: bool = False) -> list[TranscriptSegment]:
        utt, self._utt = self._utt, None
        if utt is None:
            return []
        if gap:
            self.stats.ended_by_gap += 1
        hyp: Hypothesis = utt.finish()
        start, end = self._utt_start, self._utt_end
        words = self._words(hyp, start, end)
        if words:
            s_ns, e_ns = words[0].start_ns, words[-1].end_ns
        else:
            s_ns, e_ns = self._time(start), self._time(max(self._last_voiced_end, start))
        if not hyp.text and not self._partials_sent:
            return []  # a noise the detector took for voice, and nothing was said about it
        if not hyp.text:
            self.stats.empty_finals += 1
        self.stats.finals += 1
        return [self._segment(hyp.text, s_ns, e_ns, final=True, words=words or None,
                              confidence=hyp.confidence)]

    def _words(self, hyp: Hypothesis, start: int, end: int) -> tuple[Word, ...]:
        out: list[Word] = []
        prev_s = prev_e = None
        for w in hyp.words:
            a = min(max(start + w.start, start), end)
            b = min(max(start + w.end, a), end)
            ws, we = self._time(a), self._time(b)
            if we <= ws:
                continue  # nothing of it is inside the audio fed
            if prev_s is not None and prev_e is not None:
                ws, we = max(ws, prev_s), max(we, prev_e)
            out.append(Word(w.text, ws, we))
            prev_s, prev_e = ws, we
        return tuple(out)

    def _segment(self, text: str, start_ns: int, end_ns: int, *, final: bool,
                 words: tuple[Word, ...] | None = None,
                 confidence: float | None = None) -> TranscriptSegment:
        seg = TranscriptSegment(self.stream_id, self._next_seq, text, start_ns,
                                max(end_ns, start_ns), final, confidence, self.cfg.lang,
                                None, words)
        self._next_seq += 1
        return seg

    # --- time ------------------------------------------------------------------------

    def _time(self, i: int) -> int:
        """Event time (ns) of sample ``i``, by the chunk it came in."""
        k = bisect.bisect_right(self._anchors, i, key=lambda a: a[0]) - 1
        _, base, ts = self._anchors[max(k, 0)]
        return ts + samples_to_ns(i - base, SAMPLE_RATE)

    def _reset(self, at: int, at_ns: int | None = None) -> None:
        """Back to the initial state at sample ``at``: a checkpoint."""
        # the voice detector adapts as it listens; a stream resumed here starts a new one
        self.vad.reset()
        self._epoch = at
        self._epoch_seq = self._next_seq
        self._epoch_ns = self._time(at) if at_ns is None else at_ns
        self._pre.clear()
        self._voiced_run = 0
        self._trailing = 0
        if at >= self._n:  # at the end of what came: no partial frame carries over
            self._pending = np.zeros(0, "<i2")
        while self._tokens and self._tokens[0][1] <= at:
            self._tokens.popleft()
        k = bisect.bisect_right(self._anchors, at, key=lambda a: a[0]) - 1
        if k > 0:
            del self._anchors[:k]


def _samples(ms: int) -> int:
    return ms * SAMPLE_RATE // 1000


def _first_at_or_after(ts: int, pos: int, m: int) -> int:
    """The first index i < m with ts + samples_to_ns(i) >= pos."""
    i = min(m, max(0, (pos - ts) * SAMPLE_RATE // 1_000_000_000))
    while i < m and ts + samples_to_ns(i, SAMPLE_RATE) < pos:
        i += 1
    while i > 0 and ts + samples_to_ns(i - 1, SAMPLE_RATE) >= pos:
        i -= 1
    return i
