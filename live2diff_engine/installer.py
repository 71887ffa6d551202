"""The installer's logic, on every OS; the wrappers in ``installers/`` only find Python and make the venv.

Run by the wrappers as ``VENV_PYTHON live2diff_engine/installer.py --prefix DIR --venv DIR ...`` (standard
library only, so it works before the package is installed). Two layers:

* pure decision functions: plain data in (OS name, arch, ``nvidia-smi`` text, env dict, home, the set of
  paths that exist, ini file texts), plans and messages out; ``tests/test_installer.py`` feeds them tables;
* ``main(argv)``: gathers those facts, prints the plan, runs the steps. Every failure is one line saying
  what went wrong and what to do next, and the exit status is non-zero. Nothing runs as root without asking:
  with ``--yes`` (no questions) commands that need root are printed, never run.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

DEFAULT_PORT = 8765
CPU_TORCH_SPEC = "torch==2.13.0"  # the CPU build these checks use; LIVE2DIFF_TORCH_SPEC overrides
INTEL_MAC_TORCH_SPEC = "torch==2.2.2 numpy<2"  # torch's last macOS x86_64 wheel, built against NumPy 1
PYTORCH_INDEX = "https://download.pytorch.org/whl"
STATE_FILE = "install-state.json"
VCAM_LABEL = "Live2Diff Camera"
VCAM_VIDEO_NR = 10

# CUDA wheel tag -> (minimum Linux driver, minimum Windows driver), newest first. 12.x wheels run on any
# driver from the 12.x minor-version-compatibility floor (525.60.13 / 528.33) but newer runtimes get their
# toolkit's own floor, so kernels JIT-compiled from PTX load too. Blackwell (RTX 50, sm_120) needs cu128.
CUDA_WHEELS: list[tuple[str, str, str]] = [
    ("cu128", "570.26", "570.65"),
    ("cu126", "560.28.03", "560.76"),
    ("cu124", "550.54.14", "551.61"),
    ("cu121", "525.60.13", "528.33"),
]
BLACKWELL_MIN_WHEEL = "cu128"
# Which compute capabilities each build has kernels for (PyTorch's RELEASE.md support matrix and its
# .ci/manywheel/build_cuda.sh, .ci/pytorch/windows/cuda12x.bat). cu128 dropped Maxwell and Pascal (sm_50,
# sm_60) in torch 2.8 and Volta (sm_70) in 2.11, and the cu128 index ends at 2.11, which an unpinned install
# gets: it starts at Turing (7.5). cu126 carries 5.0 to 9.0 (plus 6.1 on Windows) in every release that has
# it, up to torch 2.14, its last; cu124 (torch 2.4-2.6) and cu121 (2.1-2.5) carry 5.0 to 9.0 as well. A card
# runs kernels built for an older minor of its own major (a 6.1 GTX 1080 runs sm_60, a 5.2 GTX 970 sm_50).
WHEEL_MIN_CAP = {"cu128": (7, 5), "cu126": (5, 0), "cu124": (5, 0), "cu121": (5, 0)}
OLD_CARD_WHEEL = "cu126"  # for cards below 7.5 on drivers that would get cu128
MIN_CUDA_CAP = (5, 0)  # no current PyTorch CUDA build runs below Maxwell
# Names of pre-Turing cards, for the rare nvidia-smi that does not report compute_cap: GTX 9xx/10xx, the
# Maxwell/Pascal/Volta Titans, Quadro M/P/GV, Tesla M/P/V, MX1xx/2xx/330/350.
PRE_TURING_NAMES = re.compile(
    r"\bGTX\s*(9\d0|10[1-8]0)|\bTITAN\s*(X|Xp|V)\b|\bQuadro\s*(M|P|GV)\d|\bTesla\s*(M|P|V)\d|\bMX\s*(1[1-5]0|2[1-5]0|330|350)\b",
    re.I)

OBS_FLATPAK_ID = "com.obsproject.Studio"
MAC_CAMERA_EXTENSION = "com.obsproject.obs-studio.mac-camera-extension"


class InstallError(Exception):
    """One line: what went wrong and what to do next."""


# ---------------------------------------------------------------------------------------------- helpers


def normalize_os(name: str) -> str:
    """``platform.system()`` (or sys.platform) -> 'linux', 'windows' or 'macos'."""
    n = name.lower()
    if n.startswith("win") or n.startswith("cygwin") or n.startswith("msys"):
        return "windows"
    if n in ("darwin", "macos", "mac"):
        return "macos"
    if n.startswith("linux"):
        return "linux"
    return n


def version_tuple(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)
    return tuple(int(p) for p in parts)


def _join(os_name: str, *parts: str) -> str:
    cls = PureWindowsPath if os_name == "windows" else PurePosixPath
    return str(cls(*parts))


# ---------------------------------------------------------------------------------------------- GPU and torch


@dataclass(frozen=True)
class Gpu:
    name: str
    driver: str
    compute_cap: str = ""

    @property
    def cap(self) -> tuple[int, int] | None:
        """(major, minor) from nvidia-smi's compute_cap, or None when it did not report one."""
        v = version_tuple(self.compute_cap)
        return (v[0], v[1]) if len(v) >= 2 else None

    @property
    def is_blackwell(self) -> bool:
        if self.cap:
            return self.cap >= (10, 0)
        return bool(re.search(r"RTX\s*(PRO\s*)?50\d0|RTX\s*PRO\s*\d+\s*Blackwell|\bB\d00\b", self.name, re.I))

    @property
    def pre_turing(self) -> bool:
        """Below compute capability 7.5 (Maxwell, Pascal, Volta): no kernels in the cu128 builds."""
        if self.cap:
            return self.cap < WHEEL_MIN_CAP["cu128"]
        return bool(PRE_TURING_NAMES.search(self.name))

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.compute_cap})" if self.cap else self.name


def parse_nvidia_smi(text: str | None) -> list[Gpu]:
    """Parse ``nvidia-smi --query-gpu=name,driver_version[,compute_cap] --format=csv,noheader`` output."""
    gpus = []
    for line in (text or "").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not fields[0] or fields[0].lower() == "name" or not re.match(r"^\d+\.\d+", fields[1]):
            continue
        cap = fields[2] if len(fields) > 2 and re.match(r"^\d+\.\d+$", fields[2]) else ""
        gpus.append(Gpu(fields[0], fields[1], cap))
    return gpus


@dataclass
class TorchPlan:
    kind: str  # "cuda", "mps", "cpu" or "error"
    spec: str
    index_url: str | None
    wheel: str | None = None
    messages: list[str] = field(default_factory=list)

    def pip_args(self) -> list[str]:
        args = ["install", "--upgrade", *shlex.split(self.spec)]
        if self.index_url:
            args += ["--index-url", self.index_url]
        return args


def pick_cuda_wheel(os_name: str, driver: str) -> str | None:
    """The newest CUDA wheel tag this driver runs, or None when it is too old for every one."""
    col = 2 if os_name == "windows" else 1
    have = version_tuple(driver)
    for row in CUDA_WHEELS:
        if have >= version_tuple(row[col]):
            return row[0]
    return None


CPU_USES = (
    "A CPU install is good for trying the tools, checking the setup, converting video files offline and "
    "running the tests; live webcam stylising needs an NVIDIA GPU (a few frames per minute on a CPU)."
)


