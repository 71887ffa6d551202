"""Bodies read whole (issue 26, point 1): a WHIP offer, a WHEP offer and a command sent over a raw
socket to a real `serve` (tiny model, 127.0.0.1) in pieces with pauses between them, chunked, or
larger than the cap. An offer that arrives in two TCP segments is served; one over the cap is
refused with 413 before any session exists, so the only slot stays free for the next offer.

The offers are real aiortc offers; their candidates are rewritten to 127.0.0.1 so that nothing the
server does with them leaves this machine's loopback (no media is meant to flow here).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import pytest

from test_remote import WAIT, Server, wait_no_session

SPLIT_PAUSE_S = 0.05  # between the pieces: far more than the 5 ms a WAN may leave between segments


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def aiortc_offer(direction: str = "sendrecv") -> str:
    """A real offer as aiortc (and `connect`) makes it: a camera track and the data channel, or
    (``recvonly``) a WHEP viewer's; its host candidates moved to 127.0.0.1."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import VideoStreamTrack

    async def make():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            if direction == "recvonly":
                pc.addTransceiver("video", direction="recvonly")
            else:
                pc.addTrack(VideoStreamTrack())
                pc.createDataChannel("control")
            await pc.setLocalDescription(await pc.createOffer())
            return pc.localDescription.sdp
        finally:
            await pc.close()

    sdp = asyncio.run(make())
    sdp = re.sub(r"(a=candidate:\S+ \d+ \S+ \d+ )\S+( \d+ typ)", r"\g<1>127.0.0.1\g<2>", sdp)
    return re.sub(r"c=IN IP4 \S+", "c=IN IP4 127.0.0.1", sdp)


def request_in_pieces(url: str, head: str, pieces: list[bytes], pause: float = SPLIT_PAUSE_S):
    """Sends ``head`` (the request line and headers) then each piece as its own TCP segment,
    ``pause`` seconds apart; returns (status, headers, body text) of the answer."""
    host, port = re.match(r"https?://([^:/]+):(\d+)", url).groups()
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head.encode())
        for piece in pieces:
            time.sleep(pause)
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):  # refused before the rest was read
                break
        sock.settimeout(WAIT)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, f"the server closed the connection without an answer: {data!r}"
            data += more
        head_bytes, rest = data.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            more = sock.recv(65536)
            if not more:
                break
            rest += more
        return status, headers, rest[:length].decode("utf-8", "replace")


def post_head(path: str, ctype: str, length: int | None) -> str:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n{framing}\r\nConnection: close\r\n\r\n"


def chunked(body: bytes, parts: int = 3) -> list[bytes]:
    """``body`` in chunked encoding, one chunk a piece, then the last chunk."""
    step = -(-len(body) // parts)
    out = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (body[i:i + step] for i in range(0, len(body), step))]
    return out + [b"0\r\n\r\n"]


def state(server) -> dict:
    with urllib.request.urlopen(server.url + "/api/status", timeout=WAIT) as resp:
        return json.loads(resp.read())


def delete(server, location: str) -> int:
    req = urllib.request.Request(server.url + location, method="DELETE")
    with urllib.request.urlopen(req, timeout=WAIT) as resp:
        return resp.status


def started(server) -> int:
    return sum("started (" in l for l in server.lines)


def assert_no_session(server, before: int):
    """No session began (the log) and none holds the slot (the status)."""
    assert started(server) == before, server.log()
    st = state(server)
    assert st["state"] == "waiting for a stream" and st["sessions"] == 0, st


def test_an_aiortc_offer_in_two_segments_with_a_pause_is_served(server):
    wait_no_session(server)
    body = aiortc_offer().encode()
    assert len(body) > 1500  # more than one segment's worth anyway, as a browser's offer
    half = len(body) // 2
    status, headers, text = request_in_pieces(server.url, post_head("/whip", "application/sdp", len(body)),
                                              [body[:half], body[half:]])
    assert status == 201, text
    assert headers["location"].startswith("/whip/") and text.startswith("v=0")
    assert delete(server, headers["location"]) == 200
    wait_no_session(server)


def test_a_chunked_offer_in_pieces_is_served(server):
    wait_no_session(server)
    status, headers, text = request_in_pieces(server.url, post_head("/whip", "application/sdp", None),
                                              chunked(aiortc_offer().encode()))
    assert status == 201, text
    assert delete(server, headers["location"]) == 200
    wait_no_session(server)


