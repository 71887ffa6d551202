"""The process: frames in from a source, through the frame pipeline, out to the sinks, for hours.
`core` (the Engine: threads, lifecycle, stop signals, faults), `pacing` (a file or a test pattern
read as a camera delivers), `publisher` (the latest output to the sinks, paced or not), `stats`
(the figures, the --stats file, the status line)."""

from .core import Engine, OutOfMemory, stop_signals

__all__ = ["Engine", "OutOfMemory", "stop_signals"]
