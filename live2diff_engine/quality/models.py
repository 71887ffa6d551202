"""The two models ``eval`` looks through: a CLIP image encoder and the engine's depth estimator.

Both are found, never fetched: a local folder as it is, or a model of ``models list`` (or a hub
id) from the hub cache. A model that is not there is one line naming the ``models download``
command that fetches it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelLoadError
from .metrics import normalise_depth

CLIP_DEFAULT = "clip"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def locate(source: str, role: str, what: str, other_way: str = "") -> Path:
    """A local path as it is; a model name of ``models list`` (or the hub id of ``role``'s model,
    or any other hub id) from the hub cache, without downloading. ``other_way`` ends the missing
    line (e.g. "or pass --clip FOLDER")."""
    from ..models import hub

    spec = hub.MODELS.get(source)  # a model's name wins over a folder of that name (as in `models download`)
    path = Path(source).expanduser()
    if spec is None and path.exists():
        return path
    if spec is None and role in hub.MODELS and hub.MODELS[role].repo_id == source:
        spec = hub.MODELS[role]
    tail = f"; {other_way}" if other_way else ""
    if spec is not None:
        present, where = hub.status(spec)
        if present:
            return Path(where)
        raise ModelLoadError(f"the {what} ({spec.repo_id}) is not downloaded: get it with "
                             f"`live2diff-engine models download {spec.name}`{tail}")
    if hub.looks_like_hub_id(source):
        try:
            return hub.resolve(source, download=False)
        except ModelLoadError:
            raise ModelLoadError(f"{source} is not downloaded: get it with `live2diff-engine models download {source}`{tail}") from None
    raise ModelLoadError(f"{what} not found: {path} does not exist; pass a folder, or a hub id like owner/name{tail}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:160] if text else type(exc).__name__)


class ClipEmbedder:
    """RGB frames to unit-length CLIP image embeddings (transformers' CLIPVisionModelWithProjection
    and the model's own CLIPImageProcessor: resize, centre crop, CLIP mean/std)."""

    def __init__(self, model, processor, device: torch.device):
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        """``[N, D]`` float64, each row of length 1."""
        pixels = self.processor(images=list(frames), return_tensors="pt").pixel_values.to(self.device, torch.float32)
        emb = self.model(pixel_values=pixels).image_embeds.float()
        return F.normalize(emb, dim=-1).cpu().double().numpy()


def load_clip(folder: str | Path, device: torch.device | str = "cpu") -> ClipEmbedder:
    """A CLIP folder in transformers' layout (a whole CLIPModel as the hub's openai/clip-* hold, or
    a CLIPVisionModelWithProjection) as a :class:`ClipEmbedder`. Failures are one line."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    fetch = "download it again with `live2diff-engine models download clip`, or pass another --clip folder"
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise ModelLoadError(f"{folder} is not a CLIP model folder (no config.json); {fetch}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_path} ({_short(exc)}); {fetch}") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in ("clip", "clip_vision_model"):
        raise ModelLoadError(f"{folder} holds a {kind!r} model, not CLIP; pass a CLIP folder such as openai/clip-vit-large-patch14")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(f"no weights in {folder}: expected model.safetensors next to config.json; {fetch}")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if kind == "clip":  # the vision half of a whole CLIP; its projection width is the whole's
            whole = CLIPConfig.from_pretrained(folder)
            config = whole.vision_config
            config.projection_dim = whole.projection_dim
        else:
            config = CLIPVisionConfig.from_pretrained(folder)
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            folder, config=config, local_files_only=True, dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True
        )
        size = config.image_size
        if (folder / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(folder)
        else:
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    except Exception as exc:  # transformers raises many types
        raise ModelLoadError(f"cannot load the CLIP model in {folder} ({_short(exc)}); {fetch}") from None
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info["missing_keys"])
    wrong = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info["mismatched_keys"])
    if missing or wrong:
        problem = f"{len(missing)} missing" if missing else f"{len(wrong)} of the wrong shape"
        raise ModelLoadError(f"weights in {folder} do not fit its config.json ({problem}, e.g. {', '.join((missing or wrong)[:3])}); {fetch}")
    return ClipEmbedder(model, processor, device)


class DepthProbe:
    """RGB frames to depth maps normalised per frame as the pipeline does, through one of the
    engine's depth estimators (at the estimator's working size)."""

    def __init__(self, estimator, device: torch.device | str = "cpu"):
        self.estimator = estimator.to(device=device, dtype=torch.float32).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(frames)).to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        raw = self.estimator(x).float().cpu().numpy()
        return np.stack([normalise_depth(d) for d in raw])


def load_depth_probe(spec: str, device: torch.device | str = "cpu", tiny_seed: int | None = None) -> DepthProbe:
    """``spec``: midas, depth-anything or KIND=PATH (as ``--depth``). ``tiny_seed``: with a bare
    kind, the tiny random estimator of ``--model tiny`` instead of a downloaded one."""
    from ..depth import DEPTH_MODELS, build_tiny_depth, load_depth_estimator

    kind, _, source = spec.partition("=")
    if kind not in DEPTH_MODELS:
        raise ConfigError(f"unknown depth estimator {kind!r}; use midas, depth-anything or KIND=PATH")
    if not source and tiny_seed is not None:
        return DepthProbe(build_tiny_depth(kind, seed=tiny_seed, size=64 if kind == "midas" else 56), device)
    folder = locate(source or kind, kind, f"{kind} depth model", "or pass --depth KIND=FOLDER, or leave depth out with --metrics warp,clip,flicker")
    return DepthProbe(load_depth_estimator(kind, folder), device)
