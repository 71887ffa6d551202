"""What a first run meets with the models: every form of --base (a diffusers folder, its unet/
folder, a single-file checkpoint), all missing models named at once with one command that fetches
them, --lora FILE[:SCALE] parsed strictly, and model loading that prints the engine's own lines
instead of the libraries' progress bars. Tiny random-weight models in the real on-disk formats."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE_A, run_cli
from live2diff_engine import cli
from live2diff_engine.depth import build_tiny_depth
from live2diff_engine.errors import ConfigError, ModelLoadError
from live2diff_engine.models.components import load_components
from live2diff_engine.models.single_file import SD15_CONFIG_DIR, SingleFileBase, open_single_file, sd15_tokenizer
from live2diff_engine.styles import StyleManager, load_styles
from sd_formats import (
    save_kohya_lora,
    save_single_file,
    save_tiny_sd,
    text_encoder_diffusers_to_ldm,
    text_model_key,
    unet_diffusers_to_ldm,
    vae_diffusers_to_ldm,
    write_clip_tokenizer,
)
from test_frames import clip, read_video, write_clip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_models")
    sd = save_tiny_sd(root / "sd", seed=0)
    motion = load_file(str(FIXTURE_A / "live2diff_motion.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in motion.items()}}, root / "live2diff.ckpt")
    build_tiny_depth("midas", seed=0, size=64).model.save_pretrained(root / "midas")
    save_single_file(sd, root / "base.safetensors")  # the same weights as sd/, in one file
    save_single_file(sd, root / "base.ckpt")
    save_single_file(sd, root / "dreambooth.safetensors", seed_offset=1)
    save_kohya_lora(sd, root / "style_lora.safetensors", seed=3)
    (root / "styles.toml").write_text(f'[styles.db]\ndreambooth = "{root / "dreambooth.safetensors"}"\n')
    write_clip(root / "in.mp4", clip(10))
    return root


def _load(ws, base, **kw):
    return load_components(base=str(base), motion=str(ws / "live2diff.ckpt"), depth="midas",
                           depth_source=str(ws / "midas"), lcm_lora=None, **kw)


def _weights(comps):
    return {name: {k: v.clone() for k, v in getattr(comps, name).state_dict().items()}
            for name in ("unet", "vae", "text_encoder")}


def _same(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        bad = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not bad, (name, bad[:3])


@pytest.fixture(scope="module")
def folder_weights(ws):
    comps = _load(ws, ws / "sd")
    return _weights(comps), comps.tokenizer


# -- --base forms --------------------------------------------------------------------------------


def test_the_unet_folder_finds_the_rest_beside_it(ws, folder_weights):
    comps = _load(ws, ws / "sd" / "unet")
    _same(folder_weights[0], _weights(comps))
    assert comps.base_dir == ws / "sd"  # where a DreamBooth style's switch back finds the base


@pytest.mark.parametrize("name", ["base.safetensors", "base.ckpt"])
def test_a_single_file_checkpoint_loads_the_same_weights_as_its_folder(ws, folder_weights, name):
    comps = _load(ws, ws / name, base_config=str(ws / "sd"))
    _same(folder_weights[0], _weights(comps))
    text = "a Watercolor portrait, of a cat!"
    assert comps.tokenizer(text).input_ids == folder_weights[1](text).input_ids
    assert comps.base_dir is None and comps.base_file == ws / name


def test_a_dreambooth_style_over_a_single_file_base_switches_back_to_it_exactly(ws):
    comps = _load(ws, ws / "base.safetensors", base_config=str(ws / "sd"))
    before = _weights(comps)
    manager = StyleManager(comps, load_styles(ws / "styles.toml"))
    manager.apply("db")
    assert not torch.equal(comps.unet.state_dict()["conv_in.weight"], before["unet"]["conv_in.weight"])
    manager.apply("default")
    _same(before, _weights(comps))


def test_the_shipped_tokenizer_is_sd15s(tmp_path):
    reference = __import__("transformers").CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok")))
    ours = sd15_tokenizer()
    assert len(ours) == len(reference) == 49408
    for text in ["a photo of a cat", "Ünïcødé émigré's 12345, 😀!!", "x" * 300, ""]:
        kw = dict(padding="max_length", max_length=77, truncation=True)
        assert ours(text, **kw).input_ids == reference(text, **kw).input_ids
    assert ours("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_the_shipped_config_fits_a_full_size_sd15_checkpoint():
    """A full-size SD1.5 checkpoint in the original layout (parameters on the meta device: names
    and shapes, no memory) converts against the shipped configs, and every part fits."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from live2diff_engine.models.building import parameters_on_meta as _parameters_on_meta
    from live2diff_engine.models.full_random import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
    from live2diff_engine.models.loading import load_base_state
    from live2diff_engine.models.motion import MotionConfig
    from live2diff_engine.models.unet import build_streaming_unet

    for part, config in (("unet", SD15_UNET_CONFIG), ("vae", SD15_VAE_CONFIG)):
        shipped = json.loads((SD15_CONFIG_DIR / part / "config.json").read_text())
        assert {k: shipped[k] for k in config} == config, part
    with _parameters_on_meta():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    checkpoint = {**unet_diffusers_to_ldm(unet.state_dict(), SD15_UNET_CONFIG),
                  **vae_diffusers_to_ldm(vae.state_dict(), SD15_VAE_CONFIG),
                  **text_encoder_diffusers_to_ldm({text_model_key(k): v for k, v in text.state_dict().items()})}
    single = SingleFileBase(SD15_CONFIG_DIR / "civitai.safetensors", SD15_CONFIG_DIR, checkpoint)
    config = single.unet_config()
    with torch.device("meta"):
        streaming = build_streaming_unet(config, MotionConfig())
    load_base_state(streaming, single.unet_state(config), single.unet_mismatch)
    assert sum(p.numel() for p in single.vae().parameters()) == sum(p.numel() for p in vae.parameters())
    assert sum(p.numel() for p in single.text_encoder().parameters()) == 123_060_480  # CLIP ViT-L/14's text tower


