"""Faces & Voices: a real-media benchmark where the label needs both camera and microphone.

Each 2 s segment is one of four scenes (the label):

==============  ==========================  ==========================
label           on screen                   heard
==============  ==========================  ==========================
``speaking``    a person's face             speech over room noise
``silent``      a person's face             room noise only
``radio``       no person (another patch)   speech over room noise
``empty``       no person (another patch)   room noise only
==============  ==========================  ==========================

- **video**: 320x240 frames at 15 fps. The scene behind is a random crop of one of
  scikit-image's photographs without people (coffee, a cat, a rocket, bricks, coins, a
  page, ...). On it, a patch 40-80 % of the frame high (someone in front of the camera):
  a real face from scikit-image's Labeled Faces in the Wild subset (100 faces) for a
  person, or one of the subset's 100 non-face crops of real photographs otherwise, so a
  pasted grey square is no cue by itself. Placement and scale per segment; jitter,
  brightness drift and sensor noise per frame.
- **audio**: 16 kHz. Speech is flite / espeak-ng (the AV-Digits voices; held-out voices for
  validation and test) saying digit sequences; room noise is white, pink, brown or mains
  hum at a random level, under speech at an SNR of 0..20 dB.
- **text**: none (both modalities are needed; no transcript gives the answer away).

Splits hold out the faces and non-face patches (by index) and the voices. Windows are cut
exactly as the aligner cuts a live stream (W = 1 s, H = 0.5 s, K = 8), 3 per segment.
Deterministic in the seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streamproc.errors import UserError

LABELS = ["speaking", "silent", "radio", "empty"]
SCENES = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins",
          "hubble_deep_field", "immunohistochemistry", "retina", "page", "cell", "moon",
          "text", "clock")
ROOM_NOISE = ("white", "pink", "brown", "hum")
NS_PER_S = 1_000_000_000
ORIGIN_NS = 1_800_000_000 * NS_PER_S
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
#: lfw_subset indices per split: faces are 0..99, non-faces 100..199
PATCHES = {"train": range(0, 60), "val": range(60, 72), "test": range(72, 100)}


@dataclass(frozen=True)
class FacesVoicesConfig:
    name: str = "custom"
    train_segments: int = 120
    val_segments: int = 24
    test_segments: int = 60
    seed: int = 0
    width: int = 320
    height: int = 240
    fps: int = 15
    segment_s: float = 2.0
    window_ms: int = 1000
    hop_ms: int = 500
    frames_per_window: int = 8
    sample_rate: int = 16000
    jpeg_quality: int = 85
    snr_db: tuple[float, float] = (0.0, 20.0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def avdigits(self) -> Any:
        """The same stream shape as an AVDigitsConfig (its window cutter is reused)."""
        from streamproc.ml.avdigits import AVDigitsConfig

        return AVDigitsConfig(window_ms=self.window_ms, hop_ms=self.hop_ms,
                              frames_per_window=self.frames_per_window,
                              sample_rate=self.sample_rate, fps=self.fps,
                              segment_s=self.segment_s, jpeg_quality=self.jpeg_quality)


PRESETS = {
    "tiny": FacesVoicesConfig("tiny", train_segments=24, val_segments=8, test_segments=16),
    "small": FacesVoicesConfig("small"),
}

_MEDIA: dict[str, Any] = {}


def _media() -> dict[str, Any]:
    """scikit-image's photographs and its LFW subset (loaded once)."""
    if not _MEDIA:
        try:
            from skimage import data
        except ImportError:
            raise UserError("Faces & Voices needs scikit-image (pip install scikit-image)"
                            ) from None
        scenes = []
        for name in SCENES:
            img = np.asarray(getattr(data, name)())
            if img.dtype == bool:
                img = img.astype(np.uint8) * 255
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            scenes.append(np.ascontiguousarray(img[..., :3][..., ::-1]))  # BGR
        _MEDIA["scenes"] = scenes
        _MEDIA["lfw"] = (np.asarray(data.lfw_subset()) * 255).astype(np.uint8)
    return _MEDIA


