"""The model thread beside a thread that runs Python, as the worker's event loop does:
time per batch of eight provisional W1 windows (320x240 JPEG frames decoded at reduced
scale, log-mel, every encoder) alone and beside a thread busy a given share of the time,
at Python's default switch interval (5 ms) and at the worker's (1 ms), each configuration
in a fresh process, the order alternated (docs/benchmarks.md, *Pipeline: streams per
worker*).

    .venv/bin/python benchmarks/bench_model_gil.py [--model DIR] [--busy 0.7] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (switch interval µs, busy share, where the model runs) in the order of one round; the
#: next round reverses it
CONFIGS = ((5000, 0.0, "thread"), (5000, 1.0, "thread"), (1000, 1.0, "thread"),
           (1000, 1.0, "process"), (1000, 0.0, "process"), (1000, 0.0, "thread"))
BATCH = 8
WINDOWS = 64
#: the busy thread's cycle: Python for busy x this, then asleep for the rest
CYCLE_S = 0.01


def one(model: str, switch_us: int, busy: float, where: str, repeats: int) -> list[float]:
    """ms per batch, every batch (the busy thread running meanwhile), the model in this
    process's thread or in a process of its own (``--model-in``)."""
    import torch
    from bench_encoders import w1_windows

    from streamproc.inference.predictor import Predictor
    from streamproc.inference.process import ProcessPredictor

    torch.set_num_threads(1)  # the worker's default on 2 cores
    sys.setswitchinterval(switch_us / 1e6)
    predictor = (ProcessPredictor if where == "process" else Predictor)(model, "cpu", 1)
    # the K = 8 frames a window holds (the aligner's pick of its 15)
    windows = [dataclasses.replace(w, final=False, stream_id=f"s{i}", frames=w.frames[::2][:8])
               for i, w in enumerate(w1_windows(WINDOWS))]
    predictor(windows[:BATCH])  # first call: lazy set-up inside torch
    stop = threading.Event()

    def python_loop() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            while time.perf_counter() - t < busy * CYCLE_S:
                sum(range(200))
            time.sleep((1 - busy) * CYCLE_S)

    if busy > 0:
        threading.Thread(target=python_loop, daemon=True).start()
    took = []
    for _ in range(repeats):
        for i in range(0, WINDOWS, BATCH):
            t = time.perf_counter()
            predictor(windows[i:i + BATCH])
            took.append((time.perf_counter() - t) * 1000)
    stop.set()
    if isinstance(predictor, ProcessPredictor):
        predictor.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint [default: the demo's model]")
    ap.add_argument("--busy", type=float, default=0.7,
                    help="share of the time the Python thread runs (0-1) [0.7]")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4, help="passes over the 64 windows")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 0 <= args.busy < 1:
        ap.error("--busy must be at least 0 and under 1")
    if args.model is None:
        from streamproc.dev.demo import Layout, default_dir, prepare_model
        args.model = str(prepare_model(Layout(default_dir()), log=print))
    if args.one:
        switch_us, busy, where = args.one.split(",")
        took = one(args.model, int(switch_us), float(busy), where, args.repeats)
        print(" ".join(f"{t:.2f}" for t in took))
        return 0
    print("| round | model in | switch interval | Python thread busy | ms per batch of 8: "
          "median | p90 | load (1 min) |\n|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
        for switch_us, share, where in order:
            busy = share * args.busy
            load = Path("/proc/loadavg").read_text().split()[0]
            out = subprocess.run([sys.executable, __file__, "--model", args.model,
                                  "--repeats", str(args.repeats), "--one",
                                  f"{switch_us},{busy},{where}"],
                                 capture_output=True, text=True, check=True).stdout
            took = sorted(float(x) for x in out.split("\n")[-2].split())
            print(f"| {r + 1} | {where} | {switch_us} µs | {busy:.0%} | "
                  f"{statistics.median(took):.1f} "
                  f"| {took[int(len(took) * 0.9)]:.1f} | {load} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
