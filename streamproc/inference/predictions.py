"""Windows -> prediction records: the fields every output shares and who wrote them.

A prediction is a window's summary (what each modality contributed, quality, provenance)
plus the model's label and scores and a latency breakdown; its headers name the worker
group, the model and the window settings that produced it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamproc.align.aligner import Window
from streamproc.config import MODALITIES, Settings
from streamproc.wire import codec as wire

#: The ``model`` of an align-only worker's predictions (no label, no scores).
ALIGN_ONLY_MODEL: Mapping[str, str] = {"name": "align-only", "version": "1"}


def window_summary(window: Window) -> dict[str, Any]:
    """Window -> the prediction fields every output shares (all but label, scores, model).

    ``modalities`` says what each modality contributed and which were missing;
    ``provenance`` lists ``[partition, offset]`` per modality (the topic is the modality's).
    """
    present = dict(window.present)
    audio_s = (np.count_nonzero(window.audio_mask) / window.sample_rate if window.sample_rate
               else 0.0)
    modalities: dict[str, Any] = {
        "video": {"present": bool(present.get("video", False)), "frames": window.frame_count,
                  "sampled": len(window.frames)},
        "audio": {"present": bool(present.get("audio", False)), "seconds": round(audio_s, 6)},
        "text": {"present": bool(present.get("text", False)), "segments": len(window.segments)},
        "missing": [m for m in MODALITIES if not present.get(m, False)],
    }
    provenance = {m: [[s.partition, s.offset] for s in srcs]
                  for m, srcs in window.provenance.items()}
    return {
        "stream_id": window.stream_id,
        "window_start_ns": window.start_ns,
        "window_end_ns": window.end_ns,
        "modalities": modalities,
        "quality": {k: _jsonable(v) for k, v in window.quality.items()},
        "provenance": provenance,
    }


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalar
        return v.item()
    return v


def summary_prediction(window: Window, *, label: str = "",
                       scores: Mapping[str, float] | None = None,
                       model: Mapping[str, str] = ALIGN_ONLY_MODEL,
                       latency_ms: Mapping[str, float] | None = None,
                       emitted_at_ns: int | None = None,
                       reused: bool = False) -> wire.Prediction:
    """A Prediction for a window; the align-only output leaves label and scores empty.

    The window's ``rev`` and ``final`` say which revision this is; ``reused``: the
    scores are its provisional's, the model was not called again.

    ``latency_ms`` always has ``total`` (window end in event time -> emitted, wall clock)
    and ``capture_to_worker_<modality>`` (the stream's newest record of that modality:
    captured -> received by the worker); outputs add their own stages.
    """
    now = time.time_ns() if emitted_at_ns is None else emitted_at_ns
    lat = {f"capture_to_worker_{m}": float(window.ingest_ms[m])
           for m in MODALITIES if m in window.ingest_ms}
    lat["total"] = round((now - window.end_ns) / 1e6, 3)
    lat.update(latency_ms or {})
    return wire.Prediction(label=label, scores=dict(scores or {}), model=dict(model),
                           emitted_at_ns=now, latency_ms=lat, rev=window.rev,
                           final=window.final, reused=reused, **window_summary(window))


def prediction_record(pred: wire.Prediction, headers: wire.Headers = ()) -> wire.KafkaRecord:
    """``pred`` encoded for the predictions topic, with ``headers`` after the wire's own."""
    rec = wire.encode_prediction(pred)
    return wire.KafkaRecord(rec.key, rec.value, (*rec.headers, *headers), rec.timestamp_ms)


def window_settings(settings: Settings) -> str:
    """The settings that decide a worker group's windows, as the ``sp-window`` header."""
    return (f"window_ms={settings.window_ms},hop_ms={settings.hop_ms},"
            f"lateness_video_ms={settings.lateness_video_ms},"
            f"lateness_audio_ms={settings.lateness_audio_ms},"
            f"lateness_text_ms={settings.lateness_text_ms},"
            f"frames_per_window={settings.frames_per_window}")


def prediction_headers(settings: Settings, model_info: Mapping[str, str]) -> wire.Headers:
    """Headers naming who wrote a prediction: ``sp-app`` (the worker group), ``sp-model``
    (name/version) and ``sp-window`` (:func:`window_settings`)."""
    return (("sp-app", settings.app_id.encode("utf-8")),
            ("sp-model", f"{model_info['name']}/{model_info['version']}".encode()),
            ("sp-window", window_settings(settings).encode("ascii")))
