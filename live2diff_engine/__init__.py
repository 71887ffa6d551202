"""Live2Diff engine: live video-to-video diffusion with uni-directional temporal attention."""

__version__ = "0.1.0"
