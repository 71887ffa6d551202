"""Styles: a DreamBooth base and/or LoRAs, a prompt template, clip skip and denoising steps.

Styles live in TOML: the presets shipped with the package, overridden and extended by the user's
own styles file. Switching style between frames swaps weights in place (one set of weights; the
stream goes on), re-warming only when the number of denoising steps changes.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import config_file, home
from .errors import ConfigError, ModelLoadError

if TYPE_CHECKING:  # torch loads with the first weights touched: listing styles never needs it
    import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESETS = Path(__file__).parent / "data" / "styles.toml"


def read_weight_file(path) -> dict[str, torch.Tensor]:
    from .models.loading import read_weight_file as read

    return read(path)


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
    from .pipeline.schedule import check_schedule

    try:
        check_schedule(*style.schedule_args())
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
    how = (f"get it with `live2diff-engine models download --style {style} --token YOUR_CIVITAI_TOKEN`" if url
           else "put the file in one of those places")
    raise ModelLoadError(f"{what} for style {style!r} is missing: {p.name} not found at {p} nor in {styles_cache()}; {how}")


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


CIVITAI = "https://civitai.com"
# Where civitai's URLs are fetched from instead (a mirror, or a local server in tests). Read from the
# environment only: no command arriving over a socket can name a URL or a file.
CIVITAI_URL_ENV = "LIVE2DIFF_CIVITAI_URL"


def missing_files(style: Style) -> list[tuple[Path, str | None]]:
    """The style's files that are not here yet, with their download URLs."""
    return [(path, url) for path, url in style_files(style) if not path.is_file()]


def needs_civitai_token(style: Style) -> bool:
    return any(url and "civitai.com" in url for _, url in missing_files(style))


def fetch_hint(style: Style) -> str | None:
    """None when every file of the style is here; else what fetches them: the exact command, or,
    for a file the style gives no URL for, where to put it."""
    missing = missing_files(style)
    if not missing:
        return None
    for path, url in missing:
        if not url:
            return f"put {path.name} at {path}"
    return f"live2diff-engine models download --style {shlex.quote(style.name)}"


def _source_url(url: str) -> str:
    base = os.environ.get(CIVITAI_URL_ENV, "").strip().rstrip("/")
    if base and (url == CIVITAI or url.startswith(CIVITAI + "/")):
        return base + url[len(CIVITAI):]
    return url


