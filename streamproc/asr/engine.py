"""Speech recognisers for ``streamproc asr``: the protocol, the default engine, loading one.

An engine hands out one :class:`Utterance` at a time per stream: 16 kHz mono s16le PCM is
fed as it comes, :meth:`Utterance.partial` is the hypothesis so far and
:meth:`Utterance.finish` the final one with word timings in samples from the utterance's
first sample. The caller maps samples to event time, so an engine never sees a clock.

An engine must be deterministic: the same audio fed in the same pieces gives the same
text and timings, whatever it decoded before. A worker that replays audio after a crash
relies on it to publish the same segments (the aligner then drops them as duplicates).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from streamproc.errors import UserError
from streamproc.plugins import import_factory

SAMPLE_RATE = 16_000  # what every engine is fed
DEFAULT_ENGINE = "streamproc.asr.engine:pocketsphinx_engine"


@dataclass(frozen=True, slots=True)
class WordTiming:
    """One word at samples ``[start, end)`` counted from the utterance's first sample."""

    text: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Hypothesis:
    text: str
    words: tuple[WordTiming, ...] = ()
    confidence: float | None = None


class Utterance(Protocol):
    def feed(self, pcm: bytes) -> None:
        """More audio: 16 kHz mono s16le."""

    def partial(self) -> str:
        """The text so far (may be revised)."""

    def finish(self) -> Hypothesis:
        """The final hypothesis; the utterance is over (its resources go back)."""

    def abort(self) -> None:
        """Drop the utterance without a result (its resources go back)."""


class Engine(Protocol):
    name: str

    def start(self) -> Utterance:
        """A new utterance, independent of every utterance before it."""


# --- pocketsphinx ----------------------------------------------------------------------

# pocketsphinx's own search settings: narrower beams without the second (flat-lexicon)
# pass halve the decoding time but lose digits and short words (docs/benchmarks.md, ASR).
SPHINX_CONFIG: dict[str, Any] = {}
_FILLER = re.compile(r"^[<\[+].*[>\]+]$")  # <s>, </s>, <sil>, [NOISE], +breath+
_ALTERNATE = re.compile(r"\(\d+\)$")  # the(2): a dictionary pronunciation variant


class SphinxEngine:
    """pocketsphinx 5 with the US English model its wheel ships.

    A decoder holds ~90 MB and takes ~0.3 s to load, so decoders are pooled: an utterance
    borrows one and gives it back when it ends (a worker needs as many as it has
    utterances in progress at once). Each utterance starts with a fresh front end
    (``reinit_feat``, ~0.1 ms): the cepstral mean and the noise estimate adapt as a
    decoder listens, and a decoder that heard other audio before otherwise places words
    a frame or two differently, which moves a final's span and so its duplicate key.
    """

    name = "pocketsphinx"

    def __init__(self, grammar: str | None = None, **config: Any) -> None:
        """``grammar``: a JSGF grammar the decoder is held to instead of the language
        model; ``config``: pocketsphinx options."""
        import pocketsphinx

        self._ps = pocketsphinx
        self._grammar = grammar
        self._config = {**SPHINX_CONFIG, **config, "samprate": SAMPLE_RATE,
                        "loglevel": "FATAL"}
        if grammar is not None:
            self._config["lm"] = None
        self._free: list[Any] = []
        self._lock = threading.Lock()
        first = self._ps.Decoder(**self._config)
        frate = int(first.config["frate"])
        self.samples_per_frame = SAMPLE_RATE // frate
        self._free.append(self._ready(first))

    def _new_decoder(self) -> Any:
        return self._ready(self._ps.Decoder(**self._config))

    def _ready(self, dec: Any) -> Any:
        """A new decoder, held to the grammar if there is one."""
        if self._grammar is not None:
            dec.add_jsgf_string("grammar", self._grammar)
            dec.activate_search("grammar")
        return dec

    def start(self) -> _SphinxUtterance:
        with self._lock:
            dec = self._free.pop() if self._free else None
        if dec is None:
            dec = self._new_decoder()
        dec.reinit_feat()
        dec.start_utt()
        return _SphinxUtterance(self, dec)

    def prepare(self, decoders: int) -> None:
        """Have ``decoders`` loaded before the first utterance: each stream in an utterance
        holds one, and loading one on the hot path would delay every stream of the process."""
        with self._lock:
            missing = decoders - len(self._free)
        for _ in range(missing):
            dec = self._new_decoder()
            with self._lock:
                self._free.append(dec)

    def _give_back(self, dec: Any) -> None:
        with self._lock:
            self._free.append(dec)

    @property
    def pooled(self) -> int:
        return len(self._free)


class _SphinxUtterance:
    def __init__(self, engine: SphinxEngine, dec: Any) -> None:
        self._engine = engine
        self._dec: Any = dec

    def feed(self, pcm: bytes) -> None:
        if pcm:
            self._dec.process_raw(pcm)

    def partial(self) -> str:
        hyp = self._dec.hyp()
        return "" if hyp is None else _clean(hyp.hypstr)

    def finish(self) -> Hypothesis:
        dec, self._dec = self._dec, None
        try:
            dec.end_utt()
            hyp = dec.hyp()
            spf = self._engine.samples_per_frame
            words = tuple(
                WordTiming(_ALTERNATE.sub("", s.word), s.start_frame * spf,
                           (s.end_frame + 1) * spf)
                for s in (dec.seg() or ()) if not _FILLER.match(s.word))
            text = "" if hyp is None else _clean(hyp.hypstr)
        finally:
            self._engine._give_back(dec)
        return Hypothesis(text, words)

    def abort(self) -> None:
        if self._dec is not None:
            dec, self._dec = self._dec, None
            try:
                dec.end_utt()
            finally:
                self._engine._give_back(dec)


def _clean(text: str) -> str:
    return " ".join(_ALTERNATE.sub("", w) for w in text.split() if not _FILLER.match(w))


def pocketsphinx_engine() -> SphinxEngine:
    """The default engine (``--asr-engine streamproc.asr.engine:pocketsphinx_engine``)."""
    return SphinxEngine()


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")


def pocketsphinx_digits() -> SphinxEngine:
    """pocketsphinx held to the ten digit words (a JSGF grammar instead of the language
    model): the demo's clips say nothing else, and in their noise (-10 to 10 dB SNR) the
    open vocabulary hears words in the noise (docs/benchmarks.md, ASR)."""
    return SphinxEngine(grammar="#JSGF V1.0;\ngrammar digits;\npublic <digits> = ( "
                        + " | ".join(DIGIT_WORDS) + " )* ;\n")


def load_engine(spec: str) -> Engine:
    """An engine from ``package.module:factory``; ``factory()`` takes no arguments."""
    obj = import_factory(spec, "asr engine")
    engine = obj()
    if not callable(getattr(engine, "start", None)):
        raise UserError(f"asr engine {spec!r} returned {type(engine).__name__}, which has "
                        "no start() (docs/asr.md, engines)")
    return engine
