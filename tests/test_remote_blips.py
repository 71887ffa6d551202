"""A blip on the link keeps the session (issue 26, point 4): real `serve` and `connect` (tiny model,
CPU), their media through a UDP relay on 127.0.0.1 that the test cuts.

- a cut shorter than `serve --session-grace`: `connect` resumes the same session on a new peer
  connection (PATCH on the session's URL), the server's engine goes on: one session, one warmup;
- a cut longer than the grace: the server frees the session, `connect` makes a new one;
- a session that cannot be resumed (here a proxy that refuses PATCH, as an older server would) is
  deleted by `connect` before it makes a new one: it never waits on its own orphan;
- a 503's Retry-After is the wait before the next offer.

The relay: aioice leaves 127.0.0.1 out of the host candidates it gathers, so `serve` and `connect`
run here through this file (``python test_remote_blips.py serve|connect ...``), which makes their
one host candidate 127.0.0.1 (``loopback_candidates``); the test's HTTP proxy between them rewrites
each candidate in the offer and the answer to a relay port on 127.0.0.1, so every datagram of
either side goes through the relay, and nothing leaves loopback. (A fuller link-fault harness,
tests/netfault.py, is another helper's work; this is the least these tests need.)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAIT = 240  # generous: the 2-core machine is shared with other tests


def loopback_candidates() -> None:
    """aioice gathers every interface address but 127.0.0.1: here it gathers 127.0.0.1 alone."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []


# -- the relay and the proxy -----------------------------------------------------------------------


class Relay:
    """UDP relays on 127.0.0.1, one per candidate: what arrives on the advertised port goes on
    from a port of its own to the candidate, what comes back goes to whoever sent last. ``cut``
    drops everything both ways."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.cut = False
        self.passed = 0

    async def add(self, target: tuple[str, int]) -> int:
        relay = self
        peer: dict = {}

        class Down(asyncio.DatagramProtocol):  # the advertised side
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                if not relay.cut:
                    peer["addr"] = addr
                    relay.passed += 1
                    up.transport.sendto(data, target)

        class Up(asyncio.DatagramProtocol):  # towards the candidate
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                if not relay.cut and "addr" in peer:
                    relay.passed += 1
                    down.transport.sendto(data, peer["addr"])

        _, down = await self.loop.create_datagram_endpoint(Down, local_addr=("127.0.0.1", 0))
        _, up = await self.loop.create_datagram_endpoint(Up, local_addr=("127.0.0.1", 0))
        return down.transport.get_extra_info("sockname")[1]

    async def rewrite(self, sdp: str) -> str:
        out = []
        for line in sdp.splitlines():
            m = re.match(r"(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)( typ .*)", line, re.I)
            if m:
                assert m.group(2) == "127.0.0.1", f"a candidate beyond loopback: {line}"
                port = await self.add((m.group(2), int(m.group(3))))
                line = f"{m.group(1)}127.0.0.1 {port}{m.group(4)}"
            out.append(line)
        return "\r\n".join(out) + "\r\n"


class Proxy:
    """An HTTP proxy on 127.0.0.1 in front of `serve`'s WHIP endpoint: offers and answers have
    their candidates moved onto the relay; every request is logged (method, path, status)."""

    def __init__(self, target: str, refuse_patch: bool = False):
        self.target, self.refuse_patch = target, refuse_patch
        self.log: list[tuple[str, str, int]] = []
        self.loop = asyncio.new_event_loop()
        self.relay = Relay(self.loop)
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(30)

    def _run(self, ready) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _forward(self, request):
        import aiohttp
        from aiohttp import web

        if request.method == "PATCH" and self.refuse_patch:
            self.log.append((request.method, request.path, 405))
            return web.Response(status=405, text="method not allowed\n")
        body = await request.read()
        if request.content_type == "application/sdp":
            body = (await self.relay.rewrite(body.decode())).encode()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with aiohttp.ClientSession() as http:
            async with http.request(request.method, self.target + request.path_qs, data=body, headers=headers) as resp:
                answer = await resp.read()
                if resp.content_type == "application/sdp":
                    answer = (await self.relay.rewrite(answer.decode())).encode()
                out = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "location", "retry-after", "etag")}
                self.log.append((request.method, request.path, resp.status))
                return web.Response(status=resp.status, body=answer, headers=out)

    def cut(self, seconds: float) -> None:
        self.relay.cut = True
        time.sleep(seconds)
        self.relay.cut = False

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- serve and connect -----------------------------------------------------------------------------


class Proc:
    """`live2diff-engine ARGS` in a process of its own (this file as the script: loopback
    candidates), its stderr collected."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()

    def log(self) -> str:
        return "".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in l for l in self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(cond, what: str, log, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}\n{log()}"
        time.sleep(0.2)


def start_serve(*args: str) -> tuple[Proc, str]:
    serve = Proc("serve", "--model", "tiny", "--api-port", "0", *args)
    wait_until(lambda: serve.count("serving: ") > 0 or serve.proc.poll() is not None, "serve to start", serve.log)
    assert serve.proc.poll() is None, serve.log()
    line = next(l for l in serve.lines if l.startswith("serving: "))
    return serve, re.search(r"WHIP (\S+)/whip", line).group(1)


