"""The whole product against a real OBS Studio (Debian's 29.x under Xvfb, obs-websocket 5.1): the
project's OBS script loaded at start-up, the engine running the tiny model.

Skipped with the reason where OBS is not installed; under CI=true a missing OBS is a failure
(`.ci/run`'s install command installs it)."""

from __future__ import annotations

import base64
import datetime
import logging
import threading
import time

import cv2
import numpy as np
import pytest

from conftest import ROOT
from live import GateSource, LiveEngine, PacedSource, reference_outputs, wait_for
from live2diff_engine.control.schema import command_message
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.styles import Style
from obs_real import RealOBS, require_obs
from test_control import post

pytestmark = pytest.mark.obs
SCRIPT = ROOT / "obs_scripts" / "live2diff_obs.py"
PASSWORD = "obs-test-pass-4455"


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


@pytest.fixture(autouse=True)
def _needs_obs():
    require_obs()
    logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 10)


def obs_opts(real, password=PASSWORD, **kw):
    return dict(host="127.0.0.1", port=real.port, password=password, retry_max_s=0.5, **kw)


def screenshot(client, source: str, width: int = 64) -> np.ndarray | None:
    """The source as OBS renders it, or None while it has no picture yet (OBS answers 702)."""
    from obsws_python.error import OBSSDKRequestError

    try:
        data = client.send("GetSourceScreenshot", {"sourceName": source, "imageFormat": "png", "imageWidth": width}, raw=True)
    except OBSSDKRequestError as exc:
        if exc.code == 702:
            return None
        raise
    b64 = data["imageData"].split(",", 1)[1]
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    return img[:, :, ::-1]


def test_a_prompt_set_in_the_obs_script_changes_the_engines_following_frames(comps, tmp_path):
    n, k = 28, 16
    ref = reference_outputs(comps, n)
    source = GateSource(n, gate_at=k)
    settings = {"prompt": "a red fox", "ws_password": PASSWORD}
    with RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings) as real:
        live = LiveEngine(comps, source, obs=obs_opts(real))
        with live:
            wait_for(lambda: live.bridge.state == "connected", timeout=20, what="the engine to connect to OBS")
            source.reached.wait(60)
            # The engine's status reaches the script (shown in its panel, logged on change).
            real.wait_for_log("[live2diff] engine", timeout=20)
            client = real.client()
            try:
                client.send("TriggerHotkeyByName", {"hotkeyName": "live2diff.apply_prompt"})
            finally:
                client.disconnect()
            wait_for(lambda: live.controller.accepted >= 1, timeout=20, what="the script's command to reach the engine")
            source.gate.set()
            live.thread.join(120)
            assert live.frames.prompt == "a red fox"
            real.wait_for_log("prompt 'a red fox'", timeout=20)
    steps = live.frames.steps
    assert len(live.outputs) == n
    for i in range(k - steps):
        assert np.array_equal(live.outputs[i], ref[i]), i
    for i in range(k, n):
        assert not np.array_equal(live.outputs[i], ref[i]), i
    assert PASSWORD not in real.log_text()