def choose_torch(os_name: str, arch: str, gpus: list[Gpu], env: dict[str, str], force_cpu: bool = False) -> TorchPlan:
    """Which torch build to install for this OS, CPU architecture and GPU/driver, honouring env overrides:
    TORCH_INDEX_URL (the package index, as popular Stable Diffusion UIs allow) and LIVE2DIFF_TORCH_SPEC
    (the requirement, e.g. ``torch==2.7.1``)."""
    os_name = normalize_os(os_name)
    index_override = env.get("TORCH_INDEX_URL") or None
    spec_override = env.get("LIVE2DIFF_TORCH_SPEC") or None
    arm = arch.lower() in ("arm64", "aarch64")

    if force_cpu:
        msg = ["CPU install (--cpu). " + CPU_USES]
        return TorchPlan("cpu", spec_override or CPU_TORCH_SPEC, index_override, None, msg)

    if os_name == "macos":
        if arm:
            return TorchPlan("mps", spec_override or "torch", index_override, None, [
                "Apple silicon: torch with Metal (MPS). It works but is several times slower than an RTX card; "
                "expect a low frame rate at small sizes (try --camera-size 512x512)."])
        return TorchPlan("cpu", spec_override or INTEL_MAC_TORCH_SPEC, index_override, None, [
            "Intel Mac: no supported GPU, so this is a CPU install, with torch 2.2.2 (the last build for Intel Macs) "
            "and NumPy 1, which it was built against (pyproject.toml pins the rest to match). " + CPU_USES])

    if not gpus:
        return TorchPlan("cpu", spec_override or CPU_TORCH_SPEC, index_override, None, [
            "No NVIDIA GPU found (nvidia-smi missing or it lists none): CPU install. " + CPU_USES,
            "If you do have an NVIDIA card, install its driver (https://www.nvidia.com/Download/index.aspx), "
            "check that `nvidia-smi` works, and run the installer again."])

    gpu = max(gpus, key=lambda g: version_tuple(g.driver))
    floor = CUDA_WHEELS[-1][2 if os_name == "windows" else 1]
    too_old = [g for g in gpus if g.cap and g.cap < MIN_CUDA_CAP]
    if len(too_old) == len(gpus):
        return TorchPlan("error", "", None, None, [
            f"{too_old[0].describe()} is older than every current PyTorch CUDA build supports (they start at 5.0, "
            "Maxwell): run the installer with --cpu (or use a newer card)."])
    wheel = pick_cuda_wheel(os_name, gpu.driver)
    if wheel is None:
        return TorchPlan("error", "", None, None, [
            f"NVIDIA driver {gpu.driver} is too old for current PyTorch CUDA builds (needs >= {floor}). "
            "Update the driver (https://www.nvidia.com/Download/index.aspx) and run the installer again, "
            "or run it with --cpu."])
    blackwell = [g for g in gpus if g.is_blackwell]
    if blackwell and wheel != BLACKWELL_MIN_WHEEL:
        need = dict((w, (lin, win)) for w, lin, win in CUDA_WHEELS)[BLACKWELL_MIN_WHEEL]
        return TorchPlan("error", "", None, None, [
            f"{blackwell[0].name} (RTX 50-series, Blackwell) needs CUDA 12.8, which needs driver >= "
            f"{need[1] if os_name == 'windows' else need[0]}; yours is {gpu.driver}. Update the driver "
            "(https://www.nvidia.com/Download/index.aspx) and run the installer again."])
    msgs = []
    old = [g for g in gpus if g.pre_turing and g not in too_old]
    if old and WHEEL_MIN_CAP[wheel] > MIN_CUDA_CAP:
        if blackwell:  # no one build has kernels for both: the Blackwell card wins
            msgs.append(f"{old[0].describe()} has no kernels in the {wheel} build that {blackwell[0].name} needs: "
                        f"the engine can use only the {blackwell[0].name} (if it is not GPU 0, set "
                        "CUDA_VISIBLE_DEVICES to its index).")
        else:
            msgs.append(f"{old[0].describe()}: PyTorch's {wheel} builds have no kernels below compute capability "
                        f"7.5, so this is the {OLD_CARD_WHEEL} build (kernels for 5.0 to 9.0; torch 2.14 is its last "
                        "release).")
            wheel = OLD_CARD_WHEEL
    shown = blackwell[0] if blackwell else (old[0] if old else gpu)
    msgs.insert(0, f"{shown.name}, driver {gpu.driver}: PyTorch CUDA build {wheel}.")
    for g in too_old:
        msgs.append(f"{g.describe()} is too old for any PyTorch CUDA build: the engine cannot use it.")
    if os_name == "linux" and arm:
        msgs.append("ARM Linux with an NVIDIA GPU: using PyTorch's CUDA index; if no wheel matches, set "
                    "TORCH_INDEX_URL to your platform's index (e.g. NVIDIA's Jetson wheels).")
    index = index_override or f"{PYTORCH_INDEX}/{wheel}"
    if index_override:
        msgs.append(f"Using TORCH_INDEX_URL={index_override} instead of {PYTORCH_INDEX}/{wheel}.")
    return TorchPlan("cuda", spec_override or "torch", index, wheel, msgs)


# ---------------------------------------------------------------------------------------------- virtual camera


@dataclass
class VcamPlan:
    ready: bool
    messages: list[str]
    root_commands: list[list[str]] = field(default_factory=list)  # run only after the user says yes
    persistent_files: dict[str, str] = field(default_factory=dict)  # path -> content, told, needs root


def v4l2loopback_options(label: str = VCAM_LABEL, video_nr: int = VCAM_VIDEO_NR) -> list[str]:
    return ["devices=1", f"video_nr={video_nr}", f"card_label={label}", "exclusive_caps=1"]


def v4l2loopback_install_command(os_release: dict[str, str]) -> list[str] | None:
    ids = {os_release.get("ID", "").lower(), *os_release.get("ID_LIKE", "").lower().split()}
    if ids & {"debian", "ubuntu", "linuxmint", "pop"}:
        return ["apt-get", "install", "-y", "v4l2loopback-dkms"]
    if ids & {"fedora", "rhel", "centos"}:
        return ["dnf", "install", "-y", "akmod-v4l2loopback"]  # RPM Fusion
    if ids & {"arch", "manjaro", "endeavouros"}:
        return ["pacman", "-S", "--noconfirm", "v4l2loopback-dkms"]
    if ids & {"opensuse", "suse", "opensuse-tumbleweed", "opensuse-leap"}:
        return ["zypper", "install", "-y", "v4l2loopback-kmp-default"]
    return None


MAC_DAL_PLUGIN = "/Library/CoreMediaIO/Plug-Ins/DAL/obs-mac-virtualcam.plugin"


def mac_camera_extension_state(sysext_text: str) -> str | None:
    """OBS's camera extension in ``systemextensionsctl list``: "enabled", "waiting" (installed, not yet allowed by
    the user) or None (absent, or on its way out: "[terminated waiting to uninstall on reboot]")."""
    states = []
    for line in (sysext_text or "").splitlines():
        if MAC_CAMERA_EXTENSION + " " in line or line.rstrip().endswith(MAC_CAMERA_EXTENSION):
            m = re.search(r"\[([^\]]*)\]\s*$", line)
            states.append(m.group(1) if m else "")
    if any(s_ == "activated enabled" for s_ in states):
        return "enabled"
    if any("waiting for user" in s_ for s_ in states):
        return "waiting"
    return None


