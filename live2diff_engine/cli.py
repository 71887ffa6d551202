"""``live2diff-engine``: the command line.

Every user mistake ends as one line on stderr (what is wrong, how to fix it) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .assemble import _int_list
from .errors import ConfigError, UserError

DTYPES = ("float32", "float16", "bfloat16", "float64")
ACCELERATE_HELP = ("how the stream step runs: off (eager), compile (torch.compile), cudagraph (compile + CUDA graph, "
                   "CUDA only), auto (default: cudagraph on CUDA, off on the CPU, where compiling costs minutes)")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def resolve_device(name: str | None):
    """``None`` means CUDA when present, else the CPU. An unavailable device is a user error."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available here; use --device cpu, or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps requested but Metal is not available here; use --device cpu")
    return device


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="live2diff-engine", description="Live video-to-video diffusion (Live2Diff) for webcams and OBS.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"live2diff-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    check = sub.add_parser(
        "check-reference",
        help="replay a golden fixture of the original Live2Diff and compare every frame",
        description="Build the model from a fixture's files, replay its recorded noise, and compare each finished "
        "frame with the original implementation's. Exit 0 when all match, 1 when not, 2 when the fixture cannot be read.",
    )
    check.add_argument("fixture", metavar="DIR", nargs="+", help="fixture folder(s) (format: shared/golden/README.md), "
                       "checked in turn in one process")
    check.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps")
    check.add_argument("--dtype", default="float32", choices=DTYPES, help="compute precision (default float32)")
    check.add_argument("--accelerate", default="auto", metavar="MODE", help=ACCELERATE_HELP)
    check.add_argument("--rtol", type=float, default=None, help="relative tolerance per frame element (default: the fixture's, 1e-3)")
    check.add_argument("--atol", type=float, default=None, help="absolute tolerance per frame element (default: the fixture's, 1e-4)")
    from .threads import add_threads_arg

    add_threads_arg(check)

    bench = sub.add_parser(
        "bench",
        help="measure per-frame stream cost for short and long streams in one run",
        description="Stream the model for each frame count (default 32 and 512) and report ms per frame and the "
        "ratio of the longest to the shortest: with a fixed-size KV-cache it stays near 1.",
    )
    _add_model_options(bench)
    bench.add_argument("--frames", type=_int_list, default=[32, 512], help="comma-separated frame counts (default 32,512)")
    steps = bench.add_mutually_exclusive_group()
    steps.add_argument("--t-index-list", type=_int_list, help="denoising steps as schedule indices (default 32,45)")
    steps.add_argument("--strength", type=float, help="instead of --t-index-list: denoise the last int(steps*strength) steps")
    bench.add_argument("--num-inference-steps", type=int, default=50)
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench.add_argument("--accelerate", default="auto", metavar="MODE[,MODE]",
                       help="acceleration mode, or several comma-separated (e.g. off,compile) to compare them interleaved "
                       "in one run on the longest frame count")

    from .assemble import add_model_args

    tr = sub.add_parser(
        "translate",
        help="stylise a video file (or image folder) into a video file",
        description="Run every frame of INPUT through the streaming model and write OUTPUT with exactly as many "
        "frames. The first 8 (the warmup) are the input, framed as the later frames are (see --fit).",
    )
    tr.add_argument("input", metavar="INPUT", help="video file or folder of images")
    tr.add_argument("output", metavar="OUTPUT", help="video file to write (.mp4, .avi, .mkv)")
    tr.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's, 30 for images)")
    add_model_args(tr)

    models = sub.add_parser("models", help="list, download and verify the models", description="Manage the models the engine uses.")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", parser_class=_Parser)
    msub.add_parser("list", help="which models are known and whether they are here")
    dl = msub.add_parser("download", help="download models (default: all the engine needs) or a style's weights")
    dl.add_argument("names", nargs="*", metavar="NAME", help="model names (see `models list`) or hub ids")
    dl.add_argument("--style", action="append", default=[], help="download this style's DreamBooth/LoRA files (repeatable)")
    dl.add_argument("--styles", metavar="FILE", default=None, help="your styles file")
    dl.add_argument("--token", default=None, help="civitai API token (or set CIVITAI_TOKEN); never printed")
    vf = msub.add_parser("verify", help="load each downloaded model and say OK or what is wrong")
    vf.add_argument("names", nargs="*", metavar="NAME")

    run = sub.add_parser(
        "run",
        help="the live engine: camera in, stylised virtual webcam out",
        description="Grab frames from a source, stylise them live and publish them to the sinks (by default the "
        "default camera to a virtual camera). Runs until Ctrl-C.",
    )
    from .assemble import add_io_args

    add_io_args(run, _size_arg)
    add_model_args(run)
    _add_control_args(run)
    run.add_argument("--fresh", action="store_true",
                     help="start from the defaults, not from the settings the last run left (prompt, style, strength ...)")

    ctl = sub.add_parser(
        "ctl",
        help="control a running engine: prompt, style, strength, pause, status ...",
        description="Talk to a running engine through its local API. Actions: status, styles, prompt TEXT, "
        "negative TEXT, guidance X (1-20), style NAME, strength X (0-1], steps N (1-4), seed N, pause, resume, reset, add-to-scene [SCENE], "
        "download STYLE (fetch a style's weights in the engine; needs a civitai token there for civitai styles).",
    )
    ctl.add_argument("action", choices=sorted(CTL_ACTIONS), metavar="ACTION", help=", ".join(sorted(CTL_ACTIONS)))
    ctl.add_argument("value", nargs="?", default=None, help="the new value, where the action takes one")
    ctl.add_argument("--api", default=None, help="the engine's API address (default http://127.0.0.1:8765, or the config file's)")
    ctl.add_argument("--token", default=None, help="API token, where the engine has one (or LIVE2DIFF_API_TOKEN)")
    ctl.add_argument("--config", metavar="FILE", default=None, help=f"config file (default: {_default_config_shown()})")
    ctl.add_argument("--json", action="store_true", help="print the engine's reply as JSON")

    be = sub.add_parser(
        "bench-engine",
        help="engine throughput against the bare frame-pipeline loop on the same frames",
        description="Run the same frames through the bare FramePipeline loop and through the engine (threads, "
        "conversions, sinks), alternating, and report both rates and the engine's overhead.",
    )
    be.add_argument("--frames", type=int, default=300, help="frames per round (default 300)")
    be.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3; the median is reported)")
    be.add_argument("--input-size", type=_size_arg, default=(640, 480), metavar="WxH", help="input frame size (default 640x480)")
    be.add_argument("--control", action="store_true",
                    help="instead: the engine alone against the engine with its control plane busy (API, MJPEG viewer, dock)")
    add_model_args(be)

    bs = sub.add_parser(
        "bench-style",
        help="measure how long a style switch takes",
        description="Load the model, stream a few frames, then switch between the given styles several times "
        "(a frame after each switch) and report the median switch time per style.",
    )
    bs.add_argument("--switch", required=True, help="comma-separated style names to alternate between, e.g. default,toonyou")
    bs.add_argument("--rounds", type=int, default=5)
    add_model_args(bs)

    bt = sub.add_parser(
        "bench-threads",
        help="per-frame time and the worst frame for several torch thread counts, beside busy processes",
        description="Run the frame pipeline with each thread count in a process of its own, interleaved over rounds, "
        "with --hogs busy processes beside it (a loaded machine), and report the median, p90 and worst frame of each.",
    )
    bt.add_argument("--choices", default="1,2,auto", help="comma-separated thread counts, auto for the engine's own choice (default 1,2,auto)")
    bt.add_argument("--frames", type=int, default=60, help="timed frames per process (default 60)")
    bt.add_argument("--rounds", type=int, default=3, help="processes per choice, interleaved (default 3)")
    bt.add_argument("--hogs", type=int, default=1, help="busy processes beside the measurement (default 1; 0 for none)")
    bt.add_argument("--input-size", type=_size_arg, default=(640, 480), metavar="WxH", help="input frame size (default 640x480)")
    bt.add_argument("--json", metavar="FILE", help="also write the figures (every frame's time) as JSON")
    add_model_args(bt)

    bg = sub.add_parser(
        "bench-gpu",
        help="per-stage speed of the full-size model on a GPU, per acceleration mode (random weights, no downloads)",
        description="Build full-size Live2Diff with random weights (nothing downloaded) and measure the warmup's peak GPU "
        "memory per size and dtype (and which of 8, 12 and 24 GB cards it fits), then, for each acceleration mode: the "
        "stream step alone, and the whole frame pipeline with TAESD and with the full VAE (FPS and ms per stage), the first "
        "calls (the compile, and a CUDA graph's capture) and the peak GPU memory. Stops measuring when --budget-s is spent.",
    )
    bg.add_argument("--geometry", choices=["full", "tiny"], default="full", help="full: SD1.5 + Live2Diff sizes (default); tiny: the test miniature")
    bg.add_argument("--modes", default=None, help="comma-separated, measured in this order: off, compile, cudagraph "
                    "(default: off,cudagraph,compile on CUDA, off elsewhere)")
    bg.add_argument("--size", type=_size_arg, default=None, metavar="WxH", help="model size (default 512x512; 64x64 with --geometry tiny)")
    bg.add_argument("--t-index-list", type=_int_list, default=[32, 45], help="denoising steps (default 32,45)")
    bg.add_argument("--num-inference-steps", type=int, default=50)
    bg.add_argument("--vae", default="taesd,full", help="VAEs for the frame pipeline: taesd, full or both (default taesd,full)")
    bg.add_argument("--parts", default="memory,stream,pipeline", help="what to measure, comma-separated: memory (the warmup's), "
                    "stream, pipeline (default all three)")
    bg.add_argument("--memory-sizes", default=None, metavar="WxH,...", help="model sizes for the warmup's memory (default: --size)")
    bg.add_argument("--memory-dtypes", default=None, metavar="DTYPE,...", help="dtypes for the warmup's memory (default: --dtype)")
    bg.add_argument("--frames", type=int, default=50, help="timed frames per measurement (default 50)")
    bg.add_argument("--budget-s", type=float, default=420.0, help="stop measuring after this many seconds (default 420)")
    bg.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    bg.add_argument("--dtype", default=None, choices=DTYPES, help="default float16 on CUDA, float32 elsewhere")
    bg.add_argument("--seed", type=int, default=0)
    bg.add_argument("--json", metavar="FILE", help="also write every figure as JSON")

    ca = sub.add_parser(
        "check-accelerate",
        help="judge the compiled and CUDA-graph stream steps against eager, per step count and dtype (random weights)",
        description="For each denoising step count, dtype and guidance scale: one stream eagerly, then one per "
        "acceleration mode with the same inputs; report each one's largest relative error against eager, whether the "
        "mode stayed in use (the engine falls back when its first-call check fails) and the first call's time. Full-size "
        "random weights by default (nothing downloaded). Exit 0 when every case matches, 1 when one does not.",
    )
    ca.add_argument("--geometry", choices=["full", "tiny"], default="full", help="full: SD1.5 + Live2Diff sizes (default); tiny: the test miniature")
    ca.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    ca.add_argument("--dtypes", default=None, help="comma-separated (default float16,float32 on CUDA, float32 elsewhere)")
    ca.add_argument("--steps", type=_int_list, default=[3, 4, 1, 2], help="denoising step counts, in the order to check (default 3,4,1,2)")
    ca.add_argument("--modes", default=None, help="comma-separated: compile, cudagraph (default: both on CUDA, compile elsewhere)")
    ca.add_argument("--guidance", default="1", help="comma-separated guidance scales (default 1: none)")
    ca.add_argument("--size", type=_size_arg, default=None, metavar="WxH", help="model size (default 512x512; 64x64 with --geometry tiny)")
    ca.add_argument("--calls", type=int, default=12, help="stream calls per case (default 12: past the cache window's wrap)")
    ca.add_argument("--budget-s", type=float, default=300.0, help="skip the remaining cases after this many seconds (default 300)")
    ca.add_argument("--json", metavar="FILE", help="also write every figure as JSON")

    st = sub.add_parser("styles", help="list the styles, or print where your styles file is")
    st.add_argument("action", choices=["list", "path"], nargs="?", default="list")
    st.add_argument("--styles", metavar="FILE", default=None)

    from .eval_command import add_eval_parser

    add_eval_parser(sub)
    from .serve import add_serve_parser

    add_serve_parser(sub, add_model_args, _add_control_args)
    from .remote import add_connect_parser

    add_connect_parser(sub, _add_control_args, _size_arg)
    return parser


