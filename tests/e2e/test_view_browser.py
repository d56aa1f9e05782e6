"""`streamproc view` in a real browser (Debian's headless Chromium) on the real broker.

The first test runs the whole pipeline: AV-Digits clips replayed in real time through the
real producer, a real worker serving the tiny model, and the view as its own process:
tiles appear, frames load, the label follows new predictions, the timeline grows, dead
letters show, the health panel reads the worker's /metrics, and the Grafana dashboard's
metrics are all in that scrape. The second puts 32 streams of frames, audio, transcripts
and predictions (and 18 more of predictions only) in front of one page and checks it stays
small and responsive, behind a token on 0.0.0.0.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from browser_helpers import PANELS_JS, TILES_JS, Browser, skip_reason
from dashboard_helpers import grouping_labels, metric_names, queries
from metrics_helpers import parse
from pipeline_helpers import (
    Bad,
    bad_records,
    live_origin,
    make_clips,
    pipeline_settings,
    replay_clips,
    send_raw,
)
from worker_helpers import WorkerProc, oracle_windows, read_predictions

from streamproc import kafka
from streamproc.capture.publisher import Publisher
from streamproc.capture.sources import StreamWriter
from streamproc.config import Settings
from streamproc.dev.demo import ViewProcess
from streamproc.dev.localkafka import free_port
from streamproc.testing import MS, S
from streamproc.topics import create_topics
from streamproc.wire import codec as wire

pytestmark = [pytest.mark.broker, pytest.mark.slow,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

#: Counters the dashboard charts that a worker only exports once such a fault happened
#: (the unit test checks them against the worker's code instead).
FAULTS_ONLY = {"streamproc_duplicates_total", "streamproc_inference_errors_total",
               "streamproc_internal_errors_total"}


def _groups(settings: Settings) -> set[str]:
    admin = kafka.admin(settings)
    try:
        return {g["group_id"] for g in admin.list_groups()}
    finally:
        admin.close()


def _start_view(settings: Settings, tmp: Path) -> tuple[ViewProcess, str]:
    view = ViewProcess(settings, tmp / "view.log")
    url = view.wait_url(60)
    if url is None:
        view.stop()
        pytest.fail(f"the view did not start:\n{view.log()[-3000:]}")
    return view, url


def test_the_view_follows_a_live_pipeline_in_a_browser(
        kafka_bootstrap: str, tiny_model: Path, avdigits_tts: Path, tmp_path: Path) -> None:
    clips = make_clips(tmp_path / "clips", {"v1": [3, 8], "v2": [5, 1]}, avdigits_tts)
    settings = pipeline_settings(kafka_bootstrap, tmp_path, tiny_model, clips,
                                 metrics_port=free_port(), view_port=free_port())
    create_topics(settings)
    groups_before = _groups(settings)
    worker = WorkerProc(settings, tmp_path / "worker.log")
    view, url = _start_view(settings, tmp_path)
    try:
        worker.wait_for(r"Worker ready", timeout=120)
        with Browser(tmp_path / "browser") as b:
            b.get(url)
            b.wait(lambda: b.script(PANELS_JS)["conn"] == "live", 30, "the page to connect")
            origin = live_origin(settings)
            replayed: list = []
            replayer = threading.Thread(
                target=lambda: replayed.extend(replay_clips(settings, clips, origin)))
            replayer.start()
            # the tiles appear, each with a frame from PREFIX.video
            b.wait(lambda: (t := b.script(TILES_JS)) and len(t) == 2 and all(
                x["frameV"] > 0 and x["img"]["w"] > 0 for x in t) and t, 40,
                "two tiles with a frame loaded")
            # the label follows the predictions as they land: window after window
            shown: dict[str, set[tuple[int, str]]] = defaultdict(set)

            def progressed() -> bool:
                for t in b.script(TILES_JS):
                    if t["label"]:
                        shown[t["stream"]].add((t["window"], t["label"]))
                return len(shown) == 2 and all(len(v) >= 3 for v in shown.values())
            b.wait(progressed, 40, "three predictions in a row on each tile", every=0.2)
            replayer.join(60)
            assert len(replayed) > 0
            expected = oracle_windows(settings, replayed)
            every = read_predictions(settings, set(expected), finals_only=False,
                                     timeout=settings.idle_deadline_text_ms / 1000 + 40)
            newest: dict[str, tuple[int, int, str]] = {}
            for p in every:
                sid, start = p.key
                cand = (start, p.revision_key[2], p.body["label"])
                newest[sid] = max(newest.get(sid, cand), cand)
            n_windows = defaultdict(set)
            for sid, start in expected:
                n_windows[sid].add(start)

            def caught_up() -> list | None:
                tiles = {t["stream"]: t for t in b.script(TILES_JS)}
                ok = all(tiles[s]["window"] == newest[s][0] // MS
                         and tiles[s]["label"] == newest[s][2] and tiles[s]["tag"] == "F"
                         and tiles[s]["windows"] == len(n_windows[s]) for s in newest)
                return list(tiles.values()) if ok else None
            # each tile ends on its newest window's final; its timeline holds every window
            tiles = b.wait(caught_up, 20, "the tiles to show every window's final")
            assert all(t["drawn"] > 1 for t in tiles)
            assert {t["stream"]: t["shownLabel"] for t in tiles} == {
                s: v[2] for s, v in newest.items()}
            assert all(t["badges"]["video"] != "absent" for t in tiles)

            # dead letters: a corrupt frame and a late one for v1, from the worker itself
            late = wire.VideoFrame.from_image("v1", origin + 200 * MS, 90_002,
                                              np.zeros((64, 64, 3), np.uint8))
            bad = [b_ for b_ in bad_records("v1", origin + S, settings.max_message_bytes)
                   if b_.what == "corrupt JPEG"]
            bad.append(Bad("late frame", "video", wire.encode(late), "already closed", "late"))
            send_raw(settings, bad)

            def dead_shown() -> dict | None:
                panels = b.script(PANELS_JS)
                kinds = {r["kind"]: r for r in panels["deadRows"]}
                v1 = next(t for t in b.script(TILES_JS) if t["stream"] == "v1")
                return panels if (set(kinds) == {"decode", "late"} and v1["dead"] == 2
                                  and v1["marks"] == 2) else None
            panels = b.wait(dead_shown, 30, "both dead letters in the panel and on v1")
            rows = {r["kind"]: r for r in panels["deadRows"]}
            assert "JPEG" in rows["decode"]["reason"] and rows["decode"]["stream"] == "v1"
            assert rows["late"]["count"] == 1 and panels["deadTotal"] == "2"
            # the worker's health, from its /metrics
            panels = b.wait(lambda: (p := b.script(PANELS_JS))["health"] == "ok"
                            and p["lag"] != "–" and "decode 1" in p["healthText"] and p,
                            30, "the health panel")
            assert "late 1" in panels["healthText"]
            b.screenshot(tmp_path / "view-pipeline.png")
            assert panels["nodes"] < 400
        scrape = parse(urllib.request.urlopen(
            f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=5).read().decode())
    finally:
        view.stop()
        worker.abandon()
    # every metric the Grafana dashboard charts is in a live worker's scrape, with the
    # labels it groups by (but those counted only on faults this run did not have)
    present: dict[str, set[str]] = defaultdict(set)
    for name, labels in scrape:
        present[name] |= {k for k, _ in labels}
    for expr in queries():
        for name in metric_names(expr) - FAULTS_ONLY:
            assert name in present, f"{name} (in {expr!r}) is not in the worker's /metrics"
        for name, labels in grouping_labels(expr).items():
            if name in present:
                assert labels - {"le"} <= present[name], (name, labels)
    # the view joined no consumer group: it cannot have committed anyone's offsets
    assert _groups(settings) - groups_before <= {settings.app_id}


def _tile_image(i: int, t: int) -> np.ndarray:
    img = np.full((120, 160, 3), (40 + 6 * i, 80, 160 - 4 * i), np.uint8)
    cv2.putText(img, f"{i:02d}:{t}", (20, 70), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    return img


def _feed(settings: Settings, streams: list[str], seconds: float, media: int) -> int:
    """``seconds`` of every stream: a provisional then a final prediction per 0.5 s window,
    and for the first ``media`` streams frames at 4/s, audio and a word a second; returns
    the predictions sent."""
    producer = kafka.producer(settings)
    sent = 0
    with Publisher(settings) as pub:
        writers = {sid: StreamWriter(pub, sid) for sid in streams}
        hop = 500 * MS
        t0 = time.time_ns() // hop * hop
        for step in range(int(seconds * 4)):
            now = time.time_ns()
            for i, sid in enumerate(streams):
                w = writers[sid]
                if i < media:
                    w.frame(_tile_image(i, step))
                    w.audio(np.zeros(4000, np.int16), 16000)
                    if step % 4 == 0:
                        w.text(f"word{step // 4}", now - S, now, final=True)
                if step % 2 == 0:
                    start = t0 + (step // 2) * hop - S
                    label = f"class{(step // 2 + i) % 5}"
                    p = wire.Prediction(sid, start, start + S, label, {label: 0.8, "x": 0.2},
                                        {"missing": ["text"] if step % 6 == 0 else []},
                                        {"name": "synthetic", "version": "1"}, now,
                                        {"total": 300.0}, rev=0, final=False)
                    for rec in (p, dataclasses.replace(p, rev=1, final=True)):
                        r = wire.encode_prediction(rec)
                        producer.send(settings.topic("predictions"), key=r.key, value=r.value,
                                      headers=list(r.headers), timestamp_ms=r.timestamp_ms)
                        sent += 1
            time.sleep(max(0.0, 0.25 - (time.time_ns() - now) / 1e9))
    producer.flush(30)
    producer.close()
    return sent


LONG_TASKS_JS = """
window.__long = [];
new PerformanceObserver(l => { for (const e of l.getEntries()) window.__long.push(e.duration); })
  .observe({type: 'longtask', buffered: true});
