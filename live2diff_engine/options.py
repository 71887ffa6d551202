"""What several commands share: the model, input/output and control options, device and dtype,
the control settings (options, environment, config file) and the warning on secrets typed on a
command line. Below `commands/` and `assemble.py`; imports nothing above it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16", "float64")
ACCELERATE_HELP = ("how the stream step runs: off (eager), compile (torch.compile), cudagraph (compile + CUDA graph, "
                   "CUDA only), auto (default: cudagraph on CUDA, off on the CPU, where compiling costs minutes)")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def resolve_device(name: str | None):
    """``None`` means CUDA when present, else the CPU. An unavailable device is a user error."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available here; use --device cpu, or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps requested but Metal is not available here; use --device cpu")
    return device


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 512x512, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


_SCALE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def parse_lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE``: the scale is what follows the last colon, a plain number. A colon
    that belongs to the path is no scale: a Windows drive (``C:\\loras\\x.safetensors``,
    ``C:/x.safetensors``, ``C:x.safetensors``) or a file that exists under the whole name."""
    head, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or (len(head) == 1 and head.isalpha()) or Path(text).expanduser().is_file():
        return text, 1.0
    example = f"{head or 'style.safetensors'}:0.8"
    if not head:
        raise argparse.ArgumentTypeError(f"{text!r} names no file; expected FILE or FILE:SCALE, e.g. {example}")
    if not tail:
        raise argparse.ArgumentTypeError(f"{text!r} has no scale after the ':'; expected FILE or FILE:SCALE, e.g. {example}")
    if not _SCALE.fullmatch(tail):
        raise argparse.ArgumentTypeError(f"the LoRA scale {tail!r} in {text!r} is not a number; expected FILE or FILE:SCALE, e.g. {example}")
    scale = float(tail)
    if scale != scale or abs(scale) == float("inf"):
        raise argparse.ArgumentTypeError(f"the LoRA scale {tail!r} in {text!r} is not a finite number; e.g. {example}")
    return head, scale


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_io_args(p: argparse.ArgumentParser) -> None:
    """Where frames come from and go to: the same options for `run` and `connect`."""
    io = p.add_argument_group("input and output")
    io.add_argument("--source", default="camera:0", help="camera[:INDEX] (default camera:0), video:PATH, images:DIR, synthetic, "
                    "obs-filter[:PORT] (frames from OBS's Live2Diff filter on 127.0.0.1, default port 8766; they go back to it)")
    io.add_argument("--camera-size", type=parse_size, default=None, metavar="WxH", help="ask the camera (or synthetic source) for this size")
    io.add_argument("--camera-fps", type=float, default=None, help="ask the camera (or synthetic source) for this rate")
    io.add_argument("--loop", action="store_true", help="restart a video or image folder when it ends")
    io.add_argument("--sink", action="append", default=None, help="virtualcam[:BACKEND] (default), window, file:PATH, null; repeatable")
    io.add_argument("--vcam-device", default=None, help="virtual camera device (e.g. /dev/video10 on Linux)")
    io.add_argument("--vcam-fps", type=float, default=None, help="virtual camera frame rate (default: the source's)")
    io.add_argument("--mirror", action="store_true", help="mirror the virtual camera picture")
    io.add_argument("--max-frames", type=int, default=None, help="stop after this many input frames")
    io.add_argument("--stats", metavar="FILE", default=None, help="write live figures as JSON every few seconds and on exit")


def add_model_args(p: argparse.ArgumentParser) -> None:
    from .threads import add_threads_arg

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["tiny"], help="tiny: a random-weight miniature for checks (its output is noise, not a style)")
    g.add_argument("--base", default="sd15",
                   help="Stable Diffusion 1.5: a diffusers folder, its unet/ folder, a single-file checkpoint (.safetensors, "
                   "e.g. from civitai) or a hub id (default: sd15 = stable-diffusion-v1-5/stable-diffusion-v1-5)")
    g.add_argument("--base-config", metavar="FOLDER", default=None,
                   help="a diffusers folder whose configs describe a single-file --base (default: SD1.5's, shipped with the engine)")
    g.add_argument("--motion", default="live2diff", help="Live2Diff motion checkpoint: file or hub id (default: live2diff = Leoxing/Live2Diff)")
    g.add_argument("--depth", default="midas", help="depth estimator: midas (default), depth-anything, or KIND=PATH")
    g.add_argument("--vae", default="full", help="full (SD's VAE, default) or taesd (fast) or a TAESD folder")
    g.add_argument("--no-lcm-lora", action="store_true", help="do not apply the LCM-LoRA few-step adapter")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda when present)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default float16 on CUDA, float32 elsewhere")
    g.add_argument("--accelerate", default="auto", choices=["off", "compile", "cudagraph", "auto"],
                   help="how the stream step runs: off (eager), compile (torch.compile), cudagraph (compile + CUDA graph, "
                   "CUDA only), auto (default: cudagraph on CUDA, off on the CPU, where compiling costs minutes)")
    add_threads_arg(g)
    s = p.add_argument_group("style")
    s.add_argument("--style", default=None, help="a style name from the styles file (default: default)")
    s.add_argument("--styles", metavar="FILE", default=None, help="your styles file (default: see `live2diff-engine styles path`)")
    s.add_argument("--lora", action="append", type=parse_lora, default=[], metavar="FILE[:SCALE]", help="an extra LoRA (repeatable)")
    s.add_argument("--prompt", default="", help="what the picture shows, e.g. 'a man with glasses'; a blend of up to 4 prompts: "
                   "'a fox:0.7|a wolf:0.3' (weights normalised)")
    s.add_argument("--negative-prompt", default="", help="what it should not show; takes effect with --guidance above 1")
    s.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (default 1: none, as Live2Diff; above 1 costs a second UNet branch)")
    steps = s.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="number of denoising steps (1-4) with the configs' usual timesteps")
    steps.add_argument("--t-index-list", type=int_list, help="denoising steps as schedule indices, e.g. 32,45")
    steps.add_argument("--strength", type=float, help="denoise the last int(num_inference_steps * strength) steps")
    s.add_argument("--num-inference-steps", type=int, default=None, help="length of the LCM schedule (default 50)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--style-image", metavar="FILE", default=None,
                   help="a picture (PNG, JPEG, WebP) whose look the stream takes, beside the prompt (IP-Adapter; "
                   "implies --ip-adapter); live: the dock's drop zone, `ctl style-image FILE`")
    s.add_argument("--style-image-scale", type=float, default=None, metavar="S",
                   help="how strongly the style picture steers: 0 to 2 (default 1: as the IP-Adapter was trained)")
    s.add_argument("--ip-adapter", nargs="?", const="ip-adapter", default=None, metavar="SOURCE",
                   help="load the SD1.5 IP-Adapter so that style pictures can be set live (default source: ip-adapter = "
                   "h94/IP-Adapter's ip-adapter_sd15.safetensors; or a file or hub id); with --model tiny and no SOURCE "
                   "a random miniature")
    s.add_argument("--image-encoder", default=None, metavar="SOURCE",
                   help="the IP-Adapter's CLIP image encoder: a folder or hub id (default: image-encoder = "
                   "h94/IP-Adapter models/image_encoder)")
    f = p.add_argument_group("frames")
    f.add_argument("--width", type=int, default=None, help="model width, any multiple of 8 (default 512; 64 for tiny)")
    f.add_argument("--height", type=int, default=None, help="model height, any multiple of 8 (default 512; 64 for tiny), "
                   "e.g. 640x360 or 768x432 for a 16:9 camera")
    f.add_argument("--fit", choices=["crop", "letterbox"], default="crop",
                   help="how frames of another shape fit the model size: crop (default) keeps the centre with the "
                   "model's aspect ratio, letterbox keeps the whole frame between black bars; the output shows what the "
                   "model saw, fitted inside the output size, never cropped again (at the input's size: not zoomed)")
    f.add_argument("--output-size", type=parse_size, default=None, metavar="WxH", help="output frame size (default: the input's)")
    f.add_argument("--similarity-threshold", type=float, default=None, help="skip diffusion for frames this similar to the last (e.g. 0.98)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """`run`'s options; saved_settings reads them back to tell which ones were typed."""
    add_io_args(p)
    add_model_args(p)
    add_control_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="start from the defaults, not from the settings the last run left (prompt, style, strength ...)")


