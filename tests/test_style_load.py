"""A style switch prepares the new weights beside the running stream: the output goes on while a
DreamBooth checkpoint (saved in the real single-file format) loads and LoRAs (kohya format) are
fused, and only the swap of the prepared tensors happens between two frames."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE_A, run_cli
from live import LiveEngine, PacedSource, wait_for
from live2diff_engine.control.controller import live_t_index
from live2diff_engine.control.schema import command_message
from live2diff_engine.depth import build_tiny_depth
from live2diff_engine.models.components import load_components
from live2diff_engine.pipeline.frames import FramePipeline
from live2diff_engine.styles import StyleManager, load_styles
from sd_formats import expected_single_file_weights, save_kohya_lora, save_single_file, save_tiny_sd
from test_frames import clip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd = save_tiny_sd(root / "sd", seed=0)
    motion = load_file(str(FIXTURE_A / "live2diff_motion.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in motion.items()}}, root / "live2diff.ckpt")
    build_tiny_depth("midas", seed=0, size=64).model.save_pretrained(root / "midas")
    save_single_file(sd, root / "dreambooth.safetensors", seed_offset=1)
    save_kohya_lora(sd, root / "style_lora.safetensors", seed=3)
    (root / "not_a_checkpoint.safetensors").write_bytes(b"this is a text file, not weights\n" * 10)
    (root / "styles.toml").write_text(
        f"""
[styles.db]
dreambooth = "{root / 'dreambooth.safetensors'}"
template = "cartoon, {{}}"
clip_skip = 2

[styles.lora]
loras = [{{ file = "{root / 'style_lora.safetensors'}", scale = 0.8 }}]
template = "sketch, {{}}"

[styles.dblora]
dreambooth = "{root / 'dreambooth.safetensors'}"
loras = [{{ file = "{root / 'style_lora.safetensors'}", scale = 0.7 }}]
template = "ink, {{}}"

[styles.three_steps]
t_index_list = [20, 32, 45]

