"""Monocular depth estimators that turn webcam frames into the depth maps Live2Diff conditions on.

Two models sit behind one small interface, :class:`DepthEstimator`:

* :class:`MidasHybrid` is MiDaS DPT-Hybrid 384, the estimator Live2Diff was trained with. Its
  preprocessing copies the original pipeline exactly (a bilinear resize of the [-1, 1] frame to
  384 x 384, fed as is), because the UNet's depth branch learned that model's output.
* :class:`DepthAnythingV2` is Depth Anything V2 Small, a faster option whose disparity looks
  alike but is not what the depth branch was trained on.

Both run through transformers' own model classes and read a local folder in transformers format;
downloading happens elsewhere. The estimators return raw relative disparity (larger = nearer) at
the model's working resolution; normalising and resizing to latent size is the caller's job.
:func:`build_tiny_depth` makes random-weight miniatures of the same classes for tests.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ModelLoadError

DEPTH_MODELS = {
    "midas": "Intel/dpt-hybrid-midas",
    "depth-anything": "depth-anything/Depth-Anything-V2-Small-hf",
}

# Weight files transformers' from_pretrained can read from a local folder.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Parameters a checkpoint may leave out because inference never reads them.
_UNUSED_AT_INFERENCE = ("mask_token",)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w)


def _nearest_multiple(size: int | tuple[int, int], step: int) -> int | tuple[int, int]:
    h, w = (max(step, round(v / step) * step) for v in _pair(size))
    return h if isinstance(size, int) else (h, w)


class DepthEstimator(nn.Module):
    """Frames in, relative disparity out.

    ``forward(images)`` takes ``[N, 3, H, W]`` RGB in [-1, 1] (any float dtype; it is cast to the
    estimator's) and returns ``[N, h, w]`` raw disparity at the working size, in the estimator's
    dtype, not normalised. The wrapped transformers model is frozen and in eval mode.
    """

    name: str = "depth"

    def __init__(self, model: nn.Module, size: int | tuple[int, int]):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.size = _pair(size)
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] frames to the ``pixel_values`` the model expects."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects images shaped [N, 3, H, W], got {tuple(images.shape)}")
        pixel_values = self.preprocess(images.to(self.device))
        return self.model(pixel_values=pixel_values).predicted_depth

    def extra_repr(self) -> str:
        return f"name={self.name!r}, size={self.size}"


class MidasHybrid(DepthEstimator):
    """MiDaS DPT-Hybrid (BiT-R50 + ViT-B/16) through ``DPTForDepthEstimation``.

    MiDaS hybrid normalises with mean 0.5 / std 0.5, which maps [0, 1] to [-1, 1], so a [-1, 1]
    frame is already normalised: the original Live2Diff pipeline only resizes it (bilinear,
    ``align_corners=False``). The hybrid embedding only accepts its configured ``image_size``
    (384), so the working size must equal it. Output: ``[N, 384, 384]``.
    """

    name = "midas"

    def __init__(self, model: nn.Module, size: int | tuple[int, int] = 384):
        config = model.config
        if getattr(config, "model_type", None) != "dpt" or not getattr(config, "is_hybrid", False):
            raise ConfigError("MidasHybrid needs a DPT-Hybrid model (model_type 'dpt' with is_hybrid true)")
        if _pair(size) != _pair(config.image_size):
            raise ConfigError(
                f"MiDaS hybrid working size must equal the model's image_size {config.image_size} "
                f"(its position embeddings have a fixed grid), got {size}"
            )
        super().__init__(model, size)

    def preprocess(self, images: Tensor) -> Tensor:
        return F.interpolate(images.to(self.dtype), self.size, mode="bilinear", align_corners=False)


class DepthAnythingV2(DepthEstimator):
    """Depth Anything V2 (DINOv2 + DPT head) through ``DepthAnythingForDepthEstimation``.

    Preprocessing follows the model's training recipe: [-1, 1] to [0, 1], a bicubic resize to the
    working size (a multiple of the 14-pixel ViT patch), ImageNet mean/std. Output: ``[N, h, w]``
    at the working size.

    The resize runs in the estimator's dtype (float16 on a GPU), except on the CPU, whose
    antialiased bicubic kernel exists only for float32/float64: there it runs in float32 and only
    the result is cast. The resize weights sum to one, so the [0, 1] shift and the mean/std are
    folded into one per-channel multiply-add after it; its constants are buffers that move with
    the module (no tensor is built or copied to the device per call).
    """

    name = "depth-anything"

    def __init__(self, model: nn.Module, size: int | tuple[int, int] = 392):
        config = model.config
        if getattr(config, "model_type", None) != "depth_anything":
            raise ConfigError("DepthAnythingV2 needs a Depth Anything model (model_type 'depth_anything')")
        patch = config.patch_size
        h, w = _pair(size)
        if h <= 0 or w <= 0 or h % patch or w % patch:
            raise ConfigError(
                f"Depth Anything working size must be a positive multiple of {patch} (its ViT patch size), "
                f"got {size}; try {_nearest_multiple(size, patch)}"
            )
        super().__init__(model, (h, w))
        # ((x + 1) / 2 - mean) / std  ==  x * scale + shift, per channel.
        mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
        self.register_buffer("_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        dtype = self.dtype
        if images.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
            dtype = torch.float32  # no reduced-precision antialiased bicubic on the CPU
        x = F.interpolate(images.to(dtype), self.size, mode="bicubic", align_corners=False, antialias=True)
        return torch.addcmul(self._shift.to(dtype), x, self._scale.to(dtype)).to(self.dtype)


_KINDS = {"midas": MidasHybrid, "depth-anything": DepthAnythingV2}


def _check_kind(kind: str) -> type[DepthEstimator]:
    if kind not in _KINDS:
        raise ConfigError(f"unknown depth model kind {kind!r}; choose one of: {', '.join(_KINDS)}")
    return _KINDS[kind]


def _short(exc: BaseException) -> str:
    """First line of an exception message, trimmed: enough to name the cause in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def _fits_kind(kind: str, config: dict) -> bool:
    if kind == "midas":
        return config.get("model_type") == "dpt" and bool(config.get("is_hybrid"))
    return config.get("model_type") == "depth_anything"


def _describe(config: dict) -> str:
    kind = config.get("model_type")
    if kind == "dpt":
        return "a DPT-Hybrid (MiDaS) model" if config.get("is_hybrid") else "a plain DPT model, not the hybrid"
    if kind == "depth_anything":
        return "a Depth Anything model"
    return f"a {kind!r} model" if kind else "a config without model_type"


@contextmanager
def _quiet_transformers():
    """Mute transformers' warnings (its key-by-key load report) while we load: every problem it
    would report becomes our own one-line ModelLoadError instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_depth_estimator(
    kind: str,
    source: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    size: int | tuple[int, int] | None = None,
) -> DepthEstimator:
    """Load a depth estimator of ``kind`` ("midas" or "depth-anything") from a local folder.

    ``source`` is a transformers-format folder (config.json + model.safetensors), such as a
    download of ``DEPTH_MODELS[kind]``. ``size`` overrides the working size (default: the class's).
    Every failure is a :class:`ModelLoadError` with a one-line message.
    """
    from transformers import AutoConfig, AutoModelForDepthEstimation

    cls = _check_kind(kind)
    hub_id = DEPTH_MODELS[kind]
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"depth model folder not found: {folder}; download {hub_id} and pass its folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a transformers-format folder such as a download of {hub_id}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_path} ({_short(exc)}); download {hub_id} again") from None
    if not isinstance(raw, dict) or not _fits_kind(kind, raw):
        other = next((k for k in _KINDS if k != kind and isinstance(raw, dict) and _fits_kind(k, raw)), None)
        hint = f"use depth model kind {other!r} for it, or " if other else ""
        raise ModelLoadError(
            f"{folder} holds {_describe(raw if isinstance(raw, dict) else {})}, not what depth model kind {kind!r} needs; "
            f"{hint}pass a download of {hub_id}"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(f"no weights in {folder}: expected model.safetensors next to config.json; download {hub_id} again")

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            if kind == "depth-anything" and config.depth_estimation_type == "relative" and config.max_depth is None:
                config.max_depth = 1  # a null max_depth would multiply the relative output by None
            model, info = AutoModelForDepthEstimation.from_pretrained(
                folder,
                config=config,
                local_files_only=True,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,  # reported below as one line, not a raised table
                output_loading_info=True,
            )
    except Exception as exc:  # transformers raises many types (OSError, RuntimeError, SafetensorError, ...)
        raise ModelLoadError(f"cannot load the depth model in {folder} ({_short(exc)}); the files are damaged or incomplete, download {hub_id} again") from None
    missing = sorted(k for k in info["missing_keys"] if not k.endswith(_UNUSED_AT_INFERENCE))
    wrong = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info["mismatched_keys"])
    if missing or wrong:
        problem = f"{len(missing)} missing" if missing else f"{len(wrong)} of the wrong shape"
        raise ModelLoadError(
            f"weights in {folder} do not fit its config.json ({problem}, e.g. {', '.join((missing or wrong)[:3])}); "
            f"download {hub_id} again"
        )
    if size is None and kind == "midas":
        size = getattr(config, "image_size", 384)  # the hybrid accepts only the size it was built for
    estimator = cls(model) if size is None else cls(model, size)
    return estimator.to(device=device, dtype=dtype)


def tiny_depth_config(kind: str, size: int | None = None):
    """A transformers config of the real architecture for ``kind``, shrunk to under 100k weights.

    MiDaS: DPT with ``is_hybrid=True`` and a 3-stage bottleneck BiT backbone. The hybrid wiring
    fixes several sizes: BiT must expose exactly 3 stages; ``neck_hidden_sizes[0:2]`` must equal
    BiT's stage-1/2 widths (those maps bypass the reassemble layers); ``backbone_featmap_shape[1]``
    must equal the stage-3 width; ``patch_size`` must equal BiT's total stride (16); and the model
    accepts only inputs of exactly ``image_size`` (the hybrid embedding is never asked to
    interpolate its position grid). So the miniature keeps ``image_size=384`` and stays narrow.

    Depth Anything: a 4-layer DINOv2 backbone 16 wide; ``reassemble_hidden_size`` must equal the
    backbone width. Its position embeddings are interpolated, so any multiple of 14 works.
    """
    from transformers import BitConfig, DepthAnythingConfig, Dinov2Config, DPTConfig

    _check_kind(kind)
    if kind == "midas":
        bit = BitConfig(
            layer_type="bottleneck",
            global_padding="same",
            embedding_dynamic_padding=True,
            embedding_size=16,
            hidden_sizes=[16, 32, 64],
            depths=[1, 1, 1],
            num_groups=4,
            out_features=["stage1", "stage2", "stage3"],
        )
        return DPTConfig(
            is_hybrid=True,
            backbone_config=bit,
            image_size=size or 384,
            patch_size=16,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
            backbone_out_indices=[0, 1, 2, 3],  # hybrid uses only [2:] (ViT layers 2 and 3)
            readout_type="project",
            reassemble_factors=[1, 1, 1, 0.5],
            neck_hidden_sizes=[16, 32, 16, 16],
            backbone_featmap_shape=[1, 64, (size or 384) // 16, (size or 384) // 16],
            fusion_hidden_size=16,
        )
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )


def build_tiny_depth(kind: str, seed: int = 0, size: int | None = None) -> DepthEstimator:
    """A random-weight miniature of ``kind`` (global RNG left untouched); runs on CPU in milliseconds.

    transformers' 0.02-std init leaves a net this narrow with outputs near 1e-7 (zero in float16),
    often all cut to 0 by the head's final ReLU. So the layers are re-drawn with PyTorch's fan-in
    init and the last 1-channel convolution is scaled and biased, giving O(1) disparity that
    depends on the frame. It checks shapes, dtypes and plumbing, not depth quality.
    """
    from transformers import AutoModelForDepthEstimation

    cls = _check_kind(kind)
    if size is not None and size % (16 if kind == "midas" else 14):
        raise ConfigError(f"tiny {kind} working size must be a multiple of {16 if kind == 'midas' else 14}, got {size}")
    config = tiny_depth_config(kind, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForDepthEstimation.from_config(config)
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                module.reset_parameters()
    last = [m for m in model.head.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 1][-1]
    with torch.no_grad():
        last.weight.mul_(10.0)
        last.bias.fill_(0.5)
    return cls(model) if size is None else cls(model, size)
