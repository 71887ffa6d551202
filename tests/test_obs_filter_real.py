"""The native "Live2Diff" OBS filter (plugin/live2diff-filter) in a real OBS Studio (Debian's 29.0.2
under Xvfb): built here with CMake against libobs-dev, installed into the test OBS's per-user
plugin folder, added to a source through obs-websocket, with the real engine (`run --model tiny
--source obs-filter`) on the other end.

The tiny model's output is noise, so "stylised" is judged against the source's own pixels: a solid
colour source, whose screenshot with the filter either is that colour (passed through) or is not
(the engine's frames). Skipped where OBS, a C toolchain or libobs-dev is missing; under CI=true
that is a failure (tests/system_packages.sh installs them)."""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest

from conftest import spawn_cli
from live import wait_for
from obs_plugin import build, install, require_build
from obs_real import SCENE, RealOBS, free_port, require_obs
from test_control import get
from test_obs_real import screenshot

pytestmark = pytest.mark.obs
PASSWORD = "obs-filter-test-pass"
COLOUR = (40, 160, 90)  # RGB of the source
SOURCE, FILTER = "Camera stand-in", "Live2Diff"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require_obs()
    require_build()
    build_dir = tmp_path_factory.mktemp("filter-build")
    build(build_dir)
    return build_dir


def start_engine(port: int, api_port: int, home):
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "xdg"), "LIVE2DIFF_HOME": str(home / "l2d"),
           "LIVE2DIFF_CONFIG": "", "OBS_WEBSOCKET_PASSWORD": "", "LIVE2DIFF_API_TOKEN": "", "OMP_NUM_THREADS": "1"}
    return spawn_cli("run", "--model", "tiny", "--source", f"obs-filter:{port}", "--api-port", api_port, "--fresh",
                     env=env, stderr=open(home / "engine.log", "a"), fresh=True)


def stop_engine(proc) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


def engine_status(api_port: int) -> dict | None:
    try:
        code, body = get(f"http://127.0.0.1:{api_port}", "/api/status")
    except OSError:
        return None
    return json.loads(body) if code == 200 else None


def away_from_source(img) -> float:
    """Mean distance of a screenshot's pixels from the source's colour (0: the source as it is;
    NaN while OBS has no picture yet, which is neither near nor far)."""
    if img is None:
        return float("nan")
    return float(np.abs(img.astype(np.int16) - np.array(COLOUR, np.int16)).mean())


def test_the_filter_shows_the_engines_frames_the_source_without_the_engine_and_the_engines_frames_again(built, tmp_path):
    """Also: its seed and pause properties reach the engine as commands, its status line shows
    FPS and latency, and with "hold" the last stylised frame stays while the engine is away."""
    real = RealOBS(tmp_path)
    so = install(built, real.config_dir)
    assert so.is_file()
    port, api_port = free_port(), free_port()
    home = tmp_path / "engine-home"
    home.mkdir()
    engine = start_engine(port, api_port, home)
    try:
        with real:
            real.wait_for_log("[live2diff] Live2Diff filter loaded")
            cl = real.client(timeout=30)
            r, g, b = COLOUR
            cl.send("CreateInput", {"sceneName": SCENE, "inputName": SOURCE, "inputKind": "color_source_v3",
                                    "inputSettings": {"color": 0xFF000000 | b << 16 | g << 8 | r, "width": 320, "height": 240},
                                    "sceneItemEnabled": True})
            shot = lambda: screenshot(cl, SOURCE, 64)  # noqa: E731
            wait_for(lambda: away_from_source(shot()) < 3, 60, "the source's own pixels")
            cl.send("CreateSourceFilter", {"sourceName": SOURCE, "filterName": FILTER, "filterKind": "live2diff_filter",
                                           "filterSettings": {"port": port}})

            # 1. the engine's frames, not the source's pixels
            wait_for(lambda: away_from_source(shot()) > 25, 240, "the engine's stylised frames in OBS")
            settings = lambda: cl.send("GetSourceFilter", {"sourceName": SOURCE, "filterName": FILTER}, raw=True)["filterSettings"]  # noqa: E731
            status = wait_for(lambda: (s := settings().get("status", "")) and "engine streaming" in s and s, 60, "the filter's status line")
            assert re.search(r"\d+\.\d fps \| latency \d+ ms", status), status

            # 2. its properties are the schema's commands: seed, then pause (the source as it is) and resume
            cl.send("SetSourceFilterSettings", {"sourceName": SOURCE, "filterName": FILTER, "filterSettings": {"seed": 4242}})
            wait_for(lambda: (engine_status(api_port) or {}).get("seed") == 4242, 60, "the seed set in the filter")
            cl.send("SetSourceFilterSettings", {"sourceName": SOURCE, "filterName": FILTER, "filterSettings": {"pause": True}})
            wait_for(lambda: (engine_status(api_port) or {}).get("paused") is True, 60, "the engine paused by the filter")
            wait_for(lambda: away_from_source(shot()) < 3, 30, "the source as it is while paused")
            cl.send("SetSourceFilterSettings", {"sourceName": SOURCE, "filterName": FILTER, "filterSettings": {"pause": False}})
            wait_for(lambda: away_from_source(shot()) > 25, 120, "the engine's frames after resuming")

            # 3. no engine: the source's own pixels, OBS rendering on
            before = cl.send("GetStats", raw=True)
            stop_engine(engine)
            stopped = time.monotonic()
            wait_for(lambda: away_from_source(shot()) < 3, 20, "the source's own pixels once the engine stopped")
            took = time.monotonic() - stopped
            time.sleep(2)
            after = cl.send("GetStats", raw=True)
            assert after["renderTotalFrames"] > before["renderTotalFrames"]
            print(f"source back {took:.2f} s after the engine stopped; OBS render fps {before['activeFps']:.1f} -> "
                  f"{after['activeFps']:.1f}, frames skipped by the renderer {after['renderSkippedFrames'] - before['renderSkippedFrames']}")
            assert "no engine" in wait_for(lambda: "no engine" in settings()["status"] and settings()["status"], 30, "status: no engine")

            # 4. the engine back: the filter reconnects by itself
            engine = start_engine(port, api_port, home)
            wait_for(lambda: away_from_source(shot()) > 25, 240, "the engine's frames after it came back")
            assert real.log_text().count("[live2diff] connected to the engine") >= 2

            # 5. "hold the last stylised frame": the engine gone, its last frame stays
            cl.send("SetSourceFilterSettings", {"sourceName": SOURCE, "filterName": FILTER, "filterSettings": {"hold_last": True}})
            stop_engine(engine)
            wait_for(lambda: "no engine" in settings()["status"], 30, "status: no engine")
            time.sleep(1.5)  # past the filter's 1 s freshness: only the hold keeps the frame now
            assert away_from_source(shot()) > 25, "the last stylised frame was not held"
            cl.send("SetSourceFilterSettings", {"sourceName": SOURCE, "filterName": FILTER, "filterSettings": {"hold_last": False}})
            wait_for(lambda: away_from_source(shot()) < 3, 20, "the source's own pixels once the hold is off")
    finally:
        if engine.poll() is None:
            stop_engine(engine)
