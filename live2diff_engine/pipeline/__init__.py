"""The stream: schedule, bookkeeping, StreamPipeline, FramePipeline. Names load on first use, so
that importing one light submodule (the schedule's checks, for `styles list`) does not load torch."""

_EXPORTS = {
    "Bookkeeping": ".bookkeeping",
    "StreamSchedule": ".schedule",
    "make_schedule": ".schedule",
    "StreamPipeline": ".stream",
    "warmup_causal_mask": ".stream",
}

__all__ = ["Bookkeeping", "StreamPipeline", "StreamSchedule", "make_schedule", "warmup_causal_mask"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
