"""TURN, for real: coturn's turnserver on 127.0.0.1 (tests/turn_server.py) on the laptop side of a
real `serve` (tiny model, 127.0.0.1). `doctor` reports the TURN allocation and ends with its one-line
verdict; with a wrong password it says the server refused it. With --ice-relay-only (the ICE transport
policy "relay": that side gathers no host candidate at all, so no candidate pair can bypass the
relay) doctor's round trip and connect's stream go through the TURN server: the selected pair is a
relay pair at both ends and coturn's own log counts the packets it relayed between the peers."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request

import pytest

import turn_server
from conftest import need, run_cli, spawn_cli
from test_connect import free_port, wait_until
from test_remote import WAIT, Server

ICE = "LIVE2DIFF_ICE_SERVERS"


@pytest.fixture(scope="module")
def turn():
    need(turn_server.missing(), "bash tests/system_packages.sh installs coturn")
    server = turn_server.TurnServer().start()
    yield server
    server.close()
    assert server.proc.poll() is not None  # no turnserver left behind


@pytest.fixture(scope="module")
def serve():
    s = Server()
    yield s
    s.stop()


def status(api: str) -> dict:
    """connect's /api/status ({} until it answers)."""
    try:
        with urllib.request.urlopen(api + "/api/status", timeout=10) as r:
            return json.load(r)
    except (OSError, ValueError):
        return {}


def doctor(serve, *args, env):
    r = run_cli("doctor", serve.url, *args, env=env, timeout=WAIT)
    return r.returncode, r.stderr.strip().splitlines(), r.stdout + r.stderr


def test_doctor_reports_the_turn_allocation_and_ends_with_its_verdict(turn, serve):
    code, lines, out = doctor(serve, env={ICE: turn.url()})
    assert code == 0, out + serve.log()
    assert any(l.startswith("TURN: allocation ok (relay address 127.0.0.1:") for l in lines), out
    here = next(l for l in lines if l.startswith("candidates here: ") and "gathering" not in l)
    assert "host" in here and "relay" in here, here  # both, so ICE may pick the direct pair here
    assert lines[-1].startswith("doctor: everything works: signalling (http), TURN allocation, media round trip over"), out
    assert turn.password not in out
    assert f"user <{turn.user}>: incoming packet ALLOCATE processed, success" in turn.log_text()


def test_doctor_with_a_wrong_turn_password_says_the_server_refused_it(turn, serve):
    code, lines, out = doctor(serve, env={ICE: turn.url("not-the-password")})
    assert code == 1, out
    assert lines[-1].startswith("doctor: FAILED at TURN; works: signalling (http). To fix: "), out
    assert f"turn:127.0.0.1:{turn.port} refused the user name or password (401" in lines[-1], out
    assert "Traceback" not in out and "not-the-password" not in out
    assert f"user {turn.user} credentials are incorrect" in turn.log_text()  # coturn's side of it


def test_doctor_relay_only_makes_its_round_trip_through_the_relay(turn, serve):
    code, lines, out = doctor(serve, "--ice-relay-only", env={ICE: turn.url()})
    assert code == 0, out + serve.log()
    here = next(l for l in lines if l.startswith("candidates here: ") and "gathering" not in l)
    assert here.endswith(" relay (relay only)") and "host" not in here, here
    assert any(l.startswith("media: ok; link relay,") for l in lines), out
    assert "media round trip over relay" in lines[-1], out


def test_connect_relay_only_streams_through_the_turn_relay(turn, serve):
    api = f"http://127.0.0.1:{free_port()}"
    ended_before = len(turn.peer_usage())
    proc = spawn_cli("connect", serve.url, "--source", "synthetic", "--camera-size", "64x48", "--camera-fps", "10",
                     "--sink", "null", "--api-port", api.rsplit(":", 1)[1], "--ice-relay-only", env={ICE: turn.url()})
    lines: list[str] = []
    try:
        threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
        log = lambda: "".join(lines) + "\n--- serve ---\n" + serve.log() + "\n--- turnserver ---\n" + turn.log_text()[-3000:]  # noqa: E731
        wait_until(lambda: status(api).get("frames_out", 0) > 5, "stylised frames back through connect", log=log)
        wait_until(lambda: all((status(api).get(k) or {}).get("type") for k in ("link", "remote_link")),
                   "the link figures of both ends in connect's status", log=log)
        mine = status(api)
        assert mine["link"]["type"] == "relay", mine["link"]  # connect's selected pair: its relay candidate
        assert mine["remote_link"]["type"] == "relay", mine["remote_link"]  # serve's: connect's relay address
        frames_back = mine["frames_out"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 0, log()
        # Its allocations end with connect (a refresh to lifetime 0): coturn then logs what each relayed
        # between the peers (packets from serve, bytes, packets to serve, bytes). Video went both ways
        # through it, a packet or more a frame.
        relayed = lambda: turn.peer_usage()[ended_before:]  # noqa: E731
        wait_until(lambda: any(rp >= frames_back and sp >= frames_back for rp, _, sp, _ in relayed()),
                   f"coturn's log to count the {frames_back}+ frames it relayed each way", timeout=30,
                   log=lambda: f"{relayed()}\n{log()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_relay_only_answers_with_its_relay_address_and_streams_through_it(turn):
    """serve --ice-relay-only (its TURN server in LIVE2DIFF_ICE_SERVERS): its answer carries only
    its relay address, so doctor, which has no TURN server here, reaches it through the relay."""
    relay_serve = Server("--ice-relay-only", env={ICE: turn.url()})
    try:
        assert "| media through the TURN relay only" in relay_serve.log()
        code, lines, out = doctor(relay_serve, env={ICE: ""})
        assert code == 0, out + relay_serve.log()
        there = next(l for l in lines if l.startswith("candidates there: "))
        assert " relay " in there and "host" not in there, there
        assert "media round trip over relay" in lines[-1], out
    finally:
        relay_serve.stop()


@pytest.mark.parametrize("command", ["serve", "connect", "doctor"])
def test_relay_only_without_a_turn_server_is_one_line(command):
    args = {"serve": ("--model", "tiny", "--api-port", "0"), "connect": ("http://127.0.0.1:9", "--sink", "null"),
            "doctor": ("http://127.0.0.1:9",)}[command]
    r = run_cli(command, *args, "--ice-relay-only", env={ICE: "stun:127.0.0.1:9"}, timeout=WAIT)
    assert r.returncode == 2 and "--ice-relay-only needs a TURN server" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
