"""The installer's decisions, fed plain data (no network, no root, no mocks), and the wrappers' syntax."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need
from live2diff_engine import installer as I

ROOT = Path(__file__).resolve().parent.parent
SH = ROOT / "installers" / "install.sh"

SMI_4090 = "NVIDIA GeForce RTX 4090, 560.94, 8.9\n"


# ------------------------------------------------------------------------------------- nvidia-smi parsing


@pytest.mark.parametrize("text, expected", [
    (SMI_4090, [I.Gpu("NVIDIA GeForce RTX 4090", "560.94", "8.9")]),
    ("NVIDIA GeForce RTX 3060, 531.14\n", [I.Gpu("NVIDIA GeForce RTX 3060", "531.14", "")]),
    ("name, driver_version, compute_cap\nTesla T4, 535.104.05, 7.5\nTesla T4, 535.104.05, 7.5\n",
     [I.Gpu("Tesla T4", "535.104.05", "7.5")] * 2),
    ("", []),
    (None, []),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", []),
])
def test_parse_nvidia_smi(text, expected):
    assert I.parse_nvidia_smi(text) == expected


# ------------------------------------------------------------------------------------- torch build choice


@pytest.mark.parametrize("os_name, driver, wheel", [
    ("Linux", "570.26", "cu128"),
    ("Linux", "575.57.08", "cu128"),
    ("Windows", "570.64", "cu126"),  # Windows needs 570.65 for 12.8
    ("Windows", "572.16", "cu128"),
    ("Linux", "560.28.03", "cu126"),
    ("Linux", "560.28.02", "cu124"),
    ("Windows", "560.76", "cu126"),
    ("Linux", "550.54.14", "cu124"),
    ("Windows", "551.61", "cu124"),
    ("Windows", "551.60", "cu121"),
    ("Linux", "535.104.05", "cu121"),
    ("Linux", "525.60.13", "cu121"),
    ("Windows", "528.24", None),  # below the Windows 12.x floor 528.33
    ("Windows", "528.33", "cu121"),
    ("Linux", "520.61.05", None),
    ("Linux", "470.256.02", None),
])
def test_pick_cuda_wheel(os_name, driver, wheel):
    assert I.pick_cuda_wheel(I.normalize_os(os_name), driver) == wheel


@pytest.mark.parametrize("os_name, arch, smi, env, cpu, kind, spec, index", [
    # NVIDIA on Windows/Linux: newest wheel the driver runs, from PyTorch's index.
    ("Windows", "AMD64", SMI_4090, {}, False, "cuda", "torch", "https://download.pytorch.org/whl/cu126"),
    ("Linux", "x86_64", "NVIDIA GeForce RTX 3090, 550.120, 8.6", {}, False, "cuda", "torch", "https://download.pytorch.org/whl/cu124"),
    ("Linux", "x86_64", "NVIDIA GeForce RTX 5090, 570.133.07, 12.0", {}, False, "cuda", "torch", "https://download.pytorch.org/whl/cu128"),
    # Blackwell on a driver without CUDA 12.8: stop and say "update the driver".
    ("Windows", "AMD64", "NVIDIA GeForce RTX 5080, 566.36, 12.0", {}, False, "error", "", None),
    ("Windows", "AMD64", "NVIDIA GeForce RTX 5070, 566.36", {}, False, "error", "", None),  # by name, no compute_cap
    # Too old a driver.
    ("Linux", "x86_64", "Quadro P4000, 470.256.02, 6.1", {}, False, "error", "", None),
    # Overrides, as the popular SD UIs allow.
    ("Windows", "AMD64", SMI_4090, {"TORCH_INDEX_URL": "https://mirror.example/cu126"}, False, "cuda", "torch", "https://mirror.example/cu126"),
    ("Linux", "x86_64", SMI_4090, {"LIVE2DIFF_TORCH_SPEC": "torch==2.7.1"}, False, "cuda", "torch==2.7.1", "https://download.pytorch.org/whl/cu126"),
    # No GPU / --cpu: pinned CPU torch from the default index (local wheel on dev machines).
    ("Linux", "x86_64", "", {}, False, "cpu", "torch==2.13.0", None),
    ("Windows", "AMD64", None, {}, False, "cpu", "torch==2.13.0", None),
    ("Linux", "x86_64", SMI_4090, {}, True, "cpu", "torch==2.13.0", None),
    ("Linux", "x86_64", "", {"LIVE2DIFF_TORCH_SPEC": "torch==2.6.0"}, True, "cpu", "torch==2.6.0", None),
    ("Linux", "x86_64", "", {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}, True, "cpu", "torch==2.13.0", "https://download.pytorch.org/whl/cpu"),
    # Macs: MPS on Apple silicon (with a speed warning), CPU on Intel.
    ("Darwin", "arm64", None, {}, False, "mps", "torch", None),
    ("Darwin", "x86_64", None, {}, False, "cpu", "torch==2.2.2 numpy<2", None),  # torch's last Intel build, NumPy 1
])
def test_choose_torch(os_name, arch, smi, env, cpu, kind, spec, index):
    plan = I.choose_torch(os_name, arch, I.parse_nvidia_smi(smi), env, force_cpu=cpu)
    assert (plan.kind, plan.spec, plan.index_url) == (kind, spec, index)
    assert plan.messages, "every decision is explained to the user"
    if kind == "error":
        assert "driver" in plan.messages[0] and ("Update" in plan.messages[0] or "update" in plan.messages[0])
    if kind == "mps":
        assert "slower" in plan.messages[0]
    if kind == "cpu":
        assert "good for" in " ".join(plan.messages)


# (driver, compute capability) -> the index and the requirement pip gets. cu128 (every driver >= 570) has no
# kernels below 7.5 (torch 2.8 dropped sm_50/sm_60, 2.11 sm_70, and the cu128 index ends at 2.11); cu126 carries
# 5.0 to 9.0, and so do the older builds lower drivers get.
@pytest.mark.parametrize("os_name, smi, kind, index, says", [
    ("Linux", "NVIDIA GeForce GTX 1080, 575.64.03, 6.1", "cuda", "https://download.pytorch.org/whl/cu126", "cu126 build"),
    ("Windows", "NVIDIA GeForce GTX 970, 576.02, 5.2", "cuda", "https://download.pytorch.org/whl/cu126", "no kernels below compute capability 7.5"),
    ("Windows", "NVIDIA TITAN V, 581.57, 7.0", "cuda", "https://download.pytorch.org/whl/cu126", "compute capability 7.0"),
    ("Linux", "Tesla V100-SXM2-16GB, 570.172.08, 7.0", "cuda", "https://download.pytorch.org/whl/cu126", "cu126"),
    ("Linux", "NVIDIA GeForce GTX 1660 SUPER, 575.64.03, 7.5", "cuda", "https://download.pytorch.org/whl/cu128", "cu128"),
    ("Linux", "NVIDIA GeForce RTX 3060, 580.95.05, 8.6", "cuda", "https://download.pytorch.org/whl/cu128", "cu128"),
    # Below 570 the driver already picks a build with the old kernels: nothing changes.
    ("Linux", "NVIDIA GeForce GTX 1080 Ti, 550.144.03, 6.1", "cuda", "https://download.pytorch.org/whl/cu124", "cu124"),
    ("Windows", "Quadro M4000, 538.78, 5.2", "cuda", "https://download.pytorch.org/whl/cu121", "cu121"),
    # No compute_cap column: the card's name tells a Pascal card.
    ("Linux", "NVIDIA GeForce GTX 1070, 575.64.03", "cuda", "https://download.pytorch.org/whl/cu126", "cu126"),
    ("Linux", "NVIDIA TITAN Xp, 575.64.03", "cuda", "https://download.pytorch.org/whl/cu126", "cu126"),
    ("Linux", "NVIDIA GeForce RTX 2080, 575.64.03", "cuda", "https://download.pytorch.org/whl/cu128", "cu128"),
    # Kepler: no build at all, whatever the driver: --cpu, not "update the driver".
    ("Linux", "Tesla K80, 470.256.02, 3.7", "error", None, "--cpu"),
    ("Linux", "Tesla K80, 575.64.03, 3.7", "error", None, "--cpu"),
    # Two cards: one build for both where there is one, else the Blackwell card wins and the other is named.
    ("Linux", "NVIDIA GeForce RTX 4090, 575.64.03, 8.9\nNVIDIA GeForce GTX 1080, 575.64.03, 6.1", "cuda",
     "https://download.pytorch.org/whl/cu126", "cu126"),
    ("Linux", "NVIDIA GeForce RTX 5090, 575.64.03, 12.0\nNVIDIA GeForce GTX 1080, 575.64.03, 6.1", "cuda",
     "https://download.pytorch.org/whl/cu128", "can use only the NVIDIA GeForce RTX 5090"),
    ("Linux", "NVIDIA GeForce RTX 3090, 575.64.03, 8.6\nTesla K80, 575.64.03, 3.7", "cuda",
     "https://download.pytorch.org/whl/cu128", "Tesla K80 (compute capability 3.7) is too old"),
])
def test_choose_torch_for_the_card(os_name, smi, kind, index, says):
    plan = I.choose_torch(os_name, "x86_64", I.parse_nvidia_smi(smi), {})
    assert (plan.kind, plan.index_url) == (kind, index), plan.messages
    assert plan.spec == ("torch" if kind == "cuda" else "")
    assert says in " ".join(plan.messages)
    if kind == "cuda":
        assert plan.wheel in plan.messages[0], "the first line says which build"


def test_torch_pip_args():
    plan = I.choose_torch("Linux", "x86_64", I.parse_nvidia_smi(SMI_4090), {})
    assert plan.pip_args() == ["install", "--upgrade", "torch", "--index-url", "https://download.pytorch.org/whl/cu126"]
    assert I.choose_torch("Linux", "x86_64", [], {}, True).pip_args() == ["install", "--upgrade", "torch==2.13.0"]
    assert I.choose_torch("Darwin", "x86_64", [], {}).pip_args() == ["install", "--upgrade", "torch==2.2.2", "numpy<2"]


# ------------------------------------------------------------------------------------- virtual camera


# `systemextensionsctl list` as macOS prints it (tab-separated), OBS 30's camera extension in three states.
_SYSEXT_HEAD = ("1 extension(s)\n--- com.apple.system_extension.cmio (Go to 'System Settings > General > Login Items & "
                "Extensions > Camera Extensions' to modify these system extension(s))\n"
                "enabled\tactive\tteamID\tbundleID (version)\tname\t[state]\n")
SYSEXT_ENABLED = _SYSEXT_HEAD + ("*\t*\t2MMRE5MTB8\tcom.obsproject.obs-studio.mac-camera-extension (30.2.3/30.2.3)\t"
                                 "OBS Virtual Camera\t[activated enabled]\n")
SYSEXT_WAITING = _SYSEXT_HEAD + ("\t\t2MMRE5MTB8\tcom.obsproject.obs-studio.mac-camera-extension (31.0.0/31.0.0)\t"
                                 "OBS Virtual Camera\t[activated waiting for user]\n")
SYSEXT_REMOVED = ("\t\t2MMRE5MTB8\tcom.obsproject.obs-studio.mac-camera-extension (30.0.0/30.0.0)\t"
                  "OBS Virtual Camera\t[terminated waiting to uninstall on reboot]\n")


@pytest.mark.parametrize("os_name, facts, ready, says, root_cmds", [
    ("Windows", {}, False, ["OBS Studio", "Unity Capture"], 0),
    ("Windows", {"obs_vcam": True}, True, ["OBS Virtual Camera"], 0),
    ("Windows", {"unity_capture": True}, True, ["Unity Capture"], 0),
    ("Darwin", {}, False, ["OBS Studio 30", "Start Virtual Camera", "Privacy & Security"], 0),
    ("Darwin", {"macos_version": "14.6.1", "sysext": SYSEXT_ENABLED}, True, ["camera extension"], 0),
    ("Darwin", {"macos_version": "15.1", "sysext": SYSEXT_WAITING}, False, ["not allowed yet", "Camera Extensions"], 0),
    # An old version on its way out beside a new one that is enabled: ready.
    ("Darwin", {"macos_version": "14.6.1", "sysext": SYSEXT_ENABLED + SYSEXT_REMOVED}, True, ["camera extension"], 0),
    ("Darwin", {"macos_version": "14.6.1", "sysext": SYSEXT_REMOVED}, False, ["OBS Studio 30"], 0),
    # A DAL plugin left from OBS 27-29: macOS 13+ no longer loads it, so it does not count there.
    ("Darwin", {"macos_version": "13.6.9", "dal_plugin": True}, False, ["old DAL plugin", "OBS Studio 30", "sudo rm -r"], 0),
    ("Darwin", {"macos_version": "14.6.1", "sysext": "0 extension(s)\n", "dal_plugin": True}, False, ["camera extensions only"], 0),
    ("Darwin", {"macos_version": "12.7.6", "dal_plugin": True}, True, ["DAL plugin"], 0),
    ("Linux", {"os_release": {"ID": "ubuntu", "ID_LIKE": "debian"}}, False, ["not installed", "/etc/modprobe.d"], 2),
    ("Linux", {"os_release": {"ID": "fedora"}}, False, ["RPM Fusion"], 2),
    ("Linux", {"os_release": {"ID": "gentoo"}}, False, ["v4l2loopback", "/etc/modules-load.d"], 0),
    ("Linux", {"v4l2_installed": True}, False, ["not loaded"], 1),
    ("Linux", {"v4l2_installed": True, "v4l2_loaded": True, "loopback_labels": (I.VCAM_LABEL,)}, True, ["ready"], 0),
    ("Linux", {"v4l2_installed": True, "v4l2_loaded": True, "loopback_labels": ("Dummy video device",)}, True, ["exclusive_caps=1"], 0),
])
def test_vcam_plan(os_name, facts, ready, says, root_cmds):
    plan = I.vcam_plan(os_name, **facts)
    text = " ".join(plan.messages)
    assert plan.ready == ready
    for s in says:
        assert s in text
    assert len(plan.root_commands) == root_cmds


def test_linux_vcam_exact_module_options_and_persistence():
    plan = I.vcam_plan("linux", os_release={"ID": "debian"})
    assert plan.root_commands[0] == ["apt-get", "install", "-y", "v4l2loopback-dkms"]
    assert plan.root_commands[-1] == ["modprobe", "v4l2loopback", "devices=1", "video_nr=10",
                                      "card_label=Live2Diff Camera", "exclusive_caps=1"]
    assert plan.persistent_files == {
        "/etc/modules-load.d/v4l2loopback.conf": "v4l2loopback\n",
        "/etc/modprobe.d/v4l2loopback.conf": 'options v4l2loopback devices=1 video_nr=10 card_label="Live2Diff Camera" exclusive_caps=1\n',
    }


@pytest.mark.parametrize("os_release, first", [
    ({"ID": "ubuntu"}, "apt-get"), ({"ID": "linuxmint", "ID_LIKE": "ubuntu debian"}, "apt-get"),
    ({"ID": "arch"}, "pacman"), ({"ID": "manjaro", "ID_LIKE": "arch"}, "pacman"),
    ({"ID": "fedora"}, "dnf"), ({"ID": "opensuse-tumbleweed", "ID_LIKE": "opensuse suse"}, "zypper"),
    ({"ID": "nixos"}, None), ({}, None),
])
def test_v4l2loopback_install_command(os_release, first):
    cmd = I.v4l2loopback_install_command(os_release)
    assert (cmd[0] if cmd else None) == first


# ------------------------------------------------------------------------------------- OBS


@pytest.mark.parametrize("os_name, home, env, expected", [
    ("Windows", r"C:\Users\ann", {"APPDATA": r"C:\Users\ann\AppData\Roaming"}, [r"C:\Users\ann\AppData\Roaming\obs-studio"]),
    ("Windows", r"C:\Users\ann", {}, [r"C:\Users\ann\AppData\Roaming\obs-studio"]),
    ("Darwin", "/Users/ann", {}, ["/Users/ann/Library/Application Support/obs-studio"]),
    ("Linux", "/home/ann", {}, ["/home/ann/.config/obs-studio", "/home/ann/.var/app/com.obsproject.Studio/config/obs-studio"]),
    ("Linux", "/home/ann", {"XDG_CONFIG_HOME": "/cfg"}, ["/cfg/obs-studio", "/home/ann/.var/app/com.obsproject.Studio/config/obs-studio"]),
])
def test_obs_config_dirs(os_name, home, env, expected):
    assert I.obs_config_dirs(os_name, home, env) == expected


@pytest.mark.parametrize("os_name, existing, config, flatpak", [
    ("Linux", set(), None, None),
    ("Linux", {"/usr/bin/obs"}, "/home/ann/.config/obs-studio", False),
    ("Linux", {"/home/ann/.config/obs-studio"}, "/home/ann/.config/obs-studio", False),
    ("Linux", {"/var/lib/flatpak/app/com.obsproject.Studio"}, "/home/ann/.var/app/com.obsproject.Studio/config/obs-studio", True),
    ("Linux", {"/home/ann/.var/app/com.obsproject.Studio/config/obs-studio"}, "/home/ann/.var/app/com.obsproject.Studio/config/obs-studio", True),
    ("Darwin", {"/Applications/OBS.app"}, "/home/ann/Library/Application Support/obs-studio", False),
    ("Windows", {r"C:\Program Files\obs-studio\bin\64bit\obs64.exe"}, r"C:\Users\ann\AppData\Roaming\obs-studio", False),
])
def test_find_obs(os_name, existing, config, flatpak):
    home = r"C:\Users\ann" if os_name == "Windows" else "/home/ann"
    env = {"APPDATA": r"C:\Users\ann\AppData\Roaming", "ProgramFiles": r"C:\Program Files"} if os_name == "Windows" else {}
    obs = I.find_obs(os_name, home, env, existing)
    if config is None:
        assert obs is None
    else:
        assert (obs["config"], obs["flatpak"]) == (config, flatpak)


@pytest.mark.parametrize("os_name, config, expected", [
    ("Windows", r"C:\Users\ann\AppData\Roaming\obs-studio", r"C:\Users\ann\AppData\Roaming\obs-studio\scripts\live2diff-engine"),
    ("Darwin", "/Users/ann/Library/Application Support/obs-studio", "/Users/ann/Library/Application Support/obs-studio/scripts/live2diff-engine"),
    ("Linux", "/home/ann/.config/obs-studio", "/home/ann/.config/obs-studio/scripts/live2diff-engine"),
])
def test_obs_script_dir(os_name, config, expected):
    assert I.obs_script_dir(os_name, config) == expected


@pytest.mark.parametrize("ini, expected", [
    ({"global.ini": "[General]\nFirstRun=true\n\n[Python]\nPath64bit=C:/Python311\n"}, "C:/Python311"),
    ({"user.ini": "\ufeff[Python]\nPath64bit=C:/Users/ann/AppData/Local/Programs/Python/Python312\n",
      "global.ini": "[Python]\nPath64bit=C:/Python36\n"}, "C:/Users/ann/AppData/Local/Programs/Python/Python312"),
    ({"user.ini": "[General]\nX=1\n", "global.ini": "[Python]\nPath64bit=/Library/Frameworks\n"},
     "/Library/Frameworks"),
    ({"global.ini": "[Python]\nPath64bit=\n"}, None),
    ({"global.ini": "[Basic]\nProfile=Untitled\n"}, None),
    ({"global.ini": "not an ini file ]["}, None),
    ({}, None),
])
def test_obs_python_setting(ini, expected):
    assert I.obs_python_setting(ini) == expected


OBS = {"config": "c", "flatpak": False}
PY311_WIN = {r"C:\Python311\python311.dll", r"C:\Python311\python.exe"}
FW = "/Library/Frameworks/Python.framework/Versions"
MAC_311 = {f"{FW}/3.11/lib/libpython3.11.dylib", f"{FW}/3.11/bin/python3.11"}
MAC_313 = {f"{FW}/3.13/lib/libpython3.13.dylib", f"{FW}/3.13/bin/python3.13"}
BREW = "/opt/homebrew/opt/python@3.12/Frameworks"


def _ini(path):
    return {"user.ini": f"[Python]\nPath64bit={path}\n"}


@pytest.mark.parametrize("os_name, obs, ini, existing, probe, runs, says", [
    ("Windows", None, {}, set(), None, None, "OBS not found"),
    ("Windows", OBS, {}, set(), None, None, "3.12 or older"),
    ("Windows", OBS, {"global.ini": "[Python]\nPath64bit=C:/Python311\n"}, set(), None, None, "no Python OBS can load"),
    ("Windows", OBS, {"global.ini": "[Python]\nPath64bit=C:/Python311\n"}, PY311_WIN, None, r"C:\Python311\python.exe", "Python 3.11"),
    ("Windows", OBS, _ini("C:/Python311"), PY311_WIN, {"version": (3, 11), "bits": 64}, r"C:\Python311\python.exe", "Installing"),
    # python.org's 32-bit installer: OBS (64-bit) cannot load it.
    ("Windows", OBS, _ini("C:/Python311"), PY311_WIN, {"version": (3, 11), "bits": 32}, None, "32-bit"),
    ("Windows", OBS, _ini("C:/Python311"), {r"C:\Python311\python311.dll"}, None, None, "is not there"),
    # What python.org offers first: OBS loads 3.6 to 3.12 only.
    ("Windows", OBS, _ini("C:/Python313"), {r"C:\Python313\python313.dll", r"C:\Python313\python.exe"}, None, None,
     "holds Python 3.13, which OBS cannot load"),
    # macOS: OBS's setting is the folder that holds Python.framework, and it loads Versions/3.X from it.
    ("Darwin", OBS, _ini("/Library/Frameworks"), MAC_311, None, f"{FW}/3.11/bin/python3.11", "Python 3.11"),
    ("Darwin", OBS, _ini(BREW), {f"{BREW}/Python.framework/Versions/3.12/lib/libpython3.12.dylib",
                                 f"{BREW}/Python.framework/Versions/3.12/bin/python3.12"}, None,
     f"{BREW}/Python.framework/Versions/3.12/bin/python3.12", "Installing"),
    # python.org installs 3.13 beside 3.11: OBS skips 3.13 and loads 3.11, so obsws-python goes there.
    ("Darwin", OBS, _ini("/Library/Frameworks"), MAC_311 | MAC_313, None, f"{FW}/3.11/bin/python3.11", "Python 3.11"),
    ("Darwin", OBS, _ini("/Library/Frameworks"), MAC_313, None, None, "holds Python 3.13, which OBS cannot load"),
    # The framework's own folder instead of the one holding it: OBS loads nothing; say which folder to pick.
    ("Darwin", OBS, _ini(f"{FW}/3.11"), MAC_311, None, None, "to /Library/Frameworks,"),
    # <folder>/bin/python3 is not what OBS loads.
    ("Darwin", OBS, _ini("/opt/py311"), {"/opt/py311/bin/python3"}, None, None, "no Python OBS can load"),
    ("Linux", OBS, {}, set(), None, None, "python3 -m pip install --user obsws-python"),
    ("Linux", {"config": "c", "flatpak": True}, {}, set(), None, None, "Flatpak"),
])
def test_obsws_plan(os_name, obs, ini, existing, probe, runs, says):
    cmd, msg = I.obsws_plan(os_name, obs, ini, existing, probe)
    assert (cmd[0] if cmd else None) == runs, msg
    assert says in msg
    if cmd:
        assert cmd[1:] == ["-m", "pip", "install", "--upgrade", "obsws-python"]
    else:
        assert "installer again" in msg or "OBS not found" in msg or "Linux" in msg or "Flatpak" in msg


def test_obs_python_paths_cover_what_obs_tries():
    """OBS tries 3.12 down to 3.6 (obs-scripting-python-import.c); we also look for 3.13-3.15 to say why not."""
    libs = [lib for _, lib, _ in I.obs_python_layout("Darwin", "/Library/Frameworks")]
    assert libs[3] == f"{FW}/3.12/lib/libpython3.12.dylib" and libs[-1] == f"{FW}/3.6/lib/libpython3.6.dylib"
    assert [v for v in I.OBS_PYTHON_VERSIONS] == [(3, m) for m in range(12, 5, -1)]
    win = I.obs_python_paths("Windows", "C:/Python312")
    assert r"C:\Python312\python312.dll" in win and r"C:\Python312\python36.dll" in win and r"C:\Python312\python.exe" in win


@pytest.mark.parametrize("os_name, base_prefix, home", [
    ("Windows", r"C:\Users\ann\AppData\Local\Programs\Python\Python311", r"C:\Users\ann\AppData\Local\Programs\Python\Python311"),
    ("Darwin", f"{FW}/3.11", "/Library/Frameworks"),
    ("Darwin", f"{BREW}/Python.framework/Versions/3.12", BREW),
    ("Darwin", "/Users/ann/.pyenv/versions/3.11.9", None),  # not a framework build: OBS cannot load it
    ("Linux", "/usr", None),
])
def test_obs_python_home_of(os_name, base_prefix, home):
    assert I.obs_python_home_of(os_name, base_prefix) == home


def test_obs_python_suggestion_when_obs_has_none():
    assert I.obs_python_suggestion("Darwin", "/Library/Frameworks", (3, 11), 64, MAC_311) == "/Library/Frameworks"
    assert I.obs_python_suggestion("Darwin", "/Library/Frameworks", (3, 13), 64, MAC_313) is None
    assert I.obs_python_suggestion("Windows", r"C:\Python311", (3, 11), 32, PY311_WIN) is None
    _, msg = I.obsws_plan("Darwin", OBS, {}, set(), None, "/Library/Frameworks")
    assert "(/Library/Frameworks will do)" in msg


def test_python_probe_runs_and_parses():
    """The probe main runs in OBS's interpreter, run here in this one."""
    out = subprocess.run([sys.executable, "-c", I.PYTHON_PROBE], capture_output=True, text=True, timeout=60).stdout
    assert I.parse_python_probe(out) == {"version": sys.version_info[:2], "bits": 64 if sys.maxsize > 2**32 else 32}
    assert I.parse_python_probe("3 12 False\n") == {"version": (3, 12), "bits": 32}
    assert I.parse_python_probe("Python was not found; run without arguments to install from the Microsoft Store") is None
    assert I.parse_python_probe(None) is None


