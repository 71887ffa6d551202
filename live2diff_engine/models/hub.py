"""Model manager: every model is a local path or a Hugging Face hub id, resolved to a local folder.

Hub models are cached by huggingface_hub (resumable downloads with progress bars). Offline, or
when a download fails, a missing model is one line: what is missing, where it was looked for,
and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError


@dataclass(frozen=True)
class ModelSpec:
    """A model the engine knows by name: its hub repository and the files it needs from it."""

    name: str
    repo_id: str
    what: str
    allow_patterns: tuple[str, ...] = ()
    filename: str | None = None  # a single file inside the repository (the result is that file)
    optional: bool = False  # not needed by the default setup
    extra: dict = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "Stable Diffusion 1.5 (UNet, VAE, CLIP text encoder, tokenizer)",
            allow_patterns=(
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/*",
                "scheduler/*",
            ),
        ),
        ModelSpec("live2diff", "Leoxing/Live2Diff", "Live2Diff motion modules and depth branch", filename="live2diff.ckpt"),
        ModelSpec(
            "midas",
            "Intel/dpt-hybrid-midas",
            "MiDaS DPT-Hybrid 384 depth estimator (what Live2Diff was trained with)",
            allow_patterns=("config.json", "*.safetensors", "preprocessor_config.json"),
        ),
        ModelSpec(
            "lcm-lora",
            "latent-consistency/lcm-lora-sdv1-5",
            "LCM-LoRA for SD1.5 (few-step denoising)",
            filename="pytorch_lora_weights.safetensors",
        ),
        ModelSpec(
            "taesd",
            "madebyollin/taesd",
            "TAESD tiny autoencoder (fast VAE option)",
            allow_patterns=("config.json", "diffusion_pytorch_model.safetensors"),
            optional=True,
        ),
        ModelSpec(
            "depth-anything",
            "depth-anything/Depth-Anything-V2-Small-hf",
            "Depth Anything V2 Small (fast depth option)",
            allow_patterns=("config.json", "model.safetensors", "preprocessor_config.json"),
            optional=True,
        ),
        ModelSpec(
            "clip",
            "openai/clip-vit-large-patch14",
            "CLIP ViT-L/14 image encoder (for `eval`: CLIP temporal consistency)",
            allow_patterns=("config.json", "model.safetensors", "preprocessor_config.json"),
            optional=True,
        ),
    )
}

DEFAULT_MODELS = [name for name, spec in MODELS.items() if not spec.optional]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/", "~"))


def _fetch_command(name: str | None, source: str) -> str:
    return f"live2diff-engine models download {name}" if name else f"live2diff-engine models download {source}"


def resolve(source: str | os.PathLike, *, name: str | None = None, download: bool = True) -> Path:
    """A local path as it is; a known model name or a hub id through the hub cache.

    ``name`` is the model's role (for messages and for the files to fetch when ``source`` is the
    role's default repository)."""
    text = os.fspath(source)
    spec = MODELS.get(text)
    if spec is not None:
        name, text = spec.name, spec.repo_id
    elif name in MODELS and MODELS[name].repo_id == text:
        spec = MODELS[name]
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(text):
        what = f"{name} model" if name else "model"
        raise ModelLoadError(f"{what} not found: {path} does not exist; pass an existing path or a hub id like owner/name")
    return _from_hub(text, spec, name, download=download)


def _from_hub(repo_id: str, spec: ModelSpec | None, name: str | None, *, download: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    label = name or repo_id
    offline = is_offline() or not download

    def fetch(local_only: bool) -> Path:
        if spec is not None and spec.filename:
            return Path(hf_hub_download(repo_id, spec.filename, local_files_only=local_only))
        patterns = list(spec.allow_patterns) if spec is not None and spec.allow_patterns else None
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))

    try:
        return fetch(local_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    where = f"the Hugging Face cache {cache_dir()}"
    if offline:
        raise ModelLoadError(
            f"{label} ({repo_id}) is not downloaded and this machine is offline: looked in {where}; "
            f"run `{_fetch_command(name, repo_id)}` while online"
        )
    try:
        return fetch(local_only=False)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = " (log in with `hf auth login` if it is gated)" if status in (401, 403) else ""
        raise ModelLoadError(f"cannot download {label} ({repo_id}): HTTP {status or 'error'}{hint}") from None
    except Exception as exc:  # connection refused, DNS, timeouts
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot download {label} ({repo_id}): {first}; looked in {where}; "
            f"check the network and run `{_fetch_command(name, repo_id)}`"
        ) from None


def status(spec: ModelSpec) -> tuple[bool, str]:
    """(present, where) for a known model, without touching the network."""
    try:
        path = _from_hub(spec.repo_id, spec, spec.name, download=False)
        return True, str(path)
    except ModelLoadError:
        return False, f"not downloaded (hub: {spec.repo_id})"
