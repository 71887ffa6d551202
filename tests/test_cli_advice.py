"""What the command line says: the advice when the API's port is taken, the warning for a secret
given as an option (never the secret), and the tiny model's small default size for smoke runs."""

from __future__ import annotations

import os
import re
import socket
import sys

import pytest

from conftest import run_cli
from live2diff_engine.cli import build_parser
from live2diff_engine.options import warn_secrets_on_command_line

SECRET = "hunter2-not-for-ps"


@pytest.fixture
def env(tmp_path):
    """A home of its own: no config file, no saved settings, no OBS settings of the user's."""
    return {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "LIVE2DIFF_HOME": str(tmp_path / "l2d"),
            "LIVE2DIFF_CONFIG": "", "OBS_WEBSOCKET_PASSWORD": "", "LIVE2DIFF_API_TOKEN": "", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_taken_port_says_how_to_pick_another_and_how_to_turn_the_api_off(env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "null", "--api-port", port, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    assert errors == [
        f"live2diff-engine: error: cannot listen on 127.0.0.1:{port} (address already in use); is another engine running? "
        "choose another --api-port (0 picks a free one), or --no-api to turn the API off"
    ], r.stderr


def test_a_smoke_run_of_the_tiny_model_is_64x64_and_a_password_option_is_warned_about_never_shown(env):
    r = run_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "null", "--no-api", "--max-frames", "12",
                "--obs", "--obs-port", free_port(), "--obs-password", SECRET, env=env)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    model = [l for l in r.stderr.splitlines() if l.startswith("model: ")]
    assert len(model) == 1 and model[0].endswith("; 64x64"), r.stderr
    warnings = [l for l in r.stderr.splitlines() if "--obs-password" in l]
    assert warnings == [
        "warning: --obs-password is visible to every user of this machine in the process list; put it in the "
        f"environment variable OBS_WEBSOCKET_PASSWORD or as password under [obs] in {env['LIVE2DIFF_HOME']}/config.toml instead"
    ], r.stderr


def test_secrets_from_the_environment_or_config_are_not_warned_about(monkeypatch, tmp_path):
    monkeypatch.setenv("LIVE2DIFF_HOME", str(tmp_path))
    monkeypatch.delenv("LIVE2DIFF_CONFIG", raising=False)
    lines: list[str] = []
    warn_secrets_on_command_line(build_parser().parse_args(["run", "--model", "tiny", "--obs"]), lines.append)
    assert lines == []
    warn_secrets_on_command_line(build_parser().parse_args(["run", "--obs-password", SECRET, "--api-token", SECRET]), lines.append)
    assert len(lines) == 2 and all(SECRET not in l for l in lines)
    assert "--obs-password" in lines[0] and "OBS_WEBSOCKET_PASSWORD" in lines[0]
    assert "--api-token" in lines[1] and "LIVE2DIFF_API_TOKEN" in lines[1] and "[api]" in lines[1]


def test_an_explicit_size_wins_over_the_tiny_default():
    from live2diff_engine.assemble import build_frame_pipeline

    args = build_parser().parse_args(["run", "--model", "tiny", "--width", "96", "--height", "80"])
    _, frames, _, _ = build_frame_pipeline(args, say=lambda line: None)
    assert (frames.width, frames.height) == (96, 80)
    args = build_parser().parse_args(["run", "--model", "tiny"])
    _, frames, _, _ = build_frame_pipeline(args, say=lambda line: None)
    assert (frames.width, frames.height) == (64, 64)


# -- option values, model options with --model tiny, models and the camera before anything loads ---
# (issue 24, points 12, 14, 15)

# Runs the command line in a fresh interpreter for each argv in argv[1] (JSON), as the installed
# command does, and prints [[exit status, stderr lines], ...] and whether torch was imported.
JUDGE_ALL = """
import contextlib, io, json, sys
from live2diff_engine.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, err.getvalue().splitlines()])
print(json.dumps({"results": results, "torch": "torch" in sys.modules, "cv2": "cv2" in sys.modules}))
"""


def test_option_values_are_judged_before_torch_loads(tmp_path, env):
    """Each value that cannot work is one line and exit 2, and torch was never imported for it
    (seconds on a busy machine) nor a camera opened."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    cases = {
        ("run", "--width", "0"): "model size 0x512 cannot work: --width and --height must be multiples of 8",
        ("run", "--steps", "9"): "--steps must be 1 to 4, got 9",
        ("run", "--strength", "3"): "--strength must be in (0, 1], got 3.0",
        ("run", "--t-index-list", "10,60"): "--t-index-list [10, 60] is out of range",
        ("run", "--num-inference-steps", "0"): "--num-inference-steps must be at least 1",
        ("run", "--guidance", "50"): "--guidance must be 1 to 20",
        ("run", "--similarity-threshold", "2"): "--similarity-threshold must be between 0 and 1",
        ("run", "--depth", "zoe"): "--depth takes midas, depth-anything or KIND=PATH",
        ("run", "--model", "tiny", "--motion", "corrupt.safetensors"): "--model tiny builds its own random-weight models, so --motion would be ignored",
        ("translate", "in.mp4", "out.mp4", "--height", "100"): "model size 512x100 cannot work",
        ("serve", "--model", "tiny", "--steps", "7"): "--steps must be 1 to 4, got 7",
    }
    argvs = [[*argv, *(["--source", "synthetic", "--sink", "null", "--no-api", "--max-frames", "1"] if argv[0] == "run" else [])]
             for argv in cases]
    r = subprocess.run([sys.executable, "-c", JUDGE_ALL, json.dumps(argvs)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**__import__("os").environ, **env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for (argv, needle), (rc, lines) in zip(cases.items(), got["results"]):
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (argv, rc, lines)
        assert lines[0].startswith("live2diff-engine: error: ")
    assert got["torch"] is False and got["cv2"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.path.exists("/dev/video7"), reason="Linux names its cameras as files; this needs camera 7 absent")
def test_a_missing_camera_is_said_before_torch_loads(tmp_path, env):
    """`run` without the camera: its one line comes before the model code (and torch) is imported,
    not seconds later."""
    import json
    import subprocess

    from conftest import ROOT

    argv = ["run", "--model", "tiny", "--source", "camera:7", "--sink", "null", "--no-api"]
    r = subprocess.run([sys.executable, "-c", JUDGE_ALL, json.dumps([argv])], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, **env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    (rc, lines), = got["results"]
    assert rc == 2 and len(lines) == 1 and "camera 7 cannot be opened" in lines[0], lines
    assert got["torch"] is False


def test_model_options_the_tiny_model_would_ignore_are_refused_in_one_line():
    from live2diff_engine.assemble import check_options
    from live2diff_engine.errors import ConfigError

    def judge(*argv):
        check_options(build_parser().parse_args(["run", "--model", "tiny", *argv]))

    with pytest.raises(ConfigError) as info:
        judge("--motion", "corrupt.safetensors", "--base", "sd", "--vae", "taesd", "--depth", "midas=/x", "--no-lcm-lora")
    assert str(info.value) == ("--model tiny builds its own random-weight models, so --base, --motion, --vae, --depth KIND=PATH "
                               "and --no-lcm-lora would be ignored; drop them, or drop --model tiny to use the real models")
    judge("--depth", "depth-anything", "--steps", "2", "--width", "96")  # what the tiny model does use
    judge("--base", "sd15", "--motion", "live2diff", "--vae", "full")  # the defaults, spelled out
    # eval's depth probe reads --depth KIND=PATH beside the tiny model
    check_options(build_parser().parse_args(["eval", "in.mp4", "out.mp4", "--model", "tiny", "--depth", "midas=/x"]))


def test_the_preflight_names_the_models_to_download_with_their_sizes(monkeypatch, tmp_path):
    """Before the camera opens, without downloading: online, one line names the models that will
    be downloaded (sizes where known); offline, one error names them all, and a camera this
    machine lacks in the same line."""
    from huggingface_hub import constants

    from live2diff_engine.assemble import preflight
    from live2diff_engine.errors import ModelLoadError
    from live2diff_engine.io import sources
    from live2diff_engine.models import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # the hub answers
    said = []
    preflight(build_parser().parse_args(["run", "--vae", "taesd"]), said.append)
    assert said == ["5 models are not downloaded yet and will be downloaded before the stream starts: sd15 "
                    "(stable-diffusion-v1-5/stable-diffusion-v1-5, about 4.3 GB), live2diff (Leoxing/Live2Diff), midas "
                    "(Intel/dpt-hybrid-midas, about 490 MB), lcm-lora (latent-consistency/lcm-lora-sdv1-5, about 135 MB), "
                    "taesd (madebyollin/taesd, about 10 MB)"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "_platform", lambda: "linux")
    monkeypatch.setattr(sources.os.path, "exists", lambda p: not p.startswith("/dev/video"))
    with pytest.raises(ModelLoadError) as info:
        preflight(build_parser().parse_args(["run", "--source", "camera:1"]), said.append)
    line = str(info.value)
    assert line.startswith("4 models are not downloaded: sd15 (stable-diffusion-v1-5/stable-diffusion-v1-5), live2diff"), line
    assert "; this machine is offline" in line and "`live2diff-engine models download`" in line
    assert line.endswith("; and camera 1 cannot be opened: this machine has no camera at all (no /dev/video* device); plug one "
                         "in, or run without one: --source synthetic (a moving test pattern) or --source video:PATH (a video file)")


def test_a_machine_without_any_camera_is_told_what_to_use_instead(monkeypatch):
    from live2diff_engine.errors import UserError
    from live2diff_engine.io import sources

    class Unopenable(sources.CameraSource):
        def open(self):
            raise sources.SourceError(f"camera {self.index} cannot be opened")

    monkeypatch.setattr(sources, "_platform", lambda: "linux")
    virtual = "/sys/devices/virtual/video4linux/video10"
    monkeypatch.setattr(sources.os.path, "exists", lambda p: p == "/dev/video10" or not p.startswith("/dev/video"))
    monkeypatch.setattr(sources.os.path, "realpath", lambda p: virtual if p.endswith("/video10") else p)
    with pytest.raises(UserError) as info:
        sources.open_at_start(Unopenable(0), print)
    assert str(info.value) == (
        "camera 0 cannot be opened: this machine has no camera at all (no /dev/video* device but the virtual camera "
        "/dev/video10); plug one in, or run without one: --source synthetic (a moving test pattern) or --source video:PATH (a video file)"
    )
    monkeypatch.setattr(sources.os.path, "exists", lambda p: p == "/dev/video0" or not p.startswith("/dev/video"))
    with pytest.raises(UserError, match="camera 1 cannot be opened: check --source camera:N"):
        sources.open_at_start(Unopenable(1), print)  # another camera is here: the index is the mistake
