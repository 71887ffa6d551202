"""A live engine with the tiny model, its local API and (optionally) its OBS bridge, in-process,
for the control tests (API, ctl, OBS bridge, dock, real OBS)."""

from __future__ import annotations

import threading
import time

import numpy as np

from live2diff_engine.control.api import ApiServer
from live2diff_engine.control.controller import Controller
from live2diff_engine.engine import Engine
from live2diff_engine.io.sources import Source, SourceEnded, SyntheticSource
from live2diff_engine.pipeline.frames import FramePipeline
from live2diff_engine.styles import StyleManager, load_styles

SIZE = (64, 64)


class PacedSource(Source):
    """The synthetic pattern at a camera's pace (a live source: the engine takes the newest)."""

    live = True

    def __init__(self, fps: float = 20.0, size=SIZE, seed: int = 0):
        self.inner = SyntheticSource(size, fps, seed)
        self.fps = fps
        self.name = "paced synthetic"
        self._next = None
        self.count = 0  # frames read so far: a paused output is one of the first `count` frames of the pattern

    def frame_size(self):
        return self.inner.frame_size()

    def read(self) -> np.ndarray:
        now = time.monotonic()
        if self._next is None:
            self._next = now
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(self._next + 1.0 / self.fps, time.monotonic() - 1.0)
        self.count += 1
        return self.inner.read()


class GateSource(Source):
    """Frames 0..n-1 of the synthetic pattern, read in order (not live); reading frame ``gate_at``
    waits until ``gate`` is set, so a test can queue a command that frame ``gate_at`` is the
    first to see."""

    def __init__(self, n: int, gate_at: int | None = None, size=SIZE, seed: int = 0):
        self.inner = SyntheticSource(size, 30.0, seed)
        self.n, self.gate_at = n, gate_at
        self.gate = threading.Event()
        self.reached = threading.Event()
        self.i = 0
        self.name = "gated synthetic"

    def frame_size(self):
        return self.inner.frame_size()

    def read(self) -> np.ndarray:
        if self.i >= self.n:
            raise SourceEnded
        if self.i == self.gate_at:
            self.reached.set()
            if not self.gate.wait(60):
                raise SourceEnded
        self.i += 1
        return self.inner.read()


class LiveEngine:
    """Tiny-model engine + local API (+ OBS bridge when ``obs`` = dict(host, port, password, ...))
    running on a thread. ``outputs``: every output frame, in order."""

    def __init__(self, comps, source: Source | None = None, *, obs: dict | None = None, prompt: str = "a cat",
                 seed: int = 0, api_host: str = "127.0.0.1", api_token: str | None = None, extra_sinks=(),
                 api_port: int = 0):
        self.frames = FramePipeline(comps, width=SIZE[0], height=SIZE[1], prompt=prompt, seed=seed)
        styles = load_styles()
        self.manager = StyleManager(comps, styles)
        self.manager.current = styles["default"]
        self.api = ApiServer(api_host, api_port, api_token).start()
        self.controller = Controller(self.frames, self.manager, label="tiny")
        self.controller.api_token = api_token
        self.api.set_controller(self.controller)
        self.bridge = None
        if obs is not None:
            from live2diff_engine.control.obs import ObsBridge

            self.bridge = ObsBridge(self.controller, output_url=self.api.url, **obs)
        self.source = source or PacedSource()
        self.outputs: list[np.ndarray] = []
        self.output_times: list[float] = []
        self.refused_at_output: list[int] = []  # the controller's refused count as each frame came out
        self.engine = Engine(self.frames, self.source, [self.api.stream, *extra_sinks], output_size=SIZE, status=False,
                             controller=self.controller, on_output=self._record)
        self.thread = threading.Thread(target=self.engine.run, kwargs={"install_signals": False}, daemon=True)
        self.error: BaseException | None = None

    def _record(self, img: np.ndarray) -> None:
        self.outputs.append(img)
        self.output_times.append(time.monotonic())
        self.refused_at_output.append(self.controller.refused)

    def start(self) -> "LiveEngine":
        if self.bridge is not None:
            self.bridge.start()
        self.thread.start()
        return self

    def wait_outputs(self, n: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while len(self.outputs) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"only {len(self.outputs)} of {n} outputs after {timeout} s")
            time.sleep(0.02)

    def rate(self, t0: float, t1: float) -> float:
        """Output frames per second between two monotonic times."""
        return sum(t0 <= t < t1 for t in list(self.output_times)) / max(1e-6, t1 - t0)

    def max_gap(self, t0: float, t1: float) -> float:
        """The longest time without an output frame between two monotonic times."""
        times = [t0] + [t for t in list(self.output_times) if t0 <= t < t1] + [t1]
        return max(b - a for a, b in zip(times, times[1:]))

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(10)
        if self.bridge is not None:
            self.bridge.stop()
        self.api.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# Waiting is not judging: a busy machine may take long; only a wait that never ends is a failure.
WAIT_FLOOR_S = 60.0


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + max(timeout, WAIT_FLOOR_S)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def reference_outputs(comps, n: int, prompt: str = "a cat", seed: int = 0) -> list[np.ndarray]:
    """Outputs of the same gated frames with no command at all."""
    with LiveEngine(comps, GateSource(n), prompt=prompt, seed=seed) as live:
        live.thread.join(120)
    return live.outputs
