"""The last applied live settings, kept across engine restarts.

Prompt, negative prompt, guidance, style, strength, steps (as the exact schedule), seed and the
style picture's scale are written to ``last_settings.json`` in the user's folder
(``live2diff_engine.config.home()``) when `run` starts and after every change that a command
applies; a style picture sent in (the dock, `ctl style-image`) is kept beside it as
``last_style_picture`` (its bytes; the JSON holds their SHA-256, so a picture that does not match
is never used). The file is written whole to a
temporary file beside it and moved over the old one (``os.replace``), so a crash or a full disk
never leaves half a file. `run` starts from it unless ``--fresh`` is given (which leaves the file as it is until a change); options given on the
command line win over it. A file that cannot be read or holds values out of range is one warning
line and a clean start, never an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

from .config import home
from .control.schema import MAX_GUIDANCE, MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_SEED, STEP_CHOICES, CommandError, _text

VERSION = 1
# Options that, given on the command line, win over the saved value they stand for.
SCHEDULE_OPTIONS = ("steps", "t_index_list", "strength", "num_inference_steps")


def settings_file() -> Path:
    return home() / "last_settings.json"


def picture_file(settings: Path) -> Path:
    return settings.with_name("last_style_picture")


class CorruptSettings(ValueError):
    pass


def _saved_blend(items) -> list[tuple[str, float]]:
    from .pipeline.blend import BlendError, normalise

    if not all(isinstance(i, list) and len(i) == 2 for i in items):
        raise CorruptSettings("the saved prompt blend is not a list of [text, weight]")
    try:
        return normalise((_text(t, "prompt", MAX_PROMPT_CHARS), w) for t, w in items)
    except BlendError as exc:
        raise CorruptSettings(str(exc)) from None


def _check(data) -> dict:
    """The saved settings, validated like the commands that set them; CorruptSettings if not."""
    if not isinstance(data, dict):
        raise CorruptSettings("not a JSON object")
    if data.get("version") != VERSION:
        raise CorruptSettings(f"unknown version {data.get('version')!r:.20}")
    out = {}
    try:
        # a blend is saved as a list of [text, weight] (up to 4 prompts); a plain prompt as its text,
        # so a "|" typed in a prompt stays a character and never reads back as a blend
        prompt = data.get("prompt", "")
        if isinstance(prompt, list):
            out["prompt"] = _saved_blend(prompt)
        else:
            out["prompt"] = _text(prompt, "prompt", MAX_PROMPT_CHARS)
        out["negative_prompt"] = _text(data.get("negative_prompt", ""), "negative_prompt", MAX_PROMPT_CHARS)
        out["style"] = _text(data.get("style", "default"), "style", MAX_NAME_CHARS, allow_empty=False)
    except CommandError as exc:
        raise CorruptSettings(str(exc)) from None
    guidance = data.get("guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 1.0 <= guidance <= MAX_GUIDANCE:
        raise CorruptSettings(f"guidance {guidance!r:.20} is not 1 to {MAX_GUIDANCE:g}")
    out["guidance"] = float(guidance)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise CorruptSettings(f"seed {seed!r:.20} is not 0 to {MAX_SEED}")
    out["seed"] = seed
    strength, steps = data.get("strength"), data.get("steps")
    if strength is not None or steps is not None:  # as the dock shows them; the schedule below is exact
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise CorruptSettings(f"strength {strength!r:.20} is not above 0 and at most 1")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= len(STEP_CHOICES):
            raise CorruptSettings(f"steps {steps!r:.20} is not 1 to {len(STEP_CHOICES)}")
        out["strength"], out["steps"] = float(strength), steps
    sched = data.get("schedule")
    if sched is None and "steps" in out:  # written by hand with strength and steps only
        from .pipeline.schedule import LIVE_SCHEDULE_STEPS, live_t_index

        sched = {"num_inference_steps": LIVE_SCHEDULE_STEPS, "t_index_list": live_t_index(out["strength"], out["steps"]),
                 "strength": None}
    if sched is not None:
        if not isinstance(sched, dict):
            raise CorruptSettings("schedule is not an object")
        n, t, strength = sched.get("num_inference_steps"), sched.get("t_index_list"), sched.get("strength")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
            raise CorruptSettings(f"num_inference_steps {n!r:.20} is not 1 to 1000")
        if t is not None and (not isinstance(t, list) or not 1 <= len(t) <= 50
                              or any(isinstance(i, bool) or not isinstance(i, int) for i in t)):
            raise CorruptSettings("t_index_list is not a short list of integers")
        if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                     or not math.isfinite(strength)):
            raise CorruptSettings("strength is not a number")
        from .errors import ConfigError
        from .pipeline.schedule import make_schedule

        try:
            make_schedule(n, t_index_list=t, strength=strength)
        except ConfigError as exc:
            raise CorruptSettings(str(exc)) from None
        out["schedule"] = {"num_inference_steps": n, "t_index_list": t, "strength": None if strength is None else float(strength)}
    scale = data.get("style_image_scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 2.0:
            raise CorruptSettings(f"style_image_scale {scale!r:.20} is not 0 to 2")
        out["style_image_scale"] = float(scale)
    picture = data.get("style_picture")
    if picture is not None:
        if (not isinstance(picture, dict) or not isinstance(picture.get("sha256"), str)
                or not re.fullmatch(r"[0-9a-f]{64}", picture["sha256"])):
            raise CorruptSettings("style_picture is not {\"sha256\": its 64 hex digits}")
        out["style_picture"] = {"sha256": picture["sha256"]}
    return out


def load(path: Path | None = None) -> tuple[dict | None, str | None]:
    """(settings or None, a warning line or None). No file: (None, None)."""
    path = path or settings_file()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"warning: cannot read the saved settings {path} ({exc.strerror or exc}); starting clean"
    try:
        return _check(json.loads(raw.decode("utf-8"))), None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        from .errors import one_line

        why = one_line(exc)[:120] if isinstance(exc, CorruptSettings) else "not valid JSON"
        return None, f"warning: the saved settings {path} are damaged ({why}); starting clean"


_written_pictures: dict[Path, str] = {}  # picture file -> the SHA-256 this process last wrote there


def save(settings: dict, path: Path | None = None, picture: bytes | None = None) -> Path:
    """Write atomically: a temporary file in the same folder, flushed to disk, then os.replace.
    ``picture``: the bytes of the style picture sent in (settings["style_picture"] names their
    SHA-256), written first, beside the settings, when they changed; without one that file goes."""
    path = path or settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    pic = picture_file(path)
    if settings.get("style_picture") and picture is not None:
        digest = settings["style_picture"]["sha256"]
        if _written_pictures.get(pic) != digest:
            _write_atomically(pic, picture)
            _written_pictures[pic] = digest
    elif not settings.get("style_picture"):
        _written_pictures.pop(pic, None)
        try:
            pic.unlink()
        except FileNotFoundError:
            pass
    data = json.dumps({"version": VERSION, **settings}, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
    _write_atomically(path, data)
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def snapshot(controller) -> dict:
    """What is saved: the controller's live settings."""
    frames = controller.frames
    current = controller.manager.current
    steps, t_index, strength = frames.schedule_args
    sched = controller.schedule()
    pictures = getattr(frames, "style_images", False)
    sent = controller.sent_picture
    return {
        "prompt": [[t, w] for t, w in frames.prompt_blend] if frames.prompt_blend else frames.prompt,
        "negative_prompt": frames.negative_prompt,
        "guidance": float(frames.guidance_scale),
        "style": current.name if current is not None else "default",
        "strength": sched["strength"],
        "steps": sched["steps"],
        "seed": int(frames.seed),
        "schedule": {"num_inference_steps": int(steps), "t_index_list": None if t_index is None else [int(i) for i in t_index],
                     "strength": None if strength is None else float(strength)},
        # an engine without an IP-Adapter keeps what the last one with it saved
        "style_image_scale": float(frames.style_image_scale) if pictures else controller.kept_style_image_scale,
        "style_picture": {"sha256": hashlib.sha256(sent).hexdigest()} if sent is not None else None,
    }


