"""Each command offers, as flags, exactly the settings it reads (COMMAND_GROUPS), and the
code each command runs reads no setting its --help does not show."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import re
from functools import cache
from pathlib import Path

import pytest

from streamproc.cli import build_parser, main
from streamproc.config import (
    COMMAND_GROUPS,
    SETTING_GROUPS,
    Settings,
    commands_table,
    flag_name,
    settings_argv,
    settings_named,
)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

# How each row of COMMAND_GROUPS is run: argv prefixes that parse without a setting flag.
ARGV: dict[str, list[list[str]]] = {
    "config": [["config"]],
    "broker": [["broker", "start"], ["broker", "status"]],
    "topics": [["topics", "check"]],
    "produce": [["produce", s, "--stream-id", "x"] for s in ("camera", "mic", "file",
                                                             "transcript")],
    "consume": [["consume"]],
    "view": [["view"]],
    "worker": [["worker"]],
    "asr": [["asr"]],
    "record": [["record", "--labels", "l.csv", "--out", "o"]],
    "avdigits dataset": [["avdigits", "dataset", "o"]],
    "avdigits clip": [["avdigits", "clip", "o"]],
    "train": [["train", "ds", "--out", "o"]],
    "eval": [["eval", "ds"]],
    "demo": [["demo"]],
}


def _value(name: str) -> str:
    """A value the flag of ``name`` takes (as argparse stores it)."""
    f = FIELDS[name]
    if f.metadata["choices"]:
        return f.metadata["choices"][-1]
    return "x" if isinstance(f.default, str) else "7"


def _takes(parser, argv: list[str], name: str) -> bool:
    """Whether ``argv`` plus the flag of setting ``name`` parses into that setting: False
    when argparse refuses the flag, or it is the command's own option of the same spelling
    (``produce camera --device`` is a camera, ``train --model`` an architecture)."""
    value = _value(name)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args([*argv, flag_name(FIELDS[name]), value])
    except SystemExit:
        return False
    return getattr(args, name, None) == value


def _commands(parser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser (the ones that run a handler)."""
    found = [path] if parser.get_default("handler") is not None else []
    if parser.get_default("handler") is None or not path:
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


def test_every_command_has_a_row_and_is_exercised() -> None:
    paths = _commands(build_parser())
    assert ("worker",) in paths and ("produce", "camera") in paths
    for path in paths:
        assert any(tuple(argv[:len(path)]) == path for rows in ARGV.values()
                   for argv in rows), f"{' '.join(path)}: add it to ARGV and COMMAND_GROUPS"
    assert set(ARGV) == set(COMMAND_GROUPS)


@pytest.mark.parametrize("command", sorted(COMMAND_GROUPS))
def test_a_command_takes_the_flags_of_the_settings_it_reads_and_refuses_the_others(
        command: str) -> None:
    parser = build_parser()
    shown = set(settings_named(COMMAND_GROUPS[command]))
    for argv in ARGV[command]:
        parser.parse_args(argv)  # the prefix alone is a valid command line
        taken = {name for name in FIELDS if _takes(parser, argv, name)}
        assert taken == shown, (f"{' '.join(argv)}: refuses {sorted(shown - taken)}, "
                                f"takes {sorted(taken - shown)}")


@pytest.mark.parametrize(("argv", "ok"), [
    (["worker", "--asr-vad", "webrtc"], False),
    (["worker", "--view-port", "9000"], False),
    (["worker", "--partitions", "8"], False),  # it uses the partitions the topics have
    (["consume", "--window-ms", "5"], False),
    (["consume", "--model", "m"], False),
    (["produce", "mic", "--stream-id", "m", "--window-ms", "5"], False),
    (["record", "--labels", "l", "--out", "o", "--provisional-on", "video"], False),
    (["train", "ds", "--out", "o", "--bootstrap-servers", "k:9092"], False),
    (["asr", "--asr-vad", "energy"], True),
    (["worker", "--window-ms", "2000"], True),
    (["worker", "--replication-factor", "3"], True),
    (["view", "--max-frame-pixels", "100"], True),
    (["demo", "--lateness-text-ms", "4000", "--asr-lang", "de"], True),
    (["avdigits", "clip", "o", "--sample-rate", "8000"], True),
    (["eval", "ds", "--device", "cpu"], True),
])
def test_examples_of_taken_and_refused_flags(argv: list[str], ok: bool) -> None:
    parser = build_parser()
    if ok:
        parser.parse_args(argv)
        return
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2 and "unrecognized arguments" in err.getvalue()


