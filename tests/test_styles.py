"""Real on-disk formats through the real loaders: SD folder, motion checkpoint, depth model,
DreamBooth single-file checkpoints, kohya LoRAs, the styles file, and switching mid-stream."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE_A, ROOT, run_cli
from live2diff_engine.depth import build_tiny_depth
from live2diff_engine.errors import ConfigError, ModelLoadError
from live2diff_engine.models.components import load_components
from live2diff_engine.pipeline.frames import FramePipeline
from live2diff_engine.styles import StyleManager, load_styles
from sd_formats import save_kohya_lora, save_kohya_lora_for_other_model, save_single_file, save_tiny_sd
from test_frames import clip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace of tiny models in the formats users download."""
    root = tmp_path_factory.mktemp("models")
    sd = save_tiny_sd(root / "sd", seed=0)
    motion = load_file(str(FIXTURE_A / "live2diff_motion.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in motion.items()}}, root / "live2diff.ckpt")
    depth = build_tiny_depth("midas", seed=0, size=64)
    depth.model.save_pretrained(root / "midas")
    save_single_file(sd, root / "dreambooth.safetensors", seed_offset=1)
    save_single_file(sd, root / "dreambooth.ckpt", seed_offset=2)
    save_kohya_lora(sd, root / "style_lora.safetensors", seed=3)
    save_kohya_lora(sd, root / "alpha_lora.safetensors", seed=5, rank=4, alpha=1.0, te_mlp=True)
    save_kohya_lora_for_other_model(root / "other_lora.safetensors")
    (root / "not_a_checkpoint.safetensors").write_bytes(b"this is a text file, not weights\n" * 10)
    styles = root / "styles.toml"
    styles.write_text(
        f"""
[styles.db]
description = "a DreamBooth fine-tune"
dreambooth = "{root / 'dreambooth.safetensors'}"
template = "cartoon, {{}}"
clip_skip = 2

[styles.dbckpt]
dreambooth = "{root / 'dreambooth.ckpt'}"

[styles.lora0]
loras = [{{ file = "{root / 'style_lora.safetensors'}", scale = 0.0 }}]

[styles.lora1]
loras = [{{ file = "{root / 'style_lora.safetensors'}", scale = 1.0 }}]

[styles.lora06]
loras = [{{ file = "{root / 'alpha_lora.safetensors'}", scale = 0.6 }}]

[styles.dblora]
dreambooth = "{root / 'dreambooth.safetensors'}"
loras = [{{ file = "{root / 'style_lora.safetensors'}", scale = 0.7 }}, {{ file = "{root / 'alpha_lora.safetensors'}", scale = 0.5 }}]

[styles.three_steps]
t_index_list = [20, 32, 45]

[styles.other]
loras = [{{ file = "{root / 'other_lora.safetensors'}" }}]

[styles.broken]
dreambooth = "{root / 'not_a_checkpoint.safetensors'}"
"""
    )
    return root


@pytest.fixture(scope="module")
def comps(ws):
    return load_components(
        base=str(ws / "sd"), motion=str(ws / "live2diff.ckpt"), depth="midas", depth_source=str(ws / "midas"), lcm_lora=None
    )


def run_frames(comps, ws, style=None, switch_at=None, switch_to=None, n=16):
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    fp = FramePipeline(comps, width=64, height=64, prompt="a photo of a cat", seed=1)
    manager.apply(style or "default", fp)
    out = []
    for i, f in enumerate(clip(n, seed=2)):
        if i == switch_at:
            manager.apply(switch_to, fp)
        out += fp.push(f)
    out += fp.flush()
    manager.apply("default", fp)  # leave the shared models as they were
    assert [i for i, _ in out] == list(range(n))
    return [img for _, img in out]


def test_components_load_from_real_formats(ws, comps):
    assert comps.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert comps.vae_scale_factor == 8
    golden = load_file(str(FIXTURE_A / "base_unet" / "diffusion_pytorch_model.safetensors"))
    state = comps.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in golden.items())


def test_lora_scale_zero_changes_nothing_and_one_changes_the_output(comps, ws):
    base = run_frames(comps, ws)
    zero = run_frames(comps, ws, style="lora0")
    one = run_frames(comps, ws, style="lora1")
    assert all(np.array_equal(a, b) for a, b in zip(base, zero))
    assert all(not np.array_equal(a, b) for a, b in zip(base[8:], one[8:]))


def test_switching_style_mid_stream_changes_the_following_frames(comps, ws):
    base = run_frames(comps, ws)
    switched = run_frames(comps, ws, switch_at=12, switch_to="db")
    # Frames finished before the switch are untouched; later ones change; none is missing.
    assert all(np.array_equal(a, b) for a, b in zip(base[:11], switched[:11]))
    assert all(not np.array_equal(a, b) for a, b in zip(base[12:], switched[12:]))


def test_going_back_to_the_base_restores_it_exactly(comps, ws):
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in comps.text_encoder.state_dict().items()}
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    for name in ("db", "lora1", "dbckpt", "default"):
        manager.apply(name)
        assert manager.last_switch_s > 0
    after = comps.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(comps.text_encoder.state_dict()[k], v) for k, v in text_before.items())


