"""The one command schema every control path speaks.

A message is a JSON object tagged for this product and versioned::

    {"app": "live2diff", "v": 1, "kind": "command", "cmd": "set_prompt", "prompt": "a fox", "id": "7"}

``id`` (optional, a short string or integer) comes back in the reply. The fields each command
takes are listed in ``COMMANDS``; any other field is an error, so nothing can ride along. No
command names a file or code: a style is a name from the styles file, checked against the known
names. Keys are lower snake case everywhere (obsws-python snake-cases the top-level keys of a
CustomEvent's data, which leaves these as they are).

Replies: ``{"app", "v", "kind": "reply", "id", "ok": bool, "error"?: str, "status"?: {...}}``.
Status (sent on change and once a second): ``{"app", "v", "kind": "status", ...}`` with the
fields of ``Controller.status()``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Collection

from ..errors import one_line
from ..pipeline.blend import MAX_BLEND_ITEMS, BlendError, check_image_scale, check_transition, normalise

APP = "live2diff"
VERSION = 1
MAX_MESSAGE_BYTES = 8192
# The one line every control path (HTTP, the API's WebSocket, OBS CustomEvents) answers a message
# over the limit with; the connection stays open.
TOO_LARGE = f"message too large (at most {MAX_MESSAGE_BYTES} bytes)"
MAX_PROMPT_CHARS = 1000
MAX_NAME_CHARS = 128
MAX_ID_CHARS = 64
MAX_SEED = 2**32 - 1
STEP_CHOICES = (1, 2, 3, 4)
MAX_GUIDANCE = 20.0
INSTANCE_ENV = "LIVE2DIFF_INSTANCE"  # set by a launcher: names the engine it started (see "quit")
_INSTANCE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class CommandError(ValueError):
    """A command that is refused; the message says what is wrong, in one line."""


def _text(value: Any, name: str, limit: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise CommandError(f"{name} is too long ({len(value)} characters, at most {limit})")
    if any(ord(c) < 32 and c not in "\n\t" or ord(c) == 127 for c in value):
        raise CommandError(f"{name} holds control characters")
    value = value.strip()
    if not value and not allow_empty:
        raise CommandError(f"{name} is empty")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CommandError(f"{name} must be a number, got {value!r:.40}")
    return float(value)


def _integer(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise CommandError(f"{name} must be an integer, got {value!r:.40}")
    if not lo <= value <= hi:
        raise CommandError(f"{name} must be {lo} to {hi}, got {value}")
    return value


def _strength(value: Any, ctx) -> float:
    s = _number(value, "strength")
    if not 0.0 < s <= 1.0:
        raise CommandError(f"strength must be above 0 and at most 1, got {s:g}")
    return s


def _guidance(value: Any, ctx) -> float:
    g = _number(value, "guidance")
    if not 1.0 <= g <= MAX_GUIDANCE:
        raise CommandError(f"guidance must be 1 to {MAX_GUIDANCE:g} (1: none), got {g:g}")
    return g


def _style(value: Any, ctx) -> str:
    name = _text(value, "style", MAX_NAME_CHARS, allow_empty=False)
    known = ctx.get("styles")
    if known is not None and name not in known:
        shown = ", ".join(sorted(known)[:20])
        raise CommandError(f"unknown style {name!r:.60}; known styles: {shown}")
    return name


def _prompt(value: Any, ctx) -> str | list[tuple[str, float]]:
    """A prompt: a string, or a blend ``[{"text": ..., "weight": ...}, ...]`` of at most
    :data:`MAX_BLEND_ITEMS` (weights 0 or more, not all 0; normalised to sum to 1). A string is
    always one prompt as typed: the ``a:0.7|b:0.3`` notation is the command line's, not the wire's."""
    if isinstance(value, str):
        return _text(value, "prompt", MAX_PROMPT_CHARS)
    if not isinstance(value, list):
        raise CommandError(f"prompt must be a string or a list of {{\"text\", \"weight\"}} objects, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_BLEND_ITEMS:
        raise CommandError(f"a prompt blend takes 1 to {MAX_BLEND_ITEMS} prompts, got {len(value)}")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"text", "weight"} or "text" not in item:
            raise CommandError(f'prompt blend item {i + 1} must be {{"text": ..., "weight": ...}} and nothing else')
        weight = _number(item.get("weight", 1.0), f"weight of prompt blend item {i + 1}")
        items.append((_text(item["text"], f"text of prompt blend item {i + 1}", MAX_PROMPT_CHARS), weight))
    try:
        return normalise(items)
    except BlendError as exc:
        raise CommandError(str(exc)) from None


def _transition(value: Any, ctx) -> float:
    try:
        return check_transition(value)
    except BlendError as exc:
        raise CommandError(str(exc)) from None


def _image_scale(value: Any, ctx) -> float:
    try:
        return check_image_scale(value)
    except BlendError as exc:
        raise CommandError(str(exc)) from None


def _instance(value: Any) -> str:
    if not isinstance(value, str) or not _INSTANCE.fullmatch(value):
        raise CommandError(f"instance must be 1 to {MAX_ID_CHARS} letters, digits, '-' or '_', got {value!r:.40}")
    return value


# command -> {field: (required, validator(value, ctx) -> clean value)}
COMMANDS: dict[str, dict[str, tuple[bool, Any]]] = {
    # transition_s (0 to 10 s; default: the config's [control] transition_s, else 0): the look moves
    # from the old text to the new over that time instead of at once.
    "set_prompt": {"prompt": (True, _prompt), "transition_s": (False, _transition)},
    "set_negative_prompt": {"negative_prompt": (True, lambda v, c: _text(v, "negative_prompt", MAX_PROMPT_CHARS)),
                            "transition_s": (False, _transition)},
    # transition_s: the style's prompt template moves in over that time (the weights swap at once)
    "set_style": {"style": (True, _style), "transition_s": (False, _transition)},
    "set_strength": {"strength": (True, _strength)},
    "set_steps": {"steps": (True, lambda v, c: _integer(v, "steps", 1, len(STEP_CHOICES)))},
    # transition_s: the stream's noise moves from the old seed's to the new one's (no re-warm)
    "set_seed": {"seed": (True, lambda v, c: _integer(v, "seed", 0, MAX_SEED)), "transition_s": (False, _transition)},
    # Classifier-free guidance: above 1 the negative prompt steers the picture (about 2x the cost).
    "set_guidance": {"guidance": (True, _guidance)},
    # How strongly the style picture (IP-Adapter) steers: 0 to 2, 1 as trained. The picture itself
    # is no command: it comes as an image body (POST /api/style-image), never as a path.
    "set_style_image_scale": {"scale": (True, _image_scale)},
    "clear_style_image": {},
    "pause": {},
    "resume": {},
    "reset": {},
    "status": {},
    # Asks the engine's OBS connection to add its output to a scene (the current one by default).
    "add_to_scene": {"scene": (False, lambda v, c: _text(v, "scene", 256, allow_empty=False))},
    # Starts a background download of a style's files (by the style's name only: where they come
    # from and where they go is the styles file's business); progress is in the status.
    "download_style": {"style": (True, _style)},
    # Ends the engine as Ctrl-C does (outputs closed, a file complete, then the API). Taken only
    # from this machine's own local API (a loopback peer, not relayed by a proxy; with the API's
    # token where it has one), never over obs-websocket or a remote data channel. ``instance``:
    # the LIVE2DIFF_INSTANCE its launcher started it with; a quit naming another instance is
    # refused, so a launcher (the OBS script) stops only the engine it started.
    "quit": {"instance": (False, lambda v, c: _instance(v))},
}
ENVELOPE = {"app", "v", "kind", "cmd", "id"}


@dataclass
class Command:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str | int | None = None

    def message(self) -> dict:
        return command_message(self.cmd, id=self.id, **self.args)


def command_message(cmd: str, id: str | int | None = None, **args) -> dict:
    """A command as it goes on the wire (for clients: ctl, tests, the OBS script)."""
    msg = {"app": APP, "v": VERSION, "kind": "command", "cmd": cmd, **args}
    if id is not None:
        msg["id"] = id
    return msg


def message_id(raw: Any) -> str | int | None:
    """The id of a message, if it has a usable one (for the error reply of a refused command)."""
    if isinstance(raw, dict):
        mid = raw.get("id")
        if isinstance(mid, str) and len(mid) <= MAX_ID_CHARS:
            return mid
        if isinstance(mid, int) and not isinstance(mid, bool) and abs(mid) < 2**53:
            return mid
    return None


def decode(raw: str | bytes | bytearray | dict) -> dict:
    """JSON text (or an already decoded object) -> dict, with the size limit."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_MESSAGE_BYTES:
            raise CommandError(TOO_LARGE)
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("message is not UTF-8 text") from None
    if not isinstance(raw, str):
        raise CommandError("message must be a JSON object")
    if len(raw) > MAX_MESSAGE_BYTES or len(raw.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
        raise CommandError(TOO_LARGE)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise CommandError("message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise CommandError("message must be a JSON object")
    return obj


def parse_command(raw: str | bytes | bytearray | dict, styles: Collection[str] | None = None) -> Command:
    """A validated Command, or CommandError saying what is wrong. ``styles``: the known names."""
    msg = decode(raw)
    if isinstance(raw, dict) and len(json.dumps(raw, default=str)) > MAX_MESSAGE_BYTES:
        raise CommandError(TOO_LARGE)
    if msg.get("app") != APP:
        raise CommandError(f'not a {APP} message (expected "app": "{APP}")')
    v = msg.get("v")
    if v != VERSION or isinstance(v, bool):
        raise CommandError(f"unsupported protocol version {v!r:.20} (this engine speaks v{VERSION})")
    if msg.get("kind", "command") != "command":
        raise CommandError(f"expected a command, got kind {msg.get('kind')!r:.30}")
    cmd = msg.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise CommandError(f"unknown command {cmd!r:.60}; known: {', '.join(COMMANDS)}")
    if "id" in msg and message_id(msg) is None:
        raise CommandError(f"id must be a string of at most {MAX_ID_CHARS} characters or an integer")
    spec = COMMANDS[cmd]
    extra = sorted(set(msg) - ENVELOPE - set(spec))
    if extra:
        raise CommandError(f"{cmd} does not take {', '.join(repr(e)[:40] for e in extra[:5])}")
    ctx = {"styles": styles}
    args = {}
    for name, (required, check) in spec.items():
        if name not in msg:
            if required:
                raise CommandError(f"{cmd} needs {name!r}")
            continue
        args[name] = check(msg[name], ctx)
    return Command(cmd, args, message_id(msg))


def reply_message(id: str | int | None, ok: bool, error: str | None = None, **extra) -> dict:
    msg = {"app": APP, "v": VERSION, "kind": "reply", "id": id, "ok": ok}
    if error is not None:
        msg["error"] = one_line(error)  # a library's words may carry line breaks or escape codes
    msg.update(extra)
    return msg


def status_message(status: dict) -> dict:
    return {"app": APP, "v": VERSION, "kind": "status", **status}
