"""Styles: a DreamBooth base and/or LoRAs, a prompt template, clip skip and denoising steps.

Styles live in TOML: the presets shipped with the package, overridden and extended by the user's
own styles file. Switching style between frames swaps weights in place (one set of weights; the
stream goes on), re-warming only when the number of denoising steps changes.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import home
from .errors import ConfigError, ModelLoadError
from .models.loading import read_weight_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESETS = Path(__file__).parent / "data" / "styles.toml"


def user_styles_file() -> Path:
    return home() / "styles.toml"


def styles_cache() -> Path:
    return home() / "styles"


@dataclass(frozen=True)
class LoraRef:
    file: str
    scale: float = 1.0
    url: str | None = None


@dataclass(frozen=True)
class Style:
    name: str
    description: str = ""
    dreambooth: str | None = None
    dreambooth_url: str | None = None
    loras: tuple[LoraRef, ...] = ()
    template: str = "{}"
    clip_skip: int = 1
    num_inference_steps: int = 50
    t_index_list: tuple[int, ...] | None = None
    strength: float | None = None
    source: str = field(default="", compare=False)

    def schedule_args(self) -> tuple[int, list[int] | None, float | None]:
        t = list(self.t_index_list) if self.t_index_list is not None else None
        if t is None and self.strength is None:
            t = [32, 45]
        return self.num_inference_steps, t, self.strength


_KEYS = {"description", "dreambooth", "dreambooth_url", "loras", "template", "clip_skip", "num_inference_steps", "t_index_list", "strength"}


def _parse_style(name: str, raw: dict, source: str) -> Style:
    where = f"style {name!r} in {source}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table of settings")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown settings {unknown}; known: {sorted(_KEYS)}")
    template = raw.get("template", "{}")
    if not isinstance(template, str) or "{}" not in template:
        raise ConfigError(f"{where}: template {template!r} has no {{}}; put {{}} where the prompt goes")
    loras = []
    for item in raw.get("loras", []) or []:
        if isinstance(item, str):
            item = {"file": item}
        if not isinstance(item, dict) or "file" not in item or set(item) - {"file", "scale", "url"}:
            raise ConfigError(f"{where}: each LoRA is {{ file = \"...\", scale = 1.0, url = \"...\" }}")
        loras.append(LoraRef(str(item["file"]), float(item.get("scale", 1.0)), item.get("url")))
    if raw.get("t_index_list") is not None and raw.get("strength") is not None:
        raise ConfigError(f"{where}: give t_index_list or strength, not both")
    try:
        style = Style(
            name=name,
            description=str(raw.get("description", "")),
            dreambooth=raw.get("dreambooth"),
            dreambooth_url=raw.get("dreambooth_url"),
            loras=tuple(loras),
            template=template,
            clip_skip=int(raw.get("clip_skip", 1)),
            num_inference_steps=int(raw.get("num_inference_steps", 50)),
            t_index_list=tuple(int(i) for i in raw["t_index_list"]) if raw.get("t_index_list") is not None else None,
            strength=float(raw["strength"]) if raw.get("strength") is not None else None,
            source=source,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if style.clip_skip < 1:
        raise ConfigError(f"{where}: clip_skip must be 1 or more")
    from .pipeline.schedule import make_schedule

    try:
        make_schedule(*style.schedule_args())
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return style


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read styles file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"styles file {path} is not valid TOML: {exc}") from None
    styles = data.get("styles", {})
    if not isinstance(styles, dict):
        raise ConfigError(f"styles file {path}: [styles] must hold one table per style")
    return styles


def load_styles(user_file: str | os.PathLike | None = None) -> dict[str, Style]:
    """Presets, then the user's styles file (``user_file`` or the default one when it exists)."""
    styles = {name: _parse_style(name, raw, "the presets") for name, raw in _read_toml(PRESETS).items()}
    path = Path(user_file) if user_file else user_styles_file()
    if user_file and not path.is_file():
        raise ConfigError(f"styles file not found: {path}")
    if path.is_file():
        for name, raw in _read_toml(path).items():
            styles[name] = _parse_style(name, raw, str(path))
    return styles


# -- files ---------------------------------------------------------------------------------------


