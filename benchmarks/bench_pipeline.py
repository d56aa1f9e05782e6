"""W1 end to end: one ``streamproc worker`` serving the reference model.

Three measurements in one run (benchmarks/README.md has W1; the records are
bench_align.w1_records: real 320x240 JPEGs q80, real PCM, transcript segments ~2 s apart
arriving ~1 s after they end):

1. **live**: 8 W1 streams published in real time through the real Publisher for
   ``--seconds``; a consumer in its own process reads the predictions as they arrive (as
   a downstream application would) and /metrics is scraped
   every 2.5 s. Reported: windows/s published against windows/s due, consumer lag and
   median latency in the first and second half (growing = not keeping up; the lag once
   the records the worker holds by design level off), the worker's CPU, and latency
   added after a window closed: the worker's own ``added`` field (closed -> handed to the
   producer) and closed -> received by the consumer.
2. **saturation**: ``--backlog-seconds`` of W1 already in Kafka, a fresh worker (new
   consumer group) reads it as fast as it can; windows/s from its first to its last
   prediction. Then, in the same process, the bare model (``Predictor``: JPEG decode,
   resize, log-mel, forward) on the same windows in the same batches the worker formed
   (predictions of one batch share its timing fields). Rounds alternate; medians.
3. **inference stage alone**: the same windows through ``InferenceOutput`` (micro-batcher,
   model thread, prediction JSON, aiokafka publish to a real topic) without faust, against
   the bare model on the batches it formed.

4. **frame sizes** (``--frame-sizes 640x480,1280x720``, instead of 1-3): the live run
   with W1's frames replaced by camera-like JPEGs of each size (smooth colour regions and
   sensor noise, q80; about 60 KB at 640x480 and 160 KB at 720p, as real cameras make;
   W2 is 8 streams of 720p at 15 fps). One row per size with the latency added after a
   window closed; ``--write-docs`` appends the rows, with the machine's load, to
   docs/benchmarks.md.

The model is the demo's reference model (``streamproc.dev.demo.prepare_model``: trained once,
cached) unless ``--model`` names a checkpoint.

    .venv/bin/python benchmarks/bench_pipeline.py [--seconds 60] [--backlog-seconds 30]
        [--rounds 3] [--model DIR] [--write-docs]
    .venv/bin/python benchmarks/bench_pipeline.py --frame-sizes 640x480,1280x720 \
        [--seconds 30] [--streams 8] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from streamproc.align.aligner import AlignConfig, Aligner, Window
from streamproc.capture.publisher import Publisher
from streamproc.config import Settings, env_name
from streamproc.dev.demo import Layout, WorkerProcess, default_dir, percentile, prepare_model
from streamproc.dev.localkafka import existing_or_local, free_port
from streamproc.readers import consume
from streamproc.topics import create_topics
from streamproc.wire.codec import MediaRecord, Prediction, TranscriptSegment, VideoFrame
from streamproc.worker.metrics import GAUGES_EVERY_S

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import w1_records  # one W1 generator for every benchmark
from bench_producer import machine

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
PNG = ROOT / "docs" / "pipeline-latency.png"
S = 1_000_000_000
MS = 1_000_000
GOAL_P99_MS = 150.0
GOAL_RATIO = 0.8


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


#: The workers' provisional_on (None: the settings' default), from --provisional-on.
PROVISIONAL_ON: str | None = None
#: Whether the live run's transcripts pause as speech does (--pauses).
PAUSES = False

def base_settings(bootstrap: str, model: Path, provisional_on: str | None = None) -> Settings:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    # from the environment: the worker gets its settings from these (STREAMPROC_MODEL_THREADS
    # and the like set for a run reach it here), not from the environment itself
    s = Settings.load().replace(bootstrap_servers=bootstrap, topic_prefix=prefix,
                                app_id=prefix, partitions=4, model=str(model),
                                metrics_port=free_port())
    return s if provisional_on is None else s.replace(provisional_on=provisional_on)


def windows_of(settings: Settings, records: Sequence[MediaRecord]) -> dict[tuple[str, int], Window]:
    """The windows a worker cuts from ``records``, each in its last version (the final):
    fed in event-time order on a clock at the newest end seen, closing as they go (a
    buffer cap would drop data of a backlog held whole), the rest flushed at the end."""
    aligner = Aligner(AlignConfig.from_settings(settings))
    out: dict[tuple[str, int], Window] = {}
    clock = 0
    for i, r in enumerate(sorted(records, key=lambda r: (r.ts_ns, r.modality, r.seq))):
        clock = max(clock, r.end_ns)
        aligner.add(r, clock)
        if i % 64 == 63:
            out.update((w.key, w) for w in aligner.poll(clock))
    out.update((w.key, w) for w in aligner.poll(clock) + aligner.flush())
    return out


def batches_of(preds: Sequence[Prediction]) -> list[list[tuple[str, int]]]:
    """The worker's batches: predictions of one batch share its timing fields."""
    groups: dict[tuple, list[tuple[str, int]]] = defaultdict(list)
    for p in preds:
        lat = p.latency_ms
        groups[(lat["inference"], lat["preprocess"], lat["model"])].append(p.key)
    return list(groups.values())


