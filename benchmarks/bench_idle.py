"""Idle deadlines on W1 with speech pauses: when windows close, in bursts or one by one.

The pure aligner (no Kafka), fed W1 (bench_align.w1_records) with ``--pauses``: the
transcript of every stream pauses now and then for 3-5 s, as speech does, and each segment
arrives 0.8-1.2 s after it ends (a recogniser's lag). The fake clock is the arrival time and
the aligner is polled every 100 ms, as the worker's timer does. For each text idle deadline
(``--idle-text-ms``, a list) one row:

- window end -> closed (wall clock), p50 / p99 / max;
- the largest number of windows of one stream closed by one poll (a burst; 1 is the ideal,
  2 happens when the hop is under the poll interval's reach);
- windows that closed without text although a segment overlapping them arrived later
  (partly late segments), and segments late as a whole.

    .venv/bin/python benchmarks/bench_idle.py [--seconds 300] [--idle-text-ms 0,500,1000,2000,3000]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from streamproc.align.aligner import AlignConfig, Aligner
from streamproc.config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import MS, w1_records

POLL_NS = 100 * MS


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run(recs: list, settings: Settings) -> dict[str, float]:
    a = Aligner(AlignConfig.from_settings(settings))
    delays: list[float] = []
    burst = 0
    next_poll = recs[0][0]
    statuses: Counter[str] = Counter()
    for now, rec in recs:
        while next_poll <= now:
            closed = a.poll(next_poll)
            delays += [(next_poll - w.end_ns) / MS for w in closed]
            burst = max(burst, *Counter(w.stream_id for w in closed).values(), 0)
            next_poll += POLL_NS
        out = a.add(rec, now)
        statuses[out.status if not out.reason or out.status != "accepted" else "partly late"] += 1
        closed = a.poll(now)  # the agent polls after every record too
        delays += [(now - w.end_ns) / MS for w in closed]
        burst = max(burst, *Counter(w.stream_id for w in closed).values(), 0)
    return {"p50": percentile(delays, 0.5), "p99": percentile(delays, 0.99),
            "max": max(delays), "burst": burst, "windows": len(delays),
            "late": statuses["late"], "partly late": statuses["partly late"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--idle-text-ms", default="0,500,1000,2000,3000")
    args = ap.parse_args()
    recs = w1_records(args.seconds, pauses=True)
    print(f"W1 with pauses, {args.seconds} s, {len(recs)} records; text lateness "
          f"{Settings().lateness_text_ms} ms; polled every {POLL_NS // MS} ms and per record")
    print("| text idle deadline ms | window end -> closed p50 / p99 / max ms | largest burst "
          "(windows of one stream in one poll) | windows | segments partly late | late |")
    print("|---|---|---|---|---|---|")
    for idle in (int(x) for x in args.idle_text_ms.split(",")):
        r = run(recs, Settings(idle_deadline_text_ms=idle))
        print(f"| {idle} | {r['p50']:.0f} / {r['p99']:.0f} / {r['max']:.0f} | {r['burst']} | "
              f"{r['windows']} | {r['partly late']} | {r['late']} |")


if __name__ == "__main__":
    main()
