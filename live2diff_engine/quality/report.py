"""The table ``eval`` prints and the JSON it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from .evaluate import BETTER, TITLES, Evaluation


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def table(ev: Evaluation) -> str:
    """One row per video, one column per metric (its mean over the frames that have a value),
    and a last line that says which way is better."""
    names = [v.label for v in ev.videos]
    first = max([len("video"), len("better:")] + [len(n) for n in names])
    widths = [max(len(TITLES[k]), 10) for k in ev.metrics]
    size = f"{ev.size[0]}x{ev.size[1]}"
    if ev.area:
        size = f"the picture area {ev.area[2]}x{ev.area[3]} at x {ev.area[0]}, y {ev.area[1]} of {size}: bars left out"
    lines = [f"{ev.input}: {ev.frames} frame{'' if ev.frames == 1 else 's'} compared ({size}"
             + (f", the first {ev.start} left out" if ev.start else "") + ")"]
    lines.append("  ".join([f"{'video':<{first}}"] + [f"{TITLES[k]:>{w}}" for k, w in zip(ev.metrics, widths)]))
    for v in ev.videos:
        lines.append("  ".join([f"{v.label:<{first}}"] + [f"{_cell(v.mean(k)):>{w}}" for k, w in zip(ev.metrics, widths)]))
    lines.append("  ".join([f"{'better:':<{first}}"] + [f"{BETTER[k]:>{w}}" for k, w in zip(ev.metrics, widths)]))
    return "\n".join(lines)


def _number(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def as_dict(ev: Evaluation) -> dict:
    return {
        "input": ev.input,
        "size": list(ev.size),
        "fps": ev.fps,
        "start": ev.start,
        "frames": ev.frames,
        # the part of the frame the metrics compared (input pixels); null: the whole frame
        "area": None if ev.area is None else dict(zip(("x", "y", "width", "height"), ev.area), bars_left_out=ev.bars),
        "better": {k: BETTER[k] for k in ev.metrics},
        "videos": [
            {
                "label": v.label,
                "path": v.path,
                "mean": {k: v.mean(k) for k in ev.metrics},
                # per_frame[k][i] belongs to frame start + i of the files; null where it has no value
                "per_frame": {k: [_number(x) for x in v.per_frame[k]] for k in ev.metrics},
            }
            for v in ev.videos
        ],
        "slices": {"rows": ev.rows, "cols": ev.cols},
    }


def write_json(ev: Evaluation, path) -> None:
    path = Path(path)
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(as_dict(ev), f, indent=1)
            f.write("\n")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None
