"""The streaming UNet: Stable Diffusion 1.5's UNet inflated with Live2Diff's motion modules.

The 2D parts are diffusers' own blocks, run frame by frame (frames are folded into the batch):
per-frame convolutions and group norms are exactly what the original's "inflated" 3D layers do.
What this module adds is what no library has: a motion module after each spatial layer of every
down and up block, the depth branch added to ``conv_in``, and a forward pass that threads a
temporal context (sequence or stream) down to the motion modules.

State-dict names are diffusers' ``UNet2DConditionModel`` names plus the Live2Diff extras
(``down_blocks.N.motion_modules.M...``, ``up_blocks...``, ``flow_conv_in...``), so a diffusers UNet
folder and an original ``live2diff.ckpt`` load into it unchanged. The warmup and the stream use
the same modules: there is one set of weights.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..errors import ConfigError
from .motion import DepthEncoder, MotionConfig, MotionModule, SequenceContext, StreamContext, TemporalAttention

# diffusers UNet features that SD1.5 does not use and this forward pass does not implement.
_UNSUPPORTED = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
}


class StreamingUNet(nn.Module):
    """A diffusers UNet2DConditionModel with Live2Diff motion modules and depth branch."""

    def __init__(self, unet2d: UNet2DConditionModel, motion: MotionConfig):
        super().__init__()
        config = unet2d.config
        for key, wanted in _UNSUPPORTED.items():
            value = config.get(key, wanted)
            if value != wanted:
                raise ConfigError(f"UNet config {key}={value!r} is not supported by the streaming UNet (SD1.5 uses {wanted!r})")
        self.config = config
        self.motion_config = motion
        # Taken before inflation: the motion modules are attached to the 2D blocks themselves.
        self._base_keys = frozenset(unet2d.state_dict().keys())
        # The 2D model's modules become this model's modules (same objects, same names). The 2D
        # model itself stays reachable for diffusers loaders (LoRA) that act on it in place.
        object.__setattr__(self, "unet2d", unet2d)
        self.conv_in = unet2d.conv_in
        self.time_proj = unet2d.time_proj
        self.time_embedding = unet2d.time_embedding
        self.down_blocks = unet2d.down_blocks
        self.mid_block = unet2d.mid_block
        self.up_blocks = unet2d.up_blocks
        self.conv_norm_out = unet2d.conv_norm_out
        self.conv_act = unet2d.conv_act
        self.conv_out = unet2d.conv_out
        if motion.depth_branch:
            self.flow_conv_in = DepthEncoder(out_channels=config.block_out_channels[0], in_channels=config.in_channels)
        else:
            self.flow_conv_in = None

        n = len(self.down_blocks)
        for i, block in enumerate(self.down_blocks):
            if 2**i in motion.resolutions and not motion.decoder_only:
                block.motion_modules = nn.ModuleList(
                    [MotionModule(r.out_channels, motion) for r in block.resnets]
                )
        for i, block in enumerate(self.up_blocks):
            if 2 ** (n - 1 - i) in motion.resolutions:
                block.motion_modules = nn.ModuleList(
                    [MotionModule(r.out_channels, motion) for r in block.resnets]
                )
        self.temporal_layers: list[TemporalAttention] = [m for m in self.modules() if isinstance(m, TemporalAttention)]
        for index, layer in enumerate(self.temporal_layers):
            layer.layer_index = index
        self.num_upsamplers = sum(1 for b in self.up_blocks if getattr(b, "upsamplers", None) is not None)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def base_state_keys(self) -> set[str]:
        """Names that come from the 2D UNet (everything else is a Live2Diff extra)."""
        return set(self._base_keys)

    # -- cache -------------------------------------------------------------------------------

    def allocate_cache(self, steps: int, latent_height: int, latent_width: int) -> None:
        """Allocate every temporal layer's KV-cache for ``steps`` rows at this latent size."""
        h, w = latent_height, latent_width
        token_counts = self._tokens_per_layer(h, w)
        for layer in self.temporal_layers:
            layer.allocate_cache(steps, token_counts[layer.layer_index])

    def refresh_positions(self) -> None:
        for layer in self.temporal_layers:
            layer.refresh_positions()

    def release_cache(self) -> None:
        for layer in self.temporal_layers:
            layer.release_cache()

    def cache_tensors(self) -> list[torch.Tensor]:
        """The per-layer caches ``[2, T, hw, heads, window, head_dim]`` (keys, values) in layer order."""
        return [layer.kv_cache for layer in self.temporal_layers]

    def _tokens_per_layer(self, h: int, w: int) -> list[int]:
        counts: list[int] = []

        def visit(module: nn.Module, tokens: int) -> None:
            for m in module.modules():
                if isinstance(m, TemporalAttention):
                    counts.append(tokens)

        # The feature-map size at each level, as the forward pass makes them: a downsampler (3x3,
        # stride 2, padding 1) rounds up, and an upsampler goes back to the size of the skip
        # connection it meets (not twice its input: 5 -> 3 -> 6 would not meet the 5).
        levels: list[tuple[int, int]] = []
        for block in self.down_blocks:
            for mm in getattr(block, "motion_modules", []):
                visit(mm, h * w)
            if block.downsamplers is not None:
                levels.append((h, w))
                h, w = (h + 1) // 2, (w + 1) // 2
        for block in self.up_blocks:
            for mm in getattr(block, "motion_modules", []):
                visit(mm, h * w)
            if getattr(block, "upsamplers", None) is not None:
                h, w = levels.pop() if levels else (h * 2, w * 2)
        return counts

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        depth: torch.Tensor | None,
        ctx: SequenceContext | StreamContext,
        image_tokens: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict noise.

        ``sample`` and ``depth``: ``[batch * frames, C, h, w]`` (frames of one clip adjacent);
        ``timesteps`` ``[batch]``; ``encoder_hidden_states`` ``[batch, tokens, dim]``. In stream mode
        every batch item is one frame and ``batch`` equals the number of cache rows.
        ``image_tokens``: with an IP-Adapter loaded (see :mod:`.ip_adapter`), one ``[batch, 1,
        tokens, dim]`` tensor per adapter, which every cross attention attends to beside the text.
        """
        frames = ctx.num_frames
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))
        if frames > 1:
            emb = emb.repeat_interleave(frames, dim=0)
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(frames, dim=0)
            if image_tokens is not None:
                image_tokens = [t.repeat_interleave(frames, dim=0) for t in image_tokens]
        if image_tokens is not None:  # diffusers' IP-Adapter processors take (text, [image tokens])
            encoder_hidden_states = (encoder_hidden_states, list(image_tokens))

        up_factor = 2**self.num_upsamplers
        forward_size = any(s % up_factor != 0 for s in sample.shape[-2:])

        h = self.conv_in(sample)
        if depth is not None and self.flow_conv_in is not None:
            h = self.flow_conv_in(depth) + h

        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            attentions = getattr(block, "attentions", None)
            motion = getattr(block, "motion_modules", None)
            for j, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if attentions is not None:
                    h = attentions[j](h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
                if motion is not None:
                    h = motion[j](h, ctx)
                skips.append(h)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)
                skips.append(h)

        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)

        for i, block in enumerate(self.up_blocks):
            attentions = getattr(block, "attentions", None)
            motion = getattr(block, "motion_modules", None)
            for j, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)
                h = resnet(h, emb)
                if attentions is not None:
                    h = attentions[j](h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
                if motion is not None:
                    h = motion[j](h, ctx)
            if getattr(block, "upsamplers", None) is not None:
                size = skips[-1].shape[-2:] if forward_size and skips else None
                for up in block.upsamplers:
                    h = up(h, size)

        h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)


def build_streaming_unet(unet_config: dict, motion: MotionConfig, *, device=None, dtype=None) -> StreamingUNet:
    """Build a randomly initialised streaming UNet from a diffusers UNet config (for loaders and tests)."""
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    unet2d = UNet2DConditionModel.from_config(config)
    model = StreamingUNet(unet2d, motion)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
