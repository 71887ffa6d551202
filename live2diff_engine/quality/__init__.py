"""``eval``: how steady and how faithful a stylised video is, measured on the videos themselves.

Reads videos only (an input and its stylised versions, from ``translate`` or any other tool): warp
error, CLIP temporal consistency, depth MSE and flicker per frame (:mod:`.metrics`, one pass in
:mod:`.evaluate`), X-T / Y-T slices and per-frame plots (:mod:`.pictures`), a table and JSON
(:mod:`.report`). Making videos (the per-frame baseline of ``--compare``) is the pipeline's job.
"""

from .evaluate import BETTER, METRICS, TITLES, Evaluation, VideoResult, evaluate, parse_metrics
from .models import ClipEmbedder, DepthProbe, load_clip, load_depth_probe, locate
from .pictures import plot, side_by_side, slice_pictures, write_pictures
from .report import as_dict, table, write_json

__all__ = [
    "BETTER",
    "METRICS",
    "TITLES",
    "ClipEmbedder",
    "DepthProbe",
    "Evaluation",
    "VideoResult",
    "as_dict",
    "evaluate",
    "load_clip",
    "load_depth_probe",
    "locate",
    "parse_metrics",
    "plot",
    "side_by_side",
    "slice_pictures",
    "table",
    "write_json",
    "write_pictures",
]
