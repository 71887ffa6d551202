"""Run a real OBS Studio (with its obs-websocket server) under Xvfb, for tests.

Usage::

    from obs_real import RealOBS, require_obs

    @pytest.mark.obs
    def test_something(tmp_path):
        require_obs()                       # skip (or fail when CI=true) without OBS
        with RealOBS(tmp_path, script=SCRIPT, script_settings={...}) as obs:
            ver = obs.client().get_version()
            ...
            obs.stop(); obs.start()         # a restart, same config and port
            assert "..." in obs.log_text()

Everything OBS reads lives under ``tmp_path`` (HOME, XDG_CONFIG_HOME, XDG_RUNTIME_DIR), so the
user's own OBS config is never touched. OBS and its Xvfb run in their own session (process group);
``stop()`` sends SIGINT to OBS (a clean shutdown: scripts are unloaded, config saved), waits for
the whole group and SIGKILLs it after ``kill_after`` seconds. An atexit hook kills any group a
crashed test left behind. Checked with Debian's OBS 29.0.2 (obs-websocket 5.1); see
shared/notes/real-obs-in-tests.md.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need

OBS_BIN = "obs"
SCENE = "Scene"
PROFILE = "Live2DiffTest"
COLLECTION = "Live2DiffTest"
# OBS 29.0.2 encoded as (major << 24) | (minor << 16) | patch; without it the auto-config wizard opens.
LAST_VERSION = (29 << 24) | (0 << 16) | 2
# Packages OBS's embedded Python needs from our environment to talk obs-websocket.
OBS_PY_PACKAGES = ("obsws_python", "websocket")

_live_groups: set[int] = set()


def _kill_leftovers() -> None:
    for pgid in list(_live_groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _live_groups.discard(pgid)


atexit.register(_kill_leftovers)


def obs_available() -> str | None:
    """None when a real OBS can be started here, else the reason it cannot."""
    if os.name != "posix" or not Path("/proc").is_dir():
        return "real-OBS tests need Linux (Xvfb, /proc)"
    if shutil.which(OBS_BIN) is None:
        return "no `obs` binary on PATH (apt-get install obs-studio)"
    if shutil.which("xvfb-run") is None:
        return "no `xvfb-run` on PATH (apt-get install xvfb xauth)"
    if shutil.which("xauth") is None:
        return "no `xauth` on PATH (xvfb-run needs it; apt-get install xauth)"
    for pkg in OBS_PY_PACKAGES:
        if importlib.util.find_spec(pkg) is None:
            return f"the Python package {pkg!r} is not installed in the test environment"
    return None


def require_obs() -> None:
    """Skip the calling test when OBS is not usable; fail instead on CI (conftest.on_ci: CI installs OBS)."""
    reason = obs_available()
    need(None if reason is None else f"OBS: {reason}")


@pytest.fixture
def obs_required():
    """Fixture form of require_obs()."""
    require_obs()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} not found")
    return Path(list(spec.submodule_search_locations)[0])


def _ini(sections: dict[str, dict[str, object]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        for k, v in values.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            out.append(f"{k}={v}")
        out.append("")
    return "\n".join(out)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in the process group ``pgid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _first_display() -> int:
    """99 (xvfb-run's own default) in a plain run; 100 apart per pytest-xdist worker (gw0, gw1, ...)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return 99 + 100 * (int(worker[2:]) + 1) if worker[2:].isdigit() else 99


class RealOBS:
    """One real OBS with its websocket server on ``port`` and (optionally) a script loaded.

    ``script_settings`` are the script's saved settings (as in the scene collection JSON).
    ``obsws_importable=False`` leaves obsws-python off OBS's Python path (the script's HTTP
    fallback). ``env_extra`` is merged into OBS's environment last.
    """

    def __init__(
        self,
        tmp_path: Path,
        password: str = "test-password-123",
        port: int | None = None,
        script: str | os.PathLike | None = None,
        script_settings: dict | None = None,
        env_extra: dict[str, str] | None = None,
        obsws_importable: bool = True,
        start_timeout: float = 60.0,
        kill_after: float = 30.0,
    ):
        self.root = Path(tmp_path) / "obs-home"
        self.password = password
        self.port = port or free_port()
        self.script = Path(script).resolve() if script else None
        self.script_settings = dict(script_settings or {})
        self.env_extra = dict(env_extra or {})
        self.obsws_importable = obsws_importable
        self.start_timeout = start_timeout
        self.kill_after = kill_after
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.home = self.root / "home"
        self.config_dir = self.home / ".config" / "obs-studio"
        self.runtime_dir = self.root / "runtime"
        self.pylib = self.root / "pylib"
        self.stdout_path = self.root / "obs-stdout.txt"
        self._write_config()

    # -- config -------------------------------------------------------------------------------

    def _write_config(self) -> None:
        cfg = self.config_dir
        (cfg / "basic" / "profiles" / PROFILE).mkdir(parents=True, exist_ok=True)
        (cfg / "basic" / "scenes").mkdir(parents=True, exist_ok=True)
        (cfg / "logs").mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)
        (cfg / "global.ini").write_text(
            _ini(
                {
                    "General": {
                        "FirstRun": True,  # in 29: "has run before"
                        "LastVersion": LAST_VERSION,
                        "Pre19Defaults": True,
                        "Pre21Defaults": True,
                        "Pre23Defaults": True,
                        "Pre24.1Defaults": True,
                        "EnableAutoUpdates": False,
                        "ConfirmOnExit": False,
                        "WarnBeforeStartingStream": False,
                    },
                    "Basic": {
                        "Profile": PROFILE,
                        "ProfileDir": PROFILE,
                        "SceneCollection": COLLECTION,
                        "SceneCollectionFile": COLLECTION,
                    },
                    "OBSWebSocket": {
                        "FirstLoad": False,
                        "ServerEnabled": True,
                        "ServerPort": self.port,
                        "AlertsEnabled": False,
                        "AuthRequired": bool(self.password),
                        "ServerPassword": self.password,
                    },
                }
            )
        )
        (cfg / "basic" / "profiles" / PROFILE / "basic.ini").write_text(
            _ini(
                {
                    "General": {"Name": PROFILE},
                    "Video": {
                        "BaseCX": 1280,
                        "BaseCY": 720,
                        "OutputCX": 1280,
                        "OutputCY": 720,
                        "FPSType": 0,
                        "FPSCommon": 30,
                    },
                    "Audio": {"SampleRate": 48000},
                    "Output": {"Mode": "Simple"},
                }
            )
        )
        modules = {}
        if self.script is not None:
            modules["scripts-tool"] = [{"path": str(self.script), "settings": self.script_settings}]
        collection = {
            "name": COLLECTION,
            "current_scene": SCENE,
            "current_program_scene": SCENE,
            "scene_order": [{"name": SCENE}],
            "sources": [
                {
                    "id": "scene",
                    "versioned_id": "scene",
                    "name": SCENE,
                    "uuid": "8c1ff4f2-6f3d-4a7b-9a49-2b7f3f2d0001",
                    "settings": {"items": [], "id_counter": 0, "custom_size": False},
                    "flags": 0,
                    "enabled": True,
                    "mixers": 0,
                }
            ],
            "groups": [],
            "transitions": [],
            "current_transition": "Fade",
            "transition_duration": 300,
            "modules": modules,
        }
        (cfg / "basic" / "scenes" / f"{COLLECTION}.json").write_text(json.dumps(collection, indent=2))
        # OBS's embedded Python (the system python3.11) gets exactly the two packages it needs
        # from our environment, linked into one folder, rather than our whole site-packages.
        if self.pylib.exists():
            shutil.rmtree(self.pylib)
        self.pylib.mkdir(parents=True)
        if self.obsws_importable:
            for pkg in OBS_PY_PACKAGES:
                os.symlink(_package_dir(pkg), self.pylib / pkg)

    def scene_collection(self) -> dict:
        """The scene collection JSON as OBS last saved it (OBS rewrites it on exit)."""
        return json.loads((self.config_dir / "basic" / "scenes" / f"{COLLECTION}.json").read_text())

    def script_saved_settings(self) -> dict:
        """The script's settings as saved in the scene collection ({} when absent)."""
        for entry in self.scene_collection().get("modules", {}).get("scripts-tool", []):
            if self.script is not None and Path(entry.get("path", "")) == self.script:
                return entry.get("settings", {})
        return {}

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")
            and not k.startswith(("QT_", "XDG_"))
        }
        env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_RUNTIME_DIR=str(self.runtime_dir),
            PYTHONPATH=str(self.pylib),
            PYTHONDONTWRITEBYTECODE="1",
            LIBGL_ALWAYS_SOFTWARE="1",
            # Never let a stray config.toml feed obsws-python anything.
            PWD=str(self.home),
        )
        env.update(self.env_extra)
        return env

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pgid(self) -> int | None:
        """The process group (session) of OBS, xvfb-run and Xvfb while started."""
        return self.proc.pid if self.proc is not None else None

    def pids(self) -> list[int]:
        """Live processes of this OBS's group (empty after stop())."""
        return group_pids(self.proc.pid) if self.proc is not None else []

    def start(self) -> "RealOBS":
        if self.running:
            raise RuntimeError("OBS is already running")
        self.starts += 1
        out = open(self.stdout_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [
                    "xvfb-run",
                    "-a",
                    # Where this search for a free display starts: apart for each pytest-xdist
                    # worker, so that two workers starting OBS at once never pick the same one.
                    "-n",
                    str(_first_display()),
                    "-s",
                    "-screen 0 1280x720x24",
                    OBS_BIN,
                    "--multi",
                    "--minimize-to-tray",
                    "--disable-missing-files-check",
                ],
                env=self.env(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # setsid: OBS, xvfb-run and Xvfb in one process group
            )
        finally:
            out.close()
        _live_groups.add(self.proc.pid)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll the websocket port until obs-websocket answers a request."""
        import obsws_python as obsws

        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"OBS exited with code {self.proc.returncode} before its websocket server answered\n"
                    + self._diagnostics()
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                cl = obsws.ReqClient(host="127.0.0.1", port=self.port, password=self.password, timeout=5)
                try:
                    cl.get_version()
                    return
                finally:
                    cl.disconnect()
            except Exception as e:  # not up yet
                last_error = f"{type(e).__name__}: {e}"
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        raise TimeoutError(
            f"obs-websocket did not answer on port {self.port} within {self.start_timeout:.0f} s "
            f"({last_error})\n" + self._diagnostics()
        )

    def _diagnostics(self) -> str:
        parts = []
        try:
            parts.append("--- OBS stdout/stderr (tail) ---\n" + self.stdout_path.read_text(errors="replace")[-3000:])
        except OSError:
            pass
        parts.append("--- OBS log (tail) ---\n" + self.log_text()[-4000:])
        return "\n".join(parts)

    def stop(self) -> int | None:
        """Clean shutdown (SIGINT to OBS), wait for the whole group, SIGKILL after kill_after s.
        Returns OBS's (xvfb-run's) exit code, or None when it was not running."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.proc.poll() is None:
            obs_pids = [p for p in group_pids(pgid) if _comm(p) == "obs"]
            try:
                if obs_pids:
                    # OBS first: xvfb-run then takes its Xvfb down by itself. Signalling Xvfb at the
                    # same time would pull the display from under OBS's clean shutdown.
                    for pid in obs_pids:
                        os.kill(pid, signal.SIGINT)
                else:
                    os.killpg(pgid, signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.kill_after
        while time.monotonic() < deadline:
            self.proc.poll()
            if not group_pids(pgid):
                break
            time.sleep(0.05)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            end = time.monotonic() + 10
            while group_pids(pgid) and time.monotonic() < end:
                time.sleep(0.05)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        _live_groups.discard(pgid)
        self.proc = None
        return code

    def restart(self) -> "RealOBS":
        self.stop()
        return self.start()

    def __enter__(self) -> "RealOBS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection ---------------------------------------------------------------------------

    def log_files(self) -> list[Path]:
        logs = self.config_dir / "logs"
        return sorted(logs.glob("*.txt"), key=lambda p: (p.stat().st_mtime, p.name)) if logs.is_dir() else []

    def log_text(self) -> str:
        """All OBS log files of this tree, oldest first (script output lands here too)."""
        return "\n".join(p.read_text(errors="replace") for p in self.log_files())

    def wait_for_log(self, needle: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until ``needle`` occurs ``count`` times in the log; returns the log text. At least a
        minute whatever ``timeout`` says: a busy machine may be slow, only a wait that never ends fails."""
        deadline = time.monotonic() + max(timeout, 60.0)
        while True:
            text = self.log_text()
            if text.count(needle) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in OBS's log within {timeout:g} s; log tail:\n{text[-4000:]}")
            time.sleep(0.1)

    def client(self, timeout: float = 10):
        """An obsws-python ReqClient to this OBS (explicit host, port and password)."""
        import obsws_python as obsws

        return obsws.ReqClient(host="127.0.0.1", port=self.port, password=self.password, timeout=timeout)

    def event_client(self, subs=None):
        """An obsws-python EventClient (default: General events, which carry CustomEvent)."""
        import obsws_python as obsws

        return obsws.EventClient(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            subs=obsws.Subs.GENERAL if subs is None else subs,
        )


@pytest.fixture
def real_obs(tmp_path):
    """A factory: real_obs(script=..., script_settings=...) -> RealOBS (started); all stopped after."""
    require_obs()
    made: list[RealOBS] = []

    def make(**kwargs) -> RealOBS:
        obs = RealOBS(tmp_path / f"obs{len(made)}", **kwargs)
        made.append(obs)
        return obs.start()

    try:
        yield make
    finally:
        for obs in made:
            obs.stop()
