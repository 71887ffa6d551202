"""The CUDA-only paths, checked here without a GPU (issue 22's review): what the engine does with
a GPU's own errors, what a CUDA graph is bound to, on which card and stream a graph is captured,
the style loader's wait for the frames' stream, and TF32 in float32 checks.

Where the logic can run on the CPU it runs for real (the accelerator with dynamo backends that
fail as a GPU would, the engine on the tiny models, the TF32 flags, which are plain settings
without a GPU). Where it is a sequence of CUDA calls (a capture, a stream hand-over), those calls
are replaced at their narrowest point by recorders, and the test checks the order and arguments.
"""

import contextlib
import types

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import build_mini_unet
from live2diff_engine.errors import DeviceLost, UserError, device_failure
from live2diff_engine.pipeline import accelerate
from live2diff_engine.pipeline.accelerate import exact_float32
from test_accelerate import run_stream
from test_engine import ListSource, make_engine, synthetic_frames
from test_styles import comps, ws  # noqa: F401  (fixtures: tiny models in real formats, styles file)

ILLEGAL = "CUDA error: an illegal memory access was encountered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def unet():
    return build_mini_unet()


def test_gpu_errors_are_told_apart_from_everything_else():
    assert device_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert device_failure(RuntimeError("CUDA error: out of memory")) == "oom"
    assert device_failure(RuntimeError(ILLEGAL)) == "lost"
    assert device_failure(RuntimeError("CUDA error: device-side assert triggered")) == "lost"
    assert device_failure(RuntimeError("CUDA error: unspecified launch failure")) == "lost"
    # wrapped by the compiler, as dynamo wraps what a backend raised while compiling (inductor runs
    # kernels then: autotuning benchmarks them)
    def autotune_hits_a_dead_gpu(gm, example_inputs):
        raise RuntimeError(ILLEGAL)

    with pytest.raises(Exception) as wrapped:
        torch.compile(lambda x: x + 1, backend=autotune_hits_a_dead_gpu)(torch.ones(2))
    assert type(wrapped.value).__name__ == "BackendCompilerFailed" and device_failure(wrapped.value) == "lost"
    # a compiler's own failures, a capture refused, an ordinary bug: not the device's
    assert device_failure(RuntimeError("triton: no kernel for this op")) is None
    assert device_failure(RuntimeError("operation not permitted when stream is capturing")) is None
    assert device_failure(ValueError("out of memory in my dict")) is None


def _raising_backend(message_or_exc):
    """A compiler backend whose compiled code raises at run time, as a kernel on a GPU would."""
    def backend(gm, example_inputs):
        def run(*args):
            raise message_or_exc if isinstance(message_or_exc, BaseException) else RuntimeError(message_or_exc)

        return run

    return backend


