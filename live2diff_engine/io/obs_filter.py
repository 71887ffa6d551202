"""The engine's side of the native OBS filter (plugin/live2diff-filter): one more source/sink pair.

`run --source obs-filter[:PORT]` listens on 127.0.0.1:PORT (default 8766) for the "Live2Diff"
filter. The filter connects by itself and sends the frames of the source it sits on, rendered at
the model's size; the engine sends each stylised frame back with the timestamp of the frame it was
made from, and answers the filter's commands (the command schema's, through the controller) and
sends it its status (state, styles, model size) once a second and on every change.

The wire (little-endian), both ways: a 32-byte header, then the payload::

    "L2DF" | u32 kind (1: RGBA frame, 2: JSON) | u32 width | u32 height | u64 stamp (ns, the
    filter's clock) | u32 length | u32 version (1)

One filter at a time: a second one is told the engine is busy and closed (it retries on its own).
Anything malformed closes that connection with one log line; the engine goes on listening.
Nothing that arrives names a file or code: commands go through the schema's checks.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import sys
import threading
import time

import numpy as np

from ..errors import ConfigError, UserError
from .sinks import Sink
from .sources import Source, SourceEnded

log = logging.getLogger("live2diff.obs_filter")

DEFAULT_PORT = 8766
# The command schema's envelope and size limit (control/schema.py: io sits below control, so they
# are repeated here; tests/test_obs_filter.py checks they stay the same).
APP, VERSION, MAX_MESSAGE_BYTES = "live2diff", 1, 8192
HEADER = struct.Struct("<4sIIIQII")
MAGIC = b"L2DF"
KIND_FRAME, KIND_JSON = 1, 2
WIRE_VERSION = 1
MAX_SIDE = 4096
STATUS_EVERY_S = 1.0
# A filter that stops reading (OBS hung, or gone without closing) must not hold the engine's
# inference thread, which sends the frames: a send that waits longer than this drops the
# connection (the filter reconnects by itself). Reads have no timeout: a hidden source sends nothing.
SEND_TIMEOUT_S = 3.0


def reply_message(id, ok: bool, error: str | None = None) -> dict:
    """A reply of the schema's shape, for what the link answers itself (busy, still starting)."""
    msg = {"app": APP, "v": VERSION, "kind": "reply", "id": id, "ok": ok}
    if error is not None:
        msg["error"] = error
    return msg


def parse_filter_source(spec: str, model_size: tuple[int, int]) -> "FilterSource":
    """``obs-filter[:PORT]`` -> a FilterSource listening on 127.0.0.1:PORT (not yet started)."""
    _, _, rest = spec.partition(":")
    try:
        port = int(rest) if rest else DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"--source obs-filter:PORT needs a number, got {spec!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--source obs-filter:PORT must be 0 to 65535, got {port}")
    return FilterSource(FilterLink(port, model_size=model_size))


class WireError(ValueError):
    """Bytes that are not a Live2Diff filter message."""


def pack(kind: int, payload: bytes | memoryview, width: int = 0, height: int = 0, stamp: int = 0) -> bytes:
    return HEADER.pack(MAGIC, kind, width, height, stamp, len(payload), WIRE_VERSION)


