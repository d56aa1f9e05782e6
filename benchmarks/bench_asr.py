"""Speech recognition (`streamproc asr`): word error rate, real-time factor, latency.

``wer``: the pure transcriber (no Kafka) on sentences spoken by TTS voices the engine never
saw, 3-5 s pauses between them, clean and with white noise at several SNRs; per set the
word error rate of the finals against the script, the utterances found against those
spoken, and CPU seconds per second of audio (RTF, all audio and speech only). Both voice
activity detectors (webrtc, energy gate) are run on each set.

``live``: a real broker and a real ``streamproc asr`` process; N streams published in real
time (100 ms chunks, event time = wall clock), each speaking with 3-5 s pauses. From the
transcript topic: end of speech (audio event time) -> final segment published, speech
start -> first partial published, p50 / p99; whether the worker kept up.

    .venv/bin/python benchmarks/bench_asr.py wer
    .venv/bin/python benchmarks/bench_asr.py live --streams 1,2,4,6 --seconds 60 \
        --processes 0,2 --rounds 2

``--processes``: the worker's ``asr_processes`` (0: decoding on the consumer's thread, N: a
pool of N decoding processes); each stream count runs every value in turn, the order
reversed every other round, so the values share the machine's load alike.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from streamproc.asr.engine import SphinxEngine
from streamproc.asr.stream import CutConfig, StreamTranscriber
from streamproc.asr.vad import make_vad
from streamproc.asr.wer import Wer, wer
from streamproc.ml.avdigits import Voice, synthesize
from streamproc.wire import codec as wire

RATE = 16_000
NS = 1_000_000_000
REPO = Path(__file__).resolve().parents[1]
SCRIPT = (
    "please open the door", "seven three one five", "the weather is nice today",
    "turn left at the next light", "we will meet at noon tomorrow",
    "call me when you get home", "i like green apples", "the meeting starts at nine",
    "can you send me the report", "two four six eight", "the train leaves in ten minutes",
    "where did you put my keys",
)
SETS = {
    "flite (slt, kal16, awb, rms)": [Voice("flite", n) for n in ("slt", "kal16", "awb", "rms")],
    "espeak-ng (en-us, en-gb, en-us+f3)": [Voice("espeak-ng", n)
                                           for n in ("en-us", "en-gb", "en-us+f3")],
}


def track(voice: Voice, sentences: tuple[str, ...], rng: np.random.Generator,
          snr_db: float | None = None) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Sentences with 3-5 s pauses; (text, start sample, end sample) of each."""
    parts, spans, n = [np.zeros(RATE // 2, np.float32)], [], RATE // 2
    for text in sentences:
        x = 0.5 * synthesize(voice, text, 1.0, 0, RATE)
        spans.append((text, n, n + len(x)))
        pause = np.zeros(int(rng.uniform(3.0, 5.0) * RATE), np.float32)
        parts += [x, pause]
        n += len(x) + len(pause)
    audio = np.concatenate(parts)
    if snr_db is not None:
        speech_power = np.mean(np.concatenate([audio[a:b] for _, a, b in spans]) ** 2)
        noise = rng.normal(0, np.sqrt(speech_power / 10 ** (snr_db / 10)), len(audio))
        audio = np.clip(audio + noise, -1, 1).astype(np.float32)
    return audio, spans


def chunks(sid: str, t0: int, x: np.ndarray, step: int = RATE // 10) -> list[wire.AudioChunk]:
    return [wire.AudioChunk.from_samples(sid, t0 + i * NS // RATE, k, x[i:i + step], RATE)
            for k, i in enumerate(range(0, len(x), step))]


# pocketsphinx narrowed: smaller beams, no second (flat-lexicon) pass
FAST = {"beam": 1e-40, "wbeam": 1e-30, "pbeam": 1e-40, "maxhmmpf": 3000, "fwdflat": False}


def bench_wer(args: argparse.Namespace) -> None:
    engines = {"pocketsphinx": SphinxEngine(), "pocketsphinx, narrow beams": SphinxEngine(**FAST)}
    script = SCRIPT[:args.sentences]
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start; "
          f"{len(script)} sentences per voice")
    print("| set | engine | VAD | WER | utterances found / spoken | RTF (all audio) | "
          "RTF (speech) |")
    print("|---|---|---|---|---|---|---|")
    runs = []
    for set_name in SETS:
        if args.sets and not any(w in set_name for w in args.sets.split(",")):
            continue
        for snr in (None, 20.0, 10.0, 5.0) if "flite" in set_name else (None,):
            for vad_kind in ("webrtc", "energy"):
                runs.append((set_name, snr, vad_kind, "pocketsphinx"))
    if not args.sets or "flite" in args.sets:
        runs.insert(1, (next(iter(SETS)), None, "webrtc", "pocketsphinx, narrow beams"))
    for set_name, snr, vad_kind, engine_name in runs:
        voices, engine = SETS[set_name], engines[engine_name]
        total, found, spoken, cpu, audio_s, speech_s = Wer(0, 0), 0, 0, 0.0, 0.0, 0.0
        for k, voice in enumerate(voices):
            rng = np.random.default_rng(k)
            x, spans = track(voice, script, rng, snr)
            tr = StreamTranscriber("s", CutConfig(), engine, make_vad(vad_kind))
            t = time.process_time()
            finals = [s for c in chunks("s", 0, x) for s in tr.add(c) if s.final]
            finals += [s for s in tr.flush() if s.final]
            cpu += time.process_time() - t
            audio_s += len(x) / RATE
            speech_s += sum(b - a for _, a, b in spans) / RATE
            total = total + wer(" ".join(t for t, _, _ in spans),
                                " ".join(s.text for s in finals))
            found += len(finals)
            spoken += len(spans)
        name = set_name + ("" if snr is None else f" + white noise {snr:.0f} dB SNR")
        print(f"| {name} | {engine_name} | {vad_kind} | {total.rate:.1%} "
              f"({total.ref_words} words) | {found} / {spoken} | "
              f"{cpu / audio_s:.3f} | {cpu / speech_s:.2f} |", flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


def bench_live(args: argparse.Namespace) -> None:
    from kafka import KafkaConsumer, TopicPartition

    from streamproc import kafka
    from streamproc.config import Settings, env_name
    from streamproc.dev.localkafka import LocalBroker
    from streamproc.topics import create_topics

    broker = None
    bootstrap = os.environ.get("STREAMPROC_BOOTSTRAP")
    tmp = Path(tempfile.mkdtemp(prefix="bench-asr-"))
    if not bootstrap:
        broker = LocalBroker(tmp / "kafka").start()
        bootstrap = broker.bootstrap
    voices = SETS["flite (slt, kal16, awb, rms)"]
    print(f"machine: {os.cpu_count()} cores; {args.seconds:.0f} s per run")
    print("| round | streams | asr workers | decoding processes | load (1 min) | finals | "
          "end of speech -> final p50 / p99 / max | speech start -> first partial p50 / p99 | "
          "worker RTF | CPU s: consumer + decoders |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    alive: list[subprocess.Popen] = []  # ended in `finally` even when a run fails
    runs = []
    for r in range(args.rounds):
        for n in [int(v) for v in args.streams.split(",")]:
            procs_list = args.processes.split(",")
            for k, pv in enumerate(procs_list[::-1] if r % 2 else procs_list):
                runs.append((r, n, pv, (r * 100 + n) * 10 + k))
    try:
        for rnd, n, pv, tag in runs:
            prefix = f"benchasr{tag}-{os.getpid()}"
            settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix, app_id=prefix,
                                partitions=4, asr_processes=pv)
            create_topics(settings)
            env = {**os.environ, **{env_name(f): str(getattr(settings, f.name))
                                    for f in settings.__dataclass_fields__.values()}}
            logs = [tmp / f"asr-{tag}-{w}.log" for w in range(args.workers)]
            procs = [subprocess.Popen([sys.executable, "-m", "streamproc.cli", "asr"], env=env,
                                      stdout=open(lg, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                      cwd=REPO) for lg in logs]
            alive.extend(procs)
            # every worker holds partitions (the group has settled)
            while not all(re.search(rb"assigned partitions \[\d", lg.read_bytes())
                          for lg in logs):
                time.sleep(0.2)
            tracks = {}
            sids = _spread(n, settings.partitions)
            for i in range(n):
                rng = np.random.default_rng(100 + i)
                sents = tuple(SCRIPT[(i + j) % len(SCRIPT)] for j in range(len(SCRIPT)))
                x, spans = track(voices[i % len(voices)], sents, rng)
                x = x[:int(args.seconds * RATE)]
                tracks[sids[i]] = (x, [s for s in spans if s[2] <= len(x)])
            arrivals: list[tuple[float, wire.TranscriptSegment]] = []
            stop = threading.Event()

            def read(settings: Settings = settings, stop: threading.Event = stop,
                     arrivals: list = arrivals) -> None:
                c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
                tps = [TopicPartition(settings.topic("text"), p) for p in range(4)]
                c.assign(tps)
                c.seek_to_beginning(*tps)
                while not stop.is_set():
                    for msgs in c.poll(timeout_ms=50).values():
                        now = time.time_ns()
                        for m in msgs:
                            seg = wire.decode(wire.KafkaRecord.from_client(m))
                            assert isinstance(seg, wire.TranscriptSegment)
                            arrivals.append((now, seg))
                c.close()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            producer = kafka.producer(settings)
            t0 = time.time_ns() + NS // 2
            plan = sorted((c for sid, (x, _) in tracks.items() for c in chunks(sid, t0, x)),
                          key=lambda c: c.ts_ns)
            load0 = os.getloadavg()[0]
            for c in plan:
                # a chunk is sent when its last sample has been "captured"
                wait = (c.end_ns - time.time_ns()) / NS
                if wait > 0:
                    time.sleep(wait)
                key, value, headers, ts_ms = wire.encode_parts(c)
                producer.send(settings.topic("audio"), value=value, key=key, headers=headers,
                              timestamp_ms=ts_ms)
            producer.flush()
            time.sleep(4)
            stop.set()
            reader.join(5)
            load1 = os.getloadavg()[0]
            cpu = [_cpu_s(proc.pid) for proc in procs]
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            producer.close()
            final_lat, partial_lat = [], []
            for sid, (_, spans) in tracks.items():
                mine = [(t, s) for t, s in arrivals if s.stream_id == sid]
                for _, a, b in spans:
                    s_ns, e_ns = t0 + a * NS // RATE, t0 + b * NS // RATE

                    def over(s: wire.TranscriptSegment, s_ns: int = s_ns,
                             e_ns: int = e_ns) -> bool:
                        return s.start_ns < e_ns and s_ns < s.end_ns

                    fin = [t for t, s in mine if s.final and over(s)]
                    par = [t for t, s in mine if over(s)]
                    if fin:
                        final_lat.append((min(fin) - e_ns) / 1e6)
                    if par:
                        partial_lat.append((min(par) - s_ns) / 1e6)
            rtf = " / ".join(_rtf(lg) for lg in logs)
            print(f"| {rnd + 1} | {n} | {args.workers} | {pv} | {load0:.1f} -> {load1:.1f} | "
                  f"{len(final_lat)} of "
                  f"{sum(len(s) for _, s in tracks.values())} | {_p(final_lat, 50):.0f} / "
                  f"{_p(final_lat, 99):.0f} / {max(final_lat, default=float('nan')):.0f} ms | "
                  f"{_p(partial_lat, 50):.0f} / {_p(partial_lat, 99):.0f} ms | {rtf} | "
                  f"{' / '.join(f'{a:.0f} + {b:.0f}' for a, b in cpu)} |", flush=True)
    finally:
        for proc in alive:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        if broker is not None:
            broker.stop()


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of a process and of its children (the decoding processes) so far."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(p: str) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    own = sum(int(v) for v in stat(str(pid))[11:13]) / tick
    kids = 0.0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = stat(p)
            except OSError:
                continue
            if int(st[1]) == pid:
                kids += sum(int(v) for v in st[11:13]) / tick
    return own, kids


def _spread(n: int, partitions: int) -> list[str]:
    """n stream ids whose keys fall on the partitions in turn (so workers share them)."""
    from kafka.partitioner.default import murmur2

    out, j = [], 0
    while len(out) < n:
        sid = f"s{j}"
        if (murmur2(sid.encode()) & 0x7FFFFFFF) % partitions == len(out) % partitions:
            out.append(sid)
        j += 1
    return out


def _p(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _rtf(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "(RTF" in ln]
    return lines[-1].split("(RTF ")[1].split(")")[0] if lines else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("wer")
    w.add_argument("--sentences", type=int, default=8, help="sentences per voice [8]")
    w.add_argument("--sets", default="", help="only sets whose name has one of these words")
    live = sub.add_parser("live")
    live.add_argument("--streams", default="1,2,4")
    live.add_argument("--seconds", type=float, default=60.0)
    live.add_argument("--workers", type=int, default=1, help="asr workers (one group)")
    live.add_argument("--processes", default="auto",
                      help="asr_processes values to compare, comma separated [auto]")
    live.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    {"wer": bench_wer, "live": bench_live}[args.mode](args)


if __name__ == "__main__":
    main()
