"""A style from a picture, live (issue 30, point 4): the IP-Adapter and its image encoder written in
the released on-disk formats (a safetensors file, a transformers folder) and loaded through the
engine's loaders; the picture arrives as bytes (POST /api/style-image, `ctl style-image`, a styles
file's picture beside it, `--style-image` on the command line), is encoded beside the stream and
swapped in between frames; a bad or oversized picture is refused in one line while the engine
streams on."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from live import GateSource, LiveEngine, PacedSource, reference_outputs, wait_for
from live2diff_engine.control.schema import CommandError, command_message, parse_command
from live2diff_engine.errors import ConfigError
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.models.ip_adapter import load_style_image_models
from live2diff_engine.models.tiny import build_tiny_image_encoder, tiny_ip_adapter


def write_adapter_files(folder):
    """(IP-Adapter file, image encoder folder) for the tiny model, as h94/IP-Adapter lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    adapter = folder / "ip-adapter_sd15.safetensors"
    save_file(tiny_ip_adapter(build_tiny_components(seed=0).unet, seed=3), str(adapter))
    build_tiny_image_encoder(seed=4).save_pretrained(folder / "image_encoder")
    return adapter, folder / "image_encoder"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_adapter_files(tmp_path_factory.mktemp("ip"))


@pytest.fixture(scope="module")
def comps(files):
    c = build_tiny_components(seed=0)
    load_style_image_models(c, str(files[0]), str(files[1]))
    return c


