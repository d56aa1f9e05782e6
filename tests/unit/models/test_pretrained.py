"""Frozen pretrained encoders: EfficientNet-Lite0 (video) and Silero VAD (audio).

Their weights come from installed packages (requirements.lock), loaded offline. Real
images: scikit-image's photographs and its Labeled Faces in the Wild subset (100 faces,
100 non-faces, 25x25 grey). Audio: speech from flite (the AV-Digits voices) against
silence and noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import LABELS, windows

from streamproc.align.aligner import Window
from streamproc.errors import UserError
from streamproc.models import (
    ModelConfig,
    MultimodalModel,
    cache_frozen_features,
    create_model,
    load_model,
    predict_proba,
)
from streamproc.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_checkpoint
from streamproc.models.preprocess import Preprocess, make_batch
from streamproc.models.pretrained import BACKBONES, load_backbone
from streamproc.wire.codec import VideoFrame

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """One torch thread: on a shared 2-core machine two ran these networks 2-4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image_window(images: list[np.ndarray], i: int = 0, audio: np.ndarray | None = None
                 ) -> Window:
    """One 1 s window showing ``images`` (RGB or grey uint8) as JPEG frames."""
    frames = []
    for j, img in enumerate(images):
        bgr = img[..., ::-1].copy() if img.ndim == 3 else img
        frames.append(VideoFrame.from_image("s", i * 10**9 + j, j, bgr))
    has_audio = audio is not None
    a = audio if has_audio else np.zeros(0, np.float32)
    return Window("s", i * 10**9, (i + 1) * 10**9, frames, len(frames), a,
                  np.ones(len(a), bool), 16000, [],
                  {"video": bool(frames), "audio": has_audio, "text": False})


@pytest.fixture(scope="module")
def video_encoder() -> torch.nn.Module:
    model = create_model("video", LABELS, Preprocess(), video_encoder="efficientnet-lite0")
    return model.eval()


