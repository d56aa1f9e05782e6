"""The served model alone with 1 and 2 torch CPU threads, alternated: a batch of two
windows of eight camera-like 720p JPEGs, decoded at reduced scale and scored, as the
worker's model thread does (docs/benchmarks.md, *The model's CPU threads*).

    .venv/bin/python benchmarks/bench_model_threads.py [--model DIR] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one(model: str, threads: int, calls: int) -> float:
    """Median ms per call in this process with ``threads`` torch threads."""
    import cv2
    import numpy as np

    from streamproc.align.aligner import AlignConfig, Window
    from streamproc.config import Settings
    from streamproc.inference.predictor import Predictor
    from streamproc.wire.codec import VideoFrame

    p = Predictor(model, "cpu", threads)
    cfg = AlignConfig.from_settings(Settings())
    p.warm_up(2, cfg)
    img = np.random.default_rng(0).integers(0, 255, (720, 1280, 3)).astype(np.uint8)
    img = cv2.GaussianBlur(img, (31, 31), 0)  # smooth regions, as a camera's frames
    frames = [VideoFrame.from_image("s", i, i, img, quality=80) for i in range(8)]
    n = cfg.window_samples

    def window() -> Window:
        return Window("s", 0, cfg.window_ns, list(frames), 8, np.zeros(n, np.float32),
                      np.ones(n, np.bool_), cfg.sample_rate, [],
                      {"video": True, "audio": True, "text": False})

    took = []
    for _ in range(calls):
        t = time.perf_counter()
        p([window(), window()])
        took.append((time.perf_counter() - t) * 1000)
    return statistics.median(took)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint [default: the demo's model]")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from streamproc.dev.demo import Layout, default_dir, prepare_model
        args.model = str(prepare_model(Layout(default_dir()), log=print))
    if args.one:
        print(f"{one(args.model, args.one, args.calls):.1f}")
        return 0
    for threads in (1, 2, 2, 1):  # a fresh process each: torch sets its pool up once
        load = Path("/proc/loadavg").read_text().split()[0]
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--calls",
                              str(args.calls), "--one", str(threads)],
                             capture_output=True, text=True, check=True).stdout.split()[-1]
        print(f"threads {threads}: median {out} ms per call (load {load})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
