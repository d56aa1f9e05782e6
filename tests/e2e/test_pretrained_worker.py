"""A model with frozen pretrained encoders, from `streamproc train` to a real worker.

Faces & Voices (real faces and photographs from scikit-image, speech over room noise) is
generated small, trained with the CLI using EfficientNet-Lite0 and Silero VAD, then served
by a `streamproc worker` against the real broker: a camera-and-microphone stream of
held-out faces and voices gets one final prediction per window, each the label the
checkpoint gives offline for the same window.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

import pytest
from pipeline_helpers import same_label
from worker_helpers import WorkerProc, oracle_windows, pred_of, read_all

from streamproc.capture.publisher import Publisher
from streamproc.config import Settings
from streamproc.dev.localkafka import free_port
from streamproc.inference.predictor import Predictor
from streamproc.ml import realworld as rw
from streamproc.testing import MS, S
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

pytest.importorskip("skimage")

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SCENES = ["speaking", "empty", "radio", "silent", "speaking"]


def test_pretrained_checkpoint_trains_and_serves_in_a_worker(
        kafka_bootstrap: str, avdigits_tts: Path, tmp_path: Path) -> None:
    from streamproc.cli import main

    cfg = rw.FacesVoicesConfig("e2e", train_segments=12, val_segments=4, test_segments=4)
    ds = rw.generate(tmp_path / "ds", cfg, avdigits_tts)
    ck = tmp_path / "model"
    rc = main(["train", str(ds), "--model", "early", "--video-encoder", "efficientnet-lite0",
               "--audio-encoder", "silero-vad", "--out", str(ck), "--epochs", "6",
               "--seed", "0", "--device", "cpu", "--name", "faces-voices"])
    assert rc == 0
    meta = json.loads((ck / "model.json").read_text())
    assert meta["config"]["encoders"]["video"]["kind"] == "efficientnet-lite0"
    assert meta["config"]["encoders"]["audio"]["kind"] == "silero-vad"

    prefix = f"p{uuid.uuid4().hex[:10]}"
    settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, app_id=prefix,
                        partitions=2, model=str(ck), device="cpu", metrics_port=0,
                        web_port=free_port(), session_timeout_ms=6000,
                        data_dir=str(tmp_path / "data"))
    create_topics(settings)
    hop = settings.hop_ms * MS
    origin = (time.time_ns() - 60 * S) // hop * hop  # a backlog: read as fast as it goes
    records = rw.stream_records(SCENES, "cam-fv", origin, cfg, cache_dir=avdigits_tts)
    with Publisher(settings) as pub:
        futures = [pub.publish(r) for r in records]
        sent = []
        for r, f in zip(records, futures, strict=True):
            assert f is not None
            md = f.get(30)
            sent.append(dataclasses.replace(r, source=wire.Source(md.topic, md.partition,
                                                                  md.offset)))
    expected = oracle_windows(settings, sent)
    assert len(expected) >= 2 * len(SCENES)

    worker = WorkerProc(settings, tmp_path / "worker.log")
    try:
        msgs = read_all(settings, settings.topic("predictions"),
                        lambda ms: set(expected) <= {p.key for p in map(pred_of, ms)
                                                     if p.final},
                        timeout=settings.idle_deadline_video_ms / 1000 + 120)
        worker.wait_for(r"serving model faces-voices version \S+ from \S+ on cpu")
        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        worker.abandon()

    finals = {p.key: p.body for p in map(pred_of, msgs) if p.final}
    assert set(finals) == set(expected), worker.log()[-3000:]
    predictor = Predictor(str(ck), "cpu", threads=1)
    keys = sorted(expected)
    offline = dict(zip(keys, predictor([expected[k] for k in keys]), strict=True))
    for k in keys:
        assert same_label(finals[k], offline[k]), (k, finals[k]["label"], offline[k])