def unpack(head: bytes) -> tuple[int, int, int, int, int]:
    """(kind, width, height, stamp, length) of a header, or WireError saying what is wrong."""
    magic, kind, width, height, stamp, length, version = HEADER.unpack(head)
    if magic != MAGIC:
        raise WireError("not a Live2Diff filter message (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"filter speaks wire version {version}, this engine {WIRE_VERSION}: update one of them")
    if kind == KIND_FRAME:
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or length != width * height * 4:
            raise WireError(f"bad frame header ({width}x{height}, {length} bytes)")
    elif kind == KIND_JSON:
        if length > MAX_MESSAGE_BYTES:
            raise WireError(f"message too large ({length} bytes, at most {MAX_MESSAGE_BYTES})")
    else:
        raise WireError(f"unknown message kind {kind}")
    return kind, width, height, stamp, length


def _send_timeout(conn: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO on a blocking socket: sends give up after ``seconds``, reads still wait."""
    if sys.platform == "win32":
        value = struct.pack("I", int(seconds * 1000))
    else:
        value = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    except OSError:
        pass


def _recv_exact(conn: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes (read into one buffer, no copy after), or None when the peer closed."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if not k:
            return None
        got += k
    return buf


class FilterLink:
    """The listener and the one filter connected to it; shared by the source and the sink."""

    def __init__(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", model_size: tuple[int, int] = (512, 512)):
        self.host, self.port, self.model_size = host, port, model_size
        self.controller = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._latest: tuple[int, np.ndarray, int] | None = None  # (seq, RGB frame, stamp)
        self._seq = 0
        self._closed = threading.Event()
        self._status_due = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # filters accepted so far
        self.frames_in = 0
        self.frames_out = 0
        self.refused = 0  # connections closed for malformed input or while busy

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "FilterLink":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.host, self.port))
        except OSError as exc:
            s.close()
            raise UserError(
                f"cannot listen for the OBS filter on {self.host}:{self.port} ({exc.strerror or exc}): another engine "
                "may be running; stop it, or use --source obs-filter:PORT and set the same port in the filter"
            ) from None
        s.listen(4)
        self.port = s.getsockname()[1]
        self._listener = s
        for target, name in ((self._accept_loop, "filter-accept"), (self._status_loop, "filter-status")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        self._closed.set()
        self._status_due.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        self._drop(self._conn)
        with self._cond:
            self._cond.notify_all()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def attach(self, controller) -> None:
        """Commands from the filter go to ``controller``; its status goes back to the filter."""
        self.controller = controller
        controller.add_listener(self._status_due.set)
        self._status_due.set()

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send_timeout(conn, SEND_TIMEOUT_S)
            if self._conn is not None:
                self.refused += 1
                self._send_json_to(conn, reply_message(None, False, "busy: another OBS filter is connected to this engine"))
                conn.close()
                continue
            self._conn = conn
            self.connections += 1
            log.warning("OBS filter connected from %s:%d", *peer[:2])
            threading.Thread(target=self._read_loop, args=(conn,), name="filter-read", daemon=True).start()
            self._status_due.set()

    def _drop(self, conn: socket.socket | None) -> None:
        if conn is None:
            return
        if self._conn is conn:
            self._conn = None
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()

    def _read_loop(self, conn: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                head = _recv_exact(conn, HEADER.size)
                if head is None:
                    break
                kind, width, height, stamp, length = unpack(head)
                payload = _recv_exact(conn, length) if length else bytearray()
                if payload is None:
                    break
                if kind == KIND_FRAME:
                    rgba = np.frombuffer(payload, np.uint8).reshape(height, width, 4)
                    with self._cond:
                        self._latest = (self._seq, np.ascontiguousarray(rgba[:, :, :3]), stamp)
                        self._seq += 1
                        self.frames_in += 1
                        self._cond.notify_all()
                else:
                    self._command(conn, payload)
        except WireError as exc:
            self.refused += 1
            log.warning("OBS filter sent %s; closing that connection (the filter reconnects by itself)", exc)
        except OSError:
            pass
        finally:
            was = self._conn is conn
            self._drop(conn)
            if was and not self._closed.is_set():
                log.warning("OBS filter disconnected; waiting for it to come back")

    def _command(self, conn: socket.socket, payload: bytes) -> None:
        controller = self.controller
        if controller is None:
            self._send_json_to(conn, reply_message(None, False, "the engine is still starting; try again in a moment"))
            return
        controller.submit(payload, lambda msg: self._send_json_to(conn, msg))

    # -- sending -------------------------------------------------------------------------------

    def _send_to(self, conn: socket.socket | None, kind: int, payload, width=0, height=0, stamp=0) -> bool:
        if conn is None:
            return False
        try:
            with self._send_lock:
                conn.sendall(pack(kind, payload, width, height, stamp))
                conn.sendall(payload)
            return True
        except OSError:
            self._drop(conn)
            return False

    def _send_json_to(self, conn, msg: dict) -> bool:
        return self._send_to(conn, KIND_JSON, json.dumps(msg, separators=(",", ":")).encode())

    def send_frame(self, rgb: np.ndarray, stamp: int) -> bool:
        """A stylised frame (RGB uint8) back to the filter, with the stamp of its input frame."""
        conn = self._conn
        if conn is None:
            return False
        h, w = rgb.shape[:2]
        rgba = np.empty((h, w, 4), np.uint8)
        rgba[:, :, :3] = rgb
        rgba[:, :, 3] = 255
        ok = self._send_to(conn, KIND_FRAME, memoryview(rgba).cast("B"), w, h, stamp)
        self.frames_out += ok
        return ok

    def status(self) -> dict:
        """What the filter shows and uses: the state, the styles (objects: libobs's JSON keeps
        arrays of objects only), the model size it should render at."""
        msg = {"app": APP, "v": VERSION, "kind": "status", "width": self.model_size[0], "height": self.model_size[1]}
        c = self.controller
        if c is None:
            msg.update(state="starting", styles=[])
            return msg
        st = c.status()
        w, h = st.get("size") or self.model_size
        msg.update(
            state=st["state"], style=st.get("style"), styles=[{"name": n} for n in st.get("styles", [])],
            fps=st.get("fps"), latency_ms=st.get("latency_ms"), prompt=st.get("prompt"), strength=st.get("strength"),
            steps=st.get("steps"), seed=st.get("seed"), paused=st.get("paused"), width=w, height=h,
        )
        return msg

    def _status_loop(self) -> None:
        last = 0.0
        while not self._closed.is_set():
            self._status_due.wait(STATUS_EVERY_S)
            if self._closed.is_set():
                return
            if time.monotonic() - last < 0.2:  # changes come in bursts: at most five a second
                time.sleep(0.2)
            self._status_due.clear()
            conn = self._conn
            if conn is not None:
                try:
                    self._send_json_to(conn, self.status())
                except Exception as exc:  # a status that cannot be made must not end the link
                    log.warning("the filter's status could not be made: %s", exc)
            last = time.monotonic()

    # -- frames in -----------------------------------------------------------------------------

    def next_frame(self, after: int, timeout: float) -> tuple[int, np.ndarray, int] | None:
        """The newest frame with a sequence number above ``after``, waiting up to ``timeout``."""
        with self._cond:
            if self._latest is None or self._latest[0] <= after:
                self._cond.wait(timeout)
            if self._latest is not None and self._latest[0] > after:
                return self._latest
        return None


class FilterSource(Source):
    """Frames from the OBS filter, as they come (live: the newest wins). With no filter connected
    the engine simply waits; the filter reconnects by itself."""

    live = True
    fps = 30.0

    def __init__(self, link: FilterLink):
        self.link = link
        self.name = f"OBS filter (127.0.0.1:{link.port})"
        self.last_stamp: int | None = None
        self._taken = -1

    def open(self) -> None:
        if self.link._listener is None:
            self.link.start()
            self.name = f"OBS filter (127.0.0.1:{self.link.port})"

    def read(self) -> np.ndarray:
        while not self.link._closed.is_set():
            got = self.link.next_frame(self._taken, 0.25)
            if got is not None:
                self._taken, frame, self.last_stamp = got
                return frame
        raise SourceEnded

    def close(self) -> None:
        self.link.close()

    @property
    def is_open(self) -> bool:
        return self.link._listener is not None

    def frame_size(self):
        return self.link.model_size

    def advice(self) -> str:
        return "check --source obs-filter:PORT"


class FilterSink(Sink):
    """Stylised frames back to the OBS filter, each with its input frame's stamp."""

    def __init__(self, link: FilterLink):
        self.link = link
        self.name = "OBS filter"

    def send(self, frame: np.ndarray) -> None:  # a frame without a stamp (none came with its input)
        self.link.send_frame(frame, 0)

    def send_stamped(self, frame: np.ndarray, stamp: int) -> None:
        self.link.send_frame(frame, stamp)
