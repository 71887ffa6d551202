"""`eval`: the metrics on synthetic videos with known answers, the pictures, and the command.

Offline, on the CPU. CLIP is a tiny random CLIPModel saved in the hub's layout (config.json,
model.safetensors, preprocessor_config.json, as openai/clip-vit-large-patch14 holds them) and read
back through the real loader; the depth estimator is the engine's tiny MiDaS saved the same way.
Videos for exact numbers are PNG folders (lossless); the command is also run on .mp4 files.
"""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import run_cli
from live2diff_engine import quality
from live2diff_engine.quality import metrics as m

H, W = 64, 96


# -- synthetic videos ------------------------------------------------------------------------


def write_frames(folder, frames):
    """A video as a folder of PNGs (lossless, so expected numbers hold exactly)."""
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        assert cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return folder


def write_mp4(path, frames, fps=12):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames[0].shape[1], frames[0].shape[0]))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def smooth_texture(h, w, seed=0, cell=8):
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    return cv2.resize(coarse, ((w // cell + 2) * cell, (h // cell + 2) * cell), interpolation=cv2.INTER_CUBIC)[:h, :w]


def panning(n=10, speed=1.5, seed=0):
    """A smooth texture sliding left by ``speed`` pixels a frame (sub-pixel: resampled each frame)."""
    big = smooth_texture(H + 16, W + 64, seed)
    frames = []
    for t in range(n):
        shift = np.float32([[1, 0, -speed * t], [0, 1, 0]])
        moved = cv2.warpAffine(big, shift, (big.shape[1], big.shape[0]), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        frames.append((np.clip(moved[8 : 8 + H, 8 : 8 + W], 0, 1) * 200 + 25).round().astype(np.uint8))
    return frames


def blob_on_still_background(n=10, speed=2):
    """A still textured background with a smooth yellow blob moving right across it."""
    bg = smooth_texture(H, W, seed=3) * 0.6 + 0.2
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    frames = []
    for t in range(n):
        blob = np.exp(-(((xx - 20 - speed * t) / 6) ** 2 + ((yy - 32) / 10) ** 2))[..., None]
        img = bg * (1 - blob) + blob * np.float32([0.9, 0.8, 0.3])
        frames.append((img * 255).round().astype(np.uint8))
    return frames


def with_flicker(frames, strength, seed=1):
    """Per-frame noise of a fixed pattern per frame, scaled by ``strength`` grey levels."""
    rng = np.random.default_rng(seed)
    noise = [rng.standard_normal(frames[0].shape).astype(np.float32) for _ in frames]
    return [np.clip(f + strength * z, 0, 255).round().astype(np.uint8) for f, z in zip(frames, noise)]


# -- tiny models in the real layouts --------------------------------------------------------------


def save_tiny_clip(folder, seed=0):
    """A whole CLIPModel (text and vision halves, as the hub's openai/clip-* repositories hold)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from live2diff_engine.depth import build_tiny_depth

    root = tmp_path_factory.mktemp("quality_models")
    save_tiny_clip(root / "clip")
    build_tiny_depth("midas", seed=0, size=64).model.save_pretrained(root / "midas")
    return root


@pytest.fixture(scope="module")
def clip(models):
    return quality.load_clip(models / "clip")


@pytest.fixture(scope="module")
def depth(models):
    return quality.load_depth_probe(f"midas={models / 'midas'}")


# -- the metrics -----------------------------------------------------------------------------------


def test_an_output_identical_to_a_smoothly_moving_input_has_warp_error_near_zero(tmp_path):
    frames = panning()
    src = write_frames(tmp_path / "in", frames)
    ev = quality.evaluate(src, [("same", str(src))], metrics=("warp_error", "flicker"))
    warp = ev.videos[0].per_frame["warp_error"]
    assert np.isnan(warp[0]) and np.isfinite(warp[1:]).all()
    # Against the error of not following the motion at all: the plain difference of frames.
    naive = np.mean([((m.to_unit(b) - m.to_unit(a)) ** 2).mean() for a, b in zip(frames, frames[1:])])
    assert ev.videos[0].mean("warp_error") < 5e-5  # an RMS under 0.7% of full scale, from resampling alone
    assert ev.videos[0].mean("warp_error") < 0.05 * naive
    # The flow is trusted almost everywhere (only the edge the texture enters from is not).
    fl = m.FlowEstimator()
    g0, g1 = m.gray(frames[3]), m.gray(frames[4])
    back = fl(g1, g0)
    assert m.trusted_mask(back, fl(g0, g1)).mean() > 0.9
    assert abs(np.median(back[..., 0]) - 1.5) < 0.1 and abs(np.median(back[..., 1])) < 0.1  # sliding left: frame t is t-1 moved


def test_flicker_of_growing_strength_raises_flicker_and_warp_error_and_lowers_clip_consistency(tmp_path, clip, depth):
    frames = blob_on_still_background()
    src = write_frames(tmp_path / "in", frames)
    strengths = [0, 3, 6, 12, 24]
    outputs = [(f"s{s}", str(write_frames(tmp_path / f"s{s}", with_flicker(frames, s)))) for s in strengths]
    ev = quality.evaluate(src, outputs, clip=clip, depth=depth)
    means = {key: [v.mean(key) for v in ev.videos] for key in ev.metrics}
    assert all(np.diff(means["flicker"]) > 0), means
    assert all(np.diff(means["warp_error"]) > 0), means
    assert all(np.diff(means["clip_consistency"]) < 0), means
    assert means["flicker"][0] < 0.002 and means["flicker"][-1] > 0.05  # 24 grey levels of noise: ~19/255 a frame
    assert means["clip_consistency"][0] > means["clip_consistency"][-1]
    assert means["depth_mse"][0] == 0.0  # the output is the input: the same depth
    # Per frame too: at every frame the stronger flicker is the larger.
    for key in ("flicker", "warp_error"):
        table = np.stack([v.per_frame[key][1:] for v in ev.videos])
        assert (np.diff(table, axis=0) > 0).all(), key


def test_the_forward_backward_check_leaves_out_occluded_and_uncovered_pixels():
    """The occlusion mask on exact flows (no estimator): a textured square 6 pixels further right
    each frame over a still background. Where it uncovers the background, the backward flow (the
    background's: none) lands on the square in the frame before, whose forward flow goes on: the
    round trip fails. What the square covers has no pixel in the current frame to check. Pixels
    whose flow leaves the frame are out too; everything else is trusted, and there an output equal
    to the input warps exactly onto itself."""
    bg = (smooth_texture(H, W, seed=4) * 160 + 40).astype(np.uint8)
    square = (smooth_texture(24, 24, seed=9) * 255).astype(np.uint8)
    x0, dx = 20, 6
    prev, cur = bg.copy(), bg.copy()
    prev[20:44, x0 : x0 + 24] = square
    cur[20:44, x0 + dx : x0 + dx + 24] = square
    backward = np.zeros((H, W, 2), np.float32)  # cur -> prev
    backward[20:44, x0 + dx : x0 + dx + 24, 0] = -dx
    backward[:, :3, 0] = -4  # the background's left edge comes from outside the frame
    forward = np.zeros((H, W, 2), np.float32)  # prev -> cur
    forward[20:44, x0 : x0 + 24, 0] = dx
    mask = m.trusted_mask(backward, forward)
    expected = np.ones((H, W), bool)
    expected[20:44, x0 : x0 + dx] = False  # uncovered: was under the square
    expected[:, :3] = False  # flows out of the frame
    assert np.array_equal(mask, expected)
    assert m.warp_error(prev, cur, backward, mask) == 0.0
    # Without the mask the uncovered strip counts: the square's edge against the background.
    assert m.warp_error(prev, cur, backward, np.ones((H, W), bool)) > 1e-3


def test_flicker_counts_only_where_the_input_holds_still(tmp_path):
    """A textured square slides over a still background; the output repaints the square with a new
    random colour every frame and leaves the background as it is: the moving part is not flicker."""
    rng = np.random.default_rng(7)
    bg = (smooth_texture(H, W, seed=4) * 160 + 40).astype(np.uint8)
    patch = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    patch = cv2.resize(patch, (18, 18), interpolation=cv2.INTER_NEAREST)  # a coarse, high-contrast texture
    frames, outputs = [], []
    for t in range(10):
        f = bg.copy()
        x = 10 + 3 * t
        f[20:38, x : x + 18] = patch
        frames.append(f)
        o = f.copy()
        o[20:38, x : x + 18] = rng.integers(0, 255, 3, dtype=np.uint8)
        outputs.append(o)
    src = write_frames(tmp_path / "in", frames)
    ev = quality.evaluate(src, [("square", str(write_frames(tmp_path / "o", outputs)))], metrics=("flicker",))
    everywhere = np.mean([np.abs(m.to_unit(b) - m.to_unit(a)).mean() for a, b in zip(outputs, outputs[1:])])
    assert everywhere > 0.01  # the output does change a lot, but only where the input moves
    assert ev.videos[0].mean("flicker") < 0.002


def test_a_constant_shift_of_the_structure_raises_depth_mse(tmp_path, depth):
    frames = blob_on_still_background(n=4)
    src = write_frames(tmp_path / "in", frames)

    def shifted(frame, dx):
        return cv2.warpAffine(frame, np.float32([[1, 0, dx], [0, 1, 0]]), (W, H), borderMode=cv2.BORDER_REFLECT)

    outputs = [(f"dx{dx}", str(write_frames(tmp_path / f"dx{dx}", [shifted(f, dx) for f in frames]))) for dx in (0, 6, 18)]
    ev = quality.evaluate(src, outputs, metrics=("depth_mse",), depth=depth)
    mse = [v.mean("depth_mse") for v in ev.videos]
    assert mse[0] == 0.0
    assert 0 < mse[1] < mse[2], mse
    # The same depth, brighter: a change of colour that keeps the structure costs less than moving it.
    brighter = [(np.clip(f.astype(np.int16) + 20, 0, 255)).astype(np.uint8) for f in frames]
    ev2 = quality.evaluate(src, [("brighter", str(write_frames(tmp_path / "b", brighter)))], metrics=("depth_mse",), depth=depth)
    assert ev2.videos[0].mean("depth_mse") < mse[2]


def test_metrics_of_two_identical_outputs_are_identical(tmp_path, clip, depth):
    frames = blob_on_still_background(n=9)
    src = write_frames(tmp_path / "in", frames)
    noisy = with_flicker(frames, 10)
    a = write_frames(tmp_path / "a", noisy)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    ev = quality.evaluate(src, [("a", str(a)), ("b", str(b))], clip=clip, depth=depth, chunk=4)
    for key in ev.metrics:
        assert np.array_equal(ev.videos[0].per_frame[key], ev.videos[1].per_frame[key], equal_nan=True), key
        assert ev.videos[0].mean(key) == ev.videos[1].mean(key)
    table = quality.table(ev).splitlines()
    assert table[2].split()[1:] == table[3].split()[1:]


def test_the_metrics_agree_with_a_hand_computation_on_three_frames(tmp_path, clip, depth):
    # A still input: the flow is zero, every pixel is trusted and holds still.
    still = (smooth_texture(32, 48, seed=5) * 200 + 20).round().astype(np.uint8)
    inputs = [still, still, still]
    # Outputs: grey 100; then the left half 110; then all 130.
    o0 = np.full((32, 48, 3), 100, np.uint8)
    o1 = o0.copy()
    o1[:, :24] = 110
    o2 = np.full((32, 48, 3), 130, np.uint8)
    src = write_frames(tmp_path / "in", inputs)
    out = write_frames(tmp_path / "out", [o0, o1, o2])
    ev = quality.evaluate(src, [("out", str(out))], clip=clip, depth=depth)
    v = ev.videos[0]
    # Warp error: half the pixels changed by 10/255, then half by 20/255 and half by 30/255.
    warp_1 = 0.5 * (10 / 255) ** 2
    warp_2 = 0.5 * (20 / 255) ** 2 + 0.5 * (30 / 255) ** 2
    np.testing.assert_allclose(v.per_frame["warp_error"][1:], [warp_1, warp_2], rtol=1e-5)
    assert np.isnan(v.per_frame["warp_error"][0])
    # Flicker: the mean absolute change, 5/255 then 25/255.
    np.testing.assert_allclose(v.per_frame["flicker"][1:], [5 / 255, 25 / 255], rtol=1e-5)
    np.testing.assert_allclose(v.mean("flicker"), 15 / 255, rtol=1e-5)
    np.testing.assert_allclose(v.mean("warp_error"), (warp_1 + warp_2) / 2, rtol=1e-5)
    # CLIP: cosine of the image embeddings of consecutive frames, embedded here by hand.
    with torch.no_grad():
        pixels = clip.processor(images=[o0, o1, o2], return_tensors="pt").pixel_values
        e = clip.model(pixel_values=pixels).image_embeds.double().numpy()
    cos = [float(e[i] @ e[i + 1] / np.linalg.norm(e[i]) / np.linalg.norm(e[i + 1])) for i in range(2)]
    np.testing.assert_allclose(v.per_frame["clip_consistency"][1:], cos, rtol=1e-6)
    np.testing.assert_allclose(v.mean("clip_consistency"), sum(cos) / 2, rtol=1e-6)
    # Depth: each frame's raw disparity, its min to -1 and max to 1, squared differences averaged.
    def raw(frame):
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            return depth.estimator(x)[0].double().numpy()

    def norm(d):
        return (d - d.min()) / (d.max() - d.min()) * 2 - 1

    expected = [np.mean((norm(raw(o)) - norm(raw(still))) ** 2) for o in (o0, o1, o2)]
    np.testing.assert_allclose(v.per_frame["depth_mse"], expected, rtol=1e-4, atol=1e-7)
    assert len(v.per_frame["depth_mse"]) == 3 and ev.frames == 3


def test_x_t_slices_of_a_horizontally_moving_bar_show_the_diagonal(tmp_path):
    n, speed, x0 = 16, 3, 10
    frames = []
    for t in range(n):
        f = np.full((H, W, 3), 40, np.uint8)
        f[:, x0 + speed * t : x0 + speed * t + 2] = 230  # a vertical bar 2 pixels wide
        frames.append(f)
    src = write_frames(tmp_path / "in", frames)
    # An output that holds the bar still at its first place: its slice is a vertical line.
    stuck = write_frames(tmp_path / "stuck", [frames[0]] * n)
    ev = quality.evaluate(src, [("same", str(src)), ("stuck", str(stuck))], metrics=("flicker",), rows=[20], cols=[x0 + speed * 5])
    xt_in, xt_same, xt_stuck = ev.xt[20]
    assert xt_in.shape == (n, W, 3)
    assert [int(np.argmax(xt_in[t, :, 0])) for t in range(n)] == [x0 + speed * t for t in range(n)]  # the diagonal
    assert np.array_equal(xt_same, xt_in)
    assert [int(np.argmax(xt_stuck[t, :, 0])) for t in range(n)] == [x0] * n  # a vertical line
    # Y-T at column x0 + 5 * speed: the bar crosses it at frame 5, a vertical band across all rows.
    yt_in = ev.yt[x0 + speed * 5][0]
    assert yt_in.shape == (H, n, 3)
    assert (yt_in[:, 5, 0] == 230).all() and (np.delete(yt_in[:, :, 0], 5, axis=1) == 40).all()
    # The picture: panels side by side, each the slice magnified by whole factors.
    pictures = quality.slice_pictures(ev)
    assert set(pictures) == {"xt_row20.png", f"yt_col{x0 + speed * 5}.png"}
    img, boxes, (fx, fy) = pictures["xt_row20.png"]
    assert len(boxes) == 3
    for (x, y, w, h), panel in zip(boxes, (xt_in, xt_same, xt_stuck)):
        assert (w, h) == (W * fx, n * fy)
        assert np.array_equal(img[y : y + h : fy, x : x + w : fx], panel)


def test_the_per_frame_pipeline_denoises_every_frame_on_its_own():
    """temporal=False: one output per input at once, and a frame's output depends only on that
    frame and the noise drawn for it, not on the frames before it (no temporal attention)."""
    from live2diff_engine.models.components import build_tiny_components
    from live2diff_engine.pipeline.frames import FramePipeline

    comps = build_tiny_components(0)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 80, 3), dtype=np.uint8) for _ in range(4)]
    a = FramePipeline(comps, width=64, height=64, temporal=False, seed=3)
    outs = [a.push(f) for f in frames]
    assert [[i for i, _ in o] for o in outs] == [[0], [1], [2], [3]] and a.flush() == []
    assert outs[0][0][1].shape == (48, 80, 3)
    b = FramePipeline(comps, width=64, height=64, temporal=False, seed=3)
    for f in frames[::-1]:
        b.push(f)
    b.set_seed(3)
    again = b.push(frames[0])[0][1]
    assert np.array_equal(again, outs[0][0][1])
    assert not np.array_equal(outs[1][0][1], outs[0][0][1])


# -- the command -------------------------------------------------------------------------------


def _one_error_line(result, needle):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "error:" in l]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert len(lines) == 1, result.stderr


def _hub_cache_with(root, repo_id, folder):
    """``folder``'s files as the hub cache holds a download of ``repo_id`` (HF_HOME=root)."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_eval_end_to_end_table_json_slices_and_plots(tmp_path, models):
    frames = blob_on_still_background(n=12)
    src = write_mp4(tmp_path / "in.mp4", frames)
    write_mp4(tmp_path / "steady.mp4", frames)
    write_mp4(tmp_path / "flicker.mp4", with_flicker(frames, 16))
    # CLIP as `models download clip` leaves it in the hub cache: found by its name, offline.
    hf = tmp_path / "hf"
    _hub_cache_with(hf, "openai/clip-vit-large-patch14", models / "clip")
    env = {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}
    listing = run_cli("models", "list", env=env)
    assert listing.returncode == 0
    clip_line = next(l for l in listing.stdout.splitlines() if l.startswith("clip "))
    assert "OK" in clip_line and "openai/clip-vit-large-patch14" in clip_line
    result = run_cli(
        "eval", src, tmp_path / "steady.mp4", tmp_path / "flicker.mp4", "--depth", f"midas={models / 'midas'}",
        "--json", tmp_path / "r.json", "--slices", tmp_path / "pics", "--rows", "16,32", "--cols", "40", "--device", "cpu", env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout.splitlines()
    assert "12 frames compared" in out[0]
    assert out[1].split() == ["video", "warp", "error", "CLIP", "consistency", "depth", "MSE", "flicker"]
    steady, flick = out[2].split(), out[3].split()
    assert steady[0] == "steady.mp4" and flick[0] == "flicker.mp4"
    assert float(steady[1]) < float(flick[1]) and float(steady[2]) > float(flick[2]) and float(steady[4]) < float(flick[4])
    assert out[4].split() == ["better:", "lower", "higher", "lower", "lower"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frames"] == 12 and report["size"] == [W, H]
    assert report["better"] == {"warp_error": "lower", "clip_consistency": "higher", "depth_mse": "lower", "flicker": "lower"}
    assert [v["label"] for v in report["videos"]] == ["steady.mp4", "flicker.mp4"]
    for v in report["videos"]:
        assert set(v["per_frame"]) == set(report["better"])
        assert all(len(values) == 12 for values in v["per_frame"].values())
        assert v["per_frame"]["warp_error"][0] is None and v["per_frame"]["depth_mse"][0] is not None
        assert v["mean"]["flicker"] == pytest.approx(np.mean([x for x in v["per_frame"]["flicker"] if x is not None]))
    pics = tmp_path / "pics"
    expected = {"xt_row16.png", "xt_row32.png", "yt_col40.png", "plot_warp_error.png", "plot_clip_consistency.png",
                "plot_depth_mse.png", "plot_flicker.png"}
    assert {p.name for p in pics.iterdir()} == expected
    for name in expected:
        img = cv2.imread(str(pics / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 300 and img.std() > 5, name
    xt = cv2.imread(str(pics / "xt_row32.png"))
    assert xt.shape[0] >= 12 and xt.shape[1] >= 3 * W  # three panels: input and the two outputs
    verify = run_cli("models", "verify", "clip", env=env)
    assert verify.returncode == 0 and verify.stdout.split()[:2] == ["clip", "OK"], verify.stdout + verify.stderr


def test_eval_missing_models_and_a_bad_file_are_one_line(tmp_path, models):
    frames = blob_on_still_background(n=4)
    src = write_mp4(tmp_path / "in.mp4", frames)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    # No CLIP downloaded: the line names the command that fetches it.
    _one_error_line(run_cli("eval", src, src, "--depth", f"midas={models / 'midas'}", env=env), "live2diff-engine models download clip")
    # No MiDaS downloaded either (depth only): the same for it.
    _one_error_line(run_cli("eval", src, src, "--metrics", "depth", env=env), "live2diff-engine models download midas")
    (tmp_path / "bad.mp4").write_text("not a video")
    _one_error_line(run_cli("eval", tmp_path / "bad.mp4", src, "--metrics", "warp", env=env), "cannot open")


def test_a_damaged_video_source_is_our_one_line_without_ffmpegs_own(tmp_path, monkeypatch, capfd):
    """`--source video:FILE` with a file cut short: FFmpeg's own "[mov,mp4,... @ 0x...] moov atom
    not found" no longer comes above our line; its reason is quoted in our one line instead."""
    from live2diff_engine.io.sources import _ffmpeg_quiet

    monkeypatch.delenv("OPENCV_FFMPEG_LOGLEVEL", raising=False)  # FFmpeg as a user's process has it
    whole = write_mp4(tmp_path / "whole.mp4", blob_on_still_background(n=4))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:600])  # mp4v writes the index (moov) last: a recording cut off
    result = run_cli("run", "--model", "tiny", "--source", f"video:{cut}", "--sink", "null", "--no-api", "--max-frames", "1")
    _one_error_line(result, f"cannot open {cut} as a video")
    assert "FFmpeg says: moov atom not found (the file is damaged or incomplete)" in result.stderr
    translated = run_cli("translate", cut, tmp_path / "out.mp4", "--model", "tiny")  # translate opens files too
    _one_error_line(translated, f"cannot open {cut} as a video")
    assert "FFmpeg says: moov atom not found" in translated.stderr
    # What other threads write to stderr meanwhile is written back; only FFmpeg's lines are held.
    with _ffmpeg_quiet() as quiet:
        os.write(2, b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55e9d0b1ff80] moov atom not found\n")
        os.write(2, b"status: 12 fps\n")
    assert quiet.ffmpeg == ["moov atom not found"]
    assert capfd.readouterr().err == "status: 12 fps\n"


@pytest.mark.parametrize("args, needle", [
    (["{dir}/missing.mp4", "--metrics", "warp"], "not found"),
    (["{src}", "--metrics", "warp,speed"], "--metrics"),
    (["{src}", "--metrics", "warp", "--rows", "500"], "--rows must lie in 0..63"),
    (["{src}", "--metrics", "warp", "--start", "4"], "--start 4 leaves no frames"),
    (["--metrics", "warp"], "nothing to measure"),
    (["{src}", "--metrics", "warp", "--json", "{dir}/no/such/folder/r.json"], "does not exist"),
    (["{src}", "--metrics", "warp", "--compare-output", "{dir}/pf.mp4"], "add --compare per-frame"),
    (["{src}", "--metrics", "warp", "--slices", "{src}/pics"], "cannot make the --slices folder"),
    (["{src}", "--metrics", "warp", "--json", "{dir}"], "it is a folder"),
])
def test_eval_mistakes_are_one_line(tmp_path, capsys, args, needle):
    from live2diff_engine.cli import main

    src = write_mp4(tmp_path / "in.mp4", blob_on_still_background(n=4))
    argv = ["eval", str(src)] + [a.format(src=src, dir=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("live2diff-engine: error:") and needle in err[0], err


def test_eval_outputs_of_another_size_are_noted_and_an_input_of_mixed_sizes_is_one_line(tmp_path, capsys):
    from live2diff_engine.cli import main

    frames = blob_on_still_background(n=4)
    src = write_frames(tmp_path / "in", frames)
    double = write_frames(tmp_path / "double", [cv2.resize(f, (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC) for f in frames])
    wide = write_frames(tmp_path / "wide", [cv2.resize(f, (W + 40, H)) for f in frames])
    notes = []
    ev = quality.evaluate(src, [("same", str(src)), ("double", str(double)), ("wide", str(wide))], metrics=("flicker",), say=notes.append)
    assert notes == [f"note: double is {2 * W}x{2 * H}; resized to the input's {W}x{H}",
                     f"note: wide is {W + 40}x{H}; resized to the input's {W}x{H} (another aspect ratio: stretched, so positions match only roughly)"]
    assert ev.size == (W, H) and ev.xt[H // 2][1].shape == (4, W, 3)
    # An input folder whose images change size part-way: one line, not OpenCV's assertion.
    mixed = write_frames(tmp_path / "mixed", frames[:2] + [cv2.resize(f, (W // 2, H // 2)) for f in frames[2:]])
    assert main(["eval", str(mixed), str(src), "--metrics", "warp,flicker"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == [f"live2diff-engine: error: mixed: frame 2 is {W // 2}x{H // 2}, its first frame {W}x{H}; "
                   "the input's frames must all have one size"], err


def test_bars_are_left_out_an_output_with_bars_scores_as_its_picture_alone(tmp_path, capsys, depth):
    """Crop mode's black bars (or any constant border) are not picture: a bar never moves and never
    flickers, so counted as pixels it made a barred output look steadier than a full-frame one. The
    metrics compare the picture area only, the same area in every video, and a note says so."""
    from live2diff_engine.cli import main
    from live2diff_engine.io.video import FrameSource
    from live2diff_engine.quality.evaluate import inside_bars

    frames = blob_on_still_background(n=8)
    styled = with_flicker(frames, 6)
    x, y, w, h = 16, 4, 64, 54  # black bars left and right, grey ones above and below, as no engine makes them
    barred = []
    for f in styled:
        b = np.zeros_like(f)
        b[y : y + h] = 128
        b[y : y + h, x : x + w] = f[y : y + h, x : x + w]
        barred.append(b)
    src = write_frames(tmp_path / "in", frames)
    write_frames(tmp_path / "barred", barred)
    write_frames(tmp_path / "full", styled)  # the same stylised picture with no bars
    alone_in = write_frames(tmp_path / "in_area", [f[y : y + h, x : x + w] for f in frames])
    alone_out = write_frames(tmp_path / "out_area", [f[y : y + h, x : x + w] for f in styled])
    keys = ("warp_error", "flicker", "depth_mse")

    notes = []
    ev = quality.evaluate(src, [("barred.mp4", str(tmp_path / "barred")), ("full", str(tmp_path / "full"))], metrics=keys,
                          depth=depth, say=notes.append)
    alone = quality.evaluate(alone_in, [("area", str(alone_out))], metrics=keys, depth=depth)
    assert ev.area == (x, y, w, h) and ev.bars == {"barred.mp4": "constant over every frame"}
    for key in keys:  # both, bars or none, score what the picture area alone scores
        assert ev.videos[0].mean(key) == pytest.approx(alone.videos[0].mean(key), rel=1e-6, abs=1e-9), key
        assert ev.videos[1].mean(key) == pytest.approx(alone.videos[0].mean(key), rel=1e-6, abs=1e-9), key
    assert notes == [f"note: compared the picture area {w}x{h} of {W}x{H} (x {x}..{x + w - 1}, y {y}..{y + h - 1}) in every "
                     "video: constant bars left out (barred.mp4: constant over every frame)"]
    # Counted as pixels, the bars made the barred output flicker less than the same picture without them.
    whole = quality.evaluate(src, [("barred", str(tmp_path / "barred"))], metrics=("flicker",), bars=False)
    assert whole.videos[0].mean("flicker") < 0.8 * alone.videos[0].mean("flicker")
    assert ev.xt[H // 2][1].shape == (8, W, 3)  # the slices still show whole frames, bars and all
    assert quality.table(ev).splitlines()[0].endswith(f"(the picture area {w}x{h} at x {x}, y {y} of {W}x{H}: bars left out)")
    assert quality.as_dict(ev)["area"] == {"x": x, "y": y, "width": w, "height": h, "bars_left_out": ev.bars}
    assert quality.as_dict(alone)["area"] is None

    # Through a codec the bars are not exactly constant (MPEG-4 rings in the blocks beside the
    # picture): found to within a pixel, at a border on no 8-pixel block.
    write_mp4(tmp_path / "barred.mp4", [np.pad(f[:, 13:83], ((0, 0), (13, 13), (0, 0))) for f in styled])
    lo = hi = None
    for f in FrameSource(tmp_path / "barred.mp4"):
        lo = f.copy() if lo is None else np.minimum(lo, f)
        hi = f.copy() if hi is None else np.maximum(hi, f)
    bx, by, bw, bh = inside_bars(lo, hi)
    assert abs(bx - 13) <= 1 and abs(bx + bw - 83) <= 1 and (by, bh) == (0, H)
    # ... and the command prints the note.
    assert main(["eval", str(src), str(tmp_path / "barred.mp4"), "--metrics", "warp,flicker"]) == 0
    captured = capsys.readouterr()
    assert f" of {W}x{H} (x {bx}..{bx + bw - 1}, y 0..{H - 1}) in every video: constant bars left out (barred.mp4: " in captured.err
    assert f"compared (the picture area {bw}x{H} at x {bx}, y 0 of {W}x{H}: bars left out)" in captured.out


def test_eval_compare_per_frame_with_the_tiny_model(tmp_path, models):
    frames = blob_on_still_background(n=10)
    src = write_mp4(tmp_path / "in.mp4", frames)
    stylised = tmp_path / "stream.mp4"
    made = run_cli("translate", src, stylised, "--model", "tiny", "--device", "cpu")
    assert made.returncode == 0, made.stderr
    result = run_cli(
        "eval", src, stylised, "--compare", "per-frame", "--model", "tiny", "--device", "cpu", "--start", "8",
        "--clip", models / "clip", "--json", tmp_path / "r.json", "--compare-output", tmp_path / "pf.mp4", "--slices", tmp_path / "pics",
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "no temporal attention" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [v["label"] for v in report["videos"]] == ["stream.mp4", "per-frame"]
    assert report["videos"][1]["path"] == str(tmp_path / "pf.mp4")
    assert report["start"] == 8 and report["frames"] == 2
    # The tiny model is square: in crop mode both outputs are the input's centre square between black
    # bars. The stream's bars are found in its file, the per-frame video's come from its framing.
    assert report["area"] == {"x": 16, "y": 0, "width": 64, "height": 64,
                              "bars_left_out": {"stream.mp4": "constant over every frame", "per-frame": "the framing it was made with"}}
    assert "note: compared the picture area 64x64 of 96x64 (x 16..79, y 0..63) in every video" in result.stderr
    for v in report["videos"]:
        assert all(x is not None for x in v["per_frame"]["depth_mse"])
        assert v["per_frame"]["warp_error"][1] is not None
    cap = cv2.VideoCapture(str(tmp_path / "pf.mp4"))
    count = 0
    while cap.read()[0]:
        count += 1
    assert count == 10
    assert "per-frame" in result.stdout.splitlines()[3]
    xt = cv2.imread(str(tmp_path / "pics" / f"xt_row{H // 2}.png"))
    assert xt is not None and xt.shape[1] >= 3 * W


def test_the_readme_says_how_to_reach_its_commands_and_what_eval_leaves_out_and_its_floor():
    """The set-up installs into .venv/bin, which is not on PATH: the README says so before its
    first bare `live2diff-engine` or `python` example (its first two commands stay as CI runs them).
    Its eval section says that bars are left out and what a clip scores against itself."""
    import re

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    setup_end = [m.end() for m in re.finditer(r"```bash\n.*?```", readme, re.S)][1]  # the first two commands
    bare = min(m.start() for m in re.finditer(r"(?<![/\w-])(live2diff-engine|python) ", readme[setup_end:])) + setup_end
    note = readme.index("source .venv/bin/activate")
    assert setup_end < note < bare
    assert ".venv/bin/live2diff-engine" in readme[setup_end:bare]
    eval_section = readme[readme.index("## Measuring quality: `eval`"):readme.index("## Speed: `--threads`")]
    assert "compared the picture area 360x360 of 640x360 (x 140..499, y 0..359) in every\nvideo: constant bars left out" in eval_section
    assert "Even a video against itself is not 0" in eval_section
    assert "warp error 1.9e-4, flicker 7.2e-4" in eval_section
