from .bookkeeping import Bookkeeping
from .schedule import StreamSchedule, make_schedule
from .stream import StreamPipeline, warmup_causal_mask

__all__ = ["Bookkeeping", "StreamPipeline", "StreamSchedule", "make_schedule", "warmup_causal_mask"]
