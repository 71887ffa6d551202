"""``--model tiny``: a miniature random-weight Live2Diff for tests and smoke runs.

It has the real architecture (SD1.5-shaped UNet, 20 motion modules, depth branch) at a few
million parameters, so the whole pipeline runs on a laptop CPU in milliseconds per frame. Its
output is noise, not a style: it checks plumbing and arithmetic, never looks.
"""

from __future__ import annotations

import torch

from .motion import MotionConfig
from .unet import StreamingUNet, build_streaming_unet

TINY_LABEL = "tiny random-weight model (a pipeline check: its output is noise, not a style)"

TINY_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [32, 32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

TINY_PROMPT_SHAPE = (1, 77, 32)
TINY_LATENT_SIZE = (8, 8)


def build_tiny_unet(seed: int = 0, device=None, dtype=None) -> StreamingUNet:
    """A tiny streaming UNet with random weights drawn from ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_streaming_unet(TINY_UNET_CONFIG, MotionConfig())
    unet.eval().requires_grad_(False)
    return unet.to(device=device, dtype=dtype)


def tiny_prompt_embeds(seed: int = 0, device=None, dtype=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(TINY_PROMPT_SHAPE, generator=g).to(device=device, dtype=dtype)


TINY_IMAGE_DIM = 24  # the tiny image encoder's embedding size (projection_dim)


def tiny_ip_adapter(unet: StreamingUNet, seed: int = 0, image_dim: int = TINY_IMAGE_DIM) -> dict:
    """A random IP-Adapter for ``unet``, keyed as the released ``ip-adapter_sd15.safetensors``:
    ``image_proj.proj``/``image_proj.norm`` (4 image tokens) and ``ip_adapter.N.to_k_ip/to_v_ip``
    for N = 1, 3, 5, ... over the cross attentions in diffusers' processor order."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {"image_proj.proj.weight": torch.randn(4 * cross, image_dim, generator=g) * 0.2,
          "image_proj.proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
          "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
          "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=g)}
    modules = dict(unet.unet2d.named_modules())
    key = 1
    for name in unet.unet2d.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = modules[name[: -len(".processor")]].to_k.weight.shape[0]
            for kv in ("to_k_ip", "to_v_ip"):
                sd[f"ip_adapter.{key}.{kv}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            key += 2
    return sd


def build_tiny_image_encoder(seed: int = 0, image_dim: int = TINY_IMAGE_DIM):
    """A tiny random CLIP image encoder (transformers' ``CLIPVisionModelWithProjection``, the
    class of h94/IP-Adapter's ``models/image_encoder``), 32x32 pictures in, ``image_dim`` out."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=8, projection_dim=image_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(cfg)
    return encoder.eval().requires_grad_(False)
