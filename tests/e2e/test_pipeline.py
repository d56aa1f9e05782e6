"""The whole pipeline end to end, against a real broker: AV-Digits clips with
known labels replayed in real time through the real producer path, real ``streamproc
worker`` subprocesses serving a trained checkpoint, predictions read back read_committed.

What a window must be comes from an independent oracle (the pure Aligner over the records
that were sent, with their offsets); what its label must be comes from the checkpoint
run directly on the oracle's windows; how often the label must be right comes from the
checkpoint's own held-out test accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from pipeline_helpers import (
    STAGES,
    Bad,
    accuracy_floor,
    bad_records,
    live_origin,
    make_clips,
    offline_scores,
    pipeline_settings,
    replay_clips,
    same_label,
    send_raw,
    truths,
)
from worker_helpers import (
    REPO,
    WORKER_MAX_BYTES,
    Pred,
    WorkerProc,
    assert_windows_equal,
    oracle_windows,
    pred_of,
    read_all,
    read_predictions,
    read_to_end,
)

from streamproc import kafka
from streamproc.config import Settings
from streamproc.dev.demo import expected_windows, percentile, summarize
from streamproc.dev.localkafka import free_port
from streamproc.inference.predictor import Predictor
from streamproc.readers import ConsumeStats, consume
from streamproc.testing import MS, S, align_config
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BAD_AT_S = 5.0  # bad records are injected when the bad stream's replay reaches this


@dataclasses.dataclass
class LiveRun:
    settings: Settings
    clips: list
    origin: int
    expected: dict
    preds: list[Pred]  # the final predictions
    provisional: list[Pred]
    bad: list[Bad]
    dead: list[wire.DeadLetter]
    log: str


def read_everything(settings: Settings) -> list[Pred]:
    """Every prediction on the topic so far (copies nobody waited for too)."""
    return [pred_of(m) for m in read_to_end(settings, settings.topic("predictions"))]


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, tiny_model: Path, avdigits_tts: Path,
         tmp_path_factory: pytest.TempPathFactory) -> LiveRun:
    """One worker, three streams of six digits each (12 s); the "bad" stream gets one
    record of every kind of bad input mid-stream."""
    tmp = tmp_path_factory.mktemp("pipeline")
    clips = make_clips(tmp / "clips", {"cam-a": [3, 1, 4, 1, 5, 9], "cam-b": [2, 7, 1, 8, 2, 8],
                                       "bad": [6, 0, 9, 4, 3, 7]}, avdigits_tts)
    settings = pipeline_settings(kafka_bootstrap, tmp, tiny_model, clips)
    create_topics(settings)  # 8 MiB records allowed
    worker_settings = settings.replace(max_message_bytes=WORKER_MAX_BYTES)
    worker = WorkerProc(worker_settings, tmp / "worker.log")
    try:
        worker.wait_for(r"Worker ready", timeout=120)
        origin = live_origin(settings)
        bad: list[Bad] = []

        def inject(rec: wire.MediaRecord) -> None:  # in the bad stream's replay thread
            if rec.stream_id == "bad" and not bad and rec.ts_ns >= origin + BAD_AT_S * S:
                bad.extend(bad_records("bad", rec.ts_ns, WORKER_MAX_BYTES))
                send_raw(settings, bad)

        records = replay_clips(settings, clips, origin, inject)
        expected = oracle_windows(worker_settings, records)
        read_predictions(settings, set(expected), timeout=settings.idle_deadline_text_ms / 1000 + 40)
        read_all(settings, settings.topic("deadletter"), lambda m: len(m) >= len(bad), 20)
        assert worker.stop() == 0, worker.log()[-3000:]
        # read again after a clean stop: anything extra (it must not be) shows up too
        everything = read_everything(settings)
        dead = [wire.decode_dead_letter(wire.KafkaRecord.from_client(m))
                for m in read_to_end(settings, settings.topic("deadletter"))]
        return LiveRun(worker_settings, clips, origin, expected,
                       [p for p in everything if p.final], [p for p in everything if not p.final],
                       bad, dead, worker.log())
    finally:
        worker.abandon()


def test_every_window_gets_exactly_one_prediction(live: LiveRun) -> None:
    """Each window the oracle expects is published exactly once and nothing else is; its
    content (frames, audio seconds, segments, presence, source offsets) is the oracle's."""
    counts = Counter(p.key for p in live.preds)
    assert set(counts) == set(live.expected)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:5]
    assert_windows_equal(live.preds, live.expected, {c.stream_id for c in live.clips})
    # the demo's arithmetic for "every window overlapping a clip" agrees with the oracle
    for c in live.clips:
        assert {s for sid, s in live.expected if sid == c.stream_id} == \
            set(expected_windows(live.settings, c, live.origin))
    for p in live.preds:  # self-consistent on its own, not only equal to the oracle
        b = p.body
        mods, prov = b["modalities"], b["provenance"]
        assert mods["missing"] == [m for m in ("video", "audio", "text")
                                   if not mods[m]["present"]]
        for m in ("video", "audio", "text"):
            assert mods[m]["present"] == bool(prov[m])
        assert mods["video"]["frames"] == len(prov["video"])
        assert mods["video"]["sampled"] == min(8, mods["video"]["frames"])
        assert mods["text"]["segments"] == len(prov["text"])
        assert 0 < mods["audio"]["seconds"] <= 1.0
        assert b["window_end_ns"] - b["window_start_ns"] == live.settings.window_ms * MS
        assert b["window_start_ns"] % (live.settings.hop_ms * MS) == 0
    # transcripts really are missing from some windows (a modality masked, not an error)
    assert any(p.body["modalities"]["missing"] == ["text"] for p in live.preds)
    assert any(not p.body["modalities"]["missing"] for p in live.preds)