def test_efficientnet_loads_offline_and_recognises_a_photo() -> None:
    """The real ImageNet weights, not a random network: scikit-image's cat photo comes
    out as a cat (ImageNet classes 281-285) at the encoder's own input size."""
    import cv2

    net = load_backbone("efficientnet-lite0")
    assert load_backbone("efficientnet-lite0") is net  # built once per process
    assert not any(p.requires_grad for p in net.parameters())
    img = cv2.resize(skdata.chelsea(), (96, 96), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        assert int(net((x - mean) / std).argmax()) in range(281, 286)  # the domestic cats


def test_efficientnet_features_shape_stability_and_faces(video_encoder: MultimodalModel
                                                         ) -> None:
    enc = video_encoder.encoders["video"]
    pre = video_encoder.preprocess
    assert (pre.frame_size, pre.color) == (96, True)  # the encoder chose its preprocessing
    lfw = skdata.lfw_subset()  # [200, 25, 25] float in [0, 1]: 100 faces, then 100 not
    imgs = [(255 * x).astype(np.uint8) for x in lfw]
    faces, other = imgs[:10], imgs[100:110]
    ws = [image_window([im, im[:, ::-1]], i) for i, im in enumerate(faces + other)]
    batch = make_batch(ws, pre)
    feats = enc.features(batch)
    assert feats.shape == (20, 2, 1280)
    assert enc.token_mask(batch).all()
    # same input, same vector: alone, or in another batch in another order
    again = enc.features(make_batch(ws[3:4], pre))
    assert torch.allclose(again[0], feats[3], atol=1e-4)
    rev = enc.features(make_batch(ws[:8][::-1], pre))
    assert torch.allclose(rev.flip(0), feats[:8], atol=1e-4)

    v = torch.nn.functional.normalize(feats[:, 0], dim=1)
    dist = 1 - v @ v.T
    face_face = dist[:10, :10][~torch.eye(10, dtype=torch.bool)].mean()
    face_other = dist[:10, 10:].mean()
    assert face_other > face_face * 1.2, (float(face_face), float(face_other))
    # held-out images: nearer the faces' centroid than the non-faces' exactly when a face
    cf, co = v[:10].mean(0), v[10:].mean(0)
    held_ws = [image_window([im]) for im in imgs[40:55] + imgs[140:155]]
    held = torch.nn.functional.normalize(enc.features(make_batch(held_ws, pre))[:, 0], dim=1)
    pred_face = (held @ cf) > (held @ co)
    accuracy = float((pred_face == torch.arange(30).lt(15)).float().mean())
    assert accuracy >= 0.9, accuracy


def test_efficientnet_masks_missing_frames(video_encoder: MultimodalModel) -> None:
    enc = video_encoder.encoders["video"]
    pre = video_encoder.preprocess
    photo = skdata.astronaut()
    ws = [image_window([photo] * 8), image_window([photo]), image_window([])]
    batch = make_batch(ws, pre)
    mask = enc.token_mask(batch)
    assert mask.tolist() == [[True, True], [True, False], [False, False]]
    out = enc(batch)
    assert out.pooled.shape == (3, 64)
    assert torch.count_nonzero(out.pooled[2]) == 0  # no frames: nothing, not a guess
    # one frame alone gives that frame's features
    assert torch.allclose(enc.features(batch)[1, 0], enc.features(batch)[0, 0], atol=1e-5)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    from streamproc.ml.avdigits import TRAIN_VOICES, synthesize

    x = synthesize(TRAIN_VOICES[0], "The quick brown fox jumps over the lazy dog.", 1.0, 0,
                   16000, tmp_path_factory.mktemp("tts"))
    assert len(x) >= 32000
    return x


def test_silero_features_hear_speech(speech: np.ndarray) -> None:
    model = create_model("audio", LABELS, Preprocess(), audio_encoder="silero-vad").eval()
    enc = model.encoders["audio"]
    assert model.preprocess.waveform
    rng = np.random.default_rng(0)
    talk = [speech[i * 16000:(i + 1) * 16000] for i in range(2)]
    quiet = [rng.normal(0, 1e-4, 16000).astype(np.float32) for _ in range(2)]
    hiss = [rng.normal(0, 0.1, 16000).astype(np.float32) for _ in range(2)]
    ws = [image_window([], i, a) for i, a in enumerate(talk + quiet + hiss)]
    batch = make_batch(ws, model.preprocess)
    assert batch.waveform.shape == (6, 16000)
    feats = enc.features(batch)
    assert feats.shape == (6, 31, 256)
    assert enc.token_mask(batch).all()
    again = enc.features(make_batch(ws[::-1], model.preprocess)).flip(0)
    assert torch.allclose(again, feats, atol=1e-5)
    prob = enc.speech_probability(batch).max(1).values
    assert (prob[:2] > 0.8).all() and (prob[2:] < 0.3).all(), prob.tolist()
    v = torch.nn.functional.normalize(feats[:, :, 128:].mean(1), dim=1)  # LSTM states
    assert float(v[0] @ v[1]) > float(v[0] @ v[4])  # speech nearer speech than noise


def test_silero_masks_missing_audio(speech: np.ndarray) -> None:
    model = create_model("audio", LABELS, Preprocess(), audio_encoder="silero-vad").eval()
    enc = model.encoders["audio"]
    w = image_window([], 0, speech[:16000].copy())
    w.audio_mask[8000:] = False  # the second half never arrived
    batch = make_batch([w, image_window([], 1)], model.preprocess)
    mask = enc.token_mask(batch)
    assert mask[0, :15].all() and not mask[0, 16:].any()
    assert not mask[1].any()
    feats = enc.features(batch)
    assert torch.count_nonzero(feats[1]) == 0 and torch.count_nonzero(feats[0, 16:]) == 0


def test_pretrained_checkpoint_round_trips_and_records_its_encoders(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("lmf", LABELS, Preprocess(), video_encoder="efficientnet-lite0",
                         audio_encoder="silero-vad", rank=4)
    ws = windows(8, seed=3)
    batch = make_batch(ws, model.preprocess)
    cached = cache_frozen_features(model, batch)
    assert cached.video.numel() == 0 and cached.waveform.numel() == 0  # raw input dropped
    # only the projection and fusion train: a few steps on the cached features
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(not n.startswith(("encoders.video.backbone", "encoders.audio.backbone"))
               for n, _ in model.named_parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    y = torch.arange(8) % len(LABELS)
    model.train()
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(cached), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():  # cached features give the same answer as the raw windows
        assert torch.allclose(model(cached), model(batch), atol=1e-5)

    path = save_checkpoint(model, tmp_path / "ck")
    meta = json.loads((path / CONFIG_FILE).read_text())
    enc = meta["config"]["encoders"]
    assert enc["video"]["kind"] == "efficientnet-lite0" and enc["video"]["frames"] == 2
    assert enc["video"]["input_size"] == 96
    assert enc["audio"]["kind"] == "silero-vad"
    for m, name in (("video", "efficientnet-lite0"), ("audio", "silero-vad")):
        assert enc[m]["weights"] == BACKBONES[name].identity()
    assert meta["config"]["preprocess"]["waveform"] is True
    # the frozen networks stay in their packages: only projections and fusion are saved
    assert (path / WEIGHTS_FILE).stat().st_size < 2_000_000

    loaded = load_model(str(path))
    assert torch.allclose(predict_proba(loaded, ws), predict_proba(model, ws), atol=1e-6)

    # a checkpoint trained on other frozen weights is refused, not silently served
    cfg = ModelConfig.from_json(meta["config"])
    cfg.encoders["audio"] = type(cfg.encoders["audio"])(
        **{**cfg.encoders["audio"].to_json(), "weights": "silero-vad==0.0:0123456789abcdef"})
    with pytest.raises(UserError, match="trained on the frozen weights"):
        MultimodalModel(cfg)


def test_the_face_encoder_finds_real_faces_in_scenes_and_round_trips(tmp_path: Path) -> None:
    """``haar-face``: OpenCV's Haar face detector per frame. Real LFW faces and non-face
    crops pasted on real photographs (the Faces & Voices renderer) at 320x240, decoded to
    96x96 grey as served: it fires on the faces and not on the rest; the same frame gives
    the same vector; a checkpoint records the detector and serves the same probabilities
    after loading."""
    from streamproc.ml.realworld import FacesVoicesConfig, render_video

    model = create_model("video", LABELS, Preprocess(), video_encoder="haar-face")
    model.eval()
    enc = model.encoders["video"]
    assert (model.preprocess.frame_size, model.preprocess.color) == (96, False)
    rng = np.random.default_rng(0)
    cfg = FacesVoicesConfig()
    person = [i % 2 == 0 for i in range(20)]
    ws = [image_window([render_video(p, "test", rng, cfg, {})[0][..., ::-1]] * 2, i)
          for i, p in enumerate(person)]
    batch = make_batch(ws, model.preprocess)
    feats = enc.features(batch)
    assert feats.shape == (20, 2, 3)
    found = feats[:, 0, 0] > 0.5
    hits = sum(bool(f) for f, p in zip(found, person, strict=True) if p)
    false = sum(bool(f) for f, p in zip(found, person, strict=True) if not p)
    assert hits >= 8 and false <= 1, (hits, false)
    size = feats[:, 0, 1]
    assert bool(((size > 0.2) & (size <= 1.0))[found].all())  # faces fill 40-80 % of the height
    again = enc.features(make_batch(ws[4:6][::-1], model.preprocess))
    assert torch.equal(again.flip(0), feats[4:6])

    path = save_checkpoint(model, tmp_path / "ck")
    kind = json.loads((path / CONFIG_FILE).read_text())["config"]["encoders"]["video"]
    assert kind["kind"] == "haar-face"
    assert kind["weights"] == BACKBONES["haar-face"].identity()
    loaded = load_model(str(path))
    assert torch.allclose(predict_proba(loaded, ws), predict_proba(model, ws), atol=1e-6)
