"""Full-size Live2Diff with random weights: the real geometry of every part, nothing downloaded.

For speed measurements where no weights exist (a GPU box without network, a CI runner): the SD1.5
UNet inflated with the full motion-module layout (``MotionConfig()``, the layout of
``live2diff.ckpt``), the SD1.5 VAE, TAESD, the CLIP ViT-L/14 text encoder and MiDaS DPT-hybrid 384,
each built from its library's own config class. The output is noise; the cost per frame is the
real one, because cost depends on shapes, not on weight values.

Building is cheap: modules are constructed with their parameters on the meta device (buffers such
as positional tables are computed as usual), then materialised once on the target device in the
target dtype and filled by :func:`init_random_`, a fan-in normal init that keeps activations O(1)
through the deep stacks, so float16 stays finite. The libraries' default inits never run: on a GPU
box nothing is built on the CPU and copied over (drawing the streaming UNet's 1.3B parameters
takes about 20 s on two CPU cores either way; on a GPU, well under a second).

The text path uses the byte-level CLIP tokenizer of the tiny preset (514 tokens, no merges) in
front of the full 49,408-token encoder: ids differ from the real tokenizer's, shapes do not.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .building import byte_vocab, clip_tokenizer, parameters_on_meta
from .components import Components
from .motion import MotionConfig
from .unet import StreamingUNet, build_streaming_unet

FULL_RANDOM_LABEL = "full-size random-weight model (SD1.5 + Live2Diff geometry; a speed check: its output is noise)"

# stable-diffusion-v1-5 unet/config.json (the fields diffusers reads).
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stable-diffusion-v1-5 vae/config.json.
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14's text tower).
SD15_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
}

# Intel/dpt-hybrid-midas: ViT-B/16 on a 3-stage BiT-R50 stem, 384 x 384 (transformers' port).
MIDAS_HYBRID_CONFIG = {
    "is_hybrid": True,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 384,
    "patch_size": 16,
    "backbone_out_indices": [2, 5, 8, 11],
    "readout_type": "project",
    "reassemble_factors": [1, 1, 1, 0.5],
    "neck_hidden_sizes": [256, 512, 768, 768],
    "fusion_hidden_size": 256,
    "backbone_featmap_shape": [1, 1024, 24, 24],
    "neck_ignore_stages": [0, 1],
    "use_batch_norm_in_fusion_residual": False,
}
MIDAS_BIT_CONFIG = {
    "layer_type": "bottleneck",
    "global_padding": "same",
    "embedding_dynamic_padding": True,
    "depths": [3, 4, 9],
    "hidden_sizes": [256, 512, 1024, 2048],
    "num_groups": 32,
    "out_features": ["stage1", "stage2", "stage3"],
}


# -- meta construction and cheap init ---------------------------------------------------------


def _built(make: Callable[[], nn.Module], device, dtype, seed: int) -> nn.Module:
    """``make()`` with meta parameters, materialised on ``device`` in ``dtype`` and randomly filled
    (``device="meta"``: left on the meta device, for counting and layout checks)."""
    with parameters_on_meta():
        model = make()
    if dtype is not None:
        # Free on meta; floating buffers are cast as well. nn.Module's own `to`: diffusers' warns
        # about fp32 modules that only its from_pretrained keeps, and these models have none.
        nn.Module.to(model, dtype=dtype)
    device = torch.device(device)
    if device.type == "meta":
        return model.eval().requires_grad_(False)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, live in model.named_buffers():
            if name in buffers:
                live.copy_(buffers[name])
    init_random_(model, seed)
    return model.eval().requires_grad_(False)


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter in place: linear and convolution weights from N(0, 1/fan_in) (unit
    gain: a layer keeps the scale of its input, so residual stacks grow slowly and float16 has
    room), biases 0, norms at identity, embeddings and other tensors from N(0, 0.02^2)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def normal(p: torch.Tensor, std: float) -> None:
        p.normal_(0.0, std, generator=g)

    done: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            if isinstance(module, _NORMS):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name == "weight":
                fan_in = p[0].numel() if not isinstance(module, nn.modules.conv._ConvTransposeNd) else p.shape[0] * p[0, 0].numel()
                normal(p, 1.0 / math.sqrt(max(1, fan_in)))
            elif name == "bias":
                p.zero_()
            else:
                normal(p, 0.02)
    return model


# -- the parts ----------------------------------------------------------------------------------


def build_full_unet(device="cpu", dtype=None, seed: int = 0, motion: MotionConfig | None = None) -> StreamingUNet:
    """The SD1.5 UNet inflated with the full Live2Diff motion layout (``MotionConfig()``)."""
    return _built(lambda: build_streaming_unet(SD15_UNET_CONFIG, motion or MotionConfig()), device, dtype, seed)


def build_full_vae(device="cpu", dtype=None, seed: int = 1) -> nn.Module:
    """SD1.5's AutoencoderKL."""
    from diffusers import AutoencoderKL

    return _built(lambda: AutoencoderKL(**SD15_VAE_CONFIG), device, dtype, seed)


