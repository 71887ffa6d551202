"""Motion modules with uni-directional temporal attention and a multi-timestep KV-cache.

A motion module is a small transformer that runs along the frame axis at every spatial position
of a UNet feature map. Live2Diff's version has two temporal self-attention layers per module,
absolute sinusoidal positions, and two ways to run:

* **sequence**: a clip of ``F`` frames attends to itself (optionally under an additive mask). The
  warmup pass runs this way over the 8 sink frames and writes their keys and values into one row
  of the cache; tests use it with a warmup+causal mask as the offline reference.
* **stream**: every batch item is one frame at one denoising step ``r``. It writes its key and
  value into cache row ``r`` at a given slot and attends to the whole row (the sink frames and
  its predecessors at the same noise level) under a per-row bias.

Positions enter as ``W x + W pe``: keys and values are cached without the positional term, and
the projected positional tables ``W pe`` are added when attending, so slots can be re-labelled
(rolled) without touching the cache. Nothing here depends on the stream's length: the cache is
allocated once and written at index tensors, so a call does the same work forever and never
synchronises with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn


@dataclass
class SequenceContext:
    """Run the temporal layers over clips of ``num_frames`` frames.

    ``mask`` is an additive ``[num_frames, num_frames]`` bias (0 or -inf), or None for full
    attention. With ``cache_row`` set, each layer stores the clip's keys and values (without
    positions) in slots ``0..num_frames-1`` of that cache row: this is the warmup.
    """

    num_frames: int
    mask: torch.Tensor | None = None
    cache_row: int | None = None


@dataclass
class StreamContext:
    """Run the temporal layers for one frame per cache row (batch item ``r`` uses row ``r``).

    ``bias`` ``[T, window]`` is added to the attention scores, ``pe_idx`` ``[T, window]`` is the
    positional index of each slot, ``update_idx`` ``[T]`` the slot the new frame is written to and
    ``q_idx`` ``[T]`` its positional index (``pe_idx[r, update_idx[r]]``); ``rows`` is ``0..T-1``.
    """

    bias: torch.Tensor
    pe_idx: torch.Tensor
    update_idx: torch.Tensor
    q_idx: torch.Tensor
    rows: torch.Tensor

    num_frames = 1


TemporalContext = SequenceContext | StreamContext


class PositionalTable(nn.Module):
    """Sinusoidal positions, stored as the buffer ``pe`` ``[1, max_len, dim]`` like the checkpoints."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * freq)
        pe[0, :, 1::2] = torch.cos(position * freq)
        self.register_buffer("pe", pe)


