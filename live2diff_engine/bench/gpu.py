"""``live2diff-engine bench-gpu``: where a frame's time goes on a GPU, per acceleration mode.

Built for one short slot on a machine without network: the models are full-size with random
weights (:mod:`.models.full_random`), so nothing is downloaded and the cost per frame is the real
one. It measures

* the warmup's peak device memory (``memory``) for each model size and dtype asked for, with
  TAESD and with the full VAE: the 8 frames' warmup (the VAE encode of 8 frames and their 8 depth
  images, then the 8-frame UNet pass that fills the KV-cache) on its own, as a user's process
  would hold it (the weights of the models that pipeline uses, plus what the warmup allocates),
  and which of 8, 12 and 24 GB cards that fits (see :func:`card_fit`);
* for each acceleration mode, in the order given (the CLI's default on CUDA: off, cudagraph,
  compile; CUDA graphs are the figure that matters, so they go before plain compile):

  * the stream step alone (``StreamPipeline.step`` on random latents): ms per frame and FPS;
  * the whole frame pipeline (``FramePipeline.push`` of uint8 RGB frames at the model size, MiDaS
    depth) with TAESD and with the full VAE: FPS and the mean ms of each stage as
    ``FramePipeline(profile_stages=True)`` times them (upload, depth, encode: one VAE call for the
    frame and its depth map, unet: first-step noise and the stream step, decode, download), plus
    "other": the frame's wall time less its stages (host work: checks, fitting, Python);
  * for each measurement: the first calls after the warmup until the stream runs as it will go
    on (``first_call_s``: the compile, and for cudagraph the two real calls and the capture with
    its first, checked, replay; ``first_calls`` says how many calls that took), the warmup's own
    peak memory and the peak over the whole measurement. Before each measurement the previous
    one's memory is freed (its CUDA graph too) and the peak statistics are reset.

A global time budget stops it from overrunning the slot: a measurement that would start after the
budget is spent is skipped with a line that says so, and a timed loop stops early when it runs
out (a compile under way is not stopped: the caller's timeout ends the run, and the figures so far
are kept). Progress goes to stderr; the table to stdout; ``--json`` writes every figure.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .stream import _Timer, machine_name

STAGES = ("upload", "depth", "encode", "unet", "decode", "download", "other")
MODES = ("off", "compile", "cudagraph")
PARTS = ("memory", "stream", "pipeline")
# The cards the warmup's memory is judged against (GB as sold: 8 GB cards hold 8192 MiB).
CARD_GB = (8, 12, 24)
# Held on a card by others than this process: a desktop on the card that drives the display,
# a browser, a video call. Taken off each card's size before the warmup's needs are compared.
OTHERS_MB = 512


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    geometry: str = "full"  # full | tiny
    width: int = 512
    height: int = 512
    num_inference_steps: int = 50
    t_index_list: list[int] = field(default_factory=lambda: [32, 45])
    modes: list[str] = field(default_factory=lambda: ["off"])
    vaes: list[str] = field(default_factory=lambda: ["taesd", "full"])
    frames: int = 50
    budget_s: float = 420.0
    seed: int = 0
    parts: list[str] = field(default_factory=lambda: ["memory", "stream", "pipeline"])
    # The warmup's memory is measured at each of these sizes (width, height) and dtypes (default:
    # the bench's own size and dtype).
    memory_sizes: list[tuple[int, int]] | None = None
    memory_dtypes: list[torch.dtype] | None = None
    # Tests: the accelerator's options per mode (a compiler backend, emulated CUDA graphs on the
    # CPU), installed once per mode as the UNet's accelerator before its first measurement.
    accelerator_options: dict = field(default_factory=dict)


def say(text: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _release_graphs(unet) -> None:
    """Drop the CUDA graph each of the UNet's accelerators still holds from the last stream (and
    with it the graph's private memory pool): the next stream captures its own anyway."""
    for accel in getattr(unet, "__dict__", {}).get("_stream_accelerators", {}).values():
        accel.release_graph()


