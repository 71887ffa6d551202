import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cli_server
import pytest
import torch

# One torch thread in the tests and in every process they start: on a busy 2-core machine torch's
# default two OpenMP threads wait seconds at each barrier for a core another process holds (the
# oversubscription in BENCHMARKS.md), and the tiny models gain nothing from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Every test's WebRTC media on 127.0.0.1 (house rule: test traffic stays on loopback), in this
# process and every one it starts: aioice, aiortc's ICE, leaves loopback out of the host
# candidates it gathers, and no option of aiortc or aioice brings it back, so without this two
# peers on this machine meet on its network interface's address (and in a namespace with loopback
# only they meet nowhere). The one place that changes what is gathered is
# live2diff_engine/remote/ice.py (LOOPBACK_ENV), read by every peer connection the engine and
# tests/whip_client.py make.
os.environ["LIVE2DIFF_ICE_LOOPBACK"] = "1"

# The engine's own folder (LIVE2DIFF_HOME: config, styles file, downloaded styles, the settings a
# run leaves for the next): never the user's real one, and empty for each test (below), so that
# what one test's engine saved never becomes the next test's starting point.
os.environ["LIVE2DIFF_HOME"] = tempfile.mkdtemp(prefix="l2d-tests-home-")
atexit.register(shutil.rmtree, os.environ["LIVE2DIFF_HOME"], True)


@pytest.fixture(autouse=True)
def _own_live2diff_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LIVE2DIFF_HOME", str(tmp_path_factory.mktemp("l2d_home")))


# The engine sets TORCHINDUCTOR_CACHE_DIR in its own process when it compiles
# (accelerate.configure_cache); a test that compiles in this process would leave it set for every
# later test of the worker, whose command-line runs would then each need a fresh interpreter (the
# variable is read while torch imports, see run_cli). Each test ends with it as it began.
@pytest.fixture(autouse=True)
def _keep_inductor_cache_env():
    name = "TORCHINDUCTOR_CACHE_DIR"
    before = os.environ.get(name)
    yield
    if before is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = before

ROOT = Path(__file__).resolve().parent.parent