def _local_file(name: str, url: str | None, style: str, what: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    cached = styles_cache() / p.name
    if cached.is_file():
        return cached
    how = f"`live2diff-engine models download --style {style} --token YOUR_CIVITAI_TOKEN`" if url else "put the file there"
    raise ModelLoadError(f"{what} for style {style!r} is missing: {p.name} not found at {p} nor in {styles_cache()}; get it with {how}")


def style_files(style: Style) -> list[tuple[Path, str | None]]:
    """Where each of the style's files lives (or would live) and its download URL."""
    out = []
    if style.dreambooth:
        p = Path(style.dreambooth).expanduser()
        out.append((p if p.is_file() else styles_cache() / p.name, style.dreambooth_url))
    for lora in style.loras:
        p = Path(lora.file).expanduser()
        out.append((p if p.is_file() else styles_cache() / p.name, lora.url))
    return out


def download_style(style: Style, token: str | None, progress=True) -> list[Path]:
    """Fetch a style's files that are not here yet (resumable; the token never appears in output)."""
    from .models.download import download_url

    paths = []
    for path, url in style_files(style):
        if path.is_file():
            paths.append(path)
            continue
        if not url:
            raise ModelLoadError(f"{path.name} for style {style.name!r} is missing and the style gives no url; put the file at {path}")
        if "civitai.com" in url and not token:
            raise ConfigError(
                f"style {style.name!r} downloads from civitai, which needs an API token: pass --token or set CIVITAI_TOKEN"
            )
        paths.append(download_url(url, path, token=token, progress=progress))
    return paths


# -- applying a style to loaded models ---------------------------------------------------------


def _lora_error(path: str, exc: Exception) -> ModelLoadError:
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()] or [type(exc).__name__]
    mismatch = next((l for l in lines if "size mismatch" in l), None)
    if mismatch is not None:
        module = mismatch.split("size mismatch for ", 1)[-1].split(":", 1)[0]
        return ModelLoadError(
            f"LoRA {path} does not fit this model (made for another architecture or size; first mismatch at {module})"
        )
    return ModelLoadError(f"cannot load LoRA {path}: {lines[0][:200]}")


