"""The engine's local API: HTTP + WebSocket, on 127.0.0.1 unless the user says otherwise.

    GET  /api/status     the status message (JSON)
    GET  /api/styles     the style names and descriptions
    POST /api/command    a command message (Content-Type: application/json) -> its reply
    POST /api/style-image a style picture's bytes (Content-Type: image/png, image/jpeg or image/webp; at
                         most 8 MiB: 413 beyond) -> a reply once it is in the stream (IP-Adapter);
                         ``clear_style_image`` and ``set_style_image_scale`` are commands
    POST /api/login      the token (Authorization: Bearer) -> an HttpOnly, SameSite=Strict cookie
                         that stands for it (a browser page's way to keep the token out of URLs)
    GET  /api/ws         WebSocket: status on connect, on change and once a second; send commands,
                         get replies
    GET  /dock           the dock page (plugin/), for OBS's Custom Browser Docks or any browser
    GET  /output         a page that shows the output (an OBS Browser Source)
    GET  /stream.mjpg    the output as multipart MJPEG (an OBS Media Source, a browser <img>)
    GET  /snapshot.jpg   the latest output frame

``quit`` (stop the engine as Ctrl-C does) is taken only from a peer on this machine's loopback
whose request no proxy relayed (no Forwarded/X-Forwarded-For/X-Real-IP header), with the token
where the API has one; never over obs-websocket or a remote data channel.

Bound beyond loopback, every request needs the token (``Authorization: Bearer TOKEN``,
``?token=TOKEN``, or the cookie /api/login sets; control/auth.py). Wrong tokens are slowed down per
client address after a few. On loopback the Host header must name this machine (a web page elsewhere cannot
reach the API through DNS rebinding), commands must be JSON (a cross-site form cannot post one),
and a WebSocket from a browser must come from this server's own pages.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import re
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, UserError
from ..io.sinks import Sink
from .auth import COOKIE_PREFIX, MAX_WAIT_S, WrongTokenBrake, client_key, cookie_ok, cookie_value
from .controller import Pacer
from .schema import APP, MAX_MESSAGE_BYTES, TOO_LARGE, VERSION, reply_message, status_message

# What the HTTP and WebSocket transports read in one message before the command schema judges it:
# a message over MAX_MESSAGE_BYTES gets the schema's one-line refusal and the connection stays;
# only a message beyond this (a runaway client, not a command) closes the socket, as obs-websocket
# does beyond its own limit: the same line as a reply first, then the close (1009) with it as reason.
MAX_TRANSPORT_BYTES = 16 * 1024 * 1024
PICTURE_TYPES = ("image/png", "image/jpeg", "image/webp")  # what POST /api/style-image takes
BODY_TIMEOUT_S = 30.0  # a request body (a command, an SDP offer) not all in by then is refused (408)

log = logging.getLogger("live2diff.api")

DEFAULT_PORT = 8765
BOUNDARY = "live2diffframe"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
          ".png": "image/png", ".json": "application/json", ".ico": "image/x-icon"}

OUTPUT_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Live2Diff output</title>
<style>html,body{margin:0;height:100%;background:#000;overflow:hidden}
img{width:100%;height:100%;object-fit:contain;display:block}</style></head>
<body><img id="out" alt="Live2Diff output" src="stream.mjpg{query}">
<script>
// Reconnect the stream if the engine restarts.
const img = document.getElementById('out');
img.onerror = () => setTimeout(() => { img.src = 'stream.mjpg{query}' + ('{query}' ? '&' : '?') + 't=' + Date.now(); }, 1000);
</script></body></html>
"""


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Headers a reverse proxy adds: a request carrying one came from elsewhere, whatever its peer.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def peer_is_local(remote: str | None, headers=None) -> bool:
    """Whether a request comes from this machine itself: its peer address is loopback (an
    IPv4-mapped IPv6 one too) and no proxy relayed it. An unknown peer is not local."""
    if not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    if not (addr.is_loopback or (mapped is not None and mapped.is_loopback)):
        return False
    return not any(h in (headers or {}) for h in PROXY_HEADERS)


