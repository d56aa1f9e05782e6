"""Prediction records: what every prediction says about its window, and who wrote it."""

from __future__ import annotations

import json

import numpy as np

from streamproc.align.aligner import AlignConfig, Aligner
from streamproc.config import Settings
from streamproc.inference.predictions import (
    ALIGN_ONLY_MODEL,
    prediction_headers,
    prediction_record,
    summary_prediction,
    window_summary,
)
from streamproc.wire.codec import (
    AudioChunk,
    Source,
    VideoFrame,
    decode_prediction,
    encode_prediction,
)

MS = 1_000_000


def _window():
    cfg = AlignConfig(window_ns=500 * MS, hop_ns=500 * MS,
                      lateness_ns={"video": 0, "audio": 0, "text": 0}, idle_ns={},
                      frames_per_window=2)
    al = Aligner(cfg)
    img = np.zeros((8, 8, 3), np.uint8)
    for i in range(3):
        f = VideoFrame.from_image("s", i * 100 * MS, i, img)
        al.add(VideoFrame(f.stream_id, f.ts_ns, f.seq, f.data, f.fmt, f.width, f.height,
                          Source("p.video", 2, 10 + i)), 0)
    c = AudioChunk.from_samples("s", 0, 0, np.zeros(4000), 16000)  # 0.25 s
    al.add(AudioChunk("s", 0, 0, c.data, c.fmt, 16000, 1, Source("p.audio", 2, 4)), 0)
    (w,) = al.flush()
    return w


def test_window_summary_reports_contributions_and_provenance() -> None:
    w = _window()
    s = window_summary(w)
    assert (s["stream_id"], s["window_start_ns"], s["window_end_ns"]) == ("s", 0, 500 * MS)
    m = s["modalities"]
    assert m["video"] == {"present": True, "frames": 3, "sampled": 2}
    assert m["audio"] == {"present": True, "seconds": 0.25}
    assert m["text"] == {"present": False, "segments": 0}
    assert m["missing"] == ["text"]
    assert s["provenance"] == {"video": [[2, 10], [2, 11], [2, 12]], "audio": [[2, 4]],
                               "text": []}
    assert s["quality"]["closed_by"] == "flush"
    json.dumps(s)  # plain JSON, no numpy scalars


def test_summary_prediction_round_trips_the_wire() -> None:
    w = _window()
    p = summary_prediction(w, emitted_at_ns=w.end_ns + 7 * MS)
    assert p.label == "" and p.scores == {} and p.model == {"name": "align-only", "version": "1"}
    assert p.latency_ms == {"total": 7.0}
    back = decode_prediction(encode_prediction(p))
    assert back.key == ("s", 0) and back.modalities == window_summary(w)["modalities"]


def test_ingest_timings_go_to_the_latency_breakdown_not_the_quality() -> None:
    w = _window()
    w.ingest_ms["video"] = 12.5
    p = summary_prediction(w, emitted_at_ns=w.end_ns, latency_ms={"close": 3.0})
    assert p.latency_ms == {"capture_to_worker_video": 12.5, "total": 0.0, "close": 3.0}
    assert "ingest_video_ms" not in p.quality
    assert "ingest_video_ms" not in window_summary(w)["quality"]


def test_prediction_record_puts_extra_headers_after_the_wires_own() -> None:
    p = summary_prediction(_window(), emitted_at_ns=0)
    bare = encode_prediction(p)
    rec = prediction_record(p, (("sp-worker", b"host:1"),))
    assert (rec.key, rec.value, rec.timestamp_ms) == (bare.key, bare.value, bare.timestamp_ms)
    assert rec.headers == (*bare.headers, ("sp-worker", b"host:1"))
    assert prediction_record(p) == bare
    assert decode_prediction(rec) == decode_prediction(bare)


def test_prediction_headers_name_the_group_the_model_and_the_window_settings() -> None:
    settings = Settings(app_id="cams", window_ms=2000, hop_ms=1000, lateness_text_ms=4000,
                        frames_per_window=6)
    headers = dict(prediction_headers(settings, ALIGN_ONLY_MODEL))
    assert headers["sp-app"] == b"cams"
    assert headers["sp-model"] == b"align-only/1"
    window = headers["sp-window"].decode("ascii")
    assert window.startswith("window_ms=2000,hop_ms=1000,")
    assert "lateness_text_ms=4000" in window and window.endswith(",frames_per_window=6")
    assert headers["sp-window"] != dict(prediction_headers(
        settings.replace(hop_ms=500), ALIGN_ONLY_MODEL))["sp-window"]


def test_summary_prediction_says_which_revision_it_is() -> None:
    w = _window()
    plain = summary_prediction(w, emitted_at_ns=0)
    assert (plain.rev, plain.final, plain.reused) == (0, True, False)
    w.rev, w.final = 0, False
    provisional = summary_prediction(w, emitted_at_ns=0)
    assert (provisional.rev, provisional.final, provisional.reused) == (0, False, False)
    w.rev, w.final = 1, True
    final = summary_prediction(w, emitted_at_ns=0, reused=True)
    assert (final.rev, final.final, final.reused) == (1, True, True)
    assert final.revision_key == ("s", 0, 1) and final.key == provisional.key
    assert decode_prediction(encode_prediction(final)) == final
