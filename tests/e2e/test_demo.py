"""`streamproc demo`, the README's main job, end to end on the session's real broker."""

from __future__ import annotations

import io
import json
import threading
import urllib.request

import pytest

from streamproc.config import Settings
from streamproc.dev.demo import Layout, run
from streamproc.dev.localkafka import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_predicts_every_window_of_its_clips_and_summarises(settings: Settings,
                                                                tmp_path, capsys) -> None:
    layout = Layout(tmp_path / "demo")
    out = io.StringIO()
    port = free_port()
    s = settings.replace(metrics_port=free_port(), view_port=port)
    # the web view the demo serves, read while it runs (as a browser would, by its API)
    views: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state",
                                            timeout=3) as r:
                    views.append(json.load(r))
            except OSError:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rc = run(s, own_broker=False, streams=2, layout=layout, preset="tiny", digits=3,
                 out=out)
    finally:
        done.set()
        watcher.join(10)
    text = out.getvalue()
    assert rc == 0, text
    lines = text.splitlines()
    assert lines[0].startswith("window (UTC)")
    summary = next(line for line in lines if line.startswith("windows predicted:"))
    done, expected = (int(x) for x in summary.split()[2:5:2])
    assert done == expected > 0
    every = [json.loads(x) for x in (layout.logs / "predictions.jsonl").read_text().splitlines()]
    preds = [p for p in every if p["final"]]
    keys = [(p["stream_id"], p["window_start_ns"]) for p in preds]
    assert len(keys) == len(set(keys)) == expected
    assert {p["stream_id"] for p in preds} == {"cam1", "cam2"}
    assert all(p["label"] and p["model"]["name"] for p in every)
    assert any(line.startswith("accuracy:") for line in lines)
    # provisional predictions first (table rows tagged P), their finals after
    provisional = [p for p in every if not p["final"]]
    assert provisional and any(" P " in line for line in lines)
    assert any(line.startswith("provisional predictions (before the transcript") for line in lines)
    assert any(line.startswith("latency, window end -> first prediction") for line in lines)
    # it said where its view was, and the view showed both streams live, with the
    # worker's health
    assert f"live view: http://127.0.0.1:{port}/" in capsys.readouterr().err
    assert views, "the demo's view never answered"
    last = views[-1]
    assert set(last["streams"]) == {"cam1", "cam2"}
    assert all(v["tile"]["label"] and v["windows"] for v in last["streams"].values())
    assert any(v["streams"].get("cam1", {}).get("tile", {}).get("frame") for v in views)
    assert any(v["health"]["status"] == "ok" for v in views)
    # the clip files it replayed, and the cached model a second run reuses
    assert (layout.clips / "cam1.avi").stat().st_size > 0
    assert (layout.model / "recipe.sha256").exists()
