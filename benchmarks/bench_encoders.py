"""Per-window cost of each encoder, from-scratch and pretrained (docs/models.md).

W1 windows (benchmarks/README.md): 1 s of 320x240 JPEG (quality 80, real photographs from
scikit-image) at 15 fps, K = 8 frames picked per window, 16 kHz audio. For each encoder,
in one process and one run:

- ``load``: building the model the first time, backbone weights included (a fresh
  process; the cached safetensors conversion already done);
- ``preprocess``: make_batch with that encoder's preprocessing (JPEG decode at reduced
  scale + resize, log-mel, waveform), ms per window;
- ``encoder``: the encoder's forward under ``torch.inference_mode``, ms per window;

at batch 1 (a window served alone) and batch 32 (windows batched across streams), as the
median of ``--repeats`` runs. Each configuration runs in its own subprocess so the load
time is a cold one and encoders do not share caches.

    .venv/bin/python benchmarks/bench_encoders.py [--threads 1] [--device cpu] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ENCODERS = [("video", "cnn"), ("video", "efficientnet-lite0"),
            ("video", "haar-face"), ("audio", "cnn"), ("audio", "silero-vad")]


def w1_windows(n: int) -> list:
    import cv2
    import numpy as np
    from skimage import data

    from streamproc.align.aligner import Window
    from streamproc.wire.codec import VideoFrame

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    photos = [cv2.resize(p[..., ::-1], (320, 240), interpolation=cv2.INTER_AREA)
              for p in photos]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        frames = [VideoFrame.from_image("s", i * 10**9 + j, j, photos[(i + j // 8) % 4],
                                        quality=80) for j in range(15)]
        audio = (0.1 * rng.standard_normal(16000)).astype(np.float32)
        out.append(Window("s", i * 10**9, (i + 1) * 10**9, frames, 15, audio,
                          np.ones(16000, bool), 16000, [],
                          {"video": True, "audio": True, "text": False}))
    return out


def measure(modality: str, kind: str, repeats: int, device: str) -> dict:
    import torch

    from streamproc.models import create_model
    from streamproc.models.preprocess import Preprocess, make_batch

    ws = w1_windows(32)
    t0 = time.perf_counter()
    model = create_model(modality, ["a", "b"], Preprocess(),
                         **{f"{modality}_encoder": kind}).eval().to(device)
    enc = model.encoders[modality]
    with torch.inference_mode():
        enc(make_batch(ws[:1], model.preprocess).to(device))
    load = time.perf_counter() - t0
    row = {"encoder": f"{modality} {kind}", "load_s": load,
           "trained_params": sum(p.numel() for p in enc.parameters() if p.requires_grad)}
    for b in (1, 32):
        pre_t, enc_t = [], []
        for r in range(repeats):
            batch_ws = [ws[(r + i) % len(ws)] for i in range(b)]
            t = time.perf_counter()
            batch = make_batch(batch_ws, model.preprocess).to(device)
            t1 = time.perf_counter()
            with torch.inference_mode():
                enc(batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            pre_t.append((t1 - t) * 1000 / b)
            enc_t.append((t2 - t1) * 1000 / b)
        row[f"pre_b{b}"] = statistics.median(pre_t)
        row[f"enc_b{b}"] = statistics.median(enc_t)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: "modality:kind"
    args = ap.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        modality, kind = args.one.split(":")
        print(json.dumps(measure(modality, kind, args.repeats, args.device)))
        return
    rows = []
    for modality, kind in ENCODERS:
        out = subprocess.run([sys.executable, __file__, "--one", f"{modality}:{kind}",
                              "--threads", str(args.threads), "--device", args.device,
                              "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {args.threads}, device {args.device}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| encoder | trained params | load s | preprocess ms/window b1 / b32 | "
          "encoder ms/window b1 / b32 | total ms/window b32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['trained_params']:,} | {r['load_s']:.2f} | "
              f"{r['pre_b1']:.2f} / {r['pre_b32']:.2f} | {r['enc_b1']:.2f} / "
              f"{r['enc_b32']:.2f} | {r['pre_b32'] + r['enc_b32']:.2f} |")


if __name__ == "__main__":
    main()