def on_ci() -> bool:
    """Whether this run is CI's (which installs every tool the suite needs): the one place the suite
    reads ``CI``. CI services set it to ``true`` (GitHub, GitLab) or ``1``; unset, empty, ``0``,
    ``false`` or ``no`` (any case) mean a developer's machine."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(missing: str | None, install: str = "") -> None:
    """Skip the calling test with ``missing`` as the reason, or fail it on CI, where the tool is
    installed (``install`` says how); nothing when ``missing`` is None."""
    if missing is None:
        return
    if on_ci():
        pytest.fail(f"required on CI: {missing}" + (f" ({install})" if install else ""), pytrace=False)
    pytest.skip(missing + (f" ({install})" if install else ""))
GOLDEN = ROOT / "tests" / "golden"
FIXTURE_A = GOLDEN / "live2diff_tiny_a"  # the shared golden fixture (its .ckpt copy is rebuilt by tests)


# The files that take longest, longest first (minutes each on a 2-core CI box: inductor's C++
# compile, a real install, the soak, the webcam sizes). They run first, so that with two workers
# the short files fill in beside them instead of one worker finishing a long file alone at the end;
# a plain run keeps the same order. The README's command keeps this order with
# `--no-loadscope-reorder`: by default `--dist loadfile` hands out the files with the most tests
# first, which put these one-test files last.
LONG_FILES_FIRST = ("test_compiled_golden.py", "test_compiled_matrix.py", "test_install_script.py", "test_accelerate.py", "test_gpu_check.py", "test_sizes.py",
                    "test_engine.py", "test_reference.py", "test_control.py", "test_obs_real.py", "test_obs_filter_real.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(*args, timeout=300, env=None, fresh=False):
    """Run the installed command line in a process of its own; returns CompletedProcess (text).
    ``env`` adds to (or overrides) this process's environment. The process is forked from one that
    has already imported the engine (tests/cli_server.py: the same run, without 5-10 s of imports)
    unless ``fresh`` or ``env`` changes what is read while importing; then it is a new interpreter."""
    cmd = [sys.executable, "-m", "live2diff_engine", *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    server = _server_for(full_env, fresh)
    if server is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=None if env is None else full_env)
    return server.run(cmd, full_env, timeout)


def spawn_cli(*args, env=None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, fresh=False):
    """Start the installed command line and return at once, as ``subprocess.Popen`` would (text
    mode, in the project folder; ``stdout``/``stderr``: PIPE or DEVNULL). As with run_cli, the
    process is forked from tests/cli_server.py unless ``fresh`` or ``env`` changes what is read
    while importing; either way the caller gets a process of its own to read, signal and wait for."""
    cmd = [sys.executable, "-m", "live2diff_engine", *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    server = _server_for(full_env, fresh)
    if server is None:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
                                env=full_env)
    return server.spawn(cmd, full_env, stdout, stderr)


def _server_for(env, fresh):
    """The server to fork a run from, or None where the run needs a fresh interpreter."""
    server = None if fresh else _CliServer.get()
    if server is None or server.import_env != cli_server.import_time_env(env):
        return None
    return server


class ForkedProcess:
    """A run started by tests/cli_server.py, with the part of ``subprocess.Popen`` the tests use:
    pid, stdout/stderr (text, when PIPE), poll, wait, send_signal, terminate, kill, communicate,
    returncode. Its exit status comes over the server connection."""

    def __init__(self, args, conn, reader, pid, stdout, stderr):
        self.args, self.pid, self.stdout, self.stderr = args, pid, stdout, stderr
        self.returncode = None
        self._conn, self._reader = conn, reader
        self._ended = threading.Event()
        threading.Thread(target=self._wait_for_rc, name=f"forked-{pid}", daemon=True).start()

    def _wait_for_rc(self):
        try:
            line = self._reader.readline()
            self.returncode = json.loads(line)["rc"] if line else -signal.SIGKILL
        except (OSError, ValueError):
            self.returncode = -signal.SIGKILL  # the server went away, and its runs with it
        finally:
            self._ended.set()
            with contextlib.suppress(OSError):
                self._conn.close()

    def poll(self):
        return self.returncode if self._ended.is_set() else None

    def wait(self, timeout=None):
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if not self._ended.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        got = {}

        def drain(name, f):
            got[name] = f.read() if f is not None else None

        readers = [threading.Thread(target=drain, args=(n, f), daemon=True)
                   for n, f in (("out", self.stdout), ("err", self.stderr))]
        for t in readers:
            t.start()
        end = None if timeout is None else time.monotonic() + timeout
        for t in readers:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if end is None else max(0.0, end - time.monotonic()))
        return got["out"], got["err"]


class _CliServer:
    """This test process's tests/cli_server.py, started at the first run_cli."""

    instance = None
    failed = False

    @classmethod
    def get(cls):
        if cls.instance is None and not cls.failed and os.environ.get("L2D_TEST_CLI_SERVER", "1") != "0":
            try:
                cls.instance = cls()
            except (OSError, RuntimeError, ValueError) as exc:
                cls.failed = True
                print(f"\ncli_server: not used ({exc}); every run_cli starts a fresh interpreter", file=sys.stderr)
        return cls.instance

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="l2d-cli-")
        self.path = os.path.join(self.folder, "socket")
        self.import_env = cli_server.import_time_env(os.environ)
        self.proc = subprocess.Popen([sys.executable, str(Path(cli_server.__file__)), self.path], cwd=ROOT,
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        atexit.register(self.close)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"it exited with {self.proc.wait()} before it was ready")
        ready = json.loads(line)
        if ready["threads"] != 1:  # forking a process with threads can deadlock the copy
            self.close()
            raise RuntimeError(f"importing started {ready['threads'] - 1} thread(s)")
        self.runs = 0

    def run(self, cmd, env, timeout):
        self.runs += 1
        out, err = (os.path.join(self.folder, f"{self.runs}.{n}") for n in ("out", "err"))
        request = {"args": cmd[3:], "env": env, "cwd": str(ROOT), "out": out, "err": err}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            reader = conn.makefile("rb")
            pid = json.loads(reader.readline())["pid"]
            conn.settimeout(timeout)
            try:
                rc = json.loads(reader.readline())["rc"]
                timed_out = False
            except socket.timeout:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
        stdout, stderr = (Path(p).read_text(errors="replace") if os.path.exists(p) else "" for p in (out, err))
        for p in (out, err):
            with contextlib.suppress(OSError):
                os.unlink(p)
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, rc, stdout, stderr)

    def spawn(self, cmd, env, stdout, stderr):
        self.runs += 1
        ours, theirs = [], []
        for how in (stdout, stderr):
            if how == subprocess.PIPE:
                r, w = os.pipe()
                ours.append(open(r, encoding="utf-8", errors="replace"))
            elif how == subprocess.DEVNULL:
                w = os.open(os.devnull, os.O_WRONLY)
                ours.append(None)
            else:
                raise ValueError("spawn_cli takes PIPE or DEVNULL for stdout and stderr")
            theirs.append(w)
        request = {"args": cmd[3:], "env": env, "cwd": str(ROOT), "fds": True}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            data = json.dumps(request).encode() + b"\n"
            sent = socket.send_fds(conn, [data], theirs)
            conn.sendall(data[sent:])
            reader = conn.makefile("rb")
            pid = json.loads(reader.readline())["pid"]
        except BaseException:
            conn.close()
            for f in ours:
                if f is not None:
                    f.close()
            raise
        finally:
            for w in theirs:
                os.close(w)
        return ForkedProcess(cmd, conn, reader, pid, *ours)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def build_mini_unet(extras_like_the_fixtures: bool = False):
    """A two-level streaming UNet: every kind of block the tiny model has (cross-attention down and
    up blocks, plain ones, the mid block, motion modules with their KV-cache), one of each, so that
    dynamo traces it in a third of the tiny model's time and a frame takes about half the tiny
    model's (test_accelerate still traces the whole tiny model, for graph breaks and with styles).

    ``extras_like_the_fixtures``: the motion modules and the depth branch drawn as the golden
    fixtures draw them (tests/golden/README.md: N(0, gain/sqrt(fan_in)), gain sqrt(2) in the depth
    branch, norm scales 1 + N(0, 0.1), biases N(0, 0.05)) instead of PyTorch's default, whose small
    weights leave the temporal and depth paths nearly silent: a wrong depth row or cache slot then
    moves the frames by 1e-4, inside any float32 tolerance. Drawn this way they move them by O(1)."""
    import math

    from live2diff_engine.models.motion import MotionConfig
    from live2diff_engine.models.tiny import TINY_UNET_CONFIG
    from live2diff_engine.models.unet import build_streaming_unet

    config = dict(TINY_UNET_CONFIG, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_streaming_unet(config, MotionConfig()).eval().requires_grad_(False)
    if extras_like_the_fixtures:
        g = torch.Generator().manual_seed(7919)
        base = unet.base_state_keys()
        with torch.no_grad():
            for name, p in sorted(unet.named_parameters()):
                if name in base:
                    continue
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                elif p.dim() == 1:  # a norm's scale
                    p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
                else:
                    gain = math.sqrt(2) if name.startswith("flow_conv_in") else 1.0
                    p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p[0].numel()))
        unet.refresh_positions()
    return unet


@pytest.fixture
def fixture_copy(tmp_path):
    """A writable copy of the golden fixture."""
    dst = tmp_path / "fixture"
    shutil.copytree(FIXTURE_A, dst)
    return dst