def test_out_of_memory_in_the_compiled_call_is_not_taken_for_a_compiler_failure(unet, capsys):
    """Eager needs more memory than compiled: falling back would fail again, and hide the cause.
    The state the call may have written part-way is put back, the mode stays, and the error goes
    to the engine's out-of-memory path."""
    with pytest.raises(torch.OutOfMemoryError):
        run_stream(unet, "compile", backend=_raising_backend(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")))
    accel = accelerate.accelerator_for(unet, "compile")
    assert accel.mode == "compile"
    assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


def test_a_dead_cuda_context_is_not_retried_eagerly(unet, capsys):
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_stream(unet, "compile", backend=_raising_backend(ILLEGAL))
    assert accelerate.accelerator_for(unet, "compile").mode == "compile"
    assert "uncompiled" not in capsys.readouterr().err


def test_a_capture_that_runs_out_of_memory_is_not_a_reason_to_drop_graphs(unet, monkeypatch):
    class OomGraph:
        def capture(self, fn, args):
            raise torch.OutOfMemoryError("CUDA out of memory while capturing")

    monkeypatch.setattr(accelerate, "_EmulatedGraph", OomGraph)
    with pytest.raises(torch.OutOfMemoryError):
        run_stream(unet, "cudagraph", backend=CompileCounterWithBackend("eager"), emulate_graphs=True)
    assert accelerate.accelerator_for(unet, "cudagraph").mode == "cudagraph"


def test_a_module_call_hit_by_a_gpu_error_is_not_marked_uncompilable(unet):
    accel = accelerate.accelerator_for(unet, "compile", backend=_raising_backend(ILLEGAL))
    call = accel.wrap(torch.nn.Linear(3, 3).forward, "VAE decoder")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        call(torch.ones(2, 3))
    assert not call.failed


def test_a_dead_gpu_stops_the_engine_with_one_line(comps):
    """An illegal address poisons the CUDA context: passing frames through 'forever' would show
    a frozen or raw picture and errors forever. The engine stops with one line instead."""
    original = comps.vae.decode

    def dead(*a, **k):
        raise RuntimeError(ILLEGAL)

    comps.vae.decode = dead
    try:
        engine, _ = make_engine(comps, ListSource(synthetic_frames(12)), [])
        with pytest.raises(DeviceLost, match="the GPU failed and cannot go on") as caught:
            engine.run(install_signals=False)
    finally:
        comps.vae.decode = original
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 3
    assert "\n" not in str(caught.value) and "--accelerate off" in str(caught.value)


def test_a_graph_is_bound_to_shapes_and_the_cache_not_only_to_addresses(unet):
    _, pipe = run_stream(unet, "off", calls=3)
    accel = accelerate.StreamAccelerator(unet, "compile")
    args = pipe._call_args()
    key = accel.graph_key(args)
    assert accel.graph_key(args) == key
    # another step count's buffers at the same address (the caching allocator reuses freed blocks)
    latents = args[0]
    shorter = list(args)
    shorter[0] = latents.new_empty(0).set_(latents.untyped_storage(), 0, (latents.shape[0] - 1, *latents.shape[1:]))
    assert shorter[0].data_ptr() == latents.data_ptr()
    assert accel.graph_key(shorter) != key
    # a layer's cache replaced (a new stream) while every argument stayed
    layer = unet.temporal_layers[0]
    live = layer.kv_cache
    layer.kv_cache = live.clone()
    try:
        assert accel.graph_key(args) != key
    finally:
        layer.kv_cache = live


class _Recorder:
    """Stands in for the few torch.cuda calls a capture and a stream hand-over make, and writes
    down what happened in order."""

    def __init__(self):
        self.log = []
        self.current = 0
        rec = self

        class Stream:
            def __init__(self, device=None):
                self.device = torch.device(device) if device is not None else torch.device("cuda", rec.current)
                rec.log.append(("stream", str(self.device)))

            def wait_stream(self, other):
                rec.log.append(("wait", str(self.device), other.name))

            def synchronize(self):
                rec.log.append(("synchronize", str(self.device)))

            @property
            def name(self):
                return f"side:{self.device.index}"

        class Named:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                rec.log.append(("wait", self.name, other.name))

        self.Stream = Stream
        self.Named = Named

        class Graph:
            def replay(self):
                rec.log.append(("replay", rec.current))

        self.CUDAGraph = Graph

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, torch.device(device).index
        self.log.append(("device", self.current))
        try:
            yield
        finally:
            self.current = before

    def current_stream(self, device=None):
        return self.Named(f"current:{torch.device(device).index}")

    def default_stream(self, device=None):
        return self.Named(f"default:{torch.device(device).index}")

    @contextlib.contextmanager
    def stream(self, s):
        self.log.append(("on", str(s.device)))
        yield

    @contextlib.contextmanager
    def graph(self, g, stream=None, capture_error_mode="global", **kw):
        self.log.append(("capture", str(stream.device) if stream is not None else None, capture_error_mode, self.current))
        yield

    def install(self, monkeypatch):
        for name in ("Stream", "CUDAGraph", "device", "current_stream", "default_stream", "stream", "graph"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


def test_a_graph_is_captured_on_a_side_stream_of_its_own_card_in_thread_local_mode(monkeypatch):
    """On cuda:1, with cuda:0 current: a capture on a cuda:0 stream would record none of the
    kernels (they run on cuda:1's stream) and every replay would do nothing. Global capture mode
    would make the style loader's allocations and synchronisations on its own thread break it."""
    rec = _Recorder()
    rec.install(monkeypatch)
    graph = accelerate._CudaGraph("cuda:1")
    ran = []
    out = graph.capture(lambda *a: ran.append(rec.current) or ("eps", "x0"), (1, 2))
    assert out == ("eps", "x0") and ran == [1]  # the call ran inside the capture, on cuda:1
    capture = [e for e in rec.log if e[0] == "capture"]
    assert capture == [("capture", "cuda:1", "thread_local", 1)]
    assert rec.log.index(("wait", "cuda:1", "current:1")) < rec.log.index(capture[0])  # after the work queued before it
    assert rec.log.index(capture[0]) < rec.log.index(("wait", "current:1", "side:1"))  # the frames wait for the capture
    assert rec.current == 0  # the caller's device is current again
    graph.replay()
    assert rec.log[-1] == ("replay", 1)


def test_graph_warmup_calls_run_on_a_side_stream_of_the_unets_card(unet, monkeypatch):
    rec = _Recorder()
    rec.install(monkeypatch)
    accel = accelerate.StreamAccelerator(unet, "compile")
    monkeypatch.setattr(accel, "unet", types.SimpleNamespace(device=torch.device("cuda:1")))
    with accel._side_stream():
        assert rec.current == 1
    assert ("wait", "cuda:1", "current:1") in rec.log and ("on", "cuda:1") in rec.log


def test_the_style_loader_waits_for_the_frames_stream_before_it_reads_weights(monkeypatch):
    """With CUDA graphs a swap copies new values into the weights on the frames' (default)
    stream; the next load must not read them half-copied on its own stream."""
    from live2diff_engine.styles import StyleManager

    rec = _Recorder()
    rec.install(monkeypatch)
    fake = types.SimpleNamespace(comps=types.SimpleNamespace(device=torch.device("cuda:1")), _side_stream=None)
    with StyleManager._on_side_stream(fake) as side:
        assert rec.current == 1
        rec.log.append(("load",))
    assert side is fake._side_stream and str(side.device) == "cuda:1"
    assert rec.log.index(("wait", "cuda:1", "default:1")) < rec.log.index(("load",))
    assert rec.log.index(("on", "cuda:1")) < rec.log.index(("load",))


def test_float32_checks_on_a_gpu_run_without_tf32_and_say_so():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = True  # what a user's script might have set
    try:
        said = []
        with exact_float32("cuda:0", torch.float32, said.append):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)  # restored
        assert len(said) == 1 and "TF32 off" in said[0]
        for device, dtype in (("cuda", torch.float16), ("cpu", torch.float32)):  # nothing to do there
            with exact_float32(device, dtype, said.append):
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
        assert len(said) == 1
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def test_a_long_compile_says_how_long_it_has_been_running(unet, monkeypatch):
    """Issue 24: a 3.5-minute compile showed one line at its start. The compiler here waits until
    the progress line has been said (an event, not a clock), so the test holds on a busy machine."""
    import threading

    monkeypatch.setattr(accelerate, "TICK_S", 0.05)
    said, ticked = [], threading.Event()

    def say(line):
        said.append(line)
        if "compiling the stream step:" in line:
            ticked.set()

    def slow_backend(gm, example_inputs):
        ticked.wait(60)
        return gm.forward

    run_stream(unet, "compile", calls=2, backend=slow_backend, say=say)
    ticks = [ln for ln in said if ln.strip().startswith("compiling the stream step:")]
    assert ticked.is_set() and ticks and ticks[0].endswith("s so far ...")
    assert said.index(ticks[0]) < next(i for i, ln in enumerate(said) if ln.startswith("stream step compiled in"))


def test_each_size_of_a_compiled_module_call_is_checked_against_eager(unet, capsys):
    """A new size compiles a new version: its first call is checked too, not only the first
    call ever (a wrong kernel for the second size would otherwise stream unchecked)."""
    calls = []

    def wrong_for_wide_inputs(gm, example_inputs):
        def run(*args):
            out = gm(*args)
            if any(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] > 3 for t in example_inputs):
                calls.append("wrong")
                return [o * 2 for o in out] if isinstance(out, (list, tuple)) else out * 2
            return out

        return run

    accel = accelerate.accelerator_for(unet, "compile", backend=wrong_for_wide_inputs)
    conv = torch.nn.Conv2d(2, 2, 1)
    call = accel.wrap(conv.forward, "VAE decoder")
    narrow, wide = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(call(narrow), conv(narrow))
    torch.testing.assert_close(call(wide), conv(wide))  # the wrong second version caught at its first call
    assert calls and call.failed
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "the compiled VAE decoder does not match eager" in warnings[0]


def test_two_wrapped_methods_with_one_name_stay_apart(unet):
    """diffusers < 0.36 with accelerate's hooks names the VAE's encode and decode both "wrapper":
    keyed by name, the compiled decoder ran the encoder."""
    import functools

    accel = accelerate.accelerator_for(unet, "compile", backend=CompileCounterWithBackend("eager"))

    class Vae(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = self._hooked(lambda x: x + 1)
            self.decode = self._hooked(lambda x: x * 10)

        @staticmethod
        def _hooked(fn):
            @functools.wraps(fn)
            def wrapper(x):
                return fn(x)

            wrapper.__name__ = "wrapper"
            return wrapper

    vae = Vae()
    x = torch.ones(2)
    assert vae.encode.__name__ == vae.decode.__name__ == "wrapper"
    enc, dec = accel.wrap(vae.encode, "VAE encoder"), accel.wrap(vae.decode, "VAE decoder")
    assert enc is not dec
    torch.testing.assert_close(dec(x), x * 10)
    torch.testing.assert_close(enc(x), x + 1)