def dock_dir() -> Path | None:
    """The dock page's folder: plugin/ of the source checkout this code runs from, or the installed
    package's. The checkout's first: an editable install maps the package to the checkout it was
    made from, which need not be this one (a second worktree run with PYTHONPATH)."""
    path = Path(__file__).resolve().parents[2] / "plugin"
    if (path / "dock.html").is_file():
        return path
    try:
        from importlib.resources import files

        path = Path(str(files("live2diff_engine.plugin")))
        if (path / "dock.html").is_file():
            return path
    except Exception:
        pass
    return None


class BodyError(Exception):
    """A request body that cannot be used: ``status`` (413, 408, 400) and one line saying why."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


async def read_body(request, limit: int, what: str = "the request body", timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The whole body of ``request``, however it comes: with a Content-Length or chunked, in one
    TCP segment or many with pauses between them (``request.content.read(n)`` would return only
    what has arrived so far). At most ``limit`` bytes: a Content-Length above it is refused (413)
    before a byte of the body is read, a chunked body as soon as it passes it. A body not all in
    within ``timeout`` seconds is refused (408), so a sender that trickles holds nothing for long."""
    length = request.content_length
    too_large = BodyError(413, f"{what} is too large (at most {limit} bytes)")
    if length is not None and length > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(request.content.readany(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise BodyError(408, f"{what} did not arrive within {timeout:.0f} s; send it whole") from None
        except Exception as exc:  # the sender went away, or its chunked encoding is broken
            raise BodyError(400, f"{what} could not be read ({type(exc).__name__}); send it again") from None
        if not chunk:
            return bytes(body)
        body.extend(chunk)
        if len(body) > limit:
            raise too_large


def _on_this_loop(deliver):
    """A reply function any thread may call: it hands the reply to ``deliver`` on the running loop
    (nothing once that loop has closed)."""
    loop = asyncio.get_running_loop()

    def reply(msg: dict) -> None:
        try:
            loop.call_soon_threadsafe(deliver, msg)
        except RuntimeError:
            pass

    return reply


class StreamSink(Sink):
    """Holds the newest output frame for the MJPEG stream; JPEG encoding happens on the API's
    side, once per frame and only while someone watches. Takes the 'no signal' cards too."""

    paced = False
    takes_cards = True
    name = "local stream"

    def __init__(self, quality: int = 85, max_fps: float | None = None):
        self.quality = quality
        self.max_fps = max_fps  # the output's frame rate: no viewer is sent parts faster than this
        self._lock = threading.Lock()
        self._frame: np.ndarray | None = None
        self._seq = 0
        self._jpeg: tuple[int, bytes] | None = None
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def send(self, frame: np.ndarray) -> None:
        with self._lock:
            self._frame = frame
            self._seq += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                pass

    @property
    def seq(self) -> int:
        return self._seq

    def wake_all(self) -> None:
        """Wakes every viewer waiting for a frame (the server is closing)."""
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    def jpeg(self) -> tuple[int, bytes] | None:
        """(sequence number, JPEG bytes) of the newest frame, encoded at most once."""
        import cv2

        with self._lock:
            frame, seq, cached = self._frame, self._seq, self._jpeg
        if frame is None:
            return None
        if cached is not None and cached[0] == seq:
            return cached
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frame[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            return None
        out = (seq, buf.tobytes())
        with self._lock:
            if self._jpeg is None or self._jpeg[0] < seq:
                self._jpeg = out
        return out

    async def wait_newer(self, seq: int, timeout: float) -> bool:
        if self._seq > seq:
            return True
        event = asyncio.Event()
        key = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(key)
        try:
            if self._seq > seq:
                return True
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                return False
            return True
        finally:
            with self._lock:
                self._waiters.discard(key)


class ApiServer:
    """Runs in its own thread with its own event loop; ``start()`` returns once it listens."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None, controller=None):
        if not is_loopback(host) and not token:
            raise ConfigError(
                f"the API is bound to {host}, beyond this machine: give a token with --api-token or "
                "LIVE2DIFF_API_TOKEN (or keep the default --api-host 127.0.0.1)"
            )
        self.host, self.port, self.token = host, port, token or None
        self.controller = controller
        self.stream = StreamSink()
        self.dock = dock_dir()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._sockets: set = set()
        self._changed: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._closing = False  # set by stop(): viewers' streams end, so the server closes at once
        self.commands_seen = 0
        self.status_times: list[float] = []  # when (monotonic) GET /api/status was answered, the last 100
        self.frames_served = 0  # MJPEG parts written, over all viewers
        self._readers = {"obs": 0, "other": 0}  # open /stream.mjpg connections (OBS's source asks with ?client=obs)
        self._http_pacer = Pacer()
        self._brake = WrongTokenBrake()  # wrong tokens per client address: slowed after a few
        # Set before start(): more routes (``fn(app)``, e.g. the WebRTC endpoints of `serve`), and
        # an ssl.SSLContext for HTTPS (--tls-cert/--tls-key).
        self.extra_routes: list = []
        self.ssl_context = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("localhost" if self.host == "::" else self.host)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context is not None else 'http'}://{host}:{self.port}"

    def start(self) -> "ApiServer":
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()
        self._started.wait(15)
        if self._error is not None:
            err = self._error
            if isinstance(err, OSError):
                raise UserError(
                    f"cannot listen on {self.host}:{self.port} ({str(err.strerror or err).rsplit(': ', 1)[-1]}); "
                    "is another engine running? "
                    "choose another --api-port (0 picks a free one), or --no-api to turn the API off"
                ) from None
            raise err
        if not self._started.is_set():
            raise UserError("the local API did not start within 15 s")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        # Viewers' streams end at once (below), so this takes milliseconds; the bounds only keep
        # a wedged client from holding the engine's exit.
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            fut.result(2)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(1)
        self._loop = None

    def set_controller(self, controller) -> None:
        self.controller = controller
        controller.api_url = self.url
        controller.stream_clients = self.stream_clients
        controller.add_listener(self.notify_changed)
        self.notify_changed()

    def stream_clients(self, who: str | None = None) -> int:
        """How many clients read /stream.mjpg now: ``who="obs"`` only the engine's OBS source
        (it asks with ``?client=obs``), None all of them."""
        readers = self._readers
        return readers.get(who, 0) if who else sum(readers.values())

    def notify_changed(self) -> None:
        loop, event = self._loop, self._changed
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application(middlewares=[self._middleware()], client_max_size=MAX_TRANSPORT_BYTES)
        app.router.add_get("/", self._root)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/styles", self._styles)
        app.router.add_post("/api/command", self._command)
        app.router.add_post("/api/style-image", self._style_image)
        app.router.add_post("/api/login", self._login)
        app.router.add_get("/api/ws", self._ws)
        app.router.add_get("/dock", self._dock_page)
        app.router.add_get("/dock/{name}", self._dock_file)
        app.router.add_get("/output", self._output_page)
        app.router.add_get("/stream.mjpg", self._mjpeg)
        app.router.add_get("/snapshot.jpg", self._snapshot)
        for add_routes in self.extra_routes:
            add_routes(app)
        self._changed = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]
        self._broadcast_task = asyncio.get_running_loop().create_task(self._broadcaster())

    async def _login(self, request):
        """The token (Authorization: Bearer) traded for a cookie a browser keeps out of URLs
        (control/auth.py says why a cookie); past the guard, so the token is right."""
        from aiohttp import web

        resp = web.Response(status=204, headers={"Cache-Control": "no-store"})
        if self.token:
            resp.set_cookie(self.cookie_name, cookie_value(self.token), path="/", httponly=True, samesite="Strict",
                            secure=self.ssl_context is not None or request.secure)
        return resp

    async def _root(self, request):
        from aiohttp import web

        raise web.HTTPFound(self._with_token("/dock", request))

    async def _shutdown(self) -> None:
        self._closing = True
        self.stream.wake_all()  # MJPEG viewers (OBS's Media Source) end their streams
        if self._changed is not None:
            self._changed.set()  # and the broadcaster its loop
        task = getattr(self, "_broadcast_task", None)
        if task is not None:
            # Python 3.11's wait_for can swallow a cancel that meets a wake-up (the engine's last
            # "changed"); the loop ends by itself on _closing, and this wait is bounded either way.
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        # The dock's last word: stopped, not lost; and no frame rate or latency of a stream that ended.
        last = json.dumps({**self.status(), "state": "stopped", "fps": 0.0, "fps_in": 0.0, "latency_ms": None})
        for ws in list(self._sockets):
            try:
                await asyncio.wait_for(ws.send_str(last), 0.5)
            except Exception:
                pass
            try:
                await ws.close()
            except Exception:
                pass
        if self._runner is not None:
            await self._runner.cleanup()

    # -- security ----------------------------------------------------------------------------------

    @property
    def cookie_name(self) -> str:
        return f"{COOKIE_PREFIX}{self.port}"

    def _auth(self, request) -> str | None:
        """How the request proves it may come in: "open" (no token set), "token" (the Authorization
        header or ?token=), "cookie" (the one /api/login sets); None: it does not."""
        if not self.token:
            return "open"
        given = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        if given:
            return "token" if hmac.compare_digest(given.encode(), self.token.encode()) else None
        return "cookie" if cookie_ok(request.cookies.get(self.cookie_name), self.token) else None

    def _token_ok(self, request) -> bool:
        return self._auth(request) is not None

    def _host_ok(self, request) -> bool:
        if not is_loopback(self.host):
            return True  # reachable by name from elsewhere; the token guards it
        host = request.host or ""
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name.strip("[]"))

    @staticmethod
    def _same_origin(request) -> bool:
        """No Origin (not a browser's cross-origin request), or this server's own (any scheme: a
        TLS proxy in front changes it)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        return origin.split("://", 1)[-1].rstrip("/") == (request.host or "")

    def _origin_ok(self, request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser: the OBS script, ctl, obs tools
            return True
        return origin in (f"http://{request.host}", self.url)

    def _middleware(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            if not self._host_ok(request):
                return web.json_response({"ok": False, "error": "unexpected Host header; use http://127.0.0.1"}, status=403)
            # The dock and studio pages hold nothing: the dock passes the token on, the studio trades it for a cookie.
            static = request.method == "GET" and (request.path in ("/dock", "/studio") or request.path.startswith("/dock/"))
            if static:
                return await handler(request)
            how = self._auth(request)
            key = client_key(request.remote)
            if how is None:
                wait = self._brake.failed(key)
                refusal = {"ok": False, "error": "missing or wrong token (Authorization: Bearer TOKEN or ?token=)"}
                if not await self._brake.hold(wait):
                    return web.json_response({**refusal, "error": "too many wrong tokens; try again later"}, status=429,
                                             headers={"Retry-After": str(int(MAX_WAIT_S))})
                return web.json_response(refusal, status=401, headers={"Retry-After": str(math.ceil(wait))} if wait else None)
            if how == "cookie" and not self._same_origin(request):  # a cookie another page of this host sent along
                return web.json_response({"ok": False, "error": "request from another site refused"}, status=403)
            return await handler(request)

        return guard

    def _with_token(self, path: str, request) -> str:
        token = request.query.get("token")
        return f"{path}?token={token}" if token and self.token else path

    # -- status and commands -----------------------------------------------------------------------

    def status(self) -> dict:
        if self.controller is None:
            return status_message({"state": "starting", "paused": False, "styles": [], "api_url": self.url, "obs": "off"})
        return self.controller.status_message()

    async def _status(self, request):
        from aiohttp import web

        self.status_times = [*self.status_times[-99:], time.monotonic()]
        return web.json_response(self.status())

    async def _styles(self, request):
        from aiohttp import web

        if self.controller is None:
            return web.json_response({"styles": []})
        styles = self.controller.manager.styles
        return web.json_response({"styles": [{"name": n, "description": styles[n].description} for n in sorted(styles)]})

    def _submit(self, raw, deliver, local: bool = False) -> None:
        """Hands ``raw`` to the controller; ``deliver(reply)`` runs on this loop. ``local``: the
        request came from this machine (``peer_is_local``), past the token check."""
        self.commands_seen += 1
        if self.controller is None:
            deliver(reply_message(None, False, "the engine is still starting; try again in a moment"))
            return
        self.controller.submit(raw, _on_this_loop(deliver), local=local)

    async def _command(self, request):
        from aiohttp import web

        if request.content_type != "application/json":
            return web.json_response(reply_message(None, False, "send the command as JSON (Content-Type: application/json)"), status=415)
        try:  # beyond the schema's limit the schema would refuse it: refused unread, in its words
            raw = await read_body(request, MAX_MESSAGE_BYTES, "the command")
        except BodyError as exc:
            return web.json_response(reply_message(None, False, TOO_LARGE if exc.status == 413 else exc.text),
                                     status=exc.status)
        fut = asyncio.get_running_loop().create_future()

        def deliver(msg):
            if not fut.done():
                fut.set_result(msg)

        wait = self._http_pacer.delay()
        if wait:
            await asyncio.sleep(wait)

        self._submit(raw, deliver, local=peer_is_local(request.remote, request.headers))
        try:
            msg = await asyncio.wait_for(fut, 120)
        except asyncio.TimeoutError:
            return web.json_response(reply_message(None, False, "the engine did not answer within 120 s"), status=504)
        status = 200 if msg.get("ok") else (503 if self.controller is None else 413 if msg.get("error") == TOO_LARGE else 400)
        return web.json_response(msg, status=status)

    async def _style_image(self, request):
        """A style picture as the request's body: its type one of PICTURE_TYPES (a cross-site form
        cannot send those), its size capped (413 before the body is read when its length says so),
        decoded by OpenCV's image codecs on the controller's encoding thread. The reply comes once
        the picture steers the stream, or with why not (400); the engine streams on either way."""
        from aiohttp import web

        from ..models.ip_adapter import MAX_PICTURE_BYTES

        if request.content_type not in PICTURE_TYPES:
            return web.json_response(reply_message(None, False, f"send the picture's bytes as {', '.join(PICTURE_TYPES)} "
                                                   f"(got {request.content_type or 'no Content-Type'})"), status=415)
        try:
            data = await read_body(request, MAX_PICTURE_BYTES, "the style picture")
        except BodyError as exc:
            return web.json_response(reply_message(None, False, exc.text), status=exc.status)
        if self.controller is None:
            return web.json_response(reply_message(None, False, "the engine is still starting; try again in a moment"), status=503)
        fut = asyncio.get_running_loop().create_future()

        def deliver(msg):
            if not fut.done():
                fut.set_result(msg)

        wait = self._http_pacer.delay()
        if wait:
            await asyncio.sleep(wait)
        self.controller.submit_style_image(data, _on_this_loop(deliver))
        try:
            msg = await asyncio.wait_for(fut, 120)
        except asyncio.TimeoutError:
            return web.json_response(reply_message(None, False, "the engine did not answer within 120 s"), status=504)
        return web.json_response(msg, status=200 if msg.get("ok") else 400)

    async def _ws(self, request):
        from aiohttp import WSMsgType, web

        if not self._origin_ok(request):
            return web.json_response({"ok": False, "error": "WebSocket from another site refused"}, status=403)
        ws = _ApiWebSocket(heartbeat=20, max_msg_size=MAX_TRANSPORT_BYTES)
        await ws.prepare(request)
        self._sockets.add(ws)
        outbox: asyncio.Queue = asyncio.Queue(maxsize=4096)

        def deliver(msg):
            try:
                outbox.put_nowait(msg)
            except asyncio.QueueFull:
                pass  # a client that never reads loses replies, not the engine

        async def writer():
            while True:
                msg = await outbox.get()
                await ws.send_str(json.dumps(msg))

        w = asyncio.get_running_loop().create_task(writer())
        pacer = Pacer()
        local = peer_is_local(request.remote, request.headers)
        try:
            await ws.send_str(json.dumps(self.status()))
            async for msg in ws:
                wait = pacer.delay()
                if wait:
                    await asyncio.sleep(wait)
                if msg.type == WSMsgType.TEXT:
                    self._submit(msg.data, deliver, local)
                elif msg.type == WSMsgType.BINARY:
                    self._submit(bytes(msg.data), deliver, local)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets.discard(ws)
            w.cancel()
        return ws

    async def _broadcaster(self) -> None:
        """Status to every WebSocket client: at once on a change (at most every 0.1 s) and every second."""
        while not self._closing:
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._changed.clear()
            if self._sockets:
                text = json.dumps(self.status())
                for ws in list(self._sockets):
                    try:
                        # Waits only when the client left tens of statuses unread: it is gone or
                        # stuck. Closing it (rather than just no longer sending) lets a client
                        # that recovers see the close and reconnect at once.
                        await asyncio.wait_for(ws.send_str(text), 2.0)
                    except Exception:
                        self._sockets.discard(ws)
                        asyncio.get_running_loop().create_task(self._close_quietly(ws))
            await asyncio.sleep(0.1)

    @staticmethod
    async def _close_quietly(ws) -> None:
        try:
            await asyncio.wait_for(ws.close(), 5.0)
        except Exception:
            pass

    # -- pages and the stream ----------------------------------------------------------------------

    async def _dock_page(self, request):
        return await self._serve_file("dock.html")

    async def _dock_file(self, request):
        return await self._serve_file(request.match_info["name"])

    async def _serve_file(self, name: str):
        from aiohttp import web

        if self.dock is None:
            return web.Response(status=404, text="the dock page is not installed (plugin/ is missing)")
        if not _STATIC_NAME.match(name) or ".." in name:
            return web.Response(status=404, text="not found")
        path = self.dock / name
        if not path.is_file() or path.resolve().parent != self.dock.resolve():
            return web.Response(status=404, text="not found")
        ctype = _TYPES.get(path.suffix, "application/octet-stream")
        charset = "utf-8" if ctype.startswith("text/") else None
        return web.Response(body=path.read_bytes(), content_type=ctype, charset=charset, headers={"Cache-Control": "no-cache"})

    async def _output_page(self, request):
        from aiohttp import web

        token = request.query.get("token") if self.token else None
        params = [f"token={token}"] if token else []
        if request.query.get("client") == "obs":  # OBS's Browser Source: its stream counts as OBS's
            params.append("client=obs")
        query = "?" + "&".join(params) if params else ""
        return web.Response(text=OUTPUT_PAGE.replace("{query}", query), content_type="text/html")

    async def _snapshot(self, request):
        from aiohttp import web

        got = await asyncio.get_running_loop().run_in_executor(None, self.stream.jpeg)
        if got is None:
            return web.Response(status=503, text="no frame yet")
        return web.Response(body=got[1], content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def _mjpeg(self, request):
        from aiohttp import web

        resp = web.StreamResponse(headers={
            "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            "Cache-Control": "no-store", "Pragma": "no-cache", "Connection": "close",
        })
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        seq = -1
        who = "obs" if request.query.get("client") == "obs" else "other"
        self._readers[who] += 1
        self._readers_changed()
        sent_at = None
        try:
            while not self._closing:
                if not await self.stream.wait_newer(seq, 5.0) and seq >= 0:
                    continue  # nothing new: keep the connection, send when a frame comes
                # Never faster than the output's frame rate (10% slack for jitter): frames that come
                # quicker are skipped, and the newest goes out. OBS's Media Source needs no resends
                # while nothing new comes (its reader has no timeout of its own).
                if self.stream.max_fps and sent_at is not None:
                    wait = sent_at + 0.9 / self.stream.max_fps - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if self._closing:
                    break
                got = await loop.run_in_executor(None, self.stream.jpeg)
                if got is None:
                    await asyncio.sleep(0.05)
                    continue
                seq, data = got
                head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                await resp.write(head + data + b"\r\n")
                sent_at = loop.time()
                self.frames_served += 1
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._readers[who] -= 1
            self._readers_changed()
        return resp

    def _readers_changed(self) -> None:
        if self.controller is not None:  # the status carries the count; the OBS bridge watches it
            self.controller.changed()


def _api_websocket_class():
    from aiohttp import WSCloseCode, web

    class ApiWebSocket(web.WebSocketResponse):
        """The API's WebSocket. A message beyond MAX_TRANSPORT_BYTES makes aiohttp close the
        socket (1009) from inside ``receive()``, with no word of why; this says it first, as HTTP
        does with its 413: the schema's one-line refusal as a reply on the socket, then the close
        with that line as its reason."""

        async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
            if code == WSCloseCode.MESSAGE_TOO_BIG and not message and not self.closed:
                try:
                    await asyncio.wait_for(self.send_str(json.dumps(reply_message(None, False, TOO_LARGE))), 2.0)
                except Exception:  # the client is gone: the close says the rest, if it can
                    pass
                message = TOO_LARGE.encode()[:123]  # a close reason holds at most 123 bytes
            return await super().close(code=code, message=message, drain=drain)

    return ApiWebSocket


_API_WS = None


def _ApiWebSocket(**kw):
    global _API_WS
    if _API_WS is None:  # aiohttp is imported only once the API runs
        _API_WS = _api_websocket_class()
    return _API_WS(**kw)


def api_token_from_env(value: str | None) -> str | None:
    import os

    return value or os.environ.get("LIVE2DIFF_API_TOKEN") or None


__all__ = ["ApiServer", "BodyError", "read_body", "StreamSink", "DEFAULT_PORT", "APP", "VERSION", "dock_dir", "is_loopback", "peer_is_local"]
