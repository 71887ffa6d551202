"""From command-line options to a ready frame pipeline: models, style, schedule.

Shared by every command that turns frames into stylised frames (``translate``, and the live
engine), so they accept the same model and style options and mean the same by them.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from .errors import ConfigError, ModelLoadError
from .options import resolve_device

# t_index_list per number of denoising steps for --steps (the Live2Diff configs' choices).
STEPS_TO_T_INDEX = {1: [45], 2: [32, 45], 3: [30, 36, 42], 4: [25, 31, 37, 43]}


def _check_lora_file(name: str) -> None:
    """A --lora file that is not there is named as the user gave it, before any model loads."""
    from .styles import styles_cache

    p = Path(name).expanduser()
    if p.is_file() or (not p.exists() and (styles_cache() / p.name).is_file()):
        return  # found where a style's LoRA would be: the path given, or the downloaded styles
    if p.is_dir():
        raise ConfigError(f"--lora {name}: that is a folder; give the LoRA's .safetensors file")
    raise ConfigError(f"--lora {name}: file not found (looked at {p.absolute()} and in {styles_cache()})")


# Model sizes named when a size is refused: the square default and the webcam shapes (16:9, 4:3).
SIZE_EXAMPLES = "512x512, 640x360, 768x432, 512x384"


def model_size(args) -> tuple[int, int]:
    """The model's width and height from --width/--height (defaults: 512, or 64 for the tiny
    model), checked before anything loads. Any multiple of 8 (the VAE's factor) works."""
    default = 64 if getattr(args, "model", None) == "tiny" else 512
    w = default if getattr(args, "width", None) is None else args.width
    h = default if getattr(args, "height", None) is None else args.height
    if w < 8 or h < 8 or w % 8 or h % 8:
        down = (max(8, w // 8 * 8), max(8, h // 8 * 8))
        up = (max(8, -(-w // 8) * 8), max(8, -(-h // 8) * 8))
        nearest = " or ".join(dict.fromkeys(f"{a}x{b}" for a, b in (down, up)))
        raise ConfigError(
            f"model size {w}x{h} cannot work: --width and --height must be multiples of 8 (the nearest: {nearest}; "
            f"e.g. {SIZE_EXAMPLES})"
        )
    return w, h


DEPTH_KINDS = ("midas", "depth-anything")


def ignored_with_tiny(args) -> list[str]:
    """The model options that --model tiny would leave unused (it builds every model itself)."""
    if getattr(args, "model", None) != "tiny":
        return []
    kind, sep, _ = (getattr(args, "depth", None) or "midas").partition("=")
    given = [
        ("--base", getattr(args, "base", "sd15") not in (None, "sd15")),
        ("--base-config", getattr(args, "base_config", None) is not None),
        ("--motion", getattr(args, "motion", "live2diff") not in (None, "live2diff")),
        ("--vae", getattr(args, "vae", "full") not in (None, "full")),
        # eval's depth probe reads --depth KIND=PATH beside the tiny model: used there, not ignored
        ("--depth KIND=PATH", bool(sep) and getattr(args, "command", None) != "eval"),
        ("--no-lcm-lora", bool(getattr(args, "no_lcm_lora", False))),
    ]
    return [option for option, on in given if on]


def style_from_options(args, styles):
    """The style the options ask for: --style (default: default), with --lora, --steps,
    --t-index-list, --strength and --num-inference-steps laid over it."""
    style_name = args.style or "default"
    if style_name not in styles:
        raise ConfigError(f"unknown style {style_name!r}; known styles: {', '.join(sorted(styles))}")
    style = styles[style_name]
    if args.lora:
        from .styles import LoraRef

        style = replace(style, loras=style.loras + tuple(LoraRef(path, scale) for path, scale in args.lora))
    if args.steps is not None:
        if args.steps not in STEPS_TO_T_INDEX:
            raise ConfigError(f"--steps must be 1 to 4, got {args.steps}; use --t-index-list for other choices")
        style = replace(style, t_index_list=tuple(STEPS_TO_T_INDEX[args.steps]), strength=None, num_inference_steps=50)
    elif args.t_index_list is not None:
        style = replace(style, t_index_list=tuple(args.t_index_list), strength=None)
    elif args.strength is not None:
        style = replace(style, strength=args.strength, t_index_list=None)
    if args.num_inference_steps is not None:
        style = replace(style, num_inference_steps=args.num_inference_steps)
    return style


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def prompt_of(args):
    """--prompt as the pipeline takes it: a text, or a blend written ``"a fox:0.7|a wolf:0.3"``
    (see :mod:`.pipeline.blend`); a blend restored from the saved settings is a list already."""
    from .pipeline.blend import BlendError, normalise, parse_notation

    try:
        if isinstance(args.prompt, list):
            return normalise(args.prompt)
        if getattr(args, "prompt_is_text", False):  # restored from the saved settings: a "|" is a character
            return args.prompt
        return parse_notation(args.prompt or "")
    except BlendError as exc:
        raise ConfigError(f"--prompt: {exc} (a blend is written 'a fox:0.7|a wolf:0.3', at most 4 prompts)") from None


def wants_style_images(args, style=None) -> bool:
    """Whether the IP-Adapter and its image encoder load: asked for (--ip-adapter, --image-encoder),
    implied by a start picture (--style-image) or by a start style with a picture."""
    return bool(getattr(args, "style_image", None) or getattr(args, "ip_adapter", None)
                or getattr(args, "image_encoder", None) or (style is not None and style.image is not None))


def picture_note(frames) -> str:
    """``"; style picture: file look.png, scale 1"`` for the start line (or where the adapter waits
    for one: ``"; style pictures: on"``), "" without an IP-Adapter."""
    if not getattr(frames, "style_images", False):
        return ""
    if frames.style_image is None:
        return "; style pictures: on (none yet)"
    return f"; style picture: {frames.style_image}, scale {frames.style_image_scale:g}"


def _check_style_image_options(args) -> None:
    from .pipeline.blend import BlendError, check_image_scale

    if getattr(args, "style_image_scale", None) is not None:
        try:
            check_image_scale(args.style_image_scale, "--style-image-scale")
        except BlendError as exc:
            raise ConfigError(str(exc)) from None
    path = getattr(args, "style_image", None)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a folder" if p.is_dir() else "file not found"
            raise ConfigError(f"--style-image {path}: {what}; give a PNG, JPEG or WebP picture")


def check_options(args) -> None:
    """Every model, style and frame option's value, judged before torch or any model library is
    imported (seconds on a busy machine) and before a camera opens: one line for the first that
    cannot work. What needs the device (--device, --dtype on it) is judged where torch is."""
    ignored = ignored_with_tiny(args)
    if ignored:
        raise ConfigError(
            f"--model tiny builds its own random-weight models, so {_and(ignored)} would be ignored; "
            f"drop {'it' if len(ignored) == 1 else 'them'}, or drop --model tiny to use the real models"
        )
    model_size(args)
    prompt_of(args)
    kind, sep, source = (args.depth or "midas").partition("=")
    if kind not in DEPTH_KINDS:
        raise ConfigError(f"--depth takes midas, depth-anything or KIND=PATH (KIND: midas or depth-anything), got {args.depth!r}")
    if sep and not source:
        raise ConfigError(f"--depth {args.depth} names no folder after the '='; e.g. --depth {kind}=/path/to/{kind}")
    from .control.schema import MAX_GUIDANCE

    if not 1.0 <= args.guidance <= MAX_GUIDANCE:
        raise ConfigError(f"--guidance must be 1 to {MAX_GUIDANCE:g} (1: no guidance), got {args.guidance:g}")
    if args.similarity_threshold is not None and not 0.0 < args.similarity_threshold < 1.0:
        raise ConfigError(f"--similarity-threshold must be between 0 and 1 (e.g. 0.98), got {args.similarity_threshold:g}")
    for path, _ in getattr(args, "lora", None) or []:
        _check_lora_file(path)
    _check_style_image_options(args)
    from .pipeline.schedule import check_schedule
    from .styles import load_styles

    style = style_from_options(args, load_styles(args.styles))
    if getattr(args, "style_image_scale", None) is not None and not wants_style_images(args, style):
        raise ConfigError("--style-image-scale goes with a style picture: add --style-image FILE (or --ip-adapter to "
                          "send pictures live)")
    steps, t_index_list, strength = style.schedule_args()
    try:
        check_schedule(steps, t_index_list, strength)
    except ConfigError as exc:
        text = str(exc)
        for name in ("strength", "t_index_list", "num_inference_steps"):
            if text.startswith(name + " ") and getattr(args, name) is not None:  # the option as typed
                raise ConfigError("--" + name.replace("_", "-") + text[len(name):]) from None
        raise ConfigError(f"style {style.name!r}: {text}") from None


def preflight(args, say=None) -> None:
    """What can be checked before a camera opens or any model loads, without torch: the option
    values (:func:`check_options`), the --lora files, every local model path (from its files), and
    the models that are not downloaded, found in the hub cache without the network: offline, or
    with the hub not answering one quick request, they are one line naming all of them; else one
    line through ``say`` says they will be downloaded (with their sizes)."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    check_options(args)
    if args.model == "tiny":
        return
    from .models.hub import check_all, model_requests

    kind, _, source = args.depth.partition("=")
    wanted = model_requests(args.base, args.motion, kind, source or None, args.vae, None if args.no_lcm_lora else "lcm-lora")
    from .styles import load_styles

    if wants_style_images(args, style_from_options(args, load_styles(args.styles))):
        wanted += [(args.ip_adapter or "ip-adapter", "ip-adapter"), (args.image_encoder or "image-encoder", "image-encoder")]
    try:
        check_all(wanted, say)
    except ModelLoadError as exc:
        camera = _no_camera_note(args)
        if camera is None:
            raise
        raise ModelLoadError(f"{exc}; and {camera}") from None


def _no_camera_note(args) -> str | None:
    """A few words when the --source is a camera this machine certainly lacks (so that a run with
    both problems names both), else None."""
    spec = getattr(args, "source", None)
    if not spec or spec.partition(":")[0] != "camera":
        return None
    try:
        from .io.sources import parse_source

        source = parse_source(spec)
        if source.live and source.certainly_missing():
            return f"{source.name} cannot be opened: {source.advice()}"
    except Exception:  # the source's own check says what is wrong with it, later
        return None
    return None


def _dtype(args, device):
    import torch

    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def build_frame_pipeline(args, say=None):
    """(components, frame pipeline, style manager, style) from parsed options."""
    from .models.components import build_tiny_components, load_components
    from .pipeline.frames import FramePipeline
    from .styles import StyleManager, load_styles

    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    check_options(args)  # a value that cannot work is one line before torch loads
    width, height = model_size(args)
    device = resolve_device(args.device)
    from .threads import apply_threads

    apply_threads(device, getattr(args, "threads", None), say)  # before any model is built
    if device.type == "cpu" and args.model != "tiny":
        say("warning: running on the CPU: fine for checks, far too slow for live video")
    dtype = _dtype(args, device)
    from .pipeline.accelerate import resolve_mode

    accelerate = resolve_mode(getattr(args, "accelerate", "off"), device)  # a bad choice fails before any model loads
    styles = load_styles(args.styles)
    style = style_from_options(args, styles)
    for path, _ in args.lora:
        _check_lora_file(path)

    if args.model == "tiny":
        from .models.tiny import TINY_LABEL

        say(f"building the {TINY_LABEL}")
        depth_kind = args.depth if args.depth in ("midas", "depth-anything") else "midas"
        comps = build_tiny_components(args.seed, device=device, dtype=dtype, depth=depth_kind)
    else:
        kind, _, source = args.depth.partition("=")
        comps = load_components(
            base=args.base, motion=args.motion, depth=kind, depth_source=source or None, vae=args.vae,
            lcm_lora=None if args.no_lcm_lora else "lcm-lora", device=device, dtype=dtype, progress=say,
            base_config=getattr(args, "base_config", None),
        )
    if wants_style_images(args, style):
        from .models.ip_adapter import load_style_image_models

        tiny_default = args.model == "tiny" and args.ip_adapter in (None, "ip-adapter")
        load_style_image_models(comps, None if tiny_default else args.ip_adapter, args.image_encoder, progress=say)
    steps, t_index_list, strength = style.schedule_args()
    frames = FramePipeline(
        comps,
        width=width,
        height=height,
        fit=args.fit,
        num_inference_steps=steps,
        t_index_list=t_index_list,
        strength=strength,
        prompt=prompt_of(args),
        template=style.template,
        clip_skip=style.clip_skip,
        seed=args.seed,
        output_size=args.output_size,
        similarity_threshold=args.similarity_threshold,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance,
        accelerate=accelerate,
    )
    manager = StyleManager(comps, styles)
    if style.dreambooth or style.loras or comps.lcm_lora is not None:
        say(f"applying style {style.name}")
        try:
            manager.apply(style, frames)
        except ModelLoadError as exc:
            if not getattr(args, "style_from_saved", False):
                raise
            # The style the last run left does not load here (another model, a damaged file): the
            # engine starts with the default style rather than not at all.
            say(f"warning: the saved style {style.name!r} does not load ({exc}); starting with the default style")
            style = styles["default"]
            manager.apply(style, frames)
    else:
        manager.current = style
        if style.image is not None:
            from .styles import set_style_picture

            set_style_picture(frames, style, manager.style_picture(style))
    if frames.style_images:
        frames.set_style_image_scale(1.0 if args.style_image_scale is None else args.style_image_scale)
    if getattr(args, "style_image", None):
        from .models.ip_adapter import read_picture_file

        try:
            picture = frames.encode_style_picture(read_picture_file(Path(args.style_image).expanduser()))
        except ConfigError as exc:
            raise ConfigError(f"--style-image {args.style_image}: {exc}") from None
        frames.set_style_image(picture, source=f"file {Path(args.style_image).name}")
    return comps, frames, manager, style