[styles.broken]
dreambooth = "{root / 'not_a_checkpoint.safetensors'}"
"""
    )
    return root


def load(ws):
    return load_components(base=str(ws / "sd"), motion=str(ws / "live2diff.ckpt"), depth="midas",
                           depth_source=str(ws / "midas"), lcm_lora=None)


@pytest.fixture(scope="module")
def comps(ws):
    return load(ws)


def weights(comps) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part, m in (("unet", comps.unet), ("te", comps.text_encoder), ("vae", comps.vae))
            for k, v in m.state_dict().items()}


class Held:
    """A style_load_hook that holds the loader thread (the style's weights read and converted,
    not yet swapped in) until released."""

    def __init__(self):
        self.loaded = threading.Event()
        self.release = threading.Event()
        self.styles: list[str] = []

    def __call__(self, style) -> None:
        self.styles.append(style.name)
        self.loaded.set()
        assert self.release.wait(120), "the test never released the loader"


def live_engine(comps, ws) -> LiveEngine:
    live = LiveEngine(comps, PacedSource(fps=20))
    live.manager.styles = load_styles(ws / "styles.toml")
    return live


def submit(live, cmd: str, **args) -> list[dict]:
    replies: list[dict] = []
    live.controller.submit(command_message(cmd, **args), replies.append)
    return replies


def test_the_stream_goes_on_while_a_dreambooth_style_loads(comps, ws):
    before = weights(comps)
    held = Held()
    with live_engine(comps, ws) as live:
        live.controller.style_load_hook = held
        live.wait_outputs(12)
        replies = submit(live, "set_style", style="db")
        assert held.loaded.wait(120), "the loader never finished reading the checkpoint"
        # Read and converted, not yet in: the stream runs on the old weights meanwhile.
        assert live.controller.status()["style_loading"] == "db"
        n = len(live.outputs)
        live.wait_outputs(n + 6)
        assert replies == [] and live.manager.current.name == "default" and comps.dreambooth is None
        assert live.controller.status()["style"] == "default"
        r = run_cli("ctl", "status", "--api", live.api.url, timeout=120)
        assert r.returncode == 0 and "style: default (loading db ...)" in r.stdout, r.stderr
        held.release.set()
        wait_for(lambda: replies, timeout=60, what="the set_style reply")
        assert replies[0]["ok"] is True and not replies[0].get("superseded")
        assert live.manager.current.name == "db" and comps.dreambooth == str(ws / "dreambooth.safetensors")
        status = live.controller.status()
        assert status["style"] == "db" and status["style_loading"] is None
        assert (live.frames.template, live.frames.clip_skip) == ("cartoon, {}", 2)
        n = len(live.outputs)
        live.wait_outputs(n + 4)  # and on with the new weights
        assert live.engine.stats.errors == 0
        after = weights(comps)
        # back to the base, beside the stream too, for the other tests
        held.release.clear()
        held.loaded.clear()
        replies = submit(live, "set_style", style="default")
        assert held.loaded.wait(120)
        n = len(live.outputs)
        live.wait_outputs(n + 3)
        held.release.set()
        wait_for(lambda: replies, timeout=60, what="the reply")
        assert replies[0]["ok"] and live.manager.current.name == "default"
    # The weights the switch put in are the checkpoint's, exactly as a synchronous switch on a
    # freshly loaded model puts them; going back restores the base exactly.
    expected = expected_single_file_weights(ws / "sd", seed_offset=1)["unet"]
    assert all(torch.equal(after[f"unet.{k}"], v) for k, v in expected.items())
    fresh = load(ws)
    StyleManager(fresh, load_styles(ws / "styles.toml")).apply("db")
    reference = weights(fresh)
    assert set(after) == set(reference) and all(torch.equal(after[k], reference[k]) for k in reference)
    now = weights(comps)
    assert all(torch.equal(now[k], v) for k, v in before.items())


def _stream(comps, manager, frames_in, switch_at=None, switch=None, style="default") -> list[np.ndarray]:
    """The frames of a stream on ``comps`` in ``style``, with ``switch(manager, fp)`` before frame
    ``switch_at``."""
    fp = FramePipeline(comps, width=64, height=64, prompt="a photo of a cat", seed=1)
    manager.apply(style, fp)
    out = []
    for i, f in enumerate(frames_in):
        if i == switch_at:
            switch(manager, fp)
        out += fp.push(f)
    out += fp.flush()
    assert [i for i, _ in out] == list(range(len(frames_in)))
    return [img for _, img in out]


def _prepared_beside(manager, fp, name):
    """The style prepared on another thread (as the controller's loader does), then swapped in."""
    result = {}
    t = threading.Thread(target=lambda: result.update(p=manager.prepare(name, texts=(fp.prompt, fp.negative_prompt))))
    t.start()
    t.join(120)
    manager.apply(name, fp, prepared=result["p"])
    assert manager.last_prepare_s > 0 and manager.last_swap_s > 0


@pytest.mark.parametrize("name", ["db", "dblora"])
def test_the_frames_after_a_switch_are_those_of_the_style(comps, ws, name):
    """After a switch prepared beside the stream, the models make exactly the frames of models
    loaded afresh and given the style before their first frame; and the stream that switched goes
    on exactly as one whose switch was made whole between the same two frames."""
    styles = load_styles(ws / "styles.toml")
    frames_in = clip(18, seed=2)
    manager = StyleManager(comps, styles)
    try:
        switched = _stream(comps, manager, frames_in, 9, lambda m, fp: _prepared_beside(m, fp, name))
        after = _stream(comps, manager, frames_in, style=name)  # a new stream on the switched models
    finally:
        manager.apply("default")
    fresh = load(ws)
    fresh_manager = StyleManager(fresh, styles)
    direct = _stream(fresh, fresh_manager, frames_in, style=name)
    assert all(np.array_equal(a, b) for a, b in zip(after, direct))
    whole = _stream(fresh, fresh_manager, frames_in, 9, lambda m, fp: m.apply(name, fp), style="default")
    assert all(np.array_equal(a, b) for a, b in zip(switched, whole))
    assert not np.array_equal(switched[-1], _stream(fresh, fresh_manager, frames_in)[-1])  # the style changed them


def test_a_swap_rebinds_the_weights_and_copies_them_in_where_a_cuda_graph_needs_their_addresses(comps, ws):
    """The Parameter objects and modules stay; without a CUDA graph each weight's values are
    rebound (no copy between frames), with one (an emulated graph here) they are copied into the
    weights' own memory. Both give the same frames."""
    from live2diff_engine.pipeline.accelerate import accelerator_for

    styles = load_styles(ws / "styles.toml")
    frames_in = clip(14, seed=3)
    params = {n: p for n, p in comps.unet.named_parameters()}
    conv = "down_blocks.0.resnets.0.conv1.weight"  # changed by the DreamBooth
    seen = {}

    def switch(copy_in):
        def run(manager, fp):
            manager.copy_in = copy_in
            ptr = params[conv].data_ptr()
            _prepared_beside(manager, fp, "dblora")
            assert all(p is params[n] for n, p in comps.unet.named_parameters())  # the same Parameter objects
            seen[copy_in] = params[conv].data_ptr() == ptr
        return run

    manager = StyleManager(comps, styles)
    try:
        rebound = _stream(comps, manager, frames_in, 8, switch(False))
        manager.apply("default")
        copied = _stream(comps, manager, frames_in, 8, switch(True))
    finally:
        manager.copy_in = None
        manager.apply("default")
    assert seen == {False: False, True: True}
    assert all(np.array_equal(a, b) for a, b in zip(rebound, copied))
    # What decides it by itself: a stream call captured in a CUDA graph on these weights.
    store = comps.unet.__dict__.setdefault("_stream_accelerators", {})
    saved = dict(store)
    try:
        assert StyleManager(comps, styles).copies_in() is False
        accelerator_for(comps.unet, "cudagraph", emulate_graphs=True)
        assert StyleManager(comps, styles).copies_in() is True
    finally:
        store.clear()
        store.update(saved)


def test_a_compiled_stream_call_reads_the_rebound_weights(comps, ws):
    """torch.compile takes the weights as inputs of the stream call: after a swap that rebinds
    them, the compiled call (dynamo, eager backend) makes the frames of the eager one, with no
    recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from live2diff_engine.pipeline.accelerate import accelerator_for

    styles = load_styles(ws / "styles.toml")
    frames_in = clip(12, seed=4)
    weight = comps.unet.conv_in.weight

    def run(accelerate):
        manager = StyleManager(comps, styles)
        fp = FramePipeline(comps, width=64, height=64, prompt="a photo of a cat", seed=1, accelerate=accelerate)
        manager.apply("default", fp)
        out = []
        try:
            for i, f in enumerate(frames_in):
                if i == 8:
                    ptr = weight.data_ptr()
                    _prepared_beside(manager, fp, "db")
                    assert weight.data_ptr() != ptr  # rebound, not copied
                out += fp.push(f)
            out += fp.flush()
        finally:
            manager.apply("default", fp)
        return np.stack([img for _, img in out]), fp

    store = comps.unet.__dict__.setdefault("_stream_accelerators", {})
    saved = dict(store)
    try:
        eager, _ = run("off")
        counter = CompileCounterWithBackend("eager")
        accelerator_for(comps.unet, "compile", backend=counter)
        compiled, fp = run("compile")
        assert fp.stream.accelerated == "compile"
        assert counter.frame_count == 3  # the stream call, the VAE encoder and decoder: once each
    finally:
        store.clear()
        store.update(saved)
    assert len(compiled) == len(eager) == 12
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1


def test_a_lora_style_is_fused_on_the_loader_thread(comps, ws, monkeypatch):
    """Reading the LoRA and fusing it (diffusers and peft) happen where prepare runs; the swap
    between frames fuses nothing, and the live modules never hold adapter layers."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    styles = load_styles(ws / "styles.toml")
    threads = []
    original = StableDiffusionPipeline.load_lora_weights

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        assert not any(isinstance(m, BaseTunerLayer) for m in comps.unet.modules())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", recording)
    before = weights(comps)
    manager = StyleManager(comps, styles)
    fp = FramePipeline(comps, width=64, height=64, prompt="a photo of a cat", seed=1)
    manager.apply("default", fp)
    result = {}
    loader = threading.Thread(target=lambda: result.update(p=manager.prepare("lora", texts=(fp.prompt, fp.negative_prompt))),
                              name="style-load")
    loader.start()
    loader.join(120)
    assert threads == ["style-load"]
    now = weights(comps)
    assert all(torch.equal(now[k], v) for k, v in before.items())  # prepared: nothing changed yet

    def no_fusing(*args, **kwargs):
        raise AssertionError("fused between frames")

    monkeypatch.setattr(StyleManager, "_fuse_beside", no_fusing)
    try:
        manager.apply("lora", fp, prepared=result["p"])
        assert threads == ["style-load"] and fp.template == "sketch, {}"
        assert not any(isinstance(m, BaseTunerLayer) for model in (comps.unet, comps.text_encoder) for m in model.modules())
        fused = weights(comps)
    finally:
        monkeypatch.undo()
        manager.apply("default", fp)
    reference = load(ws)
    StyleManager(reference, styles).apply("lora")
    expected = weights(reference)
    assert all(torch.equal(fused[k], expected[k]) for k in expected)
    assert sum(not torch.equal(fused[k], before[k]) for k in before) > 0
    now = weights(comps)
    assert all(torch.equal(now[k], v) for k, v in before.items())  # and back exactly


def test_no_frame_is_made_with_half_swapped_weights(comps, ws):
    """Every UNet and VAE call of every frame, while a DreamBooth + LoRA style loads beside the
    stream and is swapped in: each frame runs wholly on the old weights or wholly on the new."""
    held = Held()
    calls: list = []

    def fingerprint(module):
        return round(sum(float(p.detach().double().sum()) for p in module.parameters()), 6)

    parts = {"unet": comps.unet, "encoder": comps.vae.encoder, "decoder": comps.vae.decoder}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, fingerprint(m))))
             for name, m in parts.items()]
    old = {name: fingerprint(m) for name, m in parts.items()}
    try:
        with live_engine(comps, ws) as live:
            push = live.frames.push

            def marked(frame):
                calls.append(("frame", None))
                return push(frame)

            live.frames.push = marked
            live.controller.style_load_hook = held
            live.wait_outputs(10, timeout=120)
            replies = submit(live, "set_style", style="dblora")
            assert held.loaded.wait(120)
            n = len(live.outputs)
            live.wait_outputs(n + 3, timeout=120)  # frames while it loads
            held.release.set()
            wait_for(lambda: replies, timeout=120, what="the set_style reply")
            assert replies[0]["ok"]
            n = len(live.outputs)
            live.wait_outputs(n + 3, timeout=120)
            new = {name: fingerprint(m) for name, m in parts.items()}
            live.controller.style_load_hook = None
            back = submit(live, "set_style", style="default")
            wait_for(lambda: back, timeout=120, what="the reply")
            assert back[0]["ok"]
    finally:
        for h in hooks:
            h.remove()
    assert all(old[k] != new[k] for k in ("unet", "decoder"))
    frames, current = [], None
    for name, value in calls:
        if name == "frame":
            current = []
            frames.append(current)
        elif current is not None:
            current.append((name, value))
    sides = []
    for frame in frames:
        side = {"old" if value == old[name] else "new" if value == new[name] else "neither" for name, value in frame}
        assert len(side) <= 1 and "neither" not in side, frame
        sides += list(side)
    # old frames, then new ones (then old again: the switch back), never mixed within a frame
    runs = [s for i, s in enumerate(sides) if i == 0 or s != sides[i - 1]]
    assert runs[:2] == ["old", "new"] and sides.count("new") >= 3


