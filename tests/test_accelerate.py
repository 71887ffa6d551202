"""The accelerated stream call: compiled whole, never recompiled by a live change, falling back to
eager on failure, and giving the frames the eager (reference) path gives.

The tests trace with dynamo and run the traced graph with its "eager" backend behind a counter:
that checks what the compiler sees (no graph break, how many graphs) in seconds. Inductor for real
on the golden fixture is test_compiled_golden.py (minutes on a CPU: a file of its own, so that a
parallel test run starts it early and runs the rest beside it).
"""

import dataclasses

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import FIXTURE_A, build_mini_unet, run_cli
from live2diff_engine.errors import ConfigError
from live2diff_engine.models.tiny import build_tiny_unet, tiny_prompt_embeds
from live2diff_engine.pipeline import accelerate
from live2diff_engine.pipeline.accelerate import accelerator_for, exact_float32, resolve_mode, stream_call
from live2diff_engine.pipeline.frames import FramePipeline
from live2diff_engine.pipeline.schedule import make_schedule
from live2diff_engine.pipeline.stream import StreamPipeline
from live2diff_engine.styles import StyleManager, load_styles
from test_frames import clip
from test_styles import comps, ws  # noqa: F401  (fixtures: tiny models in real formats, styles file)

H = W = 8


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _latents(n, seed):
    return torch.randn(n, 4, H, W, generator=torch.Generator().manual_seed(seed))


def run_stream(unet, mode="off", calls=20, t_index_list=(32, 45), prompt_at=None, guidance=1.0, **options):
    """A latent stream of ``calls`` frames; at call ``prompt_at`` the prompt changes. Returns the
    finished latents and the pipeline."""
    pipe = StreamPipeline(unet, make_schedule(50, t_index_list=list(t_index_list)), (H, W),
                          generator=torch.Generator(device=unet.device).manual_seed(1), guidance_scale=guidance,
                          accelerate=mode, accelerator_options=options or None)
    pipe.set_prompt_embeds(tiny_prompt_embeds(0))
    if guidance > 1:
        pipe.set_negative_embeds(tiny_prompt_embeds(5))
    x = _latents(8, 2)
    pipe.prepare(x, x.flip(0))
    out = []
    for i in range(calls):
        if i == prompt_at:
            pipe.set_prompt_embeds(tiny_prompt_embeds(9))
        out.append(pipe.step(x[i % 8 : i % 8 + 1], x[(i + 3) % 8 : (i + 3) % 8 + 1]).clone())
    return torch.cat(out), pipe


@pytest.fixture(scope="module")
def unet():
    return build_mini_unet()


@pytest.fixture(scope="module")
def mini_comps(comps):
    """The tiny models in real formats (VAE, text encoder, depth) around a two-level UNet of their
    own: the frame pipeline and the engine with a compiled stream call, where no style is needed."""
    return dataclasses.replace(comps, unet=build_mini_unet())


@pytest.fixture(scope="module")
def tiny_unet():
    return build_tiny_unet(0)


def test_modes_resolve_per_device():
    assert resolve_mode("auto", "cpu") == "off"  # compiling costs minutes on a CPU: see BENCHMARKS.md
    assert resolve_mode("auto", "cuda") == "cudagraph"
    assert resolve_mode("compile", "cpu") == "compile"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_mode("cudagraph", "cpu")
    with pytest.raises(ConfigError, match="use one of off, compile, cudagraph, auto"):
        resolve_mode("fast", "cpu")


