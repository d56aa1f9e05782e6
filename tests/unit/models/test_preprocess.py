"""Windows -> tensors: frame decoding, log-mel, hashed n-grams and every presence mask."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import zlib
from collections.abc import Iterator
from itertools import pairwise

import cv2
import numpy as np
import pytest
import torch

from streamproc.align.aligner import Window, even_indices, pick_indices
from streamproc.config import Settings
from streamproc.models import preprocess
from streamproc.models.preprocess import (
    BOS_ID,
    Preprocess,
    PreprocessError,
    decode_scale,
    hash_ngrams,
    log_mel,
    make_batch,
    mel_filterbank,
    mel_to_hz,
)
from streamproc.wire.codec import TranscriptSegment, VideoFrame

PRE = Preprocess()


def _window(*, frames=(), audio=None, mask=None, sr=16000, segs=(), present=None,
            n=16000) -> Window:
    audio = np.zeros(n, np.float32) if audio is None else audio
    mask = np.ones(len(audio), bool) if mask is None else mask
    present = present or {"video": bool(frames), "audio": bool(mask.any()),
                          "text": bool(segs)}
    return Window("s", 0, 1_000_000_000, list(frames), len(frames), audio, mask, sr,
                  list(segs), present)


def _frame(img: np.ndarray, i: int = 0, fmt: str = "jpeg") -> VideoFrame:
    return VideoFrame.from_image("s", i * 66_666_667, i, img, fmt, 95)


def _tone(hz: float, sr: int = 16000, n: int = 16000) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / sr)).astype(np.float32)


def test_frames_are_decoded_resized_and_grey() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255  # right half white
    b = make_batch([_window(frames=[_frame(img)])], PRE)
    assert b.video.shape == (1, PRE.frames_per_window, 1, PRE.frame_size, PRE.frame_size)
    f = b.video[0, 0, 0]
    assert f[:, :7].max() < -0.45 and f[:, 9:].min() > 0.45  # black left, white right
    assert b.video_mask[0].tolist() == [True] + [False] * (PRE.frames_per_window - 1)


def test_colour_keeps_rgb_order() -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 2] = 255  # red in BGR
    pre = Preprocess(color=True)
    b = make_batch([_window(frames=[_frame(img, fmt="png")])], pre)
    assert b.video.shape[2] == 3
    means = b.video[0, 0].mean(dim=(1, 2))
    assert means[0] > 0.45 and means[1] < -0.45 and means[2] < -0.45  # R high, G and B low


def test_more_frames_than_k_are_sampled_and_fewer_are_masked() -> None:
    frames = [_frame(np.full((16, 16, 3), 10 * i, np.uint8), i) for i in range(15)]
    b = make_batch([_window(frames=frames), _window(frames=frames[:3])], PRE)
    assert b.video_mask[0].all()
    assert b.video_mask[1].tolist() == [True] * 3 + [False] * 5
    # the sampled frames are the ones the aligner's rule picks, in order
    got = ((b.video[0, :, 0].mean(dim=(1, 2)) + 0.5) * 255).round().tolist()
    want = [10 * i for i in (1, 3, 5, 7, 8, 10, 12, 14)]
    assert got == pytest.approx(want, abs=2)


def test_a_window_picks_the_frame_nearest_each_stretchs_centre() -> None:
    S = 1_000_000_000
    at_15fps = [i * S // 15 for i in range(15)]
    # stretches of 125 ms, centres 62.5, 187.5, ... ms; 466.7 is nearer 437.5 than 400
    assert pick_indices(at_15fps, 0, S, 8) == [1, 3, 5, 7, 8, 10, 12, 14]
    # hopping windows (0.5 s apart) pick the same frames where they overlap, although
    # 0.5 s is no whole number of frames at 15 fps
    stream = [i * S // 15 + 7_000_000 for i in range(45)]
    picked = []
    for start in (0, S // 2, S):
        ts = [t for t in stream if start <= t < start + S]
        picked.append({ts[i] for i in pick_indices(ts, start, S, 8)})
    for a, b in pairwise(picked):
        assert len(a & b) == 4
    assert len(picked[0] | picked[1] | picked[2]) == 16  # K per second, not 15
    assert pick_indices(at_15fps[:5], 0, S, 8) == [0, 1, 2, 3, 4]  # at most K: all
    # a stretch with no frame: the centres of K equal groups by place instead
    gap = [t for t in at_15fps if not 250_000_000 <= t < 375_000_000]
    assert pick_indices(gap, 0, S, 8) == even_indices(len(gap), 8)
    assert even_indices(15, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert even_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert even_indices(5, 8) == [0, 1, 2, 3, 4]


def test_a_frame_that_does_not_decode_is_masked_not_fatal() -> None:
    good = _frame(np.full((16, 16, 3), 200, np.uint8))
    bad = VideoFrame("s", 1, 1, b"\xff\xd8" + b"\x00" * 50 + b"\xff\xd9", "jpeg", 16, 16)
    b = make_batch([_window(frames=[good, bad]), _window(frames=[bad])], PRE)
    assert b.video_mask[0, :2].tolist() == [True, False]
    assert not b.present[1, 0]  # nothing usable left: the modality is absent
    assert b.bad_frames == 2  # counted, for the worker's metrics


def test_mel_filterbank_is_triangular_and_ordered() -> None:
    fb = mel_filterbank(40, 512, 16000, 50.0)
    assert fb.shape == (40, 257) and (fb >= 0).all()
    peaks = fb.argmax(1)
    assert (peaks[1:] >= peaks[:-1]).all()  # centres rise with the filter index
    assert (fb > 0).sum(1).min() >= 1  # no empty filter


@pytest.mark.parametrize("hz", [300.0, 1000.0, 4000.0])
def test_log_mel_puts_a_tone_in_the_right_band(hz: float) -> None:
    audio = torch.from_numpy(_tone(hz))[None]
    mel, fmask = log_mel(audio, torch.ones_like(audio, dtype=torch.bool), PRE)
    assert mel.shape == (1, PRE.n_mels, PRE.n_audio_frames) and fmask.all()
    band = int(mel[0].mean(1).argmax())
    edges = mel_to_hz(np.linspace(2595 * np.log10(1 + 50 / 700),
                                  2595 * np.log10(1 + 8000 / 700), PRE.n_mels + 2))
    assert edges[band] <= hz <= edges[band + 2]  # inside the winning triangle


def test_log_mel_is_gain_invariant() -> None:
    x = _tone(700.0) + 0.01 * np.random.default_rng(0).normal(size=16000).astype(np.float32)
    m = torch.ones(1, 16000, dtype=torch.bool)
    a, _ = log_mel(torch.from_numpy(x)[None], m, PRE)
    b, _ = log_mel(torch.from_numpy(10 * x)[None], m, PRE)
    assert torch.allclose(a, b, atol=1e-3)


def test_audio_mask_marks_missing_frames_and_zeroes_them() -> None:
    mask = np.zeros(16000, bool)
    mask[:8000] = True  # second half never arrived
    audio = np.where(mask, _tone(500.0), 0).astype(np.float32)
    b = make_batch([_window(audio=audio, mask=mask)], PRE)
    fm = b.audio_mask[0]
    t = PRE.n_audio_frames
    assert fm[: t // 2 - 1].all() and not fm[t // 2 + 1:].any()
    assert (b.audio[0][:, ~fm] == 0).all()
    assert b.present[0, 1]


def test_other_sample_rates_are_resampled() -> None:
    b = make_batch([_window(audio=_tone(1000.0, 8000, 8000), sr=8000, n=8000)], PRE)
    ref = make_batch([_window(audio=_tone(1000.0))], PRE)
    assert int(b.audio[0].mean(1).argmax()) == int(ref.audio[0].mean(1).argmax())
    assert b.audio_mask.all()


def test_window_length_mismatch_is_a_clear_error() -> None:
    with pytest.raises(PreprocessError, match="window length differs from training"):
        make_batch([_window(audio=np.zeros(32000, np.float32), n=32000)], PRE)


def test_text_tokens_and_masks() -> None:
    seg = TranscriptSegment("s", 0, "Seven", 0, 10)
    empty = TranscriptSegment("s", 1, "", 0, 10)
    b = make_batch([_window(segs=[seg]), _window(segs=[empty]), _window()], PRE)
    assert b.texts == ["Seven", "", ""]
    assert b.present[:, 2].tolist() == [True, True, False]
    assert b.text_mask[0].sum() == 1 + len("^seven$") - 2  # BOS + trigrams
    # empty but present: BOS plus the one short "^$" gram, unlike an absent transcript
    assert b.text[1, 0] == BOS_ID and b.text_mask[1].sum() == 2
    assert not b.text_mask[2].any()


def test_hashing_is_stable_crc32_and_shares_ngrams_between_spellings() -> None:
    ids = hash_ngrams("seven", PRE)
    want = 2 + zlib.crc32(b"^se") % (PRE.text_buckets - 2)  # computed independently
    assert ids[0] == BOS_ID and ids[1] == want
    assert len(set(ids[1:]) & set(hash_ngrams("sevn", PRE)[1:])) >= 2
    assert len(hash_ngrams("word " * 100, PRE)) == PRE.max_text_tokens


def test_absent_modalities_and_mask_modalities() -> None:
    img = np.full((16, 16, 3), 99, np.uint8)
    w = _window(frames=[_frame(img)], audio=_tone(440.0),
                segs=[TranscriptSegment("s", 0, "two", 0, 5)])
    b = make_batch([w, w], PRE)
    assert b.present.all()
    keep = torch.tensor([[False, True, True], [True, True, False]])
    m = b.mask_modalities(keep)
    assert m.present.tolist() == keep.tolist()
    assert not m.video_mask[0].any() and (m.video[0] == 0).all()
    assert not m.text_mask[1].any() and m.texts[1] == "" and m.texts[0] == "two"
    assert torch.equal(m.audio, b.audio)
    assert b.without("audio").present[:, 1].tolist() == [False, False]


def test_select_and_cat_keep_rows_together() -> None:
    segs = [[TranscriptSegment("s", 0, t, 0, 5)] for t in ("one", "two", "three")]
    b = make_batch([_window(segs=s) for s in segs], PRE)
    s = b.select([2, 0])
    assert s.texts == ["three", "one"] and torch.equal(s.text[0], b.text[2])
    c = type(b).cat([b.select(slice(0, 1)), b.select(slice(1, 3))])
    assert c.texts == b.texts and torch.equal(c.text, b.text)


def test_preprocess_round_trip_and_settings_mismatches() -> None:
    pre = Preprocess(frame_size=20, n_mels=32)
    assert Preprocess.from_json(pre.to_json()) == pre
    with pytest.raises(PreprocessError, match="unknown preprocessing fields"):
        Preprocess.from_json({**pre.to_json(), "bogus": 1})
    assert pre.mismatches(Settings()) == []
    found = pre.mismatches(Settings(window_ms=2000, hop_ms=1000))
    assert len(found) == 1 and "window_ms=1000" in found[0] and "window_ms=2000" in found[0]
    assert Preprocess.from_settings(Settings(frames_per_window=4)).frames_per_window == 4


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A camera-like BGR image: smooth colour regions with a little sensor noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def _full_size_input(data: bytes, size: int) -> np.ndarray:
    """The model input as a full-size decode makes it: BGR -> grey -> area resize."""
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2GRAY)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) / 255.0 - 0.5


@pytest.mark.parametrize(("width", "height", "size", "scale"), [
    (1280, 720, 16, 8), (640, 480, 16, 8), (320, 240, 16, 8), (64, 64, 16, 4),
    (48, 48, 16, 2), (121, 127, 16, 8), (119, 129, 16, 4), (20, 300, 16, 1),
    (1280, 720, 96, 4), (0, 0, 16, 1)])
def test_decode_scale_keeps_at_least_the_model_size(width: int, height: int, size: int,
                                                     scale: int) -> None:
    assert decode_scale(width, height, size) == scale
    if width:  # libjpeg rounds the reduced size up, as decode_scale assumes
        data = _frame(np.zeros((height, width, 3), np.uint8)).data
        flag = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[scale]
        h, w = cv2.imdecode(np.frombuffer(data, np.uint8), flag).shape
        assert min(w, h) >= min(size, width, height)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1280, 720)])
def test_hd_jpeg_decodes_at_reduced_scale_in_grey(width: int, height: int) -> None:
    f = _frame(_photo(width, height))
    b = make_batch([_window(frames=[f])], PRE)
    got = b.video[0, 0, 0].numpy()
    # exactly libjpeg's 1/8 DCT-scaled grey decode, area-resized: what training sees too
    reduced = cv2.imdecode(np.frombuffer(f.data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    want = cv2.resize(reduced, (16, 16), interpolation=cv2.INTER_AREA) / 255.0 - 0.5
    assert np.allclose(got, want, atol=1e-6)
    # and within a few grey levels of the full-size decode it replaces
    diff = np.abs(got - _full_size_input(f.data, 16)) * 255
    assert diff.max() <= 3 and diff.mean() <= 1


def test_reduced_colour_decode_keeps_rgb_and_matches_full_size() -> None:
    pre = Preprocess(color=True)
    f = _frame(_photo(1280, 720, seed=3))
    got = make_batch([_window(frames=[f])], pre).video[0, 0].numpy()  # [3, S, S] RGB
    full = cv2.imdecode(np.frombuffer(f.data, np.uint8), cv2.IMREAD_COLOR)
    ref = cv2.resize(cv2.cvtColor(full, cv2.COLOR_BGR2RGB), (16, 16),
                     interpolation=cv2.INTER_AREA).transpose(2, 0, 1) / 255.0 - 0.5
    assert np.abs(got - ref).max() * 255 <= 3


def test_png_frames_decode_at_full_size() -> None:
    img = _photo(64, 48)
    f = _frame(img, fmt="png")
    got = make_batch([_window(frames=[f])], PRE).video[0, 0, 0].numpy()
    assert np.allclose(got, _full_size_input(f.data, 16), atol=1e-6)


# --- frames decoded as they arrive ---------------------------------------------------------


def _camera_frames(n: int, seed: int = 0) -> list[VideoFrame]:
    rng = np.random.default_rng(seed)
    return [_frame(rng.integers(0, 255, (120, 160, 3), np.uint8), i) for i in range(n)]


def test_frames_decoded_early_give_the_same_batch_as_decoding_at_close() -> None:
    frames = _camera_frames(12)
    windows = [_window(frames=frames[:10]), _window(frames=frames[4:])]
    at_close = make_batch(windows, PRE)
    for f in frames:
        preprocess.decode_early(f, PRE)
    assert all(id(f) in preprocess._early for f in frames)
    early = make_batch(windows, PRE)
    assert torch.equal(early.video, at_close.video)
    assert torch.equal(early.video_mask, at_close.video_mask)


def test_an_early_decode_goes_with_its_frame_and_is_per_preprocessing() -> None:
    frames = _camera_frames(3, seed=1)
    for f in frames:
        preprocess.decode_early(f, PRE)
    colour = dataclasses.replace(PRE, color=True)
    b = make_batch([_window(frames=frames)], colour)  # other preprocessing: decoded anew
    assert b.video.shape[2] == 3
    keys = [id(f) for f in frames]
    del frames, f, b
    gc.collect()
    assert not any(k in preprocess._early for k in keys)


@contextlib.contextmanager
def _decode_threads_busy() -> Iterator[None]:
    """Every decode thread blocked meanwhile, so work submitted now stays queued."""
    release = threading.Event()
    blockers = [preprocess._decoders.submit(release.wait)
                for _ in range(preprocess.DECODE_THREADS)]
    try:
        yield
    finally:
        release.set()
        for b in blockers:
            b.result()


def test_a_frame_still_queued_for_early_decoding_is_decoded_at_once() -> None:
    """A batch must not wait for an early decode queued behind busy decode threads (the
    batch's own decoding may be what keeps them busy)."""
    with _decode_threads_busy():
        (f,) = _camera_frames(1, seed=2)
        preprocess.decode_early(f, PRE)
        fut = preprocess._early[id(f)][2]
        got = preprocess._decoded(f, PRE)
        assert fut.cancelled()
        assert np.array_equal(got, preprocess.frame_array(f.data, f.fmt, PRE, f.width, f.height))


def test_a_frame_decoded_at_once_serves_its_other_windows_too() -> None:
    """Hopping windows share frames: once a queued early decode was done here instead,
    the frame's next window takes that result."""
    with _decode_threads_busy():
        (f,) = _camera_frames(1, seed=3)
        preprocess.decode_early(f, PRE)
        first = preprocess._decoded(f, PRE)
        second = preprocess._decoded(f, PRE)
        assert np.array_equal(first, second)