def test_add_to_scene_shows_the_engines_frames_in_obs_and_the_engine_survives_an_obs_restart(comps, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with RealOBS(tmp_path, password=PASSWORD) as real:
        with LiveEngine(comps, PacedSource(fps=12), obs=obs_opts(real)) as live:
            wait_for(lambda: live.bridge.state == "connected", timeout=20, what="the engine to connect to OBS")
            code, reply = post(live.api.url, command_message("add_to_scene"))
            assert code == 200 and reply["ok"], reply
            client = real.client()
            try:
                kinds = {i["inputName"]: i["inputKind"] for i in client.get_input_list().inputs}
                assert kinds["Live2Diff"] == "ffmpeg_source"  # Debian's OBS has no browser source
                settings = client.get_input_settings("Live2Diff").input_settings
                assert settings["input"] == live.api.url + "/stream.mjpg?client=obs"  # its reads count as OBS's
                items = [i["sourceName"] for i in client.get_scene_item_list("Scene").scene_items]
                assert "Live2Diff" in items
                shot = wait_for(lambda: _lit(screenshot(client, "Live2Diff")), timeout=30, what="the engine's frames in OBS")[0]
                # What OBS shows is one of the engine's recent frames (through JPEG and scaling).
                recent = [cv2.resize(o, shot.shape[1::-1], interpolation=cv2.INTER_AREA).astype(float) for o in live.outputs[-60:]]
                best = min(np.abs(r - shot.astype(float)).mean() for r in recent)
                assert best < 20, best
            finally:
                client.disconnect()

            real.stop()
            wait_for(lambda: live.bridge.state == "waiting for OBS", timeout=15, what="the engine to notice OBS is gone")
            live.wait_outputs(len(live.outputs) + 10)  # the engine's own output goes on while OBS is away
            real.start()
            wait_for(lambda: live.bridge.state == "connected" and live.bridge.connects == 2, timeout=30,
                     what="the engine to reconnect by itself")
            client = real.client()
            try:  # the source was saved with the scene and shows frames again
                wait_for(lambda: _lit(screenshot(client, "Live2Diff")), timeout=30, what="frames after the restart")
                client.broadcast_custom_event({"eventData": command_message("set_prompt", prompt="after restart")})
            finally:
                client.disconnect()
            wait_for(lambda: live.frames.prompt == "after restart", timeout=15, what="commands after reconnecting")


def test_a_wrong_obs_password_is_one_clear_line(comps, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with RealOBS(tmp_path, password=PASSWORD) as real:
        with LiveEngine(comps, PacedSource(fps=12), obs=obs_opts(real, password="not-the-password")) as live:
            wait_for(lambda: live.bridge.state == "auth failed", timeout=20, what="auth failure")
            live.wait_outputs(10)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("live2diff")]
    assert len(lines) == 1 and "refused the WebSocket password" in lines[0], lines
    assert "not-the-password" not in "\n".join(r.getMessage() for r in caplog.records)


def _lit(img: np.ndarray | None):
    """The image, when it shows something (not black, not one flat colour)."""
    return [img] if img is not None and img.mean() > 10 and img.std() > 5 else None


def _shows(client, live, seen_after: int = 0):
    """OBS's picture of the source, when it is one of ``live``'s own recent frames (through JPEG
    and scaling; only frames from index ``seen_after`` on)."""
    shot = _lit(screenshot(client, "Live2Diff"))
    if shot is None:
        return None
    shot = shot[0].astype(float)
    recent = live.outputs[max(seen_after, len(live.outputs) - 60):]
    if not recent:
        return None
    best = min(np.abs(cv2.resize(o, shot.shape[1::-1], interpolation=cv2.INTER_AREA).astype(float) - shot).mean()
               for o in recent)
    return best < 20


def test_after_an_engine_restart_obs_shows_the_new_engines_frames_without_any_user_action(comps, tmp_path, caplog):
    """OBS keeps running; the engine stops long enough for OBS's Media Source to give up or to
    be deep in its reconnect loop, then a new engine starts on the same API port: it re-opens the
    source when it connects and OBS shows its frames.

    What OBS 29 does meanwhile depends on how the stream ended: here it usually logs `MP: Failed
    to open media` once and never tries again (the case that left streamers with a black source);
    on other machines it keeps retrying every second without logging failures. Either way the new
    engine's frames must reach OBS without any user action. The give-up case on its own, made
    deterministic, is the next test."""
    caplog.set_level(logging.INFO)
    from obs_real import free_port

    port = free_port()
    with RealOBS(tmp_path, password=PASSWORD) as real:
        client = real.client()
        try:
            with LiveEngine(comps, PacedSource(fps=12), obs=obs_opts(real), api_port=port) as first:
                wait_for(lambda: first.bridge.state == "connected", timeout=20, what="the engine to connect to OBS")
                code, reply = post(first.api.url, command_message("add_to_scene"))
                assert code == 200 and reply["ok"], reply
                wait_for(lambda: _shows(client, first), timeout=30, what="the first engine's frames in OBS")
                wait_for(lambda: first.controller.status()["obs_source"] == "pulling", timeout=10, what="'pulling'")
                assert first.api.stream_clients("obs") == 1
                before = real.log_text()
            # The engine is gone: OBS's source reconnects and fails, then gives up or keeps trying.
            failed, tries = before.count("MP: Failed to open media"), before.count("Set FFmpeg options")

            def gave_up_or_retried() -> bool:
                text = real.log_text()
                return text.count("MP: Failed to open media") > failed or text.count("Set FFmpeg options") >= tries + 3

            wait_for(gave_up_or_retried, timeout=30, what="OBS's source to fail to reach the stopped engine")
            time.sleep(3.0)  # three times its reconnect delay
            second = LiveEngine(comps, PacedSource(fps=12, seed=1), obs=obs_opts(real), api_port=port, prompt="a dog")
            assert second.api.url == first.api.url
            t0 = time.monotonic()
            with second:
                wait_for(lambda: _shows(client, second), timeout=60, what="the new engine's frames in OBS")
                took = time.monotonic() - t0
                wait_for(lambda: second.controller.status()["obs_source"] == "pulling", timeout=10, what="'pulling'")
                st = second.controller.status()
                assert st["obs"] == "connected" and st["stream_clients"] >= 1
                assert second.bridge.source_kicks >= 1 and second.bridge.connects == 1
            print(f"engine restart to frames in OBS: {took:.2f} s")
        finally:
            client.disconnect()
    assert any("re-opened it" in r.getMessage() for r in caplog.records if r.name == "live2diff.obs")


def test_a_source_that_stopped_reading_is_reopened_while_the_engine_stays_connected(comps, tmp_path):
    """No reconnect: OBS's source gives up (pointed at a dead address it fails to open, retries
    once and never again: the same state an engine restart leaves it in), the status says so, and
    the bridge re-opens it with its own settings after a few seconds, without flooding OBS. The
    OBS script says so in OBS's log."""
    settings = {"ws_password": PASSWORD}
    with RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings) as real:
        client = real.client()
        try:
            with LiveEngine(comps, PacedSource(fps=12), obs=obs_opts(real, source_stale_s=1.0, source_kick_every_s=4.0)) as live:
                wait_for(lambda: live.bridge.state == "connected", timeout=20, what="the engine to connect to OBS")
                assert post(live.api.url, command_message("add_to_scene"))[1]["ok"]
                wait_for(lambda: live.api.stream_clients("obs") == 1, timeout=30, what="OBS reading the stream")
                kicks = live.bridge.source_kicks
                failed = real.log_text().count("MP: Failed to open media")
                client.send("SetInputSettings", {"inputName": "Live2Diff", "overlay": True,
                                                 "inputSettings": {"input": "http://127.0.0.1:9/stream.mjpg?client=obs"}})
                real.wait_for_log("MP: Failed to open media", timeout=20, count=failed + 1)
                wait_for(lambda: live.api.stream_clients("obs") == 0, timeout=20, what="OBS to stop reading")
                wait_for(lambda: live.controller.status()["obs_source"] == "not pulling", timeout=20,
                         what="the status to say that OBS does not pull the stream")
                real.wait_for_log("| OBS source not pulling the stream", timeout=20)
                wait_for(lambda: live.api.stream_clients("obs") == 1, timeout=30, what="the bridge to re-open the source")
                wait_for(lambda: live.controller.status()["obs_source"] == "pulling", timeout=10, what="'pulling' again")
                n = len(live.outputs)
                wait_for(lambda: _shows(client, live, seen_after=n), timeout=30, what="frames in OBS again")
                assert live.bridge.connects == 1
                # Re-opened, and never twice within source_kick_every_s (no flood, however slow the
                # machine: judged on the bridge's own times of the kicks, not on a count in a window).
                times = live.bridge.source_kick_times[kicks:]
                assert times, "the bridge never re-opened the source"
                assert all(b - a >= 4.0 for a, b in zip(times, times[1:])), times
        finally:
            client.disconnect()


