"""Everything the frame pipeline needs, loaded together: streaming UNet, VAE, CLIP, depth.

Sources are local paths or hub ids (see :mod:`.hub`). The tiny preset builds all of them from
small configs with random weights, for tests and smoke runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .building import byte_vocab, clip_tokenizer
from .hub import model_requests, resolve  # noqa: F401  (model_requests lives in hub: no torch)
from .files import read_weight_file
from .loading import load_streaming_unet
from .unet import StreamingUNet


@dataclass
class Components:
    unet: StreamingUNet
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    depth: torch.nn.Module
    label: str
    base_dir: Path | None = None  # the SD folder (config source for single-file DreamBooth checkpoints)
    base_file: Path | None = None  # the single-file checkpoint the base came from, when it did
    is_tiny: bool = False
    dreambooth: str | None = None  # the DreamBooth checkpoint whose weights are loaded (None: the base)
    lcm_lora: dict | None = field(default=None, repr=False)  # the few-step LoRA's tensors, re-applied on style switches
    # The weights under the fused LoRAs, {id(parameter): (parameter, its value without them)}: the
    # next style switch puts them back. Kept here, with the weights, so that any StyleManager of
    # these models can undo what another one fused.
    unfused: dict = field(default_factory=dict, repr=False)
    # Counts style swaps: a style prepared against other weights than those in place is prepared again.
    weights_generation: int = 0
    # The CLIP image encoder of a loaded IP-Adapter (a style from a picture; see models/ip_adapter.py),
    # None when none is loaded.
    image_encoder: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        cfg = self.vae.config
        if hasattr(cfg, "block_out_channels") and "encoder_block_out_channels" not in cfg:
            return 2 ** (len(cfg.block_out_channels) - 1)
        return 2 ** (len(cfg.encoder_block_out_channels) - 1)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _from_pretrained(cls, folder: Path, what: str, **kwargs):
    if not folder.is_dir():
        raise ModelLoadError(f"{what} folder not found: {folder}; the Stable Diffusion folder is incomplete, download it again")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {what} from {folder}: {_one_line(exc)}") from None


def load_vae(base_dir: Path, vae: str, dtype: torch.dtype) -> torch.nn.Module:
    """``vae`` is "full" (the SD folder's AutoencoderKL) or a TAESD source (path or hub id, or "taesd")."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if vae == "full":
        return _from_pretrained(AutoencoderKL, base_dir / "vae", "VAE", torch_dtype=dtype)
    return _from_pretrained(AutoencoderTiny, resolve(vae, name="taesd"), "TAESD", torch_dtype=dtype)


class library_bars_off:
    """transformers' and diffusers' own progress bars ("Loading weights", "Loading checkpoint
    shards") off while models load from local files: the engine says one line per model instead.
    What was on before is on again afterwards (transformers' switch also covers huggingface_hub's
    download bars, which the engine keeps)."""

    def __enter__(self):
        from diffusers.utils import logging as dlog
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
        from transformers.utils import logging as tlog

        self._state = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled(), are_progress_bars_disabled())
        self._hub_off = disable_progress_bars
        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        transformers_on, diffusers_on, hub_off = self._state
        if transformers_on:
            tlog.enable_progress_bar()  # also turns huggingface_hub's on
        if diffusers_on:
            dlog.enable_progress_bar()
        if hub_off:
            self._hub_off()