CTL_ACTIONS = {
    # action: (command, field, type)
    "status": ("status", None, None),
    "styles": ("status", None, None),
    "prompt": ("set_prompt", "prompt", str),
    "negative": ("set_negative_prompt", "negative_prompt", str),
    "guidance": ("set_guidance", "guidance", float),
    "style": ("set_style", "style", str),
    "strength": ("set_strength", "strength", float),
    "steps": ("set_steps", "steps", int),
    "seed": ("set_seed", "seed", int),
    "pause": ("pause", None, None),
    "resume": ("resume", None, None),
    "reset": ("reset", None, None),
    "add-to-scene": ("add_to_scene", "scene", str),
    "download": ("download_style", "style", str),
}


def _add_control_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live control (local API, OBS)")
    g.add_argument("--config", metavar="FILE", default=None, help=f"config file (default: {_default_config_shown()})")
    g.add_argument("--api-host", default=None, help="address of the local API and dock (default 127.0.0.1; beyond it needs --api-token)")
    g.add_argument("--api-port", type=int, default=None, help="port of the local API (default 8765; 0 picks a free one)")
    g.add_argument("--api-token", default=None, help="token the API asks for (or LIVE2DIFF_API_TOKEN); never printed")
    g.add_argument("--no-api", action="store_true", help="no local API, dock or output stream")
    g.add_argument("--obs", action="store_true", help="connect to OBS's WebSocket server for live control from OBS")
    g.add_argument("--obs-host", default=None, help="OBS WebSocket host (default 127.0.0.1)")
    g.add_argument("--obs-port", type=int, default=None, help="OBS WebSocket port (default 4455)")
    g.add_argument("--obs-password", default=None, help="OBS WebSocket password (or OBS_WEBSOCKET_PASSWORD, or the config file); never printed")
    g.add_argument("--obs-source", choices=["auto", "browser", "media"], default=None,
                   help="what 'add to scene' creates in OBS: browser (Browser Source), media (Media Source), auto (default)")
    g.add_argument("--obs-lipsync", metavar="AUDIO_INPUT", default=None,
                   help="keep this OBS audio input's sync offset at the video latency (e.g. 'Mic/Aux')")
    g.add_argument("--obs-lipsync-extra-ms", type=int, default=None, help="added to the measured latency for lip sync (default 0)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["tiny", "sd15-random"],
                   help="tiny: a random-weight miniature for checks (its output is noise, not a style); "
                   "sd15-random: the full SD1.5 + Live2Diff geometry with random weights (speed only, no download)")
    p.add_argument("--base", metavar="DIR", help="diffusers SD1.5 folder (with unet/) or a UNet folder")
    p.add_argument("--motion", metavar="FILE", help="Live2Diff motion checkpoint (live2diff.ckpt or .safetensors)")
    p.add_argument("--latent-size", metavar="HxW", help="latent height x width (image size / 8); default 8x8 for tiny, 64x64 otherwise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default float16 on CUDA, float32 elsewhere")
    p.add_argument("--seed", type=int, default=0)
    from .threads import add_threads_arg

    add_threads_arg(p)