def connect_status(api_port: int) -> dict:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/status", timeout=30) as resp:
            return json.loads(resp.read())
    except OSError:
        return {}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """serve, the proxy and relay, connect streaming through them (synthetic camera)."""

    def __init__(self, *serve_args: str, refuse_patch: bool = False):
        self.serve, url = start_serve(*serve_args)
        self.proxy = Proxy(url, refuse_patch=refuse_patch)
        self.api_port = free_port()
        self.connect = Proc("connect", self.proxy.url, "--source", "synthetic", "--camera-size", "64x48",
                            "--camera-fps", "10", "--sink", "null", "--api-port", str(self.api_port))

    def log(self) -> str:
        return (f"--- connect ---\n{self.connect.log()}\n--- serve ---\n{self.serve.log()}\n"
                f"--- proxy ---\n{self.proxy.log}\nrelayed {self.proxy.relay.passed} datagrams")

    def frames_out(self) -> int:
        return connect_status(self.api_port).get("frames_out", 0)

    def streaming(self) -> None:
        """Until frames come back through connect (more than before) and its state says so."""
        before = self.frames_out()
        wait_until(lambda: self.frames_out() > before + 5, "stylised frames back through connect", self.log)
        wait_until(lambda: connect_status(self.api_port).get("state") == "streaming", "connect's state 'streaming'",
                   self.log)

    def close(self) -> None:
        self.connect.stop()
        self.serve.stop()
        self.proxy.close()


def test_a_cut_shorter_than_the_grace_keeps_the_session_and_no_new_warmup_happens():
    link = Link("--session-grace", "30")
    try:
        link.streaming()
        wait_until(lambda: link.serve.count("warmed up") == 1, "the session's warmup", link.log)
        assert link.proxy.relay.passed > 0, link.log()  # the media goes through the relay
        # 8 s: past connect's own loss detection (5 s without a frame back), so it re-offers.
        link.proxy.cut(8.0)
        wait_until(lambda: link.connect.count("connection lost") >= 1, "connect to notice the cut", link.log)
        link.streaming()
        log = link.log()
        assert link.serve.count("resumed on a new connection") >= 1, log
        assert link.connect.count("resumed its session") >= 1, log
        assert link.serve.count(" started (") == 1, log  # one session throughout
        assert link.serve.count(" ended: ") == 0, log
        assert link.serve.count("warmed up") == 1, log  # and its one warmup
        assert not any(s == 503 for _, _, s in link.proxy.log), log
    finally:
        link.close()


def test_a_cut_longer_than_the_grace_frees_the_session_and_connect_makes_a_new_one():
    link = Link("--session-grace", "2")
    try:
        link.streaming()
        wait_until(lambda: link.serve.count("warmed up") == 1, "the session's warmup", link.log)
        link.proxy.cut(8.0)
        wait_until(lambda: link.serve.count(" ended: no video for 2 s") == 1, "the session freed after its grace",
                   link.log)
        # The slot is free again (--max-sessions 1): connect's resume is told the session is gone
        # (404) and its new session gets in.
        wait_until(lambda: link.serve.count(" started (") == 2, "a new session", link.log)
        link.streaming()
        wait_until(lambda: link.serve.count("warmed up") == 2, "the new session's warmup", link.log)
        assert any(m == "PATCH" and s == 404 for m, _, s in link.proxy.log), link.log()
    finally:
        link.close()


def test_connect_deletes_its_old_session_before_it_makes_a_new_one():
    """A proxy that refuses PATCH (as a server without resume would): connect cannot resume, so it
    ends its old session first; with --max-sessions 1 and a grace of 60 s, the orphan would
    otherwise hold the only slot (503) for a minute."""
    link = Link("--session-grace", "60", refuse_patch=True)
    try:
        link.streaming()
        link.proxy.cut(8.0)
        wait_until(lambda: link.serve.count(" started (") == 2, "a new session", link.log)
        link.streaming()
        log = link.log()
        ended = next(i for i, l in enumerate(link.serve.lines) if " ended: ended by the client" in l)
        second = [i for i, l in enumerate(link.serve.lines) if " started (" in l][1]
        assert ended < second, log  # deleted, then the new one
        methods = [(m, s) for m, _, s in link.proxy.log]
        assert ("PATCH", 405) in methods and ("DELETE", 200) in methods, log
        assert 503 not in [s for _, s in methods], log
    finally:
        link.close()


def test_connect_waits_as_long_as_the_servers_retry_after_says():
    """A WHIP endpoint that is busy: three 503s with Retry-After: 3, then the test ends connect.
    Its own backoff would try again after 0.5, 1 and 2 s; every try comes at least 3 s after the
    one before (judged from below only: the machine may be slow, never early)."""
    from aiohttp import web

    times: list[float] = []
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    where: dict = {}

    async def whip(request):
        await request.read()
        times.append(time.monotonic())
        return web.Response(status=503, headers={"Retry-After": "3"}, text="busy: try again later\n")

    def run():
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_post("/whip", whip)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        where["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(30)
    connect = Proc("connect", where["url"], "--source", "synthetic", "--camera-size", "64x48", "--sink", "null",
                   "--no-api")
    try:
        wait_until(lambda: len(times) >= 4, "four offers", connect.log)
    finally:
        connect.stop()
        loop.call_soon_threadsafe(loop.stop)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 2.9 for g in gaps[:3]), (gaps, connect.log())
    assert connect.count("(the engine's Retry-After)") >= 3, connect.log()


if __name__ == "__main__":  # serve or connect for the tests above, with loopback candidates
    loopback_candidates()
    from live2diff_engine.cli import main

    sys.exit(main(sys.argv[1:]))