def test_help_says_where_else_the_settings_come_from() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["consume", "--help"])
    text = " ".join(out.getvalue().split())
    assert "settings this command reads (each also from its STREAMPROC_* variable)" in text
    assert "--window-ms" not in text and "--bootstrap-servers" in text


def test_groups_name_real_settings_once_and_never_a_setting() -> None:
    names = [n for group in SETTING_GROUPS.values() for n in group]
    assert len(names) == len(set(names))
    assert set(names) <= set(FIELDS)
    assert not set(SETTING_GROUPS) & set(FIELDS)
    with pytest.raises(ValueError, match="neither"):
        settings_named(("kafka", "no_such_setting"))


def test_every_setting_is_read_by_a_command_besides_config() -> None:
    read = {n for c, groups in COMMAND_GROUPS.items() if c != "config"
            for n in settings_named(groups)}
    assert read == set(FIELDS)
    assert settings_named(COMMAND_GROUPS["config"]) == tuple(FIELDS)


def test_the_readme_says_which_command_reads_what() -> None:
    readme = (ROOT / "README.md").read_text()
    assert commands_table() in readme, "README's table of commands and settings is stale: " \
        "paste streamproc.config.commands_table() into it"


# --- the table against the code: what each command's code reads ------------------------

# Code every Kafka client runs (streamproc/kafka.py): its address, login and client id.
KAFKA = ("kafka.py", "_common", "bootstrap_servers", "connection_error", "_probe")
TOPIC_CHECK = ("topics.py", "check_topics", "describe", "problems")
# (file under streamproc/, then its top-level functions or Class.methods; none: all of it)
CODE: dict[str, list[tuple[str, ...]]] = {
    "broker": [("cli.py", "cmd_broker")],
    "topics": [("cli.py", "cmd_topics"), ("topics.py",), KAFKA, ("kafka.py", "admin")],
    "produce": [("cli.py", "_produce_logging", "cmd_produce_camera", "cmd_produce_mic",
                 "cmd_produce_file", "cmd_produce_transcript"), ("capture/publisher.py",),
                TOPIC_CHECK, KAFKA, ("kafka.py", "admin", "producer", "producer_config")],
    "consume": [("cli.py", "cmd_consume"), ("readers.py",), KAFKA, ("kafka.py", "consumer")],
    "view": [("cli.py", "cmd_view"), ("view/server.py",), ("topics.py", "describe"), KAFKA,
             ("kafka.py", "admin", "consumer", "aio_reader")],
    "worker": [("cli.py", "cmd_worker"), *((f"worker/{p.name}",) for p in
                                            sorted((ROOT / "streamproc/worker").glob("*.py"))),
               *((f"inference/{p.name}",) for p in
                 sorted((ROOT / "streamproc/inference").glob("*.py"))),
               ("align/aligner.py", "AlignConfig.from_settings"), TOPIC_CHECK, KAFKA,
               ("kafka.py", "admin", "consumer", "aio_consumer", "faust_brokers")],
    "asr": [("cli.py", "cmd_asr"), *((f"asr/{p.name}",) for p in
                                      sorted((ROOT / "streamproc/asr").glob("*.py"))),
            TOPIC_CHECK, KAFKA, ("kafka.py", "admin", "group_consumer", "producer",
                                 "producer_config")],
    "record": [("cli.py", "cmd_record"), ("ml/recording.py",),
               ("align/aligner.py", "AlignConfig.from_settings"), TOPIC_CHECK, KAFKA,
               ("kafka.py", "admin", "consumer")],
    "avdigits dataset": [("cli.py", "cmd_avdigits_dataset")],
    "avdigits clip": [("cli.py", "cmd_avdigits_clip")],
    "train": [("cli.py", "cmd_train", "_train_config")],
    "eval": [("cli.py", "cmd_eval", "_train_config")],
    # in its own process; its children read what child_command gives them
    "demo": [("cli.py", "cmd_demo"), ("dev/demo.py",), ("topics.py", "create_topics"),
             ("capture/publisher.py",), TOPIC_CHECK, ("readers.py",), KAFKA,
             ("kafka.py", "admin", "consumer", "producer", "producer_config")],
}
# Reads the code above has that the command never makes, each with its reason.
NOT_FROM_THE_COMMAND: dict[str, set[str]] = {
    # create_app's fallback for callers of the API; run_worker passes the partition count
    # the input topics have
    "worker": {"partitions"},
    # record cuts final windows only: AlignConfig.from_settings(settings.replace(
    # provisional_on="", final_within_ms=0))
    "record": {"provisional_on", "final_within_ms"},
}


