"""Creative control live: prompt transitions and blends, seed blends (issue 30).

A transition moves the stream's text conditioning from the old prompt to the new over a number of
stream calls, written into the stream's own text buffer in place, so that a compiled (or
graph-captured) step reads the new values without compiling again. The tiny and mini models, on
the CPU; the compiled step traced by dynamo behind a counter (as test_accelerate.py does).
"""

import math

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import build_mini_unet, run_cli
from live import LiveEngine, PacedSource, wait_for
from live2diff_engine.control.schema import CommandError, command_message, parse_command
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.models.tiny import tiny_prompt_embeds
from live2diff_engine.pipeline.blend import BlendError, format_notation, normalise, parse_notation
from live2diff_engine.pipeline.frames import FramePipeline
from live2diff_engine.pipeline.schedule import make_schedule
from live2diff_engine.pipeline.stream import StreamPipeline, blend_noise, ease
from test_frames import clip

H = W = 8


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def unet():
    return build_mini_unet()


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def _latents(n, seed):
    return torch.randn(n, 4, H, W, generator=torch.Generator().manual_seed(seed))


def _stream(unet, mode="off", guidance=1.0, **options):
    pipe = StreamPipeline(unet, make_schedule(50, t_index_list=[32, 45]), (H, W),
                          generator=torch.Generator().manual_seed(1), guidance_scale=guidance,
                          accelerate=mode, accelerator_options=options or None)
    pipe.set_prompt_embeds(tiny_prompt_embeds(0))
    if guidance > 1:
        pipe.set_negative_embeds(tiny_prompt_embeds(5))
    x = _latents(8, 2)
    pipe.prepare(x, x.flip(0))
    return pipe, x


def _step(pipe, x, i):
    return pipe.step(x[i % 8 : i % 8 + 1], x[(i + 3) % 8 : (i + 3) % 8 + 1]).clone()


def _dist(a, b):
    return float(torch.linalg.vector_norm((a - b).float()))


# -- transitions ------------------------------------------------------------------------------------


def test_a_transition_moves_the_text_monotonically_from_old_to_new_in_the_same_buffer(unet):
    pipe, x = _stream(unet)
    old, new = tiny_prompt_embeds(0), tiny_prompt_embeds(9)
    buffer, ptr = pipe._text, pipe._text.data_ptr()
    _step(pipe, x, 0)
    pipe.set_prompt_embeds(new, frames=6)
    seen = []
    for i in range(1, 9):
        seen.append(pipe._text.clone())  # what this call reads
        _step(pipe, x, i)
    assert pipe._text is buffer and pipe._text.data_ptr() == ptr  # written in place, never replaced
    from_old = [_dist(t, old.expand_as(t)) for t in seen]
    to_new = [_dist(t, new.expand_as(t)) for t in seen]
    assert all(a < b for a, b in zip(from_old[:6], from_old[1:6]))  # strictly away from the old ...
    assert all(a > b for a, b in zip(to_new[:6], to_new[1:6]))  # ... and towards the new, frame by frame
    assert to_new[0] > 0 and from_old[0] > 0  # the first frame after the change has moved, not jumped
    assert to_new[0] > 0.9 * _dist(old, new)  # ... by a small step (eased in)
    for t in seen[5:]:  # the sixth call reads the new prompt exactly, and so on after
        assert torch.equal(t, new.expand_as(t))
    assert not pipe.in_transition and pipe.transition_progress() is None
    # every row of the call (each frame at its own step) reads the same text at a time
    assert all(torch.equal(t[0], t[1]) for t in seen)


def test_a_newer_change_mid_transition_starts_from_where_the_blend_is(unet):
    pipe, x = _stream(unet)
    a, b, c = tiny_prompt_embeds(0), tiny_prompt_embeds(9), tiny_prompt_embeds(4)
    pipe.set_prompt_embeds(b, frames=10)
    for i in range(4):
        _step(pipe, x, i)
    here = pipe._text[:1].clone()  # what the next call would have read
    assert 0 < _dist(here, a) and 0 < _dist(here, b)
    pipe.set_prompt_embeds(c, frames=5)
    first = pipe._text[:1].clone()
    torch.testing.assert_close(first, torch.lerp(here, c, ease(1 / 5)), rtol=0, atol=1e-6)
    assert _dist(first, here) < 0.2 * _dist(here, c)  # no jump back to a, nor on to b or c
    for i in range(4, 9):
        _step(pipe, x, i)
    assert torch.equal(pipe._text, c.expand_as(pipe._text))


