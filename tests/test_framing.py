"""Framing: `--fit crop` cuts once, to the model's aspect ratio, and the output is never cut or
zoomed again; `--fit letterbox` pads. Judged on frames whose edges are marked in colours (which
markers survive, where) and with a white square in the middle (the scale factor)."""

import cv2
import numpy as np
import pytest

from conftest import run_cli
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.pipeline.frames import FramePipeline, fit_frame, fit_rect, unfit_frame

EDGES = {"top": (0, 0, 255), "bottom": (255, 255, 0), "left": (255, 0, 0), "right": (0, 255, 0)}


def marked_frame(w, h, border=4, square=None):
    """Grey, with a coloured band along each edge (blue top, yellow bottom, red left, green
    right) and a white square of side ``square`` (default h/3) in the centre."""
    f = np.full((h, w, 3), 128, np.uint8)
    f[:border] = EDGES["top"]
    f[-border:] = EDGES["bottom"]
    f[:, :border] = EDGES["left"]
    f[:, -border:] = EDGES["right"]
    s = square or h // 3
    x0, y0 = (w - s) // 2, (h - s) // 2
    f[y0 : y0 + s, x0 : x0 + s] = 255
    return f


def colour_mask(img, colour):
    """Pixels that lean clearly towards ``colour`` (blends with the grey after resizing count)."""
    i = img.astype(int)
    r, g, b = i[..., 0], i[..., 1], i[..., 2]
    return {
        (0, 0, 255): b - np.maximum(r, g) > 50,
        (255, 255, 0): np.minimum(r, g) - b > 50,
        (255, 0, 0): r - np.maximum(g, b) > 50,
        (0, 255, 0): g - np.maximum(r, b) > 50,
    }[colour]


def surviving_edges(img):
    return {name for name, colour in EDGES.items() if colour_mask(img, colour).any()}


def square_size(img):
    """Width and height of the white square (pixels brighter than halfway between grey and white)."""
    white = (img.astype(int).min(axis=-1) > 191)
    ys, xs = np.nonzero(white)
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def black_columns(img):
    return [x for x in range(img.shape[1]) if img[:, x].max() == 0]


def black_rows(img):
    return [y for y in range(img.shape[0]) if img[y].max() == 0]


def through(frame, w, h, mode, out=None):
    """Input frame -> model picture -> output frame (the output at the input's size by default)."""
    img, fit = fit_frame(frame, w, h, mode)
    ow, oh = out or (frame.shape[1], frame.shape[0])
    return img, fit, unfit_frame(img, fit, ow, oh)


# -- the framing functions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "src, model, kept",
    [
        ((160, 120), (64, 64), (20, 0, 120, 120)),  # 4:3 into a square: the centre square
        ((96, 64), (64, 64), (16, 0, 64, 64)),
        ((1280, 720), (512, 512), (280, 0, 720, 720)),  # 16:9 camera at 512x512: all its height
        ((1280, 720), (640, 360), (0, 0, 1280, 720)),  # same aspect: nothing is cut
        ((640, 480), (640, 360), (0, 60, 640, 360)),  # 4:3 camera into 16:9: all its width
        ((854, 480), (640, 360), (0, 0, 854, 480)),  # 16:9 up to rounding: nothing is cut
    ],
)
def test_crop_keeps_the_centre_with_the_models_aspect_ratio(src, model, kept):
    fit = fit_rect(*src, *model, "crop")
    assert fit.src_rect == kept and fit.dst_rect == (0, 0, *model)
    x, y, w, h = kept
    assert w == src[0] or h == src[1]  # one whole side is always kept


def test_crop_output_is_the_kept_part_at_the_inputs_scale_between_bars():
    frame = marked_frame(160, 120, square=40)
    img, fit, out = through(frame, 64, 64, "crop")
    assert out.shape == (120, 160, 3)
    # Cut once: the square's top and bottom edges are in the model picture and in the output, the
    # left and right ones (outside the centre square) in neither.
    assert surviving_edges(img) == surviving_edges(out) == {"top", "bottom"}
    # Not zoomed: the 40-pixel square is 40 pixels wide and high (it was 53: 1.33x).
    sw, sh = square_size(out)
    assert abs(sw - 40) <= 2 and abs(sh - 40) <= 2, (sw, sh)
    # The kept part goes back where it came from (columns 20..139); black where the crop cut.
    assert black_columns(out) == list(range(20)) + list(range(140, 160))
    assert black_rows(out) == []
    assert colour_mask(out[:4, 20:140], EDGES["top"]).mean() > 0.9  # the top band, right at the top
    assert colour_mask(out[-4:, 20:140], EDGES["bottom"]).mean() > 0.9


