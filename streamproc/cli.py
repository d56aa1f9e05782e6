"""The ``streamproc`` command line.

Each subcommand is registered here with its arguments and runs a function that
imports its heavy modules (torch, OpenCV, faust) only when called, so
``streamproc config`` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from streamproc.config import Settings, add_settings_args
from streamproc.errors import UserError

Handler = Callable[[argparse.Namespace, Settings], int | None]


def _command(sub: argparse._SubParsersAction, name: str, handler: Handler, help: str,
             settings: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    if settings:
        add_settings_args(p)
    return p


# --- config --------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    rows = Settings.describe(args)
    if args.json:
        print(json.dumps({name: value for name, value, _ in rows}, indent=2))
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
    states = describe(settings)
    found = problems(settings, states)
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
    from pathlib import Path

    from streamproc import localkafka as lk

    data_dir = Path(args.dir) if args.dir else lk.default_broker_dir()
    if args.action == "fetch":
        print(f"Kafka {lk.KAFKA_VERSION} jars in {lk.fetch_jars(quiet=False)}")
        return 0
    if args.action == "stop":
        stopped = lk.stop_daemon(data_dir)
        print("stopped" if stopped else f"no broker running from {data_dir}")
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
        print(f"already running, pid {pid}, bootstrap {_daemon_bootstrap(data_dir)}")
        return 0
    broker = lk.LocalBroker(data_dir, port=args.port)
    broker.start()
    print(f"Kafka {lk.KAFKA_VERSION} running, pid {broker.proc.pid}: "
          f"export STREAMPROC_BOOTSTRAP={broker.bootstrap}")
    print(f"log: {broker.log_file}; stop with `streamproc broker stop`")
    return 0


def _daemon_bootstrap(data_dir) -> str:
    props = (data_dir / "server.properties").read_text().splitlines()
    for line in props:
        if line.startswith("advertised.listeners="):
            return line.split("//", 1)[1]
    return "?"


# --- consume -------------------------------------------------------------------------


def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    from streamproc.consume import TABLE_HEADER, ConsumeStats, consume, format_json, format_row

    stats = ConsumeStats()
    if not args.json:
        print(TABLE_HEADER)
    try:
        for p in consume(settings, stream=args.stream, follow=args.follow,
                         from_beginning=not args.from_end, timeout_s=args.timeout, stats=stats):
            print(format_json(p) if args.json else format_row(p), flush=True)
    finally:
        print(f"{stats.yielded} predictions, {stats.duplicates} duplicates collapsed "
              f"({stats.conflicting} with another label), {stats.undecodable} undecodable",
              file=sys.stderr)
    return 0


# --- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamproc",
        description="Streaming multimodal event processor: video, audio and transcripts "
                    "from Kafka, aligned by event time, fused, predicted.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(sub, "config", cmd_config, "Print the effective settings and where each "
                 "value came from (default, environment, flag).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _command(sub, "topics", cmd_topics, "Create or check the streamproc topics.")
    p.add_argument("action", choices=["create", "check"],
                   help="create: make missing topics, then check; check: report problems")

    p = _command(sub, "broker", cmd_broker, "Run a local single-node Kafka (KRaft) for "
                 "development: fetch, start, stop, status.", settings=False)
    p.add_argument("action", choices=["start", "stop", "status", "fetch"])
    p.add_argument("--dir", default="", help="broker data/log directory "
                   "[default ~/.cache/streamproc/broker]")
    p.add_argument("--port", type=int, default=9092, help="listener port [default 9092]")

    p = _command(sub, "consume", cmd_consume, "Print predictions: a live table, or JSON "
                 "lines; duplicates from worker restarts are collapsed by prediction key.")
    p.add_argument("--stream", default=None, help="only this stream id")
    p.add_argument("--follow", "-f", action="store_true", help="keep waiting for new ones")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--from-end", action="store_true", help="skip what is already there")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(args)
        return int(args.handler(args, settings) or 0)
    except UserError as e:
        print(f"streamproc {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
