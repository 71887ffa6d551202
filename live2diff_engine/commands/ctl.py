"""`live2diff-engine ctl`: control a running engine through its local API."""

from __future__ import annotations

import sys

from ..errors import ConfigError, UserError
from ..options import default_config_shown


def add_parser(sub) -> None:
    ctl = sub.add_parser(
        "ctl",
        help="control a running engine: prompt, style, strength, pause, status ...",
        description="Talk to a running engine through its local API. Actions: status, styles, prompt TEXT, "
        "negative TEXT, guidance X (1-20), style NAME, strength X (0-1], steps N (1-4), seed N, pause, resume, reset, add-to-scene [SCENE], "
        "download STYLE (fetch a style's weights in the engine; needs a civitai token there for civitai styles), "
        "style-image FILE (a picture whose look the stream takes: read here, its bytes uploaded; --clear drops it), "
        "style-image-scale S (0-2). "
        "A prompt may be a blend of up to 4 prompts: 'a fox:0.7|a wolf:0.3' (weights normalised).",
    )
    ctl.add_argument("action", choices=sorted(CTL_ACTIONS), metavar="ACTION", help=", ".join(sorted(CTL_ACTIONS)))
    ctl.add_argument("value", nargs="?", default=None, help="the new value, where the action takes one")
    ctl.add_argument("--api", default=None, help="the engine's API address (default http://127.0.0.1:8765, or the config file's)")
    ctl.add_argument("--token", default=None, help="API token, where the engine has one (or LIVE2DIFF_API_TOKEN)")
    ctl.add_argument("--config", metavar="FILE", default=None, help=f"config file (default: {default_config_shown()})")
    ctl.add_argument("--json", action="store_true", help="print the engine's reply as JSON")
    ctl.add_argument("--clear", action="store_true", help="with style-image: drop the style picture")
    ctl.add_argument("--transition", type=float, default=None, metavar="SECONDS",
                     help="for prompt, negative, style and seed: move to the new value over this many seconds "
                     "(0-10; 0: at once; default: the engine's config)")


CTL_ACTIONS = {
    # action: (command, field, type)
    "status": ("status", None, None),
    "styles": ("status", None, None),
    "prompt": ("set_prompt", "prompt", str),
    "negative": ("set_negative_prompt", "negative_prompt", str),
    "guidance": ("set_guidance", "guidance", float),
    "style": ("set_style", "style", str),
    "strength": ("set_strength", "strength", float),
    "steps": ("set_steps", "steps", int),
    "seed": ("set_seed", "seed", int),
    "pause": ("pause", None, None),
    "resume": ("resume", None, None),
    "reset": ("reset", None, None),
    "add-to-scene": ("add_to_scene", "scene", str),
    "download": ("download_style", "style", str),
    "style-image": (None, None, None),  # the picture's bytes go to POST /api/style-image (or clear_style_image)
    "style-image-scale": ("set_style_image_scale", "scale", float),
}

