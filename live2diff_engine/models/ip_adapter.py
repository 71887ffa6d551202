"""IP-Adapter for SD1.5: a style given as a picture instead of words.

An IP-Adapter file holds two parts: ``image_proj`` (the CLIP image embedding projected to a few
"image tokens" in the text's embedding space) and ``ip_adapter`` (a key and a value projection for
those tokens beside every cross attention, ``N.to_k_ip.weight`` / ``N.to_v_ip.weight`` with N = 1,
3, 5, ... in diffusers' attention-processor order). The loading is diffusers' own
(``UNet2DConditionModel._load_ip_adapter_weights``): it swaps each cross attention's processor for
an IP-Adapter processor, which attends to the text and, with a scale, to the image tokens, and adds
the image projection as ``encoder_hid_proj``. The streaming UNet runs the same 2D blocks, so it
takes the image tokens in its cross attention, warmup and stream alike (see
:meth:`~.unet.StreamingUNet.forward`'s ``image_tokens``).

This module: reading a file in the released layouts (one ``.safetensors`` with ``image_proj.*``
and ``ip_adapter.*`` keys, or the original ``.bin`` of two dicts, read without unpickling code),
attaching it, the scale, the image tokens of an image embedding, the picture's decoding (bytes in,
never a path from a socket) and its CLIP image embedding, and :func:`load_style_image_models`, which
puts an IP-Adapter and its image encoder beside loaded components (the hub's by default:
``ip-adapter`` and ``image-encoder`` in ``models list``; random miniatures for ``--model tiny``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError


def split_state_dict(flat: dict) -> dict:
    """``{"image_proj.proj.weight": ..., "ip_adapter.1.to_k_ip.weight": ...}`` -> the two dicts
    diffusers' loader takes (``{"image_proj": {...}, "ip_adapter": {...}}``)."""
    if "image_proj" in flat and "ip_adapter" in flat and isinstance(flat["image_proj"], dict):
        return {"image_proj": dict(flat["image_proj"]), "ip_adapter": dict(flat["ip_adapter"])}
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part in out and rest:
            out[part][rest] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise ModelLoadError("not an IP-Adapter: it needs image_proj.* and ip_adapter.* weights")
    return out


def read_ip_adapter(path: str | Path) -> dict:
    """An IP-Adapter file (``.safetensors``, or the original ``.bin`` read with ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"IP-Adapter {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
        else:
            flat = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"IP-Adapter {path} cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
    return split_state_dict(flat)


def check_ip_adapter(parts: dict, source: str) -> tuple[int, int]:
    """(cross attentions, text width) of an IP-Adapter's two parts, once they hold together: an
    image projection to whole tokens of the text's width and a key and value projection from that
    width for each cross attention. One ModelLoadError line otherwise."""
    proj, norm = parts["image_proj"].get("proj.weight"), parts["image_proj"].get("norm.weight")
    if proj is None or norm is None or proj.dim() != 2:
        raise ModelLoadError(f"{source}: no image projection (image_proj.proj and image_proj.norm); not an SD1.5 IP-Adapter")
    width = int(norm.shape[0])
    ids = sorted({k.split(".")[0] for k in parts["ip_adapter"]})
    for i in ids:
        for kv in ("to_k_ip", "to_v_ip"):
            w = parts["ip_adapter"].get(f"{i}.{kv}.weight")
            if w is None or w.dim() != 2 or w.shape[1] != width:
                raise ModelLoadError(f"{source}: ip_adapter.{i}.{kv} is missing or does not take {width}-wide tokens; "
                                     "the file is damaged, download it again")
    if not ids or proj.shape[0] % width:
        raise ModelLoadError(f"{source}: the image projection ({tuple(proj.shape)}) does not make {width}-wide tokens")
    return len(ids), width


def attach_ip_adapter(unet, state_dict: dict, scale: float = 1.0) -> None:
    """Load an IP-Adapter into the streaming UNet's 2D blocks through diffusers' loader; the
    weights go to the UNet's device and dtype."""
    parts = split_state_dict(state_dict)
    unet2d = unet.unet2d
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its note on casting with to() is about its own call, not the user's
    try:
        unet2d._load_ip_adapter_weights([parts], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"the IP-Adapter does not fit this UNet ({type(exc).__name__}: {str(exc)[:160]})") from None
    finally:
        diffusers_logging.set_verbosity(level)
    unet2d.encoder_hid_proj.to(device=unet.device, dtype=unet.dtype)
    values = []
    for proc in unet2d.attn_processors.values():
        if isinstance(proc, torch.nn.Module):
            proc.to(device=unet.device, dtype=unet.dtype)
        for layer in getattr(proc, "to_v_ip", None) or []:
            values.append((layer, layer.weight.detach().clone()))
    # The scale lives in the value projections' weights (see set_ip_adapter_scale); the
    # processors' own scale stays 1.
    unet.__dict__["_ip_adapter_values"] = values
    set_ip_adapter_scale(unet, scale)