class TemporalAttention(nn.Module):
    """Temporal self-attention with a KV-cache of ``window`` slots per denoising step."""

    def __init__(self, dim: int, heads: int, head_dim: int, max_positions: int, window: int, sink: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.window = window
        self.sink = sink
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.pos_encoder = PositionalTable(dim, max_positions)
        self.layer_index = -1  # set by the UNet: position in the model's list of temporal layers
        # Allocated by allocate_cache(); not part of the checkpoint. Keys and values apart, heads
        # outside the slots: all keys are one contiguous batch of [window, head_dim] matrices, which
        # attention reads as they lie, never copied into another layout (see _stream).
        self.register_buffer("kv_cache", None, persistent=False)  # [2, T, hw, heads, window, head_dim]
        self.register_buffer("pos_qkv", None, persistent=False)  # [3, window, inner]

    # -- cache -------------------------------------------------------------------------------

    @torch.no_grad()
    def allocate_cache(self, steps: int, tokens: int) -> None:
        """Allocate (or reuse) a zeroed cache for ``steps`` denoising steps and ``tokens`` positions."""
        weight = self.to_q.weight
        shape = (2, steps, tokens, self.heads, self.window, self.head_dim)
        if self.kv_cache is None or tuple(self.kv_cache.shape) != shape or self.kv_cache.dtype != weight.dtype:
            self.kv_cache = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        else:
            self.kv_cache.zero_()
        self.refresh_positions()

    @torch.no_grad()
    def project_positions(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The positional table projected with these q/k/v weights (a style's, before it is swapped in)."""
        pe = self.pos_encoder.pe[0, : self.window].to(q.dtype)
        return torch.stack([F.linear(pe, q), F.linear(pe, k), F.linear(pe, v)])

    @torch.no_grad()
    def refresh_positions(self, fresh: torch.Tensor | None = None) -> None:
        """Project the positional table with the current q/k/v weights (after any weight change), or
        put in ``fresh``, projected ahead with the weights just swapped in."""
        if fresh is None:
            fresh = self.project_positions(self.to_q.weight, self.to_k.weight, self.to_v.weight)
        if self.pos_qkv is not None and self.pos_qkv.shape == fresh.shape and self.pos_qkv.dtype == fresh.dtype and self.pos_qkv.device == fresh.device:
            self.pos_qkv.copy_(fresh)  # in place: a compiled or captured stream call keeps reading this tensor
        else:
            self.pos_qkv = fresh

    def release_cache(self) -> None:
        self.kv_cache = None
        self.pos_qkv = None

    def cache_by_slot(self) -> torch.Tensor:
        """The cache as ``[T, 2, hw, window, heads * head_dim]`` (the original's layout: keys and
        values of each slot side by side), a copy."""
        return self.kv_cache.transpose(0, 1).transpose(3, 4).flatten(-2)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        """``x``: ``[batch * frames, tokens, dim]``; returns the same shape."""
        if isinstance(ctx, StreamContext):
            return self._stream(x, ctx)
        return self._sequence(x, ctx)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # [..., L, heads * d] -> [..., heads, L, d]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def _sequence(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        frames = ctx.num_frames
        bf, tokens, dim = x.shape
        # [(b f), d, c] -> [b, d, f, c]: every spatial position is a sequence over frames.
        x = x.view(bf // frames, frames, tokens, dim).transpose(1, 2)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if ctx.cache_row is not None:
            if self.kv_cache is None:
                raise RuntimeError("temporal KV-cache is not allocated; call allocate_cache first")
            heads, hd = self.heads, self.head_dim
            self.kv_cache[0, ctx.cache_row, :, :, :frames] = k[0].unflatten(-1, (heads, hd)).transpose(1, 2)
            self.kv_cache[1, ctx.cache_row, :, :, :frames] = v[0].unflatten(-1, (heads, hd)).transpose(1, 2)
        pe = self.pos_encoder.pe[0, :frames].to(x.dtype)
        q = q + F.linear(pe, self.to_q.weight)
        k = k + F.linear(pe, self.to_k.weight)
        v = v + F.linear(pe, self.to_v.weight)
        mask = None if ctx.mask is None else ctx.mask.to(q.dtype)
        out = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v), mask)
        out = out.transpose(-3, -2).flatten(-2)  # [b, d, f, c]
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(1, 2).reshape(bf, tokens, dim)

    def _stream(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("temporal KV-cache is not allocated; call allocate_cache first")
        rows, tokens, dim = x.shape
        heads, hd, window = self.heads, self.head_dim, self.window
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # [T, d, c]
        # Write the new frame of row r into slot update_idx[r] of cache row r, then attend to the row.
        cache[:, ctx.rows, :, :, ctx.update_idx] = torch.stack((k, v), dim=1).unflatten(-1, (heads, hd))
        pos_q, pos_k, pos_v = self.pos_qkv[0], self.pos_qkv[1], self.pos_qkv[2]
        q = (q + pos_q[ctx.q_idx].unsqueeze(1)).view(rows, tokens, heads, hd)
        # Each slot's positional projection, per row: [T, window, heads, hd] (small: no tokens axis).
        pk = pos_k[ctx.pe_idx].view(rows, window, heads, hd)
        pv = pos_v[ctx.pe_idx].view(rows, window, heads, hd)
        out = stream_attention(q, cache[0], cache[1], pk, pv, ctx.bias.to(q.dtype))  # [T, d, heads, hd]
        return self.to_out[1](self.to_out[0](out.reshape(rows, tokens, heads * hd)))


def stream_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos_k: torch.Tensor,
                     pos_v: torch.Tensor, bias: torch.Tensor, sdpa: bool | None = None) -> torch.Tensor:
    """One query per sequence against the ``window`` cached slots, keys and values being the
    cached ones plus each slot's positional projection.

    ``q`` ``[T, d, heads, hd]``; ``k_cache``/``v_cache`` ``[T, d, heads, window, hd]`` (the cache as
    it lies); ``pos_k``/``pos_v`` ``[T, window, heads, hd]``; ``bias`` ``[T, window]``. Returns
    ``[T, d, heads, hd]``.

    On accelerators: keys and values with positions added (one pass over the row), then
    scaled-dot-product attention. On the CPU the positional terms are never added to the cache:
    ``q.(k + p) = q.k + q.p`` and ``sum_w a_w (v_w + p_w) = sum_w a_w v_w + sum_w a_w p_w``, where the
    ``p`` terms have no tokens axis, so the row is read once by two batched matmuls and nothing the
    size of the cache is written (at SD1.5's largest layer, 256x256, that was 0.57 s of a 5.7 s
    frame: the keys and values with positions, then their transposed copy). Same numbers to
    float32 rounding (tested)."""
    if sdpa is None:
        sdpa = q.device.type != "cpu"
    rows, tokens, heads, hd = q.shape
    window = k_cache.shape[-2]
    if sdpa:
        # Rows and tokens in the batch dimension, heads in the heads dimension: CUDA's kernels
        # launch a grid over heads that is capped at 65535, and tokens * heads passes that from
        # about 1024x512 pixels on.
        keys = k_cache + pos_k.transpose(1, 2).unsqueeze(1)  # [T, d, heads, W, hd]
        values = v_cache + pos_v.transpose(1, 2).unsqueeze(1)
        mask = bias.repeat_interleave(tokens, dim=0)[:, None, None, :]  # [T*d, 1, 1, W]
        out = F.scaled_dot_product_attention(q.reshape(rows * tokens, heads, 1, hd), keys.view(rows * tokens, heads, window, hd),
                                             values.view(rows * tokens, heads, window, hd), mask)
        return out.view(rows, tokens, heads, hd)
    scores = torch.matmul(q.reshape(rows, tokens * heads, 1, hd), k_cache.reshape(rows, tokens * heads, window, hd).transpose(-1, -2))
    scores = scores.view(rows, tokens, heads, window) + torch.einsum("tdhe,twhe->tdhw", q, pos_k)
    attn = (scores * (hd ** -0.5) + bias[:, None, None, :]).softmax(-1)  # [T, d, heads, W]
    out = torch.matmul(attn.reshape(rows, tokens * heads, 1, window), v_cache.reshape(rows, tokens * heads, window, hd))
    return out.view(rows, tokens, heads, hd) + torch.einsum("tdhw,twhe->tdhe", attn, pos_v)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, num_attention: int, max_positions: int, window: int, sink: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalAttention(dim, heads, head_dim, max_positions, window, sink) for _ in range(num_attention)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attention)])
        self.ff = FeedForward(dim, dropout=0.0, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = attention(norm(x), ctx) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, cfg: "MotionConfig"):
        super().__init__()
        heads = cfg.num_attention_heads
        head_dim = channels // heads // cfg.temporal_attention_dim_div
        inner = heads * head_dim
        self.norm = nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [
                TemporalTransformerBlock(
                    inner, heads, head_dim, len(cfg.attention_block_types), cfg.max_positions, cfg.window_size, cfg.sink_size
                )
                for _ in range(cfg.num_transformer_block)
            ]
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        """``x``: ``[batch * frames, channels, h, w]``."""
        n, c, h, w = x.shape
        residual = x
        x = self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, ctx)
        x = self.proj_out(x)
        x = x.reshape(n, h, w, -1).permute(0, 3, 1, 2)
        # The residual first: an element-wise result takes the memory layout of its first operand
        # where they differ, and ``x`` is channels-last here. A channels-last feature map would make
        # every later convolution re-layout its weight on every call (about a tenth of a full-size
        # frame on the CPU; tests/test_stream.py counts the copies).
        return residual + x