MEDIA_SOURCE = {"is_local_file": False, "input_format": "mpjpeg", "buffering_mb": 0, "reconnect_delay_sec": 1,
                "restart_on_activate": False, "close_when_inactive": False, "hw_decode": False, "clear_on_media_end": False}


def test_the_script_reopens_the_source_for_an_engine_started_without_obs(comps, tmp_path):
    """The engine runs without --obs (the README's `run` in a terminal): no OBS link of its own to
    re-open OBS's Live2Diff source, which OBS 29 gave up on while no engine answered (it fails
    once, retries once and never tries again). The script, connected to OBS itself, sees the engine
    appear on its API URL and re-opens the source; OBS shows the engine's frames. Where OBS's
    source then reads nothing while the engine runs on, the script says 'OBS source not pulling
    the stream' and re-opens it, and stops saying so once it reads again. It also logs what
    a style switch changed."""
    from obs_real import free_port

    port = free_port()
    api = f"http://127.0.0.1:{port}"
    settings = {"ws_password": PASSWORD, "api_url": api}
    with RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings) as real:
        client = real.client()
        try:
            real.wait_for_log("[live2diff] engine offline", timeout=20)
            client.send("CreateInput", {"sceneName": "Scene", "inputName": "Live2Diff", "inputKind": "ffmpeg_source",
                                        "inputSettings": dict(MEDIA_SOURCE, input=f"{api}/stream.mjpg?client=obs"),
                                        "sceneItemEnabled": True})
            # Nothing there: it fails, tries again once or twice a second apart (failures it does not
            # log), and gives up: no new attempt for three times its reconnect delay.
            real.wait_for_log("MP: Failed to open media", timeout=30)
            _wait_quiet(real, "Set FFmpeg options", 3.0)
            before = real.log_text()
            attempts = before.count("Set FFmpeg options")
            with LiveEngine(comps, PacedSource(fps=12), api_port=port) as live:  # no OBS link
                assert live.bridge is None and live.api.url == api
                reading = _first_read(live)
                # OBS usually gives up on the source (above), and then only the script's re-open
                # brings the frames: without it this wait fails.
                wait_for(lambda: _shows(client, live), timeout=60, what="the engine's frames in OBS")
                reopened = f"[live2diff] re-opened OBS's 'Live2Diff' source: the engine at {api} came back"
                try:
                    real.wait_for_log(reopened, timeout=20)
                except AssertionError:
                    # OBS 29 does not always give up: on a loaded machine it has gone on retrying a
                    # second apart past that quiet (35 attempts in one run), and once (CI, stop 35) its
                    # last attempt logged no failure and read the engine as soon as it listened. Then
                    # the script found OBS reading when it first saw the engine, and re-opening it
                    # would have been wrong. What the script must never do is see the engine while
                    # OBS reads nothing and leave the source shut: judged on the time OBS's source
                    # started reading (the engine's own count of readers) against the time the
                    # script first logged the engine up (its poll came just before).
                    log = real.log_text()
                    seen = _first_engine_line_time(log[len(before):])
                    assert reading and seen is not None, (reading, seen)
                    assert reading[0] < seen + 1.0 or log.count("Set FFmpeg options") > attempts + 1, (
                        f"the script saw the engine up at {seen:.2f} while OBS read nothing until "
                        f"{reading[0]:.2f}, and it did not re-open the source")
                assert live.controller.status()["stream_clients_obs"] == 1
                # What a style switch changed, in OBS's log.
                live.manager.styles["inked"] = Style("inked", "a test style", template="ink, {}", t_index_list=(25, 45))
                assert post(api, command_message("set_style", style="inked"))[1]["ok"]
                real.wait_for_log("[live2diff] style inked: strength 0.36 -> 0.5, prompt template '{}' -> 'ink, {}'",
                                  timeout=20)
                # OBS's source stops reading while the engine runs on (its stream ends every reader
                # and sends nothing, as a stalled API would): the script says so, and once the
                # stream is back and the source reads again, no longer.
                live.api._closing = True  # (the stream's handlers end at once; new ones get nothing)
                wait_for(lambda: live.api.stream_clients("obs") == 0, timeout=30, what="OBS to stop reading")
                real.wait_for_log("| OBS source not pulling the stream", timeout=20)
                live.api._closing = False
                wait_for(lambda: live.api.stream_clients("obs") == 1, timeout=30, what="OBS reading again")
                wait_for(lambda: _last_status_line(real).endswith("| via HTTP API"), timeout=20,
                         what="the script to stop saying 'not pulling'")
                n = len(live.outputs)
                wait_for(lambda: _shows(client, live, seen_after=n), timeout=30, what="frames in OBS again")
        finally:
            client.disconnect()


