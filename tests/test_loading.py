"""Model construction and the real on-disk formats."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURE_A, GOLDEN
from live2diff_engine.errors import ModelLoadError
from live2diff_engine.models import MotionConfig, build_streaming_unet, load_streaming_unet, read_motion_state_dict


def test_full_size_model_has_exactly_the_live2diff_checkpoint_keys():
    """Full SD1.5 geometry + the original motion config, built on the meta device: the state dict
    beyond the 2D UNet's is exactly what a real live2diff.ckpt supplies (names and shapes)."""
    spec = json.loads((GOLDEN / "live2diff_full_keys.json").read_text())
    motion = MotionConfig.from_kwargs(spec["unet_additional_kwargs"])
    with torch.device("meta"):
        unet = build_streaming_unet(spec["unet_2d_config"], motion)
    state = unet.state_dict()
    base = unet.base_state_keys()
    extra = {k: list(v.shape) for k, v in state.items() if k not in base}
    wanted = {e["key"]: e["shape"] for e in spec["extra_keys"]}
    assert sorted(set(extra) - set(wanted)) == []
    assert sorted(set(wanted) - set(extra)) == []
    assert extra == wanted
    counts = spec["counts"]
    assert len(base) == counts["unet2d_state_dict_entries"]
    assert len(state) == counts["unet3d_streaming_state_dict_entries"]
    motion_params = sum(p.numel() for n, p in unet.named_parameters() if "motion_modules." in n)
    depth_params = sum(p.numel() for n, p in unet.named_parameters() if n.startswith("flow_conv_in."))
    assert motion_params == counts["motion_module_parameters"]
    assert depth_params == counts["flow_conv_in_parameters"]
    assert len(unet.temporal_layers) == counts["num_temporal_attention_layers"]


def test_temporal_layer_order_matches_the_original_index_map():
    manifest = json.loads((FIXTURE_A / "manifest.json").read_text())
    unet = load_streaming_unet(FIXTURE_A / "base_unet", FIXTURE_A / "live2diff_motion.safetensors")
    names = {id(m): n for n, m in unet.named_modules()}
    ours = [names[id(layer)] for layer in unet.temporal_layers]
    assert ours == manifest["motion_module_index_map"]


def test_every_weight_comes_from_the_files():
    unet = load_streaming_unet(FIXTURE_A / "base_unet", FIXTURE_A / "live2diff_motion.safetensors")
    base = load_file(str(FIXTURE_A / "base_unet" / "diffusion_pytorch_model.safetensors"))
    motion = load_file(str(FIXTURE_A / "live2diff_motion.safetensors"))
    state = unet.state_dict()
    assert set(state) == set(base) | set(motion)
    for k, v in {**base, **motion}.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("layout", ["wrapped", "bare", "prefixed"])
def test_ckpt_layouts_read_the_same(tmp_path, layout):
    sd = load_file(str(FIXTURE_A / "live2diff_motion.safetensors"))
    if layout == "wrapped":
        obj = {"state_dict": sd, "global_step": 100}
    elif layout == "bare":
        obj = dict(sd)
    else:
        obj = {"state_dict": {"module." + k: v for k, v in sd.items()}}
        obj["state_dict"]["module.grid_sample.grid"] = torch.ones(2)
    path = tmp_path / "live2diff.ckpt"
    torch.save(obj, path)
    read = read_motion_state_dict(path)
    assert set(read) == set(sd)
    assert all(torch.equal(read[k], sd[k]) for k in sd)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "live2diff.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        read_motion_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="motion checkpoint not found"):
        read_motion_state_dict(tmp_path / "nope.ckpt")
    with pytest.raises(ModelLoadError, match="base model folder not found"):
        load_streaming_unet(tmp_path / "nope", FIXTURE_A / "live2diff_motion.safetensors")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((FIXTURE_A / "base_unet" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no UNet weights"):
        load_streaming_unet(tmp_path, FIXTURE_A / "live2diff_motion.safetensors")


def test_sd_folder_with_unet_subfolder_loads(tmp_path):
    import shutil

    shutil.copytree(FIXTURE_A / "base_unet", tmp_path / "sd" / "unet")
    unet = load_streaming_unet(tmp_path / "sd", FIXTURE_A / "live2diff_motion.safetensors")
    assert unet.dtype == torch.float32 and not any(t.is_meta for t in unet.state_dict().values())


def test_missing_positional_tables_are_rebuilt(tmp_path):
    sd = load_file(str(FIXTURE_A / "live2diff_motion.safetensors"))
    pes = {k: v for k, v in sd.items() if k.endswith("pos_encoder.pe")}
    for k in pes:
        del sd[k]
    save_file(sd, str(tmp_path / "m.safetensors"))
    unet = load_streaming_unet(FIXTURE_A / "base_unet", tmp_path / "m.safetensors")
    state = unet.state_dict()
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in pes.items())


def test_unknown_motion_settings_are_rejected():
    from live2diff_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown motion settings"):
        MotionConfig.from_kwargs({"motion_module_kwargs": {"num_attention_heads": 8, "wobble": 1}})
    with pytest.raises(ConfigError, match="window_size"):
        MotionConfig.from_kwargs({"motion_module_kwargs": {"attention_kwargs": {"window_size": 8, "sink_size": 8}}})
