"""The whole product against a real OBS Studio (Debian's 29.x under Xvfb, obs-websocket 5.1): the
project's OBS script loaded at start-up, the engine running the tiny model.

Skipped with the reason where OBS is not installed; under CI=true a missing OBS is a failure
(`.ci/run`'s install command installs it)."""

from __future__ import annotations

import base64
import logging
import time

import cv2
import numpy as np
import pytest

from conftest import ROOT
from live import GateSource, LiveEngine, PacedSource, reference_outputs, wait_for
from live2diff_engine.control.schema import command_message
from live2diff_engine.models.components import build_tiny_components
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
        settings_api = live.api.url
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
        assert settings_api
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
                assert settings["input"] == live.api.url + "/stream.mjpg"
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
            t0 = time.monotonic()
            wait_for(lambda: live.bridge.state == "waiting for OBS", timeout=15, what="the engine to notice OBS is gone")
            time.sleep(1.5)
            assert live.max_gap(t0, time.monotonic()) < 1.0  # the engine's own output never stopped
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
