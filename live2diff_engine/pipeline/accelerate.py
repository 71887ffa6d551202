"""Acceleration of the stream call: ``torch.compile`` and CUDA graphs around one static function.

The stream call (:func:`stream_call`: the batched UNet pass, LCM's boundary scalings, classifier-free
guidance, the re-noise of the unfinished rows into a carry buffer, and the KV-cache writes) reads
and writes only tensors that :class:`~.stream.StreamPipeline` allocates once, and never writes one
part of a buffer from another part of it (the pipeline moves the carry and the depth rows into
place after the call); the bookkeeping row is picked on the device from a 0-dim index buffer, the noise is drawn
into a buffer outside the call, and every scalar is a tensor. It therefore has static shapes and
no data-dependent Python control flow, so

* ``compile``: ``torch.compile(fullgraph=True, dynamic=False)`` takes it whole (a graph break is
  an error, not a silent slow path), and
* ``cudagraph``: on CUDA the compiled call is also captured into a CUDA graph, replayed every frame
  with one launch. Because its inputs are always the same buffers, the graph is captured by hand
  (``torch.cuda.graph``) after two real calls on a side stream, and every call that runs is a real
  stream call: capturing never advances or corrupts the stream's state.

A prompt, style or strength change keeps every shape and so never recompiles (a style switch
rebinds each weight to a tensor of the same shape, dtype and strides, which the compiled call reads
as an input; while a CUDA graph holds the weights' addresses it copies into them instead); a change of denoising steps or size changes the shapes and compiles once more (the
compiled code is cached on disk, see :func:`configure_cache`). Any failure to compile or capture
falls back to the next slower path with one warning line: a live stream never dies because a
compiler did. ``off`` runs the same function eagerly and is the reference path, and the first
live call of every compiled version and every CUDA graph is checked against it (see
:class:`StreamAccelerator`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

import torch

from ..errors import ConfigError, device_failure

MODES = ("off", "compile", "cudagraph", "auto")
# What `auto` does on the CPU. Compiled, the tiny model's step costs well under half the eager one
# (`bench --accelerate off,compile`, BENCHMARKS.md), but compiling it costs minutes of CPU time
# (tens of seconds from a warm cache) and a CPU run is a check or a smoke run, not a live stream:
# it does not pay there. `--accelerate compile` asks for it.
CPU_AUTO = "off"


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """``auto`` -> the fastest path for ``device``; check the others make sense there."""
    device = torch.device(device)
    if mode not in MODES:
        raise ConfigError(f"unknown acceleration {mode!r}; use one of {', '.join(MODES)}")
    if mode == "auto":
        return "cudagraph" if device.type == "cuda" else CPU_AUTO
    if mode == "cudagraph" and device.type != "cuda":
        raise ConfigError(f"--accelerate cudagraph needs a CUDA device, not {device.type}; use compile or auto")
    return mode


# A torch.compile backend other than inductor for every compiled call, for checks: "eager" traces
# each call with dynamo (a real compile: whole graph, guards, the compiler's counters) but runs the
# traced graph as it is, in seconds where inductor takes minutes of CPU; "aot_eager" adds autograd's
# tracing (to tell a dynamo problem from an inductor one). Not for a live stream: nothing is faster.
BACKEND_ENV = "LIVE2DIFF_COMPILE_BACKEND"


def backend_from_env() -> str | None:
    name = os.environ.get(BACKEND_ENV, "").strip()
    if not name or name == "inductor":
        return None
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ConfigError(f"{BACKEND_ENV}={name} is no torch.compile backend; use one of {', '.join(sorted(known))}, "
                          f"or unset it (inductor)")
    return name


def compiled_graphs() -> int:
    """How many graphs the compiler (dynamo) has compiled in this process so far, of every call:
    a count that only a compile (or a recompile) raises."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def parse_modes(text: str) -> list[str]:
    """``off,compile`` -> ["off", "compile"] (for benchmarks comparing several)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ConfigError(f"--accelerate takes {', '.join(MODES)} (comma-separated to compare), got {text!r}")
    return modes


def cache_home() -> str:
    """Where compiled artefacts live across runs (inductor's caches)."""
    if os.environ.get("LIVE2DIFF_HOME"):
        base = os.path.join(os.path.expanduser(os.environ["LIVE2DIFF_HOME"]), "cache")
    elif os.name == "nt":
        base = os.path.join(os.environ.get("LOCALAPPDATA", os.path.expanduser("~")), "live2diff", "cache")
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "live2diff")
    return os.path.join(base, "compile")