def test_a_failing_load_keeps_the_style_with_one_line(comps, ws, caplog):
    with live_engine(comps, ws) as live:
        live.wait_outputs(10)
        replies = submit(live, "set_style", style="broken")
        wait_for(lambda: replies, timeout=120, what="the reply")
        assert replies[0]["ok"] is False and "not_a_checkpoint" in replies[0]["error"] and "\n" not in replies[0]["error"]
        assert live.manager.current.name == "default" and comps.dreambooth is None
        assert live.controller.status()["style_loading"] is None
        n = len(live.outputs)
        live.wait_outputs(n + 3)
        assert live.engine.stats.errors == 0
    lines = [r.getMessage() for r in caplog.records if "set_style" in r.getMessage()]
    assert len(lines) == 1 and "not_a_checkpoint" in lines[0] and "\n" not in lines[0]


def test_a_newer_request_wins_and_a_strength_set_meanwhile_stays(comps, ws):
    held = Held()
    with live_engine(comps, ws) as live:
        live.controller.style_load_hook = held
        live.wait_outputs(10)
        first = submit(live, "set_style", style="db")
        assert held.loaded.wait(120)
        second = submit(live, "set_style", style="three_steps")
        wait_for(lambda: live.controller.status()["style_loading"] == "three_steps", what="the newer request")
        strength = submit(live, "set_strength", strength=0.6)
        wait_for(lambda: strength, what="the strength reply")
        assert strength[0]["ok"] and live.frames.schedule_args[1] == live_t_index(0.6, 2)
        held.release.set()  # db comes out of the loader: dropped for three_steps, which loads next
        wait_for(lambda: first and second, timeout=120, what="both replies")
        assert first[0]["ok"] and first[0].get("superseded")
        assert second[0]["ok"] and not second[0].get("superseded")
        assert held.styles == ["db", "three_steps"]
        assert live.manager.current.name == "three_steps" and comps.dreambooth is None
        # the strength set after the style was asked for is kept (as if applied after it)
        assert live.frames.schedule_args[1] == live_t_index(0.6, 2)
        replies = submit(live, "set_style", style="default")
        wait_for(lambda: replies, timeout=120, what="the reply")
        assert replies[0]["ok"]
