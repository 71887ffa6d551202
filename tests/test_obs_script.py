"""The OBS script (obs_scripts/live2diff_obs.py): its logic without OBS, then in a real OBS."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import obs_real  # noqa: E402
from obs_real import RealOBS, free_port, group_pids, require_obs  # noqa: E402

from live2diff_engine.control import schema  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "obs_scripts" / "live2diff_obs.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("live2diff_obs_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


L = _load_script()

STATUS = schema.status_message(
    {
        "state": "streaming",
        "paused": False,
        "prompt": "a red fox",
        "negative_prompt": "",
        "style": "default",
        "styles": ["default", "anime", "toon"],
        "strength": 0.5,
        "steps": 2,
        "seed": 7,
        "fps": 12.04,
        "latency_ms": 84.6,
        "frames_out": 321,
        "obs": {"state": "connected"},
        "api_url": "http://127.0.0.1:8765",
    }
)


# Waiting is not judging: a busy machine may take long; only a wait that never ends is a failure.
WAIT_FLOOR_S = 60.0


def wait_until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + max(timeout, WAIT_FLOOR_S)
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------ pure Python: messages


def test_script_imports_without_obs():
    assert L.obs is None
    assert L.obsws_python is not None  # installed in the test env


@pytest.mark.parametrize(
    "cmd,args",
    [
        ("set_prompt", {"prompt": "a red fox"}),
        ("set_negative_prompt", {"negative_prompt": "blurry"}),
        ("set_style", {"style": "anime"}),
        ("set_strength", {"strength": 0.35}),
        ("set_seed", {"seed": 42}),
        ("pause", {}),
        ("resume", {}),
        ("reset", {}),
        ("status", {}),
        ("add_to_scene", {"scene": "Scene"}),
        ("add_to_scene", {}),
    ],
)
def test_command_messages_match_the_engine_schema(cmd, args):
    msg = L.command_message(cmd, id="obs-1", **args)
    assert msg == schema.command_message(cmd, id="obs-1", **args)
    parsed = schema.parse_command(json.dumps(msg), styles=["default", "anime"])
    assert (parsed.cmd, parsed.args, parsed.id) == (cmd, args, "obs-1")


def test_controller_sends_valid_commands_with_ids():
    ctl = L.Controller({"use_websocket": False})  # not started: messages stay in its queue
    msgs = [ctl.send("set_prompt", prompt="x"), ctl.send("reset"), ctl.toggle_pause(), ctl.send("set_guidance", guidance=1.5)]
    ids = [m["id"] for m in msgs]
    assert len(set(ids)) == 4
    for m in msgs:
        schema.parse_command(m)
    assert msgs[2]["cmd"] == "pause"  # nothing known: pause first
    assert ctl.toggle_pause()["cmd"] == "resume"  # then it alternates


def test_event_payload_from_obsws_python_becomes_a_dict():
    from obsws_python.util import as_dataclass

    data = as_dataclass("CustomEvent", STATUS)  # what EventClient hands to on_custom_event
    assert L.event_to_dict(data) == STATUS
    assert L.event_to_dict({"a": 1}) == {"a": 1}
    assert L.event_to_dict(object()) == {}


def test_status_formatting():
    line = L.status_line(STATUS, L.LINK_WS)
    assert line == "[live2diff] engine streaming | style default | prompt 'a red fox' | 12.0 fps | via obs-websocket"
    assert L.status_line(None, None, "obs-websocket: connecting") == "[live2diff] engine offline (obs-websocket: connecting)"
    paused = dict(STATUS, paused=True)
    assert "engine streaming (paused)" in L.status_line(paused, L.LINK_HTTP)
    text = L.format_status(STATUS, L.LINK_HTTP)
    assert "Engine: streaming (via HTTP API)" in text
    assert "Style: default" in text and "Strength: 0.50" in text and "Seed: 7" in text
    assert "FPS: 12.0" in text and "Latency: 85 ms" in text
    assert "Prompt: a red fox" in text
    assert L.format_status(None, None, "why").startswith("Engine: offline\nwhy")
    assert "(guidance 1: no effect)" in L.format_status(dict(STATUS, negative_prompt="blurry", guidance=1.0), L.LINK_HTTP)
    assert "Guidance: 2.5" in L.format_status(dict(STATUS, negative_prompt="blurry", guidance=2.5), L.LINK_HTTP)
    long_prompt = dict(STATUS, prompt="word " * 100)
    assert len(L.status_line(long_prompt, L.LINK_WS)) < 160
    # a log line only when connection, state, style or prompt change (not fps)
    k = L.status_key(STATUS, L.LINK_WS)
    assert L.status_key(dict(STATUS, fps=30.0, latency_ms=10), L.LINK_WS) == k
    for changed in (dict(STATUS, style="anime"), dict(STATUS, prompt="b"), dict(STATUS, state="starting")):
        assert L.status_key(changed, L.LINK_WS) != k
    assert L.status_key(STATUS, L.LINK_HTTP) != k
    assert L.status_key(None, None) == ("offline", "offline")
    assert L.status_key(None, None, "starting") != L.status_key(None, None)  # logged when it moves on


def test_status_texts_show_no_figure_an_engine_does_not_have():
    """No old frame rate for an engine starting or stopped; no '0.0 fps' for a warmup whose frames
    have not gone out yet (its frames are the camera's while they do); the stream's latency being
    measured is not '-'."""
    for state in ("starting", "stopped"):
        st = dict(STATUS, state=state)  # (a status that still carries figures from before)
        assert L.status_line(st, L.LINK_HTTP) == f"[live2diff] engine {state} | style default | prompt 'a red fox' | via HTTP API"
        assert "FPS: -   Latency: -   " in L.format_status(st, L.LINK_HTTP)
    warming = dict(STATUS, state="warming up", fps=0.0, latency_ms=None)
    assert "fps" not in L.status_line(warming, L.LINK_WS) and "0.0" not in L.format_status(warming, L.LINK_WS)
    assert "| 9.5 fps |" in L.status_line(dict(warming, fps=9.5), L.LINK_WS)  # its frames going out
    assert "FPS: 9.5   Latency: -" in L.format_status(dict(warming, fps=9.5), L.LINK_WS)
    assert "Latency: measuring ..." in L.format_status(dict(STATUS, latency_ms=None), L.LINK_WS)
    assert "| 0.0 fps |" in L.status_line(dict(STATUS, fps=0.0), L.LINK_WS)  # a stream that stalls says so


def test_offline_means_nothing_answers_at_the_api_url(tmp_path):
    """'engine offline' only where nothing answers: an API that refuses the token, answers as
    something else, or takes the request and says nothing is named as such; the engine the script
    started says 'starting' while it loads (nothing listens yet), and after a failure its reason."""
    import socket

    api = f"http://127.0.0.1:{free_port()}"
    eng = L.EngineProcess()
    ctl = _http_controller(api)
    ctl.local_engine = lambda: eng
    ctl.start()
    try:
        wait_until(lambda: "connection refused" in ctl.view()[2], what="a poll")
        assert ctl.view()[3] == "offline"
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        eng.proc, eng.api_url = proc, api
        try:
            wait_until(lambda: ctl.view()[3] == "starting", what="starting")
            assert ctl.view()[2] == f"engine process {proc.pid} is loading; its API at {api} is not up yet"
            assert L.status_line(None, None, *ctl.view()[2:]) == f"[live2diff] engine starting ({ctl.view()[2]})"
        finally:
            proc.kill()
            proc.wait()
        wait_until(lambda: ctl.view()[3] == f"exited with code {proc.returncode}", what="the exit")
    finally:
        ctl.stop()
    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components

    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10), api_token="right") as live:  # the real engine's API
        fake = live.api
        ctl = _http_controller(fake.url, token="wrong").start()
        try:
            wait_until(lambda: ctl.view()[3] == "refuses the script's API token", what="the token")
            assert "set 'API token'" in ctl.view()[2]
        finally:
            ctl.stop()
        ctl = _http_controller(fake.url.replace("127.0.0.1", "localhost") + "/elsewhere", token="right").start()
        try:  # (HTTP 404: not an engine's API)
            wait_until(lambda: ctl.view()[3] == "not found", what="something else")
        finally:
            ctl.stop()
    with socket.socket() as busy:  # takes the connection, never answers
        busy.bind(("127.0.0.1", 0))
        busy.listen(16)
        ctl = _http_controller(f"http://127.0.0.1:{busy.getsockname()[1]}")
        ctl._http.timeout = 0.3
        ctl.start()
        try:
            wait_until(lambda: ctl.view()[3] == "not answering", what="not answering")
        finally:
            ctl.stop()


def test_the_panel_and_the_log_say_when_obs_does_not_pull_the_stream():
    connected = dict(STATUS, obs="connected", obs_source="pulling")
    idle = dict(connected, obs_source="not pulling")
    assert "not pulling" not in L.format_status(connected, L.LINK_WS) + L.status_line(connected, L.LINK_WS)
    assert "OBS source not pulling the stream" in L.format_status(idle, L.LINK_WS)
    assert L.status_line(idle, L.LINK_WS).endswith("| OBS source not pulling the stream")
    assert L.status_key(idle, L.LINK_WS) != L.status_key(connected, L.LINK_WS)  # logged when it starts and ends
    # Only while the engine is connected to OBS: otherwise its OBS link line says what is wrong.
    assert "not pulling" not in L.format_status(dict(idle, obs="waiting for OBS"), L.LINK_HTTP)
    assert "no 'Live2Diff' source yet" in L.format_status(dict(connected, obs_source="absent"), L.LINK_WS)


def test_the_source_keeper_reopens_the_engines_source_when_it_does_not_read():
    """OBS's Live2Diff source, as the script keeps it where the engine has no OBS link: re-opened
    when an engine (re)appears and OBS does not read it yet, and when OBS has read nothing for
    3 s (at most every 10 s); 'not pulling' said meanwhile. Never a source that reads another
    address, never where the engine's own OBS link keeps it."""
    api = "http://127.0.0.1:8765"
    src = {"kind": "ffmpeg_source", "url": "http://localhost:8765/stream.mjpg?client=obs"}
    idle, read = dict(STATUS, obs="off", stream_clients_obs=0), dict(STATUS, obs="off", stream_clients_obs=1)
    k = L.SourceKeeper()
    assert k.look(0.0, idle, True, src, api) == (None, True)  # an engine came back, OBS reads nothing
    assert k.look(1.0, idle, False, src, api) == (None, False)
    assert k.look(3.5, idle, False, src, api) == ("not pulling", False)  # (re-opened 3.5 s ago)
    assert k.look(10.0, idle, False, src, api) == ("not pulling", True)
    assert k.look(11.0, idle, False, src, api) == ("not pulling", False)
    assert k.look(12.0, read, False, src, api) == ("pulling", False)
    assert k.look(13.0, read, True, src, api) == ("pulling", False)  # came back and OBS reads it already
    assert k.look(13.5, idle, False, src, api) == (None, False)
    assert k.look(16.6, idle, False, src, api) == ("not pulling", False)  # (10 s since the last re-open)
    assert k.look(20.0, idle, False, src, api) == ("not pulling", True)
    assert k.kicks == 3
    for status, source in ((dict(idle, obs="connected"), src),  # the engine's own OBS link keeps it
                           (None, src),  # no engine
                           (idle, dict(src, url="http://gpu-box:8765/stream.mjpg?client=obs")),  # another engine's
                           (idle, dict(src, url="http://127.0.0.1:9000/stream.mjpg?client=obs")),
                           (idle, dict(src, kind="image_source")), (idle, None)):
        k = L.SourceKeeper()
        assert [k.look(t, status, t == 0, source, api) for t in (0.0, 5.0, 20.0)] == [(None, False)] * 3
    k = L.SourceKeeper()  # a source whose reads the engine does not count as OBS's: re-opened when it comes back only
    plain = dict(src, url=api + "/stream.mjpg")
    assert [k.look(t, idle, t == 0, plain, api) for t in (0.0, 5.0, 20.0)] == [(None, True), (None, False), (None, False)]
    browser = {"kind": "browser_source", "url": api + "/output?client=obs"}
    assert L.SourceKeeper().look(0.0, idle, True, browser, api) == (None, True)
    assert L.status_line(idle, L.LINK_HTTP, source="not pulling").endswith("| OBS source not pulling the stream")
    assert "this script is re-opening its 'Live2Diff' source" in L.format_status(idle, L.LINK_HTTP, source="not pulling")


def test_an_engine_appearing_is_counted_and_its_style_changes_logged():
    ctl = L.Controller({"use_websocket": False})
    up = dict(STATUS, uptime_s=50.0)
    ctl._on_message(up, L.LINK_HTTP)  # the first seen
    assert ctl.take_appearances() == 1 and ctl.take_appearances() == 0
    ctl._on_message(dict(up, uptime_s=51.0), L.LINK_HTTP)
    assert ctl.take_appearances() == 0
    ctl._set_http(False, "connection refused", "refused")  # the API went away and came back
    ctl._on_message(dict(up, uptime_s=52.0), L.LINK_HTTP)
    assert ctl.take_appearances() == 1
    ctl._on_message(dict(up, uptime_s=3.0), L.LINK_HTTP)  # another engine, between two looks
    assert ctl.take_appearances() == 1
    ctl._on_message(dict(up, uptime_s=4.0, state="stopped"), L.LINK_HTTP)
    ctl._status_at -= 10  # (stale)
    ctl._on_message(dict(up, uptime_s=5.0, state="stopped"), L.LINK_HTTP)  # a stopped one is nothing to show
    assert ctl.take_appearances() == 0
    change = {"style": "anime", "note": "style anime: strength 0.36 -> 0.5", "changes": {}, "time": 1.0}
    ctl.drain_logs()
    ctl._on_message(dict(up, uptime_s=6.0, style_change=change), L.LINK_HTTP)
    ctl._on_message(dict(up, uptime_s=7.0, style_change=change), L.LINK_HTTP)
    assert ctl.drain_logs() == [("info", "[live2diff] style anime: strength 0.36 -> 0.5")]  # once
    assert "Last style change: style anime: strength 0.36 -> 0.5" in L.format_status(dict(up, style_change=change), L.LINK_HTTP)
    ctl._status_at -= 10
    ctl._on_message(dict(up, uptime_s=1.0, style_change=dict(change, time=2.0)), L.LINK_HTTP)
    assert ctl.drain_logs() == []  # an engine just seen: its last switch is old news


def test_cycle_style():
    styles = ["default", "anime", "toon"]
    assert L.cycle_style(styles, "default", 1) == "anime"
    assert L.cycle_style(styles, "toon", 1) == "default"
    assert L.cycle_style(styles, "default", -1) == "toon"
    assert L.cycle_style(styles, "unknown", 1) == "default"
    assert L.cycle_style(styles, "unknown", -1) == "toon"
    assert L.cycle_style([], "x", 1) is None
    assert L.cycle_style(None, None, 1) is None


def test_next_and_previous_style_pass_over_styles_without_weights():
    styles = ["default", "anime", "toon", "zen"]
    missing = {"anime": "live2diff-engine models download --style anime"}
    assert L.cycle_style(styles, "default", 1, missing) == "toon"
    assert L.cycle_style(styles, "toon", -1, missing) == "default"
    assert L.cycle_style(styles, "zen", 1, missing) == "default"
    assert L.cycle_style(styles, "unknown", 1, {"default": "x"}) == "anime"
    assert L.cycle_style(styles, "default", 1, {"anime": "x", "toon": "x", "zen": "x"}) is None  # nowhere to go
    # the hotkeys, from the engine's status: they keep cycling and never land on a missing style
    ctl = L.Controller({"use_websocket": False})
    status = dict(STATUS, styles=styles, styles_missing=missing)
    landed = []
    for _ in range(6):
        ctl._on_message(status, L.LINK_HTTP)
        msg = ctl.step_style(+1)
        landed.append(msg["style"])
        status = dict(status, style=msg["style"])
    assert landed == ["toon", "zen", "default", "toon", "zen", "default"]
    ctl._on_message(dict(status, style="default", styles_missing={n: "cmd " + n for n in styles[1:]}), L.LINK_HTTP)
    assert ctl.step_style(-1) is None
    assert ctl.drain_logs() == [("warning", "[live2diff] no other style is downloaded (get one with: cmd anime)")]


def test_the_panel_marks_styles_without_weights_and_shows_a_download():
    missing = {"anime": "live2diff-engine models download --style anime"}
    text = L.format_status(dict(STATUS, styles_missing=missing), L.LINK_HTTP)
    assert "Not downloaded: anime (get one with: live2diff-engine models download --style anime)" in text
    assert "Not downloaded" not in L.format_status(STATUS, L.LINK_HTTP)
    assert L.style_label("anime", missing) == "anime (not downloaded)" and L.style_label("toon", missing) == "toon"
    d = {"style": "anime", "state": "downloading", "bytes": 1_500_000, "total": 4_000_000, "file_index": 0, "files": 1}
    assert "Downloading style anime: 1.5 of 4.0 MB" in L.format_status(dict(STATUS, download=d), L.LINK_HTTP)
    assert "Style anime downloaded" in L.format_status(dict(STATUS, download=dict(d, state="done")), L.LINK_HTTP)
    failed = dict(d, state="failed", error="cannot download x: HTTP 401 (check the token)")
    assert "Download of style anime failed: cannot download x: HTTP 401" in L.format_status(dict(STATUS, download=failed), L.LINK_HTTP)


def test_the_panel_and_the_log_say_which_style_loads_while_the_current_one_streams():
    loading = dict(STATUS, style_loading="anime")  # what the engine reports while the loader reads anime
    text = L.format_status(loading, L.LINK_HTTP)
    assert "Style: default (loading anime ...)" in text
    assert "Loading style anime beside the stream: default keeps streaming until it is in" in text
    assert "loading" not in L.format_status(STATUS, L.LINK_HTTP).lower()
    assert L.format_status(dict(STATUS, style_loading=None), L.LINK_HTTP) == L.format_status(STATUS, L.LINK_HTTP)
    assert "| style default (loading anime ...) |" in L.status_line(loading, L.LINK_WS)
    # a log line when a load starts, and when it ends (the style in place then changes too)
    assert L.status_key(loading, L.LINK_WS) != L.status_key(STATUS, L.LINK_WS)
    assert L.style_label("anime", {}, "anime") == "anime (loading ...)" and L.style_label("toon", {}, "anime") == "toon"
    assert L.style_label("anime", {"anime": "cmd"}, "anime") == "anime (not downloaded)"


def test_the_pause_button_follows_the_engine():
    ctl = L.Controller({"use_websocket": False})
    ctl._on_message(STATUS, L.LINK_HTTP)  # streaming
    assert L.pause_label(ctl.paused_shown()) == "Pause"
    assert ctl.toggle_pause()["cmd"] == "pause"
    assert L.pause_label(ctl.paused_shown()) == "Resume"  # at once: OBS rebuilds the panel right after the click
    ctl._on_message(STATUS, L.LINK_HTTP)  # a status sent before the pause was applied does not flip it back
    assert ctl.paused_shown() is True
    ctl._on_message(dict(STATUS, paused=True, state="paused"), L.LINK_HTTP)  # confirmed
    assert ctl.paused_shown() is True and ctl._pause_wanted is None
    ctl._on_message(STATUS, L.LINK_HTTP)  # resumed from elsewhere (the dock, ctl): the button follows
    assert L.pause_label(ctl.paused_shown()) == "Pause"
    # a refused pause: the button shows the engine's state again
    msg = ctl.toggle_pause()
    assert ctl.paused_shown() is True
    ctl._pending[msg["id"]] = "pause"
    ctl._on_message(schema.reply_message(msg["id"], False, "no"), L.LINK_HTTP)
    assert ctl.paused_shown() is False
    # no answer at all: after a while, the engine's state again
    ctl.toggle_pause()
    ctl._pause_wanted = (True, time.monotonic() - 0.1)
    assert ctl.paused_shown() is False


def test_messages_from_others_are_ignored_and_refusals_logged():
    ctl = L.Controller({"use_websocket": False})
    ctl._on_message({"app": "other", "v": 1, "kind": "status"}, L.LINK_WS)
    ctl._on_message(L.command_message("set_prompt", prompt="x"), L.LINK_WS)  # our own broadcast echoed
    assert ctl.snapshot()[0] is None
    ctl._pending["obs-9"] = "set_style"
    ctl._on_message(schema.reply_message("obs-9", False, "unknown style 'x'"), L.LINK_WS)
    ctl._on_message(schema.reply_message("someone-else", False, "nope"), L.LINK_WS)  # not ours
    assert ctl.drain_logs() == [("warning", "[live2diff] engine refused set_style: unknown style 'x'")]
    ctl._on_message(STATUS, L.LINK_WS)
    status, link, _ = ctl.snapshot()
    assert status["style"] == "default" and link == L.LINK_WS
    assert ctl.step_style(1)["style"] == "anime"


# ---------------------------------------------------------------- obs-websocket password lookup


def test_websocket_settings_from_obs_29_global_ini(tmp_path):
    (tmp_path / "global.ini").write_text(
        "[General]\nFirstRun=true\n\n[OBSWebSocket]\nFirstLoad=false\nServerEnabled=true\n"
        "ServerPort=4466\nAuthRequired=true\nServerPassword=Secr3t=with=equals\n"
    )
    cfg = L.read_websocket_config(str(tmp_path))
    assert cfg == {"port": 4466, "password": "Secr3t=with=equals", "auth_required": True, "enabled": True, "source": "global.ini"}
    assert L.websocket_target("", 0, str(tmp_path)) == {"port": 4466, "password": "Secr3t=with=equals", "source": "global.ini"}
    # the script's own settings win
    assert L.websocket_target("mine", 4999, str(tmp_path)) == {"port": 4999, "password": "mine", "source": "script settings"}


def test_websocket_settings_from_obs_30_config_json_win(tmp_path):
    (tmp_path / "global.ini").write_text("[OBSWebSocket]\nServerPort=4466\nServerPassword=old\n")
    d = tmp_path / "plugin_config" / "obs-websocket"
    d.mkdir(parents=True)
    (d / "config.json").write_text(
        json.dumps({"server_enabled": True, "server_port": 4477, "auth_required": True, "server_password": "new", "alerts_enabled": False})
    )
    assert L.websocket_target("", 0, str(tmp_path)) == {"port": 4477, "password": "new", "source": "config.json"}


def test_websocket_settings_without_auth_or_config(tmp_path):
    (tmp_path / "global.ini").write_text("[OBSWebSocket]\nServerPort=4455\nAuthRequired=false\nServerPassword=unused\n")
    target = L.websocket_target("", 0, str(tmp_path))
    assert target["password"] == "" and target["port"] == 4455
    assert L.read_websocket_config(str(tmp_path / "missing")) is None
    assert L.websocket_target("", 0, None) == {"port": 4455, "password": "", "source": "none"}


# ------------------------------------------------------------------------------ engine process


def _fake_engine(folder: Path, marker: Path) -> Path:
    """A stand-in `live2diff-engine` that records how it was started and stopped. In Python, as the
    engine is: a shell cannot trap a SIGINT it was started with ignored (a test run started in the
    background starts everything so), Python installs its handler whatever it inherited."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "live2diff-engine"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import signal, sys, time\n"
        f"marker = {str(marker)!r}\n"
        "def interrupted(*_):\n"
        "    open(marker, 'a').write('interrupted\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGINT, interrupted)\n"
        "open(marker, 'w').write('args: ' + ' '.join(sys.argv[1:]) + '\\n')\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def _real_engine(folder: Path, marker: Path) -> Path:
    """`live2diff-engine` in a venv's bin: the real engine (tiny model, synthetic camera) from this
    checkout, with the arguments the script gives it noted in ``marker`` first."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "live2diff-engine"
    exe.write_text(
        "#!/bin/sh\n"
        f"echo \"args: $*\" > '{marker}'\n"
        f"PYTHONPATH='{ROOT}' exec '{sys.executable}' -m live2diff_engine \"$@\" --model tiny --source synthetic\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def test_resolve_engine_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    venv = tmp_path / "venv"
    exe = _fake_engine(venv / ("Scripts" if os.name == "nt" else "bin"), tmp_path / "m")
    assert L.resolve_engine_command("live2diff-engine run --source synthetic", str(venv)) == [
        str(exe), "run", "--source", "synthetic"]
    assert L.resolve_engine_command(f"{exe} run") == [str(exe), "run"]
    with pytest.raises(ValueError, match="not found"):
        L.resolve_engine_command("live2diff-engine run")
    with pytest.raises(ValueError, match="empty"):
        L.resolve_engine_command("  ")
    # on PATH
    monkeypatch.setenv("PATH", str(exe.parent))
    assert L.resolve_engine_command("live2diff-engine run")[0] == str(exe)
    # the installers' default venv
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    default = _fake_engine(tmp_path / "xdg" / "live2diff-engine" / "venv" / "bin", tmp_path / "m")
    assert L.resolve_engine_command("live2diff-engine run")[0] == str(default)
    # never OBS's sys.executable
    assert sys.executable not in L.resolve_engine_command("live2diff-engine run")


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_engine_process_stops_with_sigint(tmp_path):
    """The real engine (tiny model), started as the script starts it, in a process group of its own,
    stops on its signal with status 0 where no API is known to ask first."""
    marker = tmp_path / "marker.txt"
    exe = _real_engine(tmp_path / "bin", marker)
    eng = L.EngineProcess()
    log = tmp_path / "logs" / "engine.log"
    argv = [str(exe), "run", "--sink", "null", "--no-api"]
    eng.start(argv, str(log))
    assert eng.running() and log.exists()
    with pytest.raises(RuntimeError, match="already running"):
        eng.start(argv)
    wait_until(lambda: "[streaming]" in log.read_text() or "streaming from" in log.read_text(), timeout=120,
               what="the engine to stream")
    assert os.getpgid(eng.pid) == eng.pid  # its own process group: OBS's signals do not reach it
    assert eng.stop(grace=60) == 0
    # no API to ask (none given at start): the signal came next, and the log line says so
    assert eng.stopped_by == "signal" and eng.stop_notes[0].startswith("API: no local API")
    assert L.stop_summary(eng).startswith(" (stopped by its stop signal; API: no local API")
    assert not eng.running() and eng.stop() == 0


# ------------------------------------------------------- the engine's command line (issue 23)


def test_windows_command_lines_split_as_windows_programs_split_them():
    split = L.split_windows_command_line
    # a quoted program path with a space, a quoted prompt: quotes group and are removed
    assert split(r'"C:\Users\John Smith\AppData\Local\live2diff-engine\venv\Scripts\live2diff-engine.exe" run '
                 r'--prompt "a fox"') == [
        r"C:\Users\John Smith\AppData\Local\live2diff-engine\venv\Scripts\live2diff-engine.exe", "run", "--prompt", "a fox"]
    assert split(r'"C:\Program Files\x.exe" run --prompt "a fox"') == [r"C:\Program Files\x.exe", "run", "--prompt", "a fox"]
    # Microsoft's table ("Parsing C command-line arguments"), after a program name
    assert split(r'x "a b c" d e') == ["x", "a b c", "d", "e"]
    assert split(r'x "ab\"c" "\\" d') == ["x", 'ab"c', "\\", "d"]
    assert split(r'x a\\\b d"e f"g h') == ["x", r"a\\\b", "de fg", "h"]
    assert split(r'x a\\\"b c d') == ["x", r'a\"b', "c", "d"]  # odd backslashes: a literal quote
    assert split(r'x a\\\\"b c" d e') == ["x", r"a\\b c", "d", "e"]  # even: a delimiting quote
    assert split(r'x a"b"" c d') == ["x", 'ab" c d']  # "" inside quotes: a literal quote
    assert split(r'x "a b"c') == ["x", "a bc"]  # a quoted part joins the text after it
    # a trailing backslash before the closing quote: doubled it is one backslash, single it escapes the quote
    assert split(r'x --out "C:\my dir\\" next') == ["x", "--out", "C:\\my dir\\", "next"]
    assert split(r'x "C:\my dir\" next') == ["x", 'C:\\my dir" next']
    # in the program name backslashes are always literal (a path)
    assert split(r'"C:\dir\" run') == ["C:\\dir\\", "run"]
    assert split('x "" \t y  ') == ["x", "", "y"]  # an empty quoted argument; tabs separate
    assert split('x "unterminated quote') == ["x", "unterminated quote"]
    assert split("   ") == [] and split("") == []
    # the inverse of what subprocess (list2cmdline) writes: whatever the argv, it comes back whole
    import random

    rng = random.Random(23)
    for _ in range(3000):
        argv = ["prog"] + ["".join(rng.choice(' \ta"\\b') for _ in range(rng.randrange(0, 7))) for _ in range(rng.randrange(1, 4))]
        assert split(subprocess.list2cmdline(argv)) == argv, subprocess.list2cmdline(argv)


def test_command_lines_split_by_the_platforms_rules(tmp_path, monkeypatch):
    assert L.split_command_line('live2diff-engine run --prompt "a fox"', windows=False) == [
        "live2diff-engine", "run", "--prompt", "a fox"]
    assert L.split_command_line(r"'/opt/my engine/live2diff-engine' run --prompt a\ fox", windows=False) == [
        "/opt/my engine/live2diff-engine", "run", "--prompt", "a fox"]  # POSIX keeps its shell rules
    assert L.split_command_line(r'"C:\a b\e.exe" run --prompt "a fox"', windows=True) == [
        r"C:\a b\e.exe", "run", "--prompt", "a fox"]
    with pytest.raises(ValueError):
        L.split_command_line('e run --prompt "a fox', windows=False)
    # the start button's path: a quoted program path with a space is found, the prompt has no quotes
    folder = tmp_path / "John Smith" / "bin"
    exe = _fake_engine(folder, tmp_path / "m")
    argv = L.resolve_engine_command(f'"{exe}" run --prompt "a fox"')
    assert argv == [str(exe), "run", "--prompt", "a fox"]


def _engine_venv(tmp_path):
    venv = tmp_path / "venv"
    exe = _fake_engine(venv / ("Scripts" if os.name == "nt" else "bin"), tmp_path / "m")
    return venv, exe


def test_the_engine_started_from_obs_publishes_no_virtual_camera_unless_asked(tmp_path):
    venv, exe = _engine_venv(tmp_path)
    target = {"port": 4455, "password": "pw"}
    ui = {"engine_command": L.DEFAULT_ENGINE_COMMAND, "engine_venv": str(venv), "api_url": L.DEFAULT_API_URL,
          "engine_virtual_camera": False}
    argv, env, api_url = L.engine_launch(ui, target, {})
    # OBS reads the engine's local stream: no virtual camera, which on Windows/macOS is OBS's own
    assert argv == [str(exe), "run", "--obs", "--sink", "null", "--api-port", "8765", "--obs-port", "4455"]
    assert not any("virtualcam" in a for a in argv)
    assert api_url == "http://127.0.0.1:8765" and env["OBS_WEBSOCKET_PASSWORD"] == "pw"
    # the script's setting asks for the virtual camera explicitly
    argv, _, _ = L.engine_launch(dict(ui, engine_virtual_camera=True), target, {})
    assert argv[argv.index("--sink") + 1] == "virtualcam" and "null" not in argv
    # a sink the user wrote is theirs (either way); the setting never adds a second one
    for vcam in (False, True):
        argv, _, _ = L.engine_launch(dict(ui, engine_command="live2diff-engine run --obs --sink file:rec.mp4",
                                          engine_virtual_camera=vcam), target, {})
        assert [a for a in argv if "sink" in a or a.startswith(("null", "virtualcam", "file:"))] == ["--sink", "file:rec.mp4"]
    argv, _, _ = L.engine_launch(dict(ui, engine_command="live2diff-engine run --sink=virtualcam"), target, {})
    assert argv.count("--sink") == 0 and "--sink=virtualcam" in argv
    # only `run` and `connect` take sinks
    argv, _, api_url = L.engine_launch(dict(ui, engine_command="live2diff-engine serve"), target, {})
    assert "--sink" not in argv and api_url is None
    assert L.engine_output_args(["e", "connect", "http://gpu:8765"]) == ["e", "connect", "http://gpu:8765", "--sink", "null"]
    assert L.engine_output_args(["py", "-u", "-m", "live2diff_engine", "run"]) == [
        "py", "-u", "-m", "live2diff_engine", "run", "--sink", "null"]  # the engine as a Python module


def test_the_script_stops_the_engine_at_the_api_address_the_engine_listens_on():
    run = ["e", "run"]
    assert L.engine_api_args(run, "http://127.0.0.1:9001") == (run + ["--api-port", "9001"], "http://127.0.0.1:9001")
    # the engine binds 127.0.0.1 by default (localhost may name ::1 first)
    assert L.engine_api_args(run, "http://localhost:9002/") == (run + ["--api-port", "9002"], "http://127.0.0.1:9002")
    # the command line's own port and host win
    assert L.engine_api_args(run + ["--api-port", "9100"], "http://127.0.0.1:9001")[1] == "http://127.0.0.1:9100"
    assert L.engine_api_args(run + ["--api-port=9100", "--api-host", "0.0.0.0"], "")[1] == "http://127.0.0.1:9100"
    assert L.engine_api_args(run + ["--api-port=9100", "--api-host", "::"], "")[1] == "http://[::1]:9100"
    # no API, a port the script cannot know, an address beyond this machine: nothing to ask
    assert L.engine_api_args(run + ["--no-api"], L.DEFAULT_API_URL) == (run + ["--no-api"], None)
    assert L.engine_api_args(run + ["--api-port", "0"], L.DEFAULT_API_URL)[1] is None
    assert L.engine_api_args(run + ["--api-port", "9100", "--api-host", "192.168.1.20"], "")[1] is None
    assert L.engine_api_args(run, "http://gpu-box:8765") == (run, None)  # not an engine the script starts here
    assert L.engine_api_args(run, "https://127.0.0.1:8765") == (run, None)


# --------------------------------------------- stopping the engine: API, signal, terminate (issue 23)


def _fake_engine_ignoring_sigint(folder: Path, marker: Path) -> Path:
    """A stand-in kept on purpose: the real engine cannot be made to ignore its stop signal."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "stubborn-engine"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        f"open({str(marker)!r}, 'w').write('started')\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_an_engine_that_ignores_its_stop_signal_is_terminated_after_a_bounded_wait(tmp_path):
    marker = tmp_path / "started"
    exe = _fake_engine_ignoring_sigint(tmp_path / "bin", marker)
    eng = L.EngineProcess()
    eng.start([str(exe)], api_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    wait_until(marker.exists, what="stubborn engine start")
    code = eng.stop(grace=0.5, term_grace=30)
    assert code == -signal.SIGTERM and eng.stopped_by == "terminate"
    assert eng.stop_notes[0].startswith("API: http://127.0.0.1:") and "connection refused" in eng.stop_notes[0]
    assert "terminated: it did not stop cleanly" in L.stop_summary(eng)


class FakeWindowsProc:
    """The part of a Windows Popen the stop uses, with the OS calls faked: CTRL_BREAK_EVENT fails as
    GenerateConsoleCtrlEvent does for a caller without a console (OBS), or reaches the engine."""

    def __init__(self, break_reaches: bool):
        self.pid, self.returncode, self.calls = 4242, None, []
        self.break_reaches = break_reaches

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.calls.append(("wait", timeout))
        if self.returncode is None:
            raise subprocess.TimeoutExpired("engine", timeout)
        return self.returncode

    def send_signal(self, sig):
        self.calls.append(("send_signal", sig))
        if not self.break_reaches:
            raise OSError(6, "The handle is invalid")
        self.returncode = 0

    def terminate(self):
        self.calls.append(("terminate",))
        self.returncode = 1

    def kill(self):
        self.calls.append(("kill",))
        self.returncode = 1


def test_windows_stop_skips_the_wait_when_ctrl_break_cannot_be_sent(monkeypatch):
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)  # Windows' value; absent here
    # From OBS (no console): the break fails, so no 10 s wait for it: terminate at once
    eng = L.EngineProcess(FakeWindowsProc(break_reaches=False), windows=True)
    assert eng.stop(grace=10.0, term_grace=5.0) == 1
    assert eng.proc.calls == [("send_signal", 1), ("terminate",), ("wait", 5.0)]
    assert eng.stopped_by == "terminate" and any("The handle is invalid" in n for n in eng.stop_notes)
    # From a shared console the break arrives (the engine handles SIGBREAK): a short bounded wait
    eng = L.EngineProcess(FakeWindowsProc(break_reaches=True), windows=True)
    assert eng.stop(grace=10.0, term_grace=5.0) == 0
    assert eng.proc.calls == [("send_signal", 1), ("wait", L.EngineProcess.WINDOWS_SIGNAL_WAIT_S)]
    assert eng.stopped_by == "signal"


def test_windows_stop_asks_again_while_the_engine_is_still_loading(monkeypatch):
    """The engine's real API while the engine loads (up, with no controller yet) answers a quit
    with 503 "still starting": the stop asks again, and once the engine is in (its controller set
    on that API after two refusals) the quit is taken; no terminate. The Windows process is the
    stand-in above (no Windows here)."""
    from live import LiveEngine, PacedSource
    from live2diff_engine.control.api import ApiServer
    from live2diff_engine.models.components import build_tiny_components

    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    proc = FakeWindowsProc(break_reaches=False)
    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10)) as live:
        live.engine.api_quit = lambda: setattr(proc, "returncode", 0)  # the engine, loaded, quits cleanly
        api = ApiServer("127.0.0.1", 0).start()  # up, loading: no controller yet
        try:
            def load_after_two_refusals():
                wait_until(lambda: api.commands_seen >= 2, timeout=60, what="two quits while loading")
                api.set_controller(live.controller)

            loader = threading.Thread(target=load_after_two_refusals, daemon=True)
            loader.start()
            eng = L.EngineProcess(proc, windows=True)
            eng.api_url = api.url
            assert eng.stop(grace=60.0, term_grace=5.0) == 0
            loader.join(60)
        finally:
            api.stop()
    assert eng.stopped_by == "api" and api.commands_seen >= 3 and live.controller.accepted == 1  # refused, then taken once
    assert ("terminate",) not in proc.calls


# ------------------------------------------------------- HTTP fallback, against the real engine API


def _http_controller(api_url, token=""):
    cfg = {"api_url": api_url, "api_token": token, "ws_password": "", "ws_port": 0, "use_websocket": False}
    return L.Controller(cfg, ws_lookup=lambda c: {"port": free_port(), "password": "", "source": "test"})


def test_http_fallback_polls_status_and_posts_commands(monkeypatch):
    """The script's HTTP fallback against the real engine's API (tiny model, in-process:
    tests/live.py), which has a token: every command it applies shows the token went with it."""
    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components
    from live2diff_engine.styles import Style

    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # localhost never goes through a proxy
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10), api_token="tok-123") as live:
        live.manager.styles["inked"] = Style("inked", "a test style", template="ink, {}")  # the next style with weights
        ctl = _http_controller(live.api.url, token="tok-123").start()
        try:
            status = wait_until(lambda: ctl.snapshot()[0], what="status over HTTP")
            assert status["style"] == "default" and ctl.snapshot()[1] == L.LINK_HTTP
            refused = live.controller.refused
            ctl.send("set_prompt", prompt="a blue whale")
            ctl.step_style(+1)
            for s in (0.3, 0.4, 0.6):  # a slider drag: the latest strength is the one that stays
                ctl.send("set_strength", strength=s)
            ctl.send("set_style", style="no-such-style")
            wait_until(lambda: live.frames.prompt == "a blue whale" and live.manager.current.name == "inked"
                       and live.controller.schedule()["strength"] == 0.6, timeout=60, what="the commands in the engine")
            logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "refused" in t], what="refusal log")
            assert len(logs) == 1 and logs[0].startswith("[live2diff] engine refused set_style: unknown style 'no-such-style'"), logs
            assert live.controller.refused == refused + 1  # that one only: the others carried the token
            wait_until(lambda: ctl.snapshot()[0]["prompt"] == "a blue whale", what="fresh status")
            # It keeps polling, and never faster than once a second less scheduling slack (a busy
            # loop would poll many times a second): judged on the gaps between the engine's real
            # status requests, which a busy machine can only lengthen.
            first = len(live.api.status_times)
            wait_until(lambda: len(live.api.status_times) >= first + 3, what="three more polls")
            times = live.api.status_times[first:]
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert min(gaps) > 0.5, gaps
        finally:
            ctl.stop()
        assert not ctl._thread


def test_http_fallback_wrong_token_and_unreachable():
    """Against the real engine's API (tiny model, in-process: tests/live.py), which has a token."""
    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components

    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10), api_token="right") as api:
        api.url = api.api.url
        ctl = _http_controller(api.url, token="wrong-token-xyz").start()
        try:
            ctl.send("reset")
            logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "refused" in t], what="refusal")
            assert logs == ["[live2diff] engine refused reset: unauthorized: check the script's API token"]
            assert ctl.snapshot()[0] is None
            wait_until(lambda: "token" in ctl.snapshot()[2], what="token note")
        finally:
            ctl.stop()
    ctl = _http_controller(f"http://127.0.0.1:{free_port()}", token="secret-token-abc").start()
    try:
        wait_until(lambda: "connection refused" in ctl.snapshot()[2], what="offline note")
        ctl.send("pause")
        logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "could not send" in t], what="unreachable log")
        assert "could not send pause: the engine is not reachable" in logs[0]
        assert all("secret-token-abc" not in t for t in logs)
    finally:
        ctl.stop()


