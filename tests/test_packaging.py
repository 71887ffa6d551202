"""What ships: every package folder is listed in pyproject.toml, and a built wheel carries the
dock page and the OBS script, which an installed engine then serves and points OBS at."""

import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "live2diff_engine").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_wheel_carries_the_dock_and_the_obs_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.fail(r.stderr[-500:])
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("live2diff_engine/plugin/dock.html", "live2diff_engine/plugin/dock.js", "live2diff_engine/plugin/dock.css",
                   "live2diff_engine/obs_scripts/live2diff_obs.py", "live2diff_engine/data/styles.toml",
                   "live2diff_engine/control/api.py", "live2diff_engine/data/sd15/unet/config.json",
                   "live2diff_engine/data/sd15/vae/config.json", "live2diff_engine/data/sd15/text_encoder/config.json",
                   "live2diff_engine/data/sd15/tokenizer/merges.txt.gz"):
        assert needed in names, needed