def test_the_stream_call_has_no_graph_break(tiny_unet):
    unet = tiny_unet
    _, pipe = run_stream(unet, calls=2)
    args = pipe._call_args()
    snapshot = [t.clone() for t in (pipe._latents, pipe._depth, *unet.cache_tensors())]
    explained = torch._dynamo.explain(stream_call)(unet, *args)
    for live, saved in zip((pipe._latents, pipe._depth, *unet.cache_tensors()), snapshot):
        live.copy_(saved)  # explain ran the call once
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_compiled_stream_gives_the_eager_frames_with_one_graph_for_the_whole_stream(unet, guidance):
    eager, _ = run_stream(unet, "off", prompt_at=7, guidance=guidance)
    counter = CompileCounterWithBackend("eager")
    compiled, pipe = run_stream(unet, "compile", prompt_at=7, guidance=guidance, backend=counter)
    assert pipe.accelerated == "compile"
    assert counter.frame_count == 1  # fullgraph: one graph, compiled once, for every call of the stream
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_a_new_stream_of_the_same_shape_reuses_the_compiled_call_and_new_steps_compile_once_more(unet):
    counter = CompileCounterWithBackend("eager")
    run_stream(unet, "compile", calls=4, backend=counter)
    run_stream(unet, "compile", calls=4, t_index_list=(40, 48))  # other timesteps (a strength change): same shapes
    assert counter.frame_count == 1
    run_stream(unet, "compile", calls=4, t_index_list=(20, 32, 45))  # three steps: new shapes
    assert counter.frame_count == 2


def test_a_compiler_failure_falls_back_to_eager_with_one_warning_line(unet, capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("injected compiler failure\nsecond line of a long compiler report")

    eager, _ = run_stream(unet, "off")
    out, pipe = run_stream(unet, "compile", backend=broken_backend)
    assert pipe.accelerated == "off"
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "injected compiler failure" in warnings[0] and "uncompiled" in warnings[0]
    assert not any("Traceback" in line or "second line" in line for line in err)


def _wrong_kernel(unet, where):
    """A compiler backend that runs the traced graph and then gets one thing wrong, as a broken
    kernel would: the noise prediction (``output``), or a KV-cache slot no call should write
    (``cache``: the frames of this call are right, the state it leaves is not)."""
    def backend(gm, example_inputs):
        def run(*args):
            out = gm(*args)
            if where == "output":
                out[0].add_(0.5)
            else:
                unet.cache_tensors()[3][0, :, :, :, 2].add_(1.0)  # a sink slot of one layer
            return out
        return run
    return backend


@pytest.mark.parametrize("where", ["output", "cache"])
def test_a_wrong_compiled_kernel_is_caught_at_its_first_call_and_the_stream_goes_on_eager(unet, where, capsys):
    """A live engine never trusts a compiler unchecked: the first compiled call runs, then eager
    runs on a copy of the state it started from, and everything it wrote is compared. A mismatch
    keeps eager's frame and state, says so in one line and streams on eager, frame for frame."""
    eager, _ = run_stream(unet, "off", prompt_at=7)
    out, pipe = run_stream(unet, "compile", prompt_at=7, backend=_wrong_kernel(unet, where))
    assert pipe.accelerated == "off"
    torch.testing.assert_close(out, eager, rtol=0, atol=0)  # the wrong call's results never reached the stream
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "compiled stream step does not match eager (relative error" in warnings[0]
    assert "2 steps at latent 8x8" in warnings[0] and "goes on uncompiled" in warnings[0]
    [check] = pipe.accelerator.checks
    assert not check["passed"] and check["error"] > 1e-2


def test_a_right_compiled_call_is_checked_once_and_kept(unet, capsys):
    out, pipe = run_stream(unet, "compile", calls=12, backend=CompileCounterWithBackend("eager"))
    eager, _ = run_stream(unet, "off", calls=12)
    assert pipe.accelerated == "compile"
    [check] = pipe.accelerator.checks  # the first call only
    assert check["passed"] and check["error"] < 1e-5 and check["what"] == "compiled stream step"
    assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


def test_a_wrong_graph_replay_is_caught_and_the_stream_goes_on_compiled(unet, capsys, monkeypatch):
    class WrongGraph(accelerate._EmulatedGraph):
        def replay(self):
            super().replay()
            self.args[accelerate.CARRY].mul_(1.5)  # the rows moved on to their next step, wrong

    monkeypatch.setattr(accelerate, "_EmulatedGraph", WrongGraph)
    eager, _ = run_stream(unet, "off", prompt_at=9)
    out, pipe = run_stream(unet, "cudagraph", prompt_at=9, backend=CompileCounterWithBackend("eager"), emulate_graphs=True)
    assert pipe.accelerated == "compile"
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "CUDA-graph stream step does not match eager" in warnings[0]
    assert "without CUDA graphs" in warnings[0]
    assert [c["what"] for c in pipe.accelerator.checks] == ["compiled stream step", "CUDA-graph stream step"]


def test_graph_capture_replays_real_calls_only_and_recaptures_for_new_buffers(unet):
    """The CUDA-graph logic on the CPU (emulated graph: capture records, replay runs): two real
    warm-up calls, then one capture replayed for every later call; the frames are the eager ones
    across a prompt change and a new stream."""
    eager, _ = run_stream(unet, "off", prompt_at=9)
    counter = CompileCounterWithBackend("eager")
    graphed, pipe = run_stream(unet, "cudagraph", prompt_at=9, backend=counter, emulate_graphs=True)
    accel = pipe._accel
    assert pipe.accelerated == "cudagraph" and accel.captures == 1
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    again, pipe2 = run_stream(unet, "cudagraph", prompt_at=9)  # the same accelerator, new buffers
    assert pipe2._accel is accel and accel.captures == 2 and counter.frame_count == 1
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-6)


