"""The worker core alone (no Kafka, no faust): CPU µs per W1 event through
``WorkerCore.on_records`` in batches of 256, as the worker's fetch loop hands them over
(decoding, the door check of every frame, aligning, the ack ledger, window summaries
handed to an output that completes at once), with the worker's heap settings. The part
of the align-only worker's cost that is streamproc's own (docs/benchmarks.md, *Peers*).

    .venv/bin/python benchmarks/bench_core.py [--seconds 60] [--repeats 6] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_align import w1_records  # one W1 generator for every benchmark

from streamproc.config import Settings
from streamproc.inference.outputs import SummaryOutput
from streamproc.wire import codec as wire
from streamproc.worker.app import settle_heap
from streamproc.worker.core import Consumed, WorkerCore
from streamproc.worker.metrics import Counters
from streamproc.worker.patches import BATCH_RECORDS, RecordAck

PARTITIONS = 4


class _Consumer:
    """What a :class:`RecordAck` acks through: nothing to commit here."""

    def ack(self, handle: RecordAck) -> None:
        handle.acked = True


Prepared = list[tuple[int, str, int, int, wire.KafkaRecord]]


def prepare(seconds: int, settings: Settings) -> Prepared:
    """W1 as Kafka records in arrival order: (arrival ns, topic, partition, offset, record)."""
    out: Prepared = []
    offsets: dict[tuple[str, int], int] = {}
    for arrival, media in w1_records(seconds):
        topic = settings.topic(media.modality)
        partition = zlib.crc32(media.stream_id.encode()) % PARTITIONS
        offset = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = offset + 1
        out.append((arrival, topic, partition, offset, wire.encode(media)))
    return out


async def run(records: Prepared, settings: Settings, profile: cProfile.Profile | None
              ) -> tuple[float, int]:
    """CPU seconds through the core, and the windows it emitted."""
    clock = [records[0][0]]
    sent: list[wire.KafkaRecord] = []

    async def send(rec: wire.KafkaRecord) -> None:
        sent.append(rec)

    def durable(_sid: str = "", _value: object = None) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def enqueue(rec: wire.KafkaRecord) -> asyncio.Future[None]:
        await send(rec)
        return durable()

    core = WorkerCore(settings, submit=SummaryOutput(enqueue).submit, send_dead_letter=send,
                      record_progress=durable, counters=Counters(), crash=print,
                      clock=lambda: clock[0])
    tps = [(settings.topic(m), p) for m in ("video", "audio", "text") for p in range(PARTITIONS)]
    core.on_assigned(tps)
    core.on_resume(dict.fromkeys(tps, 0), {})
    consumer = _Consumer()
    if profile is not None:
        profile.enable()
    t0 = time.process_time()
    for i in range(0, len(records), BATCH_RECORDS):
        chunk = records[i:i + BATCH_RECORDS]
        clock[0] = chunk[-1][0]
        core.on_records([Consumed(t, p, o, rec, RecordAck(consumer, (t, p), o))
                         for _a, t, p, o, rec in chunk])
        for _ in range(3):  # publish completions, acks
            await asyncio.sleep(0)
    took = time.process_time() - t0
    if profile is not None:
        profile.disable()
    return took, len(sent)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="seconds of W1 (8 streams)")
    ap.add_argument("--repeats", type=int, default=6, help="passes, each with a fresh core")
    ap.add_argument("--profile", action="store_true", help="cProfile one more pass")
    args = ap.parse_args()
    settings = Settings(provisional_on="none", partitions=PARTITIONS, topic_prefix="core")
    records = prepare(args.seconds, settings)
    settle_heap()  # as the worker does once started: the collector off what start-up made
    per_event = []
    for _ in range(args.repeats):
        took, windows = asyncio.run(run(records, settings, None))
        per_event.append(took / len(records) * 1e6)
        print(f"{per_event[-1]:.1f} CPU µs/event ({len(records)} events, {windows} windows)",
              flush=True)
    print(f"median {statistics.median(per_event):.1f}, min {min(per_event):.1f} CPU µs/event "
          f"over {args.repeats} passes; load {Path('/proc/loadavg').read_text().split()[0]}")
    if args.profile:
        prof = cProfile.Profile()
        asyncio.run(run(records, settings, prof))
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