def test_dreambooth_weights_really_arrive(comps, ws):
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    manager.apply("db")
    try:
        changed = [k for k, v in comps.unet.state_dict().items() if "motion_modules" not in k and "flow_conv_in" not in k]
        from sd_formats import expected_single_file_weights

        expected = expected_single_file_weights(ws / "sd", seed_offset=1)["unet"]
        state = comps.unet.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in changed)
    finally:
        manager.apply("default")


def test_steps_change_with_the_style(comps, ws):
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    fp = FramePipeline(comps, width=64, height=64)
    for f in clip(10):
        fp.push(f)
    manager.apply("three_steps", fp)
    out = [o for f in clip(12) for o in fp.push(f)]
    assert fp.steps == 3 and fp.stream.schedule.t_index_list == (20, 32, 45)
    # The stream goes on at the style's steps: frames come out, each one once, in order.
    indices = [i for i, _ in out]
    assert indices and indices == sorted(set(indices)), indices
    assert all(img.shape == clip(1)[0].shape for _, img in out)


def test_a_lora_for_another_architecture_is_refused_and_nothing_changes(comps, ws):
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    with pytest.raises(ModelLoadError, match="does not fit this model"):
        manager.apply("other")
    manager.apply("default")
    after = comps.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_file_that_is_not_a_checkpoint_is_refused(comps, ws):
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    with pytest.raises(ModelLoadError, match="not_a_checkpoint"):
        manager.apply("broken")


# -- fused LoRAs: same modules, exact restore, no adapter layers -----------------------------------


def _layout(comps):
    """What a compiled stream call depends on: every module and Parameter object by name, each
    Parameter's shape, dtype and strides (a switch rebinds its ``.data``; see also
    test_style_load's copy-in test for the addresses a CUDA graph needs)."""
    models = {"unet": comps.unet, "unet2d": comps.unet.unet2d, "text": comps.text_encoder}
    modules = [(k, n, id(m)) for k, model in models.items() for n, m in model.named_modules()]
    params = [(k, n, id(p), tuple(p.shape), p.dtype, p.stride()) for k, model in models.items() for n, p in model.named_parameters()]
    return modules, params


def _weights(comps):
    from sd_formats import text_model_key

    return {
        f"{part}:{text_model_key(k) if part == 'text' else k}": v.clone()
        for part, model in (("unet", comps.unet), ("text", comps.text_encoder), ("vae", comps.vae))
        for k, v in model.state_dict().items()
    }


def _assert_plain(comps):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (comps.unet, comps.unet.unet2d, comps.text_encoder):
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        assert not any("lora" in k for k in model.state_dict())
        assert not hasattr(model, "peft_config")


def _kohya_delta(tensors, module, scale):
    """scale * alpha / rank * up @ down for one module of a kohya file, in the base weight's shape."""
    down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
    alpha = float(tensors[f"{module}.alpha"])
    rank = down.shape[0]
    return scale * alpha / rank * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])


