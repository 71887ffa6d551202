"""The last applied live settings, kept across engine restarts.

Prompt, negative prompt, guidance, style, strength, steps (as the exact schedule) and seed are
written to ``last_settings.json`` in the user's folder (``live2diff_engine.config.home()``) when
`run` starts and after every change that a command applies. The file is written whole to a
temporary file beside it and moved over the old one (``os.replace``), so a crash or a full disk
never leaves half a file. `run` starts from it unless ``--fresh`` is given (which leaves the file as it is until a change); options given on the
command line win over it. A file that cannot be read or holds values out of range is one warning
line and a clean start, never an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from .config import home
from .control.schema import MAX_GUIDANCE, MAX_NAME_CHARS, MAX_PROMPT_CHARS, MAX_SEED, STEP_CHOICES, CommandError, _text

VERSION = 1
# Options that, given on the command line, win over the saved value they stand for.
SCHEDULE_OPTIONS = ("steps", "t_index_list", "strength", "num_inference_steps")


def settings_file() -> Path:
    return home() / "last_settings.json"


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


def save(settings: dict, path: Path | None = None) -> Path:
    """Write atomically: a temporary file in the same folder, flushed to disk, then os.replace."""
    path = path or settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"version": VERSION, **settings}, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
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
    return path


def snapshot(controller) -> dict:
    """What is saved: the controller's live settings."""
    frames = controller.frames
    current = controller.manager.current
    steps, t_index, strength = frames.schedule_args
    sched = controller.schedule()
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
    }


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
             "steps": None, "t_index_list": None, "strength": None, "num_inference_steps": None}


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


def start_saving(controller, seed: int | None, fresh: bool = False) -> None:
    """After the pipeline is built: apply the saved seed, save now and after every change. With
    ``fresh`` (``run --fresh``) the stream starts from the defaults and the saved file stays as it
    is until the user changes something: a look tried once must not destroy the one they keep."""
    if seed is not None and seed != controller.frames.seed:
        controller.frames.set_seed(seed)
    controller.settings_file = settings_file()
    controller.settings_io = (snapshot, save)
    if fresh:
        controller._saved = snapshot(controller)  # what is running now counts as written: no write until a change
        return
    controller.save_settings()