def vcam_plan(
    os_name: str,
    *,
    v4l2_installed: bool = False,
    v4l2_loaded: bool = False,
    loopback_labels: tuple[str, ...] = (),
    os_release: dict[str, str] | None = None,
    obs_vcam: bool = False,
    unity_capture: bool = False,
    macos_version: str = "",
    sysext: str = "",
    dal_plugin: bool = False,
) -> VcamPlan:
    """What to do (or tell the user) so the engine has a virtual camera to write to. Facts per OS: Linux the
    v4l2loopback ones; Windows obs_vcam/unity_capture; macOS its version, ``systemextensionsctl list``'s text and
    whether OBS's old DAL plugin is there (macOS 13+ loads camera extensions only)."""
    os_name = normalize_os(os_name)
    if os_name == "linux":
        opts = v4l2loopback_options()
        modprobe = ["modprobe", "v4l2loopback", *opts]
        persist = {
            "/etc/modules-load.d/v4l2loopback.conf": "v4l2loopback\n",
            "/etc/modprobe.d/v4l2loopback.conf": "options v4l2loopback devices=1 video_nr=%d card_label=\"%s\" exclusive_caps=1\n"
            % (VCAM_VIDEO_NR, VCAM_LABEL),
        }
        persist_msg = ("To load it at every boot, create /etc/modules-load.d/v4l2loopback.conf containing "
                       "'v4l2loopback' and /etc/modprobe.d/v4l2loopback.conf containing '"
                       + persist["/etc/modprobe.d/v4l2loopback.conf"].strip() + "' (both need root).")
        if v4l2_loaded:
            if VCAM_LABEL in loopback_labels:
                return VcamPlan(True, [f"Virtual camera ready: v4l2loopback is loaded with a '{VCAM_LABEL}' device "
                                       f"(/dev/video{VCAM_VIDEO_NR} unless you set video_nr yourself)."])
            return VcamPlan(True, [
                "v4l2loopback is loaded but without a '%s' device; the engine will use the first loopback device. "
                "For Chrome/Zoom/Teams to see it, the module needs exclusive_caps=1: reload it with "
                "`sudo modprobe -r v4l2loopback && sudo %s`." % (VCAM_LABEL, shlex.join(modprobe)), persist_msg],
                [], persist)
        cmds = []
        msgs = []
        if not v4l2_installed:
            install = v4l2loopback_install_command(os_release or {})
            if install is None:
                return VcamPlan(False, [
                    "No virtual camera driver: install the v4l2loopback kernel module with your distribution's "
                    "package manager (https://github.com/umlaeute/v4l2loopback), then run "
                    f"`sudo {shlex.join(modprobe)}` and this installer again.", persist_msg], [], persist)
            cmds.append(install)
            msgs.append("No virtual camera driver: v4l2loopback is not installed.")
            if install[0] == "dnf":
                msgs.append("On Fedora akmod-v4l2loopback comes from RPM Fusion (https://rpmfusion.org/Configuration).")
        else:
            msgs.append("v4l2loopback is installed but not loaded.")
        cmds.append(modprobe)
        msgs.append(persist_msg)
        return VcamPlan(False, msgs, cmds, persist)

    if os_name == "windows":
        if obs_vcam or unity_capture:
            which = " and ".join(n for n, ok in (("OBS Virtual Camera", obs_vcam), ("Unity Capture", unity_capture)) if ok)
            return VcamPlan(True, [f"Virtual camera ready: {which} found."])
        return VcamPlan(False, [
            "No virtual camera driver found. Install OBS Studio 28 or newer (https://obsproject.com; it includes "
            "the OBS Virtual Camera; start it once from OBS with 'Start Virtual Camera'), or Unity Capture "
            "(https://github.com/schellingb/UnityCapture: run Install/Install.bat as administrator). "
            "Then run the installer again."])

    if os_name == "macos":
        state = mac_camera_extension_state(sysext)
        if state == "enabled":
            return VcamPlan(True, ["Virtual camera ready: OBS's camera extension (OBS Virtual Camera) is enabled."])
        if state == "waiting":
            return VcamPlan(False, [
                "OBS's camera extension is installed but not allowed yet: open System Settings > Privacy & Security "
                "(General > Login Items & Extensions > Camera Extensions on macOS 15 and newer), allow OBS Virtual "
                "Camera, then run the installer again."])
        modern = not macos_version or version_tuple(macos_version)[:1] >= (13,)
        if dal_plugin and not modern:
            return VcamPlan(True, [f"Virtual camera ready: OBS's DAL plugin ({MAC_DAL_PLUGIN}), which macOS "
                                   f"{macos_version} still loads."])
        install = ("Install OBS Studio 30 or newer (https://obsproject.com), open it, click 'Start Virtual Camera' once "
                   "and allow the system extension in System Settings > Privacy & Security (General > Login Items & "
                   "Extensions on newer macOS). Then run the installer again.")
        if dal_plugin:
            return VcamPlan(False, [
                f"Only OBS's old DAL plugin is here ({MAC_DAL_PLUGIN}, from OBS 29 or older), and macOS 13 and newer"
                + (f" (this is {macos_version})" if macos_version else "")
                + " load camera extensions only: the engine cannot use it. " + install
                + f" (The old plugin can go: sudo rm -r '{MAC_DAL_PLUGIN}'.)"])
        return VcamPlan(False, ["No virtual camera found. " + install])

    return VcamPlan(False, [f"No known virtual camera for OS {os_name!r}; use --sink window or file:PATH."])


# ---------------------------------------------------------------------------------------------- OBS


def obs_config_dirs(os_name: str, home: str, env: dict[str, str]) -> list[str]:
    """Where OBS keeps its settings (global.ini, user.ini, basic/...), most likely first."""
    os_name = normalize_os(os_name)
    if os_name == "windows":
        appdata = env.get("APPDATA") or _join("windows", home, "AppData", "Roaming")
        return [_join("windows", appdata, "obs-studio")]
    if os_name == "macos":
        return [_join("macos", home, "Library", "Application Support", "obs-studio")]
    xdg = env.get("XDG_CONFIG_HOME") or _join("linux", home, ".config")
    return [_join("linux", xdg, "obs-studio"), _join("linux", home, ".var", "app", OBS_FLATPAK_ID, "config", "obs-studio")]


def obs_program_paths(os_name: str, env: dict[str, str]) -> list[str]:
    os_name = normalize_os(os_name)
    if os_name == "windows":
        roots = [env.get("ProgramFiles") or r"C:\Program Files", env.get("ProgramW6432") or r"C:\Program Files"]
        return list(dict.fromkeys(_join("windows", r, "obs-studio", "bin", "64bit", "obs64.exe") for r in roots))
    if os_name == "macos":
        return ["/Applications/OBS.app"]
    return ["/usr/bin/obs", "/usr/local/bin/obs", "/var/lib/flatpak/app/" + OBS_FLATPAK_ID]


def find_obs(os_name: str, home: str, env: dict[str, str], existing: set[str]) -> dict | None:
    """Return {"config": dir, "program": path or None, "flatpak": bool} or None when OBS is not found."""
    os_name = normalize_os(os_name)
    programs = obs_program_paths(os_name, env)
    if os_name == "linux":
        programs.append(_join("linux", home, ".local", "share", "flatpak", "app", OBS_FLATPAK_ID))
    program = next((p for p in programs if p in existing), None)
    configs = obs_config_dirs(os_name, home, env)
    config = next((c for c in configs if c in existing), None)
    if program is None and config is None:
        return None
    flatpak = bool((program and OBS_FLATPAK_ID in program) or (config and OBS_FLATPAK_ID in config))
    if config is None:
        config = configs[1] if (os_name == "linux" and flatpak) else configs[0]
    return {"config": config, "program": program, "flatpak": flatpak}


def obs_script_dir(os_name: str, obs_config: str) -> str:
    """Where the installer puts the OBS script: in OBS's own settings folder, so Tools > Scripts > + finds it."""
    return _join(normalize_os(os_name), obs_config, "scripts", "live2diff-engine")


