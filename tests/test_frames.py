"""The frame pipeline and `translate`, with the tiny model: any frame size in, whole videos out."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from live2diff_engine.errors import ConfigError
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.pipeline.frames import FrameError, FramePipeline, fit_frame, unfit_frame


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def clip(n, w=96, h=80, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy + 40 * seed) % 256], axis=-1).astype(np.uint8)
    frames = []
    for i in range(n):
        f = np.roll(base, 3 * i, axis=1).copy()
        cv2.circle(f, (10 + 4 * i % w, h // 2), 9, (255, 255, 255), -1)
        frames.append(f)
    return frames


def write_clip(path, frames, fps=12):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
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


@pytest.mark.parametrize("mode", ["crop", "letterbox"])
def test_fit_and_unfit_round_trip(mode):
    """A 16:9 frame through the square model and back: every pixel kept returns where it came
    from (crop: the centre square, black where it cut; letterbox: the whole frame)."""
    yy, xx = np.mgrid[0:90, 0:160]
    frame = np.stack([xx * 255 // 159, yy * 255 // 89, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    img, fit = fit_frame(frame, 64, 64, mode)
    assert img.shape == (64, 64, 3)
    back = unfit_frame(img, fit, 160, 90)
    assert back.shape == (90, 160, 3)
    diff = np.abs(back.astype(int) - frame.astype(int))
    if mode == "letterbox":
        assert img[0].max() == 0 and img[-1].max() == 0  # bars above and below
        assert diff[2:-2, 2:-2].mean() < 4, diff.mean()  # the whole frame, at the model's resolution
    else:
        kept = slice(35, 125)  # the centre 90 x 90 square
        assert img[0].max() > 0 and img[:, 0].max() > 0  # no bars in the model's picture
        assert diff[2:-2, kept][:, 2:-2].mean() < 4, diff[:, kept].mean()
        assert back[:, :33].max() == 0 and back[:, 127:].max() == 0  # what the crop cut is black


@pytest.mark.parametrize("steps", [(32, 45), (20, 32, 45)])
def test_every_frame_comes_out_once_in_order(comps, steps):
    fp = FramePipeline(comps, width=64, height=64, t_index_list=list(steps), prompt="a cat")
    frames = clip(20)
    got = []
    for f in frames:
        got += fp.push(f)
    got += fp.flush()
    assert [i for i, _ in got] == list(range(20))
    assert all(img.shape == (80, 96, 3) and img.dtype == np.uint8 for _, img in got)
    # The warmup frames are the camera as it came (fitted to the model's square and back).
    for i in range(8):
        assert np.abs(got[i][1].astype(int) - unfit_frame(fit_frame(frames[i], 64, 64, "crop")[0], fit_frame(frames[i], 64, 64, "crop")[1], 96, 80).astype(int)).max() == 0
    # After it, the model's output: not the input, not black.
    for i in range(8, 20):
        assert got[i][1].std() > 1 and not np.array_equal(got[i][1], got[i - 1][1])


def test_same_seed_same_frames_and_prompt_swap_changes_the_rest(comps):
    def run(prompt_at_12=None):
        fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=5)
        out = []
        for i, f in enumerate(clip(18)):
            if i == 12 and prompt_at_12:
                fp.set_prompt(prompt_at_12)
            out += fp.push(f)
        return out + fp.flush()

    a, b, c = run(), run(), run("a dog in the snow")
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    # Frame 11 was finished before the prompt changed; frames from 12 on are encoded with the new one.
    assert all(np.array_equal(a[i][1], c[i][1]) for i in range(11))
    assert not np.array_equal(a[15][1], c[15][1])


def test_schedule_change_rewarms_on_recent_frames_without_gaps(comps):
    fp = FramePipeline(comps, width=64, height=64)
    warmups, warmup = [], fp._warmup
    fp._warmup = lambda images: (warmups.append(torch.cat(images).clone()), warmup(images))[1]  # watched, not replaced
    got = []
    for i, f in enumerate(clip(24)):
        if i == 14:
            fp.set_schedule(50, [20, 32, 45])
        got += fp.push(f)
    got += fp.flush()
    assert [i for i, _ in got] == list(range(24))
    assert fp.steps == 3 and not fp.warming_up
    # The new stream was warmed on the 8 frames before the change (6..13), as they were uploaded.
    warmed = [images for images in warmups]
    assert len(warmed) == 2
    expected = torch.cat([fp._upload(fit_frame(f, 64, 64, fp.fit)[0]) for f in clip(24)[6:14]])
    assert torch.equal(warmed[1], expected)


def test_similar_frames_are_skipped_but_still_output(comps):
    fp = FramePipeline(comps, width=64, height=64, similarity_threshold=0.999)
    still = clip(1)[0]
    got = []
    for _ in range(20):
        got += fp.push(still)
    got += fp.flush()
    assert [i for i, _ in got] == list(range(20))
    assert fp.skipped_total > 0


def test_bad_frames_and_sizes(comps):
    fp = FramePipeline(comps, width=64, height=64)
    with pytest.raises(FrameError):
        fp.push(np.zeros((10, 10), np.uint8))
    with pytest.raises(FrameError):
        fp.push(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ConfigError, match="multiples of 8"):
        FramePipeline(comps, width=60, height=64)
    with pytest.raises(ConfigError, match="has no"):
        FramePipeline(comps, width=64, height=64, template="no placeholder")


def test_translate_writes_every_frame_at_the_requested_size(tmp_path):
    frames = clip(14)
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_clip(src, frames)
    result = run_cli("translate", src, dst, "--model", "tiny", "--output-size", "72x56", "--prompt", "a cat")
    assert result.returncode == 0, result.stderr
    out = read_video(dst)
    assert len(out) == len(read_video(src)) == 14
    assert all(f.shape == (56, 72, 3) for f in out)
    # The warmup frames show the input (lossy codec: compare loosely), not black: the model's
    # centre square, fitted inside 72x56 (56x56 between two 8-pixel bars), not cut again.
    inp = read_video(src)
    for i in range(8):
        square = cv2.resize(inp[i][:, 8:88], (56, 56), interpolation=cv2.INTER_AREA)
        assert out[i][:, 8:64].mean() > 20
        assert np.abs(out[i][:, 8:64].astype(int) - square.astype(int)).mean() < 25
        assert out[i][:, :6].max() < 40 and out[i][:, 66:].max() < 40


def test_translate_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(clip(10, 64, 48)):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    dst = tmp_path / "out.avi"
    result = run_cli("translate", folder, dst, "--model", "tiny", "--steps", "3")
    assert result.returncode == 0, result.stderr
    out = read_video(dst)
    assert len(out) == 10 and out[0].shape == (48, 64, 3)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["nowhere.mp4", "out.mp4"], "input not found"),
        (["IN", "out.txt"], "must be a video file"),
        (["IN", "out.mp4", "--style", "nope"], "unknown style"),
        (["IN", "out.mp4", "--lora", "missing_lora.safetensors"], "missing_lora.safetensors"),
        (["IN", "out.mp4", "--t-index-list", "10,99"], "out of range"),
        (["IN", "out.mp4", "--width", "70"], "multiples of 8"),
    ],
)
def test_translate_bad_input_is_one_line(tmp_path, args, needle):
    src = tmp_path / "in.mp4"
    write_clip(src, clip(3))
    args = [str(src) if a == "IN" else (str(tmp_path / a) if a.endswith((".mp4", ".txt")) else a) for a in args]
    result = run_cli("translate", *args, "--model", "tiny")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and needle in errors[0], result.stderr


# -- device path: batched encode, uint8 transfers, stage profile, TAESD, accelerate --------------


def test_frame_and_depth_are_encoded_in_one_call_per_frame(comps, monkeypatch):
    sizes = []
    encode = comps.vae.encode

    def counting(images, *a, **k):
        sizes.append(images.shape[0])
        return encode(images, *a, **k)

    monkeypatch.setattr(comps.vae, "encode", counting)
    fp = FramePipeline(comps, width=64, height=64)
    for f in clip(12):
        fp.push(f)
    # The warmup's 8 frames + 8 depth images, 4 a call (ENCODE_CHUNK), then [frame, depth] a call.
    assert sizes == [4] * 4 + [2] * 4


def test_batched_encode_gives_the_latents_of_separate_calls(comps):
    fp = FramePipeline(comps, width=64, height=64)
    x = fp._upload(fit_frame(clip(1)[0], 64, 64, "crop")[0])
    depth = fp._depth_images(x)
    d3 = depth.expand(-1, 3, -1, -1)
    vae = comps.vae
    with torch.no_grad():
        batch = vae.encode(torch.cat([x, d3])).latent_dist
        alone = [vae.encode(x).latent_dist, vae.encode(d3).latent_dist]
        # The distributions' modes agree (the VAE normalises each image on its own).
        torch.testing.assert_close(batch.mean, torch.cat([d.mean for d in alone]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.std, torch.cat([d.std for d in alone]), rtol=1e-4, atol=1e-5)
        # The pipeline's sample is one draw of [2, 4, h, w]: the frame's noise first, then the depth's.
        fp.generator.manual_seed(7)
        frame_lat, depth_lat = fp._encode_with_depth(x, depth)
        eps = torch.randn((2, *alone[0].mean.shape[1:]), generator=torch.Generator().manual_seed(7))
        scale = vae.config.scaling_factor
        torch.testing.assert_close(frame_lat, (alone[0].mean + alone[0].std * eps[:1]) * scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(depth_lat, (alone[1].mean + alone[1].std * eps[1:]) * scale, rtol=1e-4, atol=1e-5)


def test_depth_image_is_the_batch_normalised_map_resized(comps):
    fp = FramePipeline(comps, width=64, height=64)
    x = torch.cat([fp._upload(fit_frame(f, 64, 64, "crop")[0]) for f in clip(3)])
    with torch.no_grad():
        got = fp._depth_images(x)
        raw = comps.depth(x).float()  # the recipe before: normalised over the batch, 3 channels, resized
        norm = (raw - raw.amin()) / (raw.amax() - raw.amin()).clamp_min(1e-6)
        expected = F.interpolate(norm[:, None].repeat(1, 3, 1, 1) * 2 - 1, (64, 64), mode="bilinear", align_corners=False)
    assert got.shape == (3, 1, 64, 64) and got.dtype == comps.dtype
    torch.testing.assert_close(got.expand(-1, 3, -1, -1), expected, rtol=0, atol=1e-6)
    assert got.amin() >= -1 - 1e-6 and got.amax() <= 1 + 1e-6


def test_uint8_conversions_on_the_device_match_the_float_path(comps):
    fp = FramePipeline(comps, width=64, height=48)
    img = (np.arange(48 * 64 * 3) % 256).astype(np.uint8).reshape(48, 64, 3)  # every byte value
    x = fp._upload(img)
    before = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).to(comps.dtype) / 127.5 - 1.0
    assert x.shape == (1, 3, 48, 64) and x.is_contiguous() and torch.equal(x, before)
    back = fp._download(fp._to_uint8(x))
    assert back.dtype == np.uint8 and np.array_equal(back, img)  # exact round trip
    # Decoder-like values, out of range included: the same bytes as the old float path.
    t = torch.linspace(-1.3, 1.3, 3 * 48 * 64).reshape(1, 3, 48, 64)
    old = ((t[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    first = fp._download(fp._to_uint8(t))
    assert np.array_equal(first, old)
    fp._download(fp._to_uint8(x))
    assert np.array_equal(first, old)  # the returned array is the caller's, not a reused buffer


def test_stage_profile_reports_every_stage(comps):
    fp = FramePipeline(comps, width=64, height=64, t_index_list=[20, 32, 45], profile_stages=True)
    for f in clip(14):
        fp.push(f)
    frames = fp.stage_times()
    assert len(frames) == 6  # the stream frames; the 8 warmup frames are not timed
    assert all(set(f) >= {"upload", "depth", "encode", "unet"} for f in frames)
    assert [("download" in f) for f in frames] == [False, False] + [True] * 4  # T - 1 calls finish no output
    medians = fp.stage_medians()
    assert list(medians) == ["upload", "depth", "encode", "unet", "decode", "download"]
    assert all(ms > 0 for ms in medians.values())
    fp.clear_stage_times()
    assert fp.stage_times() == [] and fp.stage_medians() == {}
    fp.push(clip(1)[0])
    assert len(fp.stage_times()) == 1
    # Off by default: nothing recorded.
    off = FramePipeline(comps, width=64, height=64)
    for f in clip(10):
        off.push(f)
    assert off.stage_times() == [] and off.stage_medians() == {}


def test_taesd_goes_through_the_same_batched_encode_and_decode(comps, monkeypatch):
    import dataclasses

    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        taesd = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
        ).eval().requires_grad_(False)
    tiny = dataclasses.replace(comps, vae=taesd)
    assert tiny.vae_scale_factor == 8
    sizes = []
    encode = taesd.encode
    monkeypatch.setattr(taesd, "encode", lambda images, *a, **k: sizes.append(images.shape[0]) or encode(images, *a, **k))
    fp = FramePipeline(tiny, width=64, height=64, seed=2)
    got = []
    for f in clip(12):
        got += fp.push(f)
    got += fp.flush()
    assert [i for i, _ in got] == list(range(12))
    assert sizes[:8] == [4, 4, 4, 4, 2, 2, 2, 2]
    assert all(img.shape == (80, 96, 3) and img.dtype == np.uint8 for _, img in got)
    assert got[10][1].std() > 0


def test_accelerate_is_passed_to_the_stream(comps, monkeypatch):
    import live2diff_engine.pipeline.frames as frames_mod

    real, seen = frames_mod.StreamPipeline, []

    def recording(*args, **kwargs):
        seen.append(kwargs.pop("accelerate", None))
        return real(*args, **kwargs)

    monkeypatch.setattr(frames_mod, "StreamPipeline", recording)
    FramePipeline(comps, width=64, height=64)
    fp = FramePipeline(comps, width=64, height=64, accelerate="compile")
    assert seen == [None, "compile"] and fp.accelerate == "compile"
    fp.restart()  # every new stream gets it
    assert seen[-1] == "compile"