def test_dock_url_and_next_steps():
    assert I.dock_url() == "http://127.0.0.1:8765/dock"
    steps = I.obs_next_steps(9000, "/x/live2diff.py")
    assert "Tools > Scripts" in steps[0] and "/x/live2diff.py" in steps[0]
    assert "Docks > Custom Browser Docks" in steps[1] and "http://127.0.0.1:9000/dock" in steps[1]
    assert not any("Tools > Scripts" in s for s in I.obs_next_steps(8765, None))


# ------------------------------------------------------------------------------------- layout, launchers, plan


@pytest.mark.parametrize("os_name, home, env, expected", [
    ("Linux", "/home/ann", {}, "/home/ann/.local/share/live2diff-engine"),
    ("Linux", "/home/ann", {"XDG_DATA_HOME": "/data"}, "/data/live2diff-engine"),
    ("Darwin", "/Users/ann", {}, "/Users/ann/Library/Application Support/live2diff-engine"),
    ("Windows", r"C:\Users\ann", {"LOCALAPPDATA": r"C:\Users\ann\AppData\Local"}, r"C:\Users\ann\AppData\Local\live2diff-engine"),
])
def test_default_prefix(os_name, home, env, expected):
    assert I.default_prefix(os_name, home, env) == expected


@pytest.mark.parametrize("os_name, shortcut, names", [
    ("Linux", True, ["/p/start-live2diff", "/home/ann/.local/share/applications/live2diff-engine.desktop"]),
    ("Linux", False, ["/p/start-live2diff"]),
    ("Darwin", True, ["/p/start-live2diff.command", "/home/ann/Applications/Start Live2Diff.command"]),
])
def test_launcher_files(os_name, shortcut, names):
    files = I.launcher_files(os_name, "/p", "/p/venv", "/home/ann", {}, shortcut)
    assert list(files) == names
    assert " run" in files[names[0]]
    assert all(" run" in c or f'Exec="{names[0]}"' in c for c in files.values())


