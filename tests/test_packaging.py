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


ENVIRONMENTS = {
    "macOS Intel": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
    "macOS Apple silicon": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "Linux": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "Windows": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
}


def requirements_for(env_name: str, python: str = "3.11") -> dict[str, str]:
    """pyproject's dependencies as pip sees them on that platform: {name: specifier}, one per name."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = dict(default_environment(), python_version=python, python_full_version=python + ".9", **ENVIRONMENTS[env_name])
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    active = [r for r in map(Requirement, deps) if r.marker is None or r.marker.evaluate(env)]
    names = [r.name.lower().replace("_", "-") for r in active]
    assert len(names) == len(set(names)), f"{env_name}: a package pinned twice"
    return {n: str(r.specifier) for n, r in zip(names, active)}


@pytest.mark.parametrize("env_name", list(ENVIRONMENTS))
def test_every_platform_gets_every_dependency_once(env_name):
    assert set(requirements_for(env_name)) - {"tomli"} == set(requirements_for("Linux")) - {"tomli"}
    assert "tomli" in requirements_for(env_name, "3.10") and "tomli" not in requirements_for(env_name, "3.11")


def test_intel_mac_pins_what_works_with_torch_2_2_2():
    """torch 2.2.2 is the last Intel Mac build, made against NumPy 1; transformers 5 disables torch below 2.6
    and diffusers 0.36+ reads torch.xpu at import (torch 2.3+). Elsewhere nothing is held back."""
    from packaging.specifiers import SpecifierSet

    intel = {k: SpecifierSet(v) for k, v in requirements_for("macOS Intel").items()}
    assert list(intel["torch"].filter(["2.2.2", "2.2.1", "2.13.0"])) == ["2.2.2"]
    assert "2.0.0" not in intel["numpy"] and "1.26.4" in intel["numpy"]
    assert "5.0.0" not in intel["transformers"] and "4.57.6" in intel["transformers"]
    assert "0.36.0" not in intel["diffusers"] and "0.35.2" in intel["diffusers"]
    for other in ("macOS Apple silicon", "Linux", "Windows"):
        reqs = {k: SpecifierSet(v) for k, v in requirements_for(other).items()}
        assert "2.13.0" in reqs["torch"] and "2.4.6" in reqs["numpy"] and "5.25.0" in reqs["transformers"]
        assert "0.42.1" in reqs["diffusers"]


@pytest.mark.parametrize("env_name, oldest, too_old", [
    ("macOS Intel", "0.14.0", "0.13.2"), ("macOS Apple silicon", "0.14.0", "0.13.2"),  # macOS 13+: the camera extension
    ("Linux", "0.12.0", "0.11.1"), ("Windows", "0.12.0", "0.11.1"),  # NumPy 2
])
def test_pyvirtualcam_floor(env_name, oldest, too_old):
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(requirements_for(env_name)["pyvirtualcam"])
    assert oldest in spec and too_old not in spec
