"""WebRTC tracks as one more source and one more sink (aiortc), for `serve` and `connect`.

The engine's threads never touch the event loop that runs the peer connection: frames cross
between the two through small locked buffers here, and everything on the loop side is fed with
``loop.call_soon_threadsafe``.

Frame identity across the network: every video frame carries a presentation timestamp (pts) in
the 90 kHz RTP clock. The receiving side of a peer connection counts pts from its first frame, so
the engine's outgoing track first sends a card at pts 0 ("connected, warming up") and then every
output at ``input pts + PTS_SHIFT``: a client that numbered its frames from pts 0 knows for each
returned frame which of its frames it came from (``returned pts - PTS_SHIFT``), and from that the
round trip. Frames that come from no input (a pass-through after a failure) take the newest input's
pts, so the returned pts never go backwards.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
import time
from collections import OrderedDict, deque

import numpy as np

from ..io.sinks import Sink, no_signal_card
from ..io.sources import Source, SourceEnded

CLOCK = 90_000  # the RTP video clock
TIME_BASE = fractions.Fraction(1, CLOCK)
PTS_SHIFT = 3000  # one frame at 30 fps: room for the card at pts 0 before the first output


def install_prompt_jitter_buffer() -> None:
    """aiortc's video jitter buffer hands a frame on only when the first packet of the *next*
    frame arrives, so every received frame waits one frame interval (33 ms at 30 fps) for no
    reason on a clean link. This one also hands a frame on at its last packet (the RTP marker bit,
    RFC 7741 for VP8, RFC 6184 for H.264) once all its packets are there in sequence; a frame
    whose marker is lost still goes on when the next one starts, as before. Audio is untouched."""
    from aiortc import jitterbuffer, rtcrtpreceiver

    if getattr(rtcrtpreceiver.JitterBuffer, "prompt", False):
        return

    class PromptJitterBuffer(jitterbuffer.JitterBuffer):
        prompt = True

        def _remove_frame(self, sequence_number):
            if not self._is_video:
                return super()._remove_frame(sequence_number)
            packets = []
            timestamp = None
            for count in range(self.capacity):
                packet = self._packets[(self._origin + count) % self._capacity]
                if packet is None:
                    break
                if timestamp is None:
                    timestamp = packet.timestamp
                elif packet.timestamp != timestamp:  # the next frame began: this one is complete
                    self.remove(count)
                    return jitterbuffer.JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)
                packets.append(packet)
                if packet.marker:  # its last packet, and all before it are here
                    self.remove(count + 1)
                    return jitterbuffer.JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)
            return None

    rtcrtpreceiver.JitterBuffer = PromptJitterBuffer


def to_video_frame(image: np.ndarray, pts: int):
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    frame.pts = int(pts)
    frame.time_base = TIME_BASE
    return frame


def frame_pts(frame) -> int:
    """A received frame's pts in the 90 kHz clock."""
    if frame.pts is None:
        return 0
    tb = frame.time_base or TIME_BASE
    return int(round(frame.pts * tb * CLOCK))


