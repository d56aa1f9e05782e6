"""AV-Digits: a deterministic audio-visual digits benchmark built from installed packages.

A *segment* shows one digit for ``segment_s`` seconds: video frames of a real handwritten
digit (scikit-learn's ``load_digits``) upscaled, jittered, noised and sometimes occluded;
audio of the digit spoken by ``flite`` or ``espeak-ng`` (voices, speed, pitch) mixed with
noise at a controlled SNR; an ASR-like transcript span with substitutions, deletions or
nothing at all. Each modality alone is ambiguous by design (like AV-MNIST): occlusion
and noise hide the image, noise and babble hide the voice, transcripts lie or go missing,
each independently of the others, so combining them pays.

A split is one continuous stream of segments; its windows are cut exactly as the aligner
cuts a live stream (epoch-aligned, hop H, length W, K frames: the nearest to the centres of
K equal stretches) and only windows wholly inside one segment are kept. :func:`write_clip`
renders the same segments into real files (MJPG AVI, 16-bit WAV, SRT, labels CSV) for
replay through Kafka, so a model trained on the dataset recognises the clip's windows.

The test split holds out voices, noise seeds and digit images; so does validation (used for
early stopping), with voices of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamproc.align.aligner import Window, pick_indices
from streamproc.config import Modality
from streamproc.errors import UserError
from streamproc.wire.codec import NS_PER_S, TranscriptSegment, VideoFrame, encode_image, pcm_bytes

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LABELS = list(DIGIT_WORDS)
ORIGIN_NS = 1_700_000_000 * NS_PER_S  # event time of a split's first segment (hop-aligned)
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# ASR-like confusions: plausible mishearings into *other digits* (these make text
# ambiguous) and spelling variants of the right one (these test the n-gram hashing).
CONFUSIONS = {
    "zero": ("seven", "three"), "one": ("nine", "four"), "two": ("three", "eight"),
    "three": ("two", "eight"), "four": ("five", "one"), "five": ("nine", "four"),
    "six": ("seven", "eight"), "seven": ("six", "zero"), "eight": ("six", "three"),
    "nine": ("five", "one"),
}
VARIANTS = {
    "zero": ("oh", "zeroh", "cero"), "one": ("won", "wun"), "two": ("to", "too"),
    "three": ("free", "tree"), "four": ("for", "fore"), "five": ("fife", "fiv"),
    "six": ("sicks", "sex"), "seven": ("sevn", "seben"), "eight": ("ate", "eigh"),
    "nine": ("nein", "nyne"),
}
FILLERS = ("uh", "um", "the", "number", "its", "er")


@dataclass(frozen=True)
class Voice:
    engine: str  # "flite" or "espeak-ng"
    name: str  # flite voice, or espeak-ng voice[+variant]
    female: bool = False

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}"


# Each split has its own voices: test and validation voices never speak in training.
TRAIN_VOICES = (
    Voice("flite", "kal16"), Voice("flite", "awb"), Voice("espeak-ng", "en-us"),
    Voice("espeak-ng", "en-gb+f3", True), Voice("espeak-ng", "en-gb-x-rp+m3"),
    Voice("espeak-ng", "en-029+f2", True), Voice("flite", "kal"),
    Voice("espeak-ng", "en-us+m5"), Voice("espeak-ng", "en-gb-x-gbclan+f4", True),
    Voice("espeak-ng", "en-us-nyc+m2"),
)
# Validation voices are new too, so early stopping rewards generalising to new speakers.
VAL_VOICES = (Voice("espeak-ng", "en-us+f4", True), Voice("espeak-ng", "en-gb+m6"))
TEST_VOICES = (
    Voice("flite", "slt", True), Voice("espeak-ng", "en-gb-scotland+m4"),
    Voice("flite", "rms"), Voice("espeak-ng", "en-gb-x-gbcwmd+f1", True),
)
SPEEDS = (1.0, 0.88, 1.14)  # speaking-rate factors (1.0 = the voice's default)
PITCHES = (0, -1, 1)  # default, low, high
NOISE_TYPES = ("white", "pink", "brown", "babble", "hum")


@dataclass(frozen=True)
class AVDigitsConfig:
    """Sizes and difficulty knobs. Presets: :data:`PRESETS`."""

    name: str = "custom"
    train_segments: int = 200
    val_segments: int = 40
    test_segments: int = 80
    train_voices: int = len(TRAIN_VOICES)  # how many of TRAIN_/VAL_/TEST_VOICES to use
    val_voices: int = len(VAL_VOICES)
    test_voices: int = len(TEST_VOICES)
    speeds: int = 3  # how many of SPEEDS / PITCHES to use (from the start)
    pitches: int = 3
    seed: int = 0
    # stream shape: the aligner's defaults (Settings: window_ms, hop_ms, K, sample_rate)
    window_ms: int = 1000
    hop_ms: int = 500
    frames_per_window: int = 8
    sample_rate: int = 16000
    fps: int = 15
    segment_s: float = 2.0
    image_size: int = 64
    jpeg_quality: int = 85
    # difficulty (ambiguity by design)
    snr_db: tuple[float, float] = (-10.0, 10.0)
    video_noise: tuple[float, float] = (0.1, 0.7)  # pixel noise std (image range 0..1)
    occlusion_p: float = 0.55
    text_absent_p: float = 0.3
    text_deleted_p: float = 0.1
    text_wrong_p: float = 0.3
    text_variant_p: float = 0.3
    text_filler_p: float = 0.3
    video_dropout_p: float = 0.04  # camera gone for a whole segment
    audio_dropout_p: float = 0.04  # microphone gone for a whole segment

    def __post_init__(self) -> None:
        if self.window_ms > self.segment_s * 1000:
            raise UserError("AV-Digits: segment_s must be at least one window long")
        if not 1 <= self.train_voices <= len(TRAIN_VOICES):
            raise UserError(f"AV-Digits: train_voices must be 1..{len(TRAIN_VOICES)}")
        if not 1 <= self.val_voices <= len(VAL_VOICES):
            raise UserError(f"AV-Digits: val_voices must be 1..{len(VAL_VOICES)}")
        if not 1 <= self.test_voices <= len(TEST_VOICES):
            raise UserError(f"AV-Digits: test_voices must be 1..{len(TEST_VOICES)}")

    @property
    def n_samples(self) -> int:
        return round(self.window_ms * self.sample_rate / 1000)

    def voices(self, split: str) -> tuple[Voice, ...]:
        if split == "test":
            return TEST_VOICES[:self.test_voices]
        return VAL_VOICES[:self.val_voices] if split == "val" \
            else TRAIN_VOICES[:self.train_voices]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS = {
    # CI: trains in well under two minutes on 2 shared cores
    "tiny": AVDigitsConfig("tiny", train_segments=240, val_segments=40, test_segments=80,
                           train_voices=5, val_voices=1, test_voices=2, speeds=2, pitches=2),
    "small": AVDigitsConfig("small", train_segments=600, val_segments=80, test_segments=200),
    # the benchmark behind docs/models.md: `streamproc eval` on it in ~30 min on 2 cores
    "full": AVDigitsConfig("full", train_segments=1100, val_segments=200, test_segments=320),
}


# ---------------------------------------------------------------------------------------
# speech
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "streamproc" / "avdigits-tts"


def _which(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise UserError(f"{binary} is not installed; AV-Digits needs flite and espeak-ng "
                        "(apt-get install flite espeak-ng, or run scripts/setup)")
    return path


def _tts_command(voice: Voice, text: str, speed: float, pitch: int, out: Path) -> list[str]:
    if voice.engine == "flite":
        f0 = (175 if voice.female else 105) * (1.0 + 0.14 * pitch)
        return [_which("flite"), "-voice", voice.name, "--setf", f"duration_stretch={1 / speed}",
                "--setf", f"int_f0_target_mean={f0:.0f}", "-t", text, "-o", str(out)]
    if voice.engine == "espeak-ng":
        return [_which("espeak-ng"), "-v", voice.name, "-s", str(round(165 * speed)),
                "-p", str(50 + 18 * pitch), "-w", str(out), text]
    raise UserError(f"unknown speech engine {voice.engine!r}")


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a 16-bit PCM WAV."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise UserError(f"{path}: only 16-bit PCM WAV is supported")
        rate, ch = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    return pcm.reshape(-1, ch).mean(1), rate


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV (the wire's float -> s16le conversion)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm_bytes(np.asarray(samples, np.float32).reshape(-1, 1), "s16le"))


def _trim(x: np.ndarray, rate: int, floor_db: float = -40.0) -> np.ndarray:
    """Cut leading/trailing silence (10 ms frames below floor_db of the loudest), keep 20 ms."""
    hop = max(1, rate // 100)
    n = len(x) // hop
    if n == 0:
        return x
    energy = (x[:n * hop].reshape(n, hop) ** 2).mean(1)
    loud = np.nonzero(energy > energy.max() * 10 ** (floor_db / 10))[0]
    pad = 2 * hop
    return x[max(0, loud[0] * hop - pad):min(len(x), (loud[-1] + 1) * hop + pad)]


def synthesize(voice: Voice, text: str, speed: float, pitch: int, sample_rate: int,
               cache_dir: Path | None = None) -> np.ndarray:
    """Speech for ``text`` at ``sample_rate``, trimmed, peak 0.9; cached on disk as WAV."""
    from scipy.signal import resample_poly

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha1(f"{voice.key}|{text}|{speed}|{pitch}|{sample_rate}|v1".encode()
                       ).hexdigest()[:16]
    file = cache / f"{voice.engine}-{voice.name.replace('+', '_')}-{key}.wav"
    if file.exists():
        return read_wav(file)[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        cmd = _tts_command(voice, text, speed, pitch, raw)
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            raise UserError(f"speech synthesis timed out: {' '.join(cmd)}") from None
        if proc.returncode != 0 or not raw.exists():
            raise UserError(f"speech synthesis failed ({' '.join(cmd)}): "
                            f"{proc.stderr.decode(errors='replace').strip()[:300]}")
        x, rate = read_wav(raw)
    if rate != sample_rate:
        g = np.gcd(rate, sample_rate)
        x = resample_poly(x, sample_rate // g, rate // g).astype(np.float32)
    x = _trim(x, sample_rate)
    x = (0.9 * x / max(1e-6, float(np.abs(x).max()))).astype(np.float32)
    tmp_file = file.with_name(file.name + f".{np.random.default_rng().integers(1 << 30)}.tmp")
    write_wav(tmp_file, x, sample_rate)
    tmp_file.replace(file)  # atomic: parallel generators may share the cache
    return read_wav(file)[0]


# ---------------------------------------------------------------------------------------
# segments
# ---------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One rendered digit: frames (ts_ns, BGR image), audio, optional transcript span.

    Times are relative to the segment start, in ns.
    """

    digit: int
    frames: list[tuple[int, np.ndarray]]
    audio: np.ndarray
    transcript: tuple[int, int, str] | None  # (start_ns, end_ns, text)
    video_ok: bool
    audio_ok: bool
    info: dict[str, Any]


