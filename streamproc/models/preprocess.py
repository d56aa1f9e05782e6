"""Windows -> model tensors: the ONE preprocessing path shared by training and inference.

A model is only as good as the agreement between the tensors it was trained on and the
tensors it is served, so everything that turns :class:`streamproc.align.aligner.Window` objects
into numbers lives here: JPEG decode + resize, a log-mel spectrogram computed with
``torch.stft`` and our own mel filterbank (torchaudio is not a dependency), tokenizer-free
hashed character n-grams for transcripts, and every presence mask. The settings travel in
a :class:`Preprocess` dataclass that checkpoints store, so a served model always gets the
preprocessing it was trained with.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import weakref
import zlib
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import cv2
import numpy as np
import torch
from scipy.signal import resample_poly

from streamproc.align.aligner import Window, pick_frames
from streamproc.config import MODALITIES
from streamproc.errors import UserError
from streamproc.wire.codec import VideoFrame, WireError

if TYPE_CHECKING:
    from streamproc.config import Settings

log = logging.getLogger(__name__)

PAD_ID = 0  # text token padding
BOS_ID = 1  # every present transcript starts with it, so an empty transcript is still input
_FIRST_HASH_ID = 2


class PreprocessError(UserError, ValueError):
    """Windows that do not fit the model's preprocessing (a configuration mismatch)."""


@dataclass(frozen=True)
class Preprocess:
    """How windows become tensors. Saved in every checkpoint and dataset manifest."""

    window_ms: int = 1000
    sample_rate: int = 16000
    frames_per_window: int = 8  # K
    frame_size: int = 16  # frames are resized to frame_size x frame_size
    color: bool = False  # False: grey (1 channel), True: RGB (3 channels)
    n_mels: int = 40
    stft_win_ms: float = 32.0
    stft_hop_ms: float = 20.0
    f_min: float = 50.0
    f_max: float = 0.0  # 0: Nyquist
    text_buckets: int = 4096  # hashed n-gram vocabulary size
    text_ngram: int = 3  # character n-gram length
    max_text_tokens: int = 48
    # Keep the window's raw samples in the batch (``WindowBatch.waveform``): pretrained
    # audio encoders read the waveform, not our log-mel; off, the batch does not carry it.
    waveform: bool = False

    def __post_init__(self) -> None:
        checks = {
            "window_ms": self.window_ms > 0,
            "sample_rate": self.sample_rate >= 1000,
            "frames_per_window": self.frames_per_window >= 1,
            "frame_size": self.frame_size >= 8,
            "n_mels": self.n_mels >= 4,
            "stft_win_ms": self.stft_win_ms > 0,
            "stft_hop_ms": 0 < self.stft_hop_ms <= self.stft_win_ms,
            "text_buckets": self.text_buckets >= 16,
            "text_ngram": self.text_ngram >= 1,
            "max_text_tokens": self.max_text_tokens >= 2,
        }
        for name, ok in checks.items():
            if not ok:
                raise PreprocessError(f"invalid preprocessing {name}={getattr(self, name)!r}")
        if self.f_max and not self.f_min < self.f_max <= self.sample_rate / 2:
            raise PreprocessError(f"invalid preprocessing f_max={self.f_max}: must be above "
                                  f"f_min={self.f_min} and at most the Nyquist frequency")

    # --- derived sizes -----------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        """Samples in one window, as the aligner emits them: round(W * sample_rate)."""
        return round(self.window_ms * self.sample_rate / 1000)

    @property
    def channels(self) -> int:
        return 3 if self.color else 1

    @property
    def win_length(self) -> int:
        return max(2, round(self.stft_win_ms * self.sample_rate / 1000))

    @property
    def hop_length(self) -> int:
        return max(1, round(self.stft_hop_ms * self.sample_rate / 1000))

    @property
    def n_fft(self) -> int:
        return 1 << (self.win_length - 1).bit_length()

    @property
    def n_audio_frames(self) -> int:
        return self.n_samples // self.hop_length + 1  # torch.stft with center=True

    # --- (de)serialisation ---------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Preprocess:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise PreprocessError(f"unknown preprocessing fields {sorted(unknown)}")
        return cls(**obj)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Preprocess:
        """The window shape the aligner of these settings emits, plus model-side choices."""
        return cls(window_ms=settings.window_ms, sample_rate=settings.sample_rate,
                   frames_per_window=settings.frames_per_window, **overrides)

    def mismatches(self, settings: Settings) -> list[str]:
        """Where a worker's window settings differ from what the model was trained on.

        The worker should refuse to start on a non-empty answer: a model fed 2 s windows
        after training on 1 s windows still returns confident, wrong labels.
        """
        out = []
        for ours, theirs in (("window_ms", "window_ms"), ("sample_rate", "sample_rate"),
                             ("frames_per_window", "frames_per_window")):
            a, b = getattr(self, ours), getattr(settings, theirs)
            if a != b:
                out.append(f"the model was trained with {ours}={a} but the settings say "
                           f"{theirs}={b}")
        return out