def _restore_picture(controller, args, say) -> None:
    """The saved scale, and the saved picture sent in: its bytes encoded again beside the stream
    (as an upload is). An engine without an IP-Adapter keeps both in the file for the next one."""
    frames = controller.frames
    pictures = getattr(frames, "style_images", False)
    scale = getattr(args, "saved_style_image_scale", None)
    if scale is not None:
        if pictures:
            frames.set_style_image_scale(scale)
        else:
            controller.kept_style_image_scale = scale
    saved = getattr(args, "saved_picture", None)
    if not saved:
        return
    from .models.ip_adapter import MAX_PICTURE_BYTES

    pic = picture_file(controller.settings_file)
    try:
        with open(pic, "rb") as f:
            data = f.read(MAX_PICTURE_BYTES + 1)
    except OSError as exc:
        say(f"warning: the style picture of the last session ({pic}) cannot be read ({exc.strerror or exc}); "
            "starting without it")
        return
    if hashlib.sha256(data).hexdigest() != saved["sha256"]:
        say(f"warning: the style picture of the last session ({pic}) does not match the saved settings; "
            "starting without it")
        return
    controller.sent_picture = data
    controller._picture_restoring = True  # kept while it is encoded (or while no adapter can take it)
    _written_pictures[pic] = saved["sha256"]
    if not pictures:
        say("note: the style picture of the last session is kept but not used: this engine has no IP-Adapter "
            "(start it with --ip-adapter)")
        return

    def done(msg):
        controller._picture_restoring = False
        if msg.get("ok"):
            say("style picture: the one sent in the last session")
        else:
            controller.sent_picture = None
            say(f"warning: the style picture of the last session is not used: {msg.get('error')}")

    controller.submit_style_image(data, done)