# (state-dict key, kohya module): a self-attention projection, a 1x1 conv, a text-encoder layer
_PROBES = [
    ("unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("unet:up_blocks.1.attentions.0.proj_in.weight", "lora_unet_up_blocks_1_attentions_0_proj_in"),
    ("text:text_model.encoder.layers.1.mlp.fc2.weight", "lora_te_text_model_encoder_layers_1_mlp_fc2"),
]


def test_a_lora_is_fused_by_its_formula_and_switching_away_restores_every_tensor(comps, ws):
    lora = load_file(str(ws / "alpha_lora.safetensors"))
    before = _weights(comps)
    layout = _layout(comps)
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    manager.apply("lora06")
    try:
        fused = _weights(comps)
        _assert_plain(comps)
        assert _layout(comps) == layout
        for key, module in _PROBES:
            expected = before[key] + _kohya_delta(lora, module, 0.6)
            assert torch.allclose(fused[key], expected, rtol=1e-5, atol=1e-6), key
            assert not torch.equal(fused[key], before[key])
        # One weight per LoRA module changed, nothing else (biases, norms, VAE, motion modules).
        changed = sorted(k for k in before if not torch.equal(before[k], fused[k]))
        modules = {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
        assert len(changed) == len(modules) and all(k.endswith(".weight") and "motion_modules" not in k for k in changed)
    finally:
        manager.apply("default")
    after = _weights(comps)
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert _layout(comps) == layout


def test_switches_keep_the_modules_and_come_back_bit_for_bit(comps, ws):
    """LoRA style -> DreamBooth + two LoRAs -> default: the same Parameter objects and modules
    throughout; the DreamBooth weights under the LoRAs are exact; the base comes back."""
    from sd_formats import expected_single_file_weights

    before = _weights(comps)
    layout = _layout(comps)
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    try:
        manager.apply("lora06")
        assert _layout(comps) == layout
        manager.apply("dblora")
        _assert_plain(comps)
        assert _layout(comps) == layout
        dreambooth = expected_single_file_weights(ws / "sd", seed_offset=1)
        first, second = load_file(str(ws / "style_lora.safetensors")), load_file(str(ws / "alpha_lora.safetensors"))
        state = _weights(comps)
        for key, module in _PROBES:
            part, name = key.split(":", 1)
            base = dreambooth["unet" if part == "unet" else "text_encoder"][name]
            expected = base + _kohya_delta(second, module, 0.5)
            if f"{module}.lora_down.weight" in first:
                expected = expected + _kohya_delta(first, module, 0.7)
            assert torch.allclose(state[key], expected, rtol=1e-5, atol=1e-6), key
        # Untouched by the LoRAs: exactly the DreamBooth's own weights.
        resnet = "down_blocks.0.resnets.0.conv1.weight"
        assert torch.equal(state[f"unet:{resnet}"], dreambooth["unet"][resnet])
    finally:
        manager.apply("default")
    assert _layout(comps) == layout
    _assert_plain(comps)
    after = _weights(comps)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert comps.unfused == {}


def test_a_failed_switch_leaves_the_fused_style_exactly_as_it_was(comps, ws):
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    try:
        manager.apply("dblora")
        fused = _weights(comps)
        layout = _layout(comps)
        for bad, message in (("other", "does not fit this model"), ("broken", "not_a_checkpoint")):
            with pytest.raises(ModelLoadError, match=message):
                manager.apply(bad)
            assert manager.current.name == "dblora"
            assert _layout(comps) == layout
            _assert_plain(comps)
            now = _weights(comps)
            assert all(torch.equal(now[k], v) for k, v in fused.items()), bad
    finally:
        manager.apply("default")


def test_an_lcm_lora_in_diffusers_layout_is_fused_into_motion_modules_and_convolutions(comps, ws, tmp_path):
    """The few-step LoRA rides along with every style. This one is in diffusers' (peft) layout and
    reaches a motion module's to_q, so the projected positions must follow the new weights."""
    from safetensors.torch import save_file

    from live2diff_engine.models.components import read_lora

    to_q = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q"
    conv = "down_blocks.0.resnets.0.conv1"
    own = comps.unet.state_dict()
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for module in (to_q, conv):
        shape = own[f"{module}.weight"].shape
        tensors[f"unet.{module}.lora_A.weight"] = torch.randn((2, shape[1], *shape[2:]), generator=gen) * 0.3
        tensors[f"unet.{module}.lora_B.weight"] = torch.randn((shape[0], 2, *((1,) * (len(shape) - 2))), generator=gen) * 0.3
    save_file(tensors, tmp_path / "lcm.safetensors")
    layer = next(l for n, l in comps.unet.named_modules() if n == to_q.rsplit(".", 1)[0])
    before = _weights(comps)
    layout = _layout(comps)
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    comps.unet.allocate_cache(2, 8, 8)  # as a stream does: positions projected once, kept
    positions = layer.pos_qkv.clone()
    comps.lcm_lora = read_lora(tmp_path / "lcm.safetensors")
    try:
        manager.apply("default")
        _assert_plain(comps)
        assert _layout(comps) == layout
        for module in (to_q, conv):
            a, b = tensors[f"unet.{module}.lora_A.weight"], tensors[f"unet.{module}.lora_B.weight"]
            expected = before[f"unet:{module}.weight"] + (b.flatten(1) @ a.flatten(1)).view(own[f"{module}.weight"].shape)
            assert torch.allclose(comps.unet.state_dict()[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6), module
        pe = layer.pos_encoder.pe[0, : layer.window]
        assert torch.allclose(layer.pos_qkv[0], torch.nn.functional.linear(pe, layer.to_q.weight), atol=1e-6)
        assert not torch.allclose(layer.pos_qkv[0], positions[0])
        assert torch.equal(layer.pos_qkv[1:], positions[1:])  # to_k and to_v untouched
        # A DreamBooth (which has no motion modules) comes in: the LCM-LoRA stays fused once, over
        # the same motion-module weight, not fused again over the fused one.
        fused_to_q = comps.unet.state_dict()[f"{to_q}.weight"].clone()
        manager.apply("db")
        assert torch.equal(comps.unet.state_dict()[f"{to_q}.weight"], fused_to_q)
        manager.apply("default")
        assert torch.equal(comps.unet.state_dict()[f"{to_q}.weight"], fused_to_q)
    finally:
        comps.lcm_lora = None
        manager.apply("default")
    after = _weights(comps)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.allclose(layer.pos_qkv, positions, atol=1e-6)


def test_fused_frames_match_the_frames_of_unfused_adapters(comps, ws):
    """What the LoRA did before it was fused: peft adapter layers computing W x + s * B(A x) on
    the fly. Fusing gives the same frames up to float rounding."""
    from diffusers import StableDiffusionPipeline

    from live2diff_engine.pipeline.schedule import make_scheduler

    base = run_frames(comps, ws, n=10)
    fused = run_frames(comps, ws, style="lora06", n=10)
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    fp = FramePipeline(comps, width=64, height=64, prompt="a photo of a cat", seed=1)
    manager.apply("default", fp)
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet.unet2d,
        scheduler=make_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(load_file(str(ws / "alpha_lora.safetensors")), adapter_name="s")
    pipe.set_adapters(["s"], adapter_weights=[0.6])
    try:
        fp.set_text_style("{}", 1)  # the prompt through the adapted text encoder
        adapted = []
        for f in clip(10, seed=2):
            adapted += fp.push(f)
        adapted += fp.flush()
    finally:
        pipe.unload_lora_weights()
        manager.apply("default", fp)
    adapted = [img for _, img in adapted]
    assert len(adapted) == len(fused) == 10
    def largest(xs, ys):
        return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(xs, ys))

    assert largest(adapted, fused) <= 1  # 1 here: a pixel or two round the other way
    assert largest(base[8:], fused[8:]) > 20  # the LoRA itself changes the picture a lot


def test_styles_file_errors(tmp_path):
    bad = tmp_path / "styles.toml"
    bad.write_text('[styles.x]\ntemplate = "no placeholder"\n')
    with pytest.raises(ConfigError, match="has no"):
        load_styles(bad)
    bad.write_text('[styles.x]\nwobble = 1\n')
    with pytest.raises(ConfigError, match="unknown settings"):
        load_styles(bad)
    bad.write_text("[styles.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_styles(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_styles(tmp_path / "missing.toml")


def test_presets_are_the_six_original_styles():
    styles = load_styles(os.devnull if False else None)
    for name in ("disneyPixar", "kFelted", "moxin", "origami", "pixart", "toonyou"):
        s = styles[name]
        assert s.dreambooth and s.dreambooth_url.startswith("https://civitai.com/api/download/models/")
        assert "{}" in s.template
    assert styles["moxin"].loras[0].scale == 0.7
    assert styles["pixart"].strength == 0.6 and styles["pixart"].num_inference_steps == 4


def _one_line(result, needle):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_translate_with_real_formats_and_a_style(ws, tmp_path):
    import cv2

    src = tmp_path / "in.mp4"
    from test_frames import write_clip

    write_clip(src, clip(12))
    args = ["--base", ws / "sd", "--motion", ws / "live2diff.ckpt", "--depth", f"midas={ws / 'midas'}", "--no-lcm-lora",
            "--styles", ws / "styles.toml", "--width", "64", "--height", "64", "--device", "cpu"]
    result = run_cli("translate", src, tmp_path / "out.mp4", *args, "--style", "db", "--lora", f"{ws / 'style_lora.safetensors'}:0.5")
    assert result.returncode == 0, result.stderr
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 12
    _one_line(run_cli("translate", src, tmp_path / "o.mp4", *args, "--style", "other"), "does not fit")
    _one_line(run_cli("translate", src, tmp_path / "o.mp4", *args, "--style", "broken"), "not_a_checkpoint")
    _one_line(run_cli("translate", src, tmp_path / "o.mp4", *[a if a != ws / "live2diff.ckpt" else ws / "sd" / "model_index.json" for a in args]), "is not a readable safetensors/checkpoint file")


def test_a_hub_id_while_offline_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    src = tmp_path / "in.mp4"
    from test_frames import write_clip

    write_clip(src, clip(3))
    result = subprocess.run(
        [sys.executable, "-m", "live2diff_engine", "translate", str(src), str(tmp_path / "o.mp4"), "--base", "someone/some-model", "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    _one_line(result, "offline")
    assert "models download" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "live2diff_engine", "models", "download", "live2diff"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    _one_line(result, "live2diff")
    listing = subprocess.run(
        [sys.executable, "-m", "live2diff_engine", "models", "list"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert listing.returncode == 0 and "Leoxing/Live2Diff" in listing.stdout and "not downloaded" in listing.stdout


def test_civitai_style_download_needs_a_token(tmp_path):
    env = dict(os.environ, LIVE2DIFF_HOME=str(tmp_path / "home"))
    env.pop("CIVITAI_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "live2diff_engine", "models", "download", "--style", "toonyou"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    _one_line(result, "token")


def test_taesd_and_depth_anything_options(ws, tmp_path):
    """The fast options load from their own folders and run a whole clip."""
    from diffusers import AutoencoderTiny

    from test_frames import write_clip

    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    )
    taesd.save_pretrained(tmp_path / "taesd")
    build_tiny_depth("depth-anything", seed=0).model.save_pretrained(tmp_path / "da")
    src = tmp_path / "in.mp4"
    write_clip(src, clip(11))
    result = run_cli(
        "translate", src, tmp_path / "out.mp4", "--base", ws / "sd", "--motion", ws / "live2diff.ckpt",
        "--depth", f"depth-anything={tmp_path / 'da'}", "--vae", tmp_path / "taesd", "--no-lcm-lora",
        "--width", "64", "--height", "64", "--device", "cpu", "--fit", "letterbox",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 11 frames" in result.stderr


def test_bad_template_in_a_styles_file_is_one_line(tmp_path):
    from test_frames import write_clip

    styles = tmp_path / "styles.toml"
    styles.write_text('[styles.mine]\ntemplate = "watercolor painting"\n')
    src = tmp_path / "in.mp4"
    write_clip(src, clip(3))
    result = run_cli("translate", src, tmp_path / "o.mp4", "--model", "tiny", "--styles", styles, "--style", "mine")
    _one_line(result, "has no {}")


def test_models_verify_says_what_is_missing(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "live2diff_engine", "models", "verify", "live2diff", "lcm-lora"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all("FAIL" in l and "models download" in l for l in lines)


def test_a_missing_style_file_says_where_it_looked_in_full_and_how_to_fix_it(tmp_path, monkeypatch):
    """A relative name in a style is taken from the current folder: the line names that folder and
    the full path it tried, the styles folder, and what puts the file there (was: "toonyou_beta6.
    safetensors not found at toonyou_beta6.safetensors")."""
    from live2diff_engine.styles import Style, StyleManager

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("LIVE2DIFF_HOME", str(home))
    monkeypatch.chdir(work)
    check = StyleManager.check_files  # reads no weights: a manager is not needed for it
    toonyou = load_styles()["toonyou"]
    with pytest.raises(ModelLoadError) as err:
        check(None, toonyou)
    line = str(err.value)
    name = toonyou.dreambooth
    assert f"neither at {work / name} ({name} relative to the current folder {work})" in line, line
    assert f"nor in the styles folder {home / 'styles'}" in line, line
    assert "live2diff-engine models download --style toonyou" in line, line
    mine = Style(name="mine", dreambooth="weights/mine.safetensors")
    with pytest.raises(ModelLoadError) as err:
        check(None, mine)
    line = str(err.value)
    assert f"neither at {work / 'weights' / 'mine.safetensors'} (weights/mine.safetensors relative to the current folder {work})" in line
    assert "put mine.safetensors into that folder, or give its full path in the styles file" in line, line


FREE_AT_EXIT = r"""
import sys
from live2diff_engine import styles

class Weight:
    def __del__(self):
        with open(sys.argv[1], "a") as f:
            f.write("freed\n")

styles._free_beside([Weight() for _ in range(300)])
# the process ends at once, while the thread is still freeing one at a time
"""


def test_weights_still_being_freed_when_the_process_ends_are_all_freed_before_it_exits(tmp_path):
    """A style's replaced weights are freed on a thread of their own, one at a time with pauses.
    A process that ends meanwhile (a `translate` right after its style was applied) must not leave
    that thread to the interpreter's shutdown, which stops daemon threads wherever they are: inside
    a tensor's destructor that aborts the process (exit -6 after the output was written). All of
    them are freed before it exits, and it exits 0."""
    log = tmp_path / "freed.txt"
    r = subprocess.run([sys.executable, "-c", FREE_AT_EXIT, str(log)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert log.read_text().count("freed") == 300, (log.read_text().count("freed"), r.stderr)