def render_video(person: bool, split: str, rng: np.random.Generator, cfg: FacesVoicesConfig,
                 info: dict[str, Any]) -> list[np.ndarray]:
    """BGR frames of one segment: a scene crop with a face (person) or a non-face patch."""
    media = _media()
    scene_i = int(rng.integers(len(media["scenes"])))
    scene = media["scenes"][scene_i]
    pool = PATCHES[split]
    patch_i = int(rng.choice(pool)) + (0 if person else 100)
    w, h = cfg.width, cfg.height
    # a crop of the scene at the frame's aspect, 50-100 % of the smaller side
    sh, sw = scene.shape[:2]
    ch = int(min(sh, sw * h / w) * rng.uniform(0.5, 1.0))
    cw = int(ch * w / h)
    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    bg = cv2.resize(scene[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
    side = int(h * rng.uniform(0.4, 0.8))
    patch = cv2.resize(media["lfw"][patch_i], (side, side), interpolation=cv2.INTER_CUBIC)
    tint = rng.uniform(0.85, 1.15, 3)
    patch3 = np.clip(patch[..., None].astype(np.float32) * tint, 0, 255)
    px, py = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    noise = float(rng.uniform(2.0, 8.0))
    info.update(scene=SCENES[scene_i], patch=patch_i, patch_px=side)
    frames = []
    for _ in range(int(cfg.segment_s * cfg.fps)):
        img = bg.astype(np.float32)
        jx, jy = (int(v) for v in rng.integers(-3, 4, 2))
        x, y = min(max(0, px + jx), w - side), min(max(0, py + jy), h - side)
        img[y:y + side, x:x + side] = patch3
        img = img * rng.uniform(0.92, 1.08) + rng.normal(0, noise, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def render_audio(speech: bool, split: str, index: int, rng: np.random.Generator,
                 cfg: FacesVoicesConfig, cache_dir: Path | None, info: dict[str, Any]
                 ) -> np.ndarray:
    """One segment's audio: room noise, with speech over it when ``speech``."""
    from streamproc.ml.avdigits import DIGIT_WORDS, SPEEDS, _noise, synthesize

    av = cfg.avdigits()
    sr = cfg.sample_rate
    n = round(cfg.segment_s * sr)
    kind = ROOM_NOISE[int(rng.integers(len(ROOM_NOISE)))]
    noise = _noise(kind, n, sr, rng, lambda: np.zeros(1))
    noise *= rng.uniform(0.003, 0.05) / max(1e-9, float(np.std(noise)))
    info.update(noise=kind)
    if not speech:
        return noise.astype(np.float32)
    voices = av.voices(split)
    voice = voices[int(rng.integers(len(voices)))]
    words = " ".join(DIGIT_WORDS[int(d)] for d in rng.integers(0, 10, 6))
    talk = synthesize(voice, words, SPEEDS[int(rng.integers(len(SPEEDS)))], 0, sr, cache_dir)
    start = int(rng.integers(0, max(1, len(talk) - n)))
    talk = talk[start:start + n]
    clean = np.zeros(n)
    onset = int(rng.integers(0, max(1, n - len(talk)) if len(talk) < n else 1))
    clean[onset:onset + len(talk)] = talk
    snr = float(rng.uniform(*cfg.snr_db))
    p_speech = max(float(np.mean(talk ** 2)), 1e-10)
    p_noise = max(float(np.mean(noise ** 2)), 1e-12)
    level = np.sqrt(p_noise * 10 ** (snr / 10) / p_speech)
    mix = noise + clean * level
    peak = float(np.abs(mix).max())
    if peak > 0.95:
        mix *= 0.95 / peak
    info.update(voice=voice.key, snr_db=round(snr, 2))
    return mix.astype(np.float32)


def generate(out_dir: str | Path, cfg: FacesVoicesConfig, cache_dir: Path | None = None,
             overwrite: bool = False) -> Path:
    """Write the Faces & Voices dataset for ``cfg`` to ``out_dir`` (the dataset format)."""
    from streamproc.ml.avdigits import Segment, segment_windows
    from streamproc.ml.dataset import DatasetWriter

    av = cfg.avdigits()
    seg_ns = round(cfg.segment_s * NS_PER_S)
    n_frames = int(cfg.segment_s * cfg.fps)
    source = {"generator": "faces-voices", "config": cfg.to_json()}
    window = {"hop_ms": cfg.hop_ms, "frames_per_window": cfg.frames_per_window}
    with DatasetWriter(out_dir, labels=LABELS, source=source, window=window,
                       overwrite=overwrite) as writer:
        for split, count in (("train", cfg.train_segments), ("val", cfg.val_segments),
                             ("test", cfg.test_segments)):
            order = np.random.default_rng([cfg.seed, SPLIT_CODE[split], 7]).permutation(
                np.arange(count) % len(LABELS))
            for i, k in enumerate(order.tolist()):
                rng = np.random.default_rng([cfg.seed, SPLIT_CODE[split], i])
                label = LABELS[k]
                person, speech = label in ("speaking", "silent"), label in ("speaking", "radio")
                info: dict[str, Any] = {"segment": i}
                images = render_video(person, split, rng, cfg, info)
                frames = [(round(j * NS_PER_S / cfg.fps), im) for j, im in enumerate(images)]
                audio = render_audio(speech, split, i, rng, cfg, cache_dir, info)
                seg = Segment(k, frames, audio, None, True, True, info)
                start = ORIGIN_NS + i * seg_ns
                stream = f"faces-voices-{split}"
                for w in segment_windows(seg, start, stream, av, (i * n_frames, i)):
                    writer.add(w, label, split,
                               {**info, "offset_s": (w.start_ns - start) / NS_PER_S})
    return Path(out_dir)


def stream_records(labels: list[str], stream_id: str, start_ns: int,
                   cfg: FacesVoicesConfig = PRESETS["tiny"], split: str = "test",
                   cache_dir: Path | None = None, chunk_ms: int = 100) -> list[Any]:
    """One live stream's records for a sequence of scenes (one 2 s segment each): JPEG
    frames at ``cfg.fps`` and ``chunk_ms`` PCM chunks from ``start_ns``, in time order, as
    a camera and microphone would send them (no transcript). Segment i of the split
    renders as in the dataset, so a served model sees held-out faces and voices."""
    from streamproc.wire.codec import AudioChunk, VideoFrame

    seg_ns = round(cfg.segment_s * NS_PER_S)
    chunk = cfg.sample_rate * chunk_ms // 1000
    out: list[tuple[int, Any]] = []
    seq_v = seq_a = 0
    for i, label in enumerate(labels):
        rng = np.random.default_rng([cfg.seed, SPLIT_CODE[split], 10_000 + i])
        info: dict[str, Any] = {}
        t0 = start_ns + i * seg_ns
        person, speech = label in ("speaking", "silent"), label in ("speaking", "radio")
        for j, img in enumerate(render_video(person, split, rng, cfg, info)):
            ts = t0 + round(j * NS_PER_S / cfg.fps)
            out.append((ts, VideoFrame.from_image(stream_id, ts, seq_v, img,
                                                  quality=cfg.jpeg_quality)))
            seq_v += 1
        audio = render_audio(speech, split, 10_000 + i, rng, cfg, cache_dir, info)
        for k in range(0, len(audio), chunk):
            ts = t0 + k * NS_PER_S // cfg.sample_rate
            out.append((ts, AudioChunk.from_samples(stream_id, ts, seq_a, audio[k:k + chunk],
                                                    cfg.sample_rate)))
            seq_a += 1
    return [r for _, r in sorted(out, key=lambda x: x[0])]
