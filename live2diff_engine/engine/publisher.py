"""The publisher: the latest output, handed to the sinks. A sink that is not paced (a file, the
local MJPEG stream) gets every output as it comes; a paced one (the virtual camera) is sent the
latest output at its own frame rate on a thread of its own, the last one repeated when inference
is slower, so a video call never sees a stall."""

from __future__ import annotations

import logging
import threading

import numpy as np

from .stats import Stats

log = logging.getLogger("live2diff.engine")


class Publisher:
    def __init__(self, sinks: list, sink_size: tuple[int, int], stats: Stats, stop: threading.Event):
        self.sinks = sinks
        self.sink_size = sink_size
        self.stats = stats
        self._stop = stop
        self._lock = threading.Lock()
        self._out_frame: np.ndarray | None = None

    def latest(self) -> np.ndarray | None:
        return self._out_frame

    def deliver(self, image: np.ndarray, paced_only: bool = False, stamp: int | None = None) -> None:
        """``image`` is the latest output. With ``paced_only`` (a "no signal" card) the sinks fed
        frame by frame get it only where they take cards (a file records outputs, never the card).
        ``stamp``: the source's stamp of the frame it was made from, for a sink that keeps them
        (``send_stamped``: the OBS filter's)."""
        with self._lock:
            self._out_frame = image
        for sink in self.sinks:
            if not sink.paced and (not paced_only or getattr(sink, "takes_cards", False)):
                if stamp is not None and hasattr(sink, "send_stamped"):
                    sink.send_stamped(image, stamp)
                else:
                    sink.send(image)

    def loop(self, sink) -> None:
        """A paced sink's thread, until the stop."""
        while not self._stop.is_set():
            with self._lock:
                frame = self._out_frame
            if frame is not None:
                if (frame.shape[1], frame.shape[0]) != self.sink_size:
                    import cv2

                    frame = cv2.resize(frame, self.sink_size, interpolation=cv2.INTER_AREA)
                try:
                    sink.send(frame)
                    self.stats.frames_published += 1
                except Exception as exc:  # a driver hiccup must not end the stream
                    self.stats.errors += 1
                    self.stats.last_error = f"{sink.name}: {exc}"
                    log.warning("sending to %s failed: %s", sink.name, exc)
            sink.wait()
