"""How many threads torch uses for its own work, chosen for the machine the engine runs on.

torch's default is one intra-op thread per physical core. On a machine that does other work too
(a streaming PC encoding video, OBS, a browser) that is too many: OpenMP threads spin and then wait
at every barrier for the slowest of them, and one that another process pushed off its core holds
all the others. On a busy 2-core machine single frames of the tiny model stalled for seconds with
two threads and ran steadily with one (BENCHMARKS.md, "Torch threads beside a CPU hog").

The choice: ``--threads N`` when given; else ``OMP_NUM_THREADS`` when set (the user's own choice);
else one fewer than the CPUs this process may use (at least 1, at most torch's own default) when
the model runs on the CPU, and at most 2 when it runs on a GPU, where the CPU only prepares
frames and launches kernels.
"""

from __future__ import annotations

import os
from typing import Callable

from .errors import ConfigError

GPU_THREADS = 2  # the CPU side of a GPU run: resizing, colour conversion, the Python launch loop


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_threads(text: str) -> int | None:
    """``--threads`` value: a positive number, or ``auto`` (None)."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--threads takes a positive number or auto, got {text!r}") from None
    if n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    return n


def threads_arg(text: str) -> int | None:
    """argparse type for ``--threads``."""
    import argparse

    try:
        return parse_threads(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--threads ", "", 1)) from None


def add_threads_arg(parser) -> None:
    """``--threads`` for a command that runs a model (an argparse parser or argument group)."""
    parser.add_argument("--threads", type=threads_arg, default=None, metavar="N",
                        help="torch's CPU threads (default auto: one fewer than the CPUs with the model on the CPU, "
                        "at most 2 with it on a GPU; OMP_NUM_THREADS, when set, is kept)")


def choose_threads(device_type: str, requested: int | None = None, *, cpus: int | None = None,
                   torch_default: int | None = None, env: dict | None = None) -> tuple[int, str]:
    """(thread count, why) for a model on ``device_type`` ("cpu", "cuda", "mps")."""
    cpus = cpus or usable_cpus()
    if requested is not None:
        return requested, "--threads"
    env = os.environ if env is None else env
    given = (env.get("OMP_NUM_THREADS") or "").strip()
    if given:
        try:
            n = int(given.split(",")[0])
            if n >= 1:
                return n, "OMP_NUM_THREADS"
        except ValueError:
            pass
    auto = max(1, cpus - 1)
    if torch_default:
        auto = min(auto, max(1, torch_default))
    if device_type == "cpu":
        return auto, f"{cpus} CPU{'s' if cpus != 1 else ''}, one left for the rest of the machine"
    return min(GPU_THREADS, auto), f"the model runs on {device_type}; {cpus} CPU{'s' if cpus != 1 else ''}"


_TORCH_DEFAULT: list[int] = []  # torch's own choice, read once before we change it


def apply_threads(device, requested: int | None = None, say: Callable[[str], None] | None = None) -> int:
    """Sets torch's intra-op thread count for a model on ``device`` and says so in one line."""
    import torch

    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(torch.get_num_threads())
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    n, why = choose_threads(device_type, requested, torch_default=_TORCH_DEFAULT[0])
    torch.set_num_threads(n)
    if say is not None:
        hint = "" if why == "--threads" else "; --threads N to change"
        say(f"torch threads: {n} ({why}{hint})")
    return n
