"""Loading the streaming UNet from real files.

* the base UNet from a diffusers folder (``.../unet`` or an SD folder that contains ``unet/``), or
  from a single-file SD checkpoint (see :mod:`.single_file`);
* the Live2Diff motion checkpoint in its original layout: a torch pickle (``live2diff.ckpt``),
  with or without a ``state_dict`` wrapper, ``module.`` prefixes stripped and ``grid`` entries
  ignored; or a safetensors file with the same names.

Pickles are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code. One that
names other Python objects is refused as such (its opcodes are read, never run); every failure
becomes one :class:`ModelLoadError` line that names the file and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .files import _first, read_unet_config, read_weight_file
from .motion import MotionConfig
from .single_file import SingleFileBase, open_single_file
from .unet import StreamingUNet, build_streaming_unet


def resolve_unet_folder(path: str | os.PathLike) -> Path:
    """Accept a diffusers UNet folder or an SD pipeline folder that contains ``unet/``."""
    p = Path(path)
    if (p / "unet" / "config.json").is_file():
        return p / "unet"
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise ModelLoadError(f"base model folder not found: {p}; pass a diffusers SD1.5 folder (with unet/) or its unet/ folder")
    raise ModelLoadError(f"{p} has no config.json (nor unet/config.json); pass a diffusers SD1.5 folder or its unet/ folder")


def sd_folder(path: str | os.PathLike) -> Path:
    """The Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/) of a base given as that
    folder or as its ``unet/`` folder: the rest lies beside it."""
    p = Path(path)
    if (p / "unet" / "config.json").is_file():
        return p
    return resolve_unet_folder(p).parent


def read_motion_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a motion checkpoint into the streaming UNet's naming (prefixes stripped, grids dropped)."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"motion checkpoint not found: {p}; pass the path of live2diff.ckpt (or its .safetensors)")
    raw = read_weight_file(p)
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        if "grid" in key:
            continue
        out[key] = value
    return out


def load_motion_weights(unet: StreamingUNet, state: dict[str, torch.Tensor], source: str = "motion checkpoint") -> None:
    """Load the Live2Diff extras into ``unet``; any unexpected, missing or mis-shaped key is an error."""
    own = unet.state_dict()
    base = unet.base_state_keys()
    extra = {k: v for k, v in own.items() if k not in base}
    unexpected = [k for k in state if k not in extra]
    if unexpected:
        raise ModelLoadError(
            f"{source} has {len(unexpected)} unexpected keys: {_first(unexpected)}; "
            "it does not fit this model (wrong checkpoint, or a motion config that differs from the checkpoint's)"
        )
    # Positional tables are deterministic; everything else must come from the checkpoint.
    missing = [k for k in extra if k not in state and not k.endswith("pos_encoder.pe")]
    if missing:
        raise ModelLoadError(f"{source} is missing {len(missing)} keys: {_first(missing)}; use a complete Live2Diff motion checkpoint")
    wrong = [f"{k} {tuple(v.shape)} (model wants {tuple(extra[k].shape)})" for k, v in state.items() if v.shape != extra[k].shape]
    if wrong:
        raise ModelLoadError(f"{source} has {len(wrong)} tensors of the wrong shape: {_first(wrong, 3)}; it was made for another model size")
    unet.load_state_dict(state, strict=False, assign=True)
    if any(layer.pos_qkv is not None for layer in unet.temporal_layers):
        unet.refresh_positions()


def load_base_weights(unet: StreamingUNet, folder: Path) -> None:
    """Load a diffusers UNet folder's weights (safetensors first, then the .bin pickle)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            break
    else:
        raise ModelLoadError(f"no UNet weights in {folder}: expected diffusion_pytorch_model.safetensors; re-download the base model")
    load_base_state(unet, read_weight_file(path), lambda detail: ModelLoadError(f"UNet weights {path} do not match its config.json ({detail})"))


def load_base_state(unet: StreamingUNet, state: dict[str, torch.Tensor], mismatch) -> None:
    """Load the 2D UNet's weights (diffusers naming) into ``unet``; anything missing, unexpected or
    mis-shaped raises ``mismatch(detail)``."""
    base = unet.base_state_keys()
    unexpected = [k for k in state if k not in base]
    missing = [k for k in base if k not in state]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_first(unexpected)}")
        raise mismatch("; ".join(parts))
    own = unet.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config wants {tuple(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise mismatch(_first(wrong, 3))
    unet.load_state_dict(state, strict=False, assign=True)


def _materialise_positions(unet: StreamingUNet) -> None:
    """Rebuild positional tables a checkpoint did not carry; nothing else may be left unloaded."""
    from .motion import PositionalTable

    for module in unet.modules():
        if isinstance(module, PositionalTable) and module.pe.is_meta:
            _, max_len, dim = module.pe.shape
            module.pe = PositionalTable(dim, max_len).pe
    left = [name for name, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"these weights were not loaded: {_first(left)}; the checkpoints are incomplete")


def load_streaming_unet(
    base,
    motion_checkpoint: str | os.PathLike,
    motion: MotionConfig | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    base_config: str | os.PathLike | None = None,
) -> StreamingUNet:
    """Build the streaming UNet from the base (a diffusers SD folder, its ``unet/`` folder, a
    single-file SD checkpoint, or an opened :class:`~.single_file.SingleFileBase`) and a Live2Diff
    motion checkpoint. ``base_config``: the configs of a single-file base (default: SD1.5's)."""
    single = base if isinstance(base, SingleFileBase) else None
    if single is None and Path(base).is_file():
        single = open_single_file(base, base_config)
    if single is not None:
        config = single.unet_config()
        source = single.config_dir / "unet" / "config.json"
    else:
        folder = resolve_unet_folder(base)
        config = read_unet_config(folder)
        source = folder / "config.json"
    motion = motion or MotionConfig()
    try:
        # Built on the meta device: no time or memory spent on a random init that is overwritten.
        with torch.device("meta"):
            unet = build_streaming_unet(config, motion)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"cannot build a UNet from {source}: {exc}") from None
    if single is not None:
        load_base_state(unet, single.unet_state(config), single.unet_mismatch)
    else:
        load_base_weights(unet, folder)
    load_motion_weights(unet, read_motion_state_dict(motion_checkpoint), source=f"motion checkpoint {motion_checkpoint}")
    _materialise_positions(unet)
    unet.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        unet.to(device=device, dtype=dtype)
    return unet