def add_control_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live control (local API, OBS)")
    g.add_argument("--config", metavar="FILE", default=None, help=f"config file (default: {default_config_shown()})")
    g.add_argument("--api-host", default=None, help="address of the local API and dock (default 127.0.0.1; beyond it needs --api-token)")
    g.add_argument("--api-port", type=int, default=None, help="port of the local API (default 8765; 0 picks a free one)")
    g.add_argument("--api-token", default=None, help="token the API asks for (or LIVE2DIFF_API_TOKEN); never printed")
    g.add_argument("--no-api", action="store_true", help="no local API, dock or output stream")
    g.add_argument("--obs", action="store_true", help="connect to OBS's WebSocket server for live control from OBS")
    g.add_argument("--obs-host", default=None, help="OBS WebSocket host (default 127.0.0.1)")
    g.add_argument("--obs-port", type=int, default=None, help="OBS WebSocket port (default 4455)")
    g.add_argument("--obs-password", default=None, help="OBS WebSocket password (or OBS_WEBSOCKET_PASSWORD, or the config file); never printed")
    g.add_argument("--obs-source", choices=["auto", "browser", "media"], default=None,
                   help="what 'add to scene' creates in OBS: browser (Browser Source), media (Media Source), auto (default)")
    g.add_argument("--obs-lipsync", metavar="AUDIO_INPUT", default=None,
                   help="keep this OBS audio input's sync offset at the video latency (e.g. 'Mic/Aux')")
    g.add_argument("--obs-lipsync-extra-ms", type=int, default=None, help="added to the measured latency for lip sync (default 0)")


