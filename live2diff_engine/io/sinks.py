"""Frame sinks: virtual camera (pyvirtualcam), preview window, video file, null.

A *paced* sink (the virtual camera) must see frames at a steady rate whatever the model does:
the engine's publisher thread feeds it, repeating the last frame when inference is slower, so a
video-call app never sees the camera stall. The others take every output frame once.
"""

from __future__ import annotations

import os
import platform
import sys

import cv2
import numpy as np

from ..errors import ConfigError, UserError


class SinkUnavailable(UserError):
    """A sink cannot be opened on this machine (no virtual camera driver, no display)."""


class Sink:
    paced = False
    name = "sink"

    def open(self, width: int, height: int, fps: float) -> None:
        pass

    def send(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def virtual_camera_help() -> str:
    system = platform.system()
    if system == "Linux":
        return (
            "no virtual camera device: install v4l2loopback and load it with "
            "`sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=\"Live2Diff\"`"
        )
    if system == "Windows":
        return "no virtual camera: install OBS Studio (its Virtual Camera) or Unity Capture, then run again"
    if system == "Darwin":
        return "no virtual camera: install OBS Studio and start its Virtual Camera once, then run again"
    return "no virtual camera backend is available on this system"


class VirtualCameraSink(Sink):
    paced = True

    def __init__(self, backend: str | None = None, device: str | None = None, fps: float | None = None, mirror: bool = False):
        self.backend, self.device, self.fps, self.mirror = backend or None, device, fps, mirror
        self.name = f"virtual camera{f' ({backend})' if backend else ''}"
        self.cam = None

    def open(self, width: int, height: int, fps: float) -> None:
        import pyvirtualcam

        try:
            self.cam = pyvirtualcam.Camera(
                width, height, self.fps or fps, fmt=pyvirtualcam.PixelFormat.RGB, backend=self.backend, device=self.device
            )
        except KeyError:
            raise SinkUnavailable(f"virtual camera backend {self.backend!r} is not available here; {virtual_camera_help()}") from None
        except (RuntimeError, OSError) as exc:
            detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            if self.device and "device" in detail.lower():
                raise SinkUnavailable(f"virtual camera device {self.device} cannot be used ({detail}); check --vcam-device") from None
            # pyvirtualcam's own reason (a driver missing, a camera another app has, a version too
            # old for this macOS) beside what to do
            raise SinkUnavailable(virtual_camera_help() + (f" (the virtual camera said: {detail})" if detail else "")) from None
        self.name = f"virtual camera {self.cam.device}"

    @property
    def rate(self) -> float:
        return self.cam.fps if self.cam is not None else (self.fps or 30.0)

    def send(self, frame: np.ndarray) -> None:
        if self.mirror:
            frame = frame[:, ::-1]
        self.cam.send(np.ascontiguousarray(frame))
        self._sent = True

    def wait(self) -> None:
        if getattr(self, "_sent", False):
            self.cam.sleep_until_next_frame()
        else:  # pyvirtualcam paces from the last frame sent; before the first, wait one period
            import time

            time.sleep(1.0 / self.rate)

    def close(self) -> None:
        if self.cam is not None:
            self.cam.close()
            self.cam = None


class FileSink(Sink):
    def __init__(self, path: str):
        self.path = path
        self.name = f"file {path}"
        self.writer = None

    def open(self, width: int, height: int, fps: float) -> None:
        from .video import VideoWriter

        self.writer = VideoWriter(self.path, fps, (width, height))

    def send(self, frame: np.ndarray) -> None:
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WindowSink(Sink):
    name = "window"

    def open(self, width: int, height: int, fps: float) -> None:
        if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            raise SinkUnavailable("the preview window needs a display (DISPLAY is not set); use --sink file:out.mp4 instead")
        try:
            cv2.namedWindow("Live2Diff", cv2.WINDOW_NORMAL)
        except cv2.error:
            raise SinkUnavailable(
                "this OpenCV build has no window support (opencv-python-headless?); install opencv-python for --sink window"
            ) from None

    def send(self, frame: np.ndarray) -> None:
        cv2.imshow("Live2Diff", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        cv2.waitKey(1)

    def close(self) -> None:
        try:
            cv2.destroyWindow("Live2Diff")
        except cv2.error:
            pass


class NullSink(Sink):
    name = "null"

    def send(self, frame: np.ndarray) -> None:
        pass


def parse_sink(spec: str, *, vcam_device=None, vcam_fps=None, mirror=False) -> Sink:
    kind, _, rest = spec.partition(":")
    if kind == "virtualcam":
        return VirtualCameraSink(rest or None, vcam_device, vcam_fps, mirror)
    if kind == "window":
        return WindowSink()
    if kind == "file":
        if not rest:
            raise ConfigError("--sink file:PATH needs a path, e.g. file:out.mp4")
        if not rest.lower().endswith((".mp4", ".m4v", ".mov", ".avi", ".mkv")):
            raise ConfigError(f"--sink file:{rest}: the file must end in .mp4, .avi or .mkv")
        return FileSink(rest)
    if kind == "null":
        return NullSink()
    raise ConfigError(f"unknown sink {spec!r}; use virtualcam[:BACKEND], window, file:PATH or null")


def no_signal_card(width: int, height: int, text: str = "no signal", subtitle: str = "reconnecting ...") -> np.ndarray:
    """A dark card with a message, shown while the camera is away or the models load (never a
    frozen or dead device)."""
    img = np.full((height, width, 3), 24, dtype=np.uint8)
    scale = max(0.5, min(width, height) / 360)
    for i, line in enumerate([text, subtitle]):
        size, _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
        x, y = (width - size[0]) // 2, height // 2 + int(i * 40 * scale)
        cv2.putText(img, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (230, 230, 230), 2, cv2.LINE_AA)
    return img


class CardPublisher:
    """Keeps paced sinks fed with a card (e.g. while the models load) until stopped."""

    def __init__(self, sinks: list[Sink], size: tuple[int, int], text: str, subtitle: str):
        import threading

        self.sinks = [s for s in sinks if s.paced]
        self.card = no_signal_card(size[0], size[1], text, subtitle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="card", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for sink in self.sinks:
                try:
                    sink.send(self.card)
                except Exception:
                    pass
            self.sinks[0].wait()

    def __enter__(self):
        if self.sinks:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
