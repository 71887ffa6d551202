"""Inductor's compiled stream step against eager, across what a user can choose.

Run by tests/test_compiled_matrix.py in a process of its own (ATEN_CPU_CAPABILITY, read while torch
imports, makes inductor write plain C++ loops: the same lowering, a third less compile time), or by
hand: ``python tests/compiled_matrix.py OUT.json [CASE ...]`` (cases by name, default all).

Each case is one stream on the two-level test UNet whose motion modules and depth branch are drawn
as the golden fixtures draw them (so a wrong depth row or cache slot shows), streamed eagerly and
then compiled with inductor, frame by frame with the same inputs and noise: past the cache window's
wrap, with a prompt change and a style switch (every UNet weight rebound to another set of the same
shapes, as a style switch does) mid-stream. A case passes when every frame matches eager at the
golden fixtures' float32 tolerance and the stream stayed compiled (the engine's own check against
eager at the first compiled call would otherwise have fallen back, and eager frames would match).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from conftest import build_mini_unet  # noqa: E402
from live2diff_engine.models.tiny import tiny_prompt_embeds  # noqa: E402
from live2diff_engine.pipeline.schedule import make_schedule  # noqa: E402
from live2diff_engine.pipeline.stream import StreamPipeline  # noqa: E402

RTOL, ATOL = 1e-3, 1e-4  # the golden fixtures' float32 tolerance
T_INDEX = {1: [45], 2: [32, 45], 3: [18, 30, 42], 4: [10, 25, 35, 45]}
# name: (steps, guidance scale, latent size). Every step count with and without guidance; odd
# latent sizes (the downsampler rounds up, the upsampler goes back to the skip's size) on some.
CASES = {
    "t1": (1, 1.0, (8, 8)),
    "t1-cfg-odd": (1, 2.5, (7, 5)),
    "t2-odd": (2, 1.0, (7, 5)),
    "t2-cfg": (2, 2.5, (8, 8)),
    "t3": (3, 1.0, (8, 8)),
    "t3-cfg-odd": (3, 2.5, (7, 5)),
    "t4-odd": (4, 1.0, (7, 5)),
    "t4-cfg": (4, 2.5, (8, 8)),
}
CALLS = 24  # the window (16) minus the sink (8) is 8: every row wraps twice or more
PROMPT_AT, STYLE_AT = 9, 15


def stream(unet, other_weights, steps, guidance, size, mode):
    h, w = size
    g = torch.Generator().manual_seed(100 * steps + h)
    warm_x, warm_d = torch.randn(8, 4, h, w, generator=g), torch.randn(8, 4, h, w, generator=g)
    warm_noise = [torch.randn(8, 4, h, w, generator=g) for _ in range(steps - 1)]
    frames, depths = torch.randn(CALLS, 1, 4, h, w, generator=g), torch.randn(CALLS, 1, 4, h, w, generator=g)
    noise = torch.randn(CALLS, max(steps - 1, 0), 4, h, w, generator=g)
    pipe = StreamPipeline(unet, make_schedule(50, t_index_list=T_INDEX[steps]), (h, w), guidance_scale=guidance,
                          accelerate=mode)
    pipe.set_prompt_embeds(tiny_prompt_embeds(0))
    if guidance > 1:
        pipe.set_negative_embeds(tiny_prompt_embeds(5))
    pipe.precompile()  # as the frame pipeline does while loading
    pipe.prepare(warm_x, warm_d, noise=warm_noise)
    base = [p.data for p in unet.parameters()]
    out = []
    try:
        for i in range(CALLS):
            if i == PROMPT_AT:
                pipe.set_prompt_embeds(tiny_prompt_embeds(9))
            if i == STYLE_AT:  # a style switch: every weight rebound to a tensor of the same shape
                for p, q in zip(unet.parameters(), other_weights):
                    p.data = q
                unet.refresh_positions()
            out.append(pipe.step(frames[i], depths[i], noise[i] if steps > 1 else None).clone())
    finally:
        for p, q in zip(unet.parameters(), base):
            p.data = q
        unet.refresh_positions()
    return torch.cat(out), pipe


def run_case(name, unet, other_weights):
    steps, guidance, size = CASES[name]
    eager, _ = stream(unet, other_weights, steps, guidance, size, "off")
    start = time.perf_counter()
    compiled, pipe = stream(unet, other_weights, steps, guidance, size, "compile")
    took = time.perf_counter() - start
    err = (compiled - eager).abs()
    bad = err > ATOL + RTOL * eager.abs()
    frames_ok = [not bool(bad[i].any()) for i in range(CALLS)]
    return {
        "case": name, "steps": steps, "guidance": guidance, "latent": list(size),
        "frames_match": sum(frames_ok), "frames": CALLS, "first_mismatch": frames_ok.index(False) if False in frames_ok else None,
        "max_abs_err": float(err.max()), "value_range": float(eager.abs().max()),
        "mode_in_use": pipe.accelerated, "checks": getattr(pipe.accelerator, "checks", [])[-1:], "seconds": round(took, 1),
    }


def main(argv):
    out_path = Path(argv[0])
    names = argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    unet = build_mini_unet(extras_like_the_fixtures=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = [p.data + 0.05 * torch.randn_like(p.data) for p in unet.parameters()]  # a second style's weights
    results = []
    for name in names:
        results.append(run_case(name, unet, other))
        print(json.dumps(results[-1]), flush=True)
        out_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
