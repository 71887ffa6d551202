"""One pass over an input video and its stylised versions: every metric per frame, and the slices.

The videos are read side by side, a few frames at a time (CLIP and the depth estimator see a
batch; everything else needs only the frame before), so a long video costs time, not memory: what
is kept is one number per frame and metric, and one row (X-T) or column (Y-T) per frame and slice.

Outputs of another size are resized to the input's (metrics and slices compare pixel positions),
with a note; the input's own frames must keep one size.
Videos of different lengths are compared over the frames they all have.
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
) -> Evaluation:
    """Compare each ``(label, path)`` of ``outputs`` with the input video, frame by frame.

    ``clip`` (a :class:`~.models.ClipEmbedder`) is needed for clip_consistency, ``depth`` (a
    :class:`~.models.DepthProbe`) for depth_mse. ``progress(n)`` is told of every ``n`` frames
    done; ``say(line)`` of anything worth a note (videos of different lengths)."""
    if "clip_consistency" in metrics and clip is None:
        raise ConfigError("CLIP consistency needs a CLIP model")
    if "depth_mse" in metrics and depth is None:
        raise ConfigError("depth MSE needs a depth estimator")
    if start < 0:
        raise ConfigError(f"--start must be 0 or more, got {start}")
    source = FrameSource(input_path)
    readers = []
    try:
        for _, path in outputs:
            readers.append(FrameSource(path))
        return _run(source, readers, outputs, metrics, clip, depth, rows, cols, start, max(1, chunk), progress, say)
    finally:
        source.close()
        for r in readers:
            r.close()


def _run(source, readers, outputs, metrics, clip, depth, rows, cols, start, chunk, progress, say) -> Evaluation:
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
        for i, frame in enumerate(chunk_in):
            g = m.gray(frame)
            backward = mask = still = None
            if prev_in is not None and need_flow:
                backward = flow(g, prev_gray)
                if "warp_error" in metrics:
                    mask = m.trusted_mask(backward, flow(prev_gray, g))
                if "flicker" in metrics:
                    still = m.static_mask(prev_in, frame, backward)
            for j in range(k):
                out = chunk_out[j][i]
                first = prev_out[j] is None
                if "warp_error" in metrics:
                    per[j]["warp_error"].append(np.nan if first else m.warp_error(prev_out[j], out, backward, mask))
                if "flicker" in metrics:
                    per[j]["flicker"].append(np.nan if first else m.flicker(prev_out[j], out, still))
                prev_out[j] = out
            for r, lists in xt_rows.items():
                lists[0].append(frame[r])
                for j in range(k):
                    lists[j + 1].append(chunk_out[j][i][r])
            for c, lists in yt_cols.items():
                lists[0].append(frame[:, c])
                for j in range(k):
                    lists[j + 1].append(chunk_out[j][i][:, c])
            prev_in, prev_gray = frame, g
        if "clip_consistency" in metrics:
            for j in range(k):
                emb = clip(chunk_out[j])
                for e in emb:
                    per[j]["clip_consistency"].append(np.nan if prev_emb[j] is None else m.cosine(prev_emb[j], e))
                    prev_emb[j] = e
        if "depth_mse" in metrics:
            d_in = depth(chunk_in)
            for j in range(k):
                d_out = depth(chunk_out[j])
                per[j]["depth_mse"].extend(m.depth_mse(a, b) for a, b in zip(d_out, d_in))
        n += len(chunk_in)
        if progress is not None:
            progress(len(chunk_in))
    videos = [VideoResult(label, str(path), {key: np.asarray(v, dtype=np.float64) for key, v in per[j].items()})
              for j, (label, path) in enumerate(outputs)]
    xt = {r: [np.stack(frames_) for frames_ in lists] for r, lists in xt_rows.items()}
    yt = {c: [np.stack(frames_, axis=1) for frames_ in lists] for c, lists in yt_cols.items()}
    return Evaluation(str(source.path), size, float(source.fps), start, n, tuple(metrics), videos, rows, cols, xt, yt)
