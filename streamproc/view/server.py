"""The web view's server: an aiohttp application, its own Kafka reader and the page.

The reader is group-less (``kafka.aio_reader``): it assigns itself every partition of the
five topics, so it joins no consumer group, commits nothing and never moves a worker
group's offsets. It starts ``view_history_s`` back on the predictions and dead letters (so
a page opened late still shows each stream's timeline) and a few seconds back on the
inputs. Nothing here writes to Kafka: the application has no producer and answers GET
only.

On the event loop only cheap work happens (headers, small JSON); frames are decoded and
downscaled, scrapes parsed and large snapshots serialised in a thread pool. The page gets
one snapshot when it connects, then a delta (what changed) at most ``1 / TICK_S`` times a
second over Server-Sent Events, however fast records come.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO
from urllib.parse import urlsplit

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streamproc import kafka
from streamproc.config import Settings
from streamproc.errors import UserError
from streamproc.topics import describe
from streamproc.view.frames import FrameThrottle, PendingFrame, Thumbnail, thumbnail
from streamproc.view.health import HealthPoller
from streamproc.view.state import NS_PER_MS, FrameInfo, ViewState
from streamproc.wire.codec import (
    KafkaRecord,
    TranscriptSegment,
    WireError,
    decode,
    decode_dead_letter,
    decode_prediction,
    normalize_headers,
    stream_id_of,
)

log = logging.getLogger("streamproc.view")

#: Seconds between deltas to the page: the most updates a second a browser gets.
TICK_S = 0.25
#: Seconds between looks for frames due to be decoded.
FRAME_TICK_S = 0.05
#: A comment line keeps idle connections (and proxies) open.
HEARTBEAT_S = 15.0
#: Deltas queued for one page; a page that falls this far behind is disconnected (its
#: browser reconnects and gets a fresh snapshot), so a slow client holds no more.
CLIENT_QUEUE = 32
MAX_CLIENTS = 32
#: How far back the reader starts on the input topics (the newest frames and words).
INPUT_LOOKBACK_MS = 3000
#: Records handled between two yields to the event loop.
YIELD_EVERY = 200
#: Larger transcript records are not shown (decoding one would hold the loop).
MAX_TEXT_BYTES = 64 * 1024
COOKIE = "streamproc_view"
#: Host names a view bound to a loopback address answers to (a guard against DNS rebinding:
#: a web page whose name resolves to 127.0.0.1 must not read the streams).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
STATIC_TYPES = {"view.js": "text/javascript", "view.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class TopicKind(StrEnum):
    """The topics the view reads (``PREFIX.<kind>``)."""

    VIDEO = "video"
    AUDIO = "audio"
    TEXT = "text"
    PREDICTIONS = "predictions"
    DEADLETTER = "deadletter"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_urls(settings: Settings) -> list[str]:
    """``view_metrics_url`` as a list, each checked to be an http(s) URL."""
    urls = [u.strip() for u in settings.view_metrics_url.split(",") if u.strip()]
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"invalid setting view_metrics_url: {u!r} is not an http(s) URL "
                            "(e.g. http://127.0.0.1:9109/metrics)")
    return urls


def bind_warnings(settings: Settings) -> list[str]:
    """What to say before serving on anything but loopback."""
    if is_loopback(settings.view_host):
        return []
    lines = [f"warning: the view listens on {settings.view_host}, not on loopback: anyone "
             "who can reach this machine on port "
             f"{settings.view_port} can watch the streams"]
    if not settings.view_token:
        lines.append("warning: no --view-token is set, so nothing asks them who they are")
    return lines


def encode_json(obj: Any) -> str:
    """Strict JSON (browsers refuse NaN and Infinity): non-finite numbers become null."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _sse(event: str, obj: Any) -> bytes:
    return f"event: {event}\ndata: {encode_json(obj)}\n\n".encode()


def _read_static() -> dict[str, bytes]:
    root = importlib.resources.files("streamproc.view") / "static"
    return {name: (root / name).read_bytes() for name in ("index.html", *STATIC_TYPES)}


def _token_cookie(token: str) -> str:
    """What the cookie holds: derived from the token, so the token itself is not stored."""
    return hmac.new(token.encode(), b"streamproc-view", hashlib.sha256).hexdigest()


def _int_header(headers: dict[str, bytes], name: str) -> int | None:
    raw = headers.get(name)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