def configure_cache() -> str:
    """Point inductor's on-disk caches (FX graphs, kernels) at the engine's cache folder, unless the
    user chose another with TORCHINDUCTOR_CACHE_DIR. Returns the folder."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # importing diffusers already set inductor's default (a temp folder): that is not a choice
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if folder and os.path.abspath(folder) == os.path.abspath(default_cache_dir()):
            folder = None
    except Exception:
        pass
    folder = folder or cache_home()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.makedirs(folder, exist_ok=True)
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except Exception:  # an inductor without these settings still compiles
        pass
    return folder


@contextmanager
def exact_float32(device, dtype, say: Callable[[str], None] | None = None):
    """TF32 off for a float32 or float64 check on a GPU, restored after. cuDNN convolutions use
    TF32 by default on Ampere and later cards: a 10-bit mantissa, far coarser than a fixture's
    1e-3/1e-4 tolerance, so a mismatch there would mean nothing. With it off, one does mean a bug.
    Through the flags' first API (``allow_tf32``): torch 2.9's ``fp32_precision`` set beside it
    makes the first API's getters raise, and other code (inductor) still reads them."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float32, torch.float64):
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    try:
        saved = (cudnn.allow_tf32, matmul.allow_tf32)
    except RuntimeError:  # the user mixed the two APIs; leave the flags as they are, and say so
        if say:
            say("note: TF32 flags set through both of torch's APIs; this float32 check leaves them as they are")
        yield
        return
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    if say:
        say("note: TF32 off for this float32 check (cuDNN convolutions use it by default on this card; "
            "its 10-bit mantissa is far coarser than the check's tolerance)")
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def stream_call(unet, latents, depth, text, timesteps, alpha, beta, c_skip, c_out, noise, carry, guidance, row, image, tables):
    """One stream call on the pipeline's buffers; returns (noise prediction, x0 of every row).

    ``latents``/``depth`` ``[T, 4, h, w]`` are the batch of this call, read only; the rows that move
    on to their next step (``alpha[1:] * x0[:-1] + beta[1:] * noise``) are written to ``carry``
    ``[T-1, 4, h, w]``, a buffer of their own, and the pipeline moves them (and the depth rows) into
    place after the call. The call never writes one part of a buffer from another part of the same
    buffer: inductor (torch 2.13) compiles such a shifted self-copy into a loop that reads rows it
    has already overwritten (BENCHMARKS.md, "A compiler can be wrong"). ``text`` has one row per
    UNet batch item (``T`` or ``2T`` with guidance); ``guidance`` is a 0-dim scale (unused without
    the second branch); ``row`` is a 1-element index into the bookkeeping ``tables`` (bias, pe_idx,
    update_idx, q_idx, rows); ``image`` is None, or with an IP-Adapter the image tokens, one row per
    UNet batch item like ``text`` (``[rows, 1, tokens, dim]``). The KV-cache rows are written
    inside the UNet, from new keys and values."""
    from ..models.motion import StreamContext

    T = latents.shape[0]
    branches = text.shape[0] // T
    bias, pe_idx, update_idx, q_idx, rows = tables
    # index_select with a 1-element index tensor: indexing with a 0-dim one would be read as a
    # Python int by the compiler (a recompile per call number).
    ctx = StreamContext(bias=bias.index_select(0, row)[0], pe_idx=pe_idx.index_select(0, row)[0],
                        update_idx=update_idx.index_select(0, row)[0], q_idx=q_idx.index_select(0, row)[0], rows=rows)
    tokens = None if image is None else [image]
    if branches == 1:
        eps = unet(latents, timesteps, text, depth, ctx, image_tokens=tokens)
    else:
        eps = unet(latents.repeat(branches, 1, 1, 1), timesteps.repeat(branches), text, depth.repeat(branches, 1, 1, 1), ctx,
                   image_tokens=tokens)
        cond, uncond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
    x0 = c_out * ((latents - beta * eps) / alpha) + c_skip * latents
    if T > 1:
        carry.copy_(alpha[1:] * x0[:-1] + beta[1:] * noise)
    return eps, x0


