"""The faust agent's cost per event against a bare aiokafka consume loop.

The same W1 records (benchmarks/README.md; built by bench_align.w1_records: real 320x240
JPEGs, real PCM, transcript segments) are produced once to the three input topics; then,
in one run, rounds alternate between three readers of that backlog, each in a fresh
consumer group:

- ``bare``: an aiokafka consumer loop that only counts records (the floor);
- ``decode``: the same loop plus ``wire.decode`` of every record (each JPEG's structure
  checked, as the worker does) -- the part of the agent's cost that is validation, not faust;
- ``faust``: the worker's faust app whose core only acks what it is handed (faust's own
  cost: its consumer thread, the batched fetch loop, acks and commits);
- ``agent``: the real worker (``streamproc.worker.app.create_app``) in a child process: faust
  consumer, decode, Aligner, window publishing, ack-after-emit and commits.

CPU µs per event: the worker process's CPU time (all its threads) from the first record
handed to the core to the last, per event.

Events/s is measured from the first record to the last one handled, so start-up and
rebalancing are not counted. Medians over the rounds.

    .venv/bin/python benchmarks/bench_agent.py [--seconds 20] [--rounds 3] [--write-docs]
                                               [--profile agent.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from streamproc import kafka
from streamproc.config import MODALITIES, Settings
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_align import w1_records  # one W1 generator for every benchmark
from bench_producer import machine

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def produce_backlog(settings: Settings, seconds: int,
                    then: Iterable[wire.MediaRecord] = ()) -> int:
    """W1's records to the input topics in arrival order, then ``then``; how many."""
    keep_backlog(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                             linger_ms=5, batch_size=1 << 20,
                             max_request_size=settings.max_message_bytes)
    n = 0
    for rec in itertools.chain((r for _arrival, r in w1_records(seconds)), then):
        k = wire.encode(rec)
        producer.send(settings.topic(rec.modality), key=k.key, value=k.value,
                      headers=list(k.headers), timestamp_ms=k.timestamp_ms)
        n += 1
    producer.flush(120)
    producer.close()
    return n


def keep_backlog(settings: Settings, topics: Iterable[str] = ()) -> None:
    """No time-based retention on the input topics (and ``topics``): W1's event times (the
    records' timestamps) are in 2023, so the broker's retention check, every 5 minutes,
    would delete a backlog as old while a benchmark still reads it."""
    admin = kafka.admin(settings)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t,
                                            configs={"retention.ms": "-1"})
                             for t in (*settings.input_topics, *topics)])
    finally:
        admin.close()


async def _loop(settings: Settings, n: int, decode: bool) -> float:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
        max_partition_fetch_bytes=settings.max_message_bytes, fetch_max_wait_ms=1500)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in settings.input_topics
               for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        modality_of = {settings.topic(m): m for m in MODALITIES}
        seen, first = 0, 0.0
        while seen < n:
            for tp, msgs in (await consumer.getmany(timeout_ms=1000)).items():
                if not first:
                    first = time.perf_counter()
                seen += len(msgs)
                if decode:
                    for m in msgs:
                        wire.decode(wire.KafkaRecord.from_client(m),
                                    expect_modality=modality_of[tp.topic],
                                    max_bytes=settings.max_message_bytes)
        return n / (time.perf_counter() - first)
    finally:
        await consumer.stop()


def run_loop(settings: Settings, n: int, decode: bool) -> float:
    return asyncio.run(_loop(settings, n, decode))


