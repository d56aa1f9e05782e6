"""The ``streamproc`` command line.

Each subcommand is registered here with its arguments and runs a function that
imports its heavy modules (torch, OpenCV, faust) only when called, so
``streamproc config`` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import overload

from streamproc.config import (
    COMMAND_GROUPS,
    Settings,
    add_settings_args,
    commands_reading,
    unknown_env,
)
from streamproc.errors import UserError, quiet_client_logs

Handler = Callable[[argparse.Namespace, Settings], int | None]


def _command(sub: argparse._SubParsersAction, name: str, handler: Handler, help: str, *,
             groups: tuple[str, ...] | None) -> argparse.ArgumentParser:
    """A subcommand whose flags include the settings of ``groups``, the ones it reads
    (its row of :data:`COMMAND_GROUPS`): a flag it shows is one that acts."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    add_settings_args(p, groups)
    return p


# --- config --------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        from streamproc.config import settings_table

        print(settings_table())
        return 0
    rows = Settings.describe(args)
    if args.json:
        # typed values (a secret that is set shows as ***) and where each came from
        print(json.dumps({name: {"value": shown if shown == "***" else getattr(settings, name),
                                 "source": source} for name, shown, source in rows}, indent=2))
        return 0
    width = max(len(r[0]) for r in rows)
    vwidth = min(40, max(len(r[1]) for r in rows))
    for name, value, source in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  ({source})")
    return 0


# --- topics --------------------------------------------------------------------------


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.topics import check_topics, create_topics, describe, problems

    if args.action == "create":
        created = create_topics(settings)
        for name in settings.all_topics:
            print(f"{'created' if name in created else 'exists '}  {name}")
    # a count given (flag or environment) is one the topics must have; the default is not
    asked = next((settings.partitions for name, _, source in Settings.describe(args)
                  if name == "partitions" and source != "default"), None)
    states = describe(settings)
    found = problems(settings, states, partitions=asked)
    for s in states:
        parts = "-" if s.partitions is None else str(s.partitions)
        size = "-" if s.max_message_bytes is None else str(s.max_message_bytes)
        print(f"{s.name:<40} partitions={parts:<4} max.message.bytes={size}")
    if found:
        print("PROBLEMS:", file=sys.stderr)
        for f in found:
            print(f"  - {f}", file=sys.stderr)
        return 1
    check_topics(settings)
    print("ok: topics exist and are co-partitioned")
    return 0


# --- broker --------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    import shlex
    from pathlib import Path

    from streamproc.dev import localkafka as lk

    if args.action == "tool":
        cmd = lk.tool_command(args.tool, args.tool_args)
        os.execvp(cmd[0], cmd)  # the tool takes over: its stdin, output and exit code
    if args.action == "fetch":  # no --dir: the jars are shared by every broker directory
        print(f"Kafka {lk.KAFKA_VERSION} jars and tools in {lk.fetch_jars(quiet=False)}")
        return 0
    data_dir = Path(args.dir).expanduser().absolute() if args.dir else lk.default_broker_dir()
    # the commands to repeat for this broker: --dir only when it is not the default
    again = f" --dir {shlex.quote(str(data_dir))}" if args.dir else ""
    if args.action == "stop":
        stopped = lk.stop_daemon(data_dir)
        print("stopped" if stopped else f"no broker running from {data_dir} (one started "
              "with --dir is stopped with the same --dir)")
        return 0
    pid = lk.running_pid(data_dir)
    if args.action == "status":
        if pid is None:
            print(f"not running ({data_dir})")
            return 1
        print(f"running, pid {pid}, bootstrap {_daemon_bootstrap(data_dir)}, "
              f"log {data_dir / 'logs' / 'server.log'}")
        return 0
    # start
    if pid is not None:
        bootstrap = _daemon_bootstrap(data_dir)
        if args.port and not bootstrap.endswith(f":{args.port}"):  # 0: any port
            raise UserError(f"a broker from {data_dir} is already running (pid {pid}) on "
                            f"{bootstrap}, not port {args.port}: stop it first, or use "
                            "another --dir")
        print(f"already running, pid {pid}, bootstrap {bootstrap}")
        return 0
    broker = lk.LocalBroker(data_dir, port=9092 if args.port is None else args.port,
                            daemon=True)
    broker.start()
    assert broker.proc is not None  # start() launched it, or raised
    print(f"Kafka {lk.KAFKA_VERSION} running, pid {broker.proc.pid}: "
          f"export STREAMPROC_BOOTSTRAP={broker.bootstrap}")
    print(f"log: {broker.log_file}; stop with `streamproc broker stop{again}`")
    return 0


