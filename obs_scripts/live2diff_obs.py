"""Live2Diff control for OBS Studio: add this file in Tools > Scripts.

It talks to the Live2Diff engine in one of two ways, picked by itself:

* obs-websocket (when ``obsws_python`` can be imported by OBS's Python): commands go out as
  CustomEvents (``BroadcastCustomEvent``); the engine, connected to the same OBS, answers with
  status and reply CustomEvents.
* the engine's local HTTP API (standard library only): ``GET /api/status`` every second,
  ``POST /api/command``. Used when obsws-python is missing, when the websocket path fails (no
  password, wrong password, server off), and when the engine is not seen over obs-websocket but
  answers over HTTP.

Threads: every network call runs on one worker thread fed by a queue; obsws-python's EventClient
runs its own listener thread. Neither ever calls into OBS (OBS's Python log hook is only safe from
OBS's own callbacks): they leave log lines and the latest status in memory, and a ``timer_add``
callback (250 ms) writes the log lines. The settings shown in the Scripts window (status text,
style list, strength) are refreshed from the latest status whenever OBS rebuilds the properties
(opening the script, or any of its buttons, which all ask OBS for a refresh).

OBS's Live2Diff source (a Media Source reading the engine's stream) is kept reading by the script
too, whoever started the engine: OBS 29's Media Source gives up for good after one failed
reconnect, so an engine restarted without its own OBS link (``run`` without ``--obs``, e.g. in a
terminal) left it black. When an engine (re)appears on the API URL, or OBS has read nothing from it
for a few seconds, the script re-opens the source through OBS's own API (SourceKeeper), and says
"OBS source not pulling the stream" meanwhile. An engine with its own OBS link does this itself.

The engine process ("Start engine") runs in its own process group and keeps running when the script
is reloaded (the handle survives Python's module reload). Its output reaches OBS through its local
stream (the Live2Diff source reads http://127.0.0.1:8765/stream.mjpg), so it publishes no virtual
camera unless "Also publish a virtual camera" is on: on Windows and macOS that camera would take OBS's
own Virtual Camera. It is stopped by "Stop engine" and, if "Stop the engine when OBS exits" is on
(default), when OBS exits: first a ``quit`` through its local API (only this machine may send it;
the engine then stops as on Ctrl-C, closing its outputs), then the platform's stop signal (SIGINT to
its group; CTRL_BREAK on Windows, which reaches it only from a shared console: OBS has none), then
terminate and kill, each with a bounded wait. An engine started some other way is never stopped by
the script: the quit names the instance the script started (LIVE2DIFF_INSTANCE in its environment).

If it fails, the panel and OBS's log give its own reason (its last error line, from its log
file); while it loads, the panel says "starting", not "offline".

Passwords and tokens are never logged. Everything below the OBS section runs without OBS (tests).
"""

from __future__ import annotations

import atexit
import collections
import configparser
import http.client
import ipaddress
import itertools
import json
import logging
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser

try:  # Inside OBS.
    import obspython as obs  # type: ignore
except ImportError:  # Imported by tests or tools.
    obs = None

try:
    import obsws_python  # type: ignore
except Exception:  # Not installed for OBS's Python: the HTTP API is used.
    obsws_python = None

APP = "live2diff"
VERSION = 1
DEFAULT_API_URL = "http://127.0.0.1:8765"
DEFAULT_ENGINE_COMMAND = "live2diff-engine run --obs"  # the sink is added at start (engine_output_args)
INSTANCE_ENV = "LIVE2DIFF_INSTANCE"  # names the engine the script started (the engine's quit checks it)
DEFAULT_WS_PORT = 4455
LOG_PREFIX = "[live2diff]"
STATUS_STALE_S = 3.5  # no status for this long: the engine is not seen on that path
HTTP_POLL_S = 1.0
WS_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 5.0)
WS_BACKOFF_AUTH_S = 15.0  # no or wrong password: retry slowly (a new setting retries at once)
HTTP_TIMEOUT_S = 3.0
SEED_MAX_UI = 2**31 - 1
PAUSE_CONFIRM_S = 5.0  # the Pause/Resume button shows the state asked for until the engine confirms it
MAX_PROMPT_CHARS = 1000
MAX_TRANSITION_S = 10.0  # the engine's limit for transition_s (seconds)
PICTURE_MAX_BYTES = 8 * 1024 * 1024  # the engine's cap for a style picture (POST /api/style-image)
PICTURE_UPLOAD_TIMEOUT_S = 120.0  # the engine answers once the picture steers its stream

HOTKEYS = (  # (name used by OBS, e.g. for obs-websocket's TriggerHotkeyByName; description)
    ("live2diff.apply_prompt", "Live2Diff: apply prompt (with the transition set)"),
    ("live2diff.apply_prompt_now", "Live2Diff: apply prompt at once (no transition)"),
    ("live2diff.next_style", "Live2Diff: next style"),
    ("live2diff.previous_style", "Live2Diff: previous style"),
    ("live2diff.pause_resume", "Live2Diff: pause/resume"),
    ("live2diff.reset", "Live2Diff: reset"),
)

LINK_WS = "obs-websocket"
LINK_HTTP = "HTTP API"
SOURCE_NAME = "Live2Diff"  # the source the engine adds to OBS (live2diff_engine/control/obs.py)
MIXER_CHECK_EVERY = 4  # timer ticks (of 250 ms) between looks at that source's Audio Mixer strip
SOURCE_STALE_S = 3.0  # OBS's source has read nothing for this long while the engine runs: not pulling
SOURCE_KICK_EVERY_S = 10.0  # re-open it at most this often (as the engine's own OBS link does)
# Engine states in which frames go out; the others (starting, stopped) have no frame rate or latency.
FLOWING_STATES = ("warming up", "streaming", "paused", "no signal", "compiling")


# ------------------------------------------------------------------------------ protocol helpers


def command_message(cmd: str, id=None, **args) -> dict:
    """A command as it goes on the wire (same shape as live2diff_engine.control.schema)."""
    msg = {"app": APP, "v": VERSION, "kind": "command", "cmd": cmd, **args}
    if id is not None:
        msg["id"] = id
    return msg


def is_ours(msg) -> bool:
    return isinstance(msg, dict) and msg.get("app") == APP and msg.get("v") == VERSION


def event_to_dict(data) -> dict:
    """obsws-python hands a CustomEvent's eventData over as an object whose attributes are the
    (snake-cased) top-level keys; ``attrs()`` lists them. Our keys are snake case already."""
    if isinstance(data, dict):
        return dict(data)
    try:
        names = data.attrs()
    except Exception:
        return {}
    return {name: getattr(data, name, None) for name in names}


def read_picture(path: str) -> tuple[bytes, str]:
    """A picture file's bytes and content type (PNG, JPEG or WebP, judged from its first bytes);
    ValueError with what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read(PICTURE_MAX_BYTES + 1)
    except IsADirectoryError:
        raise ValueError("that is a folder; choose a PNG, JPEG or WebP picture") from None
    except OSError as e:
        raise ValueError(f"cannot read it ({e.strerror or e})") from None
    if len(data) > PICTURE_MAX_BYTES:
        raise ValueError(f"larger than {PICTURE_MAX_BYTES // (1024 * 1024)} MB; choose a smaller PNG or JPEG")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data, "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return data, "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "image/webp"
    raise ValueError("not a PNG, JPEG or WebP picture")


def api_join(api_url: str, path: str) -> str:
    return (api_url or DEFAULT_API_URL).strip().rstrip("/") + path


def dock_url(api_url: str) -> str:
    return api_join(api_url, "/dock")


def _short(text, limit: int = 60) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _fmt_num(value, fmt: str, unit: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return format(value, fmt) + unit


def engine_state(status: dict | None) -> str:
    if not status:
        return "offline"
    state = str(status.get("state") or "unknown")
    if status.get("paused") and state != "paused":
        state += " (paused)"
    return state


def style_loading(status: dict | None) -> str | None:
    """The style the engine is loading beside the stream (the one in use goes on meanwhile)."""
    loading = (status or {}).get("style_loading")
    return loading if isinstance(loading, str) and loading else None


def style_text(status: dict | None) -> str:
    """The style in use, and the one loading: ``default (loading anime ...)``."""
    style = (status or {}).get("style") or "-"
    loading = style_loading(status)
    return f"{style} (loading {loading} ...)" if loading else style


def fps_text(status: dict | None) -> str | None:
    """The frame rate as shown ("12.0"), or None where there is none to show: an engine starting or
    stopped (its last figure would be old), or warming up before its first frames went out."""
    state = (status or {}).get("state")
    fps = (status or {}).get("fps")
    if state not in FLOWING_STATES or not isinstance(fps, (int, float)) or isinstance(fps, bool):
        return None
    if state == "warming up" and fps <= 0:
        return None
    return format(fps, ".1f")


def latency_text(status: dict | None) -> str:
    """The latency as shown: "84 ms"; "measuring ..." while a stream's first frames are on their
    way; "-" where there is none (starting, stopped, warming up: the camera passes through)."""
    state = (status or {}).get("state")
    latency = (status or {}).get("latency_ms")
    if state not in FLOWING_STATES:
        return "-"
    if isinstance(latency, (int, float)) and not isinstance(latency, bool):
        return f"{latency:.0f} ms"
    return "measuring ..." if state == "streaming" else "-"


def status_line(status: dict | None, link: str | None, note: str = "", headline: str = "offline",
                source: str | None = None) -> str:
    """One log line: ``[live2diff] engine streaming | style default | prompt 'a fox' | 12.0 fps``.
    With no status: ``[live2diff] engine <headline> (<note>)`` (Controller.view says which).
    ``source``: the script's own view of OBS's Live2Diff source ("pulling", "not pulling", None)."""
    if not status or not link:
        return f"{LOG_PREFIX} engine {headline}" + (f" ({note})" if note else "")
    fps = fps_text(status)
    return (
        f"{LOG_PREFIX} engine {engine_state(status)} | style {style_text(status)} | "
        f"prompt {_short(status.get('prompt'))!r} | " + (f"{fps} fps | " if fps is not None else "") + f"via {link}"
        + (" | OBS source not pulling the stream" if obs_not_pulling(status, source) else "")
    )


def obs_not_pulling(status: dict | None, source: str | None = None) -> bool:
    """OBS's Live2Diff source exists but reads no frames: as the engine's own OBS link sees it, or,
    where the engine has none, as the script sees it (``source``)."""
    if not status:
        return False
    if status.get("obs") == "connected":
        return status.get("obs_source") == "not pulling"
    return source == "not pulling"


def status_key(status: dict | None, link: str | None, headline: str = "offline", source: str | None = None) -> tuple:
    """What a status line is logged for: connection, state, style, prompt (not fps)."""
    if not status or not link:
        return ("offline", headline)
    return (link, status.get("state"), bool(status.get("paused")), status.get("style"), status.get("prompt"),
            obs_not_pulling(status, source), style_loading(status))


def format_status(status: dict | None, link: str | None, note: str = "", headline: str = "offline",
                  source: str | None = None, failure: str = "") -> str:
    """The multi-line text shown in the script's Engine box. ``failure``: why the engine "Start
    engine" started ended (failure_text), shown beside another engine's status too."""
    if not status or not link:
        return f"Engine: {headline}" + (f"\n{note}" if note else "")
    text = _format_engine(status, link, source)
    return text + (f"\nThe engine started here failed: {failure}" if failure else "")