_PICTURE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def _picture(path: str) -> tuple[bytes, str]:
    """A local picture file's bytes and content type (PNG, JPEG or WebP, judged from its first bytes)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"`ctl style-image {path}`: {'that is a folder' if p.is_dir() else 'file not found'}; give a PNG, JPEG or WebP picture")
    limit = 8 * 1024 * 1024  # the engine's cap (models.ip_adapter.MAX_PICTURE_BYTES), without loading torch here
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"`ctl style-image {path}`: the picture is larger than {limit} bytes; use a smaller PNG or JPEG")
    kind = next((t for magic, t in _PICTURE_MAGIC if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "image/webp"
    if kind is None:
        raise ConfigError(f"`ctl style-image {path}`: not a PNG, JPEG or WebP picture")
    return data, kind


def _cmd_ctl(args) -> int:
    import json
    import os
    import urllib.error
    import urllib.request

    from ..config import load_config
    from ..control.schema import command_message

    cmd, field, kind = CTL_ACTIONS[args.action]
    if args.clear and args.action != "style-image":
        raise ConfigError(f"--clear goes with `ctl style-image`, not `ctl {args.action}`")
    msg_args = {}
    if args.transition is not None:
        from ..pipeline.blend import BlendError, check_transition

        if args.action not in TRANSITION_ACTIONS:
            raise ConfigError(f"--transition goes with {', '.join(TRANSITION_ACTIONS)}, not `ctl {args.action}`")
        try:
            msg_args["transition_s"] = check_transition(args.transition, "--transition")
        except BlendError as exc:
            raise ConfigError(str(exc)) from None
    if field is not None:
        if args.value is None and args.action != "add-to-scene":
            raise ConfigError(f"`ctl {args.action}` needs a value, e.g. `ctl {args.action} {_CTL_EXAMPLES[args.action]}`")
        if args.value is not None:
            try:
                msg_args[field] = kind(args.value)
            except ValueError:
                raise ConfigError(f"`ctl {args.action}` needs a {kind.__name__}, got {args.value!r}") from None
    elif args.value is not None and args.action != "style-image":
        raise ConfigError(f"`ctl {args.action}` takes no value")
    if args.action == "prompt":
        from ..pipeline.blend import BlendError, parse_notation

        try:
            prompt = parse_notation(msg_args["prompt"])
        except BlendError as exc:
            raise ConfigError(f"`ctl prompt`: {exc}") from None
        if not isinstance(prompt, str):
            msg_args["prompt"] = [{"text": t, "weight": w} for t, w in prompt]
    path, content_type = "/api/command", "application/json"
    if args.action == "style-image":
        if args.clear == (args.value is not None):
            raise ConfigError("`ctl style-image` takes a picture file, or --clear to drop the picture: "
                              "e.g. `ctl style-image look.png`")
        if args.clear:
            cmd = "clear_style_image"
        else:
            body, content_type = _picture(args.value)
            path = "/api/style-image"
    cfg = load_config(args.config).get("api", {})
    base = (args.api or f"http://{cfg.get('host', '127.0.0.1')}:{cfg.get('port', 8765)}").rstrip("/")
    token = args.token or os.environ.get("LIVE2DIFF_API_TOKEN") or cfg.get("token")
    if path == "/api/command":
        body = json.dumps(command_message(cmd, **msg_args)).encode()
    req = urllib.request.Request(f"{base}{path}", data=body, method="POST", headers={"Content-Type": content_type})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=130) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reply = json.loads(exc.read())
        except ValueError:
            raise UserError(f"the engine at {base} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"no engine answers at {base} ({getattr(exc, 'reason', exc)}): start one with `live2diff-engine run`, "
                        "or give --api") from None
    except ValueError:
        raise UserError(f"{base} did not answer like a live2diff engine") from None
    if args.json:
        print(json.dumps(reply, indent=1))
    if not reply.get("ok"):
        if not args.json:
            print(f"live2diff-engine: refused: {reply.get('error', 'unknown error')}", file=sys.stderr)
        return 1
    if args.json:
        return 0
    status = reply.get("status") or {}
    if args.action == "styles":
        missing = status.get("styles_missing") or {}
        for name in status.get("styles", []):
            line = ("* " if name == status.get("style") else "  ") + name
            print(f"{line:24} missing: {missing[name]}" if name in missing else line)
    elif args.action == "status":
        lat = status.get("latency_ms")
        print(f"state: {status.get('state')}  fps: {status.get('fps')}  latency: {lat if lat is not None else '-'} ms  "
              f"frames: {status.get('frames_out')}")
        loading = f" (loading {status['style_loading']} ...)" if status.get("style_loading") else ""
        print(f"style: {status.get('style')}{loading}  strength: {status.get('strength')}  steps: {status.get('steps')}  "
              f"seed: {status.get('seed')}")
        print(f"prompt: {status.get('prompt')!r}" + (f"  (transition {status['transition']:.0%})" if status.get("transition") is not None else ""))
        if status.get("style_image_scale") is not None:
            loading = " (a new one is being read ...)" if status.get("style_image_loading") else ""
            print(f"style picture: {status.get('style_image') or 'none'}  scale: {status['style_image_scale']:g}{loading}")
        if status.get("negative_prompt") or status.get("guidance", 1) > 1:
            print(f"negative prompt: {status.get('negative_prompt')!r}  guidance: {status.get('guidance')}")
        obs_source = {"pulling": " (pulls the stream)", "not pulling": " (OBS source not pulling the stream)",
                      "absent": " (no Live2Diff source: `ctl add-to-scene`)"}.get(status.get("obs_source"), "")
        print(f"OBS: {status.get('obs')}{obs_source}  model: {status.get('model')}  {status.get('size')}")
        if status.get("node"):  # a fleet session (`serve --ray`): the node that serves it
            print(f"node: {status['node']}")
        if isinstance(status.get("link"), dict):  # a remote stream (connect, or a serve session)
            from ..remote.link import describe

            print(describe(status["link"]))
        dl = status.get("download")
        if isinstance(dl, dict):
            got = f"{dl.get('bytes', 0) / 1e6:.1f}" + (f" of {dl['total'] / 1e6:.1f}" if dl.get("total") else "") + " MB"
            what = {"downloading": f"{got}, file {dl.get('file_index', 0) + 1} of {dl.get('files')}", "done": "done",
                    "failed": f"failed: {dl.get('error')}"}.get(dl.get("state"), dl.get("state"))
            print(f"download of style {dl.get('style')}: {what}")
    elif args.action == "download":
        print(f"downloading style {args.value}; `live2diff-engine ctl status` shows the progress")
    else:
        print(reply.get("note") or "ok")  # a style says what it changed besides itself
    return 0


TRANSITION_ACTIONS = ("prompt", "negative", "style", "seed")

_CTL_EXAMPLES = {"style-image-scale": "0.7", "download": "toonyou", "prompt": "'a watercolor portrait'", "negative": "'blurry'", "guidance": "1.5", "style": "toonyou", "strength": "0.5",
                 "steps": "2", "seed": "7"}


COMMANDS = {"ctl": (add_parser, _cmd_ctl)}
