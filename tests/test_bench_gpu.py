"""bench-gpu: the full-size random-weight model's layout (on the meta device: no memory, no time)
and the real command end to end on the tiny geometry on the CPU."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import GOLDEN, ROOT, run_cli

STAGES = ("upload", "depth", "encode", "unet", "decode", "download")


def test_full_unet_has_the_sd15_and_live2diff_layout():
    from live2diff_engine.models.full_random import build_full_unet

    unet = build_full_unet("meta")
    golden = json.loads((GOLDEN / "live2diff_full_keys.json").read_text())
    state = unet.state_dict()
    base = unet.base_state_keys()
    counts = golden["counts"]
    assert len(base) == counts["unet2d_state_dict_entries"]
    assert len(state) == counts["unet3d_streaming_state_dict_entries"]
    extra = {k: list(v.shape) for k, v in state.items() if k not in base}
    assert extra == {e["key"]: e["shape"] for e in golden["extra_keys"]}
    params = dict(unet.named_parameters())
    assert sum(p.numel() for k, p in params.items() if k in base) == 859_520_964  # SD1.5's UNet
    assert sum(p.numel() for k, p in params.items() if k not in base) == counts["extra_parameter_elements_total"]
    assert all(p.device.type == "meta" for p in params.values())
    # Buffers are computed for real: the positional tables are the sinusoids, not garbage.
    pe = unet.temporal_layers[0].pos_encoder.pe
    assert pe.device.type == "cpu" and float(pe[0, 0, 1]) == 1.0  # cos(0)


def test_full_vae_text_and_depth_geometry_on_meta():
    from live2diff_engine.depth import MidasHybrid
    from live2diff_engine.models.full_random import build_full_midas, build_full_taesd, build_full_text, build_full_vae

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(build_full_vae("meta")) == 83_653_863  # SD1.5's AutoencoderKL
    encoder, tokenizer = build_full_text("meta")
    assert count(encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert max(tokenizer("a photo").input_ids) < encoder.config.vocab_size
    assert count(build_full_taesd("meta")) == 2_445_063
    midas = build_full_midas("meta")
    assert isinstance(midas, MidasHybrid) and midas.size == (384, 384)
    assert midas.model.config.is_hybrid and midas.model.config.hidden_size == 768


def test_full_random_init_is_finite_and_unit_scale():
    import torch

    from live2diff_engine.models.full_random import build_full_taesd

    taesd = build_full_taesd("cpu", torch.float32)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = taesd.encode(x).latents
    y = taesd.decode(z).sample
    assert torch.isfinite(y).all() and 0.05 < float(z.std()) < 20 and float(y.abs().max()) < 100


def _bench(tmp_path, *args, timeout=600):
    # One thread: on a shared 2-core machine two OpenMP threads wait for each other's time slice
    # at every op, which makes the tiny model 20x slower.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "live2diff_engine", "bench-gpu", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )


def test_bench_gpu_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = _bench(tmp_path, "--device", "cpu", "--geometry", "tiny", "--modes", "off", "--frames", "3", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "stream step alone" in result.stdout and "frame pipeline" in result.stdout
    r = json.loads(out.read_text())
    assert r["card"] and r["torch"] and r["dtype"] == "float32" and r["size"] == "64x64"
    assert not r["errors"] and not r["skipped"]
    # The warmup's memory, per size, dtype and VAE: measured on CUDA only; here the fields are there, empty.
    assert [(m["size"], m["dtype"], m["vae"]) for m in r["warmup_memory"]] == [("64x64", "float32", "taesd"), ("64x64", "float32", "full")]
    assert all(m["warm"] and m["warmup_s"] > 0 and m["needs_mb"] is None and m["fits"] is None for m in r["warmup_memory"])
    assert "warmup memory" in result.stdout
    stream = r["stream"]["off"]
    assert stream["effective"] == "off" and stream["frames"] == 3 and stream["finite"]
    assert stream["ms_per_frame"] > 0 and stream["fps"] > 0 and stream["first_call_s"] > 0 and stream["first_calls"] == 1
    assert "warmup_peak_mb" in stream and stream["warmup_peak_mb"] is None
    for vae in ("taesd", "full"):
        f = r["pipeline"][vae]["off"]
        assert f["frames"] == 3 and f["fps"] > 0 and f["ms_per_frame"] > 0 and f["first_call_s"] > 0 and f["outputs"]
        assert all(f["stages_ms"][k] > 0 for k in STAGES), f["stages_ms"]
        # The timed stages lie inside the frame's wall time (none counted twice, none outside it);
        # "other" is what is left of it. Rounding: 3 decimals on each of the figures.
        timed = sum(v for k, v in f["stages_ms"].items() if k != "other")
        assert timed <= f["ms_per_frame"] + 0.01, (timed, f)
        assert f["stages_ms"]["other"] == pytest.approx(f["ms_per_frame"] - timed, abs=0.01)


def test_bench_gpu_budget_and_errors(tmp_path):
    out = tmp_path / "bench.json"
    result = _bench(tmp_path, "--device", "cpu", "--geometry", "tiny", "--modes", "off", "--budget-s", "0.001", "--json", out)
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert not r["stream"] and not r["pipeline"] and not r["warmup_memory"] and len(r["skipped"]) == 5
    assert "budget" in result.stderr and "skipped: stream step (off): budget" in result.stdout
    assert "skipped: warmup memory (64x64, float32, taesd VAE): budget" in result.stdout

    bad = _bench(tmp_path, "--device", "cpu", "--modes", "cudagraph")
    assert bad.returncode == 2 and "cudagraph needs a CUDA device" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    (tmp_path / "a_file").write_text("")
    unwritable = _bench(tmp_path, "--device", "cpu", "--geometry", "tiny", "--json", tmp_path / "a_file" / "bench.json")
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr and "Traceback" not in unwritable.stderr

    for option, value in (("--memory-sizes", "64x60"), ("--memory-dtypes", "half"), ("--parts", "memory,frames")):
        bad = run_cli("bench-gpu", "--device", "cpu", "--geometry", "tiny", option, value)
        assert bad.returncode == 2 and option in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_spent_budget_stops_a_timed_loop_after_one_frame():
    import torch

    from live2diff_engine.bench import gpu as bench_gpu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = bench_gpu.Settings(device=torch.device("cpu"), dtype=torch.float32, geometry="tiny", width=64, height=64, frames=50)
        models = bench_gpu.build_models(s)
        spent = bench_gpu.Budget(0.0)
        stream = bench_gpu.bench_stream_step(s, models["base"], models["prompt"], "off", spent)
        assert stream["frames"] == 1 and stream["ms_per_frame"] > 0
        frames = bench_gpu.bench_frame_pipeline(s, models["comps"]["taesd"], "taesd", "off", spent)
        assert frames["frames"] == 1 and frames["fps"] > 0 and frames["stages_ms"]["unet"] > 0
    finally:
        torch.set_num_threads(threads)


def test_sigterm_keeps_the_figures_so_far(tmp_path):
    """A slot that ends (``timeout`` sends SIGTERM) mid-run still leaves a table and the JSON."""
    import signal

    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "live2diff_engine", "bench-gpu", "--device", "cpu", "--geometry", "tiny", "--modes", "off",
         "--frames", "30", "--parts", "pipeline", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    try:
        for line in proc.stderr:
            if "frame pipeline (taesd VAE, off):" in line:  # the first measurement is in
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    r = json.loads(out.read_text())
    assert r["interrupted"] and r["pipeline"]["taesd"]["off"]["frames"] == 30 and "full" not in r["pipeline"]


def test_card_fit():
    from live2diff_engine.bench.gpu import OTHERS_MB, card_fit

    assert card_fit(None) is None
    assert card_fit(8 * 1024 - OTHERS_MB) == {"8": True, "12": True, "24": True}
    assert card_fit(8 * 1024 - OTHERS_MB + 1) == {"8": False, "12": True, "24": True}
    assert card_fit(30_000) == {"8": False, "12": False, "24": False}


def test_weights_of_a_pipeline_counted_once():
    import torch

    from live2diff_engine.bench import gpu as bench_gpu

    s = bench_gpu.Settings(device=torch.device("cpu"), dtype=torch.float32, geometry="tiny", width=64, height=64)
    comps = bench_gpu.build_models(s)["comps"]
    mods = lambda c: [c.unet, c.vae, c.text_encoder, c.depth]  # noqa: E731
    params = lambda c: {t.data_ptr(): t.numel() * t.element_size() for m in mods(c) for t in [*m.parameters(), *m.buffers()] if t is not None}  # noqa: E731
    for vae in ("taesd", "full"):
        assert bench_gpu._weights_bytes(comps[vae], "cpu") == sum(params(comps[vae]).values()) > 0
    assert bench_gpu._weights_bytes(comps["taesd"], "cpu") < bench_gpu._weights_bytes(comps["full"], "cpu")
    assert bench_gpu._weights_bytes(comps["full"]) == 0  # nothing on CUDA here


def test_modes_in_order_and_a_cuda_graphs_capture_in_its_first_call(monkeypatch):
    """The modes run in the order given (cudagraph before compile); a CUDA graph's first calls run
    until its capture (two real calls, then the capture, emulated here) and are timed as one
    figure; each measurement starts with the last one's graph released. torch.compile is left out
    (the identity): what is checked is the bench's own logic, not a compiler."""
    import torch

    from live2diff_engine.bench import gpu as bench_gpu
    from live2diff_engine.pipeline import accelerate

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    capture = accelerate._EmulatedGraph.capture
    captured = []

    def slow_capture(self, fn, args):
        time.sleep(0.3)  # a capture that takes time: it must be inside first_call_s
        captured.append(1)
        return capture(self, fn, args)

    monkeypatch.setattr(accelerate._EmulatedGraph, "capture", slow_capture)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = bench_gpu.Settings(device=torch.device("cpu"), dtype=torch.float32, geometry="tiny", width=64, height=64,
                               frames=2, modes=["off", "cudagraph", "compile"], vaes=["taesd"], parts=["stream", "pipeline"],
                               accelerator_options={"emulate_graphs": True})
        r = bench_gpu.run(s)
    finally:
        torch.set_num_threads(threads)
    assert not r["errors"] and not r["skipped"], r
    assert list(r["modes"]) == ["off", "cudagraph", "compile"] and list(r["stream"]) == ["off", "cudagraph", "compile"]
    assert {m: f["effective"] for m, f in r["modes"].items()} == {"off": "off", "cudagraph": "cudagraph", "compile": "compile"}
    graph = r["stream"]["cudagraph"]
    assert graph["first_calls"] == 3 and graph["first_call_s"] >= 0.3  # two real calls, then the capture and its replay
    assert r["stream"]["compile"]["first_calls"] == r["stream"]["off"]["first_calls"] == 1
    piped = r["pipeline"]["taesd"]["cudagraph"]
    assert piped["first_call_s"] >= 0.3 and piped["outputs"] and len(captured) == 2  # one capture per stream
    assert r["pipeline"]["taesd"]["off"]["first_calls"] == 2  # the first output comes a call later (2 steps)