def test_the_negative_prompt_transitions_in_its_own_rows(unet):
    pipe, x = _stream(unet, guidance=2.0)
    T = pipe.steps
    neg_old, neg_new = tiny_prompt_embeds(5), tiny_prompt_embeds(6)
    prompt_rows = pipe._text[:T].clone()
    pipe.set_negative_embeds(neg_new, frames=4)
    mid = pipe._text[T:].clone()
    assert _dist(mid, neg_old.expand_as(mid)) > 0 and _dist(mid, neg_new.expand_as(mid)) > 0
    assert torch.equal(pipe._text[:T], prompt_rows)  # the prompt's rows are untouched
    for i in range(4):
        _step(pipe, x, i)
    assert torch.equal(pipe._text[T:], neg_new.expand(T, -1, -1))


def test_transition_zero_is_the_jump_it_always_was(unet):
    """The same stream, the prompt changed at call 3 by the old call and with transition 0: the
    same frames, bit for bit."""
    outs = []
    for kwargs in ({}, {"frames": 0}):
        pipe, x = _stream(unet)
        out = []
        for i in range(8):
            if i == 3:
                pipe.set_prompt_embeds(tiny_prompt_embeds(9), **kwargs)
            out.append(_step(pipe, x, i))
        outs.append(torch.cat(out))
    assert torch.equal(outs[0], outs[1])


def _transition_stream(unet, mode, **options):
    pipe, x = _stream(unet, mode, **options)
    out = []
    for i in range(14):
        if i == 3:
            pipe.set_prompt_embeds(tiny_prompt_embeds(9), frames=6)
        if i == 6:  # a newer change mid-transition
            pipe.set_prompt_embeds(tiny_prompt_embeds(4), frames=4)
        out.append(_step(pipe, x, i))
    return torch.cat(out), pipe


def test_a_compiled_step_never_recompiles_during_a_transition_and_gives_the_eager_frames(unet):
    eager, _ = _transition_stream(unet, "off")
    counter = CompileCounterWithBackend("eager")
    compiled, pipe = _transition_stream(unet, "compile", backend=counter)
    assert pipe.accelerated == "compile"
    assert counter.frame_count == 1  # one graph for the whole stream, transitions included
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    # a replayed (graph-captured) call sees the moving text too: it reads the same buffer
    graphed, gpipe = _transition_stream(unet, "cudagraph", backend=counter, emulate_graphs=True)
    assert gpipe.accelerated == "cudagraph" and gpipe.accelerator.captures == 1
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1


def test_a_transition_goes_on_through_a_rewarm(comps):
    fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=1, frame_rate=10)
    frames = clip(20, seed=3)
    for f in frames[:10]:
        fp.push(f)
    fp.set_prompt("a dog", transition_s=1.0)  # 10 frames at 10 fps
    assert fp.frames_for(1.0) == 10
    for f in frames[10:13]:
        fp.push(f)
    progress = fp.transition_progress
    fp.request_reset()  # a re-warm on a new stream: the transition is carried over, not cut short
    fp.push(frames[13])
    assert fp.transition_progress is not None and fp.transition_progress >= progress
    for f in frames[14:]:
        fp.push(f)
    assert fp.transition_progress is None
    assert torch.equal(fp.stream._text[:1], fp._encode("a dog"))


# -- blends -----------------------------------------------------------------------------------------


def test_blend_notation_and_normalisation():
    assert parse_notation("a fox: sitting") == "a fox: sitting"  # no | : one prompt, colons and all
    assert parse_notation("a fox:0.7|a wolf:0.3") == [("a fox", 0.7), ("a wolf", pytest.approx(0.3))]
    assert parse_notation("a|b") == [("a", 0.5), ("b", 0.5)]
    assert parse_notation("a:3|b:1") == [("a", 0.75), ("b", 0.25)]
    assert sum(w for _, w in normalise([("a", 2), ("b", 3), ("c", 5)])) == pytest.approx(1.0)
    assert parse_notation(format_notation([("a fox", 0.7), ("a wolf", 0.3)])) == [("a fox", 0.7), ("a wolf", pytest.approx(0.3))]
    with pytest.raises(BlendError, match="at most 4"):
        parse_notation("a|b|c|d|e")
    with pytest.raises(BlendError, match="add up to 0"):
        parse_notation("a:0|b:0")


def _cmd(**args):
    return parse_command(command_message("set_prompt", **args))