def test_a_style_picture_chosen_in_obs_is_uploaded_to_the_real_engine_and_bad_files_are_named(tmp_path):
    """The script's Style picture: the file is read on its worker thread and its bytes go to the
    real engine's POST /api/style-image (tiny model with a tiny IP-Adapter, in-process, with a
    token); the scale slider and Clear are commands; a file that is no picture, a folder, one over
    8 MB are refused in the script's log before anything is sent."""
    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components
    from live2diff_engine.models.ip_adapter import load_style_image_models
    from test_style_image import picture, write_adapter_files

    adapter, encoder = write_adapter_files(tmp_path / "ip")
    comps = build_tiny_components(seed=0)
    load_style_image_models(comps, str(adapter), str(encoder))
    look = tmp_path / "look.jpg"  # a JPEG named by its bytes, whatever the name says
    look.write_bytes(cv2_jpeg(picture()))
    notes, big = tmp_path / "notes.png", tmp_path / "big.png"
    notes.write_text("not a picture")
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8 * 1024 * 1024))
    with LiveEngine(comps, PacedSource(fps=10), api_token="tok-9") as live:
        ctl = _http_controller(live.api.url, token="tok-9").start()
        try:
            status = wait_until(lambda: ctl.snapshot()[0], what="status over HTTP")
            assert L.picture_text(status) == "Style picture: none"
            refused = live.controller.refused
            for path, words in ((notes, "not a PNG, JPEG or WebP picture"), (tmp_path, "that is a folder"),
                                (big, "larger than 8 MB"), (tmp_path / "gone.png", "cannot read it")):
                ctl.send_picture(str(path))
                logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "style picture" in t], what=words)
                assert logs == [f"[live2diff] style picture {path.name}: " + logs[0].split(": ", 1)[1]] and words in logs[0], logs
            assert live.controller.refused == refused and live.frames.style_image is None  # nothing was sent
            ctl.send_picture(str(look))
            logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "style picture" in t], what="the upload")
            assert logs == ["[live2diff] style picture look.jpg in use"], logs
            assert live.frames.style_image == "upload"
            ctl.send("set_style_image_scale", scale=0.7)
            wait_until(lambda: live.frames.style_image_scale == 0.7, what="the scale in the engine")
            wait_until(lambda: L.picture_text(ctl.snapshot()[0]) == "Style picture: the one sent   Scale: 0.70",
                       what="the panel's picture line")
            ctl.send("clear_style_image")
            wait_until(lambda: live.frames.style_image is None, what="the picture cleared")
        finally:
            ctl.stop()
    assert L.picture_text({"style_image_scale": None}) == ""  # an engine without an IP-Adapter: no line


