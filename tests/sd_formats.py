"""Offline builders for the real Stable Diffusion 1.5 file formats, at toy size.

This is a helper module for the test-suite (not a test file). Everything here is offline,
deterministic from a seed, and small enough to build and run on a laptop CPU in seconds:

* ``write_clip_tokenizer(dst_dir)``: the REAL SD1.5 / OpenAI CLIP BPE tokenizer files
  (``vocab.json`` 49,408 tokens, ``merges.txt`` 48,894 merges, ``tokenizer_config.json``,
  ``special_tokens_map.json``), rebuilt from the BPE table that ships in the open-clip-torch
  wheel. ``clip_reference_encode(text)`` is an independent re-implementation of open-clip's
  ``SimpleTokenizer`` to check token ids against.
* ``save_tiny_sd(dst_dir, seed)``: a diffusers Stable Diffusion folder in the SD1.5 layout
  (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) with tiny random
  weights and config files that have SD1.5's key sets.
* ``save_single_file(sd_dir, dst_path, seed_offset)``: the same UNet + VAE + CLIP written as one
  original-CompVis/LDM-layout checkpoint (``.safetensors`` or ``.ckpt``), optionally perturbed
  ("a DreamBooth fine-tune of the base").
* ``save_kohya_lora(sd_dir, dst_path, ...)`` and ``save_kohya_lora_for_other_model(dst_path)``:
  LoRA files in the kohya / civitai naming, one that fits the tiny model and one made for
  full-size SD1.5 shapes (for error paths).

Facts the builders rely on were checked with diffusers 0.42.1 / transformers 5.24.0
(see ``/work/shared/notes/models-offline.md``).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "CLIP_VOCAB_SIZE",
    "CLIP_NUM_MERGES",
    "SD15_WIDTHS",
    "open_clip_bpe_path",
    "clip_vocab_and_merges",
    "clip_reference_encode",
    "write_clip_tokenizer",
    "tiny_unet_config",
    "tiny_vae_config",
    "tiny_text_encoder_config",
    "sd15_scheduler_config",
    "save_tiny_sd",
    "read_sd_weights",
    "perturb_state_dict",
    "unet_diffusers_to_ldm",
    "vae_diffusers_to_ldm",
    "text_encoder_diffusers_to_ldm",
    "ldm_state_dict",
    "expected_single_file_weights",
    "text_model_key",
    "save_single_file",
    "kohya_lora_targets",
    "save_kohya_lora",
    "save_kohya_lora_for_other_model",
]

BOS_ID = 49406
EOS_ID = 49407
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 48894
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# ---------------------------------------------------------------------------------------------
# CLIP tokenizer
# ---------------------------------------------------------------------------------------------


def open_clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open-clip-torch wheel.

    ``import open_clip`` needs torchvision, so the package is located without importing it.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode character table (same order as open-clip)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab token -> id, merges in rank order), built exactly as open-clip's SimpleTokenizer does.

    merges = lines 1..48894 of the gz (line 0 is a version header); vocab = the 256 byte
    characters, the same with ``</w>``, one token per merge, then the two special tokens
    (named ``<|startoftext|>`` / ``<|endoftext|>`` as in the Hugging Face files).
    """
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    assert len(merges) == CLIP_NUM_MERGES and all(len(m) == 2 for m in merges)
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE
    return vocab, merges


_CLIP_PAT = None


