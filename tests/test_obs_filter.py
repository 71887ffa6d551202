"""The engine's side of the native OBS filter (`run --source obs-filter`): the tiny-model engine
listening on a real loopback socket, and a client speaking the filter's wire (as
plugin/live2diff-filter/src/transport.c does). The filter itself, in a real OBS, is
tests/test_obs_filter_real.py."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from live import LiveEngine, wait_for
from live2diff_engine.control.schema import command_message
from live2diff_engine.errors import UserError
from live2diff_engine.io.obs_filter import HEADER, KIND_FRAME, KIND_JSON, FilterLink, FilterSink, FilterSource
from live2diff_engine.models.components import build_tiny_components


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


class FilterClient:
    """What the C filter does on the wire: RGBA frames with stamps out, frames and JSON back."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)

    def send_frame(self, rgb: np.ndarray, stamp: int) -> None:
        h, w = rgb.shape[:2]
        rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
        self.sock.sendall(HEADER.pack(b"L2DF", KIND_FRAME, w, h, stamp, w * h * 4, 1) + rgba.tobytes())

    def send_json(self, msg: dict) -> None:
        data = json.dumps(msg).encode()
        self.sock.sendall(HEADER.pack(b"L2DF", KIND_JSON, 0, 0, 0, len(data), 1) + data)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("the engine closed the connection")
            buf += chunk
        return buf

    def receive(self, timeout: float = 60.0):
        """('frame', stamp, RGBA array) or ('json', dict)."""
        self.sock.settimeout(timeout)
        magic, kind, w, h, stamp, length, version = HEADER.unpack(self._exact(HEADER.size))
        assert magic == b"L2DF" and version == 1
        payload = self._exact(length)
        if kind == KIND_FRAME:
            return "frame", stamp, np.frombuffer(payload, np.uint8).reshape(h, w, 4)
        return "json", json.loads(payload)

    def closed(self, timeout: float = 30.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def filter_engine(comps) -> tuple[LiveEngine, FilterLink]:
    link = FilterLink(0, model_size=(64, 64))
    source = FilterSource(link)
    source.open()
    live = LiveEngine(comps, source, extra_sinks=[FilterSink(link)])
    link.attach(live.controller)
    return live, link


def test_stylised_frames_come_back_with_the_stamps_of_the_frames_they_were_made_from(comps):
    live, link = filter_engine(comps)
    with live:
        client = FilterClient(link.port)
        rng = np.random.default_rng(0)
        sent, back = {}, []
        stamp = 1_000_000_007
        deadline = time.monotonic() + 300
        while len(back) < 12 and time.monotonic() < deadline:
            img = rng.integers(0, 256, (64, 64, 3), np.uint8)
            stamp += 33_000_000
            sent[stamp] = img
            client.send_frame(img, stamp)
            client.sock.settimeout(0.05)
            try:
                while True:
                    msg = client.receive(0.05)
                    if msg[0] == "frame":
                        back.append(msg[1:])
            except (socket.timeout, TimeoutError):
                pass
        client.close()
    assert len(back) >= 12, f"only {len(back)} stylised frames came back"
    stamps = [s for s, _ in back]
    assert all(s in sent for s in stamps), "a frame came back with a stamp that was never sent"
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    for s, rgba in back:
        assert rgba.shape == (64, 64, 4) and (rgba[:, :, 3] == 255).all()
    # with the tiny model the output is noise: not the input frame sent back
    assert any(np.abs(rgba[:, :, :3].astype(int) - sent[s].astype(int)).mean() > 10 for s, rgba in back)


def test_the_filters_commands_reach_the_engine_and_its_status_comes_back(comps):
    live, link = filter_engine(comps)
    with live:
        client = FilterClient(link.port)
        client.send_json(command_message("set_seed", seed=777, id="s1"))
        client.send_json(command_message("set_style", style="no such style", id="s2"))
        client.send_json({"app": "live2diff", "v": 1, "cmd": "quit"})  # never from the filter
        replies, status = {}, None
        end = time.monotonic() + 120
        while (len(replies) < 3 or status is None or status.get("seed") != 777) and time.monotonic() < end:
            client.send_frame(np.zeros((64, 64, 3), np.uint8), 1)
            msg = client.receive()
            if msg[0] == "json" and msg[1]["kind"] == "reply":
                replies[msg[1]["id"]] = msg[1]
            elif msg[0] == "json" and msg[1]["kind"] == "status":
                status = msg[1]
        client.close()
        assert live.frames.seed == 777
    assert replies["s1"]["ok"] is True
    assert replies["s2"]["ok"] is False and "unknown style" in replies["s2"]["error"]
    assert replies[None]["ok"] is False and "quit is taken only" in replies[None]["error"]
    assert status["seed"] == 777 and (status["width"], status["height"]) == (64, 64)
    assert {"name": "default"} in status["styles"]  # objects: libobs's JSON keeps arrays of objects only


def test_malformed_bytes_close_that_connection_and_the_engine_takes_the_next_filter(comps):
    live, link = filter_engine(comps)
    with live:
        bad = FilterClient(link.port)
        bad.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 32)
        assert bad.closed()
        bad.close()
        huge = FilterClient(link.port)
        wait_for(lambda: link.connected, 30, "the second connection")
        huge.sock.sendall(HEADER.pack(b"L2DF", KIND_FRAME, 100000, 100000, 0, 4 * 10**10 % 2**32, 1))
        assert huge.closed()
        huge.close()
        good = FilterClient(link.port)
        wait_for(lambda: link.connected, 30, "the third connection")
        good.send_json(command_message("status", id="ok?"))
        msg = good.receive()
        while msg[0] != "json" or msg[1].get("kind") != "reply":
            msg = good.receive()
        assert msg[1]["ok"] is True
        good.close()
    assert link.refused == 2


