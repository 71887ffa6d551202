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


def _from_hub(repo_id: str, spec: ModelSpec | None, name: str | None, *, download: bool, command: str | None = None) -> Path:
    """``command``: what the messages say fetches the model (default: ``models download`` of it)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    label = name or repo_id
    offline = is_offline() or not download
    command = command or _fetch_command(name, repo_id)

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
            f"run `{command}` while online"
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
            f"check the network and run `{command}`"
        ) from None


def download_command(names: list[str]) -> str:
    """One command that fetches every one of ``names`` (model names or hub ids): plain
    ``models download`` when they are all among the models the engine needs by default."""
    if names and all(n in DEFAULT_MODELS for n in names):
        return "live2diff-engine models download"
    return "live2diff-engine models download " + " ".join(names)


def resolve_all(wanted: list[tuple[str, str | None]], *, download: bool = True, progress=None) -> list[Path]:
    """Resolve several models at once: ``wanted`` is ``(source, role)`` pairs as for :func:`resolve`.

    Local paths and models already in the hub cache come first; those not downloaded are then
    fetched (unless offline or ``download`` is false). Whatever is still missing is named in one
    :class:`ModelLoadError`, all of them together, with one command that fetches them all: a run
    never stops on the first missing model only to stop on the next one the time after."""
    say = progress or (lambda text: None)
    found: list[Path | None] = []
    not_found: list[str] = []  # local paths that do not exist (no download can help)
    to_fetch: list[tuple[int, str, ModelSpec | None, str | None]] = []
    for i, (source, role) in enumerate(wanted):
        text = os.fspath(source)
        spec = MODELS.get(text)
        name = role
        if spec is not None:
            name, text = spec.name, spec.repo_id
        elif role in MODELS and MODELS[role].repo_id == text:
            spec = MODELS[role]
        path = Path(text).expanduser()
        if path.exists():
            found.append(path)
            continue
        found.append(None)
        if not looks_like_hub_id(text):
            not_found.append(f"{role + ' model' if role else 'model'} {path} (no such file or folder)")
            continue
        try:
            found[i] = _from_hub(text, spec, name, download=False)
        except ModelLoadError:
            to_fetch.append((i, text, spec, name))
    if not_found:
        more = f"; also not downloaded: {_names(to_fetch)}" if to_fetch else ""
        raise ModelLoadError(f"not found: {', '.join(not_found)}{more}; pass existing paths or hub ids like owner/name")
    if not to_fetch:
        return found  # type: ignore[return-value]
    command = download_command([_label(spec, repo_id) for _, repo_id, spec, _ in to_fetch])
    if is_offline() or not download:
        why = "this machine is offline" if is_offline() else "downloads are off"
        raise ModelLoadError(
            f"{_count(to_fetch)} not downloaded: {_names(to_fetch)}; {why} (looked in the Hugging Face cache {cache_dir()}); "
            f"run `{command}` while online to fetch {'it' if len(to_fetch) == 1 else 'them all'}"
        )
    for k, (i, repo_id, spec, name) in enumerate(to_fetch):
        say(f"downloading {_label(spec, repo_id)} ({repo_id})")
        try:
            found[i] = _from_hub(repo_id, spec, name, download=True, command=command)
        except ModelLoadError as exc:
            rest = to_fetch[k + 1:]
            if not rest:
                raise
            raise ModelLoadError(f"{exc}; not downloaded yet either: {_names(rest)}") from None
    return found  # type: ignore[return-value]


def _label(spec: ModelSpec | None, repo_id: str) -> str:
    return spec.name if spec is not None else repo_id


def _names(items) -> str:
    return ", ".join(f"{spec.name} ({repo_id})" if spec is not None else repo_id for _, repo_id, spec, _ in items)


def _count(items) -> str:
    return "1 model is" if len(items) == 1 else f"{len(items)} models are"


def status(spec: ModelSpec) -> tuple[bool, str]:
    """(present, where) for a known model, without touching the network."""
    try:
        path = _from_hub(spec.repo_id, spec, spec.name, download=False)
        return True, str(path)
    except ModelLoadError:
        return False, f"not downloaded (hub: {spec.repo_id})"
