"""Frame sources: camera, video file, image folder, synthetic test pattern. Frames are RGB uint8.

A *live* source (a camera) produces frames at its own pace whether or not anyone reads them; the
engine reads it from a capture thread where the latest frame wins. The others produce a frame
when asked, so every frame is processed, in order.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError, UserError


class SourceError(RuntimeError):
    """The source failed (camera unplugged, read error). The engine retries."""


class SourceEnded(Exception):
    """A finite source has no more frames."""


class Source:
    live = False
    fps = 30.0
    name = "source"

    def open(self) -> None:  # may raise SourceError (retried) or UserError (fatal at start)
        pass

    def read(self) -> np.ndarray:  # raises SourceEnded or SourceError
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def is_open(self) -> bool:
        """Whether reads can succeed now (a camera that could not be opened yet says no)."""
        return True

    def certainly_missing(self) -> bool:
        """Whether a failed open means the source cannot exist (not merely busy or not allowed yet)."""
        return True

    def advice(self) -> str:
        """What the user can do about a failed open."""
        return "check the --source"

    def frame_size(self) -> tuple[int, int] | None:
        """(width, height) of the frames, when known before reading one."""
        return None


class CameraSource(Source):
    live = True

    def __init__(self, index: int = 0, size: tuple[int, int] | None = None, fps: float | None = None):
        self.index, self.size, self.req_fps = index, size, fps
        self.fps = fps or 30.0
        self.name = f"camera {index}"
        self._cap = None

    def open(self) -> None:
        self.close()
        backend = cv2.CAP_DSHOW if _is_windows() else cv2.CAP_ANY  # DirectShow opens webcams fastest
        with _opencv_quiet():  # a missing camera is our one line, not OpenCV's backend chatter
            cap = cv2.VideoCapture(self.index, backend)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"camera {self.index} cannot be opened")
        if self.size:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        if self.req_fps:
            cap.set(cv2.CAP_PROP_FPS, self.req_fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
        self.fps = cap.get(cv2.CAP_PROP_FPS) or self.fps
        self._cap = cap

    def read(self) -> np.ndarray:
        if self._cap is None:
            raise SourceError(f"camera {self.index} is not open")
        ok, img = self._cap.read()
        if not ok or img is None:
            raise SourceError(f"camera {self.index} stopped delivering frames")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def is_open(self) -> bool:
        return self._cap is not None

    def certainly_missing(self) -> bool:
        # Only Linux names its cameras as files. On Windows and macOS a camera that fails to open
        # may be held by another app or waiting for the user's permission: that cannot be told
        # from a missing one, so it is retried.
        return _platform() == "linux" and not os.path.exists(f"/dev/video{self.index}")

    def advice(self) -> str:
        if self.certainly_missing() and not linux_cameras():
            return no_camera_advice()
        return camera_advice(_platform())

    def frame_size(self):
        if self._cap is None:
            return self.size
        w, h = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        return (w, h) if w and h else self.size


class _opencv_quiet:
    def __enter__(self):
        try:
            self._level = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        except AttributeError:
            self._level = None

    def __exit__(self, *exc):
        if self._level is not None:
            cv2.utils.logging.setLogLevel(self._level)


class _ffmpeg_quiet(_opencv_quiet):
    """OpenCV's logging silenced, and what FFmpeg writes while a file opens held back: FFmpeg logs
    to the process's stderr itself (file descriptor 2), past OpenCV's log level, so a damaged
    file printed "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x...] moov atom not found" above our own line. fd 2
    goes to a temporary file while the file opens; afterwards ``ffmpeg`` holds FFmpeg's lines
    (for our one line to quote) and every other line written meanwhile (another thread's) is
    written back to stderr. Where fd 2 cannot be redirected (no console) nothing is held back."""

    ffmpeg: list[str]

    def __enter__(self):
        import tempfile

        super().__enter__()
        self.ffmpeg, self._saved, self._tmp = [], None, None
        try:
            sys.stderr.flush()
            self._tmp = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError, AttributeError):
            self._restore()
        return self

    def _restore(self) -> str:
        text = ""
        if self._saved is not None:
            try:
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None
        if self._tmp is not None:
            self._tmp.seek(0)
            text = self._tmp.read().decode("utf-8", "replace")
            self._tmp.close()
            self._tmp = None
        return text

    def __exit__(self, *exc):
        text = self._restore()
        super().__exit__(*exc)
        others = []
        for line in text.splitlines(keepends=True):
            # FFmpeg's own lines: "[demuxer @ 0x55...] message"
            (self.ffmpeg if line.startswith("[") and " @ 0x" in line.split("]", 1)[0] else others).append(line)
        self.ffmpeg = [line.split("]", 1)[1].strip() for line in self.ffmpeg]
        if others:
            try:
                sys.stderr.write("".join(others))
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass


def _is_windows() -> bool:
    return os.name == "nt"


def _platform() -> str:
    return "linux" if sys.platform.startswith("linux") else sys.platform


def camera_advice(platform: str) -> str:
    """Why a camera that exists may not open, and what to do, on ``platform`` (sys.platform)."""
    if platform == "win32":
        return ("Windows lets one app use a webcam at a time: close the app that has it (in OBS, remove or "
                "deactivate its Video Capture Device source: OBS shows the engine's output instead), and check "
                "Settings > Privacy & security > Camera > Let desktop apps access your camera")
    if platform == "darwin":
        return ("macOS may be asking whether this app may use the camera: allow Terminal (or OBS, when OBS "
                "started the engine) under System Settings > Privacy & Security > Camera; or another app has it")
    return "check --source camera:N (0 is the default camera) and that no other app holds it"


def _is_virtual_video(index: int) -> bool:
    """Whether /dev/video``index`` is a virtual device (v4l2loopback: a virtual camera's output,
    such as the engine's own), not a camera."""
    return "/devices/virtual/" in os.path.realpath(f"/sys/class/video4linux/video{index}")


def linux_cameras(limit: int = 64) -> list[int]:
    """The N of every /dev/videoN on this Linux machine that may be a camera (virtual devices left out)."""
    return [i for i in range(limit) if os.path.exists(f"/dev/video{i}") and not _is_virtual_video(i)]


def no_camera_advice() -> str:
    """What to do on a Linux machine without any camera."""
    virtual = [f"/dev/video{i}" for i in range(64) if os.path.exists(f"/dev/video{i}") and _is_virtual_video(i)]
    but = f" but the virtual camera{'s' if len(virtual) > 1 else ''} {', '.join(virtual)}" if virtual else ""
    return (f"this machine has no camera at all (no /dev/video* device{but}); plug one in, or run without one: "
            "--source synthetic (a moving test pattern) or --source video:PATH (a video file)")


def open_at_start(source: Source, say) -> None:
    """Open ``source`` before the stream starts. One that cannot exist (a missing file, a camera
    index Linux does not have) is one line and an exit. A camera that exists but does not open yet
    (held by another app, or waiting for the user's permission on macOS) is a warning line that
    says what to do; the engine then shows 'no signal' and retries it, as for a lost camera."""
    try:
        source.open()
    except SourceError as exc:
        if not source.live or source.certainly_missing():
            raise UserError(f"{exc}: {source.advice()}") from None
        say(f"warning: {exc}: {source.advice()}; showing 'no signal' and retrying until it opens")


def open_frames(path: str | Path, fps: float | None = None):
    """A video file's or image folder's frames (:class:`~.video.FrameSource`); an unusable file is
    one line of ours, with what FFmpeg said about it, and FFmpeg's own lines held back."""
    from .video import FrameSource

    quiet = _ffmpeg_quiet()
    try:
        with quiet:
            return FrameSource(path, fps=fps) if fps is not None else FrameSource(path)
    except UserError as exc:
        reason = "; ".join(dict.fromkeys(quiet.ffmpeg))
        damaged = " (the file is damaged or incomplete)" if "moov atom not found" in reason else ""
        raise UserError(f"{exc}" + (f" FFmpeg says: {reason}{damaged}" if reason else "")) from None


class VideoSource(Source):
    def __init__(self, path: str | Path, loop: bool = False):
        from .video import FrameSource

        self.path, self.loop = Path(path), loop
        self._make = lambda: FrameSource(self.path)
        self._src = open_frames(self.path)  # fails now, with one line of ours, if the file is unusable
        self.fps = self._src.fps
        self.name = f"video {self.path.name}" if self.path.is_file() else f"images {self.path}"
        self._it = iter(self._src)

    def read(self) -> np.ndarray:
        try:
            return next(self._it)
        except StopIteration:
            if not self.loop:
                raise SourceEnded from None
            self._src.close()
            self._src = self._make()
            self._it = iter(self._src)
            try:
                return next(self._it)
            except StopIteration:
                raise SourceEnded from None

    def close(self) -> None:
        self._src.close()

    def frame_size(self):
        probe = self._make()
        first = next(iter(probe), None)
        probe.close()
        return (first.shape[1], first.shape[0]) if first is not None else None


class SyntheticSource(Source):
    """A moving test pattern (gradient, bars, a bouncing disc, a frame counter): needs no hardware,
    and frame ``n`` is always the same picture."""

    def __init__(self, size: tuple[int, int] = (640, 480), fps: float = 30.0, seed: int = 0):
        self.w, self.h = size
        self.fps = fps
        self.name = "synthetic"
        self.n = 0
        yy, xx = np.mgrid[0 : self.h, 0 : self.w]
        self._base = np.stack(
            [xx * 255 // max(1, self.w - 1), yy * 255 // max(1, self.h - 1), (xx + yy + 37 * seed) % 256], axis=-1
        ).astype(np.uint8)

    def frame_size(self):
        return self.w, self.h

    def read(self) -> np.ndarray:
        t = self.n / self.fps
        self.n += 1
        img = np.roll(self._base, int(40 * t) % self.w, axis=1).copy()
        cx = int(self.w / 2 + self.w / 3 * math.sin(1.3 * t))
        cy = int(self.h / 2 + self.h / 3 * math.cos(0.9 * t))
        cv2.circle(img, (cx, cy), max(4, min(self.w, self.h) // 8), (255, 240, 200), -1)
        cv2.putText(img, f"{self.n - 1}", (8, self.h - 10), cv2.FONT_HERSHEY_SIMPLEX, max(0.4, self.h / 400), (0, 0, 0), 2)
        return img


def parse_source(spec: str, *, camera_size=None, camera_fps=None, loop=False, synthetic_size=(640, 480), seed=0) -> Source:
    kind, _, rest = spec.partition(":")
    if kind == "camera":
        try:
            index = int(rest) if rest else 0
        except ValueError:
            raise ConfigError(f"--source camera:INDEX needs a number, got {spec!r}") from None
        return CameraSource(index, camera_size, camera_fps)
    if kind in ("video", "images"):
        if not rest:
            raise ConfigError(f"--source {kind}:PATH needs a path")
        p = Path(rest).expanduser()
        if kind == "video" and not p.is_file():
            raise UserError(f"video not found: {p}")
        if kind == "images" and not p.is_dir():
            raise UserError(f"image folder not found: {p}")
        return VideoSource(p, loop=loop)
    if kind == "synthetic":
        return SyntheticSource(synthetic_size, camera_fps or 30.0, seed)
    raise ConfigError(f"unknown source {spec!r}; use camera[:INDEX], video:PATH, images:DIR or synthetic (`run` also takes obs-filter[:PORT])")
