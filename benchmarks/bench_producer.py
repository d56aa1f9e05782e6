"""Producer throughput: streamproc's Publisher against the raw kafka-python producer.

Both send the same pre-encoded JPEG frames (320x240 and 1280x720, quality 80) to the same
broker in the same run, alternating rounds so machine noise hits both alike. The raw
baseline uses the Publisher's own producer settings (so the ratio is the cost of our
layer: wire encoding, accounting, the in-flight cap) and, for reference, kafka-python's
defaults. Goal: ratio >= 0.9.

    .venv/bin/python benchmarks/bench_producer.py [--rounds 9] [--write-docs]

Starts a local broker unless STREAMPROC_BOOTSTRAP is set. ``--write-docs`` records the
table under "## Producer" in docs/benchmarks.md, one subsection per CRC32C variant
(kafka-python checksums every record batch; pure Python unless the optional ``crc32c``
package is importable).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from kafka import KafkaProducer

from streamproc import kafka
from streamproc.capture.publisher import Publisher
from streamproc.config import Settings
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SIZES = ((320, 240), (1280, 720))
ROUND_S = 0.8  # each timed round sends about this many seconds' worth of frames
DISTINCT = 16  # distinct images cycled through (JPEG sizes vary like a real scene)


def jpeg_frames(w: int, h: int, n: int) -> list[wire.VideoFrame]:
    rng = np.random.default_rng(w)
    yy, xx = np.mgrid[0:h, 0:w]
    encoded = []
    for i in range(DISTINCT):
        noise = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        img = noise // 2
        img[..., 0] += ((xx + 8 * i) * 127 // w).astype(np.uint8)
        img[..., 1] += ((yy + 4 * i) * 127 // h).astype(np.uint8)
        encoded.append(wire.encode_image(img, "jpeg", 80))
    t0 = time.time_ns()
    return [wire.VideoFrame("bench", t0 + i * 66_666_666, i, encoded[i % DISTINCT], "jpeg", w, h)
            for i in range(n)]


class Timing:
    """Wall seconds and process CPU seconds (all threads: kafka-python sends from its own)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_raw(config: dict, topic: str, records: list[wire.KafkaRecord]) -> tuple[float, float]:
    producer = KafkaProducer(**config)
    try:
        producer.partitions_for(topic)  # metadata before the clock starts, as Publisher does
        for r in records[:20]:  # warm-up
            producer.send(topic, value=r.value, key=r.key, headers=list(r.headers),
                          timestamp_ms=r.timestamp_ms)
        producer.flush()
        t = Timing()
        for r in records:
            producer.send(topic, value=r.value, key=r.key, headers=list(r.headers),
                          timestamp_ms=r.timestamp_ms)
        producer.flush()
        return t.stop()
    finally:
        producer.close()


def time_publisher(settings: Settings, frames: list[wire.VideoFrame]) -> tuple[float, float]:
    with Publisher(settings) as pub:
        for f in frames[:20]:
            pub.publish(f)
        pub.flush()
        t = Timing()
        for f in frames:
            pub.publish(f)
        pub.flush()
        elapsed = t.stop()
        assert pub.stats.failed == 0, pub.error_reasons
    return elapsed


def crc_variant() -> str:
    try:
        import crc32c  # noqa: F401
    except ImportError:
        return "kafka-python with its pure-Python CRC32C (crc32c not installed)"
    return "kafka-python with the crc32c C extension (as requirements.lock installs it)"


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores, {model} (/proc/cpuinfo), Python "
            f"{platform.python_version()}, single-node KRaft broker on the same machine")


