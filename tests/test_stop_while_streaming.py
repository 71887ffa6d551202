"""Ctrl-C while streaming (issue 26, point 8): `serve` and `connect`, real processes (tiny model,
127.0.0.1), each get SIGINT while frames flow. Each ends with its normal exit status (0), its
session ended on the server (none left behind), and the process gone; the time it took is printed
(BENCHMARKS.md keeps the figures). The bound (5 s) is well above the 2 s aimed at, for the shared
2-core machine's load; it still catches the old way out (the interpreter's teardown after a stop:
7 to 10 s here), and a stop that hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import ROOT, spawn_cli
from test_remote import WAIT, Server

HANG_S = 5.0  # above the 2 s aimed at by a loaded machine's slack; below the 8 s and more it took before


def wait_until(cond, what: str, log=lambda: "", timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}\n{log()}"
        time.sleep(0.1)


def sessions(server) -> tuple[int, int]:
    return sum("started (" in l for l in server.lines), sum(" ended: " in l for l in server.lines)


def interrupt(proc) -> tuple[int, float]:
    """SIGINT, then the exit status and how long the process took to end."""
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the process did not end after SIGINT")
    return rc, time.monotonic() - start


def test_serve_stops_on_ctrl_c_while_streaming_and_ends_its_session(tmp_path):
    server = Server()
    client = subprocess.Popen([sys.executable, str(ROOT / "tests" / "whip_client.py"), server.url, "--fps", "8"],
                              cwd=ROOT / "tests", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(client.stdout.readline())["status"] == 201
        deadline = time.monotonic() + WAIT
        while json.loads(client.stdout.readline())["received"] <= 3:  # frames flow both ways
            assert time.monotonic() < deadline, server.log()
        rc, took = interrupt(server.proc)
        time.sleep(0.2)  # the reader thread takes the last lines
        print(f"\nserve ended {took:.2f} s after SIGINT while streaming")
        assert rc == 0, server.log()
        assert sessions(server) == (1, 1), server.log()
        assert any("ended: the engine is stopping" in l for l in server.lines), server.log()
        assert not os.path.exists(f"/proc/{server.proc.pid}")  # no thread of it left either
        assert took < HANG_S, f"{took:.1f} s\n{server.log()}"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        server.stop()


def streaming_connect(server):
    """`connect` to ``server`` with a synthetic camera and its own API on a free port: the process,
    its stderr lines as they come, and a log of both ends for failures."""
    lines: list[str] = []
    proc = spawn_cli("connect", server.url, "--source", "synthetic", "--camera-size", "64x48", "--camera-fps", "10",
                     "--sink", "null", "--api-port", "0")
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return proc, lines, lambda: "".join(lines) + "\n--- server ---\n" + server.log()


def test_connect_stops_on_ctrl_c_while_streaming_and_its_session_ends_on_the_server():
    server = Server()
    proc, lines, log = streaming_connect(server)
    try:
        wait_until(lambda: any("connect: streaming to" in l for l in lines), "connect to stream", log)
        # Frames flow: the server's status counts frames out of the session's engine.
        import urllib.request

        def frames_out():
            with urllib.request.urlopen(server.url + "/api/status", timeout=WAIT) as resp:
                return json.loads(resp.read()).get("frames_out", 0)

        wait_until(lambda: frames_out() > 5, "frames through the remote engine", log)
        rc, took = interrupt(proc)
        print(f"\nconnect ended {took:.2f} s after SIGINT while streaming")
        assert rc == 0, log()
        assert not os.path.exists(f"/proc/{proc.pid}")
        # Its session is gone from the server at once (its DELETE), not after the idle timeout.
        wait_until(lambda: sessions(server) == (1, 1), "the session to end on the server", log)
        assert any("ended: ended by the client" in l for l in server.lines), log()
        assert took < HANG_S, f"{took:.1f} s\n{log()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


def test_connect_on_ctrl_c_publishes_the_frames_still_on_their_way_back(tmp_path):
    """The frames in flight when Ctrl-C comes are published, not dropped. The server is frozen
    (SIGSTOP) while frames flow, so the frames connect has sent wait on the server's side and
    nothing comes back; once connect's count of published frames stands still, connect gets
    SIGINT and only then the server goes on (SIGCONT). What it sends back now is what was in
    flight at the stop: connect publishes it before it ends (its --stats on exit counts more
    frames out than it had at the stop)."""
    import re
    import urllib.request

    server = Server()
    lines: list[str] = []
    stats = tmp_path / "stats.json"
    proc = spawn_cli("connect", server.url, "--source", "synthetic", "--camera-size", "64x48", "--camera-fps", "10",
                     "--sink", "null", "--api-port", "0", "--stats", str(stats))
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    log = lambda: "".join(lines) + "\n--- server ---\n" + server.log()  # noqa: E731
    frozen = False
    try:
        wait_until(lambda: any("control: output for OBS" in l for l in lines), "connect's local API", log)
        api = re.search(r"(http://127\.0\.0\.1:\d+)/stream\.mjpg", "".join(lines)).group(1)

        def published():
            with urllib.request.urlopen(api + "/api/status", timeout=WAIT) as resp:
                return json.loads(resp.read()).get("frames_out", 0)

        wait_until(lambda: published() > 10, "frames back through the remote engine", log)
        server.proc.send_signal(signal.SIGSTOP)
        frozen = True
        before, still = published(), 0
        while still < 10:  # 1 s with no frame published: what came back before the freeze is out
            time.sleep(0.1)
            now = published()
            still, before = (still + 1, before) if now == before else (0, now)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)  # the stop is under way before anything more can come back
        server.proc.send_signal(signal.SIGCONT)
        frozen = False
        rc = proc.wait(WAIT)
        assert rc == 0, log()
        after = json.loads(stats.read_text())["frames_out"]
        assert after > before, f"{before} frames published at the stop, {after} at the end\n{log()}"
    finally:
        if frozen:
            server.proc.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


def test_quit_through_connects_local_api_stops_connect_not_the_remote_engine():
    """`quit` (what the OBS script sends to stop an engine it started) on connect's own API stops
    connect as Ctrl-C does; it is never forwarded, so the engine behind `serve` goes on."""
    import re
    import urllib.request

    server = Server()
    proc, lines, log = streaming_connect(server)
    try:
        wait_until(lambda: any("connect: streaming to" in l for l in lines), "connect to stream", log)
        api = next(m.group(1) for l in lines if (m := re.search(r"control: output for OBS (http://127\.0\.0\.1:\d+)/", l)))
        body = json.dumps({"app": "live2diff", "v": 1, "cmd": "quit", "id": "bye"}).encode()
        req = urllib.request.Request(api + "/api/command", data=body, headers={"Content-Type": "application/json"})
        # "still starting; try again in a moment" is the API's answer until connect's engine takes
        # a stop (seen once in a full CI run: a 400 right after "streaming"): the caller tries again.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with urllib.request.urlopen(req, timeout=WAIT) as resp:
                    reply = json.loads(resp.read())
                break
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")
                if exc.code != 400 or "try again" not in text or time.monotonic() > deadline:
                    raise AssertionError(f"quit refused: {exc.code} {text}") from None
                time.sleep(0.2)
        assert reply["ok"] and reply["id"] == "bye", reply
        assert proc.wait(WAIT) == 0, log()
        wait_until(lambda: sessions(server) == (1, 1), "the session to end on the server", log)
        assert any("ended: ended by the client" in l for l in server.lines), log()
        with urllib.request.urlopen(server.url + "/api/status", timeout=WAIT) as resp:
            assert resp.status == 200  # serve itself is still there
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
