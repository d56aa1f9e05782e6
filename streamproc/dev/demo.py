"""``streamproc demo``: the whole pipeline on one machine, from nothing.

It starts (or reuses) a Kafka broker, creates topics, generates AV-Digits clips for a few
streams, trains the reference model once (cached), runs a real ``streamproc worker``
process, replays the clips in real time through the real producer, prints predictions as
they arrive and ends with a summary against the clips' known labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from streamproc.config import (
    COMMAND_GROUPS,
    Settings,
    check_worker_ports,
    port_free,
    settings_argv,
    settings_environ_names,
    settings_named,
)
from streamproc.errors import UserError
from streamproc.wire.codec import NS_PER_S, Prediction

# The reference model: what `make demo` trains once and the compose stack serves.
DEMO_PRESET = "small"
DEMO_MODEL = "lmf"
DEMO_EPOCHS = 30
DIGITS_PER_STREAM = 10
DEMO_ASR_ENGINE = "streamproc.asr.engine:pocketsphinx_digits"

Log = Callable[[str], None]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def default_dir(preset: str = DEMO_PRESET, digits: int = DIGITS_PER_STREAM) -> Path:
    """``~/.cache/streamproc/demo`` for the default preset and clips; another preset or
    clip length gets a directory of its own, so trying one leaves the default's model
    (the one the README's worker serves) and clips as they were."""
    from streamproc.dev.localkafka import cache_root

    if (preset, digits) == (DEMO_PRESET, DIGITS_PER_STREAM):
        return cache_root() / "demo"
    return cache_root() / f"demo-{preset}-{digits}d"


@dataclass(frozen=True)
class Layout:
    """Where the demo keeps what it makes (``--dir``); compose mounts the same layout."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def dataset(self) -> Path:
        return self.root / "avdigits"

    @property
    def clips(self) -> Path:
        return self.root / "clips"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def stream_ids(n: int) -> list[str]:
    return [f"cam{i + 1}" for i in range(n)]


def _model_key(preset: str) -> str:
    """Changes whenever the recipe of the reference model changes (then it is retrained)."""
    from streamproc.ml.avdigits import PRESETS

    recipe = {"preset": dataclasses.asdict(PRESETS[preset]), "model": DEMO_MODEL,
              "epochs": DEMO_EPOCHS}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def prepare_model(layout: Layout, retrain: bool = False, preset: str = DEMO_PRESET,
                  log: Log = _say) -> Path:
    """The reference model: trained once on AV-Digits, reused while its recipe holds."""
    from streamproc.ml.avdigits import PRESETS, generate
    from streamproc.ml.train import TrainConfig, train_command

    if preset not in PRESETS:
        raise UserError(f"unknown AV-Digits preset {preset!r}; use one of {', '.join(PRESETS)}")
    stamp = layout.model / "recipe.sha256"
    key = _model_key(preset)
    if not retrain and stamp.exists() and stamp.read_text().strip() == key:
        log(f"reference model: {layout.model} (cached)")
        return layout.model
    t0 = time.monotonic()
    log(f"generating the AV-Digits '{preset}' dataset in {layout.dataset} "
        "(speech synthesis is cached; a few minutes the first time)")
    generate(layout.dataset, PRESETS[preset], overwrite=True)
    log(f"training the reference model ({DEMO_MODEL} fusion) on CPU; cached afterwards")
    report = train_command(layout.dataset, DEMO_MODEL, layout.model,
                           TrainConfig(epochs=DEMO_EPOCHS, progress=sys.stderr.isatty()),
                           log=log)
    stamp.write_text(key)
    acc = report.get("test", {}).get("accuracy")
    log(f"reference model ready in {time.monotonic() - t0:.0f}s"
        + (f", held-out accuracy {acc:.1%}" if acc is not None else ""))
    return layout.model


def prepare_clips(layout: Layout, streams: int, digits_per_stream: int = DIGITS_PER_STREAM,
                  seed: int = 7, log: Log = _say) -> list:
    """One clip per stream (video .avi, .wav, .srt, labels) of random digits, cached."""
    import numpy as np

    from streamproc.ml.avdigits import write_clip

    clips = []
    rng = np.random.default_rng(seed)
    for sid in stream_ids(streams):
        digits = [int(d) for d in rng.integers(0, 10, digits_per_stream)]
        clips.append(write_clip(layout.clips, digits, stream_id=sid, seed=seed))
    log(f"{streams} clip(s) of {digits_per_stream} spoken, shown and transcribed digits in "
        f"{layout.clips}")
    return clips


def prepare(layout: Layout, streams: int, retrain: bool = False, preset: str = DEMO_PRESET,
            digits: int = DIGITS_PER_STREAM, log: Log = _say) -> list:
    if streams < 1 or digits < 1:
        raise UserError("the demo needs at least one stream of at least one digit")
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    prepare_model(layout, retrain, preset, log)
    return prepare_clips(layout, streams, digits, log=log)


# ---------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------


def child_command(settings: Settings, command: str, *own: str
                  ) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a ``streamproc COMMAND`` child of the demo: the values
    ``settings`` gives every setting both commands read (secrets in the environment), then
    ``own``, the flags the demo sets for this child itself (argparse keeps the last).
    STREAMPROC_* setting variables are left out of its environment: a flag given to the demo
    reaches the child, and a variable the demo does not read cannot."""
    theirs = set(settings_named(COMMAND_GROUPS[command]))
    names = tuple(n for n in settings_named(COMMAND_GROUPS["demo"]) if n in theirs)
    flags, secrets = settings_argv(settings, names)
    unset = settings_environ_names()
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(secrets, PYTHONUNBUFFERED="1")
    return [sys.executable, "-m", "streamproc.cli", command, *flags, *own], env


class WorkerProcess:
    """A real `streamproc worker` subprocess with its log in a file."""

    def __init__(self, settings: Settings, model: Path, log_path: Path) -> None:
        from streamproc.dev.localkafka import free_port

        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
        args, env = child_command(settings, "worker", f"--model={model}",
                                  f"--web-port={free_port()}",
                                  f"--data-dir={log_path.parent / 'worker-state'}")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Worker ready" in self.log():
                return
            if self.proc.poll() is not None:
                raise UserError(f"the worker exited with code {self.proc.returncode}; its log "
                                f"({self.log_path}) ends with:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise UserError(f"the worker was not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        from streamproc.dev.localkafka import terminate

        terminate(self.proc, timeout)
        self._log.close()


class ViewProcess:
    """A real `streamproc view` subprocess serving the demo's topics, its log in a file.

    It reads the worker's /metrics for the health panel. The configured port is used when
    it is free, else any free port (a second demo, or a view already running there).
    """

    def __init__(self, settings: Settings, log_path: Path) -> None:
        from streamproc.dev.localkafka import free_port

        self.log_path = log_path
        port = settings.view_port if port_free(settings.view_host, settings.view_port) \
            else free_port()
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # the health panel reads the demo's worker unless the settings name endpoints
        metrics = settings.view_metrics_url or (
            f"http://127.0.0.1:{settings.metrics_port}/metrics" if settings.metrics_port else "")
        args, env = child_command(settings, "view", f"--view-port={port}",
                                  f"--view-metrics-url={metrics}")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_url(self, timeout: float = 60.0) -> str | None:
        """The URL it serves, once it does; None (and why, on stderr) when it could not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if line.startswith("streamproc view: http"):
                    return line.split()[2]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        _say(f"the web view did not start (log: {self.log_path}); the demo goes on without it")
        return None

    def stop(self, timeout: float = 10.0) -> None:
        from streamproc.dev.localkafka import terminate

        terminate(self.proc, timeout)
        self._log.close()


class AsrProcess:
    """A real `streamproc asr` subprocess with its log in a file (``demo --asr``)."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # the clips say digits and nothing else: a recogniser held to those words
        args, env = child_command(settings, "asr", f"--asr-engine={DEMO_ASR_ENGINE}",
                                  "--asr-max-utterance-ms=4000")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "assigned partitions" in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise UserError(f"streamproc asr exited with code {self.proc.returncode}; "
                                f"see {self.log_path}")
            time.sleep(0.2)
        raise UserError(f"streamproc asr was not ready after {timeout:.0f}s; see "
                        f"{self.log_path}")

    def stop(self, timeout: float = 30.0) -> None:
        from streamproc.dev.localkafka import terminate

        terminate(self.proc, timeout)
        self._log.close()


def asr_report(settings: Settings, clips: list, timeout_s: float = 10.0) -> list[str]:
    """Word error rate of the final transcript segments against what each clip says."""
    from kafka import TopicPartition

    from streamproc import kafka
    from streamproc.asr.wer import Wer, wer
    from streamproc.ml.avdigits import DIGIT_WORDS
    from streamproc.wire import codec as wire

    finals: dict[str, list[wire.TranscriptSegment]] = {}
    consumer = kafka.consumer(settings)
    try:
        topic = settings.topic("text")
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp]
                                                  for tp in parts):
            for msgs in consumer.poll(timeout_ms=200).values():
                for m in msgs:
                    try:
                        seg = wire.decode(wire.KafkaRecord.from_client(m),
                                          expect_modality="text")
                    except wire.WireError:
                        continue
                    if isinstance(seg, wire.TranscriptSegment) and seg.final:
                        finals.setdefault(seg.stream_id, []).append(seg)
    finally:
        consumer.close()
    out, overall = [], Wer(0, 0)
    for c in clips:
        # one copy per seq (a replay repeats them), in time order
        segs = sorted({s.seq: s for s in finals.get(c.stream_id, [])}.values(),
                      key=lambda s: s.start_ns)
        said = " ".join(DIGIT_WORDS[d] for d in c.digits)
        heard = " ".join(s.text for s in segs if s.text)
        w = wer(said, heard)
        overall = overall + w
        out.append(f"  {c.stream_id}: WER {w}; said {said!r}, heard {heard!r}")
    return [f"ASR ({DEMO_ASR_ENGINE}) word error rate against the clips' speech "
            f"(digits in noise at -10 to 10 dB SNR): {overall}",
            *out]


