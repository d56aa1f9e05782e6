"""Faces & Voices (streamproc/ml/realworld.py): from-scratch vs pretrained frozen encoders
against the number of labelled training windows (docs/models.md).

For each encoder setting (``scratch``: the small CNNs on 16x16 grey frames and log-mel;
``pretrained``: EfficientNet-Lite0 + Silero VAD, frozen; ``pretrained-face``: OpenCV's Haar face
detector + Silero VAD, frozen), each number of labelled windows
(a class-balanced random draw from the train split, per seed) and each method, trains
with early stopping on the validation split and reports test accuracy, and accuracy with
the video or the audio removed at test time, as mean ± std over seeds.

    .venv/bin/python benchmarks/bench_realworld.py --dataset data/faces-voices \
        [--preset small] [--sizes 20,50,100,200,0] [--methods lmf,late,video,audio]
        [--seeds 0,1,2] [--out runs/faces-voices]

The dataset is generated first when the directory does not hold one. Size 0 means the
whole train split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from streamproc.ml import realworld as rw
from streamproc.ml.dataset import MANIFEST, Dataset
from streamproc.ml.train import (
    Split,
    TrainConfig,
    evaluate,
    load_split,
    preprocess_for,
    seed_everything,
    train_model,
)
from streamproc.models import create_model

SETTINGS = {"scratch": {},
            "pretrained": {"video_encoder": "efficientnet-lite0", "audio_encoder": "silero-vad"},
            "pretrained-face": {"video_encoder": "haar-face", "audio_encoder": "silero-vad"}}


def subset(split: Split, n: int, seed: int) -> Split:
    """n windows drawn at random, as balanced over the classes as n allows."""
    if n <= 0 or n >= len(split):
        return split
    rng = np.random.default_rng(seed)
    classes = sorted(set(split.y.tolist()))
    per = {c: rng.permutation(np.nonzero(split.y.numpy() == c)[0]).tolist() for c in classes}
    idx: list[int] = []
    while len(idx) < n:
        for c in classes:
            if per[c] and len(idx) < n:
                idx.append(per[c].pop())
    t = torch.tensor(sorted(idx))
    return Split(split.batch.select(t), split.y[t], [split.info[i] for i in t.tolist()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="data/faces-voices")
    ap.add_argument("--preset", default="small", choices=sorted(rw.PRESETS))
    ap.add_argument("--sizes", default="20,50,100,200,0")
    ap.add_argument("--methods", default="early,late,lmf,tfn,attention,video,audio")
    ap.add_argument("--settings", default="scratch,pretrained,pretrained-face")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--out", default="runs/faces-voices")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small networks, shared cores: one thread is fastest here

    if not (Path(args.dataset) / MANIFEST).exists():
        print(f"generating Faces & Voices ({args.preset}) in {args.dataset}", flush=True)
        rw.generate(args.dataset, rw.PRESETS[args.preset])
    ds = Dataset(args.dataset)
    sizes = [int(x) for x in args.sizes.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = args.methods.split(",")
    cfg = TrainConfig(epochs=args.epochs, patience=args.patience, device="cpu",
                      progress=False, threads=1)
    rows = []
    t_all = time.perf_counter()
    for setting in args.settings.split(","):
        enc = SETTINGS[setting]
        probe = create_model("early", ds.labels, preprocess_for(ds), **enc)
        t0 = time.perf_counter()
        train, val, test = (load_split(ds, s, probe.preprocess, model=probe)
                            for s in ("train", "val", "test"))
        assert train is not None and test is not None
        print(f"{setting}: {len(train)} train / {len(val) if val else 0} val / {len(test)} "
              f"test windows preprocessed in {time.perf_counter() - t0:.1f}s", flush=True)
        for size in sizes:
            for method in methods:
                runs = []
                for seed in seeds:
                    part = subset(train, size, seed)
                    seed_everything(seed)
                    model = create_model(method, ds.labels, probe.preprocess, **enc)
                    t = time.perf_counter()
                    train_model(model, part, val, dataclasses.replace(cfg, seed=seed),
                                log=lambda _m: None)
                    runs.append({**evaluate(model, test, len(ds.labels)),
                                 "seconds": time.perf_counter() - t})
                row = {"setting": setting, "windows": len(part), "method": method,
                       "runs": runs}
                rows.append(row)
                acc = [r["accuracy"] for r in runs]
                print(f"{setting:<10} {len(part):>4} windows  {method:<9} test acc "
                      f"{100 * statistics.mean(acc):5.1f} ± "
                      f"{100 * (statistics.stdev(acc) if len(acc) > 1 else 0):4.1f}  "
                      f"({statistics.mean(r['seconds'] for r in runs):.1f}s per run)",
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"dataset": str(ds.path), "source": ds.manifest.get("source"), "seeds": seeds,
         "rows": rows, "seconds": time.perf_counter() - t_all,
         "load_average": os.getloadavg()}, indent=2, default=float) + "\n")
    md = table(rows)
    (out / "results.md").write_text(md)
    print(md)


def table(rows: list[dict]) -> str:
    def cell(runs: list[dict], key: str) -> str:
        xs = [r[key] for r in runs if key in r]
        if not xs:
            return "—"
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"

    lines = ["| setting | labelled windows | method | test accuracy | without video | "
             "without audio |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['windows']} | {r['method']} | "
                     f"{cell(r['runs'], 'accuracy')} | {cell(r['runs'], 'without_video')} | "
                     f"{cell(r['runs'], 'without_audio')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
