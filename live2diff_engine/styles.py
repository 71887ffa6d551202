"""Styles: a DreamBooth base and/or LoRAs, a prompt template, clip skip and denoising steps.

Styles live in TOML: the presets shipped with the package, overridden and extended by the user's
own styles file. A switch prepares the style's weights beside the stream and swaps them into the
same modules between two frames (one set of weights in use; the stream goes on), re-warming only
when the number of denoising steps changes.
"""

from __future__ import annotations

import atexit
import os
import shlex
import sys
import copy
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
    # A style picture (IP-Adapter) beside the styles file: its absolute path, resolved inside the
    # styles file's folder when the file was read (``image = "watercolor.png"``).
    image: str | None = None
    source: str = field(default="", compare=False)

    def schedule_args(self) -> tuple[int, list[int] | None, float | None]:
        t = list(self.t_index_list) if self.t_index_list is not None else None
        if t is None and self.strength is None:
            t = [32, 45]
        return self.num_inference_steps, t, self.strength


_KEYS = {"description", "dreambooth", "dreambooth_url", "loras", "template", "clip_skip", "num_inference_steps", "t_index_list",
         "strength", "image"}


def _style_image(value, where: str, folder: Path) -> str:
    """A style's ``image``: a picture file beside the styles file (a path relative to its folder,
    which it must stay inside), as an absolute path."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: image must be the name of a picture file beside the styles file, e.g. image = \"look.png\"")
    rel = Path(value)
    if rel.is_absolute() or rel.drive:
        raise ConfigError(f"{where}: image {value!r} must be a path relative to the styles file's folder {folder}")
    base = folder.resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise ConfigError(f"{where}: image {value!r} is outside the styles file's folder {folder}; put the picture there")
    return str(path)


def _parse_style(name: str, raw: dict, source: str, folder: Path | None = None) -> Style:
    """``folder``: where the styles file is (a style's image is found there)."""
    where = f"style {name!r} in {source}"
    folder = folder if folder is not None else PRESETS.parent
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
            image=_style_image(raw["image"], where, folder) if raw.get("image") is not None else None,
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
            styles[name] = _parse_style(name, raw, str(path), path.parent)
    return styles


# -- files ---------------------------------------------------------------------------------------


def _local_file(name: str, url: str | None, style: str, what: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    cached = styles_cache() / p.name
    if cached.is_file():
        return cached
    # Where it looked, in full: a relative name is taken from the folder the engine runs in.
    here = f"{p.resolve()}" if p.is_absolute() else f"{Path.cwd() / p} ({p} relative to the current folder {Path.cwd()})"
    how = (f"get it with `live2diff-engine models download --style {style} --token YOUR_CIVITAI_TOKEN` "
           "(it downloads into that folder)" if url
           else f"put {p.name} into that folder, or give its full path in the styles file (`live2diff-engine styles path` "
                "says where that file is)")
    raise ModelLoadError(f"{what} for style {style!r} is missing: {p.name} is neither at {here} "
                         f"nor in the styles folder {styles_cache()}; {how}")


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
    """Applies styles to the models of a :class:`~.models.components.Components`.

    LoRAs (the few-step LCM-LoRA and the style's own, each at its scale) are fused into the weights:
    diffusers reads them (kohya, diffusers or peft layout) as peft adapters and peft merges each
    into its layer (``W += scale * alpha / rank * up @ down``), so the UNet and the text encoder
    stay the plain modules and a frame costs what it costs without a LoRA. The weights under the
    LoRAs are kept (``comps.unfused``), so the next switch puts them back bit for bit. DreamBooth
    checkpoints (original SD single-file layout) are converted with diffusers' converters; the base
    comes back from its folder (the same file and the same cast as at load, so exactly).

    A switch has two halves. :meth:`prepare` computes the complete new value of every weight that
    changes, in the weight's own dtype, device and strides: a DreamBooth checkpoint (or the base's
    files, to go back to the base) read, converted and checked, and the LoRAs fused into copies of
    the weights under them (peft merging on a shadow of the module tree whose layers hold those
    copies). It changes no weight and no module, so it runs beside the stream on another thread
    (the controller's loader, at a lower CPU priority). :meth:`apply` then swaps the prepared
    tensors in between two frames: each Parameter (and buffer) object stays, its ``.data`` is
    rebound to the new tensor (constant time per tensor; the old values are freed once no frame
    holds them). Compiled stream calls read the weights as inputs on every call, so they see the
    new ones; a stream call captured in a CUDA graph reads them by address, so while one is in use
    (see :meth:`copies_in`) the swap copies into the weights' own memory instead (a copy on the
    device, prepared there beside the stream). The module tree and the Parameter objects never
    change, and a switch that fails while preparing leaves the previous style untouched."""

    def __init__(self, comps, styles: dict[str, Style]):
        self.comps = comps
        self.styles = styles
        self.current: Style | None = None
        self.last_switch_s = 0.0
        self.last_prepare_s = 0.0  # reading, converting and fusing (beside the stream, when prepared ahead)
        self.last_swap_s = 0.0  # swapping the prepared weights in (between two frames)
        self.copy_in: bool | None = None  # None: see copies_in(); True/False forces copying or rebinding
        # Held while weights change and while the models' layout is read.
        self._lock = threading.RLock()
        self._layout: dict | None = None
        self._tensors: dict | None = None
        self._side_stream = None  # the loader's CUDA stream (prepares never queue behind frames)

    def _adapter_models(self) -> tuple[torch.nn.Module, ...]:
        # Where diffusers puts adapter layers: the 2D UNet (its blocks hold the motion modules too)
        # and the text encoder.
        return (self.comps.unet.unet2d, self.comps.text_encoder)

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
        if style.image is not None:
            if not Path(style.image).is_file():
                raise ConfigError(f"style {style.name!r}: its image {style.image} is not there; put the picture beside "
                                  "the styles file or drop the style's image setting")
            if getattr(self.comps, "image_encoder", None) is None:
                raise ConfigError(f"style {style.name!r} has a style picture, and this engine has no IP-Adapter loaded: "
                                  "start it with --ip-adapter")
        return style

    def style_picture(self, style: Style):
        """The CLIP image embedding of a style's picture (None when it has none); beside the stream."""
        if style.image is None:
            return None
        from .models.ip_adapter import decode_picture, encode_picture, read_picture_file

        try:
            rgb = decode_picture(read_picture_file(style.image))
        except ConfigError as exc:
            raise ConfigError(f"style {style.name!r}: {style.image}: {exc}") from None
        return encode_picture(self.comps.image_encoder, rgb)

    def copies_in(self) -> bool:
        """Whether a swap copies into the weights' own memory rather than rebinding them: while a
        stream call captured in a CUDA graph (accelerate ``cudagraph``, or a compile mode that
        captures graphs) may replay with the weights' addresses."""
        if self.copy_in is not None:
            return self.copy_in
        store = self.comps.unet.__dict__.get("_stream_accelerators", {})
        return any(a.mode == "cudagraph" or a.compile_options.get("mode") in ("reduce-overhead", "max-autotune")
                   for a in list(store.values()))

    # -- LoRA (beside the stream) -------------------------------------------------------------------

    def _fuse_beside(self, loras: list[tuple[str, dict, str, float]], base_of) -> dict[int, tuple]:
        """``(adapter name, tensors, label, scale)`` LoRAs fused into copies of the weights under
        them (``base_of(parameter)``): {id(parameter): (parameter, fused tensor)}. diffusers and
        peft load the adapters into a shadow of the UNet and text encoder (new module and Parameter
        objects over the live weights' memory, only read), and each adapted layer's weight there is
        replaced by a copy before peft merges into it: the live modules and weights are never touched."""
        import torch
        from diffusers import StableDiffusionPipeline
        from peft.tuners.tuners_utils import BaseTunerLayer

        from .pipeline.schedule import make_scheduler

        c = self.comps
        live_of: dict[int, torch.nn.Module] = {}
        unet, text = (_shadow(model, live_of) for model in self._adapter_models())
        pipe = StableDiffusionPipeline(
            vae=c.vae, text_encoder=text, tokenizer=c.tokenizer, unet=unet, scheduler=make_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        names = []
        for name, tensors, label, _ in loras:
            try:
                with _quiet():
                    pipe.load_lora_weights(dict(tensors), adapter_name=name)
            except Exception as exc:
                raise _lora_error(label, exc) from None
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[scale for *_, scale in loras])
        fused: dict[int, tuple] = {}
        with torch.no_grad():
            for layer in (m for model in (unet, text) for m in model.modules() if isinstance(m, BaseTunerLayer)):
                base = layer.get_base_layer()
                live = live_of[id(base)]
                own = ["weight"]
                if getattr(live, "bias", None) is not None and any(getattr(layer, "lora_bias", {}).get(n, False) for n in names):
                    own.append("bias")
                for attr in own:
                    param = getattr(live, attr)
                    base._parameters[attr] = torch.nn.Parameter(base_of(param).clone(), requires_grad=False)
                # What diffusers' fuse_lora does for each adapter layer: unsafe merge adds each
                # delta to the weight in place (here: the copy).
                layer.merge(safe_merge=False, adapter_names=names)
                for attr in own:
                    param = getattr(live, attr)
                    fused[id(param)] = (param, base._parameters[attr].detach())
        if fused and not bool(torch.stack([torch.isfinite(t).all() for _, t in fused.values()]).all()):
            raise ModelLoadError(
                "the style's LoRAs give non-finite weights when fused (a damaged LoRA file, or scales too "
                "large for this dtype); the previous style stays"
            )
        return fused
    # -- DreamBooth ----------------------------------------------------------------------------

    def _models_layout(self) -> dict:
        """{part: {key: (shape, dtype, device, stride)}} of the UNet (its 2D keys), text encoder and
        full VAE: what converted weights must match. Read once, under the lock (the layout never
        changes: a switch puts in tensors of the same shape, dtype, device and strides)."""
        with self._lock:
            if self._layout is None:
                c = self.comps

                def layout(module, keys=None):
                    return {k: (tuple(v.shape), v.dtype, v.device, v.stride()) for k, v in module.state_dict().items()
                            if keys is None or k in keys}

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
        ready to swap in (``_final``). With ``fill_from_base``, the parts it lacks (a DreamBooth file with no text encoder
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
        weights = {"unet": _final({k: v for k, v in unet_sd.items() if k in own}, own, _mapped(source))}
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

    # -- switching -----------------------------------------------------------------------------

    def _live_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{part: {state-dict key: the live Parameter or buffer}} for every key of the layout."""
        with self._lock:
            if self._tensors is None:
                c = self.comps
                out = {}
                for part, module in (("unet", c.unet), ("text_encoder", c.text_encoder), ("vae", c.vae)):
                    if part in self._models_layout():
                        named = dict(module.named_buffers(remove_duplicate=False))
                        named.update(module.named_parameters(remove_duplicate=False))
                        out[part] = {k: named[k] for k in self._models_layout()[part] if k in named}
                self._tensors = out
            return self._tensors

    def _new_values(self, style: Style, weights: dict | None, loras: list, unfused: dict, copy_in: bool):
        """({id(tensor): (live tensor, its new value)} for every weight the style changes,
        the new ``comps.unfused``): the style's DreamBooth weights (or those under the LoRAs now,
        when the DreamBooth stays), with the LCM-LoRA and the style's LoRAs fused into copies."""
        values: dict[int, tuple] = dict(unfused)  # the weights under the current LoRAs come back
        if weights is not None:  # and over them (the motion modules excepted) the DreamBooth's
            live = self._live_tensors()
            for part, state in weights.items():
                for k, v in state.items():
                    if k in live[part]:
                        values[id(live[part][k])] = (live[part][k], v)

        def base_of(param):
            value = values.get(id(param))
            return value[1] if value is not None else param.detach()

        c = self.comps
        fusions = [("lcm", c.lcm_lora, "LCM-LoRA", 1.0)] if c.lcm_lora is not None else []
        fusions += [(f"style{i}", tensors, ref.file, ref.scale) for i, (ref, tensors) in enumerate(loras)]
        new_unfused: dict[int, tuple] = {}
        if fusions:
            for key, (param, value) in self._fuse_beside(fusions, base_of).items():
                under = base_of(param)
                if copy_in and under.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
                    under = _saved_copy(param)  # the swap copies into this very memory
                new_unfused[key] = (param, under)
                values[key] = (param, value)
        return values, new_unfused

    def prepare(self, name_or_style: str | Style, texts: tuple[str, str] | None = None) -> "PreparedStyle":
        """Compute the complete new value of every weight the style changes (read, convert, fuse),
        the motion modules' projected positions with them, and, for ``texts`` (the stream's prompt
        and negative prompt), the text embeddings the swap would otherwise compute between two
        frames; changing no weight (safe beside a running stream, on another thread). A missing or
        damaged file raises here: the style in place stays."""
        import torch

        style = self.check_files(name_or_style)
        start = time.perf_counter()
        from .pipeline.text import apply_template

        apply_template(style.template, "")  # validates the template
        c = self.comps
        with self._lock:  # what the weights are now; a swap since makes this prepare stale (apply redoes it)
            generation, dreambooth, unfused = c.weights_generation, c.dreambooth, dict(c.unfused)
        copy_in = self.copies_in()
        with self._on_side_stream() as side:
            loras = [(ref, read_weight_file(_local_file(ref.file, ref.url, style.name, "LoRA"))) for ref in style.loras]
            weights = self._style_weights(style) if style.dreambooth != dreambooth else None
            values, new_unfused = self._new_values(style, weights, loras, unfused, copy_in)
            positions = self._positions_ahead(values)
            text = self._encode_ahead(style, values, texts) if texts is not None else None
            picture = self.style_picture(style)
            if side is not None:
                side.synchronize()  # every prepared tensor complete before any frame reads it
        del weights
        prepared = PreparedStyle(style, values, new_unfused, generation, copy_in, time.perf_counter() - start,
                                 positions=positions, text=text, picture=picture)
        self.last_prepare_s = prepared.seconds
        return prepared

    def _positions_ahead(self, values: dict) -> list:
        """[(temporal layer, its positions projected with the new q/k/v weights)] for the layers
        whose q/k/v weights the style changes."""
        out = []
        for layer in self.comps.unet.temporal_layers:
            weights = [getattr(layer, n).weight for n in ("to_q", "to_k", "to_v")]
            if any(id(w) in values for w in weights):
                out.append((layer, layer.project_positions(*(values[id(w)][1] if id(w) in values else w.detach() for w in weights))))
        return out

    def _encode_ahead(self, style: Style, values: dict, texts: tuple[str, str]) -> dict:
        """{(text, clip skip): embeddings} of the stream's prompt (in the style's template) and
        negative prompt, by the text encoder with the style's weights: a shadow of the live one
        whose changed parameters are the new values (the live encoder is not touched)."""
        import torch

        from .pipeline.text import apply_template, encode_prompt

        c = self.comps
        shadow = _shadow(c.text_encoder, {})
        for kind, named in (("_parameters", c.text_encoder.named_parameters()), ("_buffers", c.text_encoder.named_buffers())):
            for name, tensor in named:
                if id(tensor) in values:
                    owner, _, attr = name.rpartition(".")
                    module = shadow.get_submodule(owner)
                    new = values[id(tensor)][1]
                    if kind == "_parameters":
                        new = torch.nn.Parameter(new, requires_grad=False)
                    getattr(module, kind)[attr] = new
        prompt, negative = texts
        out = {}
        for text in (apply_template(style.template, prompt), negative):
            out[(text, style.clip_skip)] = encode_prompt(c.tokenizer, shadow, text, style.clip_skip).to(c.dtype)
        return out

    def _on_side_stream(self):
        """On a GPU, the loader's copies and kernels go on a CUDA stream of their own, so that they
        never queue behind (or hold up) the frames on the default stream."""
        import contextlib

        import torch

        device = self.comps.device
        if device.type != "cuda":
            return contextlib.nullcontext(None)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
        stream = self._side_stream

        @contextlib.contextmanager
        def ctx():
            # The frames' stream may still have a swap's copies queued (with CUDA graphs a swap
            # copies the new values into the weights): wait for them, or this load would read
            # weights half-way through their copy. An event wait on the GPU; the host goes on.
            stream.wait_stream(torch.cuda.default_stream(device))
            with torch.cuda.device(device), torch.cuda.stream(stream):
                yield stream

        return ctx()

    def _swap(self, prepared: "PreparedStyle") -> set[int]:
        """Put the prepared values in (between two frames): rebinding each tensor's ``.data``, or
        copying into it (``prepared.copy``); the ids of the tensors changed."""
        import torch

        c = self.comps
        rebound = []
        if c.device.type == "cuda":
            # Made on the loader's CUDA stream, read from now on by the frames' one: their memory
            # must not go back to the loader's stream before the frames' work on it is done.
            frames_stream = torch.cuda.current_stream(c.device)
            made = [v for _, v in prepared.values.values()] + [v for _, v in prepared.unfused.values()]
            made += [p for _, p in prepared.positions] + list((prepared.text or {}).values())
            made += [prepared.picture] if prepared.picture is not None else []
            for tensor in made:
                if tensor.is_cuda:
                    tensor.record_stream(frames_stream)
        with torch.no_grad():
            try:
                for param, value in prepared.values.values():
                    if prepared.copy:
                        param.copy_(value)
                    else:
                        rebound.append((param, param.data))
                        param.data = value
            except BaseException:
                for param, old in reversed(rebound):
                    param.data = old
                if prepared.copy:
                    c.dreambooth = _PARTIAL  # copied half-way: the next switch reads every weight again
                    c.unfused.clear()
                    c.weights_generation += 1
                raise
        retired = [old for _, old in rebound] + [value for _, value in c.unfused.values()]
        c.unfused.clear()
        c.unfused.update(prepared.unfused)
        c.dreambooth = prepared.style.dreambooth
        c.weights_generation += 1
        _free_beside(retired)
        return set(prepared.values)

    def apply(self, name_or_style: str | Style, frames=None, prepared: "PreparedStyle | None" = None,
              schedule: bool = True, transition_s: float = 0.0) -> Style:
        """Switch every model weight to the style; with a FramePipeline, also its text and (unless
        ``schedule`` is False: a schedule set since the switch was asked for stays) its steps.
        With ``prepared`` (from :meth:`prepare`, e.g. on another thread) only the swap is left to do
        here; without (or when the weights changed since it was prepared), everything is
        prepared first."""
        style = self.get(name_or_style) if isinstance(name_or_style, str) else name_or_style
        start = time.perf_counter()
        with self._lock:
            if (prepared is None or prepared.style != style or prepared.generation != self.comps.weights_generation
                    or (self.copies_in() and not prepared.copy)):
                # Read every file before touching any weight: a missing or damaged file keeps the old style.
                prepared = self.prepare(style)
            swap = time.perf_counter()
            self._swap(prepared)
        # The temporal layers keep positions projected with their q/k/v weights: projected ahead
        # with the new ones (or now, for a style prepared without).
        for layer, fresh in prepared.positions:
            layer.refresh_positions(fresh)
        if frames is not None:
            # the template's text moves in over transition_s (the weights swap at once)
            frames.set_text_style(style.template, style.clip_skip, encoded=prepared.text, transition_s=transition_s)
            args = style.schedule_args()
            if schedule and args != frames._schedule_args:
                frames.set_schedule(*args)
            set_style_picture(frames, style, prepared.picture)
        self.current = style
        end = time.perf_counter()
        self.last_swap_s = end - swap
        self.last_switch_s = end - start
        return style


def set_style_picture(frames, style: Style, picture) -> None:
    """A style with a picture sets it (``picture``: its embedding); one without drops a picture an
    earlier style set, and leaves one the user gave (an upload, --style-image) as it is."""
    if picture is not None:
        frames.set_style_image(picture, source=f"style {style.name}")
    elif (getattr(frames, "style_image", None) or "").startswith("style "):
        frames.set_style_image(None)


@dataclass
class PreparedStyle:
    """A style's weights computed and ready for :meth:`StyleManager.apply` to swap in."""

    style: Style
    values: dict = field(repr=False)  # {id(tensor): (live Parameter or buffer, its new value)}
    unfused: dict = field(repr=False)  # the new comps.unfused: {id(parameter): (parameter, value under the LoRAs)}
    generation: int = 0  # comps.weights_generation it was computed against
    copy: bool = False  # prepared to be copied in (a CUDA graph holds the weights' addresses)
    seconds: float = 0.0  # how long reading, converting and fusing took
    positions: list = field(default_factory=list, repr=False)  # [(temporal layer, positions projected with the new weights)]
    text: dict | None = field(default=None, repr=False)  # {(text, clip skip): embeddings} with the new text encoder
    picture: object = field(default=None, repr=False)  # the style picture's image embedding (None: the style has none)


_freeing: list[threading.Thread] = []
_hurry = threading.Event()


def _free_beside(tensors: list) -> None:
    """Drop the replaced weights on a thread of their own: giving gigabytes back to the system
    takes a while (about 0.12 s for SD1.5's on the 2-core test machine), and the stream should not
    wait for it. A process that ends meanwhile (a `translate` right after its style was applied)
    finishes the job before it exits (:func:`_finish_freeing`)."""
    def free():
        # One at a time, with a pause between: freeing holds the interpreter lock, which the
        # stream's thread needs between two torch ops (all of SD1.5's take about 2 s this way).
        while tensors:
            tensors.pop()
            if not _hurry.is_set():
                time.sleep(0.002)
        _trim_heap()

    if tensors:
        _freeing[:] = [t for t in _freeing if t.is_alive()]
        thread = threading.Thread(target=free, name="style-free", daemon=True)
        _freeing.append(thread)
        thread.start()


@atexit.register
def _finish_freeing() -> None:
    """At exit, before the interpreter stops its daemon threads: a thread stopped in the middle of
    a tensor's destructor aborts the whole process ("terminate called without an active
    exception", exit -6, seen on a `translate` beside two CPU hogs), after its output was written.
    The weights still queued go at once, without the pauses."""
    _hurry.set()
    for thread in list(_freeing):
        thread.join(timeout=30)


_PARTIAL = "(partly loaded)"  # comps.dreambooth after a copy into the weights failed half-way


def _trim_heap() -> None:
    """Give the freed weights' memory back to the system. glibc keeps what was freed inside its heap
    (on the full-size model 1.6 GB of the 3.9 GB stayed with the process) until asked; elsewhere
    the allocator does what it does."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # ctypes lets go of the interpreter lock for the call
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass


def _saved_copy(param: torch.Tensor) -> torch.Tensor:
    """A copy of a weight to put back later (a weight whose own memory a swap copies into)."""
    import torch

    return param.detach().clone(memory_format=torch.preserve_format)


def _shadow(module: torch.nn.Module, live_of: dict) -> torch.nn.Module:
    """A copy of a module tree for a library to add adapter layers to: new module objects and
    containers, new Parameter objects over the same memory (no weight is copied), buffers shared.
    Replacing a layer, a Parameter or a ``.data`` in it leaves the original tree as it was.
    ``live_of`` gets {id(copy): original} for every module."""
    import collections

    import torch

    def visit(m):
        s = m.__class__.__new__(m.__class__)
        for key, value in list(vars(m).items()):  # a snapshot: the stream may set attributes meanwhile
            if type(value) in (dict, set, list, collections.OrderedDict):
                value = copy.copy(value)
            s.__dict__[key] = value
        s.__dict__["_parameters"] = {
            n: (torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) if p is not None else None)
            for n, p in m._parameters.items()
        }
        s.__dict__["_modules"] = {n: (visit(child) if child is not None else None) for n, child in m._modules.items()}
        live_of[id(s)] = m
        return s

    return visit(module)
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


def _final(state: dict, layout: dict, mapped: bool) -> dict:
    """Each tensor as the weight it will replace holds it: its dtype, device and strides, in memory
    of its own (a tensor mapped from a file, ``mapped``, is copied: the swap then reads no disk, and
    a file replaced meanwhile cannot pull it away). The conversion happens here, beside the stream,
    so the swap between two frames only rebinds (or copies like for like)."""
    import torch

    out = {}
    for k, v in state.items():
        shape, dtype, device, stride = layout[k]
        t = v.to(device=device, dtype=dtype)
        if t.stride() != stride:
            t = torch.empty_strided(shape, stride, dtype=dtype, device=device).copy_(t)
        elif t is v and mapped:
            t = v.clone(memory_format=torch.preserve_format)
        out[k] = t
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
    return _final({k: v for k, v in state.items() if k in layout}, layout, _mapped(path))


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
    return _final({k: v for k, v in state.items() if k in layout}, layout, _mapped(source))


def load_single_file_into(comps, checkpoint: dict[str, torch.Tensor], source: str) -> None:
    """Copy a DreamBooth checkpoint in the original SD layout into the loaded UNet, VAE and CLIP."""
    weights = StyleManager(comps, {})._single_file_weights(checkpoint, source)
    for part, module in (("unet", comps.unet), ("text_encoder", comps.text_encoder), ("vae", comps.vae)):
        if part in weights:
            module.load_state_dict(weights[part], strict=False)
