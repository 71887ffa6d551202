"""Model sizes: every multiple of 8 works (not only multiples of 64), through the streaming UNet,
the motion modules and their KV-cache, the depth branch, `translate` and `run`; a size that
cannot work is one line, before any model loads, naming the sizes that can."""

import json

import cv2
import numpy as np
import pytest
import torch

from conftest import run_cli
from live2diff_engine.models.motion import SequenceContext, TemporalTransformer
from live2diff_engine.models.tiny import build_tiny_unet, tiny_prompt_embeds
from live2diff_engine.pipeline import StreamPipeline, make_schedule, warmup_causal_mask

# (height, width) of latents whose sides do not halve evenly three times: 5 -> 3 -> 2 -> 1,
# 11 -> 6 -> 3 -> 2; 45x80 is 640x360, 36x64 is 512x288.
ODD_LATENTS = [(5, 11), (9, 6), (36, 64)]


@pytest.mark.parametrize("hw", ODD_LATENTS)
def test_streaming_unet_is_the_diffusers_unet_at_sizes_not_divisible_by_64(hw):
    """With the motion modules silenced (their output projection zeroed) and no depth, the
    streaming UNet is diffusers' UNet2DConditionModel, whose up blocks take their size from the
    skip connection: the same numbers at any latent size."""
    unet = build_tiny_unet(seed=4)
    for m in unet.modules():
        if isinstance(m, TemporalTransformer):
            m.proj_out.weight.data.zero_()
            m.proj_out.bias.data.zero_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([700, 300])
    text = tiny_prompt_embeds(0).expand(2, -1, -1)
    with torch.no_grad():
        ours = unet(x, t, text, None, SequenceContext(num_frames=1))
        theirs = unet.unet2d(x, t, text).sample
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(5, 11), (9, 6)])
def test_stream_equals_offline_computation_at_odd_latent_sizes(hw):
    """The KV-cache at sizes whose feature maps round up on the way down: the stream's frames
    equal the same frames denoised together under the warmup+causal mask (with depth)."""
    H, W = hw
    unet = build_tiny_unet(seed=3)
    pipe = StreamPipeline(unet, make_schedule(50, t_index_list=[32, 45]), (H, W), generator=torch.Generator().manual_seed(0))
    prompt = tiny_prompt_embeds(0)
    g = torch.Generator().manual_seed(5)
    n = 8
    warm_x, warm_d, warm_noise = (torch.randn(8, 4, H, W, generator=g) for _ in range(3))
    xs, ds = torch.randn(n, 4, H, W, generator=g), torch.randn(n, 4, H, W, generator=g)
    step_noise = torch.randn(n + 1, 1, 4, H, W, generator=g)
    with torch.no_grad():
        warm_out = pipe.prepare(warm_x, warm_d, prompt, [warm_noise])
        streamed = []
        for i in range(n + 1):
            x = xs[i : i + 1] if i < n else torch.zeros(1, 4, H, W)
            d = ds[i : i + 1] if i < n else torch.zeros(1, 4, H, W)
            streamed.append(pipe.step(x, d, step_noise[i]).clone())
        streamed = torch.cat(streamed[1:])

        s = pipe.schedule
        ctx = SequenceContext(num_frames=8 + n, mask=warmup_causal_mask(8 + n, 8))
        x, d = torch.cat([warm_x, xs]), torch.cat([warm_d, ds])
        a, b, cs, co = s.alpha, s.beta, s.c_skip, s.c_out
        eps = unet(x, s.timesteps[:1], prompt, d, ctx)
        x0 = co[0] * ((x - b[0] * eps) / a[0]) + cs[0] * x
        x = a[1] * x0 + b[1] * torch.cat([warm_noise, step_noise[:n, 0]])
        eps = unet(x, s.timesteps[1:2], prompt, d, ctx)
        offline = co[1] * ((x - b[1] * eps) / a[1]) + cs[1] * x
    torch.testing.assert_close(offline[:8], warm_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(offline[8:], streamed, rtol=1e-4, atol=1e-5)
    assert float(streamed.std()) > 0.1


# -- the command line ------------------------------------------------------------------------


def camera_clip(w, h, n):
    """A moving picture of a webcam's shape."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=-1).astype(np.uint8)
    frames = []
    for i in range(n):
        f = np.roll(base, 5 * i, axis=1).copy()
        cv2.circle(f, (w // 4 + 6 * i, h // 2), h // 6, (255, 255, 255), -1)
        frames.append(f)
    return frames


def write_video(path, frames, fps=10):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def read_video(path):
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    return out


# 16:9 model sizes, with the camera size fed in: the same, larger (scaled down) and smaller
# (scaled up). 9 frames: the 8 warmup frames and one through the stream (the tiny model's spatial
# attention at 45x80 latents costs seconds a frame on a CPU).
# Each size goes through one of the two commands (they share the framing and the model set-up, so
# one each keeps the suite short). The scaled-up case is at 384x216 (27x48 latents, odd twice on
# the way down): at 768x432 the tiny model's attention took most of a minute here.
WEBCAM = [((640, 360), (640, 360)), ((384, 216), (256, 144)), ((512, 288), (960, 540))]
TRANSLATE_AT = [WEBCAM[1], WEBCAM[2]]
RUN_AT = [WEBCAM[0]]
FRAMES = 9


def check_output(frames_in, out, size):
    assert len(out) == len(frames_in) == FRAMES
    assert all(f.shape == (size[1], size[0], 3) for f in out)
    # The last frame came out of the model (the tiny model's output is noise, not the input).
    last = cv2.resize(frames_in[-1], size, interpolation=cv2.INTER_AREA)
    assert np.abs(out[-1].astype(int) - last.astype(int)).mean() > 20


@pytest.mark.slow
@pytest.mark.parametrize("model, camera", TRANSLATE_AT, ids=[f"{m[0]}x{m[1]}" for m, _ in TRANSLATE_AT])
def test_translate_at_webcam_sizes(tmp_path, model, camera):
    frames = camera_clip(*camera, FRAMES)
    src, dst = tmp_path / "in.avi", tmp_path / "out.avi"
    write_video(src, frames)
    r = run_cli("translate", src, dst, "--model", "tiny", "--width", model[0], "--height", model[1], timeout=900)
    assert r.returncode == 0, r.stderr
    check_output(frames, read_video(dst), camera)


@pytest.mark.slow
@pytest.mark.parametrize("model, camera", RUN_AT, ids=[f"{m[0]}x{m[1]}" for m, _ in RUN_AT])
def test_run_at_webcam_sizes(tmp_path, model, camera):
    frames = camera_clip(*camera, FRAMES)
    src, dst, stats = tmp_path / "in.avi", tmp_path / "out.avi", tmp_path / "stats.json"
    write_video(src, frames)
    r = run_cli("run", "--model", "tiny", "--source", f"video:{src}", "--sink", f"file:{dst}", "--no-api",
                "--width", model[0], "--height", model[1], "--stats", stats, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "failed" not in r.stderr, r.stderr
    figures = json.loads(stats.read_text())
    assert figures["errors"] == 0 and figures["last_error"] is None, figures
    model_line = [l for l in r.stderr.splitlines() if l.startswith("model: ")]
    assert model_line and model_line[0].endswith(f"; {model[0]}x{model[1]}"), r.stderr
    check_output(frames, read_video(dst), camera)


@pytest.mark.parametrize("command", ["translate", "run"])
@pytest.mark.parametrize("size, nearest", [((960, 540), "960x536 or 960x544"), ((100, 64), "96x64 or 104x64"), ((0, 64), "8x64")])
def test_a_size_that_cannot_work_is_one_line_before_any_model_loads(tmp_path, command, size, nearest):
    src = tmp_path / "in.avi"
    write_video(src, camera_clip(64, 48, 2))
    where = [src, tmp_path / "out.avi"] if command == "translate" else ["--source", "camera:7", "--sink", "null", "--no-api"]
    r = run_cli(command, *where, "--model", "tiny", "--width", size[0], "--height", size[1])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "building the tiny" not in r.stderr and "camera" not in r.stderr  # nothing opened or loaded
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, r.stderr
    assert f"model size {size[0]}x{size[1]} cannot work" in errors[0] and "multiples of 8" in errors[0]
    assert nearest in errors[0] and "640x360" in errors[0]
    assert not (tmp_path / "out.avi").exists()


def test_a_failed_translate_leaves_no_partial_file_and_keeps_an_earlier_one(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, f in enumerate(camera_clip(64, 48, 12)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    (folder / "010.png").write_bytes(b"not a picture")  # the 11th frame cannot be read
    dst = tmp_path / "out.avi"
    r = run_cli("translate", folder, dst, "--model", "tiny")
    assert r.returncode == 2, r.stderr
    assert "cannot read image" in r.stderr and "Traceback" not in r.stderr
    assert f"no output written to {dst}" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # neither out.avi nor a partial one
    dst.write_bytes(b"an earlier result")
    r = run_cli("translate", folder, dst, "--model", "tiny")
    assert r.returncode == 2 and dst.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.avi"]