def has_ip_adapter(unet) -> bool:
    unet2d = unet.unet2d  # (diffusers updates the config by attribute; its .get() keeps the old value)
    return getattr(unet2d, "encoder_hid_proj", None) is not None and \
        getattr(unet2d.config, "encoder_hid_dim_type", None) == "ip_image_proj"


@torch.no_grad()
def set_ip_adapter_scale(unet, scale: float) -> None:
    """How strongly the picture steers (0: not at all; 1: as trained). The image part of each
    cross attention is ``softmax(q k_ip) v_ip``, linear in its values, so the scale is written into
    the value projections' weights in place (scaled copies of the loaded ones): a compiled or
    graph-captured step reads weights as inputs and never recompiles for it. (diffusers' processors
    keep the scale as a Python number, which a compiled step would bake in.)"""
    values = unet.__dict__.get("_ip_adapter_values")
    if not has_ip_adapter(unet) or values is None:
        raise ConfigError("no IP-Adapter is loaded: a style image needs one")
    for layer, loaded in values:
        layer.weight.copy_(loaded * float(scale))
    unet.__dict__["_ip_adapter_scale"] = float(scale)


@torch.no_grad()
def image_tokens(unet, image_embeds: torch.Tensor) -> list[torch.Tensor]:
    """The image tokens of a CLIP image embedding (``[batch, dim]``): one ``[batch, 1, tokens,
    dim]`` tensor per loaded adapter, as the IP-Adapter processors take them."""
    if not has_ip_adapter(unet):
        raise ConfigError("no IP-Adapter is loaded: a style image needs one")
    embeds = image_embeds.to(device=unet.device, dtype=unet.dtype)
    if embeds.dim() == 2:
        embeds = embeds[:, None]  # one image per batch item
    return unet.unet2d.encoder_hid_proj([embeds])


def image_embed_dim(unet) -> int:
    """How wide an image embedding the loaded IP-Adapter takes (1024 for SD1.5's: CLIP ViT-H/14)."""
    proj = unet.unet2d.encoder_hid_proj.image_projection_layers[0]
    return int(proj.image_embeds.in_features)