@dataclass(eq=False)
class _Client:
    """One connected page."""

    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    dropped: bool = False

    def send(self, msg: bytes | None) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped = True


class ViewServer:
    """The view of one topic prefix: ``await start()`` returns its URL, ``await stop()``.

    ``health_urls``: worker /metrics endpoints for the health panel (None: from
    ``settings.view_metrics_url``).
    """

    def __init__(self, settings: Settings, health_urls: list[str] | None = None) -> None:
        self.settings = settings
        self.urls = health_urls if health_urls is not None else metrics_urls(settings)
        self.static = _read_static()  # read here, before any event loop runs
        self.state = ViewState(settings.view_history_s * 1_000_000_000)
        self.throttle = FrameThrottle(settings.view_fps)
        self.thumbs: dict[str, Thumbnail] = {}
        self._versions: dict[str, int] = {}
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="view-work")
        self.clients: set[_Client] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.consumer: AIOKafkaConsumer | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""
        self._cookie = _token_cookie(settings.view_token) if settings.view_token else ""
        self._handlers: dict[str, Callable[[Any, int], None]] = {
            settings.topic(TopicKind.VIDEO): self._on_video,
            settings.topic(TopicKind.AUDIO): self._on_audio,
            settings.topic(TopicKind.TEXT): self._on_text,
            settings.topic(TopicKind.PREDICTIONS): self._on_prediction,
            settings.topic(TopicKind.DEADLETTER): self._on_dead_letter,
        }

    @property
    def config(self) -> dict[str, Any]:
        return {"prefix": self.settings.topic_prefix, "history_s": self.settings.view_history_s,
                "fps": self.settings.view_fps, "health": bool(self.urls)}

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, read_kafka: bool = True) -> str:
        """Open the reader (the topics must exist), bind, start the background tasks."""
        try:
            if read_kafka:
                self.consumer = await self._open_reader()
            self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
            await self.runner.setup()
            site = web.TCPSite(self.runner, self.settings.view_host, self.settings.view_port)
            try:
                await site.start()
            except OSError as e:
                raise UserError(f"cannot serve the view on {self.settings.view_host}:"
                                f"{self.settings.view_port}: {e.strerror or e} (another "
                                "port: --view-port)") from None
        except BaseException:
            await self.stop()
            raise
        port = self.runner.addresses[0][1]
        host = self.settings.view_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{port}/"
        self._spawn(self._tick())
        self._spawn(self._frames())
        self._spawn(HealthPoller(self.urls, self.state.on_health, self.pool).run())
        if self.consumer is not None:
            self._spawn(self._read(self.consumer))
        return self.url

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one task must not leave the page silently stale
                log.exception("view task failed")
                self.state.stats["task_failures"] += 1
        self.tasks.append(asyncio.create_task(guarded()))

    async def stop(self) -> None:
        for c in self.clients:
            c.send(None)
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.tasks.clear()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- Kafka ---------------------------------------------------------------------------

    async def _open_reader(self) -> AIOKafkaConsumer:
        settings = self.settings
        loop = asyncio.get_running_loop()
        states = await loop.run_in_executor(None, describe, settings,
                                            tuple(self._handlers))
        missing = [s.name for s in states if s.partitions is None]
        if missing:
            raise UserError(f"topic(s) {', '.join(missing)} do not exist (run `streamproc "
                            "topics create`, or check --topic-prefix)")
        tps = [TopicPartition(s.name, p) for s in states for p in range(s.partitions or 0)]
        consumer = kafka.aio_reader(settings)
        try:
            await consumer.start()
        except KafkaError as e:
            await consumer.stop()
            raise await loop.run_in_executor(None, kafka.connection_error, settings, e) \
                from None
        try:
            consumer.assign(tps)
            now_ms = time.time_ns() // NS_PER_MS
            history = (settings.topic(TopicKind.PREDICTIONS), settings.topic(TopicKind.DEADLETTER))
            since = {tp: now_ms - (settings.view_history_s * 1000 if tp.topic in history
                                   else INPUT_LOOKBACK_MS) for tp in tps}
            found_at = await consumer.offsets_for_times(since)
            at_end = []
            for tp in tps:
                hit = found_at.get(tp)
                if hit is None:
                    at_end.append(tp)
                else:
                    consumer.seek(tp, hit.offset)
            if at_end:
                await consumer.seek_to_end(*at_end)
        except BaseException:
            await consumer.stop()
            raise
        log.info("reading %d partitions of %s.*", len(tps), settings.topic_prefix)
        return consumer

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        handled = 0
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=500)
            now = time.time_ns()
            for tp, msgs in batch.items():
                handle = self._handlers[tp.topic]
                for msg in msgs:
                    self.state.stats["records"] += 1
                    try:
                        handle(msg, now)
                    except (WireError, ValueError, KeyError, TypeError) as e:
                        self.state.stats["unreadable"] += 1
                        log.debug("unreadable record %s[%d]@%d: %s", msg.topic,
                                  msg.partition, msg.offset, e)
                    handled += 1
                    if handled % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a backlog must not hold the page's requests

    def _on_video(self, msg: Any, now: int) -> None:
        # headers only: the picture is checked when (and if) it is decoded, off the loop
        sid = stream_id_of(msg.key)
        h = dict(normalize_headers(msg.headers))
        ts = _int_header(h, "sp-ts")
        if h.get("sp-mod") != b"video" or ts is None or not msg.value:
            raise WireError("not a video record")
        self.state.on_media(sid, "video", now)
        fmt = h.get("sp-fmt", b"jpeg").decode("ascii", "replace")
        self.throttle.offer(sid, PendingFrame(msg.value, fmt, ts))

    def _on_audio(self, msg: Any, now: int) -> None:
        rec = decode(KafkaRecord.from_client(msg), expect_modality="audio",
                     max_bytes=self.settings.max_message_bytes)
        self.state.on_media(rec.stream_id, "audio", now)

    def _on_text(self, msg: Any, now: int) -> None:
        seg = decode(KafkaRecord.from_client(msg), expect_modality="text",
                     max_bytes=MAX_TEXT_BYTES)
        if not isinstance(seg, TranscriptSegment):
            raise WireError("not a transcript segment")
        self.state.on_text(seg.stream_id, seg.start_ns, seg.end_ns, seg.text, now)

    def _on_prediction(self, msg: Any, now: int) -> None:
        self.state.on_prediction(decode_prediction(KafkaRecord.from_client(msg)), now)

    def _on_dead_letter(self, msg: Any, now: int) -> None:
        dl = decode_dead_letter(KafkaRecord.from_client(msg))
        try:
            sid: str | None = stream_id_of(dl.original.key)
        except WireError:
            sid = None
        ts = _int_header(dict(dl.original.headers), "sp-ts")
        if ts is None and dl.original.timestamp_ms is not None:
            ts = dl.original.timestamp_ms * NS_PER_MS
        self.state.on_dead_letter(sid, dl.kind, dl.reason, dl.source.topic, ts, now)

    # --- frames --------------------------------------------------------------------------

    async def _frames(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for sid, frame in self.throttle.due(time.monotonic()):
                fut = self.pool.submit(thumbnail, frame.data, frame.fmt,
                                       self.settings.max_frame_pixels)
                fut.add_done_callback(functools.partial(_on_loop, loop, self._thumbnail_done,
                                                        sid, frame.ts_ns))
            await asyncio.sleep(FRAME_TICK_S)

    def _thumbnail_done(self, sid: str, ts_ns: int, fut: Future[Thumbnail]) -> None:
        self.throttle.done(sid)
        if fut.cancelled():
            return
        try:
            thumb = fut.result()
        except ValueError:
            self.state.stats["frames_undecodable"] += 1
            return
        if sid not in self.state.streams:
            return
        self.state.stats["frames_shown"] += 1
        self.thumbs[sid] = thumb
        v = self._versions[sid] = self._versions.get(sid, 0) + 1
        self.state.on_frame(sid, FrameInfo(v, thumb.width, thumb.height, ts_ns),
                            time.time_ns())

    # --- to the pages --------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            delta = self.state.take_delta(time.time_ns())
            if delta is None:
                continue
            for sid in delta.get("removed", ()):
                self.thumbs.pop(sid, None)
                self._versions.pop(sid, None)
                self.throttle.forget(sid)
            msg = _sse("delta", delta)
            for c in self.clients:
                c.send(msg)

    async def _snapshot_json(self) -> str:
        snap = self.state.snapshot(time.time_ns(), self.config)  # copies, taken on the loop
        return await asyncio.get_running_loop().run_in_executor(self.pool, encode_json, snap)

    # --- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_security_headers, self._host_guard, self._auth],
                              client_max_size=4096)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get("/api/frame", self._api_frame)
        app.router.add_get("/healthz", self._healthz)
        return app

    @web.middleware
    async def _host_guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if is_loopback(self.settings.view_host) and request.path != "/healthz":
            try:
                name = (urlsplit(f"//{request.host}").hostname or "").lower()
            except ValueError:
                name = ""
            if name not in LOOPBACK_NAMES and not is_loopback(name):
                raise web.HTTPForbidden(text="this view answers requests addressed to "
                                        "localhost only (it listens on loopback)\n")
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not self._cookie or request.path == "/healthz":
            return await handler(request)
        given = request.query.get("token")
        by_query = given is not None and hmac.compare_digest(
            given.encode(), self.settings.view_token.encode())
        bearer = request.headers.get("Authorization", "")
        ok = by_query or hmac.compare_digest(request.cookies.get(COOKIE, "").encode(),
                                             self._cookie.encode()) or (
            bearer.startswith("Bearer ") and hmac.compare_digest(
                bearer[7:].encode(), self.settings.view_token.encode()))
        if not ok:
            raise web.HTTPUnauthorized(
                text="this view needs its token: open /?token=TOKEN once, or send "
                     "Authorization: Bearer TOKEN\n", headers={"WWW-Authenticate": "Bearer"})
        if by_query and request.path == "/":
            # the token leaves the address bar (and the browser's history) at once
            resp: web.StreamResponse = web.Response(status=303, headers={"Location": "/"})
        else:
            resp = await handler(request)
        if by_query:
            resp.set_cookie(COOKIE, self._cookie, httponly=True, samesite="Strict", path="/")
        return resp

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.static["index.html"], content_type="text/html",
                            charset="utf-8", headers={"Cache-Control": "no-store"})

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_TYPES:
            raise web.HTTPNotFound()
        return web.Response(body=self.static[name], content_type=STATIC_TYPES[name],
                            charset="utf-8", headers={"Cache-Control": "no-cache"})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _api_state(self, request: web.Request) -> web.Response:
        return web.Response(text=await self._snapshot_json(), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _api_frame(self, request: web.Request) -> web.Response:
        thumb = self.thumbs.get(request.query.get("stream", ""))
        if thumb is None:
            raise web.HTTPNotFound(text="no frame of this stream yet\n")
        return web.Response(body=thumb.jpeg, content_type="image/jpeg",
                            headers={"Cache-Control": "no-store"})

    async def _api_events(self, request: web.Request) -> web.StreamResponse:
        if len(self.clients) >= MAX_CLIENTS:
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_CLIENTS} pages at once\n")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        client = _Client()
        # subscribed before the snapshot is taken, so no change falls between the two
        self.clients.add(client)
        try:
            await resp.write(b"retry: 2000\n\n")
            body = await self._snapshot_json()
            await resp.write(f"event: snapshot\ndata: {body}\n\n".encode())
            while not client.dropped:
                try:
                    msg = await asyncio.wait_for(client.queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    msg = b": ping\n\n"
                if msg is None:
                    break
                await resp.write(msg)
        except ConnectionError:
            pass  # the page went away
        finally:
            self.clients.discard(client)
        return resp


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None],
             *args: Any) -> None:
    """Run ``callback(*args)`` on ``loop`` from a pool thread, unless the loop has closed
    (the view stopped while a frame was being decoded)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


@web.middleware
async def _security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        e.headers.update(SECURITY_HEADERS)
        raise
    if not resp.prepared:
        resp.headers.update(SECURITY_HEADERS)
    return resp


# ---------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------


def run_view(settings: Settings, out: TextIO = sys.stdout) -> int:
    """``streamproc view``: serve until Ctrl-C or SIGTERM."""
    server = ViewServer(settings)
    for line in bind_warnings(settings):
        print(line, file=sys.stderr, flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = await server.start()
        health = (f"; worker health from {', '.join(server.urls)}" if server.urls
                  else "; no worker health (--view-metrics-url)")
        token = "; asks for --view-token" if settings.view_token else ""
        print(f"streamproc view: {url} (topics {settings.topic_prefix}.*{health}{token}; "
              "Ctrl-C stops)", file=out, flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())
    return 0