def test_a_failed_capture_falls_back_to_the_compiled_call(unet, capsys, monkeypatch):
    class FailingGraph:
        def capture(self, fn, args):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(accelerate, "_EmulatedGraph", FailingGraph)
    eager, _ = run_stream(unet, "off")
    out, pipe = run_stream(unet, "cudagraph", backend=CompileCounterWithBackend("eager"), emulate_graphs=True)
    assert pipe.accelerated == "compile"
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "without CUDA graphs" in warnings[0]


def test_a_module_call_that_fails_to_compile_runs_uncompiled_with_one_warning_line(mini_comps, capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernel for this op")

    accelerator_for(mini_comps.unet, "compile", backend=CompileCounterWithBackend("eager"))
    fp = FramePipeline(mini_comps, width=64, height=64, prompt="a cat", seed=1, accelerate="compile")
    decode = fp.stream.accelerator.wrap(mini_comps.vae.decode, "VAE decoder")
    assert fp.stream.accelerator.wrap(mini_comps.vae.decode, "VAE decoder") is decode  # made once
    decode.compiled = torch.compile(mini_comps.vae.decode, backend=broken_backend)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode(latent, return_dict=False)[0], mini_comps.vae.decode(latent, return_dict=False)[0])
    decode(latent, return_dict=False)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warnings == ["warning: compiling the VAE decoder failed (RuntimeError: no kernel for this op); it goes on uncompiled"]


def test_a_wrong_compiled_vae_call_is_caught_and_runs_uncompiled(mini_comps, capsys):
    accel = accelerator_for(mini_comps.unet, "compile", backend=CompileCounterWithBackend("eager"))
    decode = accel.wrap(mini_comps.vae.decode, "VAE decoder")  # the one the frame pipeline will use
    right = decode.compiled
    decode.compiled = lambda *a, **k: (right(*a, **k)[0] * 0.5,)  # a kernel that halves the picture
    # Its first call, and so its check against eager, is the build's (the VAE compiles while loading).
    fp = FramePipeline(mini_comps, width=64, height=64, prompt="a cat", seed=1, accelerate="compile")
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the compiled VAE decoder does not match eager")
    assert warnings[0].endswith("it goes on uncompiled")
    assert fp.stream.accelerator.wrap(mini_comps.vae.decode, "VAE decoder") is decode
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = mini_comps.vae.decode(latent, return_dict=False)[0]
    torch.testing.assert_close(decode(latent, return_dict=False)[0], want, rtol=0, atol=0)  # uncompiled from now on
    assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


