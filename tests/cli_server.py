"""Runs the command line for the tests, each run in a process of its own that starts with the engine
already imported.

A run of `python -m live2diff_engine` spends 5-10 s of CPU importing torch, diffusers and the
engine before it reads its arguments, and the suite runs the command line well over a hundred
times, on a CI box of 2 cores that the suite keeps busy. This server imports all of that once, then
forks a copy of itself for each run. The copy is a process of its own, as a fresh one would be: its
own arguments, environment, working folder, standard streams and exit status, and whatever the run
does to its state is gone with it. What a fresh interpreter would print while importing is printed
at the start of every run's stderr, so that a test that wants one line of error still sees a noisy
import. Environment variables that torch, huggingface_hub or transformers read while importing are
fixed here at start: a run that sets them differently goes to a fresh interpreter (conftest.run_cli
decides).

Protocol, one connection a run on a Unix socket: the client sends one JSON line (args, env, cwd,
out, err: the files for stdout and stderr; or "fds": true, and the run's stdout and stderr come as
two file descriptors with the line, for a run the caller talks to while it runs); the server answers
{"pid": N} when the run has started and {"rc": N} when it has ended (N < 0: killed by signal -N).
"""

import importlib
import io
import json
import os
import signal
import socket
import sys

# Read from the environment while these are imported, so a run with other values needs a fresh
# interpreter (conftest.run_cli compares them).
IMPORT_TIME_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_", "OMP_",
                            "MKL_", "KMP_", "ATEN_", "CUDA", "PYTHON", "LD_", "TOKENIZERS_", "XDG_CACHE_HOME")

PRELOAD = (
    "torch", "diffusers", "transformers", "cv2", "numpy",
    "live2diff_engine.cli", "live2diff_engine.assemble", "live2diff_engine.engine", "live2diff_engine.reference",
    "live2diff_engine.models.loading", "live2diff_engine.models.unet", "live2diff_engine.models.motion",
    "live2diff_engine.models.tiny", "live2diff_engine.models.components", "live2diff_engine.models.hub",
    "live2diff_engine.pipeline.frames", "live2diff_engine.pipeline.stream", "live2diff_engine.pipeline.accelerate",
    "live2diff_engine.styles", "live2diff_engine.depth", "live2diff_engine.io.video", "live2diff_engine.io.sinks",
    "live2diff_engine.io.sources", "live2diff_engine.bench.stream", "live2diff_engine.commands.eval",
    "live2diff_engine.quality", "live2diff_engine.threads", "live2diff_engine.saved_settings",
)


IS_RUN = False  # set in the forked copy that becomes a command-line run

# This server was started by the test process, so it came in with that process's SIGINT handling.
SIGINT_CAME_IGNORED = signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def import_time_env(env):
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV_PREFIXES)}


def preload() -> bytes:
    """Imports what every run would; returns what the imports wrote to stderr (and stdout)."""
    saved = os.dup(2), os.dup(1)
    capture_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"l2d-cli-server-{os.getpid()}-import")
    capture = os.open(capture_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.unlink(capture_path)
    os.dup2(capture, 2)
    os.dup2(capture, 1)
    try:
        for name in PRELOAD:
            importlib.import_module(name)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.dup2(saved[0], 2)
        os.dup2(saved[1], 1)
    os.lseek(capture, 0, os.SEEK_SET)
    noise = b""
    while chunk := os.read(capture, 65536):
        noise += chunk
    os.close(capture)
    return noise


def run_command(req, import_noise: bytes, fds=()) -> None:
    """In the forked copy: becomes the command line run and never returns."""
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        if req.get("fds"):
            out, err = fds
        else:
            out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(err, import_noise)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      write_through=False)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      line_buffering=True)
        # As a fresh interpreter would start here: Ctrl-C raises KeyboardInterrupt unless SIGINT came
        # in ignored (a suite started in the background), the rest as the OS gives.
        signal.signal(signal.SIGINT, signal.SIG_IGN if SIGINT_CAME_IGNORED else signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        import live2diff_engine

        sys.argv = [os.path.join(os.path.dirname(live2diff_engine.__file__), "__main__.py"), *req["args"]]
        import runpy

        try:
            runpy.run_module("live2diff_engine", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # as the interpreter does with an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
    except BaseException:  # setting the run up failed: as an interpreter that could not start
        import traceback

        traceback.print_exc()
    # The interpreter's own way out, as a fresh one ends: waiting for the run's non-daemon threads,
    # then the exit handlers, then finalization (main() lets this SystemExit through in a run).
    global IS_RUN
    IS_RUN = True
    raise SystemExit(code)


def handle(conn: socket.socket, import_noise: bytes) -> None:
    """In a forked copy per connection: starts the run, reports its pid, waits, reports its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("the request ended early")
        data += more
    req = json.loads(data)
    pid = os.fork()
    if pid == 0:
        conn.close()
        run_command(req, import_noise, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    conn.sendall(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def main(path: str) -> None:
    parent = os.getppid()
    noise = preload()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    sock.settimeout(2.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the per-connection copies
    print(json.dumps({"ready": True, "threads": threads, "import_noise": noise.decode("utf-8", "replace")}), flush=True)
    while os.getppid() == parent:  # ends with the test process that started it
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            continue
        if os.fork() == 0:
            sock.close()
            try:
                handle(conn, noise)
            finally:
                if not IS_RUN:  # the per-connection copy; a run ends as an interpreter does
                    os._exit(0)
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