def cmd_expand(line: str, bat: str, env: dict[str, str]) -> str:
    """What cmd.exe makes of a quoted path in a .bat: %~dp0 is the .bat's folder with a trailing backslash,
    %VAR% the variable, %% a percent sign; then Windows resolves the '..'s."""
    import ntpath
    import re as re_

    def sub(m):
        tok = m.group(0)
        if tok == "%%":
            return "%"
        if tok == "%~dp0":
            return ntpath.dirname(bat) + "\\"
        return env[tok.strip("%")]

    return ntpath.normpath(re_.sub(r"%%|%~dp0|%[A-Za-z_]+%", sub, line))


def _quoted(content: str, line: int) -> str:
    return content.split("\r\n")[line].split('"')[1]


@pytest.mark.parametrize("user", ["ann", "José", "Dmitrij Šostakovič", "山田太郎", "Дмитрий"])
@pytest.mark.parametrize("desktop", [None, r"C:\Users\{user}\OneDrive\Desktop", r"D:\OneDrive - Contoso\Bureau"])
def test_windows_launcher_is_ascii_and_reaches_the_engine(user, desktop):
    """The launcher holds no absolute path and no byte a code page could misread: cmd.exe reads a .bat in the OEM
    code page (850, 437), Python wrote it in the ANSI one (1252); a name outside both raised UnicodeEncodeError."""
    home = rf"C:\Users\{user}"
    env = {"USERPROFILE": home, "LOCALAPPDATA": home + r"\AppData\Local", "APPDATA": home + r"\AppData\Roaming"}
    prefix = I.default_prefix("Windows", home, env)
    venv = prefix + r"\venv"
    desk = desktop.format(user=user) if desktop else None
    files = I.launcher_files("Windows", prefix, venv, home, env, True, desk)
    main_bat = prefix + r"\Start Live2Diff.bat"
    desk_bat = (desk or home + r"\Desktop") + r"\Start Live2Diff.bat"
    assert list(files) == [main_bat, desk_bat]
    for content in files.values():
        assert content.isascii() and content.encode("cp850") == content.encode("cp1252")
        assert user not in content and "C:" not in content and "D:" not in content
        assert content.startswith("@echo off\r\n") and content.endswith("\r\n")
    assert _quoted(files[main_bat], 1) == r"%~dp0venv\Scripts\live2diff-engine.exe"
    assert files[main_bat].split("\r\n")[1].endswith(" run %*")
    assert cmd_expand(_quoted(files[main_bat], 1), main_bat, env) == venv + r"\Scripts\live2diff-engine.exe"
    # The Desktop copy calls the one in the install folder, through %LOCALAPPDATA%: it works wherever the
    # Desktop is (OneDrive, another drive) and if it is moved.
    assert files[desk_bat].split("\r\n")[1] == r'call "%LOCALAPPDATA%\live2diff-engine\Start Live2Diff.bat" %*'
    assert cmd_expand(_quoted(files[desk_bat], 1), desk_bat, env) == main_bat