class MotionModule(nn.Module):
    def __init__(self, channels: int, cfg: "MotionConfig"):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, cfg)

    def forward(self, x: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        return self.temporal_transformer(x, ctx)


class DepthEncoder(nn.Module):
    """The depth branch (``flow_conv_in``): a stack of 3x3 convolutions from the depth latent to
    the width of the UNet's first block, added to ``conv_in``'s output."""

    def __init__(self, out_channels: int, in_channels: int = 4, widths: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(depth))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


@dataclass(frozen=True)
class MotionConfig:
    """The ``unet_additional_kwargs`` of a Live2Diff config, in the fields this engine uses."""

    num_attention_heads: int = 8
    num_transformer_block: int = 1
    attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    max_positions: int = 24
    temporal_attention_dim_div: int = 1
    window_size: int = 16
    sink_size: int = 8
    resolutions: tuple[int, ...] = (1, 2, 4, 8)
    decoder_only: bool = False
    depth_branch: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: dict | None) -> "MotionConfig":
        """Read the original ``unet_additional_kwargs`` mapping (unknown keys are rejected)."""
        from ..errors import ConfigError

        if not kwargs:
            return cls()
        kw = dict(kwargs)
        mm = dict(kw.pop("motion_module_kwargs", {}) or {})
        attn = dict(mm.pop("attention_kwargs", {}) or {})
        if not kw.pop("use_motion_module", True):
            raise ConfigError("use_motion_module is false: Live2Diff needs its motion modules; remove that setting")
        if kw.pop("motion_module_mid_block", False):
            raise ConfigError("motion_module_mid_block is not supported (Live2Diff has no motion module in the mid block)")
        for name, wanted in (("unet_use_cross_frame_attention", False), ("unet_use_temporal_attention", False)):
            if bool(kw.pop(name, wanted)) != wanted:
                raise ConfigError(f"{name}={not wanted} is not supported; Live2Diff uses {name}={wanted}")
        mm_type = kw.pop("motion_module_type", "Streaming")
        if mm_type not in ("Streaming", "Vanilla"):
            raise ConfigError(f"motion_module_type {mm_type!r} is not supported; use 'Streaming'")
        kw.pop("use_inflated_groupnorm", None)  # per-frame group norm is what 2D blocks do anyway
        types = tuple(mm.pop("attention_block_types", cls.attention_block_types))
        if any(t != "Temporal_Self" for t in types):
            raise ConfigError(f"attention_block_types {list(types)} not supported; only 'Temporal_Self' layers exist")
        if not mm.pop("temporal_position_encoding", True):
            raise ConfigError("temporal_position_encoding=false is not supported")
        for ignored in ("zero_initialize", "attention_class_name", "cross_frame_attention_mode"):
            mm.pop(ignored, None)
        cfg = cls(
            num_attention_heads=int(mm.pop("num_attention_heads", cls.num_attention_heads)),
            num_transformer_block=int(mm.pop("num_transformer_block", cls.num_transformer_block)),
            attention_block_types=types,
            max_positions=int(mm.pop("temporal_position_encoding_max_len", cls.max_positions)),
            temporal_attention_dim_div=int(mm.pop("temporal_attention_dim_div", cls.temporal_attention_dim_div)),
            window_size=int(attn.pop("window_size", cls.window_size)),
            sink_size=int(attn.pop("sink_size", cls.sink_size)),
            resolutions=tuple(int(r) for r in kw.pop("motion_module_resolutions", cls.resolutions)),
            decoder_only=bool(kw.pop("motion_module_decoder_only", False)),
            depth_branch=bool(kw.pop("cond_mapping", True)),
        )
        leftover = sorted(list(kw) + [f"motion_module_kwargs.{k}" for k in mm] + [f"attention_kwargs.{k}" for k in attn])
        if leftover:
            raise ConfigError(f"unknown motion settings: {', '.join(leftover)}; remove them or check the config file")
        if not 0 < cfg.sink_size < cfg.window_size <= cfg.max_positions:
            raise ConfigError(
                f"window_size {cfg.window_size} and sink_size {cfg.sink_size} must satisfy "
                f"0 < sink < window <= positional table length {cfg.max_positions}"
            )
        return cfg