def test_an_oversized_content_length_is_refused_with_413_before_any_session(server):
    wait_no_session(server)
    before = started(server)
    offer = aiortc_offer().encode()
    big = offer + b"a=x-padding:" + b"x" * (1024 * 1024) + b"\r\n"  # a valid offer, padded to 1 MB
    status, headers, text = request_in_pieces(server.url, post_head("/whip", "application/sdp", len(big)),
                                              [big[:4096], big[4096:]])
    assert status == 413 and "too large" in text and text.count("\n") == 1, text
    assert_no_session(server, before)
    # The slot is free: the same offer, of its own size, is served at once.
    status, headers, text = request_in_pieces(server.url, post_head("/whip", "application/sdp", len(offer)), [offer])
    assert status == 201, text
    assert delete(server, headers["location"]) == 200
    wait_no_session(server)


def test_an_oversized_chunked_offer_is_refused_with_413_before_any_session(server):
    wait_no_session(server)
    before = started(server)
    big = aiortc_offer().encode() + b"a=x-padding:" + b"x" * (256 * 1024) + b"\r\n"
    status, _, text = request_in_pieces(server.url, post_head("/whip", "application/sdp", None), chunked(big, 8))
    assert status == 413 and "too large" in text, text
    assert_no_session(server, before)


def test_a_whep_offer_in_pieces_is_read_whole_and_an_oversized_one_refused(server):
    body = aiortc_offer("recvonly").encode()
    half = len(body) // 2
    status, headers, text = request_in_pieces(server.url, post_head("/whep", "application/sdp", len(body)),
                                              [body[:half], body[half:]])
    assert status == 201 and headers["location"].startswith("/whep/"), text
    assert delete(server, headers["location"]) == 200
    big = body + b"a=x-padding:" + b"x" * (128 * 1024) + b"\r\n"
    status, _, text = request_in_pieces(server.url, post_head("/whep", "application/sdp", None), chunked(big, 4))
    assert status == 413, text


def test_a_command_in_pieces_and_chunked_is_read_whole_and_an_oversized_one_refused(server):
    from live2diff_engine.control.schema import TOO_LARGE

    cmd = json.dumps({"app": "live2diff", "v": 1, "kind": "command", "cmd": "set_prompt", "id": "p",
                      "prompt": "a paper lantern " + "and a fox " * 200}).encode()
    assert len(cmd) > 1500
    half = len(cmd) // 2
    # No stream runs: the command is read whole and judged (had it been cut, it would be "not JSON").
    status, _, text = request_in_pieces(server.url, post_head("/api/command", "application/json", len(cmd)),
                                        [cmd[:half], cmd[half:]])
    reply = json.loads(text)
    assert reply["id"] == "p" and "no stream yet" in reply["error"], text
    status, _, text = request_in_pieces(server.url, post_head("/api/command", "application/json", None), chunked(cmd))
    assert json.loads(text)["id"] == "p", text
    big = json.dumps({"app": "live2diff", "v": 1, "kind": "command", "cmd": "set_prompt", "id": "big",
                      "prompt": "x" * (1024 * 1024)}).encode()
    for head, pieces in ((post_head("/api/command", "application/json", len(big)), [big[:1000], big[1000:]]),
                         (post_head("/api/command", "application/json", None), chunked(big, 8))):
        status, _, text = request_in_pieces(server.url, head, pieces)
        assert status == 413 and json.loads(text)["error"] == TOO_LARGE, text


def test_a_body_that_trickles_past_its_time_is_refused_with_408_and_a_whole_one_read():
    """read_body itself, on a real aiohttp server on 127.0.0.1 (the same code `serve` runs, with a
    1 s limit in place of BODY_TIMEOUT_S so the test is quick)."""
    import threading

    from aiohttp import web

    from live2diff_engine.control.api import BodyError, read_body

    async def handler(request):
        try:
            body = await read_body(request, 1000, "the test body", timeout=1.0)
        except BodyError as exc:
            return web.Response(status=exc.status, text=exc.text + "\n")
        return web.Response(text=f"{len(body)} bytes\n")

    ready, loop_box = threading.Event(), {}

    def serve():
        async def main():
            app = web.Application()
            app.router.add_post("/", handler)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            loop_box["port"], loop_box["stop"] = site._server.sockets[0].getsockname()[1], asyncio.Event()
            ready.set()
            await loop_box["stop"].wait()
            await runner.cleanup()

        loop = loop_box["loop"] = asyncio.new_event_loop()
        loop.run_until_complete(main())
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]  # a connection still lingering
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(WAIT)
    url = f"http://127.0.0.1:{loop_box['port']}"
    try:
        head = post_head("/", "text/plain", 100)
        status, _, text = request_in_pieces(url, head, [b"x" * 40, b"x" * 60], pause=0.2)  # in time: read whole
        assert status == 200 and text == "100 bytes\n", text
        status, _, text = request_in_pieces(url, head, [b"x" * 40], pause=0)  # the other 60 never come
        assert status == 408 and "did not arrive within 1 s" in text, text
    finally:
        loop_box["loop"].call_soon_threadsafe(loop_box["stop"].set)
        t.join(WAIT)
