"""installers/install.sh for real: a CPU, no-models install into a temporary prefix, then an upgrade."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="install.sh is the Linux/macOS installer")


def test_install_then_run_then_upgrade(tmp_path):
    prefix = tmp_path / "prefix"
    env = dict(os.environ, HOME=str(tmp_path / "home"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = ["bash", str(ROOT / "installers" / "install.sh"), "--prefix", str(prefix), "--cpu", "--no-models",
           "--no-vcam", "--no-obs", "--no-shortcut", "--yes", "--python", sys.executable]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    exe = prefix / "venv" / "bin" / "live2diff-engine"
    assert exe.is_file()
    help_ = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert help_.returncode == 0 and "check-reference" in help_.stdout
    out = tmp_path / "smoke.mp4"
    run = subprocess.run(
        [str(exe), "run", "--model", "tiny", "--source", "synthetic", "--camera-size", "96x80",
         "--sink", f"file:{out}", "--max-frames", "12"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=300).returncode == 0