# ---------------------------------------------------------------------------------------
# the batch
# ---------------------------------------------------------------------------------------


@dataclass
class WindowBatch:
    """Tensors for B windows. ``present[:, i]`` is modality ``MODALITIES[i]``.

    - ``video``  float32 [B, K, C, S, S] in [-0.5, 0.5]; ``video_mask`` bool [B, K]
    - ``audio``  float32 [B, n_mels, T], normalised log-mel; ``audio_mask`` bool [B, T]
    - ``text``   int64 [B, L] hashed n-gram ids (0 pad, 1 start); ``text_mask`` bool [B, L]
    - ``texts``  the raw transcript strings (for pretrained text encoders)
    - ``waveform`` float32 [B, N] samples in [-1, 1], zero where missing, when the
      preprocessing asks for it (``Preprocess.waveform``), else [B, 0]
    - ``features`` frozen encoders' outputs computed ahead (training computes them once,
      so epochs skip the pretrained networks): key -> [B, ...], see
      :meth:`~streamproc.models.encoders.FrozenEncoder.feature_key`.
    - ``present`` bool [B, 3]: whether each modality is input at all. A masked modality
      has all-False token masks and zero tensors.
    - ``bad_frames``: frames that failed to decode and were masked instead.
    """

    video: torch.Tensor
    video_mask: torch.Tensor
    audio: torch.Tensor
    audio_mask: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    present: torch.Tensor
    texts: list[str] = field(default_factory=list)
    bad_frames: int = 0  # frames that did not decode and were masked (for a counter)
    waveform: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0)))
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    _TENSORS = ("video", "video_mask", "audio", "audio_mask", "text", "text_mask", "present")

    def __post_init__(self) -> None:
        if self.waveform.shape[0] != self.present.shape[0]:  # not asked for: [B, 0]
            self.waveform = self.present.new_zeros((self.present.shape[0], 0), dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.present.shape[0])

    @property
    def device(self) -> torch.device:
        return self.present.device

    def to(self, device: torch.device | str) -> WindowBatch:
        return dataclasses.replace(
            self, **{n: getattr(self, n).to(device) for n in self._TENSORS},
            waveform=self.waveform.to(device),
            features={k: v.to(device) for k, v in self.features.items()})

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> WindowBatch:
        """Rows ``index`` (a slice, or indices) as a new batch."""
        if isinstance(index, slice):
            texts = self.texts[index]
        else:
            index = torch.as_tensor(index, dtype=torch.long)
            texts = [self.texts[i] for i in index.tolist()]
        return WindowBatch(**{n: getattr(self, n)[index] for n in self._TENSORS}, texts=texts,
                           waveform=self.waveform[index],
                           features={k: v[index] for k, v in self.features.items()})

    def mask_modalities(self, keep: torch.Tensor) -> WindowBatch:
        """A copy where modality i of row b is masked unless ``keep[b, i]`` (bool [B, 3]).

        Used for modality dropout in training and for 'modality removed' evaluation.
        """
        present = self.present & keep.to(self.present.device)
        v, a, t = (present[:, i] for i in range(len(MODALITIES)))
        return WindowBatch(
            video=self.video * v[:, None, None, None, None],
            video_mask=self.video_mask & v[:, None],
            audio=self.audio * a[:, None, None],
            audio_mask=self.audio_mask & a[:, None],
            text=self.text * t[:, None],
            text_mask=self.text_mask & t[:, None],
            present=present,
            texts=[s if keep_t else "" for s, keep_t in zip(self.texts, t.tolist(), strict=True)],
            waveform=self.waveform * a[:, None],
            # frozen encoders read presence from the masks; zeroed too so nothing leaks
            features={k: v * present[:, MODALITIES.index(k.partition("/")[0])].reshape(
                -1, *[1] * (v.dim() - 1)).to(v.dtype) for k, v in self.features.items()},
        )

    def without(self, modality: str) -> WindowBatch:
        """The same windows with one modality removed everywhere."""
        keep = torch.ones_like(self.present)
        keep[:, MODALITIES.index(modality)] = False
        return self.mask_modalities(keep)

    @staticmethod
    def cat(batches: Sequence[WindowBatch]) -> WindowBatch:
        if not batches:
            raise ValueError("cannot concatenate zero batches")
        keys = set(batches[0].features)
        if any(set(b.features) != keys for b in batches):
            raise ValueError("cannot concatenate batches with different precomputed features")
        return WindowBatch(
            **{n: torch.cat([getattr(b, n) for b in batches]) for n in WindowBatch._TENSORS},
            texts=[t for b in batches for t in b.texts],
            bad_frames=sum(b.bad_frames for b in batches),
            waveform=torch.cat([b.waveform for b in batches]),
            features={k: torch.cat([b.features[k] for b in batches]) for k in keys})


