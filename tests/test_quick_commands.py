"""The quick commands (`styles`, `models list`, `ctl`, `--help`) print a list or send one request:
they never load torch, diffusers or transformers (seconds each on a busy machine)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from live import LiveEngine, PacedSource
from live2diff_engine.models.components import build_tiny_components

HEAVY = ("torch", "diffusers", "transformers")

# Runs the command line in this process as the installed command does, then writes every module
# it loaded (however it ended: a return, --help's exit, an error) to the file named in argv[1].
WRAPPER = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from live2diff_engine.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_and_list_modules(tmp_path, *args):
    out = tmp_path / "modules.json"
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", WRAPPER, str(out), *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ))
    return r, set(json.loads(out.read_text()))


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [["--help"], ["styles"], ["styles", "list"], ["styles", "path"], ["models", "list"],
                                  ["ctl", "--help"], ["run", "--help"]])
def test_quick_commands_load_no_model_library(tmp_path, args):
    r, modules = run_and_list_modules(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert heavy_in(modules) == []
    assert "live2diff_engine.cli" in modules  # the wrapper really ran the command line


def test_styles_list_still_marks_missing_styles_and_checks_the_styles_file(tmp_path):
    r, modules = run_and_list_modules(tmp_path, "styles", "list")
    assert r.returncode == 0 and heavy_in(modules) == []
    assert "missing: get it with `live2diff-engine models download --style toonyou`" in r.stdout
    bad = tmp_path / "styles.toml"
    bad.write_text("[styles.fast]\nt_index_list = [45, 32]\n")
    r, modules = run_and_list_modules(tmp_path, "styles", "list", "--styles", str(bad))
    assert r.returncode == 2 and heavy_in(modules) == []
    assert r.stderr.strip().splitlines() == [
        f"live2diff-engine: error: style 'fast' in {bad}: t_index_list [45, 32] must be strictly increasing "
        "(noisiest step first)"
    ]
    bad.write_text("[styles.long]\nnum_inference_steps = 60\n")
    r, _ = run_and_list_modules(tmp_path, "styles", "list", "--styles", str(bad))
    assert r.returncode == 2 and "num_inference_steps must be at most 50" in r.stderr and "Traceback" not in r.stderr


def test_ctl_against_an_unreachable_engine_loads_no_model_library(tmp_path):
    r, modules = run_and_list_modules(tmp_path, "ctl", "status", "--api", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "no engine answers" in r.stderr
    assert heavy_in(modules) == []


def test_ctl_against_a_running_engine_loads_no_model_library(tmp_path):
    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=10)) as live:
        live.wait_outputs(2)
        for args in (["status"], ["styles"], ["prompt", "a red fox"]):
            r, modules = run_and_list_modules(tmp_path, "ctl", *args, "--api", live.api.url)
            assert r.returncode == 0, r.stderr
            assert heavy_in(modules) == []
        assert live.frames.prompt == "a red fox"
        r, _ = run_and_list_modules(tmp_path, "ctl", "status", "--api", live.api.url)
        assert "prompt: 'a red fox'" in r.stdout and "style: default" in r.stdout