def given_options(args) -> set[str] | None:
    """The `run` options the user typed (their dests), from the argv kept by ``cli.main``; None
    when it is not known (then only values that differ from the defaults count as given)."""
    argv = getattr(args, "_argv", None)
    if argv is None or "run" not in argv:
        return None
    from .options import Parser, add_run_args

    run = Parser(prog="live2diff-engine run")
    add_run_args(run)
    for action in run._actions:
        action.default = argparse.SUPPRESS
    try:
        ns, _ = run.parse_known_args(argv[argv.index("run") + 1:])
    except SystemExit:
        return None
    return set(vars(ns))


_DEFAULTS = {"prompt": "", "negative_prompt": "", "guidance": 1.0, "style": None, "seed": 0,
             "steps": None, "t_index_list": None, "strength": None, "num_inference_steps": None,
             "style_image": None, "style_image_scale": None}


def restore_into_args(args, say) -> int | None:
    """Before the model is built: the saved prompt, negative prompt, guidance, style and schedule
    go into ``args`` where no option was given for them. Returns the saved seed to apply to the
    frame pipeline afterwards (``args.seed`` also seeds the tiny model and the synthetic source),
    or None. Every problem is one warning line through ``say``."""
    if getattr(args, "fresh", False):
        return None
    saved, warning = load()
    if warning:
        say(warning)
    if saved is None:
        return None
    given = given_options(args)
    if given is None:
        given = {k for k, v in _DEFAULTS.items() if getattr(args, k, v) != v}
    for key in ("prompt", "negative_prompt", "guidance"):
        if key not in given:
            setattr(args, key, saved[key])
    # the style picture sent in, and its scale: taken up once the pipeline is built (start_saving)
    args.saved_picture = saved.get("style_picture") if "style_image" not in given else None
    args.saved_style_image_scale = saved.get("style_image_scale") if "style_image_scale" not in given else None
    if "prompt" not in given:
        # a saved text is a text, "|" and all: not the command line's blend notation (assemble.prompt_of)
        args.prompt_is_text = isinstance(saved["prompt"], str)
    if "style" not in given:
        from .styles import fetch_hint, load_styles

        name = saved["style"]
        styles = load_styles(args.styles)
        reason = "it is no longer in the styles file" if name not in styles else None
        if reason is None and fetch_hint(styles[name]) is not None:
            reason = f"its files are missing; get them with `{fetch_hint(styles[name])}`"
        if reason is not None:
            say(f"warning: the saved style {name!r} is not available ({reason}); starting with the default style")
        else:
            args.style = name
            args.style_from_saved = True
            sched = saved.get("schedule")
            if sched is not None and not given & set(SCHEDULE_OPTIONS):
                args.steps = None
                args.num_inference_steps = sched["num_inference_steps"]
                args.t_index_list, args.strength = sched["t_index_list"], sched["strength"]
    return None if "seed" in given else saved["seed"]


def start_saving(controller, seed: int | None, fresh: bool = False, args=None, say=lambda line: None) -> None:
    """After the pipeline is built: apply the saved seed (and the saved style picture and its
    scale, from ``args``: restore_into_args), save now and after every change. With ``fresh``
    (``run --fresh``) the stream starts from the defaults and the saved file stays as it is until
    the user changes something: a look tried once must not destroy the one they keep."""
    if seed is not None and seed != controller.frames.seed:
        controller.frames.set_seed(seed)
    controller.settings_file = settings_file()
    controller.settings_io = (snapshot, lambda data, path: save(data, path, picture=controller.sent_picture))
    if not fresh and args is not None:
        _restore_picture(controller, args, say)
    if fresh:
        controller._saved = snapshot(controller)  # what is running now counts as written: no write until a change
        return
    controller.save_settings()