def _wait_quiet(real, needle: str, quiet_s: float) -> None:
    """Waits until ``needle`` has not been logged anew for ``quiet_s`` seconds."""
    count, since = real.log_text().count(needle), time.monotonic()
    end = since + 120
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < end, f"{needle!r} kept coming"
        time.sleep(0.1)
        now = real.log_text().count(needle)
        if now != count:
            count, since = now, time.monotonic()


def _first_read(live) -> list[float]:
    """Starts watching the engine's count of OBS readers; the list gets the wall-clock time the
    first one appeared."""
    times: list[float] = []

    def watch():
        end = time.monotonic() + 300
        while not times and time.monotonic() < end:
            if live.api.stream_clients("obs"):
                times.append(time.time())
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return times


def _first_engine_line_time(log: str) -> float | None:
    """Wall-clock time of the OBS script's first status line with the engine up, in ``log`` (OBS
    stamps its lines with the local time of day)."""
    for line in log.splitlines():
        if "[live2diff] engine " in line and "[live2diff] engine offline" not in line:
            stamp = datetime.datetime.strptime(line[:12], "%H:%M:%S.%f").time()
            day = datetime.datetime.now()
            at = datetime.datetime.combine(day.date(), stamp)
            if at > day + datetime.timedelta(hours=1):  # the line was logged before midnight
                at -= datetime.timedelta(days=1)
            return at.timestamp()
    return None