def failure_text(eng) -> str:
    """"exited with code 2: <its last error line> (its output: <log>)" for an engine "Start engine"
    started that ended with an error by itself; "" otherwise."""
    code = eng.failed() if eng is not None else None
    if code is None:
        return ""
    where = f" (its output: {eng.log_path})" if eng.log_path else ""
    return f"exited with code {code}: {eng.exit_reason() or 'it wrote no error line'}{where}"


def _format_engine(status: dict, link: str, source: str | None) -> str:
    lines = [
        f"Engine: {engine_state(status)} (via {link})",
        f"Style: {style_text(status)}   Strength: {_fmt_num(status.get('strength'), '.2f')}   "
        f"Seed: {status.get('seed', '-')}   Steps: {status.get('steps', '-')}",
        f"Prompt: {_short(status.get('prompt'), 200) or '-'}",
    ]
    if style_loading(status):
        lines.append(f"Loading style {style_loading(status)} beside the stream: "
                     f"{status.get('style') or 'the current style'} keeps streaming until it is in")
    if status.get("negative_prompt"):
        guided = isinstance(status.get("guidance"), (int, float)) and status["guidance"] > 1
        lines.append(f"Negative: {_short(status.get('negative_prompt'), 200)}"
                     + (f"   Guidance: {_fmt_num(status.get('guidance'), '.1f')}" if guided else "   (guidance 1: no effect)"))
    lines.append(
        f"FPS: {fps_text(status) or '-'}   Latency: {latency_text(status)}   "
        f"Frames: {status.get('frames_out', '-')}"
    )
    picture = picture_text(status)
    if picture:
        lines.append(picture)
    obs_link = status.get("obs")
    if isinstance(obs_link, dict):
        obs_link = obs_link.get("state") or obs_link.get("connected")
    if obs_link not in (None, ""):
        lines.append(f"Engine's OBS link: {obs_link}")
    if obs_not_pulling(status, source):
        who = "the engine is" if obs_link == "connected" else "this script is"
        lines.append(f"OBS source not pulling the stream: OBS shows no new frames ({who} re-opening "
                     f"its {SOURCE_NAME!r} source)")
    elif obs_link == "connected" and status.get("obs_source") == "absent":
        lines.append(f"OBS source: no {SOURCE_NAME!r} source yet (Add engine output to scene)")
    missing = styles_missing(status)
    if missing:
        lines.append(f"Not downloaded: {', '.join(sorted(missing))} (get one with: {missing[sorted(missing)[0]]})")
    download = download_line(status)
    if download:
        lines.append(download)
    change = style_change_note(status)
    if change:
        lines.append(f"Last style change: {change}")
    return "\n".join(lines)