def load_style_image_models(comps, ip_adapter: str | None = None, image_encoder: str | None = None, *,
                            progress=None) -> None:
    """Load an IP-Adapter into ``comps.unet`` and its CLIP image encoder into
    ``comps.image_encoder`` (scale 0 until a picture is set: see FramePipeline.set_style_image).
    Sources: a local path, a model name or a hub id (default: ``ip-adapter`` and ``image-encoder``,
    h94/IP-Adapter's SD1.5 files). The tiny model builds random miniatures of both where no source
    is given. A pair that does not fit (another embedding width) is one clear error."""
    from .components import _from_pretrained

    say = progress or (lambda text: None)
    if comps.is_tiny and ip_adapter is None:
        from .tiny import tiny_ip_adapter

        state = tiny_ip_adapter(comps.unet, seed=5)
    else:
        from .hub import resolve_all

        path, = resolve_all([(ip_adapter or "ip-adapter", "ip-adapter")], progress=say)
        say(f"loading the IP-Adapter {path.name}")
        state = read_ip_adapter(path)
    attach_ip_adapter(comps.unet, state, scale=0.0)
    if comps.is_tiny and image_encoder is None:
        from .tiny import build_tiny_image_encoder

        encoder = build_tiny_image_encoder(seed=6)
    else:
        from transformers import CLIPVisionModelWithProjection

        from .hub import resolve_all

        folder, = resolve_all([(image_encoder or "image-encoder", "image-encoder")], progress=say)
        say("loading the IP-Adapter's image encoder")
        encoder = _from_pretrained(CLIPVisionModelWithProjection, folder, "image encoder")
    encoder.to(device=comps.device, dtype=comps.dtype).eval().requires_grad_(False)
    want, got = image_embed_dim(comps.unet), int(encoder.config.projection_dim)
    if want != got:
        raise ModelLoadError(f"the image encoder gives {got}-wide embeddings but the IP-Adapter takes {want}-wide ones: "
                             "use the encoder released with the adapter (SD1.5's IP-Adapter: h94/IP-Adapter "
                             "models/image_encoder, `live2diff-engine models download image-encoder`)")
    comps.image_encoder = encoder


# -- the picture ---------------------------------------------------------------------------------

# A style picture arrives as bytes (never as a path from a socket): at most this many, decoded by
# OpenCV's image codecs (PNG, JPEG, WebP ...) into at most this many pixels.
MAX_PICTURE_BYTES = 8 * 1024 * 1024
MAX_PICTURE_PIXELS = 4096 * 4096
# CLIP's own normalisation (OpenAI's image mean and deviation, as its image processor's config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_picture(data: bytes) -> "np.ndarray":
    """Image file bytes -> RGB uint8 ``[h, w, 3]``; one clear ConfigError for anything else."""
    import cv2
    import numpy as np

    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ConfigError("the style picture is empty: send a PNG, JPEG or WebP file's bytes")
    if len(data) > MAX_PICTURE_BYTES:
        raise ConfigError(f"the style picture is too large ({len(data)} bytes, at most {MAX_PICTURE_BYTES})")
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    head = cv2.imdecode(buf, cv2.IMREAD_REDUCED_COLOR_8)  # cheap look at the size before a full decode
    if head is None:
        raise ConfigError("the style picture is not an image OpenCV can read (send PNG, JPEG or WebP)")
    if head.shape[0] * head.shape[1] * 64 > MAX_PICTURE_PIXELS * 4:
        raise ConfigError(f"the style picture has too many pixels (at most {MAX_PICTURE_PIXELS})")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None or img.shape[0] * img.shape[1] > MAX_PICTURE_PIXELS:
        raise ConfigError(f"the style picture cannot be used (not an image, or more than {MAX_PICTURE_PIXELS} pixels)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_picture_file(path) -> bytes:
    """A picture file's bytes, at most :data:`MAX_PICTURE_BYTES` of them (one clear ConfigError)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PICTURE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the picture {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_PICTURE_BYTES:
        raise ConfigError(f"the picture {path} is too large (more than {MAX_PICTURE_BYTES} bytes); use a smaller PNG or JPEG")
    return data


@torch.no_grad()
def encode_picture(image_encoder, rgb) -> torch.Tensor:
    """A picture's CLIP image embedding ``[1, dim]`` through an image encoder
    (transformers' ``CLIPVisionModelWithProjection``): the shorter side resized to the encoder's
    size (bicubic), the centre cropped square, CLIP's normalisation, as CLIP's image processor does."""
    import cv2

    size = int(image_encoder.config.image_size)
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_CUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    img = img[top : top + size, left : left + size]
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    x = ((x - mean) / std)[None].to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=x).image_embeds