def obs_python_setting(ini_texts: dict[str, str]) -> str | None:
    """OBS's Python folder from its ini files ({file name: text}): [Python] Path64bit. OBS 31+ keeps user settings
    in user.ini, older versions in global.ini; user.ini wins."""
    for name in ("user.ini", "global.ini"):
        text = ini_texts.get(name)
        if not text:
            continue
        parser = configparser.RawConfigParser(strict=False)
        parser.optionxform = str
        try:
            parser.read_string(text.lstrip("\ufeff"))
        except configparser.Error:
            continue
        if parser.has_option("Python", "Path64bit"):
            value = parser.get("Python", "Path64bit").strip().strip('"')
            if value:
                return value
    return None


# The Pythons OBS loads, newest first: deps/obs-scripting/obs-scripting-python-import.c tries 3.12 down to 3.6
# (PY_MINOR_VERSION_MAX 12) and takes the first library it finds in the folder set in Tools > Scripts > Python
# Settings. Newer ones are looked for only to say why OBS cannot load them (python.org offers them first).
OBS_PYTHON_VERSIONS = tuple((3, m) for m in range(12, 5, -1))
NEWER_PYTHON_VERSIONS = ((3, 15), (3, 14), (3, 13))
OBS_PYTHON_ADVICE = ("a 64-bit Python 3.12 or older (OBS loads 3.6 to 3.12; python.org's download page offers "
                     "newer ones first: take a 3.12 installer)")


def obs_python_layout(os_name: str, python_home: str) -> list[tuple[tuple[int, int], str, str]]:
    """(version, the library OBS loads, the interpreter beside it) for each version, newest first (3.15 to 3.6).

    Windows: OBS's folder holds ``python3X.dll`` and ``python.exe``. macOS: OBS's folder is the one that holds
    ``Python.framework`` (``/Library/Frameworks`` for python.org's installer) and it loads
    ``Python.framework/Versions/3.X/lib/libpython3.X.dylib`` (OBS 31.0+; older ones went through
    ``Versions/Current``, the same folder for a python.org install); the interpreter is ``Versions/3.X/bin/python3.X``.
    """
    os_name = normalize_os(os_name)
    rows = []
    for major, minor in (*NEWER_PYTHON_VERSIONS, *OBS_PYTHON_VERSIONS):
        if os_name == "windows":
            rows.append(((major, minor), _join("windows", python_home, f"python{major}{minor}.dll"),
                         _join("windows", python_home, "python.exe")))
        else:
            ver = _join(os_name, python_home, "Python.framework", "Versions", f"{major}.{minor}")
            rows.append(((major, minor), _join(os_name, ver, "lib", f"libpython{major}.{minor}.dylib"),
                         _join(os_name, ver, "bin", f"python{major}.{minor}")))
    return rows


def obs_python_paths(os_name: str, python_home: str) -> list[str]:
    """Every path obs_python_interpreter looks at (main checks which exist)."""
    return list(dict.fromkeys(p for _, lib, exe in obs_python_layout(os_name, python_home) for p in (lib, exe)))


def obs_python_interpreter(os_name: str, python_home: str, existing: set[str]) -> tuple[tuple[int, int], str] | None:
    """(version, interpreter) of the Python OBS would load from python_home, or None when it loads none."""
    for version, lib, exe in obs_python_layout(os_name, python_home):
        if version in OBS_PYTHON_VERSIONS and lib in existing:
            return version, exe
    return None


PYTHON_PROBE = "import sys; print(sys.version_info[0], sys.version_info[1], sys.maxsize > 2**32)"


def parse_python_probe(text: str | None) -> dict | None:
    """``PYTHON_PROBE``'s output ("3 11 True") -> {"version": (3, 11), "bits": 64}; None when unreadable."""
    m = re.fullmatch(r"\s*(\d+) (\d+) (True|False)\s*", text or "")
    if not m:
        return None
    return {"version": (int(m.group(1)), int(m.group(2))), "bits": 64 if m.group(3) == "True" else 32}


def obs_python_home_of(os_name: str, base_prefix: str) -> str | None:
    """The folder OBS's Python Settings wants for a Python installed at base_prefix (``sys.base_prefix``):
    the folder itself on Windows, the one that holds ``Python.framework`` on macOS (None for a Python that is
    not a framework build: OBS cannot load those)."""
    os_name = normalize_os(os_name)
    if os_name == "windows":
        return base_prefix
    if os_name == "macos" and "/Python.framework/" in base_prefix.rstrip("/") + "/":
        return base_prefix.split("/Python.framework")[0] or "/"
    return None


def obs_python_suggestion(os_name: str, folder: str | None, version: tuple[int, int], bits: int,
                          existing: set[str]) -> str | None:
    """folder, when OBS would load this very Python (version, bits) from it."""
    if not folder or bits != 64:
        return None
    found = obs_python_interpreter(os_name, folder, existing)
    return folder if found and found[0] == tuple(version[:2]) and found[1] in existing else None


def obsws_plan(os_name: str, obs: dict | None, ini_texts: dict[str, str], existing: set[str],
               probe: dict | None = None, suggestion: str | None = None) -> tuple[list[str] | None, str]:
    """(command to install obsws-python into OBS's Python, or None; the message to show).

    ``existing``: which of ``obs_python_paths`` exist; ``probe``: what OBS's interpreter says of itself
    (``parse_python_probe``); ``suggestion``: a folder OBS could be pointed at (``obs_python_suggestion``)."""
    os_name = normalize_os(os_name)
    if obs is None:
        return None, "OBS not found: skipped the OBS script setup. Install OBS (https://obsproject.com) and run the installer again."
    if os_name == "linux":
        if obs["flatpak"]:
            return None, ("OBS is the Flatpak build, whose Python cannot see pip packages; the OBS script needs "
                          "obsws-python: use OBS from your distribution's packages for the script, or use the dock alone.")
        return None, ("OBS on Linux uses the system Python 3: install obsws-python for it with "
                      "`python3 -m pip install --user obsws-python` (add --break-system-packages on Debian/Ubuntu 23+).")
    then = ", restart OBS and run the installer again"
    hint = f" ({suggestion} will do)" if suggestion else ""
    home = obs_python_setting(ini_texts)
    if home is None:
        return None, ("OBS has no Python set: in OBS open Tools > Scripts > Python Settings and pick the folder of "
                      f"{OBS_PYTHON_ADVICE}{hint}{then}.")
    if os_name == "macos" and "/Python.framework" in home.rstrip("/") + "/":
        folder = home.split("/Python.framework")[0] or "/"
        return None, (f"OBS's Python setting is {home}, but OBS wants the folder that holds Python.framework: set "
                      f"Tools > Scripts > Python Settings to {folder}{then}.")
    found = obs_python_interpreter(os_name, home, existing)
    if found is None:
        newer = next((v for v, lib, _ in obs_python_layout(os_name, home) if lib in existing), None)
        if newer:
            return None, (f"OBS's Python folder {home} holds Python {newer[0]}.{newer[1]}, which OBS cannot load: install "
                          f"{OBS_PYTHON_ADVICE}{hint} and pick its folder in Tools > Scripts > Python Settings{then}.")
        lib = obs_python_layout(os_name, home)[len(NEWER_PYTHON_VERSIONS)][1]
        return None, (f"OBS's Python setting points at {home}, but no Python OBS can load is there (e.g. {lib}): pick "
                      f"the folder of {OBS_PYTHON_ADVICE}{hint} in Tools > Scripts > Python Settings{then}.")
    version, exe = found
    if exe not in existing:
        return None, (f"OBS would load Python {version[0]}.{version[1]} from {home}, but its interpreter {exe} is not "
                      f"there: reinstall that Python, or pick {OBS_PYTHON_ADVICE}{hint} in Tools > Scripts > Python "
                      f"Settings{then}.")
    if probe and probe.get("bits") != 64:
        return None, (f"OBS's Python ({exe}) is 32-bit, which 64-bit OBS cannot load: install {OBS_PYTHON_ADVICE}"
                      f"{hint} and pick its folder in Tools > Scripts > Python Settings{then}.")
    return ([exe, "-m", "pip", "install", "--upgrade", "obsws-python"],
            f"Installing obsws-python into OBS's Python {version[0]}.{version[1]} ({exe}).")