def _daemon_bootstrap(data_dir) -> str:
    props = (data_dir / "server.properties").read_text().splitlines()
    for line in props:
        if line.startswith("advertised.listeners="):
            return line.split("//", 1)[1]
    return "?"


# --- consume -------------------------------------------------------------------------


def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.readers import (
        ConsumeStats,
        PredictionTable,
        check_predictions_topic,
        consume,
        format_json,
    )

    # a wrong address or login, or no topic, fails here, as one line, before any table
    check_predictions_topic(settings)
    stats = ConsumeStats()
    table = PredictionTable(args.stream, revisions=args.revisions)
    if not args.json:
        print(table.header())

    def terminated(signum: int, _frame: object) -> None:
        sys.exit(128 + signum)  # 143, as for a plain SIGTERM, but after the summary below

    # SIGTERM (kill, a service manager) ends it as Ctrl-C does: with the summary
    old_handler = signal.signal(signal.SIGTERM, terminated)
    try:
        for p in consume(settings, stream=args.stream, follow=args.follow,
                         from_beginning=not args.from_end, timeout_s=args.timeout, stats=stats,
                         finals_only=args.finals):
            lines = [format_json(p)] if args.json else table.lines(p)
            if lines:
                print("\n".join(lines), flush=True)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        print(stats.summary(), file=sys.stderr)
    return 0


# --- view ----------------------------------------------------------------------------