def _bind(unet):
    def call(*args):
        return stream_call(unet, *args)

    return call


def stream_call_code():
    """The code object the compiler caches compiled stream calls under."""
    return _bind(None).__code__


def _one_line(exc: BaseException) -> str:
    """The root cause in one line (the compiler wraps a backend's error in its own)."""
    seen = 0
    while seen < 8:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc, seen = inner, seen + 1
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# While a compile runs (minutes on a CPU, tens of seconds on a GPU), a line this often says how
# long it has been running, so that a long compile never looks like a hang.
TICK_S = 15.0


@contextmanager
def elapsed(say: Callable[[str], None], what: str):
    """Say every :data:`TICK_S` seconds how long ``what`` has been running, until the block ends."""
    stop = threading.Event()
    start = time.perf_counter()
    every = TICK_S

    def tick():
        while not stop.wait(every):
            say(f"  {what}: {time.perf_counter() - start:.0f} s so far ...")

    ticker = threading.Thread(target=tick, name="compile progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join(timeout=1.0)


# See _CudaGraph: other threads (the style loader) may allocate and synchronise during a capture.
CAPTURE_ERROR_MODE = "thread_local"

# Where the stream call's arguments sit (see stream_call); the carry is the one buffer it writes.
CARRY = 9

# How far an accelerated call may stray from eager before it is not trusted: the relative L2 error
# ||accelerated - eager|| / ||eager|| of each output and of each buffer the call writes (every
# layer's KV-cache on its own), the worst of them. Reordered float arithmetic stays well below:
# in float32 up to 3e-3, seen on the tiny random model compiled with AVX, where a 1x1 layer's
# 32-group norm sees two values a group and amplifies rounding (elementwise that layer strays by
# 4e-2 of its scale, which is why the measure is not elementwise); elsewhere 1e-5 to 1e-4. A wrong
# kernel (a row read after it was overwritten, a cache slot written to the wrong place) gives
# errors of 0.1 to 1.
CHECK_TOLERANCE = {torch.float32: 1e-2, torch.float64: 1e-6, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def _tensors_of(obj, depth: int = 0) -> list[torch.Tensor]:
    """The tensors in a call's result (a tensor, tuples and dicts of them, diffusers' output
    objects, a distribution's parameters), in a stable order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 4 or obj is None:
        return []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_of(v, depth + 1)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors_of(v, depth + 1)]
    if hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in _tensors_of(v, depth + 1)]
    return []


@torch.no_grad()
def relative_error(got: list[torch.Tensor], want: list[torch.Tensor], chunk: int = 1 << 22) -> float:
    """The worst relative L2 error ``||got - want|| / ||want||`` over pairs of tensors (inf if the
    shapes differ or a value is not finite where eager's is; 0 for two all-zero tensors). Summed
    ``chunk`` elements at a time, so a large cache needs no full-size temporary."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.reshape(-1), b.reshape(-1)
        diff = norm = 0.0
        for i in range(0, a.numel(), chunk):  # float32 norms of each chunk, summed as Python floats
            x, y = a[i : i + chunk], b[i : i + chunk]
            if x.dtype != torch.float32:
                x, y = x.float(), y.float()
            diff += float(torch.linalg.vector_norm(x - y)) ** 2
            norm += float(torch.linalg.vector_norm(y)) ** 2
        if diff != diff:  # NaN somewhere
            return float("inf")
        err = 0.0 if diff == 0 else (diff / norm) ** 0.5 if norm > 0 else float("inf")
        worst = max(worst, err)
    return worst


class StreamAccelerator:
    """Runs :func:`stream_call` for one UNet in the requested mode, falling back on failure.

    One accelerator per UNet (see :func:`accelerator_for`): the compiled function is shared by
    every stream on that UNet, so a new stream of the same shapes (after a strength change or a
    reset) reuses the compiled code. ``backend`` and ``compile_options`` exist for tests and
    benchmarks (e.g. dynamo's counting backends).

    A compiler can be wrong, so nothing accelerated is trusted unchecked: the first live call of
    each compiled version (and the first replay of each CUDA graph) runs on the stream's state, and
    then the same call runs eagerly on a copy of the state it started from (the KV-cache and the
    carry: the stream advances once). Every output and every buffer the call wrote must match
    eager within :data:`CHECK_TOLERANCE` (relative L2 error); if not, one warning line names the mode and the error,
    the eager state and outputs are kept, and the stream goes on eager (or without CUDA graphs)."""

    def __init__(self, unet, mode: str, *, say: Callable[[str], None] | None = None, backend=None, compile_options=None,
                 emulate_graphs: bool = False):
        self.unet = unet
        # emulate_graphs: the CUDA-graph logic (warm-up calls, capture that records without running,
        # replay into the same outputs, recapture for new buffers) on any device, for CPU tests.
        self.emulate_graphs = emulate_graphs
        self.requested = mode if (emulate_graphs and mode == "cudagraph") else resolve_mode(mode, unet.device)
        self.mode = self.requested  # the mode in use (lower after a fallback)
        self.say = say or _say
        self.backend = backend if backend is not None else backend_from_env()
        self.compile_options = dict(compile_options or {})
        self._compiled = None
        self._signatures: set[tuple] = set()  # shapes compiled so far (a new one compiles once more)
        self._checked: set[tuple] = set()  # shapes whose compiled call was checked against eager
        self._graph = None
        self._graph_key: tuple | None = None
        self._graph_out = None
        self._graph_runs = 0  # real calls made with the current key before capture
        self._graph_checked = False  # the current graph's first replay was checked
        self.compile_seconds: dict[tuple, float] = {}
        self.checks: list[dict] = []  # every check made: what, relative error, passed, seconds
        self._wrapped: dict[tuple, _CompiledCall] = {}
        self.captures = 0
        if self.mode != "off":
            configure_cache()

    # -- paths -------------------------------------------------------------------------------

    def _compiled_fn(self):
        if self._compiled is None:
            kwargs = {"fullgraph": True, "dynamic": False}
            if self.backend is not None:
                kwargs["backend"] = self.backend
            elif self.unet.device.type == "cpu":
                # Inductor lays convolutions out channels-last on the CPU; the weights are inputs
                # of the call (a style switch rebinds them), so it re-lays out every weight on
                # every call: the full-size step compiled took 1.13x eager, 0.93x without (BENCHMARKS).
                kwargs["options"] = {"layout_optimization": False}
            kwargs.update(self.compile_options)
            self._compiled = torch.compile(_bind(self.unet), **kwargs)
        return self._compiled

    def _fallback(self, to: str, what: str, exc: BaseException) -> None:
        self.say(f"warning: {what} failed ({_one_line(exc)}); the stream goes on {'uncompiled' if to == 'off' else 'without CUDA graphs'}")
        self._lower(to)

    def _lower(self, to: str) -> None:
        self.mode = to
        self._graph = self._graph_out = self._graph_key = None

    def release_graph(self) -> None:
        """Drop the CUDA graph of the last stream (and with it the graph's private memory pool);
        the next stream call warms up and captures again. The compiled code stays."""
        self._graph = self._graph_out = self._graph_key = None

    @staticmethod
    def signature(args) -> tuple:
        return tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))

    def graph_key(self, args) -> tuple:
        """What a CUDA graph is bound to: the address, shape, strides and dtype of every tensor it
        reads or writes (the call's buffers, the bookkeeping tables, every layer's KV-cache). A new
        stream can get its buffers at the old addresses with another step count or size (the
        caching allocator reuses freed blocks), so addresses alone would replay a stale graph."""
        tensors = [a for a in args[:-1] if isinstance(a, torch.Tensor)] + list(args[-1]) + [t for t in self.unet.cache_tensors() if t is not None]
        others = tuple(id(a) for a in args[:-1] if not isinstance(a, torch.Tensor))
        return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in tensors) + others

    # -- the check against eager -------------------------------------------------------------

    def _state(self, args) -> list[torch.Tensor]:
        """What a stream call writes: the carry and every temporal layer's KV-cache."""
        return [args[CARRY], *self.unet.cache_tensors()]

    def _save_state(self, args) -> list[torch.Tensor] | None:
        try:
            return [t.clone() for t in self._state(args)]
        except torch.OutOfMemoryError:
            self.say("warning: not enough device memory for a copy of the stream's state to check the accelerated "
                     "stream step against eager; it runs unchecked")
            return None

    def _eager_on(self, saved: list[torch.Tensor], args):
        """The eager stream call on the saved state (which it advances), leaving the live one alone."""
        args = list(args)
        args[CARRY] = saved[0]
        layers = self.unet.temporal_layers
        live = [layer.kv_cache for layer in layers]
        for layer, cache in zip(layers, saved[1:]):
            layer.kv_cache = cache
        try:
            return stream_call(self.unet, *args)
        finally:
            for layer, cache in zip(layers, live):
                layer.kv_cache = cache

    def _verify(self, out, args, saved, what: str, to: str):
        """Compare an accelerated call's outputs and writes with eager's on the saved state; on a
        mismatch keep eager's and lower the mode to ``to``. Returns the outputs to use."""
        if saved is None:
            return out
        start = time.perf_counter()
        ref = self._eager_on(saved, args)
        live = self._state(args)
        err = relative_error([*out, *live], [*ref, *saved])
        tol = CHECK_TOLERANCE.get(args[0].dtype, 5e-2)
        ok = err <= tol
        if not ok:
            for dst, src in zip(live, saved):
                dst.copy_(src)
        if self.unet.device.type == "cuda":
            torch.cuda.synchronize(self.unet.device)
        self.checks.append({"what": what, "error": err, "tolerance": tol, "passed": ok,
                            "seconds": time.perf_counter() - start})
        if ok:
            return out
        self.say(f"warning: the {what} does not match eager (relative error {err:.2g}, tolerance {tol:g}, "
                 f"{self._describe(args)}); the stream goes on {'uncompiled' if to == 'off' else 'without CUDA graphs'}")
        self._lower(to)
        return ref

    # -- compiled ----------------------------------------------------------------------------

    def _run_compiled(self, args, check: bool = True):
        sig = self.signature(args)
        first = sig not in self._signatures
        verify = check and sig not in self._checked
        if first:
            self.say(f"compiling the stream step for {self._describe(args)} (once per size and step count; cached in {configure_cache()}) ...")
            start = time.perf_counter()
        saved = self._save_state(args) if verify else None
        try:
            if not first and len(self._signatures) == 1 and self._single_cache_entry():
                # Compiled once for these shapes and nothing else: every guard passes by construction
                # (same buffers' shapes; a style switch keeps each weight's shape, dtype and
                # strides), and checking a guard per weight costs milliseconds a frame. With several
                # entries the guards pick the right one.
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    out = self._compiled_fn()(*args)
            elif first:
                with elapsed(self.say, "compiling the stream step"):
                    out = self._compiled_fn()(*args)
            else:
                out = self._compiled_fn()(*args)
        except Exception as exc:  # a compiler's failure: eager from now on
            if device_failure(exc) == "lost":  # a dead CUDA context: nothing more can run on it
                raise
            if saved is not None:  # a failure part-way may have written some of the state
                for dst, src in zip(self._state(args), saved):
                    dst.copy_(src)
            if device_failure(exc):  # out of memory: eager needs more, so it is the engine's to handle
                raise
            self._fallback("off", "compiling the stream step", exc)
            return stream_call(self.unet, *args)
        if first:
            if self.unet.device.type == "cuda":
                torch.cuda.synchronize(self.unet.device)
            took = time.perf_counter() - start
            self.compile_seconds[sig] = took
            self._signatures.add(sig)
            self.say(f"stream step compiled in {took:.1f} s")
        if verify:
            self._checked.add(sig)
            out = self._verify(out, args, saved, "compiled stream step", "off")
        return out

    def _single_cache_entry(self) -> bool:
        """Whether the compiler holds exactly one compiled version of the stream call (of any
        UNet's accelerator: they share the code object), i.e. skipping guards cannot pick another."""
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            return len(_debug_get_cache_entry_list(stream_call_code())) == 1
        except Exception:
            return False

    def _describe(self, args) -> str:
        latents, text = args[0], args[2]
        T, _, h, w = latents.shape
        return f"{T} step{'s' if T != 1 else ''} at latent {h}x{w}{' with guidance' if text.shape[0] > T else ''}"

    # -- CUDA graphs -------------------------------------------------------------------------

    def _run_graph(self, args, check: bool = True):
        key = self.graph_key(args)
        if key != self._graph_key:  # new buffers (a new stream): warm up with real calls, then capture
            self._graph = self._graph_out = None
            self._graph_key, self._graph_runs, self._graph_checked = key, 0, False
        if self._graph is not None:
            return self._replay(args, check)
        if self._graph_runs < 2:  # real stream calls first (lazy initialisation, autotuning, compiling)
            with self._side_stream():
                out = self._run_compiled(args, check)
            self._graph_runs += 1
            return out
        if self.mode != "cudagraph":  # compiling fell back during the warm-up calls
            return self(*args)
        graph = _EmulatedGraph() if self.emulate_graphs else _CudaGraph(self.unet.device)
        saved = self._save_state(args) if check else None  # the capture itself may touch the state
        try:
            out = graph.capture(self._compiled_fn(), args)
        except Exception as exc:
            if device_failure(exc) == "lost":
                raise
            if saved is not None:
                for dst, src in zip(self._state(args), saved):
                    dst.copy_(src)
            if device_failure(exc):  # out of memory: compiled without graphs is no smaller
                raise
            self._fallback("compile", "capturing the stream step in a CUDA graph", exc)
            return self._run_compiled(args)
        if saved is not None:  # capturing records kernels without running them: the state is as it was
            for dst, src in zip(self._state(args), saved):
                dst.copy_(src)
        self._graph, self._graph_out = graph, out
        self.captures += 1
        return self._replay(args, check, saved)  # the capture only recorded this call; now run it

    def _replay(self, args, check: bool, saved=None):
        if self._graph_checked or not check:
            self._graph.replay()
            return self._graph_out
        saved = saved if saved is not None else self._save_state(args)
        self._graph.replay()
        self._graph_checked = True
        return self._verify(self._graph_out, args, saved, "CUDA-graph stream step", "compile")

    @contextmanager
    def _side_stream(self):
        if self.emulate_graphs or self.unet.device.type != "cuda":
            yield
            return
        device = self.unet.device
        with torch.cuda.device(device):  # the stream's own card, not the current one
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                yield
            torch.cuda.current_stream(device).wait_stream(side)

    # -- other modules -----------------------------------------------------------------------

    def wrap(self, fn, label: str):
        """``fn`` (e.g. the VAE's encode or decode) compiled with this accelerator's backend when it
        compiles at all, falling back to ``fn`` itself with one warning line if compiling fails or
        its first compiled call does not match ``fn``'s. Made once per function and shared, like
        the stream call."""
        if self.mode == "off":
            return fn
        # The function itself, not its name: wrapped methods can share one (diffusers < 0.36 with
        # accelerate's hooks names both the VAE's encode and decode "wrapper").
        key = (id(getattr(fn, "__self__", None)), getattr(fn, "__func__", fn), label)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = _CompiledCall(self, fn, label)
        return wrapped

    # -- entry -------------------------------------------------------------------------------

    def __call__(self, *args):
        """A live stream call: the first of each compiled version is checked against eager."""
        if self.mode == "off":
            return stream_call(self.unet, *args)
        if self.mode == "compile":
            return self._run_compiled(args)
        return self._run_graph(args)

    def precompile(self, *args):
        """A call made only to compile (on a stream's empty buffers, before its warmup): not
        checked, since the state it starts from is all zeros; the first live call is."""
        if self.mode == "off":
            return stream_call(self.unet, *args)
        if self.mode == "compile":
            return self._run_compiled(args, check=False)
        return self._run_graph(args, check=False)