class PtsBook:
    """Which pts an image array carries: noted by the source for each frame it hands out, by the
    pipeline wrapper for each output; looked up by identity (the array object), bounded."""

    def __init__(self, keep: int = 32):  # a frame is taken within a frame or two of its note; frames are big
        self._items: OrderedDict[int, tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.keep = keep
        self.latest_in: int | None = 0  # None after forget: no input of the current connection yet

    def note(self, image: np.ndarray, pts: int) -> None:
        with self._lock:
            self._items[id(image)] = (image, pts)  # the array is held, so its id is not reused meanwhile
            while len(self._items) > self.keep:
                self._items.popitem(last=False)

    def take(self, image: np.ndarray) -> int | None:
        with self._lock:
            item = self._items.pop(id(image), None)
        return item[1] if item is not None and item[0] is image else None

    def forget(self) -> None:
        """A new connection: the pts noted so far were counted on the old one."""
        with self._lock:
            self._items.clear()
            self.latest_in = None


class PtsPipeline:
    """Wraps a frame pipeline for a WebRTC session: each output is noted in ``book`` with the pts
    of the input it came from. Everything else is the wrapped pipeline's."""

    def __init__(self, inner, book: PtsBook, on_warm=None):
        self.__dict__["inner"] = inner
        self.__dict__["book"] = book
        self.__dict__["_pts_of"] = {}
        self.__dict__["on_warm"] = on_warm  # called (the engine's thread) when a warmup is done

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    def _noted(self, ready):
        for index, image in ready:
            pts = self._pts_of.pop(index, None)
            if pts is not None:
                self.book.note(image, pts)
        return ready

    def push(self, frame):
        pts = self.book.take(frame)
        if pts is not None:
            self.book.latest_in = pts
            self._pts_of[self.inner.frame_index] = pts
            if len(self._pts_of) > 512:  # outputs that never came (a reset): forget the oldest
                for key in sorted(self._pts_of)[:256]:
                    self._pts_of.pop(key, None)
        cold = getattr(self.inner, "warming_up", False)
        ready = self._noted(self.inner.push(frame))
        if cold and not getattr(self.inner, "warming_up", False) and self.on_warm is not None:
            self.on_warm()
        return ready

    def forget(self) -> None:
        """The session's link changed (a resume): the frames in flight keep going through the
        engine, but their pts belonged to the old connection; only new inputs' outputs go back."""
        self._pts_of.clear()
        self.book.forget()

    def flush(self):
        return self._noted(self.inner.flush())

    def restart(self):
        return self._noted(self.inner.restart())

    def abandon_in_flight(self):
        return self.inner.abandon_in_flight()


class TrackSource(Source):
    """Frames that arrive on a remote video track. ``feed`` (the event loop) hands frames in;
    ``read`` (the engine's capture thread) takes them in order, converting to RGB there so the
    loop stays light. A live source: the engine keeps the newest. ``end`` makes ``read`` raise
    SourceEnded."""

    live = True

    def __init__(self, book: PtsBook, name: str = "remote camera", fps: float = 30.0, keep: int = 8):
        self.book, self.name, self.fps = book, name, fps
        self._frames: deque = deque(maxlen=keep)
        self._cond = threading.Condition()
        self._ended = False
        self.received = 0
        self.last_frame_at: float | None = None
        self.size: tuple[int, int] | None = None

    def feed(self, frame) -> None:
        with self._cond:
            self._frames.append(frame)
            self.received += 1
            self.last_frame_at = time.monotonic()
            self.size = (frame.width, frame.height)
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def read(self) -> np.ndarray:
        with self._cond:
            while not self._frames:
                if self._ended:
                    raise SourceEnded
                self._cond.wait(0.5)
            frame = self._frames.popleft()
        image = frame.to_ndarray(format="rgb24")
        self.book.note(image, frame_pts(frame))
        return image

    def frame_size(self):
        return self.size

    def close(self) -> None:
        pass  # the session ends the source; the engine's retry must not


class LatestFrames:
    """A thread-safe hand-over from the engine's threads to an event loop: the newest items, at
    most ``keep`` (the oldest go when the loop falls behind), and a wake-up for the waiter."""

    def __init__(self, keep: int = 4):
        self._items: deque = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.dropped = 0
        self.closed = False

    def put(self, item) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(item)
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    def close(self) -> None:
        self.closed = True
        self.put(None)

    async def get(self):
        """The oldest item kept; None once closed."""
        event = asyncio.Event()
        key = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(key)
        try:
            while True:
                with self._lock:
                    if self._items:
                        return self._items.popleft()
                    event.clear()
                await event.wait()
        finally:
            with self._lock:
                self._waiters.discard(key)


def outgoing_track(first_card: tuple[int, int, str, str] | None = ("connected", "warming up ...")):
    """A video track for a peer connection (an aiortc MediaStreamTrack) fed from any thread with
    ``track.frames.put((image, pts))``. With ``first_card`` (width, height, text, subtitle), that
    card goes out first at pts 0 (see the module's note on pts)."""
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class _Outgoing(MediaStreamTrack):
        kind = "video"

        def __init__(self):
            super().__init__()
            self.frames = LatestFrames()
            self.first_card = first_card
            self.sent = 0
            self._last_pts = -1

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self.first_card is not None:
                w, h, text, sub = self.first_card
                self.first_card = None
                self._last_pts = 0
                self.sent += 1
                return to_video_frame(no_signal_card(w, h, text, sub), 0)
            item = await self.frames.get()
            if item is None:
                self.stop()
                raise MediaStreamError
            image, pts = item
            pts = max(int(pts), self._last_pts + 1)  # never backwards, never twice
            self._last_pts = pts
            self.sent += 1
            return to_video_frame(image, pts)

    return _Outgoing()


class TrackSink(Sink):
    """The engine's outputs onto an outgoing track, each with its input's pts + PTS_SHIFT."""

    paced = False
    name = "remote peer"

    def __init__(self, track, book: PtsBook):
        self.track, self.book = track, book

    def send(self, frame: np.ndarray) -> None:
        pts = self.book.take(frame)
        if pts is None:
            pts = self.book.latest_in
        if pts is None:  # from before a resume: no pts on this connection to give it
            return
        self.track.frames.put((frame, pts + PTS_SHIFT))

    def close(self) -> None:
        self.track.frames.close()