def test_a_second_filter_is_told_the_engine_is_busy_and_the_first_keeps_it(comps):
    live, link = filter_engine(comps)
    with live:
        first = FilterClient(link.port)
        wait_for(lambda: link.connected, 30, "the first filter")
        second = FilterClient(link.port)
        kind, msg = second.receive()
        assert kind == "json" and msg["ok"] is False and msg["error"].startswith("busy: another OBS filter")
        assert second.closed()
        assert link.connected
        first.close()
        second.close()


def test_the_links_own_replies_have_the_schemas_envelope():
    from live2diff_engine.control import schema
    from live2diff_engine.io import obs_filter

    assert (obs_filter.APP, obs_filter.VERSION, obs_filter.MAX_MESSAGE_BYTES) == (schema.APP, schema.VERSION, schema.MAX_MESSAGE_BYTES)
    assert obs_filter.reply_message("7", False, "busy") == schema.reply_message("7", False, "busy")


def test_a_taken_port_is_one_line_that_says_what_to_do():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError) as err:
            FilterLink(port).start()
    assert f"cannot listen for the OBS filter on 127.0.0.1:{port}" in str(err.value)
    assert "--source obs-filter:PORT" in str(err.value) and "\n" not in str(err.value)


def test_a_filter_that_stops_reading_is_dropped_and_the_engine_streams_on(comps):
    live, link = filter_engine(comps)
    with live:
        stuck = FilterClient(link.port)
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        wait_for(lambda: link.connected, 30, "the filter that will stop reading")
        big = np.zeros((64, 64, 3), np.uint8)
        # frames go in, stylised frames come back, and this "filter" never reads them
        end = time.monotonic() + 240
        while link.connected and time.monotonic() < end:
            try:
                stuck.send_frame(big, 5)
            except OSError:
                break
            time.sleep(0.01)
        assert not link.connected, "the engine kept a filter that never reads"
        good = FilterClient(link.port)
        wait_for(lambda: link.connected, 30, "the next filter")
        kind = None
        while kind != "frame":
            good.send_frame(big, 6)
            kind, *_ = good.receive()  # a stylised frame: the engine streams on, to the next filter
        stuck.close()
        good.close()


def test_run_with_a_bad_filter_port_or_a_taken_one_is_one_line_and_exit_2(tmp_path):
    from conftest import run_cli

    env = {"HOME": str(tmp_path), "LIVE2DIFF_HOME": str(tmp_path / "l2d"), "LIVE2DIFF_CONFIG": "", "OMP_NUM_THREADS": "1"}
    r = run_cli("run", "--model", "tiny", "--source", "obs-filter:abc", "--no-api", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [
        "live2diff-engine: error: --source obs-filter:PORT needs a number, got 'obs-filter:abc'"], r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("run", "--model", "tiny", "--source", f"obs-filter:{port}", "--no-api", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"cannot listen for the OBS filter on 127.0.0.1:{port}" in errors[0], r.stderr