class StyleManager:
    """Applies styles to a :class:`~.models.components.Components` in place.

    LoRAs (the few-step LCM-LoRA and the style's own) are loaded as diffusers/peft adapters on
    the UNet and the text encoder and weighted with ``set_adapters``; they are never fused, so
    going back to a style without them restores the base weights exactly. DreamBooth checkpoints
    (original SD single-file layout) are converted with diffusers' converters and copied into the
    loaded modules; the base comes back from its folder."""

    def __init__(self, comps, styles: dict[str, Style]):
        self.comps = comps
        self.styles = styles
        self.current: Style | None = None
        self._holder = None
        self.last_switch_s = 0.0

    def _pipe(self):
        if self._holder is None:
            from diffusers import StableDiffusionPipeline

            from .pipeline.schedule import make_scheduler

            c = self.comps
            self._holder = StableDiffusionPipeline(
                vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet.unet2d,
                scheduler=make_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        return self._holder

    def get(self, name: str) -> Style:
        if name not in self.styles:
            raise ConfigError(f"unknown style {name!r}; known styles: {', '.join(sorted(self.styles))}")
        return self.styles[name]

    def _unload_loras(self) -> None:
        # Asked of the modules themselves: another manager, or a load that failed half-way, may
        # have left LoRA layers on them.
        if any(self._pipe().get_list_adapters().values()):
            self._pipe().unload_lora_weights()
        for model in (self.comps.unet.unet2d, self.comps.text_encoder):
            _strip_lora_layers(model)

    def _load_lora(self, name: str, tensors: dict[str, torch.Tensor], label: str) -> None:
        try:
            with _quiet():
                self._pipe().load_lora_weights(dict(tensors), adapter_name=name)
        except Exception as exc:
            self._unload_loras()  # no half-loaded adapter left behind
            raise _lora_error(label, exc) from None

    def _load_dreambooth(self, style: Style) -> None:
        target = style.dreambooth
        if target == self.comps.dreambooth:
            return
        if target is None:
            self._restore_base()
        else:
            path = _local_file(target, style.dreambooth_url, style.name, "DreamBooth checkpoint")
            load_single_file_into(self.comps, read_weight_file(path), str(path))
        self.comps.dreambooth = target

    def _restore_base(self) -> None:
        c = self.comps
        if c.base_dir is None:
            raise ModelLoadError("the base model's folder is unknown, so its weights cannot be restored; restart the engine")
        from .models.loading import load_base_weights

        load_base_weights(c.unet, Path(c.base_dir) / "unet")
        _load_module_file(c.text_encoder, Path(c.base_dir) / "text_encoder")
        if type(c.vae).__name__ == "AutoencoderKL":
            _load_module_file(c.vae, Path(c.base_dir) / "vae")

    def apply(self, name_or_style: str | Style, frames=None) -> Style:
        """Switch every model weight to the style; with a FramePipeline, also its text and steps."""
        style = self.get(name_or_style) if isinstance(name_or_style, str) else name_or_style
        start = time.perf_counter()
        # Check every file is here before touching any weight: a failed switch keeps the old style.
        lora_tensors = [(ref, read_weight_file(_local_file(ref.file, ref.url, style.name, "LoRA"))) for ref in style.loras]
        if style.dreambooth:
            _local_file(style.dreambooth, style.dreambooth_url, style.name, "DreamBooth checkpoint")
        if frames is not None:
            from .pipeline.text import apply_template

            apply_template(style.template, "")  # validates the template
        self._unload_loras()
        self._load_dreambooth(style)
        names, weights = [], []
        try:
            if self.comps.lcm_lora is not None:
                self._load_lora("lcm", self.comps.lcm_lora, "LCM-LoRA")
                names.append("lcm")
                weights.append(1.0)
            for i, (ref, tensors) in enumerate(lora_tensors):
                self._load_lora(f"style{i}", tensors, ref.file)
                names.append(f"style{i}")
                weights.append(ref.scale)
        except ModelLoadError:
            previous = self.current
            if previous is not None and previous.name != style.name:
                self.apply(previous, frames)  # back to a style that worked
            raise
        if names:
            self._pipe().set_adapters(names, adapter_weights=weights)
        self.comps.unet.refresh_positions()
        if frames is not None:
            frames.set_text_style(style.template, style.clip_skip)
            args = style.schedule_args()
            if args != frames._schedule_args:
                frames.set_schedule(*args)
        self.current = style
        self.last_switch_s = time.perf_counter() - start
        return style


def _strip_lora_layers(model: torch.nn.Module) -> None:
    """Put every peft-wrapped layer back to its plain base layer and forget the adapter configs."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft no LoRA was ever loaded
        return
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, child_name, child.get_base_layer())
    for attr in ("peft_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False


class _quiet:
    """Keep diffusers/transformers from printing their own multi-line reports of an error we
    turn into one line."""

    def __enter__(self):
        import logging

        self._loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def _load_module_file(module: torch.nn.Module, folder: Path) -> None:
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            _load_matching(module, read_weight_file(folder / name), str(folder / name))
            return
    raise ModelLoadError(f"no weights in {folder}; the Stable Diffusion folder is incomplete")


def _load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``, allowing for a `text_model.` prefix present on one side only."""
    own = module.state_dict()
    if not set(state) & set(own):
        for a, b in (("text_model.", ""), ("", "text_model.")):
            moved = {b + k[len(a):]: v for k, v in state.items() if k.startswith(a)}
            if set(moved) & set(own):
                state = moved
                break
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"wrong shapes {wrong[:3]}"
        raise ModelLoadError(f"{source} does not fit the loaded model ({detail}); is it a Stable Diffusion 1.5 checkpoint?")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_single_file_into(comps, checkpoint: dict[str, torch.Tensor], source: str) -> None:
    """Copy a DreamBooth checkpoint in the original SD layout into the loaded UNet, VAE and CLIP."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    if not any(k.startswith("model.diffusion_model.") for k in checkpoint):
        raise ModelLoadError(f"{source} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
    try:
        unet_sd = convert_ldm_unet_checkpoint(checkpoint, dict(comps.unet.config))
    except Exception as exc:
        raise ModelLoadError(f"{source} does not convert to an SD1.5 UNet: {str(exc)[:160]}") from None
    base = comps.unet.base_state_keys()
    own = comps.unet.state_dict()
    missing = sorted(base - set(unet_sd))
    wrong = [k for k, v in unet_sd.items() if k in own and v.shape != own[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"wrong shapes {wrong[:3]}"
        raise ModelLoadError(f"{source} does not fit the Stable Diffusion 1.5 UNet ({detail}); use an SD1.5 DreamBooth checkpoint")
    comps.unet.load_state_dict({k: v for k, v in unet_sd.items() if k in base}, strict=False)
    if any(k.startswith("cond_stage_model.transformer.") for k in checkpoint):
        clip_sd = convert_ldm_clip_checkpoint(checkpoint)
        _load_matching(comps.text_encoder, clip_sd, source)
    if type(comps.vae).__name__ == "AutoencoderKL" and any(k.startswith("first_stage_model.") for k in checkpoint):
        vae_sd = convert_ldm_vae_checkpoint(checkpoint, dict(comps.vae.config))
        _load_matching(comps.vae, vae_sd, source)
