"""Checks that the offline SD1.5-format builders in tests/sd_formats.py produce what the real
libraries (transformers, diffusers, peft) accept as the real formats."""

import inspect
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import sd_formats as F
from conftest import FIXTURE_A

PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
LONG_SENTENCE = (
    "A cyberpunk city at night, neon lights reflecting on wet streets; it's 2077!! Über-café, naïve résumé"
)
LONG_SENTENCE_IDS = [
    49406, 320, 36896, 1305, 536, 930, 267, 13919, 3073, 19700, 525, 6682, 6058, 282, 585, 568, 273, 271,
    278, 278, 748, 6522, 1516, 268, 15304, 267, 1097, 35689, 563, 29106, 7054, 4166, 49407,
]  # fmt: skip

# Key set of SD1.5's unet/config.json (stable-diffusion-v1-5): note no mid_block_type.
SD15_UNET_CONFIG_KEYS = {
    "_class_name", "_diffusers_version", "act_fn", "attention_head_dim", "block_out_channels",
    "center_input_sample", "cross_attention_dim", "down_block_types", "downsample_padding",
    "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor",
    "norm_eps", "norm_num_groups", "out_channels", "sample_size", "up_block_types",
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: one intra-op thread is faster, and with two threads on a busy
    # 2-core machine the first forward pass was seen taking 10-30 s (OpenMP oversubscription).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return F.save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_sd15", seed=0)


@pytest.fixture(scope="module")
def files(sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return {
        "lora": F.save_kohya_lora(sd_dir, root / "lora.safetensors", rank=4, seed=0),
        "lora_alpha2": F.save_kohya_lora(sd_dir, root / "lora_a2.safetensors", rank=4, seed=1, alpha=2.0),
        "other": F.save_kohya_lora_for_other_model(root / "other.safetensors"),
    }


def _pipe(sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return x, torch.tensor([10, 500]), ctx, ids


@torch.no_grad()
def _outputs(pipe, inputs):
    x, t, ctx, ids = inputs
    return pipe.unet(x, t, ctx).sample, pipe.text_encoder(ids)[0]


# --------------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_are_the_clip_vocabulary(sd_dir):
    tok_dir = sd_dir / "tokenizer"
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert lines[0].startswith("#version") and len(lines) - 1 == 48894
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert lines[1] == "i n" and vocab["in"] == 512  # first merge -> first token after the 512 byte tokens
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    special = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert cfg["model_max_length"] == 77 and cfg["tokenizer_class"] == "CLIPTokenizer"
    assert special["bos_token"]["content"] == "<|startoftext|>"
    assert special["eos_token"]["content"] == "<|endoftext|>" and special["pad_token"] == "<|endoftext|>"


def test_clip_tokenizer_ids(sd_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    assert tok("a photo of a cat").input_ids == PHOTO_OF_A_CAT
    assert tok(LONG_SENTENCE).input_ids == LONG_SENTENCE_IDS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (49406, 49407, 49407, 77)
    padded = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert padded == PHOTO_OF_A_CAT + [49407] * 70
    long_ids = tok(" ".join(["cat"] * 100), truncation=True, max_length=77).input_ids
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407
    # transformers 5 trap: vocab_file=/merges_file= are silently ignored; vocab=/merges= work. transformers 4
    # (Intel Macs) takes only vocab_file=/merges_file=.
    tok_dir = sd_dir / "tokenizer"
    files = {"vocab": str(tok_dir / "vocab.json"), "merges": str(tok_dir / "merges.txt")}
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:
        files = {k + "_file": v for k, v in files.items()}
    direct = CLIPTokenizer(**files, model_max_length=77)
    assert direct("a photo of a cat").input_ids == PHOTO_OF_A_CAT


def test_reference_bpe_matches_open_clip_algorithm():
    # independent re-implementation of open-clip's SimpleTokenizer (regex split + byte-level BPE)
    assert F.clip_reference_encode("a photo of a cat") == PHOTO_OF_A_CAT
    assert F.clip_reference_encode(LONG_SENTENCE) == LONG_SENTENCE_IDS
    assert F.clip_reference_encode("A  PHOTO\tof a CAT ") == PHOTO_OF_A_CAT  # lower-cased, whitespace folded


# ------------------------------------------------------------------------------- SD folder


def test_tiny_sd_folder_layout(sd_dir):
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    unet_cfg = json.loads((sd_dir / "unet" / "config.json").read_text())
    assert set(unet_cfg) == SD15_UNET_CONFIG_KEYS
    assert unet_cfg["block_out_channels"] == [32, 32, 64, 64] and unet_cfg["cross_attention_dim"] == 32
    sched = json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["skip_prk_steps"] and sched["steps_offset"] == 1
    for f in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        assert (sd_dir / f"{f}.safetensors").is_file()
    assert not list(sd_dir.rglob("*.bin"))
    te = load_file(sd_dir / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in te)  # real SD1.5 layout
    assert te["text_model.embeddings.token_embedding.weight"].shape == (49408, 32)


def test_tiny_sd_unet_is_the_golden_base_unet(sd_dir):
    ours = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    golden = load_file(FIXTURE_A / "base_unet" / "diffusion_pytorch_model.safetensors")
    assert ours.keys() == golden.keys() and all(torch.equal(ours[k], golden[k]) for k in golden)
    golden_cfg = json.loads((FIXTURE_A / "base_unet" / "config.json").read_text())
    assert json.loads((sd_dir / "unet" / "config.json").read_text()) == golden_cfg


def test_save_tiny_sd_is_deterministic(sd_dir, tmp_path):
    rng_before = torch.random.get_rng_state()
    again = F.read_sd_weights(F.save_tiny_sd(tmp_path / "again", seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    base = F.read_sd_weights(sd_dir)
    for part in ("unet", "vae", "text_encoder"):
        assert all(torch.equal(base[part][k], again[part][k]) for k in base[part])


def test_pipeline_from_pretrained_generates(sd_dir):
    pipe = _pipe(sd_dir)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size == 8 and pipe.safety_checker is None
    out = pipe("a photo of a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    img = out.images
    assert img.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(img)).all())


# ---------------------------------------------------------------------------- single file


def test_ldm_layout_inverts_diffusers_conversion(sd_dir):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    ckpt = F.ldm_state_dict(sd_dir)
    w = F.read_sd_weights(sd_dir)
    p = "model.diffusion_model."
    # layout traps: downsampler op, upsampler slot 1 (UpBlock2D) vs 2 (after attention), mid block order
    for key in ("input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight", "out.2.bias",
                "input_blocks.7.0.skip_connection.weight", "time_embed.2.weight"):  # fmt: skip
        assert p + key in ckpt, key
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert ckpt["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    # LDM numbers the decoder levels bottom-up: diffusers up_blocks.0 is LDM decoder.up.3
    up3 = ckpt["first_stage_model.decoder.up.3.block.0.conv1.weight"]
    assert torch.equal(up3, w["vae"]["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in ckpt

    unet = convert_ldm_unet_checkpoint(ckpt, json.loads((sd_dir / "unet" / "config.json").read_text()))
    vae = convert_ldm_vae_checkpoint(ckpt, json.loads((sd_dir / "vae" / "config.json").read_text()))
    clip = convert_ldm_clip_checkpoint(ckpt)
    clip.pop("text_model.embeddings.position_ids")  # the buffer real checkpoints carry
    for ours, theirs in ((w["unet"], unet), (w["vae"], vae), (w["text_encoder"], clip)):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(sd_dir, tmp_path, suffix):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    path = F.save_single_file(sd_dir, tmp_path / f"dreambooth{suffix}", seed_offset=7)
    if suffix == ".ckpt":
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == {"state_dict"}
        raw = raw["state_dict"]
    else:
        raw = load_file(path)
    written = F.ldm_state_dict(sd_dir, seed_offset=7)
    assert raw.keys() == written.keys() and all(torch.equal(raw[k], written[k]) for k in raw)

    expected = F.expected_single_file_weights(sd_dir, seed_offset=7)
    base = F.read_sd_weights(sd_dir)
    assert not torch.equal(expected["unet"]["conv_in.weight"], base["unet"]["conv_in.weight"])

    unet = UNet2DConditionModel.from_single_file(str(path), config=str(sd_dir), subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(path), config=str(sd_dir), subfolder="vae", local_files_only=True)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(sd_dir), local_files_only=True)
    te = {F.text_model_key(k): v for k, v in pipe.text_encoder.state_dict().items()}
    for name, got in (("unet", unet.state_dict()), ("vae", vae.state_dict()), ("text_encoder", te),
                      ("unet", pipe.unet.state_dict()), ("vae", pipe.vae.state_dict())):  # fmt: skip
        assert got.keys() == expected[name].keys(), name
        assert all(torch.equal(got[k], expected[name][k]) for k in got), name
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.tokenizer("a photo of a cat").input_ids == PHOTO_OF_A_CAT


def test_single_file_bad_suffix(sd_dir, tmp_path):
    with pytest.raises(ValueError, match="unsupported checkpoint suffix"):
        F.save_single_file(sd_dir, tmp_path / "model.bin")


# ----------------------------------------------------------------------------------- LoRA


def test_kohya_lora_key_names(sd_dir, files, tmp_path):
    sd = load_file(files["lora"])
    p = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {p + ".lora_down.weight", p + ".lora_up.weight", p + ".alpha"} <= sd.keys()
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in sd
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight" in sd
    assert "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in sd
    assert sd[p + ".lora_down.weight"].shape == (4, 32) and sd[p + ".lora_up.weight"].shape == (32, 4)
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (4, 64, 1, 1)  # conv 1x1
    names = {k.split(".")[0] for k in sd}
    assert len(names) == 16 * 12 + 2 * 4  # 16 transformers x (8 attn + proj_in/out + 2 ff); 2 TE layers x 4
    assert all(sd[k].abs().min() > 0 for k in sd if "lora_" in k.split(".")[1])
    assert all(sd[k].item() == 4.0 for k in sd if k.endswith(".alpha"))
    path = F.save_kohya_lora(sd_dir, tmp_path / "u.safetensors", text_encoder=False, proj=False, ff=False)
    unet_only = load_file(path)
    assert len(unet_only) == 16 * 8 * 3 and not any(k.startswith("lora_te_") for k in unet_only)


def test_lora_weight_zero_is_identity_and_one_changes_outputs(sd_dir, files):
    pipe = _pipe(sd_dir)
    inputs = _inputs(pipe)
    unet_base, te_base = _outputs(pipe, inputs)
    pipe.load_lora_weights(str(files["lora"]), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.0])
    unet0, te0 = _outputs(pipe, inputs)
    assert torch.equal(unet0, unet_base) and torch.equal(te0, te_base)
    pipe.set_adapters(["x"], adapter_weights=[1.0])
    unet1, te1 = _outputs(pipe, inputs)
    assert (unet1 - unet_base).abs().max() > 0.1 * unet_base.abs().max()
    assert (te1 - te_base).abs().max() > 0.1 * te_base.abs().max()
    # alpha / rank is honoured (alpha = rank -> 1) on UNet linear, UNet conv and text-encoder layers
    for module in (
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q,
        pipe.unet.mid_block.attentions[0].proj_in,  # a 1x1 conv in SD1.5
        _clip_layers(pipe.text_encoder)[0].self_attn.q_proj,
    ):
        assert module.scaling == {"x": 1.0}
    pipe.unload_lora_weights()
    assert torch.equal(_outputs(pipe, inputs)[0], unet_base)


def test_lora_alpha_is_read(sd_dir, files):
    pipe = _pipe(sd_dir)
    pipe.load_lora_weights(str(files["lora_alpha2"]), adapter_name="y")
    assert pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.scaling == {"y": 0.5}
    assert _clip_layers(pipe.text_encoder)[0].self_attn.q_proj.scaling == {"y": 0.5}


def _clip_layers(text_encoder):
    """CLIPTextModel's transformer layers: ``encoder`` on transformers >= 5.6, ``text_model.encoder`` before."""
    return getattr(text_encoder, "text_model", text_encoder).encoder.layers


def test_lora_for_other_model_raises_size_mismatch(sd_dir, files):
    pipe = _pipe(sd_dir)
    inputs = _inputs(pipe)
    unet_base, _ = _outputs(pipe, inputs)
    expected = (
        r"Error\(s\) in loading state_dict for UNet2DConditionModel:\s+size mismatch for "
        r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\.lora_A\.z\.weight: copying a param "
        r"with shape torch\.Size\(\[4, 320\]\) from checkpoint, the shape in current model is torch\.Size\(\[4, 32\]\)"
    )
    with pytest.raises(RuntimeError, match=expected):
        pipe.load_lora_weights(str(files["other"]), adapter_name="z")
    assert torch.equal(_outputs(pipe, inputs)[0], unet_base)  # the failed load left the model as it was