def _fresh(device: torch.device, unets=()) -> None:
    """Before a measurement: the last one's memory freed (its pipeline, its CUDA graph, the
    KV-cache its stream left on the UNet) and the peak statistics reset."""
    for unet in unets:
        _release_graphs(unet)
        if hasattr(unet, "release_cache"):
            unet.release_cache()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _outside_allocator_mb(device: torch.device) -> float | None:
    """What the card holds beyond torch's allocator: the CUDA context, the libraries' kernels and
    workspaces (on a lent machine nobody else uses the card)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return round(max(0, total - free - torch.cuda.memory_reserved(device)) / 2**20, 1)


def card_fit(needs_mb: float | None, cards=CARD_GB, others_mb: float = OTHERS_MB) -> dict | None:
    """``{"8": bool, "12": bool, "24": bool}``: whether ``needs_mb`` (a process's whole hold on the
    card) fits each card, after :data:`OTHERS_MB` for the desktop and other programs. None when
    there is no figure (not measured on a GPU)."""
    if needs_mb is None:
        return None
    return {str(gb): needs_mb <= gb * 1024 - others_mb for gb in cards}


def _fits_text(fits: dict | None) -> str:
    if fits is None:
        return "-"
    ok = [gb for gb, yes in fits.items() if yes]
    return f"{ok[0]} GB and up" if ok else f"none of {', '.join(fits)} GB"


def _weights_bytes(comps, device_type: str = "cuda") -> int:
    """The bytes of the weights on ``device_type`` that a pipeline on ``comps`` uses (UNet, VAE,
    text encoder, depth estimator; each tensor once, shared ones too)."""
    seen: set[int] = set()
    total = 0
    mods = []
    for value in (comps.unet, comps.vae, comps.text_encoder, comps.depth):
        if isinstance(value, torch.nn.Module):
            mods.append(value)
        else:  # a wrapper (a depth estimator holding its model)
            mods += [v for v in vars(value).values() if isinstance(v, torch.nn.Module)]
    for mod in mods:
        for t in list(mod.parameters()) + list(mod.buffers()):
            if t is None or t.device.type != device_type or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _first_durations(timer: _Timer, n: int) -> list[float]:
    """The first ``n`` durations of a timer whose loop may have stopped early (on CUDA, events
    never recorded cannot be read)."""
    if timer.cuda:
        torch.cuda.synchronize(timer.device)
        return [a.elapsed_time(b) for a, b in zip(timer.events[:n], timer.events[1 : n + 1])]
    return [(b - a) * 1000.0 for a, b in zip(timer.stamps[:n], timer.stamps[1 : n + 1])]


# The most calls the first phase may take: cudagraph makes two real calls, then captures (and checks
# the first replay) at the third; a frame pipeline's first output comes ``steps - 1`` pushes later.
FIRST_CALLS_MAX = 8


def _first_calls(call, accel, mode: str, device: torch.device, ready=lambda: True) -> tuple[float, int]:
    """Seconds and calls from the first call after the warmup until the stream runs as it will go
    on: for cudagraph until its graph is captured and first replayed (or the mode fell back), for
    the others one call; and, for a frame pipeline, until ``ready()`` (its first output). The
    compile falls in these calls (and in the pipeline's construction, where it precompiles)."""
    captures = getattr(accel, "captures", 0)
    start = time.perf_counter()
    n = 0
    while True:
        call()
        n += 1
        graphed = mode != "cudagraph" or getattr(accel, "captures", 0) > captures or getattr(accel, "mode", mode) != "cudagraph"
        if (graphed and ready()) or n >= FIRST_CALLS_MAX:
            break
    _sync(device)
    return time.perf_counter() - start, n


def _effective(obj, mode: str) -> str:
    value = getattr(obj, "accelerated", None)
    return str(value) if value is not None else mode


# -- models ------------------------------------------------------------------------------------


def _tiny_taesd():
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
        )