def default_config_shown() -> str:
    """The config file's default place as this OS has it (%APPDATA% on Windows), for --help."""
    from .config import config_file

    try:
        return str(config_file()).replace("%", "%%")  # argparse formats help with %
    except Exception:  # no home folder: say where it would be
        return "live2diff/config.toml in the user's config folder"


def control_settings(args) -> dict:
    """API and OBS settings from options, environment and the config file, in that order."""
    import os

    from .config import load_config

    cfg = load_config(args.config)
    api_cfg, obs_cfg = cfg.get("api", {}), cfg.get("obs", {})

    def pick(option, env, section, key, default):
        if option is not None:
            return option
        if env and os.environ.get(env):
            return os.environ[env]
        return section.get(key, default)

    api = None
    if not args.no_api and api_cfg.get("enabled", True):
        api = {
            "host": pick(args.api_host, None, api_cfg, "host", "127.0.0.1"),
            "port": int(pick(args.api_port, None, api_cfg, "port", 8765)),
            "token": pick(args.api_token, "LIVE2DIFF_API_TOKEN", api_cfg, "token", None),
        }
        if not 0 <= api["port"] <= 65535:
            raise ConfigError(f"--api-port must be 0 to 65535, got {api['port']}")
    obs = None
    if args.obs or obs_cfg.get("enabled", False):
        obs = {
            "host": pick(args.obs_host, None, obs_cfg, "host", "127.0.0.1"),
            "port": int(pick(args.obs_port, None, obs_cfg, "port", 4455)),
            "password": pick(args.obs_password, "OBS_WEBSOCKET_PASSWORD", obs_cfg, "password", ""),
            "source": pick(args.obs_source, None, obs_cfg, "source", "auto"),
            "lipsync_input": pick(args.obs_lipsync, None, obs_cfg, "lipsync_input", None),
            "lipsync_extra_ms": int(pick(args.obs_lipsync_extra_ms, None, obs_cfg, "lipsync_extra_ms", 0)),
        }
        if not obs["password"]:  # none given: the one in OBS's own settings, if OBS is on this machine
            own = obs_own_settings()
            if own is not None:
                obs["password"] = own["password"] if own.get("auth_required", True) else ""
                if args.obs_port is None and "port" not in obs_cfg:
                    obs["port"] = own["port"]
                obs["from"] = f"OBS's own settings ({own['source']})"
        if obs["source"] not in ("auto", "browser", "media"):
            raise ConfigError(f"[obs] source must be auto, browser or media, got {obs['source']!r}")
        if not 1 <= obs["port"] <= 65535:
            raise ConfigError(f"--obs-port must be 1 to 65535, got {obs['port']}")
    return {"api": api, "obs": obs}


