"""`live2diff-engine models list | download | verify`."""

from __future__ import annotations

import sys

from ..errors import ConfigError, UserError
from ..options import Parser


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="list, download and verify the models", description="Manage the models the engine uses.")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", parser_class=Parser)
    msub.add_parser("list", help="which models are known and whether they are here")
    dl = msub.add_parser("download", help="download models (default: all the engine needs) or a style's weights")
    dl.add_argument("names", nargs="*", metavar="NAME", help="model names (see `models list`) or hub ids")
    dl.add_argument("--style", action="append", default=[], help="download this style's DreamBooth/LoRA files (repeatable)")
    dl.add_argument("--styles", metavar="FILE", default=None, help="your styles file")
    dl.add_argument("--token", default=None, help="civitai API token (or set CIVITAI_TOKEN); never printed")
    vf = msub.add_parser("verify", help="load each downloaded model and say OK or what is wrong")
    vf.add_argument("names", nargs="*", metavar="NAME")


def _cmd_models(args) -> int:
    from ..models import hub

    action = args.models_command or "list"
    if action == "list":
        for spec in hub.MODELS.values():
            present, where = hub.status(spec)
            tag = "default" if not spec.optional else "optional"
            print(f"{spec.name:15} {'OK ' if present else '-- '} {tag:8} {spec.repo_id:45} {spec.what}")
            print(f"{'':15}     {where}")
        print(f"hub cache: {hub.cache_dir()}")
        return 0
    if action == "download":
        from ..styles import download_style, load_styles

        names = args.names or ([] if args.style else hub.DEFAULT_MODELS)
        # All at once: what is here is named, what is missing is fetched, and whatever cannot be
        # fetched is named together in one line (with one command for all of it).
        paths = hub.resolve_all([(n, n if n in hub.MODELS else None) for n in names],
                                progress=lambda line: print(line + " ...", file=sys.stderr, flush=True))
        for name, path in zip(names, paths):
            print(f"{name}: {path}")
        if args.style:
            styles = load_styles(args.styles)
            from ..config import civitai_token, load_config

            token = args.token or civitai_token(load_config())
            for name in args.style:
                if name not in styles:
                    raise ConfigError(f"unknown style {name!r}; known styles: {', '.join(sorted(styles))}")
                for path in download_style(styles[name], token):
                    print(f"{name}: {path}")
        return 0
    if action == "verify":
        return _verify(args.names or list(hub.MODELS))
    raise ConfigError(f"unknown models action {action!r}")


def _verify(names: list[str]) -> int:
    from ..models import hub

    failed = 0
    for name in names:
        spec = hub.MODELS.get(name)
        if spec is None:
            raise ConfigError(f"unknown model {name!r}; known: {', '.join(hub.MODELS)}")
        try:
            path = hub.resolve(name, download=False)
            _verify_one(name, path)
            print(f"{name:15} OK   {path}")
        except UserError as exc:
            failed += 1
            print(f"{name:15} FAIL {exc}")
    return 1 if failed else 0


def _verify_one(name: str, path) -> None:
    from pathlib import Path

    from ..models.components import _from_pretrained, read_lora

    path = Path(path)
    if name == "sd15":
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..models.loading import load_base_weights, read_unet_config, resolve_unet_folder
        from ..models.motion import MotionConfig
        from ..models.unet import build_streaming_unet

        import torch

        folder = resolve_unet_folder(path)
        with torch.device("meta"):
            unet = build_streaming_unet(read_unet_config(folder), MotionConfig())
        load_base_weights(unet, folder)
        _from_pretrained(AutoencoderKL, path / "vae", "VAE")
        _from_pretrained(CLIPTextModel, path / "text_encoder", "text encoder")
        _from_pretrained(CLIPTokenizer, path / "tokenizer", "tokenizer")
    elif name == "live2diff":
        from ..models.loading import load_motion_weights, read_motion_state_dict
        from ..models.motion import MotionConfig
        from ..models.unet import build_streaming_unet

        import torch

        config = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "sample_size": 64}
        with torch.device("meta"):
            unet = build_streaming_unet(config, MotionConfig())
        load_motion_weights(unet, read_motion_state_dict(path), source=str(path))
    elif name in ("midas", "depth-anything"):
        from ..depth import load_depth_estimator

        load_depth_estimator(name, path)
    elif name == "lcm-lora":
        read_lora(path)
    elif name == "taesd":
        from diffusers import AutoencoderTiny

        _from_pretrained(AutoencoderTiny, path, "TAESD")
    elif name == "clip":
        from ..quality import load_clip

        load_clip(path)
    elif name == "ip-adapter":
        from ..models.ip_adapter import check_ip_adapter, read_ip_adapter

        check_ip_adapter(read_ip_adapter(path), str(path))
    elif name == "image-encoder":
        from transformers import CLIPVisionModelWithProjection

        _from_pretrained(CLIPVisionModelWithProjection, path, "image encoder")


COMMANDS = {"models": (add_parser, _cmd_models)}