@cache
def _tree(path: str) -> tuple[str, ast.Module]:
    text = (ROOT / "streamproc" / path).read_text()
    return text, ast.parse(text)


def _source(path: str, *names: str) -> str:
    """The text of ``names`` (top-level functions, or Class.method) in streamproc/PATH."""
    text, tree = _tree(path)
    if not names:
        return text
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    missing = set(names) - set(found)
    assert not missing, f"streamproc/{path} has no {sorted(missing)}: update CODE"
    return "\n".join(ast.get_source_segment(text, found[n]) or "" for n in names)


@cache
def _member_reads(name: str) -> frozenset[str]:
    """The settings a Settings property or method reads: ``self.X`` and
    ``getattr(self, f"lateness_{modality}_ms")``-style names."""
    text = _source("config.py", f"Settings.{name}")
    reads = _reads_in(text, "self")
    for pattern in re.findall(r'getattr\(self, f"([^"]+)"\)', text):
        rx = re.sub(r"\\\{[^}]*\\\}", r"\\w+", re.escape(pattern))
        reads |= {f for f in FIELDS if re.fullmatch(rx, f)}
    return frozenset(reads)


def _reads_in(text: str, var: str = "settings") -> set[str]:
    """Settings that ``var.NAME`` reads in ``text``, and ``s.NAME`` for any parameter
    ``s: Settings``; a Settings property or method stands for the settings it reads."""
    names = {var, *re.findall(r"\b(\w+): Settings\b", text)}
    reads: set[str] = set()
    for name in re.findall(rf"\b(?:{'|'.join(names)})\.(\w+)", text):
        if name in FIELDS:
            reads.add(name)
        elif name != "replace":  # a changed copy: what it reads is read where it is used
            assert hasattr(Settings, name), f"settings.{name} is no setting nor Settings member"
            reads |= _member_reads(name)
    return reads


def _code_reads(command: str) -> set[str]:
    reads: set[str] = set()
    for path, *names in CODE[command]:
        reads |= _reads_in(_source(path, *names))
    if "bootstrap_servers" in reads:
        # main() gives log_level to the Kafka clients' loggers (quiet_client_logs)
        reads.add("log_level")
    return reads - NOT_FROM_THE_COMMAND.get(command, set())


@pytest.mark.parametrize("command", sorted(CODE))
def test_a_command_shows_exactly_what_its_code_reads(command: str) -> None:
    shown = set(settings_named(COMMAND_GROUPS[command]))
    reads = _code_reads(command)
    if command == "demo":
        for child, own in _demo_children().items():
            # a child reads what the demo gives it, and what the demo sets for it itself
            reads |= set(settings_named(COMMAND_GROUPS[child])) - own
    assert reads <= shown, f"{command} reads settings its --help hides: {sorted(reads - shown)}"
    assert shown <= reads, f"{command} shows flags that do nothing: {sorted(shown - reads)}"


def test_the_exceptions_are_still_in_the_code() -> None:
    assert "partitions or settings.partitions" in _source("worker/app.py", "create_app")
    assert 'settings.replace(provisional_on="", final_within_ms=0)' in _source("ml/recording.py", "record")


