"""A protocol-faithful obs-websocket v5 server for tests (no OBS needed).

It speaks the real wire protocol (JSON encoding, ``obswebsocket.json`` subprotocol, the real opcodes,
close codes and request status codes) and keeps a small in-memory OBS state: scenes with scene items,
inputs (kind, settings, audio sync offset) and the current program scene.  The behaviour follows the
obs-websocket sources (src/websocketserver/WebSocketServer*.cpp, src/requesthandler/*) of the version it
reports, ``5.1.0`` by default: that is what OBS 29 (Debian 12) ships.  Fields that only exist from
obs-websocket 5.4.0 on (``inputUuid``, ``sceneUuid``, ``sourceUuid``, ``sceneName`` in
``GetCurrentProgramScene``, UUID lookups) appear only when ``ws_version`` is 5.4.0 or later.

Usage::

    with FakeOBS(password="secret") as obs:          # binds a free port on 127.0.0.1
        client = obsws_python.ReqClient(host=obs.host, port=obs.port, password=obs.password)
        ...
        obs.wait_for(lambda: obs.custom_events)
        obs.stop(); obs.start()                      # "OBS restarted", same port, same state

The server runs on its own asyncio loop in a background thread (aiohttp).  Every public attribute and
method may be called from any thread.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import WSMsgType, web

__all__ = [
    "FakeOBS",
    "FakeOBSRequestError",
    "OpCode",
    "CloseCode",
    "RequestStatus",
    "EventSubscription",
    "DEBIAN_OBS29_INPUT_KINDS",
    "auth_string",
]



# Waiting is not judging: a busy machine may take long; only a wait that never ends is a failure.
WAIT_FLOOR_S = 60.0


class OpCode:
    HELLO = 0
    IDENTIFY = 1
    IDENTIFIED = 2
    REIDENTIFY = 3
    EVENT = 5
    REQUEST = 6
    REQUEST_RESPONSE = 7
    REQUEST_BATCH = 8
    REQUEST_BATCH_RESPONSE = 9


class CloseCode:
    GOING_AWAY = 1001  # what OBS sends to every client when its server stops
    UNKNOWN_REASON = 4000
    MESSAGE_DECODE_ERROR = 4002
    MISSING_DATA_FIELD = 4003
    INVALID_DATA_FIELD_TYPE = 4004
    INVALID_DATA_FIELD_VALUE = 4005
    UNKNOWN_OP_CODE = 4006
    NOT_IDENTIFIED = 4007
    ALREADY_IDENTIFIED = 4008
    AUTHENTICATION_FAILED = 4009
    UNSUPPORTED_RPC_VERSION = 4010
    SESSION_INVALIDATED = 4011
    UNSUPPORTED_FEATURE = 4012


class RequestStatus:
    SUCCESS = 100
    MISSING_REQUEST_TYPE = 203
    UNKNOWN_REQUEST_TYPE = 204
    GENERIC_ERROR = 205
    UNSUPPORTED_REQUEST_BATCH_EXECUTION_TYPE = 206
    NOT_READY = 207
    MISSING_REQUEST_FIELD = 300
    MISSING_REQUEST_DATA = 301
    INVALID_REQUEST_FIELD = 400
    INVALID_REQUEST_FIELD_TYPE = 401
    REQUEST_FIELD_OUT_OF_RANGE = 402
    REQUEST_FIELD_EMPTY = 403
    TOO_MANY_REQUEST_FIELDS = 404
    RESOURCE_NOT_FOUND = 600
    RESOURCE_ALREADY_EXISTS = 601
    INVALID_RESOURCE_TYPE = 602
    NOT_ENOUGH_RESOURCES = 603
    INVALID_RESOURCE_STATE = 604
    INVALID_INPUT_KIND = 605
    RESOURCE_NOT_CONFIGURABLE = 606
    RESOURCE_CREATION_FAILED = 700
    RESOURCE_ACTION_FAILED = 701
    REQUEST_PROCESSING_FAILED = 702
    CANNOT_ACT = 703


class EventSubscription:
    NONE = 0
    GENERAL = 1 << 0
    CONFIG = 1 << 1
    SCENES = 1 << 2
    INPUTS = 1 << 3
    TRANSITIONS = 1 << 4
    FILTERS = 1 << 5
    OUTPUTS = 1 << 6
    SCENE_ITEMS = 1 << 7
    MEDIA_INPUTS = 1 << 8
    VENDORS = 1 << 9
    UI = 1 << 10
    ALL = (1 << 11) - 1  # all low-volume categories: the default a client gets if it sends none
    INPUT_VOLUME_METERS = 1 << 16
    INPUT_ACTIVE_STATE_CHANGED = 1 << 17
    INPUT_SHOW_STATE_CHANGED = 1 << 18
    SCENE_ITEM_TRANSFORM_CHANGED = 1 << 19


# GetInputKindList on Debian 12's OBS 29 build (no browser source, Linux capture plugins).
DEBIAN_OBS29_INPUT_KINDS = (
    "image_source",
    "color_source_v3",
    "slideshow",
    "xshm_input",
    "pulse_input_capture",
    "pulse_output_capture",
    "v4l2_input",
    "ffmpeg_source",
    "text_ft2_source_v2",
)

# Input kinds whose sources carry audio (OBS_SOURCE_AUDIO in their output flags).  Audio sync offset
# requests on any other input answer 604 InvalidResourceState, as real OBS does.
AUDIO_INPUT_KINDS = frozenset(
    {
        "pulse_input_capture",
        "pulse_output_capture",
        "alsa_input_capture",
        "jack_input_client",
        "jack_output_capture",
        "ffmpeg_source",
        "vlc_source",
        "browser_source",
        "wasapi_input_capture",
        "wasapi_output_capture",
        "wasapi_process_output_capture",
        "coreaudio_input_capture",
        "coreaudio_output_capture",
        "dshow_input",
        "av_capture_input",
        "av_capture_input_v2",
    }
)

_SUPPORTED_IMAGE_FORMATS = [
    "bmp", "cur", "icns", "ico", "jfif", "jpeg", "jpg", "pbm", "pgm", "png", "ppm",
    "tif", "tiff", "wbmp", "webp", "xbm", "xpm",
]  # fmt: skip

_SERVER_STOPPING = "Server stopping."


def auth_string(password: str, salt: str, challenge: str) -> str:
    """The Identify ``authentication`` value: base64(sha256(base64(sha256(password + salt)) + challenge))."""
    secret = base64.b64encode(hashlib.sha256((password + salt).encode()).digest()).decode()
    return base64.b64encode(hashlib.sha256((secret + challenge).encode()).digest()).decode()


def _random_b64() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _unversioned(kind: str) -> str:
    return re.sub(r"_v\d+$", "", kind)


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class FakeOBSRequestError(Exception):
    """Raise from a handler (built-in or installed with ``FakeOBS.set_handler``) to fail a request."""

    def __init__(self, code: int, comment: str = ""):
        super().__init__(f"{code}: {comment}")
        self.code = code
        self.comment = comment


_Err = FakeOBSRequestError


@dataclass
class _Input:
    name: str
    kind: str
    uuid: str
    settings: dict
    sync_offset_ms: int = 0


@dataclass
class _SceneItem:
    item_id: int
    source_name: str
    enabled: bool = True
    locked: bool = False


@dataclass
class _Scene:
    name: str
    uuid: str
    items: list = field(default_factory=list)  # bottom to top, as obs_scene_enum_items walks them
    next_item_id: int = 1


@dataclass
class _Session:
    ws: web.WebSocketResponse
    transport: Any
    remote: str
    challenge: str | None
    identified: bool = False
    rpc_version: int = 0
    subscriptions: int = EventSubscription.ALL
    incoming: int = 0
    outgoing: int = 0


class _Request:
    """requestData with obs-websocket's validation rules (rpc/Request.cpp)."""

    def __init__(self, data: Any):
        self.has_data = isinstance(data, dict)
        self.data = data if isinstance(data, dict) else {}

    def contains(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _basic(self, key: str) -> None:
        if not self.has_data:
            raise _Err(RequestStatus.MISSING_REQUEST_DATA, "Your request data is missing or invalid (non-object)")
        if self.data.get(key) is None:
            raise _Err(RequestStatus.MISSING_REQUEST_FIELD, f"Your request is missing the `{key}` field.")

    def string(self, key: str, allow_empty: bool = False) -> str:
        self._basic(key)
        return self.optional_string(key, allow_empty)

    def optional_string(self, key: str, allow_empty: bool = False) -> str:
        v = self.data.get(key)
        if not isinstance(v, str):
            raise _Err(RequestStatus.INVALID_REQUEST_FIELD_TYPE, f"The field value of `{key}` must be a string.")
        if not v and not allow_empty:
            raise _Err(RequestStatus.REQUEST_FIELD_EMPTY, f"The field value of `{key}` must not be empty.")
        return v

    def number(self, key: str, lo: float = float("-inf"), hi: float = float("inf")):
        self._basic(key)
        return self.optional_number(key, lo, hi)

    def optional_number(self, key: str, lo: float = float("-inf"), hi: float = float("inf")):
        v = self.data.get(key)
        if not _is_number(v):
            raise _Err(RequestStatus.INVALID_REQUEST_FIELD_TYPE, f"The field value of `{key}` must be a number.")
        if v < lo:
            raise _Err(
                RequestStatus.REQUEST_FIELD_OUT_OF_RANGE, f"The field value of `{key}` is below the minimum of `{lo:f}`"
            )
        if v > hi:
            raise _Err(
                RequestStatus.REQUEST_FIELD_OUT_OF_RANGE, f"The field value of `{key}` is above the maximum of `{hi:f}`"
            )
        return v

    def optional_boolean(self, key: str) -> bool:
        v = self.data.get(key)
        if not isinstance(v, bool):
            raise _Err(RequestStatus.INVALID_REQUEST_FIELD_TYPE, f"The field value of `{key}` must be boolean.")
        return v

    def object(self, key: str, allow_empty: bool = False) -> dict:
        self._basic(key)
        return self.optional_object(key, allow_empty)

    def optional_object(self, key: str, allow_empty: bool = False) -> dict:
        v = self.data.get(key)
        if not isinstance(v, dict):
            raise _Err(RequestStatus.INVALID_REQUEST_FIELD_TYPE, f"The field value of `{key}` must be an object.")
        if not v and not allow_empty:
            raise _Err(RequestStatus.REQUEST_FIELD_EMPTY, f"The field value of `{key}` must not be empty.")
        return v


class FakeOBS:
    """An obs-websocket 5.x server with a small in-memory OBS behind it.

    ``password=None`` turns authentication off (no ``authentication`` in Hello).  ``port=0`` binds a free
    port on the first ``start()``; later starts reuse it.  ``input_kinds`` replaces the default
    GetInputKindList (Debian's OBS 29 kinds); ``browser_source=True`` adds ``browser_source`` to it.
    ``default_audio`` creates OBS's global audio inputs "Desktop Audio" and "Mic/Aux" (PulseAudio kinds).
    The OBS state survives ``stop()``/``start()``, as OBS keeps its scene collection across restarts.
    """

    RequestError = FakeOBSRequestError

    def __init__(
        self,
        password: str | None = "secret",
        port: int = 0,
        host: str = "127.0.0.1",
        input_kinds=None,
        *,
        browser_source: bool = False,
        ws_version: str = "5.1.0",
        obs_version: str = "29.0.2",
        scenes=("Scene",),
        default_audio: bool = True,
    ):
        self.password = password
        self.host = host
        self.port = port
        self.ws_version = ws_version
        self.obs_version = obs_version
        self._v54 = tuple(int(p) for p in ws_version.split(".")[:3]) >= (5, 4, 0)
        kinds = list(DEBIAN_OBS29_INPUT_KINDS if input_kinds is None else input_kinds)
        if browser_source and "browser_source" not in kinds:
            kinds.append("browser_source")
        self._input_kinds = kinds

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[tuple[str, dict]] = []
        self._custom_events: list[dict] = []
        self._events: list[tuple[str, dict | None, int, int]] = []
        self._closes: list[tuple[int, str]] = []
        self._sessions: dict[int, _Session] = {}
        self._overrides: dict[str, Callable[[dict], dict | None]] = {}
        self._hotkeys: list[str] = []

        self._scenes: dict[str, _Scene] = {}  # in UI order, top first
        self._inputs: dict[str, _Input] = {}
        self.transforms: dict[tuple[str, int], dict] = {}  # (scene, item id) -> the last SetSceneItemTransform
        for name in scenes:
            self._scenes[name] = _Scene(name, str(uuid.uuid4()))
        self._program_scene = scenes[0] if scenes else None
        if default_audio:
            for name, kind in (("Desktop Audio", "pulse_output_capture"), ("Mic/Aux", "pulse_input_capture")):
                self._inputs[name] = _Input(name, kind, str(uuid.uuid4()), {"device_id": "default"})

        self._handlers: dict[str, Callable[[_Session, _Request, list], dict | None]] = {
            "GetVersion": self._get_version,
            "GetStats": self._get_stats,
            "BroadcastCustomEvent": self._broadcast_custom_event,
            "TriggerHotkeyByName": self._trigger_hotkey_by_name,
            "GetSceneList": self._get_scene_list,
            "GetCurrentProgramScene": self._get_current_program_scene,
            "SetCurrentProgramScene": self._set_current_program_scene,
            "CreateScene": self._create_scene,
            "GetInputKindList": self._get_input_kind_list,
            "GetInputList": self._get_input_list,
            "CreateInput": self._create_input,
            "RemoveInput": self._remove_input,
            "GetInputSettings": self._get_input_settings,
            "SetInputSettings": self._set_input_settings,
            "GetInputAudioSyncOffset": self._get_input_audio_sync_offset,
            "SetInputAudioSyncOffset": self._set_input_audio_sync_offset,
            "GetSceneItemList": self._get_scene_item_list,
            "GetSceneItemId": self._get_scene_item_id,
            "GetVideoSettings": self._get_video_settings,
            "CreateSceneItem": self._create_scene_item,
            "SetSceneItemTransform": self._set_scene_item_transform,
        }

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._salt = ""
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeOBS":
        """Bind and serve (returns self).  After a ``stop()`` it binds the same port again."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name=f"FakeOBS:{self.port}", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._start(), loop).result(timeout=10)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    async def _start(self) -> None:
        self._salt = _random_b64()  # like OBS: one salt per server start, a fresh challenge per connection
        self._started_at = time.monotonic()
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    def stop(self, abrupt: bool = False) -> None:
        """Close every connection and the listening socket.

        By default like OBS stopping its server: each client gets a close frame (1001, "Server stopping.").
        ``abrupt=True`` simulates OBS crashing: the TCP connections are dropped without a close frame.
        """
        if self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(abrupt), self._loop).result(timeout=15)
        finally:
            self._shutdown_loop()

    async def _stop(self, abrupt: bool) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        if abrupt:
            for s in sessions:
                if s.transport is not None:
                    s.transport.abort()
        else:
            for s in sessions:
                self._record_close(CloseCode.GOING_AWAY, _SERVER_STOPPING)
            await asyncio.gather(
                *(s.ws.close(code=CloseCode.GOING_AWAY, message=_SERVER_STOPPING.encode()) for s in sessions),
                return_exceptions=True,
            )
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        with self._cond:
            self._sessions.clear()
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def __enter__(self) -> "FakeOBS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ observation and hooks (any thread)

    @property
    def requests(self) -> list[tuple[str, dict]]:
        """Every request received (including failed and unknown ones), as (requestType, requestData)."""
        with self._lock:
            return copy.deepcopy(self._requests)

    def requests_of(self, request_type: str) -> list[dict]:
        """requestData of each received request of that type."""
        with self._lock:
            return [copy.deepcopy(d) for t, d in self._requests if t == request_type]

    @property
    def custom_events(self) -> list[dict]:
        """eventData of every successful BroadcastCustomEvent, in order."""
        with self._lock:
            return copy.deepcopy(self._custom_events)

    @property
    def events(self) -> list[tuple[str, dict | None, int, int]]:
        """Every event broadcast: (eventType, eventData, eventIntent, number of clients it was sent to)."""
        with self._lock:
            return copy.deepcopy(self._events)

    @property
    def closes(self) -> list[tuple[int, str]]:
        """Every close the server initiated: (close code, reason)."""
        with self._lock:
            return list(self._closes)

    @property
    def close_codes(self) -> list[int]:
        with self._lock:
            return [c for c, _ in self._closes]

    @property
    def clients(self) -> int:
        """Number of identified clients connected now."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.identified)

    @property
    def connections(self) -> int:
        """Number of websocket connections open now (identified or not)."""
        with self._lock:
            return len(self._sessions)

    @property
    def subscriptions(self) -> list[int]:
        """eventSubscriptions of each identified client."""
        with self._lock:
            return [s.subscriptions for s in self._sessions.values() if s.identified]

    @property
    def inputs(self) -> dict[str, dict]:
        """{inputName: {"inputKind", "inputUuid", "inputSettings"}} (a copy)."""
        with self._lock:
            return {
                i.name: {"inputKind": i.kind, "inputUuid": i.uuid, "inputSettings": copy.deepcopy(i.settings)}
                for i in self._inputs.values()
            }

    @property
    def sync_offsets(self) -> dict[str, int]:
        """{inputName: audio sync offset in ms} for every input that has audio."""
        with self._lock:
            return {i.name: i.sync_offset_ms for i in self._inputs.values() if i.kind in AUDIO_INPUT_KINDS}

    @property
    def scenes(self) -> dict[str, list[dict]]:
        """{sceneName: [{"sceneItemId", "sourceName", "sceneItemEnabled"}, ...]} (bottom item first)."""
        with self._lock:
            return {
                s.name: [
                    {"sceneItemId": it.item_id, "sourceName": it.source_name, "sceneItemEnabled": it.enabled}
                    for it in s.items
                ]
                for s in self._scenes.values()
            }

    @property
    def current_program_scene(self) -> str | None:
        with self._lock:
            return self._program_scene

    @property
    def input_kinds(self) -> list[str]:
        return list(self._input_kinds)

    @property
    def hotkeys_triggered(self) -> list[str]:
        with self._lock:
            return list(self._hotkeys)

    def clear_records(self) -> None:
        """Forget recorded requests, custom events, events and closes (the OBS state stays)."""
        with self._cond:
            self._requests.clear()
            self._custom_events.clear()
            self._events.clear()
            self._closes.clear()
            self._hotkeys.clear()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until ``predicate()`` is truthy and return its value; raises TimeoutError."""
        deadline = time.monotonic() + max(timeout, WAIT_FLOOR_S)
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s; requests so far: {self.requests!r}")
            with self._cond:
                self._cond.wait(min(remaining, 0.05))

    def emit_event(self, event_type: str, data: dict | None = None, intent: int = EventSubscription.GENERAL):
        """Send an Event (op 5) to every identified client subscribed to ``intent``; returns how many.

        Called from a ``set_handler`` function (which runs on the server's loop) it only schedules the
        event, sent right after the request's response, and returns None."""
        return self._call_soon(self._broadcast(event_type, data, intent))

    def invalidate_sessions(self) -> int:
        """Close every connection with 4011 SessionInvalidated (what OBS's "kick" does); returns how many."""

        async def kick() -> int:
            with self._lock:
                sessions = list(self._sessions.values())
            for s in sessions:
                await self._close(s, CloseCode.SESSION_INVALIDATED, "Your session has been invalidated.")
            return len(sessions)

        return self._call_soon(kick())

    def set_handler(self, request_type: str, fn: Callable[[dict], dict | None] | None) -> None:
        """Answer ``request_type`` with ``fn(requestData) -> responseData | None`` instead of the built-in
        handler (``fn`` may raise ``FakeOBS.RequestError(code, comment)``); ``fn=None`` restores it."""
        with self._lock:
            if fn is None:
                self._overrides.pop(request_type, None)
            else:
                self._overrides[request_type] = fn

    def set_sync_offset(self, input_name: str, offset_ms: int) -> None:
        """Change an input's audio sync offset from the OBS side (as a user in the OBS UI would)."""
        with self._lock:
            self._inputs[input_name].sync_offset_ms = int(offset_ms)

    def _call_soon(self, coro):
        if self._loop is None:
            coro.close()
            raise RuntimeError("FakeOBS is not running")
        if threading.current_thread() is self._thread:  # from a handler: waiting here would deadlock
            self._loop.create_task(coro)
            return None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # ------------------------------------------------------------------ websocket protocol

    def _record_close(self, code: int, reason: str) -> None:
        with self._cond:
            self._closes.append((code, reason))
            self._cond.notify_all()

    async def _send(self, s: _Session, op: int, d: dict) -> None:
        s.outgoing += 1
        await s.ws.send_str(json.dumps({"op": op, "d": d}, separators=(",", ":")))

    async def _close(self, s: _Session, code: int, reason: str) -> None:
        self._record_close(code, reason)
        try:
            await s.ws.close(code=code, message=reason.encode())
        except Exception:
            pass

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # websocketpp picks the first supported subprotocol; with none requested OBS uses JSON (that is
        # what obsws-python does).  msgpack is not implemented here.
        ws = web.WebSocketResponse(protocols=("obswebsocket.json",), compress=False, timeout=2.0, autoping=True)
        await ws.prepare(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        s = _Session(
            ws=ws,
            transport=request.transport,
            remote=f"{peer[0]}:{peer[1]}" if peer else "?",
            challenge=_random_b64() if self.password is not None else None,
        )
        with self._cond:
            self._sessions[id(s)] = s
            self._cond.notify_all()
        try:
            hello = {"obsWebSocketVersion": self.ws_version, "rpcVersion": 1}
            if s.challenge is not None:
                hello["authentication"] = {"challenge": s.challenge, "salt": self._salt}
            await self._send(s, OpCode.HELLO, hello)
            async for msg in ws:
                s.incoming += 1
                if msg.type == WSMsgType.BINARY:
                    await self._close(
                        s,
                        CloseCode.MESSAGE_DECODE_ERROR,
                        "Your session encoding is set to Json, but a binary message was received.",
                    )
                    break
                if msg.type != WSMsgType.TEXT:
                    break
                if not await self._on_text(s, msg.data):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with self._cond:
                self._sessions.pop(id(s), None)
                self._cond.notify_all()
        return ws

    async def _on_text(self, s: _Session, text: str) -> bool:
        """Handle one message; False when the connection was closed."""
        try:
            message = json.loads(text)
        except ValueError as e:
            await self._close(s, CloseCode.MESSAGE_DECODE_ERROR, f"Unable to decode Json: {e}")
            return False
        if not isinstance(message, dict):
            await self._close(s, CloseCode.MESSAGE_DECODE_ERROR, "You sent a non-object payload.")
            return False
        if not s.identified and "request-type" in message:
            await self._close(
                s,
                CloseCode.UNSUPPORTED_RPC_VERSION,
                "You appear to be attempting to connect with the pre-5.0.0 plugin protocol. "
                "Check to make sure your client is updated.",
            )
            return False
        if "op" not in message:
            await self._close(s, CloseCode.UNKNOWN_OP_CODE, "Your request is missing an `op`.")
            return False
        op = message["op"]
        if not _is_number(op):
            await self._close(s, CloseCode.UNKNOWN_OP_CODE, "Your `op` is not a number.")
            return False
        d = message.get("d")
        if not isinstance(d, dict):
            if d is None:
                await self._close(s, CloseCode.MISSING_DATA_FIELD, "Your payload is missing data (`d`).")
            else:
                await self._close(s, CloseCode.INVALID_DATA_FIELD_TYPE, "Your payload's data (`d`) is not an object.")
            return False
        if not s.identified and op != OpCode.IDENTIFY:
            await self._close(
                s, CloseCode.NOT_IDENTIFIED, "You attempted to send a non-Identify message while not identified."
            )
            return False

        if op == OpCode.IDENTIFY:
            return await self._on_identify(s, d)
        if op == OpCode.REIDENTIFY:
            if "eventSubscriptions" in d and not await self._set_subscriptions(s, d):
                return False
            await self._send(s, OpCode.IDENTIFIED, {"negotiatedRpcVersion": s.rpc_version})
            return True
        if op == OpCode.REQUEST:
            return await self._on_request(s, d)
        if op == OpCode.REQUEST_BATCH:
            return await self._on_request_batch(s, d)
        await self._close(s, CloseCode.UNKNOWN_OP_CODE, f"Unknown OpCode: {int(op)}")
        return False

    async def _set_subscriptions(self, s: _Session, d: dict) -> bool:
        subs = d["eventSubscriptions"]
        if not _is_uint(subs):
            await self._close(s, CloseCode.INVALID_DATA_FIELD_TYPE, "Your `eventSubscriptions` is not an unsigned number.")
            return False
        with self._cond:
            s.subscriptions = subs
            self._cond.notify_all()
        return True

    async def _on_identify(self, s: _Session, d: dict) -> bool:
        if s.identified:
            await self._close(s, CloseCode.ALREADY_IDENTIFIED, "You are already Identified with the obs-websocket server.")
            return False
        if s.challenge is not None:
            auth = d.get("authentication")
            if "authentication" not in d:
                await self._close(
                    s,
                    CloseCode.AUTHENTICATION_FAILED,
                    "Your payload's data is missing an `authentication` string, however authentication is required.",
                )
                return False
            if not isinstance(auth, str):
                await self._close(s, CloseCode.AUTHENTICATION_FAILED, "Your `authentication` field is not a string.")
                return False
            if not secrets.compare_digest(auth, auth_string(self.password, self._salt, s.challenge)):
                await self._close(s, CloseCode.AUTHENTICATION_FAILED, "Authentication failed.")
                return False
        if "rpcVersion" not in d:
            await self._close(s, CloseCode.MISSING_DATA_FIELD, "Your payload's data is missing an `rpcVersion`.")
            return False
        if not _is_uint(d["rpcVersion"]):
            await self._close(s, CloseCode.INVALID_DATA_FIELD_TYPE, "Your `rpcVersion` is not an unsigned number.")
            return False
        if d["rpcVersion"] != 1:
            await self._close(
                s, CloseCode.UNSUPPORTED_RPC_VERSION, "Your requested RPC version is not supported by this server."
            )
            return False
        s.rpc_version = 1
        if "eventSubscriptions" in d and not await self._set_subscriptions(s, d):
            return False
        with self._cond:
            s.identified = True
            self._cond.notify_all()
        await self._send(s, OpCode.IDENTIFIED, {"negotiatedRpcVersion": s.rpc_version})
        return True

    async def _on_request(self, s: _Session, d: dict) -> bool:
        if "requestId" not in d:
            await self._close(s, CloseCode.MISSING_DATA_FIELD, "Your payload data is missing a `requestId`.")
            return False
        if "requestType" not in d:
            await self._close(s, CloseCode.MISSING_DATA_FIELD, "Your payload's data is missing an `requestType`.")
            return False
        if not isinstance(d["requestType"], str):
            await self._close(s, CloseCode.INVALID_DATA_FIELD_TYPE, "Your `requestType` is not a string.")
            return False
        pending: list = []
        result = self._process(s, d["requestType"], d.get("requestData"), pending)
        await self._send(s, OpCode.REQUEST_RESPONSE, {"requestId": d["requestId"], **result})
        for event in pending:  # OBS broadcasts events from its thread pool, after the handler returned
            await self._broadcast(*event)
        return True

    async def _on_request_batch(self, s: _Session, d: dict) -> bool:
        if "requestId" not in d:
            await self._close(s, CloseCode.MISSING_DATA_FIELD, "Your payload data is missing a `requestId`.")
            return False
        execution_type = d.get("executionType")
        if execution_type is not None:
            if not _is_number(execution_type):
                await self._close(s, CloseCode.INVALID_DATA_FIELD_TYPE, "Your `executionType` is not a number.")
                return False
            if execution_type not in (0, 1, 2):
                await self._close(s, CloseCode.INVALID_DATA_FIELD_VALUE, "Your `executionType` has an invalid value.")
                return False
        halt = d.get("haltOnFailure")
        if halt is not None and not isinstance(halt, bool):
            await self._close(s, CloseCode.INVALID_DATA_FIELD_TYPE, "Your `haltOnFailure` is not a boolean.")
            return False
        if "requests" not in d:
            await self._close(s, CloseCode.MISSING_DATA_FIELD, "Your payload data is missing a `requests`.")
            return False
        if not isinstance(d["requests"], list):
            await self._close(s, CloseCode.INVALID_DATA_FIELD_TYPE, "Your `requests` is not an array.")
            return False
        pending: list = []
        results = []
        for r in d["requests"]:
            r = r if isinstance(r, dict) else {}
            request_type = r.get("requestType") if isinstance(r.get("requestType"), str) else ""
            result = self._process(s, request_type, r.get("requestData"), pending)
            if r.get("requestId") is not None:
                result = {"requestId": r["requestId"], **result}
            results.append(result)
            if halt and not result["requestStatus"]["result"]:
                break
        await self._send(s, OpCode.REQUEST_BATCH_RESPONSE, {"requestId": d["requestId"], "results": results})
        for event in pending:
            await self._broadcast(*event)
        return True

    def _process(self, s: _Session, request_type: str, request_data: Any, pending: list) -> dict:
        """Run one request (under the state lock); returns requestType/requestStatus/responseData."""
        with self._cond:
            self._requests.append((request_type, copy.deepcopy(request_data) if isinstance(request_data, dict) else {}))
            self._cond.notify_all()
            response = None
            code, comment = RequestStatus.SUCCESS, ""
            try:
                if request_data is not None and not isinstance(request_data, dict):
                    raise _Err(RequestStatus.INVALID_REQUEST_FIELD_TYPE, "Your request data is not an object.")
                if not request_type:
                    raise _Err(RequestStatus.MISSING_REQUEST_TYPE, "Your request's `requestType` may not be empty.")
                override = self._overrides.get(request_type)
                if override is not None:
                    response = override(copy.deepcopy(request_data) if isinstance(request_data, dict) else {})
                else:
                    handler = self._handlers.get(request_type)
                    if handler is None:
                        raise _Err(RequestStatus.UNKNOWN_REQUEST_TYPE, "Your request type is not valid.")
                    response = handler(s, _Request(request_data), pending)
            except FakeOBSRequestError as e:
                code, comment, response = e.code, e.comment, None
            except Exception as e:  # a bug in a handler must not kill the connection silently
                code, comment, response = RequestStatus.REQUEST_PROCESSING_FAILED, f"FakeOBS error: {e!r}", None
            self._cond.notify_all()
        status = {"result": code == RequestStatus.SUCCESS, "code": code}
        if comment:
            status["comment"] = comment
        result = {"requestType": request_type, "requestStatus": status}
        if isinstance(response, dict):
            result["responseData"] = response
        return result

    async def _broadcast(self, event_type: str, data: dict | None, intent: int) -> int:
        message: dict = {"eventType": event_type, "eventIntent": intent}
        if isinstance(data, dict):
            message["eventData"] = data
        with self._lock:
            targets = [s for s in self._sessions.values() if s.identified and s.subscriptions & intent]
        sent = 0
        for s in targets:
            try:
                await self._send(s, OpCode.EVENT, message)
                sent += 1
            except Exception:
                pass
        with self._cond:
            self._events.append((event_type, copy.deepcopy(data), intent, sent))
            self._cond.notify_all()
        return sent

    # ------------------------------------------------------------------ OBS state helpers (lock held)

    def _source_exists(self, name: str) -> bool:
        return name in self._inputs or name in self._scenes

    def _acquire_source(self, req: _Request, name_key: str, uuid_key: str) -> _Input | _Scene:
        if self._v54 and req.contains(uuid_key):
            source_uuid = req.string(uuid_key)
            for src in [*self._inputs.values(), *self._scenes.values()]:
                if src.uuid == source_uuid:
                    return src
            raise _Err(RequestStatus.RESOURCE_NOT_FOUND, f"No source was found by the UUID of `{source_uuid}`.")
        if self._v54 and not req.contains(name_key):
            raise _Err(
                RequestStatus.MISSING_REQUEST_FIELD,
                f"Your request must contain at least one of the following fields: `{name_key}` or `{uuid_key}`.",
            )
        name = req.string(name_key)
        src = self._inputs.get(name) or self._scenes.get(name)
        if src is None:
            raise _Err(RequestStatus.RESOURCE_NOT_FOUND, f"No source was found by the name of `{name}`.")
        return src

    def _acquire_scene(self, req: _Request) -> _Scene:
        src = self._acquire_source(req, "sceneName", "sceneUuid")
        if not isinstance(src, _Scene):
            raise _Err(RequestStatus.INVALID_RESOURCE_TYPE, "The specified source is not a scene.")
        return src

    def _acquire_input(self, req: _Request) -> _Input:
        src = self._acquire_source(req, "inputName", "inputUuid")
        if not isinstance(src, _Input):
            raise _Err(RequestStatus.INVALID_RESOURCE_TYPE, "The specified source is not an input.")
        return src

    def _scene_item_json(self, item: _SceneItem, index: int) -> dict:
        src = self._inputs.get(item.source_name) or self._scenes.get(item.source_name)
        is_input = isinstance(src, _Input)
        width, height = (1920.0, 1080.0) if is_input and src.kind not in AUDIO_INPUT_KINDS else (0.0, 0.0)
        out = {
            "sceneItemId": item.item_id,
            "sceneItemIndex": index,
            "sceneItemEnabled": item.enabled,
            "sceneItemLocked": item.locked,
            "sceneItemTransform": {
                "sourceWidth": width,
                "sourceHeight": height,
                "positionX": 0.0,
                "positionY": 0.0,
                "rotation": 0.0,
                "scaleX": 1.0,
                "scaleY": 1.0,
                "width": width,
                "height": height,
                "alignment": 5,
                "boundsType": "OBS_BOUNDS_NONE",
                "boundsAlignment": 0,
                "boundsWidth": 0.0,
                "boundsHeight": 0.0,
                "cropLeft": 0,
                "cropRight": 0,
                "cropTop": 0,
                "cropBottom": 0,
            },
            "sceneItemBlendMode": "OBS_BLEND_NORMAL",
            "sourceName": item.source_name,
            "sourceType": "OBS_SOURCE_TYPE_INPUT" if is_input else "OBS_SOURCE_TYPE_SCENE",
            "inputKind": src.kind if is_input else None,
            "isGroup": None if is_input else False,
        }
        if self._v54:
            out["sourceUuid"] = src.uuid if src is not None else None
        return out

    def _require_audio(self, inp: _Input) -> None:
        if inp.kind not in AUDIO_INPUT_KINDS:
            raise _Err(RequestStatus.INVALID_RESOURCE_STATE, "The specified input does not support audio.")

    # ------------------------------------------------------------------ request handlers (lock held)

    def _get_version(self, s, req, pending):
        return {
            "obsVersion": self.obs_version,
            "obsWebSocketVersion": self.ws_version,
            "rpcVersion": 1,
            "availableRequests": sorted(set(self._handlers) | set(self._overrides)),
            "supportedImageFormats": list(_SUPPORTED_IMAGE_FORMATS),
            "platform": "debian",
            "platformDescription": "Debian GNU/Linux 12 (bookworm)",
        }

    def _get_stats(self, s, req, pending):
        frames = int((time.monotonic() - self._started_at) * 30)
        return {
            "cpuUsage": 3.2,
            "memoryUsage": 412.5,
            "availableDiskSpace": 51234.0,
            "activeFps": 30.000000300000007,
            "averageFrameRenderTime": 1.2,
            "renderSkippedFrames": 0,
            "renderTotalFrames": frames,
            "outputSkippedFrames": 0,
            "outputTotalFrames": frames,
            "webSocketSessionIncomingMessages": s.incoming,
            "webSocketSessionOutgoingMessages": s.outgoing,
        }

    def _broadcast_custom_event(self, s, req, pending):
        event_data = req.object("eventData")
        self._custom_events.append(copy.deepcopy(event_data))
        pending.append(("CustomEvent", copy.deepcopy(event_data), EventSubscription.GENERAL))
        return None

    def _trigger_hotkey_by_name(self, s, req, pending):
        self._hotkeys.append(req.string("hotkeyName"))  # hotkeys are not modelled: every name exists
        return None

    def _get_scene_list(self, s, req, pending):
        names = list(self._scenes)
        scenes = []
        for i, name in enumerate(reversed(names)):  # bottom of the UI list first, index 0
            entry = {"sceneName": name, "sceneIndex": i}
            if self._v54:
                entry["sceneUuid"] = self._scenes[name].uuid
            scenes.append(entry)
        out = {"currentProgramSceneName": self._program_scene, "currentPreviewSceneName": None, "scenes": scenes}
        if self._v54:
            program = self._scenes.get(self._program_scene)
            out["currentProgramSceneUuid"] = program.uuid if program else None
            out["currentPreviewSceneUuid"] = None
        return out

    def _get_current_program_scene(self, s, req, pending):
        out = {"currentProgramSceneName": self._program_scene}
        if self._v54:
            program = self._scenes.get(self._program_scene)
            out["sceneName"] = self._program_scene
            out["sceneUuid"] = out["currentProgramSceneUuid"] = program.uuid if program else None
        return out

    def _set_current_program_scene(self, s, req, pending):
        scene = self._acquire_scene(req)
        if scene.name != self._program_scene:
            self._program_scene = scene.name
            data = {"sceneName": scene.name}
            if self._v54:
                data["sceneUuid"] = scene.uuid
            pending.append(("CurrentProgramSceneChanged", data, EventSubscription.SCENES))
        return None

    def _create_scene(self, s, req, pending):
        name = req.string("sceneName")
        if self._source_exists(name):
            raise _Err(RequestStatus.RESOURCE_ALREADY_EXISTS, "A source already exists by that scene name.")
        scene = _Scene(name, str(uuid.uuid4()))
        self._scenes = {name: scene, **self._scenes}  # new scenes go on top of the UI list
        data = {"sceneName": name, "isGroup": False}
        if self._v54:
            data["sceneUuid"] = scene.uuid
        pending.append(("SceneCreated", data, EventSubscription.SCENES))
        return {"sceneUuid": scene.uuid} if self._v54 else None

    def _get_input_kind_list(self, s, req, pending):
        unversioned = req.optional_boolean("unversioned") if req.contains("unversioned") else False
        kinds = [_unversioned(k) for k in self._input_kinds] if unversioned else list(self._input_kinds)
        return {"inputKinds": kinds}

    def _get_input_list(self, s, req, pending):
        kind = req.optional_string("inputKind") if req.contains("inputKind") else ""
        out = []
        for i in self._inputs.values():
            if kind and i.kind != kind:
                continue
            entry = {"inputName": i.name, "inputKind": i.kind, "unversionedInputKind": _unversioned(i.kind)}
            if self._v54:
                entry["inputUuid"] = i.uuid
            out.append(entry)
        return {"inputs": out}

    def _create_input(self, s, req, pending):
        scene = self._acquire_scene(req)
        name = req.string("inputName")
        kind = req.string("inputKind")
        if self._source_exists(name):
            raise _Err(RequestStatus.RESOURCE_ALREADY_EXISTS, "A source already exists by that input name.")
        if kind not in self._input_kinds:
            raise _Err(
                RequestStatus.INVALID_INPUT_KIND,
                "Your specified input kind is not supported by OBS. Check that your specified kind is properly "
                "versioned and that any necessary plugins are loaded.",
            )
        settings = {}
        if req.contains("inputSettings"):
            settings = copy.deepcopy(req.optional_object("inputSettings", allow_empty=True))
        enabled = req.optional_boolean("sceneItemEnabled") if req.contains("sceneItemEnabled") else True
        inp = _Input(name, kind, str(uuid.uuid4()), settings)
        self._inputs[name] = inp
        item = _SceneItem(scene.next_item_id, name, enabled)
        scene.next_item_id += 1
        scene.items.append(item)  # new items go on top
        created = {
            "inputName": name,
            "inputKind": kind,
            "unversionedInputKind": _unversioned(kind),
            "inputSettings": copy.deepcopy(settings),
            "defaultInputSettings": {},
        }
        item_created = {
            "sceneName": scene.name,
            "sourceName": name,
            "sceneItemId": item.item_id,
            "sceneItemIndex": len(scene.items) - 1,
        }
        if self._v54:
            created["inputUuid"] = inp.uuid
            item_created.update(sceneUuid=scene.uuid, sourceUuid=inp.uuid)
        pending.append(("InputCreated", created, EventSubscription.INPUTS))
        pending.append(("SceneItemCreated", item_created, EventSubscription.SCENE_ITEMS))
        out = {"sceneItemId": item.item_id}
        if self._v54:
            out["inputUuid"] = inp.uuid
        return out

    def _remove_input(self, s, req, pending):
        inp = self._acquire_input(req)
        for scene in self._scenes.values():
            for item in [it for it in scene.items if it.source_name == inp.name]:
                scene.items.remove(item)
                data = {"sceneName": scene.name, "sourceName": inp.name, "sceneItemId": item.item_id}
                if self._v54:
                    data.update(sceneUuid=scene.uuid, sourceUuid=inp.uuid)
                pending.append(("SceneItemRemoved", data, EventSubscription.SCENE_ITEMS))
        del self._inputs[inp.name]
        data = {"inputName": inp.name}
        if self._v54:
            data["inputUuid"] = inp.uuid
        pending.append(("InputRemoved", data, EventSubscription.INPUTS))
        return None

    def _get_input_settings(self, s, req, pending):
        inp = self._acquire_input(req)
        return {"inputSettings": copy.deepcopy(inp.settings), "inputKind": inp.kind}

    def _set_input_settings(self, s, req, pending):
        inp = self._acquire_input(req)
        new = copy.deepcopy(req.object("inputSettings", allow_empty=True))
        overlay = req.optional_boolean("overlay") if req.contains("overlay") else True
        if overlay:
            inp.settings.update(new)
        else:
            inp.settings = new
        return None

    def _get_input_audio_sync_offset(self, s, req, pending):
        inp = self._acquire_input(req)
        self._require_audio(inp)
        return {"inputAudioSyncOffset": inp.sync_offset_ms}

    def _set_input_audio_sync_offset(self, s, req, pending):
        inp = self._acquire_input(req)
        offset = req.number("inputAudioSyncOffset", -950, 20000)
        self._require_audio(inp)
        inp.sync_offset_ms = int(offset)  # OBS stores int64 nanoseconds: fractional ms are truncated
        data = {"inputName": inp.name, "inputAudioSyncOffset": inp.sync_offset_ms}
        if self._v54:
            data["inputUuid"] = inp.uuid
        pending.append(("InputAudioSyncOffsetChanged", data, EventSubscription.INPUTS))
        return None

    def _get_scene_item_list(self, s, req, pending):
        scene = self._acquire_scene(req)
        return {"sceneItems": [self._scene_item_json(it, i) for i, it in enumerate(scene.items)]}

    def _get_video_settings(self, s, req, pending):
        return {"fpsNumerator": 30, "fpsDenominator": 1, "baseWidth": 1280, "baseHeight": 720,
                "outputWidth": 1280, "outputHeight": 720}

    def _create_scene_item(self, s, req, pending):
        scene = self._acquire_scene(req)
        name = req.string("sourceName")
        if name not in self._inputs and name not in self._scenes:
            raise _Err(RequestStatus.RESOURCE_NOT_FOUND, "No source was found by the name of `sourceName`.")
        enabled = req.optional_boolean("sceneItemEnabled") if req.contains("sceneItemEnabled") else True
        item = _SceneItem(scene.next_item_id, name, enabled)
        scene.next_item_id += 1
        scene.items.append(item)
        return {"sceneItemId": item.item_id}

    def _set_scene_item_transform(self, s, req, pending):
        scene = self._acquire_scene(req)
        item_id = int(req.number("sceneItemId", 0))
        transform = req.object("sceneItemTransform")
        item = next((it for it in scene.items if it.item_id == item_id), None)
        if item is None:
            raise _Err(RequestStatus.RESOURCE_NOT_FOUND, "No scene items were found in the specified scene by that ID.")
        self.transforms[(scene.name, item_id)] = copy.deepcopy(transform)
        return None

    def _get_scene_item_id(self, s, req, pending):
        scene = self._acquire_scene(req)
        name = req.string("sourceName")
        offset = int(req.optional_number("searchOffset", -1)) if req.contains("searchOffset") else 0
        matches = [it for it in scene.items if it.source_name == name]
        try:
            item = matches[offset]  # -1: the last match
        except IndexError:
            item = None
        if item is None:
            raise _Err(
                RequestStatus.RESOURCE_NOT_FOUND, "No scene items were found in the specified scene by that name or offset."
            )
        return {"sceneItemId": item.item_id}


def main() -> None:
    """Run the fake in its own process, as OBS runs (prints its port; stops when stdin closes)."""
    import argparse
    import sys

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--password", default="secret")
    args = p.parse_args()
    fake = FakeOBS(password=args.password, port=args.port).start()
    print(fake.port, flush=True)
    sys.stdin.read()
    fake.stop()


if __name__ == "__main__":
    main()