def test_the_schema_takes_a_blend_normalised_and_within_its_limits():
    cmd = _cmd(prompt=[{"text": "a fox", "weight": 3}, {"text": "a wolf", "weight": 1}], transition_s=2.5)
    assert cmd.args == {"prompt": [("a fox", 0.75), ("a wolf", 0.25)], "transition_s": 2.5}
    assert _cmd(prompt="a:0.7|b:0.3").args["prompt"] == "a:0.7|b:0.3"  # a string on the wire is one prompt
    bad = {
        "1 to 4 prompts, got 5": [{"text": str(i), "weight": 1} for i in range(5)],
        "1 to 4 prompts, got 0": [],
        "must be a number": [{"text": "a", "weight": "lots"}],
        "0 or more": [{"text": "a", "weight": -1}],
        "add up to 0": [{"text": "a", "weight": 0}],
        "and nothing else": [{"text": "a", "weight": 1, "file": "/etc/passwd"}],
        "too long": [{"text": "x" * 1001, "weight": 1}],
        "string or a list": {"text": "a"},
    }
    for error, prompt in bad.items():
        with pytest.raises(CommandError, match=error):
            _cmd(prompt=prompt)
    for value, error in ((10.5, "0 to 10"), (-1, "0 to 10"), ("3", "number of seconds"), (float("nan"), "number")):
        with pytest.raises(CommandError, match=error):
            _cmd(prompt="a", transition_s=value)
    assert parse_command(command_message("set_seed", seed=3, transition_s=10)).args == {"seed": 3, "transition_s": 10.0}
    with pytest.raises(CommandError, match="does not take 'transition_s'"):
        parse_command(command_message("set_strength", strength=0.5, transition_s=1))


def test_a_blend_is_the_weighted_sum_of_its_prompts_embeddings(comps):
    fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=1, template="pixar style, {}")
    a, b = fp._encode("a fox"), fp._encode("a wolf")
    fp.set_prompt([("a fox", 7.0), ("a wolf", 3.0)])
    assert fp.prompt == "a fox:0.7|a wolf:0.3" and fp.prompt_blend == [("a fox", 0.7), ("a wolf", pytest.approx(0.3))]
    torch.testing.assert_close(fp.stream._text[:1], 0.7 * a + 0.3 * b)
    fp.set_prompt([("a fox", 1.0)])  # one item is that prompt, exactly
    assert fp.prompt == "a fox" and fp.prompt_blend is None and torch.equal(fp.stream._text[:1], a)


# -- seed blend -------------------------------------------------------------------------------------


def test_blend_noise_keeps_the_norm_and_ends_on_each_side():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 1.1
    na, nb = float(a.norm()), float(b.norm())
    assert torch.equal(blend_noise(a, b, 0.0), a)
    torch.testing.assert_close(blend_noise(a, b, 1.0), b, rtol=1e-6, atol=1e-6)
    for w in (0.1, 0.5, 0.9):
        mixed = blend_noise(a, b, w)
        assert float(mixed.norm()) == pytest.approx((1 - w) * na + w * nb, rel=1e-5)
        lerped = torch.lerp(a, b, w)  # what a plain linear mix would do: shrink it
        assert float(lerped.norm()) < 0.9 * float(mixed.norm()) or w != 0.5


def test_a_seed_transition_moves_the_noise_with_its_norm_kept_and_no_rewarm(comps):
    fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=1, frame_rate=10)
    frames = clip(16, seed=3)
    for f in frames[:10]:
        fp.push(f)
    stream = fp.stream
    before = torch.Generator().set_state(fp.generator.get_state())
    assert fp.set_seed(7, transition_s=0.5)  # 5 frames
    assert fp.seed == 7 and fp.stream.in_transition
    old, new = torch.Generator().set_state(before.get_state()), torch.Generator().manual_seed(7)
    w = ease(1 / 5)
    got = fp.stream.randn((1, 4, 8, 8))
    a, b = torch.randn((1, 4, 8, 8), generator=old), torch.randn((1, 4, 8, 8), generator=new)
    torch.testing.assert_close(got, blend_noise(a, b, w))
    assert float(got.norm()) == pytest.approx((1 - w) * float(a.norm()) + w * float(b.norm()), rel=1e-5)
    for f in frames[10:]:
        fp.push(f)
    assert fp.stream is stream and not fp._rewarm  # no re-warm: the stream went on
    assert not fp.stream.in_transition
    # after it, the draws are the new seed's own
    probe = torch.Generator().set_state(fp.generator.get_state())
    torch.testing.assert_close(fp.stream.randn((1, 4, 8, 8)), torch.randn((1, 4, 8, 8), generator=probe), rtol=0, atol=0)
    assert fp.set_seed(3) is False  # transition 0: reseeded, the caller re-warms as before