def _bpe_word(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        first, second = best
        new_word: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                new_word.append(first + second)
                i += 2
            else:
                new_word.append(word[i])
                i += 1
        word = tuple(new_word)
    return list(word)


def clip_reference_encode(text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids from an independent re-implementation of open-clip's ``SimpleTokenizer.encode``.

    Differences from open-clip: ``ftfy.fix_text`` is skipped (ftfy is not installed; it is a no-op
    for plain ASCII text), and no truncation / padding to 77 is done.
    """
    global _CLIP_PAT
    import regex

    if _CLIP_PAT is None:
        _CLIP_PAT = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
    vocab, merges = clip_vocab_and_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    byte_encoder = _bytes_to_unicode()
    text = html.unescape(html.unescape(text)).strip()
    text = re.sub(r"\s+", " ", text).strip().lower()
    ids: list[int] = []
    for token in _CLIP_PAT.findall(text):
        token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
        ids.extend(vocab[t] for t in _bpe_word(token, ranks))
    return [BOS_ID, *ids, EOS_ID] if add_special_tokens else ids


def _added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(dst_dir) -> Path:
    """Write SD1.5's ``tokenizer/`` folder (the openai/clip-vit-large-patch14 files) into dst_dir.

    ``CLIPTokenizer.from_pretrained(dst_dir)`` then gives the standard ids, e.g.
    "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
    """
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dst / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    plain = {k: v for k, v in _added_token("").items() if k != "__type"}
    special_tokens_map = {
        "bos_token": {**plain, "content": BOS},
        "eos_token": {**plain, "content": EOS},
        "pad_token": EOS,
        "unk_token": {**plain, "content": EOS},
    }
    (dst / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": _added_token(BOS),
        "do_lower_case": True,
        "eos_token": _added_token(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": EOS,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token(EOS),
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return dst


# ---------------------------------------------------------------------------------------------
# Tiny SD1.5-layout diffusers folder
# ---------------------------------------------------------------------------------------------

SD15_WIDTHS = (320, 640, 1280, 1280)  # real SD1.5 UNet block_out_channels (for other-model LoRAs)
_DIFFUSERS_VERSION = "0.25.0"  # >= 0.9: older versions make StableDiffusionPipeline force unet sample_size 64


def tiny_unet_config(cross_attention_dim: int = 32) -> dict:
    """UNet config with exactly the key set of SD1.5's unet/config.json (no mid_block_type): the
    engine's tiny preset, so the same weights come out of the same seed."""
    from live2diff_engine.models.tiny import TINY_UNET_CONFIG

    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        **TINY_UNET_CONFIG,
        "cross_attention_dim": cross_attention_dim,
    }


def tiny_vae_config() -> dict:
    """AutoencoderKL config with SD1.5's vae/config.json key set; 3 downsamplings -> scale factor 8."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def tiny_text_encoder_config(hidden_size: int = 32) -> dict:
    """CLIPTextModel config with SD1.5's text_encoder/config.json key set, tiny sizes."""
    return {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4 * hidden_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": hidden_size,
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
        "vocab_size": CLIP_VOCAB_SIZE,
    }


def sd15_scheduler_config() -> dict:
    """SD1.5's scheduler/scheduler_config.json (PNDM)."""
    return {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_tiny_sd(dst_dir, seed: int = 0, cross_attention_dim: int = 32) -> Path:
    """Write a tiny random-weight Stable Diffusion folder in the real SD1.5 diffusers layout.

    Weights are the libraries' default initialisation after ``torch.manual_seed(seed)`` (UNet),
    ``seed + 1`` (VAE) and ``seed + 2`` (text encoder); the global RNG state is left untouched.
    With seed=0 the UNet (config and weights) is exactly tests/golden/live2diff_tiny_a/base_unet.
    The text encoder is saved with the ``text_model.`` key prefix, as real SD1.5 folders are.
    Configs say ``_diffusers_version`` 0.25.0: with a version < 0.9 (SD1.5's files say 0.6.0)
    StableDiffusionPipeline rewrites a unet sample_size < 64 to 64, i.e. 512x512 images.
    Loads with ``StableDiffusionPipeline.from_pretrained(dst_dir, local_files_only=True)`` and
    produces 64x64 images.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    unet_cfg = tiny_unet_config(cross_attention_dim)
    vae_cfg = tiny_vae_config()
    te_cfg = tiny_text_encoder_config(cross_attention_dim)
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**strip(unet_cfg))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**strip(vae_cfg))
        torch.manual_seed(seed + 2)
        meta = ("architectures", "model_type", "torch_dtype", "transformers_version")
        te_kwargs = {k: v for k, v in strip(te_cfg).items() if k not in meta}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_kwargs))

    _write_json(dst / "model_index.json", _model_index())
    _write_json(dst / "unet" / "config.json", unet_cfg)
    save_file(_contiguous(unet.state_dict()), dst / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    _write_json(dst / "vae" / "config.json", vae_cfg)
    save_file(_contiguous(vae.state_dict()), dst / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    _write_json(dst / "text_encoder" / "config.json", te_cfg)
    te_sd = {text_model_key(k): v for k, v in text_encoder.state_dict().items()}
    save_file(_contiguous(te_sd), dst / "text_encoder" / "model.safetensors", {"format": "pt"})
    write_clip_tokenizer(dst / "tokenizer")
    _write_json(dst / "scheduler" / "scheduler_config.json", sd15_scheduler_config())
    return dst


def text_model_key(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); SD1.5 files have it.
    return key if key.startswith("text_model.") else "text_model." + key


def read_sd_weights(sd_dir) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "vae": ..., "text_encoder": ...} diffusers-layout state dicts of a folder
    (text encoder keys always with the ``text_model.`` prefix)."""
    sd_dir = Path(sd_dir)
    te = load_file(sd_dir / "text_encoder" / "model.safetensors")
    return {
        "unet": load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"),
        "vae": load_file(sd_dir / "vae" / "diffusion_pytorch_model.safetensors"),
        "text_encoder": {text_model_key(k): v for k, v in te.items()},
    }


def perturb_state_dict(sd: dict[str, torch.Tensor], seed_offset: int, eps: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministically perturb every floating tensor: t + eps * N(0, 1) (keys visited sorted,
    one randn per tensor from ``torch.Generator().manual_seed(seed_offset)``)."""
    gen = torch.Generator().manual_seed(int(seed_offset))
    out = {}
    for key in sorted(sd):
        t = sd[key]
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            t = (t.float() + eps * noise).to(t.dtype)
        out[key] = t.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# diffusers -> original CompVis / LDM key layout (inverse of diffusers' single_file_utils)
# ---------------------------------------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_key_to_ldm(key: str, config: dict) -> str:
    lpb = config["layers_per_block"]
    parts = key.split(".")
    head = ".".join(parts[:-1])
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{parts[-1]}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":  # downsamplers.0.conv.* -> input_blocks.N.0.op.*
            assert rest.startswith("conv.")
            return f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.{rest[len('conv.'):]}"
        i = 1 + b * (lpb + 1) + l
        if kind == "resnets":
            sub, leaf = rest.rsplit(".", 1)
            return f"input_blocks.{i}.0.{_UNET_RESNET[sub]}.{leaf}"
        return f"input_blocks.{i}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, l, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":  # resnets.0 -> middle_block.0, resnets.1 -> middle_block.2
            sub, leaf = rest.rsplit(".", 1)
            return f"middle_block.{2 * l}.{_UNET_RESNET[sub]}.{leaf}"
        return f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":  # after the attention (slot 2) if the block has one, else slot 1
            has_attn = "CrossAttn" in config["up_block_types"][b]
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.{rest}"
        i = b * (lpb + 1) + l
        if kind == "resnets":
            sub, leaf = rest.rsplit(".", 1)
            return f"output_blocks.{i}.0.{_UNET_RESNET[sub]}.{leaf}"
        return f"output_blocks.{i}.1.{rest}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def unet_diffusers_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` (SD1.x topology only:
    no class / addition embeddings)."""
    return {"model.diffusion_model." + _unet_key_to_ldm(k, config): v for k, v in sd.items()}


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key_to_ldm(key: str, num_blocks: int) -> str:
    top = {"conv_norm_out": "norm_out"}
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.{top.get(m[2], m[2])}.{m[3]}"
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key)
    if m:
        i, rest = int(m[1]), m[4]
        if m[3] is None:
            return f"encoder.down.{i}.downsample.{rest}"
        return f"encoder.down.{i}.block.{m[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
    if m:
        i, rest = num_blocks - 1 - int(m[1]), m[4]  # LDM numbers decoder levels from the bottom
        if m[3] is None:
            return f"decoder.up.{i}.upsample.{rest}"
        return f"decoder.up.{i}.block.{m[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key
    )
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    raise KeyError(f"no LDM name for VAE key {key!r}")


def vae_diffusers_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*``; mid-block attention q/k/v/proj_out
    weights become 1x1 conv kernels [C, C, 1, 1] as in the LDM AttnBlock."""
    n = len(config["block_out_channels"])
    out = {}
    for k, v in sd.items():
        new = _vae_key_to_ldm(k, n)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and v.ndim == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + new] = v.contiguous()
    return out


def text_encoder_diffusers_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys (with or without ``text_model.``) -> ``cond_stage_model.transformer.text_model.*``."""
    return {"cond_stage_model.transformer." + text_model_key(k): v for k, v in sd.items()}


def _ldm_extras(sched: dict, max_positions: int) -> dict[str, torch.Tensor]:
    """Non-weight entries a real SD1.5 checkpoint (v1-5-pruned-emaonly) carries: the DDPM schedule
    buffers, ``model_ema.decay`` / ``model_ema.num_updates`` and CLIP's ``position_ids``."""
    n = sched["num_train_timesteps"]
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    extras = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    extras = {k: v.float() for k, v in extras.items()}
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return extras


def ldm_state_dict(sd_dir, seed_offset: int | None = None, extras: bool = True) -> dict[str, torch.Tensor]:
    """The whole checkpoint ``save_single_file`` writes, as a dict (LDM key layout)."""
    sd_dir = Path(sd_dir)
    weights = expected_single_file_weights(sd_dir, seed_offset)
    unet_cfg = json.loads((sd_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((sd_dir / "vae" / "config.json").read_text())
    te_cfg = json.loads((sd_dir / "text_encoder" / "config.json").read_text())
    out = {}
    out.update(unet_diffusers_to_ldm(weights["unet"], unet_cfg))
    out.update(vae_diffusers_to_ldm(weights["vae"], vae_cfg))
    out.update(text_encoder_diffusers_to_ldm(weights["text_encoder"]))
    if extras:
        sched = json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text())
        out.update(_ldm_extras(sched, te_cfg["max_position_embeddings"]))
    return out


def expected_single_file_weights(sd_dir, seed_offset: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Diffusers-layout tensors that loading ``save_single_file(sd_dir, ..., seed_offset)`` must give."""
    weights = read_sd_weights(sd_dir)
    if seed_offset is not None:  # one independent noise stream per component
        names = sorted(weights)
        weights = {name: perturb_state_dict(weights[name], seed_offset * 3 + i) for i, name in enumerate(names)}
    return weights


def save_single_file(sd_dir, dst_path, seed_offset: int | None = None) -> Path:
    """Write the folder's UNet + VAE + text encoder as one original-layout SD1.5 checkpoint.

    ``.safetensors`` -> a flat safetensors file; ``.ckpt`` / ``.pt`` / ``.pth`` ->
    ``torch.save({"state_dict": ...})`` (readable with ``torch.load(weights_only=True)``).
    With ``seed_offset`` every weight is perturbed first (a stand-in for a DreamBooth fine-tune).
    Load back with e.g. ``StableDiffusionPipeline.from_single_file(path, config=str(sd_dir),
    local_files_only=True)``.
    """
    dst = Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in ldm_state_dict(sd_dir, seed_offset).items()}
    if dst.suffix == ".safetensors":
        save_file(sd, dst, {"format": "pt"})
    elif dst.suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": sd}, dst)
    else:
        raise ValueError(f"unsupported checkpoint suffix {dst.suffix!r} (use .safetensors or .ckpt)")
    return dst


# ---------------------------------------------------------------------------------------------
# kohya / civitai LoRA files
# ---------------------------------------------------------------------------------------------

_UNET_ATTN_RE = re.compile(
    r"^(.*\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0))\.weight$"
)
_UNET_PROJ_RE = re.compile(r"^(.*\.attentions\.\d+\.(proj_in|proj_out))\.weight$")
_UNET_FF_RE = re.compile(r"^(.*\.attentions\.\d+\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))\.weight$")
_TE_ATTN_RE = re.compile(r"^(text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj))\.weight$")
_TE_MLP_RE = re.compile(r"^(text_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2))\.weight$")


def kohya_lora_targets(
    sd_dir, text_encoder: bool = True, proj: bool = True, ff: bool = True, te_mlp: bool = False
) -> dict[str, tuple[int, ...]]:
    """kohya LoRA module name -> base weight shape, for the modules a LoRA of this folder adapts."""
    weights = read_sd_weights(sd_dir)
    targets = {}
    res = [_UNET_ATTN_RE] + ([_UNET_PROJ_RE] if proj else []) + ([_UNET_FF_RE] if ff else [])
    for key in sorted(weights["unet"]):
        if any(r.match(key) for r in res):
            module = key[: -len(".weight")]
            targets["lora_unet_" + module.replace(".", "_")] = tuple(weights["unet"][key].shape)
    if text_encoder:
        res = [_TE_ATTN_RE] + ([_TE_MLP_RE] if te_mlp else [])
        for key in sorted(weights["text_encoder"]):
            if any(r.match(key) for r in res):
                module = key[: -len(".weight")]
                targets["lora_te_" + module.replace(".", "_")] = tuple(weights["text_encoder"][key].shape)
    return targets


def _lora_tensors(targets: dict[str, tuple[int, ...]], rank: int, seed: int, scale: float, alpha: float | None):
    """Random lora_down / lora_up / alpha for each target. delta W = up @ down * alpha / rank has
    entries of size about scale / sqrt(fan_in), i.e. like the base weights themselves."""
    gen = torch.Generator().manual_seed(int(seed))
    alpha = float(rank if alpha is None else alpha)
    out = {}
    for name in sorted(targets):
        shape = targets[name]
        out_f, in_f = shape[0], shape[1]
        kernel = tuple(shape[2:])  # (1, 1) for SD1.5's conv proj_in / proj_out
        down = torch.randn((rank, in_f, *kernel), generator=gen) / in_f**0.5
        up = torch.randn((out_f, rank, *((1,) * len(kernel))), generator=gen) * (scale / rank**0.5)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _kohya_metadata(rank: int) -> dict[str, str]:
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_base_model_version": "sd_v1"}


def save_kohya_lora(
    sd_dir,
    dst_path,
    rank: int = 4,
    seed: int = 0,
    scale: float = 1.0,
    text_encoder: bool = True,
    proj: bool = True,
    ff: bool = True,
    te_mlp: bool = False,
    alpha: float | None = None,
) -> Path:
    """Write a kohya-format SD1.5 LoRA (.safetensors) for the folder's UNet (+ text encoder).

    Keys: ``lora_unet_<diffusers module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` for every attention to_q/to_k/to_v/to_out_0 (and proj_in/proj_out, ff if asked),
    ``lora_te_text_model_encoder_layers_N_self_attn_{q,k,v,out}_proj`` (and ``mlp_fc1/fc2`` with
    te_mlp) for the text encoder. alpha defaults to rank (multiplier 1). Weights are random and
    non-zero, so at adapter weight 1 the outputs change visibly.
    """
    targets = kohya_lora_targets(sd_dir, text_encoder=text_encoder, proj=proj, ff=ff, te_mlp=te_mlp)
    tensors = _lora_tensors(targets, rank, seed, scale, alpha)
    dst = Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst, _kohya_metadata(rank))
    return dst


def _sd15_full_size_attention_targets() -> dict[str, tuple[int, ...]]:
    """kohya names + shapes of a real SD1.5 LoRA's UNet attention and text-encoder modules."""
    ctx = 768
    targets: dict[str, tuple[int, ...]] = {}

    def attn(prefix: str, width: int) -> None:
        for a in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                in_f = ctx if (a == "attn2" and proj in ("to_k", "to_v")) else width
                targets[f"lora_unet_{prefix}_transformer_blocks_0_{a}_{proj}"] = (width, in_f)

    for b in range(3):
        for l in range(2):
            attn(f"down_blocks_{b}_attentions_{l}", SD15_WIDTHS[b])
    attn("mid_block_attentions_0", SD15_WIDTHS[-1])
    up_widths = tuple(reversed(SD15_WIDTHS))
    for b in range(1, 4):
        for l in range(3):
            attn(f"up_blocks_{b}_attentions_{l}", up_widths[b])
    for n in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            targets[f"lora_te_text_model_encoder_layers_{n}_self_attn_{proj}"] = (ctx, ctx)
    return targets


def save_kohya_lora_for_other_model(dst_path, rank: int = 4, seed: int = 0) -> Path:
    """A kohya LoRA made for full-size SD1.5 (320/640/1280-wide blocks, cross-attention 768, 12
    text layers of 768): the module names exist in the tiny model, the shapes do not fit.

    diffusers 0.42.1 + peft 0.21.2: ``pipe.load_lora_weights(path, adapter_name="z")`` on the tiny
    pipeline raises ``RuntimeError("Error(s) in loading state_dict for UNet2DConditionModel:\n\t
    size mismatch for down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.z.weight:
    copying a param with shape torch.Size([4, 320]) from checkpoint, the shape in current model
    is torch.Size([4, 32]). ...")``: 257 lines, one per mismatched lora_A / lora_B of the UNet
    (the text encoder is never reached), also logged by diffusers as "Loading z was unsuccessful
    with the following error: ...". The pipeline stays usable, its output is unchanged, and the
    adapter name can be reused.
    """
    tensors = _lora_tensors(_sd15_full_size_attention_targets(), rank, seed, 1.0, None)
    dst = Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst, _kohya_metadata(rank))
    return dst