def _frames_through_live_changes(comps, ws, mode):
    """Frames of a stream that changes prompt, style (LoRA, DreamBooth + LoRA) and strength live."""
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    fp = FramePipeline(comps, width=64, height=64, prompt="a photo of a cat", seed=1, accelerate=mode)
    manager.apply("default", fp)
    changes = {
        12: lambda: fp.set_prompt("a watercolor dog"),
        15: lambda: manager.apply("lora1", fp),
        18: lambda: manager.apply("dblora", fp),
        21: lambda: fp.set_schedule(50, strength=0.04),  # two other timesteps: a re-warmup, same shapes
        30: lambda: manager.apply("default", fp),
    }
    out = []
    for i, frame in enumerate(clip(34, seed=2)):
        if i in changes:
            changes[i]()
        out += fp.push(frame)
    out += fp.flush()
    manager.apply("default", fp)
    assert [i for i, _ in out] == list(range(34))
    return np.stack([img for _, img in out]), fp


def test_prompt_style_and_strength_changes_never_recompile_and_frames_match_eager(comps, ws):
    eager, _ = _frames_through_live_changes(comps, ws, "off")
    counter = CompileCounterWithBackend("eager")
    accelerator_for(comps.unet, "compile", backend=counter)
    compiled, fp = _frames_through_live_changes(comps, ws, "compile")
    assert fp.stream.accelerated == "compile"
    # One graph for the stream call, one for the VAE encoder (frame + depth), one for the decoder;
    # the warmup's encode stays eager.
    assert counter.frame_count == 3
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1


def test_the_frame_pipeline_compiles_while_loading_not_on_the_first_live_frames(mini_comps):
    counter = CompileCounterWithBackend("eager")
    accelerator_for(mini_comps.unet, "compile", backend=counter)
    fp = FramePipeline(mini_comps, width=64, height=64, prompt="a cat", seed=1, accelerate="compile")
    assert counter.frame_count == 3  # the stream call, the VAE encoder, the decoder: before the first frame arrives
    eager = FramePipeline(mini_comps, width=64, height=64, prompt="a cat", seed=1, accelerate="off")
    frames = clip(12, seed=4)
    a = [img for f in frames for _, img in fp.push(f)] + [img for _, img in fp.flush()]
    assert counter.frame_count == 3  # nothing more while streaming
    b = [img for f in frames for _, img in eager.push(f)] + [img for _, img in eager.flush()]
    assert len(a) == len(b) == 12
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)) <= 1


def test_check_reference_tolerance_options(tmp_path):
    loose = run_cli("check-reference", FIXTURE_A, "--rtol", "0.5", "--atol", "0.5", "--accelerate", "off")
    assert loose.returncode == 0 and "rtol 0.5, atol 0.5" in loose.stdout.strip().splitlines()[-1]
    strict = run_cli("check-reference", FIXTURE_A, "--rtol", "0", "--atol", "1e-12", "--accelerate", "off")
    assert strict.returncode == 1 and "mismatch" in strict.stdout
    half = run_cli("check-reference", FIXTURE_A, "--dtype", "float16", "--accelerate", "off")
    assert half.returncode == 1 and "judge it with --rtol/--atol" in half.stdout  # float32's tolerance is too tight
    half = run_cli("check-reference", FIXTURE_A, "--dtype", "float16", "--rtol", "2e-2", "--atol", "2e-2", "--accelerate", "off")
    assert half.returncode == 0, half.stdout[-1500:]  # the looser, stated tolerance for half precision
    bad = run_cli("check-reference", FIXTURE_A, "--rtol", "-1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--rtol" in bad.stderr
    cuda = run_cli("check-reference", FIXTURE_A, "--accelerate", "cudagraph")
    assert cuda.returncode == 2 and "needs a CUDA device" in cuda.stderr and "Traceback" not in cuda.stderr


@pytest.mark.gpu
def test_cuda_graph_stream_matches_eager_on_the_gpu():
    unet_gpu = build_tiny_unet(0, device="cuda")
    with exact_float32("cuda", torch.float32):  # TF32's 10-bit mantissa would blur the comparison
        eager, _ = run_stream(unet_gpu, "off", prompt_at=9)
        graphed, pipe = run_stream(unet_gpu, "cudagraph", prompt_at=9)
    assert pipe.accelerated == "cudagraph" and pipe._accel.captures == 1
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-4)


