"""A blip on the link keeps the session (issue 26, point 4): real `serve` and `connect` (tiny model,
CPU) as command-line processes, their media through the project's fault relay on 127.0.0.1
(live2diff_engine/bench/netfault.py), which the test cuts at will (``Faults.cut``).

- a cut shorter than `serve --session-grace`: `connect` resumes the same session on a new peer
  connection (PATCH on the session's URL), the server's engine goes on: one session, one warmup;
- a cut longer than the grace: the server frees the session, `connect` makes a new one;
- a session that cannot be resumed (here the relay refuses PATCH with 405, as an older server
  would) is deleted by `connect` before it makes a new one: it never waits on its own orphan;
- a 503's Retry-After (a real `serve` whose one slot is taken) is the wait before the next offer;
- after each cut, `connect`'s state goes back to "streaming" once frames flow again.

The media stays on 127.0.0.1 through LIVE2DIFF_ICE_LOOPBACK (remote/ice.py), which conftest.py sets
for every test and the processes it starts; the relay is the signalling hop and points each peer's
candidates at its own sockets, so every datagram crosses it (see netfault's note).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

from conftest import spawn_cli
from live2diff_engine.bench.netfault import Faults, Relay
from test_remote import WAIT, Server


class Connect(Server):
    """`connect URL` (synthetic camera, null sink, its local API on a free port) in a process of its
    own, its stderr collected; log() and stop() as for test_remote's `serve`."""

    def __init__(self, url: str, *args: str):
        self.lines: list[str] = []
        self.proc = spawn_cli("connect", url, "--source", "synthetic", "--camera-size", "64x48", "--camera-fps", "10",
                              "--sink", "null", *args)
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()


def count(proc: Server, text: str) -> int:
    return sum(text in line for line in proc.lines)


def wait_until(cond, what: str, log, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}\n{log()}"
        time.sleep(0.2)


class Link:
    """serve, the fault relay in front of it, and connect streaming through the relay. ``refuse``:
    HTTP methods the relay answers with 405 (as a server from before session resume would)."""

    def __init__(self, *serve_args: str, refuse: tuple[str, ...] = ()):
        self.serve = self.relay = self.connect = None
        try:
            self.serve = Server(*serve_args)
            self.faults = Faults()
            self.relay = Relay(self.serve.url, self.faults, refuse=refuse).start()
            self.connect = Connect(self.relay.url, "--api-port", "0")
            wait_until(lambda: count(self.connect, "control: ") or self.connect.proc.poll() is not None,
                       "connect's local API", self.log)
            line = next((l for l in self.connect.lines if l.startswith("control: ")), "")
            assert line, self.log()
            self.api = re.search(r"(http://\S+)/stream\.mjpg", line).group(1)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def log(self) -> str:
        parts = [(name, p.log()) for name, p in (("connect", self.connect), ("serve", self.serve)) if p is not None]
        text = "".join(f"--- {name} ---\n{log}\n" for name, log in parts)
        if self.relay is not None:
            text += f"--- relay ---\n{self.relay.requests}\ndatagrams {self.relay.counts()}"
        return text

    def status(self) -> dict:
        try:
            with urllib.request.urlopen(self.api + "/api/status", timeout=30) as resp:
                return json.loads(resp.read())
        except OSError:
            return {}

    def streaming(self) -> None:
        """Until frames come back through connect (more than before) and its state says so."""
        before = self.status().get("frames_out", 0)
        wait_until(lambda: self.status().get("frames_out", 0) > before + 5, "stylised frames back through connect",
                   self.log)
        wait_until(lambda: self.status().get("state") == "streaming", "connect's state 'streaming'", self.log)

    def cut(self, seconds: float) -> None:
        """Nothing gets through, either way, for ``seconds``."""
        self.faults.cut = True
        time.sleep(seconds)
        self.faults.cut = False

    def close(self) -> None:
        for p in (self.connect, self.serve):
            if p is not None:
                p.stop()
        if self.relay is not None:
            self.relay.close()