def picture(colour=(255, 40, 40), shape=(48, 64)) -> bytes:
    img = np.zeros((*shape, 3), np.uint8)
    cv2.circle(img, (shape[1] // 2, shape[0] // 2), min(shape) // 3, colour, -1)
    return cv2.imencode(".png", img)[1].tobytes()


def upload(url, data: bytes, ctype="image/png", token=None):
    headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url + "/api/style-image", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def command(url, cmd, **fields):
    req = urllib.request.Request(url + "/api/command", data=json.dumps(command_message(cmd, **fields)).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_an_adapter_with_no_picture_changes_nothing_and_the_schema_holds_the_scale(comps):
    n = 12
    plain = reference_outputs(build_tiny_components(seed=0), n)
    loaded = reference_outputs(comps, n)
    for a, b in zip(plain, loaded):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # scale 0: the image tokens add nothing
    assert parse_command(command_message("set_style_image_scale", scale=1.5)).args == {"scale": 1.5}
    for bad in (-0.1, 2.5, "1", True, float("nan")):
        with pytest.raises(CommandError, match="scale must be"):
            parse_command(command_message("set_style_image_scale", scale=bad))
    with pytest.raises(CommandError, match="does not take"):
        parse_command(command_message("clear_style_image", path="/etc/passwd"))  # a picture never comes as a path


def test_a_picture_uploaded_over_http_changes_the_following_frames_only(comps):
    n, k = 28, 16
    ref = reference_outputs(comps, n)
    source = GateSource(n, gate_at=k)
    with LiveEngine(comps, source) as live:
        source.reached.wait(60)
        replies = []
        t = threading.Thread(target=lambda: replies.append(upload(live.api.url, picture())))
        t.start()
        # encoded beside the stream (which waits at the gate meanwhile); swapped in before frame k
        wait_for(lambda: live.controller._picture_load is not None and live.controller._picture_load["done"],
                 timeout=60, what="the picture encoded")
        source.gate.set()
        t.join(60)
        live.thread.join(120)
    assert replies == [(200, {"app": "live2diff", "v": 1, "kind": "reply", "id": None, "ok": True})]
    assert live.frames.style_image == "upload"
    assert len(live.outputs) == len(ref)
    for i in range(k - live.frames.steps):
        assert np.array_equal(live.outputs[i], ref[i]), i
    for i in range(k, n):
        assert not np.array_equal(live.outputs[i], ref[i]), i


def test_bad_pictures_are_refused_in_one_line_and_the_engine_streams_on(comps):
    with LiveEngine(comps, PacedSource(fps=30)) as live:
        url = live.api.url
        live.wait_outputs(10)
        for data, ctype, code, words in (
            (b"\x89PNG" + b"x" * (9 << 20), "image/png", 413, "too large"),
            (b"this is no picture", "image/png", 400, "not an image"),
            (picture(), "text/plain", 415, "image/png"),
            (picture(), "application/x-www-form-urlencoded", 415, "image/png"),
            (b"", "image/jpeg", 400, "empty"),
        ):
            got, reply = upload(url, data, ctype)
            assert got == code and not reply["ok"] and words in reply["error"] and "\n" not in reply["error"], reply
            before = len(live.outputs)
            live.wait_outputs(before + 3)  # streaming on
        assert live.frames.style_image is None
        # a scale out of range: the schema's one line; the status says what is in place
        assert command(url, "set_style_image_scale", scale=3)[0] == 400
        assert command(url, "set_style_image_scale", scale=0.5)[0] == 200
        st = live.controller.status()
        assert (st["style_image"], st["style_image_scale"], st["style_image_loading"]) == (None, 0.5, False)
        assert live.engine.stats.errors == 0


def test_an_engine_without_an_adapter_refuses_a_picture_and_streams_on():
    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=30)) as live:
        live.wait_outputs(10)
        code, reply = upload(live.api.url, picture())
        assert code == 400 and "no IP-Adapter loaded" in reply["error"] and "--ip-adapter" in reply["error"]
        code, reply = command(live.api.url, "set_style_image_scale", scale=0.5)
        assert code == 400 and "no IP-Adapter loaded" in reply["error"]
        assert live.controller.status()["style_image_scale"] is None
        n = len(live.outputs)
        live.wait_outputs(n + 3)


def test_ctl_uploads_a_local_picture_sets_the_scale_and_clears_it(comps, tmp_path):
    look = tmp_path / "look.png"
    look.write_bytes(picture((40, 200, 40)))
    with LiveEngine(comps, PacedSource(fps=30)) as live:
        url = live.api.url
        live.wait_outputs(10)
        r = run_cli("ctl", "style-image", str(look), "--api", url, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
        assert live.frames.style_image == "upload"
        r = run_cli("ctl", "style-image-scale", "0.7", "--api", url, timeout=60)
        assert r.returncode == 0 and live.frames.style_image_scale == 0.7
        r = run_cli("ctl", "status", "--api", url, timeout=60)
        assert "style picture: upload  scale: 0.7" in r.stdout
        r = run_cli("ctl", "style-image", "--clear", "--api", url, timeout=60)
        assert r.returncode == 0 and live.frames.style_image is None
        # what ctl refuses itself, in one line, before sending anything
        (tmp_path / "notes.txt").write_text("not a picture")
        for args, words in ((["style-image", str(tmp_path / "none.png")], "file not found"),
                            (["style-image", str(tmp_path / "notes.txt")], "not a PNG, JPEG or WebP"),
                            (["style-image"], "takes a picture file, or --clear"),
                            (["style-image-scale", "3"], "0 to 2"),
                            (["prompt", "x", "--clear"], "--clear goes with")):
            r = run_cli("ctl", *args, "--api", url, timeout=60)
            assert r.returncode != 0 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
        live.wait_outputs(len(live.outputs) + 3)
        assert live.engine.stats.errors == 0


def test_a_style_sets_the_picture_beside_its_styles_file_and_only_from_inside_that_folder(comps, tmp_path):
    from live2diff_engine.styles import load_styles

    folder = tmp_path / "mystyles"
    folder.mkdir()
    (folder / "look.png").write_bytes(picture())
    styles_file = folder / "styles.toml"
    styles_file.write_text('[styles.pictured]\nimage = "look.png"\ntemplate = "ink, {}"\n[styles.plain]\n')
    styles = load_styles(styles_file)
    assert styles["pictured"].image == str((folder / "look.png").resolve())
    for bad, words in (("../look.png", "outside the styles file's folder"), ("/etc/passwd", "relative to the styles file's folder"),
                       ("", "name of a picture file")):
        styles_file.write_text(f'[styles.bad]\nimage = "{bad}"\n')
        with pytest.raises(ConfigError, match=words):
            load_styles(styles_file)
    styles_file.write_text('[styles.pictured]\nimage = "look.png"\ntemplate = "ink, {}"\n[styles.plain]\n')
    with LiveEngine(comps, PacedSource(fps=30)) as live:
        url = live.api.url
        live.manager.styles.update(styles)
        live.wait_outputs(10)
        code, reply = command(url, "set_style", style="pictured")
        assert code == 200, reply
        assert live.frames.style_image == "style pictured" and live.controller.status()["style_image"] == "style pictured"
        assert command(url, "set_style", style="plain")[0] == 200  # a style without one drops the style's picture
        assert live.frames.style_image is None
        assert upload(url, picture((0, 0, 255)))[0] == 200
        assert command(url, "set_style", style="pictured")[0] == 200 and live.frames.style_image == "style pictured"
        assert upload(url, picture((0, 0, 255)))[0] == 200
        assert command(url, "set_style", style="plain")[0] == 200
        assert live.frames.style_image == "upload"  # the user's own picture stays
        (folder / "look.png").unlink()
        code, reply = command(url, "set_style", style="pictured")
        assert code == 400 and "look.png" in reply["error"] and "not there" in reply["error"]
        live.wait_outputs(len(live.outputs) + 3)
        assert live.engine.stats.errors == 0
    # an engine without an adapter refuses such a style in one line, keeping its own
    with LiveEngine(build_tiny_components(seed=0), PacedSource(fps=30)) as live:
        (folder / "look.png").write_bytes(picture())
        live.manager.styles.update(styles)
        code, reply = command(live.api.url, "set_style", style="pictured")
        assert code == 400 and "--ip-adapter" in reply["error"] and live.manager.current.name == "default"


def test_translate_with_a_style_image_from_the_command_line(files, tmp_path):
    frames = tmp_path / "in"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        cv2.imwrite(str(frames / f"{i:03d}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    look = tmp_path / "look.png"
    look.write_bytes(picture())
    common = ["translate", str(frames), "--model", "tiny", "--ip-adapter", str(files[0]), "--image-encoder", str(files[1])]
    outs = {}
    for name, extra in (("plain", []), ("pictured", ["--style-image", str(look)]),
                        ("zero", ["--style-image", str(look), "--style-image-scale", "0"])):
        out = tmp_path / f"{name}.avi"
        r = run_cli(*common[:2], str(out), *common[2:], *extra, timeout=300)
        assert r.returncode == 0, r.stderr
        cap = cv2.VideoCapture(str(out))
        outs[name] = np.stack([cap.read()[1] for _ in range(12)]).astype(int)
    assert np.abs(outs["plain"][8:] - outs["pictured"][8:]).max() > 0  # the picture steers every streamed frame
    assert np.abs(outs["plain"] - outs["zero"]).max() <= 1  # at scale 0 it does nothing
    (tmp_path / "notes.txt").write_text("no picture")
    for extra, words in ((["--style-image", str(tmp_path / "none.png")], "file not found"),
                         (["--style-image", str(tmp_path / "notes.txt")], "not an image"),
                         (["--style-image", str(look), "--style-image-scale", "5"], "0 to 2")):
        r = run_cli(*common[:2], str(tmp_path / "x.avi"), *common[2:], *extra, timeout=300)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("translate", str(frames), str(tmp_path / "x.avi"), "--model", "tiny", "--style-image-scale", "0.5", timeout=300)
    assert r.returncode != 0 and "goes with a style picture" in r.stderr and r.stderr.count("\n") <= 2, r.stderr


def _hub_cache_with_ip_adapter(root, files):
    snap = root / "hub" / "models--h94--IP-Adapter" / "snapshots" / ("0" * 40)
    (snap / "models").mkdir(parents=True)
    shutil.copy(files[0], snap / "models" / "ip-adapter_sd15.safetensors")
    shutil.copytree(files[1], snap / "models" / "image_encoder")
    (root / "hub" / "models--h94--IP-Adapter" / "refs").mkdir()
    (root / "hub" / "models--h94--IP-Adapter" / "refs" / "main").write_text("0" * 40)
    return snap


def test_models_list_and_verify_know_the_ip_adapter_and_its_image_encoder(files, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    listing = run_cli("models", "list", env=env)
    lines = {l.split()[0]: l for l in listing.stdout.splitlines() if l and not l.startswith(" ")}
    assert "--" in lines["ip-adapter"] and "h94/IP-Adapter" in lines["ip-adapter"] and "optional" in lines["ip-adapter"]
    assert "--" in lines["image-encoder"]
    verify = run_cli("models", "verify", "ip-adapter", "image-encoder", env=env)
    assert verify.returncode == 1 and "models download ip-adapter" in verify.stdout
    snap = _hub_cache_with_ip_adapter(tmp_path / "hf", files)
    listing = run_cli("models", "list", env=env)
    lines = {l.split()[0]: l for l in listing.stdout.splitlines() if l and not l.startswith(" ")}
    assert "OK" in lines["ip-adapter"] and "OK" in lines["image-encoder"], listing.stdout
    assert str(snap / "models" / "image_encoder") in listing.stdout
    verify = run_cli("models", "verify", "ip-adapter", "image-encoder", env=env)
    assert verify.returncode == 0 and [l.split()[:2] for l in verify.stdout.splitlines()] == [["ip-adapter", "OK"], ["image-encoder", "OK"]]
    # a damaged adapter: FAIL with what is wrong
    state = tiny_ip_adapter(build_tiny_components(seed=0).unet)
    state["ip_adapter.3.to_v_ip.weight"] = torch.zeros(4, 5)
    save_file(state, str(snap / "models" / "ip-adapter_sd15.safetensors"))
    verify = run_cli("models", "verify", "ip-adapter", env=env)
    assert verify.returncode == 1 and "FAIL" in verify.stdout and "ip_adapter.3.to_v_ip" in verify.stdout


def test_bench_image_reports_the_cost_of_a_picture_against_none(tmp_path):
    out = tmp_path / "image.json"
    r = run_cli("bench", "--model", "tiny", "--image", "--frames", "8", "--accelerate", "off", "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no picture:" in r.stdout and "a picture:" in r.stdout and "image encoder, once per picture" in r.stdout
    record = json.loads(out.read_text())
    assert set(record["image"]) == {"none", "picture"} and record["frames"] == 8
    assert all(v["median"] > 0 and v["in_use"] == "off" for v in record["image"].values())
    assert record["encode_ms"] > 0 and record["swap_ms"] > 0
    r = run_cli("bench", "--model", "tiny", "--image", "--text", "steady", timeout=120)
    assert r.returncode != 0 and "one at a time" in r.stderr and r.stderr.count("\n") == 1


def test_dreambooth_and_lora_style_switches_keep_the_picture_steering(tmp_path):
    """Real SD-format models, a DreamBooth checkpoint and a kohya LoRA swapped in and out: the
    IP-Adapter's weights are no style's business, and the picture steers before and after."""
    from sd_formats import save_kohya_lora, save_single_file, save_tiny_sd
    from test_frames import clip

    from live2diff_engine.models.components import load_components
    from live2diff_engine.pipeline.frames import FramePipeline
    from live2diff_engine.styles import StyleManager, load_styles
    from conftest import FIXTURE_A

    sd = save_tiny_sd(tmp_path / "sd", seed=0)
    motion = tmp_path / "live2diff.safetensors"
    shutil.copy(FIXTURE_A / "live2diff_motion.safetensors", motion)
    from live2diff_engine.depth import build_tiny_depth

    build_tiny_depth("midas", seed=0, size=64).model.save_pretrained(tmp_path / "midas")
    save_single_file(sd, tmp_path / "db.safetensors", seed_offset=1)
    save_kohya_lora(sd, tmp_path / "lora.safetensors", seed=3)
    (tmp_path / "look.png").write_bytes(picture())
    (tmp_path / "styles.toml").write_text(f'[styles.db]\ndreambooth = "{tmp_path / "db.safetensors"}"\nimage = "look.png"\n'
                                          f'[styles.lora]\nloras = [{{ file = "{tmp_path / "lora.safetensors"}" }}]\n')
    comps = load_components(base=str(tmp_path / "sd"), motion=str(motion), depth="midas", depth_source=str(tmp_path / "midas"),
                            lcm_lora=None)
    adapter, encoder = write_adapter_files(tmp_path / "ip")
    load_style_image_models(comps, str(adapter), str(encoder))
    ip_weights = {k: v.clone() for k, v in comps.unet.state_dict().items() if "_ip" in k or "encoder_hid_proj" in k}
    assert ip_weights
    manager = StyleManager(comps, load_styles(tmp_path / "styles.toml"))
    fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=1)
    manager.apply("default", fp)
    frames = clip(12, seed=2)
    for f in frames[:10]:
        fp.push(f)
    manager.apply("db", fp)  # the DreamBooth weights, and the style's picture
    assert fp.style_image == "style db"
    manager.apply("lora", fp)
    assert fp.style_image is None
    manager.apply("default", fp)
    state = comps.unet.state_dict()
    for k, v in ip_weights.items():
        if "to_v_ip" not in k:  # (the values carry the scale: 0 with no picture)
            assert torch.equal(state[k], v), k
    outs = []
    for with_picture in (True, False):  # fresh streams on the switched-back weights, the same frames
        fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=1)
        if with_picture:
            fp.set_style_image(fp.encode_style_picture(picture()))
        outs.append(np.stack([img for f in frames for _, img in fp.push(f)][8:]).astype(int))
    assert np.abs(outs[0] - outs[1]).max() > 0


def test_the_stream_goes_on_while_a_picture_is_encoded_beside_it(comps):
    with LiveEngine(comps, PacedSource(fps=30)) as live:
        live.wait_outputs(10)
        held, release = threading.Event(), threading.Event()
        real = live.frames.encode_style_picture

        def slow_encoder(data):  # the real encoder, held on its thread until the test lets it go
            held.set()
            release.wait(60)
            return real(data)

        live.frames.encode_style_picture = slow_encoder
        replies = []
        t = threading.Thread(target=lambda: replies.append(upload(live.api.url, picture())))
        t.start()
        assert held.wait(30)
        assert live.controller.status()["style_image_loading"] is True
        n = len(live.outputs)
        live.wait_outputs(n + 8)  # frames go on while the picture is being read
        assert live.frames.style_image is None and replies == []
        release.set()
        t.join(60)
        assert replies and replies[0][0] == 200 and live.frames.style_image == "upload"
        assert live.controller.status()["style_image_loading"] is False


def test_pictures_set_replaced_and_cleared_mid_stream_compile_once_and_match_eager(files):
    """A compiled frame pipeline (dynamo with its eager backend, counted) given a picture, another,
    none, a new scale and a picture again, mid-stream: the frames of the eager pipeline, and no
    recompile after the first streamed frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from live2diff_engine.pipeline.accelerate import accelerator_for
    from live2diff_engine.pipeline.frames import FramePipeline
    from test_frames import clip

    frames = clip(26, seed=5)
    pictures = [picture((255, 40, 40)), picture((40, 40, 255), shape=(64, 48))]

    def run(mode):
        torch._dynamo.reset()
        c = build_tiny_components(seed=0)
        load_style_image_models(c, str(files[0]), str(files[1]))
        counter = CompileCounterWithBackend("eager")
        if mode != "off":
            accelerator_for(c.unet, mode, backend=counter)
        fp = FramePipeline(c, width=64, height=64, prompt="a cat", seed=1, accelerate=mode)
        embeds = [fp.encode_style_picture(p) for p in pictures]
        fp.set_style_image(embeds[0])
        out, counts = [], []
        for i, f in enumerate(frames):
            if i == 12:
                fp.set_style_image(embeds[1])
            elif i == 16:
                fp.set_style_image(None)
            elif i == 19:
                fp.set_style_image_scale(0.5)
            elif i == 21:
                fp.set_style_image(embeds[0])
            out += [img for _, img in fp.push(f)]
            counts.append(counter.frame_count)
        return np.stack(out).astype(int), counts, fp

    eager, _, _ = run("off")
    compiled, counts, fp = run("compile")
    torch._dynamo.reset()
    assert fp.stream.accelerated == "compile"
    assert counts[9] > 0 and counts[-1] == counts[9]  # compiled by the first streamed frames, never again
    assert np.abs(compiled - eager).max() <= 1


def test_an_api_with_a_token_takes_a_picture_only_with_it(comps):
    with LiveEngine(comps, PacedSource(fps=30), api_token="pic-token") as live:
        live.wait_outputs(10)
        code, reply = upload(live.api.url, picture())
        assert code == 401 and "token" in reply["error"] and live.frames.style_image is None
        code, reply = upload(live.api.url, picture(), token="pic-token")
        assert code == 200 and reply["ok"] and live.frames.style_image == "upload"
