"""An oversized message (100 KB) gets the same one-line refusal on every control path, and the
connection it came on stays open: the next command on it is applied. Paths: HTTP POST, the API's
WebSocket (the dock's), OBS CustomEvents (a protocol-faithful obs-websocket, and a real OBS).
Beyond what the API's WebSocket reads at all (16 MiB), the same line comes as a message and as the
reason of the close (1009)."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import obsws_python as obsws
import pytest
import websocket

from fake_obs import FakeOBS
from live import LiveEngine, PacedSource, wait_for
from live2diff_engine.control.api import MAX_TRANSPORT_BYTES
from live2diff_engine.control.schema import MAX_MESSAGE_BYTES, command_message
from live2diff_engine.models.components import build_tiny_components
from obs_real import RealOBS, require_obs

LINE = f"message too large (at most {MAX_MESSAGE_BYTES} bytes)"
PASSWORD = "limits-test-pass"
BIG = 100 * 1024


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


@pytest.fixture(autouse=True)
def quiet_obsws():
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 10)


def big_command(id="big") -> dict:
    return command_message("set_prompt", prompt="x" * BIG, id=id)


def test_the_docks_websocket_refuses_100_kb_in_one_line_and_stays_open(comps):
    with LiveEngine(comps, PacedSource(fps=20)) as live:
        url = live.api.url
        ws = websocket.create_connection(url.replace("http", "ws") + "/api/ws", origin=url, timeout=20)  # as the dock
        try:
            assert json.loads(ws.recv())["kind"] == "status"
            ws.send(json.dumps(big_command()))
            ws.send_binary(b"y" * BIG)
            ws.send(json.dumps(command_message("set_prompt", prompt="a lighthouse at dusk", id="after")))
            replies = []
            end = time.monotonic() + 30
            while len(replies) < 3:
                assert time.monotonic() < end, replies
                m = json.loads(ws.recv())  # a closed socket raises here
                if m["kind"] == "reply":
                    replies.append(m)
            assert [(r["ok"], r.get("error")) for r in replies[:2]] == [(False, LINE), (False, LINE)]
            assert replies[2]["id"] == "after" and replies[2]["ok"] is True
            assert ws.connected
        finally:
            ws.close()
        wait_for(lambda: live.frames.prompt == "a lighthouse at dusk", what="the command after the refusal")
        # Beyond what the transport reads at all (a runaway client, not a command): the socket is
        # closed, as obs-websocket closes beyond its own limit, but the client hears why first:
        # the same one-line refusal as a message, then the close (1009) with that reason.
        ws = websocket.create_connection(url.replace("http", "ws") + "/api/ws", origin=url, timeout=20)
        try:
            assert json.loads(ws.recv())["kind"] == "status"
            huge = b"z" * (MAX_TRANSPORT_BYTES + 4 * 1024 * 1024)  # 20 MiB
            # The server stops reading at the frame's header: the rest of it may never be taken.
            threading.Thread(target=_send_quietly, args=(ws, huge), daemon=True).start()
            said, closed = [], None
            end = time.monotonic() + 60
            while closed is None:
                assert time.monotonic() < end, said
                frame = ws.recv_frame()  # as it comes (recv() would answer the close on a dead socket)
                if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                    closed = (int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode())
                elif frame.opcode == websocket.ABNF.OPCODE_TEXT:
                    m = json.loads(frame.data)
                    if m["kind"] == "reply":
                        said.append(m)
            assert [(r["ok"], r.get("error")) for r in said] == [(False, LINE)]
            assert closed == (1009, LINE)
        finally:
            ws.close()
        live.wait_outputs(len(live.outputs) + 2)  # the engine goes on


def test_a_websocket_message_just_under_16_mib_is_refused_and_the_socket_stays_open(comps):
    """README: only a single message over 16 MB closes the API's WebSocket; one just under it gets
    the one-line refusal and the next command on the same socket is applied."""
    with LiveEngine(comps, PacedSource(fps=20)) as live:
        url = live.api.url
        ws = websocket.create_connection(url.replace("http", "ws") + "/api/ws", origin=url, timeout=60)
        try:
            assert json.loads(ws.recv())["kind"] == "status"
            ws.send_binary(b"u" * (16 * 1024 * 1024 - 1024))  # the README's figure, not the constant
            ws.send(json.dumps(command_message("set_prompt", prompt="still open", id="after")))
            replies = []
            while len(replies) < 2:
                m = json.loads(ws.recv())  # a closed socket raises here
                if m["kind"] == "reply":
                    replies.append(m)
            assert (replies[0]["ok"], replies[0].get("error")) == (False, LINE)
            assert replies[1]["id"] == "after" and replies[1]["ok"] is True and ws.connected
        finally:
            ws.close()
        wait_for(lambda: live.frames.prompt == "still open", what="the command after the big one")


def _send_quietly(ws, data: bytes) -> None:
    try:
        ws.send_binary(data)
    except Exception:  # the server closed the connection mid-message
        pass


def test_http_refuses_100_kb_in_the_same_line_and_keeps_the_connection(comps):
    with LiveEngine(comps, PacedSource(fps=20)) as live:
        conn = http.client.HTTPConnection("127.0.0.1", live.api.port, timeout=30)
        try:
            headers = {"Content-Type": "application/json"}
            conn.request("POST", "/api/command", body=json.dumps(big_command()), headers=headers)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 413 and body["ok"] is False and body["error"] == LINE
            sock = conn.sock
            assert sock is not None  # the server did not close it
            conn.request("POST", "/api/command", body=json.dumps(command_message("set_seed", seed=7, id="after")), headers=headers)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 200 and body["ok"] is True
            assert conn.sock is sock  # the same connection
        finally:
            conn.close()
        assert live.frames.seed == 7


def _obs_round_trip(port: int, password: str, replies_seen) -> list[dict]:
    """From one obs-websocket client: a 100 KB command, then a valid one; the engine's replies."""
    c = obsws.ReqClient(host="127.0.0.1", port=port, password=password, timeout=10)
    try:
        c.broadcast_custom_event({"eventData": big_command("big")})
        c.broadcast_custom_event({"eventData": command_message("set_prompt", prompt="a paper lantern", id="after")})
        got = wait_for(lambda: (lambda r: r if {"big", "after"} <= {m["id"] for m in r} else None)(replies_seen()),
                       timeout=30, what="both replies")
        c.get_version()  # the sender's connection is still open
    finally:
        c.disconnect()
    return {m["id"]: m for m in got}