def dock_url(port: int = DEFAULT_PORT) -> str:
    return f"http://127.0.0.1:{port}/dock"


def obs_next_steps(port: int, script_path: str | None) -> list[str]:
    steps = []
    if script_path:
        steps.append(f"In OBS: Tools > Scripts > + and pick {script_path}.")
    steps.append(f"In OBS: Docks > Custom Browser Docks, name 'Live2Diff', URL {dock_url(port)}, Apply.")
    if script_path:
        steps.append("In the script's panel: 'Start engine', then 'Add engine output to scene' (a source reading the "
                     "engine's stream: no virtual camera needed, OBS's own stays free).")
    else:
        steps.append(f"Add a Media Source: uncheck 'Local File', Input {dock_url(port).rsplit('/', 1)[0]}/stream.mjpg, "
                     "Input Format mpjpeg.")
    return steps


# ---------------------------------------------------------------------------------------------- layout and launchers


def default_prefix(os_name: str, home: str, env: dict[str, str]) -> str:
    os_name = normalize_os(os_name)
    if os_name == "windows":
        return _join("windows", env.get("LOCALAPPDATA") or _join("windows", home, "AppData", "Local"), "live2diff-engine")
    if os_name == "macos":
        return _join("macos", home, "Library", "Application Support", "live2diff-engine")
    return _join("linux", env.get("XDG_DATA_HOME") or _join("linux", home, ".local", "share"), "live2diff-engine")


def venv_executable(os_name: str, venv: str, name: str) -> str:
    if normalize_os(os_name) == "windows":
        return _join("windows", venv, "Scripts", name + ".exe")
    return _join(os_name, venv, "bin", name)


# The launcher is a .bat that cmd.exe reads in the OEM code page (850, 437, ...) while Python writes text in the
# ANSI one (1252, ...): 'é' written by one is another letter to the other, and a name outside the code page
# cannot be written at all. So the .bat holds plain ASCII only and no absolute path: cmd expands %~dp0 (the
# .bat's own folder) and environment variables itself, in Unicode, at run time.
BAT_ENV_VARS = ("LOCALAPPDATA", "APPDATA", "USERPROFILE")
WINDOWS_LAUNCHER = "Start Live2Diff.bat"


def bat_path(target: str, bat_dir: str, env: dict[str, str], prefer_env: bool = False) -> str | None:
    r"""What to write in a .bat kept in bat_dir so that cmd.exe reaches target: ``%~dp0`` plus a relative path, or
    an environment variable that holds the start of target (``%LOCALAPPDATA%\...``), whichever is plain ASCII
    (prefer_env: the variable first, for a copy that may be moved, like the Desktop one); an absolute path only
    when nothing relative reaches target (another drive) and it is plain ASCII. None when no form is."""
    import ntpath

    def lit(text: str) -> str:
        return text.replace("%", "%%")

    target = ntpath.normpath(target)
    inside, up, by_env = [], [], []
    try:
        rel = ntpath.relpath(target, ntpath.normpath(bat_dir))
        (up if rel.startswith("..") else inside).append("%~dp0" + lit(rel))
    except ValueError:  # another drive
        pass
    for var in BAT_ENV_VARS:
        root = ntpath.normpath(env.get(var) or "").rstrip("\\")
        if root and root != "." and ntpath.normcase(target).startswith(ntpath.normcase(root) + "\\"):
            by_env.append(f"%{var}%" + lit(target[len(root):]))
    forms = by_env + inside + up if prefer_env else inside + by_env + up
    forms.append(lit(target))  # last: absolute, only where nothing relative reaches it (another drive)
    return next((f for f in forms if f.isascii()), None)


FOLDERID_DESKTOP = "B4BFCC3A-DB2C-424C-B029-7FE99A87C641"


def _guid(text: str):
    """A Windows GUID structure (ctypes) for a known-folder id."""
    import ctypes
    import uuid

    class GUID(ctypes.Structure):
        _fields_ = [("Data1", ctypes.c_uint32), ("Data2", ctypes.c_uint16), ("Data3", ctypes.c_uint16),
                    ("Data4", ctypes.c_ubyte * 8)]

    return GUID.from_buffer_copy(uuid.UUID(text).bytes_le)


def known_folder_path(folder_id: str) -> str | None:
    r"""SHGetKnownFolderPath(folder_id): where Windows really keeps that folder (the Desktop may be redirected into
    OneDrive or onto another drive). None off Windows or when the call fails."""
    try:
        import ctypes
        from ctypes import wintypes

        shell32, ole32 = ctypes.windll.shell32, ctypes.windll.ole32
    except (ImportError, AttributeError, OSError):
        return None
    shell32.SHGetKnownFolderPath.argtypes = [ctypes.c_void_p, wintypes.DWORD, wintypes.HANDLE, ctypes.POINTER(ctypes.c_wchar_p)]
    shell32.SHGetKnownFolderPath.restype = ctypes.c_long
    ole32.CoTaskMemFree.argtypes = [ctypes.c_void_p]
    guid = _guid(folder_id)
    out = ctypes.c_wchar_p()
    hr = shell32.SHGetKnownFolderPath(ctypes.byref(guid), 0, None, ctypes.byref(out))
    try:
        return out.value if hr == 0 and out.value else None
    finally:
        ole32.CoTaskMemFree(ctypes.cast(out, ctypes.c_void_p))  # freed whether the call succeeded or not


def windows_desktop(home: str, env: dict[str, str], known_folder=known_folder_path) -> str:
    r"""The user's real Desktop folder: the known-folder API, else %USERPROFILE%\Desktop."""
    try:
        found = known_folder(FOLDERID_DESKTOP)
    except OSError:
        found = None
    return found or _join("windows", env.get("USERPROFILE") or home, "Desktop")


def launcher_files(os_name: str, prefix: str, venv: str, home: str, env: dict[str, str], shortcut: bool = True,
                   desktop: str | None = None) -> dict[str, str]:
    r"""{path: content} for the start launcher in the prefix and (shortcut=True) a menu/desktop entry.
    desktop: the Windows Desktop folder (``windows_desktop()``; %USERPROFILE%\Desktop when not given)."""
    os_name = normalize_os(os_name)
    exe = venv_executable(os_name, venv, "live2diff-engine")
    files = {}
    if os_name == "windows":
        main_bat = _join("windows", prefix, WINDOWS_LAUNCHER)
        to_exe = bat_path(exe, prefix, env)
        if to_exe is None:
            raise InstallError(f"the launcher cannot reach {exe} in plain ASCII (cmd.exe would misread the name): "
                               r"install into a folder whose path is plain ASCII, e.g. --prefix C:\l2d")
        files[main_bat] = f'@echo off\r\n"{to_exe}" run %*\r\nif errorlevel 1 pause\r\n'
        if shortcut:
            desk = desktop or _join("windows", env.get("USERPROFILE") or home, "Desktop")
            to_main = bat_path(main_bat, desk, env, prefer_env=True)
            if to_main is None:
                raise InstallError(f"the Desktop launcher cannot reach {main_bat} in plain ASCII (cmd.exe would misread "
                                   r"the name): run the installer with --no-shortcut, or with a plain-ASCII --prefix, e.g. C:\l2d")
            files[_join("windows", desk, WINDOWS_LAUNCHER)] = f'@echo off\r\ncall "{to_main}" %*\r\n'
        return files
    sh = f'#!/bin/sh\nexec "{exe}" run "$@"\n'
    if os_name == "macos":
        files[_join("macos", prefix, "start-live2diff.command")] = sh
        if shortcut:
            files[_join("macos", home, "Applications", "Start Live2Diff.command")] = sh
        return files
    launcher = _join("linux", prefix, "start-live2diff")
    files[launcher] = sh
    if shortcut:
        data = env.get("XDG_DATA_HOME") or _join("linux", home, ".local", "share")
        files[_join("linux", data, "applications", "live2diff-engine.desktop")] = (
            "[Desktop Entry]\nType=Application\nName=Live2Diff Engine\nComment=Stylised virtual webcam\n"
            f'Exec="{launcher}"\nTerminal=true\nCategories=AudioVideo;Video;\n')
    return files


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Step:
    title: str
    cmd: list[str] | None = None  # a subprocess to run
    action: str | None = None  # or a named in-process action
    needs_root: bool = False
    fix: str = ""  # what to do if it fails
    fatal: bool = True  # False: a failure is reported and the install goes on
    data: dict = field(default_factory=dict)


