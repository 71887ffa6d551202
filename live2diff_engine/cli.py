"""``live2diff-engine``: the command line. Builds the parser from the command modules
(`commands/`) and dispatches; every command's options and work are in its own module.

Every user mistake ends as one line on stderr (what is wrong, how to fix it) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .commands import bench, check_reference, connect, ctl, doctor, models, run, serve, styles, translate
from .commands import eval as eval_command
from .errors import UserError
from .options import Parser

COMMANDS = {name: entry for module in (check_reference, bench, translate, models, run, ctl, styles, eval_command, serve, connect, doctor)
            for name, entry in module.COMMANDS.items()}  # name: (add its subcommand, run it)
ORDER = ("check-reference", "bench", "translate", "models", "run", "ctl", "bench-engine", "bench-style", "bench-threads",
         "bench-gpu", "check-accelerate", "styles", "eval", "serve", "connect", "doctor")  # as --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="live2diff-engine", description="Live video-to-video diffusion (Live2Diff) for webcams and OBS.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"live2diff-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in ORDER:
        COMMANDS[name][0](sub)
    return parser


def _quiet_libraries() -> None:
    """The libraries' own warnings (e.g. transformers on torchvision's absence) are noise to a
    user; LIVE2DIFF_VERBOSE=1 brings them back."""
    import os

    if os.environ.get("LIVE2DIFF_VERBOSE"):
        return
    import logging

    for name in ("transformers", "diffusers", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers sets its logger's level from this when it is first imported (which the quick
    # commands never do: importing it here cost them seconds)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # which options were typed (saved settings)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return COMMANDS[args.command][1](args)
    except UserError as exc:
        print(f"live2diff-engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("live2diff-engine: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def entry_point() -> None:
    code = main()
    if any(m.exit_at_once for m in (run, serve, connect)):  # set by the command once all it opened is closed
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """Ends the process without the interpreter's teardown. After `run`, `serve` or `connect`
    everything the user made is already closed (files, virtual camera, sessions, API); what is left is the garbage collector walking
    every object torch and the models made, which on a busy machine took 10 s and more after a
    Ctrl-C. The exit handlers still run and the output is flushed first."""
    import atexit
    import logging
    import os

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # a broken pipe or an exit handler's fault must not hold the exit
        pass
    os._exit(code)


if __name__ == "__main__":
    entry_point()