def cv2_jpeg(png: bytes) -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()


def test_a_command_the_engine_is_slow_to_answer_is_not_called_unreachable():
    """A real socket that takes the connection and never answers (an engine busy with a long frame
    or a style load): the command went out, and the log says so instead of 'not reachable'."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(16)
        ctl = _http_controller(f"http://127.0.0.1:{busy.getsockname()[1]}")
        ctl._http.timeout = 0.5
        ctl.start()
        try:
            ctl.send("pause")
            logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "pause" in t], what="a log line about pause")
            assert logs[0].startswith("[live2diff] sent pause; no answer from the engine within 0.5 s yet"), logs
            assert not any("could not send" in t or "not reachable" in t for t in logs)
        finally:
            ctl.stop()


def test_routing_over_obs_websocket_with_http_fallback():
    """The script's real obs-websocket transport, through an obs-websocket server (the
    protocol-faithful one of tests/fake_obs.py, which relays CustomEvents as OBS does), to the real
    engine (tiny model, in-process) connected to the same server; then, with the engine off
    obs-websocket, over its HTTP API."""
    from fake_obs import FakeOBS
    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components

    with FakeOBS(password="pw") as obs_server:
        live = LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10),
                          obs=dict(host="127.0.0.1", port=obs_server.port, password="pw", retry_max_s=0.5))
        with live:
            wait_for_bridge = lambda: live.bridge.state == "connected"  # noqa: E731
            wait_until(wait_for_bridge, timeout=30, what="the engine on obs-websocket")
            cfg = {"api_url": f"http://127.0.0.1:{free_port()}", "api_token": "", "ws_password": "pw", "ws_port": 0,
                   "use_websocket": True}  # HTTP API down
            ctl = L.Controller(cfg, ws_lookup=lambda c: {"port": obs_server.port, "password": c["ws_password"],
                                                         "source": "script settings"}).start()
            try:
                wait_until(lambda: ctl.snapshot()[1] == L.LINK_WS, timeout=30, what="the engine's status over obs-websocket")
                ctl.send("set_prompt", prompt="over ws")
                wait_until(lambda: live.frames.prompt == "over ws", timeout=30, what="the prompt over obs-websocket")
                stream = live.frames.stream
                ctl.send("reset")
                wait_until(lambda: live.frames.stream is not stream, timeout=30, what="the reset over obs-websocket")
                ctl.send("set_steps", steps=9)  # refused by the engine, the reply back over obs-websocket
                logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "refused" in t], what="the refusal")
                assert logs[0].startswith("[live2diff] engine refused set_steps:") and "1 to 4" in logs[0], logs
                # the websocket drops (OBS restarts): reconnect, logged once
                obs_server.stop()
                wait_until(lambda: any("connection lost" in t for _, t in ctl.drain_logs()), timeout=30, what="'connection lost'")
                obs_server.start()
                wait_until(lambda: ctl.snapshot()[1] == L.LINK_WS, timeout=60, what="obs-websocket again")
                # the engine leaves obs-websocket but answers over HTTP: commands go over HTTP
                live.bridge.stop()
                ctl.configure(dict(cfg, api_url=live.api.url))
                wait_until(lambda: ctl.snapshot()[1] == L.LINK_HTTP, timeout=30, what="status over HTTP")
                ctl.send("pause")
                wait_until(lambda: live.controller.paused, timeout=30, what="pause over HTTP (the only way left)")
            finally:
                ctl.stop()


def test_websocket_without_password_falls_back_to_http(caplog):
    """The script's real obs-websocket transport meets a server that wants a password (the
    protocol-faithful one of tests/fake_obs.py) with none: it says so and sends over the real
    engine's HTTP API (tiny model, in-process) instead, without a fast retry loop."""
    from fake_obs import FakeOBS
    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components

    with FakeOBS(password="obs-pw") as obs_server, \
            LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10)) as live:
        cfg = {"api_url": live.api.url, "api_token": "", "ws_password": "", "ws_port": 0, "use_websocket": True}
        ctl = L.Controller(cfg, ws_lookup=lambda c: {"port": obs_server.port, "password": "", "source": "script settings"}).start()
        try:
            logs = wait_until(lambda: [t for _, t in ctl.drain_logs() if "not connected" in t], what="ws failure log")
            assert logs[0].startswith("[live2diff] obs-websocket not connected: no password")
            wait_until(lambda: ctl.snapshot()[1] == L.LINK_HTTP, what="HTTP fallback")
            ctl.send("set_prompt", prompt="via http")
            wait_until(lambda: live.frames.prompt == "via http", what="the prompt in the engine")
            assert ctl._ws_next_try - time.monotonic() > 5  # no fast retry loop on an auth failure
        finally:
            ctl.stop()