def build_full_taesd(device="cpu", dtype=None, seed: int = 2) -> nn.Module:
    """TAESD: diffusers' AutoencoderTiny with its default (SD) configuration."""
    from diffusers import AutoencoderTiny

    return _built(lambda: AutoencoderTiny(), device, dtype, seed)


def build_full_text(device="cpu", dtype=None, seed: int = 3):
    """(CLIP ViT-L/14 text encoder, byte-level tokenizer); see the module's note on the tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = byte_vocab()
    config = CLIPTextConfig(
        **SD15_TEXT_CONFIG, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    encoder = _built(lambda: CLIPTextModel(config), device, dtype, seed)
    tokenizer = clip_tokenizer(vocab, [])
    return encoder, tokenizer


def build_full_midas(device="cpu", dtype=None, seed: int = 4):
    """MiDaS DPT-hybrid 384 as the engine's :class:`~live2diff_engine.depth.MidasHybrid` estimator."""
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

    from ..depth import MidasHybrid

    config = DPTConfig(backbone_config=BitConfig(**MIDAS_BIT_CONFIG), **MIDAS_HYBRID_CONFIG)
    model = _built(lambda: DPTForDepthEstimation(config), device, dtype, seed)
    # The head ends in a ReLU: a positive bias on its last convolution keeps the disparity from
    # being cut to zero everywhere (a flat map would normalise to a constant).
    last = [m for m in model.head.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 1][-1]
    if last.bias is not None and last.bias.device.type != "meta":
        with torch.no_grad():
            last.bias.fill_(1.0)
    return MidasHybrid(model, config.image_size)


def build_full_components(device="cpu", dtype=torch.float32, seed: int = 0, vae: str = "full", progress=None):
    """Every part at full size with random weights, as :class:`~.components.Components`.

    ``vae`` is "full" (SD1.5's AutoencoderKL) or "taesd"; :func:`build_full_vae` and
    :func:`build_full_taesd` make the other one for benchmarks that swap them."""
    say = progress or (lambda text: None)
    say("building the streaming UNet (SD1.5 + motion modules)")
    unet = build_full_unet(device, dtype, seed)
    say(f"building the {'TAESD' if vae == 'taesd' else 'SD1.5'} VAE")
    vae_model = build_full_taesd(device, dtype, seed + 2) if vae == "taesd" else build_full_vae(device, dtype, seed + 1)
    say("building the CLIP text encoder")
    text_encoder, tokenizer = build_full_text(device, dtype, seed + 3)
    say("building MiDaS DPT-hybrid")
    depth = build_full_midas(device, dtype, seed + 4)
    return Components(unet, vae_model, text_encoder, tokenizer, depth, label=FULL_RANDOM_LABEL)