def test_the_engine_status_says_compiling_while_a_steps_change_compiles(mini_comps, capsys):
    from live2diff_engine.bench.stream import _cycled
    from live2diff_engine.engine import Engine
    from live2diff_engine.io.sinks import NullSink

    counter = CompileCounterWithBackend("eager")
    accelerator_for(mini_comps.unet, "compile", backend=counter)
    fp = FramePipeline(mini_comps, width=64, height=64, prompt="a cat", seed=1, accelerate="compile")
    frames = clip(24, seed=3)
    states = []
    engine = Engine(fp, _cycled(frames, 24), [NullSink()], output_size=(64, 64), status=False,
                    on_output=lambda *a: states.append(engine.stats.state))
    say = fp.stream.accelerator.say
    fp.stream.accelerator.say = lambda text: (say(text), states.append(engine.stats.state))
    fp.set_schedule(50, t_index_list=[20, 32, 45])  # three steps: applied at the next frame, compiled once more
    engine.run(install_signals=False)
    assert counter.frame_count >= 2
    assert "compiling" in states  # the status said so while the compiler ran
    assert states[-1] == "streaming"
    assert "compiling the stream step for 3 steps" in capsys.readouterr().err


def test_the_cpu_stream_attention_computes_what_sdpa_computes():
    """The CPU's stream attention adds the slots' positions to the scores and the output instead of
    to the cached keys and values; the same numbers as SDPA on keys and values with positions, and
    as attention written out by hand."""
    from live2diff_engine.models.motion import stream_attention

    g = torch.Generator().manual_seed(0)
    T, d, heads, hd, W = 3, 64, 4, 8, 16
    q = torch.randn(T, d, heads, hd, generator=g)
    k, v = (torch.randn(T, d, heads, W, hd, generator=g) for _ in range(2))
    pk, pv = (torch.randn(T, W, heads, hd, generator=g) for _ in range(2))
    bias = torch.zeros(T, W)
    bias[0, 9:] = float("-inf")  # closed slots, as the bookkeeping marks them
    bias[1, 12:] = float("-inf")
    cpu = stream_attention(q, k, v, pk, pv, bias, sdpa=False)
    torch.testing.assert_close(cpu, stream_attention(q, k, v, pk, pv, bias, sdpa=True), rtol=1e-5, atol=1e-6)
    keys, values = k + pk.transpose(1, 2)[:, None], v + pv.transpose(1, 2)[:, None]  # [T, d, heads, W, hd]
    scores = (q.unsqueeze(-2) * keys).sum(-1) / hd**0.5 + bias[:, None, None, :]
    by_hand = (scores.softmax(-1).unsqueeze(-1) * values).sum(-2)
    torch.testing.assert_close(cpu, by_hand, rtol=1e-5, atol=1e-6)