def _demo_children() -> dict[str, set[str]]:
    """For each command the demo runs as a child, the settings it gives that child itself
    (the flags after the settings in ``child_command(settings, "COMMAND", ...)``)."""
    text = _source("dev/demo.py")
    children: dict[str, set[str]] = {}
    for command, own in re.findall(r'child_command\(settings, "(\w+)",(.*?)\)\n', text,
                                   re.S):
        children[command] = {f.replace("-", "_") for f in re.findall(r"--([a-z-]+)=", own)}
    assert set(children) == {"worker", "view", "asr"}, children
    return children


def test_demo_children_get_the_demo_settings_and_no_stray_environment(monkeypatch) -> None:
    from streamproc.dev.demo import child_command

    monkeypatch.setenv("STREAMPROC_HOP_MS", "250")  # not the demo's: it is left out
    monkeypatch.setenv("STREAMPROC_CACHE", "/tmp/cache")  # not a setting: it is kept
    demo = Settings(bootstrap_servers="k:1", topic_prefix="p", lateness_text_ms=4000,
                    asr_lang="", view_token="secret", sasl_password="pw",
                    security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                    provisional_on="none", max_buffer_audio_s=30.5)
    for command, own in _demo_children().items():
        argv, env = child_command(demo, command, "--log-level=debug")
        assert argv[:4] == [argv[0], "-m", "streamproc.cli", command]
        assert "STREAMPROC_HOP_MS" not in env and env["STREAMPROC_CACHE"] == "/tmp/cache"
        assert "secret" not in " ".join(argv) and "pw" not in " ".join(argv)
        got = Settings.load(build_parser().parse_args(argv[3:]), environ=env)
        for name in set(settings_named(COMMAND_GROUPS[command])) - own - {"log_level"}:
            assert getattr(got, name) == getattr(demo, name), (command, name)
        assert got.log_level == "debug"  # its own flags come last and win


def test_settings_argv_passes_values_other_than_the_defaults() -> None:
    s = Settings(window_ms=2000, asr_lang="", view_token="t", hop_ms=500)
    flags, env = settings_argv(s, ("window_ms", "hop_ms", "asr_lang", "view_token"))
    assert flags == ["--window-ms=2000", "--asr-lang="]
    assert env == {"STREAMPROC_VIEW_TOKEN": "t"}


@pytest.mark.parametrize(("argv", "says"), [
    (["produce", "file", "--stream-id", "e", "x.mp4", "--chunk-ms", "0"],
     "argument --chunk-ms: must be at least 1 and at most 10000: 0"),
    (["produce", "file", "--stream-id", "e", "x.mp4", "--jpeg-quality", "500"],
     "argument --jpeg-quality: must be at least 1 and at most 100: 500"),
    (["produce", "mic", "--stream-id", "m", "--channels", "0"],
     "argument --channels: must be at least 1 and at most 32: 0"),
    (["produce", "mic", "--stream-id", "m", "--rate", "6000"],
     "argument --rate: must be at least 8000 and at most 192000: 6000"),
    (["produce", "camera", "--stream-id", "c", "--queue", "-3"],
     "argument --queue: must be at least 1: -3"),
    (["consume", "--timeout", "0"], "argument --timeout: must be above 0: 0"),
    (["consume", "--timeout", "soon"], "argument --timeout: not a number: 'soon'"),
])
def test_out_of_range_numbers_are_refused_with_their_bounds(argv: list[str],
                                                            says: str) -> None:
    """A zero chunk length floods Kafka with one record per sample, a zero timeout reads
    nothing and says all is well: both are refused before anything runs."""
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and says in err.getvalue()
    ok = build_parser().parse_args(["consume", "--timeout", "0.5"])
    assert ok.timeout == 0.5


def test_a_setting_the_command_does_not_read_names_the_commands_that_do(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["consume", "--window-ms", "500", "--stream", "cam"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unrecognized arguments: --window-ms 500" in err
    assert ("--window-ms is a setting that `streamproc consume` does not read; these "
            "commands do: worker, record, avdigits dataset, demo") in err
    with pytest.raises(SystemExit):
        main(["consume", "--no-such-flag"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-flag" in err and "setting" not in err