# ---------------------------------------------------------------------------- the OBS harness


def test_require_obs_skips_or_fails_on_ci(monkeypatch):
    monkeypatch.setattr(obs_real, "OBS_BIN", "obs-binary-that-does-not-exist")
    assert "no `obs` binary" in obs_real.obs_available()
    for value in ("true", "True", "1", "yes"):  # what CI services set: one meaning, read in conftest.on_ci
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="required on CI: OBS: no `obs` binary"):
            require_obs()
    for value in ("false", "0", ""):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception):
            require_obs()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_obs()


# ------------------------------------------------------------------------------ real OBS tests

PASSWORD = "obs-test-pw-71c2"


class Listener:
    """An outside obs-websocket client collecting our CustomEvents."""

    def __init__(self, real: RealOBS):
        self.events: list[dict] = []
        self.client = real.event_client()

        def on_custom_event(data):  # obsws-python dispatches by function name
            self.events.append({k: getattr(data, k) for k in data.attrs()})

        self.client.callback.register(on_custom_event)

    def commands(self, cmd):
        return [e for e in self.events if e.get("kind") == "command" and e.get("cmd") == cmd]

    def close(self):
        self.client.disconnect()


@pytest.mark.obs
def test_real_obs_hotkey_and_status_over_websocket_and_restart(tmp_path):
    require_obs()
    api_port = free_port()  # nothing listens there: the HTTP API is not reachable
    settings = {"prompt": "a red fox", "ws_password": PASSWORD, "api_url": f"http://127.0.0.1:{api_port}"}
    real = RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings)
    with real:
        pgid = real.pgid
        real.wait_for_log("[live2diff] connected to obs-websocket", timeout=15)
        assert "(password from script settings)" in real.log_text()
        listener = Listener(real)
        client = real.client()
        try:
            hotkeys = [h for h in client.get_hotkey_list().hotkeys if h.startswith("live2diff.")]
            assert sorted(hotkeys) == sorted(name for name, _ in L.HOTKEYS)
            client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.apply_prompt"})
            cmd = wait_until(lambda: listener.commands("set_prompt"), what="set_prompt CustomEvent")[0]
            assert cmd["prompt"] == "a red fox"
            schema.parse_command(cmd)
            # the engine's status (as the engine would broadcast it) reaches the script
            status = dict(STATUS, style="anime", prompt="a red fox")
            client.broadcast_custom_event({"eventData": status})
            real.wait_for_log("[live2diff] engine streaming | style anime | prompt 'a red fox' | 12.0 fps | via obs-websocket")
            # a refusal for the script's command is logged with the engine's error
            client.broadcast_custom_event({"eventData": schema.reply_message(cmd["id"], False, "engine says no")})
            real.wait_for_log("[live2diff] engine refused set_prompt: engine says no")
            client.broadcast_custom_event({"eventData": status})
            client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.next_style"})
            nxt = wait_until(lambda: listener.commands("set_style"), what="set_style CustomEvent")[0]
            assert nxt["style"] == "toon"
            client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.pause_resume"})
            wait_until(lambda: listener.commands("pause"), what="pause CustomEvent")
        finally:
            listener.close()
            client.disconnect()
        real.stop()
        assert group_pids(pgid) == []  # OBS, xvfb-run and Xvfb are gone
        assert real.log_text().count("Unloaded python script: live2diff_obs.py") == 1  # a clean exit
        saved = real.script_saved_settings()
        assert saved["prompt"] == "a red fox"
        assert "hotkey_live2diff_apply_prompt" in saved  # hotkey bindings are saved with the script

        # restart: same config, same port; the script loads again and works
        real.start()
        real.wait_for_log("[live2diff] connected to obs-websocket", timeout=15, count=2)
        listener = Listener(real)
        client = real.client()
        try:
            client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.reset"})
            wait_until(lambda: listener.commands("reset"), what="reset CustomEvent after restart")
        finally:
            listener.close()
            client.disconnect()
    log = real.log_text()
    assert log.count("Loaded python script: live2diff_obs.py") == 2
    assert PASSWORD not in log


