"""`connect` (the laptop side) against a real `serve` (tiny model, loopback): the remote engine's
frames reach a virtual camera made with pyvirtualcam's registered test backend; `ctl` against
`connect` is forwarded over the data channel; a lost server shows the "no signal" card and
`connect` reconnects by itself when the server is back."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import cv2
import numpy as np

from conftest import ROOT, run_cli, spawn_cli
from live2diff_engine.io.sources import SyntheticSource
from live2diff_engine.remote.picture import CHUNK_BYTES
from test_remote import WAIT, Server
from test_style_image import picture, upload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, what: str, timeout: float = WAIT, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}\n{log()}"
        time.sleep(0.2)


def ctl(api: str, *args):
    return run_cli("ctl", *args, "--api", api, "--json", timeout=WAIT)


def status(api: str) -> dict:
    r = ctl(api, "status")
    return json.loads(r.stdout)["status"] if r.returncode == 0 else {}


def server_status(server) -> dict:
    try:
        with urllib.request.urlopen(server.url + "/api/status", timeout=30) as r:
            return json.load(r)
    except OSError:
        return {}


def is_card(img: np.ndarray) -> bool:
    return float(np.median(img)) == 24.0  # io.sinks.no_signal_card: dark grey with a line of text


def test_connect_publishes_the_remote_frames_into_a_virtual_camera_ctl_goes_through_and_it_reconnects(tmp_path):
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    camera_out = tmp_path / "camera.npy"
    server = Server("--api-port", str(port))
    lines: list[str] = []
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "connect_with_test_camera.py"), server.url, "--source", "synthetic",
             "--camera-size", "64x48", "--camera-fps", "10", "--sink", "virtualcam:l2dtest", "--api-port", str(api_port)],
            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "L2D_TEST_CAMERA_OUT": str(camera_out)},
        )
        threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
        log = lambda: "".join(lines) + "\n--- server ---\n" + server.log()  # noqa: E731
        wait_until(lambda: any("connect: streaming to" in l for l in lines), "connect to stream", log=log)
        wait_until(lambda: status(api).get("frames_out", 0) > 5, "frames back through connect", log=log)

        # ctl against connect: forwarded to the remote engine, which validates and applies.
        r = ctl(api, "prompt", "a blue bird", "--transition", "10")
        assert r.returncode == 0, r.stdout + r.stderr
        # (read on the server itself: quicker than a ctl process, well inside the 10 s)
        wait_until(lambda: (lambda s: s.get("prompt") == "a blue bird" and s.get("transition") is not None)(
            server_status(server)), "the remote engine's new prompt, moving in over its transition", log=log)
        wait_until(lambda: status(api).get("prompt") == "a blue bird", "the new prompt in connect's status", log=log)
        r = ctl(api, "steps", "9")
        assert r.returncode == 1 and "1 to 4" in r.stdout, r.stdout + r.stderr
        # A style picture (the dock's drop zone, `ctl style-image`) goes over the data channel too;
        # this engine has no IP-Adapter, and says so.
        code, reply = upload(api, picture())
        assert code == 400 and "no IP-Adapter loaded" in reply["error"], reply
        # The latency figures restart when the warmup ends (its frames go straight out) and come back
        # with the next once-a-second stats: wait for them rather than catch that second.
        wait_until(lambda: status(api).get("latency_ms") is not None, "a latency figure in connect's status", log=log)
        s = status(api)
        assert s["connected"] is True and s["remote"] == server.url and s["latency_ms"] is not None

        # The server goes away: the card, then a reconnect once it is back on the same port.
        server.proc.kill()
        server.proc.wait()
        wait_until(lambda: any("connection lost" in l for l in lines), "connect to notice the lost server", log=log)
        wait_until(lambda: status(api).get("state") == "no signal", "'no signal' in connect's status", log=log)
        server = Server("--api-port", str(port))
        wait_until(lambda: sum("connect: streaming to" in l for l in lines) >= 2, "the reconnect", log=log)
        before = status(api).get("frames_out", 0)
        wait_until(lambda: status(api).get("frames_out", 0) > before + 5, "frames after the reconnect", log=log)
        # Out of "no signal" once frames flow again: the status (so the dock and the OBS panel) and the status line.
        wait_until(lambda: status(api).get("state") == "streaming", "'streaming' again in connect's status", log=log)
        # The new server's session got the prompt set through connect again (its own default is "").
        wait_until(lambda: status(api).get("prompt") == "a blue bird", "the prompt sent again to the new session", log=log)
        assert any("the settings set through connect (1) are sent to it again" in l for l in lines), log()
        assert status(api).get("transition") is None  # sent again without its transition: at once
        # The status line (every 10 s in a log): the round trip, the engine's part, what the network adds.
        wait_until(lambda: any("capture to publish p50/p95" in l and "network and codecs" in l for l in lines),
                   "a status line while streaming", log=log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0, log()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()

    frames = np.load(camera_out)
    assert frames.shape[1:] == (48, 64, 3), frames.shape
    synthetic = SyntheticSource((64, 48), 10.0)
    inputs = np.stack([synthetic.read() for _ in range(400)]).astype(np.int16)

    def kind(img):
        if is_card(img):
            return "card"
        near_input = np.abs(inputs - img.astype(np.int16)).mean(axis=(1, 2, 3)).min() < 12
        return "camera" if near_input else "stylised"  # the warmup shows the camera as it is

    kinds = [kind(f) for f in frames]
    runs = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert "stylised" in runs, runs
    first_card = runs.index("card", runs.index("stylised"))  # a card after the first stylised frames
    assert "stylised" in runs[first_card:], runs  # and stylised frames again after the reconnect


def test_connect_without_the_servers_token_says_so_in_one_line():
    server = Server(env={"LIVE2DIFF_API_TOKEN": "s3cret-token"})
    try:
        env = {k: v for k, v in os.environ.items() if k != "LIVE2DIFF_API_TOKEN"}
        r = subprocess.run([sys.executable, "-m", "live2diff_engine", "connect", server.url, "--source", "synthetic",
                            "--camera-size", "64x48", "--sink", "null", "--no-api"],
                           cwd=ROOT, capture_output=True, text=True, timeout=WAIT, env=env)
    finally:
        server.stop()
    assert r.returncode != 0, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("live2diff-engine: error:")]
    assert len(errors) == 1 and "wrong token" in errors[0] and "--token" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "{" not in errors[0], r.stderr


def test_at_the_end_of_its_input_connect_publishes_every_frame_the_server_finished(tmp_path):
    """--max-frames ends connect's input: the frames still on their way (in the server's pipeline,
    on the wire back) are waited for and published, as `run` finishes its frames in flight. Judged
    by counts, never by time: serve's own count of the session's frames against what connect
    published."""
    server = Server()
    stats = tmp_path / "connect.json"
    try:
        r = run_cli("connect", server.url, "--source", "synthetic", "--camera-size", "64x48", "--camera-fps", "10",
                    "--sink", "null", "--no-api", "--max-frames", "24", "--stats", stats, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: any(" ended: " in l for l in server.lines), "the session's end on the server", log=server.log)
    finally:
        server.stop()
    ended = next(l for l in server.lines if " ended: " in l)
    m = re.search(r"\((\d+) frames in, (\d+) out, (\d+) dropped", ended)
    assert m, server.log()
    served_in, served_out, dropped = map(int, m.groups())
    published = json.loads(stats.read_text())["frames_out"]
    assert served_in > 0 and served_in + dropped <= 24, ended
    assert served_out == served_in, f"frames the server took but never finished: {ended}"
    assert published == served_out, f"connect published {published} of the {served_out} the server finished\n{r.stderr}\n{server.log()}"


def test_a_style_picture_sent_to_connect_steers_the_remote_engine(tmp_path):
    """The dock's picture and `ctl style-image` against `connect`: the bytes cross the data channel
    in pieces (remote/picture.py) to the remote engine, which decodes them and answers; a picture
    of several pieces arrives whole, a bad one is refused in one line, --clear drops it, and the
    stream goes on throughout."""
    server = Server("--ip-adapter")  # --model tiny: a tiny random adapter and image encoder
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    proc = spawn_cli("connect", server.url, "--source", "synthetic", "--camera-size", "64x48", "--camera-fps", "10",
                     "--sink", "null", "--api-port", str(api_port))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    log = lambda: "".join(lines) + "\n--- server ---\n" + server.log()  # noqa: E731
    try:
        assert "style pictures: on" in server.log(), server.log()
        wait_until(lambda: status(api).get("frames_out", 0) > 3, "frames back through connect", log=log)
        look = tmp_path / "look.png"
        look.write_bytes(picture((40, 200, 40)))
        r = ctl(api, "style-image", str(look))
        assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stdout + r.stderr + log()
        wait_until(lambda: status(api).get("style_image") == "upload", "the remote engine's picture in the status", log=log)

        # A picture larger than one data-channel message: noise, so PNG cannot squeeze it.
        noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
        big = cv2.imencode(".png", noise)[1].tobytes()
        assert len(big) > 3 * CHUNK_BYTES
        code, reply = upload(api, big)
        assert code == 200 and reply["ok"] is True, reply
        # Bytes that are no picture: the remote engine's decoder refuses them, in one line.
        code, reply = upload(api, b"\x89PNG\r\n\x1a\n" + b"not really" * 100)
        assert code == 400 and reply["ok"] is False and "\n" not in reply["error"], reply
        assert status(api).get("style_image") == "upload"

        # serve restarted: connect's new session gets the picture again (its bytes kept by connect).
        port = int(server.url.rsplit(":", 1)[1])
        server.proc.kill()
        server.proc.wait()
        wait_until(lambda: status(api).get("state") == "no signal", "'no signal' in connect's status", log=log)
        server = Server("--ip-adapter", "--api-port", str(port))
        wait_until(lambda: status(api).get("state") == "streaming" and status(api).get("style_image") == "upload",
                   "the picture sent again to the new session", log=log)

        r = ctl(api, "style-image", "--clear")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: status(api).get("style_image") is None, "the picture cleared on the remote engine", log=log)
        before = status(api)["frames_out"]
        wait_until(lambda: status(api).get("frames_out", 0) > before + 3, "frames after the pictures", log=log)
        assert status(api).get("errors", 0) == 0, log()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0, log()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


def test_the_picture_assembler_takes_whole_pictures_and_refuses_the_rest_once():
    """remote/picture.py's receiving side, message by message, as a misbehaving peer would send them."""
    from live2diff_engine.remote.picture import PictureAssembler, announce_of, picture_messages

    replies, delivered, refused = [], [], []
    pa = PictureAssembler(replies.append, lambda data, reply: (delivered.append(data), reply({"kind": "reply", "ok": True})),
                          lambda: refused.append(1), limit=200_000)
    data = bytes(range(256)) * 600  # 153,600 bytes: three messages
    msgs = picture_messages(data, "p1")
    assert len(msgs) == 4 and announce_of(msgs[0]) == {"cmd": "style_image", "id": "p1", "size": len(data)}
    assert announce_of('{"cmd": "set_style_image_scale", "scale": 1}') is None  # a command, for the controller
    pa.announce(announce_of(msgs[0]))
    for m in msgs[1:]:
        pa.add(m)
    assert delivered == [data] and replies == [{"kind": "reply", "ok": True, "id": "p1"}] and not refused

    replies.clear()
    for _ in range(5):  # bytes with no announce: one answer, not one per message
        pa.add(b"x" * 10)
    assert len(replies) == 1 and "without an announce" in replies[0]["error"]
    pa.announce({"cmd": "style_image", "id": "big", "size": 200_001})
    assert replies[-1]["id"] == "big" and "larger than 200000 bytes" in replies[-1]["error"]
    pa.announce({"cmd": "style_image", "id": 7, "size": "ten"})
    assert replies[-1]["id"] == 7 and "needs 'size'" in replies[-1]["error"]
    pa.announce({"cmd": "style_image", "id": "a", "size": 10})
    pa.add(b"12345")
    pa.announce({"cmd": "style_image", "id": "b", "size": 4})  # a newer picture before "a" finished
    assert replies[-1]["id"] == "a" and "newer picture" in replies[-1]["error"]
    pa.add(b"abcdef")  # more than announced
    assert replies[-1]["id"] == "b" and "more bytes arrived" in replies[-1]["error"]
    assert len(delivered) == 1 and len(refused) == 5 and all("\n" not in r.get("error", "") for r in replies)
