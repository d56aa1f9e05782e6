"""A fast fuzz run against the real broker: one align-only ``streamproc worker``, four
valid streams paced on the wall clock, and a few thousand bad records of every category
(fuzz_helpers.Category) interleaved with them: headers and header names of any bytes,
damaged and oversized media, absurd spans, clocks far ahead and behind, a producer that
restarts sp-seq, a stream split across partitions, committed and aborted transactions.

The rule: every bad record is dead-lettered once with a readable reason and a documented
kind, or handled as its category's documented rule says (fuzz_helpers.RULES); the worker
never stops, nor crash-loops after a restart; every window of the valid streams is
published once, equal to an independent oracle's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from fuzz_helpers import (
    REFUSALS,
    RULES,
    SPLIT_CHOSEN_PARTITION,
    Category,
    Expect,
    Planner,
    Read,
    Sent,
    check_plan,
    dead_letters,
    expected_outcome,
    keys_on_partitions,
    partition_of,
    read_topic,
    send_all,
    valid_stream,
    verdict,
)
from worker_helpers import (
    WORKER_MAX_BYTES,
    WorkerProc,
    expected_content,
    oracle_windows,
    start_time,
    worker_settings,
)

from streamproc.config import Settings
from streamproc.testing import S
from streamproc.topics import create_topics

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SEED = 11
N_BAD = 2400  # bad records per run
DUR_S = 10.0  # the valid streams' length, over which the bad records are spread
STAYS_UP_S = 8.0  # longer than a crash loop's period (a fetch crashes ~3 s after a start)


def provenance(settings: Settings, preds: list[dict]) -> set[tuple[str, int, int]]:
    """(topic, partition, offset) of every input record a published window used."""
    return {(settings.topic(m), p, o) for b in preds
            for m, offs in b["provenance"].items() for p, o in offs}


def predictions(reads: list[Read]) -> list[dict]:
    """The final predictions (a provisional one only repeats some of its final's records)."""
    return [b for b in (json.loads(r.value) for r in reads) if b.get("final", True)]


def judge_split(split: list[Sent], used: set[tuple[str, int, int]], n: int) -> list[str]:
    """Set each split stream's records' rule by the partition the worker aligned it on
    (the one whose records it used); a stream used on several partitions, or on none, is a
    failure (its records are then judged against murmur2's partition)."""
    failures = []
    by_key: dict[bytes, list[Sent]] = defaultdict(list)
    for s in split:
        by_key[s.rec.key].append(s)
    for key, recs in by_key.items():
        parts = {s.source.partition for s in recs
                 if (s.source.topic, s.source.partition, s.source.offset) in used}
        if len(parts) != 1:
            failures.append(f"[{Category.SPLIT_STREAM.value}] stream {key.decode()} was used on "
                            f"partitions {sorted(parts)} of {sorted({s.source.partition for s in recs})}"
                            "; one, exactly, must be chosen")
        chosen = parts.pop() if len(parts) == 1 else partition_of(key, n)
        for s in recs:
            s.rule = SPLIT_CHOSEN_PARTITION if s.source.partition == chosen else RULES[s.category]
    return failures


def test_fuzz_run_dead_letters_or_uses_every_record_and_never_stops(kafka_bootstrap: str,
                                                                    tmp_path: Path) -> None:
    """Rule per category (fuzz_helpers.RULES) for every bad record, the worker alive after
    the run and after a restart, the valid streams' windows each published once and equal
    to the oracle's."""
    settings = worker_settings(kafka_bootstrap, tmp_path)
    create_topics(settings)
    capped = settings.replace(max_message_bytes=WORKER_MAX_BYTES)  # below the topics' limit
    rng = np.random.default_rng(SEED)
    live = keys_on_partitions("live-", settings.partitions)
    failures: list[str] = []
    began = time.monotonic()

    def phase(what: str) -> None:  # shown with a failure: where the time went
        print(f"{time.monotonic() - began:5.1f} s: {what}")

    workers = [WorkerProc(capped, tmp_path / "worker.log")]
    try:
        workers[0].wait_for(r"Worker ready")
        phase("worker ready")
        t0 = start_time()
        valid = [s for sid in live for s in valid_stream(sid, t0, DUR_S, rng)]
        bad = Planner(rng, t0, int(DUR_S * S), live, settings.partitions,
                      WORKER_MAX_BYTES).plan(N_BAD)
        check_plan(bad, WORKER_MAX_BYTES)
        send_all(settings, valid + bad)
        phase(f"{len(valid)} valid and {len(bad)} bad records sent")
        split = [s for s in bad if s.category is Category.SPLIT_STREAM]
        for s in split:  # until the run shows which partition the worker chose
            s.rule = SPLIT_CHOSEN_PARTITION
        expected = oracle_windows(settings, [dataclasses.replace(s.media, source=s.source)
                                             for s in valid])
        outcome = [expected_outcome(s, WORKER_MAX_BYTES) for s in bad]
        must_use = {(s.source.topic, s.source.partition, s.source.offset)
                    for s, o in zip(bad, outcome, strict=True)
                    if o is Expect.USED and s.category is not Category.SPLIT_STREAM}
        n_dead = sum(o is Expect.DEAD for o in outcome)

        def all_published(reads: list[Read]) -> bool:
            if workers[0].proc.poll() is not None:
                return True
            preds = predictions(reads)
            return (set(expected) <= {(b["stream_id"], b["window_start_ns"]) for b in preds}
                    and must_use <= provenance(settings, preds))

        read_topic(settings, settings.topic("predictions"), all_published, 30)
        read_topic(settings, settings.topic("deadletter"),
                   lambda r: len(r) >= n_dead or workers[0].proc.poll() is not None, 15)
        phase("predictions and dead letters read")
        first = workers[0]
        if first.proc.poll() is not None:
            failures.append(f"the worker stopped during the run (exit {first.proc.returncode}):"
                            f"\n{first.log()[-2500:]}")
        else:
            try:
                rc = first.stop(15)
            except subprocess.TimeoutExpired:
                rc = None
                first.abandon()
            if rc != 0:
                how = f"exited {rc}" if rc is not None else "was still running 15 s"
                failures.append(f"the worker {how} after SIGTERM:\n{first.log()[-2500:]}")
        # restart: the same group replays what was not committed; it must stay up
        phase("worker stopped")
        second = WorkerProc(capped, tmp_path / "restart.log")
        workers.append(second)
        try:
            second.wait_for(r"Worker ready", timeout=30)
            phase("restarted worker ready")
            time.sleep(STAYS_UP_S)
        except pytest.fail.Exception:
            pass
        if second.proc.poll() is not None:
            failures.append(f"the restarted worker stopped (exit {second.proc.returncode}):"
                            f"\n{second.log()[-2500:]}")

        preds = predictions(read_topic(settings, settings.topic("predictions"), None, 20))
        letters, unreadable = dead_letters(read_topic(settings, settings.topic("deadletter"),
                                                      None, 20))
        failures += unreadable
        phase(f"{len(preds)} predictions and {sum(map(len, letters.values()))} dead letters read")
        used = provenance(settings, preds)
        failures += judge_split(split, used, settings.partitions)

        # every bad record by its category's rule
        by_cat: dict[Category, list[tuple[Sent, str]]] = defaultdict(list)
        totals = Counter(s.category for s in bad)
        seen: dict[Category, Counter] = defaultdict(Counter)
        for s in bad:
            src = (s.source.topic, s.source.partition, s.source.offset)
            why = verdict(s, letters.get(src, []), src in used, WORKER_MAX_BYTES)
            if why is not None:
                by_cat[s.category].append((s, why))
            seen[s.category][" + ".join([*(f"dead ({d.kind})" for d in letters.get(src, [])),
                                         *(["used"] if src in used else [])]) or "neither"] += 1
        for cat, outcomes in seen.items():
            print(f"{cat.value}: {dict(outcomes)}")
        for cat, bads in by_cat.items():
            s, why = bads[0]
            failures.append(f"[{cat.value}] {len(bads)} of {totals[cat]} records break the rule "
                            f"({RULES[cat].why}); e.g. {s.modality} record {s.source.partition}/"
                            f"{s.source.offset} key {s.rec.key!r:.40}: {why}")

        # the valid streams: no record dead-lettered, every window once, as the oracle's
        valid_src = {(s.source.topic, s.source.partition, s.source.offset) for s in valid}
        lost = [(src, ls[0]) for src, ls in letters.items() if src in valid_src]
        if lost:
            failures.append(f"{len(lost)} valid records dead-lettered, e.g. {lost[0][0]}: "
                            f"{lost[0][1].kind}: {lost[0][1].reason[:300]}")
        copies = Counter((b["stream_id"], b["window_start_ns"]) for b in preds)
        got = {k: b for b in preds if (k := (b["stream_id"], b["window_start_ns"]))[0] in live}
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        differ = [k for k in set(got) & set(expected)
                  if json.dumps({f: got[k][f] for f in ("modalities", "provenance")},
                                sort_keys=True) != expected_content(expected[k])]
        if missing or extra or differ:
            example = ""
            if differ:
                k = differ[0]
                example = (f"; e.g. {k[0]} at {(k[1] - t0) / S} s: published "
                           f"{got[k]['modalities']} (closed by {got[k]['quality']['closed_by']}),"
                           f" the oracle's {json.loads(expected_content(expected[k]))['modalities']}")
            failures.append(f"valid streams: {len(missing)} of {len(expected)} windows missing "
                            f"(e.g. {[(sid, (t - t0) / S) for sid, t in missing[:3]]}), "
                            f"{len(extra)} unexpected, {len(differ)} differ from the oracle"
                            + example)
        twice = {k: n for k, n in copies.items() if n > 1}
        if twice:
            streams = Counter(sid for sid, _ in twice)
            failures.append(f"{len(twice)} windows published more than once, by stream: "
                            f"{dict(streams.most_common(6))}")
        assert not failures, (f"{len(failures)} broken rules ({N_BAD} bad records, seed {SEED}; "
                              f"kinds a refusal may have: {sorted(REFUSALS)}):\n- "
                              + "\n- ".join(failures))
    finally:
        for w in workers:
            w.abandon()