@pytest.mark.obs
def test_real_obs_without_obsws_python_drives_the_real_engine_over_its_http_api_with_its_token(tmp_path):
    """No obsws-python for OBS's Python: the script uses the engine's HTTP API, with its token. The
    engine is the real one (tiny model, its API in this process, tests/live.py): a command without
    the token would be refused, so the prompt arriving shows the token went with it."""
    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components

    require_obs()
    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10), api_token="tok-obs-9") as live:
        settings = {"prompt": "a red fox", "api_url": live.api.url, "api_token": "tok-obs-9"}
        with RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings, obsws_importable=False) as real:
            real.wait_for_log("obsws-python is not installed for OBS's Python", timeout=15)
            real.wait_for_log("[live2diff] engine streaming | style default | prompt 'a cat' |", timeout=60)
            assert "| via HTTP API" in real.log_text()
            accepted = live.controller.accepted
            with real.client() as client:
                client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.apply_prompt"})
                client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.pause_resume"})
            wait_until(lambda: live.frames.prompt == "a red fox" and live.controller.paused, timeout=30,
                       what="the prompt and the pause from OBS in the engine")
            assert live.controller.accepted == accepted + 2 and live.controller.refused == 0
            real.wait_for_log("prompt 'a red fox'", timeout=30)  # the engine's status, back in OBS's log
        log = real.log_text()
        assert "tok-obs-9" not in log and PASSWORD not in log


