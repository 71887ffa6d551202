"""The user's config file (TOML): defaults for the OBS connection and the local API, so that a
password need not be typed on a command line.

    [obs]
    enabled = true          # connect to OBS without --obs
    host = "127.0.0.1"
    port = 4455
    password = "..."        # OBS: Tools > WebSocket Server Settings > Show Connect Info
    lipsync_input = "Mic/Aux"

    [api]
    host = "127.0.0.1"
    port = 8765
    token = "..."           # required when host is not loopback

    [civitai]
    token = "..."           # lets `models download --style` and the dock fetch civitai styles

    [control]
    transition_s = 0        # seconds a prompt/style/seed change takes to move in (0-10; 0: at once)

Options on the command line win, then the environment (OBS_WEBSOCKET_PASSWORD,
LIVE2DIFF_API_TOKEN, CIVITAI_TOKEN), then this file.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

def home() -> Path:
    """The engine's own folder for user files (config, styles file, downloaded style weights)."""
    if os.environ.get("LIVE2DIFF_HOME"):
        return Path(os.environ["LIVE2DIFF_HOME"]).expanduser()
    if os.name == "nt":
        return Path(os.environ.get("APPDATA", Path.home())) / "live2diff"
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "live2diff"


SCHEMA = {
    "obs": {"enabled": bool, "host": str, "port": int, "password": str, "lipsync_input": str, "lipsync_extra_ms": int, "source": str},
    "api": {"host": str, "port": int, "token": str, "enabled": bool},
    "civitai": {"token": str},
    "control": {"transition_s": float},
}


def civitai_token(config: dict | None = None) -> str | None:
    """The civitai API token: CIVITAI_TOKEN, else the config file's [civitai] token (None: none)."""
    if os.environ.get("CIVITAI_TOKEN", "").strip():
        return os.environ["CIVITAI_TOKEN"].strip()
    token = ((config if config is not None else {}).get("civitai") or {}).get("token", "")
    return token.strip() or None


def default_transition(config: dict | None = None) -> float:
    """The config file's [control] transition_s (0 to 10 s), 0 when it has none."""
    value = ((config if config is not None else {}).get("control") or {}).get("transition_s", 0.0)
    if not 0.0 <= value <= 10.0:
        raise ConfigError(f"config file: [control] transition_s must be 0 to 10 seconds, got {value:g}")
    return float(value)


def config_file() -> Path:
    return Path(os.environ["LIVE2DIFF_CONFIG"]).expanduser() if os.environ.get("LIVE2DIFF_CONFIG") else home() / "config.toml"


def load_config(path: str | os.PathLike | None = None) -> dict:
    """{section: {key: value}}; a missing default file is an empty config, a broken one an error."""
    explicit = path is not None
    p = Path(path).expanduser() if explicit else config_file()
    if not p.is_file():
        if explicit:
            raise ConfigError(f"config file {p} does not exist")
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    out: dict = {}
    for section, values in data.items():
        if section not in SCHEMA or not isinstance(values, dict):
            raise ConfigError(f"config file {p}: unknown section [{section}]; known: {', '.join('[' + s + ']' for s in SCHEMA)}")
        for key, value in values.items():
            want = SCHEMA[section].get(key)
            if want is None:
                raise ConfigError(f"config file {p}: [{section}] has no setting {key!r}; known: {', '.join(SCHEMA[section])}")
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = values[key] = float(value)
            if not isinstance(value, want) or (want in (int, float) and isinstance(value, bool)):
                raise ConfigError(f"config file {p}: [{section}] {key} must be a {want.__name__}")
        out[section] = dict(values)
    return out