return true;
"""


def test_the_page_stays_light_with_many_streams_behind_a_token(topics: Settings,
                                                               tmp_path: Path) -> None:
    settings = topics.replace(view_port=free_port(), view_host="0.0.0.0", view_token="tok3n",
                              view_fps=2.0, metrics_port=0)
    streams = [f"cam-{i:02d}" for i in range(50)]  # 32 with media: frames, audio, words
    groups_before = _groups(settings)
    view, url = _start_view(settings, tmp_path)
    try:
        log = view.log()
        assert "warning: the view listens on 0.0.0.0" in log  # and it says so
        assert "no --view-token is set" not in log  # a token is: no second warning
        with Browser(tmp_path / "browser") as b:
            b.get(url)  # no token: the page cannot read anything
            assert "needs its token" in b.script("return document.body.innerText")
            b.get(url + "?token=tok3n")
            b.wait(lambda: b.script(PANELS_JS)["conn"] == "live", 30, "the page to connect")
            b.script(LONG_TASKS_JS)
            feeder_sent: list[int] = []
            feeder = threading.Thread(
                target=lambda: feeder_sent.append(_feed(settings, streams, 8.0, media=32)))
            feeder.start()
            # while records pour in, the page answers at once
            lags = []
            while feeder.is_alive():
                t = time.monotonic()
                b.script("return 1")
                lags.append(time.monotonic() - t)
                time.sleep(0.3)
            feeder.join()
            assert feeder_sent and max(lags) < 2.0, lags

            def settled() -> list | None:
                tiles = b.script(TILES_JS)
                return tiles if (len(tiles) == 48 and all(t["tag"] == "F" for t in tiles)
                                 and all(t["windows"] >= 14 for t in tiles)) else None
            # at most 48 tiles: the page says how many more the filter can find
            tiles = b.wait(settled, 30, "48 tiles with every window")
            more = b.script("const m = document.getElementById('more');"
                            "return m.hidden ? '' : m.textContent")
            assert more.startswith("2 more stream(s) match"), more
            visible = b.script("""return [...document.querySelectorAll('#grid .tile')]
              .filter(t => { const r = t.getBoundingClientRect();
                             return r.bottom > 0 && r.top < innerHeight; })
              .map(t => t.dataset.stream);""")
            # frames load for the tiles on screen, again and again as new ones come (the
            # tiles off screen load theirs when scrolled to)
            on_screen = [t for t in tiles if t["stream"] in visible]
            assert len(on_screen) >= 4 and all(t["loads"] >= 3 for t in on_screen), on_screen
            assert all(t["loads"] == 0 for t in tiles if t["stream"] not in visible)
            # the view decoded at most view_fps frames per stream, of the 32 each sent
            req = urllib.request.Request(url + "api/state",
                                         headers={"Authorization": "Bearer tok3n"})
            stats = json.load(urllib.request.urlopen(req, timeout=5))["stats"]
            assert stats["video"] == 32 * 32
            assert 32 <= stats["frames_shown"] <= 32 * settings.view_fps * (8 + 4)
            assert [t["stream"] for t in tiles] == streams[:48]  # in order, cam-2 before cam-10
            tiles = tiles[:32]
            assert all(t["words"].startswith("word") for t in tiles)
            b.screenshot(tmp_path / "view-32-streams.png")
            panels = b.script(PANELS_JS)
            assert panels["nodes"] < 1500, panels["nodes"]  # bounded DOM: ~20 per tile
            long = b.script("return window.__long")
            assert max(long, default=0) < 2000, long  # never frozen (bound far above need)
            heap = b.script("return performance.memory ? performance.memory.usedJSHeapSize : 0")
            assert heap < 64 * 1024 * 1024, heap
            # the filter narrows the grid; clearing it brings every tile back
            for text, want in (("cam-07", ["cam-07"]), ("CAM-4", streams[40:50]),
                               ("", streams[:48])):
                b.script("const f = document.getElementById('filter'); f.value = arguments[0];"
                         "f.dispatchEvent(new Event('input'));", text)
                assert [t["stream"] for t in b.script(TILES_JS)] == want, text
            assert b.script(TILES_JS)[0]["label"]  # tiles made again have their data
        rss_kb = next(int(line.split()[1]) for line in
                      Path(f"/proc/{view.proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        assert rss_kb < 600 * 1024, rss_kb
    finally:
        view.stop()
    assert view.proc.returncode == 0, view.log()[-2000:]
    assert _groups(settings) == groups_before  # the view joined no consumer group
