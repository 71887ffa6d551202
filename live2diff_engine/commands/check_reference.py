"""`live2diff-engine check-reference`: replay golden fixtures of the original Live2Diff."""

from __future__ import annotations

from ..errors import ConfigError
from ..options import ACCELERATE_HELP, DTYPES, resolve_device, torch_dtype


def add_parser(sub) -> None:
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
    from ..threads import add_threads_arg

    add_threads_arg(check)


def _cmd_check_reference(args) -> int:
    from ..reference import run_check

    device = resolve_device(args.device)
    from ..pipeline.accelerate import resolve_mode

    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"--{name} must be zero or positive, got {value}")
    mode = resolve_mode(args.accelerate, device)
    from ..threads import apply_threads

    apply_threads(device, args.threads)  # quietly: its output is the verdict (and one line on a bad fixture)
    status = 0
    for fixture in args.fixture:
        if len(args.fixture) > 1:
            print(f"== {fixture}", flush=True)
        status = max(status, run_check(fixture, device=str(device), dtype=torch_dtype(args.dtype), accelerate=mode,
                                       rtol=args.rtol, atol=args.atol))
    return status


COMMANDS = {"check-reference": (add_parser, _cmd_check_reference)}
