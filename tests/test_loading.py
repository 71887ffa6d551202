"""Model construction and the real on-disk formats."""

import json
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURE_A, GOLDEN, run_cli
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


CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys, writer):
    """Refused for what it is (Python objects besides tensors, which could run code), with what to
    get instead; never torch's advice on loading it anyway (which carries terminal escapes when
    the file was written by torch.save), never "damaged"."""
    path = tmp_path / "live2diff.ckpt"
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"x": _Evil()}}, f)
    else:
        torch.save({"state_dict": {"x": _Evil()}}, path)
    with pytest.raises(ModelLoadError) as info:
        read_motion_state_dict(path)
    name = "builtins.print" if writer == "pickle" else "__builtin__.print"  # protocol 4 / protocol 2 names
    assert str(info.value) == (
        f"refused checkpoint {path}: the file holds Python objects besides tensors ({name}), "
        "and loading it could run code; get a .safetensors version of it"
    )
    assert not CONTROL_CHARS.search(str(info.value))
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_runs_code_is_one_clean_line_on_the_command_line(tmp_path, writer):
    import shutil

    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE_A, fixture)
    (fixture / "live2diff_motion.safetensors").unlink()
    if writer == "pickle":
        with open(fixture / "live2diff_motion.ckpt", "wb") as f:
            pickle.dump({"state_dict": {"x": _Evil()}}, f)
    else:
        torch.save({"state_dict": {"x": _Evil()}}, fixture / "live2diff_motion.ckpt")
    name = "builtins.print" if writer == "pickle" else "__builtin__.print"
    result = run_cli("check-reference", fixture)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "this must never run" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"live2diff-engine: error: refused checkpoint {fixture / 'live2diff_motion.ckpt'}: the file holds Python objects "
        f"besides tensors ({name}), and loading it could run code; get a .safetensors version of it"
    ], result.stderr
    assert not CONTROL_CHARS.search(result.stderr.rstrip("\n"))


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, b"", b"{\"not\": \"a checkpoint\"}"])
def test_a_damaged_pickle_is_called_damaged_without_torchs_advice(tmp_path, content):
    path = tmp_path / "live2diff.ckpt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        read_motion_state_dict(path)
    line = str(info.value)
    assert line.startswith(f"cannot read checkpoint {path}: ") and line.endswith("the file is damaged or not a checkpoint, download it again")
    assert "weights_only" not in line and not CONTROL_CHARS.search(line)


def test_error_lines_carry_no_escape_codes_or_control_characters():
    from live2diff_engine.errors import UserError, one_line

    text = "a \x1b[1mbold\x1b[0m word\n\t(1) next\x07 \x1b]0;title\x07x \u202eevil\u202c \x9b31mred\x00\r\n"
    assert one_line(text) == "a bold word (1) next x evil red"
    assert str(UserError(text)) == "a bold word (1) next x evil red"
    assert str(ModelLoadError(f"cannot read {text}")) == "cannot read a bold word (1) next x evil red"


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


# -- model paths and the hub before anything loads (issue 24, point 8) --------------------------------


class _Hub:
    """A stand-in Hugging Face hub on a local port: HEAD / answers 200 (the engine's reachability
    probe), every file answers 503 with Retry-After 0 (the hub client retries those, saying so)."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(200 if self.path == "/" else 503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def hub_at(tmp_path, monkeypatch):
    """Point the hub client at ``url`` (an empty cache of this test's own, online) and return the
    engine's hub module; its remembered reachability starts empty."""
    from huggingface_hub import constants, file_download

    from live2diff_engine.models import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_unreachable", {})

    def at(url):
        template = url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        # huggingface_hub < 1.0 (the Intel Mac set: transformers 4) reads its own copy of the template.
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)
        return hub

    return at


