"""`streamproc demo` before and after its run: ports checked first, its directories, its summary."""

from __future__ import annotations

import socket

from streamproc import cli
from streamproc.config import Settings
from streamproc.dev import demo


def test_a_taken_metrics_port_fails_before_clips_training_and_broker(
        monkeypatch, tmp_path, capsys) -> None:
    def prepare(*_a: object, **_k: object) -> list:
        raise AssertionError("prepared before the port check")

    monkeypatch.setattr(demo, "prepare", prepare)
    monkeypatch.delenv("STREAMPROC_BOOTSTRAP", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = cli.main(["demo", "--dir", str(tmp_path), "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"streamproc demo: cannot serve metrics on port {port}: it is in use "
                   "(another worker on this machine? give the demo another --metrics-port, "
                   "or 0 for no endpoint)\n")


def test_a_worker_refuses_a_taken_web_port_in_one_line_before_anything(
        monkeypatch, capsys) -> None:
    """faust would bind it only once the worker started, and fail with a traceback."""
    monkeypatch.delenv("STREAMPROC_BOOTSTRAP", raising=False)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no broker at this address: the port is checked before any connection
        rc = cli.main(["worker", "--bootstrap-servers", "127.0.0.1:1", "--web-port",
                       str(port), "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"cannot serve web on port {port}: it is in use" in err


def test_prepare_only_serves_nothing_so_needs_no_port(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(demo, "prepare", lambda *_a, **_k: [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        s = Settings(metrics_port=taken.getsockname()[1])
        assert demo.run(s, own_broker=False, layout=demo.Layout(tmp_path),
                        prepare_only=True) == 0



def test_another_preset_or_clip_length_keeps_its_own_directory(monkeypatch, tmp_path) -> None:
    """Trying the tiny preset must not replace the default demo's model (the one the
    README's worker serves) or mix its clips with the default's."""
    from streamproc.dev import localkafka

    monkeypatch.setattr(localkafka, "cache_root", lambda: tmp_path)
    assert demo.default_dir() == tmp_path / "demo"
    assert demo.default_dir("small", 10) == tmp_path / "demo"
    assert demo.default_dir("tiny", 3) == tmp_path / "demo-tiny-3d"
    assert demo.default_dir("small", 3) == tmp_path / "demo-small-3d"
    # the directory the demo prepares into, from the command line and from the API
    seen: list = []
    monkeypatch.setattr(demo, "prepare", lambda layout, *a: seen.append(layout.root) or [])
    assert cli.main(["demo", "--prepare-only", "--preset", "tiny", "--digits", "3"]) == 0
    assert demo.run(Settings(), own_broker=False, prepare_only=True, preset="full") == 0
    assert cli.main(["demo", "--prepare-only", "--dir", str(tmp_path / "mine")]) == 0
    assert seen == [tmp_path / "demo-tiny-3d", tmp_path / "demo-full-10d", tmp_path / "mine"]


def test_a_summary_before_any_final_says_none_yet_not_nan() -> None:
    """What Ctrl-C early in the demo prints: no 'p50 nan ms'."""
    s = demo.Summary(windows=0, expected=26, scored=0, correct=0, duplicates=0,
                     latency_total=[], latency_added=[12.0, 30.0], latency_first=[140.0])
    text = "\n".join(s.lines())
    assert "final prediction published: none yet" in text and "nan" not in text
    assert "first prediction published: p50 140 ms, p99 140 ms" in text
