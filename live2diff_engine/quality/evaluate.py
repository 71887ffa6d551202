"""One pass over an input video and its stylised versions: every metric per frame, and the slices.

The videos are read side by side, a few frames at a time (CLIP and the depth estimator see a
batch; everything else needs only the frame before), so a long video costs time, not memory: what
is kept is one number per frame and metric, and one row (X-T) or column (Y-T) per frame and slice.

Outputs of another size are resized to the input's (metrics and slices compare pixel positions),
with a note; the input's own frames must keep one size.
Videos of different lengths are compared over the frames they all have.

Bars are not picture: an output of the engine in crop mode shows the centre it kept between black
bars, where it cut (see :func:`~live2diff_engine.pipeline.frames.unfit_frame`), and a bar is a
perfect pixel to every metric (it never moves, never flickers). So the metrics look only at the
picture area: the rectangle every output fills. Where the caller knows an output's framing (the
per-frame baseline ``eval`` makes itself) it passes it; for any other output the rows and columns
at its edges that are constant over every frame (one colour, within :data:`BAR_TOLERANCE` grey
levels) are found in a first pass over it. The area is the part inside every output's bars; each
video, and the input, is measured over that same area, and a note says so. The slices show the
whole frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import ConfigError
from ..io.video import FrameSource
from . import metrics as m

# The --metrics names and what they report.
METRICS = {"warp": "warp_error", "clip": "clip_consistency", "depth": "depth_mse", "flicker": "flicker"}
TITLES = {"warp_error": "warp error", "clip_consistency": "CLIP consistency", "depth_mse": "depth MSE", "flicker": "flicker"}
BETTER = {"warp_error": "lower", "clip_consistency": "higher", "depth_mse": "lower", "flicker": "lower"}
# A row or column at an output's edge is a bar when over every frame all its pixels stay within this
# many grey levels of each other (per channel). A codec does not leave a bar exactly black: MPEG-4
# part 2 (OpenCV's mp4v) rang up to 12 levels in the 8x8 blocks next to the picture of a small
# clip; a line of picture spans far more over a few frames. The last few pixels of a bar, in a
# block the picture shares, ring more and are kept as picture (at most a block's width).
BAR_TOLERANCE = 24


@dataclass
class VideoResult:
    """One stylised video's numbers: ``per_frame[key]`` has one value per compared frame (NaN where
    a frame has none: the first frame of a temporal metric, a frame with no trusted or still pixel)."""

    label: str
    path: str
    per_frame: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, key: str) -> float | None:
        values = self.per_frame[key]
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else None


@dataclass
class Evaluation:
    input: str
    size: tuple[int, int]  # width, height of the input (and of every compared frame)
    fps: float
    start: int  # frames left out at the beginning
    frames: int  # frames compared
    metrics: tuple[str, ...]  # keys of METRICS' values, in the order asked for
    videos: list[VideoResult]
    rows: list[int]
    cols: list[int]
    # X-T slices per row: [input, video 1, ...], each [frames, width, 3]; Y-T per column: [height, frames, 3].
    xt: dict[int, list[np.ndarray]] = field(default_factory=dict)
    yt: dict[int, list[np.ndarray]] = field(default_factory=dict)
    # The picture area the metrics compared (x, y, w, h in input pixels), None for the whole frame;
    # ``bars`` says whose bars were left out and how they were known ({label: how}).
    area: tuple[int, int, int, int] | None = None
    bars: dict[str, str] = field(default_factory=dict)


def parse_metrics(text: str | None) -> tuple[str, ...]:
    names = [n.strip() for n in (text or ",".join(METRICS)).split(",") if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if not names or bad:
        raise ConfigError(f"--metrics takes a comma-separated choice of {', '.join(METRICS)}, got {text!r}")
    return tuple(dict.fromkeys(METRICS[n] for n in names))


def _fit(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (frame.shape[1], frame.shape[0]) == size:
        return frame
    shrink = frame.shape[1] > size[0] and frame.shape[0] > size[1]
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def check_positions(rows: list[int] | None, cols: list[int] | None, size: tuple[int, int]) -> tuple[list[int], list[int]]:
    w, h = size
    rows = [h // 2] if rows is None else list(rows)
    cols = [w // 2] if cols is None else list(cols)
    for name, values, limit in (("--rows", rows, h), ("--cols", cols, w)):
        bad = [v for v in values if not 0 <= v < limit]
        if bad:
            raise ConfigError(f"{name} must lie in 0..{limit - 1} (the input is {w}x{h}), got {bad[0]}")
    return list(dict.fromkeys(rows)), list(dict.fromkeys(cols))


def inside_bars(lo: np.ndarray, hi: np.ndarray, tolerance: int = BAR_TOLERANCE) -> tuple[int, int, int, int] | None:
    """The rectangle (x, y, w, h) inside a video's constant bars, from the per-pixel minimum ``lo``
    and maximum ``hi`` over all its frames (``[H, W, 3]``): rows and columns are peeled off the
    edges while one of them stays within ``tolerance`` of a single colour (per channel) over every
    frame, each judged over the rows (columns) still left, so bars on all four sides, even of
    different colours, come off. None when nothing is left (the video is one colour throughout)."""
    lo, hi = lo.astype(np.int16), hi.astype(np.int16)
    y0, y1, x0, x1 = 0, lo.shape[0], 0, lo.shape[1]

    def flat(ys: slice, xs: slice) -> bool:
        return bool(((hi[ys, xs].max(axis=(0, 1)) - lo[ys, xs].min(axis=(0, 1))) <= tolerance).all())

    peeled = True
    while peeled and y0 < y1 and x0 < x1:
        peeled = False
        for side in ("left", "right", "top", "bottom"):
            if not (y0 < y1 and x0 < x1):
                break
            if side == "left" and flat(slice(y0, y1), slice(x0, x0 + 1)):
                x0, peeled = x0 + 1, True
            elif side == "right" and flat(slice(y0, y1), slice(x1 - 1, x1)):
                x1, peeled = x1 - 1, True
            elif side == "top" and flat(slice(y0, y0 + 1), slice(x0, x1)):
                y0, peeled = y0 + 1, True
            elif side == "bottom" and flat(slice(y1 - 1, y1), slice(x0, x1)):
                y1, peeled = y1 - 1, True
    if y0 >= y1 or x0 >= x1:
        return None
    return x0, y0, x1 - x0, y1 - y0


def _scaled(rect: tuple[int, int, int, int], frm: tuple[int, int], to: tuple[int, int]) -> tuple[int, int, int, int]:
    """A rectangle in a ``frm``-sized frame, in the ``to``-sized frame it is resized to; rounded
    inwards (a pixel half in a bar is left out)."""
    if frm == to:
        return rect
    sx, sy = to[0] / frm[0], to[1] / frm[1]
    x, y, w, h = rect
    left, top = int(np.ceil(x * sx - 1e-6)), int(np.ceil(y * sy - 1e-6))
    right, bottom = int(np.floor((x + w) * sx + 1e-6)), int(np.floor((y + h) * sy + 1e-6))
    return left, top, max(1, right - left), max(1, bottom - top)


def picture_area(input_path, outputs: list[tuple[str, str]], known: dict[str, tuple[int, int, int, int]] | None = None,
                 *, start: int = 0) -> tuple[tuple[int, int, int, int] | None, dict[str, str], tuple[int, int] | None]:
    """The area of the input's frame that every output fills with picture: ``(x, y, w, h)`` in
    input pixels, or None when that is the whole frame; ``{label: how}`` for each output whose
    bars it leaves out; and the input's size (None when it holds no frames). ``known[label]`` is
    an output's picture rectangle in its own pixels (the caller knows its framing); every other
    output is read once from frame ``start`` on and its constant bars found (:func:`inside_bars`)."""
    known = known or {}
    probe = FrameSource(input_path)
    try:
        first = next(iter(probe), None)
    finally:
        probe.close()
    if first is None:
        return None, {}, None
    size = (first.shape[1], first.shape[0])
    x0, y0, x1, y1 = 0, 0, size[0], size[1]
    bars: dict[str, str] = {}
    for label, path in outputs:
        source = FrameSource(path)
        lo = hi = None
        own = None
        try:
            for i, frame in enumerate(source):
                if own is None:
                    own = (frame.shape[1], frame.shape[0])
                if label in known:
                    break
                if i < start:
                    continue
                frame = _fit(frame, size)
                lo = frame.copy() if lo is None else np.minimum(lo, frame, out=lo)
                hi = frame.copy() if hi is None else np.maximum(hi, frame, out=hi)
        finally:
            source.close()
        if label in known and own is not None:
            rect, how = _scaled(known[label], own, size), "the framing it was made with"
        elif lo is not None:
            rect, how = inside_bars(lo, hi), "constant over every frame"
        else:
            continue
        if rect is None or rect == (0, 0, size[0], size[1]):
            continue  # one colour throughout (nothing to keep), or no bars
        bars[label] = how
        x0, y0 = max(x0, rect[0]), max(y0, rect[1])
        x1, y1 = min(x1, rect[0] + rect[2]), min(y1, rect[1] + rect[3])
    if not bars or x0 >= x1 or y0 >= y1:  # no bars, or outputs whose pictures do not overlap: the whole frame
        return None, {}, size
    return (x0, y0, x1 - x0, y1 - y0), bars, size


def area_note(area: tuple[int, int, int, int], size: tuple[int, int], bars: dict[str, str]) -> str:
    x, y, w, h = area
    whose = "; ".join(f"{label}: {how}" for label, how in bars.items())
    return (f"note: compared the picture area {w}x{h} of {size[0]}x{size[1]} (x {x}..{x + w - 1}, y {y}..{y + h - 1}) "
            f"in every video: constant bars left out ({whose})")


def evaluate(
    input_path,
    outputs: list[tuple[str, str]],
    *,
    metrics: tuple[str, ...] = tuple(METRICS.values()),
    clip=None,
    depth=None,
    rows: list[int] | None = None,
    cols: list[int] | None = None,
    start: int = 0,
    chunk: int = 8,
    progress=None,
    say=None,
    framing: dict[str, tuple[int, int, int, int]] | None = None,
    bars: bool = True,
) -> Evaluation:
    """Compare each ``(label, path)`` of ``outputs`` with the input video, frame by frame.

    ``clip`` (a :class:`~.models.ClipEmbedder`) is needed for clip_consistency, ``depth`` (a
    :class:`~.models.DepthProbe`) for depth_mse. ``progress(n)`` is told of every ``n`` frames
    done; ``say(line)`` of anything worth a note (videos of different lengths, the picture area).
    The metrics compare the picture area inside every output's bars (:func:`picture_area`;
    ``framing[label]``: an output's picture rectangle where the caller knows it); ``bars=False``
    compares whole frames."""
    if "clip_consistency" in metrics and clip is None:
        raise ConfigError("CLIP consistency needs a CLIP model")
    if "depth_mse" in metrics and depth is None:
        raise ConfigError("depth MSE needs a depth estimator")
    if start < 0:
        raise ConfigError(f"--start must be 0 or more, got {start}")
    area, barred, full = picture_area(input_path, outputs, framing, start=start) if bars else (None, {}, None)
    if area is not None and say is not None:
        say(area_note(area, full, barred))
    source = FrameSource(input_path)
    readers = []
    try:
        for _, path in outputs:
            readers.append(FrameSource(path))
        ev = _run(source, readers, outputs, metrics, clip, depth, rows, cols, start, max(1, chunk), progress, say, area)
    finally:
        source.close()
        for r in readers:
            r.close()
    if area is not None:
        ev.area, ev.bars = area, barred
    return ev


def _run(source, readers, outputs, metrics, clip, depth, rows, cols, start, chunk, progress, say, area=None) -> Evaluation:
    it_in, its = iter(source), [iter(r) for r in readers]
    k = len(outputs)
    for _ in range(start):
        next(it_in, None)
        for it in its:
            next(it, None)
    flow = m.FlowEstimator()
    need_flow = "warp_error" in metrics or "flicker" in metrics
    per = [{key: [] for key in metrics} for _ in range(k)]
    size = None
    resized: set[int] = set()  # outputs already noted as resized
    xt_rows: dict[int, list[list[np.ndarray]]] = {}
    yt_cols: dict[int, list[list[np.ndarray]]] = {}
    prev_in = prev_gray = None
    prev_out: list[np.ndarray | None] = [None] * k
    prev_emb: list[np.ndarray | None] = [None] * k
    n = 0
    exhausted = False
    while not exhausted:
        chunk_in: list[np.ndarray] = []
        chunk_out: list[list[np.ndarray]] = [[] for _ in range(k)]
        while len(chunk_in) < chunk:
            frame = next(it_in, None)
            outs = [next(it, None) for it in its]
            if frame is None or any(o is None for o in outs):
                exhausted = True
                ended = ([source.path.name] if frame is None else []) + [label for (label, _), o in zip(outputs, outs) if o is None]
                if n + len(chunk_in) == 0:
                    after = f" after the {start} left out by --start" if start else ""
                    raise ConfigError(f"nothing to compare: {', '.join(ended)} {'holds' if len(ended) == 1 else 'hold'} no frames{after}")
                longer = ([source.path.name] if frame is not None else []) + [label for (label, _), o in zip(outputs, outs) if o is not None]
                if say is not None and longer:
                    say(f"note: {', '.join(longer)} {'has' if len(longer) == 1 else 'have'} more frames than the rest; "
                        f"compared the first {start + n + len(chunk_in)}")
                break
            if size is None:
                size = (frame.shape[1], frame.shape[0])
                rows, cols = check_positions(rows, cols, size)
                xt_rows = {r: [[] for _ in range(k + 1)] for r in rows}
                yt_cols = {c: [[] for _ in range(k + 1)] for c in cols}
            elif (frame.shape[1], frame.shape[0]) != size:  # a folder of images of mixed sizes
                raise ConfigError(f"{source.path.name}: frame {start + n + len(chunk_in)} is {frame.shape[1]}x{frame.shape[0]}, "
                                  f"its first frame {size[0]}x{size[1]}; the input's frames must all have one size")
            for j, o in enumerate(outs):
                if (o.shape[1], o.shape[0]) != size and say is not None and j not in resized:
                    resized.add(j)
                    stretched = abs(o.shape[1] * size[1] - o.shape[0] * size[0]) > max(size)  # aspect ratios apart by more than rounding
                    say(f"note: {outputs[j][0]} is {o.shape[1]}x{o.shape[0]}; resized to the input's {size[0]}x{size[1]}"
                        + (" (another aspect ratio: stretched, so positions match only roughly)" if stretched else ""))
            chunk_in.append(frame)
            for j, o in enumerate(outs):
                chunk_out[j].append(_fit(o, size))
        if not chunk_in:
            break
        # The metrics see the picture area only; the slices (below) the whole frames.
        pic_in, pic_out = chunk_in, chunk_out
        if area is not None:
            ax, ay, aw, ah = area
            pic_in = [np.ascontiguousarray(f[ay : ay + ah, ax : ax + aw]) for f in chunk_in]
            pic_out = [[np.ascontiguousarray(o[ay : ay + ah, ax : ax + aw]) for o in outs] for outs in chunk_out]
        for i, frame in enumerate(pic_in):
            g = m.gray(frame)
            backward = mask = still = None
            if prev_in is not None and need_flow:
                backward = flow(g, prev_gray)
                if "warp_error" in metrics:
                    mask = m.trusted_mask(backward, flow(prev_gray, g))
                if "flicker" in metrics:
                    still = m.static_mask(prev_in, frame, backward)
            for j in range(k):
                out = pic_out[j][i]
                first = prev_out[j] is None
                if "warp_error" in metrics:
                    per[j]["warp_error"].append(np.nan if first else m.warp_error(prev_out[j], out, backward, mask))
                if "flicker" in metrics:
                    per[j]["flicker"].append(np.nan if first else m.flicker(prev_out[j], out, still))
                prev_out[j] = out
            for r, lists in xt_rows.items():
                lists[0].append(chunk_in[i][r])
                for j in range(k):
                    lists[j + 1].append(chunk_out[j][i][r])
            for c, lists in yt_cols.items():
                lists[0].append(chunk_in[i][:, c])
                for j in range(k):
                    lists[j + 1].append(chunk_out[j][i][:, c])
            prev_in, prev_gray = frame, g
        if "clip_consistency" in metrics:
            for j in range(k):
                emb = clip(pic_out[j])
                for e in emb:
                    per[j]["clip_consistency"].append(np.nan if prev_emb[j] is None else m.cosine(prev_emb[j], e))
                    prev_emb[j] = e
        if "depth_mse" in metrics:
            d_in = depth(pic_in)
            for j in range(k):
                d_out = depth(pic_out[j])
                per[j]["depth_mse"].extend(m.depth_mse(a, b) for a, b in zip(d_out, d_in))
        n += len(chunk_in)
        if progress is not None:
            progress(len(chunk_in))
    videos = [VideoResult(label, str(path), {key: np.asarray(v, dtype=np.float64) for key, v in per[j].items()})
              for j, (label, path) in enumerate(outputs)]
    xt = {r: [np.stack(frames_) for frames_ in lists] for r, lists in xt_rows.items()}
    yt = {c: [np.stack(frames_, axis=1) for frames_ in lists] for c, lists in yt_cols.items()}
    return Evaluation(str(source.path), size, float(source.fps), start, n, tuple(metrics), videos, rows, cols, xt, yt)
