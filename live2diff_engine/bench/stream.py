"""``live2diff-engine bench``: per-frame cost of the stream, short against long, in one run.

The KV-cache is preallocated and the bookkeeping is a fixed table, so a frame should cost the same
after 512 frames as after 32. This measures both in one process on the same model and reports the
ratio, with the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from ..pipeline.stream import StreamPipeline


@dataclass
class BenchResult:
    machine: str
    device: str
    dtype: str
    torch: str
    threads: int
    model: str
    latent: str
    steps: int
    per_frame_ms: dict[str, float]
    mean_ms: dict[str, float]
    ratio_long_to_short: float

    def table(self) -> str:
        rows = [f"machine: {self.machine}", f"device: {self.device}  dtype: {self.dtype}  torch {self.torch}  threads {self.threads}",
                f"model: {self.model}  latent {self.latent}  denoising steps {self.steps}"]
        for n, ms in self.per_frame_ms.items():
            rows.append(f"  {n:>5} frames: {ms:8.3f} ms/frame (median; mean {self.mean_ms[n]:.3f})")
        rows.append(f"  ratio of medians (longest / shortest): {self.ratio_long_to_short:.3f}")
        return "\n".join(rows)

    def json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}"


class _Timer:
    """Per-call wall time: CUDA events on a GPU (no sync inside the loop), perf_counter elsewhere."""

    def __init__(self, device: torch.device, n: int):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        else:
            self.stamps = [0.0] * (n + 1)

    def mark(self, i: int) -> None:
        if self.cuda:
            self.events[i].record()
        else:
            self.stamps[i] = time.perf_counter()

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self.stamps, self.stamps[1:])]


def _snapshot(pipe: StreamPipeline):
    return [t.clone() for t in pipe.state_tensors()], pipe.calls


def _restore(pipe: StreamPipeline, snap) -> None:
    saved, calls = snap
    for live, t in zip(pipe.state_tensors(), saved):
        live.copy_(t)
    pipe.calls = calls


def _timed_steps(pipe: StreamPipeline, latents: torch.Tensor, n: int, first: int) -> list[float]:
    """ms of each of ``n`` stream calls fed from the cycling ``latents`` starting at frame ``first``."""
    timer = _Timer(pipe.device, n)
    timer.mark(0)
    for i in range(n):
        k = first + i
        pipe.step(latents[k % 16], latents[(k + 3) % 16])
        timer.mark(i + 1)
    return timer.durations_ms()


def bench_stream(pipe: StreamPipeline, warmup_latents, warmup_depth, frame_counts=(32, 512), progress=None, segments: int = 8) -> dict[str, dict[str, float]]:
    """Median and mean ms per frame for streams of each length, measured interleaved in time.

    The longest stream runs in ``segments`` parts; before each part its state is set aside, every
    shorter stream runs once from a fresh warmup, and the long stream resumes where it was. Drift
    in the machine's speed (other tenants, clocks) then lands on all lengths alike, and the median
    keeps bursts out of the figures."""
    device = pipe.device
    h, w = pipe.height, pipe.width
    g = torch.Generator(device="cpu").manual_seed(1234)
    latents = torch.randn(16, 1, 4, h, w, generator=g).to(device=device, dtype=pipe.dtype)
    counts = sorted(set(frame_counts))
    longest, shorter = counts[-1], counts[:-1]
    segments = max(1, min(segments, longest))
    durations: dict[int, list[float]] = {c: [] for c in counts}

    def run(n: int, first: int, label: int) -> None:
        durations[label] += _timed_steps(pipe, latents, n, first)

    def settle() -> None:  # allocator and kernels; not timed
        for i in range(4):
            pipe.step(latents[i % 16], latents[(i + 3) % 16])

    pipe.prepare(warmup_latents, warmup_depth)
    settle()
    done = 0
    for seg in range(segments):
        snap = _snapshot(pipe)
        for n in shorter:
            pipe.prepare(warmup_latents, warmup_depth)
            settle()
            run(n, 0, n)
        _restore(pipe, snap)
        part = (longest - done) // (segments - seg)
        run(part, done, longest)
        done += part
        if progress is not None:
            progress(longest, done)
    results: dict[str, dict[str, float]] = {}
    for n in counts:
        ordered = sorted(durations[n])
        results[str(n)] = {"median": ordered[len(ordered) // 2], "mean": sum(ordered) / len(ordered)}
    return results


def bench_modes(make_pipe, warmup_latents, warmup_depth, modes: list[str], frames: int, progress=None, segments: int = 8) -> dict[str, dict[str, float]]:
    """Median and mean ms per frame of the same stream under each acceleration mode, interleaved
    (or under any other variants ``make_pipe`` builds by name: with and without a style picture).

    ``make_pipe(mode)`` builds a stream on the shared UNet. The UNet holds one KV-cache, so each
    mode's stream state is set aside between its segments and put back (copied into the same
    buffers, so a captured CUDA graph stays valid). Before timing, each mode makes a few untimed
    calls: the first one compiles (its time is reported as ``first_call_s``). Segments alternate
    between modes so drift in the machine's speed lands on all of them."""
    pipes = {m: make_pipe(m) for m in modes}
    device = next(iter(pipes.values())).device
    first = next(iter(pipes.values()))
    g = torch.Generator(device="cpu").manual_seed(1234)
    latents = torch.randn(16, 1, 4, first.height, first.width, generator=g).to(device=device, dtype=first.dtype)
    durations: dict[str, list[float]] = {m: [] for m in modes}
    first_call: dict[str, float] = {}
    states = {}
    for m, pipe in pipes.items():
        pipe.prepare(warmup_latents, warmup_depth)
        for i in range(4):
            start = time.perf_counter()
            pipe.step(latents[i % 16], latents[(i + 3) % 16])
            if i == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first_call[m] = time.perf_counter() - start
        states[m] = _snapshot(pipe)
    segments = max(1, min(segments, frames))
    done = 0
    for seg in range(segments):
        part = (frames - done) // (segments - seg)
        for m, pipe in pipes.items():
            _restore(pipe, states[m])
            durations[m] += _timed_steps(pipe, latents, part, done)
            states[m] = _snapshot(pipe)
        done += part
        if progress is not None:
            progress(frames, done)
    results = {}
    for m in modes:
        ordered = sorted(durations[m])
        results[m] = {"median": ordered[len(ordered) // 2], "mean": sum(ordered) / len(ordered),
                      "first_call_s": first_call[m], "in_use": pipes[m].accelerated}
        checks = pipes[m].accelerator.checks if pipes[m].accelerated != "off" else []
        if checks:  # the first compiled call's check against eager (part of first_call_s)
            results[m]["check_s"] = sum(c["seconds"] for c in checks)
            results[m]["check_error"] = max(c["error"] for c in checks)
    return results


def bench_style_switch(manager, frames, names: list[str], rounds: int, feed) -> dict[str, float]:
    """Median seconds to switch to each style (weights swapped, text re-encoded), alternating
    through ``names`` ``rounds`` times with a frame pushed after every switch."""
    timings: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            manager.apply(name, frames)
            timings[name].append(time.perf_counter() - start)
            frames.push(feed())
    return {n: sorted(t)[len(t) // 2] for n, t in timings.items()}


def _cycled(frames: list, count: int):
    """A source of ``count`` frames cycling through ``frames`` (not live: read as fast as asked)."""
    from ..io.sources import Source, SourceEnded

    class Frames(Source):
        name = "frames"

        def __init__(self):
            self.i = 0

        def read(self):
            if self.i >= count:
                raise SourceEnded
            self.i += 1
            return frames[(self.i - 1) % len(frames)]

    return Frames()


def bench_engine(make_pipeline, frames: list, count: int, rounds: int = 2, sinks_factory=None) -> dict[str, float]:
    """Frames per second of the bare frame-pipeline loop and of the engine on the same frames.

    Rounds alternate (bare, engine, bare, engine, ...) so drift in the machine's speed lands on
    both; each round uses a fresh pipeline (same seed) and the median round is reported."""
    from ..engine import Engine
    from ..io.sinks import NullSink

    bare, engine = [], []
    for _ in range(rounds):
        pipe = make_pipeline()
        start = time.perf_counter()
        for i in range(count):
            pipe.push(frames[i % len(frames)])
        pipe.flush()
        bare.append(count / (time.perf_counter() - start))

        pipe = make_pipeline()
        sinks = sinks_factory() if sinks_factory else [NullSink()]
        size = (frames[0].shape[1], frames[0].shape[0])
        for s in sinks:
            s.open(size[0], size[1], 30.0)
        run = Engine(pipe, _cycled(frames, count), sinks, output_size=size, status=False)
        start = time.perf_counter()
        run.run(install_signals=False)
        engine.append(count / (time.perf_counter() - start))
    b, e = sorted(bare)[len(bare) // 2], sorted(engine)[len(engine) // 2]
    return {"bare_fps": b, "engine_fps": e, "overhead": b / e - 1.0}


VIEWER = r"""
import sys, threading, urllib.request, websocket
url = sys.argv[1]
def status():
    ws = websocket.create_connection(url.replace("http", "ws", 1) + "/api/ws")
    while True:
        ws.recv()
threading.Thread(target=status, daemon=True).start()
stream = urllib.request.urlopen(url + "/stream.mjpg")
while stream.read(65536):
    pass
"""


def bench_control(make_pipeline, manager, frames: list, count: int, rounds: int = 2) -> dict[str, float]:
    """Frames per second of the engine alone and of the engine with its control plane busy: the
    local API, an MJPEG viewer and a dock's status WebSocket (in a process of their own, as OBS
    and a browser are). Rounds alternate; the median is reported."""
    import subprocess
    import sys

    from ..control.api import ApiServer
    from ..control.controller import Controller
    from ..engine import Engine
    from ..io.sinks import NullSink

    size = (frames[0].shape[1], frames[0].shape[0])
    api = ApiServer("127.0.0.1", 0).start()
    viewer = subprocess.Popen([sys.executable, "-c", VIEWER, api.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plain, controlled = [], []
    try:
        for _ in range(rounds):
            pipe = make_pipeline()
            start = time.perf_counter()
            Engine(pipe, _cycled(frames, count), [NullSink()], output_size=size, status=False).run(install_signals=False)
            plain.append(count / (time.perf_counter() - start))

            pipe = make_pipeline()
            controller = Controller(pipe, manager, label="bench")
            api.set_controller(controller)
            start = time.perf_counter()
            Engine(pipe, _cycled(frames, count), [NullSink(), api.stream], output_size=size, status=False,
                   controller=controller).run(install_signals=False)
            controlled.append(count / (time.perf_counter() - start))
        served = api.frames_served
    finally:
        viewer.kill()
        viewer.wait(10)
        api.stop()
    p, c = sorted(plain)[len(plain) // 2], sorted(controlled)[len(controlled) // 2]
    return {"engine_fps": p, "control_fps": c, "overhead": p / c - 1.0, "frames_served": served}


IMAGE_VARIANTS = ("none", "picture")


def bench_image(unet, make_pipe, warmup_latents, warmup_depth, frames: int, progress=None) -> dict:
    """Per-frame cost of a style picture (IP-Adapter): ``none`` (the UNet as it is) against
    ``picture`` (a copy of it with a random IP-Adapter of the released layout attached and a
    picture's image tokens in the stream, scale 1), interleaved as :func:`bench_modes` does; plus
    ``encode_ms``, the image encoder's time for one picture, which runs once per picture beside the
    stream (a random image encoder: the tiny one, or ViT-H/14's geometry for full-size models), and
    ``swap_ms``, what a new picture costs between two frames (its image tokens into the buffer).
    ``make_pipe(unet)`` builds a stream on a UNet. An adapter loaded with no picture (scale 0) runs
    the same operations as with one, so it costs what ``picture`` costs."""
    import copy

    from ..models.ip_adapter import attach_ip_adapter, encode_picture, image_embed_dim, image_tokens
    from ..models.tiny import build_tiny_image_encoder, tiny_ip_adapter

    full = unet.config.cross_attention_dim == 768
    dim = 1024 if full else None
    adapted = copy.deepcopy(unet)
    attach_ip_adapter(adapted, tiny_ip_adapter(adapted, seed=7, **({"image_dim": dim} if dim else {})))
    if full:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=1024)  # h94/IP-Adapter's image encoder
        encoder = CLIPVisionModelWithProjection(cfg).eval()
    else:
        encoder = build_tiny_image_encoder(seed=8)
    encoder.to(device=unet.device, dtype=unet.dtype)
    g = torch.Generator().manual_seed(9)
    rgb = (torch.rand(480, 640, 3, generator=g) * 255).to(torch.uint8).numpy()
    times = []
    for _ in range(5 if full else 20):
        timer = _Timer(unet.device, 1)
        timer.mark(0)
        embeds = encode_picture(encoder, rgb)
        timer.mark(1)
        times += timer.durations_ms()
    del encoder
    tokens = image_tokens(adapted, embeds.reshape(1, image_embed_dim(adapted)))[0]

    def make(kind):
        if kind == "none":
            return make_pipe(unet)
        pipe = make_pipe(adapted)
        pipe.set_image_tokens(tokens)
        return pipe

    pipes = {}
    figures = bench_modes(lambda kind: pipes.setdefault(kind, make(kind)), warmup_latents, warmup_depth,
                          list(IMAGE_VARIANTS), frames, progress=progress)
    figures["encode_ms"] = sorted(times)[len(times) // 2]
    # what a new picture costs between two frames: its image tokens, written into the stream's buffer
    timer = _Timer(unet.device, 20)
    timer.mark(0)
    for i in range(20):
        pipes["picture"].set_image_tokens(image_tokens(adapted, embeds.reshape(1, -1))[0])
        timer.mark(i + 1)
    swaps = sorted(timer.durations_ms())
    figures["swap_ms"] = swaps[len(swaps) // 2]
    return figures


TEXT_VARIANTS = ("steady", "blend", "transition")


def bench_text(pipe: StreamPipeline, warmup_latents, warmup_depth, prompt: torch.Tensor, other: torch.Tensor,
               variants=TEXT_VARIANTS, frames: int = 128, segments: int = 8, progress=None) -> dict[str, dict[str, float]]:
    """Median and mean ms per frame of one stream under each kind of text conditioning, interleaved
    in ``segments`` parts: ``steady`` (one prompt), ``blend`` (an even mix of two prompts' embeddings,
    set once) and ``transition`` (a transition under way on every timed frame: a new one, far from
    its end, is started before each part). Plus ``text_update_ms``: the per-frame write a transition
    adds (the eased lerp into the text buffer), alone, at this model's text size and at SD1.5's
    (``[2, 77, 768]``), on the stream's device."""
    bad = [v for v in variants if v not in TEXT_VARIANTS]
    if bad:
        raise ValueError(f"unknown text variant(s) {', '.join(bad)}; use {', '.join(TEXT_VARIANTS)}")
    device = pipe.device
    h, w = pipe.height, pipe.width
    g = torch.Generator(device="cpu").manual_seed(1234)
    latents = torch.randn(16, 1, 4, h, w, generator=g).to(device=device, dtype=pipe.dtype)
    blend = (0.5 * prompt.float() + 0.5 * other.float()).to(prompt.dtype)
    durations: dict[str, list[float]] = {v: [] for v in variants}
    pipe.set_prompt_embeds(prompt)
    pipe.prepare(warmup_latents, warmup_depth)
    for i in range(4):  # settle; not timed
        pipe.step(latents[i % 16], latents[(i + 3) % 16])
    per_part = max(1, frames // segments)
    done = 0
    for seg in range(segments):
        for v in variants:
            if v == "steady":
                pipe.set_prompt_embeds(prompt)
            elif v == "blend":
                pipe.set_prompt_embeds(blend)
            else:
                pipe.set_prompt_embeds(other if seg % 2 == 0 else prompt, frames=10 * frames)  # never ends while timed
            durations[v] += _timed_steps(pipe, latents, per_part, done)
        done += per_part
        if progress is not None:
            progress(frames, done)
    results: dict[str, dict[str, float]] = {}
    for v in variants:
        ordered = sorted(durations[v])
        results[v] = {"median": ordered[len(ordered) // 2], "mean": sum(ordered) / len(ordered)}
    results["text_update_ms"] = {
        "this model": _lerp_ms(pipe._text.shape, device, pipe.dtype),
        "sd15": _lerp_ms((2, 77, 768), device, pipe.dtype),
    }
    return results


def _lerp_ms(shape, device, dtype, n: int = 200) -> float:
    """Median ms of the eased lerp a transition writes per frame, into a buffer of ``shape``."""
    start = torch.randn(1, *shape[1:], device=device, dtype=dtype)
    end = torch.randn(1, *shape[1:], device=device, dtype=dtype)
    out = torch.empty(shape, device=device, dtype=dtype)
    timer = _Timer(device, n)
    timer.mark(0)
    for i in range(n):
        torch.lerp(start.expand(shape), end.expand(shape), (i + 1) / (n + 1), out=out)
        timer.mark(i + 1)
    ordered = sorted(timer.durations_ms())
    return ordered[len(ordered) // 2]