def _last_status_line(real) -> str:
    lines = [ln for ln in real.log_text().splitlines() if "[live2diff] engine " in ln]
    return lines[-1] if lines else ""


def test_the_engines_source_stays_out_of_the_audio_mixer(comps, tmp_path):
    """A Media Source gets a strip in OBS's Audio Mixer; the engine's output has no sound. The
    engine mutes it and takes it off every audio track (all obs-websocket offers); the OBS script
    removes the strip (OBS's mixer shows a source only while its audio is active and its private
    'mixer_hidden' setting is off; the setting is saved with the scene collection)."""
    hidden = "kept the 'Live2Diff' source out of the Audio Mixer"
    settings = {"ws_password": PASSWORD}
    with RealOBS(tmp_path, password=PASSWORD, script=SCRIPT, script_settings=settings) as real:
        with LiveEngine(comps, PacedSource(fps=12), obs=obs_opts(real)) as live:
            wait_for(lambda: live.bridge.state == "connected", timeout=20, what="the engine to connect to OBS")
            assert post(live.api.url, command_message("add_to_scene"))[1]["ok"]
            real.wait_for_log(hidden, timeout=20)
            client = real.client()
            try:
                assert client.send("GetInputMute", {"inputName": "Live2Diff"}, raw=True)["inputMuted"] is True
                tracks = client.send("GetInputAudioTracks", {"inputName": "Live2Diff"}, raw=True)["inputAudioTracks"]
                assert not any(tracks.values()), tracks
                monitor = client.send("GetInputAudioMonitorType", {"inputName": "Live2Diff"}, raw=True)["monitorType"]
                assert monitor == "OBS_MONITORING_TYPE_NONE"
                wait_for(lambda: _lit(screenshot(client, "Live2Diff")), timeout=30, what="frames in OBS")  # still shows
            finally:
                client.disconnect()
            real.stop()
            saved = {s["name"]: s for s in real.scene_collection()["sources"]}["Live2Diff"]
            assert saved["private_settings"].get("mixer_hidden") is True
            assert saved["muted"] is True and saved["mixers"] & 0b111111 == 0  # OBS has six tracks
            real.start()  # the setting holds across a restart; the script hides it again all the same
            real.wait_for_log(hidden, timeout=20, count=2)