@dataclass
class Options:
    prefix: str
    venv: str
    repo: str
    cpu: bool = False
    models: bool = True
    vcam: bool = True
    obs: bool = True
    shortcut: bool = True
    port: int = DEFAULT_PORT


def build_plan(os_name: str, opts: Options, torch: TorchPlan, python: str, vcam: VcamPlan | None,
               obs: dict | None, obs_scripts_src: str | None, obsws_cmd: list[str] | None,
               launchers: dict[str, str], upgrade: bool, filter_src: str | None = None) -> list[Step]:
    """The ordered steps; nothing here touches the machine. ``filter_src``: plugin/live2diff-filter,
    built and installed into OBS's per-user plugin folder (Linux, OBS from the distribution)."""
    os_name = normalize_os(os_name)
    pip = [python, "-m", "pip"]
    steps = [Step(f"{'Upgrade' if upgrade else 'Install'} torch ({torch.kind}: {torch.spec}"
                  + (f" from {torch.index_url}" if torch.index_url else "") + ")",
                  cmd=pip + torch.pip_args(),
                  fix="check your internet connection (or TORCH_INDEX_URL / LIVE2DIFF_TORCH_SPEC) and run the installer again")]
    steps.append(Step(f"{'Upgrade' if upgrade else 'Install'} live2diff-engine from {opts.repo}",
                      cmd=pip + ["install", "--upgrade", opts.repo],
                      fix="read pip's message above; run the installer again once fixed"))
    exe = venv_executable(os_name, opts.venv, "live2diff-engine")
    steps.append(Step("Check the engine command starts", cmd=[exe, "--help"], action="quiet",
                      fix="run the installer again; if it persists, delete " + opts.venv + " and retry"))
    if opts.models:
        steps.append(Step("Download the default models (resumes where it stopped; skip with --no-models)",
                          cmd=[exe, "models", "download"],
                          fix="run the installer again to resume, or later `live2diff-engine models download`"))
    if vcam is not None and not vcam.ready:
        for c in vcam.root_commands:
            steps.append(Step("Virtual camera: " + shlex.join(c), cmd=["sudo", *c] if os_name != "windows" else c,
                              needs_root=True, fatal=False, fix="run it yourself later: sudo " + shlex.join(c)))
    if obs is not None and opts.obs:
        if obs_scripts_src:
            steps.append(Step("Copy the OBS script to " + obs_script_dir(os_name, obs["config"]), action="copy_obs_scripts",
                              data={"src": obs_scripts_src, "dst": obs_script_dir(os_name, obs["config"])},
                              fix="copy the obs_scripts folder yourself and add it in Tools > Scripts"))
        if obsws_cmd:
            steps.append(Step("Install obsws-python into OBS's Python", cmd=obsws_cmd, fatal=False,
                              fix="run `" + shlex.join(obsws_cmd) + "` yourself (close OBS first)"))
        if filter_src and os_name == "linux" and not obs.get("flatpak"):
            steps.extend(filter_steps(filter_src, str(Path(opts.prefix, "filter-build")), obs["config"]))
    if launchers:
        steps.append(Step("Create the start launcher", action="write_launchers", data={"files": launchers},
                          fix="start it yourself with " + exe + " run"))
    return steps


FILTER_FIX = ("install CMake, a C compiler and OBS's headers (Debian/Ubuntu: sudo apt-get install cmake gcc make "
              "libobs-dev; Fedora: sudo dnf install cmake gcc obs-studio-devel) and run the installer again; the "
              "engine works without the filter (Media Source)")