_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 handwritten digits (values 0..16) and their targets."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images.astype(np.float32) / 16.0, d.target.astype(np.int64))
    return _DIGITS


def image_pool(split: str) -> dict[int, np.ndarray]:
    """Indices of digit images per class for a split (disjoint: by index mod 5)."""
    _, target = digit_images()
    idx = np.arange(len(target))
    sel = {"train": idx % 5 <= 2, "val": idx % 5 == 3, "test": idx % 5 == 4}[split]
    return {d: idx[sel & (target == d)] for d in range(10)}


def render_frames(img8: np.ndarray, n: int, cfg: AVDigitsConfig, rng: np.random.Generator,
                  info: dict[str, Any]) -> list[np.ndarray]:
    """n BGR frames of one handwritten digit: scale, placement, tint fixed per segment;
    jitter, rotation and noise per frame; an occluder over part of the digit, sometimes."""
    import cv2

    s = cfg.image_size
    scale = rng.uniform(0.6, 0.85) * s
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08, 2) * s
    angle0 = rng.uniform(-12, 12)
    ink, bg = rng.uniform(0.55, 1.0), rng.uniform(0.0, 0.35)
    tint = rng.uniform(0.6, 1.0, 3)
    noise = rng.uniform(*cfg.video_noise)
    digit = cv2.resize(img8, (int(scale), int(scale)), interpolation=cv2.INTER_LINEAR)
    occl = None
    if rng.random() < cfg.occlusion_p:
        # cover 35-55% of the digit's box from one side, or a centred block
        frac = rng.uniform(0.35, 0.55)
        side = int(rng.integers(5))
        half = scale / 2
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        if side == 0:
            y1 = y0 + frac * scale
        elif side == 1:
            y0 = y1 - frac * scale
        elif side == 2:
            x1 = x0 + frac * scale
        elif side == 3:
            x0 = x1 - frac * scale
        else:
            w = scale * np.sqrt(frac)
            x0, y0, x1, y1 = cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2
        occl = (x0, y0, x1, y1, rng.uniform(0.0, 1.0))
    info.update(video_noise=round(float(noise), 3), occluded=occl is not None)
    frames = []
    for _ in range(n):
        canvas = np.full((s, s), bg, np.float32)
        ang = angle0 + rng.uniform(-4, 4)
        dx, dy = rng.uniform(-2, 2, 2)
        m = cv2.getRotationMatrix2D((scale / 2, scale / 2), ang, 1.0)
        m[:, 2] += (cx + dx - scale / 2, cy + dy - scale / 2)
        placed = cv2.warpAffine(digit, m, (s, s), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        canvas = canvas + (ink - bg) * placed
        if occl is not None:
            x0, y0, x1, y1, level = occl
            jx, jy = rng.uniform(-1.5, 1.5, 2)
            canvas[max(0, int(y0 + jy)):max(0, int(y1 + jy)),
                   max(0, int(x0 + jx)):max(0, int(x1 + jx))] = level
        canvas = canvas + rng.normal(0.0, noise, canvas.shape).astype(np.float32)
        bgr = np.clip(canvas[..., None] * tint[None, None] * 255.0, 0, 255).astype(np.uint8)
        frames.append(bgr)
    return frames


def _noise(kind: str, n: int, rate: int, rng: np.random.Generator,
           babble: Callable[[], np.ndarray]) -> np.ndarray:
    if kind == "white":
        x = rng.normal(0, 1, n)
    elif kind in ("pink", "brown"):
        spec = np.fft.rfft(rng.normal(0, 1, n))
        f = np.maximum(np.fft.rfftfreq(n, 1 / rate), 20.0)
        spec /= np.sqrt(f) if kind == "pink" else f
        x = np.fft.irfft(spec, n)
    elif kind == "hum":
        t = np.arange(n) / rate
        base = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * base * h * t + rng.uniform(0, 6.3)) / h for h in range(1, 8))
        x = x + 0.3 * rng.normal(0, 1, n)
    elif kind == "babble":
        x = np.zeros(n)
        for _ in range(3):
            b = babble()
            start = int(rng.integers(-len(b) // 2, n))
            lo, hi = max(0, start), min(n, start + len(b))
            if hi > lo:
                x[lo:hi] += b[lo - start:hi - start]
        x = x + 0.05 * rng.normal(0, 1, n)
    else:
        raise ValueError(kind)
    return np.asarray(x, np.float64)


def asr_transcript(digit: int, cfg: AVDigitsConfig, rng: np.random.Generator,
                   info: dict[str, Any]) -> str | None:
    """ASR-like text for a spoken digit, or None when the recogniser said nothing."""
    word = DIGIT_WORDS[digit]
    if rng.random() < cfg.text_absent_p:
        info["text"] = "absent"
        return None
    if rng.random() < cfg.text_deleted_p:
        info["text"] = "deleted"  # the digit word is lost, a filler remains
        return str(rng.choice(FILLERS))
    kind = "exact"
    if rng.random() < cfg.text_wrong_p:
        word, kind = str(rng.choice(CONFUSIONS[word])), "wrong"
    if rng.random() < cfg.text_variant_p:
        word = str(rng.choice(VARIANTS[word]))
        kind += "+variant"
    words = [word]
    if rng.random() < cfg.text_filler_p:
        words.insert(0 if rng.random() < 0.7 else 1, str(rng.choice(FILLERS)))
    info["text"] = kind
    return " ".join(words)


def render_segment(digit: int, split: str, index: int, cfg: AVDigitsConfig,
                   cache_dir: Path | None = None, image_index: int | None = None) -> Segment:
    """Render segment ``index`` of ``split`` (deterministic in cfg.seed, split, index)."""
    code = SPLIT_CODE[split]
    rng = np.random.default_rng([cfg.seed, code, index])
    noise_seed = (cfg.seed * 1_000_003 + index) * 3 + code  # disjoint across splits
    nrng = np.random.default_rng(noise_seed)
    voices = cfg.voices(split)
    voice = voices[int(rng.integers(len(voices)))]
    speed = SPEEDS[int(rng.integers(cfg.speeds))]
    pitch = PITCHES[int(rng.integers(cfg.pitches))]
    imgs, _ = digit_images()
    if image_index is None:
        pool = image_pool(split)[digit]
        image_index = int(pool[int(rng.integers(len(pool)))])
    info: dict[str, Any] = {"digit": digit, "segment": index, "image_index": image_index,
                            "voice": voice.key, "speed": speed, "pitch": pitch,
                            "noise_seed": noise_seed}

    seg_ns = round(cfg.segment_s * NS_PER_S)
    n_frames = int(cfg.segment_s * cfg.fps)
    video_ok = rng.random() >= cfg.video_dropout_p
    images = render_frames(imgs[image_index], n_frames, cfg, rng, info)
    frames = [(round(j * NS_PER_S / cfg.fps), im) for j, im in enumerate(images)]  # as replay

    sr = cfg.sample_rate
    n = round(cfg.segment_s * sr)
    speech = synthesize(voice, DIGIT_WORDS[digit], speed, pitch, sr, cache_dir)
    speech = speech[:max(1, n - sr // 10)]
    onset = int(rng.integers(sr // 20, max(sr // 20 + 1, n - len(speech) - sr // 20)))
    clean = np.zeros(n)
    clean[onset:onset + len(speech)] = speech * rng.uniform(0.3, 1.0)
    kind = NOISE_TYPES[int(nrng.integers(len(NOISE_TYPES)))]
    snr = float(nrng.uniform(*cfg.snr_db))

    def babble() -> np.ndarray:
        other = int(nrng.choice([d for d in range(10) if d != digit]))
        v = voices[int(nrng.integers(len(voices)))]
        return synthesize(v, DIGIT_WORDS[other], 1.0, 0, sr, cache_dir)

    noise = _noise(kind, n, sr, nrng, babble)
    p_speech = max(float(np.mean(clean[onset:onset + len(speech)] ** 2)), 1e-10)
    p_noise = max(float(np.mean(noise ** 2)), 1e-12)
    mix = clean + noise * np.sqrt(p_speech / (p_noise * 10 ** (snr / 10)))
    peak = float(np.abs(mix).max())
    if peak > 0.95:
        mix *= 0.95 / peak
    audio_ok = rng.random() >= cfg.audio_dropout_p
    info.update(noise=kind, snr_db=round(snr, 2), onset_s=round(onset / sr, 3),
                speech_s=round(len(speech) / sr, 3), video_ok=video_ok, audio_ok=audio_ok)

    text = asr_transcript(digit, cfg, rng, info)
    transcript = None
    if text is not None:
        jitter = rng.uniform(-0.08, 0.08, 2)
        start = max(0, round((onset / sr + jitter[0]) * NS_PER_S))
        end = min(seg_ns, round(((onset + len(speech)) / sr + jitter[1]) * NS_PER_S))
        transcript = (start, max(start + 1, end), text)
    return Segment(digit, frames, mix.astype(np.float32), transcript, video_ok, audio_ok, info)


def segment_windows(seg: Segment, seg_start_ns: int, stream_id: str, cfg: AVDigitsConfig,
                    seq_base: tuple[int, int]) -> list[Window]:
    """Windows wholly inside the segment, cut the way the aligner cuts a live stream.

    ``seq_base`` = (first frame seq, transcript seq) of this segment in its stream.
    """
    win_ns, hop_ns = cfg.window_ms * 1_000_000, cfg.hop_ms * 1_000_000
    seg_end = seg_start_ns + round(cfg.segment_s * NS_PER_S)
    first = -(-seg_start_ns // hop_ns) * hop_ns
    out = []
    segs = []
    if seg.transcript is not None:
        a, b, text = seg.transcript
        segs = [TranscriptSegment(stream_id, seq_base[1], text, seg_start_ns + a,
                                  seg_start_ns + b, True, None, "en")]
    for ws in range(first, seg_end - win_ns + 1, hop_ns):
        we = ws + win_ns
        idx = [j for j, (t, _) in enumerate(seg.frames) if ws <= seg_start_ns + t < we]
        frames = []
        if seg.video_ok:
            times = [seg_start_ns + seg.frames[j][0] for j in idx]
            for j in (idx[i] for i in pick_indices(times, ws, win_ns, cfg.frames_per_window)):
                t, im = seg.frames[j]
                frames.append(VideoFrame(stream_id, seg_start_ns + t, seq_base[0] + j,
                                         encode_image(im, "jpeg", cfg.jpeg_quality), "jpeg",
                                         im.shape[1], im.shape[0]))
        lo = (ws - seg_start_ns) * cfg.sample_rate // NS_PER_S
        n = cfg.n_samples
        audio = seg.audio[lo:lo + n] if seg.audio_ok else np.zeros(n, np.float32)
        mask = np.full(n, seg.audio_ok)
        wsegs = [s for s in segs if s.start_ns < we and s.end_ns > ws]
        present: dict[Modality, bool] = {"video": bool(frames), "audio": seg.audio_ok,
                                         "text": bool(wsegs)}
        if not any(present.values()):
            continue  # the aligner emits no window without any data either
        quality: dict[str, float | int | str] = {
            "frames_dropped": 0, "audio_missing_s": 0.0 if seg.audio_ok
            else cfg.window_ms / 1000, "late_events": 0, "duplicates": 0,
            "closed_by": "watermark"}
        out.append(Window(stream_id, ws, we, frames, len(idx) if seg.video_ok else 0,
                          np.asarray(audio, np.float32), mask, cfg.sample_rate, wsegs,
                          present, quality, {}))
    return out


def _segment_plan(split: str, count: int, cfg: AVDigitsConfig) -> list[int]:
    """Digits of a split's segments: balanced classes in a seeded random order."""
    rng = np.random.default_rng([cfg.seed, SPLIT_CODE[split], 1 << 20])
    digits = np.arange(count) % 10
    rng.shuffle(digits)
    return [int(d) for d in digits]


# ---------------------------------------------------------------------------------------
# dataset and clip
# ---------------------------------------------------------------------------------------


def generate(out_dir: str | Path, cfg: AVDigitsConfig, cache_dir: Path | None = None,
             progress: bool = False, overwrite: bool = False) -> Path:
    """Write the AV-Digits dataset for ``cfg`` to ``out_dir`` (the dataset format)."""
    from tqdm import tqdm

    from streamproc.ml.dataset import DatasetWriter

    seg_ns = round(cfg.segment_s * NS_PER_S)
    hop_ns = cfg.hop_ms * 1_000_000
    if seg_ns % hop_ns:
        raise UserError("AV-Digits: segment_s must be a multiple of the hop")
    plan = [(split, i, d) for split, count in (("train", cfg.train_segments),
                                               ("val", cfg.val_segments),
                                               ("test", cfg.test_segments))
            for i, d in enumerate(_segment_plan(split, count, cfg))]
    source = {"generator": "avdigits", "config": cfg.to_json(),
              "voices": {s: [v.key for v in cfg.voices(s)] for s in SPLIT_CODE}}
    n_frames = int(cfg.segment_s * cfg.fps)
    window = {"hop_ms": cfg.hop_ms, "frames_per_window": cfg.frames_per_window}
    with DatasetWriter(out_dir, labels=LABELS, source=source, window=window,
                       overwrite=overwrite) as writer:
        for split, i, digit in tqdm(plan, desc=f"AV-Digits {cfg.name}", unit="segment",
                                    disable=not progress):
            seg = render_segment(digit, split, i, cfg, cache_dir)
            stream = f"avdigits-{split}"
            start = ORIGIN_NS + i * seg_ns
            for w in segment_windows(seg, start, stream, cfg, (i * n_frames, i)):
                info = {**seg.info, "offset_s": (w.start_ns - start) / NS_PER_S}
                writer.add(w, LABELS[digit], split, info)
    return Path(out_dir)


@dataclass
class Clip:
    video: Path
    audio: Path
    transcript: Path
    labels: Path
    stream_id: str
    digits: list[int]
    seconds: float


def clip_segment_index(stream_id: str, i: int, index_base: int = 10_000) -> int:
    """Segment index of a clip's i-th digit: past the dataset's indices, distinct per
    stream (so several streams of a demo do not show identical renderings)."""
    return index_base + (int(hashlib.sha1(stream_id.encode()).hexdigest()[:6], 16)
                         % 100_000) * 1000 + i


def _srt_time(ns: int) -> str:
    ms = ns // 1_000_000
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def write_clip(out_dir: str | Path, digits: Sequence[int], *, stream_id: str = "cam1",
               cfg: AVDigitsConfig | None = None, split: str = "test", seed: int = 0,
               cache_dir: Path | None = None, index_base: int = 10_000) -> Clip:
    """One stream's continuous clip of ``digits`` (``cfg.segment_s`` s each) as real files.

    Writes ``<stream>.avi`` (MJPG: JPEG frames, which this OpenCV build both writes and
    reads back), ``<stream>.wav`` (16-bit mono), ``<stream>.srt`` (the transcript spans)
    and ``<stream>.labels.csv`` (stream id + time span -> label, the format
    ``streamproc record`` reads). Segments are rendered by the same code as the dataset's
    windows, from held-out voices and noise seeds by default (``split="test"``).
    """
    import cv2

    from streamproc.ml.dataset import LabelSpan, LabelSpans

    cfg = dataclasses.replace(cfg or PRESETS["full"], seed=seed)
    if not digits or any(not 0 <= int(d) <= 9 for d in digits):
        raise UserError("a clip needs one or more digits 0-9")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = Clip(out / f"{stream_id}.avi", out / f"{stream_id}.wav", out / f"{stream_id}.srt",
                 out / f"{stream_id}.labels.csv", stream_id, [int(d) for d in digits],
                 len(digits) * cfg.segment_s)
    s = cfg.image_size
    writer = cv2.VideoWriter(str(paths.video), cv2.VideoWriter.fourcc(*"MJPG"), cfg.fps, (s, s))
    if not writer.isOpened():
        raise UserError(f"OpenCV cannot write MJPG video to {paths.video}")
    seg_ns = round(cfg.segment_s * NS_PER_S)
    audio, cues, spans = [], [], []
    try:
        for i, d in enumerate(paths.digits):
            seg = render_segment(d, split, clip_segment_index(stream_id, i, index_base), cfg,
                                 cache_dir)
            for _, im in seg.frames:
                writer.write(im if seg.video_ok else np.zeros_like(im))
            audio.append(seg.audio if seg.audio_ok else np.zeros_like(seg.audio))
            if seg.transcript is not None:
                a, b, text = seg.transcript
                cues.append((i * seg_ns + a, i * seg_ns + b, text))
            spans.append(LabelSpan(stream_id, i * cfg.segment_s, (i + 1) * cfg.segment_s,
                                   LABELS[d]))
    finally:
        writer.release()
    write_wav(paths.audio, np.concatenate(audio), cfg.sample_rate)
    with open(paths.transcript, "w", encoding="utf-8") as f:
        for n, (a, b, text) in enumerate(cues, start=1):
            f.write(f"{n}\n{_srt_time(a)} --> {_srt_time(b)}\n{text}\n\n")
    LabelSpans(spans).write(paths.labels)
    return paths
