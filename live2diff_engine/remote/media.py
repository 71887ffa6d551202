"""WebRTC tracks as one more source and one more sink (aiortc), for `serve` and `connect`.

The engine's threads never touch the event loop that runs the peer connection: frames cross
between the two through small locked buffers here, and everything on the loop side is fed with
``loop.call_soon_threadsafe``.

Frame identity across the network: every video frame carries a presentation timestamp (pts) in
the 90 kHz RTP clock, and the RTP timestamp on the wire *is* that pts (see
:func:`install_shared_rtp_clock`): aiortc would add a random origin on the sending side and count
from the first frame that arrives on the receiving side, so a session whose first frames were lost
on the way would number every later frame as one sent earlier. With the shared clock, frames lost
at the start, in the middle or across a resume do not shift the numbering. The engine's outgoing
track first sends a card at pts 0 ("connected, warming up") and then every output at
``input pts + PTS_SHIFT``: a client that numbered its frames from pts 0 knows for each returned
frame which of its frames it came from (``returned pts - PTS_SHIFT``), and from that the round
trip. Frames that come from no input (a pass-through after a failure) take the newest input's pts,
so the returned pts never go backwards.
"""

from __future__ import annotations

import asyncio
import fractions
import queue
import threading
import time
from collections import OrderedDict, deque

import numpy as np

from ..io.sinks import Sink, no_signal_card
from ..io.sources import Source, SourceEnded
from . import redundancy

CLOCK = 90_000  # the RTP video clock
TIME_BASE = fractions.Fraction(1, CLOCK)
PTS_SHIFT = 3000  # one frame at 30 fps: room for the card at pts 0 before the first output


HOLD_S = 0.4  # how long (wall clock) a frame with a missing packet waits for its retransmission before it is skipped
DECODE_BEHIND_S = 1.0  # encoded frames waiting for the decoder beyond this much media time: skip to a keyframe
PLI_EVERY_S = 1.0  # while waiting for a keyframe, ask again this often
RENACK_S = 0.15  # a packet still missing this long after it was asked for is asked for again ...
RENACK_TRIES = 2  # ... this many more times (aiortc asks once: a lost retransmission was never asked again)
TAIL_PROBE_S = 0.05  # no next frame this long after a video frame's last packet: that packet goes again (RTX)


class Recovery:
    """A video receiver's extra loss recovery, beside aiortc's single NACK per gap (see
    ``install_prompt_jitter_buffer``): it asks again for a packet whose retransmission was lost too."""

    def __init__(self):
        self.asked: dict[int, tuple[float, int]] = {}  # sequence number -> (when last asked, times asked again)
        self.ssrc: int | None = None  # the media's (a retransmission arrives under the RTX stream's)
        self.renacked = 0

    def again(self, missing: set[int], now: float) -> list[int]:
        """The sequence numbers to ask for again now."""
        out = []
        for seq in missing:
            when, tries = self.asked.get(seq, (None, 0))
            if when is None:
                self.asked[seq] = (now, 0)  # asked for just now by aiortc, when its gap was seen
            elif now - when >= RENACK_S and tries < RENACK_TRIES:
                self.asked[seq] = (now, tries + 1)
                out.append(seq)
        for seq in [q for q in self.asked if q not in missing]:
            del self.asked[seq]
        self.renacked += len(out)
        return sorted(out)


def is_keyframe(codec_name: str, data: bytes) -> bool | None:
    """Whether an encoded (depayloaded) frame is a keyframe: VP8 (RFC 6386: bit 0 of the frame
    tag is 0) or H.264 (an IDR or SPS NAL unit in the Annex B stream); None for other codecs."""
    if codec_name == "VP8":
        return bool(data) and not data[0] & 1
    if codec_name == "H264":
        i = data.find(b"\x00\x00\x01")
        while i >= 0 and i + 3 < len(data):
            if data[i + 3] & 0x1F in (5, 7):
                return True
            i = data.find(b"\x00\x00\x01", i + 3)
        return False
    return None


