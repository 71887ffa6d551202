"""``live2diff-engine check-accelerate``: every accelerated stream step against eager.

A compiler can be wrong for one step count and right for another (torch 2.13's inductor was, for
3 and more steps: BENCHMARKS.md). So the accelerated paths are judged against eager for each
setting a user can choose, here on the device they will run on: for each denoising step count,
dtype and guidance scale, one stream of ``calls`` frames (past the cache window's wrap, with a
prompt change half-way) runs eagerly, then once per acceleration mode with the same inputs and
noise. Reported per case: the largest relative L2 error of any frame (``||acc - eager|| /
||eager||``, the measure the engine's own first-call check uses), the same over the whole stream,
the mode actually in use at the end (a fallback is a failure), the engine's first-call check, and
the first call's time (the compile or the capture).

Built for one short slot on a GPU machine without network: full-size models with random weights
(``--geometry full``, nothing downloaded; the cost is the real one), a time budget after which the
remaining cases are skipped with a line that says so, and cases in the order given (put the step
counts that matter most first). ``--geometry tiny --device cpu`` rehearses it anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field

import torch

from ..pipeline.accelerate import CHECK_TOLERANCE, exact_float32, relative_error

T_INDEX = {1: [45], 2: [32, 45], 3: [18, 30, 42], 4: [10, 25, 35, 45]}


@dataclass
class Settings:
    device: torch.device
    dtypes: list[torch.dtype]
    steps: list[int] = field(default_factory=lambda: [3, 4, 1, 2])
    modes: list[str] = field(default_factory=lambda: ["compile", "cudagraph"])
    guidance: list[float] = field(default_factory=lambda: [1.0])
    geometry: str = "full"  # full | tiny
    width: int = 512
    height: int = 512
    calls: int = 12
    budget_s: float = 300.0
    seed: int = 0
    accelerator_options: dict = field(default_factory=dict)  # tests: a compiler backend, emulated graphs
    unet: object = None  # tests: a UNet of their own instead of building one (its dtype only)


def say(text: str) -> None:
    print(f"[check-accelerate {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _build_unet(s: Settings, dtype: torch.dtype):
    if s.unet is not None:
        return s.unet
    if s.geometry == "tiny":
        from ..models.tiny import build_tiny_unet

        return build_tiny_unet(s.seed, device=s.device, dtype=dtype)
    from ..models import full_random as fr

    say(f"building the full-size streaming UNet in {str(dtype).replace('torch.', '')} (random weights)")
    return fr.build_full_unet(s.device, dtype, s.seed)


def _stream(s: Settings, unet, steps: int, guidance: float, mode: str) -> tuple[torch.Tensor, object, float]:
    """One stream: the finished latents of every call, the pipeline, the first call's seconds."""
    from ..pipeline.schedule import make_schedule
    from ..pipeline.stream import StreamPipeline

    dev, dt = s.device, unet.dtype
    h, w = s.height // 8, s.width // 8
    g = torch.Generator().manual_seed(s.seed + 17 * steps)
    dim = unet.config.cross_attention_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dt)

    warm_x, warm_d = rand(8, 4, h, w), rand(8, 4, h, w)
    warm_noise = [rand(8, 4, h, w) for _ in range(steps - 1)]
    frames, depths = rand(s.calls, 1, 4, h, w), rand(s.calls, 1, 4, h, w)
    noise = rand(s.calls, max(steps - 1, 0), 4, h, w)
    prompts, negative = rand(2, 1, 77, dim), rand(1, 77, dim)
    options = dict(s.accelerator_options) if mode != "off" else {}
    pipe = StreamPipeline(unet, make_schedule(50, t_index_list=T_INDEX[steps]), (h, w), guidance_scale=guidance,
                          accelerate=mode, accelerator_options=options or None)
    pipe.set_prompt_embeds(prompts[0])
    if guidance > 1:
        pipe.set_negative_embeds(negative)
    pipe.prepare(warm_x, warm_d, noise=warm_noise)
    out, first = [], 0.0
    for i in range(s.calls):
        if i == s.calls // 2:
            pipe.set_prompt_embeds(prompts[1])
        start = time.perf_counter()
        out.append(pipe.step(frames[i], depths[i], noise[i] if steps > 1 else None).clone())
        if i == 0:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            first = time.perf_counter() - start
    return torch.cat(out), pipe, first