def test_windows_launcher_odd_prefixes():
    env = {"USERPROFILE": r"C:\Users\José", "LOCALAPPDATA": r"C:\Users\José\AppData\Local"}
    home = env["USERPROFILE"]
    # A prefix of the user's own: %USERPROFILE% reaches it.
    files = I.launcher_files("Windows", home + r"\l2d", home + r"\l2d\venv", home, env, True)
    assert files[home + r"\Desktop\Start Live2Diff.bat"].split("\r\n")[1] == r'call "%USERPROFILE%\l2d\Start Live2Diff.bat" %*'
    # A '%' in a folder name is doubled, so cmd reads it as one.
    files = I.launcher_files("Windows", r"C:\100%\l2d", r"C:\100%\l2d\venv", home, env, True)
    desk_bat = home + r"\Desktop\Start Live2Diff.bat"
    line = _quoted(files[desk_bat], 1)
    assert "%%" in line and cmd_expand(line, desk_bat, env) == r"C:\100%\l2d\Start Live2Diff.bat"
    # The short prefix offered for long paths: the Desktop copy reaches it relative to itself.
    files = I.launcher_files("Windows", r"C:\l2d", r"C:\l2d\venv", home, env, True)
    line = _quoted(files[desk_bat], 1)
    assert line.startswith("%~dp0..") and cmd_expand(line, desk_bat, env) == r"C:\l2d\Start Live2Diff.bat"
    # A venv on another drive, plain ASCII: only then an absolute path.
    files = I.launcher_files("Windows", r"C:\l2d", r"D:\envs\l2d", home, env, False)
    assert _quoted(files[r"C:\l2d\Start Live2Diff.bat"], 1) == r"D:\envs\l2d\Scripts\live2diff-engine.exe"
    # Nothing plain ASCII reaches it: one line saying what to do, not a launcher cmd.exe would misread.
    with pytest.raises(I.InstallError, match=r"--no-shortcut"):
        I.launcher_files("Windows", r"D:\Jösé\l2d", r"D:\Jösé\l2d\venv", home, env, True)
    assert list(I.launcher_files("Windows", r"D:\Jösé\l2d", r"D:\Jösé\l2d\venv", home, env, False)) == [r"D:\Jösé\l2d\Start Live2Diff.bat"]
    with pytest.raises(I.InstallError, match=r"--prefix C:\\l2d"):
        I.launcher_files("Windows", r"C:\l2d", r"D:\Jösé\venv", home, env, False)