def peak_rss_kb() -> int:
    """This process's peak RSS in KiB (VmHWM). Not getrusage's ru_maxrss: Linux carries a
    parent's peak into its child across fork and exec, so a child smaller than the
    benchmark that started it reported the parent's figure."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_agent(settings: Settings, n: int, noop: bool = False, profile: str = "",
              settle_s: float = 0.0, windows: int = 0, timeout_s: float = 600) -> dict:
    """The worker in a child process (faust owns its event loop and signal handlers).

    Timed from its first record to its ``n``-th: ``events_s``, and ``cpu_run_s`` (process
    CPU over that span); ``maxrss_kb`` is the child's peak RSS. ``settle_s`` > 0: after the
    ``n``-th record the worker runs on (idle deadlines close a backlog's last windows) until
    ``windows`` windows are published, or, without that many, until every window it emitted
    is published and none came for ``settle_s``; then it stops.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        s = settings.replace(app_id=f"bench{uuid.uuid4().hex[:8]}", data_dir=tmp, web_port=0,
                             metrics_port=0, log_level="warning")
        env = dict(os.environ, BENCH_SETTINGS=json.dumps(dataclasses.asdict(s)), BENCH_N=str(n),
                   BENCH_OUT=str(out), BENCH_NOOP="1" if noop else "",
                   BENCH_PROFILE=profile, BENCH_SETTLE=str(settle_s),
                   BENCH_WINDOWS=str(windows))
        proc = subprocess.run([sys.executable, __file__, "--agent-child"], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        if not out.exists():
            raise RuntimeError(f"agent child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def agent_child() -> None:
    from streamproc.worker.app import create_app, faust_worker

    settings = Settings(**json.loads(os.environ["BENCH_SETTINGS"]))
    n, out = int(os.environ["BENCH_N"]), Path(os.environ["BENCH_OUT"])
    app = create_app(settings, partitions=settings.partitions)
    state = app.streamproc
    on_records = state.on_records
    if os.environ.get("BENCH_NOOP"):
        def on_records(records) -> None:  # faust's cost alone: hand each record back at once
            state._releasing = True
            for record in records:  # the gate still learns how far each input was read
                state.gate.admit((record.topic, record.partition), record.offset)
                record.handle.ack()
            state._releasing = False
    settle_s = float(os.environ.get("BENCH_SETTLE") or 0)
    want = int(os.environ.get("BENCH_WINDOWS") or 0)
    marks = {"seen": 0}
    prof = None
    if os.environ.get("BENCH_PROFILE"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()

    def finish() -> None:
        out.write_text(json.dumps({
            "events_s": n / marks["elapsed"], "cpu_s": time.process_time(),
            "cpu_run_s": marks["cpu_run"], "cpu_us": marks["cpu_run"] / n * 1e6,
            "maxrss_kb": peak_rss_kb(),
            "windows": state.counters.get("windows_emitted"),
            "published": state.counters.get("windows_published"),
            "dead_letters": state.counters.get("dead_letters")}))
        os.kill(os.getpid(), signal.SIGTERM)

    def settled(seen: tuple[float, float], since: float) -> None:
        # every emitted window published, and no new one for settle_s: the backlog is done
        now = (state.counters.get("windows_emitted"), state.counters.get("windows_published"))
        if now != seen or now[0] != now[1]:
            since = time.monotonic()
        if (want and now[1] >= want) or time.monotonic() - since >= settle_s:
            finish()
        else:
            asyncio.get_running_loop().call_later(0.2, settled, now, since)

    def timed(records) -> None:
        if not marks["seen"]:
            marks["first"] = time.perf_counter()
            marks["cpu0"] = time.process_time()
        on_records(records)
        before = marks["seen"]
        marks["seen"] += len(records)
        if before < n <= marks["seen"]:
            marks["elapsed"] = time.perf_counter() - marks["first"]
            marks["cpu_run"] = time.process_time() - marks["cpu0"]
            if prof is not None:
                prof.disable()
                prof.dump_stats(os.environ["BENCH_PROFILE"])
            if settle_s > 0:
                settled((-1.0, -1.0), time.monotonic())
            else:
                finish()

    state.on_records = timed
    faust_worker(app, "warning").execute_from_commandline()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=20, help="seconds of W1 traffic (8 streams)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true", help=f"record the table in {DOCS}")
    ap.add_argument("--profile", default="", help="write a cProfile of one agent run here")
    ap.add_argument("--agent-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agent_child:
        agent_child()
        return 0
    from streamproc.dev.localkafka import existing_or_local

    with existing_or_local() as bootstrap:
        settings = Settings(bootstrap_servers=bootstrap,
                            topic_prefix=f"bench{uuid.uuid4().hex[:8]}", partitions=4)
        create_topics(settings)
        n = produce_backlog(settings, args.seconds)
        print(f"{n} W1 events ({args.seconds} s of 8 streams) produced; {machine()}",
              file=sys.stderr)
        res: dict[str, list[float]] = {"bare": [], "decode": [], "faust": [], "agent": []}
        cpu: dict[str, list[float]] = {"faust": [], "agent": []}  # the worker process's
        windows = 0.0
        for r in range(args.rounds):
            res["bare"].append(run_loop(settings, n, decode=False))
            res["decode"].append(run_loop(settings, n, decode=True))
            noop = run_agent(settings, n, noop=True)
            res["faust"].append(noop["events_s"])
            cpu["faust"].append(noop["cpu_us"])
            agent = run_agent(settings, n, profile=args.profile if r == 0 else "")
            res["agent"].append(agent["events_s"])
            cpu["agent"].append(agent["cpu_us"])
            windows = agent["windows"]
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in res.items()),
                  file=sys.stderr)
    med = {k: statistics.median(v) for k, v in res.items()}
    rows = [
        "| reader | events/s (median) | µs per event | CPU µs per event | ratio to bare |",
        "|---|---|---|---|---|",
    ]
    for k, label in (("bare", "bare aiokafka loop"), ("decode", "aiokafka + wire.decode"),
                     ("faust", "faust app whose core only acks"),
                     ("agent", "streamproc agent (faust)")):
        cpu_us = f"{statistics.median(cpu[k]):,.0f}" if k in cpu else "-"
        rows.append(f"| {label} | {med[k]:,.0f} | {1e6 / med[k]:,.0f} | {cpu_us} | "
                    f"{med[k] / med['bare']:.2f} |")
    us = {k: 1e6 / v for k, v in med.items()}
    over = us["agent"] - us["bare"]
    faust_part, decode_part = us["faust"] - us["bare"], us["decode"] - us["bare"]
    body = (f"Machine: {machine()}. {n} W1 events ({args.seconds} s of 8 streams: 320x240 "
            f"JPEG at 15 fps, 100 ms PCM chunks, transcripts), read as a backlog from 4 "
            f"partitions per topic; {args.rounds} rounds alternated, medians; "
            f"{time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(rows) +
            f"\n\nThe agent costs {over:,.0f} µs per event more than the bare loop: faust's "
            f"own machinery about {faust_part:,.0f} µs, decoding (headers, PCM, JSON, each "
            f"JPEG's structure checked: streamproc.wire.jpeg) "
            f"about {decode_part:,.0f} µs, the rest ({over - faust_part - decode_part:,.0f} "
            f"µs) aligning, publishing {windows:.0f} windows per run and the ack "
            f"bookkeeping. W1 is about 204 events/s per worker, so one worker keeps up with "
            f"{med['agent'] / 204:.0f}x W1 on this machine. Load average (1 min) at the "
            f"end: {os.getloadavg()[0]:.1f}.")
    print(body)
    if args.write_docs:
        write_docs(body)
        print(f"\nwritten to {DOCS}", file=sys.stderr)
    return 0


def write_docs(body: str) -> None:
    """Replace (or add) the "## Agent" section of docs/benchmarks.md, nothing else."""
    write_section("Agent", "`benchmarks/bench_agent.py`: the worker's agent against a bare "
                  "aiokafka consume loop over the same records, same run.\n\n" + body)


def write_section(heading: str, text: str) -> None:
    """Replace (or add) the "## heading" section of docs/benchmarks.md, nothing else."""
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    section = f"## {heading}\n\n{text.strip()}\n"
    m = re.search(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", doc, flags=re.S | re.M)
    if m is None:
        doc = doc.rstrip("\n") + "\n\n" + section
    else:
        doc = doc[:m.start()] + section + "\n" + doc[m.end():].lstrip("\n")
    DOCS.parent.mkdir(exist_ok=True)
    DOCS.write_text(doc.rstrip("\n") + "\n")

if __name__ == "__main__":
    sys.exit(main())