def build_models(s: Settings) -> dict:
    """Components per VAE (sharing UNet, text encoder and depth) and the prompt for the stream bench."""
    from ..models.components import Components

    if s.geometry == "tiny":
        from ..models.components import build_tiny_components

        base = build_tiny_components(s.seed, device=s.device, dtype=s.dtype)
        vaes = {"full": base.vae, "taesd": torch.nn.Module.to(_tiny_taesd(), device=s.device, dtype=s.dtype).eval().requires_grad_(False)}
    else:
        from ..models import full_random as fr

        say("building the streaming UNet (SD1.5 geometry + Live2Diff motion modules, random weights)")
        unet = fr.build_full_unet(s.device, s.dtype, s.seed)
        say("building the text encoder, MiDaS DPT-hybrid and the VAEs")
        text_encoder, tokenizer = fr.build_full_text(s.device, s.dtype, s.seed + 3)
        depth = fr.build_full_midas(s.device, s.dtype, s.seed + 4)
        vaes = {}
        if "full" in s.vaes:
            vaes["full"] = fr.build_full_vae(s.device, s.dtype, s.seed + 1)
        if "taesd" in s.vaes or not vaes:  # the stream bench alone still needs a VAE's scale factor
            vaes["taesd"] = fr.build_full_taesd(s.device, s.dtype, s.seed + 2)
        base = Components(unet, next(iter(vaes.values())), text_encoder, tokenizer, depth, label=fr.FULL_RANDOM_LABEL)
    comps = {name: dataclasses.replace(base, vae=vae) for name, vae in vaes.items() if name in s.vaes}
    g = torch.Generator().manual_seed(s.seed)
    prompt = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=g).to(device=s.device, dtype=s.dtype)
    return {"comps": comps, "base": base, "prompt": prompt}


# -- the stream step alone ---------------------------------------------------------------------


def _schedule(s: Settings):
    from ..pipeline.schedule import make_schedule

    return make_schedule(s.num_inference_steps, t_index_list=s.t_index_list)


def bench_stream_step(s: Settings, base, prompt: torch.Tensor, mode: str, budget: Budget) -> dict:
    from ..pipeline.stream import StreamPipeline

    device = s.device
    factor = base.vae_scale_factor
    h, w = s.height // factor, s.width // factor
    gen = torch.Generator(device=device).manual_seed(s.seed)
    pipe = StreamPipeline(base.unet, _schedule(s), (h, w), generator=gen, accelerate=mode)
    pipe.set_prompt_embeds(prompt)
    cpu = torch.Generator().manual_seed(s.seed + 1)
    warm = torch.randn(pipe.sink, 4, h, w, generator=cpu).to(device=device, dtype=s.dtype)
    latents = torch.randn(16, 1, 4, h, w, generator=cpu).to(device=device, dtype=s.dtype)
    _reset_peak(device)
    start = time.perf_counter()
    pipe.prepare(warm, warm)
    _sync(device)
    warmup_s = time.perf_counter() - start
    warmup_peak = _peak_mb(device)
    k = 0

    def call():
        nonlocal out, k
        out = pipe.step(latents[k % 16], latents[(k + 3) % 16])
        k += 1

    out = None
    first_s, first_n = _first_calls(call, pipe.accelerator, mode, device)
    call()  # one more, not timed: a replay, or the compiled code's second call
    timer = _Timer(device, s.frames)
    timer.mark(0)
    n = 0
    for i in range(s.frames):
        call()
        n += 1
        timer.mark(n)
        if budget.spent():
            say(f"  budget spent: stream step ({mode}) stopped after {n} of {s.frames} frames")
            break
    durations = _first_durations(timer, n)
    ms = _median(durations)
    return {
        "effective": _effective(pipe, mode),
        "frames": n,
        "ms_per_frame": round(ms, 3),
        "mean_ms": round(sum(durations) / n, 3),
        "fps": round(1000.0 / ms, 2),
        "warmup_s": round(warmup_s, 3),
        "first_call_s": round(first_s, 3),
        "first_calls": first_n,
        "warmup_peak_mb": warmup_peak,
        "peak_mem_mb": _peak_mb(device),
        "finite": bool(torch.isfinite(out).all()),
    }