def test_windows_desktop_from_the_known_folder_api():
    env = {"USERPROFILE": r"C:\Users\ann"}
    asked = []

    def onedrive(folder_id):
        asked.append(folder_id)
        return r"C:\Users\ann\OneDrive - Contoso\Desktop"

    def failing(folder_id):
        raise OSError("E_FAIL")

    assert I.windows_desktop(r"C:\Users\ann", env, onedrive) == r"C:\Users\ann\OneDrive - Contoso\Desktop"
    assert asked == [I.FOLDERID_DESKTOP]
    assert I.windows_desktop(r"C:\Users\ann", env, failing) == r"C:\Users\ann\Desktop"
    assert I.windows_desktop(r"C:\Users\ann", env, lambda f: None) == r"C:\Users\ann\Desktop"
    assert I.known_folder_path(I.FOLDERID_DESKTOP) is None, "no shell32 here: the fallback, not an error"


def test_folderid_desktop_guid_layout():
    """The GUID handed to SHGetKnownFolderPath, field by field as KnownFolders.h spells FOLDERID_Desktop:
    {0xB4BFCC3A, 0xDB2C, 0x424C, {0xB0, 0x29, 0x7F, 0xE9, 0x9A, 0x87, 0xC6, 0x41}}."""
    g = I._guid(I.FOLDERID_DESKTOP)
    assert (g.Data1, g.Data2, g.Data3) == (0xB4BFCC3A, 0xDB2C, 0x424C)
    assert bytes(g.Data4) == bytes([0xB0, 0x29, 0x7F, 0xE9, 0x9A, 0x87, 0xC6, 0x41])