def _cmd_check_reference(args) -> int:
    from .reference import run_check

    device = resolve_device(args.device)
    from .pipeline.accelerate import resolve_mode

    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"--{name} must be zero or positive, got {value}")
    mode = resolve_mode(args.accelerate, device)
    from .threads import apply_threads

    apply_threads(device, args.threads)  # quietly: its output is the verdict (and one line on a bad fixture)
    status = 0
    for fixture in args.fixture:
        if len(args.fixture) > 1:
            print(f"== {fixture}", flush=True)
        status = max(status, run_check(fixture, device=str(device), dtype=_torch_dtype(args.dtype), accelerate=mode,
                                       rtol=args.rtol, atol=args.atol))
    return status


def _load_model(args):
    """(unet, prompt_embeds, latent size, label) for --model tiny or --base/--motion."""
    import torch

    from .threads import apply_threads

    device = resolve_device(args.device)
    apply_threads(device, args.threads, lambda line: print(line, file=sys.stderr, flush=True))
    dtype = _torch_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.model == "tiny":
        from .models.tiny import TINY_LABEL, TINY_LATENT_SIZE, build_tiny_unet, tiny_prompt_embeds

        unet = build_tiny_unet(args.seed, device=device, dtype=dtype)
        prompt = tiny_prompt_embeds(args.seed, device=device, dtype=dtype)
        size, label = TINY_LATENT_SIZE, TINY_LABEL
    elif args.model == "sd15-random":
        from .models.full_random import build_full_unet

        unet = build_full_unet(device=device, dtype=dtype, seed=args.seed)
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device=device, dtype=dtype)
        size, label = (64, 64), "SD1.5 + Live2Diff geometry, random weights"
    elif args.base and args.motion:
        from .models.loading import load_streaming_unet

        unet = load_streaming_unet(args.base, args.motion, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device=device, dtype=dtype)
        size, label = (64, 64), f"{args.base} + {args.motion}"
    else:
        raise ConfigError("choose a model: --model tiny, or --base DIR and --motion FILE")
    if args.latent_size:
        try:
            h, w = (int(v) for v in args.latent_size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--latent-size must look like 64x64, got {args.latent_size!r}") from None
        if h < 1 or w < 1:
            raise ConfigError(f"--latent-size must be positive, got {args.latent_size!r}")
        size = (h, w)
    return unet, prompt, size, label, device, dtype


def _cmd_bench(args) -> int:
    import torch

    from .bench.stream import BenchResult, bench_modes, bench_stream, machine_name
    from .pipeline.accelerate import parse_modes, resolve_mode
    from .pipeline.schedule import make_schedule
    from .pipeline.stream import StreamPipeline

    if not args.frames or min(args.frames) < 1:
        raise ConfigError("--frames needs positive counts, e.g. 32,512")
    modes = parse_modes(args.accelerate)
    t_index_list = args.t_index_list if args.t_index_list is not None or args.strength is not None else [32, 45]
    schedule = make_schedule(args.num_inference_steps, t_index_list=t_index_list, strength=args.strength)
    if args.model is None and not (args.base and args.motion):
        raise ConfigError("choose a model: --model tiny or sd15-random, or --base DIR and --motion FILE")
    ignored = [option for option, value in (("--base", args.base), ("--motion", args.motion)) if value]
    if args.model is not None and ignored:
        raise ConfigError(f"--model {args.model} builds its own random-weight model, so {' and '.join(ignored)} would be "
                          f"ignored; drop {'it' if len(ignored) == 1 else 'them'}, or drop --model to load the files")
    print("loading model ...", file=sys.stderr, flush=True)
    unet, prompt, (h, w), label, device, dtype = _load_model(args)
    modes = [resolve_mode(m, device) for m in modes]
    sink = unet.motion_config.sink_size
    warm = torch.randn(sink, 4, h, w, generator=torch.Generator().manual_seed(args.seed)).to(device=device, dtype=dtype)

    def make(mode):
        pipe = StreamPipeline(unet, schedule, (h, w), generator=torch.Generator(device=device).manual_seed(args.seed), accelerate=mode)
        pipe.set_prompt_embeds(prompt)
        return pipe

    def progress(count, done):
        print(f"\r  {count}-frame stream: {done}/{count}", end="", file=sys.stderr, flush=True)

    machine = machine_name(device)
    head = [f"machine: {machine}", f"device: {device}  dtype: {str(dtype).replace('torch.', '')}  torch {torch.__version__}  "
            f"threads {torch.get_num_threads()}", f"model: {label}  latent {h}x{w}  denoising steps {schedule.steps}"]
    if len(modes) > 1:
        frames = max(args.frames)
        print(f"benchmarking {label}: {', '.join(modes)} interleaved, {frames} frames each ...", file=sys.stderr, flush=True)
        figures = bench_modes(make, warm, warm, modes, frames, progress=progress)
        print("", file=sys.stderr)
        base = figures[modes[0]]["median"]
        rows = head + [f"  {m:>9}: {f['median']:8.3f} ms/frame (median; mean {f['mean']:.3f})  x{f['median'] / base:.3f} of {modes[0]}"
                       f"  first call {f['first_call_s']:.1f} s"
                       + (f" (of which {f['check_s']:.2f} s checking it against eager: relative error {f['check_error']:.1e})" if "check_s" in f else "")
                       + f"{'' if f['in_use'] == m else '  (fell back to ' + f['in_use'] + ')'}"
                       for m, f in figures.items()]
        print("\n".join(rows))
        if args.json:
            record = {"machine": machine, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "model": label, "latent": f"{h}x{w}", "steps": schedule.steps,
                      "frames": frames, "modes": figures, "ratio_to_first": {m: f["median"] / base for m, f in figures.items()}}
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
        return 0

    pipe = make(modes[0])
    print(f"benchmarking {label} ({modes[0]}) ...", file=sys.stderr, flush=True)
    per_frame = bench_stream(pipe, warm, warm, sorted(set(args.frames)), progress=progress)
    print("", file=sys.stderr)
    counts = sorted(per_frame, key=int)
    result = BenchResult(
        machine=machine,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        model=label,
        latent=f"{h}x{w}",
        steps=schedule.steps,
        per_frame_ms={c: round(per_frame[c]["median"], 4) for c in counts},
        mean_ms={c: round(per_frame[c]["mean"], 4) for c in counts},
        ratio_long_to_short=round(per_frame[counts[-1]]["median"] / per_frame[counts[0]]["median"], 4),
    )
    print(result.table() + f"\n  acceleration: {pipe.accelerated}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(result.json() + "\n")
    return 0


def _cmd_translate(args) -> int:
    import os
    from pathlib import Path

    from tqdm.auto import tqdm

    from .assemble import build_frame_pipeline, preflight

    preflight(args)  # option values, model paths, the models to download: before torch loads
    from .io.sources import open_frames
    from .io.video import VideoWriter, frames_word

    source = open_frames(args.input, fps=args.fps)  # a damaged file: one line of ours, FFmpeg's held back
    if not args.output.lower().endswith((".mp4", ".m4v", ".mov", ".avi", ".mkv")):
        raise ConfigError(f"output {args.output} must be a video file ending in .mp4, .avi or .mkv")
    comps, frames, manager, style = build_frame_pipeline(args)
    print(f"model: {comps.label}; style: {style.name}; {frames.steps} denoising steps", file=sys.stderr, flush=True)
    # Written beside the output under another name and renamed when complete: a translate that
    # fails (or is interrupted) leaves no half-written file, nor a damaged earlier one.
    final = Path(args.output)
    partial = final.with_name(f"{final.stem}.partial{final.suffix}")
    writer = None
    expected = 0
    done = False
    try:
        with tqdm(total=source.length, unit="frame", desc="translate") as bar:
            for frame in source:
                if writer is None:
                    size = args.output_size or (frame.shape[1], frame.shape[0])
                    frames.output_size = size
                    writer = VideoWriter(partial, source.fps, size)
                for index, image in frames.push(frame):
                    if index != expected:
                        raise RuntimeError(f"frame order broken: got {index}, expected {expected}")
                    writer.write(image)
                    expected += 1
                bar.update(1)
            for index, image in frames.flush():
                writer.write(image)
                expected += 1
        done = True
    finally:
        source.close()
        if writer is not None:
            writer.close()
            if done:
                os.replace(partial, final)
            else:
                partial.unlink(missing_ok=True)
                print(f"live2diff-engine: translate did not finish; no output written to {final}", file=sys.stderr, flush=True)
    if writer is None:
        raise ConfigError(f"{args.input} holds no frames")
    print(f"wrote {frames_word(writer.count)} to {args.output}", file=sys.stderr)
    return 0


def _cmd_models(args) -> int:
    from .models import hub

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
        from .styles import download_style, load_styles

        names = args.names or ([] if args.style else hub.DEFAULT_MODELS)
        # All at once: what is here is named, what is missing is fetched, and whatever cannot be
        # fetched is named together in one line (with one command for all of it).
        paths = hub.resolve_all([(n, n if n in hub.MODELS else None) for n in names],
                                progress=lambda line: print(line + " ...", file=sys.stderr, flush=True))
        for name, path in zip(names, paths):
            print(f"{name}: {path}")
        if args.style:
            styles = load_styles(args.styles)
            from .config import civitai_token, load_config

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
    from .models import hub

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

    from .models.components import _from_pretrained, read_lora

    path = Path(path)
    if name == "sd15":
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        from .models.loading import load_base_weights, read_unet_config, resolve_unet_folder
        from .models.motion import MotionConfig
        from .models.unet import build_streaming_unet

        import torch

        folder = resolve_unet_folder(path)
        with torch.device("meta"):
            unet = build_streaming_unet(read_unet_config(folder), MotionConfig())
        load_base_weights(unet, folder)
        _from_pretrained(AutoencoderKL, path / "vae", "VAE")
        _from_pretrained(CLIPTextModel, path / "text_encoder", "text encoder")
        _from_pretrained(CLIPTokenizer, path / "tokenizer", "tokenizer")
    elif name == "live2diff":
        from .models.loading import load_motion_weights, read_motion_state_dict
        from .models.motion import MotionConfig
        from .models.unet import build_streaming_unet

        import torch

        config = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "sample_size": 64}
        with torch.device("meta"):
            unet = build_streaming_unet(config, MotionConfig())
        load_motion_weights(unet, read_motion_state_dict(path), source=str(path))
    elif name in ("midas", "depth-anything"):
        from .depth import load_depth_estimator

        load_depth_estimator(name, path)
    elif name == "lcm-lora":
        read_lora(path)
    elif name == "taesd":
        from diffusers import AutoencoderTiny

        _from_pretrained(AutoencoderTiny, path, "TAESD")
    elif name == "clip":
        from .quality import load_clip

        load_clip(path)


def _cmd_styles(args) -> int:
    from .styles import load_styles, user_styles_file

    if args.action == "path":
        print(user_styles_file())
        return 0
    from .styles import fetch_hint

    for style in load_styles(args.styles).values():
        hint = fetch_hint(style)
        extras = []
        if style.dreambooth:
            extras.append(f"dreambooth {style.dreambooth}")
        extras += [f"lora {l.file}@{l.scale:g}" for l in style.loras]
        steps = f"t_index_list {list(style.t_index_list)}" if style.t_index_list else f"strength {style.strength}" if style.strength else "t_index_list [32, 45]"
        print(f"{style.name:12} {style.description}  [{'; '.join(extras + [steps, f'clip_skip {style.clip_skip}'])}]")
        if hint is not None:
            print(f"{'':12} missing: {'get it with `' + hint + '`' if hint.startswith('live2diff-engine') else hint}")
    return 0


def _size_arg(text: str):
    from .assemble import _size

    return _size(text)


def _default_config_shown() -> str:
    """The config file's default place as this OS has it (%APPDATA% on Windows), for --help."""
    from .config import config_file

    try:
        return str(config_file()).replace("%", "%%")  # argparse formats help with %
    except Exception:  # no home folder: say where it would be
        return "live2diff/config.toml in the user's config folder"


def _cmd_run(args) -> int:
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError("--max-frames must be at least 1")
    from .assemble import preflight

    # Option values, --lora files, model paths and the models still to download: one line each
    # before torch loads (seconds) and before the camera opens.
    preflight(args)
    import logging

    from .io.sinks import SinkUnavailable, parse_sink
    from .io.sources import open_at_start, parse_source

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    source = parse_source(
        args.source, camera_size=args.camera_size, camera_fps=args.camera_fps, loop=args.loop,
        synthetic_size=args.camera_size or (640, 480), seed=args.seed,
    )
    sinks = [parse_sink(s, vcam_device=args.vcam_device, vcam_fps=args.vcam_fps, mirror=args.mirror) for s in (args.sink or ["virtualcam"])]
    open_at_start(source, lambda line: print(line, file=sys.stderr, flush=True))
    from .assemble import build_frame_pipeline  # after the camera: a missing one is said before torch loads (seconds)
    from .engine import Engine

    size = args.output_size or source.frame_size() or (640, 480)
    fps = args.vcam_fps or source.fps or 30.0
    opened = []
    control = None
    api_on = control_settings(args)["api"] is not None  # checks the config file before anything starts
    loading = _SigtermWhileLoading()  # a SIGTERM before the stream starts ends it like Ctrl-C: outputs closed
    try:
        for sink in list(sinks):  # before the long model load, so a missing driver is known at once
            try:
                sink.open(size[0], size[1], fps)
            except SinkUnavailable as exc:
                if args.sink is not None or not api_on:
                    raise
                # The default sink: without a driver the output still reaches OBS and browsers.
                print(f"warning: {exc}; going on without a virtual camera (the output is on the local stream)",
                      file=sys.stderr, flush=True)
                sinks.remove(sink)
                continue
            opened.append(sink)
        args.output_size = size
        from .io.sinks import CardPublisher

        control = _start_control(args, size)
        if control.api is not None:
            control.api.stream.max_fps = fps  # the MJPEG stream never runs faster than the output
            sinks.append(control.api.stream)
        from .saved_settings import restore_into_args, start_saving

        saved_seed = restore_into_args(args, lambda line: print(line, file=sys.stderr, flush=True))
        with CardPublisher(sinks, size, "Live2Diff is starting", "loading models ..."):
            comps, frames, manager, style = build_frame_pipeline(args)
        print(f"model: {comps.label}; style: {style.name}; {frames.steps} denoising steps; {frames.width}x{frames.height}", file=sys.stderr, flush=True)
        controller = control.attach(frames, manager, comps.label)
        start_saving(controller, saved_seed, fresh=bool(getattr(args, 'fresh', False)))
        engine = Engine(frames, source, sinks, output_size=size, max_frames=args.max_frames, stats_path=args.stats, fps=fps,
                        controller=controller, pace=True)
        loading.over()
        return engine.run()
    finally:
        loading.over()
        # The outputs first (a file is complete once closed), the API last: the dock and OBS hear
        # "stopped" after the final frames are out.
        for sink in opened:
            try:
                sink.close()
            except Exception:
                pass
        source.close()
        if control is not None:
            control.stop()
        global _exit_at_once
        _exit_at_once = True


class _SigtermWhileLoading:
    """SIGTERM raises KeyboardInterrupt until ``over()`` (the engine then handles it), so a stop
    while the models load closes what is open, as Ctrl-C does. Main thread only."""

    def __init__(self):
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def over(self) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


class _Control:
    """The local API (started before the models load, so the dock and OBS show 'starting') and
    the OBS bridge (started once there is an engine to control)."""

    def __init__(self, args, api, settings: dict):
        self.args, self.api, self.settings = args, api, settings
        self.bridge = None
        self.controller = None

    def attach(self, frames, manager, label: str):
        from .control.controller import Controller

        c = Controller(frames, manager, label=label)
        c.api_token = self.api.token if self.api is not None else None
        from .config import civitai_token, load_config

        c.civitai_token = civitai_token(load_config(self.args.config))
        if self.api is not None:
            self.api.set_controller(c)
        obs = self.settings["obs"]
        if obs is not None:
            from .control.obs import ObsBridge

            self.bridge = ObsBridge(
                c, obs["host"], obs["port"], obs["password"], output_url=self.api.url if self.api else None,
                source_kind=obs["source"], lipsync_input=obs["lipsync_input"], lipsync_extra_ms=obs["lipsync_extra_ms"],
            ).start()
            origin = f"; password from {obs['from']}" if obs.get("from") else ""
            print(f"OBS control: connecting to ws://{obs['host']}:{obs['port']}{origin}", file=sys.stderr, flush=True)
        self.controller = c
        return c

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        if self.api is not None:
            self.api.stop()


def control_settings(args) -> dict:
    """API and OBS settings from options, environment and the config file, in that order."""
    import os

    from .config import load_config

    cfg = load_config(args.config)
    api_cfg, obs_cfg = cfg.get("api", {}), cfg.get("obs", {})

    def pick(option, env, section, key, default):
        if option is not None:
            return option
        if env and os.environ.get(env):
            return os.environ[env]
        return section.get(key, default)

    api = None
    if not args.no_api and api_cfg.get("enabled", True):
        api = {
            "host": pick(args.api_host, None, api_cfg, "host", "127.0.0.1"),
            "port": int(pick(args.api_port, None, api_cfg, "port", 8765)),
            "token": pick(args.api_token, "LIVE2DIFF_API_TOKEN", api_cfg, "token", None),
        }
        if not 0 <= api["port"] <= 65535:
            raise ConfigError(f"--api-port must be 0 to 65535, got {api['port']}")
    obs = None
    if args.obs or obs_cfg.get("enabled", False):
        obs = {
            "host": pick(args.obs_host, None, obs_cfg, "host", "127.0.0.1"),
            "port": int(pick(args.obs_port, None, obs_cfg, "port", 4455)),
            "password": pick(args.obs_password, "OBS_WEBSOCKET_PASSWORD", obs_cfg, "password", ""),
            "source": pick(args.obs_source, None, obs_cfg, "source", "auto"),
            "lipsync_input": pick(args.obs_lipsync, None, obs_cfg, "lipsync_input", None),
            "lipsync_extra_ms": int(pick(args.obs_lipsync_extra_ms, None, obs_cfg, "lipsync_extra_ms", 0)),
        }
        if not obs["password"]:  # none given: the one in OBS's own settings, if OBS is on this machine
            from .control.obs import obs_own_settings

            own = obs_own_settings()
            if own is not None:
                obs["password"] = own["password"] if own.get("auth_required", True) else ""
                if args.obs_port is None and "port" not in obs_cfg:
                    obs["port"] = own["port"]
                obs["from"] = f"OBS's own settings ({own['source']})"
        if obs["source"] not in ("auto", "browser", "media"):
            raise ConfigError(f"[obs] source must be auto, browser or media, got {obs['source']!r}")
        if not 1 <= obs["port"] <= 65535:
            raise ConfigError(f"--obs-port must be 1 to 65535, got {obs['port']}")
    return {"api": api, "obs": obs}


def warn_secrets_on_command_line(args, say) -> None:
    """An option's value is in the process list, where every user of the machine can read it: say
    so (never the value) and where the secret goes instead."""
    from .config import config_file

    for option, value, env, key in (("--obs-password", args.obs_password, "OBS_WEBSOCKET_PASSWORD", "password under [obs]"),
                                    ("--api-token", args.api_token, "LIVE2DIFF_API_TOKEN", "token under [api]")):
        if value:
            say(f"warning: {option} is visible to every user of this machine in the process list; "
                f"put it in the environment variable {env} or as {key} in {args.config or config_file()} instead")


def ctl_hint(api_url: str, config_path: str | None) -> str:
    """The `ctl status` command that reaches this engine: with ``--api`` where ctl's default
    address (the config file's, else 127.0.0.1:8765) is another one (``--api-port 0``, another
    port), and with ``--config`` where the engine read another config file than the default."""
    from .config import load_config

    try:
        cfg = load_config(config_path).get("api", {})
    except Exception:  # the engine read it already; a hint is never worth an error
        cfg = {}
    default = f"http://{cfg.get('host', '127.0.0.1')}:{cfg.get('port', 8765)}"
    parts = ["live2diff-engine", "ctl"]
    if config_path:
        parts += ["--config", _quoted(str(config_path))]
    if api_url.rstrip("/") != default:
        parts += ["--api", api_url.rstrip("/")]
    return " ".join(parts + ["status"])


def _quoted(text: str) -> str:
    import os
    import shlex

    return shlex.quote(text) if os.name != "nt" else (f'"{text}"' if " " in text else text)


def _start_control(args, size) -> _Control:
    warn_secrets_on_command_line(args, lambda line: print(line, file=sys.stderr, flush=True))
    settings = control_settings(args)
    api = None
    if settings["api"] is not None:
        from .control.api import ApiServer
        from .io.sinks import no_signal_card

        a = settings["api"]
        api = ApiServer(a["host"], a["port"], a["token"]).start()
        api.stream.send(no_signal_card(size[0], size[1], "Live2Diff is starting", "loading models ..."))
        print(f"control: dock {api.url}/dock | output for OBS {api.url}/stream.mjpg | `{ctl_hint(api.url, args.config)}`",
              file=sys.stderr, flush=True)
    return _Control(args, api, settings)


def _cmd_ctl(args) -> int:
    import json
    import os
    import urllib.error
    import urllib.request

    from .config import load_config
    from .control.schema import command_message

    cmd, field, kind = CTL_ACTIONS[args.action]
    msg_args = {}
    if field is not None:
        if args.value is None and args.action != "add-to-scene":
            raise ConfigError(f"`ctl {args.action}` needs a value, e.g. `ctl {args.action} {_CTL_EXAMPLES[args.action]}`")
        if args.value is not None:
            try:
                msg_args[field] = kind(args.value)
            except ValueError:
                raise ConfigError(f"`ctl {args.action}` needs a {kind.__name__}, got {args.value!r}") from None
    elif args.value is not None:
        raise ConfigError(f"`ctl {args.action}` takes no value")
    cfg = load_config(args.config).get("api", {})
    base = (args.api or f"http://{cfg.get('host', '127.0.0.1')}:{cfg.get('port', 8765)}").rstrip("/")
    token = args.token or os.environ.get("LIVE2DIFF_API_TOKEN") or cfg.get("token")
    body = json.dumps(command_message(cmd, **msg_args)).encode()
    req = urllib.request.Request(f"{base}/api/command", data=body, method="POST", headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=130) as resp:
            reply = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reply = json.loads(exc.read())
        except ValueError:
            raise UserError(f"the engine at {base} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"no engine answers at {base} ({getattr(exc, 'reason', exc)}): start one with `live2diff-engine run`, "
                        "or give --api") from None
    except ValueError:
        raise UserError(f"{base} did not answer like a live2diff engine") from None
    if args.json:
        print(json.dumps(reply, indent=1))
    if not reply.get("ok"):
        if not args.json:
            print(f"live2diff-engine: refused: {reply.get('error', 'unknown error')}", file=sys.stderr)
        return 1
    if args.json:
        return 0
    status = reply.get("status") or {}
    if args.action == "styles":
        missing = status.get("styles_missing") or {}
        for name in status.get("styles", []):
            line = ("* " if name == status.get("style") else "  ") + name
            print(f"{line:24} missing: {missing[name]}" if name in missing else line)
    elif args.action == "status":
        lat = status.get("latency_ms")
        print(f"state: {status.get('state')}  fps: {status.get('fps')}  latency: {lat if lat is not None else '-'} ms  "
              f"frames: {status.get('frames_out')}")
        loading = f" (loading {status['style_loading']} ...)" if status.get("style_loading") else ""
        print(f"style: {status.get('style')}{loading}  strength: {status.get('strength')}  steps: {status.get('steps')}  "
              f"seed: {status.get('seed')}")
        print(f"prompt: {status.get('prompt')!r}")
        if status.get("negative_prompt") or status.get("guidance", 1) > 1:
            print(f"negative prompt: {status.get('negative_prompt')!r}  guidance: {status.get('guidance')}")
        obs_source = {"pulling": " (pulls the stream)", "not pulling": " (OBS source not pulling the stream)",
                      "absent": " (no Live2Diff source: `ctl add-to-scene`)"}.get(status.get("obs_source"), "")
        print(f"OBS: {status.get('obs')}{obs_source}  model: {status.get('model')}  {status.get('size')}")
        dl = status.get("download")
        if isinstance(dl, dict):
            got = f"{dl.get('bytes', 0) / 1e6:.1f}" + (f" of {dl['total'] / 1e6:.1f}" if dl.get("total") else "") + " MB"
            what = {"downloading": f"{got}, file {dl.get('file_index', 0) + 1} of {dl.get('files')}", "done": "done",
                    "failed": f"failed: {dl.get('error')}"}.get(dl.get("state"), dl.get("state"))
            print(f"download of style {dl.get('style')}: {what}")
    elif args.action == "download":
        print(f"downloading style {args.value}; `live2diff-engine ctl status` shows the progress")
    else:
        print("ok")
    return 0


_CTL_EXAMPLES = {"download": "toonyou", "prompt": "'a watercolor portrait'", "negative": "'blurry'", "guidance": "1.5", "style": "toonyou", "strength": "0.5",
                 "steps": "2", "seed": "7"}


def _cmd_bench_engine(args) -> int:
    import copy

    from .assemble import build_frame_pipeline
    from .bench.stream import bench_engine, machine_name
    from .io.sources import SyntheticSource

    if args.frames < 16 or args.rounds < 1:
        raise ConfigError("--frames must be at least 16 and --rounds at least 1")
    comps, first, manager, style = build_frame_pipeline(args)
    src = SyntheticSource(args.input_size, 30.0, args.seed)
    frames = [src.read() for _ in range(64)]

    def make():
        a = copy.copy(args)
        from .pipeline.frames import FramePipeline

        steps, t_index_list, strength = style.schedule_args()
        return FramePipeline(
            comps, width=first.width, height=first.height, fit=args.fit, num_inference_steps=steps,
            t_index_list=t_index_list, strength=strength, prompt=a.prompt, template=style.template,
            clip_skip=style.clip_skip, seed=a.seed, output_size=args.output_size,
            negative_prompt=a.negative_prompt, guidance_scale=a.guidance,
        )

    print(f"machine: {machine_name(comps.device)}; model: {comps.label}; model size {first.width}x{first.height}; "
          f"input {args.input_size[0]}x{args.input_size[1]}; {args.frames} frames x {args.rounds} rounds")
    if args.control:
        from .bench.stream import bench_control

        r = bench_control(make, manager, frames, args.frames, args.rounds)
        print(f"  engine alone:                 {r['engine_fps']:.2f} frames/s")
        print(f"  engine + API, MJPEG and dock: {r['control_fps']:.2f} frames/s ({r['frames_served']} MJPEG frames served)")
        print(f"  control overhead:             {r['overhead'] * 100:+.1f}%")
        return 0
    r = bench_engine(make, frames, args.frames, args.rounds)
    print(f"  bare pipeline loop: {r['bare_fps']:.2f} frames/s")
    print(f"  engine:             {r['engine_fps']:.2f} frames/s")
    print(f"  engine overhead:    {r['overhead'] * 100:+.1f}%")
    return 0


def _cmd_bench_style(args) -> int:
    import numpy as np

    from .assemble import build_frame_pipeline
    from .bench.stream import bench_style_switch, machine_name

    names = [n for n in args.switch.split(",") if n]
    if len(names) < 2:
        raise ConfigError("--switch needs at least two style names, e.g. default,toonyou")
    comps, frames, manager, _ = build_frame_pipeline(args)
    for name in names:
        manager.get(name)
    rng = np.random.default_rng(args.seed)
    size = (frames.height, frames.width, 3)

    def feed():
        return rng.integers(0, 255, size, dtype=np.uint8)

    for _ in range(frames.sink + 2):
        frames.push(feed())
    result = bench_style_switch(manager, frames, names, max(1, args.rounds), feed)
    print(f"machine: {machine_name(comps.device)}; model: {comps.label}; {frames.width}x{frames.height}")
    for name, seconds in result.items():
        print(f"  switch to {name:15} {seconds * 1000:9.1f} ms (median of {max(1, args.rounds)})")
    return 0


def _cmd_bench_threads(args) -> int:
    from .bench.stream import machine_name
    from .bench.threads import bench_threads, table
    from .threads import choose_threads, parse_threads, usable_cpus

    choices = [parse_threads(c) for c in args.choices.split(",") if c.strip()]
    if not choices or args.frames < 1 or args.rounds < 1 or args.hogs < 0:
        raise ConfigError("--choices needs thread counts (e.g. 1,2,auto), --frames and --rounds at least 1, --hogs 0 or more")
    device = resolve_device(args.device)
    auto, _ = choose_threads(device.type, env={})  # what the engine picks on this machine
    result = bench_threads(args, choices, auto, progress=lambda line: print(line, file=sys.stderr, flush=True))
    head = [f"machine: {machine_name(device)}; {usable_cpus()} usable CPUs; {args.hogs} busy process(es) beside",
            f"model: {'tiny' if args.model == 'tiny' else args.base}; {args.frames} frames x {args.rounds} processes per choice, interleaved"]
    print(table(result, head))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine_name(device), "cpus": usable_cpus(), "hogs": args.hogs, **result}, f, indent=1)
            f.write("\n")
    return 1 if result["failures"] else 0


