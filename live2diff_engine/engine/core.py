"""The engine: frames in from a source, through the frame pipeline, out to the sinks, for hours.

Three threads:

* **capture** (live sources only): reads the camera as fast as it delivers; the newest frame
  replaces the previous one, so inference always gets the freshest picture and no queue builds
  up when the model is slower than the camera. A failing camera shows a "no signal" card and is
  reopened with backoff.
* **inference** (the caller's thread): takes the newest frame, runs the pipeline, hands outputs on.
  A frame that raises is logged and passed through; the stream goes on.
* **publisher** (paced sinks only): sends the latest output to the virtual camera at its own frame
  rate, repeating the last one when inference is slower, so a video call never sees a stall.

A file or test pattern (not live) stands for a camera when ``pace`` is set (`run`): the capture
thread reads it at its own frame rate, paused or not, and the newest frame wins, so a model slower
than the video drops frames as it would a camera's instead of playing the video in slow motion.
Without ``pace`` every frame is processed, as fast as the pipeline goes (`translate`, benchmarks).

Stop (``stop()``, ``max_frames``) is seen between frames. A stop signal (Ctrl-C, SIGTERM, and
SIGBREAK on Windows: Ctrl-Break, or a launcher's CTRL_BREAK_EVENT) or a ``quit`` through the local
API (``api_quit``, the same stop) is seen at once: the model work of the frame in flight is cut short (on a busy machine it can take
seconds, and its result would be dropped anyway); commands already taken are applied and saved. Threads get one short
shared deadline; the sinks are closed (a file is complete) and then the source.
"""

from __future__ import annotations

import logging
import os
import _thread
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import DeviceLost, UserError, device_failure
from ..io.sinks import Sink, no_signal_card
from ..io.sources import Source, SourceEnded, SourceError
from ..pipeline.frames import FrameError
from .pacing import Pacer
from .publisher import Publisher
from .stats import Stats, _Rate, rss_mb, status_line, write_stats

log = logging.getLogger("live2diff.engine")
LOG_EVERY_S = 10.0  # the status line, when stderr is a log file rather than a terminal
SHUTDOWN_JOIN_S = 0.5  # all threads together, after a stop


class OutOfMemory(UserError):
    pass


class _Abandon(BaseException):
    """Raised by the stop signal's handler inside work that may be dropped when the process ends
    (the model work of the frame in flight): on a busy machine it can take seconds, and its
    result would be thrown away anyway. Not an Exception, so no ``except Exception`` on the way
    swallows it."""


def stop_signals() -> list[int]:
    """The signals that stop the engine as Ctrl-C does: SIGINT, SIGTERM and, on Windows (the only
    platform whose signal module has it), SIGBREAK: Ctrl-Break, and the CTRL_BREAK_EVENT a
    launcher sends to the engine's process group."""
    sigs = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGBREAK"):
        sigs.append(signal.SIGBREAK)
    return sigs


