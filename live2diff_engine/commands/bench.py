"""The measuring commands: `bench`, `bench-engine`, `bench-style`, `bench-threads`, `bench-gpu`,
`check-accelerate`. Their options and the runs; the measuring itself is in `bench/`."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from ..options import DTYPES, int_list, parse_size, resolve_device, torch_dtype


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure per-frame stream cost for short and long streams in one run",
        description="Stream the model for each frame count (default 32 and 512) and report ms per frame and the "
        "ratio of the longest to the shortest: with a fixed-size KV-cache it stays near 1.",
    )
    _add_model_options(bench)
    bench.add_argument("--frames", type=int_list, default=[32, 512], help="comma-separated frame counts (default 32,512)")
    steps = bench.add_mutually_exclusive_group()
    steps.add_argument("--t-index-list", type=int_list, help="denoising steps as schedule indices (default 32,45)")
    steps.add_argument("--strength", type=float, help="instead of --t-index-list: denoise the last int(steps*strength) steps")
    bench.add_argument("--num-inference-steps", type=int, default=50)
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench.add_argument("--accelerate", default="auto", metavar="MODE[,MODE]",
                       help="acceleration mode, or several comma-separated (e.g. off,compile) to compare them interleaved "
                       "in one run on the longest frame count")
    bench.add_argument("--text", default=None, metavar="KIND[,KIND]",
                       help="instead: the per-frame cost of the text conditioning, interleaved on one stream: steady (one "
                       "prompt), blend (two prompts mixed), transition (a prompt transition under way); e.g. "
                       "steady,blend,transition (over the longest --frames count)")
    bench.add_argument("--image", action="store_true",
                       help="instead: the per-frame cost of a style picture (IP-Adapter, random weights of the released "
                       "layout): the stream without one against the stream with one, interleaved (over the longest "
                       "--frames count), and the image encoder's time per picture")

def _add_bench_engine(sub) -> None:
    from ..options import add_model_args

    be = sub.add_parser(
        "bench-engine",
        help="engine throughput against the bare frame-pipeline loop on the same frames",
        description="Run the same frames through the bare FramePipeline loop and through the engine (threads, "
        "conversions, sinks), alternating, and report both rates and the engine's overhead.",
    )
    be.add_argument("--frames", type=int, default=300, help="frames per round (default 300)")
    be.add_argument("--rounds", type=int, default=3, help="rounds of each (default 3; the median is reported)")
    be.add_argument("--input-size", type=parse_size, default=(640, 480), metavar="WxH", help="input frame size (default 640x480)")
    be.add_argument("--control", action="store_true",
                    help="instead: the engine alone against the engine with its control plane busy (API, MJPEG viewer, dock)")
    add_model_args(be)


def _add_bench_style(sub) -> None:
    from ..options import add_model_args

    bs = sub.add_parser(
        "bench-style",
        help="measure how long a style switch takes",
        description="Load the model, stream a few frames, then switch between the given styles several times "
        "(a frame after each switch) and report the median switch time per style.",
    )
    bs.add_argument("--switch", required=True, help="comma-separated style names to alternate between, e.g. default,toonyou")
    bs.add_argument("--rounds", type=int, default=5)
    add_model_args(bs)


def _add_bench_threads(sub) -> None:
    from ..options import add_model_args

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
    bt.add_argument("--input-size", type=parse_size, default=(640, 480), metavar="WxH", help="input frame size (default 640x480)")
    bt.add_argument("--json", metavar="FILE", help="also write the figures (every frame's time) as JSON")
    add_model_args(bt)


def _add_bench_gpu(sub) -> None:
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
    bg.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="model size (default 512x512; 64x64 with --geometry tiny)")
    bg.add_argument("--t-index-list", type=int_list, default=[32, 45], help="denoising steps (default 32,45)")
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


def _add_check_accelerate(sub) -> None:
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
    ca.add_argument("--steps", type=int_list, default=[3, 4, 1, 2], help="denoising step counts, in the order to check (default 3,4,1,2)")
    ca.add_argument("--modes", default=None, help="comma-separated: compile, cudagraph (default: both on CUDA, compile elsewhere)")
    ca.add_argument("--guidance", default="1", help="comma-separated guidance scales (default 1: none)")
    ca.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="model size (default 512x512; 64x64 with --geometry tiny)")
    ca.add_argument("--calls", type=int, default=12, help="stream calls per case (default 12: past the cache window's wrap)")
    ca.add_argument("--budget-s", type=float, default=300.0, help="skip the remaining cases after this many seconds (default 300)")
    ca.add_argument("--json", metavar="FILE", help="also write every figure as JSON")


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
    from ..threads import add_threads_arg

    add_threads_arg(p)


def _load_model(args):
    """(unet, prompt_embeds, latent size, label) for --model tiny or --base/--motion."""
    import torch

    from ..threads import apply_threads

    device = resolve_device(args.device)
    apply_threads(device, args.threads, lambda line: print(line, file=sys.stderr, flush=True))
    dtype = torch_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.model == "tiny":
        from ..models.tiny import TINY_LABEL, TINY_LATENT_SIZE, build_tiny_unet, tiny_prompt_embeds

        unet = build_tiny_unet(args.seed, device=device, dtype=dtype)
        prompt = tiny_prompt_embeds(args.seed, device=device, dtype=dtype)
        size, label = TINY_LATENT_SIZE, TINY_LABEL
    elif args.model == "sd15-random":
        from ..models.full_random import build_full_unet

        unet = build_full_unet(device=device, dtype=dtype, seed=args.seed)
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device=device, dtype=dtype)
        size, label = (64, 64), "SD1.5 + Live2Diff geometry, random weights"
    elif args.base and args.motion:
        from ..models.loading import load_streaming_unet

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

    from ..bench.stream import BenchResult, bench_modes, bench_stream, machine_name
    from ..pipeline.accelerate import parse_modes, resolve_mode
    from ..pipeline.schedule import make_schedule
    from ..pipeline.stream import StreamPipeline

    if not args.frames or min(args.frames) < 1:
        raise ConfigError("--frames needs positive counts, e.g. 32,512")
    if args.image and args.text:
        raise ConfigError("--image and --text are two benchmarks; run them one at a time")
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

    def make(mode, on=None):
        pipe = StreamPipeline(on or unet, schedule, (h, w), generator=torch.Generator(device=device).manual_seed(args.seed),
                              accelerate=mode)
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

    if args.image:
        from ..bench.stream import bench_image

        frames = max(args.frames)
        print(f"benchmarking {label} ({modes[0]}): without and with a style picture interleaved, {frames} frames each ...",
              file=sys.stderr, flush=True)
        figures = bench_image(unet, lambda u: make(modes[0], u), warm, warm, frames, progress=progress)
        print("", file=sys.stderr)
        encode, swap = figures.pop("encode_ms"), figures.pop("swap_ms")
        base = figures["none"]["median"]
        names = {"none": "no picture", "picture": "a picture"}
        rows = head + [f"  {names[k]:>10}: {f['median']:8.3f} ms/frame (median; mean {f['mean']:.3f})  x{f['median'] / base:.3f} of none"
                       for k, f in figures.items()]
        rows.append(f"  the image encoder, once per picture (beside the stream): {encode:.2f} ms; "
                    f"its swap into the stream, between two frames: {swap:.3f} ms")
        print("\n".join(rows))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"machine": machine, "device": str(device), "model": label, "latent": f"{h}x{w}",
                           "steps": schedule.steps, "frames": frames, "image": figures, "encode_ms": encode, "swap_ms": swap},
                          f, indent=1)
                f.write("\n")
        return 0

    if args.text:
        from ..bench.stream import bench_text

        kinds = [k.strip() for k in args.text.split(",") if k.strip()]
        pipe = make(modes[0])
        frames = max(args.frames)
        print(f"benchmarking {label} ({modes[0]}): text {', '.join(kinds)} interleaved, {frames} frames each ...",
              file=sys.stderr, flush=True)
        try:
            figures = bench_text(pipe, warm, warm, prompt, prompt.flip(1), kinds, frames, progress=progress)
        except ValueError as exc:
            raise ConfigError(f"--text: {exc}") from None
        print("", file=sys.stderr)
        lerp = figures.pop("text_update_ms")
        base = figures[kinds[0]]["median"]
        rows = head + [f"  {k:>10}: {f['median']:8.3f} ms/frame (median; mean {f['mean']:.3f})  x{f['median'] / base:.3f} of {kinds[0]}"
                       for k, f in figures.items()]
        rows.append(f"  a transition's text write alone: {lerp['this model']:.4f} ms/frame at this model's text size, "
                    f"{lerp['sd15']:.4f} ms at SD1.5's [2, 77, 768]")
        print("\n".join(rows))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"machine": machine, "device": str(device), "model": label, "latent": f"{h}x{w}",
                           "steps": schedule.steps, "frames": frames, "text": figures, "text_update_ms": lerp}, f, indent=1)
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


def _cmd_bench_engine(args) -> int:
    import copy

    from ..assemble import build_frame_pipeline
    from ..bench.stream import bench_engine, machine_name
    from ..io.sources import SyntheticSource

    if args.frames < 16 or args.rounds < 1:
        raise ConfigError("--frames must be at least 16 and --rounds at least 1")
    comps, first, manager, style = build_frame_pipeline(args)
    src = SyntheticSource(args.input_size, 30.0, args.seed)
    frames = [src.read() for _ in range(64)]

    def make():
        a = copy.copy(args)
        from ..pipeline.frames import FramePipeline

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
        from ..bench.stream import bench_control

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

    from ..assemble import build_frame_pipeline
    from ..bench.stream import bench_style_switch, machine_name

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
    from ..bench.stream import machine_name
    from ..bench.threads import bench_threads, table
    from ..threads import choose_threads, parse_threads, usable_cpus

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

    from ..bench import gpu as bench_gpu

    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
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
            memory_sizes = [parse_size(t.strip()) for t in args.memory_sizes.split(",") if t.strip()]
        except argparse.ArgumentTypeError:
            memory_sizes = []
        if not memory_sizes or any(w % 8 or h % 8 for w, h in memory_sizes):
            raise ConfigError(f"--memory-sizes takes sizes like 512x512,768x432 (multiples of 8), got {args.memory_sizes!r}")
    memory_dtypes = None
    if args.memory_dtypes:
        names = [d.strip() for d in args.memory_dtypes.split(",") if d.strip()]
        if not names or any(n not in DTYPES for n in names):
            raise ConfigError(f"--memory-dtypes takes {', '.join(DTYPES)} (comma-separated), got {args.memory_dtypes!r}")
        memory_dtypes = [torch_dtype(n) for n in names]
    from ..pipeline.schedule import make_schedule

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

    from ..bench import accelerate as ca

    device = resolve_device(args.device)
    names = [d.strip() for d in (args.dtypes or ("float16,float32" if device.type == "cuda" else "float32")).split(",") if d.strip()]
    if not names or any(n not in DTYPES for n in names):
        raise ConfigError(f"--dtypes takes {', '.join(DTYPES)} (comma-separated), got {args.dtypes!r}")
    dtypes = [torch_dtype(n) for n in names]
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


COMMANDS = {
    "bench": (_add_bench, _cmd_bench),
    "bench-engine": (_add_bench_engine, _cmd_bench_engine),
    "bench-style": (_add_bench_style, _cmd_bench_style),
    "bench-threads": (_add_bench_threads, _cmd_bench_threads),
    "bench-gpu": (_add_bench_gpu, _cmd_bench_gpu),
    "check-accelerate": (_add_check_accelerate, _cmd_check_accelerate),
}