def bare_rate(predictor, windows: dict, batches: Sequence[Sequence]) -> tuple[float, int]:
    """Windows/s of the model alone over ``batches`` (keys or windows) and the count; a
    first pass warms it up (torch and oneDNN set up each batch shape on first use)."""
    for batch in batches:
        predictor([windows[k] if isinstance(k, tuple) else k for k in batch
                   if not isinstance(k, tuple) or k in windows])
    total, n = 0.0, 0
    for batch in batches:
        ws = [windows[k] if isinstance(k, tuple) else k for k in batch
              if not isinstance(k, tuple) or k in windows]
        if not ws:
            continue
        t0 = time.perf_counter()
        predictor(ws)
        total += time.perf_counter() - t0
        n += len(ws)
    return n / total, n


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its running children so far (Linux /proc): the
    worker's, and its model process's with ``--model-in process``."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # exited meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def scrape(port: int) -> dict[str, float]:
    """/metrics as ``name`` -> value summed over labels, plus ``name{le=X}`` for buckets."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = defaultdict(float)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for fam in text_string_to_metric_families(r.read().decode()):
            for s in fam.samples:
                out[s.name] += s.value
                if "le" in s.labels:
                    out[f"{s.name}{{le={s.labels['le']}}}"] += s.value
                if "modality" in s.labels:
                    out[f"{s.name}{{modality={s.labels['modality']}}}"] += s.value
    return out


def _collect_to_file(fields: dict, want: int, timeout_s: float, path: str) -> None:
    """Write ``received_ns json`` per prediction, provisional ones too, until ``want``
    distinct windows have their final or the timeout. Lines are written as they come: a
    list of every prediction object would grow for the whole run, and the interpreter's
    full collections over it paused this consumer for longer the longer the run."""
    seen = set()
    with open(path, "w", encoding="utf-8") as f:
        for p in consume(Settings(**fields), follow=True, timeout_s=timeout_s):
            f.write(f"{time.time_ns()} {json.dumps(p.to_json())}\n")
            if p.final:
                seen.add(p.key)
            if len(seen) >= want:
                return


class Collector:
    """A consumer of the predictions in its own process, as a downstream application is:
    in the bench's process it would share one GIL with the producer publishing the
    streams (about 18 MB/s of frames at 720p) and time that contention, not the worker."""

    def __init__(self, settings: Settings, want: int, timeout_s: float, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_collect_to_file, args=(fields, want, timeout_s,
                                                               str(path)), daemon=True)
        self.proc.start()

    def join(self, timeout_s: float) -> list[tuple[Prediction, int]]:
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            raise RuntimeError(f"the prediction consumer did not finish in {timeout_s:.0f} s")
        if self.proc.exitcode != 0:
            raise RuntimeError(f"the prediction consumer failed (exit {self.proc.exitcode})")
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            recv, obj = line.split(" ", 1)
            out.append((Prediction(**json.loads(obj)), int(recv)))
        return out


# ---------------------------------------------------------------------------------------
# 1. live
# ---------------------------------------------------------------------------------------


def camera_frames(width: int, height: int, n: int = 4) -> list[VideoFrame]:
    """``n`` camera-like JPEGs (q80): smooth colour regions plus a little sensor noise,
    which compress like real footage (W1's noise frames are the worst case for JPEG)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        out.append(VideoFrame.from_image("x", 0, 0, img, quality=80))
    return out


def with_frames(recs: list[tuple[int, MediaRecord]], frames: Sequence[VideoFrame]
                ) -> list[tuple[int, MediaRecord]]:
    """W1 with every video frame's image replaced by ``frames`` in turn."""
    out = []
    for arrival, r in recs:
        if isinstance(r, VideoFrame):
            f = frames[r.seq % len(frames)]
            r = dataclasses.replace(r, data=f.data, width=f.width, height=f.height)
        out.append((arrival, r))
    return out


def later(rec: MediaRecord, dt: int) -> MediaRecord:
    """``rec`` moved ``dt`` ns later in event time."""
    if isinstance(rec, TranscriptSegment):
        words = None if rec.words is None else tuple(
            dataclasses.replace(w, start_ns=w.start_ns + dt, end_ns=w.end_ns + dt)
            for w in rec.words)
        return dataclasses.replace(rec, start_ns=rec.start_ns + dt, end_ns=rec.end_ns + dt,
                                   words=words)
    return dataclasses.replace(rec, ts_ns=rec.ts_ns + dt)


def live_phase(bootstrap: str, model: Path, seconds: int, streams: int, tmp: Path,
               frame_size: tuple[int, int] | None = None) -> dict:
    settings = base_settings(bootstrap, model, PROVISIONAL_ON)
    create_topics(settings)
    worker = WorkerProcess(settings, model, tmp / "live" / "worker.log")
    try:
        worker.wait_ready()
        # the records and their windows are prepared at a fixed event time and moved to the
        # schedule's origin as they are published: preparing 10 minutes of 32 streams takes
        # longer than a margin, and a schedule that starts before it would open with a burst
        hop = settings.hop_ms * MS
        base = 1_700_000_000 * S // hop * hop
        recs = w1_records(seconds, streams, t0=base, pauses=PAUSES)
        if frame_size is not None:
            recs = with_frames(recs, camera_frames(*frame_size))
        prepared = set(windows_of(settings, [r for _, r in recs]))  # keys: their audio is GBs
        reader = Collector(settings, len(prepared), seconds + 60,
                           tmp / "live" / "predictions.txt")
        samples: list[tuple[float, dict[str, float], float]] = []
        stop = threading.Event()

        def scraper() -> None:
            while not stop.wait(2.5):
                samples.append((time.time_ns(), scrape(settings.metrics_port),
                                cpu_seconds(worker.proc.pid)))

        scr = threading.Thread(target=scraper, daemon=True)
        scr.start()
        behind = []
        origin = (time.time_ns() + 2 * S) // hop * hop + hop
        shift = origin - base
        expected = {(sid, start + shift) for sid, start in prepared}
        with Publisher(settings) as pub:
            for arrival, rec in recs:
                delay = (arrival + shift - time.time_ns()) / S
                if delay > 0:
                    time.sleep(delay)
                else:
                    behind.append(-delay)
                pub.publish(later(rec, shift))
        log(f"live: {len(recs)} records published; producer behind schedule by "
            f"{max(behind, default=0) * 1000:.0f} ms at most")
        got = reader.join(seconds + 90)
        stop.set()
        scr.join(5)
    finally:
        worker.stop()
    # the finals, first copy wins; and each window's first prediction of any kind
    preds = {p.key: (p, recv) for p, recv in reversed(got) if p.final}
    first: dict[tuple[str, int], tuple[Prediction, int]] = {}
    newest: dict[tuple[str, int], tuple[Prediction, int]] = {}  # each window's last revision
    for p, recv in got:
        first.setdefault(p.key, (p, recv))
        if p.final and (p.key not in newest or p.rev > newest[p.key][0].rev):
            newest[p.key] = (p, recv)
    return {"settings": settings, "origin": origin, "seconds": seconds, "streams": streams,
            "expected": expected, "preds": preds, "first": first, "newest": newest,
            "samples": samples,
            "records": len(recs), "provisional": sum(not p.final for p, _ in got),
            "revisions": sum(p.final and p.quality.get("closed_by") == "revision"
                             for p, _ in got)}


def summarize_live(live: dict, warmup_s: float = 10.0) -> dict:
    s: Settings = live["settings"]
    origin, seconds = live["origin"], live["seconds"]
    preds = live["preds"]
    lo, hi = origin + int(warmup_s * S), origin + seconds * S
    steady = [p for p, _ in preds.values() if lo <= p.emitted_at_ns < hi]
    missing = live["expected"] - preds.keys()
    extra = preds.keys() - live["expected"]
    if missing or extra:
        log(f"live: expected, not predicted: {sorted(missing)[:5]} ...; predicted, not "
            f"expected: {sorted(extra)[:5]} ...")
    due = live["streams"] * 1000 / s.hop_ms
    # latency of the steady state: windows closed by their watermarks (or final_within's
    # bound) while the streams ran; the last windows of every stream close together on the
    # idle deadline once the input stops (reported apart)
    live_ones = [(p, recv) for p, recv in preds.values() if lo <= p.emitted_at_ns < hi
                 and p.quality.get("closed_by") in ("watermark", "bound")]
    flush = [(p, recv) for p, recv in preds.values() if p.emitted_at_ns >= hi]
    added = [p.latency_ms["added"] for p, _ in live_ones]
    received = [(recv - p.emitted_at_ns) / MS + p.latency_ms["added"] for p, recv in live_ones]
    total = [p.latency_ms["total"] for p, _ in live_ones]
    # closed -> acknowledged by the broker, from the worker's histogram over the same span
    marks = [m for t, m, _ in live["samples"] if lo <= t < hi]
    cpu = [(t, c) for t, _, c in live["samples"] if lo <= t < hi]  # the worker's CPU seconds
    name = "streamproc_added_latency_seconds"
    within = float("nan")
    if len(marks) >= 2:
        n = marks[-1][f"{name}_count"] - marks[0][f"{name}_count"]
        ok = marks[-1][f"{name}_bucket{{le=0.15}}"] - marks[0][f"{name}_bucket{{le=0.15}}"]
        within = ok / n if n else float("nan")
    calls = float("nan")  # windows through the model per final window (provisional ones too)
    model_ms = float("nan")
    cpu_ms = float("nan")  # the worker process's CPU time per final window
    encodings: dict[str, float] = {}
    if len(marks) >= 2:
        scored = marks[-1]["streamproc_batch_size_sum"] - marks[0]["streamproc_batch_size_sum"]
        # final windows (not their revisions, which the model sees as well)
        done = (marks[-1]["streamproc_windows_emitted_total"]
                - marks[0]["streamproc_windows_emitted_total"])
        calls = scored / done if done else float("nan")
        # the model thread's time (preprocess + forward) per final window published: what
        # provisional windows and revisions cost, against a run with finals only
        spent = (marks[-1]["streamproc_inference_seconds_sum"]
                 - marks[0]["streamproc_inference_seconds_sum"])
        model_ms = spent * 1000 / done if done else float("nan")
        cpu_ms = (cpu[-1][1] - cpu[0][1]) * 1000 / done if done else float("nan")
        # encoder outputs a final took from its provisional instead of computing them again
        for m in ("video", "audio", "text"):
            key = f"streamproc_encodings_reused_total{{modality={m}}}"
            n = marks[-1].get(key, 0.0) - marks[0].get(key, 0.0)
            encodings[m] = n / done if done else float("nan")
    # the lag counts records whose offsets are held back by design (a window's records
    # until its final is out and it left the revision horizon, then the next commit): it
    # rises for that long before it levels, and the gauge shows it up to one update
    # later, so it is judged after both
    held = (s.window_ms + s.lateness_text_ms + s.revision_horizon_ms + 1000) * MS \
        + int(GAUGES_EVERY_S * S)
    lag_lo = max(lo, origin + held)
    lags = [(t, m.get("streamproc_consumer_lag", 0.0)) for t, m, _ in live["samples"]
            if lag_lo <= t < hi]
    half = (lag_lo + hi) / 2
    first = [v for t, v in lags if t < half]
    second = [v for t, v in lags if t >= half]
    cpu_share = ((cpu[-1][1] - cpu[0][1]) / ((cpu[-1][0] - cpu[0][0]) / S)
                 if len(cpu) >= 2 else float("nan"))
    batch_sizes = [len(b) for b in batches_of([p for p, _ in preds.values()])]
    total_first = [p.latency_ms["total"] for p in steady if p.emitted_at_ns < (lo + hi) / 2]
    total_second = [p.latency_ms["total"] for p in steady if p.emitted_at_ns >= (lo + hi) / 2]
    steady_first = [(p, recv) for p, recv in live["first"].values()
                    if lo <= p.emitted_at_ns < hi]
    return {
        "first_total": [(recv - p.emitted_at_ns) / MS + p.latency_ms["total"]
                        for p, recv in steady_first],
        "final_total": [(recv - p.emitted_at_ns) / MS + p.latency_ms["total"]
                        for p, recv in preds.values() if lo <= p.emitted_at_ns < hi],
        # the newest revision's: the window end plus recv - the window end, over the same
        # windows (a revision's own latency_ms counts from its revision's close)
        "newest_total": [(recv - live["newest"][k][0].window_end_ns) / MS
                         for k, (p, _) in preds.items() if lo <= p.emitted_at_ns < hi
                         for recv in (live["newest"][k][1],)],
        "bound": sum(p.quality.get("closed_by") == "bound" for p, _ in preds.values()),
        "provisional": live["provisional"], "revisions": live["revisions"],
        "model_calls": calls, "model_ms": model_ms, "cpu_ms": cpu_ms, "encodings_reused": encodings,
        "within_goal": within, "steady_windows": len(live_ones),
        "flush_added": [p.latency_ms["added"] for p, _ in flush],
        "windows": len(preds), "expected": len(live["expected"]),
        "missing": len(missing), "extra": len(extra),
        "rate": len(steady) / ((hi - lo) / S), "due": due,
        "added": added, "received": received, "total": total,
        "lag_first": statistics.mean(first) if first else float("nan"),
        "lag_second": statistics.mean(second) if second else float("nan"),
        "lag_max": max((v for _, v in lags), default=float("nan")),
        "total_first": statistics.median(total_first) if total_first else float("nan"),
        "total_second": statistics.median(total_second) if total_second else float("nan"),
        "cpu": cpu_share, "batches": batch_sizes,
        "queue": [p.latency_ms["queue"] for p, _ in live_ones],
        "inference": [p.latency_ms["inference"] for p, _ in live_ones],
        "publish": [p.latency_ms["publish"] for p, _ in live_ones],
    }


# ---------------------------------------------------------------------------------------
# 2. saturation, 3. the inference stage alone
# ---------------------------------------------------------------------------------------


def produce_backlog(settings: Settings, seconds: int, streams: int) -> list[MediaRecord]:
    hop = settings.hop_ms * MS
    t0 = (time.time_ns() - (seconds + 120) * S) // hop * hop
    recs = [r for _, r in w1_records(seconds, streams, seed=2, t0=t0)]
    with Publisher(settings) as pub:
        for r in recs:
            pub.publish(r)
    return recs


def saturation_round(settings: Settings, model: Path | str, want: int, tmp: Path,
                     into: list[Prediction] | None = None,
                     timeout_s: float = 600) -> list[Prediction]:
    """A fresh worker group reads the whole backlog; each window's final prediction (its
    first copy), once all ``want`` are out; provisional predictions go to ``into``.
    ``model`` "": the worker runs align-only (window summaries, no inference)."""
    from kafka import TopicPartition

    from streamproc import kafka
    from streamproc.wire.codec import KafkaRecord, decode_prediction

    s = settings.replace(app_id=f"{settings.topic_prefix}-{uuid.uuid4().hex[:6]}",
                         metrics_port=0)
    consumer = kafka.consumer(s)
    tps = [TopicPartition(s.topic("predictions"), p) for p in range(s.partitions)]
    consumer.assign(tps)
    for tp, offset in consumer.end_offsets(tps).items():  # earlier rounds' are not ours
        consumer.seek(tp, offset)
    worker = WorkerProcess(s, model, tmp / s.app_id / "worker.log")
    preds: dict[tuple[str, int], Prediction] = {}
    provisional: dict[tuple[str, int], Prediction] = {}
    try:
        worker.wait_ready()
        deadline = time.monotonic() + timeout_s
        while len(preds) < want and time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    p = decode_prediction(KafkaRecord.from_client(m))
                    if p.final:  # the first final (rev 1 after a provisional)
                        preds.setdefault(p.key, p)
                    else:
                        provisional.setdefault(p.key, p)
    finally:
        worker.stop()
        consumer.close()
    if into is not None:
        into.extend(provisional.values())
    return list(preds.values())


def watermark_rate(preds: Sequence[Prediction]) -> float:
    """Windows/s of a worker reading a backlog: windows closed by their watermarks (the
    last ones of each stream wait for the idle deadline once the backlog is read, which is
    not throughput), after the first 10 % (the fresh worker's model warms up, as the bare
    one did before it was timed)."""
    emitted = sorted(p.emitted_at_ns for p in preds if p.quality.get("closed_by") == "watermark")
    emitted = emitted[len(emitted) // 10:]
    return (len(emitted) - 1) / ((emitted[-1] - emitted[0]) / S)


async def _inference_alone(settings: Settings, predictor, windows: list[Window]) -> tuple[float, list]:
    from aiokafka import AIOKafkaProducer

    from streamproc.inference.outputs import InferenceOutput

    batches: list[list[Window]] = []

    def model(ws):
        batches.append(list(ws))
        return predictor(ws)

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                max_request_size=settings.max_message_bytes, acks="all")
    await producer.start()
    topic = settings.topic("predictions")

    async def enqueue(rec):
        return await producer.send(topic, value=rec.value, key=rec.key,
                                   headers=list(rec.headers), timestamp_ms=rec.timestamp_ms)

    output = InferenceOutput(model, enqueue, model_info=predictor.info,
                             max_batch=settings.batch_size,
                             max_wait_ms=settings.batch_max_wait_ms)
    await output.start()
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(output.submit(w) for w in windows))
        elapsed = time.perf_counter() - t0
    finally:
        await output.stop()
        await producer.stop()
    return len(windows) / elapsed, batches


