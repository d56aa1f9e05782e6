"""The live-streams-to-a-served-model recipe (docs/models.md), timed as a user runs it.

Faces & Voices streams (320x240 JPEG at 15 fps, real faces and photographs from
scikit-image, speech over room noise at 16 kHz; 2 s scenes) are published as a backlog,
recorded with ``streamproc record`` in two recordings (the second ``--append``), then
``streamproc train`` runs with the pretrained encoders (EfficientNet-Lite0 + Silero VAD,
frozen) on splits by time blocks. Each command runs in its own process, as typed in a
shell; the figures are wall-clock seconds of each command (process start, imports and
model loads included), with the load average before and after, since the machines are
shared. Goal (issue 16): ``train`` with a pretrained encoder in at most 2 minutes on CPU for
a few hundred windows.

    .venv/bin/python benchmarks/bench_recipe.py [--streams 4] [--scenes 30] [--epochs 20]

It starts its own broker unless ``STREAMPROC_BOOTSTRAP`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENES = ["speaking", "silent", "radio", "empty"]
S = 1_000_000_000


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run a streamproc command; (wall seconds, its output)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "streamproc.cli", *cmd], env=env, cwd=REPO,
                       capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return took, p.stdout + p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=4, help="streams, half per recording [4]")
    ap.add_argument("--scenes", type=int, default=30, help="2 s scenes per stream [30]")
    ap.add_argument("--epochs", type=int, default=20, help="train --epochs [20]")
    ap.add_argument("--model", default="lmf", help="train --model [lmf]")
    ap.add_argument("--block-s", type=float, default=10.0, help="train --block-s [10]")
    args = ap.parse_args()

    import numpy as np

    from streamproc.capture.publisher import Publisher
    from streamproc.config import Settings
    from streamproc.dev.localkafka import LocalBroker
    from streamproc.ml import realworld as rw
    from streamproc.topics import create_topics

    tmp = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    broker = None
    bootstrap = os.environ.get("STREAMPROC_BOOTSTRAP")
    if not bootstrap:
        broker = LocalBroker(tmp / "kafka").start()
        bootstrap = broker.bootstrap
    try:
        prefix = f"benchrecipe{os.getpid()}"
        settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, partitions=4)
        create_topics(settings)
        env = {**os.environ, "STREAMPROC_BOOTSTRAP": bootstrap,
               "STREAMPROC_TOPIC_PREFIX": prefix}
        rng = np.random.default_rng(0)
        now = time.time_ns() // S * S
        labels = tmp / "labels.csv"
        labels.write_text("stream_id,start,end,label\n")
        dataset, model = tmp / "dataset", tmp / "model"
        rows = []
        half = max(1, args.streams // 2)
        for rec, streams in enumerate((range(half), range(half, args.streams))):
            t0 = time.perf_counter()
            with Publisher(settings) as pub, labels.open("a") as f:
                for i in streams:
                    scenes = [SCENES[int(k)] for k in rng.integers(0, 4, args.scenes)]
                    sid = f"cam-{i}"
                    origin = now - (1000 - 100 * i) * S
                    for r in rw.stream_records(scenes, sid, origin, split="train",
                                               cfg=rw.FacesVoicesConfig("bench")):
                        pub.publish(r)
                    f.writelines(f"{sid},{2 * j},{2 * j + 2},{lab}\n"
                                 for j, lab in enumerate(scenes))
            made = time.perf_counter() - t0
            load0 = os.getloadavg()[0]
            took, out = run(["record", "--labels", str(labels), "--out", str(dataset),
                             "--to-end", *(["--append"] if rec else [])], env)
            written = re.search(r"(\d+) labelled and written, (\d+) already", out)
            rows.append((f"record #{rec + 1}{' --append' if rec else ''}", took, load0,
                         os.getloadavg()[0],
                         f"{written.group(1)} windows written, {written.group(2)} already "
                         f"there (streams generated and published in {made:.0f} s)"
                         if written else out[-200:]))
        load0 = os.getloadavg()[0]
        took, out = run(["train", str(dataset), "--model", args.model, "--video-encoder",
                         "efficientnet-lite0", "--audio-encoder", "silero-vad", "--out",
                         str(model), "--epochs", str(args.epochs), "--device", "cpu",
                         "--block-s", str(args.block_s), "--name", "bench", "--version",
                         "1"], env)
        meta = json.loads((model / "model.json").read_text())["extra"]
        pre = re.search(r"windows preprocessed in ([\d.]+)s", out)
        epochs = len(meta["train"]["history"])
        sp = meta["splits"]
        test = meta.get("test", {})
        rows.append((f"train {args.model} (efficientnet-lite0 + silero-vad)", took, load0,
                     os.getloadavg()[0],
                     f"{sp['train']}/{sp['val']}/{sp['test']} train/val/test windows, "
                     f"frozen features {pre.group(1) if pre else '?'} s, {epochs} epochs in "
                     f"{meta['train']['seconds']:.1f} s, test accuracy "
                     f"{100 * test.get('accuracy', float('nan')):.1f} %"))
        print(f"\n{args.streams} streams x {args.scenes} scenes of 2 s; torch threads 1; "
              f"{os.cpu_count()} CPUs\n")
        print("| command | seconds | load before / after | what |")
        print("|---|---:|---|---|")
        for name, took, a, b, what in rows:
            print(f"| {name} | {took:.1f} | {a:.1f} / {b:.1f} | {what} |")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