class DecodeQueue(queue.Queue):
    """A receiver's queue of encoded video frames for its decoder thread (aiortc's is unbounded:
    a decoder short of CPU falls further behind every second, and so does the picture). When the
    frames waiting span more than DECODE_BEHIND_S of media time, they are dropped (``frames_stale``)
    and so is every frame until the next keyframe, which the receiver asks for (``want_keyframe``):
    the decoder starts again from the newest picture instead of working through old ones."""

    def __init__(self):
        super().__init__()
        self.frames_stale = 0
        self.resync = False
        self.want_keyframe = False
        self.asked_at = 0.0

    def put(self, item, block=True, timeout=None):
        if item is None:  # the end, for the decoder thread
            return super().put(item, block, timeout)
        codec, frame = item
        key = is_keyframe(codec.name, frame.data)
        with self.mutex:
            waiting = [x[1] for x in self.queue if x is not None]
            behind = bool(waiting) and frame.timestamp - waiting[0].timestamp > DECODE_BEHIND_S * CLOCK
            if behind and key is not None:  # too far behind: what waits goes; start again at a keyframe
                self.frames_stale += len(waiting)
                self.queue = type(self.queue)(x for x in self.queue if x is None)
                self.resync = True
            if self.resync:
                if not key:
                    self.frames_stale += 1
                    now = time.monotonic()
                    if now - self.asked_at >= PLI_EVERY_S:
                        self.want_keyframe, self.asked_at = True, now
                    return None
                self.resync = False
        return super().put(item, block, timeout)


def install_prompt_jitter_buffer() -> None:
    """aiortc's video jitter buffer, made prompt and bounded (both ends of a remote stream, every
    peer connection of this process):

    - Prompt: aiortc's hands a frame on only when the first packet of the *next* frame arrives, so
      every frame waits one frame interval for no reason. This one also hands a frame on at its
      last packet (the RTP marker bit, RFC 7741 for VP8, RFC 6184 for H.264) once all its packets
      are there in sequence.
    - Bounded: aiortc's waits for a missing packet until 512 packets have arrived after it; when the
      retransmission is lost too, it then drops only as much as it must to fit the newest packet and
      from there hands on one frame per packet that arrives: a standing queue of 512 packets for the
      rest of the session (3.7 s at 10 fps of 512x512 VP8). This one waits HOLD_S (wall clock) for
      the retransmission, then skips to the newest frame it holds (the frames between reference the
      lost one), counts the frames skipped (``frames_lost``) and asks the sender for a keyframe (PLI).
    - Drained: every complete frame waiting behind a filled hole goes to the decoder at once, not
      one per later packet (see the receiver's wrapper below).
    - Asked again: a packet whose retransmission was lost too is asked for again (aiortc asks
      once; :class:`Recovery`). The sending side's tail probe is in :func:`install_shared_rtp_clock`.
    Audio is untouched."""
    from aiortc import jitterbuffer, rtcrtpreceiver

    if getattr(rtcrtpreceiver.JitterBuffer, "prompt", False):
        return
    class PromptJitterBuffer(jitterbuffer.JitterBuffer):
        prompt = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.frames_lost = 0
            self.payload_type: int | None = None
            self.hole: tuple[int, float] | None = None  # (sequence number, when first seen) of the first hole held

        def add(self, packet):
            if self._is_video:
                self.payload_type = packet.payload_type
            pli, frame = super().add(packet)
            if frame is None and self._is_video and self._skip_stale(packet.timestamp, packet.sequence_number):
                pli, frame = True, self._remove_frame(packet.sequence_number)
            return pli, frame

        def _skip_stale(self, newest_ts: int, newest_seq: int) -> bool:
            """A hole before the newest frame held, still open HOLD_S after it was first seen (a
            packet after it arrived: aiortc asked for it then): drop everything before that frame.
            True when something was dropped. Wall-clock time, not media time: at a few frames a
            second the next frame's media time is past HOLD_S already when it arrives, and the
            hole would be skipped at once, before its retransmission could come."""
            if self._origin is None:
                return False
            head_ts = None
            first_gap = last_packet = newest_start = None  # offsets from the head
            seen: set[int] = set()
            held = min(self.capacity, ((newest_seq - self._origin) & 0xFFFF) + 1)
            for count in range(held):
                packet = self._packets[(self._origin + count) % self._capacity]
                if packet is None:
                    if first_gap is None:
                        first_gap = count
                    continue
                last_packet = count
                if head_ts is None:
                    head_ts = packet.timestamp
                seen.add(packet.timestamp)
                if packet.timestamp == newest_ts and newest_start is None:
                    newest_start = count
            if head_ts is None or first_gap is None or first_gap > last_packet or not newest_start:
                self.hole = None
                return False  # nothing held, or no hole before the newest packet, or the newest frame is the head
            age = (newest_ts - head_ts) % (1 << 32)
            if age >= 1 << 31:  # an old packet
                return False
            hole, now = (self._origin + first_gap) & 0xFFFF, time.monotonic()
            if self.hole is None or self.hole[0] != hole:
                self.hole = (hole, now)
            if now - self.hole[1] < HOLD_S:
                return False
            self.hole = None
            self.frames_lost += max(1, len(seen) - 1)
            self.remove(newest_start)
            return True

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

        def next_ready(self):
            """The next complete frame already held (behind the one just handed on), or None."""
            if self._origin is None or self._packets[self._origin % self._capacity] is None:
                return None
            return self._remove_frame(None)

    receiver = rtcrtpreceiver.RTCRtpReceiver
    handle = receiver._handle_rtp_packet
    init = receiver.__init__

    def init_with_decode_queue(self, kind, transport):
        init(self, kind, transport)
        if kind == "video":  # before receive() hands the queue to the decoder thread
            self._RTCRtpReceiver__decoder_queue = DecodeQueue()
            self._RTCRtpReceiver__timestamp_mapper = RtpClock()  # install_shared_rtp_clock

    receiver.__init__ = init_with_decode_queue

    async def handle_and_drain(self, packet, arrival_time_ms):
        await handle(self, packet, arrival_time_ms)
        buffer = getattr(self, "_RTCRtpReceiver__jitter_buffer", None)
        queue = getattr(self, "_RTCRtpReceiver__decoder_queue", None)
        mapper = getattr(self, "_RTCRtpReceiver__timestamp_mapper", None)
        codecs = getattr(self, "_RTCRtpReceiver__codecs", None) or {}
        if not isinstance(buffer, PromptJitterBuffer) or queue is None or mapper is None \
                or not getattr(self, "_RTCRtpReceiver__decoder_thread", None):
            return
        await recover(self, packet)
        codec = codecs.get(buffer.payload_type)
        while codec is not None:
            frame = buffer.next_ready()
            if frame is None:
                break
            frame.timestamp = mapper.map(frame.timestamp)
            queue.put((codec, frame))
        if getattr(queue, "want_keyframe", False):
            queue.want_keyframe = False
            await self._send_rtcp_pli(self._l2d_recovery.ssrc or packet.ssrc)

    async def recover(self, packet):
        """Asks again for what is still missing, and for a frame's lost tail (Recovery)."""
        gen = getattr(self, "_RTCRtpReceiver__nack_generator", None)
        buffer = self._RTCRtpReceiver__jitter_buffer
        rec = self.__dict__.get("_l2d_recovery")
        if rec is None:
            rec = self._l2d_recovery = Recovery()
        if gen is None:  # NACK not negotiated
            return
        original = packet.payload_type == buffer.payload_type  # not a retransmission (RTX)
        if original:
            rec.ssrc = packet.ssrc
        if rec.ssrc is None:
            return
        again = rec.again(gen.missing, time.monotonic())
        if again:
            await self._send_rtcp_nack(rec.ssrc, again)

    rtcrtpreceiver.JitterBuffer = PromptJitterBuffer
    receiver._handle_rtp_packet = handle_and_drain