class Engine:
    """Runs ``pipeline`` (anything with ``push(frame) -> [(index, image)]``, ``frame_index``,
    ``flush()`` and ``abandon_in_flight()``, e.g. a FramePipeline) from ``source`` to ``sinks``."""

    def __init__(
        self,
        pipeline,
        source: Source,
        sinks: list[Sink],
        *,
        output_size: tuple[int, int] | None = None,
        max_frames: int | None = None,
        stats_path: str | os.PathLike | None = None,
        stats_every_s: float = 2.0,
        status: bool = True,
        retry_max_s: float = 5.0,
        fps: float | None = None,
        on_output=None,
        on_latency=None,
        controller=None,
        pace: bool = False,
    ):
        self.pipeline = pipeline
        self.source = source
        self.sinks = sinks
        self.output_size = output_size
        self.max_frames = max_frames
        self.stats_path = Path(stats_path) if stats_path else None
        self.stats_every_s = stats_every_s
        self.status = status
        self.retry_max_s = retry_max_s
        self.fps = fps or source.fps or 30.0
        self.on_output = on_output
        # Called (this thread) with the capture-to-output seconds of each frame out after the
        # warmup: the same frames the status's p50/p95 are taken over (serve's latency histograms).
        self.on_latency = on_latency
        self.controller = controller
        # A file or a test pattern could be read as fast as the model goes (thousands of frames a
        # second while paused): with ``pace`` it is read at its own frame rate on the capture
        # thread, as a camera would deliver it (the newest frame wins). `run` paces; `translate`
        # and the benchmarks do not.
        self.pace = pace and not source.live
        self._captured = source.live or self.pace  # read on the capture thread
        self._pacer = Pacer()
        if controller is not None:
            controller.engine = self
            self.stats_every_s = min(stats_every_s, 1.0)  # live status goes out once a second
        self.paused = False
        self._pause_changed = False
        self._may_abandon = False  # the inference thread is in work a stop signal may cut short
        # While run() holds the process's stop signals (main thread): the stop they make, callable
        # from any thread (the local API's quit, through the controller); None otherwise.
        self.api_quit = None
        self._signals_lock = threading.Lock()
        self._signals_held = False
        self.stats = Stats()
        self._stop = threading.Event()
        self._new_frame = threading.Condition()
        self._latest: tuple[int, float, np.ndarray, int | None] | None = None  # (seq, capture time, frame, stamp)
        # A source that stamps its frames (the OBS filter: its own clock) gets each output back with
        # the stamp of the frame it was made from: the stamp of the frame taken, then by index.
        self._taken_stamp: int | None = None
        self._stamps: dict[int, int] = {}
        self._seq_taken = -1
        self._no_signal = False
        self._capture_times: dict[int, float] = {}
        self._latencies: deque[float] = deque(maxlen=600)
        self._rate_in, self._rate_out = _Rate(), _Rate()
        self._started = time.monotonic()
        self._threads: list[threading.Thread] = []
        self.publisher = Publisher(sinks, output_size or (640, 480), self.stats, self._stop)
        self._last_stats = 0.0
        self._last_print = 0.0
        self._status_shown = False
        # A change of steps or size compiles the stream step once more (seconds to a minute on a
        # GPU): the status says "compiling" meanwhile, so a frozen picture is explained.
        accelerator = getattr(getattr(pipeline, "stream", None), "accelerator", None)
        if accelerator is not None:
            accelerator.say = self._compiler_says

    def _compiler_says(self, text: str) -> None:
        if text.startswith("compiling"):
            self.stats.state = "compiling"
            if self.controller is not None:
                self.controller.changed()
        print(text, file=sys.stderr, flush=True)

    # -- control -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        with self._new_frame:
            self._new_frame.notify_all()

    def pause(self) -> None:
        """Stop diffusing: the camera goes out as it is until ``resume`` (inference thread only)."""
        if not self.paused:
            self.paused = True
            self._emit(self.pipeline.flush())

    def resume(self) -> None:
        """Diffuse again, warming up afresh on new frames (inference thread only)."""
        if self.paused:
            self.paused = False
            restart = getattr(self.pipeline, "restart", None)
            if restart is not None:
                self._emit(restart())

    def _between_frames(self) -> None:
        if self.controller is not None:
            # Not cut short by a stop signal: a command applied here is saved here too, and a
            # setting the user just changed must survive the restart (style files load beside
            # the stream, so this is quick).
            try:
                self.controller.apply_pending()
            except Exception as exc:  # a control fault must never end the stream
                log.warning("applying commands failed: %s", exc)

    def _abandonable(self, fn, *args):
        """``fn(*args)``, cut short (``_Abandon``) if a stop signal comes meanwhile."""
        self._may_abandon = True
        try:
            if self.stopping:
                raise _Abandon
            return fn(*args)
        finally:
            self._may_abandon = False

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- source ------------------------------------------------------------------------------

    def _open_source_with_retry(self) -> bool:
        delay = 0.25
        while not self.stopping:
            try:
                self.source.open()
                if self._no_signal:
                    log.warning("%s is back", self.source.name)
                self._no_signal = False
                self.stats.state = "streaming" if self.stats.frames_out else self.stats.state
                return True
            except SourceError as exc:
                self._signal_lost(str(exc))
                self._sleep(delay)
                delay = min(self.retry_max_s, delay * 2)
        return False

    def _signal_lost(self, why: str) -> None:
        if not self._no_signal:
            log.warning("%s: %s; showing 'no signal' and retrying", self.source.name, why)
            self.stats.source_failures += 1
            self.stats.last_error = why
        self._no_signal = True
        if self.stats.state != "no signal" and self.controller is not None:
            self.stats.state = "no signal"
            self.controller.changed()
        self.stats.state = "no signal"
        card = no_signal_card(*self._size_or_default(), f"{self.source.name}: no signal")
        # Paced sinks only: this may run on the capture thread, and the others are fed by the
        # inference thread alone (a file records outputs, never the card).
        self._deliver(card, paced_only=True, count=False)

    def _size_or_default(self) -> tuple[int, int]:
        if self.output_size:
            return self.output_size
        latest = self.publisher.latest()
        if latest is not None:
            return latest.shape[1], latest.shape[0]
        return 640, 480

    def _capture_loop(self) -> None:
        seq = 0
        # A camera that did not open at start (held by another app, or waiting for the user's
        # permission): 'no signal' and retries from the first frame on, as for a lost one.
        if not getattr(self.source, "is_open", True) and not self._open_source_with_retry():
            return
        while not self.stopping:
            if self.pace and not self._wait_for_due():
                break
            try:
                frame = self.source.read()
            except SourceEnded:
                break
            except SourceError as exc:
                self.source.close()
                self._signal_lost(str(exc))
                if not self._open_source_with_retry():
                    break
                continue
            stamp = getattr(self.source, "last_stamp", None)  # read right after its frame, on this thread
            with self._new_frame:
                if self._latest is not None and self._latest[0] > self._seq_taken:
                    self.stats.dropped += 1  # never processed: a newer frame replaced it
                self._latest = (seq, time.monotonic(), frame, stamp)
                seq += 1
                self._new_frame.notify_all()

    def _next_frame(self) -> tuple[float, np.ndarray] | None:
        """The next frame to process, or None when the stream should end."""
        if self._captured:
            while not self.stopping:
                with self._new_frame:
                    if self._latest is not None and self._latest[0] > self._seq_taken:
                        seq, t, frame, self._taken_stamp = self._latest
                        self._seq_taken = seq
                        return t, frame
                    if not any(t.is_alive() for t in self._threads if t.name == "capture"):
                        return None
                    self._new_frame.wait(0.1)
                self._between_frames()  # a lost camera must not hold back a style change
                self._update_stats()  # and the rates fall to 0 while no frame comes
            return None
        while not self.stopping:
            try:
                frame = self.source.read()
                self._taken_stamp = getattr(self.source, "last_stamp", None)
                if self._no_signal:
                    self._no_signal = False
                    log.warning("%s is back", self.source.name)
                return time.monotonic(), frame
            except SourceEnded:
                return None
            except SourceError as exc:
                self.source.close()
                self._signal_lost(str(exc))
                if not self._open_source_with_retry():
                    return None
        return None

    def _wait_for_due(self) -> bool:
        return self._pacer.wait(1.0 / (self.source.fps or self.fps or 30.0), self._stop)

    # -- sinks -------------------------------------------------------------------------------

    def _deliver(self, image: np.ndarray, paced_only: bool = False, count: bool = True, stamp: int | None = None) -> None:
        self.publisher.deliver(image, paced_only, stamp=stamp)
        if count and self.on_output is not None:
            self.on_output(image)

    # -- stats -------------------------------------------------------------------------------

    def _note_latency(self, seconds: float) -> None:
        self._latencies.append(seconds)
        # Warmup frames go straight out: their figures are dropped from the p50/p95 when the warmup
        # ends (_run), and never reach on_latency.
        if self.on_latency is not None and self.stats.state != "warming up":
            self.on_latency(seconds)

    def _update_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < self.stats_every_s:
            return
        self._last_stats = now
        s = self.stats
        s.uptime_s = round(now - self._started, 2)
        s.fps_in = round(self._rate_in.rate(now), 2)
        s.fps_out = round(self._rate_out.rate(now), 2)
        if self._latencies:
            lat = sorted(self._latencies)
            s.latency_ms_p50 = round(lat[len(lat) // 2] * 1000, 1)
            s.latency_ms_p95 = round(lat[min(len(lat) - 1, int(len(lat) * 0.95))] * 1000, 1)
        s.rss_mb = rss_mb()
        try:
            import torch

            device = getattr(getattr(self.pipeline, "comps", None), "device", None)
            if device is not None and torch.device(device).type == "cuda":  # that card's, not the first one's
                s.gpu_memory_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        except Exception:
            pass
        if self.stats_path is not None:
            write_stats(self.stats_path, s)
        if self.status and (force or sys.stderr.isatty() or now - self._last_print >= LOG_EVERY_S):
            self._last_print = now
            self._show_status()

    def _show_status(self) -> None:
        line = status_line(self.stats)
        if sys.stderr.isatty():
            print("\r" + line.ljust(110), end="", file=sys.stderr, flush=True)
            self._status_shown = True
        else:
            print(line, file=sys.stderr, flush=True)

    # -- main loop ---------------------------------------------------------------------------

    def _process(self, t_capture: float, frame: np.ndarray) -> None:
        if self.paused:
            self._note_latency(time.monotonic() - t_capture)
            try:
                self._deliver(self._passthrough(frame), stamp=self._taken_stamp)
            except Exception as exc:
                self.stats.errors += 1
                self.stats.last_error = f"bad frame: {exc}"
                return
            self.stats.frames_out += 1
            self._rate_out.tick(time.monotonic())
            return
        index = self.pipeline.frame_index
        self._capture_times[index] = t_capture
        if self._taken_stamp is not None:
            self._stamps[index] = self._taken_stamp
            if len(self._stamps) > 256:  # outputs that never came (a pipeline reset): forget the oldest
                for old in sorted(self._stamps)[:-128]:
                    del self._stamps[old]
        try:
            ready = self._abandonable(self.pipeline.push, frame)
        except _Abandon:  # stopping: the frame in flight is dropped, not waited for
            self._capture_times.pop(index, None)
            self._stamps.pop(index, None)
            return
        except FrameError as exc:  # nothing was touched: skip it, the sinks keep the last picture
            self._capture_times.pop(index, None)
            self._stamps.pop(index, None)
            self.stats.errors += 1
            self.stats.last_error = f"bad frame: {exc}"
            log.warning("skipping a bad frame: %s", exc)
            return
        except Exception as exc:
            failure = device_failure(exc)
            if failure == "oom":
                raise OutOfMemory(
                    "the GPU ran out of memory; lower --width/--height (e.g. 512x512), use fewer --steps, "
                    "--vae taesd, or --dtype float16"
                ) from None
            if failure == "lost":  # every later call on this CUDA context fails too: passing frames through forever helps no one
                first = (str(exc).strip().splitlines() or [""])[0]
                raise DeviceLost(
                    f"the GPU failed and cannot go on in this process ({type(exc).__name__}: {first}); restart the "
                    "engine, and if it happens again run it with --accelerate off and report it"
                ) from None
            self.stats.errors += 1
            self.stats.last_error = f"frame {index}: {type(exc).__name__}: {exc}"
            log.warning("frame %d failed (%s: %s); passing it through", index, type(exc).__name__, exc)
            # The failed frame itself is shown (passed through below): not dropped.
            lost = [i for i in self.pipeline.abandon_in_flight() if i != index]
            for i in lost:
                self._capture_times.pop(i, None)
                self._stamps.pop(i, None)
            self.stats.dropped += len(lost)
            if self.pipeline.frame_index == index:  # it failed before taking its number
                self.pipeline.frame_index += 1
            ready = [(index, self._passthrough(frame))]
        self._emit(ready)

    def _passthrough(self, frame: np.ndarray) -> np.ndarray:
        framed = getattr(self.pipeline, "framed", None)
        if framed is not None:  # the pipeline's framing (crop or letterbox), as its outputs have it
            frame = framed(frame)
        size = self.output_size or getattr(self.pipeline, "output_size", None) or (frame.shape[1], frame.shape[0])
        if (frame.shape[1], frame.shape[0]) == tuple(size):
            return frame
        import cv2

        return cv2.resize(frame, tuple(size), interpolation=cv2.INTER_AREA)

    def _emit(self, ready) -> None:
        now = time.monotonic()
        for index, image in ready:
            t0 = self._capture_times.pop(index, None)
            if t0 is not None:
                self._note_latency(now - t0)
            self._deliver(image, stamp=self._stamps.pop(index, None))
            self.stats.frames_out += 1
            self._rate_out.tick(now)

    def run(self, install_signals: bool = True) -> int:
        """Stream until the source ends, ``max_frames`` are processed, or a stop is asked for."""
        handlers = self._install_signals() if install_signals else {}
        try:
            return self._run()
        finally:
            with self._signals_lock:  # (signal.signal runs a pending handler first: ours, still)
                self.api_quit = None
                self._signals_held = False
                for sig, old in handlers.items():
                    signal.signal(sig, old)
            self._shutdown()

    def _run(self) -> int:
        if self.status:
            print(f"streaming from {self.source.name} to {', '.join(s.name for s in self.sinks) or 'nowhere'}", file=sys.stderr, flush=True)
        self.stats.state = "warming up"
        if self._captured:
            self._threads.append(threading.Thread(target=self._capture_loop, name="capture", daemon=True))
        for sink in self.sinks:
            if sink.paced:
                self._threads.append(threading.Thread(target=self.publisher.loop, args=(sink,), name="publisher", daemon=True))
        for t in self._threads:
            t.start()
        while not self.stopping:
            if self.max_frames is not None and self.stats.frames_in >= self.max_frames:
                break
            item = self._next_frame()
            if item is None:
                break
            t_capture, frame = item
            self._between_frames()
            self.stats.frames_in += 1
            self._rate_in.tick(time.monotonic())
            self._process(t_capture, frame)
            before = self.stats.state
            if self.stats.frames_out and self.stats.state not in ("no signal",):
                if self.paused:
                    self.stats.state = "paused"
                else:
                    self.stats.state = "warming up" if getattr(self.pipeline, "warming_up", False) else "streaming"
            if self.stats.state != before:
                if before == "warming up":  # warmup frames go straight out: not the stream's latency
                    self._latencies.clear()
                    self.stats.latency_ms_p50 = self.stats.latency_ms_p95 = None
                if self.controller is not None:
                    self.controller.changed()
            self._update_stats()
        # A finished source or max_frames: every frame in flight comes out. After a stop signal
        # too for a pipeline that says so (connect's: its frames in flight are computed elsewhere
        # and only waited for, within a bound of its own).
        if not self.stopping or getattr(self.pipeline, "drains_on_stop", False):
            self._emit(self.pipeline.flush())
        self.stats.state = "stopped"
        return 0

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def handler(signum, frame):
            self.stop()
            if self._may_abandon:  # the stop is seen at once, not after the frame in flight
                raise _Abandon

        for sig in stop_signals():
            old[sig] = signal.signal(sig, handler)
        with self._signals_lock:
            self._signals_held = True
            self.api_quit = self._quit_from_api
        return old

    def _quit_from_api(self) -> None:
        """A quit through the local API (any thread): the stop a stop signal makes. The frame in
        flight is cut short as on Ctrl-C: the signal's own handler runs on the main thread."""
        self.stop()
        with self._signals_lock:
            if self._signals_held and self._may_abandon:
                _thread.interrupt_main(signal.SIGINT)

    def _shutdown(self) -> None:
        """Within a second of a stop (the frame in flight excepted), however busy the machine: the
        threads get one short shared deadline (a publisher ends within one frame period; a camera
        read that hangs is left to the process's end), then the sinks are closed, so a file is
        complete, then the source."""
        self._stop.set()
        with self._new_frame:
            self._new_frame.notify_all()
        deadline = time.monotonic() + SHUTDOWN_JOIN_S
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing %s failed: %s", sink.name, exc)
        try:
            self.source.close()
        except Exception:
            pass
        self._update_stats(force=True)
        if self.controller is not None:
            self.controller.changed()  # "stopped" reaches the dock before the API closes
        if self._status_shown:
            print(file=sys.stderr)
