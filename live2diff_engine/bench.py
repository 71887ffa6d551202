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

from .pipeline.stream import StreamPipeline


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
    ratio_long_to_short: float

    def table(self) -> str:
        rows = [f"machine: {self.machine}", f"device: {self.device}  dtype: {self.dtype}  torch {self.torch}  threads {self.threads}",
                f"model: {self.model}  latent {self.latent}  denoising steps {self.steps}"]
        for n, ms in self.per_frame_ms.items():
            rows.append(f"  {n:>5} frames: {ms:8.3f} ms/frame")
        rows.append(f"  ratio (longest / shortest): {self.ratio_long_to_short:.3f}")
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_stream(pipe: StreamPipeline, warmup_latents, warmup_depth, frame_counts=(32, 512), progress=None) -> dict[str, float]:
    """Run one stream per count (after a fresh warmup each) and return ms per frame for each."""
    device = pipe.device
    h, w = pipe.height, pipe.width
    g = torch.Generator(device="cpu").manual_seed(1234)
    latents = torch.randn(16, 1, 4, h, w, generator=g).to(device=device, dtype=pipe.dtype)
    results: dict[str, float] = {}
    for count in frame_counts:
        # Short streams are repeated (median taken) so that both figures rest on enough frames.
        timings = []
        for _ in range(max(1, 128 // count)):
            pipe.prepare(warmup_latents, warmup_depth)
            for i in range(4):  # settle allocator and kernels; not timed
                pipe.step(latents[i % 16], latents[(i + 3) % 16])
            _sync(device)
            start = time.perf_counter()
            for i in range(count):
                pipe.step(latents[i % 16], latents[(i + 3) % 16])
                if progress is not None and (i + 1) % 64 == 0:
                    progress(count, i + 1)
            _sync(device)
            timings.append((time.perf_counter() - start) * 1000.0 / count)
        results[str(count)] = sorted(timings)[len(timings) // 2]
    return results
