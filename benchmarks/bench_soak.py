"""W1 soak: one ``streamproc worker`` fed 8 W1 streams in real time for ``--minutes``.

Every ``--every`` seconds (30) it samples the worker's resident memory (/proc), its consumer
lag (the worker's own ``streamproc_consumer_lag`` gauge, summed over input partitions) and
the latency of the predictions that arrived in that interval (``total``: window end ->
prediction published; ``added``: window closed -> published; p50 and p99), and prints a row.
At the end: the table, and per quantity its least-squares slope per minute with the slope's
standard error and the residual spread (the noise), after ``--warmup-s`` (the model loads,
buffers fill). Goal: RSS, lag and p99 latency flat, i.e. every slope within
noise (|slope| <= 2 standard errors).

W1 is benchmarks/README.md's (bench_align.w1_records), generated 10 s at a time with
sequence numbers that go on, so an hour never sits in memory. The records go through the
real Publisher; a consumer reads the predictions as they come. The model is the demo's
reference model (cached) unless ``--model`` names one or ``--align-only``.

    .venv/bin/python benchmarks/bench_soak.py [--minutes 60] [--every 30] [--streams 8]
        [--warmup-s 60] [--model DIR | --align-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamproc.capture.publisher import Publisher
from streamproc.config import Settings
from streamproc.dev.demo import Layout, WorkerProcess, default_dir, percentile, prepare_model
from streamproc.dev.localkafka import existing_or_local, free_port
from streamproc.topics import create_topics
from streamproc.wire.codec import KafkaRecord, MediaRecord, decode_prediction

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import w1_records  # one W1 generator for every benchmark
from bench_pipeline import scrape
from bench_producer import machine

S = 1_000_000_000
MS = 1_000_000
CHUNK_S = 10


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def w1_stream(streams: int, origin: int, seconds: int) -> Iterator[tuple[int, MediaRecord]]:
    """(arrival_ns, record) of W1 for ``seconds``, made ``CHUNK_S`` at a time: each chunk's
    sequence numbers continue the last one's, and a chunk is merged in before any of its
    records is due (transcripts of one chunk arrive after the next chunk has begun)."""
    seqs: dict[tuple[str, str], int] = {}
    heap: list[tuple[int, int, MediaRecord]] = []
    n = 0
    for k in range(math.ceil(seconds / CHUNK_S)):
        t0 = origin + k * CHUNK_S * S
        while heap and heap[0][0] < t0:
            yield heapq.heappop(heap)[::2]
        first: dict[tuple[str, str], int] = {}
        for arrival, rec in w1_records(CHUNK_S, streams, seed=k + 1, t0=t0):
            key = (rec.stream_id, rec.modality)
            base = first.setdefault(key, seqs.get(key, 0))
            rec = dataclasses.replace(rec, seq=base + rec.seq)
            seqs[key] = max(seqs.get(key, 0), rec.seq + 1)
            n += 1
            heapq.heappush(heap, (arrival, n, rec))
    while heap:
        yield heapq.heappop(heap)[::2]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Sample:
    t_s: float  # since the start of the feed
    rss_mb: float
    lag: float
    windows: int  # predictions received in the interval
    total_p50: float
    total_p99: float
    added_p99: float
    load: float
    feeding: bool = True  # False: after the feed ended (drain; not in the slopes)


@dataclass
class Collector:
    """Predictions as they arrive: (received_ns, total_ms, added_ms) since the last take."""

    settings: Settings
    stop: threading.Event = field(default_factory=threading.Event)
    seen: set[tuple[str, int]] = field(default_factory=set)
    duplicates: int = 0
    _batch: list[tuple[float, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        from kafka import TopicPartition

        from streamproc import kafka

        s = self.settings
        consumer = kafka.consumer(s)
        try:
            tps = [TopicPartition(s.topic("predictions"), p) for p in range(s.partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while not self.stop.is_set():
                for msgs in consumer.poll(timeout_ms=300).values():
                    for m in msgs:
                        p = decode_prediction(KafkaRecord.from_client(m))
                        if not p.final:
                            continue  # the soak follows each window's final prediction
                        if p.key in self.seen:
                            self.duplicates += 1
                            continue
                        self.seen.add(p.key)
                        with self._lock:
                            self._batch.append((p.latency_ms.get("total", float("nan")),
                                                p.latency_ms.get("added", float("nan"))))
        finally:
            consumer.close()

    def take(self) -> list[tuple[float, float]]:
        with self._lock:
            out, self._batch = self._batch, []
        return out


def slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares slope of ys over xs, its standard error and the residual SD."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if not math.isnan(y)]
    n = len(pts)
    if n < 3:
        return float("nan"), float("nan"), float("nan")
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    resid = [y - (my + b * (x - mx)) for x, y in pts]
    sd = math.sqrt(sum(r * r for r in resid) / (n - 2))
    return b, sd / math.sqrt(sxx), sd


def soak(bootstrap: str, model: str, args: argparse.Namespace, tmp: Path) -> tuple[list[Sample], dict]:
    prefix = f"soak{uuid.uuid4().hex[:8]}"
    # from the environment: the worker gets its settings from these, not from the
    # environment itself (dev.demo.child_command)
    settings = Settings.load().replace(bootstrap_servers=bootstrap, topic_prefix=prefix,
                                       app_id=prefix, partitions=4, model=model,
                                       metrics_port=free_port())
    create_topics(settings)
    worker = WorkerProcess(settings, Path(model) if model else "", tmp / "worker.log")
    collector = Collector(settings)
    reader = threading.Thread(target=collector.run, daemon=True)
    samples: list[Sample] = []
    seconds = int(args.minutes * 60)
    try:
        worker.wait_ready()
        reader.start()
        hop = settings.hop_ms * MS
        origin = (time.time_ns() + 2 * S) // hop * hop + hop
        start = time.monotonic()
        next_sample = start + args.every
        behind, sent = 0.0, 0
        log(f"feeding {args.streams} W1 streams for {args.minutes:g} min; worker log "
            f"{worker.log_path}")
        print(f"{'t (s)':>7} {'RSS MB':>8} {'lag':>6} {'windows':>7} {'total p50':>9} "
              f"{'total p99':>9} {'added p99':>9} {'load':>5}", flush=True)

        def sample(feeding: bool = True) -> None:
            lat = collector.take()
            total = [t for t, _ in lat]
            try:
                lag = scrape(settings.metrics_port).get("streamproc_consumer_lag", float("nan"))
            except OSError:
                lag = float("nan")
            s = Sample(time.monotonic() - start, rss_mb(worker.proc.pid), lag, len(lat),
                       percentile(total, 50), percentile(total, 99),
                       percentile([a for _, a in lat], 99), os.getloadavg()[0], feeding)
            samples.append(s)
            print(f"{s.t_s:7.0f} {s.rss_mb:8.1f} {s.lag:6.0f} {s.windows:7d} "
                  f"{s.total_p50:9.0f} {s.total_p99:9.0f} {s.added_p99:9.1f} {s.load:5.2f}"
                  + ("" if feeding else "  (feed ended: drain)"), flush=True)

        with Publisher(settings) as pub:
            for arrival, rec in w1_stream(args.streams, origin, seconds):
                if worker.proc.poll() is not None:
                    raise SystemExit(f"the worker exited with {worker.proc.returncode}; see "
                                     f"{worker.log_path}")
                delay = (arrival - time.time_ns()) / S
                if delay > 0:
                    time.sleep(delay)
                else:
                    behind = max(behind, -delay)
                pub.publish(rec)
                sent += 1
                if time.monotonic() >= next_sample:
                    sample()
                    next_sample += args.every
        while time.monotonic() < next_sample:  # the last interval, complete
            time.sleep(0.2)
        sample(feeding=False)
    finally:
        collector.stop.set()
        reader.join(5)
        worker.stop()
    due = args.streams * seconds * S // (settings.hop_ms * MS)
    return samples, {"sent": sent, "behind_ms": behind * 1000, "windows": len(collector.seen),
                     "due": due, "duplicates": collector.duplicates}


def report(samples: list[Sample], info: dict, args: argparse.Namespace, model: str) -> str:
    rows = ["| t (s) | RSS MB | lag (records) | windows | total p50 ms | total p99 ms | "
            "added p99 ms | load |", "|---|---|---|---|---|---|---|---|"]
    for s in samples:
        rows.append(f"| {s.t_s:.0f}{'' if s.feeding else ' (drain)'} | {s.rss_mb:.1f} | {s.lag:.0f} | {s.windows} | "
                    f"{s.total_p50:.0f} | {s.total_p99:.0f} | {s.added_p99:.1f} | {s.load:.2f} |")
    steady = [s for s in samples if s.t_s > args.warmup_s and s.feeding]
    xs = [s.t_s / 60 for s in steady]
    fits = [f"| quantity (fed samples after the first {args.warmup_s:.0f} s) | slope per minute | "
            "standard error | residual SD (noise) | flat? |", "|---|---|---|---|---|"]
    for name, unit, ys in (("worker RSS", "MB", [s.rss_mb for s in steady]),
                           ("consumer lag", "records", [s.lag for s in steady]),
                           ("p99 window end -> published", "ms", [s.total_p99 for s in steady]),
                           ("p99 added after close", "ms", [s.added_p99 for s in steady])):
        b, se, sd = slope(xs, ys)
        flat = "yes (within noise)" if abs(b) <= 2 * se else "**no**"
        if math.isnan(b):
            flat = "no data (under 3 samples, or none: align-only has no `added`)"
        fits.append(f"| {name} | {b:+.2f} {unit}/min | {se:.2f} | {sd:.2f} {unit} | {flat} |")
    what = "align-only worker" if not model else f"worker serving the model {model}"
    return (f"Machine: {machine()}; {what}; {args.streams} W1 streams for {args.minutes:g} min, "
            f"sampled every {args.every:g} s; {time.strftime('%Y-%m-%d')}. Records sent "
            f"{info['sent']} (producer at most {info['behind_ms']:.0f} ms behind schedule); "
            f"windows received {info['windows']} of about {info['due']} due "
            f"({info['duplicates']} duplicate copies).\n\n" + "\n".join(rows) + "\n\n"
            + "\n".join(fits))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="feed length (min)")
    ap.add_argument("--every", type=float, default=30.0, help="sampling interval (s)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--warmup-s", type=float, default=60.0,
                    help="samples before this are left out of the slopes (s)")
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint [default: the demo's reference model]")
    ap.add_argument("--align-only", action="store_true", help="run the worker without a model")
    args = ap.parse_args()
    model = "" if args.align_only else str(args.model or prepare_model(Layout(default_dir()),
                                                                        log=log))
    with tempfile.TemporaryDirectory() as tmp, existing_or_local() as bootstrap:
        samples, info = soak(bootstrap, model, args, Path(tmp))
    print()
    print(report(samples, info, args, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