def saturation_phase(bootstrap: str, model: Path, seconds: int, streams: int, rounds: int,
                     tmp: Path) -> dict:
    from streamproc.inference.predictor import Predictor

    settings = base_settings(bootstrap, model, PROVISIONAL_ON)
    create_topics(settings)
    recs = produce_backlog(settings, seconds, streams)
    windows = windows_of(settings, recs)
    log(f"saturation: backlog of {len(recs)} records, {len(windows)} windows")
    predictor = Predictor(str(model), "cpu")
    out: dict[str, list] = defaultdict(list)
    for r in range(rounds):
        align_only = watermark_rate(saturation_round(settings, "", len(windows), tmp))
        preds = saturation_round(settings, model, len(windows), tmp)
        pipe = watermark_rate(preds)
        batches = batches_of(preds)
        bare, n = bare_rate(predictor, windows, batches)
        stage_rate, stage_batches = asyncio.run(_inference_alone(settings, predictor,
                                                                 list(windows.values())))
        stage_bare, _ = bare_rate(predictor, windows, stage_batches)
        out["pipeline"].append(pipe)
        out["align_only"].append(align_only)
        out["bare"].append(bare)
        out["ratio"].append(pipe / bare)
        out["batch_mean"].append(statistics.mean(len(b) for b in batches))
        out["stage"].append(stage_rate)
        out["stage_bare"].append(stage_bare)
        out["stage_ratio"].append(stage_rate / stage_bare)
        out["stage_batch_mean"].append(statistics.mean(len(b) for b in stage_batches))
        log(f"round {r + 1}: align-only worker {align_only:.1f} windows/s; "
            f"pipeline {pipe:.1f} windows/s, bare model {bare:.1f} on the same "
            f"{len(batches)} batches ({n} windows), ratio {pipe / bare:.2f}; inference stage "
            f"{stage_rate:.1f} vs {stage_bare:.1f} ({stage_rate / stage_bare:.2f})")
    out["windows"] = [len(windows)]
    return dict(out)


