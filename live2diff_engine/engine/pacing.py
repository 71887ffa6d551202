"""Source pacing: a file or a test pattern stands for a camera (`run`) when it is read at its own
frame rate, paused or not, on the capture thread, the newest frame winning; a model slower than
the video then drops frames as it would a camera's instead of playing the video in slow motion."""

from __future__ import annotations

import threading
import time


class Pacer:
    def __init__(self):
        self._due: float | None = None

    def wait(self, period: float, stop: threading.Event) -> bool:
        """Holds a paced source to its frame rate; False when a stop came meanwhile. A late frame
        moves the schedule on rather than making up for it with a burst."""
        if self._due is not None:
            wait = self._due - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return False
        start = time.monotonic()
        self._due = start + period if self._due is None else max(self._due + period, start)
        return True