SHARED_CLOCK_LIMIT = CLOCK * 600  # a first RTP timestamp past 10 min: a sender with its own random origin


class RtpClock:
    """A video receiver's RTP timestamps as pts: the timestamp itself, carried past its 32-bit
    wrap (in place of aiortc's TimestampMapper, which counts from the first frame that arrives and
    takes any frame older than the one before for a wrap). A sender that is not on the shared
    clock (a browser, OBS, a `connect` or `serve` from before it) shows itself by a first timestamp
    past SHARED_CLOCK_LIMIT (a random 32-bit origin is, 99 times in 100): its frames are counted
    from the first one that arrives, as aiortc did."""

    def __init__(self):
        self._last: int | None = None  # the newest timestamp seen
        self._value = 0  # its pts

    def map(self, timestamp: int) -> int:
        if self._last is None:
            self._last, self._value = timestamp, timestamp if timestamp < SHARED_CLOCK_LIMIT else 0
            return self._value
        step = (timestamp - self._last + (1 << 31)) % (1 << 32) - (1 << 31)  # the nearest way, wrap or not
        value = self._value + step
        if step > 0:
            self._last, self._value = timestamp, value
        return value


_zero_origin = None  # a ContextVar, True inside an RTP sender's sending task (install_shared_rtp_clock)