def expected_windows(settings: Settings, clip, origin_ns: int) -> list[int]:
    """Starts of every window that overlaps the clip's span (what the worker must emit)."""
    hop, win = settings.hop_ms * 1_000_000, settings.window_ms * 1_000_000
    end = origin_ns + round(clip.seconds * NS_PER_S)
    first = (origin_ns - win) // hop + 1
    return [k * hop for k in range(first, (end - 1) // hop + 1) if k * hop + win > origin_ns]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


@dataclass
class Summary:
    windows: int
    expected: int
    scored: int
    correct: int
    duplicates: int
    latency_total: list[float]  # window end -> its final prediction published
    latency_added: list[float]
    latency_first: list[float] = field(default_factory=list)  # -> its first prediction
    provisional_scored: int = 0
    provisional_correct: int = 0
    flips: int = 0  # windows whose final label differs from their provisional one

    def lines(self) -> list[str]:
        def pct(good: int, n: int) -> str:
            return f"{good / n:.1%}" if n else "n/a"

        out = [
            f"windows predicted: {self.windows} of {self.expected} expected "
            f"({self.duplicates} duplicate copies collapsed)",
            f"accuracy: {pct(self.correct, self.scored)} on {self.scored} windows that lie "
            "within one digit (windows straddling two digits are not scored)",
        ]
        if self.provisional_scored:
            out.append(
                f"provisional predictions (before the transcript was complete): accuracy "
                f"{pct(self.provisional_correct, self.provisional_scored)} on "
                f"{self.provisional_scored} of those windows; the final label differs in "
                f"{self.flips} of them ({pct(self.flips, self.provisional_scored)})")
        def p50_p99(ms: list[float]) -> str:
            if not ms:
                return "none yet"
            return f"p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms"

        out += [
            f"latency, window end -> first prediction published: {p50_p99(self.latency_first)}",
            f"latency, window end -> final prediction published: {p50_p99(self.latency_total)}",
            "latency added after the window closed (queue + inference + publish): "
            f"{p50_p99(self.latency_added)}",
        ]
        return out


def summarize(settings: Settings, clips: list, origin_ns: int, preds: list[Prediction],
              duplicates: int) -> Summary:
    """``preds``: every revision read (provisional and final), each once."""
    from streamproc.ml.dataset import read_labels

    want = {(c.stream_id, s) for c in clips for s in expected_windows(settings, c, origin_ns)}
    finals = {p.key: p for p in preds if p.final}
    first: dict[tuple[str, int], Prediction] = {}
    for p in preds:
        if p.key not in first or p.emitted_at_ns < first[p.key].emitted_at_ns:
            first[p.key] = p
    provisional = {p.key: p for p in preds if not p.final}
    scored = correct = p_scored = p_correct = flips = 0
    for c in clips:
        spans = read_labels(c.labels)
        for s in expected_windows(settings, c, origin_ns):
            truth = spans.label_for(c.stream_id, s, s + settings.window_ms * 1_000_000,
                                    origin_ns, min_overlap=1.0)
            f = finals.get((c.stream_id, s))
            if truth is None or f is None:
                continue
            scored += 1
            correct += f.label == truth
            pr = provisional.get((c.stream_id, s))
            if pr is not None:
                p_scored += 1
                p_correct += pr.label == truth
                flips += pr.label != f.label
    return Summary(len(want & set(finals)), len(want), scored, correct, duplicates,
                   [p.latency_ms["total"] for p in finals.values() if "total" in p.latency_ms],
                   [p.latency_ms["added"] + p.latency_ms.get("publish", 0.0)
                    for p in preds if "added" in p.latency_ms],
                   [p.latency_ms["total"] for p in first.values() if "total" in p.latency_ms],
                   p_scored, p_correct, flips)


def run(settings: Settings, *, own_broker: bool, streams: int = 3, layout: Layout | None = None,
        retrain: bool = False, prepare_only: bool = False, preset: str = DEMO_PRESET,
        digits: int = DIGITS_PER_STREAM, asr: bool = False, out=sys.stdout) -> int:
    """Prepare, then (unless ``prepare_only``) run the live pipeline and summarise.

    ``own_broker``: start a local broker for the run (when no bootstrap server was given).
    ``asr``: replay the clips without their transcripts; ``streamproc asr`` makes them.
    """
    from streamproc.capture.publisher import Publisher
    from streamproc.capture.sources import ReplaySpec, replay_many
    from streamproc.dev.localkafka import LocalBroker
    from streamproc.readers import ConsumeStats, PredictionTable, consume, format_json
    from streamproc.topics import create_topics

    layout = layout or Layout(default_dir(preset, digits))
    if not prepare_only:
        # the worker serves metrics (on every interface; its web server on a free port):
        # fail now, not after the clips, the training and the broker
        check_worker_ports(settings.replace(web_port=0), "the demo")
    clips = prepare(layout, streams, retrain, preset, digits)
    if prepare_only:
        print(f"model: {layout.model}", file=out)
        for c in clips:
            print(f"{c.stream_id}: {c.video} {c.audio} {c.transcript} {c.labels}", file=out)
        return 0

    broker = None
    if own_broker:
        _say("starting a local Kafka broker (set STREAMPROC_BOOTSTRAP to use yours)")
        broker = LocalBroker(layout.logs / "broker").start()
        settings = settings.replace(bootstrap_servers=broker.bootstrap)
    if settings.topic_prefix == Settings().topic_prefix:
        # a fresh prefix per run, so an earlier demo's records never mix in
        prefix = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        settings = settings.replace(topic_prefix=prefix, app_id=prefix)
    worker = view = recogniser = None
    try:
        create_topics(settings)
        if asr:
            recogniser = AsrProcess(settings, layout.logs / "asr.log")
            _say(f"asr starting (log: {recogniser.log_path})")
            recogniser.wait_ready()
        _say(f"topics {settings.topic_prefix}.* on {settings.bootstrap_servers}")
        worker = WorkerProcess(settings, layout.model, layout.logs / "worker.log")
        _say(f"worker starting (log: {worker.log_path})")
        if settings.view_port:
            view = ViewProcess(settings, layout.logs / "view.log")
        worker.wait_ready()
        url = view.wait_url() if view is not None else None
        if url:
            token = ", with ?token= and your view token" if settings.view_token else ""
            _say(f"live view: {url} (open it in a browser{token}; it closes when the demo "
                 "ends; --no-view turns it off)")
        publisher = Publisher(settings)
        # start a second from now, on a hop boundary: each 2 s digit then holds whole
        # windows exactly as the training windows were cut
        hop = settings.hop_ms * 1_000_000
        origin = -(-(time.time_ns() + NS_PER_S) // hop) * hop
        stop = threading.Event()
        specs = [ReplaySpec(c.stream_id, c.video, c.audio, None if asr else c.transcript)
                 for c in clips]
        _say(f"replaying {len(specs)} stream(s) in real time "
             f"({clips[0].seconds:.0f} s each); predictions follow")
        replayer = threading.Thread(
            target=replay_many, args=(publisher, specs),
            kwargs={"realtime": True, "start_at_ns": origin, "stop_event": stop},
            name="replay", daemon=True)
        replayer.start()
        want = {(c.stream_id, s) for c in clips for s in expected_windows(settings, c, origin)}
        deadline = (max(c.seconds for c in clips) + 10 + settings.idle_deadline_text_ms / 1000
                    + settings.lateness_text_ms / 1000)
        stats = ConsumeStats()
        preds: list[Prediction] = []
        table = PredictionTable()
        finals: set[tuple[str, int]] = set()
        jsonl = layout.logs / "predictions.jsonl"
        interrupted = False
        try:
            with open(jsonl, "w", encoding="utf-8") as f:
                for p in consume(settings, follow=True, timeout_s=deadline, stats=stats):
                    preds.append(p)
                    for line in table.lines(p):
                        print(line, file=out, flush=True)
                    f.write(format_json(p) + "\n")
                    if p.final:
                        finals.add(p.key)
                        if want <= finals:
                            break
        except KeyboardInterrupt:
            interrupted = True  # Ctrl-C: the summary of what came, then the clean-up
        finally:
            stop.set()
            replayer.join(10)
            publisher.close()
        summary = summarize(settings, clips, origin, preds, stats.duplicates)
        print("", file=out)
        if interrupted:
            print("interrupted (Ctrl-C): the figures below cover the windows received so "
                  "far", file=out)
        for line in summary.lines():
            print(line, file=out)
        if asr:
            for line in asr_report(settings, clips):
                print(line, file=out)
        print(f"every prediction as JSON: {jsonl}", file=out)
        if interrupted:
            raise KeyboardInterrupt  # exit 130, once the processes below are stopped
        return 0 if summary.windows == summary.expected else 1
    finally:
        if worker is not None:
            worker.stop()
        if recogniser is not None:
            recogniser.stop()
        if view is not None:  # after the worker: the page gets the last finals meanwhile
            view.stop()
        if broker is not None:
            broker.stop()
            _say("local broker stopped")

