"""Depth estimators: tiny random-weight models saved with save_pretrained and loaded back through
load_depth_estimator, run on CPU. Checks shapes, batching, preprocessing, dtypes and load errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from live2diff_engine.depth import (
    DEPTH_MODELS,
    DepthAnythingV2,
    DepthEstimator,
    MidasHybrid,
    build_tiny_depth,
    load_depth_estimator,
    tiny_depth_config,
)
from live2diff_engine.errors import ConfigError, ModelLoadError

KINDS = ["midas", "depth-anything"]
WORKING_SIZE = {"midas": (384, 384), "depth-anything": (392, 392)}


def frames(n, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to gain from threads, and on a busy CPU the OpenMP workers of a
    second thread slow each forward from ~0.1 s to seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> folder holding the tiny model in transformers format (config.json + model.safetensors)."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        build_tiny_depth(kind, seed=1).model.save_pretrained(folder)
        out[kind] = folder
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {kind: load_depth_estimator(kind, saved[kind]) for kind in KINDS}


def run(estimator, images):
    with torch.no_grad():
        return estimator(images)


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_estimator_is_the_saved_model(kind, saved, loaded):
    est = loaded[kind]
    assert isinstance(est, DepthEstimator)
    assert isinstance(est, {"midas": MidasHybrid, "depth-anything": DepthAnythingV2}[kind])
    assert est.name == kind and est.size == WORKING_SIZE[kind]
    assert est.device == torch.device("cpu") and est.dtype == torch.float32
    assert not est.training and not est.model.training
    assert not any(p.requires_grad for p in est.parameters())
    # The weights came from the folder, not from a fresh random init.
    x = frames(1)
    depth = run(est, x)
    torch.testing.assert_close(depth, run(build_tiny_depth(kind, seed=1), x), rtol=0, atol=0)
    assert not torch.allclose(depth, run(build_tiny_depth(kind, seed=2), x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 64, 64), (3, 64, 64), (2, 48, 80)])
def test_output_shape_and_values(kind, shape, loaded):
    n, h, w = shape
    depth = run(loaded[kind], frames(n, h, w))
    assert depth.shape == (n, *WORKING_SIZE[kind])
    assert depth.dtype == torch.float32
    assert torch.isfinite(depth).all()
    assert depth.std() > 1e-3  # a map, not a constant
    if n > 1:
        assert not torch.allclose(depth[0], depth[1])  # depends on the frame


@pytest.mark.parametrize("kind", KINDS)
def test_batch_matches_single_frames(kind, loaded):
    est = loaded[kind]
    x = frames(3, 48, 80, seed=3)
    batch = run(est, x)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], run(est, x[i : i + 1]), rtol=1e-4, atol=1e-5)


def capture_pixel_values(estimator, images):
    seen = []
    handle = estimator.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].clone()), with_kwargs=True
    )
    try:
        run(estimator, images)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_midas_feeds_bilinear_384_resize_of_the_raw_frame(loaded):
    x = frames(2, 48, 80, seed=4)
    pixel_values = capture_pixel_values(loaded["midas"], x)
    expected = F.interpolate(x, (384, 384), mode="bilinear", align_corners=False)
    assert torch.equal(pixel_values, expected)


def test_depth_anything_normalises_with_imagenet_stats(loaded):
    est = loaded["depth-anything"]
    black, white = -torch.ones(1, 3, 50, 70), torch.ones(1, 3, 50, 70)
    x = torch.cat([black, white])
    pixel_values = capture_pixel_values(est, x)
    assert pixel_values.shape == (2, 3, 392, 392)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(pixel_values[0], ((0 - mean) / std).expand(3, 392, 392))
    torch.testing.assert_close(pixel_values[1], ((1 - mean) / std).expand(3, 392, 392))


def test_depth_anything_preprocessing_is_the_training_recipe(loaded):
    """[0, 1], bicubic antialiased resize, ImageNet mean/std: folded into one multiply-add after
    the resize (its weights sum to one), with constants that move with the module."""
    est = loaded["depth-anything"]
    x = frames(2, 50, 70, seed=6)
    pixel_values = capture_pixel_values(est, x)
    resized = F.interpolate((x + 1) / 2, (392, 392), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixel_values, (resized - mean) / std)
    assert {name for name, _ in est.named_buffers()} >= {"_scale", "_shift"}
    assert not any(k.startswith("_s") for k in est.state_dict())  # not saved with the weights


def _cpu_float16_missing() -> str | None:
    """Why float16 can't run these estimators on this torch's CPU, or None. torch 2.2.2 (the last for
    Intel Macs) has no float16 CPU kernel for LayerNorm or channels-last bilinear resizing."""
    x = torch.zeros(1, 4, 4, 4, dtype=torch.float16)
    try:
        F.layer_norm(x, (4,))
        F.interpolate(x.to(memory_format=torch.channels_last), scale_factor=2, mode="bilinear")
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(kind, dtype, saved, loaded):
    if dtype == torch.float16 and (missing := _cpu_float16_missing()):
        # Not a path the engine takes there: it runs float32 on the CPU and on MPS (float16 is CUDA's default).
        pytest.skip(f"torch {torch.__version__} lacks float16 CPU kernels ({missing})")
    x = frames(1, 48, 80, seed=5)
    reference = run(loaded[kind], x)
    est = load_depth_estimator(kind, saved[kind], dtype=dtype)
    assert est.dtype == dtype
    depth = run(est, x.to(dtype))
    assert depth.dtype == dtype and depth.shape == reference.shape
    assert torch.isfinite(depth).all()
    assert (depth.float() - reference).norm() / reference.norm() < 0.05
    # float32 frames work too (cast on the way in; Depth Anything resizes them before the cast).
    from_float32 = run(est, x)
    assert from_float32.dtype == dtype
    assert (from_float32.float() - depth.float()).norm() / depth.float().norm() < 0.02
    # A float32 estimator cast afterwards is the same as one loaded in that dtype.
    assert build_tiny_depth(kind, seed=1).to(dtype).dtype == dtype


def test_float64_frames_are_accepted(loaded):
    depth = run(loaded["midas"], frames(1).double())
    assert depth.dtype == torch.float32 and torch.isfinite(depth).all()


def test_tiny_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_tiny_depth("midas", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_tiny_depth("midas", seed=0)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert tiny_depth_config("midas").is_hybrid
    assert tiny_depth_config("midas").backbone_config.model_type == "bit"
    assert tiny_depth_config("depth-anything").backbone_config.model_type == "dinov2"


def test_default_hub_ids():
    assert DEPTH_MODELS == {
        "midas": "Intel/dpt-hybrid-midas",
        "depth-anything": "depth-anything/Depth-Anything-V2-Small-hf",
    }


def test_working_sizes():
    est = DepthAnythingV2(build_tiny_depth("depth-anything").model, size=(280, 518))
    assert run(est, frames(1)).shape == (1, 280, 518)
    with pytest.raises(ConfigError, match=r"multiple of 14 .* try 406"):
        DepthAnythingV2(build_tiny_depth("depth-anything").model, size=400)
    with pytest.raises(ConfigError, match=r"try \(392, 98\)"):
        DepthAnythingV2(build_tiny_depth("depth-anything").model, size=(392, 100))
    with pytest.raises(ConfigError, match="image_size 384"):
        MidasHybrid(build_tiny_depth("midas").model, size=512)


def one_line_error(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("kind", KINDS)
def test_missing_folder(kind, tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator(kind, tmp_path / "nope")
    one_line_error(exc, "not found", str(tmp_path / "nope"), DEPTH_MODELS[kind])


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator("midas", tmp_path)
    one_line_error(exc, "config.json")


@pytest.mark.parametrize("kind", KINDS)
def test_folder_without_weights(kind, saved, tmp_path):
    shutil.copy(saved[kind] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator(kind, tmp_path)
    one_line_error(exc, "no weights", "model.safetensors")


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_weights(kind, saved, tmp_path):
    shutil.copy(saved[kind] / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator(kind, tmp_path)
    one_line_error(exc, "cannot load", "download")


def test_weights_missing_tensors(saved, tmp_path):
    shutil.copytree(saved["midas"], tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator("midas", tmp_path)
    one_line_error(exc, "do not fit", "missing", "head.")


def test_tolerated_checkpoint_quirks(saved, tmp_path):
    """A Depth Anything folder without the (inference-unused) mask token, and with max_depth null."""
    shutil.copytree(saved["depth-anything"], tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    del state["backbone.embeddings.mask_token"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_depth"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    est = load_depth_estimator("depth-anything", tmp_path)
    x = frames(1)
    torch.testing.assert_close(run(est, x), run(build_tiny_depth("depth-anything", seed=1), x), rtol=0, atol=0)


def test_weights_of_the_wrong_shape(saved, tmp_path):
    shutil.copytree(saved["midas"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["fusion_hidden_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator("midas", tmp_path)
    one_line_error(exc, "do not fit", "wrong shape")


@pytest.mark.parametrize("kind, other", [("midas", "depth-anything"), ("depth-anything", "midas")])
def test_folder_of_the_other_kind(kind, other, saved):
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator(kind, saved[other])
    one_line_error(exc, f"kind {kind!r}", f"use depth model kind {other!r}")


def test_plain_dpt_is_not_midas_hybrid(saved, tmp_path):
    shutil.copytree(saved["midas"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["is_hybrid"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator("midas", tmp_path)
    one_line_error(exc, "not the hybrid")


def test_unreadable_config(saved, tmp_path):
    shutil.copytree(saved["depth-anything"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as exc:
        load_depth_estimator("depth-anything", tmp_path)
    one_line_error(exc, "cannot read")


def test_unknown_kind(saved):
    with pytest.raises(ConfigError, match="midas, depth-anything"):
        load_depth_estimator("zoe", saved["midas"])