def test_check_accelerate_judges_each_step_count_against_eager_and_reports_a_fallback():
    """The GPU check's accelerated-against-eager pass (check-accelerate), rehearsed on the CPU with
    the two-level UNet and dynamo's eager backend: a right compiler passes every case; a wrong
    kernel is caught by the engine's first-call check, and the case says it fell back."""
    from live2diff_engine.bench import accelerate as ca

    settings = ca.Settings(device=torch.device("cpu"), dtypes=[torch.float32], steps=[3, 1], modes=["compile"],
                           guidance=[1.0, 2.0], geometry="tiny", width=64, height=64, calls=10, unet=build_mini_unet(),
                           accelerator_options={"backend": CompileCounterWithBackend("eager")})
    result = ca.run(settings)
    assert [(c["steps"], c["guidance"]) for c in result["cases"]] == [(3, 1.0), (3, 2.0), (1, 1.0), (1, 2.0)]
    assert all(c["ok"] and c["in_use"] == "compile" and c["worst_frame_error"] < 1e-5 for c in result["cases"])
    assert all(c["engine_checks"][0]["passed"] for c in result["cases"])
    assert ca.table(result).splitlines()[-1] == "4/4 accelerated streams match eager"

    wrong = ca.run(dataclasses.replace(settings, steps=[1], guidance=[1.0],
                                       accelerator_options={"backend": _wrong_kernel(None, "output")}))
    [case] = wrong["cases"]
    assert not case["ok"] and case["in_use"] == "off" and not case["engine_checks"][0]["passed"]
    assert "FELL BACK to off" in ca.table(wrong) and ca.table(wrong).endswith("0/1 accelerated streams match eager")


def test_check_accelerate_options_are_checked_in_one_line():
    for args, says in ((["--steps", "5"], "--steps takes step counts from 1 to 4"),
                       (["--dtypes", "float8"], "--dtypes takes"),
                       (["--modes", "cudagraph", "--device", "cpu"], "cudagraph needs a CUDA device"),
                       (["--guidance", "0.5"], "--guidance takes")):
        result = run_cli("check-accelerate", "--geometry", "tiny", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_a_compile_backend_from_the_environment_compiles_for_real_and_a_bad_one_is_one_line(unet, monkeypatch):
    """LIVE2DIFF_COMPILE_BACKEND (for checks: the fleet's tests): the stream call is traced by dynamo
    (the compiler's count of graphs goes up) and run by that backend, giving eager's frames."""
    from live2diff_engine.pipeline.accelerate import StreamAccelerator, compiled_graphs

    monkeypatch.setenv("LIVE2DIFF_COMPILE_BACKEND", "no-such-backend")
    with pytest.raises(ConfigError, match=r"^LIVE2DIFF_COMPILE_BACKEND=no-such-backend is no torch.compile backend; "
                                          r"use one of .*eager.*, or unset it \(inductor\)$"):
        StreamAccelerator(unet, "compile")
    monkeypatch.setenv("LIVE2DIFF_COMPILE_BACKEND", "eager")
    unet = build_mini_unet()  # its own accelerator store: none made by the tests before
    graphs = compiled_graphs()
    compiled, pipe = run_stream(unet, "compile", calls=6)
    assert pipe.accelerator.backend == "eager" and pipe.accelerated == "compile"
    assert compiled_graphs() == graphs + 1 and len(pipe.accelerator.compile_seconds) == 1
    monkeypatch.delenv("LIVE2DIFF_COMPILE_BACKEND")
    eager, _ = run_stream(unet, "off", calls=6)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_the_compile_cache_lives_where_the_readme_says(monkeypatch, tmp_path):
    """README: compiled code is cached in ~/.cache/live2diff/compile (or $LIVE2DIFF_HOME/cache/compile);
    TORCHINDUCTOR_CACHE_DIR overrides. (conftest puts TORCHINDUCTOR_CACHE_DIR back after the test.)"""
    import os

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LIVE2DIFF_HOME", str(tmp_path / "home"))
    folder = accelerate.configure_cache()
    assert folder == str(tmp_path / "home" / "cache" / "compile") and os.path.isdir(folder)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder  # where inductor then writes
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("LIVE2DIFF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert accelerate.configure_cache() == str(tmp_path / "user" / ".cache" / "live2diff" / "compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert accelerate.configure_cache() == str(tmp_path / "mine") and os.path.isdir(tmp_path / "mine")