def warn_secrets_on_command_line(args, say) -> None:
    """An option's value is in the process list, where every user of the machine can read it: say
    so (never the value) and where the secret goes instead."""
    from .config import config_file

    for option, value, env, key in (("--obs-password", args.obs_password, "OBS_WEBSOCKET_PASSWORD", "password under [obs]"),
                                    ("--api-token", args.api_token, "LIVE2DIFF_API_TOKEN", "token under [api]")):
        if value:
            say(f"warning: {option} is visible to every user of this machine in the process list; "
                f"put it in the environment variable {env} or as {key} in {args.config or config_file()} instead")


def ctl_hint(api_url: str, config_path: str | None) -> str:
    """The `ctl status` command that reaches this engine: with ``--api`` where ctl's default
    address (the config file's, else 127.0.0.1:8765) is another one (``--api-port 0``, another
    port), and with ``--config`` where the engine read another config file than the default."""
    from .config import load_config

    try:
        cfg = load_config(config_path).get("api", {})
    except Exception:  # the engine read it already; a hint is never worth an error
        cfg = {}
    default = f"http://{cfg.get('host', '127.0.0.1')}:{cfg.get('port', 8765)}"
    parts = ["live2diff-engine", "ctl"]
    if config_path:
        parts += ["--config", _quoted(str(config_path))]
    if api_url.rstrip("/") != default:
        parts += ["--api", api_url.rstrip("/")]
    return " ".join(parts + ["status"])


def _quoted(text: str) -> str:
    import os
    import shlex

    return shlex.quote(text) if os.name != "nt" else (f'"{text}"' if " " in text else text)


def obs_own_settings(environ: dict | None = None, home: str | None = None) -> dict | None:
    """obs-websocket's port and password as OBS itself keeps them on this machine, for a user who
    gave none: {"port", "password", "auth_required", "source"} or None. The same reader as the OBS
    script's (which must stay one self-contained file)."""
    import os
    import platform
    from pathlib import Path

    from .installer import obs_config_dirs
    from .obs_scripts.live2diff_obs import read_websocket_config

    env = dict(os.environ if environ is None else environ)
    for folder in obs_config_dirs(platform.system(), home or str(Path.home()), env):
        found = read_websocket_config(folder)
        if found:
            return found
    return None


def add_relay_only_arg(group) -> None:
    """--ice-relay-only for the remote commands (serve, connect, doctor)."""
    group.add_argument("--ice-relay-only", action="store_true",
                       help="use only the TURN server's relay for media (ICE transport policy \"relay\"): this side "
                       "offers no address of its own, so every stream goes through the TURN server; needs a TURN "
                       "server (LIVE2DIFF_ICE_SERVERS or --ice-server). To test a TURN server, or for a network that "
                       "allows nothing else")


def add_link_args(group) -> None:
    """--max-bitrate and --codec for the remote commands (serve, connect): the same words on both ends."""
    group.add_argument("--max-bitrate", type=int, metavar="KBPS", default=None,
                       help="cap the video this side sends at KBPS kilobits per second (default: aiortc's own, up to "
                       "1500 for VP8, 3000 for H.264)")
    group.add_argument("--redundancy", choices=("auto", "on", "off"), default="auto",
                       help="send each media packet twice, so a lost one needs no retransmission round trip: "
                       "auto (default) while the other side reports loss (from 2 %% on, until a minute without "
                       "any), on always, off never. Doubles the bitrate while on")
    group.add_argument("--codec", choices=("vp8", "h264"), default=None,
                       help="the video codec to use (default: what both ends have, VP8 first)")