def test_a_cut_shorter_than_the_grace_keeps_the_session_and_no_new_warmup_happens():
    with Link("--session-grace", "30") as link:
        link.streaming()
        wait_until(lambda: count(link.serve, "warmed up") == 1, "the session's warmup", link.log)
        # 8 s: past connect's own loss detection (5 s without a frame back), so it re-offers.
        link.cut(8.0)
        wait_until(lambda: count(link.connect, "connection lost") >= 1, "connect to notice the cut", link.log)
        link.streaming()
        log, counts = link.log(), link.relay.counts()
        # The media went through the relay both ways, and the cut held it back both ways.
        assert counts["up"]["forwarded"] > 0 and counts["down"]["forwarded"] > 0, log
        assert counts["up"]["cut"] > 0 and counts["down"]["cut"] > 0, log
        assert count(link.serve, "resumed on a new connection") >= 1, log
        assert count(link.connect, "resumed its session") >= 1, log
        assert ("PATCH", 200) in [(m, s) for m, _, s in link.relay.requests], log
        assert count(link.serve, " started (") == 1, log  # one session throughout
        assert count(link.serve, " ended: ") == 0, log
        assert count(link.serve, "warmed up") == 1, log  # and its one warmup
        assert not any(s == 503 for _, _, s in link.relay.requests), log


def test_a_cut_longer_than_the_grace_frees_the_session_and_connect_makes_a_new_one():
    with Link("--session-grace", "2") as link:
        link.streaming()
        wait_until(lambda: count(link.serve, "warmed up") == 1, "the session's warmup", link.log)
        link.cut(8.0)
        wait_until(lambda: count(link.serve, " ended: no video for 2 s") == 1, "the session freed after its grace",
                   link.log)
        # The slot is free again (--max-sessions 1): connect's resume is told the session is gone
        # (404) and its new session gets in.
        wait_until(lambda: count(link.serve, " started (") == 2, "a new session", link.log)
        link.streaming()
        wait_until(lambda: count(link.serve, "warmed up") == 2, "the new session's warmup", link.log)
        assert ("PATCH", 404) in [(m, s) for m, _, s in link.relay.requests], link.log()


def test_connect_deletes_its_old_session_before_it_makes_a_new_one():
    """The relay refuses PATCH (as a server without resume would): connect cannot resume, so it
    ends its old session first; with --max-sessions 1 and a grace of 60 s, the orphan would
    otherwise hold the only slot (503) for a minute."""
    with Link("--session-grace", "60", refuse=("PATCH",)) as link:
        link.streaming()
        link.cut(8.0)
        wait_until(lambda: count(link.serve, " started (") == 2, "a new session", link.log)
        link.streaming()
        log = link.log()
        ended = next((i for i, l in enumerate(link.serve.lines) if " ended: ended by the client" in l), None)
        second = [i for i, l in enumerate(link.serve.lines) if " started (" in l][1]
        assert ended is not None and ended < second, log  # deleted, then the new one
        methods = [(m, s) for m, _, s in link.relay.requests]
        assert ("PATCH", 405) in methods and ("DELETE", 200) in methods, log
        assert 503 not in [s for _, s in methods], log


def test_connect_waits_as_long_as_the_servers_retry_after_says():
    """A `serve` whose one slot a first connect holds answers a second one 503 with Retry-After: 5
    (server.py's RETRY_AFTER_S while the holder's link is fine). The second connect's own backoff
    would try again after 0.5, 1 and 2 s; every try comes at least 5 s after the one before (judged
    from below only: the machine may be slow, never early). The times are when the relay in front
    of the second connect got each answer: connect starts its wait only after that."""
    with Link("--session-grace", "60") as link:
        wait_until(lambda: count(link.serve, " started (") == 1, "the first connect's session", link.log)
        with Relay(link.serve.url) as relay:
            second = Connect(relay.url, "--no-api")
            times: list[float] = []
            try:
                deadline = time.monotonic() + WAIT
                while len(times) < 4:
                    assert time.monotonic() < deadline, f"waited {WAIT} s for four offers\n{second.log()}"
                    times += [time.monotonic()] * (len(relay.requests) - len(times))
                    time.sleep(0.02)
            finally:
                second.stop()
            answers = [(m, s) for m, _, s in relay.requests[:4]]
        log = f"{answers}\n--- second connect ---\n{second.log()}\n{link.log()}"
        assert answers == [("POST", 503)] * 4, log
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g >= 4.9 for g in gaps), (gaps, log)
        assert count(second, "(the engine's Retry-After)") >= 3, log
