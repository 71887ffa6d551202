"""The engine's OBS bridge against a protocol-faithful obs-websocket v5 server (tests/fake_obs.py)
over a real socket: commands in, status and replies out, reconnection, wrong password, add to
scene, lip sync, hostile input. The same bridge against a real OBS: tests/test_obs_real.py."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time

import obsws_python as obsws
import pytest

from fake_obs import FakeOBS
from live import LiveEngine, PacedSource, wait_for
from live2diff_engine.control.schema import command_message
from live2diff_engine.models.components import build_tiny_components
from conftest import ROOT
from test_control import assert_stream_went_on, post, run_hostile_sender

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


@pytest.fixture(autouse=True)
def quiet_obsws():
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def obs_opts(fake_or_port, password=PASSWORD, **kw):
    port = fake_or_port if isinstance(fake_or_port, int) else fake_or_port.port
    return dict(host="127.0.0.1", port=port, password=password, retry_max_s=0.5, **kw)


def send_from_obs(fake, msg):
    """What the OBS script does: broadcast a command as a CustomEvent."""
    c = obsws.ReqClient(host="127.0.0.1", port=fake.port, password=PASSWORD, timeout=3)
    try:
        c.broadcast_custom_event({"eventData": msg})
    finally:
        c.disconnect()


def of_kind(fake, kind):
    return [e for e in fake.custom_events if e.get("app") == "live2diff" and e.get("kind") == kind]


def test_commands_from_obs_are_applied_and_status_goes_out(comps):
    with FakeOBS(password=PASSWORD) as fake, LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake)) as live:
        wait_for(lambda: live.bridge.state == "connected", what="the bridge to connect")
        wait_for(lambda: len(of_kind(fake, "status")) >= 3, timeout=5, what="status once a second")
        send_from_obs(fake, command_message("set_prompt", prompt="a paper crane", id="p1"))
        reply = wait_for(lambda: [r for r in of_kind(fake, "reply") if r["id"] == "p1"], what="the reply")[0]
        assert reply["ok"] is True
        assert live.frames.prompt == "a paper crane"
        st = wait_for(lambda: [s for s in of_kind(fake, "status") if s["prompt"] == "a paper crane"], what="status")[-1]
        assert st["obs"] == "connected" and st["style"] == "default" and "fps" in st and "latency_ms" in st
        send_from_obs(fake, command_message("set_style", style="../etc/passwd", id="bad"))
        bad = wait_for(lambda: [r for r in of_kind(fake, "reply") if r["id"] == "bad"], what="the refusal")[0]
        assert bad["ok"] is False and "unknown style" in bad["error"]


def test_a_change_sends_status_at_once_not_at_the_next_tick(comps):
    # With the periodic status an hour apart, a status that carries the change can only have been
    # sent because of the change (judged by what was sent, not by how fast: a busy machine is slow).
    with FakeOBS(password=PASSWORD) as fake, \
            LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake, status_every_s=3600.0)) as live:
        wait_for(lambda: live.bridge.state == "connected", what="the bridge to connect")
        # Settled first: streaming, and the bridge has looked for its source in OBS (none here).
        wait_for(lambda: of_kind(fake, "status") and of_kind(fake, "status")[-1]["state"] == "streaming"
                 and of_kind(fake, "status")[-1]["obs_source"] == "absent", timeout=30, what="a settled status")
        n = len(of_kind(fake, "status"))
        send_from_obs(fake, command_message("set_seed", seed=5))
        wait_for(lambda: any(s["seed"] == 5 for s in of_kind(fake, "status")[n:]), timeout=30, what="status after a change")
        assert len(of_kind(fake, "status")) <= n + 2  # the change's status, not a tick


def test_wrong_password_is_one_clear_line_and_the_stream_goes_on(comps, caplog):
    caplog.set_level(logging.INFO)
    with FakeOBS(password=PASSWORD) as fake, LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake, password="wrong-pass")) as live:
        wait_for(lambda: live.bridge.state == "auth failed", what="auth failure")
        live.wait_outputs(20)
        # One line, however often the bridge tries again: judged once it has tried a second time.
        wait_for(lambda: live.bridge.attempts >= 2, timeout=30, what="a second attempt")
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("live2diff.obs")]
        assert len(lines) == 1, lines
        assert "refused the WebSocket password" in lines[0] and "--obs-password" in lines[0]
        everything = "\n".join(r.getMessage() for r in caplog.records)
        assert "wrong-pass" not in everything and PASSWORD not in everything
        assert json.loads(__import__("urllib.request").request.urlopen(live.api.url + "/api/status").read())["obs"] == "auth failed"
        assert not any("Traceback" in r.getMessage() for r in caplog.records)
        assert fake.clients == 0


def test_missing_password_says_how_to_give_one(comps, caplog):
    caplog.set_level(logging.INFO)
    with FakeOBS(password=PASSWORD) as fake, LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake, password="")) as live:
        wait_for(lambda: live.bridge.state == "auth failed", what="auth failure")
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("live2diff.obs")]
        assert len(lines) == 1 and "asks for a WebSocket password" in lines[0]


def test_obs_late_and_restarting_the_bridge_reconnects_and_the_output_never_stops(comps, caplog):
    caplog.set_level(logging.INFO)
    port = free_port()
    with LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(port)) as live:
        wait_for(lambda: live.bridge.state == "waiting for OBS", what="waiting")
        live.wait_outputs(10)
        fake = FakeOBS(password=PASSWORD, port=port).start()
        try:
            wait_for(lambda: live.bridge.state == "connected", timeout=10, what="connect once OBS is up")
            assert live.bridge.connects == 1
            fake.stop()
            wait_for(lambda: live.bridge.state == "waiting for OBS", timeout=10, what="noticing OBS is gone")
            n = len(live.outputs)
            live.wait_outputs(n + 10, timeout=60)  # the engine's own output goes on while OBS is away
            assert live.bridge.state == "waiting for OBS" and live.engine.stats.errors == 0
            fake.start()
            wait_for(lambda: live.bridge.state == "connected", timeout=10, what="reconnect after OBS restarts")
            assert live.bridge.connects == 2
            send_from_obs(fake, command_message("set_prompt", prompt="after the restart"))
            wait_for(lambda: live.frames.prompt == "after the restart", what="commands after reconnecting")
        finally:
            fake.stop()
    waiting = [r for r in caplog.records if r.name == "live2diff.obs" and "not reachable" in r.getMessage()]
    assert 1 <= len(waiting) <= 3  # said once per outage, not once per retry


@pytest.mark.parametrize("browser", [False, True])
def test_add_to_scene_creates_a_source_reading_the_engines_stream(comps, browser):
    with FakeOBS(password=PASSWORD, browser_source=browser) as fake, LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake)) as live:
        wait_for(lambda: live.bridge.state == "connected", what="connect")
        code, reply = post(live.api.url, command_message("add_to_scene"))
        assert code == 200 and reply["ok"], reply
        inp = fake.inputs["Live2Diff"]
        if browser:
            assert inp["inputKind"] == "browser_source"
            assert inp["inputSettings"]["url"] == live.api.url + "/output?client=obs"
        else:
            assert inp["inputKind"] == "ffmpeg_source"
            assert inp["inputSettings"]["input"] == live.api.url + "/stream.mjpg?client=obs"
            assert inp["inputSettings"]["is_local_file"] is False
        assert [i["sourceName"] for i in fake.scenes["Scene"]] == ["Live2Diff"]
        assert any(t["boundsType"] == "OBS_BOUNDS_SCALE_INNER" for t in fake.transforms.values())
        # Again: the same source is reused, not duplicated.
        assert post(live.api.url, command_message("add_to_scene"))[0] == 200
        assert list(fake.inputs).count("Live2Diff") == 1 and len(fake.scenes["Scene"]) == 1
        code, reply = post(live.api.url, command_message("add_to_scene", scene="No Such Scene"))
        assert code == 400 and "could not add" in reply["error"]


def test_add_to_scene_without_obs_says_so(comps):
    with LiveEngine(comps, PacedSource(fps=20)) as live:
        code, reply = post(live.api.url, command_message("add_to_scene"))
        assert code == 400 and "--obs" in reply["error"]


def test_lip_sync_sets_the_audio_offset_to_the_video_latency(comps, caplog):
    caplog.set_level(logging.INFO)
    with FakeOBS(password=PASSWORD) as fake, LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake, lipsync_input="Mic/Aux")) as live:
        wait_for(lambda: live.bridge.lipsync_ms is not None, timeout=15, what="lip sync")
        assert live.bridge.lipsync_ms > 5  # a measured latency, not a warmup frame's
        wait_for(lambda: abs(fake.sync_offsets["Mic/Aux"] - live.controller.status()["latency_ms"]) < 60, timeout=15,
                 what="the offset to follow the latency")
        assert fake.sync_offsets["Mic/Aux"] == live.bridge.lipsync_ms
    with FakeOBS(password=PASSWORD) as fake, LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake, lipsync_input="No Mic")) as live:
        wait_for(lambda: any("No Mic" in r.getMessage() for r in caplog.records), timeout=15, what="the warning")
        checks = live.bridge.lipsync_checks
        wait_for(lambda: live.bridge.lipsync_checks >= checks + 2, timeout=30, what="two more lip-sync checks")
        assert sum("No Mic" in r.getMessage() for r in caplog.records) == 1


def test_1000_hostile_custom_events_each_get_an_error_and_change_nothing(comps):
    # OBS and the sender run in processes of their own, as they do for real.
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_obs.py"), "--password", PASSWORD],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(fake.stdout.readline())
        with LiveEngine(comps, PacedSource(fps=15), obs=obs_opts(port)) as live:
            wait_for(lambda: live.bridge.state == "connected", what="connect")
            live.wait_outputs(30)
            prompt = live.frames.prompt
            out = run_hostile_sender("obs", port, PASSWORD)
            replies = out["replies"]
            assert len(replies) == 1000 and all(r["ok"] is False and r["error"] for r in replies)
            assert sorted(r["id"] for r in replies) == list(range(1000))
            assert live.controller.applied == 0 and live.frames.prompt == prompt
            assert_stream_went_on(live, out)
    finally:
        fake.stdin.close()
        fake.wait(10)


def _run_args(*extra):
    from live2diff_engine.cli import build_parser

    return build_parser().parse_args(["run", "--model", "tiny", *extra])


def test_obs_settings_come_from_options_then_environment_then_config_then_obs_itself(tmp_path, monkeypatch):
    from live2diff_engine.options import control_settings

    xdg = tmp_path / "xdg"
    (xdg / "obs-studio").mkdir(parents=True)
    (xdg / "obs-studio" / "global.ini").write_text(
        "[OBSWebSocket]\nServerEnabled=true\nServerPort=4466\nAuthRequired=true\nServerPassword=from-obs\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("OBS_WEBSOCKET_PASSWORD", raising=False)
    monkeypatch.setenv("LIVE2DIFF_HOME", str(tmp_path / "l2d"))
    # Nothing given: OBS's own settings on this machine.
    obs = control_settings(_run_args("--obs"))["obs"]
    assert (obs["port"], obs["password"]) == (4466, "from-obs") and "global.ini" in obs["from"]
    # The config file wins over OBS's settings, the environment over the file, the option over all.
    cfg = tmp_path / "config.toml"
    cfg.write_text('[obs]\nenabled = true\npassword = "from-file"\nport = 4470\n')
    obs = control_settings(_run_args("--config", str(cfg)))["obs"]
    assert (obs["port"], obs["password"]) == (4470, "from-file")
    monkeypatch.setenv("OBS_WEBSOCKET_PASSWORD", "from-env")
    assert control_settings(_run_args("--config", str(cfg)))["obs"]["password"] == "from-env"
    obs = control_settings(_run_args("--config", str(cfg), "--obs-password", "from-option", "--obs-port", "4480"))["obs"]
    assert (obs["port"], obs["password"]) == (4480, "from-option")
    # No OBS control unless asked for.
    assert control_settings(_run_args())["obs"] is None


def test_the_source_watch_checks_at_connect_then_after_a_quiet_spell_at_most_every_few_seconds():
    from live2diff_engine.control.obs import SourceWatch

    w = SourceWatch(stale_s=3.0, every_s=10.0)
    assert w.due(100.0, readers=1)  # a new connection: look at once, whatever the count
    w.checked(100.0)
    assert not w.due(101.0, readers=1) and not w.stale(101.0)
    # Nobody reads: not due (nor stale) before 3 s, then due; after a check, not again for 10 s.
    assert not w.due(102.0, readers=0) and not w.stale(102.0)
    assert not w.due(104.9, readers=0)
    assert w.due(110.0, readers=0) and w.stale(110.0)
    w.checked(110.0)
    assert not any(w.due(t, readers=0) for t in (111.0, 115.0, 119.9))
    assert w.due(120.0, readers=0)
    w.checked(120.0)
    # A reader came back and left again: the quiet spell starts over, and the 10 s still hold.
    assert not w.due(121.0, readers=1) and not w.stale(121.0)
    assert not w.due(122.0, readers=0) and not w.due(125.5, readers=0)
    assert not w.due(129.9, readers=0) and w.due(130.0, readers=0)
    w.reset()  # reconnected
    assert w.due(130.1, readers=0)


def test_the_bridge_says_whether_obs_pulls_the_stream_and_quiets_its_source(comps):
    with FakeOBS(password=PASSWORD) as fake, \
            LiveEngine(comps, PacedSource(fps=20), obs=obs_opts(fake, source_stale_s=0.5, source_kick_every_s=1.0)) as live:
        wait_for(lambda: live.bridge.state == "connected", what="connect")
        wait_for(lambda: live.controller.status()["obs_source"] == "absent", timeout=10, what="'absent'")
        assert post(live.api.url, command_message("add_to_scene"))[1]["ok"]
        # The fake OBS reads no stream: the source exists, nobody pulls, and the bridge re-opens it
        # now and then (with its own settings), never in a flood.
        assert live.controller.status()["obs_source"] == "not pulling"
        assert live.controller.status()["stream_clients"] == 0
        wait_for(lambda: live.bridge.source_kicks >= 2, timeout=20, what="re-opening")
        times = live.bridge.source_kick_times  # never a flood: no two within source_kick_every_s
        assert all(b - a >= 1.0 for a, b in zip(times, times[1:])), times
        inp = fake.inputs["Live2Diff"]
        assert inp["inputSettings"]["input"] == live.api.url + "/stream.mjpg?client=obs"
        # A reader that says it is OBS's source: "pulling"; one that does not, not.
        import urllib.request

        with urllib.request.urlopen(live.api.url + "/stream.mjpg", timeout=10) as r:
            r.read1(100)
            wait_for(lambda: live.controller.status()["stream_clients"] == 1, timeout=10, what="one reader")
            assert live.controller.status()["obs_source"] == "not pulling"
            with urllib.request.urlopen(live.api.url + "/stream.mjpg?client=obs", timeout=10) as r2:
                r2.read1(100)
                wait_for(lambda: live.controller.status()["obs_source"] == "pulling", timeout=10, what="'pulling'")
                assert live.api.stream_clients("obs") == 1 and live.controller.status()["stream_clients"] == 2
                # Pulling: left alone, through more than source_stale_s + source_kick_every_s of the
                # bridge's own looks at the source (a bridge that ignored the reader would re-open it).
                kicks, since = live.bridge.source_kicks, time.monotonic()
                wait_for(lambda: (live.bridge.last_source_look or 0) - since > 2.0, timeout=30, what="the bridge's looks")
                assert live.bridge.source_kicks == kicks
        wait_for(lambda: live.controller.status()["stream_clients"] == 0, timeout=10, what="the readers to leave")
        wait_for(lambda: live.controller.status()["obs_source"] == "not pulling", timeout=10, what="'not pulling'")