# -- controls ---------------------------------------------------------------------------------------


def test_ctl_sends_a_blend_with_a_transition_to_a_running_engine(comps):
    with LiveEngine(comps, PacedSource(fps=30)) as live:
        url = live.api.url
        wait_for(lambda: not live.frames.warming_up, what="the stream warm")
        r = run_cli("ctl", "prompt", "a fox:0.7|a wolf:0.3", "--transition", "10", "--api", url, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
        assert live.frames.prompt_blend == [("a fox", 0.7), ("a wolf", pytest.approx(0.3))]
        status = live.controller.status()
        assert status["prompt_blend"] == [{"text": "a fox", "weight": 0.7}, {"text": "a wolf", "weight": 0.3}]
        assert status["transition"] is not None and 0 <= status["transition"] < 1
        r = run_cli("ctl", "prompt", "a|b|c|d|e", "--api", url, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "at most 4" in r.stderr
        r = run_cli("ctl", "strength", "0.5", "--transition", "2", "--api", url, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--transition goes with" in r.stderr
        r = run_cli("ctl", "seed", "9", "--transition", "12", "--api", url, timeout=60)
        assert r.returncode == 2 and "0 to 10" in r.stderr and "Traceback" not in r.stderr


def test_the_configs_default_transition_applies_where_a_command_gives_none(comps, tmp_path):
    from live2diff_engine.config import default_transition, load_config
    from live2diff_engine.control.controller import Controller
    from live2diff_engine.errors import ConfigError
    from live2diff_engine.styles import StyleManager, load_styles

    cfg = tmp_path / "config.toml"
    cfg.write_text("[control]\ntransition_s = 2\n")
    assert default_transition(load_config(cfg)) == 2.0
    cfg.write_text("[control]\ntransition_s = 12\n")
    with pytest.raises(ConfigError, match="0 to 10 seconds"):
        default_transition(load_config(cfg))
    cfg.write_text('[control]\ntransition_s = "slow"\n')
    with pytest.raises(ConfigError, match="transition_s must be a float"):
        load_config(cfg)

    fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=1, frame_rate=10)
    controller = Controller(fp, StyleManager(comps, load_styles()))
    controller.default_transition_s = 2.0
    replies = []
    controller.submit(command_message("set_prompt", prompt="a dog", id=1), replies.append)
    controller.apply_pending()
    assert replies[-1]["ok"] and fp.stream.in_transition and fp.stream._fades[0].frames == 20
    controller.submit(command_message("set_prompt", prompt="a bird", transition_s=0, id=2), replies.append)
    controller.apply_pending()  # its own 0 wins: at once
    assert replies[-1]["ok"] and not fp.stream.in_transition
    controller.submit(command_message("set_seed", seed=5, id=3), replies.append)
    controller.apply_pending()  # the stream is not warm yet: reseeded and re-warmed as before
    assert replies[-1]["ok"] and fp.seed == 5 and fp._rewarm


def test_translate_refuses_bad_prompt_changes_in_one_line(tmp_path):
    src = tmp_path / "in.mp4"
    import cv2

    w = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 64))
    for f in clip(4, 64, 64):
        w.write(f)
    w.release()
    for extra, error in ((["--prompt-at", "soon:a dog"], "FRAME:PROMPT"), (["--transition", "11"], "0 to 10"),
                         (["--prompt", "a|b|c|d|e"], "at most 4")):
        r = run_cli("translate", str(src), str(tmp_path / "out.mp4"), "--model", "tiny", *extra, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and error in r.stderr, r.stderr


def test_a_blend_survives_a_restart_in_the_saved_settings(tmp_path, monkeypatch):
    import argparse

    from live2diff_engine.assemble import prompt_of
    from live2diff_engine.saved_settings import _check

    monkeypatch.setenv("LIVE2DIFF_HOME", str(tmp_path))
    blend = [("a " + "very " * 80 + "long fox", 0.5), ("a " + "big " * 100 + "wolf", 0.25), ("a " + "small " * 60 + "bird", 0.25)]
    assert len(format_notation(blend)) > 1000  # longer than one prompt may be: a blend of long prompts
    saved = _check({"version": 1, "prompt": [[t, w] for t, w in blend], "negative_prompt": "", "style": "default",
                    "guidance": 1.0, "seed": 0})
    assert prompt_of(argparse.Namespace(prompt=saved["prompt"])) == [(t, pytest.approx(w)) for t, w in blend]