def _plan(os_name="linux", **kw):
    opts = I.Options(prefix="/p", venv="/p/venv", repo="/repo", **kw)
    torch = I.choose_torch(os_name, "x86_64", [], {}, force_cpu=True)
    vcam = I.vcam_plan(os_name, os_release={"ID": "debian"})
    return I.build_plan(os_name, opts, torch, "/p/venv/bin/python", vcam, None, None, None, {"/p/start-live2diff": ""}, False)


def test_build_plan_cpu_no_models():
    steps = _plan(models=False)
    cmds = [s.cmd for s in steps if s.cmd]
    assert cmds[0] == ["/p/venv/bin/python", "-m", "pip", "install", "--upgrade", "torch==2.13.0"]
    assert cmds[1] == ["/p/venv/bin/python", "-m", "pip", "install", "--upgrade", "/repo"]
    assert ["/p/venv/bin/live2diff-engine", "--help"] in cmds
    assert not any("models" in c for c in cmds)
    root = [s for s in steps if s.needs_root]
    assert root and all(s.cmd[0] == "sudo" and not s.fatal for s in root), "root steps are marked, asked for, never fatal"
    assert all(s.fix for s in steps), "every step says what to do when it fails"


def test_build_plan_models_step():
    cmds = [s.cmd for s in _plan(models=True) if s.cmd]
    assert ["/p/venv/bin/live2diff-engine", "models", "download"] in cmds


