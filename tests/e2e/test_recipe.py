"""The recipe of docs/models.md, "From live streams to a served model", end to end against
the real broker: replayed camera-and-microphone streams (Faces & Voices: real faces and
photographs, speech over room noise) are recorded twice into one dataset (the second
recording appends, and the windows it sees again are not stored twice), labelled from a
labels CSV, split by time blocks and trained with the pretrained encoders; a running
worker serves version 1, refuses a corrupt checkpoint, then hot-reloads version 2 while a
live stream goes on. Every window gets exactly one final prediction, and each stream's
predictions say version 1 up to one window and version 2 from there on.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from worker_helpers import WorkerProc, oracle_windows, pred_of, read_all

from streamproc.capture.publisher import Publisher
from streamproc.cli import main
from streamproc.config import Settings
from streamproc.dev.localkafka import free_port
from streamproc.ml import realworld as rw
from streamproc.ml.dataset import Dataset
from streamproc.testing import S
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

pytest.importorskip("skimage")

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SCENES = ["speaking", "empty", "radio", "silent"]
# smaller frames than the benchmark's: the test renders and encodes fewer pixels
CFG = rw.FacesVoicesConfig("recipe", width=160, height=120)
TRAIN = ["--model", "early", "--video-encoder", "efficientnet-lite0", "--audio-encoder",
         "silero-vad", "--epochs", "3", "--device", "cpu", "--name", "recipe",
         "--block-s", "2", "--val", "0.25", "--test", "0.25"]


def labels_rows(stream: str, scenes: list[str]) -> str:
    return "".join(f"{stream},{2 * i},{2 * i + 2},{lab}\n" for i, lab in enumerate(scenes))


def send(settings: Settings, records: list[wire.MediaRecord]) -> list[wire.MediaRecord]:
    """Publish and wait; the records with the offsets the broker gave them."""
    with Publisher(settings) as pub:
        futures = [pub.publish(r) for r in records]
        out = []
        for r, f in zip(records, futures, strict=True):
            md = f.get(30)
            out.append(dataclasses.replace(r, source=wire.Source(md.topic, md.partition,
                                                                 md.offset)))
    return out


class LiveStream(threading.Thread):
    """One stream published on the wall clock (each record at its event time) until
    ``stop`` is set; ``sent`` holds what the broker took."""

    def __init__(self, settings: Settings, records: list[wire.MediaRecord]) -> None:
        super().__init__(name="live-stream", daemon=True)
        self.settings, self.records = settings, records
        self.stop = threading.Event()
        self.sent: list[wire.MediaRecord] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            futures = []
            with Publisher(self.settings) as pub:
                for r in self.records:
                    if self.stop.wait(max(0.0, (r.ts_ns - time.time_ns()) / S)):
                        break
                    futures.append((r, pub.publish(r)))
                for r, f in futures:
                    md = f.get(30)
                    self.sent.append(dataclasses.replace(
                        r, source=wire.Source(md.topic, md.partition, md.offset)))
        except BaseException as e:  # reported by the test
            self.error = e


def test_record_append_label_train_and_hot_reload_a_running_worker(
        kafka_bootstrap: str, avdigits_tts: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    prefix = f"r{uuid.uuid4().hex[:10]}"
    model_dir = tmp_path / "model"
    settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, app_id=prefix,
                        partitions=2, model=str(model_dir), model_reload_s=0.5, device="cpu",
                        metrics_port=0, web_port=free_port(), session_timeout_ms=6000,
                        data_dir=str(tmp_path / "data"))
    create_topics(settings)
    kafka = ["--bootstrap-servers", kafka_bootstrap, "--topic-prefix", prefix]
    ds = tmp_path / "dataset"
    labels = tmp_path / "labels.csv"
    now = time.time_ns() // S * S
    scenes = {"cam-a": SCENES * 2, "cam-b": SCENES[::-1] * 2}

    # 1. a first stream, recorded and labelled (times from the stream's first record)
    sent = send(settings, rw.stream_records(scenes["cam-a"], "cam-a", now - 300 * S, CFG,
                                            split="train", cache_dir=avdigits_tts))
    labels.write_text("stream_id,start,end,label\n" + labels_rows("cam-a", scenes["cam-a"]))
    assert main(["record", "--labels", str(labels), "--out", str(ds), "--to-end", *kafka]) == 0
    assert "24 labelled and written" in capsys.readouterr().err

    # 2. version 1 trained on it, served by a worker
    assert main(["train", str(ds), "--out", str(model_dir), "--version", "1", *TRAIN]) == 0
    worker = WorkerProc(settings, tmp_path / "worker.log")
    try:
        # 3. a second stream; the labels file grows; the second recording appends
        sent += send(settings, rw.stream_records(scenes["cam-b"], "cam-b", now - 200 * S, CFG,
                                                 split="train", cache_dir=avdigits_tts))
        with labels.open("a") as f:
            f.write(labels_rows("cam-b", scenes["cam-b"]))
        assert main(["record", "--labels", str(labels), "--out", str(ds), "--append",
                     "--to-end", *kafka]) == 0
        err = capsys.readouterr().err
        assert "24 labelled and written, 24 already in the dataset" in err, err
        dataset = Dataset(ds)
        assert len(dataset) == 48 and len(dataset.manifest["recordings"]) == 2

        worker.wait_for(r"serving model recipe version 1 from \S+ on cpu", timeout=120)
        worker.wait_for(r"hot reload: a new checkpoint in \S+ is served")
        live_origin = (time.time_ns() + 2 * S) // S * S
        live = LiveStream(settings, rw.stream_records(SCENES * 10, "cam-live", live_origin,
                                                      CFG, cache_dir=avdigits_tts))
        live.start()

        def live_finals(version: str, n: int) -> None:
            def done(ms: list) -> bool:
                return sum(1 for p in map(pred_of, ms) if p.final and p.key[0] == "cam-live"
                           and p.body["model"]["version"] == version) >= n
            read_all(settings, settings.topic("predictions"), done, timeout=120)

        live_finals("1", 3)
        # 4. a corrupt checkpoint is refused; version 1 goes on
        meta = json.loads((model_dir / "model.json").read_text())
        meta["config"]["version"] = "tampered"
        (model_dir / "model.json").write_text(json.dumps(meta))
        worker.wait_for(r"model reload refused: \S+: checkpoint \S+ failed its integrity "
                        r"check.*still serving recipe version 1")

        # 5. version 2, trained on both recordings, written where the worker looks
        assert main(["train", str(ds), "--out", str(model_dir), "--version", "2",
                     *TRAIN]) == 0
        worker.wait_for(r"model reloaded: serving recipe version 2 \(sha256:\w+\) from \S+ "
                        r"\(was recipe version 1", timeout=120)
        live_finals("2", 4)
        live.stop.set()
        live.join(60)
        assert live.error is None and not live.is_alive()
        sent += live.sent

        expected = oracle_windows(settings, sent)
        msgs = read_all(settings, settings.topic("predictions"),
                        lambda ms: set(expected) <= {p.key for p in map(pred_of, ms)
                                                     if p.final},
                        timeout=settings.idle_deadline_video_ms / 1000 + 120)
        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        worker.abandon()

    preds = [pred_of(m) for m in msgs]
    finals = Counter(p.key for p in preds if p.final)
    assert set(finals) == set(expected), worker.log()[-3000:]
    assert set(finals.values()) == {1}  # no window lost or doubled
    by_stream: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for p, m in zip(preds, msgs, strict=True):
        if not p.final:
            continue
        model = p.body["model"]
        assert dict(m.headers)["sp-model"] == f"recipe/{model['version']}".encode()
        assert model["checkpoint"].startswith("sha256:")
        by_stream[p.key[0]].append((p.key[1], model["version"]))
    for stream, rows in by_stream.items():
        versions = [v for _, v in sorted(rows)]
        assert versions == sorted(versions), (stream, versions)  # 1...1 2...2, never back
    live_versions = [v for _, v in sorted(by_stream["cam-live"])]
    assert live_versions[0] == "1" and live_versions[-1] == "2", live_versions
    meta = json.loads((model_dir / "model.json").read_text())
    splits = meta["extra"]["splits"]
    assert splits["mode"] == "auto" and splits["block_s"] == 2
    assert splits["train"] and splits["test"] and sum(
        splits[s] for s in ("train", "val", "test")) <= 48