def filter_steps(src: str, build: str, obs_config: str) -> list[Step]:
    """Build the native OBS filter with CMake and install it where OBS looks for a user's plugins
    (OBS_CONFIG/plugins/live2diff-filter/{bin/64bit,data}). Not fatal: the Media Source path stays."""
    return [
        Step("OBS filter: configure (CMake, libobs)", cmd=["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                                                        "-DL2D_USER_INSTALL=ON"], fatal=False, fix=FILTER_FIX),
        Step("OBS filter: build", cmd=["cmake", "--build", build], fatal=False, fix=FILTER_FIX),
        Step("OBS filter: install into " + _join("linux", obs_config, "plugins", "live2diff-filter"),
             cmd=["cmake", "--install", build, "--prefix", _join("linux", obs_config, "plugins")], fatal=False,
             fix="install it yourself: cmake --install " + build + " --prefix " + _join("linux", obs_config, "plugins"),
             data={"installs": _join("linux", obs_config, "plugins", "live2diff-filter")}),
    ]


def uninstall_plan(state: dict, prefix: str) -> tuple[list[str], list[str]]:
    """(paths to remove, things to tell the user) from the state file the installer wrote."""
    # Only what the installer made, then the prefix itself when it is left empty: never the prefix wholesale
    # (someone may have passed --prefix ~).
    state_file = str(Path(prefix, STATE_FILE))
    paths = list(dict.fromkeys([*state.get("files", []), *state.get("dirs", []), state.get("venv", ""), state_file]))
    paths = [p for p in paths if p]
    tell = ["Downloaded models stay in the Hugging Face cache (~/.cache/huggingface/hub); delete them there if you want the space back."]
    if state.get("os") == "linux":
        tell.append("The v4l2loopback module and any /etc/modules-load.d/v4l2loopback.conf or "
                    "/etc/modprobe.d/v4l2loopback.conf you created stay; remove them with sudo if unwanted.")
    if state.get("obsws_python"):
        tell.append("obsws-python stays in OBS's Python (" + state["obsws_python"] + "); `-m pip uninstall obsws-python` removes it.")
    return paths, tell


# ---------------------------------------------------------------------------------------------- before the venv


PYTHON_RANGE = ((3, 10), (3, 12))
# The deepest file torch's wheel installs, counted from site-packages: 173 characters in torch 2.13.0 (a licence,
# torch-2.13.0+cpu.dist-info/licenses/third_party/kineto/.../duktape-1.8.0/LICENSE.txt), a few more for a longer
# version tag (+cu126).
TORCH_DEEPEST = 180
WINDOWS_MAX_PATH = 259  # MAX_PATH, 260 with the terminating NUL
LONG_PATHS_KEY = r"SYSTEM\CurrentControlSet\Control\FileSystem"


def python_problem(version: tuple[int, ...], bits: int, executable: str) -> str | None:
    """One line when this Python cannot run the engine: the wrong version, or 32-bit (torch has no 32-bit
    wheels; on Windows ``py -3.11`` can return a 32-bit install)."""
    lo, hi = PYTHON_RANGE
    v = ".".join(map(str, version[:2]))
    if not lo <= tuple(version[:2]) <= hi:
        return (f"{executable} is Python {v}; live2diff-engine needs a 64-bit Python 3.10 to 3.12: install one "
                "and run the installer again")
    if bits != 64:
        return (f"{executable} is a 32-bit Python {v}, and torch has no 32-bit builds: install the 64-bit Python "
                f"{v} (python.org: 'Windows installer (64-bit)') and run the installer again")
    return None


def windows_long_paths_enabled(winreg=None) -> bool | None:
    r"""HKLM\SYSTEM\CurrentControlSet\Control\FileSystem LongPathsEnabled == 1; False when it is not set (the
    default); None off Windows (no winreg)."""
    if winreg is None:
        try:
            import winreg
        except ImportError:
            return None
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, LONG_PATHS_KEY) as key:
            value, kind = winreg.QueryValueEx(key, "LongPathsEnabled")
    except OSError:
        return False
    return kind == winreg.REG_DWORD and value == 1


def long_path_problem(venv: str, long_paths: bool | None, env: dict[str, str]) -> str | None:
    """One line when pip would fail with WinError 206 (path too long) unpacking torch into venv: long paths off
    and torch's deepest file past 259 characters. It offers a short prefix on the system drive."""
    if long_paths is None or long_paths:
        return None
    deepest = len(_join("windows", venv, "Lib", "site-packages")) + 1 + TORCH_DEEPEST
    if deepest <= WINDOWS_MAX_PATH:
        return None
    short = (env.get("SystemDrive") or "C:") + r"\l2d"
    return (f"Windows long paths are off, and torch's files would reach {deepest} characters under {venv} (Windows "
            f"stops at {WINDOWS_MAX_PATH + 1}): run install.bat --prefix {short} (a short folder), or turn long paths "
            r"on (PowerShell as administrator: Set-ItemProperty HKLM:\SYSTEM\CurrentControlSet\Control\FileSystem "
            "LongPathsEnabled 1) and run install.bat again")


# ---------------------------------------------------------------------------------------------- gathering facts


def _run_text(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def detect_gpus() -> list[Gpu]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"])
    if out is None:  # drivers before ~510 do not know compute_cap
        out = _run_text(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    return parse_nvidia_smi(out)


def read_os_release() -> dict[str, str]:
    out = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                out[k] = v.strip().strip('"')
    except OSError:
        pass
    return out


def linux_vcam_facts() -> dict:
    labels = []
    for name in Path("/sys/devices/virtual/video4linux").glob("video*/name"):
        try:
            labels.append(name.read_text().strip())
        except OSError:
            pass
    installed = Path("/sys/module/v4l2loopback").exists() or _run_text(["modinfo", "v4l2loopback"]) is not None
    return {"v4l2_installed": installed, "v4l2_loaded": Path("/sys/module/v4l2loopback").exists(),
            "loopback_labels": tuple(labels), "os_release": read_os_release()}


def windows_vcam_facts(env: dict[str, str]) -> dict:
    obs = False
    unity = False
    for root in {env.get("ProgramFiles", r"C:\Program Files"), env.get("ProgramW6432", r"C:\Program Files")}:
        obs |= Path(root, "obs-studio", "data", "obs-plugins", "win-dshow", "obs-virtualcam-module64.dll").exists()
    out = _run_text(["reg", "query", r"HKCR\CLSID", "/s", "/f", "UnityCapture", "/d"]) or ""
    unity = "UnityCapture" in out or "Unity Video Capture" in out
    return {"obs_vcam": obs, "unity_capture": unity}


def macos_vcam_facts() -> dict:
    return {"macos_version": platform.mac_ver()[0], "sysext": _run_text(["systemextensionsctl", "list"]) or "",
            "dal_plugin": Path(MAC_DAL_PLUGIN).exists()}


# ---------------------------------------------------------------------------------------------- main


def _ask(question: str, assume_yes: bool) -> bool:
    if assume_yes or not sys.stdin.isatty():
        return False
    try:
        return input(question + " [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _fail(msg: str, code: int = 1) -> int:
    print(f"live2diff-engine installer: error: {msg}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="live2diff-engine-installer", description="Install, upgrade or uninstall live2diff-engine.")
    p.add_argument("--prefix", help="install folder (default: per-user data folder)")
    p.add_argument("--venv", help="the virtual environment (default PREFIX/venv; the wrappers make it)")
    p.add_argument("--repo", help="project source to install (default: this checkout)")
    p.add_argument("--cpu", action="store_true", help="CPU build of torch (torch==2.13.0 unless LIVE2DIFF_TORCH_SPEC)")
    p.add_argument("--no-models", action="store_true", help="skip the model download")
    p.add_argument("--no-vcam", action="store_true", help="skip the virtual camera setup")
    p.add_argument("--no-obs", action="store_true", help="skip the OBS setup")
    p.add_argument("--no-shortcut", action="store_true", help="no menu/desktop entry (the launcher in PREFIX is still made)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"control/dock port (default {DEFAULT_PORT})")
    p.add_argument("--yes", "-y", action="store_true", help="no questions; steps that need root are printed, never run")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--uninstall", action="store_true", help="remove what the installer added")
    p.add_argument("--preflight", action="store_true",
                   help="only check this Python and (Windows) the path length for PREFIX; the wrappers run it before making the venv")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a path outside the console's code page must not stop the install
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    os_name = normalize_os(platform.system())
    env = dict(os.environ)
    home = str(Path.home())
    prefix = str(Path(args.prefix or default_prefix(os_name, home, env)).expanduser().resolve())
    venv = str(Path(args.venv).resolve()) if args.venv else str(Path(prefix, "venv"))
    repo = str(Path(args.repo).resolve()) if args.repo else str(Path(__file__).resolve().parent.parent)
    state_path = Path(prefix, STATE_FILE)

    if args.uninstall:
        return _uninstall(state_path, prefix, args.yes)

    long_paths = windows_long_paths_enabled() if os_name == "windows" else None
    problems = [python_problem(sys.version_info, 64 if sys.maxsize > 2**32 else 32, sys.executable),
                long_path_problem(venv, long_paths, env)]
    problem = next(filter(None, problems), None)
    if problem:
        return _fail(problem)
    if args.preflight:
        return 0
    if not Path(repo, "pyproject.toml").exists():
        return _fail(f"no project found at {repo}; run the installer from the live2diff-engine folder or pass --repo DIR")
    upgrade = state_path.exists()
    opts = Options(prefix, venv, repo, args.cpu, not args.no_models, not args.no_vcam, not args.no_obs, not args.no_shortcut, args.port)
    gpus = [] if args.cpu else detect_gpus()
    torch = choose_torch(os_name, platform.machine(), gpus, env, force_cpu=args.cpu)
    print("== live2diff-engine installer" + (" (upgrade in place)" if upgrade else ""))
    for m in torch.messages:
        print("  " + m)
    if torch.kind == "error":
        return 1

    vcam = None
    if opts.vcam:
        facts = (linux_vcam_facts() if os_name == "linux" else windows_vcam_facts(env) if os_name == "windows"
                 else macos_vcam_facts() if os_name == "macos" else {})
        vcam = vcam_plan(os_name, **facts)
        for m in vcam.messages:
            print("  " + m)

    obs = obs_src = obsws_cmd = None
    obs_msg = ""
    if opts.obs:
        cands = obs_config_dirs(os_name, home, env) + obs_program_paths(os_name, env)
        if os_name == "linux":
            cands.append(_join("linux", home, ".local", "share", "flatpak", "app", OBS_FLATPAK_ID))
        existing = {c for c in cands if Path(c).exists()}
        if os_name == "linux" and shutil.which("obs"):
            existing.add("/usr/bin/obs")
        obs = find_obs(os_name, home, env, existing)
        ini = {}
        if obs:
            for name in ("user.ini", "global.ini"):
                try:
                    ini[name] = Path(obs["config"], name).read_text(encoding="utf-8-sig", errors="replace")
                except OSError:
                    pass
        probe = suggestion = None
        py_home = obs_python_setting(ini) if obs else None
        if py_home and os_name in ("windows", "macos"):
            existing |= {p for p in obs_python_paths(os_name, py_home) if Path(p).exists()}
            found = obs_python_interpreter(os_name, py_home, existing)
            if found and found[1] in existing:
                probe = parse_python_probe(_run_text([found[1], "-c", PYTHON_PROBE]))
        own = obs_python_home_of(os_name, _join(os_name, sys.base_prefix)) if obs else None
        if own and own != py_home:  # the Python running this installer, offered when OBS could load it
            existing |= {p for p in obs_python_paths(os_name, own) if Path(p).exists()}
            suggestion = obs_python_suggestion(os_name, own, sys.version_info[:2], 64 if sys.maxsize > 2**32 else 32, existing)
        obsws_cmd, obs_msg = obsws_plan(os_name, obs, ini, existing, probe, suggestion)
        print("  " + obs_msg)
        src = Path(repo, "obs_scripts")
        if obs and src.is_dir():
            obs_src = str(src)
        elif obs:
            print("  This version has no obs_scripts/ folder yet: no OBS script to install (the dock works without it).")

    try:
        desktop = windows_desktop(home, env) if os_name == "windows" and opts.shortcut else None
        launchers = launcher_files(os_name, prefix, venv, home, env, opts.shortcut, desktop)
    except InstallError as e:
        return _fail(str(e))
    python = venv_executable(os_name, venv, "python")
    if not Path(python).exists():
        python = sys.executable
    filter_src = Path(repo, "plugin", "live2diff-filter")
    if not filter_src.is_dir() or not obs or not opts.obs:
        filter_src = None
    elif os_name != "linux":
        print("  The native OBS filter (plugin/live2diff-filter) is built with CMake against OBS's SDK on this OS; "
              "see the README, 'Inside OBS: the Live2Diff filter'. The Media Source path works without it.")
        filter_src = None
    elif not shutil.which("cmake") or not (shutil.which("cc") or shutil.which("gcc")):
        print("  Not building the native OBS filter: " + FILTER_FIX)
        filter_src = None
    steps = build_plan(os_name, opts, torch, python, vcam, obs, obs_src, obsws_cmd, launchers, upgrade,
                       str(filter_src) if filter_src else None)
    print("== Plan")
    for i, s in enumerate(steps, 1):
        print(f"  {i}. {s.title}" + ("  [needs root: will ask]" if s.needs_root else ""))
    if args.dry_run:
        return 0

    Path(prefix).mkdir(parents=True, exist_ok=True)
    state = {"os": os_name, "venv": venv, "files": [], "dirs": [], "torch": torch.spec, "torch_kind": torch.kind}
    if state_path.exists():
        try:
            old = json.loads(state_path.read_text())
            state["files"] = old.get("files", [])
            state["dirs"] = old.get("dirs", [])
        except (OSError, ValueError):
            pass
    told_persist = False
    for i, s in enumerate(steps, 1):
        print(f"== [{i}/{len(steps)}] {s.title}", flush=True)
        if s.needs_root:
            if not _ask(f"This needs root (sudo): {shlex.join(s.cmd)}. Run it now?", args.yes):
                print(f"  Skipped. To do it yourself: sudo {shlex.join(s.cmd[1:] if s.cmd[0] == 'sudo' else s.cmd)}")
                if vcam is not None and not told_persist:
                    told_persist = True
                    for path, content in vcam.persistent_files.items():
                        print(f"  (persistent: {path}: {content.strip()})")
                continue
        try:
            if s.cmd:
                res = subprocess.run(s.cmd, capture_output=s.action == "quiet", text=True)
                if res.returncode != 0:
                    if not s.fatal:
                        print(f"  Failed (exit {res.returncode}); not fatal. Next: {s.fix}")
                        continue
                    return _fail(f"step '{s.title}' failed (exit {res.returncode}); next: {s.fix}")
                if obsws_cmd and s.cmd == obsws_cmd:
                    state["obsws_python"] = obsws_cmd[0]
                if "installs" in s.data:  # the OBS filter's folder: removed by --uninstall
                    state["dirs"] = sorted(set(state["dirs"]) | {s.data["installs"]})
            elif s.action == "copy_obs_scripts":
                Path(s.data["dst"]).mkdir(parents=True, exist_ok=True)
                for f in Path(s.data["src"]).glob("*.py"):
                    if not f.name.startswith("__"):  # the script, not the package marker
                        shutil.copy2(f, Path(s.data["dst"], f.name))
                state["dirs"] = sorted(set(state["dirs"]) | {s.data["dst"]})
            elif s.action == "write_launchers":
                for path, content in s.data["files"].items():
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    # .bat: plain ASCII by construction (launcher_files), so no code page can misread it
                    Path(path).write_text(content, encoding="ascii" if os_name == "windows" else "utf-8", newline="")
                    if os_name != "windows":
                        Path(path).chmod(0o755)
                    state["files"] = sorted(set(state["files"]) | {path})
        except OSError as e:
            return _fail(f"step '{s.title}' failed: {e}; next: {s.fix}")
        state_path.write_text(json.dumps(state, indent=2))

    state_path.write_text(json.dumps(state, indent=2))
    print("== Done.")
    print(f"  Start it: {next(iter(launchers))}  (or {venv_executable(os_name, venv, 'live2diff-engine')} run)")
    if not opts.models:
        print("  Models not downloaded (--no-models): run `live2diff-engine models download` before the first start.")
    if obs is not None and opts.obs:
        script = None
        if obs_src:
            found = Path(obs_script_dir(os_name, obs["config"]), "live2diff_obs.py")
            script = str(found) if found.exists() else obs_script_dir(os_name, obs["config"])
        for line in obs_next_steps(opts.port, script):
            print("  " + line)
    print(f"  Uninstall: run the installer again with --uninstall --prefix {prefix}")
    return 0


def _uninstall(state_path: Path, prefix: str, assume_yes: bool) -> int:
    if not state_path.exists():
        return _fail(f"nothing to uninstall: {state_path} not found; pass the --prefix you installed into")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        return _fail(f"cannot read {state_path} ({e}); delete {prefix} by hand")
    paths, tell = uninstall_plan(state, prefix)
    print("== Uninstall: removing")
    for p in paths:
        print("  " + p)
    for p in paths:
        try:
            if Path(p).is_dir() and not Path(p).is_symlink():
                if p == state.get("venv") and not Path(p, "pyvenv.cfg").exists():
                    print(f"  {p} kept: it is not a virtual environment.")
                    continue
                shutil.rmtree(p)
            elif Path(p).exists() or Path(p).is_symlink():
                Path(p).unlink()
        except OSError as e:
            return _fail(f"could not remove {p} ({e}); close programs using it (OBS, the engine) and run --uninstall again")
    try:
        Path(prefix).rmdir()  # only when empty
    except OSError:
        print(f"  {prefix} kept: it holds files the installer did not make.")
    for t in tell:
        print("  " + t)
    print("== Uninstalled.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