def test_local_model_paths_are_judged_from_their_files_before_the_hub_is_asked(tmp_path, hub_at, monkeypatch):
    """An empty folder or a file that is no checkpoint as --base (or --motion) is one line at once,
    naming the option and what to pass instead; the hub is not asked even though models are
    missing from the cache (they are named too)."""
    hub = hub_at("http://127.0.0.1:9")
    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("the hub was asked"))
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"this is not a model, just some text " * 40)
    with pytest.raises(ModelLoadError) as info:
        hub.resolve_all(hub.model_requests(base=str(empty)))
    line = str(info.value)
    assert line.startswith(f"--base {empty} has no model_index.json, unet/ folder or config.json (the folder is empty)"), line
    assert "point --base at a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or a .safetensors file" in line
    assert line.endswith("also not downloaded: live2diff (Leoxing/Live2Diff), midas (Intel/dpt-hybrid-midas), "
                         "lcm-lora (latent-consistency/lcm-lora-sdv1-5)"), line
    with pytest.raises(ModelLoadError) as info:
        hub.resolve_all(hub.model_requests(base=str(corrupt), motion=str(empty)))
    line = str(info.value)
    assert f"--base {corrupt} is not a readable safetensors/checkpoint file (it is neither safetensors nor a torch checkpoint)" in line
    assert f"--motion {empty} is a folder; give the Live2Diff motion checkpoint" in line


def test_what_counts_as_a_readable_checkpoint(tmp_path):
    """safetensors (a file cut short is found from its header), torch.save's zip, the legacy pickle."""
    from live2diff_engine.models.hub import weight_file_problem

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.ckpt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert weight_file_problem(good) is None
    assert weight_file_problem(tmp_path / "zip.ckpt") is None
    assert weight_file_problem(tmp_path / "legacy.ckpt") is None
    assert weight_file_problem(cut).startswith(f"it is cut short: {cut.stat().st_size:,} of its {good.stat().st_size:,} bytes")
    assert weight_file_problem(tmp_path / "empty.ckpt") == "the file is empty"
    assert weight_file_problem(FIXTURE_A / "manifest.json") == "it is neither safetensors nor a torch checkpoint"


def test_an_unreachable_hub_is_found_once_and_every_missing_model_is_named(hub_at, monkeypatch, capfd):
    """No network (a closed local port as the hub): one quick request finds it, remembered for the
    process; the one line names every model missing from the cache, and the hub's retry lines
    (half a minute of them per model) never come."""
    from huggingface_hub.utils import _http

    hub = hub_at("http://127.0.0.1:9")
    monkeypatch.setattr(_http, "time", None)  # a retry's sleep would fail the test
    for _ in range(2):
        with pytest.raises(ModelLoadError) as info:
            hub.resolve_all(hub.model_requests(), progress=print)
        line = str(info.value)
        assert line.startswith("cannot reach the Hugging Face hub at http://127.0.0.1:9 (connection refused), and 4 models "
                               "are not downloaded: sd15 (stable-diffusion-v1-5/stable-diffusion-v1-5), live2diff "
                               "(Leoxing/Live2Diff), midas (Intel/dpt-hybrid-midas), lcm-lora (latent-consistency/lcm-lora-sdv1-5)"), line
        assert line.endswith("run `live2diff-engine models download`"), line
        monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: pytest.fail("the hub was asked twice"))
    out, err = capfd.readouterr()
    assert "downloading" not in out and err == ""


def test_the_hubs_retry_lines_never_reach_the_terminal(hub_at, monkeypatch, capfd, caplog):
    """A hub that answers but fails every file (HTTP 503, which its client retries five times,
    logging each): one line of the engine's, nothing of the client's on the terminal or in the log."""
    import types

    from huggingface_hub.utils import _http

    server = _Hub()
    try:
        hub = hub_at(server.url)
        monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda s: None))
        with pytest.raises(ModelLoadError) as info:
            hub.resolve_all([("live2diff", "live2diff")])
    finally:
        server.server.shutdown()
    assert str(info.value) == "cannot download live2diff (Leoxing/Live2Diff): HTTP 503"
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("huggingface_hub", "httpx"))] == []