def install_shared_rtp_clock() -> None:
    """Makes the RTP timestamp of every video frame this process sends its pts (aiortc adds a
    random 32-bit origin), the other half of :class:`RtpClock`: both ends of a connect/serve
    session then agree on every frame's pts from the wire alone, whichever frames are lost.
    (A random origin guards plain RTP against known-plaintext attacks; WebRTC's media is SRTP.)
    A peer that is not on this clock (a browser, OBS, an older `connect` or `serve`) is counted
    from its first frame that arrives, as before (:class:`RtpClock`)."""
    global _zero_origin
    import contextvars

    from aiortc import rtcrtpsender

    if _zero_origin is not None:
        return
    _zero_origin = contextvars.ContextVar("live2diff_zero_rtp_origin", default=False)
    random32 = rtcrtpsender.random32
    run_rtp = rtcrtpsender.RTCRtpSender._run_rtp

    def origin_or_random32() -> int:
        return 0 if _zero_origin.get() else random32()

    async def run_rtp_from_zero(self, codec):
        if getattr(self, "kind", None) == "video":
            _zero_origin.set(True)  # this task's context only (the sending loop's timestamp origin)
        return await run_rtp(self, codec)

    rtcrtpsender.random32 = origin_or_random32
    rtcrtpsender.RTCRtpSender._run_rtp = run_rtp_from_zero
    next_encoded_frame = rtcrtpsender.RTCRtpSender._next_encoded_frame

    async def next_with_tail_probe(self, codec):
        """The tail probe: a lost packet is noticed by the receiver when a later one arrives, so a
        frame's lost last packet (or a whole one-packet frame: at a few frames a second most are)
        would wait a whole frame interval (333 ms at 3 fps) before it is even asked for. When no
        next frame follows within TAIL_PROBE_S, the last packet goes again (as a retransmission,
        on the RTX stream): one packet per frame at low rates, none at 20 fps and above. A copy
        that finds the original there is dropped by the receiver like any duplicate. While the
        link sends every packet twice (redundancy.py) the last one's copy is already on its way:
        no probe then."""
        probe = None
        last = self.__dict__.get("_l2d_last_frame")
        copies = self.transport is not None and redundancy.of(self.transport).active()
        if last is not None and getattr(self, "kind", None) == "video" and not copies:
            history = getattr(self, "_RTCRtpSender__rtp_history", {})
            seq = next((p.sequence_number for p in list(history.values()) if p.marker and p.timestamp == last), None)
            if seq is not None:
                loop = asyncio.get_running_loop()
                probe = loop.call_later(TAIL_PROBE_S, lambda: loop.create_task(self._retransmit(seq)))
        try:
            frame = await next_encoded_frame(self, codec)
        finally:
            if probe is not None:
                probe.cancel()
        if frame is not None:
            self._l2d_last_frame = frame.timestamp  # on the shared clock: the RTP timestamp itself
        return frame

    rtcrtpsender.RTCRtpSender._next_encoded_frame = next_with_tail_probe


def frames_lost(pc) -> int:
    """Video frames this peer connection's receivers skipped: for a packet that never came, or
    left undecoded when the decoder fell behind (DecodeQueue)."""
    total = 0
    for r in pc.getReceivers():
        total += getattr(getattr(r, "_RTCRtpReceiver__jitter_buffer", None), "frames_lost", 0)
        total += getattr(getattr(r, "_RTCRtpReceiver__decoder_queue", None), "frames_stale", 0)
    return total


STALE_S = 0.3  # a decoded frame waiting this much media time behind the newest one waiting is dropped


async def recv_newest(track):
    """The next frame of a remote track that is not stale: ``(frame, older)``, where ``older``
    counts the decoded frames dropped here for being more than STALE_S (media time) behind the
    newest one waiting. A reader that fell behind catches up at once instead of showing old frames
    late; frames that merely came close together all go on. aiortc's track queues every decoded
    frame without bound (``RemoteStreamTrack._queue``); its end (None) stays queued."""
    frame = await track.recv()
    waiting = getattr(getattr(track, "_queue", None), "_queue", None)  # the asyncio.Queue's deque
    older = 0
    while waiting and waiting[-1] is not None and frame_pts(waiting[-1]) - frame_pts(frame) > STALE_S * CLOCK:
        frame, older = waiting.popleft(), older + 1
    return frame, older


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
    ``read`` (the engine's capture thread) takes them in order, dropping those more than STALE_S
    behind the newest (``stale``), converting to RGB there so the loop stays light. A live source: the engine keeps the newest. ``end`` makes ``read`` raise
    SourceEnded."""

    live = True

    def __init__(self, book: PtsBook, name: str = "remote camera", fps: float = 30.0, keep: int = 8):
        self.book, self.name, self.fps = book, name, fps
        self._frames: deque = deque(maxlen=keep)
        self._cond = threading.Condition()
        self._ended = False
        self.received = 0
        self.stale = 0  # frames that waited here behind a newer one and were dropped
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
            while self._frames and frame_pts(self._frames[-1]) - frame_pts(frame) > STALE_S * CLOCK:
                frame = self._frames.popleft()  # stale: a newer one waits (a live source)
                self.stale += 1
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