def _geometry_size(args) -> tuple[int, int]:
    """--size for the random-weight checks: 512x512 full size, 64x64 with --geometry tiny."""
    width, height = args.size or ((64, 64) if args.geometry == "tiny" else (512, 512))
    if width % 8 or height % 8:
        raise ConfigError(f"--size must be multiples of 8 (the VAE's factor), got {width}x{height}")
    return width, height


def _cmd_bench_gpu(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; never reach for the hub
    import torch

    from .bench import gpu as bench_gpu

    device = resolve_device(args.device)
    dtype = _torch_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    # CUDA graphs before plain compile: they are the figure that matters, and the budget is checked
    # only between measurements.
    modes = [m.strip() for m in (args.modes or ("off,cudagraph,compile" if device.type == "cuda" else "off")).split(",") if m.strip()]
    bad = [m for m in modes if m not in bench_gpu.MODES]
    if not modes or bad:
        raise ConfigError(f"--modes takes {', '.join(bench_gpu.MODES)} (comma-separated), got {args.modes!r}")
    if "cudagraph" in modes and device.type != "cuda":
        raise ConfigError(f"mode cudagraph needs a CUDA device, not {device.type}; use --modes off,compile")
    vaes = [v.strip() for v in args.vae.split(",") if v.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in bench_gpu.PARTS for p in parts):
        raise ConfigError(f"--parts takes {', '.join(bench_gpu.PARTS)} (comma-separated), got {args.parts!r}")
    if ("pipeline" in parts or "memory" in parts) and (not vaes or any(v not in ("taesd", "full") for v in vaes)):
        raise ConfigError(f"--vae takes taesd, full or taesd,full, got {args.vae!r}")
    if args.frames < 1 or args.budget_s <= 0:
        raise ConfigError("--frames must be at least 1 and --budget-s positive")
    width, height = _geometry_size(args)
    memory_sizes = None
    if args.memory_sizes:
        try:
            memory_sizes = [_size_arg(t.strip()) for t in args.memory_sizes.split(",") if t.strip()]
        except argparse.ArgumentTypeError:
            memory_sizes = []
        if not memory_sizes or any(w % 8 or h % 8 for w, h in memory_sizes):
            raise ConfigError(f"--memory-sizes takes sizes like 512x512,768x432 (multiples of 8), got {args.memory_sizes!r}")
    memory_dtypes = None
    if args.memory_dtypes:
        names = [d.strip() for d in args.memory_dtypes.split(",") if d.strip()]
        if not names or any(n not in DTYPES for n in names):
            raise ConfigError(f"--memory-dtypes takes {', '.join(DTYPES)} (comma-separated), got {args.memory_dtypes!r}")
        memory_dtypes = [_torch_dtype(n) for n in names]
    from .pipeline.schedule import make_schedule

    make_schedule(args.num_inference_steps, t_index_list=args.t_index_list)  # a bad schedule is one line now
    settings = bench_gpu.Settings(
        device=device, dtype=dtype, geometry=args.geometry, width=width, height=height,
        num_inference_steps=args.num_inference_steps, t_index_list=list(args.t_index_list), modes=modes,
        vaes=vaes, frames=args.frames, budget_s=args.budget_s, seed=args.seed, parts=parts,
        memory_sizes=memory_sizes, memory_dtypes=memory_dtypes,
    )
    import signal

    def stop(signum, frame):  # `timeout` or a scheduler ending the slot: keep the figures so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    def save(r):  # at the start (a path that cannot be written fails at once) and after every measurement
        try:
            bench_gpu.write_json(r, args.json)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.json}: {exc.strerror or exc}") from None

    result = bench_gpu.run(settings, on_update=save if args.json else None)
    print(bench_gpu.table(result))
    return 130 if result["interrupted"] else 1 if result["errors"] else 0