def _cases(s: Settings, unet, steps: int, dtype: torch.dtype, guidance: float, label: str, start: float, result: dict) -> None:
    """One stream eagerly, then in each mode, compared frame by frame."""
    say(f"{label}: eager")
    eager, _, eager_first = _stream(s, unet, steps, guidance, "off")
    for mode in s.modes:
        if time.perf_counter() - start > s.budget_s:
            result["skipped"].append(f"{label} {mode}")
            say(f"budget spent: {label} {mode} skipped")
            continue
        say(f"{label}: {mode}")
        got, pipe, first = _stream(s, unet, steps, guidance, mode)
        err = max(relative_error([got[i]], [eager[i]]) for i in range(s.calls))
        tol = CHECK_TOLERANCE.get(dtype, 5e-2)
        checks = pipe.accelerator.checks
        case = {
            "dtype": str(dtype).replace("torch.", ""), "steps": steps, "guidance": guidance, "mode": mode,
            "in_use": pipe.accelerated, "worst_frame_error": err, "stream_error": relative_error([got], [eager]),
            "tolerance": tol, "finite": bool(torch.isfinite(got).all()),
            "first_call_s": round(first, 3), "eager_first_call_s": round(eager_first, 3),
            "engine_checks": [dict(c) for c in checks[-2:]],
        }
        case["ok"] = case["in_use"] == mode and err <= tol and case["finite"]
        result["cases"].append(case)
        say(_line(case))


def run(s: Settings) -> dict:
    start = time.perf_counter()
    result = {"device": str(s.device), "geometry": s.geometry, "size": [s.width, s.height], "calls": s.calls,
              "cases": [], "skipped": [], "interrupted": False}
    if s.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(s.device)
    unets: dict = {}
    noted = False
    try:
        for steps in s.steps:
            for dtype in s.dtypes:
                for guidance in s.guidance:
                    label = f"{str(dtype).replace('torch.', '')} {steps} step{'s' if steps > 1 else ''}" + \
                        (f" guidance {guidance:g}" if guidance > 1 else "")
                    if time.perf_counter() - start > s.budget_s:
                        result["skipped"].append(label)
                        say(f"budget spent: {label} skipped")
                        continue
                    if dtype not in unets:
                        unets[dtype] = _build_unet(s, dtype)
                    unet = unets[dtype]
                    tf32 = exact_float32(s.device, dtype, None if noted else say)  # float32 on a GPU: TF32 off
                    noted = noted or (s.device.type == "cuda" and dtype in (torch.float32, torch.float64))
                    with tf32:
                        _cases(s, unet, steps, dtype, guidance, label, start, result)
    except KeyboardInterrupt:
        result["interrupted"] = True
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _line(c: dict) -> str:
    what = f"{c['dtype']:>8} {c['steps']} step{'s' if c['steps'] > 1 else ' '}" + (f" cfg {c['guidance']:g}" if c["guidance"] > 1 else "")
    verdict = "ok" if c["ok"] else ("FELL BACK to " + c["in_use"] if c["in_use"] != c["mode"] else "MISMATCH")
    return (f"{what}  {c['mode']:<9}  worst frame rel err {c['worst_frame_error']:.1e}  stream {c['stream_error']:.1e}  "
            f"(tolerance {c['tolerance']:g})  first call {c['first_call_s']:.1f} s  {verdict}")


def table(r: dict) -> str:
    head = f"check-accelerate: {r.get('gpu', r['device'])}, {r['geometry']} geometry {r['size'][0]}x{r['size'][1]}, {r['calls']} calls a stream"
    lines = [head] + [_line(c) for c in r["cases"]]
    if r["skipped"]:
        lines.append(f"skipped (budget spent): {', '.join(r['skipped'])}")
    bad = [c for c in r["cases"] if not c["ok"]]
    lines.append(f"{len(r['cases']) - len(bad)}/{len(r['cases'])} accelerated streams match eager"
                 + (" (interrupted)" if r["interrupted"] else ""))
    return "\n".join(lines)


def write_json(r: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r, f, indent=1)
        f.write("\n")