@pytest.mark.parametrize("src", [(96, 64), (80, 64)])
def test_crop_does_not_zoom_small_inputs(src):
    frame = marked_frame(*src, square=32)
    _, fit, out = through(frame, 64, 64, "crop")
    assert surviving_edges(out) == {"top", "bottom"}
    sw, sh = square_size(out)
    assert (sw, sh) == (32, 32)  # at the model's own scale nothing is resampled (it was 1.5x at 96x64)
    cut = (src[0] - 64) // 2
    assert black_columns(out) == list(range(cut)) + list(range(cut + 64, src[0]))


def test_a_16_9_camera_at_512x512_keeps_all_its_height_at_its_own_scale():
    frame = marked_frame(1280, 720, border=6, square=240)
    img, fit, out = through(frame, 512, 512, "crop")
    x, y, w, h = fit.src_rect
    assert (w / 1280, h / 720) == (0.5625, 1.0)  # 56% of the width, all of the height (was 56% of both)
    assert surviving_edges(out) == {"top", "bottom"}
    sw, sh = square_size(out)
    assert abs(sw - 240) <= 3 and abs(sh - 240) <= 3
    assert black_columns(out) == list(range(280)) + list(range(1000, 1280))


def test_crop_to_an_output_of_the_models_shape_fills_it():
    frame = marked_frame(160, 120, square=40)
    _, _, out = through(frame, 64, 64, "crop", out=(96, 96))
    assert black_columns(out) == [] and black_rows(out) == []
    assert surviving_edges(out) == {"top", "bottom"}
    sw, sh = square_size(out)
    assert abs(sw - 32) <= 2 and abs(sh - 32) <= 2  # 40 * 96/120: scaled as the output is, no more