def provisional_cost(bootstrap: str, model: Path, seconds: int, streams: int, rounds: int,
                     tmp: Path) -> list[str]:
    """Windows/s of final predictions from one backlog with provisional predictions on
    (the default) and off, alternated (on, off, off, on, ...); a table row per run."""
    settings = base_settings(bootstrap, model)
    create_topics(settings)
    recs = produce_backlog(settings, seconds, streams)
    want = len(windows_of(settings, recs))
    log(f"provisional cost: backlog of {len(recs)} records, {want} windows")
    modes = [settings.provisional_on, "none"]
    rows = []
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            load0 = os.getloadavg()[0]
            early: list[Prediction] = []
            finals = saturation_round(settings.replace(provisional_on=mode), model, want,
                                      tmp, early)
            rate = watermark_rate(finals)
            whole = sum(p.reused for p in finals)
            rows.append(f"| {time.strftime('%H:%M')} | {mode} | {len(finals)} ({want - len(finals)}) "
                        f"| {rate:.1f} | {len(early)} | {whole} | "
                        f"{(len(early) + len(finals) - whole) / len(finals):.2f} | "
                        f"{load0:.1f} / {os.getloadavg()[0]:.1f} |")
            log(rows[-1])
    return rows


PROVISIONAL_HEADER = ("| time | provisional_on | finals (missing) | finals/s | provisional "
                      "predictions | finals repeating their provisional | model calls per "
                      "final | load before / after |\n|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def plot(live: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    hi = max(GOAL_P99_MS * 1.3, percentile(summary["received"], 99.5) * 1.1)
    bins = [hi * i / 60 for i in range(61)]
    for xs, label in ((summary["added"], "worker: closed -> sent to Kafka (added)"),
                      (summary["received"], "closed -> received by a consumer")):
        ax1.hist([min(x, hi) for x in xs], bins=bins, alpha=0.55,
                 label=f"{label}; p50 {percentile(xs, 50):.0f}, p99 {percentile(xs, 99):.0f} ms")
    ax1.axvline(GOAL_P99_MS, color="k", ls=":", lw=1, label=f"goal: p99 <= {GOAL_P99_MS:.0f} ms")
    ax1.set_xlabel("latency added after the window closed (ms)")
    ax1.set_ylabel("windows")
    ax1.set_title(f"W1 live: {live['streams']} streams, {summary['windows']} windows")
    ax1.legend(fontsize=7)
    origin = live["origin"]
    pts = sorted(((p.window_end_ns - origin) / S, p.latency_ms["total"], p.latency_ms["added"])
                 for p, _ in live["preds"].values())
    ax2.plot([t for t, _, _ in pts], [x for _, x, _ in pts], ".", ms=2,
             label="window end -> prediction (total)")
    ax2.plot([t for t, _, _ in pts], [x for _, _, x in pts], ".", ms=2,
             label="closed -> prediction (added)")
    ax2.set_yscale("log")
    ax2.set_xlabel("window end (s into the run)")
    ax2.set_ylabel("ms")
    ax2.set_title("latency over the run (flat = keeping up)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kept_up(live: dict, summary: dict) -> bool:
    """Every window published at the rate due, and neither the consumer lag nor the median
    latency grew from the first half of the run to the second. The lag is sampled every
    2.5 s and a sample may catch up to a second's input unread; growth within that (and
    within 100 ms of median latency) is not counted."""
    per_second = live["records"] / live["seconds"]
    return (summary["missing"] == 0 and summary["rate"] >= 0.98 * summary["due"]
            and summary["lag_second"] <= summary["lag_first"] + per_second
            and summary["total_second"] <= summary["total_first"] + 100)


def report(live: dict, summary: dict, sat: dict, model: Path, args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in sat.items()}
    a, r = summary["added"], summary["received"]
    kept = kept_up(live, summary)
    last = live["samples"][-1][1] if live["samples"] else {}
    rows = [
        "| measure | value | goal |",
        "|---|---|---|",
        f"| streams sustained in real time | {live['streams']} "
        f"({'all windows, on time' if kept else 'NOT keeping up'}) | >= 8 |",
        f"| windows/s published (due) | {summary['rate']:.1f} ({summary['due']:.1f}) | = due |",
        f"| windows predicted / expected (missing; not expected) | {summary['windows']} / "
        f"{summary['expected']} ({summary['missing']}; {summary['extra']}) | all |",
        f"| consumer lag once the held records level off, mean 1st / 2nd half (max), "
        f"records | {summary['lag_first']:.0f} / "
        f"{summary['lag_second']:.0f} ({summary['lag_max']:.0f}) | not growing |",
        f"| window end -> prediction, median 1st / 2nd half | {summary['total_first']:.0f} / "
        f"{summary['total_second']:.0f} ms | not growing |",
        f"| window end -> first prediction received ({summary['provisional']} provisional): "
        f"p50 / p99 | {percentile(summary['first_total'], 50):.0f} / "
        f"{percentile(summary['first_total'], 99):.0f} ms | <= 300 / 500 ms |",
        f"| windows through the model per final window (live) | {summary['model_calls']:.2f} | "
        f"<= 1.3 |",
        f"| model thread time (preprocess + forward) per final window (live) | "
        f"{summary['model_ms']:.2f} ms | reported: against a `--provisional-on none` run |",
        f"| worker CPU time (every thread) per final window (live) | {summary['cpu_ms']:.2f} "
        f"ms | reported: against a `--provisional-on none` run |",
        "| encoder outputs taken from the provisional, per final window: video / audio / "
        "text | " + " / ".join(f"{summary['encodings_reused'].get(m, float('nan')):.2f}"
                                for m in ("video", "audio", "text")) + " | reported |",
        f"| revised finals (transcripts after their windows' finals) | "
        f"{summary['revisions']} | reported |",
        f"| records late for their windows / all dead letters (live, worker counters) | "
        f"{last.get('streamproc_late_total', 0):.0f} / "
        f"{last.get('streamproc_dead_letters_total', 0):.0f} | reported |",
        f"| window end -> final prediction received ({summary['bound']} closed on "
        f"final_within's bound): p50 / p99 | "
        f"{percentile(summary['final_total'], 50):.0f} / "
        f"{percentile(summary['final_total'], 99):.0f} ms | p99 <= text lateness + 200 ms |",
        f"| window end -> its newest revision received: p50 / p99 | "
        f"{percentile(summary['newest_total'], 50):.0f} / "
        f"{percentile(summary['newest_total'], 99):.0f} ms | reported |",
        f"| added after close, worker (`added`): p50 / p99 | {percentile(a, 50):.1f} / "
        f"**{percentile(a, 99):.1f} ms** | p99 <= {GOAL_P99_MS:.0f} ms |",
        f"| added after close, received by a consumer: p50 / p99 | {percentile(r, 50):.1f} / "
        f"**{percentile(r, 99):.1f} ms** | p99 <= {GOAL_P99_MS:.0f} ms |",
        f"| windows acknowledged by the broker within {GOAL_P99_MS:.0f} ms of closing "
        f"(worker histogram) | **{summary['within_goal']:.1%}** | >= 99 % |",
        f"| windows closed after the input stopped (the last ones together, on the idle "
        f"deadline): `added` p50 / max | {percentile(summary['flush_added'], 50):.0f} / "
        f"{max(summary['flush_added'], default=float('nan')):.0f} ms "
        f"({len(summary['flush_added'])} windows) | |",
        f"| of which queue / inference / publish (mean) | "
        f"{statistics.mean(summary['queue']):.1f} / {statistics.mean(summary['inference']):.1f}"
        f" / {statistics.mean(summary['publish']):.1f} ms | |",
        f"| live batch size: mean (max) | {statistics.mean(summary['batches']):.1f} "
        f"({max(summary['batches'])}) | |",
        f"| worker CPU (live) | {summary['cpu']:.0%} of one core | |",
        f"| saturation: worker without a model (align-only) windows/s | "
        f"{med['align_only']:.1f} | |",
        f"| saturation: pipeline windows/s (median of {args.rounds}) | {med['pipeline']:.1f} | |",
        f"| saturation: bare model windows/s, same batches (mean size "
        f"{med['batch_mean']:.1f}) | {med['bare']:.1f} | |",
        f"| **ratio pipeline / bare model** | **{med['ratio']:.2f}** | >= {GOAL_RATIO} |",
        f"| inference stage alone (InferenceOutput + publish) windows/s | {med['stage']:.1f} | |",
        f"| bare model, the stage's batches (mean size {med['stage_batch_mean']:.1f}) | "
        f"{med['stage_bare']:.1f} | |",
        f"| **ratio inference stage / bare model** | **{med['stage_ratio']:.2f}** | "
        f">= {GOAL_RATIO} |",
    ]
    rounds = ", ".join(f"{p:.1f}/{b:.1f}" for p, b in zip(sat["pipeline"], sat["bare"],
                                                            strict=True))
    met = {True: "met", False: "**not met**"}
    how_kept = ("lag and latency flat from the first half to the second" if kept else
                f"published {summary['rate']:.1f} of {summary['due']:.1f} windows/s due, "
                f"consumer lag {summary['lag_first']:.0f} then {summary['lag_second']:.0f} "
                f"records, median latency {summary['total_first']:.0f} then "
                f"{summary['total_second']:.0f} ms")
    analysis = (
        f"\n\nGoals: {live['streams']} streams sustained on 2 cores: "
        f"{met[kept and live['streams'] >= 8]} (the worker used {summary['cpu']:.0%} of one "
        f"core; {how_kept}); p99 latency added "
        f"after window close <= {GOAL_P99_MS:.0f} ms: {met[percentile(r, 99) <= GOAL_P99_MS]} "
        f"({percentile(a, 99):.0f} ms in the worker, {percentile(r, 99):.0f} ms until a "
        f"consumer has it); ratio pipeline / bare model >= {GOAL_RATIO}: "
        f"{met[med['ratio'] >= GOAL_RATIO]} ({med['ratio']:.2f}); the inference stage alone: "
        f"{met[med['stage_ratio'] >= GOAL_RATIO]} ({med['stage_ratio']:.2f}).\n\n"
        f"Where the time goes at saturation: the same worker without a model reads the "
        f"backlog at {med['align_only']:.0f} windows/s ({1000 / med['align_only']:.1f} ms per "
        f"window), {'slower' if med['align_only'] < med['bare'] else 'faster'} than the bare "
        f"model ({1000 / med['bare']:.1f} ms per window, most of it decoding the 8 sampled "
        f"320x240 JPEGs; W1's frames are noise, about 50 KB, the worst case for JPEG). "
        + ("So the ingest path, not inference, bounds the ratio: reading and handing records "
           "over, checking every frame at the door, aligning, ack-after-emit. "
           if med['align_only'] < med['bare'] else
           "So reading keeps ahead of the model, and what the pipeline loses against the "
           "bare model is the two sharing two cores: the event loop (faust, the door check, "
           "aligning, publishing) and the model thread both want one. ")
        + "The event loop also waits for fetches (aiokafka sends a broker no new fetch while "
        "records of the previous one are unread, so reading is stop-and-go). Inference "
        "runs beside it in the model thread"
        + (f" and costs the pipeline {med['align_only'] - med['pipeline']:.0f} windows/s "
           f"against align-only at saturation. " if med['pipeline'] < med['align_only'] else
           f"; the pipeline read this backlog no slower than align-only "
           f"({med['pipeline']:.0f} against {med['align_only']:.0f} windows/s: one round "
           f"of a short backlog varies that much). ")
        + f"What bounds the align-only worker is per-record work on its two "
        f"threads: the consumer thread's copies of each response and its record objects, "
        f"the event loop's door check (streamproc.wire.jpeg), hand-over and aligning "
        f"(docs/benchmarks.md, Peers); with a heavier model than this "
        f"{1000 / med['bare']:.0f} ms-per-window one the ratio rises towards the inference "
        f"stage's.")
    return (f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} when it finished. "
            f"Model: {model} ({Path(model).name}). Live: {live['streams']} streams x "
            f"{live['seconds']} s of W1 (first 10 s not counted); saturation: "
            f"{args.backlog_seconds} s of W1 ({sat['windows'][0]} windows) as a backlog, "
            f"{args.rounds} rounds; {time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(rows)
            + f"\n\nSaturation rounds, pipeline/bare windows/s: {rounds}." + analysis)


FRAME_SECTION = "## Pipeline: frame sizes"
FRAME_HEADER = ("| date | frames | streams x s | frame KB | windows (missing) | `added` p50 / p99 "
                "ms | received p50 / p99 ms | queue / inference / publish ms (mean) | preprocess "
                "ms/batch (mean) | batch mean | worker CPU | load avg before / after | p99 <= "
                "150 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def frame_size_rows(bootstrap: str, model: Path, sizes: Sequence[tuple[int, int]],
                    seconds: int, streams: int, tmp: Path) -> list[str]:
    """One live run per frame size; a table row each."""
    rows = []
    for w, h in sizes:
        load0 = os.getloadavg()[0]
        log(f"frame size {w}x{h}: {streams} streams for {seconds} s")
        live = live_phase(bootstrap, model, seconds, streams, tmp / f"{w}x{h}", (w, h))
        sm = summarize_live(live)
        kb = statistics.mean(len(f.data) for f in camera_frames(w, h)) / 1000
        steady = [p for p, _ in live["preds"].values()
                  if p.quality.get("closed_by") == "watermark"]
        pre = statistics.mean(p.latency_ms["preprocess"] for p in steady) if steady else 0.0
        a, r = sm["added"], sm["received"]
        ok = percentile(r, 99) <= GOAL_P99_MS and sm["missing"] == 0
        rows.append(
            f"| {time.strftime('%Y-%m-%d %H:%M')} | {w}x{h} | {streams} x {seconds} | "
            f"{kb:.0f} | {sm['windows']} ({sm['missing']}) | {percentile(a, 50):.0f} / "
            f"{percentile(a, 99):.0f} | {percentile(r, 50):.0f} / {percentile(r, 99):.0f} | "
            f"{statistics.mean(sm['queue']):.0f} / {statistics.mean(sm['inference']):.0f} / "
            f"{statistics.mean(sm['publish']):.0f} | {pre:.0f} | {statistics.mean(sm['batches']):.1f} | {sm['cpu']:.0%} | "
            f"{load0:.1f} / {os.getloadavg()[0]:.1f} | {'met' if ok else '**not met**'} |")
        log(rows[-1])
    return rows


def write_frame_rows(rows: Sequence[str]) -> None:
    """Append rows to the frame-size table of docs/benchmarks.md (made if missing)."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if FRAME_SECTION not in text:
        text = (text.rstrip("\n") + f"\n\n{FRAME_SECTION}\n\n`benchmarks/bench_pipeline.py "
                "--frame-sizes`: the live run (8 streams at 15 fps unless the row says "
                "otherwise) with camera-like JPEGs of each size; latency added after a "
                "window closed, steady state (first 10 s not counted). Every run is a row; "
                f"machine: {machine()}.\n\n{FRAME_HEADER}\n")
    # after the last row of the section's table (the text under the table stays below)
    start = text.index(FRAME_HEADER, text.index(FRAME_SECTION)) + len(FRAME_HEADER) + 1
    end = start
    while text.startswith("|", end):
        end = text.index("\n", end) + 1 if "\n" in text[end:] else len(text)
    text = text[:end] + "".join(f"{r}\n" for r in rows) + text[end:]
    DOCS.write_text(text)


def write_docs(body: str) -> None:
    """Replace (or add) the "## Pipeline" section of docs/benchmarks.md, nothing else."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    section = ("## Pipeline\n\n`benchmarks/bench_pipeline.py`: W1 through a real worker "
               "serving the reference model, and the model alone on the same batches.\n\n"
               + body + "\n")
    m = re.search(r"^## Pipeline\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if m is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = text[:m.start()] + section + "\n" + text[m.end():].lstrip("\n")
    DOCS.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="live run length (s)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--backlog-seconds", type=int, default=30, help="W1 seconds in the backlog")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint [default: the demo's reference model]")
    ap.add_argument("--write-docs", action="store_true",
                    help=f"record the table in {DOCS} and the histogram in {PNG}")
    ap.add_argument("--provisional-on", default=None,
                    help="the worker's provisional_on [default: the settings' default]; none "
                         "for final predictions only")
    ap.add_argument("--pauses", action="store_true",
                    help="the live run's transcripts pause for 3-5 s now and then, as speech "
                         "does (about one gap in seven between segments)")
    ap.add_argument("--frame-sizes", default="",
                    help="WxH,... : only the live run, once per frame size (e.g. "
                         "640x480,1280x720), one row each")
    ap.add_argument("--provisional-cost", action="store_true",
                    help="only this: final predictions/s from a --backlog-seconds backlog "
                         "with provisional predictions on and off, alternated, --rounds "
                         "times each")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a worker setting for every run (repeatable), e.g. "
                         "--set batch_max_wait_ms=0")
    args = ap.parse_args()
    global PROVISIONAL_ON, PAUSES
    PROVISIONAL_ON = args.provisional_on
    PAUSES = args.pauses
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    overrides = dict(item.partition("=")[::2] for item in args.set)
    for name, value in overrides.items():
        if name not in fields:
            ap.error(f"--set {name}={value}: no setting {name!r} (see `streamproc config`)")
        # base_settings reads it from the environment, like any STREAMPROC_* set for a run
        os.environ[env_name(fields[name])] = value
    if overrides:
        log(f"worker settings: {overrides}")
    model = args.model or prepare_model(Layout(default_dir()), log=log)
    if args.provisional_cost:
        with tempfile.TemporaryDirectory() as tmp, existing_or_local() as bootstrap:
            rows = provisional_cost(bootstrap, model, args.backlog_seconds, args.streams,
                                    args.rounds, Path(tmp))
        print(PROVISIONAL_HEADER + "\n" + "\n".join(rows))
        return 0
    if args.frame_sizes:
        sizes = [tuple(int(x) for x in sz.split("x")) for sz in args.frame_sizes.split(",")]
        with tempfile.TemporaryDirectory() as tmp, existing_or_local() as bootstrap:
            rows = frame_size_rows(bootstrap, model, sizes, args.seconds, args.streams,
                                   Path(tmp))
        print(FRAME_HEADER + "\n" + "\n".join(rows))
        if args.write_docs:
            write_frame_rows(rows)
            log(f"rows appended to {DOCS}")
        return 0
    with tempfile.TemporaryDirectory() as tmp, existing_or_local() as bootstrap:
        log(f"live: {args.streams} streams of W1 for {args.seconds} s")
        live = live_phase(bootstrap, model, args.seconds, args.streams, Path(tmp))
        summary = summarize_live(live)
        sat = saturation_phase(bootstrap, model, args.backlog_seconds, args.streams,
                               args.rounds, Path(tmp))
    body = report(live, summary, sat, model, args)
    print(body)
    png = PNG if args.write_docs else Path(tempfile.gettempdir()) / PNG.name
    plot(live, summary, png)
    log(f"latency histogram: {png}")
    if args.write_docs:
        write_docs(body + f"\n\n![latency added after window close]({PNG.name})")
        log(f"written to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
