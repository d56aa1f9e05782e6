"""Pure aligner throughput on one core for W1-like traffic (benchmarks/README.md).

W1: 8 streams; 320x240 JPEG (q80) at 15 fps; 16 kHz mono s16le in 100 ms chunks; one
transcript segment about every 2 s (1-2 s long, arriving ~1 s after it ends); W = 1 s,
H = 0.5 s; default lateness and idle deadline. Records are built beforehand (real JPEGs from
OpenCV, real PCM) and arrive in wall-clock order with network jitter; the fake clock is the
arrival time, so lateness and idle deadlines behave as live.

Measured in one run, side by side:
- baseline: a bare Python loop that only files each record by stream (the floor any
  per-event Python code pays);
- add() + poll() after every event (what an agent that polls per record pays);
- add() for every event + poll() every 100 ms of clock (what a timer-driven agent pays).

    .venv/bin/python benchmarks/bench_align.py [--seconds 300] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import random
import time

import numpy as np

from streamproc.align.aligner import AlignConfig, Aligner
from streamproc.config import Settings
from streamproc.wire.codec import AudioChunk, TranscriptSegment, VideoFrame

S = 1_000_000_000
MS = 1_000_000


def w1_records(seconds: int, streams: int = 8, seed: int = 1,
               t0: int = 1_700_000_000 * S, pauses: bool = False) -> list[tuple[int, object]]:
    """(arrival_ns, record) for W1, sorted by arrival; event time starts at ``t0``.
    ``pauses``: about one gap in seven between segments is a 3-5 s speech pause (the
    other records stay the same)."""
    rnd = random.Random(seed)
    paused = random.Random(seed + 1)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(4):  # a few real 320x240 JPEGs; the aligner never decodes them
        img = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        img[:, :, i % 3] = np.linspace(0, 255, 320, dtype=np.uint8)
        images.append(VideoFrame.from_image("x", 0, 0, img, quality=80))
    pcm = [AudioChunk.from_samples("x", 0, 0, 0.3 * np.sin(2 * np.pi * f * np.arange(1600) /
                                                           16000), 16000)
           for f in (220, 330, 440, 550)]
    out: list[tuple[int, object]] = []
    for n in range(streams):
        sid = f"cam-{n}"
        off = rnd.randrange(0, 66 * MS)
        for i in range(seconds * 15):
            ts = t0 + off + i * S // 15
            im = images[i % len(images)]
            f = VideoFrame(sid, ts, i, im.data, "jpeg", im.width, im.height)
            out.append((ts + rnd.randrange(2 * MS, 30 * MS), f))
        for i in range(seconds * 10):
            ts = t0 + i * 100 * MS
            c = pcm[i % len(pcm)]
            a = AudioChunk(sid, ts, i, c.data, "s16le", 16000, 1)
            out.append((ts + 100 * MS + rnd.randrange(1 * MS, 20 * MS), a))
        start, i = t0 + rnd.randrange(0, S), 0
        while start < t0 + seconds * S:
            end = start + rnd.randrange(S, 2 * S)
            seg = TranscriptSegment(sid, i, f"words of segment {i}", start, end)
            out.append((end + rnd.randrange(800 * MS, 1200 * MS), seg))
            start, i = start + 2 * S + rnd.randrange(-300 * MS, 300 * MS), i + 1
            if pauses and paused.random() < 1 / 7:
                start += paused.randrange(2 * S, 4 * S)  # a 3-5 s gap after this segment
    out.sort(key=lambda x: x[0])
    return out


def bench_baseline(recs) -> float:
    t = time.perf_counter()
    held: dict[str, list] = {}
    for _now, r in recs:
        lst = held.get(r.stream_id)
        if lst is None:
            lst = held[r.stream_id] = []
        lst.append(r)
    return time.perf_counter() - t


def bench_aligner(cfg: AlignConfig, recs, poll_every_ns: int | None) -> tuple[float, Aligner, int]:
    a = Aligner(cfg)
    windows = 0
    add, poll = a.add, a.poll
    t = time.perf_counter()
    if poll_every_ns is None:
        for now, r in recs:
            add(r, now)
            windows += len(poll(now))
    else:
        next_poll = recs[0][0]
        for now, r in recs:
            add(r, now)
            if now >= next_poll:
                windows += len(poll(now))
                next_poll = now + poll_every_ns
    windows += len(a.flush())
    return time.perf_counter() - t, a, windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=300, help="event time per stream (s)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of add+poll")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    cfg = AlignConfig.from_settings(Settings())  # W1 uses the default window settings
    recs = w1_records(args.seconds)
    n = len(recs)
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    print(f"machine: {cpu}, {os.cpu_count()} cores (pinned to 1); python "
          f"{platform.python_version()}")
    print(f"W1: 8 streams x {args.seconds} s = {n} events "
          f"(W={cfg.window_ns // MS} ms, H={cfg.hop_ns // MS} ms)")

    base = min(bench_baseline(recs) for _ in range(args.repeat))
    rows = [("baseline: file each record by stream", base, None, None)]
    for label, every in (("add + poll after every event", None),
                         ("add + poll every 100 ms (timer)", 100 * MS)):
        best = None
        for _ in range(args.repeat):
            el, a, windows = bench_aligner(cfg, recs, every)
            if best is None or el < best[0]:
                best = (el, a, windows)
        rows.append((label, best[0], best[1], best[2]))

    print(f"\n{'':40} {'events/s':>12} {'us/event':>9} {'x baseline':>11} {'windows':>8}")
    for label, el, _a, windows in rows:
        print(f"{label:40} {n / el:12,.0f} {el / n * 1e6:9.2f} {el / base:11.1f} "
              f"{windows if windows is not None else '':>8}")
    stats = rows[1][2].stats
    print(f"\naligner stats: accepted={stats['accepted']} late={stats['late']} "
          f"windows={stats['windows']} deadline={stats['windows_deadline']} "
          f"masked={stats['windows_masked']}")
    spent = [0.0]
    build = Aligner._build

    def timed_build(self, *a):  # how much of the time goes to assembling windows
        t = time.perf_counter()
        try:
            return build(self, *a)
        finally:
            spent[0] += time.perf_counter() - t

    Aligner._build = timed_build
    try:
        el, _a, windows = bench_aligner(cfg, recs, None)
    finally:
        Aligner._build = build
    print(f"window assembly (sort, K frames, audio cut, provenance): "
          f"{spent[0] / windows * 1e6:.0f} us per window, {spent[0] / el:.0%} of the time; "
          f"add+poll without it: {(el - spent[0]) / n * 1e6:.2f} us per event")
    a, pc, t_add = Aligner(cfg), time.perf_counter, 0.0
    for now, r in recs:  # each add() timed on its own (includes ~0.1 us of timer calls)
        t = pc()
        a.add(r, now)
        t_add += pc() - t
        a.poll(now)
    print(f"add() alone: {t_add / n * 1e6:.2f} us per event")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        bench_aligner(cfg, recs, None)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
