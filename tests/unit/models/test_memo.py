"""A final scored after its provisional takes the provisional's encoder output for every
modality whose input is unchanged, runs only the other encoders, and scores as a model
computing everything again would."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from model_helpers import LABELS, windows

from streamproc.align.aligner import pick_frames
from streamproc.models import FUSION_MODELS, create_model, predict_proba
from streamproc.models.memo import EncodingMemo, signature
from streamproc.wire.codec import TranscriptSegment


def _rows_seen(model) -> dict[str, list[int]]:
    """Encoder name -> the batch sizes it ran on (forward hooks)."""
    seen: dict[str, list[int]] = {m: [] for m in model.encoders}
    for m, enc in model.encoders.items():
        enc.register_forward_hook(lambda mod, args, out, m=m: seen[m].append(len(args[0])))
    return seen


def _finals(prov: list) -> list:
    """The provisional windows as finals: windows 0, 2, 4 got one more segment, window 1
    one frame less, window 3 other audio, window 5 nothing new."""
    out = []
    for i, w in enumerate(prov):
        f = dataclasses.replace(w, final=True, rev=1)
        if i in (0, 2, 4):
            f = dataclasses.replace(f, segments=[*w.segments,
                                                 TranscriptSegment("s", 100 + i, "and more", 0, 9)])
        elif i == 1:
            f = dataclasses.replace(f, frames=w.frames[:-1], frame_count=len(w.frames) - 1)
        elif i == 3:
            f = dataclasses.replace(f, audio=(w.audio * 0.5).astype(np.float32))
        out.append(f)
    return out


@pytest.mark.parametrize("arch", FUSION_MODELS)
def test_a_final_runs_only_the_encoders_whose_input_changed_and_scores_the_same(
        arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, LABELS).eval()
    prov = [dataclasses.replace(w, final=False) for w in windows(6, seed=3)]
    finals = _finals(prov)
    want = predict_proba(model, finals)
    memo = EncodingMemo()
    predict_proba(model, prov, encodings=memo)
    assert len(memo) == 6
    seen = _rows_seen(model)
    got = predict_proba(model, finals, encodings=memo)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert memo.reused == [("video", "audio"), ("audio", "text"), ("video", "audio"),
                           ("video", "text"), ("video", "audio"),
                           ("video", "audio", "text")]
    # each encoder ran once, on the rows whose input changed only
    assert seen == {"video": [1], "audio": [1], "text": [3]}
    assert len(memo) == 0  # a final takes its provisional's rows out


def test_an_audio_signature_is_equal_exactly_when_the_encoders_input_is() -> None:
    (w,) = windows(1)
    same = dataclasses.replace(w, audio=w.audio.copy(), audio_mask=w.audio_mask.copy())
    assert signature(same, "audio") == signature(w, "audio")
    one_sample = w.audio.copy()
    one_sample[100] += 1e-3
    mask = w.audio_mask.copy()
    mask[-1] = not mask[-1]
    for other in (dataclasses.replace(w, audio=one_sample),
                  dataclasses.replace(w, audio_mask=mask),
                  dataclasses.replace(w, sample_rate=w.sample_rate * 2),
                  dataclasses.replace(w, present={**w.present, "audio": False})):
        assert signature(other, "audio") != signature(w, "audio")


def test_nothing_is_reused_across_models_streams_or_without_a_provisional() -> None:
    torch.manual_seed(0)
    model, other = create_model("lmf", LABELS).eval(), create_model("lmf", LABELS).eval()
    prov = [dataclasses.replace(w, final=False) for w in windows(3, seed=4)]
    memo = EncodingMemo()
    predict_proba(model, prov, encodings=memo)
    # the same windows of another stream, and finals of windows never provisional
    strangers = [dataclasses.replace(w, stream_id="t", final=True) for w in prov]
    predict_proba(model, strangers, encodings=memo)
    assert memo.reused == [(), (), ()] and len(memo) == 3
    # another model: what the first one computed is dropped, not used
    predict_proba(other, [dataclasses.replace(w, final=True) for w in prov], encodings=memo)
    assert memo.reused == [(), (), ()] and len(memo) == 0


def test_the_memo_keeps_at_most_its_capacity() -> None:
    model = create_model("early", LABELS).eval()
    memo = EncodingMemo(capacity=4)
    prov = [dataclasses.replace(w, final=False) for w in windows(6, seed=5)]
    predict_proba(model, prov, encodings=memo)
    assert len(memo) == 4
    predict_proba(model, [dataclasses.replace(w, final=True) for w in prov], encodings=memo)
    assert [bool(r) for r in memo.reused] == [False, False, True, True, True, True]


def test_a_subclass_with_its_own_forward_is_called_whole() -> None:
    class Doubled(type(create_model("early", LABELS))):  # type: ignore[misc]
        def forward(self, batch):
            return 2 * super().forward(batch)

    model = Doubled(create_model("early", LABELS).config).eval()
    memo = EncodingMemo()
    prov = [dataclasses.replace(w, final=False) for w in windows(2, seed=6)]
    got = predict_proba(model, prov, encodings=memo)
    assert len(memo) == 0
    assert torch.allclose(got, predict_proba(model, prov))


def test_a_reused_input_is_not_prepared_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # a final's frames are not decoded again nor its audio's log-mel computed when their
    # encodings are reused: that preparation is most of a final's cost
    from streamproc.models import preprocess

    torch.manual_seed(0)
    model = create_model("lmf", LABELS).eval()
    prov = [dataclasses.replace(w, final=False) for w in windows(6, seed=3)]
    memo = EncodingMemo()
    predict_proba(model, prov, encodings=memo)
    decoded: list[bytes] = []
    mel_rows: list[int] = []
    hashed: list[str] = []
    frame_array, log_mel, hash_ngrams = (preprocess.frame_array, preprocess.log_mel,
                                         preprocess.hash_ngrams)
    monkeypatch.setattr(preprocess, "frame_array",
                        lambda data, *a: decoded.append(data) or frame_array(data, *a))
    monkeypatch.setattr(preprocess, "log_mel",
                        lambda audio, *a: mel_rows.append(len(audio)) or log_mel(audio, *a))
    monkeypatch.setattr(preprocess, "hash_ngrams",
                        lambda text, *a: hashed.append(text) or hash_ngrams(text, *a))
    finals = _finals(prov)
    got = predict_proba(model, finals, encodings=memo)
    # only window 1's frames changed, window 3's audio, windows 0, 2, 4's text
    k = model.preprocess.frames_per_window
    w = finals[1]
    sampled = [f.data for f in pick_frames(w.frames, w.start_ns, w.end_ns - w.start_ns, k)]
    assert sorted(decoded) == sorted(sampled)  # decode threads take them in any order
    assert mel_rows == [1]
    assert hashed == [finals[i].text for i in (0, 2, 4)]
    monkeypatch.undo()
    assert torch.allclose(got, predict_proba(model, finals), atol=1e-5)