def test_a_checkpoint_that_is_not_sd15_is_one_line(ws, tmp_path):
    with pytest.raises(ModelLoadError, match="does not fit the UNet of Stable Diffusion 1.5"):
        _load(ws, ws / "base.safetensors")  # tiny weights against SD1.5's configs
    torch.save({"state_dict": {"cond_stage_model.transformer.x": torch.zeros(1)}}, tmp_path / "clip_only.ckpt")
    with pytest.raises(ModelLoadError, match="is not a Stable Diffusion checkpoint"):
        open_single_file(tmp_path / "clip_only.ckpt")
    no_vae = {k: v for k, v in load_file(str(ws / "base.safetensors")).items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ModelLoadError, match="holds no VAE.*--vae taesd"):
        SingleFileBase(tmp_path / "no_vae.safetensors", ws / "sd", no_vae).vae()


def test_a_unet_folder_with_nothing_beside_it_says_so(ws, tmp_path):
    shutil.copytree(ws / "sd" / "unet", tmp_path / "lonely" / "unet")
    with pytest.raises(ModelLoadError, match=r"UNet folder.*no text_encoder/, tokenizer/, vae/ in"):
        _load(ws, tmp_path / "lonely" / "unet")


# -- through the command line: a translate from a single file, with the engine's own lines -------