def test_an_obs_custom_event_of_100_kb_gets_the_same_line(comps):
    with FakeOBS(password=PASSWORD) as fake, \
            LiveEngine(comps, PacedSource(fps=20), obs=dict(host="127.0.0.1", port=fake.port, password=PASSWORD, retry_max_s=0.5)) as live:
        wait_for(lambda: live.bridge.state == "connected", what="the bridge to connect")

        def replies():
            return [e for e in fake.custom_events if e.get("app") == "live2diff" and e.get("kind") == "reply"]

        got = _obs_round_trip(fake.port, PASSWORD, replies)
        assert (got["big"]["ok"], got["big"]["error"]) == (False, LINE)
        assert got["after"]["ok"] is True
        assert live.bridge.state == "connected"
        wait_for(lambda: live.frames.prompt == "a paper lantern", what="the command after the refusal")


@pytest.mark.obs
def test_a_real_obs_passes_a_100_kb_command_on_and_the_engine_refuses_it_in_the_same_line(comps, tmp_path):
    require_obs()
    with RealOBS(tmp_path, password=PASSWORD) as real:
        events: list[dict] = []
        listener = obsws.EventClient(host="127.0.0.1", port=real.port, password=PASSWORD, timeout=10)

        def on_custom_event(data):
            events.append({k: getattr(data, k) for k in data.attrs()})

        listener.callback.register(on_custom_event)
        try:
            with LiveEngine(comps, PacedSource(fps=20), obs=dict(host="127.0.0.1", port=real.port, password=PASSWORD, retry_max_s=0.5)) as live:
                wait_for(lambda: live.bridge.state == "connected", timeout=30, what="the engine to connect to OBS")

                def replies():
                    return [e for e in list(events) if e.get("app") == "live2diff" and e.get("kind") == "reply"]

                got = _obs_round_trip(real.port, PASSWORD, replies)
                assert (got["big"]["ok"], got["big"]["error"]) == (False, LINE)
                assert got["after"]["ok"] is True
                assert live.bridge.state == "connected"
                wait_for(lambda: live.frames.prompt == "a paper lantern", what="the command after the refusal")
        finally:
            listener.disconnect()