def run(settings: Settings, rounds: int) -> list[dict]:
    topic = settings.topic("video")
    default_cfg = {"bootstrap_servers": settings.bootstrap_servers.split(","), "acks": "all",
                   "max_request_size": settings.max_message_bytes}
    rows = []
    for w, h in SIZES:
        probe = [wire.encode(f) for f in jpeg_frames(w, h, 300)]
        probe_s = time_raw(kafka.producer_config(settings), topic, probe)[0]
        n = int(min(max(300 / probe_s * ROUND_S, 300), 40_000))
        frames = jpeg_frames(w, h, n)
        records = [wire.encode(f) for f in frames]
        mb = sum(len(f.data) for f in frames) / 1e6
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "raw": [], "raw_default": []}
        contenders: dict[str, Callable[[], tuple[float, float]]] = {
            "ours": lambda f=frames: time_publisher(settings, f),
            "raw": lambda r=records: time_raw(kafka.producer_config(settings), topic, r),
            "raw_default": lambda r=records: time_raw(default_cfg, topic, r),
        }
        for r in range(rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                runs[name].append(contenders[name]())
        wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
        # ratios of back-to-back runs: load from other processes hits both sides of a pair
        paired = {k: statistics.median(raw[0] / ours[0] for ours, raw in zip(runs["ours"],
                                                                             runs[k], strict=True))
                  for k in ("raw", "raw_default")}
        row = {"size": f"{w}x{h}", "frames": n, "kb": 1000 * mb / n,
               "ours_fps": n / wall["ours"], "raw_fps": n / wall["raw"],
               "default_fps": n / wall["raw_default"], "ours_mbs": mb / wall["ours"],
               "raw_mbs": mb / wall["raw"], "default_mbs": mb / wall["raw_default"],
               "ratio": paired["raw"], "ratio_default": paired["raw_default"],
               "ours_cpu_us": 1e6 * cpu["ours"] / n, "raw_cpu_us": 1e6 * cpu["raw"] / n}
        rows.append(row)
        print(f"  {w}x{h}: ours {row['ours_fps']:.0f} frames/s, raw {row['raw_fps']:.0f}, "
              f"raw defaults {row['default_fps']:.0f}; paired ratio {row['ratio']:.2f}",
              file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| frames | JPEG | frames per round | Publisher frames/s (MB/s) | raw, same settings "
           "frames/s (MB/s) | ratio | CPU µs/frame, Publisher / raw | raw, kafka-python "
           "defaults frames/s (MB/s) | ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['size']} | {r['kb']:.0f} KB | {r['frames']} "
                   f"| {r['ours_fps']:.0f} ({r['ours_mbs']:.1f}) "
                   f"| {r['raw_fps']:.0f} ({r['raw_mbs']:.1f}) | **{r['ratio']:.2f}** "
                   f"| {r['ours_cpu_us']:.0f} / {r['raw_cpu_us']:.0f} "
                   f"| {r['default_fps']:.0f} ({r['default_mbs']:.1f}) "
                   f"| {r['ratio_default']:.2f} |")
    return "\n".join(out)


INTRO = ("`benchmarks/bench_producer.py`: the Publisher against the raw kafka-python producer "
         "sending the same JPEG bytes to the same broker in the same run, rounds alternated; "
         "frames/s are medians over rounds, a ratio is the median over rounds of Publisher "
         "frames/s / raw frames/s measured back to back (so load from other processes hits "
         "both), CPU is process time (all threads) per frame. Goal: ratio >= 0.9 against the raw "
         "producer with the same settings. On a shared machine the wall-clock ratio moves "
         "with the load from run to run; the CPU column is steadier and shows the Publisher's "
         "own cost (wire encoding, in-flight accounting, delivery callbacks): a few µs per "
         "record, lost next to kafka-python's pure-Python CRC32C, and visible once the crc32c "
         "C extension makes everything else fast.")


def write_docs(variant: str, body: str) -> None:
    """Rewrite the "## Producer" section (this variant's subsection replaced, other variants
    kept) and nothing else in the file."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    m = re.search(r"^## Producer\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    subs: dict[str, str] = {}
    if m is not None:
        for sm in re.finditer(r"^### (.+?)\n(.*?)(?=^### |\Z)", m.group(0), flags=re.S | re.M):
            subs[sm.group(1)] = sm.group(2).strip()
    subs[variant] = body.strip()
    section = f"## Producer\n\n{INTRO}\n\n" + "".join(
        f"### {name}\n\n{content}\n\n" for name, content in subs.items())
    if m is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = text[:m.start()] + section + text[m.end():]
    DOCS.parent.mkdir(exist_ok=True)
    DOCS.write_text(text.rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--write-docs", action="store_true", help=f"record the table in {DOCS}")
    args = ap.parse_args()
    from streamproc.dev.localkafka import existing_or_local

    with existing_or_local() as bootstrap:
        settings = Settings(bootstrap_servers=bootstrap,
                            topic_prefix=f"bench{uuid.uuid4().hex[:8]}", partitions=4)
        create_topics(settings)
        variant = crc_variant()
        print(f"{variant}; {machine()}", file=sys.stderr)
        rows = run(settings, args.rounds)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    body = (f"Machine: {machine()}; load average {load} when it finished (other work "
            f"shares these cores). {args.rounds} rounds, median; "
            f"{time.strftime('%Y-%m-%d')}.\n\n{table(rows)}")
    print(f"\n{variant}\n\n{body}")
    if args.write_docs:
        write_docs(variant, body)
        print(f"\nwritten to {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
