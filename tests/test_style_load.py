"""A style switch reads and converts the new weights beside the running stream: the output goes on
while a DreamBooth checkpoint (saved in the real single-file format) loads, and only the final
copy into the weights happens between two frames."""

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
from sd_formats import expected_single_file_weights, save_single_file, save_tiny_sd
from test_frames import clip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd = save_tiny_sd(root / "sd", seed=0)
    motion = load_file(str(FIXTURE_A / "live2diff_motion.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in motion.items()}}, root / "live2diff.ckpt")
    build_tiny_depth("midas", seed=0, size=64).model.save_pretrained(root / "midas")
    save_single_file(sd, root / "dreambooth.safetensors", seed_offset=1)
    (root / "not_a_checkpoint.safetensors").write_bytes(b"this is a text file, not weights\n" * 10)
    (root / "styles.toml").write_text(
        f"""
[styles.db]
dreambooth = "{root / 'dreambooth.safetensors'}"
template = "cartoon, {{}}"
clip_skip = 2

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


def test_a_style_prepared_on_another_thread_gives_the_frames_of_a_switch_in_place(comps, ws):
    """The frames after a swap of weights prepared beside the stream equal those after an
    ordinary switch at the same frame."""
    styles = load_styles(ws / "styles.toml")
    frames_in = clip(20, seed=2)

    def run(switch) -> list[np.ndarray]:
        manager = StyleManager(comps, styles)
        manager.apply("default")
        fp = FramePipeline(comps, width=64, height=64, prompt="a photo of a cat", seed=1)
        out = []
        for i, f in enumerate(frames_in):
            if i == 10:
                switch(manager, fp)
            out += fp.push(f)
        out += fp.flush()
        manager.apply("default")
        assert [i for i, _ in out] == list(range(len(frames_in)))
        return [img for _, img in out]

    def beside(manager, fp):
        result = {}
        t = threading.Thread(target=lambda: result.update(p=manager.prepare("db")))
        t.start()
        t.join(120)
        assert manager.comps.dreambooth is None  # prepared: nothing touched yet
        manager.apply("db", fp, prepared=result["p"])
        assert manager.last_prepare_s > 0 and manager.last_swap_s > 0

    in_place = run(lambda manager, fp: manager.apply("db", fp))
    prepared = run(beside)
    assert all(np.array_equal(a, b) for a, b in zip(in_place, prepared))


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