@pytest.mark.parametrize("src, model", [((1280, 720), (640, 360)), ((854, 480), (640, 360)), ((640, 480), (96, 72))])
def test_same_aspect_ratio_keeps_every_edge_and_adds_no_bars(src, model):
    frame = marked_frame(*src, border=max(4, src[0] // 100))
    for mode in ("crop", "letterbox"):
        img, _, out = through(frame, *model, mode)
        assert surviving_edges(img) == surviving_edges(out) == set(EDGES), mode
        assert black_columns(out) == [] and black_rows(out) == [], mode


def test_letterbox_keeps_the_whole_frame_and_the_output_has_no_bars():
    frame = marked_frame(160, 120, square=40)
    img, fit, out = through(frame, 64, 64, "letterbox")
    assert fit.dst_rect == (0, 8, 64, 48)
    assert black_rows(img) == list(range(8)) + list(range(56, 64))  # the model sees bars
    assert surviving_edges(img) == surviving_edges(out) == set(EDGES)
    assert black_rows(out) == [] and black_columns(out) == []  # the output does not
    sw, sh = square_size(out)
    assert abs(sw - 40) <= 3 and abs(sh - 40) <= 3


def test_letterbox_with_a_rounded_content_rectangle_adds_no_hairline_bars():
    # 640x480 into 96x64 is 85.3 x 64: the model's content rectangle is 85 wide, and scaled back
    # it would be 638 wide; the output is filled rather than given two one-pixel bars.
    frame = marked_frame(640, 480, border=8)
    img, fit, out = through(frame, 96, 64, "letterbox")
    assert fit.dst_rect == (5, 0, 85, 64)
    assert out.shape == (480, 640, 3)
    assert black_columns(out) == [] and black_rows(out) == []
    assert surviving_edges(out) == set(EDGES)


# -- the frame pipeline: warmup frames and stream frames framed alike ----------------------------


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def run_pipeline(comps, frames, mode):
    fp = FramePipeline(comps, width=64, height=64, fit=mode, prompt="a cat")
    got = []
    for f in frames:
        got += fp.push(f)
    got += fp.flush()
    assert [i for i, _ in got] == list(range(len(frames)))
    return [img for _, img in got]


def test_pipeline_crop_frames_warmup_and_stream_alike(comps):
    frames = [np.roll(marked_frame(160, 120, square=40), 0, axis=1) for _ in range(10)]
    out = run_pipeline(comps, frames, "crop")
    expected = through(frames[0], 64, 64, "crop")[2]
    for i in range(8):  # the warmup frames: the input, framed as every later output
        assert np.array_equal(out[i], expected), i
        assert surviving_edges(out[i]) == {"top", "bottom"}
        sw, sh = square_size(out[i])
        assert abs(sw - 40) <= 2 and abs(sh - 40) <= 2
    bars = list(range(20)) + list(range(140, 160))
    for i in range(8, 10):  # the model's frames: the same picture area, the same bars
        assert out[i].shape == (120, 160, 3)
        assert black_columns(out[i]) == bars, i
        assert out[i][:, 20:140].std() > 1 and not np.array_equal(out[i], expected)


def test_pipeline_letterbox_frames_warmup_and_stream_alike(comps):
    frames = [marked_frame(160, 120, square=40) for _ in range(10)]
    out = run_pipeline(comps, frames, "letterbox")
    expected = through(frames[0], 64, 64, "letterbox")[2]
    for i in range(8):
        assert np.array_equal(out[i], expected), i
        assert surviving_edges(out[i]) == set(EDGES)
    for i in range(8, 10):  # the model's own bars are cut away again: none in the output
        assert black_columns(out[i]) == [] and black_rows(out[i]) == []


@pytest.mark.parametrize("mode", ["crop", "letterbox"])
def test_a_paused_stream_shows_the_camera_framed_as_its_outputs(comps, mode):
    """Pause (and a frame that fails) shows the camera unstylised: the same picture area as the
    stylised frames, at the camera's own resolution, not the whole frame stretched."""
    from live2diff_engine.engine import Engine
    from live2diff_engine.io.sinks import NullSink
    from live2diff_engine.io.sources import Source

    frames = [marked_frame(160, 120, square=40) for _ in range(12)]

    class Frames(Source):
        name, live = "frames", False

        def __init__(self):
            self.left = list(frames)

        def read(self):
            if not self.left:
                from live2diff_engine.io.sources import SourceEnded

                raise SourceEnded
            return self.left.pop(0)

    fp = FramePipeline(comps, width=64, height=64, fit=mode, prompt="a cat")
    outputs = []
    engine = Engine(fp, Frames(), [NullSink()], status=False, on_output=outputs.append)
    engine.paused = True
    engine.run(install_signals=False)
    assert len(outputs) == 12
    expected = through(frames[0], 64, 64, mode)[2]  # the warmup frames' picture: the framing of every output
    for out in outputs:
        assert out.shape == (120, 160, 3)
        assert black_columns(out) == black_columns(expected) and surviving_edges(out) == surviving_edges(expected)
        assert np.array_equal(out, fp.framed(frames[0]))
    sw, sh = square_size(outputs[0])
    assert abs(sw - 40) <= 1 and abs(sh - 40) <= 1  # at the camera's own scale


def test_translate_crop_is_not_zoomed(tmp_path):
    frames = [marked_frame(160, 120, square=40) for _ in range(10)]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    dst = tmp_path / "out.avi"
    r = run_cli("translate", folder, dst, "--model", "tiny")
    assert r.returncode == 0, r.stderr
    cap = cv2.VideoCapture(str(dst))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    assert len(out) == 10 and out[0].shape == (120, 160, 3)
    for f in out[:8]:  # MJPEG is lossy: bars are near black, the square about 40 pixels
        assert f[:, :18].max() < 40 and f[:, 142:].max() < 40
        assert surviving_edges(f) == {"top", "bottom"}
        sw, sh = square_size(f)
        assert abs(sw - 40) <= 3 and abs(sh - 40) <= 3
    for f in out[8:]:
        assert f[:, :18].max() < 40 and f[:, 142:].max() < 40 and f[:, 24:136].std() > 1


def test_an_odd_size_for_a_video_file_is_cut_to_even_and_said_once(tmp_path):
    """641x361 came out 640x360 without a word (the encoders take even sizes only)."""
    import cv2
    import numpy as np

    from live2diff_engine.io.video import VideoWriter, frames_word

    said = []
    writer = VideoWriter(tmp_path / "out.mp4", 10.0, (641, 361), say=said.append)
    frame = np.zeros((361, 641, 3), np.uint8)
    frame[:, :320] = 255  # the left half white: cut, not scaled, it stays where it was
    for _ in range(3):
        writer.write(frame)
    writer.close()
    assert said == ["note: out.mp4 is 640x360, not 641x361: video files take even sizes (the last column or row is left out)"]
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    ok, got = cap.read()
    assert ok and got.shape == (360, 640, 3)
    assert got[:, 300:316].mean() > 200 and got[:, 324:340].mean() < 50
    even = VideoWriter(tmp_path / "even.mp4", 10.0, (640, 360), say=said.append)
    even.close()
    assert len(said) == 1
    assert (frames_word(1), frames_word(3)) == ("1 frame", "3 frames")