# -- the frame pipeline, stage by stage ----------------------------------------------------------


def _frame_source(s: Settings, count: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(s.seed)
    return [rng.integers(0, 256, (s.height, s.width, 3), dtype=np.uint8) for _ in range(count)]


def bench_frame_pipeline(s: Settings, comps, vae: str, mode: str, budget: Budget) -> dict:
    device = s.device
    frames = _frame_source(s)
    _reset_peak(device)
    start = time.perf_counter()
    fp = _frame_pipeline(s, comps, mode, s.width, s.height)  # compiles here (the stream step, the VAE)
    _sync(device)
    _reset_peak(device)  # the warmup's own peak, from its first frame to its last
    i = 0
    while fp.warming_up:  # the sink frames come back as they went in; the last one runs the warmup
        fp.push(frames[i % len(frames)])
        i += 1
    _sync(device)
    warmup_s = time.perf_counter() - start
    warmup_peak = _peak_mb(device)
    got = []

    def push():
        nonlocal i
        got.extend(fp.push(frames[i % len(frames)]))
        i += 1

    first_s, first_n = _first_calls(push, fp.stream.accelerator, mode, device, ready=lambda: bool(got))
    push()  # one more, not timed
    fp.clear_stage_times()  # the first frames are not counted
    walls: list[float] = []
    out = None
    for _ in range(s.frames):
        start = time.perf_counter()
        ready = fp.push(frames[i % len(frames)])  # returns after the frame's copy to the host
        walls.append(time.perf_counter() - start)
        i += 1
        if ready:
            out = ready[-1][1]
        if budget.spent():
            say(f"  budget spent: frame pipeline ({vae} VAE, {mode}) stopped after {len(walls)} of {s.frames} frames")
            break
    n = len(walls)
    total = sum(walls)
    per_frame = fp.stage_times()
    stages = {k: round(sum(f.get(k, 0.0) for f in per_frame) / max(1, len(per_frame)), 3) for k in STAGES if k != "other"}
    stages["other"] = round(max(0.0, 1000.0 * total / n - sum(stages.values())), 3)
    x0 = getattr(fp.stream, "last_x0_batch", None)
    return {
        "effective": _effective(fp.stream, mode),
        "frames": n,
        "fps": round(n / total, 2),
        "ms_per_frame": round(1000.0 * total / n, 3),
        "median_ms": round(1000.0 * _median(walls), 3),
        "stages_ms": stages,
        "warmup_s": round(warmup_s, 3),
        "first_call_s": round(first_s, 3),
        "first_calls": first_n,
        "warmup_peak_mb": warmup_peak,
        "peak_mem_mb": _peak_mb(device),
        "finite": None if x0 is None else bool(torch.isfinite(x0).all()),
        "outputs": out is not None,
    }


def _frame_pipeline(s: Settings, comps, mode: str, width: int, height: int):
    from ..pipeline.frames import FramePipeline

    return FramePipeline(
        comps, width=width, height=height, num_inference_steps=s.num_inference_steps,
        t_index_list=list(s.t_index_list), prompt="a portrait, watercolor", seed=s.seed, accelerate=mode,
        profile_stages=True,
    )


# -- the warmup's memory -------------------------------------------------------------------------


def bench_warmup_memory(s: Settings, comps, width: int, height: int) -> dict:
    """The warmup's peak device memory for a frame pipeline on ``comps`` at ``width`` x ``height``
    (eager: the warmup never compiles), as a process that holds only these models would see it:
    the weights of the models the pipeline uses plus the most the warmup allocated beyond what
    was allocated before it (other models in memory, e.g. the other VAE or another dtype's
    copies, do not count). ``needs_mb`` adds what the card holds outside torch's allocator (the
    CUDA context and libraries, measured here) to the allocator's reserved peak; ``fits`` judges
    it against :data:`CARD_GB`. Every figure is None off CUDA."""
    device = s.device
    frames = _frame_source(dataclasses.replace(s, width=width, height=height), count=comps.unet.motion_config.sink_size)
    fp = _frame_pipeline(s, comps, "off", width, height)
    _sync(device)
    cuda = device.type == "cuda"
    if cuda:
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for frame in frames:  # the last one runs the warmup
        fp.push(frame)
    _sync(device)
    seconds = time.perf_counter() - start
    figures = {"size": f"{width}x{height}", "dtype": str(comps.dtype).replace("torch.", ""), "warm": not fp.warming_up,
               "warmup_s": round(seconds, 3), "weights_mb": None, "peak_mb": None, "reserved_peak_mb": None,
               "outside_allocator_mb": None, "needs_mb": None, "fits": None}
    if cuda:
        weights = _weights_bytes(comps)
        peak = torch.cuda.max_memory_allocated(device) - allocated + weights
        reserved_peak = torch.cuda.max_memory_reserved(device) - reserved + weights
        outside = _outside_allocator_mb(device)
        needs = round(max(peak, reserved_peak) / 2**20 + (outside or 0.0), 1)
        figures.update(weights_mb=round(weights / 2**20, 1), peak_mb=round(peak / 2**20, 1),
                       reserved_peak_mb=round(reserved_peak / 2**20, 1), outside_allocator_mb=outside,
                       needs_mb=needs, fits=card_fit(needs))
    del fp
    return figures


# -- the run -----------------------------------------------------------------------------------


def run(s: Settings, on_update=None) -> dict:
    """Every measurement that fits the budget; returns the figures (see :func:`table`).

    ``on_update(result)`` is called after the build and after every measurement (to save the
    figures so far: a slot that ends mid-compile keeps them). An interrupt (Ctrl-C, or SIGTERM
    where the caller turns it into KeyboardInterrupt) ends the run with the figures so far."""
    budget = Budget(s.budget_s)
    update = on_update or (lambda r: None)
    result: dict = {
        "card": machine_name(s.device),
        "device": str(s.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(s.dtype).replace("torch.", ""),
        "geometry": s.geometry,
        "size": f"{s.width}x{s.height}",
        "t_index_list": list(s.t_index_list),
        "num_inference_steps": s.num_inference_steps,
        "frames_per_measurement": s.frames,
        "budget_s": s.budget_s,
        "modes_requested": list(s.modes),
        "warmup_memory": [],
        "stream": {},
        "pipeline": {},
        "skipped": [],
        "errors": [],
        "interrupted": False,
    }
    modes = list(s.modes)
    update(result)
    say(f"{result['card']}; torch {torch.__version__}; {result['dtype']}; {s.geometry} geometry at {s.width}x{s.height}; "
        f"modes {', '.join(modes) or 'none'}; budget {s.budget_s:.0f} s")
    try:
        _measure(s, result, budget, update)
    except KeyboardInterrupt:
        result["interrupted"] = True
        say(f"interrupted after {budget.elapsed():.0f} s; the figures so far follow")
    result["modes"] = _per_mode(result, modes)
    result["elapsed_s"] = round(budget.elapsed(), 1)
    update(result)
    return result


def _measure(s: Settings, result: dict, budget: Budget, update) -> None:
    modes = list(s.modes)
    device = s.device
    start = time.perf_counter()
    models = build_models(s)
    _sync(device)
    result["build_s"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        result["weights_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        result["outside_allocator_mb"] = _outside_allocator_mb(device)
    say(f"models built in {result['build_s']:.1f} s")
    update(result)

    # The warmup's memory first (eager and quick: seconds), then mode by mode in the order given.
    # The first measurement of a mode carries its compile; the others reuse the compiled code.
    plan: list[tuple[str, str | None, object]] = []
    if "memory" in s.parts:
        for dtype in s.memory_dtypes or [s.dtype]:
            for width, height in s.memory_sizes or [(s.width, s.height)]:
                plan += [("memory", v, (dtype, width, height)) for v in s.vaes]
    for m in modes:
        if "stream" in s.parts:
            plan.append(("stream", None, m))
        if "pipeline" in s.parts:
            plan += [("pipeline", v, m) for v in s.vaes]
    by_dtype = {s.dtype: models}  # the memory part's models in another dtype, built when first needed
    installed: set[str] = set()
    for part, vae, arg in plan:
        if part == "memory":
            dtype, width, height = arg
            what = f"warmup memory ({width}x{height}, {str(dtype).replace('torch.', '')}, {vae} VAE)"
        else:
            what = f"stream step ({arg})" if part == "stream" else f"frame pipeline ({vae} VAE, {arg})"
            for other in [d for d in by_dtype if d != s.dtype]:  # the memory part is over: free its models
                del by_dtype[other]
        if budget.spent():
            line = f"{what}: budget of {s.budget_s:.0f} s spent"
            say(f"skipping {line}")
            result["skipped"].append(line)
            continue
        say(f"measuring {what}; {budget.left():.0f} s of budget left")
        try:
            if part == "memory":
                if dtype not in by_dtype:
                    for other in [d for d in by_dtype if d != s.dtype]:
                        del by_dtype[other]
                    _fresh(device)
                    by_dtype[dtype] = build_models(dataclasses.replace(s, dtype=dtype))
                _fresh(device, [m["base"].unet for m in by_dtype.values()])
                figures = {"vae": vae, **bench_warmup_memory(s, by_dtype[dtype]["comps"][vae], width, height)}
                result["warmup_memory"].append(figures)
            else:
                mode = arg
                _fresh(device, [models["base"].unet])
                if s.accelerator_options and mode != "off" and mode not in installed:
                    from ..pipeline.accelerate import accelerator_for

                    accelerator_for(models["base"].unet, mode, **s.accelerator_options)
                installed.add(mode)
                if part == "stream":
                    figures = bench_stream_step(s, models["base"], models["prompt"], mode, budget)
                    result["stream"][mode] = figures
                else:
                    figures = bench_frame_pipeline(s, models["comps"][vae], vae, mode, budget)
                    result["pipeline"].setdefault(vae, {})[mode] = figures
        except torch.cuda.OutOfMemoryError:
            _record_error(result, what, "out of GPU memory")
        except Exception as exc:  # one failed measurement must not cost the others
            _record_error(result, what, _one_line(exc))
        else:
            say(f"  {what}: {_brief(figures)}")
        result["modes"] = _per_mode(result, modes)
        result["elapsed_s"] = round(budget.elapsed(), 1)
        update(result)
    _fresh(device, [models["base"].unet])


def _per_mode(result: dict, modes: list[str]) -> dict:
    """Per mode: what it ran as, its first measured call (the compile, or the CUDA-graph capture
    as well) and the peak memory over all its measurements."""
    out = {}
    for mode in modes:
        figures = ([result["stream"][mode]] if mode in result["stream"] else []) + [
            per[mode] for per in result["pipeline"].values() if mode in per
        ]
        if not figures:
            continue
        peaks = [f["peak_mem_mb"] for f in figures if f.get("peak_mem_mb") is not None]
        out[mode] = {
            "effective": figures[0]["effective"],
            "first_call_s": figures[0]["first_call_s"],
            "peak_mem_mb": max(peaks) if peaks else None,
        }
    return out


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _record_error(result: dict, what: str, text: str) -> None:
    say(f"  {what} failed: {text}")
    result["errors"].append(f"{what}: {text}")


def _brief(f: dict) -> str:
    if "needs_mb" in f:  # the warmup's memory
        if f["needs_mb"] is None:
            return f"warmup in {f['warmup_s']:.2f} s (no device memory figures off CUDA)"
        return (f"warmup in {f['warmup_s']:.2f} s, peak {f['peak_mb']:.0f} MB with {f['weights_mb']:.0f} MB of weights, "
                f"needs {f['needs_mb']:.0f} MB: fits {_fits_text(f['fits'])}")
    mem = f" peak {f['peak_mem_mb']:.0f} MB" if f.get("peak_mem_mb") is not None else ""
    firsts = f" ({f['first_calls']} calls)" if f.get("first_calls", 1) > 1 else ""
    return (f"{f['fps']:.2f} fps, {f['ms_per_frame']:.1f} ms/frame over {f['frames']} frames, "
            f"first call {f['first_call_s']:.2f} s{firsts}{mem}")


def _mb(value) -> str:
    return f"{value:.0f}" if value is not None else "-"


def table(r: dict) -> str:
    rows = [
        f"bench-gpu: {r['card']}; torch {r['torch']} (CUDA {r['cuda']}); {r['dtype']}",
        f"model: {r['geometry']} geometry, random weights; {r['size']}; t_index_list {','.join(map(str, r['t_index_list']))} "
        f"of {r['num_inference_steps']}; built in {r.get('build_s', 0):.1f} s"
        + (f"; weights {r['weights_mb']:.0f} MB" if r.get("weights_mb") is not None else ""),
    ]
    if r.get("warmup_memory"):
        rows += ["", f"warmup memory (8 frames: VAE encode of 16 images, 8-frame UNet pass; eager), as a process "
                     f"holding only that pipeline's models; fits: needs <= card - {OTHERS_MB} MB",
                 f"  {'size':10} {'dtype':9} {'vae':6} {'weights MB':>10} {'peak MB':>8} {'reserved':>9} "
                 f"{'context':>8} {'needs MB':>9}  fits"]
        for f in r["warmup_memory"]:
            rows.append(f"  {f['size']:10} {f['dtype']:9} {f['vae']:6} {_mb(f['weights_mb']):>10} {_mb(f['peak_mb']):>8} "
                        f"{_mb(f['reserved_peak_mb']):>9} {_mb(f['outside_allocator_mb']):>8} {_mb(f['needs_mb']):>9}  "
                        f"{_fits_text(f['fits'])}")
    if r["stream"]:
        rows += ["", "stream step alone (StreamPipeline.step)",
                 f"  {'mode':10} {'ran as':10} {'ms/frame':>9} {'fps':>8} {'first call s':>12} {'peak MB':>8}"]
        for mode, f in r["stream"].items():
            rows.append(f"  {mode:10} {f['effective']:10} {f['ms_per_frame']:9.2f} {f['fps']:8.2f} {f['first_call_s']:12.2f} {_mb(f['peak_mem_mb']):>8}")
        rows.append("  (first call: the calls until the stream runs as it will go on, the compile and a CUDA graph's capture included)")
    if r["pipeline"]:
        head = " ".join(f"{k:>8}" for k in STAGES)
        rows += ["", "frame pipeline (FramePipeline.push, MiDaS depth), mean ms per stage",
                 f"  {'vae':6} {'mode':10} {'ran as':10} {'fps':>7} {'ms/frame':>9} {head} {'first s':>8} {'peak MB':>8}"]
        for vae, per_mode in r["pipeline"].items():
            for mode, f in per_mode.items():
                stages = " ".join(f"{f['stages_ms'][k]:8.2f}" for k in STAGES)
                rows.append(f"  {vae:6} {mode:10} {f['effective']:10} {f['fps']:7.2f} {f['ms_per_frame']:9.2f} {stages} "
                            f"{f['first_call_s']:8.2f} {_mb(f['peak_mem_mb']):>8}")
    for line in r["skipped"]:
        rows.append(f"skipped: {line}")
    for line in r["errors"]:
        rows.append(f"failed: {line}")
    if r.get("interrupted"):
        rows.append("interrupted: the measurements after these did not run")
    over = " (a measurement started within the budget ran past it)" if r["elapsed_s"] > r["budget_s"] else ""
    rows.append(f"total {r['elapsed_s']:.0f} s of a {r['budget_s']:.0f} s budget{over}")
    return "\n".join(rows)


def write_json(r: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(r, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # whole or not at all, even when the slot ends mid-write