def download_style(style: Style, token: str | None, progress=True, on_progress=None) -> list[Path]:
    """Fetch a style's files that are not here yet (resumable; the token never appears in output).
    ``on_progress(file_index, files, name, done_bytes, total_bytes_or_None)`` follows each file."""
    from .models.download import download_url

    missing = missing_files(style)
    for path, url in missing:  # every refusal before the first byte
        if not url:
            raise ModelLoadError(f"{path.name} for style {style.name!r} is missing and the style gives no url; put the file at {path}")
        if "civitai.com" in url and not token:
            raise ConfigError(
                f"style {style.name!r} downloads from civitai, which needs an API token: pass --token, set CIVITAI_TOKEN "
                f"or put [civitai] token = \"...\" in {config_file()}"
            )
    paths = []
    done = 0
    for path, url in style_files(style):
        if path.is_file():
            paths.append(path)
            continue
        report = None
        if on_progress is not None:
            report = (lambda i, n, name: lambda got, total: on_progress(i, n, name, got, total))(done, len(missing), path.name)
        paths.append(download_url(_source_url(url), path, token=token, progress=progress, on_progress=report))
        done += 1
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

    LoRAs (the few-step LCM-LoRA and the style's own, each at its scale) are fused into the weights
    at switch time: diffusers reads them (kohya, diffusers or peft layout) as peft adapters, peft
    merges each into its layer (``W += scale * alpha / rank * up @ down``), and the adapter layers
    are then removed, so the UNet and the text encoder are the plain modules again and a frame costs
    what it costs without a LoRA. Before fusing, the tensors the LoRAs change (and only those) are
    copied (to host memory when the model is on a GPU); the next switch copies them back, so the
    weights under the LoRAs return bit for bit. DreamBooth checkpoints (original SD single-file
    layout) are converted with diffusers' converters and copied into the loaded modules; the base
    comes back from its folder (the same file and the same cast as at load, so exactly).

    Every change is made in place: the UNet's and text encoder's Parameter objects, their storage
    and the module tree are the same before and after any switch, because a compiled or
    CUDA-graph-captured stream call reads the weights by address. A switch that fails leaves the
    previous style in place.

    A switch has two halves. :meth:`prepare` reads the style's files and converts a DreamBooth
    checkpoint (or the base's files, to go back to the base) into the loaded models' key layout and
    shapes, checked, in memory of their own (see ``_cast``); it touches no weight, so it runs beside
    the stream on another thread (the controller's loader, at a lower CPU priority). :meth:`apply`
    then copies the prepared tensors in and fuses the LoRAs: the only part that runs between two
    frames."""

    def __init__(self, comps, styles: dict[str, Style]):
        self.comps = comps
        self.styles = styles
        self.current: Style | None = None
        self._holder = None
        self.last_switch_s = 0.0
        self.last_prepare_s = 0.0  # reading and converting the files (beside the stream, when prepared ahead)
        self.last_swap_s = 0.0  # copying and fusing the weights in (between two frames)
        # Held while weights change and while the models' layout is read: a prepare on another
        # thread never sees the adapter layers a fusion puts in for a moment.
        self._lock = threading.RLock()
        self._layout: dict | None = None

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

    def _adapter_models(self) -> tuple[torch.nn.Module, ...]:
        # Where diffusers puts adapter layers: the 2D UNet (its blocks hold the motion modules too)
        # and the text encoder.
        return (self.comps.unet.unet2d, self.comps.text_encoder)

    def _weight_models(self) -> tuple[torch.nn.Module, ...]:
        # Every module whose weights a style may change: the streaming UNet shares the 2D UNet's
        # modules, but the 2D UNet's own attributes (conv_in, ...) are also reachable from it alone.
        return (self.comps.unet, self.comps.unet.unet2d, self.comps.text_encoder)

    def get(self, name: str) -> Style:
        if name not in self.styles:
            raise ConfigError(f"unknown style {name!r}; known styles: {', '.join(sorted(self.styles))}")
        return self.styles[name]

    def check_files(self, name_or_style: str | Style) -> Style:
        """The style, once each of its files is here (a missing one is a one-line ModelLoadError
        naming what fetches it); reads nothing."""
        style = self.get(name_or_style) if isinstance(name_or_style, str) else name_or_style
        for ref in style.loras:
            _local_file(ref.file, ref.url, style.name, "LoRA")
        if style.dreambooth:
            _local_file(style.dreambooth, style.dreambooth_url, style.name, "DreamBooth checkpoint")
        return style

    # -- LoRA ----------------------------------------------------------------------------------

    def _unload_loras(self) -> None:
        """Remove adapter layers (without merging them). Asked of the modules themselves: a load
        that failed half-way, or another tool, may have left LoRA layers on them."""
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

    def _unfuse(self) -> set[int]:
        """Copy back the weights saved before the last fusion; the ids of the parameters restored.
        The copies stay: they equal the weights now, and the next fusion reuses those it needs."""
        import torch

        saved = self.comps.unfused
        with torch.no_grad():
            for param, copy in saved.values():
                param.copy_(copy)
        return set(saved)

    def _fuse(self, loras: list[tuple[str, dict, str, float]]) -> set[int]:
        """Fuse ``(adapter name, tensors, label, scale)`` LoRAs into the weights; the ids of the
        parameters changed. Their values before fusing are kept in ``comps.unfused`` first."""
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        saved = self.comps.unfused
        if not loras:
            saved.clear()
            return set()
        try:
            names = []
            for name, tensors, label, _ in loras:
                self._load_lora(name, tensors, label)
                names.append(name)
            self._pipe().set_adapters(names, adapter_weights=[scale for *_, scale in loras])
            layers = [m for model in self._adapter_models() for m in model.modules() if isinstance(m, BaseTunerLayer)]
            changed: dict[int, torch.nn.Parameter] = {}
            for layer in layers:
                base = layer.get_base_layer()
                changed[id(base.weight)] = base.weight
                if getattr(base, "bias", None) is not None and any(getattr(layer, "lora_bias", {}).get(n, False) for n in names):
                    changed[id(base.bias)] = base.bias
            for key in [k for k in saved if k not in changed]:
                del saved[key]  # equal to the weights now (just unfused) and untouched by this style
            for key, param in changed.items():
                if key not in saved:
                    saved[key] = (param, _saved_copy(param))
            # What diffusers' fuse_lora does for each adapter layer, without its bookkeeping on the
            # pipeline: unsafe merge adds the delta to the weight in place (safe_merge would rebind
            # `.data` to a new tensor).
            with torch.no_grad():
                for layer in layers:
                    layer.merge(safe_merge=False, adapter_names=names)
            params = [p for p, _ in saved.values()]
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                raise ModelLoadError(
                    "the style's LoRAs give non-finite weights when fused (a damaged LoRA file, or scales too "
                    "large for this dtype); the previous style stays"
                )
        finally:
            self._unload_loras()
        return set(changed)

    # -- DreamBooth ----------------------------------------------------------------------------

    def _models_layout(self) -> dict:
        """{part: {key: (shape, dtype)}} of the UNet (its 2D keys), text encoder and full VAE: what
        converted weights must match. Read once, under the lock (the layout never changes: every
        switch copies into the same tensors)."""
        with self._lock:
            if self._layout is None:
                c = self.comps

                def layout(module, keys=None):
                    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items() if keys is None or k in keys}

                self._layout = {"unet": layout(c.unet, c.unet.base_state_keys()), "text_encoder": layout(c.text_encoder)}
                if type(c.vae).__name__ == "AutoencoderKL":
                    self._layout["vae"] = layout(c.vae)
            return self._layout

    def _base_weights(self) -> dict[str, dict]:
        """The base model's weights, read from where it was loaded and ready to copy in."""
        c = self.comps
        if c.base_dir is None and getattr(c, "base_file", None) is not None:  # a single-file base
            return self._single_file_weights(read_weight_file(c.base_file), str(c.base_file))
        if c.base_dir is None:
            raise ModelLoadError("the base model's folder is unknown, so its weights cannot be restored; restart the engine")
        layout = self._models_layout()
        base = Path(c.base_dir)
        weights = {"unet": _read_unet_base_weights(layout["unet"], base / "unet"),
                   "text_encoder": _read_module_file(layout["text_encoder"], base / "text_encoder")}
        if "vae" in layout:
            weights["vae"] = _read_module_file(layout["vae"], base / "vae")
        return weights

    def _single_file_weights(self, checkpoint: dict, source: str, fill_from_base: bool = False) -> dict[str, dict]:
        """A checkpoint in the original SD layout converted to the loaded models' keys and shapes,
        ready to copy in (``_cast``). With ``fill_from_base``, the parts it lacks (a DreamBooth file with no text encoder
        or VAE) come from the base's files, so that no part of the previous style stays behind."""
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint,
            convert_ldm_unet_checkpoint,
            convert_ldm_vae_checkpoint,
        )

        if not any(k.startswith("model.diffusion_model.") for k in checkpoint):
            raise ModelLoadError(f"{source} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
        layout = self._models_layout()
        try:
            unet_sd = convert_ldm_unet_checkpoint(checkpoint, dict(self.comps.unet.config))
        except Exception as exc:
            raise ModelLoadError(f"{source} does not convert to an SD1.5 UNet: {str(exc)[:160]}") from None
        own = layout["unet"]
        missing = sorted(set(own) - set(unet_sd))
        wrong = [k for k, v in unet_sd.items() if k in own and tuple(v.shape) != own[k][0]]
        if missing or wrong:
            detail = f"missing {missing[:3]}" if missing else f"wrong shapes {wrong[:3]}"
            raise ModelLoadError(f"{source} does not fit the Stable Diffusion 1.5 UNet ({detail}); use an SD1.5 DreamBooth checkpoint")
        weights = {"unet": _cast({k: v for k, v in unet_sd.items() if k in own}, own, _mapped(source))}
        del unet_sd
        if any(k.startswith("cond_stage_model.transformer.") for k in checkpoint):
            weights["text_encoder"] = _matching(layout["text_encoder"], convert_ldm_clip_checkpoint(checkpoint), source)
        if "vae" in layout and any(k.startswith("first_stage_model.") for k in checkpoint):
            vae_sd = convert_ldm_vae_checkpoint(checkpoint, dict(self.comps.vae.config))
            weights["vae"] = _matching(layout["vae"], vae_sd, source)
        lacking = [part for part in ("text_encoder", "vae") if part in layout and part not in weights]
        if fill_from_base and lacking and self.comps.base_dir is not None:
            base = Path(self.comps.base_dir)
            for part in lacking:
                weights[part] = _read_module_file(layout[part], base / part)
        return weights

    def _style_weights(self, style: Style) -> dict[str, dict]:
        """The UNet, text encoder and VAE weights of a style's DreamBooth (of the base without one)."""
        if style.dreambooth is None:
            return self._base_weights()
        path = _local_file(style.dreambooth, style.dreambooth_url, style.name, "DreamBooth checkpoint")
        checkpoint = read_weight_file(path)
        try:
            return self._single_file_weights(checkpoint, str(path), fill_from_base=True)
        finally:
            checkpoint.clear()  # the file's tensors go now, not when the prepared style does

    def _set_dreambooth(self, target: str | None, weights: dict[str, dict]) -> None:
        c = self.comps
        c.dreambooth = _PARTIAL  # until every module is copied: a failure half-way must not look loaded
        for part, module in (("unet", c.unet), ("text_encoder", c.text_encoder), ("vae", c.vae)):
            if part in weights:
                module.load_state_dict(weights[part], strict=False)  # copies into the tensors in place
        c.dreambooth = target

    # -- switching -----------------------------------------------------------------------------

    def _set_weights(self, style: Style, prepared: "PreparedStyle") -> set[int]:
        """Put the style's weights in place; the ids of the parameters whose values may have changed."""
        c = self.comps
        self._unload_loras()
        pinned = _Pinned(self._weight_models())
        try:
            touched = self._unfuse()
            if style.dreambooth != c.dreambooth:
                # Prepared when this style's DreamBooth was already in place, and another switch
                # came between: read it now.
                weights = prepared.weights if prepared.weights is not None else self._style_weights(style)
                c.unfused.clear()  # the weights under the LoRAs change
                self._set_dreambooth(style.dreambooth, weights)
                touched |= {id(p) for m in self._weight_models() for p in m.parameters()}
            loras = [("lcm", c.lcm_lora, "LCM-LoRA", 1.0)] if c.lcm_lora is not None else []
            loras += [(f"style{i}", tensors, ref.file, ref.scale) for i, (ref, tensors) in enumerate(prepared.loras)]
            touched |= self._fuse(loras)
        finally:
            pinned.restore()
        return touched

    def _roll_back(self, previous: Style | None, failed: Style, frames) -> None:
        self._unload_loras()
        pinned = _Pinned(self._weight_models())
        self._unfuse()  # undoes a fusion that stopped half-way
        pinned.restore()
        if previous is not None and previous != failed:
            try:
                self.apply(previous, frames)  # back to a style that worked
            except ModelLoadError:
                pass  # the first error is the one to report
        elif self.comps.dreambooth is _PARTIAL:
            self.comps.unfused.clear()
            self._set_dreambooth(None, self._base_weights())

    def prepare(self, name_or_style: str | Style) -> "PreparedStyle":
        """Read and convert everything the style needs, touching no weight (safe beside a running
        stream, on another thread). A missing or damaged file raises here: the style in place stays."""
        style = self.check_files(name_or_style)
        start = time.perf_counter()
        from .pipeline.text import apply_template

        apply_template(style.template, "")  # validates the template
        loras = [(ref, read_weight_file(_local_file(ref.file, ref.url, style.name, "LoRA"))) for ref in style.loras]
        weights = self._style_weights(style) if style.dreambooth != self.comps.dreambooth else None
        prepared = PreparedStyle(style, loras, weights, time.perf_counter() - start)
        self.last_prepare_s = prepared.seconds
        return prepared

    def apply(self, name_or_style: str | Style, frames=None, prepared: "PreparedStyle | None" = None,
              schedule: bool = True) -> Style:
        """Switch every model weight to the style; with a FramePipeline, also its text and (unless
        ``schedule`` is False: a schedule set since the switch was asked for stays) its steps.
        With ``prepared`` (from :meth:`prepare`, e.g. on another thread) only the copying and
        fusing are left to do here; without, the files are read first."""
        style = self.get(name_or_style) if isinstance(name_or_style, str) else name_or_style
        start = time.perf_counter()
        if prepared is None or prepared.style != style:
            # Read every file before touching any weight: a missing or damaged file keeps the old style.
            prepared = self.prepare(style)
        swap = time.perf_counter()
        previous = self.current
        with self._lock:
            try:
                touched = self._set_weights(style, prepared)
            except ModelLoadError:
                self._roll_back(previous, style, frames)
                raise
        unet = self.comps.unet
        qkv = {id(getattr(layer, n).weight) for layer in unet.temporal_layers for n in ("to_q", "to_k", "to_v")}
        if touched & qkv:
            unet.refresh_positions()  # the temporal layers keep positions projected with these weights
        if frames is not None:
            frames.set_text_style(style.template, style.clip_skip)
            args = style.schedule_args()
            if schedule and args != frames._schedule_args:
                frames.set_schedule(*args)
        self.current = style
        end = time.perf_counter()
        self.last_swap_s = end - swap
        self.last_switch_s = end - start
        return style


@dataclass
class PreparedStyle:
    """A style's files read and converted, ready for :meth:`StyleManager.apply` to copy in."""

    style: Style
    loras: list = field(repr=False)  # [(LoraRef, tensors)]
    weights: dict | None = field(repr=False)  # {part: state dict} of its DreamBooth (or the base); None: no change was due
    seconds: float = 0.0  # how long reading and converting took


_PARTIAL = "(partly loaded)"  # comps.dreambooth while a DreamBooth checkpoint is being copied in


def _saved_copy(param: torch.Tensor) -> torch.Tensor:
    """A copy of a weight to put back later: in host memory (pinned, for fast copies back) when the
    weight is on a GPU, so that the GPU holds one set of weights."""
    import torch

    if param.device.type == "cuda":
        return torch.empty(param.shape, dtype=param.dtype, pin_memory=True).copy_(param.detach())
    return param.detach().clone()


class _Pinned:
    """The parameter objects, their storage and the module tree of some models as they were when
    taken. ``restore`` undoes any replacement a library made since (a new module or Parameter in
    place of an old one, ``.data`` rebound to a new tensor) and keeps the values: they are copied
    into the original tensors."""

    def __init__(self, models):
        self.children = [(m, name, child) for model in models for m in model.modules() for name, child in m._modules.items()]
        self.params = [
            (m, name, p, p.detach())
            for model in models
            for m in model.modules()
            for name, p in m._parameters.items()
            if p is not None
        ]

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            self._restore()

    def _restore(self) -> None:
        for parent, name, child in self.children:
            if parent._modules.get(name) is not child:
                parent._modules[name] = child
        for module, name, param, storage in self.params:
            now = module._parameters.get(name)
            if now is not param or param.data_ptr() != storage.data_ptr():
                source = (now if now is not None else param).detach()
                if source.data_ptr() != storage.data_ptr():
                    storage.copy_(source)
                param.data = storage
                module._parameters[name] = param


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
    turn into one line, and peft from warning that a second adapter joins the first (it does, on
    purpose, until they are fused)."""

    def __enter__(self):
        import logging
        import warnings

        self._loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.CRITICAL)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def _mapped(source) -> bool:
    """Whether a file's tensors come back mapped from the file (safetensors) rather than read."""
    return str(source).endswith(".safetensors")


def _cast(state: dict, layout: dict, mapped: bool) -> dict:
    """Each tensor ready to be copied in between two frames. Where the weight's dtype is narrower
    (a float32 file, a float16 model) it is converted now, off the stream, so fewer bytes are
    copied then; a wider one (a float16 file, a float32 model) stays as it is: ``copy_`` converts
    as it copies, faster than copying a converted copy (and converting it costs a full-size
    allocation). Tensors mapped from a file are copied into memory of their own (``mapped``): the
    copy between frames then reads no disk, and a file replaced meanwhile cannot pull them away."""
    out = {}
    for k, v in state.items():
        dtype = layout[k][1]
        if v.dtype != dtype and v.element_size() > dtype.itemsize:
            out[k] = v.to(dtype)
        else:
            out[k] = v.clone() if mapped else v
    return out


def _read_unet_base_weights(layout: dict, folder: Path) -> dict:
    """A diffusers UNet folder's weights for the streaming UNet's 2D part (the loader at startup
    assigns tensors; a switch copies into the running model's own)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            path = folder / name
            break
    else:
        raise ModelLoadError(f"no UNet weights in {folder}; the Stable Diffusion folder is incomplete, download it again")
    state = read_weight_file(path)
    bad = sorted(k for k in layout if k not in state or tuple(state[k].shape) != layout[k][0])
    if bad:
        raise ModelLoadError(f"{path} no longer fits the loaded UNet (first at {bad[0]}); restart the engine")
    return _cast({k: v for k, v in state.items() if k in layout}, layout, _mapped(path))


def _read_module_file(layout: dict, folder: Path) -> dict:
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return _matching(layout, read_weight_file(folder / name), str(folder / name))
    raise ModelLoadError(f"no weights in {folder}; the Stable Diffusion folder is incomplete")


def _matching(layout: dict, state: dict, source: str) -> dict:
    """``state`` checked against a module's layout and cast to it, allowing for a `text_model.`
    prefix present on one side only."""
    if not set(state) & set(layout):
        for a, b in (("text_model.", ""), ("", "text_model.")):
            moved = {b + k[len(a):]: v for k, v in state.items() if k.startswith(a)}
            if set(moved) & set(layout):
                state = moved
                break
    missing = [k for k in layout if k not in state and not k.endswith("position_ids")]
    wrong = [k for k, v in state.items() if k in layout and tuple(v.shape) != layout[k][0]]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"wrong shapes {wrong[:3]}"
        raise ModelLoadError(f"{source} does not fit the loaded model ({detail}); is it a Stable Diffusion 1.5 checkpoint?")
    return _cast({k: v for k, v in state.items() if k in layout}, layout, _mapped(source))


def load_single_file_into(comps, checkpoint: dict[str, torch.Tensor], source: str) -> None:
    """Copy a DreamBooth checkpoint in the original SD layout into the loaded UNet, VAE and CLIP."""
    weights = StyleManager(comps, {})._single_file_weights(checkpoint, source)
    for part, module in (("unet", comps.unet), ("text_encoder", comps.text_encoder), ("vae", comps.vae)):
        if part in weights:
            module.load_state_dict(weights[part], strict=False)