class _CompiledCall:
    """A compiled module call (no CUDA graph: its callers hand it new tensors every frame). The
    first compiled call of each input signature (shapes and dtypes: a new size compiles a new
    version) is checked against ``fn`` on the same inputs (these calls keep no state)."""

    def __init__(self, accel: StreamAccelerator, fn, label: str):
        self.accel, self.fn, self.label = accel, fn, label
        kwargs = {"dynamic": False}
        if accel.backend is not None:
            kwargs["backend"] = accel.backend
        elif accel.unet.device.type == "cpu":  # as for the stream call: its weights are inputs too
            kwargs["options"] = {"layout_optimization": False}
        kwargs.update(accel.compile_options)
        self.compiled = torch.compile(fn, **kwargs)
        self.failed = False
        self.checked: set[tuple] = set()  # input signatures whose compiled call matched ``fn``

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.fn(*args, **kwargs)
        sig = StreamAccelerator.signature(_tensors_of([args, kwargs]))
        try:
            if sig in self.checked:
                out = self.compiled(*args, **kwargs)
            else:  # the first call compiles
                with elapsed(self.accel.say, f"compiling the {self.label}"):
                    out = self.compiled(*args, **kwargs)
        except Exception as exc:
            if device_failure(exc):  # out of memory or a dead CUDA context: not the compiler's doing
                raise
            self.failed = True
            self.accel.say(f"warning: compiling the {self.label} failed ({_one_line(exc)}); it goes on uncompiled")
            return self.fn(*args, **kwargs)
        if sig not in self.checked:
            self.checked.add(sig)
            start = time.perf_counter()
            ref = self.fn(*args, **kwargs)
            got, want = _tensors_of(out), _tensors_of(ref)
            err = relative_error(got, want) if want else 0.0
            tol = CHECK_TOLERANCE.get(want[0].dtype, 5e-2) if want else 0.0
            ok = err <= tol
            self.accel.checks.append({"what": f"compiled {self.label}", "error": err, "tolerance": tol, "passed": ok,
                                      "seconds": time.perf_counter() - start})
            if not ok:
                self.failed = True
                self.accel.say(f"warning: the compiled {self.label} does not match eager (relative error {err:.2g}, "
                               f"tolerance {tol:g}); it goes on uncompiled")
                return ref
        return out