def cmd_view(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from streamproc import kafka
    from streamproc.view.server import run_view

    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    if settings.view_port == 0:
        raise UserError("view_port is 0: give the view a port (--view-port)")
    # a wrong address or login fails here, as one line, before anything is served
    kafka.consumer(settings).close()
    return run_view(settings)


# --- worker --------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.worker.app import run_worker

    return run_worker(settings)


def cmd_asr(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.asr.worker import run_asr

    return run_asr(settings)


# --- produce -------------------------------------------------------------------------


def _produce_logging(settings: Settings) -> None:
    import logging

    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@overload
def _device(text: str) -> int | str: ...
@overload
def _device(text: None) -> None: ...
def _device(text: str | None) -> int | str | None:
    """A device index when it is all digits, else a name or URL."""
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def cmd_produce_camera(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.capture.publisher import PublishSession
    from streamproc.capture.sources import CameraSource, parse_size

    _produce_logging(settings)
    size = parse_size(args.size) if args.size else None
    with PublishSession(settings) as session:
        cam = CameraSource(session.publisher, args.stream_id, _device(args.source_device),
                           fps=args.fps, size=size, jpeg_quality=args.jpeg_quality,
                           queue_size=args.queue)
        cam.open()
        session.show_status(lambda: cam.stats.dropped)
        st = cam.run(session.stop)
    print(f"{args.stream_id}: {st.captured} frames captured, {st.published} published, "
          f"{st.dropped} dropped (publishing fell behind), {st.skipped} skipped by --fps, "
          f"{st.reconnects} reconnects")
    return session.report()


def cmd_produce_mic(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.capture.publisher import PublishSession
    from streamproc.capture.sources import MicSource, check_input_device

    _produce_logging(settings)
    device = _device(args.source_device)
    check_input_device(device, args.rate, args.channels, args.sample_format)
    with PublishSession(settings) as session:
        mic = MicSource(session.publisher, args.stream_id, device, rate=args.rate,
                        channels=args.channels, chunk_ms=args.chunk_ms, fmt=args.sample_format)
        session.show_status(lambda: mic.stats.drops)
        st = mic.run(session.stop)
    print(f"{args.stream_id}: {st.published} audio chunks published, {st.overflows} input "
          f"overflows, {st.queue_drops} chunks dropped (publishing fell behind), "
          f"{st.resyncs} re-anchored")
    return session.report()


def cmd_produce_file(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.capture.publisher import PublishSession
    from streamproc.capture.sources import FileSource, parse_size, replay_source

    _produce_logging(settings)
    src = FileSource(args.stream_id, args.video, args.audio, args.transcript,
                     chunk_ms=args.chunk_ms, jpeg_quality=args.jpeg_quality,
                     size=parse_size(args.size) if args.size else None, loop=args.loop,
                     container_audio=not args.no_audio)
    start = None if args.start_at is None else round(args.start_at * 1e9)
    with PublishSession(settings) as session:
        _check_start_at(args, start, session.publisher.max_ahead_ms)
        session.show_status()
        stats = replay_source(session.publisher, src, realtime=not args.fast,
                              start_at_ns=start, stop_event=session.stop,
                              max_ahead_ms=session.publisher.max_ahead_ms)
    print(stats.summary())
    return session.report()


def _check_start_at(args: argparse.Namespace, start_ns: int | None,
                    max_ahead_ms: int | None) -> None:
    """Refuse a --fast replay whose first record the broker would already refuse: its
    event time further ahead of now than the topics' message.timestamp.after.max.ms
    (without --fast, records wait for their event time and are never ahead)."""
    import time

    if not args.fast or start_ns is None or max_ahead_ms is None:
        return
    ahead_ms = (start_ns - time.time_ns()) // 1_000_000
    if ahead_ms > max_ahead_ms:
        raise UserError(f"--start-at is {ahead_ms / 3_600_000:.1f} h ahead of now and the "
                        f"broker refuses records more than {max_ahead_ms / 3_600_000:g} h "
                        f"ahead (message.timestamp.after.max.ms={max_ahead_ms}): with --fast "
                        "every record would be refused; give an earlier --start-at, or drop "
                        "--fast to send each record when its time comes")


def cmd_produce_transcript(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.capture.publisher import PublishSession
    from streamproc.capture.sources import StreamWriter, publish_transcript_lines, stdin_lines

    _produce_logging(settings)
    with PublishSession(settings) as session:
        writer = StreamWriter(session.publisher, args.stream_id)
        # bytes, decoded line by line: a line that is not UTF-8 is skipped, not fatal
        stdin = getattr(sys.stdin, "buffer", sys.stdin)
        stats = publish_transcript_lines(writer, stdin_lines(stdin, session.stop),
                                         jsonl=args.jsonl,
                                         max_span_ns=round(args.max_span_s * 1e9))
    print(f"{args.stream_id}: {stats.segments} transcript segments ({stats.partial} partial), "
          f"{len(stats.issues)} line(s) skipped")
    return session.report()


def _in_range(kind: type[int] | type[float], lo: float, hi: float | None = None,
              lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` in [lo, hi] ((lo, hi] with ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if (x <= lo if lo_open else x < lo) or (hi is not None and x > hi):
            what = f"{'above' if lo_open else 'at least'} {lo:g}" + (
                f" and at most {hi:g}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {what}: {text}")
        return x

    parse.__name__ = kind.__name__  # what argparse names in "invalid ... value"
    return parse


def _produce_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "produce", help="Publish a camera, a microphone, media files or transcripts.",
        description="Publish media into the streamproc input topics (wire format v1), keyed "
                    "by stream id. Ctrl-C or SIGTERM stops capture and flushes what was "
                    "captured; a status line shows rates on a terminal.")
    psub = group.add_subparsers(dest="source", metavar="SOURCE", required=True)

    def source(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = _command(psub, name, handler, help, groups=COMMAND_GROUPS["produce"])
        p.add_argument("--stream-id", required=True, help="stream id: the Kafka key")
        return p

    p = source("camera", cmd_produce_camera, "Capture an OpenCV camera or URL (RTSP, HTTP, "
               "file) as JPEG frames; drops the oldest frames rather than stall the camera. "
               "A local file or file:// URL plays at its own pace, stamped with its frame "
               "timestamps (`produce file` also sends its audio and a transcript).")
    p.add_argument("--device", dest="source_device", default="0",
                   help="camera index or URL [default 0]")
    p.add_argument("--fps", type=float, default=None,
                   help="keep at most this many frames/s (by dropping) [default: all]")
    p.add_argument("--size", default=None, help="resize frames to WxH, e.g. 640x480")
    p.add_argument("--jpeg-quality", type=_in_range(int, 1, 100), default=90,
                   help="JPEG quality 1-100 [90]")
    p.add_argument("--queue", type=_in_range(int, 1), default=8,
                   help="frames buffered between capture and Kafka before dropping [8]")

    p = source("mic", cmd_produce_mic, "Capture a microphone (PortAudio via sounddevice) "
               "as PCM chunks.")
    p.add_argument("--device", dest="source_device", default=None,
                   help="input device name or index [default: system default]")
    p.add_argument("--rate", type=_in_range(int, 8000, 192_000), default=16000,
                   help="sample rate in Hz, 8000-192000 (what the wire format carries) "
                   "[16000]")
    p.add_argument("--channels", type=_in_range(int, 1, 32), default=1,
                   help="channels, 1-32 [1]")
    p.add_argument("--chunk-ms", type=_in_range(int, 1, 10_000), default=100,
                   help="chunk length in ms, 1-10000 [100]")
    p.add_argument("--sample-format", choices=["s16le", "f32le"], default="s16le",
                   help="PCM sample format [s16le]")

    p = source("file", cmd_produce_file, "Replay media files as one stream: a video (with "
               "its own audio track), audio, an SRT/WebVTT/JSONL transcript, any of them as "
               "long as one is given; all modalities share one clock origin. Frames keep "
               "the container's timestamps (variable frame rate included).")
    p.add_argument("video", nargs="?", default=None,
                   help="video file FFmpeg reads (mp4, mkv, avi, webm, ...); its audio track "
                        "is sent too unless --audio or --no-audio is given [optional]")
    p.add_argument("--audio", default=None,
                   help="audio file instead of the video's own track: WAV (PCM 8/16/24/32-bit, "
                        "float, WAVE_FORMAT_EXTENSIBLE) or any file with an audio track")
    p.add_argument("--no-audio", action="store_true",
                   help="do not send the video's own audio track")
    p.add_argument("--transcript", default=None, help="SRT, WebVTT or JSONL file")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", default=True,
                      help="pace records by event time (default)")
    pace.add_argument("--fast", action="store_true", help="send as fast as the broker takes it")
    p.add_argument("--loop", action="store_true", help="repeat until stopped")
    p.add_argument("--start-at", type=float, default=None, metavar="EPOCH",
                   help="event time of the first frame, in seconds since the epoch; in "
                        "the future, records wait for their time, and with --fast one "
                        "further ahead than the broker accepts (its topics' "
                        "message.timestamp.after.max.ms, 1 h by default) is refused "
                        "[default: now]")
    p.add_argument("--size", default=None, help="resize frames to WxH")
    p.add_argument("--jpeg-quality", type=_in_range(int, 1, 100), default=90,
                   help="JPEG quality 1-100 [90]")
    p.add_argument("--chunk-ms", type=_in_range(int, 1, 10_000), default=100,
                   help="audio chunk length in ms, 1-10000 [100]")

    p = source("transcript", cmd_produce_transcript, "Publish transcript lines from stdin: "
               "plain lines stamped on arrival, or JSONL segments (--jsonl). Input is UTF-8; "
               "a line that is not (or not valid JSONL) is logged with its number and "
               "skipped.")
    p.add_argument("--jsonl", action="store_true",
                   help='stdin holds JSON objects {"text", "start_ns", "end_ns", "final", ...}')
    p.add_argument("--max-span-s", type=float, default=5.0,
                   help="a plain line spans from the previous line's arrival, at most this "
                        "many seconds [5]")


# --- models: avdigits, train, eval, record --------------------------------------------


def cmd_avdigits_dataset(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses
    from pathlib import Path

    from streamproc.ml import avdigits as av
    from streamproc.ml.dataset import Dataset

    cfg = dataclasses.replace(
        av.PRESETS[args.preset], seed=args.seed, window_ms=settings.window_ms,
        hop_ms=settings.hop_ms, frames_per_window=settings.frames_per_window,
        sample_rate=settings.sample_rate)
    path = av.generate(args.out, cfg, Path(args.cache) if args.cache else None,
                       progress=sys.stderr.isatty(), overwrite=args.overwrite)
    ds = Dataset(path)
    print(f"AV-Digits {cfg.name} (seed {cfg.seed}): {len(ds)} windows "
          + ", ".join(f"{k} {v}" for k, v in ds.splits.items()) + f" -> {path}")
    return 0


def cmd_avdigits_clip(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses
    from pathlib import Path

    from streamproc.ml import avdigits as av

    if not args.digits or any(c not in "0123456789" for c in args.digits):
        raise UserError(f"--digits takes the digits 0-9 to show and say, in order "
                        f"(e.g. 0123456789), got {args.digits!r}")
    digits = [int(c) for c in args.digits]
    cfg = dataclasses.replace(av.PRESETS["full"], segment_s=args.seconds_per_digit,
                              sample_rate=settings.sample_rate)
    clip = av.write_clip(args.out, digits, stream_id=args.stream_id, cfg=cfg, seed=args.seed,
                         split=args.split, cache_dir=Path(args.cache) if args.cache else None)
    print(f"{clip.stream_id}: {len(clip.digits)} digits, {clip.seconds:g}s")
    for p in (clip.video, clip.audio, clip.transcript, clip.labels):
        print(f"  {p}")
    print(f"replay: streamproc produce file --stream-id {clip.stream_id} {clip.video} "
          f"--audio {clip.audio} --transcript {clip.transcript}")
    return 0


def _train_config(args: argparse.Namespace, settings: Settings):
    from streamproc.ml.train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
                       patience=args.patience, modality_dropout=args.modality_dropout,
                       seed=args.seed, device=settings.device, threads=args.threads,
                       progress=sys.stderr.isatty())


def _splits(args: argparse.Namespace):
    from streamproc.ml.splits import BlockSplit
    from streamproc.ml.train import SplitConfig

    blocks = BlockSplit(block_s=args.block_s, val=args.val, test=args.test,
                        seed=args.split_seed)
    blocks.check()
    return SplitConfig(args.split_by, blocks)


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise UserError(f"--option takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.ml.train import train_command

    options = _options(args.option)
    for key in ("text_encoder", "video_encoder", "audio_encoder"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    for key in ("name", "version"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    report = train_command(args.dataset, args.arch, args.out, _train_config(args, settings),
                           options, splits=_splits(args))
    test = report.get("test")
    if test:
        print(f"{args.arch}: test accuracy {test['accuracy']:.3f}, macro-F1 "
              f"{test['macro_f1']:.3f} -> {report['checkpoint']}")
    else:
        print(f"{args.arch}: trained (no test split) -> {report['checkpoint']}")
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.ml.train import benchmark, eval_checkpoints, torch_threads

    if args.models:
        with torch_threads(args.threads):
            rows = eval_checkpoints(args.dataset, args.models, settings.device,
                                    log=lambda _m: None, splits=_splits(args))
        keys = [k for k in rows[0] if k not in ("model", "name", "split", "windows")]
        print("| model | split | windows | " + " | ".join(keys) + " |")
        print("|---|---|---:|" + "---:|" * len(keys))
        for r in rows:
            print(f"| {r['model']} | {r['split']} | {r['windows']} | "
                  + " | ".join(f"{100 * r[k]:.1f}" for k in keys) + " |")
        return 0
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    if len(seeds) < 1:
        raise UserError("--seeds needs at least one seed")
    results = benchmark(args.dataset, args.out, methods=methods, seeds=seeds,
                        cfg=_train_config(args, settings), ensemble_size=args.ensemble,
                        text_encoder=args.text_encoder or "gru",
                        video_encoder=args.video_encoder or "cnn",
                        audio_encoder=args.audio_encoder or "cnn", splits=_splits(args))
    print(results["markdown"])
    return 0


def cmd_record(args: argparse.Namespace, settings: Settings) -> int:
    import threading

    from streamproc.capture.publisher import stop_on_signals
    from streamproc.ml.recording import parse_origin, record

    stop = threading.Event()
    with stop_on_signals(stop):
        stats = record(settings, args.labels, args.out, origin=parse_origin(args.origin),
                       min_overlap=args.min_overlap, split=args.split,
                       idle_exit_s=args.idle_exit, max_windows=args.max_windows, stop=stop,
                       overwrite=args.overwrite, append=args.append,
                       add_labels=args.add_labels, to_end=args.to_end)
    return 0 if stats.labelled or stats.already else 1


def _model_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("avdigits", help="Generate the AV-Digits benchmark: a dataset, or "
                           "a replayable clip (video + WAV + SRT + labels).",
                           description="AV-Digits: handwritten digits (scikit-learn), spoken "
                           "by flite/espeak-ng voices in noise, with ASR-like transcripts; "
                           "deterministic for a seed.")
    asub = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    def generator_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0, help="generator seed [0]")
        p.add_argument("--cache", default="", help="speech cache directory "
                       "[~/.cache/streamproc/avdigits-tts]")

    p = _command(asub, "dataset", cmd_avdigits_dataset, "Write the AV-Digits dataset "
                 "(train/val/test; test holds out voices, noise seeds, digit images).",
                 groups=COMMAND_GROUPS["avdigits dataset"])
    p.add_argument("out", help="dataset directory to write")
    p.add_argument("--preset", choices=["tiny", "small", "full"], default="small",
                   help="size: tiny (CI), small, full (the docs/models.md benchmark) [small]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    generator_flags(p)

    p = _command(asub, "clip", cmd_avdigits_clip, "Write one stream's clip of spoken, "
                 "shown and transcribed digits for `streamproc produce file`.",
                 groups=COMMAND_GROUPS["avdigits clip"])
    p.add_argument("out", help="directory for STREAM.avi, STREAM.wav, STREAM.srt, "
                   "STREAM.labels.csv")
    p.add_argument("--digits", default="0123456789",
                   help="digits in order, nothing else [0123456789]")
    p.add_argument("--stream-id", default="cam1", help="stream id [cam1]")
    p.add_argument("--seconds-per-digit", type=float, default=2.0, help="[2.0]")
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="whose voices and noise seeds to use [test: held out]")
    generator_flags(p)

    def training_flags(p: argparse.ArgumentParser, epochs: int, patience: int) -> None:
        p.add_argument("--epochs", type=int, default=epochs, help=f"at most [{epochs}]")
        p.add_argument("--patience", type=int, default=patience,
                       help=f"early stop after this many epochs without a better validation "
                            f"accuracy [{patience}]")
        p.add_argument("--batch-size", dest="train_batch_size", type=int, default=64,
                       help="training batch size [64]")
        p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate [0.003]")
        p.add_argument("--modality-dropout", type=float, default=0.3,
                       help="probability of masking each modality of a training window [0.3]")
        p.add_argument("--text-encoder", choices=["gru", "transformer", "minilm"],
                       default=None, help="text encoder [gru]; minilm needs the extra")
        p.add_argument("--video-encoder",
                       choices=["cnn", "efficientnet-lite0", "haar-face"], default=None,
                       help="video encoder [cnn]; efficientnet-lite0: pretrained on ImageNet, "
                            "frozen (only its projection trains); haar-face: OpenCV's "
                            "pretrained face detector (whether a face is on screen, its size)")
        p.add_argument("--audio-encoder", choices=["cnn", "silero-vad"], default=None,
                       help="audio encoder [cnn]; silero-vad: the pretrained Silero VAD "
                            "network, frozen (only its projection trains)")
        p.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (0: torch's default) [1]")
        p.add_argument("--split-by", choices=["auto", "stored", "blocks"], default="auto",
                       help="stored: the split each window was recorded with; blocks: whole "
                            "blocks of --block-s seconds per stream, so neighbouring windows "
                            "never straddle train and val/test; auto: stored when the dataset "
                            "has more than one split, else blocks [auto]")
        p.add_argument("--block-s", type=float, default=10.0,
                       help="time block length in seconds for --split-by blocks [10]")
        p.add_argument("--val", type=float, default=0.15,
                       help="share of blocks for validation (early stopping) [0.15]")
        p.add_argument("--test", type=float, default=0.15,
                       help="share of blocks for the test report [0.15]")
        p.add_argument("--split-seed", type=int, default=0,
                       help="which blocks go where (the same seed, the same splits) [0]")

    names = "early, late, lmf, tfn, attention (fusion); video, audio, text (single)"
    p = _command(sub, "train", cmd_train, "Train a model on a dataset directory and save a "
                 "checkpoint (safetensors + JSON).", groups=COMMAND_GROUPS["train"])
    p.add_argument("dataset", help="dataset directory (streamproc record / avdigits dataset)")
    p.add_argument("--model", dest="arch", default="late", help=f"architecture: {names} [late]")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, e.g. rank=4 or dim=32 (repeatable)")
    p.add_argument("--name", default="", help="model name carried in predictions")
    p.add_argument("--version", default="", help="model version carried in predictions [1]")
    training_flags(p, 20, 6)

    p = _command(sub, "eval", cmd_eval, "Benchmark every fusion method and single modality "
                 "over seeds (Markdown table + PNG), or evaluate given models.",
                 groups=COMMAND_GROUPS["eval"])
    p.add_argument("dataset", help="dataset directory with train/val/test splits")
    p.add_argument("--out", default="runs/eval", help="results directory [runs/eval]")
    p.add_argument("--methods", default="", help=f"comma separated subset of: {names} [all]")
    p.add_argument("--seeds", default="0,1,2", help="comma separated seeds [0,1,2]")
    p.add_argument("--ensemble", type=int, default=3,
                   help="members of the same-modality ensemble control (0: none) [3]")
    p.add_argument("--model", dest="models", action="append", default=[], metavar="SPEC",
                   help="evaluate this checkpoint or package.module:factory instead "
                        "(repeatable)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    training_flags(p, 15, 6)

    p = _command(sub, "record", cmd_record, "Record labelled windows from the input topics "
                 "into a dataset directory (labels from a CSV of stream time spans).",
                 groups=COMMAND_GROUPS["record"])
    p.add_argument("--labels", required=True, help="CSV: stream_id,start,end,label; times in "
                   "seconds from the origin, or ISO-8601 with a zone (2026-11-30T09:15:00Z)")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--origin", default="first", help="time 0 of the labels: 'first' (each "
                   "stream's earliest event) or seconds since the epoch [first]")
    p.add_argument("--min-overlap", type=float, default=0.75,
                   help="share of a window a label span must cover [0.75]")
    p.add_argument("--split", default="train", help="split name for these windows [train]")
    p.add_argument("--idle-exit", type=float, default=10.0,
                   help="finish after this many seconds without new records [10]")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many")
    p.add_argument("--to-end", action="store_true",
                   help="stop at the end the topics had when recording started (other "
                        "streams may go on publishing)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true",
                      help="add to the dataset in --out (same window settings; windows it "
                           "already holds are skipped)")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--add-labels", action="store_true",
                   help="with --append: labels the dataset does not have yet become new "
                        "classes (refused otherwise)")


# --- demo ----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from streamproc.dev.demo import Layout, run

    own_broker = args.bootstrap_servers is None and not os.environ.get("STREAMPROC_BOOTSTRAP")
    layout = Layout(Path(args.dir)) if args.dir else None  # None: the preset's own
    if args.no_view:
        settings = settings.replace(view_port=0)
    return run(settings, own_broker=own_broker, streams=args.streams, layout=layout,
               retrain=args.retrain, prepare_only=args.prepare_only, preset=args.preset,
               digits=args.digits, asr=args.asr)


# --- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamproc",
        description="Streaming multimodal event processor: video, audio and transcripts "
                    "from Kafka, aligned by event time, fused, predicted.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(sub, "config", cmd_config, "Print the effective settings and where each "
                 "value came from (default, environment, flag).",
                 groups=COMMAND_GROUPS["config"])
    p.add_argument("--json", action="store_true",
                   help='print JSON instead of a table: {"NAME": {"value", "source"}}')
    p.add_argument("--markdown", action="store_true",
                   help="print every setting with its flag, variable and default (Markdown)")

    p = _command(sub, "topics", cmd_topics, "Create or check the streamproc topics.",
                 groups=COMMAND_GROUPS["topics"])
    p.add_argument("action", choices=["create", "check"],
                   help="create: make missing topics, then check; check: report problems "
                   "(exit 1), among them topics whose partition count is not the one "
                   "--partitions (or STREAMPROC_PARTITIONS) gives; without it any count "
                   "will do as long as the topics share it")

    p = _command(sub, "broker", cmd_broker, "Run a local single-node Kafka (KRaft) for "
                 "development: fetch, start, stop, status; `tool NAME ARGS...` runs one of "
                 "Kafka's own tools with the same jars.", groups=COMMAND_GROUPS["broker"])
    bsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help in (("start", "start a broker in the background"),
                         ("stop", "stop the broker started from --dir"),
                         ("status", "is the broker of --dir running, and where"),
                         ("fetch", "only fetch the Kafka jars and tools (Maven, cached in "
                                   "~/.cache/streamproc, shared by every --dir)")):
        b = bsub.add_parser(action, help=help, description=help)
        if action != "fetch":  # the jars' cache is not a broker's directory
            b.add_argument("--dir", default="", help="broker data/log directory "
                           "[default ~/.cache/streamproc/broker]")
        if action == "start":
            b.add_argument("--port", type=int, default=None,
                           help="listener port [default 9092]")
    from streamproc.dev.localkafka import TOOLS

    b = bsub.add_parser("tool", help="run one of Kafka's own tools (kafka-NAME.sh)",
                        description="Run Kafka's own command-line tool NAME (the kafka-NAME.sh "
                        "of a Kafka download, same arguments) on the cached jars, e.g. "
                        "`streamproc broker tool console-consumer --bootstrap-server "
                        "127.0.0.1:9092 --topic streamproc.video --from-beginning --property "
                        "print.headers=true`.")
    b.add_argument("tool", metavar="NAME", help="one of: " + ", ".join(TOOLS))
    b.add_argument("tool_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the tool's own arguments")

    p = _command(sub, "consume", cmd_consume, "Print predictions: a live table, or JSON "
                 "lines; a window's provisional prediction, then its final one as an update "
                 "row; copies from worker restarts are collapsed.",
                 groups=COMMAND_GROUPS["consume"])
    p.add_argument("--stream", default=None, help="only this stream id")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep waiting for new ones; Ctrl-C (exit 130) or SIGTERM (exit 143) "
                   "stops, and the summary is printed on stderr")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--from-end", action="store_true", help="skip what is already there")
    p.add_argument("--timeout", type=_in_range(float, 0, lo_open=True), default=None,
                   help="stop after this many seconds (above 0)")
    p.add_argument("--finals", action="store_true",
                   help="only final predictions: skip provisional ones")
    p.add_argument("--revisions", action="store_true",
                   help="table: a full row for every revision, also a final that keeps its "
                   "provisional's label (shown as a short 'confirms P' line without it); "
                   "--json always prints every revision")

    p = _command(sub, "view", cmd_view, "Serve a live web view: a tile per stream (newest "
                 "frame, label, modalities, words, latency), timelines, dead letters and the "
                 "workers' health. Reads the topics with its own group-less consumer; never "
                 "writes to Kafka.", groups=COMMAND_GROUPS["view"])
    # short spellings of --view-host / --view-port (same settings, same environment)
    p.add_argument("--host", dest="view_host", default=None, metavar="ADDRESS",
                   help="same as --view-host [127.0.0.1; 0.0.0.0 serves every interface, "
                        "with a warning]")
    p.add_argument("--port", dest="view_port", default=None, metavar="INT",
                   help="same as --view-port [8088]")

    _command(sub, "worker", cmd_worker, "Run a faust worker: align the input topics into "
             "windows and publish them; refuses to start unless the topics are co-partitioned. "
             "Stop with Ctrl-C or SIGTERM.", groups=COMMAND_GROUPS["worker"])

    _command(sub, "asr", cmd_asr, "Run a speech recognition worker: transcribe "
             "PREFIX.audio offline (pocketsphinx by default) into transcript segments on "
             "PREFIX.text, in consumer group APPID-asr. Stop with Ctrl-C or SIGTERM.",
             groups=COMMAND_GROUPS["asr"])

    _produce_parsers(sub)
    _model_parsers(sub)

    p = _command(sub, "demo", cmd_demo, "The whole pipeline on this machine: local broker, "
                 "sample clips, reference model, worker, real-time replay, live predictions "
                 "and a summary. A --metrics-port already in use is refused before anything "
                 "is prepared.", groups=COMMAND_GROUPS["demo"])
    p.add_argument("--streams", type=int, default=3, help="how many camera streams [3]")
    p.add_argument("--dir", default="", help="where clips, model and logs go "
                   "[~/.cache/streamproc/demo; another --preset or --digits: "
                   "~/.cache/streamproc/demo-PRESET-DIGITSd]")
    p.add_argument("--prepare-only", action="store_true",
                   help="only make the clips and the reference model (compose uses this)")
    p.add_argument("--retrain", action="store_true", help="train the reference model again")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "full"],
                   help="AV-Digits size the reference model is trained on [small]")
    p.add_argument("--digits", type=int, default=10,
                   help="digits per stream clip, 2 s each [10]")
    p.add_argument("--no-view", action="store_true",
                   help="serve no web view (same as --view-port 0)")
    p.add_argument("--asr", action="store_true",
                   help="replay the clips without their transcripts: `streamproc asr` "
                   "transcribes their audio, and the demo reports its word error rate")

    return parser


def unrecognized(extra: list[str], command: str) -> str:
    """argparse's message for flags the command does not take, and, for a setting's flag,
    which commands read it (each command offers only the settings it reads)."""
    msg = f"unrecognized arguments: {' '.join(extra)}"
    for arg in extra:
        readers = commands_reading(arg) if arg.startswith("--") else []
        if readers:
            flag = arg.split("=", 1)[0]
            msg += (f"\n  {flag} is a setting that `streamproc {command}` does not read; "
                    f"these commands do: {', '.join(readers)}")
    return msg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(unrecognized(extra, args.command))
    try:
        settings = Settings.load(args)
        for line in unknown_env(os.environ):
            print(f"streamproc: warning: {line}", file=sys.stderr)
        quiet_client_logs(settings.log_level)
        return int(args.handler(args, settings) or 0)
    except UserError as e:
        print(f"streamproc {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