def test_the_prompt_sent_is_a_blend_with_the_second_prompt_and_the_transition_is_clamped():
    ui = {"prompt": "a fox\r\n", "prompt2": "neon lights", "blend": 0.3}
    assert L.prompt_value(ui) == [{"text": "a fox\n", "weight": 0.7}, {"text": "neon lights", "weight": 0.3}]
    assert L.prompt_value(dict(ui, blend=0.0)) == "a fox\n"
    assert L.prompt_value(dict(ui, prompt2="  ")) == "a fox\n"
    assert L.prompt_value(dict(ui, blend=1.0)) == [{"text": "neon lights", "weight": 1.0}]
    assert L.transition_args({"transition_s": 0.0}) == {}
    assert L.transition_args({"transition_s": 3.5}) == {"transition_s": 3.5}
    assert L.transition_args({"transition_s": 99}) == {"transition_s": 10.0}
    assert L.transition_args({"transition_s": 3.5}, now=True) == {"transition_s": 0.0}
    for msg in (schema.command_message("set_prompt", prompt=L.prompt_value(ui), **L.transition_args({"transition_s": 99})),):
        assert schema.parse_command(msg).args["transition_s"] == 10.0  # what the script sends, the engine takes


@pytest.mark.obs
def test_real_obs_hotkeys_send_a_blend_with_its_transition_and_one_at_once(tmp_path):
    require_obs()
    settings = {"prompt": "a red fox", "prompt2": "neon lights", "blend": 0.25, "transition_s": 3.0,
                "ws_password": PASSWORD, "api_url": f"http://127.0.0.1:{free_port()}"}
    with RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings) as real:
        real.wait_for_log("[live2diff] connected to obs-websocket", timeout=15)
        listener = Listener(real)
        client = real.client()
        try:
            client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.apply_prompt"})
            cmd = wait_until(lambda: listener.commands("set_prompt"), what="set_prompt CustomEvent")[0]
            assert cmd["prompt"] == [{"text": "a red fox", "weight": 0.75}, {"text": "neon lights", "weight": 0.25}]
            assert cmd["transition_s"] == 3.0
            assert schema.parse_command(cmd).args == {"prompt": [("a red fox", 0.75), ("neon lights", 0.25)], "transition_s": 3.0}
            client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.apply_prompt_now"})
            now = wait_until(lambda: listener.commands("set_prompt")[1:], what="a second set_prompt")[0]
            assert now["transition_s"] == 0.0 and now["prompt"] == cmd["prompt"]
        finally:
            listener.close()
            client.disconnect()