class _CudaGraph:
    """A CUDA graph of one call on ``device``, captured on a side stream of that device.

    * The device's context around the capture and every replay: ``torch.cuda.graph`` otherwise
      captures on a stream of the *current* device (cuda:0), while the call's kernels run on the
      tensors' device (``--device cuda:1``): the graph would hold nothing and every replay would
      do nothing.
    * ``capture_error_mode="thread_local"`` (as inductor's own CUDA graphs do): in the default
      "global" mode a capture forbids allocation and synchronisation on *every* thread, so a style
      loading beside the stream (its ``.to(device)`` copies and its side stream's synchronise)
      would break the capture and the load; thread_local forbids them on the capturing thread only."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn, args):
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
                out = fn(*args)
            torch.cuda.current_stream(self.device).wait_stream(stream)
        return out

    def replay(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()


class _EmulatedGraph:
    """What a CUDA graph does, done eagerly: ``capture`` records the call without running it and
    returns output tensors; every ``replay`` runs the call on the same inputs and writes the results
    into those same outputs."""

    def capture(self, fn, args):
        self.fn, self.args = fn, args
        self.out = tuple(torch.empty_like(t) for t in stream_call_outputs_like(args))
        return self.out

    def replay(self) -> None:
        for dst, src in zip(self.out, self.fn(*self.args)):
            dst.copy_(src)


def stream_call_outputs_like(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty tensors shaped like :func:`stream_call`'s outputs (eps, x0) for these inputs."""
    latents = args[0]
    return latents.new_empty(latents.shape), latents.new_empty(latents.shape)


def accelerator_for(unet, mode: str, **options) -> StreamAccelerator:
    """The UNet's accelerator for ``mode``: made once, then shared by every stream on that UNet, so
    that a new stream of the same shapes reuses the compiled code. Options (a compiler backend, an
    emulated graph for tests) make a new one that replaces the old for that mode."""
    store = unet.__dict__.setdefault("_stream_accelerators", {})
    if mode in store and not any(k != "say" for k in options):  # e.g. an emulated graph a test set up
        if options.get("say") is not None:
            store[mode].say = options["say"]
        return store[mode]
    resolved = mode if (options.get("emulate_graphs") and mode == "cudagraph") else resolve_mode(mode, unet.device)
    say = options.pop("say", None)
    if options or resolved not in store:
        store[resolved] = StreamAccelerator(unet, resolved, say=say, **options)
    elif say is not None:
        store[resolved].say = say
    return store[resolved]
