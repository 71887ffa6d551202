"""The pictures of ``eval``: X-T / Y-T slices side by side, and a per-frame plot of each metric.

An X-T slice stacks one row of every frame, time running down: whatever crosses that row draws a
track, a steady object a straight line, a horizontally moving one a slanted line, and flicker
shows as horizontal streaks and speckle. A Y-T slice does the same with one column, time running
to the right. Input and outputs stand side by side under their names, at the same scale.

Plain OpenCV and numpy; pictures are RGB ``uint8`` arrays, written as PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserError
from .evaluate import BETTER, TITLES, Evaluation

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
# Line colours (RGB), one per video, as in common plotting palettes.
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_PANEL = 160  # a panel narrower or shorter than this is magnified by a whole factor (nearest pixel)
LABEL_H = 22
GAP = 6


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, color=INK, thickness: int = 1) -> None:
    cv2.putText(img, text, org, FONT, scale, color, thickness, cv2.LINE_AA)


def _text_width(text: str, scale: float = 0.45, thickness: int = 1) -> int:
    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def _fit_label(text: str, width: int, scale: float = 0.45) -> str:
    if _text_width(text, scale) <= width:
        return text
    while len(text) > 1 and _text_width(text + "...", scale) > width:
        text = text[:-1]
    return text + "..."


def side_by_side(panels: list[np.ndarray], labels: list[str]) -> tuple[np.ndarray, list[tuple[int, int, int, int]], tuple[int, int]]:
    """Panels of one shape in a row under their labels. Small panels are magnified (nearest pixel)
    by whole factors so that each side is at least ``MIN_PANEL``. Returns (picture, each panel's
    box ``(x, y, w, h)`` in it, the (x, y) magnification)."""
    h, w = panels[0].shape[:2]
    fx, fy = max(1, math.ceil(MIN_PANEL / w)), max(1, math.ceil(MIN_PANEL / h))
    pw, ph = w * fx, h * fy
    width = GAP + len(panels) * (pw + GAP)
    height = LABEL_H + ph + GAP
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    boxes = []
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = GAP + i * (pw + GAP)
        big = panel if (fx, fy) == (1, 1) else cv2.resize(panel, (pw, ph), interpolation=cv2.INTER_NEAREST)
        canvas[LABEL_H : LABEL_H + ph, x : x + pw] = big
        _text(canvas, _fit_label(label, pw), (x, LABEL_H - 7))
        boxes.append((x, LABEL_H, pw, ph))
    return canvas, boxes, (fx, fy)


def slice_pictures(ev: Evaluation) -> dict[str, tuple[np.ndarray, list[tuple[int, int, int, int]], tuple[int, int]]]:
    """``{file name: side_by_side(...)}``: ``xt_row{R}.png`` per row, ``yt_col{C}.png`` per column."""
    labels = ["input"] + [v.label for v in ev.videos]
    out = {}
    for r, panels in ev.xt.items():
        out[f"xt_row{r}.png"] = side_by_side(panels, [f"{labels[0]} (row {r}, time down)"] + labels[1:])
    for c, panels in ev.yt.items():
        out[f"yt_col{c}.png"] = side_by_side(panels, [f"{labels[0]} (column {c}, time right)"] + labels[1:])
    return out


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def plot(key: str, ev: Evaluation, width: int = 800, height: int = 420) -> np.ndarray:
    """One metric per frame for every video: a line each (gaps where a frame has no value), the
    frame number (as in the input file) across, the value up."""
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    title = f"{TITLES[key]} per frame ({BETTER[key]} is better)"
    _text(img, title, (12, 24), 0.6, thickness=1)
    left, right, top, bottom = 78, width - 16, 64, height - 44
    series = [(v.label, v.per_frame[key]) for v in ev.videos]
    finite = np.concatenate([s[np.isfinite(s)] for _, s in series]) if series else np.zeros(0)
    # legend, one line under the title
    x = 12
    for i, (label, _) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        cv2.line(img, (x, 44), (x + 18, 44), color, 2, cv2.LINE_AA)
        _text(img, label, (x + 22, 48), 0.42)
        x += 22 + _text_width(label, 0.42) + 18
    cv2.rectangle(img, (left, top), (right, bottom), INK, 1)
    first, last = ev.start, ev.start + max(ev.frames - 1, 1)
    if finite.size == 0:
        _text(img, "no values: no frame had pixels this metric can use", (left + 10, (top + bottom) // 2))
        return img
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.05 or 1e-3
        lo, hi = lo - pad, hi + pad
    else:
        pad = (hi - lo) * 0.06
        lo, hi = lo - pad, hi + pad

    def px(frame: float) -> float:
        return left + (frame - first) / (last - first) * (right - left)

    def py(value: float) -> float:
        return bottom - (value - lo) / (hi - lo) * (bottom - top)

    for t in _nice_ticks(lo, hi):
        y = int(round(py(t)))
        if top < y < bottom:
            cv2.line(img, (left + 1, y), (right - 1, y), GRID, 1)
        label = _fmt(t)
        _text(img, label, (left - 6 - _text_width(label, 0.4), y + 4), 0.4)
    for t in _nice_ticks(first, last, 8):
        if float(t) != int(t):
            continue
        x = int(round(px(t)))
        cv2.line(img, (x, bottom), (x, bottom + 4), INK, 1)
        label = str(int(t))
        _text(img, label, (x - _text_width(label, 0.4) // 2, bottom + 18), 0.4)
    _text(img, "frame", ((left + right) // 2 - 18, height - 8), 0.45)
    shift = 4  # sub-pixel positions for smooth lines
    for i, (label, values) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        run: list[tuple[int, int]] = []
        points = [(ev.start + f, v) for f, v in enumerate(values)]
        for frame, value in points + [(None, float("nan"))]:
            if frame is not None and np.isfinite(value):
                run.append((int(round(px(frame) * (1 << shift))), int(round(py(value) * (1 << shift)))))
                continue
            if len(run) == 1:
                cv2.circle(img, run[0], 2 << shift, color, -1, cv2.LINE_AA, shift)
            elif run:
                cv2.polylines(img, [np.array(run, dtype=np.int32)], False, color, 2, cv2.LINE_AA, shift)
            run = []
    return img


def write_png(path: Path, img: np.ndarray) -> None:
    ok = False
    try:
        # An explicit level: OpenCV's default PNG settings write files about five times larger.
        ok = cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    except cv2.error:
        ok = False
    if not ok:
        raise UserError(f"cannot write {path}; check the folder exists and can be written")


def write_pictures(ev: Evaluation, folder) -> list[Path]:
    """The slices and one plot per metric into ``folder`` (made if missing); returns the files."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the folder {folder} ({exc.strerror or exc})") from None
    written = []
    for name, (img, _, _) in slice_pictures(ev).items():
        write_png(folder / name, img)
        written.append(folder / name)
    for key in ev.metrics:
        path = folder / f"plot_{key}.png"
        write_png(path, plot(key, ev))
        written.append(path)
    return written