def _cmd_check_accelerate(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; never reach for the hub
    import torch

    from .bench import accelerate as ca

    device = resolve_device(args.device)
    names = [d.strip() for d in (args.dtypes or ("float16,float32" if device.type == "cuda" else "float32")).split(",") if d.strip()]
    if not names or any(n not in DTYPES for n in names):
        raise ConfigError(f"--dtypes takes {', '.join(DTYPES)} (comma-separated), got {args.dtypes!r}")
    dtypes = [_torch_dtype(n) for n in names]
    modes = [m.strip() for m in (args.modes or ("compile,cudagraph" if device.type == "cuda" else "compile")).split(",") if m.strip()]
    if not modes or any(m not in ("compile", "cudagraph") for m in modes):
        raise ConfigError(f"--modes takes compile, cudagraph (comma-separated), got {args.modes!r}")
    if "cudagraph" in modes and device.type != "cuda":
        raise ConfigError(f"mode cudagraph needs a CUDA device, not {device.type}; use --modes compile")
    bad = [t for t in args.steps if t not in ca.T_INDEX]
    if bad or not args.steps:
        raise ConfigError(f"--steps takes step counts from 1 to 4 (comma-separated), got {','.join(map(str, args.steps))}")
    try:
        guidance = [float(g) for g in args.guidance.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--guidance takes comma-separated numbers of at least 1, got {args.guidance!r}") from None
    if not guidance or any(g < 1 for g in guidance):
        raise ConfigError(f"--guidance takes comma-separated numbers of at least 1, got {args.guidance!r}")
    if args.calls < 1 or args.budget_s <= 0:
        raise ConfigError("--calls must be at least 1 and --budget-s positive")
    width, height = _geometry_size(args)
    settings = ca.Settings(device=device, dtypes=dtypes, steps=list(args.steps), modes=modes, guidance=guidance,
                           geometry=args.geometry, width=width, height=height, calls=args.calls, budget_s=args.budget_s)
    import signal

    def stop(signum, frame):  # `timeout` ending the slot: keep the cases so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    result = ca.run(settings)
    print(ca.table(result))
    if args.json:
        try:
            ca.write_json(result, args.json)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    if result["interrupted"]:
        return 130
    return 0 if result["cases"] and all(c["ok"] for c in result["cases"]) else 1


def _cmd_eval(args) -> int:
    from .eval_command import cmd_eval

    return cmd_eval(args)


COMMANDS = {
    "bench-gpu": _cmd_bench_gpu,
    "check-accelerate": _cmd_check_accelerate,
    "run": _cmd_run,
    "ctl": _cmd_ctl,
    "bench-engine": _cmd_bench_engine,
    "bench-style": _cmd_bench_style,
    "bench-threads": _cmd_bench_threads,
    "check-reference": _cmd_check_reference,
    "bench": _cmd_bench,
    "translate": _cmd_translate,
    "models": _cmd_models,
    "styles": _cmd_styles,
    "eval": _cmd_eval,
    "serve": lambda args: __import__("live2diff_engine.serve", fromlist=["cmd_serve"]).cmd_serve(args),
    "connect": lambda args: __import__("live2diff_engine.remote", fromlist=["cmd_connect"]).cmd_connect(args),
}


def _quiet_libraries() -> None:
    """The libraries' own warnings (e.g. transformers on torchvision's absence) are noise to a
    user; LIVE2DIFF_VERBOSE=1 brings them back."""
    import os

    if os.environ.get("LIVE2DIFF_VERBOSE"):
        return
    import logging

    for name in ("transformers", "diffusers", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers sets its logger's level from this when it is first imported (which the quick
    # commands never do: importing it here cost them seconds)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # which options were typed (saved settings)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"live2diff-engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("live2diff-engine: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


_exit_at_once = False  # set by `run` once its outputs are closed


def entry_point() -> None:
    code = main()
    if _exit_at_once:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """Ends the process without the interpreter's teardown. After `run` everything the user made
    is already closed (files, virtual camera, API); what is left is the garbage collector walking
    every object torch and the models made, which on a busy machine took 10 s and more after a
    Ctrl-C. The exit handlers still run and the output is flushed first."""
    import atexit
    import logging
    import os

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # a broken pipe or an exit handler's fault must not hold the exit
        pass
    os._exit(code)


if __name__ == "__main__":
    entry_point()