@pytest.mark.obs
def test_real_obs_script_finds_the_websocket_password_in_obs_config(tmp_path):
    """No password in the script's settings: it reads OBS's own (global.ini in OBS 29)."""
    require_obs()
    settings = {"prompt": "a red fox", "api_url": f"http://127.0.0.1:{free_port()}"}
    with RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings) as real:
        real.wait_for_log("[live2diff] connected to obs-websocket", timeout=15)
        log = real.log_text()
        assert "(password from global.ini)" in log or "(password from OBS global config)" in log
        assert PASSWORD not in log


# A test-only wrapper script: OBS loads it, it loads the real script and, once running, builds the
# properties, presses "Start engine" and reloads the module as OBS's "Reload Scripts" does.
WRAPPER = '''
import importlib, sys
sys.path.insert(0, {script_dir!r})
import obspython as obs
import live2diff_obs as L
from live2diff_obs import script_defaults, script_update, script_save, script_unload, script_description, script_properties

NAMES = {names!r}

def _later():
    obs.remove_current_callback()
    props = L.script_properties()
    print("WRAP props " + ",".join(n for n in NAMES if obs.obs_properties_get(props, n)))
    print("WRAP status " + repr(obs.obs_data_get_string(L._settings, "status_text")))
    obs.obs_properties_destroy(props)
    L._on_start_engine(None, None)
    pid = L._S["engine"].pid
    importlib.reload(L)
    print("WRAP after reload %s %s" % (L._S["engine"].pid == pid, L._S["engine"].running()))

def script_load(settings):
    L.script_load(settings)
    obs.timer_add(_later, 300)
'''
PROPERTY_NAMES = (
    "status_text", "refresh", "prompt", "prompt2", "blend", "negative_prompt", "transition_s", "apply_prompt", "style",
    "strength", "seed", "apply_seed", "style_picture", "picture_scale", "clear_picture",
    "pause_resume", "reset", "add_to_scene", "open_dock", "dock_note", "engine_group", "engine_command", "engine_venv",
    "stop_engine_on_exit", "engine_virtual_camera", "start_engine", "stop_engine", "connection_group", "api_url", "api_token", "ws_password",
    "ws_port",
)


@pytest.mark.obs
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_real_obs_properties_and_engine_started_from_obs_stops_when_obs_exits(tmp_path):
    """The real engine (tiny model), started by the script's "Start engine" inside a real OBS,
    streams, survives a script reload, and is gone once OBS exits."""
    import re
    import urllib.request

    require_obs()
    marker = tmp_path / "engine-marker.txt"
    venv = tmp_path / "venv"
    _real_engine(venv / "bin", marker)
    wrapper = tmp_path / "wrap_live2diff.py"
    wrapper.write_text(WRAPPER.format(script_dir=str(SCRIPT.parent), names=PROPERTY_NAMES))
    api = f"http://127.0.0.1:{free_port()}"
    settings = {"engine_venv": str(venv), "api_url": api, "engine_command": "live2diff-engine run"}
    with RealOBS(tmp_path, password=PASSWORD, script=wrapper, script_settings=settings) as real:
        real.wait_for_log("WRAP after reload", timeout=15)
        wait_until(lambda: marker.exists() and "args: run" in marker.read_text(), what="engine start")
        log = real.log_text()
        assert "WRAP props " + ",".join(PROPERTY_NAMES) in log  # every property builds in OBS 29
        assert "WRAP status 'Engine: offline\\n" in log
        assert f"[live2diff] engine started (pid " in log and "/venv/bin/live2diff-engine run" in log
        assert "WRAP after reload True True" in log  # the engine survives a module reload
        pid = int(re.search(r"engine started \(pid (\d+)\)", log).group(1))

        def streaming():
            try:
                with urllib.request.urlopen(api + "/api/status", timeout=5) as r:
                    return json.load(r).get("frames_out", 0) > 0  # (while loading it says so, with no figures)
            except OSError:
                return False

        wait_until(streaming, timeout=120, what="the engine's frames (its API on the script's address)")
    # OBS exited: the script's atexit hook stopped the engine; nothing is left behind.
    assert "is left running (a script reload keeps it) and is stopped when OBS exits" in real.log_text()

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout=60, what="the engine to exit after OBS")


def test_the_engine_started_from_obs_connects_back_with_the_password_in_its_environment():
    argv, env = L.engine_obs_connection(["/venv/bin/live2diff-engine", "run", "--obs"], {"port": 4460, "password": "pw-123"}, {})
    assert argv == ["/venv/bin/live2diff-engine", "run", "--obs", "--obs-port", "4460"]
    assert env["OBS_WEBSOCKET_PASSWORD"] == "pw-123" and "pw-123" not in argv
    argv, env = L.engine_obs_connection(["e", "run", "--obs", "--obs-port=5000"], {"port": 4460, "password": ""}, {})
    assert argv == ["e", "run", "--obs", "--obs-port=5000"] and "OBS_WEBSOCKET_PASSWORD" not in env
    argv, env = L.engine_obs_connection(["e", "run"], {"port": 4460, "password": "pw"}, {})  # the user left OBS control out
    assert argv == ["e", "run"] and "OBS_WEBSOCKET_PASSWORD" not in env


# A test-only wrapper: once the engine's status is in, it builds the panel as OBS does, presses
# Pause as OBS calls a button, and builds the panel again whenever the engine's paused state moves.
WRAP_PANEL = '''
import sys
sys.path.insert(0, {script_dir!r})
import obspython as obs
import live2diff_obs as L
from live2diff_obs import script_defaults, script_update, script_save, script_unload, script_description, script_properties

STEP = [0]

def _panel(tag):
    props = L.script_properties()
    lst = obs.obs_properties_get(props, "style")
    items = []
    for i in range(obs.obs_property_list_item_count(lst)):
        off = " [disabled]" if obs.obs_property_list_item_disabled(lst, i) else ""
        items.append("%s=%s%s" % (obs.obs_property_list_item_string(lst, i), obs.obs_property_list_item_name(lst, i), off))
    pause = obs.obs_property_description(obs.obs_properties_get(props, "pause_resume"))
    print("WRAP %s pause=%r prompt=%r styles=%s" % (tag, pause, obs.obs_data_get_string(L._settings, "prompt"), "|".join(items)))
    obs.obs_properties_destroy(props)

def _tick():
    status = L._controller.last_known_status() if L._controller else None
    if not status:
        return
    if STEP[0] == 0:
        _panel("seen")
        L._on_pause_resume(None, None)  # the button, as OBS calls it (it then rebuilds the panel)
        _panel("clicked")
        STEP[0] = 1
    elif STEP[0] == 1 and status.get("paused"):
        _panel("paused")
        STEP[0] = 2
    elif STEP[0] == 2 and not status.get("paused"):
        _panel("resumed")
        STEP[0] = 3

def script_load(settings):
    L.script_load(settings)
    obs.timer_add(_tick, 200)
'''


@pytest.mark.obs
def test_real_obs_panel_follows_the_engine_pause_prompt_and_missing_styles(tmp_path):
    """The script's panel in a real OBS against the real engine (tiny model, its API in this
    process: tests/live.py), whose preset styles have no weights here."""
    import urllib.request

    from live import LiveEngine, PacedSource
    from live2diff_engine.models.components import build_tiny_components
    from live2diff_engine.styles import Style

    require_obs()
    wrapper = tmp_path / "wrap_panel.py"
    wrapper.write_text(WRAP_PANEL.format(script_dir=str(SCRIPT.parent)))
    # the engine (restarted with its saved settings) has "a red fox"; the box holds an old text
    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10), prompt="a red fox") as live:
        for name in ("toon", "zen"):
            live.manager.styles[name] = Style(name, "a test style", template=name + ", {}")
        missing = live.controller.style_availability()[0]
        names = live.controller.style_names
        assert missing and "toon" not in missing and "zen" not in missing
        settings = {"prompt": "an old prompt", "api_url": live.api.url}
        with RealOBS(tmp_path, password=PASSWORD, script=wrapper, script_settings=settings, obsws_importable=False) as real:
            real.wait_for_log("WRAP clicked", timeout=60)
            styles = "|".join(f"{n}={n} (not downloaded) [disabled]" if n in missing else f"{n}={n}" for n in names)
            assert f"WRAP seen pause='Pause' prompt='a red fox' styles={styles}" in real.log_text()
            assert "WRAP clicked pause='Resume'" in real.log_text()  # at once, before the engine answers
            wait_until(lambda: live.controller.paused, timeout=30, what="the engine paused from the panel")
            real.wait_for_log("WRAP paused pause='Resume'", timeout=30)  # the engine confirms it
            req = urllib.request.Request(live.api.url + "/api/command", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps(schema.command_message("resume")).encode())
            urllib.request.urlopen(req, timeout=30).read()  # resumed from elsewhere (the dock): the button follows
            real.wait_for_log("WRAP resumed pause='Pause'", timeout=30)
            available = [n for n in names if n not in missing]
            after = available[(available.index("default") + 1) % len(available)]
            with real.client() as client:  # the style hotkeys pass over the styles without weights
                client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.next_style"})
                wait_until(lambda: live.manager.current.name == after, timeout=60, what=f"the next style ({after})")
                real.wait_for_log(f"| style {after} |", timeout=30)  # the script has seen it
                client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.previous_style"})
                wait_until(lambda: live.manager.current.name == "default", timeout=60, what="the previous style (default)")