# ---------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------


#: libjpeg's DCT scaling (decode at 1/d of the size, d = 1, 2, 4, 8) as OpenCV flags:
#: (colour, grey). The reduced decode skips most of the inverse DCT, colour conversion and
#: upsampling of pixels the model never sees, and bounds the memory a frame needs.
_JPEG_FLAGS = {
    1: (cv2.IMREAD_COLOR, cv2.IMREAD_GRAYSCALE),
    2: (cv2.IMREAD_REDUCED_COLOR_2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
    4: (cv2.IMREAD_REDUCED_COLOR_4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    8: (cv2.IMREAD_REDUCED_COLOR_8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
}


def decode_scale(width: int, height: int, size: int) -> int:
    """The largest JPEG reduction (8, 4, 2 or 1) that still decodes a ``width`` x ``height``
    image to at least ``size`` pixels each way (libjpeg rounds the scaled size up)."""
    for d in (8, 4, 2):
        if -(-width // d) >= size and -(-height // d) >= size:
            return d
    return 1


def frame_array(data: bytes, fmt: str, pre: Preprocess, width: int = 0,
                height: int = 0) -> np.ndarray:
    """Decode one encoded frame to float32 [C, S, S] in [-0.5, 0.5].

    A JPEG of ``width`` x ``height`` (its sp-w/sp-h; 0: unknown, decoded at full size) is
    decoded at the largest DCT reduction that keeps it at least S x S, straight to grey
    when the model is grey, then area-resized to S x S. Training and serving both come
    through here, so the model always sees the pixels it was trained on. PNGs are decoded
    whole (OpenCV has no cheaper way). EXIF orientation is ignored, as in
    :func:`streamproc.wire.codec.decode_image`.
    """
    if fmt == "jpeg":  # libjpeg's grey output is the stored Y plane: BGR->grey up to rounding
        flag = _JPEG_FLAGS[decode_scale(width, height, pre.frame_size)][0 if pre.color else 1]
    else:
        flag = cv2.IMREAD_COLOR
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise WireError(f"value is not a decodable {fmt} image ({len(data)} bytes)")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB if pre.color else cv2.COLOR_BGR2GRAY)
    img = cv2.resize(img, (pre.frame_size, pre.frame_size), interpolation=cv2.INTER_AREA)
    arr = img.astype(np.float32) / 255.0 - 0.5
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


#: Threads decoding one batch's frames together (OpenCV decodes without the GIL).
DECODE_THREADS = min(4, os.cpu_count() or 1)
_decoders = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")


# id(frame) -> (weak reference to the frame, preprocessing, its decode under way or done):
# frames decoded as they arrive, so a window's frames are ready when it closes. An entry
# goes when its frame does (nothing here keeps a frame alive).
_early: dict[int, tuple[weakref.ref, Preprocess, concurrent.futures.Future[np.ndarray]]] = {}


def decode_early(frame: VideoFrame, pre: Preprocess) -> None:
    """Start decoding ``frame`` in the decode threads now (the worker calls this as a frame
    is accepted, on the event loop: it only queues the work). A batch that holds the frame
    later takes the result instead of decoding it on the critical path after its window
    closed; the total work is the same."""
    key = id(frame)

    def gone(ref: weakref.ref, key: int = key) -> None:
        entry = _early.get(key)
        if entry is not None and entry[0] is ref:
            del _early[key]

    _early[key] = (weakref.ref(frame, gone), pre,
                   _decoders.submit(frame_array, frame.data, frame.fmt, pre, frame.width,
                                    frame.height))


def _decoded(f: VideoFrame, pre: Preprocess) -> np.ndarray:
    entry = _early.get(id(f))
    if entry is None or entry[0]() is not f or entry[1] != pre:
        return frame_array(f.data, f.fmt, pre, f.width, f.height)
    fut = entry[2]
    # Still queued behind this very batch in the same threads: decode it here instead
    # (waiting for it could leave every decode thread waiting on queued work), and keep
    # the result for the frame's other windows.
    if not fut.cancelled() and (fut.done() or not fut.cancel()):
        return fut.result()
    done: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
    try:
        done.set_result(frame_array(f.data, f.fmt, pre, f.width, f.height))
    except WireError as e:
        done.set_exception(e)
    _early[id(f)] = (entry[0], pre, done)
    return done.result()


def _video(windows: Sequence[Window], pre: Preprocess, skip: Container[int] = ()
           ) -> tuple[np.ndarray, np.ndarray, int]:
    k, c, s = pre.frames_per_window, pre.channels, pre.frame_size
    out = np.zeros((len(windows), k, c, s, s), np.float32)
    mask = np.zeros((len(windows), k), bool)
    jobs = [(b, j, f) for b, w in enumerate(windows)
            if b not in skip and w.present.get("video", bool(w.frames))
            for j, f in enumerate(pick_frames(w.frames, w.start_ns, w.end_ns - w.start_ns, k))]

    def decode(part: Sequence[tuple[int, int, Any]]) -> int:
        bad = 0
        for b, j, f in part:
            try:
                out[b, j] = _decoded(f, pre)
                mask[b, j] = True
            except WireError:
                bad += 1  # a frame that does not decode is masked, like a dropped frame
        return bad

    # one slice per thread (not a task per frame: a small frame decodes in tens of µs)
    n = min(DECODE_THREADS, len(jobs))
    if n <= 1:
        return out, mask, decode(jobs)
    return out, mask, sum(_decoders.map(decode, [jobs[i::n] for i in range(n)]))


# ---------------------------------------------------------------------------------------
# audio: log-mel with our own filterbank
# ---------------------------------------------------------------------------------------


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray | float:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


@overload
def mel_to_hz(mel: float) -> float: ...
@overload
def mel_to_hz(mel: np.ndarray) -> np.ndarray: ...
def mel_to_hz(mel: np.ndarray | float) -> np.ndarray | float:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


_FILTERBANKS: dict[tuple, torch.Tensor] = {}


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float = 0.0) -> torch.Tensor:
    """Triangular HTK-mel filters, float32 [n_mels, n_fft // 2 + 1], area-normalised.

    Slaney-style normalisation (each filter divided by its bandwidth) keeps wide high
    filters from dominating the log spectrum.
    """
    key = (n_mels, n_fft, sample_rate, f_min, f_max)
    if key in _FILTERBANKS:
        return _FILTERBANKS[key]
    f_max = f_max or sample_rate / 2
    n_bins = n_fft // 2 + 1
    bin_hz = np.linspace(0.0, sample_rate / 2, n_bins)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bin_hz[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - bin_hz[None]) / np.maximum(hi - mid, 1e-9)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    fb *= (2.0 / np.maximum(hi - lo, 1e-9))
    out = torch.from_numpy(fb.astype(np.float32))
    _FILTERBANKS[key] = out
    return out


def log_mel(audio: torch.Tensor, mask: torch.Tensor, pre: Preprocess
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """float [B, N] samples + bool [B, N] -> (log-mel [B, n_mels, T], frame mask [B, T]).

    A frame counts as present when the sample at its centre is real. Each window is
    normalised to zero mean and unit variance over its present frames, so the encoder
    sees the shape of the sound, not the microphone gain.
    """
    window = torch.hann_window(pre.win_length, device=audio.device)
    spec = torch.stft(audio, n_fft=pre.n_fft, hop_length=pre.hop_length,
                      win_length=pre.win_length, window=window, center=True,
                      pad_mode="constant", return_complex=True)
    power = spec.real.square() + spec.imag.square()  # [B, F, T]
    fb = mel_filterbank(pre.n_mels, pre.n_fft, pre.sample_rate, pre.f_min, pre.f_max)
    mel = torch.log(torch.matmul(fb.to(audio.device), power) + 1e-8)  # [B, M, T]
    t = mel.shape[-1]
    centres = torch.clamp(torch.arange(t, device=audio.device) * pre.hop_length,
                          max=audio.shape[1] - 1)
    fmask = mask[:, centres]
    m = fmask[:, None, :].to(mel.dtype)
    denom = (m.sum(dim=(1, 2)) * mel.shape[1]).clamp(min=1.0)
    mean = (mel * m).sum(dim=(1, 2)) / denom
    var = ((mel - mean[:, None, None]) ** 2 * m).sum(dim=(1, 2)) / denom
    mel = (mel - mean[:, None, None]) / torch.sqrt(var + 1e-5)[:, None, None]
    return mel * m, fmask


def _fit_audio(w: Window, pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    audio = np.asarray(w.audio, np.float32).reshape(-1)
    mask = np.asarray(w.audio_mask, bool).reshape(-1)
    if w.sample_rate != pre.sample_rate:
        g = math.gcd(int(w.sample_rate), pre.sample_rate)
        up, down = pre.sample_rate // g, int(w.sample_rate) // g
        audio = resample_poly(audio, up, down).astype(np.float32)
        mask = np.repeat(mask, up)[::down] if len(mask) else mask
    n = pre.n_samples
    if abs(len(audio) - n) > max(2, n // 100):
        raise PreprocessError(
            f"window {w.stream_id}@{w.start_ns} holds {len(audio)} audio samples "
            f"({len(audio) / pre.sample_rate:.3f} s) but the model expects {n} "
            f"({pre.window_ms} ms at {pre.sample_rate} Hz): window length differs from "
            "training")
    a = np.zeros(n, np.float32)
    m = np.zeros(n, bool)
    a[:min(n, len(audio))] = audio[:n]
    m[:min(n, len(mask))] = mask[:n]
    return a, m


# ---------------------------------------------------------------------------------------
# text: tokenizer-free hashed character n-grams
# ---------------------------------------------------------------------------------------


def hash_ngrams(text: str, pre: Preprocess) -> list[int]:
    """Token ids for a transcript: BOS then one hashed id per character n-gram.

    Hashing (crc32, stable across processes unlike ``hash()``) needs no vocabulary file
    and maps spelling variants ("seven", "sevn") to mostly shared ids.
    """
    s = "^" + " ".join(text.lower().split()) + "$"
    n = pre.text_ngram
    grams = [s[i:i + n] for i in range(max(1, len(s) - n + 1))]
    span = pre.text_buckets - _FIRST_HASH_ID
    ids = [BOS_ID] + [_FIRST_HASH_ID + zlib.crc32(g.encode("utf-8")) % span for g in grams]
    return ids[:pre.max_text_tokens]


# ---------------------------------------------------------------------------------------
# windows -> batch
# ---------------------------------------------------------------------------------------


def make_batch(windows: Sequence[Window], pre: Preprocess,
               reused: Mapping[str, Mapping[int, bool]] | None = None) -> WindowBatch:
    """Turn windows into one :class:`WindowBatch` (CPU tensors).

    A modality is present when the window says so *and* something usable is left after
    decoding (frames that fail to decode are masked like dropped frames). ``reused[m]``:
    rows whose modality ``m`` is not prepared at all, because the model takes that
    encoder's output from an earlier window (models/memo.py): their tensors stay zero and
    their present flag is the one given.
    """
    if not windows:
        raise ValueError("make_batch needs at least one window")
    b = len(windows)
    reused = reused or {}
    skip_v, skip_a, skip_t = (reused.get(m, {}) for m in ("video", "audio", "text"))
    video, vmask, bad = _video(windows, pre, skip_v)
    if bad:
        log.warning("%d frame(s) did not decode and were masked", bad)
    video_present = np.asarray(vmask.any(1), bool)
    for i, flag in skip_v.items():
        video_present[i] = flag

    samples = np.zeros((b, pre.n_samples), np.float32)
    smask = np.zeros((b, pre.n_samples), bool)
    audio_present = np.zeros(b, bool)
    for i, w in enumerate(windows):
        if i in skip_a:
            audio_present[i] = skip_a[i]
        elif w.present.get("audio", True) and len(w.audio):
            samples[i], smask[i] = _fit_audio(w, pre)
            audio_present[i] = smask[i].any()
    if not skip_a:
        mel, fmask = log_mel(torch.from_numpy(samples), torch.from_numpy(smask), pre)
    else:
        mel = torch.zeros((b, pre.n_mels, pre.n_audio_frames))
        fmask = torch.zeros((b, pre.n_audio_frames), dtype=torch.bool)
        rows = [i for i in range(b) if i not in skip_a]
        if rows:
            mel[rows], fmask[rows] = log_mel(torch.from_numpy(samples[rows]),
                                             torch.from_numpy(smask[rows]), pre)

    tokens = np.zeros((b, pre.max_text_tokens), np.int64)
    texts = []
    text_present = np.zeros(b, bool)
    for i, w in enumerate(windows):
        has_text = bool(w.present.get("text", bool(w.segments)))
        texts.append(w.text if has_text else "")
        if i in skip_t:
            text_present[i] = skip_t[i]
        elif has_text:
            ids = hash_ngrams(w.text, pre)
            tokens[i, :len(ids)] = ids
            text_present[i] = True
    tok = torch.from_numpy(tokens)
    present = torch.from_numpy(np.stack([video_present, audio_present, text_present], 1))
    wave = samples * (smask & audio_present[:, None]) if pre.waveform else samples[:, :0]
    return WindowBatch(
        video=torch.from_numpy(video), video_mask=torch.from_numpy(vmask),
        audio=mel, audio_mask=fmask & present[:, 1:2],
        text=tok, text_mask=tok != PAD_ID, present=present, texts=texts, bad_frames=bad,
        waveform=torch.from_numpy(np.ascontiguousarray(wave, np.float32)))


def make_batches(windows: Sequence[Window], pre: Preprocess, chunk: int = 256) -> WindowBatch:
    """``make_batch`` over many windows in chunks (bounded temporary memory)."""
    return WindowBatch.cat([make_batch(windows[i:i + chunk], pre)
                            for i in range(0, len(windows), chunk)])
