"""IP-Adapter for SD1.5: a style given as a picture instead of words.

An IP-Adapter file holds two parts: ``image_proj`` (the CLIP image embedding projected to a few
"image tokens" in the text's embedding space) and ``ip_adapter`` (a key and a value projection for
those tokens beside every cross attention, ``N.to_k_ip.weight`` / ``N.to_v_ip.weight`` with N = 1,
3, 5, ... in diffusers' attention-processor order). The loading is diffusers' own
(``UNet2DConditionModel._load_ip_adapter_weights``): it swaps each cross attention's processor for
an IP-Adapter processor, which attends to the text and, with a scale, to the image tokens, and adds
the image projection as ``encoder_hid_proj``. The streaming UNet runs the same 2D blocks, so it
takes the image tokens in its cross attention, warmup and stream alike (see
:meth:`~.unet.StreamingUNet.forward`'s ``image_tokens``).

This module: reading a file in the released layouts (one ``.safetensors`` with ``image_proj.*``
and ``ip_adapter.*`` keys, or the original ``.bin`` of two dicts, read without unpickling code),
attaching it, the scale, and the image tokens of an image embedding. The image encoder and the
picture's decoding live with the pipeline (not yet: see the issue's point 4).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError


def split_state_dict(flat: dict) -> dict:
    """``{"image_proj.proj.weight": ..., "ip_adapter.1.to_k_ip.weight": ...}`` -> the two dicts
    diffusers' loader takes (``{"image_proj": {...}, "ip_adapter": {...}}``)."""
    if "image_proj" in flat and "ip_adapter" in flat and isinstance(flat["image_proj"], dict):
        return {"image_proj": dict(flat["image_proj"]), "ip_adapter": dict(flat["ip_adapter"])}
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part in out and rest:
            out[part][rest] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise ModelLoadError("not an IP-Adapter: it needs image_proj.* and ip_adapter.* weights")
    return out


def read_ip_adapter(path: str | Path) -> dict:
    """An IP-Adapter file (``.safetensors``, or the original ``.bin`` read with ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"IP-Adapter {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
        else:
            flat = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"IP-Adapter {path} cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
    return split_state_dict(flat)


def attach_ip_adapter(unet, state_dict: dict, scale: float = 1.0) -> None:
    """Load an IP-Adapter into the streaming UNet's 2D blocks through diffusers' loader; the
    weights go to the UNet's device and dtype."""
    parts = split_state_dict(state_dict)
    unet2d = unet.unet2d
    try:
        unet2d._load_ip_adapter_weights([parts], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"the IP-Adapter does not fit this UNet ({type(exc).__name__}: {str(exc)[:160]})") from None
    unet2d.encoder_hid_proj.to(device=unet.device, dtype=unet.dtype)
    for proc in unet2d.attn_processors.values():
        if isinstance(proc, torch.nn.Module):
            proc.to(device=unet.device, dtype=unet.dtype)
    set_ip_adapter_scale(unet, scale)


def has_ip_adapter(unet) -> bool:
    unet2d = unet.unet2d  # (diffusers updates the config by attribute; its .get() keeps the old value)
    return getattr(unet2d, "encoder_hid_proj", None) is not None and \
        getattr(unet2d.config, "encoder_hid_dim_type", None) == "ip_image_proj"


def set_ip_adapter_scale(unet, scale: float) -> None:
    """How strongly the picture steers (0: not at all; 1: as trained). Every IP-Adapter processor
    reads it at each call, so a change needs no recompile of an eager step."""
    if not has_ip_adapter(unet):
        raise ConfigError("no IP-Adapter is loaded: a style image needs one")
    for proc in unet.unet2d.attn_processors.values():
        if hasattr(proc, "scale") and isinstance(proc.scale, list):
            proc.scale = [float(scale)] * len(proc.scale)


@torch.no_grad()
def image_tokens(unet, image_embeds: torch.Tensor) -> list[torch.Tensor]:
    """The image tokens of a CLIP image embedding (``[batch, dim]``): one ``[batch, 1, tokens,
    dim]`` tensor per loaded adapter, as the IP-Adapter processors take them."""
    if not has_ip_adapter(unet):
        raise ConfigError("no IP-Adapter is loaded: a style image needs one")
    embeds = image_embeds.to(device=unet.device, dtype=unet.dtype)
    if embeds.dim() == 2:
        embeds = embeds[:, None]  # one image per batch item
    return unet.unet2d.encoder_hid_proj([embeds])