def test_uninstall_plan():
    state = {"os": "linux", "venv": "/p/venv", "files": ["/h/.local/share/applications/live2diff-engine.desktop"],
             "dirs": ["/h/.config/obs-studio/scripts/live2diff-engine"], "obsws_python": "/usr/bin/python3"}
    paths, tell = I.uninstall_plan(state, "/p")
    assert paths == ["/h/.local/share/applications/live2diff-engine.desktop",
                     "/h/.config/obs-studio/scripts/live2diff-engine", "/p/venv", "/p/install-state.json"]
    assert any("modprobe.d" in t for t in tell) and any("obsws-python" in t for t in tell)


# ------------------------------------------------------------------------------------- main and the wrappers


def test_main_dry_run_and_uninstall(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    prefix = tmp_path / "prefix"
    assert I.main(["--prefix", str(prefix), "--cpu", "--no-models", "--yes", "--dry-run", "--repo", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert "== Plan" in out and "torch==2.13.0" in out
    assert not prefix.exists(), "a dry run changes nothing"
    assert I.main(["--prefix", str(prefix), "--uninstall"]) == 1  # nothing installed there: says so
    assert "nothing to uninstall" in capsys.readouterr().err
    prefix.mkdir()
    (prefix / "venv").mkdir()
    (prefix / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    launcher = tmp_path / "data" / "applications" / "live2diff-engine.desktop"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("x")
    (prefix / I.STATE_FILE).write_text(json.dumps({"os": "linux", "venv": str(prefix / "venv"), "files": [str(launcher)], "dirs": []}))
    assert I.main(["--prefix", str(prefix), "--uninstall"]) == 0
    assert not prefix.exists() and not launcher.exists()


def test_uninstall_never_removes_foreign_files(tmp_path, capsys):
    """--prefix pointing at a folder with the user's own files: only the installer's things go."""
    prefix = tmp_path / "home"
    (prefix / "venv").mkdir(parents=True)
    (prefix / "venv" / "pyvenv.cfg").write_text("")
    (prefix / "my-notes.txt").write_text("keep me")
    (prefix / I.STATE_FILE).write_text(json.dumps({"os": "linux", "venv": str(prefix / "venv"), "files": [], "dirs": []}))
    assert I.main(["--prefix", str(prefix), "--uninstall"]) == 0
    assert (prefix / "my-notes.txt").read_text() == "keep me"
    assert not (prefix / "venv").exists() and not (prefix / I.STATE_FILE).exists()


def test_main_missing_repo_says_what_to_do(tmp_path, capsys):
    assert I.main(["--prefix", str(tmp_path / "p"), "--cpu", "--repo", str(tmp_path), "--dry-run"]) == 1
    assert "--repo" in capsys.readouterr().err


def test_installer_runs_as_a_plain_script():
    """The wrappers run installer.py by path before the package is installed: standard library only."""
    res = subprocess.run([sys.executable, "-S", str(ROOT / "live2diff_engine" / "installer.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--uninstall" in res.stdout


def test_install_sh_syntax():
    assert subprocess.run(["bash", "-n", str(SH)]).returncode == 0


def test_shell_scripts_are_shellcheck_clean():
    need("shellcheck is not installed" if shutil.which("shellcheck") is None else None, "tests/system_packages.sh installs it")
    scripts = [SH, ROOT / "tests" / "system_packages.sh", ROOT / ".ci" / "run"]
    res = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_powershell_wrapper_is_small_and_documented():
    ps1 = (ROOT / "installers" / "windows" / "install.ps1").read_text()
    assert len(ps1.splitlines()) <= 70
    header = [ln for ln in ps1.splitlines() if ln.startswith("#")][:8]
    assert any("1." in ln for ln in header) and any("4." in ln for ln in header)
    bat = (ROOT / "installers" / "windows" / "install.bat").read_text()
    assert "install.ps1" in bat and "pause" in bat


def test_windows_wrappers_are_ascii():
    """Windows PowerShell 5.1 reads a .ps1 without BOM in the ANSI code page, cmd.exe a .bat in the OEM one."""
    for name in ("install.ps1", "install.bat"):
        assert (ROOT / "installers" / "windows" / name).read_bytes().isascii(), name


def _ps1_check() -> str:
    ps1 = (ROOT / "installers" / "windows" / "install.ps1").read_text()
    return re.search(r"^\$Check = '(.*)'$", ps1, re.M).group(1).replace("''", "'")


@pytest.mark.parametrize("fake, ok", [
    ({}, True),  # this interpreter: 64-bit 3.10-3.12
    ({"sys.maxsize": "(2**31 - 1)"}, False),  # what a 32-bit Python answers
    ({"sys.version_info[:2]": "(3, 13)"}, False),
    ({"sys.version_info[:2]": "(3, 9)"}, False),
])
def test_ps1_python_check(fake, ok):
    """The check install.ps1 runs in each candidate (py -3.X can return a 32-bit install), run here with this
    interpreter; a 32-bit or other-version Python is stood in for by replacing the fact it reads."""
    check = _ps1_check()
    assert '"' not in check, "Windows PowerShell 5.1 passes double quotes to python.exe unescaped"
    for fact, value in fake.items():
        assert fact in check
        check = check.replace(fact, value)
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert (res.returncode == 0) == ok
    assert res.stdout.strip() == (sys.executable if ok else "")


def test_ps1_finds_python_after_winget_and_checks_before_the_venv():
    ps1 = (ROOT / "installers" / "windows" / "install.ps1").read_text()
    winget = ps1.index("winget install -e --id Python.Python.3.11 --scope user")
    refresh = ps1.index("$env:Path = [Environment]::GetEnvironmentVariable('Path', 'Machine')")
    assert winget < refresh < ps1.index("$Python = Find-Python", refresh), "PATH is read again before looking again"
    # winget's per-user Python.Python.3.11 lands in %LOCALAPPDATA%\Programs\Python\Python311: looked at directly.
    assert r'"$env:LOCALAPPDATA\Programs\Python\Python311\python.exe"' in ps1
    for tag in ('"-$v-64"', '"-$v"'):
        assert tag in ps1
    pre = ps1.index("--preflight")
    assert pre < ps1.index("New-Item") < ps1.index("-m venv"), "nothing is made before the checks pass"


def test_preflight_checks_and_makes_nothing(tmp_path):
    prefix = tmp_path / "p"
    res = subprocess.run([sys.executable, str(ROOT / "live2diff_engine" / "installer.py"), "--prefix", str(prefix), "--preflight"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not prefix.exists()


@pytest.mark.parametrize("version, bits, says", [
    ((3, 11, 9), 64, None),
    ((3, 10, 0), 64, None),
    ((3, 12, 7), 32, "32-bit"),
    ((3, 13, 1), 64, "3.10 to 3.12"),
    ((3, 9, 18), 64, "3.10 to 3.12"),
])
def test_python_problem(version, bits, says):
    problem = I.python_problem(version, bits, r"C:\Python\python.exe")
    if says is None:
        assert problem is None
    else:
        assert says in problem and "\n" not in problem and "installer again" in problem


class FakeWinreg:
    """winreg's calls the installer makes, answering from a dict {(key path, value name): (value, type)}."""
    HKEY_LOCAL_MACHINE = 0x80000002
    REG_SZ, REG_DWORD = 1, 4

    def __init__(self, values):
        self.values = values
        self.opened = []

    def OpenKey(self, root, path):
        self.opened.append((root, path))
        if not any(k == path for k, _ in self.values):
            raise FileNotFoundError(2, "The system cannot find the file specified")
        import contextlib
        return contextlib.nullcontext(path)

    def QueryValueEx(self, key, name):
        if (key, name) not in self.values:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self.values[(key, name)]


@pytest.mark.parametrize("values, enabled", [
    ({(I.LONG_PATHS_KEY, "LongPathsEnabled"): (1, FakeWinreg.REG_DWORD)}, True),
    ({(I.LONG_PATHS_KEY, "LongPathsEnabled"): (0, FakeWinreg.REG_DWORD)}, False),  # Windows' default
    ({(I.LONG_PATHS_KEY, "Win31FileSystem"): (0, FakeWinreg.REG_DWORD)}, False),  # value not set
    ({}, False),
    ({(I.LONG_PATHS_KEY, "LongPathsEnabled"): ("1", FakeWinreg.REG_SZ)}, False),  # Windows reads a DWORD only
])
def test_windows_long_paths_enabled(values, enabled):
    reg = FakeWinreg(values)
    assert I.windows_long_paths_enabled(reg) is enabled
    assert reg.opened == [(FakeWinreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem")]
    assert I.windows_long_paths_enabled() is None, "no winreg here"


def test_torch_deepest_file_is_measured():
    """TORCH_DEEPEST covers the deepest file of the torch installed here, counted from site-packages."""
    import torch
    site = Path(torch.__file__).parent.parent
    deepest = max(len(str(p.relative_to(site))) for d in site.glob("torch*") for p in d.rglob("*"))
    assert deepest <= I.TORCH_DEEPEST


@pytest.mark.parametrize("user, long_paths, fails", [
    ("ann", False, False),
    ("annemarie.vanderberg", False, True),  # 20 characters: a common corporate account name
    ("annemarie.vanderberg", True, False),
    ("annemarie.vanderberg", None, False),  # not Windows
])
def test_long_path_problem(user, long_paths, fails):
    home = rf"C:\Users\{user}"
    env = {"LOCALAPPDATA": home + r"\AppData\Local", "SystemDrive": "C:"}
    venv = I.default_prefix("Windows", home, env) + r"\venv"
    problem = I.long_path_problem(venv, long_paths, env)
    if not fails:
        assert problem is None
        return
    assert "long paths are off" in problem and r"--prefix C:\l2d" in problem and "LongPathsEnabled" in problem
    assert "\n" not in problem
    deepest = len(venv + r"\Lib\site-packages") + 1 + I.TORCH_DEEPEST
    assert str(deepest) in problem and deepest > 259
    assert I.long_path_problem(r"C:\l2d\venv", False, env) is None, "the offered prefix fits"


def test_on_linux_with_obs_the_plan_builds_the_obs_filter_into_obs_s_plugin_folder_and_never_fatally():
    opts = I.Options("/p", "/p/venv", "/repo")
    torch = I.choose_torch("linux", "x86_64", [], {}, force_cpu=True)
    obs = {"config": "/home/u/.config/obs-studio", "flatpak": False}
    steps = I.build_plan("linux", opts, torch, "/p/venv/bin/python", None, obs, None, None, {}, False,
                         "/repo/plugin/live2diff-filter")
    cmds = [s.cmd for s in steps if s.title.startswith("OBS filter")]
    assert cmds == [
        ["cmake", "-S", "/repo/plugin/live2diff-filter", "-B", "/p/filter-build", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
         "-DL2D_USER_INSTALL=ON"],
        ["cmake", "--build", "/p/filter-build"],
        ["cmake", "--install", "/p/filter-build", "--prefix", "/home/u/.config/obs-studio/plugins"],
    ]
    assert all(not s.fatal and "libobs-dev" in s.fix or "cmake --install" in s.fix for s in steps if s.title.startswith("OBS filter"))
    flatpak = I.build_plan("linux", opts, torch, "/p/venv/bin/python", None, {**obs, "flatpak": True}, None, None, {}, False,
                           "/repo/plugin/live2diff-filter")
    assert not [s for s in flatpak if s.title.startswith("OBS filter")]
