"""The models and their loaders. Names load on first use, so that `models list` (which needs only
``models.hub``) does not load torch."""

_EXPORTS = {
    "load_streaming_unet": ".loading",
    "read_motion_state_dict": ".loading",
    "MotionConfig": ".motion",
    "SequenceContext": ".motion",
    "StreamContext": ".motion",
    "StreamingUNet": ".unet",
    "build_streaming_unet": ".unet",
}

__all__ = [
    "MotionConfig",
    "SequenceContext",
    "StreamContext",
    "StreamingUNet",
    "build_streaming_unet",
    "load_streaming_unet",
    "read_motion_state_dict",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
