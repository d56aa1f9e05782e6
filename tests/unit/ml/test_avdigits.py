"""AV-Digits: deterministic, held-out test split, windows shaped exactly like the aligner's,
and a replayable clip rendered by the same code."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamproc.align.aligner import AlignConfig, Aligner
from streamproc.capture.sources import file_records
from streamproc.capture.transcripts import load_transcript
from streamproc.config import Settings
from streamproc.errors import UserError
from streamproc.ml import avdigits as av
from streamproc.ml.dataset import Dataset, read_labels
from streamproc.wire.codec import NS_PER_S

MICRO = av.AVDigitsConfig("micro", train_segments=8, val_segments=3, test_segments=6,
                          train_voices=2, val_voices=1, test_voices=1, speeds=1, pitches=2,
                          seed=3)


@pytest.fixture(scope="module")
def tts_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tts")


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory, tts_cache: Path) -> Dataset:
    return Dataset(av.generate(tmp_path_factory.mktemp("micro") / "ds", MICRO, tts_cache))


def test_generation_is_deterministic(micro: Dataset, tmp_path: Path) -> None:
    """Same config and seed -> byte-identical shards, even with a fresh speech cache."""
    again = Dataset(av.generate(tmp_path / "again", MICRO, tmp_path / "fresh-tts"))
    digests = [s["sha256"] for s in micro.manifest["shards"]]
    assert digests == [s["sha256"] for s in again.manifest["shards"]]
    other = Dataset(av.generate(tmp_path / "other", dataclasses.replace(MICRO, seed=4),
                                tmp_path / "fresh-tts"))
    assert digests != [s["sha256"] for s in other.manifest["shards"]]


def test_splits_hold_out_voices_noise_seeds_and_images(micro: Dataset) -> None:
    assert micro.labels == av.LABELS
    assert set(micro.splits) == {"train", "val", "test"}
    info = {s: [e.info for e in micro.examples(s)] for s in ("train", "val", "test")}
    for key in ("voice", "noise_seed", "image_index"):
        seen = {s: {i[key] for i in info[s]} for s in info}
        assert all(seen.values()), key
        assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"], key
        assert not seen["val"] & seen["test"], key
    assert {i["voice"] for i in info["test"]} <= {v.key for v in av.TEST_VOICES}
    assert {i["voice"] for i in info["val"]} <= {v.key for v in av.VAL_VOICES}


def test_windows_look_like_the_aligners(micro: Dataset) -> None:
    cfg = MICRO
    for ex in micro.load():
        w = ex.window
        assert w.end_ns - w.start_ns == cfg.window_ms * 1_000_000
        assert w.start_ns % (cfg.hop_ms * 1_000_000) == 0  # epoch-aligned on the hop grid
        assert len(w.audio) == len(w.audio_mask) == cfg.n_samples
        assert len(w.frames) <= cfg.frames_per_window and any(w.present.values())
        assert w.present["video"] == bool(w.frames)
        assert all(w.start_ns <= f.ts_ns < w.end_ns for f in w.frames)
        assert all(s.start_ns < w.end_ns and s.end_ns > w.start_ns for s in w.segments)
        assert ex.label == av.DIGIT_WORDS[ex.info["digit"]]
    manifest_window = micro.window
    assert manifest_window["frames_per_window"] == cfg.frames_per_window
    assert manifest_window["hop_ms"] == cfg.hop_ms


def test_transcripts_are_asr_like() -> None:
    """Over many draws: sometimes absent, sometimes a different digit, often variants."""
    cfg = av.PRESETS["full"]
    rng = np.random.default_rng(0)
    kinds, wrong_digit = [], 0
    for i in range(2000):
        info: dict = {}
        text = av.asr_transcript(i % 10, cfg, rng, info)
        kinds.append(info["text"])
        if text is not None and info["text"].startswith("wrong"):
            words = set(text.split())
            wrong_digit += not words & {av.DIGIT_WORDS[i % 10], *av.VARIANTS[av.DIGIT_WORDS[i % 10]]}
    share = {k: kinds.count(k) / len(kinds) for k in set(kinds)}
    assert share["absent"] == pytest.approx(cfg.text_absent_p, abs=0.04)
    wrong = sum(v for k, v in share.items() if k.startswith("wrong"))
    assert wrong == pytest.approx((1 - cfg.text_absent_p) * (1 - cfg.text_deleted_p)
                                  * cfg.text_wrong_p, abs=0.04)
    assert wrong_digit == sum(k.startswith("wrong") for k in kinds)  # really another digit


def test_clip_files_replay_into_the_dataset_windows(tmp_path: Path, tts_cache: Path) -> None:
    """The clip, replayed through the real file source and the real aligner, gives the
    windows the dataset generator cuts from the same segments."""
    cfg = dataclasses.replace(av.PRESETS["full"], test_voices=2)
    digits = [7, 1, 4]
    clip = av.write_clip(tmp_path / "clip", digits, stream_id="cam9", cfg=cfg, seed=5,
                         cache_dir=tts_cache)
    # real files: OpenCV reads the MJPG AVI back, WAV and SRT parse
    cap = cv2.VideoCapture(str(clip.video))
    assert cap.get(cv2.CAP_PROP_FPS) == cfg.fps
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == len(digits) * cfg.segment_s * cfg.fps
    audio, rate = av.read_wav(clip.audio)
    assert rate == cfg.sample_rate and len(audio) == len(digits) * cfg.segment_s * rate
    cues = load_transcript(clip.transcript).cues
    spans = read_labels(clip.labels)
    assert [s.label for s in spans.spans] == [av.LABELS[d] for d in digits]

    origin = av.ORIGIN_NS
    settings = Settings(sample_rate=cfg.sample_rate, frames_per_window=cfg.frames_per_window,
                        window_ms=cfg.window_ms, hop_ms=cfg.hop_ms,
                        max_future_ms=0)  # a fixed origin, fed on a fake clock
    aligner = Aligner(AlignConfig.from_settings(settings))
    for rec in file_records("cam9", clip.video, clip.audio, clip.transcript, origin_ns=origin,
                            jpeg_quality=95):
        assert aligner.add(rec, 0).status == "accepted"
    live = {w.start_ns: w for w in aligner.flush()}

    seg_ns = round(cfg.segment_s * NS_PER_S)
    n_frames = int(cfg.segment_s * cfg.fps)
    compared = transcripts = 0
    for i, d in enumerate(digits):
        seg = av.render_segment(d, "test", av.clip_segment_index("cam9", i), dataclasses.replace(
            cfg, seed=5), tts_cache)
        transcripts += seg.transcript is not None
        for want in av.segment_windows(seg, origin + i * seg_ns, "cam9", cfg,
                                       (i * n_frames, i)):
            got = live[want.start_ns]
            assert [f.ts_ns for f in got.frames] == [f.ts_ns for f in want.frames]
            assert got.frame_count == want.frame_count
            for fg, fw in zip(got.frames, want.frames, strict=True):
                a = cv2.imdecode(np.frombuffer(fg.data, np.uint8), cv2.IMREAD_GRAYSCALE)
                b = cv2.imdecode(np.frombuffer(fw.data, np.uint8), cv2.IMREAD_GRAYSCALE)
                assert np.abs(a.astype(int) - b.astype(int)).mean() < 12  # JPEG re-encodes
            assert got.audio_mask.all() and len(got.audio) == len(want.audio)
            assert np.abs(got.audio - want.audio).max() < 2e-4  # 16-bit WAV
            assert got.text == want.text
            assert got.present == want.present
            compared += 1
    assert compared == 3 * len(digits)
    assert len(cues) == transcripts


def test_speech_is_cached_and_missing_engines_are_named(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    voice = av.TRAIN_VOICES[0]
    x = av.synthesize(voice, "three", 1.0, 0, 16000, tmp_path)
    assert 0.2 < len(x) / 16000 < 1.5 and np.abs(x).max() == pytest.approx(0.9, abs=0.01)

    def no_subprocess(*a, **k):
        raise AssertionError("synthesised again instead of using the cache")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert np.array_equal(av.synthesize(voice, "three", 1.0, 0, 16000, tmp_path), x)
    monkeypatch.setattr(av.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="flite is not installed"):
        av.synthesize(voice, "four", 1.0, 0, 16000, tmp_path / "empty")


@pytest.mark.parametrize("digits", ["12a", "", "4 2", "\u00b2"])
def test_clip_refuses_digits_that_are_not_digits(tmp_path: Path, capsys, digits: str) -> None:
    from streamproc.cli import main

    rc = main(["avdigits", "clip", str(tmp_path / "c"), "--digits", digits])
    assert rc == 2
    assert capsys.readouterr().err == (
        "streamproc avdigits: --digits takes the digits 0-9 to show and say, in order "
        f"(e.g. 0123456789), got {digits!r}\n")
    assert not (tmp_path / "c").exists()


def test_presets_and_cli(tmp_path: Path, tts_cache: Path) -> None:
    from streamproc.cli import main

    assert set(av.PRESETS) == {"tiny", "small", "full"}
    with pytest.raises(UserError, match="segment_s must be at least one window"):
        av.AVDigitsConfig(window_ms=3000)
    rc = main(["avdigits", "clip", str(tmp_path / "c"), "--digits", "42", "--stream-id", "s1",
               "--cache", str(tts_cache)])
    assert rc == 0
    assert read_labels(tmp_path / "c" / "s1.labels.csv").labels == ["four", "two"]
    rc = main(["avdigits", "dataset", str(tmp_path / "d"), "--preset", "tiny", "--hop-ms",
               "300"])
    assert rc == 2  # 2 s segments are not a multiple of a 300 ms hop: a clear refusal
    assert not (tmp_path / "d" / "manifest.json").exists()
    assert json.loads(json.dumps(av.PRESETS["full"].to_json()))["name"] == "full"