def picture_text(status: dict | None) -> str:
    """The style picture's line ("" for an engine without an IP-Adapter)."""
    status = status or {}
    scale = status.get("style_image_scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return ""
    if status.get("style_image_loading"):
        return "Style picture: reading a new one beside the stream"
    used = status.get("style_image")
    if not used:
        return "Style picture: none"
    what = "the one sent" if used == "upload" else str(used)
    return f"Style picture: {what}   Scale: {_fmt_num(scale, '.2f')}"


def style_change_note(status: dict | None) -> str:
    """What the engine's last style switch changed beside the look, in one line ("" when none)."""
    change = (status or {}).get("style_change")
    return _short(change.get("note"), 300) if isinstance(change, dict) and change.get("note") else ""


def styles_missing(status: dict | None) -> dict:
    """{style: what fetches it} for the engine's styles whose weights are not there."""
    missing = (status or {}).get("styles_missing")
    return {k: str(v) for k, v in missing.items() if isinstance(k, str)} if isinstance(missing, dict) else {}


def download_line(status: dict | None) -> str:
    """The engine's style download, in one line ("" when there is none)."""
    d = (status or {}).get("download")
    if not isinstance(d, dict):
        return ""
    style, state = d.get("style", "?"), d.get("state")
    if state == "downloading":
        got = _fmt_num((d.get("bytes") or 0) / 1e6, ".1f")
        total = d.get("total")
        of = f" of {_fmt_num(total / 1e6, '.1f')}" if isinstance(total, (int, float)) and not isinstance(total, bool) else ""
        return f"Downloading style {style}: {got}{of} MB"
    if state == "done":
        return f"Style {style} downloaded"
    return f"Download of style {style} failed: {_short(d.get('error'), 200)}"


def cycle_style(styles, current, step: int, missing=()):
    """The next style in ``step``'s direction after ``current`` in ``styles`` (wrapping), passing
    over the ``missing`` ones (their weights are not there: switching to them would fail); None
    when no other style can be switched to."""
    styles = [s for s in (styles or []) if isinstance(s, str)]
    if not styles:
        return None
    step = 1 if step > 0 else -1
    start = styles.index(current) if current in styles else (-1 if step > 0 else len(styles))
    for k in range(1, len(styles) + 1):
        candidate = styles[(start + k * step) % len(styles)]
        if candidate == current:
            return None
        if candidate not in missing:
            return candidate
    return None


# ------------------------------------------------------------------------ OBS websocket settings


def obs_config_dir() -> str | None:
    """OBS's settings folder (global.ini, plugin_config/...)."""
    if obs is not None:
        try:
            path = obs.os_get_config_path_ptr("obs-studio")
            if path:
                return path
        except Exception:
            pass
    if os.name == "nt":
        base = os.environ.get("APPDATA")
        return os.path.join(base, "obs-studio") if base else None
    home = os.path.expanduser("~")
    mac = os.path.join(home, "Library", "Application Support", "obs-studio")
    if os.path.isdir(mac):
        return mac
    return os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"), "obs-studio")


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def read_websocket_config(config_dir: str | None) -> dict | None:
    """obs-websocket's settings from OBS's config folder: {"port", "password", "auth_required",
    "enabled", "source"}, or None. obs-websocket 5.5+ (OBS 30.x on) keeps them in
    plugin_config/obs-websocket/config.json; before that (OBS 28/29) global.ini [OBSWebSocket]."""
    if not config_dir:
        return None
    path = os.path.join(config_dir, "plugin_config", "obs-websocket", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and ("server_port" in data or "server_password" in data):
            return {
                "port": int(data.get("server_port") or DEFAULT_WS_PORT),
                "password": str(data.get("server_password") or ""),
                "auth_required": _bool(data.get("auth_required", True)),
                "enabled": _bool(data.get("server_enabled", True)),
                "source": "config.json",
            }
    except (OSError, ValueError, TypeError):
        pass
    ini = configparser.RawConfigParser(strict=False, interpolation=None)
    ini.optionxform = str  # OBS's keys are case-sensitive
    try:
        with open(os.path.join(config_dir, "global.ini"), encoding="utf-8-sig") as f:
            ini.read_file(f)
    except (OSError, configparser.Error, UnicodeDecodeError):
        return None
    if not ini.has_section("OBSWebSocket"):
        return None
    sec = ini["OBSWebSocket"]
    try:
        port = int(sec.get("ServerPort", DEFAULT_WS_PORT))
    except ValueError:
        port = DEFAULT_WS_PORT
    return {
        "port": port,
        "password": sec.get("ServerPassword", ""),
        "auth_required": _bool(sec.get("AuthRequired", "true")),
        "enabled": _bool(sec.get("ServerEnabled", "true")),
        "source": "global.ini",
    }


def _frontend_websocket_config() -> dict | None:
    """The same through OBS's own global config API, where the bindings offer config_get_*."""
    if obs is None or not hasattr(obs, "config_get_string"):
        return None  # OBS 29's Python bindings have no config_get_*: the file is read instead
    try:
        cfg = obs.obs_frontend_get_global_config()
        if not cfg or not obs.config_has_user_value(cfg, "OBSWebSocket", "ServerPassword"):
            return None
        return {
            "port": int(obs.config_get_uint(cfg, "OBSWebSocket", "ServerPort") or DEFAULT_WS_PORT),
            "password": obs.config_get_string(cfg, "OBSWebSocket", "ServerPassword") or "",
            "auth_required": bool(obs.config_get_bool(cfg, "OBSWebSocket", "AuthRequired")),
            "enabled": bool(obs.config_get_bool(cfg, "OBSWebSocket", "ServerEnabled")),
            "source": "OBS global config",
        }
    except Exception:
        return None


def websocket_target(password_setting: str, port_setting: int, config_dir: str | None) -> dict:
    """{"port", "password", "source"}: the script's settings first, then OBS's own settings."""
    found = read_websocket_config(config_dir) or _frontend_websocket_config() or {}
    port = int(port_setting or 0) or found.get("port") or DEFAULT_WS_PORT
    if password_setting:
        return {"port": port, "password": password_setting, "source": "script settings"}
    if found and not found.get("auth_required", True):
        return {"port": port, "password": "", "source": found["source"] + " (no authentication)"}
    return {"port": port, "password": found.get("password", ""), "source": found.get("source", "none")}


# ----------------------------------------------------------------------------- engine process


def default_venv_bins() -> list[str]:
    """Where the installers put the engine's venv (bin folder), per OS."""
    home = os.path.expanduser("~")
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA")
        return [os.path.join(base, "live2diff-engine", "venv", "Scripts")] if base else []
    return [
        os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share"), "live2diff-engine", "venv", "bin"),
        os.path.join(home, "Library", "Application Support", "live2diff-engine", "venv", "bin"),
    ]


def engine_obs_connection(argv: list[str], target: dict, environ: dict | None = None) -> tuple[list[str], dict]:
    """The engine's argv and environment for connecting back to this OBS: its websocket port as an
    option (unless the command line names one) and the password in the environment
    (OBS_WEBSOCKET_PASSWORD), never on the command line where other users' `ps` could see it."""
    env = dict(os.environ if environ is None else environ)
    argv = list(argv)
    if "--obs" in argv:
        if target.get("port") and not any(a == "--obs-port" or a.startswith("--obs-port=") for a in argv):
            argv += ["--obs-port", str(int(target["port"]))]
        if target.get("password"):
            env["OBS_WEBSOCKET_PASSWORD"] = target["password"]
    return argv, env


def venv_bin(venv: str) -> str:
    return os.path.join(os.path.expanduser(venv), "Scripts" if os.name == "nt" else "bin")


def split_windows_command_line(text: str) -> list[str]:
    r"""A command line split as Windows programs split theirs (the Microsoft C runtime's rules, which
    CommandLineToArgvW shares), the inverse of ``subprocess.list2cmdline``:

    * whitespace (space, tab) outside quotes separates arguments;
    * a double quote starts or ends a quoted part and is removed; quoted parts and unquoted text
      join into one argument (``"a b"c`` is ``a bc``); inside quotes ``""`` is a literal quote;
    * backslashes are literal, except before a double quote: 2n backslashes and a quote are n
      backslashes and a delimiting quote, 2n+1 backslashes and a quote are n backslashes and a
      literal quote (``a\\\"b`` is ``a\"b``; ``"C:\dir\\"`` is ``C:\dir\``);
    * the program (the first argument) is a path: quotes group and are removed there, and its
      backslashes are always literal (``"C:\Program Files\x.exe"`` is ``C:\Program Files\x.exe``).
    """
    text = text or ""
    n = len(text)
    i = 0
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return []
    args = []
    prog, quoted = [], False
    while i < n and (quoted or text[i] not in " \t"):
        if text[i] == '"':
            quoted = not quoted
        else:
            prog.append(text[i])
        i += 1
    args.append("".join(prog))
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return args
        arg, quoted = [], False
        while i < n:
            c = text[i]
            if c == "\\":
                j = i
                while j < n and text[j] == "\\":
                    j += 1
                if j < n and text[j] == '"':
                    arg.append("\\" * ((j - i) // 2))
                    if (j - i) % 2:  # an escaped, literal quote
                        arg.append('"')
                        j += 1
                else:
                    arg.append("\\" * (j - i))
                i = j
            elif c == '"':
                if quoted and i + 1 < n and text[i + 1] == '"':
                    arg.append('"')  # "" inside quotes: a literal quote, still quoted
                    i += 2
                else:
                    quoted = not quoted
                    i += 1
            elif c in " \t" and not quoted:
                break
            else:
                arg.append(c)
                i += 1
        args.append("".join(arg))


def split_command_line(cmdline: str, windows: bool | None = None) -> list[str]:
    """The script's command line setting as an argv: Windows rules on Windows, POSIX shell rules
    (shlex) elsewhere. Raises ValueError for an unbalanced POSIX quote."""
    if os.name == "nt" if windows is None else windows:
        return split_windows_command_line(cmdline)
    return shlex.split(cmdline or "")


def join_command_line(argv: list[str]) -> str:
    """An argv as the user would type it here (for the log)."""
    return subprocess.list2cmdline(argv) if os.name == "nt" else " ".join(shlex.quote(a) for a in argv)


def _subcommand(argv: list[str]) -> str | None:
    """The engine's command (run, connect, serve ...): the first word after the program, or after
    ``-m live2diff_engine`` where the program is a Python."""
    rest = list(argv[1:])
    if "-m" in rest and rest.index("-m") + 1 < len(rest):
        rest = rest[rest.index("-m") + 2:]
    return next((a for a in rest if not a.startswith("-")), None)


def _option_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in argv (the last one given), or None."""
    value = None
    for k, a in enumerate(argv):
        if a == name and k + 1 < len(argv):
            value = argv[k + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


def engine_output_args(argv: list[str], virtual_camera: bool = False) -> list[str]:
    """Where the engine started from OBS sends its output. OBS reads it from the engine's local
    stream, so with no --sink in the command line it gets ``--sink null`` (the engine's default
    sink is the virtual camera, which on Windows and macOS is OBS's own: it would take OBS's
    Virtual Camera away from OBS); ``virtual_camera`` (the script's "Also publish a virtual camera")
    asks for ``--sink virtualcam`` instead. A --sink the user wrote is kept as it is."""
    if _subcommand(argv) not in ("run", "connect"):
        return list(argv)
    if any(a == "--sink" or a.startswith("--sink=") for a in argv):
        return list(argv)
    return list(argv) + ["--sink", "virtualcam" if virtual_camera else "null"]


def _loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def engine_api_args(argv: list[str], api_url: str) -> tuple[list[str], str | None]:
    """(argv, the URL of the started engine's local API, or None where the script cannot reach it
    from loopback). The command line's --api-port and --api-host count; without --api-port the
    script's 'Engine API URL' (an http URL on this machine) becomes ``--api-port``, so that the
    script talks to, and stops, the engine it started."""
    argv = list(argv)
    if _subcommand(argv) not in ("run", "connect") or "--no-api" in argv:
        return argv, None
    port = _option_value(argv, "--api-port")
    if port is None:
        try:
            parts = urllib.parse.urlsplit((api_url or DEFAULT_API_URL).strip())
            port = parts.port
        except ValueError:
            return argv, None
        if parts.scheme != "http" or not parts.hostname or not _loopback_name(parts.hostname) or not port:
            return argv, None
        argv += ["--api-port", str(port)]
    try:
        port = int(port)
    except ValueError:
        return argv, None
    if not 0 < port < 65536:
        return argv, None  # 0: a free port the script cannot know
    host = _option_value(argv, "--api-host") or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    elif not _loopback_name(host):
        return argv, None  # a request from this machine to that address would not come from loopback
    host = f"[{host.strip('[]')}]" if ":" in host else host
    return argv, f"http://{host}:{port}"


def engine_launch(ui: dict, ws_target: dict, environ: dict | None = None) -> tuple[list[str], dict, str | None]:
    """What "Start engine" runs: (argv, environment, the URL of the engine's local API or None),
    from the script's settings (engine_command, engine_venv, engine_virtual_camera, api_url) and
    OBS's websocket target."""
    argv = resolve_engine_command(ui.get("engine_command") or DEFAULT_ENGINE_COMMAND, ui.get("engine_venv", ""))
    argv = engine_output_args(argv, bool(ui.get("engine_virtual_camera")))
    argv, api_url = engine_api_args(argv, ui.get("api_url") or DEFAULT_API_URL)
    argv, env = engine_obs_connection(argv, ws_target, environ)
    return argv, env, api_url


def resolve_engine_command(cmdline: str, venv: str = "", search_defaults: bool = True) -> list[str]:
    """The engine's argv: the command line's program found in the configured venv, on PATH, or in
    the installers' default venv. Never OBS's ``sys.executable`` (not OBS's interpreter)."""
    try:
        argv = split_command_line(cmdline or "")
    except ValueError as e:
        raise ValueError(f"cannot read the engine command line: {e}") from None
    if not argv:
        raise ValueError("the engine command line is empty")
    exe = os.path.expanduser(argv[0])
    if os.path.dirname(exe):
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return [exe] + argv[1:]
        raise ValueError(f"engine program {exe} not found or not executable")
    dirs = [venv_bin(venv)] if venv else []
    found = None
    for d in dirs:
        found = shutil.which(exe, path=d)
        if found:
            break
    if not found:
        found = shutil.which(exe)
    if not found and search_defaults:
        for d in default_venv_bins():
            found = shutil.which(exe, path=d)
            if found:
                break
    if not found:
        where = f" in {dirs[0]} or" if dirs else ""
        raise ValueError(f"{exe} not found{where} on PATH; set the engine's venv folder or a full path in the command")
    return [found] + argv[1:]


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ENGINE_ERROR = re.compile(r"^live2diff-engine\b[^:]*: error: ")
LOG_TAIL_BYTES = 64 * 1024


def last_error_line(text: str) -> str | None:
    """The engine's own reason for ending, from its output: its last ``live2diff-engine: error:``
    line (what it prints for a port in use, a missing model, a bad option); else a traceback's
    last line (the exception); else the last line that says error or failed; else the last line.
    Progress bars' carriage-return updates and terminal colours are dropped. None for no output."""
    lines = []
    for raw in (text or "").splitlines():
        line = _ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()
        if line:
            lines.append(line)
    if not lines:
        return None
    found = next((ln for ln in reversed(lines) if _ENGINE_ERROR.match(ln)), None)
    if found is None and any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        found = lines[-1]
    if found is None:
        found = next((ln for ln in reversed(lines) if "error" in ln.lower() or "failed" in ln.lower()), lines[-1])
    return _short(found, 400)


class EngineProcess:
    """The engine started by the script: its own process group, output to a log file.

    ``stop()`` tries, each with a bounded wait: (1) a ``quit`` through the engine's local API (only
    this machine may send it; it names the instance started here, so no other engine is stopped),
    after which the engine stops as on Ctrl-C and closes its outputs; (2) the platform's stop
    signal: SIGINT to its process group, or CTRL_BREAK_EVENT on Windows, which reaches the engine
    only from a console it shares (OBS has none, so there it usually cannot be sent); (3) terminate,
    then kill. ``stopped_by`` says which step ended it; ``stop_notes`` why earlier steps did not."""

    API_TIMEOUT_S = 3.0  # the quit request itself
    API_RETRY_S = 0.5  # while the engine says it is still starting (loading its models)
    WINDOWS_SIGNAL_WAIT_S = 2.0  # CTRL_BREAK that Windows accepted may still reach no one

    def __init__(self, proc: subprocess.Popen | None = None, windows: bool | None = None):
        self.proc = proc
        self.windows = os.name == "nt" if windows is None else windows
        self.api_url: str | None = None
        self.api_token = ""
        self.instance: str | None = None
        self.stopped_by: str | None = None  # "api", "signal", "terminate", "kill", "itself"
        self.stop_notes: list[str] = []
        self.log_path: str | None = None
        self._log_offset = 0  # where this run's output starts in the log file (appended to)
        self._reason: tuple[int, str | None] | None = None  # (pid, the reason read from the log)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failed(self) -> int | None:
        """The exit code of an engine that ended by itself with an error (not one the script
        stopped); None otherwise."""
        if self.proc is None or self.proc.poll() is None or self.stopped_by not in (None, "itself"):
            return None
        return self.proc.returncode if self.proc.returncode != 0 else None

    def exit_reason(self) -> str | None:
        """Why the engine ended: the last error line of its own output in this run (last_error_line),
        or None (no log, no output)."""
        if self.proc is None or self.proc.poll() is None or not self.log_path:
            return None
        if self._reason is not None and self._reason[0] == self.proc.pid:
            return self._reason[1]
        text = ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self._log_offset, os.path.getsize(self.log_path) - LOG_TAIL_BYTES))
                text = f.read(LOG_TAIL_BYTES).decode("utf-8", "replace")
        except OSError:
            pass
        self._reason = (self.proc.pid, last_error_line(text))
        return self._reason[1]

    def start(self, argv: list[str], log_path: str | None = None, env: dict | None = None,
              api_url: str | None = None, api_token: str = "") -> subprocess.Popen:
        """Start the engine. ``api_url``: its local API (engine_api_args), where "Stop engine" asks
        it to quit; ``api_token``: the token that API asks for, if any."""
        if self.running():
            raise RuntimeError(f"the engine is already running (pid {self.proc.pid})")
        out = subprocess.DEVNULL
        self.log_path, self._log_offset, self._reason = log_path, 0, None
        if log_path:
            os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
            out = open(log_path, "ab")
            self._log_offset = out.seek(0, os.SEEK_END)
        instance = secrets.token_hex(8)
        env = dict(os.environ if env is None else env)
        env[INSTANCE_ENV] = instance
        kwargs = {}
        if self.windows:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, **kwargs)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.instance, self.api_url, self.api_token = instance, api_url, api_token or ""
        self.stopped_by, self.stop_notes = None, []
        return self.proc

    def quit_via_api(self) -> tuple[bool, str]:
        """Ask the engine to quit through its local API: (taken, why not). Taken: the engine said
        yes, or the request went out and the answer was lost (the engine may be exiting)."""
        if not self.api_url:
            return False, "no local API to ask (--no-api, --api-port 0, or an address not on this machine)"
        msg = command_message("quit", id="obs-quit", **({"instance": self.instance} if self.instance else {}))
        try:
            reply = HttpTransport(self.api_url, self.api_token, timeout=self.API_TIMEOUT_S).command(msg)
        except Exception as e:  # (http.client's errors are not all OSErrors)
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            if isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or not isinstance(reason, OSError):
                return False, f"{self.api_url}: {_reason(e)}"
            return True, ""  # sent; the answer was cut off (reset, timeout): wait for the exit
        if reply.get("ok"):
            return True, ""
        return False, f"{self.api_url}: {reply.get('error') or 'refused'}"

    def interrupt(self) -> bool:
        """The platform's stop signal: SIGINT to the engine's group, CTRL_BREAK_EVENT on Windows.
        False when it could not be sent."""
        if not self.running():
            return False
        try:
            if self.windows:
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(self.proc.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError, OSError, ValueError, AttributeError) as e:
            self.stop_notes.append(f"signal: {_reason(e)}")
            return False
        return True

    def _wait(self, seconds: float) -> int | None:
        try:
            return self.proc.wait(max(0.0, seconds))
        except subprocess.TimeoutExpired:
            return None

    def _ended(self, code: int | None, how: str) -> int | None:
        if code is not None and self.stopped_by is None:
            self.stopped_by = how
        return code

    def stop(self, grace: float = 10.0, term_grace: float = 5.0) -> int | None:
        """API quit (wait ``grace``), stop signal (wait ``grace``; ``term_grace`` after a quit the
        engine took but did not finish in time), terminate (wait ``term_grace``), kill. Returns the
        exit code (None if it could not be had)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self._ended(self.proc.returncode, "itself")
        self.stop_notes = []
        taken, why = self.quit_via_api()
        if taken:
            code = self._wait(grace)
            if code is not None:
                return self._ended(code, "api")
            self.stop_notes.append(f"API: the engine took the quit but had not exited after {grace:g} s")
        else:
            self.stop_notes.append(f"API: {why}")
        signalled = self.interrupt()
        if signalled:
            wait = term_grace if taken else grace
            if self.windows:
                wait = min(wait, self.WINDOWS_SIGNAL_WAIT_S)
            code = self._wait(wait)
            if code is not None:
                return self._ended(code, "signal")
        if not taken and "starting" in why and (self.windows or not signalled):
            # Loading its models, the engine has no quit to take yet: ask again until it has one
            # (where no signal reaches it, as from OBS on Windows, that is the only clean stop).
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                code = self._wait(self.API_RETRY_S)
                if code is not None:
                    return self._ended(code, "signal" if signalled else "itself")
                taken, why = self.quit_via_api()
                if taken:
                    code = self._wait(deadline - time.monotonic())
                    if code is not None:
                        return self._ended(code, "api")
                    break
        try:
            if self.windows:
                self.proc.terminate()
            else:
                os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        code = self._wait(term_grace)
        if code is not None:
            return self._ended(code, "terminate")
        try:
            self.proc.kill()
        except OSError:
            pass
        return self._ended(self._wait(5), "kill")


# --------------------------------------------------------------------------------- transports


class HttpTransport:
    """The engine's local HTTP API, standard library only. Proxies are never used (localhost)."""

    def __init__(self, api_url: str, token: str = "", timeout: float = HTTP_TIMEOUT_S):
        self.api_url = (api_url or DEFAULT_API_URL).strip()
        self.token = token or ""
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, path: str, body: dict | None = None, raw_body: tuple[bytes, str] | None = None,
                 timeout: float | None = None) -> tuple[int, dict]:
        """GET ``path``, or POST ``body`` as JSON or ``raw_body`` (bytes, content type)."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        elif raw_body is not None:
            data, headers["Content-Type"] = raw_body
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(api_join(self.api_url, path), data=data, headers=headers, method="POST" if data else "GET")
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                code, raw = resp.status, resp.read(1 << 20)
        except urllib.error.HTTPError as e:
            code, raw = e.code, e.read(1 << 20) if e.fp else b""
        try:
            payload = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, ValueError):
            payload = {}
        return code, payload if isinstance(payload, dict) else {}

    def get_status(self) -> dict:
        """The engine's status message; raises OSError (URLError, timeout) or ValueError."""
        code, payload = self._request("/api/status")
        if code in (401, 403):
            raise PermissionError("the engine's API refused the token (set 'API token')")
        if code != 200 or not is_ours(payload):
            raise ValueError(f"unexpected answer from {self.api_url} (HTTP {code})")
        return payload

    def upload_picture(self, data: bytes, content_type: str) -> dict:
        """POST a style picture's bytes to /api/style-image; the engine's reply (ok false with why)."""
        code, payload = self._request("/api/style-image", raw_body=(data, content_type), timeout=PICTURE_UPLOAD_TIMEOUT_S)
        if code in (401, 403):
            return {"ok": False, "error": "unauthorized: check the script's API token"}
        if isinstance(payload.get("ok"), bool):
            return payload
        return {"ok": code == 200, "error": None if code == 200 else f"HTTP {code}"}

    def command(self, msg: dict) -> dict:
        """POST a command; returns the reply message (ok false with the engine's error when refused)."""
        code, payload = self._request("/api/command", msg)
        if code in (401, 403):
            return {"kind": "reply", "id": msg.get("id"), "ok": False, "error": "unauthorized: check the script's API token"}
        if isinstance(payload.get("ok"), bool):
            return payload
        return {"kind": "reply", "id": msg.get("id"), "ok": code == 200, "error": None if code == 200 else f"HTTP {code}"}


class WsTransport:
    """obs-websocket through obsws-python: a ReqClient (worker thread only) broadcasts commands;
    an EventClient (General events) calls ``on_message(dict)`` for each CustomEvent."""

    def __init__(self, host: str, port: int, password: str, on_message, timeout: float = 3.0):
        if obsws_python is None:
            raise RuntimeError("obsws-python is not installed for OBS's Python")
        for name in ("obsws_python", "websocket"):  # obsws-python logs the password at INFO level
            lg = logging.getLogger(name)
            lg.setLevel(logging.CRITICAL)
            lg.propagate = False
        self.req = self.events = None
        self.req = obsws_python.ReqClient(host=host, port=port, password=password, timeout=timeout)
        try:
            self.events = obsws_python.EventClient(
                host=host, port=port, password=password, timeout=timeout, subs=obsws_python.Subs.GENERAL
            )
        except BaseException:
            self.close()
            raise

        def on_custom_event(data):  # obsws-python dispatches by this function's name
            try:
                on_message(event_to_dict(data))
            except Exception:  # never let the listener thread die (or print) on a bad event
                pass

        self.events.callback.register(on_custom_event)

    def alive(self) -> bool:
        ev = self.events
        return ev is not None and ev.worker.is_alive() and self.req is not None and self.req.base_client.ws.connected

    def broadcast(self, msg: dict) -> None:
        self.req.broadcast_custom_event({"eventData": msg})  # the wrapper is required

    def close(self) -> None:
        if self.events is not None:
            ws = self.events.base_client.ws
            try:
                ws.abort()  # wakes the listener thread blocked in recv
            except Exception:
                pass
            try:
                ws.shutdown()
            except Exception:
                pass
            worker = getattr(self.events, "worker", None)
            if worker is not None:
                worker.join(2)
            self.events = None
        if self.req is not None:
            try:
                self.req.base_client.ws.close(timeout=1)
            except Exception:
                pass
            self.req = None


# --------------------------------------------------------------------------------- controller


class Controller:
    """Talks to the engine on one worker thread; keeps the latest status for the UI.

    ``config``: api_url, api_token, ws_password, ws_port, use_websocket. ``ws_lookup(cfg)`` ->
    {"port", "password", "source"} (default: websocket_target with OBS's config folder).
    ``local_engine()``: the EngineProcess "Start engine" made (or None), so that an engine the
    script started says "starting" while it loads and, if it fails, why.

    Whoever started it, an engine that appears on the API URL (after none answered, or restarted:
    its uptime went back) is counted (``take_appearances``): OBS's Media Source has given up on
    the stream by then and the OBS side re-opens it.
    """

    def __init__(self, config: dict | None = None, ws_lookup=None, host: str = "127.0.0.1", local_engine=None):
        self.host = host
        self.local_engine = local_engine
        self.config = dict(config or {})
        self.ws_lookup = ws_lookup or (
            lambda c: websocket_target(c.get("ws_password", ""), c.get("ws_port", 0), obs_config_dir())
        )
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._logs: collections.deque = collections.deque(maxlen=200)
        self._ids = itertools.count(1)
        self._latest: dict[str, dict] = {}  # latest-wins commands (slider drags)
        self._pending: dict = {}  # id -> cmd, commands sent over obs-websocket awaiting a reply
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # state shared with the UI (under _lock)
        self._status: dict | None = None
        self._status_link: str | None = None
        self._status_at = 0.0
        self._ws_connected = False
        self._http_ok = False
        self._note = ""
        self._last_pause_sent = False
        self._pause_wanted: tuple[bool, float] | None = None  # (paused, until): asked for, not yet confirmed
        # worker-only state
        self._ws: WsTransport | None = None
        self._ws_next_try = 0.0
        self._ws_failures = 0
        self._ws_error = ""
        self._http = HttpTransport(self.config.get("api_url", DEFAULT_API_URL), self.config.get("api_token", ""))
        self._http_next_poll = 0.0
        self._http_reason = ""
        self._http_kind: str | None = None  # why the last poll failed: refused, timeout, unauthorized, foreign, other
        self._headline = "offline"  # what the engine is, with no status (see _update_note)
        self._appearances = 0  # engines seen (re)appearing, not yet taken by the OBS side
        self._api_down = False  # a poll found nothing listening since the last status
        self._style_change_key = None  # the engine's last style change, as last seen
        self.source_state: str | None = None  # OBS's source as the OBS side sees it (status_line's source)

    # -- public, any thread ---------------------------------------------------------------

    def start(self) -> "Controller":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="live2diff-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._q.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def configure(self, config: dict) -> None:
        self._q.put(("config", dict(config)))

    def send(self, cmd: str, **args) -> dict:
        msg = command_message(cmd, id=f"obs-{next(self._ids)}", **args)
        if cmd in ("set_strength", "set_guidance", "set_style_image_scale"):  # a dragged slider: only its latest value goes
            with self._lock:
                self._latest[cmd] = msg
            self._q.put(("latest", cmd))
        else:
            self._q.put(("send", msg))
        return msg

    def send_picture(self, path: str) -> None:
        """A style picture file on this machine: read on the worker thread and its bytes uploaded
        to the engine (the engine never reads a path)."""
        self._q.put(("picture", path))

    def log(self, text: str, level: str = "info") -> None:
        self._logs.append((level, text))

    def drain_logs(self) -> list[tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self._logs.popleft())
            except IndexError:
                return out

    def snapshot(self) -> tuple[dict | None, str | None, str]:
        """(latest status or None when stale, the link it came over, a note when offline)."""
        return self.view()[:3]

    def view(self) -> tuple[dict | None, str | None, str, str]:
        """snapshot() and, when there is no fresh status, what the engine is: "offline", "starting",
        "exited with code 2", "not answering", ... (the note then says why)."""
        with self._lock:
            fresh = self._status is not None and time.monotonic() - self._status_at < STATUS_STALE_S
            if fresh:
                return dict(self._status), self._status_link, "", ""
            return None, None, self._note, self._headline

    def take_appearances(self) -> int:
        """How many times an engine (re)appeared since the last call."""
        with self._lock:
            n, self._appearances = self._appearances, 0
            return n

    def last_known_status(self) -> dict | None:
        with self._lock:
            return dict(self._status) if self._status else None

    # convenience actions (used by buttons and hotkeys alike)

    def paused_shown(self) -> bool:
        """The paused state the Pause/Resume button shows: the engine's, from its status, except
        that a pause or resume just asked for shows at once, until the engine's status confirms
        it (or refuses it, or PAUSE_CONFIRM_S pass without an answer)."""
        with self._lock:
            status = self._status
            wanted = self._pause_wanted
            engine = bool(status.get("paused")) if status else None
            if wanted is not None:
                want, until = wanted
                if engine is not None and engine == want or time.monotonic() > until:
                    self._pause_wanted = wanted = None
                else:
                    return want
        return engine if engine is not None else self._last_pause_sent

    def toggle_pause(self) -> dict:
        paused = self.paused_shown()
        self._last_pause_sent = not paused
        with self._lock:
            self._pause_wanted = (not paused, time.monotonic() + PAUSE_CONFIRM_S)
        return self.send("resume" if paused else "pause")

    def step_style(self, step: int) -> dict | None:
        status = self.last_known_status() or {}
        names = status.get("styles")
        missing = styles_missing(status)
        style = cycle_style(names, status.get("style"), step, missing)
        if style is None:
            if not names:
                self.log(f"{LOG_PREFIX} no styles known yet (the engine has not been seen)", "warning")
            else:
                self.log(f"{LOG_PREFIX} no other style is downloaded"
                         + (f" (get one with: {next(iter(missing.values()))})" if missing else ""), "warning")
            return None
        return self.send("set_style", style=style, **transition_args())

    # -- incoming messages (EventClient thread or worker) ---------------------------------

    def _on_message(self, msg: dict, link: str) -> None:
        if not is_ours(msg):
            return
        kind = msg.get("kind")
        if kind == "status":
            with self._lock:
                now = time.monotonic()
                prev, prev_at = self._status, self._status_at
                gone = prev is None or now - prev_at >= STATUS_STALE_S or self._api_down
                up, prev_up = msg.get("uptime_s"), (prev or {}).get("uptime_s")
                restarted = (isinstance(up, (int, float)) and isinstance(prev_up, (int, float))
                             and up < prev_up - 1.0)  # a new engine between two looks
                appeared = (gone or restarted) and msg.get("state") != "stopped"
                if appeared:
                    self._appearances += 1
                self._api_down = False
                self._status = msg
                self._status_link = link
                self._status_at = now
                said = self._note_style_change(msg, appeared)
            if said:
                self.log(f"{LOG_PREFIX} {said}")
        elif kind == "reply":
            with self._lock:
                cmd = self._pending.pop(msg.get("id"), None)
            if cmd is not None:
                self._reply(cmd, msg)
            status = msg.get("status")
            if isinstance(status, dict) and is_ours(status):
                self._on_message(status, link)
        # kind "command": our own broadcasts (and other clients') come back to us: ignored

    def _note_style_change(self, status: dict, appeared: bool) -> str:
        """What a style switch changed beside the look (the engine's style_change), to be logged
        once, as it comes; not one made before this engine was seen (under self._lock)."""
        change = status.get("style_change")
        key = (change.get("time"), change.get("note")) if isinstance(change, dict) else None
        if key == self._style_change_key:
            return ""
        self._style_change_key = key
        return _short(change["note"], 300) if key is not None and change.get("note") and not appeared else ""

    def _reply(self, cmd: str, reply: dict) -> None:
        if not reply.get("ok") and cmd in ("pause", "resume"):
            with self._lock:
                self._pause_wanted = None  # refused: the button shows the engine's state again
        if not reply.get("ok"):
            self.log(f"{LOG_PREFIX} engine refused {cmd}: {reply.get('error') or 'no reason given'}", "warning")

    # -- worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    job = self._q.get(timeout=0.1)
                except queue.Empty:
                    job = None
                if job is not None:
                    kind, arg = job
                    if kind == "stop":
                        break
                    try:
                        self._handle(kind, arg)
                    except Exception as e:
                        self.log(f"{LOG_PREFIX} internal error ({kind}): {type(e).__name__}: {e}", "error")
                try:
                    self._maintain()
                except Exception as e:
                    self.log(f"{LOG_PREFIX} internal error: {type(e).__name__}: {e}", "error")
        finally:
            self._close_ws()

    def _handle(self, kind: str, arg) -> None:
        if kind == "config":
            if arg != self.config:
                self.config = arg
                self._http = HttpTransport(arg.get("api_url", DEFAULT_API_URL), arg.get("api_token", ""))
                self._close_ws()
                self._ws_failures = 0
                self._ws_next_try = time.monotonic() + 0.5  # settle while typing
                self._http_next_poll = 0.0
        elif kind == "latest":
            with self._lock:
                msg = self._latest.pop(arg, None)
            if msg is not None:
                self._deliver(msg)
        elif kind == "send":
            self._deliver(arg)
        elif kind == "picture":
            self._upload_picture(arg)

    def _upload_picture(self, path: str) -> None:
        name = os.path.basename(path) or path
        try:
            data, content_type = read_picture(path)
        except ValueError as e:
            self.log(f"{LOG_PREFIX} style picture {name}: {e}", "warning")
            return
        try:  # over the HTTP API in every case: a picture is too large for an obs-websocket message
            reply = self._http.upload_picture(data, content_type)
        except (OSError, ValueError, http.client.HTTPException) as e:
            self.log(f"{LOG_PREFIX} could not send the style picture {name}: the engine's HTTP API "
                     f"{self._http.api_url} is not reachable ({_reason(e)})", "warning")
            return
        if reply.get("ok"):
            self.log(f"{LOG_PREFIX} style picture {name} in use")
        else:
            self.log(f"{LOG_PREFIX} engine refused the style picture {name}: {reply.get('error') or 'no reason given'}",
                     "warning")

    def _engine_on_ws(self) -> bool:
        with self._lock:
            return (
                self._ws is not None
                and self._status_link == LINK_WS
                and time.monotonic() - self._status_at < STATUS_STALE_S
            )

    def _deliver(self, msg: dict) -> None:
        cmd = msg["cmd"]
        ws_up = self._ws is not None and self._ws.alive()
        if ws_up and (self._engine_on_ws() or not self._http_ok):
            try:
                with self._lock:
                    self._pending[msg["id"]] = cmd
                    if len(self._pending) > 100:
                        self._pending.pop(next(iter(self._pending)))
                self._ws.broadcast(msg)
                return
            except Exception as e:
                with self._lock:
                    self._pending.pop(msg["id"], None)
                if type(e).__name__ == "OBSSDKRequestError":  # OBS answered: the link is fine
                    self.log(f"{LOG_PREFIX} obs-websocket refused to broadcast {cmd}: {_reason(e)}", "warning")
                    return
                self._ws_lost(e)
        try:
            reply = self._http.command(msg)
        except (OSError, ValueError) as e:
            if _timed_out(e):  # the engine took the request and is still at it: not unreachable
                self.log(
                    f"{LOG_PREFIX} sent {cmd}; no answer from the engine within {self._http.timeout:g} s yet (it applies "
                    "commands between frames, and a style can take longer to load); the status shows when it is done",
                    "info",
                )
                return
            self.log(
                f"{LOG_PREFIX} could not send {cmd}: the engine is not reachable "
                f"(obs-websocket: {self._ws_error or 'not connected'}; HTTP API {self._http.api_url}: {_reason(e)})",
                "warning",
            )
            return
        self._reply(cmd, reply)
        status = reply.get("status")
        if isinstance(status, dict) and is_ours(status):
            self._on_message(status, LINK_HTTP)

    def _maintain(self) -> None:
        now = time.monotonic()
        # obs-websocket
        if self.config.get("use_websocket", True) and obsws_python is not None:
            if self._ws is not None and not self._ws.alive():
                self._ws_lost(None)
            if self._ws is None and now >= self._ws_next_try:
                self._connect_ws()
        elif self._ws_error == "":
            self._ws_error = "obsws-python not installed for OBS's Python" if obsws_python is None else "off"
        # HTTP: polled whenever the engine is not seen over obs-websocket
        if not self._engine_on_ws() and now >= self._http_next_poll:
            self._http_next_poll = now + HTTP_POLL_S
            try:
                status = self._http.get_status()
            except (OSError, ValueError, http.client.HTTPException) as e:
                self._set_http(False, _reason(e), _failure_kind(e))
            else:
                self._set_http(True, "")
                self._on_message(status, LINK_HTTP)
        self._update_note()

    def _set_http(self, ok: bool, reason: str, kind: str | None = None) -> None:
        self._http_ok = ok
        self._http_reason = reason
        self._http_kind = kind
        if kind == "refused":
            with self._lock:
                self._api_down = True

    def _update_note(self) -> None:
        ws = "connected, no engine status" if self._ws is not None else (self._ws_error or "connecting")
        http = self._http_reason or ("answering" if self._http_ok else "not polled yet")
        note = f"obs-websocket: {ws}; HTTP API {self._http.api_url}: {http}"
        headline, why = self._offline_headline()
        with self._lock:
            self._note = why or note
            self._headline = headline
            self._ws_connected = self._ws is not None

    def _offline_headline(self) -> tuple[str, str]:
        """(what the engine is when no status comes, why; "" to give the connection note). Only
        "offline" where nothing answers at the API URL: an API that answers something is not."""
        url, kind = self._http.api_url, self._http_kind
        eng = self.local_engine() if self.local_engine is not None else None
        ours = eng is not None and getattr(eng, "api_url", None) and same_api(eng.api_url, url)
        if kind in ("refused", None) and ours and eng.running():
            return "starting", f"engine process {eng.pid} is loading; its API at {url} is not up yet"
        if ours and eng.failed() is not None:  # (whatever holds its port: its own reason comes first)
            reason = eng.exit_reason() or "it wrote no error line"
            where = f"; its output: {eng.log_path}" if eng.log_path else ""
            return f"exited with code {eng.failed()}", f"{reason}{where}"
        if kind in ("refused", None) and ours and eng.proc is not None and eng.stopped_by not in (None, "itself"):
            return "stopped", "stopped by 'Stop engine'"
        if kind == "unauthorized":
            return "refuses the script's API token", f"{url} answers, but not without the right token: set 'API token' under Connection"
        if kind == "timeout":
            return "not answering", (f"{url} took the request but gave no answer within {self._http.timeout:g} s "
                                     "(busy loading, or hung)")
        if kind == "foreign":
            return "not found", f"something that is not a Live2Diff engine answers at {url} ({self._http_reason})"
        return "offline", ""

    def _connect_ws(self) -> None:
        target = self.ws_lookup(self.config)
        try:  # without a password too: the server may not ask for one (obsws-python says if it does)
            self._ws = WsTransport(
                self.host, int(target["port"]), target.get("password", ""), lambda m: self._on_message(m, LINK_WS)
            )
        except Exception as e:
            self._ws = None
            self._ws_failures += 1
            auth = _is_auth_error(e)
            if auth and not target.get("password"):
                reason = "no password (set it in the script or check Tools > WebSocket Server Settings)"
            elif auth:
                reason = f"password refused (from {target.get('source')})"
            else:
                reason = f"port {target['port']}: {_reason(e)}"
            if reason != self._ws_error:
                self.log(f"{LOG_PREFIX} obs-websocket not connected: {reason}; using the HTTP API meanwhile", "info")
            self._ws_error = reason
            delay = WS_BACKOFF_AUTH_S if auth else WS_BACKOFF_S[min(self._ws_failures - 1, len(WS_BACKOFF_S) - 1)]
            self._ws_next_try = time.monotonic() + delay
            return
        self._ws_failures = 0
        self._ws_error = ""
        self.log(f"{LOG_PREFIX} connected to obs-websocket on {self.host}:{target['port']} (password from {target.get('source')})")
        try:  # ask for a status at once rather than waiting for the next one
            self._ws.broadcast(command_message("status", id=f"obs-{next(self._ids)}"))
        except Exception as e:
            self._ws_lost(e)

    def _ws_lost(self, error) -> None:
        if self._ws is None:
            return
        self._close_ws()
        self._ws_error = f"connection lost ({_reason(error)})" if error else "connection lost"
        self.log(f"{LOG_PREFIX} obs-websocket {self._ws_error}; reconnecting", "warning")
        self._ws_failures = 1
        self._ws_next_try = time.monotonic() + WS_BACKOFF_S[0]

    def _close_ws(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass


def _reason(e) -> str:
    if e is None:
        return "unknown"
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    text = str(e) or type(e).__name__
    if isinstance(e, ConnectionRefusedError):
        text = "connection refused"
    return _short(text, 120)


def _failure_kind(e) -> str:
    """Why a status poll failed: "refused" (nothing listens there), "timeout" (it took the request
    and did not answer in time), "unauthorized" (the token), "foreign" (something else answers),
    "other"."""
    if isinstance(e, PermissionError):
        return "unauthorized"
    if isinstance(e, (ValueError, http.client.HTTPException)):
        return "foreign"
    if _timed_out(e):
        return "timeout"
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason
    if isinstance(e, (ConnectionRefusedError, socket.gaierror)):
        return "refused"
    return "other"


def same_api(a: str | None, b: str | None) -> bool:
    """Whether two API URLs name the same engine on this machine (localhost, 127.0.0.1 and ::1 alike)."""
    try:
        pa, pb = urllib.parse.urlsplit((a or "").strip()), urllib.parse.urlsplit((b or "").strip())
        ports = (pa.port or 80, pb.port or 80)
    except ValueError:
        return False
    if pa.scheme != pb.scheme or ports[0] != ports[1] or not pa.hostname or not pb.hostname:
        return False
    return pa.hostname == pb.hostname or (_loopback_name(pa.hostname) and _loopback_name(pb.hostname))


def _timed_out(e) -> bool:
    """Whether a request failed by waiting too long for the answer (socket.timeout is an OSError of
    its own before Python 3.10)."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason
    return isinstance(e, (TimeoutError, socket.timeout))


def _is_auth_error(e) -> bool:
    text = str(e).lower()
    return "password" in text or "authentic" in text or "identify" in text


# ------------------------------------------------------------------------- OBS's source, kept open


def source_reads_engine(url: str, api_url: str) -> bool:
    """Whether a source's URL reads the engine at ``api_url``: its /stream.mjpg (a Media Source) or
    its /output page (a Browser Source). A source pointed elsewhere (another engine, a remote box)
    is the user's business."""
    try:
        parts = urllib.parse.urlsplit((url or "").strip())
    except ValueError:
        return False
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    return parts.path.rstrip("/") in ("/stream.mjpg", "/output") and same_api(base, api_url)


def counted_as_obs(url: str) -> bool:
    """The engine counts this source's reads as OBS's (it asks with ?client=obs): only then does the
    status's stream_clients_obs tell whether it pulls."""
    try:
        return "obs" in urllib.parse.parse_qs(urllib.parse.urlsplit(url or "").query).get("client", [])
    except ValueError:
        return False


class SourceKeeper:
    """Keeps OBS's Live2Diff source reading the engine's stream where the engine has no OBS link of
    its own (started without --obs, e.g. from a terminal): OBS 29's Media Source gives up for good
    after one failed reconnect, so an engine restart leaves it black. The engine's OBS link
    (control/obs.py) does the same when it has one; then this keeps out of its way.

    ``look()`` is called about once a second with the engine's status, whether it (re)appeared,
    and the source ({"kind", "url"} or None); it returns (what to show: "pulling", "not pulling" or
    None, whether to re-open the source now). Re-opened: when an engine appears and OBS does not
    read it yet, and whenever OBS has read nothing for ``stale_s`` (at most every ``every_s``)."""

    def __init__(self, stale_s: float = SOURCE_STALE_S, every_s: float = SOURCE_KICK_EVERY_S):
        self.stale_s, self.every_s = stale_s, every_s
        self._idle_since: float | None = None
        self._last_kick: float | None = None
        self.kicks = 0

    def look(self, now: float, status: dict | None, appeared: bool, source: dict | None,
             api_url: str) -> tuple[str | None, bool]:
        if (not status or status.get("obs") == "connected" or source is None
                or source.get("kind") not in ("ffmpeg_source", "browser_source")
                or not source_reads_engine(source.get("url", ""), api_url)):
            self._idle_since = None
            return None, False
        readers = status.get("stream_clients_obs")
        judged = isinstance(readers, int) and not isinstance(readers, bool) and counted_as_obs(source.get("url", ""))
        if appeared and (not judged or readers == 0):
            self._idle_since = now  # judged again stale_s from now
            return self._kick(now)
        if not judged:
            return None, False
        if readers > 0:
            self._idle_since = None
            return "pulling", False
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since < self.stale_s:
            return None, False
        if self._last_kick is None or now - self._last_kick >= self.every_s:
            return "not pulling", self._kick(now)[1]
        return "not pulling", False

    def _kick(self, now: float) -> tuple[None, bool]:
        self._last_kick = now
        self.kicks += 1
        return None, True


# ============================================================================= OBS integration

_S = globals().get("_S")  # survives OBS's "Reload Scripts" (a module reload keeps globals)
if _S is None:
    _S = {"engine": EngineProcess(), "stop_on_exit": True}
_S.setdefault("engine", EngineProcess())
if not hasattr(_S["engine"], "quit_via_api"):  # a handle from an older version of this script: adopt its process
    _S["engine"] = EngineProcess(getattr(_S["engine"], "proc", None))


def _stop_engine_at_exit():
    """Python's atexit: runs when OBS shuts its Python down (OBS exits), not on a script reload.
    (OBS 29 unloads scripts before its EXIT frontend event, so that event cannot tell.) No logging
    here: OBS's log hook needs a current script."""
    eng = _S.get("engine")
    if eng is not None and eng.running() and _S.get("stop_on_exit", True):
        eng.stop(grace=5.0, term_grace=2.0)


if obs is not None and not _S.get("atexit_registered"):
    atexit.register(_stop_engine_at_exit)
    _S["atexit_registered"] = True

_controller: Controller | None = None
_settings = None  # OBS's settings object of this script (owned by OBS)
_ui: dict = {}  # the settings as last seen by script_update (and the engine's values mirrored into them)
_ui_lock = threading.Lock()
_hotkeys: dict[str, int] = {}
_last_key = None
_last_styles: list = []
_engine_text: dict = {}  # the engine's prompt and negative prompt as last copied into the boxes
_exit_code_logged = None
_keeper = SourceKeeper()
_kick_said = False  # the re-open of a source that stopped reading is logged once until it reads again

def _log(text: str, level: str = "info") -> None:
    """Only from OBS callbacks (OBS's log hook for Python needs the current script)."""
    if obs is None:
        print(text)
        return
    lvl = {"info": obs.LOG_INFO, "warning": obs.LOG_WARNING, "error": obs.LOG_ERROR}.get(level, obs.LOG_INFO)
    obs.script_log(lvl, text)


def _read_settings(settings) -> dict:
    g = obs.obs_data_get_string
    return {
        "prompt": g(settings, "prompt"),
        "prompt2": g(settings, "prompt2"),
        "blend": obs.obs_data_get_double(settings, "blend"),
        "transition_s": obs.obs_data_get_double(settings, "transition_s"),
        "negative_prompt": g(settings, "negative_prompt"),
        "style": g(settings, "style"),
        "strength": obs.obs_data_get_double(settings, "strength"),
        "guidance": obs.obs_data_get_double(settings, "guidance"),
        "seed": obs.obs_data_get_int(settings, "seed"),
        "style_picture": g(settings, "style_picture").strip(),
        "picture_scale": obs.obs_data_get_double(settings, "picture_scale"),
        "api_url": g(settings, "api_url").strip() or DEFAULT_API_URL,
        "api_token": g(settings, "api_token"),
        "ws_password": g(settings, "ws_password"),
        "ws_port": obs.obs_data_get_int(settings, "ws_port"),
        "engine_command": g(settings, "engine_command").strip() or DEFAULT_ENGINE_COMMAND,
        "engine_venv": g(settings, "engine_venv").strip(),
        "stop_engine_on_exit": obs.obs_data_get_bool(settings, "stop_engine_on_exit"),
        "engine_virtual_camera": obs.obs_data_get_bool(settings, "engine_virtual_camera"),
    }


def _transport_config(ui: dict) -> dict:
    cfg = {k: ui.get(k) for k in ("api_url", "api_token", "ws_password", "ws_port")}
    cfg["use_websocket"] = True
    return cfg


def transition_args(ui: dict | None = None, now: bool = False) -> dict:
    """{"transition_s": seconds} from the Transition slider (clamped to the engine's 0-10), or {}
    for 0 (the engine's default then applies) and for ``now``."""
    if ui is None:
        with _ui_lock:
            ui = dict(_ui)
    try:
        t = float(ui.get("transition_s") or 0.0)
    except (TypeError, ValueError):
        t = 0.0
    if now:
        return {"transition_s": 0.0}
    if not t > 0 or t != t:
        return {}
    return {"transition_s": round(min(t, MAX_TRANSITION_S), 3)}


def prompt_value(ui: dict):
    """The prompt to send: the Prompt box, or a blend with the Second prompt box by the Mix slider
    ([{"text", "weight"}], weights 1 - mix and mix)."""
    clean = lambda key: (ui.get(key) or "").replace("\r\n", "\n").replace("\r", "\n")  # noqa: E731
    prompt, second = clean("prompt"), clean("prompt2").strip()
    try:
        mix = min(max(float(ui.get("blend") or 0.0), 0.0), 1.0)
    except (TypeError, ValueError):
        mix = 0.0
    if not second or mix <= 0:
        return prompt
    if mix >= 1:
        return [{"text": second, "weight": 1.0}]
    return [{"text": prompt, "weight": round(1 - mix, 4)}, {"text": second, "weight": round(mix, 4)}]


def apply_prompt(now: bool = False) -> None:
    """Apply button and the 'apply prompt' hotkeys: set_prompt (and set_negative_prompt when the box
    differs from the engine's), with the Transition slider's seconds (``now``: at once)."""
    if _controller is None:
        return
    with _ui_lock:  # (the engine refuses carriage returns; Windows text boxes may hold them)
        ui = dict(_ui)
    prompt = prompt_value(ui)
    negative = (ui.get("negative_prompt") or "").replace("\r\n", "\n").replace("\r", "\n")
    texts = [prompt] if isinstance(prompt, str) else [item["text"] for item in prompt]
    if any(len(t) > MAX_PROMPT_CHARS for t in texts):
        longest = max(len(t) for t in texts)
        _controller.log(f"{LOG_PREFIX} prompt too long ({longest} characters, at most {MAX_PROMPT_CHARS})", "warning")
        return
    _controller.send("set_prompt", prompt=prompt, **transition_args(ui, now))
    status = _controller.last_known_status()
    engine_negative = (status or {}).get("negative_prompt")
    if negative != (engine_negative if engine_negative is not None else ""):
        _controller.send("set_negative_prompt", negative_prompt=negative, **transition_args(ui, now))


def _sync_from_ui_thread() -> None:
    """Buttons run on OBS's UI thread, where reading the settings object is safe."""
    if _settings is not None:
        with _ui_lock:
            _ui.update({k: v for k, v in _read_settings(_settings).items()
                        if k in ("prompt", "prompt2", "blend", "transition_s", "negative_prompt", "seed")})


# -- buttons (UI thread); returning True makes OBS rebuild the properties (fresh status)

def _on_refresh(props, prop):
    return True


def _on_apply_prompt(props, prop):
    _sync_from_ui_thread()
    apply_prompt()
    return True


def _on_apply_seed(props, prop):
    _sync_from_ui_thread()
    if _controller is not None:
        _controller.send("set_seed", seed=int(_ui.get("seed", 0)), **transition_args())
    return True


def _on_pause_resume(props, prop):
    if _controller is not None:
        _controller.toggle_pause()
    return True  # OBS rebuilds the properties: the button now says what it will do next


def pause_label(paused: bool) -> str:
    return "Resume" if paused else "Pause"


def style_label(name: str, missing: dict, loading: str | None = None) -> str:
    """A style as the Style list shows it: marked when its weights are not downloaded, or while
    the engine loads it beside the stream."""
    if name in missing:
        return f"{name} (not downloaded)"
    return f"{name} (loading ...)" if name == loading else name


def _on_clear_picture(props, prop):
    if _controller is not None:
        _controller.send("clear_style_image")
    if _settings is not None:
        obs.obs_data_set_string(_settings, "style_picture", "")
        with _ui_lock:
            _ui["style_picture"] = ""
    return True


def _on_reset(props, prop):
    if _controller is not None:
        _controller.send("reset")
    return True


def _on_add_to_scene(props, prop):
    if _controller is None:
        return False
    scene = None
    try:
        src = obs.obs_frontend_get_current_scene()
        if src is not None:
            scene = obs.obs_source_get_name(src)
            obs.obs_source_release(src)
    except Exception:
        scene = None
    if scene:
        _controller.send("add_to_scene", scene=scene)
    else:
        _controller.send("add_to_scene")
    return True


def _on_open_dock(props, prop):
    url = dock_url(_ui.get("api_url", DEFAULT_API_URL))
    threading.Thread(target=_open_browser, args=(url,), daemon=True).start()
    return False


def _quietly(fn, *args) -> None:
    """Run ``fn`` on a helper thread: an exception must not reach OBS's log hook from there."""
    try:
        fn(*args)
    except Exception:
        pass


def _open_browser(url: str) -> None:
    _quietly(webbrowser.open, url)


def _engine_log_path() -> str:
    base = obs_config_dir() or os.path.expanduser("~")
    return os.path.join(base, "plugin_config", "live2diff", "engine.log")


def _on_start_engine(props, prop):
    eng: EngineProcess = _S["engine"]
    if eng.running():
        _log(f"{LOG_PREFIX} the engine is already running (pid {eng.pid})")
        return True
    try:
        target = websocket_target(_ui.get("ws_password", ""), _ui.get("ws_port", 0), obs_config_dir())
        argv, env, api_url = engine_launch(_ui, target)
        log_path = _engine_log_path()
        eng.start(argv, log_path, env, api_url=api_url, api_token=_ui.get("api_token", ""))
    except (ValueError, OSError, RuntimeError) as e:
        _log(f"{LOG_PREFIX} could not start the engine: {e}", "error")
        return True
    global _exit_code_logged
    _exit_code_logged = None
    _log(f"{LOG_PREFIX} engine started (pid {eng.pid}): {join_command_line(argv)}; output in {log_path}")
    return True


def _on_stop_engine(props, prop):
    eng: EngineProcess = _S["engine"]
    if not eng.running():
        _log(f"{LOG_PREFIX} no engine started from this script is running")
        return True
    _log(f"{LOG_PREFIX} stopping the engine (pid {eng.pid})")
    threading.Thread(target=_quietly, args=(eng.stop,), name="live2diff-engine-stop", daemon=True).start()
    return True


# -- hotkeys (called by OBS, not on the UI thread)

def _hk(action):
    def callback(pressed):
        if pressed and _controller is not None:
            action()
    return callback


def _hotkey_actions():
    return {
        "live2diff.apply_prompt": apply_prompt,
        "live2diff.apply_prompt_now": lambda: apply_prompt(now=True),
        "live2diff.next_style": lambda: _controller.step_style(+1),
        "live2diff.previous_style": lambda: _controller.step_style(-1),
        "live2diff.pause_resume": lambda: _controller.toggle_pause(),
        "live2diff.reset": lambda: _controller.send("reset"),
    }


def _hotkey_setting(name: str) -> str:
    return "hotkey_" + name.replace(".", "_")


# -- timer (OBS's script timer; runs on OBS's video tick, never blocks)

def _tick():
    global _last_key, _exit_code_logged
    if _controller is None:
        return
    for level, text in _controller.drain_logs():
        _log(text, level)
    _S["ticks"] = _S.get("ticks", 0) + 1
    if _S["ticks"] % 2 == 0:
        _keep_source_reading()
    eng: EngineProcess = _S["engine"]
    if eng.proc is not None and eng.proc.poll() is not None and _exit_code_logged != eng.pid:
        _exit_code_logged = eng.pid
        failed = eng.failed() is not None
        reason = eng.exit_reason() if failed else None
        _log(f"{LOG_PREFIX} engine process {eng.pid} exited with code {eng.proc.returncode}{stop_summary(eng)}"
             + (f": {reason or 'it wrote no error line'}" + (f" (its output: {eng.log_path})" if eng.log_path else "")
                if failed else ""), "error" if failed else "info")
    status, link, note, headline = _controller.view()
    key = status_key(status, link, headline, _controller.source_state)
    if key != _last_key:
        _last_key = key
        _log(status_line(status, link, note, headline, _controller.source_state))
    if _S["ticks"] % MIXER_CHECK_EVERY == 0:
        _keep_source_out_of_mixer()


def _keep_source_reading() -> None:
    """OBS's Live2Diff source, re-opened where the engine cannot (SourceKeeper): through OBS's own
    API, as obs-websocket's SetInputSettings does for the engine's OBS link (re-applying a Media
    Source's settings opens it again; OBS 29's Restart action or hiding it do not)."""
    global _kick_said
    status = _controller.view()[0]
    appeared = _controller.take_appearances() > 0
    api_url = _ui.get("api_url", DEFAULT_API_URL)
    src = obs.obs_get_source_by_name(SOURCE_NAME)
    try:
        info = None
        if src is not None:
            kind = obs.obs_source_get_unversioned_id(src)
            field = {"ffmpeg_source": "input", "browser_source": "url"}.get(kind)
            url = ""
            if field:
                settings = obs.obs_source_get_settings(src)
                url = obs.obs_data_get_string(settings, field)
                obs.obs_data_release(settings)
            info = {"kind": kind, "url": url}
        state, kick = _keeper.look(time.monotonic(), status, appeared, info, api_url)
        _controller.source_state = state
        if state == "pulling":
            _kick_said = False
        if kick:
            _reopen_source(src, info["kind"], info["url"])
            if appeared:
                _log(f"{LOG_PREFIX} re-opened OBS's {SOURCE_NAME!r} source: the engine at {api_url} came back "
                     "(OBS's Media Source gives up on a stream after one failed reconnect)")
            elif not _kick_said:
                _log(f"{LOG_PREFIX} re-opened OBS's {SOURCE_NAME!r} source: it had read nothing from the engine "
                     f"at {api_url} for {SOURCE_STALE_S:g} s")
            _kick_said = not appeared
    finally:
        if src is not None:
            obs.obs_source_release(src)


def _reopen_source(src, kind: str, url: str) -> None:
    if kind == "ffmpeg_source":
        data = obs.obs_data_create()
        obs.obs_data_set_string(data, "input", url)  # the same URL: applying settings re-opens it
        obs.obs_source_update(src, data)
        obs.obs_data_release(data)
    elif kind == "browser_source" and hasattr(obs, "obs_property_button_clicked"):
        props = obs.obs_source_properties(src)
        button = obs.obs_properties_get(props, "refreshnocache")
        if button is not None:
            obs.obs_property_button_clicked(button, src)
        obs.obs_properties_destroy(props)


def stop_summary(eng) -> str:
    """How a stop ended the engine, for the log line of its exit ("" when it ended by itself)."""
    how = getattr(eng, "stopped_by", None)
    text = {"api": "stopped through its local API", "signal": "stopped by its stop signal",
            "terminate": "terminated: it did not stop cleanly", "kill": "killed: it did not stop cleanly"}.get(how)
    if not text:
        return ""
    notes = [n for n in getattr(eng, "stop_notes", []) if n] if how != "api" else []
    return f" ({text}" + (f"; {'; '.join(notes)}" if notes else "") + ")"


def _keep_source_out_of_mixer() -> None:
    """The engine's output carries no sound, yet OBS gives its Media Source a silent strip in the
    Audio Mixer. obs-websocket cannot remove it (the engine mutes the source and takes it off every
    track); a script can: OBS's mixer shows a source only while its audio is 'active' and its
    private setting 'mixer_hidden' (saved with the scene collection) is off."""
    src = obs.obs_get_source_by_name(SOURCE_NAME)
    if src is None:
        return
    try:
        if obs.obs_source_get_unversioned_id(src) != "ffmpeg_source" or not obs.obs_source_audio_active(src):
            return
        priv = obs.obs_source_get_private_settings(src)
        obs.obs_data_set_bool(priv, "mixer_hidden", True)
        obs.obs_data_release(priv)
        obs.obs_source_set_audio_active(src, False)  # OBS takes the strip away at once
        _log(f"{LOG_PREFIX} kept the {SOURCE_NAME!r} source out of the Audio Mixer (it carries no sound)")
    finally:
        obs.obs_source_release(src)


# -- OBS script API

def script_description():
    return (
        "<b>Live2Diff</b>: control the live diffusion engine (prompt, style, strength, pause) from OBS, "
        "with hotkeys.<br>Dock page: <a href='{0}'>{0}</a> "
        "(Docks &gt; Custom Browser Docks)."
    ).format(dock_url(_ui.get("api_url", DEFAULT_API_URL)))


def script_defaults(settings):
    obs.obs_data_set_default_string(settings, "api_url", DEFAULT_API_URL)
    obs.obs_data_set_default_string(settings, "engine_command", DEFAULT_ENGINE_COMMAND)
    obs.obs_data_set_default_double(settings, "strength", 0.5)
    obs.obs_data_set_default_double(settings, "guidance", 1.0)
    obs.obs_data_set_default_double(settings, "blend", 0.5)
    obs.obs_data_set_default_double(settings, "picture_scale", 1.0)
    obs.obs_data_set_default_double(settings, "transition_s", 0.0)
    obs.obs_data_set_default_int(settings, "ws_port", 0)
    obs.obs_data_set_default_bool(settings, "stop_engine_on_exit", True)
    obs.obs_data_set_default_bool(settings, "engine_virtual_camera", False)


def _text_info(props, name, description, text=None):
    info = getattr(obs, "OBS_TEXT_INFO", None)
    if info is not None:
        p = obs.obs_properties_add_text(props, name, description, info)
        if hasattr(obs, "obs_property_text_set_info_word_wrap"):
            obs.obs_property_text_set_info_word_wrap(p, True)
    else:  # older OBS: a read-only text box
        p = obs.obs_properties_add_text(props, name, description, obs.OBS_TEXT_MULTILINE)
        obs.obs_property_set_enabled(p, False)
    if text is not None and _settings is not None:
        # A default, not a value: shown by OBS but never saved with the scene collection.
        obs.obs_data_set_default_string(_settings, name, text)
    return p


def _mirror_engine_values(status: dict | None) -> None:
    """Copy the engine's prompt, style, strength and guidance into the settings (UI thread:
    script_properties). The prompt boxes take the engine's text whenever it differs from the text
    the engine had the last time it was copied: so they show the engine's prompt (after an engine
    restart too), while an edit being typed survives until the engine's prompt changes."""
    if _settings is None or not status:
        return
    with _ui_lock:
        for key in ("prompt", "negative_prompt"):
            text = status.get(key)
            if isinstance(text, str) and text != _engine_text.get(key):
                _engine_text[key] = text
                if text != _ui.get(key):
                    obs.obs_data_set_string(_settings, key, text)
                    _ui[key] = text
        style = status.get("style")
        if isinstance(style, str) and style and style != _ui.get("style"):
            obs.obs_data_set_string(_settings, "style", style)
            _ui["style"] = style
        strength = status.get("strength")
        if isinstance(strength, (int, float)) and not isinstance(strength, bool) and abs(strength - _ui.get("strength", -1)) > 1e-6:
            obs.obs_data_set_double(_settings, "strength", float(strength))
            _ui["strength"] = float(strength)
        guidance = status.get("guidance")
        if isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and abs(guidance - _ui.get("guidance", -1)) > 1e-6:
            obs.obs_data_set_double(_settings, "guidance", float(guidance))
            _ui["guidance"] = float(guidance)
        scale = status.get("style_image_scale")  # a number where the engine has an IP-Adapter
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and abs(scale - _ui.get("picture_scale", -1)) > 1e-6:
            obs.obs_data_set_double(_settings, "picture_scale", float(scale))
            _ui["picture_scale"] = float(scale)


def script_properties():
    props = obs.obs_properties_create()
    status, link, note, headline = _controller.view() if _controller else (None, None, "", "offline")
    known = status or (_controller.last_known_status() if _controller else None)
    _mirror_engine_values(status)

    source = _controller.source_state if _controller else None
    failure = failure_text(_S["engine"]) if status else ""
    _text_info(props, "status_text", "Engine", format_status(status, link, note, headline, source, failure))
    obs.obs_properties_add_button(props, "refresh", "Refresh", _on_refresh)

    obs.obs_properties_add_text(props, "prompt", "Prompt", obs.OBS_TEXT_MULTILINE)
    obs.obs_properties_add_text(props, "prompt2", "Second prompt (blend)", obs.OBS_TEXT_MULTILINE)
    obs.obs_properties_add_float_slider(props, "blend", "Mix of the second prompt", 0.0, 1.0, 0.05)
    obs.obs_properties_add_text(props, "negative_prompt", "Negative prompt", obs.OBS_TEXT_MULTILINE)
    t = obs.obs_properties_add_float_slider(props, "transition_s", "Transition (seconds)", 0.0, MAX_TRANSITION_S, 0.5)
    if hasattr(obs, "obs_property_set_long_description"):
        obs.obs_property_set_long_description(t, "How long a new prompt, negative prompt, style or seed takes to move "
                                                 "in (0: at once). The 'apply prompt at once' hotkey skips it.")
    obs.obs_properties_add_button(props, "apply_prompt", "Apply prompt", _on_apply_prompt)

    styles = list((known or {}).get("styles") or []) or list(_last_styles)
    _last_styles[:] = styles
    missing = styles_missing(known)
    lst = obs.obs_properties_add_list(props, "style", "Style", obs.OBS_COMBO_TYPE_LIST, obs.OBS_COMBO_FORMAT_STRING)
    current = _ui.get("style", "")
    if current and current not in styles:
        obs.obs_property_list_add_string(lst, current, current)
    for name in styles:
        if isinstance(name, str):
            label = style_label(name, missing, style_loading(known))
            idx = obs.obs_property_list_add_string(lst, label, name)
            if name in missing and hasattr(obs, "obs_property_list_item_disable"):
                obs.obs_property_list_item_disable(lst, idx, True)  # listed, marked, not selectable
    if not styles:
        obs.obs_property_set_long_description(lst, "The list fills in once the engine is reachable (press Refresh).")
    elif missing:
        obs.obs_property_set_long_description(lst, "Not downloaded yet (the hotkeys pass over them): "
                                              + "; ".join(f"{n}: {missing[n]}" for n in sorted(missing)))

    obs.obs_properties_add_float_slider(props, "strength", "Strength", 0.05, 1.0, 0.05)
    g = obs.obs_properties_add_float_slider(props, "guidance", "Guidance (above 1: the negative prompt steers)", 1.0, 5.0, 0.1)
    if hasattr(obs, "obs_property_set_long_description"):
        obs.obs_property_set_long_description(g, "Classifier-free guidance. 1: none (fastest). Above 1 the model also "
                                                 "runs the negative prompt and steers away from it, doing twice the work.")
    obs.obs_properties_add_int(props, "seed", "Seed", 0, SEED_MAX_UI, 1)
    obs.obs_properties_add_button(props, "apply_seed", "Apply seed", _on_apply_seed)
    # A style picture (IP-Adapter): chosen here, its bytes go to the engine; only where the engine has one.
    pictures = isinstance((known or {}).get("style_image_scale"), (int, float))
    pic = obs.obs_properties_add_path(props, "style_picture", "Style picture", obs.OBS_PATH_FILE,
                                      "Pictures (*.png *.jpg *.jpeg *.webp)", None)
    sc = obs.obs_properties_add_float_slider(props, "picture_scale", "Picture scale", 0.0, 2.0, 0.05)
    clr = obs.obs_properties_add_button(props, "clear_picture", "Clear style picture", _on_clear_picture)
    if hasattr(obs, "obs_property_set_long_description"):
        obs.obs_property_set_long_description(pic, "The stream takes the picture's look beside the prompt (PNG, JPEG or "
                                              "WebP, up to 8 MB); sent to the engine when chosen. Needs an engine "
                                              "started with --ip-adapter.")
    if known is not None and not pictures:
        for prop in (pic, sc, clr):
            obs.obs_property_set_enabled(prop, False)
    paused = _controller.paused_shown() if _controller is not None else bool((known or {}).get("paused"))
    obs.obs_properties_add_button(props, "pause_resume", pause_label(paused), _on_pause_resume)
    obs.obs_properties_add_button(props, "reset", "Reset", _on_reset)
    obs.obs_properties_add_button(props, "add_to_scene", "Add engine output to scene", _on_add_to_scene)
    obs.obs_properties_add_button(props, "open_dock", "Open dock in browser", _on_open_dock)
    url = dock_url(_ui.get("api_url", DEFAULT_API_URL))
    _text_info(
        props,
        "dock_note",
        "Dock",
        f"To keep the controls in a dock: Docks > Custom Browser Docks, name 'Live2Diff', URL {url} "
        "(OBS builds without browser support, e.g. Debian's, have no browser docks: use 'Open dock in browser').",
    )

    eng = obs.obs_properties_create()
    obs.obs_properties_add_text(eng, "engine_command", "Command line", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_path(eng, "engine_venv", "Engine venv folder (optional)", obs.OBS_PATH_DIRECTORY, None, None)
    obs.obs_properties_add_bool(eng, "stop_engine_on_exit", "Stop the engine when OBS exits")
    vc = obs.obs_properties_add_bool(eng, "engine_virtual_camera", "Also publish a virtual camera")
    if hasattr(obs, "obs_property_set_long_description"):
        obs.obs_property_set_long_description(
            vc, "Off: OBS shows the engine through its Live2Diff source and OBS's own Virtual Camera stays free "
                "(Start Virtual Camera sends your whole scene). On: the engine also publishes a virtual camera "
                "itself; on Windows and macOS that is OBS's Virtual Camera, which OBS then cannot start. "
                "Ignored when the command line names a --sink.")
    running = _S["engine"].running()
    b = obs.obs_properties_add_button(eng, "start_engine", "Start engine", _on_start_engine)
    obs.obs_property_set_enabled(b, not running)
    b = obs.obs_properties_add_button(eng, "stop_engine", "Stop engine", _on_stop_engine)
    obs.obs_property_set_enabled(b, running)
    obs.obs_properties_add_group(props, "engine_group", "Engine process", obs.OBS_GROUP_NORMAL, eng)

    conn = obs.obs_properties_create()
    obs.obs_properties_add_text(conn, "api_url", "Engine API URL", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_text(conn, "api_token", "API token", obs.OBS_TEXT_PASSWORD)
    obs.obs_properties_add_text(conn, "ws_password", "obs-websocket password (empty: OBS's own)", obs.OBS_TEXT_PASSWORD)
    obs.obs_properties_add_int(conn, "ws_port", "obs-websocket port (0: OBS's own)", 0, 65535, 1)
    obs.obs_properties_add_group(props, "connection_group", "Connection", obs.OBS_GROUP_NORMAL, conn)
    return props


def script_update(settings):
    global _settings
    _settings = settings
    new = _read_settings(settings)
    _S["stop_on_exit"] = bool(new["stop_engine_on_exit"])
    with _ui_lock:
        old = dict(_ui)
        _ui.update(new)
    if _controller is None:
        return
    if _transport_config(old) != _transport_config(new):
        _controller.configure(_transport_config(new))
    if not old:
        return  # the first update (script load): nothing was changed by the user
    if new["style"] and new["style"] != old.get("style"):
        _controller.send("set_style", style=new["style"], **transition_args(new))
    if abs(new["strength"] - old.get("strength", new["strength"])) > 1e-6 and new["strength"] > 0:
        _controller.send("set_strength", strength=round(float(new["strength"]), 4))
    if abs(new["guidance"] - old.get("guidance", new["guidance"])) > 1e-6 and new["guidance"] >= 1.0:
        _controller.send("set_guidance", guidance=round(float(new["guidance"]), 3))
    if new["style_picture"] and new["style_picture"] != old.get("style_picture"):
        _controller.send_picture(new["style_picture"])
    if abs(new["picture_scale"] - old.get("picture_scale", new["picture_scale"])) > 1e-6:
        _controller.send("set_style_image_scale", scale=round(float(new["picture_scale"]), 3))


def script_load(settings):
    global _controller, _settings, _last_key, _keeper
    _settings = settings
    _last_key = None
    _keeper = SourceKeeper()
    with _ui_lock:
        _ui.clear()
        _engine_text.clear()
        ui = _read_settings(settings)
    _controller = Controller(_transport_config(ui), local_engine=lambda: _S.get("engine")).start()
    if obsws_python is None:
        _controller.log(f"{LOG_PREFIX} obsws-python is not installed for OBS's Python: using the engine's HTTP API")
    actions = _hotkey_actions()
    for name, description in HOTKEYS:
        hid = obs.obs_hotkey_register_frontend(name, description, _hk(actions[name]))
        _hotkeys[name] = hid
        arr = obs.obs_data_get_array(settings, _hotkey_setting(name))
        obs.obs_hotkey_load(hid, arr)
        obs.obs_data_array_release(arr)
    obs.timer_add(_tick, 250)
    eng: EngineProcess = _S["engine"]
    if eng.running():
        _controller.log(f"{LOG_PREFIX} the engine started earlier (pid {eng.pid}) is still running")


def script_save(settings):
    for name, hid in _hotkeys.items():
        arr = obs.obs_hotkey_save(hid)
        obs.obs_data_set_array(settings, _hotkey_setting(name), arr)
        obs.obs_data_array_release(arr)


def script_unload():
    global _controller, _settings
    ctl, _controller = _controller, None
    if ctl is not None:
        ctl.stop(timeout=3.0)
        for level, text in ctl.drain_logs():
            _log(text, level)
    eng: EngineProcess = _S["engine"]
    if eng.running():
        when = "when OBS exits" if _S.get("stop_on_exit", True) else "only by 'Stop engine'"
        _log(f"{LOG_PREFIX} script unloaded; the engine (pid {eng.pid}) is left running (a script reload keeps it) and is stopped {when}")
    _hotkeys.clear()
    _settings = None
