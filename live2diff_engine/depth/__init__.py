"""Depth estimation for Live2Diff's depth conditioning: MiDaS DPT-Hybrid (the trained-with model)
and Depth Anything V2 Small (faster), both behind :class:`DepthEstimator`."""

from .estimators import (
    DEPTH_MODELS,
    DepthAnythingV2,
    DepthEstimator,
    MidasHybrid,
    build_tiny_depth,
    load_depth_estimator,
    tiny_depth_config,
)

__all__ = [
    "DEPTH_MODELS",
    "DepthAnythingV2",
    "DepthEstimator",
    "MidasHybrid",
    "build_tiny_depth",
    "load_depth_estimator",
    "tiny_depth_config",
]
