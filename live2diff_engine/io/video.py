"""Reading and writing video files and image folders with OpenCV (frames are RGB uint8)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


class FrameSource:
    """A video file or a folder of images, as RGB frames, with its frame rate and (best-guess) length."""

    def __init__(self, path: str | Path, fps: float | None = None):
        self.path = Path(path)
        self._files: list[Path] | None = None
        self._cap = None
        if self.path.is_dir():
            self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {self.path}")
            self.fps = fps or 30.0
            self.length = len(self._files)
        elif self.path.is_file():
            cap = cv2.VideoCapture(str(self.path))
            if not cap.isOpened():
                raise UserError(f"cannot open {self.path} as a video; is it a video file OpenCV can read (mp4, avi, mkv)?")
            self._cap = cap
            self.fps = fps or cap.get(cv2.CAP_PROP_FPS) or 30.0
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self.length = n if n > 0 else None
        else:
            raise UserError(f"input not found: {self.path}")

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._files is not None:
            for p in self._files:
                img = cv2.imread(str(p), cv2.IMREAD_COLOR)
                if img is None:
                    raise UserError(f"cannot read image {p}")
                yield cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            return
        while True:
            ok, img = self._cap.read()
            if not ok:
                break
            yield cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def frames_word(n: int) -> str:
    """'1 frame', '3 frames'."""
    return f"{n} frame{'' if n == 1 else 's'}"


class VideoWriter:
    """An RGB frame sink into a video file (OpenCV's pip wheel writes MPEG-4 part 2 in .mp4)."""

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int], say=None):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_FOURCC:
            raise UserError(f"output {self.path} must end in one of {', '.join(sorted(VIDEO_FOURCC))}")
        if not self.path.parent.exists():
            raise UserError(f"output folder does not exist: {self.path.parent}")
        # The encoders behind OpenCV's writer take even sizes only and cut an odd one down without
        # a word (641x361 came out 640x360): cut it here, where it can be said once.
        even = (size[0] - size[0] % 2, size[1] - size[1] % 2)
        if even != tuple(size):
            (say or _stderr)(f"note: {self.path.name} is {even[0]}x{even[1]}, not {size[0]}x{size[1]}: video files take "
                             "even sizes (the last column or row is left out)")
        self.asked, self.size = tuple(size), even
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*VIDEO_FOURCC[suffix]), fps, even)
        if not self._writer.isOpened():
            raise UserError(f"cannot write video {self.path} (codec {VIDEO_FOURCC[suffix]} unavailable?)")
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        if (frame.shape[1], frame.shape[0]) == self.asked and self.asked != self.size:
            frame = frame[: self.size[1], : self.size[0]]  # the odd last column or row cut, not the picture scaled
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.count += 1

    def close(self) -> None:
        self._writer.release()
