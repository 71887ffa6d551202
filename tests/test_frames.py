"""The frame pipeline and `translate`, with the tiny model: any frame size in, whole videos out."""

import cv2
import numpy as np
import pytest
import torch

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
    frame = np.zeros((90, 160, 3), np.uint8)
    frame[:, :80] = 200  # left half bright
    img, fit = fit_frame(frame, 64, 64, mode)
    assert img.shape == (64, 64, 3)
    back = unfit_frame(img, fit, 160, 90)
    assert back.shape == (90, 160, 3)
    if mode == "letterbox":
        assert img[0].max() == 0 and img[-1].max() == 0  # bars above and below
        assert back[:, :70].mean() > 150 and back[:, 90:].mean() < 50


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
    got = []
    for i, f in enumerate(clip(24)):
        if i == 14:
            fp.set_schedule(50, [20, 32, 45])
        got += fp.push(f)
    got += fp.flush()
    assert [i for i, _ in got] == list(range(24))
    assert fp.steps == 3 and not fp.warming_up


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
    # The warmup frames show the input (lossy codec: compare loosely), not black.
    inp = read_video(src)
    for i in range(8):
        square = cv2.resize(inp[i][:, 8:88], (72, 72), interpolation=cv2.INTER_AREA)  # the model's centre square
        expected = square[8:64]  # covering 72x56
        assert out[i].mean() > 20
        assert np.abs(out[i].astype(int) - expected.astype(int)).mean() < 25


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
