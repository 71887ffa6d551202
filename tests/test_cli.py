"""The command line: help, the benchmark, and one-line errors."""

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, run_cli


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "check-reference" in result.stdout and "bench" in result.stdout


def test_bench_reports_per_frame_cost_for_short_and_long_streams(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--model", "tiny", "--frames", "8,40", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "tiny random-weight model" in result.stdout and "noise, not a style" in result.stdout
    assert re.search(r"8 frames: +[0-9.]+ ms/frame", result.stdout)
    assert re.search(r"40 frames: +[0-9.]+ ms/frame", result.stdout)
    data = json.loads(out.read_text())
    assert set(data["per_frame_ms"]) == {"8", "40"}
    assert data["machine"]
    # The README: the per-frame cost stays flat as the stream grows (the cache does not grow with
    # it). Loosely, since the machine may be busy: a cache that grew would be far above this.
    assert 0 < data["ratio_long_to_short"] < 1.5, data


def test_bench_sd15_random_streams_the_full_geometry_without_a_download(tmp_path):
    """`bench --model sd15-random`: the full SD1.5 + Live2Diff UNet with random weights, offline with
    an empty hub cache. Kept short (one frame, 8x8 latents, one step: about 40 s here, most of it
    building the 1.3 B-parameter UNet). The child's peak memory shows the full model was built: its
    float32 weights alone are over 4 GB; the tiny model's process stays under 1 GB."""
    import os
    import resource
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    peak = "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; " \
           "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", peak, sys.executable, "-m", "live2diff_engine", "bench",
                             "--model", "sd15-random", "--device", "cpu", "--frames", "1", "--latent-size", "8x8",
                             "--t-index-list", "45", "--json", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "SD1.5 + Live2Diff geometry, random weights" in result.stdout
    assert re.search(r"1 frames: +[0-9.]+ ms/frame", result.stdout), result.stdout
    data = json.loads(out.read_text())
    assert data["latent"] == "8x8" and data["steps"] == 1 and 0 < data["per_frame_ms"]["1"] < float("inf"), data
    peak_kb = int(re.search(r"peak_kb (\d+)", result.stderr).group(1))
    assert peak_kb > 4_000_000, f"peak {peak_kb / 1e6:.1f} GB: not the full model"
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))  # nothing fetched


def _one_line(result):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [l for l in lines if "error" in l]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress lines may come first
    return errors[0]


def test_bench_without_a_model_says_how_to_choose_one():
    assert "--model tiny" in _one_line(run_cli("bench"))


def test_bench_with_bad_t_index_list():
    line = _one_line(run_cli("bench", "--model", "tiny", "--t-index-list", "10,60"))
    assert "out of range" in line


def test_bench_with_missing_checkpoint(tmp_path):
    line = _one_line(run_cli("bench", "--base", ROOT / "tests/golden/live2diff_tiny_a/base_unet", "--motion", tmp_path / "x.ckpt"))
    assert "motion checkpoint not found" in line


def test_unknown_option_missing_argument_and_bad_value_are_one_line_each():
    assert "--no-such-option" in _one_line(run_cli("check-reference", ROOT / "tests/golden/live2diff_tiny_a", "--no-such-option"))
    assert "--no-such-option" in _one_line(run_cli("bench", "--model", "tiny", "--no-such-option", "3"))
    _one_line(run_cli("check-reference"))  # its folder missing
    assert "--frames" in _one_line(run_cli("bench", "--frames", "a,b"))


def test_unavailable_device_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is available here, so there is no error to check")
    line = _one_line(run_cli("check-reference", ROOT / "tests/golden/live2diff_tiny_a", "--device", "cuda"))
    assert "CUDA is not available" in line


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [line for block in blocks[:2] for line in block.strip().splitlines()]
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert commands == ci


def test_config_help_names_this_oss_config_folder(monkeypatch):
    """--help shows where the config file is on the OS it runs on (%APPDATA% on Windows), not
    Linux's ~/.config everywhere."""
    import types

    from live2diff_engine import cli, config

    monkeypatch.delenv("LIVE2DIFF_HOME", raising=False)
    monkeypatch.delenv("LIVE2DIFF_CONFIG", raising=False)
    fake_os = types.SimpleNamespace(name="nt", environ={"APPDATA": "C:\\Users\\José 100%\\AppData\\Roaming"})
    monkeypatch.setattr(config, "os", fake_os)
    parser = cli.build_parser()
    run_help = next(a for a in parser._subparsers._group_actions[0].choices["run"]._actions if "--config" in a.option_strings)
    assert run_help.help % {} == "config file (default: C:\\Users\\José 100%\\AppData\\Roaming/live2diff/config.toml)"


def test_the_banner_names_the_ctl_command_that_reaches_this_engine(tmp_path, monkeypatch):
    """With --api-port 0 (which the port-conflict message suggests) the banner said `ctl status`,
    which then controlled another engine on 8765."""
    from live2diff_engine.options import ctl_hint

    monkeypatch.setenv("LIVE2DIFF_HOME", str(tmp_path))
    assert ctl_hint("http://127.0.0.1:8765", None) == "live2diff-engine ctl status"
    assert ctl_hint("http://127.0.0.1:41234", None) == "live2diff-engine ctl --api http://127.0.0.1:41234 status"
    cfg = tmp_path / "my config.toml"
    cfg.write_text("[api]\nport = 9000\n")
    assert ctl_hint("http://127.0.0.1:9000", str(cfg)) == f"live2diff-engine ctl --config '{cfg}' status"


def test_bench_style_measures_a_switch_to_each_style():
    """README: `bench-style` measures a style switch: a figure per style it alternates between."""
    import os

    home = Path(os.environ["LIVE2DIFF_HOME"])  # this test's own (conftest)
    (home / "styles.toml").write_text('[styles.inked]\ndescription = "a test style"\ntemplate = "ink, {}"\nt_index_list = [25, 45]\n')
    r = run_cli("bench-style", "--model", "tiny", "--switch", "default,inked", "--rounds", "2", timeout=300)
    assert r.returncode == 0, r.stderr
    figures = dict(re.findall(r"switch to (\S+) +([0-9.]+) ms \(median of 2\)", r.stdout))
    assert set(figures) == {"default", "inked"} and all(float(v) > 0 for v in figures.values()), r.stdout
    assert "unknown style" in _one_line_any(run_cli("bench-style", "--model", "tiny", "--switch", "default,nosuch", timeout=300))


def _one_line_any(result):
    """A one-line error with any non-zero exit status (a user error: 1 or 2)."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]
