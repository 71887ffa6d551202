"""A single-file Stable Diffusion 1.5 checkpoint as the base model (what civitai hands out).

The file holds the UNet, VAE and CLIP text encoder in the original CompVis/LDM layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``). It is
read once (safetensors, or a pickle with ``weights_only=True``) and each part is converted with
diffusers' single-file converters, the ones a DreamBooth style's checkpoint goes through, against
the SD1.5 configs that ship with this package (``data/sd15``: the configs of
stable-diffusion-v1-5's unet/, vae/ and text_encoder/, and the CLIP tokenizer's BPE merges), so
nothing is fetched. ``config_dir`` may name another diffusers folder whose configs describe the
checkpoint instead (its ``tokenizer/`` is used when it has one).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .building import byte_characters, clip_tokenizer, parameters_on_meta
from .files import read_unet_config, read_weight_file

SD15_CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "sd15"

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_CLIP = "cond_stage_model.transformer."


@dataclass
class SingleFileBase:
    path: Path
    config_dir: Path
    checkpoint: dict[str, torch.Tensor]

    @property
    def has_vae(self) -> bool:
        return any(k.startswith(_VAE) for k in self.checkpoint)

    def _fit_hint(self) -> str:
        if self.config_dir == SD15_CONFIG_DIR:
            return "is it a Stable Diffusion 1.5 checkpoint? (SD2, SDXL and others are not supported)"
        return f"do the configs in {self.config_dir} describe it?"

    def unet_config(self) -> dict:
        return read_unet_config(self.config_dir / "unet")

    def unet_state(self, config: dict) -> dict[str, torch.Tensor]:
        """The UNet's weights in diffusers' naming."""
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        try:
            return convert_ldm_unet_checkpoint(self.checkpoint, dict(config))
        except Exception as exc:
            raise ModelLoadError(f"{self.path} does not convert to a UNet: {_first_line(exc)}; {self._fit_hint()}") from None

    def unet_mismatch(self, detail: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} does not fit the UNet of {self._config_name()} ({detail}); {self._fit_hint()}")

    def _config_name(self) -> str:
        return "Stable Diffusion 1.5" if self.config_dir == SD15_CONFIG_DIR else str(self.config_dir / "unet" / "config.json")

    def vae(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        if not self.has_vae:
            raise ModelLoadError(
                f"{self.path} holds no VAE (no first_stage_model.* weights); add --vae taesd, or use a checkpoint that includes its VAE"
            )
        config = _read_config(AutoencoderKL, self.config_dir / "vae", "VAE")
        model = _on_meta(lambda: AutoencoderKL.from_config(config))
        try:
            state = convert_ldm_vae_checkpoint(self.checkpoint, dict(model.config))
        except Exception as exc:
            raise ModelLoadError(f"{self.path} does not convert to a VAE: {_first_line(exc)}; {self._fit_hint()}") from None
        _load_all(model, state, f"{self.path} (its VAE)", self._fit_hint())
        # nn.Module's own `to`: diffusers' warns about float32 modules that only its from_pretrained keeps.
        return torch.nn.Module.to(model, dtype=dtype) if dtype is not None else model

    def text_encoder(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
        from transformers import CLIPTextConfig, CLIPTextModel

        if not any(k.startswith(_CLIP) for k in self.checkpoint):
            raise ModelLoadError(
                f"{self.path} holds no CLIP text encoder (no cond_stage_model.transformer.* weights); {self._fit_hint()}"
            )
        folder = self.config_dir / "text_encoder"
        try:
            config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot read the text encoder's config in {folder}: {_first_line(exc)}") from None
        model = _on_meta(lambda: CLIPTextModel(config))
        state = convert_ldm_clip_checkpoint(self.checkpoint)
        own = model.state_dict()
        if not set(state) & set(own):  # a `text_model.` level on one side only (transformers >= 5.6 has none)
            for moved in ({k.removeprefix("text_model."): v for k, v in state.items()},
                          {"text_model." + k: v for k, v in state.items()}):
                if set(moved) & set(own):
                    state = moved
                    break
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        _load_all(model, state, f"{self.path} (its text encoder)", self._fit_hint())
        return model.to(dtype=dtype) if dtype is not None else model

    def tokenizer(self):
        folder = self.config_dir / "tokenizer"
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            from transformers import CLIPTokenizer

            try:
                return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)
            except Exception as exc:
                raise ModelLoadError(f"cannot load the tokenizer in {folder}: {_first_line(exc)}") from None
        return sd15_tokenizer()


def open_single_file(path: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> SingleFileBase:
    """Read a single-file SD checkpoint (once); ``config_dir`` defaults to the shipped SD1.5 configs."""
    p = Path(path)
    config = Path(config_dir).expanduser() if config_dir else SD15_CONFIG_DIR
    if not (config / "unet" / "config.json").is_file():
        raise ModelLoadError(f"--base-config {config} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    checkpoint = read_weight_file(p)
    if not any(k.startswith(_UNET) for k in checkpoint):
        raise ModelLoadError(
            f"{p} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights); --base takes a diffusers "
            "SD1.5 folder, its unet/ folder, or a single-file SD1.5 checkpoint (.safetensors)"
        )
    return SingleFileBase(p, config, checkpoint)


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """SD1.5's CLIP vocabulary (49,408 tokens), rebuilt from the shipped BPE merges exactly as
    OpenAI's CLIP tokenizer builds it: the 256 byte characters, the same with ``</w>``, one token
    per merge in rank order, then the start and end tokens."""
    lines = gzip.decompress((SD15_CONFIG_DIR / "tokenizer" / "merges.txt.gz").read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:] if line.strip())
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def sd15_tokenizer():
    """The SD1.5 (CLIP ViT-L/14) tokenizer, built from the files shipped with the package."""
    vocab, merges = _clip_vocab_and_merges()
    return clip_tokenizer(vocab, merges)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _read_config(cls, folder: Path, what: str) -> dict:
    try:
        return cls.load_config(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the {what}'s config in {folder}: {_first_line(exc)}") from None


def _on_meta(make):
    """Build a module with its parameters on the meta device (no random init that the checkpoint
    overwrites); buffers are made for real."""
    with parameters_on_meta():
        return make()


def _load_all(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, hint: str) -> None:
    """Every parameter from ``state`` (which must hold nothing else), each of the right shape."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("position_ids"))
    unexpected = sorted(k for k in state if k not in own)
    wrong = [f"{k} {tuple(v.shape)} (wants {tuple(own[k].shape)})" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else f"wrong shapes {wrong[:2]}")
        raise ModelLoadError(f"{source} does not fit ({detail}); {hint}")
    model.load_state_dict(state, strict=False, assign=True)
