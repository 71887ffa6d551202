"""``live2diff-engine bench-gpu``: where a frame's time goes on a GPU, per acceleration mode.

Built for one short slot on a machine without network: the models are full-size with random
weights (:mod:`.models.full_random`), so nothing is downloaded and the cost per frame is the real
one. For each acceleration mode it measures

* the stream step alone (``StreamPipeline.step`` on random latents): ms per frame and FPS;
* the whole frame pipeline (``FramePipeline.push`` of uint8 RGB frames at the model size, MiDaS
  depth) with TAESD and with the full VAE: FPS and the mean ms of each stage as
  ``FramePipeline(profile_stages=True)`` times them (upload, depth, encode: one VAE call for the
  frame and its depth map, unet: first-step noise and the stream step, decode, download), plus
  "other": the frame's wall time less its stages (host work: checks, fitting, Python);
* for each measurement: the first call after the warmup (it carries the compile or the CUDA-graph
  capture) and the peak GPU memory.

A global time budget stops it from overrunning the slot: a measurement that would start after the
budget is spent is skipped with a line that says so, and a timed loop stops early when it runs
out. Measurements go mode by mode, eager first. Progress goes to stderr; the table to stdout;
``--json`` writes every figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .bench import _Timer, machine_name

STAGES = ("upload", "depth", "encode", "unet", "decode", "download", "other")
MODES = ("off", "compile", "cudagraph")


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
    parts: list[str] = field(default_factory=lambda: ["stream", "pipeline"])


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


def _settle_calls(mode: str) -> int:
    # cudagraph: two real calls, then the capture; eager and compiled code settle after one call.
    return 3 if mode == "cudagraph" else 1


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
    from .models.components import Components

    if s.geometry == "tiny":
        from .models.components import build_tiny_components

        base = build_tiny_components(s.seed, device=s.device, dtype=s.dtype)
        vaes = {"full": base.vae, "taesd": torch.nn.Module.to(_tiny_taesd(), device=s.device, dtype=s.dtype).eval().requires_grad_(False)}
    else:
        from .models import full_random as fr

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
    from .pipeline.schedule import make_schedule

    return make_schedule(s.num_inference_steps, t_index_list=s.t_index_list)


def bench_stream_step(s: Settings, base, prompt: torch.Tensor, mode: str, budget: Budget) -> dict:
    from .pipeline.stream import StreamPipeline

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
    start = time.perf_counter()
    out = pipe.step(latents[0], latents[3])
    _sync(device)
    first_s = time.perf_counter() - start
    for i in range(1, 1 + _settle_calls(mode)):
        out = pipe.step(latents[i % 16], latents[(i + 3) % 16])
    timer = _Timer(device, s.frames)
    timer.mark(0)
    n = 0
    for i in range(s.frames):
        k = i + 4
        out = pipe.step(latents[k % 16], latents[(k + 3) % 16])
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
        "peak_mem_mb": _peak_mb(device),
        "finite": bool(torch.isfinite(out).all()),
    }


# -- the frame pipeline, stage by stage ----------------------------------------------------------


def _frame_source(s: Settings, count: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(s.seed)
    return [rng.integers(0, 256, (s.height, s.width, 3), dtype=np.uint8) for _ in range(count)]


def bench_frame_pipeline(s: Settings, comps, vae: str, mode: str, budget: Budget) -> dict:
    from .pipeline.frames import FramePipeline

    device = s.device
    frames = _frame_source(s)
    _reset_peak(device)
    start = time.perf_counter()
    fp = FramePipeline(
        comps, width=s.width, height=s.height, num_inference_steps=s.num_inference_steps,
        t_index_list=list(s.t_index_list), prompt="a portrait, watercolor", seed=s.seed, accelerate=mode,
        profile_stages=True,
    )
    i = 0
    while fp.warming_up:  # the sink frames come back as they went in; the last one runs the warmup
        fp.push(frames[i % len(frames)])
        i += 1
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    fp.push(frames[i % len(frames)])  # the first stream call (its output is still in flight)
    i += 1
    _sync(device)
    first_s = time.perf_counter() - start
    for _ in range(_settle_calls(mode)):
        fp.push(frames[i % len(frames)])
        i += 1
    fp.clear_stage_times()  # the settling frames are not counted
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
        "peak_mem_mb": _peak_mb(device),
        "finite": None if x0 is None else bool(torch.isfinite(x0).all()),
        "outputs": out is not None,
    }


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
    start = time.perf_counter()
    models = build_models(s)
    _sync(s.device)
    result["build_s"] = round(time.perf_counter() - start, 2)
    if s.device.type == "cuda":
        result["weights_mb"] = round(torch.cuda.memory_allocated(s.device) / 2**20, 1)
    say(f"models built in {result['build_s']:.1f} s")
    update(result)

    # Mode by mode, the cheap eager figures first: a slow compile can only cost the modes after it.
    # The first measurement of a mode carries its compile; the others reuse the compiled code.
    plan = []
    for m in modes:
        if "stream" in s.parts:
            plan.append(("stream", None, m))
        if "pipeline" in s.parts:
            plan += [("pipeline", v, m) for v in s.vaes]
    for part, vae, mode in plan:
        what = f"stream step ({mode})" if part == "stream" else f"frame pipeline ({vae} VAE, {mode})"
        if budget.spent():
            line = f"{what}: budget of {s.budget_s:.0f} s spent"
            say(f"skipping {line}")
            result["skipped"].append(line)
            continue
        say(f"measuring {what}; {budget.left():.0f} s of budget left")
        try:
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
        if s.device.type == "cuda":
            torch.cuda.empty_cache()


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
    mem = f" peak {f['peak_mem_mb']:.0f} MB" if f.get("peak_mem_mb") is not None else ""
    return f"{f['fps']:.2f} fps, {f['ms_per_frame']:.1f} ms/frame over {f['frames']} frames, first call {f['first_call_s']:.2f} s{mem}"


def _mb(value) -> str:
    return f"{value:.0f}" if value is not None else "-"


def table(r: dict) -> str:
    rows = [
        f"bench-gpu: {r['card']}; torch {r['torch']} (CUDA {r['cuda']}); {r['dtype']}",
        f"model: {r['geometry']} geometry, random weights; {r['size']}; t_index_list {','.join(map(str, r['t_index_list']))} "
        f"of {r['num_inference_steps']}; built in {r.get('build_s', 0):.1f} s"
        + (f"; weights {r['weights_mb']:.0f} MB" if r.get("weights_mb") is not None else ""),
    ]
    if r["stream"]:
        rows += ["", "stream step alone (StreamPipeline.step)",
                 f"  {'mode':10} {'ran as':10} {'ms/frame':>9} {'fps':>8} {'first call s':>12} {'peak MB':>8}"]
        for mode, f in r["stream"].items():
            rows.append(f"  {mode:10} {f['effective']:10} {f['ms_per_frame']:9.2f} {f['fps']:8.2f} {f['first_call_s']:12.2f} {_mb(f['peak_mem_mb']):>8}")
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
