from .loading import load_streaming_unet, read_motion_state_dict
from .motion import MotionConfig, SequenceContext, StreamContext
from .unet import StreamingUNet, build_streaming_unet

__all__ = [
    "MotionConfig",
    "SequenceContext",
    "StreamContext",
    "StreamingUNet",
    "build_streaming_unet",
    "load_streaming_unet",
    "read_motion_state_dict",
]
