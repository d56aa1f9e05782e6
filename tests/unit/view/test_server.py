"""The view's HTTP side without Kafka: what it serves, to whom, with which headers; the
page's files shipped in the package and fetching nothing from elsewhere; Server-Sent
Events; frames decoded off the event loop. (tests/e2e/test_view_browser.py runs it on a
real broker in a real browser.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient, TestServer

from streamproc.config import Settings
from streamproc.testing import prediction
from streamproc.view import server as srv
from streamproc.view.frames import PendingFrame
from streamproc.view.server import SECURITY_HEADERS, ViewServer, bind_warnings, metrics_urls
from streamproc.wire.codec import encode_image


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


@asynccontextmanager
async def client(settings: Settings | None = None) -> AsyncIterator[tuple[ViewServer,
                                                                          TestClient]]:
    view = ViewServer(settings or Settings(), health_urls=[])
    async with TestClient(TestServer(view.app(), host="127.0.0.1")) as c:
        yield view, c
    await view.stop()


def test_only_get_is_served_with_security_headers_everywhere() -> None:
    async def go() -> None:
        async with client() as (view, c):
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                for path in ("/", "/api/state", "/api/events", "/api/frame"):
                    r = await c.request(method, path)
                    assert r.status == 405, (method, path)
            page = await c.get("/")
            assert page.status == 200 and "text/html" in page.headers["Content-Type"]
            for name, value in SECURITY_HEADERS.items():
                assert page.headers[name] == value
            missing = await c.get("/static/../../etc/passwd")
            assert missing.status == 404
            assert (await c.get("/api/frame", params={"stream": "nope"})).status == 404
        routes = {(r.method, r.resource.canonical) for r in view.app().router.routes()}
        assert {m for m, _ in routes} == {"GET", "HEAD"}
    run(go)


def test_the_page_is_plain_files_in_the_package_and_fetches_nothing_from_elsewhere(
        ) -> None:
    files = srv._read_static()
    assert set(files) == {"index.html", "view.js", "view.css"}
    for name, body in files.items():
        text = body.decode()
        # no CDN, no font or script from the internet: the page works offline
        assert not re.search(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text), name
    html = files["index.html"].decode()
    assert 'src="static/view.js"' in html and 'href="static/view.css"' in html
    assert "<script>" not in html  # the CSP allows no inline script


def test_token_by_query_once_then_a_cookie_or_a_bearer_header() -> None:
    async def go() -> None:
        async with client(Settings(view_token="s3cret")) as (_view, c):
            denied = await c.get("/api/state")
            assert denied.status == 401 and denied.headers["WWW-Authenticate"] == "Bearer"
            assert (await c.get("/", params={"token": "wrong"})).status == 401
            assert (await c.get("/healthz")).status == 200  # a probe learns nothing else
            # the token in the address bar becomes a cookie, and the address loses it
            r = await c.get("/", params={"token": "s3cret"}, allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == "/"
            cookie = r.cookies[srv.COOKIE]
            assert "s3cret" not in cookie.value and cookie["httponly"]
            assert (await c.get("/api/state")).status == 200  # the client keeps the cookie
            c.session.cookie_jar.clear()
            assert (await c.get("/api/state")).status == 401
            bearer = await c.get("/api/state", headers={"Authorization": "Bearer s3cret"})
            assert bearer.status == 200
    run(go)


def test_a_loopback_view_answers_only_requests_addressed_to_localhost() -> None:
    async def go() -> None:
        async with client() as (_view, c):
            for host in ("evil.example", "evil.example:8088", "192.168.1.5"):
                r = await c.get("/api/state", headers={"Host": host})
                assert r.status == 403, host
            for host in ("localhost:8088", "127.0.0.1", "[::1]:8088"):
                assert (await c.get("/api/state", headers={"Host": host})).status == 200
        async with client(Settings(view_host="0.0.0.0")) as (_view, c):
            assert (await c.get("/", headers={"Host": "my-box:8088"})).status == 200
    run(go)


def test_binding_beyond_loopback_warns_and_metrics_urls_are_checked() -> None:
    assert bind_warnings(Settings()) == []
    assert bind_warnings(Settings(view_host="::1")) == []
    lines = bind_warnings(Settings(view_host="0.0.0.0"))
    assert len(lines) == 2 and "anyone who can reach this machine" in lines[0]
    assert "--view-token" in lines[1]
    assert len(bind_warnings(Settings(view_host="0.0.0.0", view_token="t"))) == 1
    assert metrics_urls(Settings(view_metrics_url=" http://a:9109/metrics, http://b/m ")) == [
        "http://a:9109/metrics", "http://b/m"]
    try:
        metrics_urls(Settings(view_metrics_url="a:9109"))
    except srv.UserError as e:
        assert "not an http(s) URL" in str(e)
    else:
        raise AssertionError("a URL without a scheme was taken")


def test_the_cli_binds_loopback_by_default_and_takes_host_and_port() -> None:
    from streamproc.cli import build_parser

    args = build_parser().parse_args(["view"])
    s = Settings.load(args, environ={})
    assert (s.view_host, s.view_port) == ("127.0.0.1", 8088)
    args = build_parser().parse_args(["view", "--host", "0.0.0.0", "--port", "9000"])
    s = Settings.load(args, environ={})
    assert (s.view_host, s.view_port) == ("0.0.0.0", 9000)
    assert build_parser().parse_args(["demo", "--no-view"]).no_view
    shown = subprocess.run([sys.executable, "-m", "streamproc.cli", "config", "--json"],
                           capture_output=True, text=True, check=True,
                           env={"STREAMPROC_VIEW_TOKEN": "hunter2", "PATH": ""}).stdout
    assert json.loads(shown)["view_token"]["value"] == "***"


async def _events(c: TestClient, n: int) -> list[tuple[str, Any]]:
    """The first ``n`` events of /api/events."""
    r = await c.get("/api/events")
    assert r.headers["Content-Type"] == "text/event-stream"
    out: list[tuple[str, Any]] = []
    event = ""
    while len(out) < n:
        line = (await asyncio.wait_for(r.content.readline(), 10)).decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    r.close()
    return out


def test_a_page_gets_a_snapshot_then_deltas_of_what_changed() -> None:
    async def go() -> None:
        async with client() as (view, c):
            view.state.on_prediction(prediction("cam1", 0, "three"), 0)
            view.state.take_delta(0)  # already sent to earlier pages
            view._spawn(view._tick())

            async def later() -> None:
                await asyncio.sleep(0.3)
                view.state.on_prediction(prediction("cam1", 1, "four"), 0)
            view._spawn(later())
            (kind, snap), (kind2, delta) = await _events(c, 2)
            assert kind == "snapshot" and snap["streams"]["cam1"]["tile"]["label"] == "three"
            assert kind2 == "delta" and delta["streams"]["cam1"]["tile"]["label"] == "four"
            assert delta["streams"]["cam1"]["windows"][-1][2] == "four"
    run(go)


def test_a_page_that_falls_behind_is_dropped_not_buffered() -> None:
    c = srv._Client()
    for _ in range(srv.CLIENT_QUEUE):
        c.send(b"x")
    assert not c.dropped
    c.send(b"one too many")
    assert c.dropped and c.queue.qsize() == srv.CLIENT_QUEUE


def test_frames_are_decoded_off_the_event_loop_and_served_as_thumbnails(monkeypatch) -> None:
    threads: list[str] = []
    real = srv.thumbnail

    def spy(*args: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(srv, "thumbnail", spy)
    img = np.zeros((720, 1280, 3), np.uint8)
    img[:, :640] = 255
    data = encode_image(img)

    async def go() -> None:
        async with client() as (view, c):
            view.state.on_media("cam1", "video", 0)
            view.throttle.offer("cam1", PendingFrame(data, "jpeg", 5))
            view.throttle.offer("cam2", PendingFrame(b"\xff\xd8 broken", "jpeg", 5))
            view.state.on_media("cam2", "video", 0)
            view._spawn(view._frames())
            for _ in range(200):
                if view.state.stats["frames_shown"] and view.state.stats["frames_undecodable"]:
                    break
                await asyncio.sleep(0.02)
            r = await c.get("/api/frame", params={"stream": "cam1"})
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
            assert r.headers["Cache-Control"] == "no-store"
            assert len(await r.read()) == len(view.thumbs["cam1"].jpeg)
            assert view.state.streams["cam1"].frame.width == 320
            assert (await c.get("/api/frame", params={"stream": "cam2"})).status == 404
    run(go)
    assert threads and all(t.startswith("view-work") for t in threads)


def test_the_view_module_imports_what_it_needs_up_front() -> None:
    """Nothing is imported lazily on the event loop: after importing the server, the
    libraries it calls are all loaded."""
    code = ("import sys, streamproc.view.server; "
            "need = ['cv2', 'numpy', 'aiohttp', 'aiokafka', 'prometheus_client.parser', "
            "'streamproc.topics', 'streamproc.wire.codec', 'streamproc.readers']; "
            "print([m for m in need if m not in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_unreadable_records_are_counted_and_the_reader_goes_on() -> None:
    view = ViewServer(Settings(topic_prefix="p"), health_urls=[])

    class Msg:
        def __init__(self, topic: str, key: bytes | None, value: bytes | None,
                     headers: list[tuple[str, bytes]]) -> None:
            self.topic, self.key, self.value, self.headers = topic, key, value, headers
            self.partition, self.offset, self.timestamp = 0, 0, 0

    class Consumer:
        def __init__(self) -> None:
            self.calls = 0

        async def getmany(self, **_: Any) -> dict:
            self.calls += 1
            if self.calls > 1:
                raise asyncio.CancelledError
            tp = type("TP", (), {"topic": "p.predictions"})
            vtp = type("TP", (), {"topic": "p.video"})
            return {tp: [Msg("p.predictions", b"cam", b"not json", [])],
                    vtp: [Msg("p.video", None, b"x", [("sp-mod", b"video")]),
                          Msg("p.video", b"cam", b"\xff\xd8", [("sp-mod", b"video"),
                                                               ("sp-ts", b"5")])]}

    async def go() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await view._read(Consumer())  # type: ignore[arg-type]
    run(go)
    assert view.state.stats["unreadable"] == 2 and view.state.stats["records"] == 3
    assert view.throttle.pending == 1  # the frame is judged when decoded, off the loop


def test_json_for_the_page_is_strict() -> None:
    assert srv.encode_json({"a": [float("nan"), 1.5, {"b": float("-inf")}]}) == \
        '{"a":[null,1.5,{"b":null}]}'


def test_unknown_static_names_are_not_served() -> None:
    async def go() -> None:
        async with client() as (_view, c):
            for name in ("view.js", "view.css"):
                r = await c.get(f"/static/{name}")
                assert r.status == 200 and len(await r.read()) > 100
            assert (await c.get("/static/index.py")).status == 404
    run(go)



def test_a_port_in_use_is_one_line_naming_the_setting() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def go() -> None:
            view = ViewServer(Settings(view_port=port), health_urls=[])
            await view.start(read_kafka=False)

        try:
            run(go)
        except srv.UserError as e:
            assert f"cannot serve the view on 127.0.0.1:{port}" in str(e)
            assert "--view-port" in str(e)
        else:
            raise AssertionError("a taken port was not refused")
