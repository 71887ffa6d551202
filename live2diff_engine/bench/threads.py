"""``live2diff-engine bench-threads``: per-frame time of the frame pipeline for several torch
thread counts, beside busy processes, in one run.

Each measurement runs in a process of its own, started with ``OMP_NUM_THREADS`` set to its count:
an OpenMP pool that has run with more threads does not always behave like a fresh smaller one, so
one process per choice keeps the choices apart. Choices and rounds are interleaved (1, 2, auto,
then 2, auto, 1, ...) so that a change in the machine's load lands on all of them. The busy
processes (``--hogs``) are started first and run until the end: the loaded machine a streamer's PC
is while it encodes. What counts is the worst frame as much as the median: on a busy machine
OpenMP threads wait at every barrier for a core another process holds, and single frames stall
for seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

HOG = "while True: pass"


def threads_worker() -> None:
    """In the measuring process: the parsed options (pickled) on stdin, a JSON line on stdout."""
    args = pickle.loads(sys.stdin.buffer.read())
    from ..assemble import build_frame_pipeline
    from ..io.sources import SyntheticSource

    comps, frames, manager, style = build_frame_pipeline(args, say=lambda line: None)
    src = SyntheticSource(args.input_size, 30.0, args.seed)
    pool = [src.read() for _ in range(32)]
    for i in range(frames.sink + 4):  # warmup and the first stream frames: not timed
        frames.push(pool[i % len(pool)])
    times = []
    for i in range(args.frames):
        start = time.perf_counter()
        frames.push(pool[i % len(pool)])
        times.append((time.perf_counter() - start) * 1000)
    import torch

    print(json.dumps({"threads": torch.get_num_threads(), "ms": times}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # the figures are out; the interpreter's teardown is not part of the measurement


def _summary(ms: list[float]) -> dict:
    s = sorted(ms)
    med = s[len(s) // 2]
    return {
        "frames": len(s),
        "median_ms": round(med, 2),
        "p90_ms": round(s[min(len(s) - 1, int(len(s) * 0.9))], 2),
        "worst_ms": round(s[-1], 2),
        "mean_ms": round(sum(s) / len(s), 2),
        "over_10x_median": sum(1 for v in s if v > 10 * med),
    }


def bench_threads(args, choices: list[int | None], auto: int, progress=None) -> dict:
    """Interleaved per-frame figures for each choice (None = the engine's automatic choice,
    ``auto`` threads). ``args``: the parsed model options, with ``frames``, ``rounds``, ``hogs``
    and ``input_size``."""
    labels = [f"auto ({auto})" if c is None else str(c) for c in choices]
    counts = [auto if c is None else c for c in choices]
    per: dict[str, list[float]] = {label: [] for label in labels}
    used: dict[str, int] = {}  # the thread count each measuring process reported
    failures: dict[str, str] = {}
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    try:
        for r in range(args.rounds):
            order = list(range(len(choices)))
            order = order[r % len(order):] + order[: r % len(order)]
            for i in order:
                label, n = labels[i], counts[i]
                if progress:
                    progress(f"round {r + 1}/{args.rounds}: threads {label}")
                worker_args = pickle.dumps(_with(args, threads=n))
                env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
                done = subprocess.run(
                    [sys.executable, "-c", "from live2diff_engine.bench.threads import threads_worker; threads_worker()"],
                    input=worker_args, capture_output=True, env=env,
                )
                lines = done.stdout.decode(errors="replace").strip().splitlines()
                if done.returncode != 0 or not lines:
                    failures[label] = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
                    continue
                got = json.loads(lines[-1])
                per[label] += got["ms"]
                used[label] = got["threads"]
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return {"choices": {label: {"threads": used[label], **_summary(ms)} for label, ms in per.items() if ms}, "failures": failures,
            "per_frame_ms": per}


def _with(args, **changes):
    import copy

    a = copy.copy(args)
    for k, v in changes.items():
        setattr(a, k, v)
    return a


def table(result: dict, head: list[str]) -> str:
    rows = list(head)
    rows.append(f"  {'threads':>9}  {'frames':>6}  {'median':>9}  {'p90':>9}  {'worst':>9}  {'mean':>9}  frames over 10x median")
    for label, f in result["choices"].items():
        rows.append(f"  {label:>9}  {f['frames']:6d}  {f['median_ms']:7.1f}ms  {f['p90_ms']:7.1f}ms  {f['worst_ms']:7.1f}ms  "
                    f"{f['mean_ms']:7.1f}ms  {f['over_10x_median']}")
    for label, why in result["failures"].items():
        rows.append(f"  {label:>9}  failed: {why}")
    return "\n".join(rows)