# A test-only wrapper: presses "Start engine" once the script runs, then, once that engine has
# ended and the script says so, builds the panel as OBS does.
WRAP_START = '''
import sys
sys.path.insert(0, {script_dir!r})
import obspython as obs
import live2diff_obs as L
from live2diff_obs import script_defaults, script_update, script_save, script_unload, script_description, script_properties

STEP = [0]

def _tick():
    if STEP[0] == 0:
        STEP[0] = 1
        L._on_start_engine(None, None)
    elif STEP[0] == 1 and not L._S["engine"].running() and L._controller.view()[3].startswith("exited"):
        STEP[0] = 2
        props = L.script_properties()
        print("WRAP panel " + repr(obs.obs_data_get_string(L._settings, "status_text")))
        obs.obs_properties_destroy(props)

def script_load(settings):
    L.script_load(settings)
    obs.timer_add(_tick, 300)
'''


@pytest.mark.obs
def test_real_obs_start_engine_that_fails_says_the_engines_own_reason(tmp_path):
    """'Start engine' in a real OBS with the engine's API port taken: a real engine (tiny model)
    exits with code 2, and OBS's log and the panel give its own reason, not only the code."""
    require_obs()
    import socket

    wrapper = tmp_path / "wrap_start.py"
    wrapper.write_text(WRAP_START.format(script_dir=str(SCRIPT.parent)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = {"engine_command": "live2diff-engine run --model tiny --source synthetic --camera-size 64x48",
                    "engine_venv": str(Path(sys.executable).parent.parent), "api_url": f"http://127.0.0.1:{port}"}
        with RealOBS(tmp_path, password=PASSWORD, script=wrapper, script_settings=settings, obsws_importable=False) as real:
            text = real.wait_for_log("WRAP panel", timeout=120)
    reason = f"live2diff-engine: error: cannot listen on 127.0.0.1:{port} (address already in use)"
    line = next(ln for ln in text.splitlines() if "[live2diff] engine process" in ln and "exited with code 2" in ln)
    assert f"exited with code 2: {reason}" in line and "(its output: " in line, line
    panel = next(ln for ln in text.splitlines() if "WRAP panel" in ln)
    assert f"WRAP panel 'Engine: exited with code 2\\n{reason}" in panel, panel


def _frames_out(http) -> int:
    try:
        return int(http.get_status().get("frames_out") or 0)
    except (OSError, ValueError):
        return 0


def test_stop_engine_quits_a_real_engine_through_its_api_and_every_output_is_closed(tmp_path):
    """Start and stop a real engine (tiny model) with the script's own functions: the quit goes
    through the engine's local API, and the engine stops as on Ctrl-C: its video file is complete,
    its API's last word is 'stopped', it exits 0; no signal was needed (none reaches it from OBS on
    Windows)."""
    import cv2
    import websocket

    out = tmp_path / "out.mp4"
    ui = {"engine_command": f"live2diff-engine run --model tiny --source synthetic --camera-size 64x48 --sink file:{out}",
          "engine_venv": str(Path(sys.executable).parent.parent), "api_url": f"http://127.0.0.1:{free_port()}"}
    argv, env, api_url = L.engine_launch(ui, {"port": 0, "password": ""})
    assert api_url == ui["api_url"] and argv[argv.index("--api-port") + 1] == api_url.rsplit(":", 1)[1]
    log = tmp_path / "engine.log"
    eng = L.EngineProcess()
    eng.start(argv, str(log), env, api_url=api_url)
    states, last, ws = [], [], None
    try:
        http = L.HttpTransport(api_url)
        wait_until(lambda: _frames_out(http) >= 3 or not eng.running(), timeout=300, what="the engine streaming")
        assert eng.running(), log.read_text()
        ws = websocket.create_connection(api_url.replace("http", "ws", 1) + "/api/ws", timeout=120)

        def read():
            try:
                while True:
                    m = json.loads(ws.recv())
                    states.append(m.get("state"))
                    last[:] = [m.get("fps"), m.get("latency_ms")]
            except Exception:
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        code = eng.stop(grace=120, term_grace=10)
        reader.join(60)
    finally:
        if eng.running():
            eng.proc.kill()
            eng.proc.wait(30)
        if ws is not None:
            ws.close()
    text = log.read_text()
    assert code == 0, text
    assert eng.stopped_by == "api" and eng.stop_notes == [], (eng.stopped_by, eng.stop_notes)
    assert "quit asked for through the local API" in text and "Traceback" not in text
    assert states and states[-1] == "stopped", states  # the API closed last, after the outputs
    assert last == [0.0, None]  # and a stopped engine shows no frame rate or latency from before
    assert L.format_status(dict(STATUS, state="stopped"), L.LINK_HTTP).count("FPS: -   Latency: -") == 1
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames >= 3  # the file was finalised (an unclosed mp4 has no index and does not open)
    assert L.stop_summary(eng) == " (stopped through its local API)"


def test_a_failed_start_gives_the_engines_own_reason(tmp_path):
    """'Start engine' with the API port taken: a real engine exits with code 2; the script gives its
    own reason (its last error line, from the log file the script writes its output to), not only
    the exit code; a second run appended to the same log is read on its own."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        api_url = f"http://127.0.0.1:{taken.getsockname()[1]}"
        ui = {"engine_command": "live2diff-engine run --model tiny --source synthetic --camera-size 64x48",
              "engine_venv": str(Path(sys.executable).parent.parent), "api_url": api_url}
        argv, env, url = L.engine_launch(ui, {"port": 0, "password": ""})
        log = tmp_path / "engine.log"
        log.write_text("live2diff-engine: error: an older run's reason\n")
        eng = L.EngineProcess()
        ctl = _http_controller(api_url)
        ctl.local_engine = lambda: eng
        ctl.start()
        try:
            eng.start(argv, str(log), env, api_url=url)
            assert eng.proc.wait(300) == 2
            reason = eng.exit_reason()
            assert reason.startswith(f"live2diff-engine: error: cannot listen on 127.0.0.1:{taken.getsockname()[1]} "
                                     "(address already in use)"), log.read_text()
            assert eng.failed() == 2
            wait_until(lambda: ctl.view()[3] == "exited with code 2", what="the panel's headline")
            assert ctl.view()[2] == f"{reason}; its output: {log}"
            panel = L.format_status(None, None, ctl.view()[2], ctl.view()[3])
            assert panel.startswith(f"Engine: exited with code 2\n{reason}")
            # Beside the status of whatever else answers there (another engine), it is still said.
            panel = L.format_status(STATUS, L.LINK_HTTP, failure=L.failure_text(eng))
            assert panel.endswith(f"\nThe engine started here failed: exited with code 2: {reason} (its output: {log})")
        finally:
            ctl.stop()
    assert L.last_error_line("loading ...\r 40%\r 100%\nTraceback (most recent call last):\n  File x\n"
                             "RuntimeError: \x1b[31mboom\x1b[0m\n") == "RuntimeError: boom"
    assert L.last_error_line("a\nsaving failed: disk full\nbye\n") == "saving failed: disk full"
    assert L.last_error_line("") is None


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_the_script_never_stops_an_engine_it_did_not_start(tmp_path):
    """The script's engine handle points at an API where another engine (started elsewhere)
    listens: that engine refuses the quit, which names another instance, and keeps streaming; the
    script's own process is stopped by its signal."""
    from live import LiveEngine, PacedSource

    from live2diff_engine.models.components import build_tiny_components

    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=30)) as other:
        other.wait_outputs(2, timeout=120)
        exe = _real_engine(tmp_path / "bin", tmp_path / "marker.txt")  # the script's own: the real engine, no API
        eng = L.EngineProcess()
        log = tmp_path / "engine.log"
        eng.start([str(exe), "run", "--sink", "null", "--no-api"], str(log), api_url=other.api.url)
        wait_until(lambda: "streaming from" in log.read_text(), timeout=120, what="the script's engine to stream")
        assert eng.stop(grace=60) == 0 and eng.stopped_by == "signal"
        assert "not the engine instance that was asked to stop" in eng.stop_notes[0]
        n = len(other.outputs)
        other.wait_outputs(n + 2, timeout=120)  # still streaming
        assert not other.engine.stopping and other.controller.refused == 1
