"""The per-frame numbers of ``eval``, each a plain function of frames.

Frames are RGB ``uint8`` arrays ``[H, W, 3]``; inside the functions pixel values are on the
[0, 1] scale, so a warp error is a mean squared difference of [0, 1] values and a flicker a mean
absolute one (0.01 is about 2.5 grey levels of 255).

Motion comes from the *input* video only: the optical flow between consecutive input frames
(OpenCV's DIS) tells where each pixel of an output frame should have come from in the output
frame before it, and which pixels hold still.

* :func:`warp_error`: the previous output warped by the input's flow, against the current output,
  over the pixels the flow is trusted at (forward-backward consistent and not leaving the frame).
* :func:`flicker`: the mean absolute change of the outputs over the pixels where the input holds
  still (no flow, no change).
* :func:`cosine`: CLIP temporal consistency of one pair of frame embeddings.
* :func:`normalise_depth` and :func:`depth_mse`: depth maps normalised per frame the way the
  pipeline normalises the depth it conditions on (min to -1, max to 1), and their mean squared
  difference.
"""

from __future__ import annotations

import cv2
import numpy as np

FLOW_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM
# Forward-backward check (Sundaram et al. 2010, as used for video style transfer by Ruder et al.):
# |b + f(p + b)|^2 <= ALPHA (|b|^2 + |f(p + b)|^2) + BETA, in pixels^2.
CONSISTENCY_ALPHA = 0.01
CONSISTENCY_BETA = 0.5
# "The input does not move" at a pixel: its flow is under STATIC_FLOW_PX pixels and its grey value
# changed by less than STATIC_CHANGE (on the [0, 1] scale: 4 grey levels, above video-codec noise).
STATIC_FLOW_PX = 0.25
STATIC_CHANGE = 4.0 / 255.0


def to_unit(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB to float32 in [0, 1]."""
    return frame.astype(np.float32) * np.float32(1.0 / 255.0)


def gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


class FlowEstimator:
    """DIS optical flow between grey frames. ``flow(a, b)`` ``[H, W, 2]`` (x, y) maps each pixel
    ``p`` of ``a`` to where it is in ``b``: ``a(p) ~ b(p + flow(p))``."""

    def __init__(self, preset: int = FLOW_PRESET):
        self._dis = cv2.DISOpticalFlow_create(preset)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._dis.calc(a, b, None)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return gx, gy


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image`` sampled at ``p + flow(p)`` (bilinear): with the backward flow of frame t (t to
    t-1), frame t-1 brought into frame t's place."""
    h, w = flow.shape[:2]
    gx, gy = _grid(h, w)
    return cv2.remap(image, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def trusted_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Pixels of frame t whose backward flow (t to t-1) is trusted: it stays inside the frame, and
    the forward flow (t-1 to t) where it lands brings it back (forward-backward consistent).
    Occluded and disoccluded pixels fail the check."""
    h, w = backward.shape[:2]
    gx, gy = _grid(h, w)
    mx, my = gx + backward[..., 0], gy + backward[..., 1]
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    fwd = cv2.remap(forward, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    round_trip = ((backward + fwd) ** 2).sum(-1)
    bound = CONSISTENCY_ALPHA * ((backward**2).sum(-1) + (fwd**2).sum(-1)) + CONSISTENCY_BETA
    return inside & (round_trip <= bound)


def static_mask(prev_input: np.ndarray, cur_input: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels where the input does not move between two frames: (almost) no flow and (almost) no
    change of grey value."""
    still = np.hypot(backward[..., 0], backward[..., 1]) < STATIC_FLOW_PX
    change = np.abs(gray(cur_input).astype(np.float32) - gray(prev_input).astype(np.float32)) * np.float32(1.0 / 255.0)
    return still & (change < STATIC_CHANGE)


def warp_error(prev_output: np.ndarray, cur_output: np.ndarray, backward: np.ndarray, mask: np.ndarray) -> float:
    """Mean over the masked pixels (and the 3 channels) of (current - warped previous)^2, [0, 1]
    scale. NaN when no pixel is trusted."""
    if not mask.any():
        return float("nan")
    warped = warp(to_unit(prev_output), backward)
    sq = ((to_unit(cur_output) - warped) ** 2).mean(-1, dtype=np.float64)
    return float(sq[mask].mean())


def flicker(prev_output: np.ndarray, cur_output: np.ndarray, static: np.ndarray) -> float:
    """Mean absolute change of the output (3 channels, [0, 1] scale) where the input holds still.
    NaN when nothing holds still."""
    if not static.any():
        return float("nan")
    diff = np.abs(to_unit(cur_output) - to_unit(prev_output)).mean(-1, dtype=np.float64)
    return float(diff[static].mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embedding vectors."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def normalise_depth(raw: np.ndarray) -> np.ndarray:
    """One frame's raw disparity to [-1, 1]: its minimum to -1, its maximum to 1 (the pipeline's
    normalisation of the depth it conditions on, for a single frame)."""
    raw = np.asarray(raw, dtype=np.float32)
    lo, hi = raw.min(), raw.max()
    return (raw - lo) / max(float(hi - lo), 1e-6) * 2.0 - 1.0


def depth_mse(output_depth: np.ndarray, input_depth: np.ndarray) -> float:
    """Mean squared difference of two normalised depth maps (each in [-1, 1])."""
    return float(((np.asarray(output_depth, np.float64) - np.asarray(input_depth, np.float64)) ** 2).mean())
