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
from .hub import resolve
from .loading import load_streaming_unet, read_weight_file
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
    is_tiny: bool = False
    dreambooth: str | None = None  # the DreamBooth checkpoint whose weights are loaded (None: the base)
    lcm_lora: dict | None = field(default=None, repr=False)  # the few-step LoRA's tensors, re-applied on style switches
    # The weights under the fused LoRAs, {id(parameter): (parameter, copy taken before fusing)}: the
    # next style switch copies them back. Kept here, with the weights, so that any StyleManager of
    # these models can undo what another one fused.
    unfused: dict = field(default_factory=dict, repr=False)

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
) -> Components:
    """Load the real models. ``progress(step_text)`` is told about each long step."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..depth import load_depth_estimator

    say = progress or (lambda text: None)
    say("resolving models")
    base_dir = resolve(base, name="sd15")
    motion_path = resolve(motion, name="live2diff")
    depth_dir = resolve(depth_source or depth, name=depth)
    say("loading the streaming UNet")
    unet = load_streaming_unet(base_dir, motion_path, dtype=dtype)
    say("loading VAE, text encoder and tokenizer")
    vae_model = load_vae(base_dir, vae, dtype)
    text_encoder = _from_pretrained(CLIPTextModel, base_dir / "text_encoder", "text encoder", torch_dtype=dtype)
    tokenizer = _from_pretrained(CLIPTokenizer, base_dir / "tokenizer", "tokenizer", model_max_length=77)
    say("loading the depth estimator")
    depth_model = load_depth_estimator(depth, depth_dir, dtype=dtype)
    comps = Components(unet, vae_model, text_encoder, tokenizer, depth_model, label=f"{base} + {motion}", base_dir=Path(base_dir))
    if lcm_lora:
        say("loading LCM-LoRA")
        comps.lcm_lora = read_lora(resolve(lcm_lora, name="lcm-lora"))
    comps = to_device(comps, device, dtype)
    return comps


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
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.depth):
        current = next(module.parameters())
        if current.device != torch.device(device) or current.dtype != dtype:
            module.to(device=device, dtype=dtype)
        module.eval().requires_grad_(False)
    return comps


# -- tiny preset -------------------------------------------------------------------------------


def _byte_vocab() -> dict[str, int]:
    """A CLIP-style byte-level vocabulary without merges (514 tokens): real tokenizer code, tiny table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


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
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..depth import build_tiny_depth
    from .tiny import TINY_LABEL, build_tiny_unet

    unet = build_tiny_unet(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        vocab = _byte_vocab()
        text_cfg = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )
        text_encoder = CLIPTextModel(text_cfg)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    # A small working size keeps the miniature fast (the real MiDaS works at 384).
    depth_model = build_tiny_depth(depth, seed=seed, size=64 if depth == "midas" else 56)
    comps = Components(unet, vae, text_encoder, tokenizer, depth_model, label=TINY_LABEL, is_tiny=True)
    return to_device(comps, device, dtype)
