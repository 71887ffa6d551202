"""The engine as an obs-websocket v5 client (obsws-python).

Commands arrive as ``CustomEvent``s (an OBS script, the dock or any obs-websocket tool sends them
with ``BroadcastCustomEvent``); status goes out the same way once a second and on every change;
replies go out as they settle. The bridge also adds the engine's output to a scene and keeps an
audio input's sync offset at the measured video latency (lip sync).

It also keeps OBS's source of the engine's output alive. OBS 29's Media Source gives up for good
when one reconnect finds the stream gone (`MP: Failed to open media`, e.g. while the engine
restarts); hiding it or its Restart action do not open it again, re-applying its settings does.
So the source reads ``/stream.mjpg?client=obs`` (the API counts those readers apart), and the
bridge re-applies the source's settings when it (re)connects and nobody reads the stream, and
whenever no OBS reader has pulled the stream for a few seconds (at most every few seconds). The
status says which: ``obs_source`` is "pulling", "not pulling" or "absent".

Everything runs on the bridge's own thread: the stream never waits for OBS. OBS not running yet,
restarting or closing are normal: the bridge retries with backoff and says so once.

obsws-python, as it is: a ReqClient is one blocking socket (used from this thread only);
``BroadcastCustomEvent`` needs ``{"eventData": ...}``; EventClient callbacks are matched by
function name; with no host/port/password the clients read a config.toml from the working or home
folder, so all three are always given; its loggers print the password and tracebacks, so they are
silenced here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger("live2diff.obs")

GENERAL_EVENTS = 1 << 0  # obs-websocket EventSubscription.General: CustomEvent is in it
SOURCE_NAME = "Live2Diff"
LIPSYNC_STEP_MS = 20  # change the audio offset only when the latency moved this much
BOUNDS_SCALE_INNER = "OBS_BOUNDS_SCALE_INNER"
SOURCE_STALE_S = 3.0  # OBS's source has read nothing for this long: re-open it
SOURCE_KICK_EVERY_S = 10.0  # but at most this often
NO_AUDIO_TRACKS = {str(i): False for i in range(1, 7)}


def _silence_obsws() -> None:
    """obsws-python logs the password and tracebacks; websocket-client an ERROR line each time OBS
    closes a connection. The bridge says what matters itself, once."""
    for name in ("obsws_python", "websocket"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.CRITICAL + 10)
        lg.propagate = False


class ObsAuthError(Exception):
    pass


class SourceWatch:
    """When to check OBS's source (and re-open it): at once after a (re)connection, then whenever
    no OBS reader has pulled the stream for ``stale_s``, at most once every ``every_s``."""

    def __init__(self, stale_s: float = SOURCE_STALE_S, every_s: float = SOURCE_KICK_EVERY_S):
        self.stale_s, self.every_s = stale_s, every_s
        self.reset()

    def reset(self) -> None:
        """A new connection: check at the next look."""
        self.now_due = True
        self._idle_since: float | None = None
        self._last: float | None = None

    def due(self, now: float, readers: int) -> bool:
        if self.now_due:
            return True
        if readers > 0:
            self._idle_since = None
            return False
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= self.stale_s and (self._last is None or now - self._last >= self.every_s)

    def checked(self, now: float) -> None:
        self.now_due = False
        self._last = now

    @property
    def last_check(self) -> float | None:
        """When (monotonic) the source was last checked."""
        return self._last

    def stale(self, now: float) -> bool:
        """No OBS reader for ``stale_s`` (as of the last ``due``)."""
        return self._idle_since is not None and now - self._idle_since >= self.stale_s


class ObsBridge:
    def __init__(
        self,
        controller,
        host: str = "127.0.0.1",
        port: int = 4455,
        password: str | None = None,
        *,
        output_url: str | None = None,
        source_kind: str = "auto",
        lipsync_input: str | None = None,
        lipsync_extra_ms: int = 0,
        status_every_s: float = 1.0,
        source_stale_s: float = SOURCE_STALE_S,
        source_kick_every_s: float = SOURCE_KICK_EVERY_S,
        retry_max_s: float = 10.0,
        timeout_s: float = 3.0,
    ):
        _silence_obsws()
        self.controller = controller
        self.host, self.port, self._password = host, int(port), password or ""
        self.output_url = output_url
        self.source_kind = source_kind
        self.lipsync_input = lipsync_input
        self.lipsync_extra_ms = lipsync_extra_ms
        self.lipsync_ms: int | None = None
        self.status_every_s = status_every_s
        self.retry_max_s = retry_max_s
        self.timeout_s = timeout_s
        self.state = "connecting"
        self.source_state: str | None = None  # "pulling", "not pulling", "absent"; None: unknown
        self.source_kicks = 0  # times the bridge re-opened OBS's source
        self.source_kick_times: list[float] = []  # when (monotonic) it did, the last 100
        self._watch = SourceWatch(source_stale_s, source_kick_every_s)
        self._kick_said = False
        self.connects = 0
        # What the bridge has done, for whoever must know that a window really passed (the tests):
        # connection attempts, lip-sync checks, looks at OBS's source and the time of the last look.
        self.attempts = self.lipsync_checks = self.source_looks = 0
        self.last_source_look: float | None = None
        self.events_in = 0
        self.broadcasts = 0
        self._tasks: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._req = None
        self._events = None
        self._said: str | None = None  # the last problem told to the user, said once
        from .controller import Pacer

        self._pacer = Pacer()
        controller.obs = self
        controller.add_listener(self._wake.set)

    def __repr__(self) -> str:  # never the password
        return f"ObsBridge({self.host}:{self.port}, state={self.state!r})"

    # -- public (any thread) -----------------------------------------------------------------

    def start(self) -> "ObsBridge":
        self._thread = threading.Thread(target=self._run, name="obs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self._disconnect()
        self.state = "off"

    def add_to_scene(self, scene: str | None, done: Callable[[bool, str | None], None]) -> None:
        if self.state != "connected":
            done(False, f"not connected to OBS ({self.state}); start OBS and turn on Tools > WebSocket Server Settings")
            return
        self._tasks.put(("add_to_scene", scene, done))
        self._wake.set()

    # -- the bridge thread -------------------------------------------------------------------

    def _say(self, level: int, text: str, kind: str | None = None) -> None:
        """Log ``text`` unless the last line said was of the same ``kind`` (default: the same
        text): one line per outage, even where the retries fail for different reasons."""
        kind = kind or text
        if kind != self._said:
            log.log(level, "%s", text)
            self._said = kind

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.controller.changed()

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            self.attempts += 1
            try:
                self._connect()
            except ObsAuthError as exc:
                # The reason first, then the state: whoever sees "auth failed" finds why in the log.
                self._say(logging.ERROR, str(exc))
                self._set_state("auth failed")
                self._stop.wait(max(self.retry_max_s, 5.0))  # the user has to fix it; check now and then
                continue
            except Exception as exc:
                self._say(logging.WARNING, f"OBS is not reachable at ws://{self.host}:{self.port} ({_why(exc)}); "
                          "retrying (start OBS and turn on Tools > WebSocket Server Settings)", kind="unreachable")
                self._set_state("waiting for OBS")
                self._stop.wait(delay)
                delay = min(self.retry_max_s, delay * 2)
                continue
            delay = 0.5
            self.connects += 1
            self._watch.reset()
            self._said = None
            log.warning("connected to OBS at ws://%s:%d", self.host, self.port)
            self._set_state("connected")
            try:
                self._serve()
            except Exception as exc:
                log.warning("lost the connection to OBS (%s); reconnecting", _why(exc))
            self._disconnect()
            self.source_state = None
            if not self._stop.is_set():
                self._set_state("waiting for OBS")
                self._said = None

    def _connect(self) -> None:
        import obsws_python as obs
        from obsws_python.error import OBSSDKError

        kw = dict(host=self.host, port=self.port, password=self._password, timeout=self.timeout_s)
        try:
            self._req = _client(obs.ReqClient, kw)
            self._events = _client(obs.EventClient, dict(kw, subs=GENERAL_EVENTS))
        except OBSSDKError as exc:
            self._disconnect()
            text = str(exc)
            if "no password" in text:
                raise ObsAuthError(
                    "OBS asks for a WebSocket password: give --obs-password, set OBS_WEBSOCKET_PASSWORD, "
                    "or put it under [obs] in the config file (OBS: Tools > WebSocket Server Settings > Show Connect Info)"
                ) from None
            if "identify" in text:
                raise ObsAuthError(
                    f"OBS at ws://{self.host}:{self.port} refused the WebSocket password: check --obs-password / "
                    "OBS_WEBSOCKET_PASSWORD against OBS's Tools > WebSocket Server Settings"
                ) from None
            raise
        except BaseException:
            self._disconnect()
            raise
        self._events.base_client.ws.settimeout(None)

        bridge = self

        def on_custom_event(data):  # obsws-python dispatches by this very name
            bridge._on_custom_event(data)

        self._events.callback.register(on_custom_event)
        self._req.base_client.ws.settimeout(self.timeout_s)

    def _disconnect(self) -> None:
        for client in (self._events, self._req):
            if client is None:
                continue
            ws = client.base_client.ws
            try:
                ws.close(timeout=0.5)
            except Exception:
                pass
            try:  # after the server's close frame, close() leaves the socket open
                ws.shutdown()
            except Exception:
                pass
        self._events = self._req = None

    def _on_custom_event(self, data) -> None:
        try:
            payload = {k: getattr(data, k) for k in data.attrs()}
        except Exception:
            return
        if payload.get("app") != "live2diff" or payload.get("kind", "command") != "command":
            return  # our own status and replies, or someone else's events
        self.events_in += 1
        wait = self._pacer.delay()
        if wait:
            time.sleep(wait)  # obsws-python's event thread: OBS holds the rest meanwhile
        self.controller.submit(payload, self._queue_reply)

    def _queue_reply(self, msg: dict) -> None:
        self._tasks.put(("broadcast", msg, None))
        self._wake.set()

    def _broadcast(self, msg: dict) -> None:
        self._req.send("BroadcastCustomEvent", {"eventData": msg})
        self.broadcasts += 1

    def _serve(self) -> None:
        last_status = 0.0
        last_lipsync = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.2)
            changed = self._wake.is_set()
            self._wake.clear()
            if self._events is None or not self._events.worker.is_alive():
                raise ConnectionError("OBS closed the connection")
            while True:
                try:
                    what, arg, done = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if what == "broadcast":
                    self._broadcast(arg)
                elif what == "add_to_scene":
                    try:
                        self._add_to_scene(arg)
                        done(True, None)
                    except Exception as exc:
                        done(False, f"could not add the output to OBS: {_why(exc)}")
            now = time.monotonic()
            if changed or now - last_status >= self.status_every_s:
                self._broadcast(self.controller.status_message())
                last_status = now
            if self.lipsync_input and now - last_lipsync >= 2.0:
                last_lipsync = now
                self._lipsync()
            self._watch_source(now)

    # -- OBS requests (bridge thread) --------------------------------------------------------

    def _request(self, kind: str, data: dict | None = None) -> dict:
        return self._req.send(kind, data, raw=True) or {}

    def _source_settings(self, obs_kind: str, width: int | None = None, height: int | None = None) -> dict:
        """The settings of the engine's source in OBS (without the size: only the URL for a browser)."""
        query = "?client=obs"
        token = getattr(self.controller, "api_token", None)
        if token:
            query += f"&token={token}"
        if obs_kind == "browser_source":
            settings = {"url": f"{self.output_url}/output{query}"}
            if width and height:
                settings.update(width=width, height=height, reroute_audio=False, restart_when_active=False, shutdown=False)
            return settings
        return {"is_local_file": False, "input": f"{self.output_url}/stream.mjpg{query}", "input_format": "mpjpeg",
                "buffering_mb": 0, "reconnect_delay_sec": 1, "restart_on_activate": False,
                "close_when_inactive": False, "hw_decode": False, "clear_on_media_end": False}

    def _obs_readers(self) -> int | None:
        count = getattr(self.controller, "stream_clients", None)
        return count("obs") if count is not None and self.output_url else None

    def _set_source_state(self, state: str | None) -> None:
        if state != self.source_state:
            self.source_state = state
            self.controller.changed()

    def _watch_source(self, now: float) -> None:
        """Keeps OBS's source reading the stream (see the module's doc)."""
        readers = self._obs_readers()
        if readers is None:
            return  # no local stream (API off)
        self.source_looks += 1
        self.last_source_look = now
        due = self._watch.due(now, readers)
        if readers > 0:
            self._kick_said = False
            self._set_source_state("pulling")
        elif self.source_state == "pulling" and self._watch.stale(now):
            self._set_source_state("not pulling")
        if not due:
            return
        self._watch.checked(now)
        from obsws_python.error import OBSSDKRequestError

        try:
            self._check_source(kick=readers == 0)
        except OBSSDKRequestError as exc:  # OBS said no; anything else is the connection: reconnect
            self._say(logging.WARNING, f"could not check OBS's {SOURCE_NAME!r} source: {_why(exc)}")

    def _check_source(self, kick: bool) -> None:
        from obsws_python.error import OBSSDKRequestError

        try:
            found = self._request("GetInputSettings", {"inputName": SOURCE_NAME})
        except OBSSDKRequestError as exc:
            if exc.code != 600:  # ResourceNotFound: not added (yet)
                raise
            if self._obs_readers() == 0:
                self._set_source_state("absent")
            return
        obs_kind = found.get("inputKind", "")
        self._quiet_source()
        if not kick or self._obs_readers():
            return
        if obs_kind == "ffmpeg_source":
            self._request("SetInputSettings", {"inputName": SOURCE_NAME, "inputSettings": self._source_settings(obs_kind),
                                               "overlay": True})
        elif obs_kind == "browser_source":
            self._request("SetInputSettings", {"inputName": SOURCE_NAME, "inputSettings": self._source_settings(obs_kind),
                                               "overlay": True})
            try:
                self._request("PressInputPropertiesButton", {"inputName": SOURCE_NAME, "propertyName": "refreshnocache"})
            except OBSSDKRequestError:
                pass
        else:
            self._set_source_state("not pulling")
            self._say(logging.WARNING, f"OBS's {SOURCE_NAME!r} source is a {obs_kind}, which cannot show the engine's "
                      "output; `live2diff-engine ctl add-to-scene` after removing it")
            return
        self.source_kicks += 1
        self.source_kick_times = [*self.source_kick_times[-99:], self._watch.last_check]
        self._set_source_state("not pulling")
        if not self._kick_said:
            self._kick_said = True
            log.warning("OBS's %r source was not reading the engine's stream; re-opened it", SOURCE_NAME)

    def _quiet_source(self) -> None:
        """The output carries no sound: muted, on no audio track, not monitored. (Hiding it from
        OBS's Audio Mixer is not offered by obs-websocket; the OBS script does that.)"""
        from obsws_python.error import OBSSDKRequestError

        for kind, data in (("SetInputMute", {"inputMuted": True}),
                           ("SetInputAudioTracks", {"inputAudioTracks": NO_AUDIO_TRACKS}),
                           ("SetInputAudioMonitorType", {"monitorType": "OBS_MONITORING_TYPE_NONE"})):
            try:
                self._request(kind, {"inputName": SOURCE_NAME, **data})
            except OBSSDKRequestError:
                pass  # an OBS (or a source kind) without it

    def _add_to_scene(self, scene: str | None) -> None:
        from obsws_python.error import OBSSDKRequestError

        if not self.output_url:
            raise RuntimeError("the engine's local API is off (--no-api), so there is no stream for OBS to show")
        if not scene:
            cur = self._request("GetCurrentProgramScene")
            scene = cur.get("currentProgramSceneName") or cur.get("sceneName")
        kinds = self._request("GetInputKindList").get("inputKinds", [])
        kind = self.source_kind
        if kind == "auto":
            kind = "browser" if "browser_source" in kinds else "media"
        video = self._request("GetVideoSettings")
        width, height = int(video.get("baseWidth", 1280)), int(video.get("baseHeight", 720))
        obs_kind = "browser_source" if kind == "browser" else "ffmpeg_source"
        settings = self._source_settings(obs_kind, width, height)
        existing = {i.get("inputName") for i in self._request("GetInputList").get("inputs", [])}
        if SOURCE_NAME in existing:
            self._request("SetInputSettings", {"inputName": SOURCE_NAME, "inputSettings": settings, "overlay": True})
            try:
                item = self._request("GetSceneItemId", {"sceneName": scene, "sourceName": SOURCE_NAME}).get("sceneItemId")
            except OBSSDKRequestError:
                item = self._request("CreateSceneItem", {"sceneName": scene, "sourceName": SOURCE_NAME, "sceneItemEnabled": True}).get("sceneItemId")
        else:
            item = self._request("CreateInput", {"sceneName": scene, "inputName": SOURCE_NAME, "inputKind": obs_kind,
                                                 "inputSettings": settings, "sceneItemEnabled": True}).get("sceneItemId")
        if item is not None:
            try:
                self._request("SetSceneItemTransform", {"sceneName": scene, "sceneItemId": item, "sceneItemTransform": {
                    "boundsType": BOUNDS_SCALE_INNER, "boundsWidth": float(width), "boundsHeight": float(height),
                    "positionX": 0.0, "positionY": 0.0, "boundsAlignment": 0}})
            except OBSSDKRequestError:
                pass  # it shows at its own size
        self._quiet_source()
        self._watch.checked(time.monotonic())  # just (re)opened: the next check after the usual wait
        if not self._obs_readers():
            self._set_source_state("not pulling")
        log.warning("added the engine's output to OBS scene %r as %s %r", scene, obs_kind, SOURCE_NAME)

    def _lipsync(self) -> None:
        from obsws_python.error import OBSSDKRequestError

        self.lipsync_checks += 1
        status = self.controller.status()
        lat = status.get("latency_ms")
        if lat is None or status.get("state") != "streaming":
            return  # warmup frames go straight through: their latency says nothing
        target = int(min(max(round(lat) + self.lipsync_extra_ms, 0), 20000))
        if self.lipsync_ms is not None and abs(target - self.lipsync_ms) < LIPSYNC_STEP_MS:
            return
        try:
            self._request("SetInputAudioSyncOffset", {"inputName": self.lipsync_input, "inputAudioSyncOffset": target})
        except OBSSDKRequestError as exc:
            self._say(logging.WARNING, f"lip sync: OBS has no audio input named {self.lipsync_input!r} (code {exc.code}); "
                      "check --obs-lipsync against the names in OBS's Audio Mixer")
            return
        self.lipsync_ms = target
        log.info("lip sync: %r delayed by %d ms", self.lipsync_input, target)


_PATCH_LOCK = threading.Lock()


def _client(cls, kw: dict):
    """An obsws-python client; if identifying fails, its socket is closed (obsws-python leaves it
    open, out of reach, and a retrying bridge would pile them up)."""
    import obsws_python.baseclient as base

    made = []
    with _PATCH_LOCK:
        original = base.ObsClient.__init__

        def init(self, **k):
            made.append(self)
            original(self, **k)

        base.ObsClient.__init__ = init
        try:
            return cls(**kw)
        except BaseException:
            for c in made:
                ws = getattr(c, "ws", None)
                if ws is not None:
                    try:
                        ws.shutdown()
                    except Exception:
                        pass
            raise
        finally:
            base.ObsClient.__init__ = original


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:160] if text else type(exc).__name__