def test_translate_from_a_single_file_prints_one_line_per_model_and_no_library_bars(ws, tmp_path):
    result = run_cli(
        "translate", ws / "in.mp4", tmp_path / "out.mp4", "--base", ws / "base.safetensors", "--base-config", ws / "sd",
        "--motion", ws / "live2diff.ckpt", "--depth", f"midas={ws / 'midas'}", "--no-lcm-lora",
        "--width", "64", "--height", "64", "--device", "cpu",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr
    assert len(read_video(tmp_path / "out.mp4")) == 10
    err = result.stderr
    assert "Loading weights" not in err and "Loading checkpoint" not in err
    # The only progress bar is translate's own, over the frames.
    bars = [part for part in err.replace("\r", "\n").splitlines() if "it/s]" in part or "s/it]" in part or "|" in part]
    assert all(part.startswith("translate:") for part in bars), bars
    for line in (f"reading the checkpoint {ws / 'base.safetensors'}", "loading the UNet and the motion modules",
                 "loading the VAE", "loading the text encoder and tokenizer", "loading the depth estimator (midas)"):
        assert line in err.splitlines(), (line, err)
    assert "float32" not in err  # no warnings from the libraries either


# -- missing models: all of them at once ------------------------------------------------------


def _one_error_line(result):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _hub_cache_with(root, repo_id, folder):
    """``folder``'s files as the hub cache holds a download of ``repo_id`` (HF_HOME=root)."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_run_that_lacks_models_names_all_of_them_with_one_command(ws, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    line = _one_error_line(run_cli("translate", ws / "in.mp4", tmp_path / "o.mp4", "--device", "cpu", env=env))
    for name, repo in (("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"), ("live2diff", "Leoxing/Live2Diff"),
                       ("midas", "Intel/dpt-hybrid-midas"), ("lcm-lora", "latent-consistency/lcm-lora-sdv1-5")):
        assert f"{name} ({repo})" in line, line
    assert "4 models are not downloaded" in line and "offline" in line
    assert "`live2diff-engine models download`" in line
    assert not (tmp_path / "o.mp4").exists()
    # The live engine says the same before it opens a camera or loads anything.
    line = _one_error_line(run_cli("run", "--source", "synthetic", "--sink", "null", "--max-frames", "1", "--no-api", env=env))
    assert "4 models are not downloaded" in line and "`live2diff-engine models download`" in line


def test_models_that_are_here_are_not_named(ws, tmp_path):
    """SD1.5 and MiDaS in the hub cache, the motion checkpoint a path: only the LCM-LoRA and TAESD
    are missing, and the command names exactly those two."""
    hf = tmp_path / "hf"
    _hub_cache_with(hf, "stable-diffusion-v1-5/stable-diffusion-v1-5", ws / "sd")
    _hub_cache_with(hf, "Intel/dpt-hybrid-midas", ws / "midas")
    line = _one_error_line(run_cli("translate", ws / "in.mp4", tmp_path / "o.mp4", "--device", "cpu", "--motion", ws / "live2diff.ckpt",
                                   "--vae", "taesd", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf)}))
    assert "2 models are not downloaded: lcm-lora (latent-consistency/lcm-lora-sdv1-5), taesd (madebyollin/taesd)" in line
    assert "`live2diff-engine models download lcm-lora taesd`" in line
    assert "sd15" not in line and "midas" not in line


def test_models_download_names_every_model_it_could_not_fetch(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    line = _one_error_line(run_cli("models", "download", env=env))
    assert "4 models are not downloaded: sd15" in line and "lcm-lora" in line and "`live2diff-engine models download`" in line
    # Online but unreachable (a closed local port as the hub): found once, all of them named, and
    # none of the hub client's retry lines.
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_cli("models", "download", env=env)
    line = _one_error_line(result)
    assert line.count("`live2diff-engine models download`") == 1, line
    assert "cannot reach the Hugging Face hub at http://127.0.0.1:9 (connection refused), and 4 models are not downloaded: " \
        "sd15 (stable-diffusion-v1-5/stable-diffusion-v1-5), live2diff (Leoxing/Live2Diff), midas" in line, line
    assert result.stderr.strip().splitlines() == [line], result.stderr


# -- --lora FILE[:SCALE] ----------------------------------------------------------------------------


def _parse(*argv):
    return cli.build_parser().parse_args(["translate", "in.mp4", "out.mp4", *argv])


@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.7", ("style.safetensors", 0.7)),
    ("style.safetensors:-.5", ("style.safetensors", -0.5)),
    ("style.safetensors:1e-1", ("style.safetensors", 0.1)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
    ("C:\\loras\\style.safetensors:0.8", ("C:\\loras\\style.safetensors", 0.8)),
    ("C:/loras/style.safetensors", ("C:/loras/style.safetensors", 1.0)),
    ("C:style.safetensors", ("C:style.safetensors", 1.0)),
    ("/models/a:b/style.safetensors", ("/models/a:b/style.safetensors", 1.0)),
])
def test_lora_scales_are_read_strictly_and_drive_letters_are_paths(text, expected):
    assert _parse("--lora", text).lora == [expected]


@pytest.mark.parametrize("text, needle", [
    ("style.safetensors:abc", "the LoRA scale 'abc' in 'style.safetensors:abc' is not a number"),
    ("style.safetensors:", "has no scale after the ':'"),
    ("style.safetensors:0.5x", "is not a number"),
    ("style.safetensors:1_0", "is not a number"),
    ("style.safetensors:nan", "is not a number"),
    ("style.safetensors:1e999", "not a finite number"),
    (":0.5", "names no file"),
])
def test_a_bad_lora_scale_is_its_own_one_line_error(text, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse("--lora", text)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --lora" in err and needle in err, err
    assert "FILE:SCALE" in err or "finite" in err


def test_a_file_whose_name_has_a_colon_is_taken_whole_when_it_exists(tmp_path):
    odd = tmp_path / "v2:final.safetensors"
    odd.write_bytes(b"")
    assert _parse("--lora", str(odd)).lora == [(str(odd), 1.0)]


def test_a_missing_lora_file_is_named_as_given_before_any_model_loads(tmp_path, capsys):
    write_clip(tmp_path / "in.mp4", clip(2))
    code = cli.main(["translate", str(tmp_path / "in.mp4"), str(tmp_path / "o.mp4"), "--model", "tiny",
                     "--lora", "missing_style.safetensors:0.5"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [l for l in err.splitlines() if "error:" in l]
    assert errors == [f"live2diff-engine: error: --lora missing_style.safetensors: file not found "
                      f"(looked at {os.path.abspath('missing_style.safetensors')} and in {os.environ['LIVE2DIFF_HOME']}/styles)"], err
    assert "default" not in err and "building the tiny" not in err


def test_a_lora_given_on_the_command_line_still_applies(ws):
    from live2diff_engine.assemble import build_frame_pipeline
    from live2diff_engine.styles import LoraRef

    path = str(ws / "style_lora.safetensors")  # made for the tiny SD folder, whose UNet is the tiny preset's
    comps, frames, manager, style = build_frame_pipeline(_parse("--model", "tiny", "--lora", f"{path}:0.5"), say=lambda line: None)
    assert style.loras[-1] == LoraRef(path, 0.5) and manager.current == style