def load_components(
    base: str = "sd15",
    motion: str = "live2diff",
    depth: str = "midas",
    depth_source: str | None = None,
    vae: str = "full",
    lcm_lora: str | None = "lcm-lora",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress=None,
    base_config: str | os.PathLike | None = None,
) -> Components:
    """Load the real models. ``progress(step_text)`` is told about each model as it loads.

    ``base`` is a diffusers SD1.5 folder, its ``unet/`` folder (the rest is found beside it), a
    single-file SD1.5 checkpoint, or a model name / hub id; ``base_config`` is the diffusers
    folder whose configs describe a single-file base (default: SD1.5's, shipped with the package).
    Every model is resolved before any loads: all that are missing are named in one error."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..depth import load_depth_estimator
    from .hub import resolve_all
    from .loading import sd_folder
    from .single_file import open_single_file

    say = progress or (lambda text: None)
    paths = resolve_all(model_requests(base, motion, depth, depth_source, vae, lcm_lora), progress=say)
    base_path, motion_path, depth_dir = paths[:3]
    lcm_path = paths[3] if lcm_lora else None
    vae_path = paths[-1] if vae != "full" else None
    with library_bars_off():
        if base_path.is_file():
            say(f"reading the checkpoint {base_path}")
            single = open_single_file(base_path, base_config)
            say("loading the UNet and the motion modules")
            unet = load_streaming_unet(single, motion_path, dtype=dtype)
            say("loading the VAE" if vae_path is None else "loading TAESD")
            vae_model = single.vae(dtype) if vae_path is None else load_vae(base_path, str(vae_path), dtype)
            say("loading the text encoder and tokenizer")
            text_encoder = single.text_encoder(dtype)
            tokenizer = single.tokenizer()
            del single  # the checkpoint's other tensors (EMA copies and the like) are not kept
            base_dir = None
        else:
            base_dir = sd_folder(base_path)
            _check_sd_folder(base_dir, base_path, need_vae=vae_path is None)
            say("loading the UNet and the motion modules")
            unet = load_streaming_unet(base_dir, motion_path, dtype=dtype)
            say("loading the VAE" if vae_path is None else "loading TAESD")
            vae_model = load_vae(base_dir, "full" if vae_path is None else str(vae_path), dtype)
            say("loading the text encoder and tokenizer")
            text_encoder = _from_pretrained(CLIPTextModel, base_dir / "text_encoder", "text encoder", torch_dtype=dtype)
            tokenizer = _from_pretrained(CLIPTokenizer, base_dir / "tokenizer", "tokenizer", model_max_length=77)
        say(f"loading the depth estimator ({depth})")
        depth_model = load_depth_estimator(depth, depth_dir, dtype=dtype)
        comps = Components(unet, vae_model, text_encoder, tokenizer, depth_model, label=f"{base} + {motion}", base_dir=base_dir)
        if base_dir is None:
            comps.base_file = base_path  # a DreamBooth style's switch back re-reads it
        if lcm_path is not None:
            say("loading the LCM-LoRA")
            comps.lcm_lora = read_lora(lcm_path)
    comps = to_device(comps, device, dtype)
    return comps


def _check_sd_folder(folder: Path, given: Path, need_vae: bool) -> None:
    """The parts of the SD folder the engine loads besides the UNet, all named at once if absent."""
    parts = ["text_encoder", "tokenizer"] + (["vae"] if need_vae else [])
    absent = [p for p in parts if not (folder / p).is_dir()]
    if not absent:
        return
    if folder != given:  # --base was the unet/ folder
        raise ModelLoadError(
            f"{given} is a UNet folder, and the rest of its Stable Diffusion model is not beside it: no "
            f"{', '.join(p + '/' for p in absent)} in {folder}; pass the whole SD1.5 folder (unet/, vae/, text_encoder/, "
            "tokenizer/) or a single-file SD1.5 checkpoint"
        )
    raise ModelLoadError(
        f"the Stable Diffusion folder {folder} is incomplete: no {', '.join(p + '/' for p in absent)}; download it again"
    )


def read_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors (safetensors, or a pickle read with weights_only=True)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no .safetensors LoRA file in {p}")
        p = files[0]
    if not p.is_file():
        raise ModelLoadError(f"LoRA file not found: {p}")
    return read_weight_file(p)


def to_device(comps: Components, device, dtype) -> Components:
    extra = (comps.image_encoder,) if comps.image_encoder is not None else ()
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.depth, *extra):
        current = next(module.parameters())
        if current.device != torch.device(device) or current.dtype != dtype:
            module.to(device=device, dtype=dtype)
        module.eval().requires_grad_(False)
    return comps


# -- tiny preset -------------------------------------------------------------------------------


TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


def build_tiny_components(seed: int = 0, device="cpu", dtype=torch.float32, depth: str = "midas") -> Components:
    """A tiny random-weight Live2Diff with every part, for tests and smoke runs (output is noise)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..depth import build_tiny_depth
    from .tiny import TINY_LABEL, build_tiny_unet

    unet = build_tiny_unet(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        vocab = byte_vocab()
        text_cfg = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )
        text_encoder = CLIPTextModel(text_cfg)
    tokenizer = clip_tokenizer(vocab, [])
    # A small working size keeps the miniature fast (the real MiDaS works at 384).
    depth_model = build_tiny_depth(depth, seed=seed, size=64 if depth == "midas" else 56)
    comps = Components(unet, vae, text_encoder, tokenizer, depth_model, label=TINY_LABEL, is_tiny=True)
    return to_device(comps, device, dtype)