def test_labels_are_the_models_and_mostly_right(live: LiveRun, tiny_model: Path) -> None:
    """Labels and scores are what the checkpoint says on the oracle's windows (so batching
    never mixes windows up), and right on windows inside one digit at least as often as
    the checkpoint's held-out accuracy minus three standard errors."""
    predictor, offline = offline_scores(tiny_model, live.expected)
    heldout = predictor.model.checkpoint_extra["test"]["accuracy"]
    for p in live.preds:
        b = p.body
        assert b["model"] == {"name": "avdigits-late", "version": predictor.info["version"],
                              "checkpoint": predictor.info["checkpoint"]}
        assert list(b["scores"]) == predictor.labels
        assert math.fsum(b["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert b["label"] == max(b["scores"], key=b["scores"].get)
        off = offline[p.key]
        assert same_label(b, off), (p.key, b["scores"], off.scores)
        for lab, v in b["scores"].items():
            assert v == pytest.approx(off.scores[lab], abs=1e-3)
    truth = truths(live.clips, live.origin, [p.key for p in live.preds],
                   live.settings.window_ms * MS)
    assert len(truth) == 3 * sum(len(c.digits) for c in live.clips)  # 3 windows per digit
    correct = sum(p.body["label"] == truth[p.key] for p in live.preds if p.key in truth)
    acc, floor = correct / len(truth), accuracy_floor(heldout, len(truth))
    print(f"live accuracy {acc:.3f} on {len(truth)} windows; held-out {heldout:.3f}, "
          f"floor {floor:.3f}")
    assert acc >= floor
    # the demo's summary counts the same
    summary = summarize(live.settings, live.clips, live.origin,
                        [wire.decode_prediction(wire.KafkaRecord(None, json.dumps(p.body)
                                                                 .encode())) for p in live.preds],
                        0)
    assert (summary.windows, summary.expected) == (len(live.expected), len(live.expected))
    assert (summary.scored, summary.correct) == (len(truth), correct)


def test_provisional_predictions_come_first_and_every_window_ends_final(live: LiveRun) -> None:
    """With the default ``provisional_on=video,audio``, windows get a provisional
    prediction (rev 0) when video and audio are complete, before their transcript is;
    each window's final (rev 1) comes after it. A final with nothing added since repeats
    the provisional's scores, marked reused."""
    finals = {p.key: p.body for p in live.preds}
    provisional = {p.key: p.body for p in live.provisional}
    assert len(provisional) == len(live.provisional)  # one each
    assert provisional and set(provisional) <= set(finals)
    assert len(provisional) >= len(finals) // 2
    reused = 0
    for key, pb in provisional.items():
        fb = finals[key]
        assert (pb["rev"], pb["final"], fb["rev"], fb["final"]) == (0, False, 1, True)
        assert pb["emitted_at_ns"] < fb["emitted_at_ns"], key
        assert pb["latency_ms"]["total"] < fb["latency_ms"]["total"], key
        assert pb["modalities"]["text"]["segments"] <= fb["modalities"]["text"]["segments"]
        if fb["reused"]:
            reused += 1
            assert fb["scores"] == pb["scores"] and fb["label"] == pb["label"]
            assert fb["latency_ms"]["inference"] == 0.0
    assert all(b["rev"] == 1 for b in finals.values())
    print(f"{len(provisional)} provisional predictions for {len(finals)} windows, "
          f"{reused} finals reused their scores")
    summary = summarize(live.settings, live.clips, live.origin,
                        [wire.decode_prediction(wire.KafkaRecord(None, json.dumps(p.body)
                                                                 .encode()))
                         for p in live.preds + live.provisional], 0)
    assert summary.provisional_scored > 0
    assert percentile(summary.latency_first, 50) < percentile(summary.latency_total, 50)


def test_latency_breakdown_is_complete_and_adds_up(live: LiveRun) -> None:
    for p in live.preds:
        b, lat = p.body, p.body["latency_ms"]
        assert set(STAGES) | {"capture_to_worker_video", "capture_to_worker_audio"} <= set(lat)
        assert all(isinstance(v, float) and v >= 0 for v in lat.values()), lat
        # window end -> closed -> emitted
        assert lat["total"] == pytest.approx(lat["close"] + lat["added"], abs=0.01)
        assert lat["total"] == pytest.approx((b["emitted_at_ns"] - b["window_end_ns"]) / MS,
                                             abs=0.01)
        # closed -> queued for a batch -> computed (decode + forward) -> emitted
        assert lat["added"] >= lat["queue"] + lat["inference"] - 1.0
        assert lat["inference"] >= lat["preprocess"] + lat["model"] - 0.01


def test_bad_records_are_dead_lettered_and_the_stream_goes_on(live: LiveRun) -> None:
    """One record of each kind of bad input mid-stream: one dead letter each, with its
    source, kind and a reason a person can read; the stream's windows are all there and
    equal to the oracle's built from its good records alone."""
    assert len(live.bad) == 6
    letters = {d.source: d for d in live.dead}
    assert len(letters) == len(live.dead) == len(live.bad)
    for b in live.bad:
        d = letters[b.source]
        err = b.error(WORKER_MAX_BYTES)
        assert (d.kind, d.kind) == (b.kind, err.kind), b.what
        assert d.reason.startswith(str(err)) and b.words in d.reason, (b.what, d.reason)
        assert d.original.key == b.rec.key and d.original.headers == b.rec.headers
        if b.kind == "oversize":  # too large to copy: found again by its source offset
            assert d.original.value == b"" and "not copied" in d.reason
        else:
            assert d.original.value == b.rec.value
    assert live.log.count("dead letter (decode)") == 5
    assert live.log.count("dead letter (oversize)") == 1
    bad_clip = next(c for c in live.clips if c.stream_id == "bad")
    got = sorted(p.key[1] for p in live.preds if p.key[0] == "bad")
    assert got == expected_windows(live.settings, bad_clip, live.origin)
    assert_windows_equal(live.preds, live.expected, {"bad"})
    # the bad records were really in the middle of the stream's windows
    assert min(got) < live.bad[0].rec.timestamp_ms * MS < max(got)


# ---------------------------------------------------------------------------------------
# kill -9
# ---------------------------------------------------------------------------------------


class FinalsWatch:
    """Counts the final predictions on the topic as they come (provisional ones too)."""

    def __init__(self, settings: Settings) -> None:
        self.consumer: KafkaConsumer = kafka.consumer(settings)
        tps = [TopicPartition(settings.topic("predictions"), p)
               for p in range(settings.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.finals = self.provisional = 0

    def poll(self) -> None:
        for msgs in self.consumer.poll(timeout_ms=50).values():
            for m in msgs:
                if json.loads(m.value)["final"]:
                    self.finals += 1
                else:
                    self.provisional += 1


def test_kill_9_and_restart_every_window_once_for_a_consumer(
        kafka_bootstrap: str, tiny_model: Path, avdigits_tts: Path, tmp_path: Path) -> None:
    """The worker is killed (SIGKILL) once it has published a few final predictions, while
    the clips still play (windows then sit between their provisional and their final),
    and restarted at once. What the README promises: every window is predicted; a consumer
    using ``streamproc consume`` / ``streamproc.readers()`` sees each key once; a raw
    read_committed reader may see a duplicate copy of a window published just before the
    crash, identical to the first copy but for its times."""
    clips = make_clips(tmp_path / "clips", {"k1": [5, 2, 8, 0, 6], "k2": [9, 3, 7, 1, 4]},
                       avdigits_tts)
    settings = pipeline_settings(kafka_bootstrap, tmp_path, tiny_model, clips)
    create_topics(settings)
    first = WorkerProc(settings, tmp_path / "first.log")
    workers = [first]
    try:
        first.wait_for(r"Worker ready", timeout=120)
        origin = live_origin(settings)
        sent: list[wire.MediaRecord] = []
        replayer = threading.Thread(target=lambda: sent.extend(replay_clips(settings, clips,
                                                                            origin)))
        replayer.start()
        watcher = FinalsWatch(settings)
        try:
            while watcher.finals < 4 and replayer.is_alive():
                watcher.poll()
        finally:
            watcher.consumer.close()
        first.kill()
        killed_ns = time.time_ns()
        second = WorkerProc(settings, tmp_path / "second.log")
        workers.append(second)
        replayer.join(60)
        expected = oracle_windows(settings, sent)
        read_predictions(settings, set(expected), timeout=settings.idle_deadline_text_ms / 1000 + 60)
        assert second.stop() == 0, second.log()[-3000:]
        preds = read_everything(settings)
    finally:
        for w in workers:
            w.abandon()

    by_key = assert_windows_equal(preds, expected, {"k1", "k2"})
    worker_of = {f"{socket.gethostname()}:{w.pid}": name
                 for name, w in (("first", first), ("second", second))}
    producers = Counter(worker_of[c.worker] for cs in by_key.values() for c in cs)
    assert producers["first"] >= 4 and producers["second"] >= 1, producers
    dups = {k: cs for k, cs in by_key.items() if len(cs) > 1}
    for key, copies in dups.items():
        assert len(copies) == 2, key
        a, b = sorted(copies, key=lambda c: c.body["emitted_at_ns"])
        assert (worker_of[a.worker], worker_of[b.worker]) == ("first", "second")
        # published just before the crash (its progress record was not durable yet)
        assert killed_ns - 2 * S <= a.body["emitted_at_ns"] <= killed_ns, key
        assert a.body["label"] == b.body["label"]
        for lab, v in a.body["scores"].items():
            assert v == pytest.approx(b.body["scores"][lab], abs=1e-3)
    print(f"kill -9: {len(by_key)} windows, {producers} copies, {len(dups)} duplicated")

    # the consumer API and the CLI collapse the duplicates: each final exactly once, and
    # each (window, rev) once however the crash fell between a provisional and its final
    finals = [p for p in preds if p.final]
    stats = ConsumeStats()
    keys = [p.key for p in consume(settings, stats=stats, finals_only=True)]
    assert sorted(keys) == sorted(expected)
    assert (stats.duplicates, stats.conflicting) == (len(finals) - len(by_key), 0)
    revisions = [p.revision_key for p in consume(settings)]
    assert len(revisions) == len(set(revisions)) == len({p.revision_key for p in preds})
    # the kill fell between some windows' provisional and their final: the first worker
    # published the provisional, the second the final
    provisional_by = {p.key: worker_of[p.worker] for p in preds if not p.final}
    between = [k for k, cs in by_key.items() if provisional_by.get(k) == "first"
               and {worker_of[c.worker] for c in cs} == {"second"}]
    assert between, provisional_by
    out = subprocess.run([sys.executable, "-m", "streamproc.cli", "consume", "--json",
                          "--finals", "--bootstrap-servers", settings.bootstrap_servers,
                          "--topic-prefix", settings.topic_prefix],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cli_keys = [(j["stream_id"], j["window_start_ns"])
                for j in map(json.loads, out.stdout.splitlines())]
    assert sorted(cli_keys) == sorted(expected)
    assert f"{len(dups)} duplicates collapsed" in out.stderr

    # and every label, the replayed windows' too, is the checkpoint's on the oracle's window
    _, offline = offline_scores(tiny_model, expected)
    for p in finals:
        assert same_label(p.body, offline[p.key]), p.key


# ---------------------------------------------------------------------------------------
# a backlog: window order per stream, who wrote each prediction
# ---------------------------------------------------------------------------------------


def test_backlog_keeps_window_order_and_names_its_writer(
        kafka_bootstrap: str, tiny_model: Path, avdigits_tts: Path, tmp_path: Path) -> None:
    """Four streams' backlog on one partition, read by a fresh worker in big batches:
    in the predictions partition each stream's windows are in window order, and every
    prediction names its worker group, model and window settings in headers. The worker
    logs the model it serves (in a process of its own here), the default bound on its
    finals' wait and how often its threads switch (the default, and a second worker's own
    setting). A second group
    (align-only, other lateness) started on the same prefix says loudly that it is
    align-only and that the first group writes there."""
    clips = make_clips(tmp_path / "clips", {f"o{i}": [(i + j) % 10 for j in range(6)]
                                            for i in range(4)}, avdigits_tts)
    settings = pipeline_settings(kafka_bootstrap, tmp_path, tiny_model, clips, partitions=1,
                                 batch_size=64, model_in="process")
    create_topics(settings)
    hop = settings.hop_ms * MS
    origin = (time.time_ns() - 120 * S) // hop * hop
    expected = oracle_windows(settings, replay_clips(settings, clips, origin, realtime=False))
    worker = WorkerProc(settings, tmp_path / "worker.log")
    workers = [worker]
    try:
        msgs = read_all(settings, settings.topic("predictions"),
                        lambda ms: set(expected) <= {p.key for p in map(pred_of, ms) if p.final},
                        timeout=settings.idle_deadline_text_ms / 1000 + 90)
        (served,) = worker.wait_for(r"serving model (\S+ version \S+) from \S+ on (\S+) "
                                    r"\(\d+ CPU thread\(s\)\) in a process")
        # the default bound on a final's wait, resolved from the lateness (3000 - 100 - 200)
        worker.wait_for(r"finals: at most 2700 ms after their provisional \(final_within_ms "
                        r"auto\)")
        worker.wait_for(r"threads switch every 1000 us")  # the default
        other = settings.replace(app_id=f"{settings.app_id}-b", model="",
                                 lateness_text_ms=4000, web_port=free_port(),
                                 data_dir=str(tmp_path / "data-b"), switch_interval_us=2500)
        second = WorkerProc(other, tmp_path / "second.log")
        workers.append(second)
        second.wait_for(r"from worker group", timeout=90)
        second.wait_for(r"threads switch every 2500 us")
        assert second.stop() == 0, second.log()[-3000:]
        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        for w in workers:
            w.abandon()

    starts: dict[str, list[int]] = {}  # finals; provisional ones come between them
    for m in sorted(msgs, key=lambda m: m.offset):
        body = json.loads(m.value)
        if body["final"]:
            starts.setdefault(body["stream_id"], []).append(body["window_start_ns"])
    assert {(sid, s) for sid, ss in starts.items() for s in ss} == set(expected)
    for sid, ss in starts.items():
        assert ss == sorted(set(ss)), f"{sid}: windows published out of order"

    predictor = Predictor(str(tiny_model), "cpu")
    name, version = predictor.info["name"], predictor.info["version"]
    assert served == (f"{name} version {version}", "cpu")
    window = (f"window_ms=1000,hop_ms=500,lateness_video_ms={settings.lateness_video_ms},"
              f"lateness_audio_ms={settings.lateness_audio_ms},"
              f"lateness_text_ms={settings.lateness_text_ms},frames_per_window=8")
    for m in msgs:
        h = dict(m.headers)
        assert (h["sp-app"], h["sp-model"], h["sp-window"]) == (
            settings.app_id.encode(), f"{name}/{version}".encode(), window.encode())
    log = second.log()
    assert "NO MODEL: --model is empty, so this worker is ALIGN-ONLY" in log
    (line,) = [x for x in log.splitlines() if "from worker group" in x]
    assert f"worker group {settings.app_id!r}" in line and "WARNING" in line
    assert f"model '{name}/{version}' (this worker: 'align-only/1')" in line
    assert "lateness_text_ms=4000" in line


def test_warm_up_runs_the_model_once_for_every_batch_size(tiny_model: Path) -> None:
    predictor = Predictor(str(tiny_model), "cpu", threads=1)
    sizes: list[int] = []
    predictor.model.register_forward_hook(lambda mod, args, out: sizes.append(out.shape[0]))
    assert predictor.warm_up(5, align_config(1000)) > 0
    assert sizes == [1, 2, 3, 4, 5]
