"""What the command line says: the advice when the API's port is taken, the warning for a secret
given as an option (never the secret), and the tiny model's small default size for smoke runs."""

from __future__ import annotations

import re
import socket

import pytest

from conftest import run_cli
from live2diff_engine.cli import build_parser, warn_secrets_on_command_line

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
