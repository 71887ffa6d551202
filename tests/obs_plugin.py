"""Builds the native OBS filter (plugin/live2diff-filter) with CMake against the installed libobs
(Debian: libobs-dev), and installs it into a real OBS's per-user plugin folder, for tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import ROOT, need

PLUGIN_SRC = ROOT / "plugin" / "live2diff-filter"
MODULE = "live2diff-filter"
LIBOBS_HEADER = Path("/usr/include/obs/obs-module.h")


def build_available() -> str | None:
    """None when the filter can be built here, else why not."""
    for tool in ("cmake", "cc", "make"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (apt-get install cmake gcc make)"
    if not LIBOBS_HEADER.exists():
        return "libobs's headers are not installed (apt-get install libobs-dev)"
    return None


def require_build() -> None:
    """Skip without a C toolchain and libobs-dev; fail instead when CI=true (CI installs them)."""
    need(build_available())


def build(build_dir: Path) -> Path:
    """Configures and builds the module in ``build_dir``; returns the built .so (errors: the compiler's words)."""
    def run(*cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    run("cmake", "-S", PLUGIN_SRC, "-B", build_dir, "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DL2D_USER_INSTALL=ON")
    out = run("cmake", "--build", build_dir)
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if "warning:" in line]
    assert not warnings, "the filter builds with warnings:\n" + "\n".join(warnings)
    return build_dir / f"{MODULE}.so"


def install(build_dir: Path, obs_config_dir: Path) -> Path:
    """Installs the built module as a user would (CMake's install step) into ``obs_config_dir``
    (a ~/.config/obs-studio): plugins/live2diff-filter/{bin/64bit,data}. Returns the .so there."""
    prefix = obs_config_dir / "plugins"
    r = subprocess.run(["cmake", "--install", build_dir, "--prefix", prefix], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return prefix / MODULE / "bin" / "64bit" / f"{MODULE}.so"
