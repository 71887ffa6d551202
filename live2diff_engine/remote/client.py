"""`live2diff-engine connect URL`: the laptop side of a remote engine.

The ordinary engine (engine.py) with the camera as its source and the virtual camera, window,
file or local MJPEG stream as its sinks; in place of the model, a :class:`RemotePipeline` that
sends each frame to a `serve` over WebRTC (WHIP) and hands the stylised frames that come back to
the sinks, with each frame's capture time, so the status shows the whole round trip. The local API
forwards commands over the data channel (``ctl`` works against `connect` as against `run`).

A lost connection (the server gone, the network down, no stylised frame for LOST_AFTER_S; before
the first one, no word from the engine either: it may still be warming up) shows
the "no signal" card and reconnects with backoff. A reconnect first resumes the session it had: a
new peer connection whose offer goes to the session's URL (PATCH, see server.py), so a blip within
the server's grace costs no new warmup; the cut connection is closed only after that answer (its
close would end the session's video). A session that cannot be resumed is deleted (DELETE on its
URL) before a new one is made, so connect never waits on its own orphan. A 503's Retry-After is
the wait before the next try.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sys
import threading
import time
import urllib.parse

from ..control.controller import quit_engine
from ..control.schema import INSTANCE_ENV, CommandError, decode, message_id, parse_command, reply_message, status_message
from ..errors import ConfigError, UserError
from .picture import picture_messages

log = logging.getLogger("live2diff.connect")

# remote.media (numpy, OpenCV, aiortc) is imported where it is used: `--help` stays quick.
PERIOD = 90_000 // 30  # pts between two sent frames (the 90 kHz RTP clock at 30 fps)
LOST_AFTER_S = 5.0  # sending, and no stylised frame back for this long: the connection is lost
# A fleet session (its status names the node serving it: `serve --ray`) sends its status at least
# every 0.5 s (remote/fleet.py); none for this long: its node or engine is gone, and connect resumes
# through the front. The node's loss is so noticed within 2 s.
NODE_SILENT_S = 1.5
# What connect sends again to a new session (a restarted serve, past the session grace, another fleet
# node): the settings set through it, the latest of each kind (pause and resume are one kind, as are
# a picture and clearing it), so the stream comes back as the streamer left it.
REPLAYED = {"set_prompt": "set_prompt", "set_negative_prompt": "set_negative_prompt", "set_guidance": "set_guidance",
            "set_style": "set_style", "set_strength": "set_strength", "set_steps": "set_steps", "set_seed": "set_seed",
            "set_style_image_scale": "set_style_image_scale", "clear_style_image": "picture", "pause": "paused",
            "resume": "paused"}
# Until the first stylised frame of a connection (the engine warms up a new session: seconds on a
# real model, longer when it compiles), the engine's status messages on the data channel (about one
# a second, SCTP-retransmitted) show the link is alive; after it, only frames do.
# A stop (Ctrl-C) ends connect within 2 s however the link is: it waits at most DRAIN_ON_STOP_S for
# the frames still on their way back, STOP_NOTICE_S for the server's answer to its DELETE (the server
# ends the session either way), and STOP_CLOSE_S for the peer connection to close.
DRAIN_ON_STOP_S = 0.5
STOP_NOTICE_S = 1.0
STOP_CLOSE_S = 0.5
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
RESUME_BACKOFF_S = 1.0  # at most this long between tries to resume a session: the server's grace runs meanwhile
MAX_RETRY_AFTER_S = 120


class Refused(UserError):
    """The server answered the offer with a refusal that retrying will not change (401, 404)."""


def retry_after(value: str | None) -> float | None:
    """A Retry-After in seconds (RFC 9110: delay-seconds; an HTTP date is read too), at most
    MAX_RETRY_AFTER_S; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), MAX_RETRY_AFTER_S))
    try:
        import email.utils

        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return float(min(max(when - time.time(), 0.0), MAX_RETRY_AFTER_S))


class RemotePipeline:
    """Stands where the frame pipeline stands in the engine. ``push`` sends and returns nothing;
    frames that come back are handed to ``emit`` ([(index, image)], the engine's) from a thread
    of this object's own. ``on_lost(text)`` shows the card while the link is down.

    The end of the input (the source ended, --max-frames, a stop) is an end, not a cut: ``flush``
    ends the camera track (an RTCP BYE: the server finishes the frames it holds and sends them
    back) and waits until the last frame sent has come back, publishing what comes meanwhile;
    after a stop signal at most DRAIN_ON_STOP_S. The engine calls it on a stop too
    (``drains_on_stop``)."""

    warming_up = False
    output_size = None
    drains_on_stop = True

    def __init__(self, url: str, *, token: str | None = None, ice_servers: list[dict] | None = None, say=None,
                 codec: str | None = None, relay_only: bool = False):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"connect URL must be the engine's address, e.g. http://gpu-box:8765, got {url!r}")
        path = parsed.path.rstrip("/")
        self.base = f"{parsed.scheme}://{parsed.netloc}"
        self.endpoint = self.base + (path if path.endswith("/whip") else path + "/whip")
        self.token = token
        self.ice_servers = list(ice_servers or [])
        self.relay_only = relay_only  # --ice-relay-only: media through the TURN server only (remote/ice.py)
        self.codec = codec  # "vp8", "h264" or None (remote/link.py)
        self.link: dict | None = None  # the current connection's figures (remote/link.py), once a second
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.frame_index = 0
        self.emit = None  # set by connect: the engine's emit
        self.on_lost = None  # set by connect: shows the "no signal" card
        self.on_status = None  # called with the remote's status messages
        self.remote_status: dict | None = None
        self.connected = False
        self.connections = 0
        self.sent = 0
        self.returned = 0  # published
        self.received = 0  # came back (the server's card included)
        self.stale = 0  # came back behind a newer one and dropped (newest wins)
        self._lost_before = 0  # frames lost (both ways) on earlier connections
        self._up_lost = 0  # frames lost on the way up on this connection, as the server last said
        self._pc = None  # the current peer connection
        self._outbox = None  # the current connection's LatestFrames of (image, index)
        self._back: queue.Queue = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel = None
        self._pending_replies: dict[str, tuple] = {}
        self._next_id = 0
        self._first_error: BaseException | None = None
        self._first_done = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stop_requested = lambda: False  # set by connect: the engine got a stop signal
        self.publishing = True  # False once flush is over: the sinks are about to close
        self._last_sent: int | None = None  # the index of the last frame handed to the link
        self._newest_back = -1  # the newest index published
        self._back_at: float | None = None  # when a frame last came back
        self._back_cond = threading.Condition()
        self._end_input = None  # the current connection's coroutine function that ends the camera track
        self.session_url: str | None = None  # the session on the server (its Location), while it may be resumed
        self.resumed = 0  # sessions resumed on a new connection
        self._stale_pc = None  # a lost connection, closed once the next offer is answered
        self._retry_after: float | None = None  # the last 503's Retry-After
        self._front_cookies: str | None = None  # a fleet front's 503: its engine and queue cookies (fleet.py)
        # kind -> the messages that set it again (a function of the message id), latest kind last: REPLAYED
        self._settings: dict[str, object] = {}

    # -- the engine's side ---------------------------------------------------------------------

    def push(self, frame):
        index = self.frame_index
        self.frame_index += 1
        outbox = self._outbox
        if outbox is not None and self.connected:
            self._last_sent = index  # before the put: a stop cutting in between costs a wait, not a frame
            outbox.put((frame, index))
            self.sent += 1
        return []

    def flush(self):
        """The end of this side's input: waits for the frames still on their way back (they are
        published by the delivering thread as they come), then stops publishing. Returns []."""
        last, loop, end_input = self._last_sent, self._loop, self._end_input
        if last is not None and loop is not None and end_input is not None and self.connected:
            try:
                asyncio.run_coroutine_threadsafe(end_input(), loop)
            except RuntimeError:
                pass
            bound = DRAIN_ON_STOP_S if self.stop_requested() else None
            start = time.monotonic()
            with self._back_cond:
                while self._newest_back < last and self.connected:
                    now = time.monotonic()
                    if bound is not None and now - start >= bound:
                        break
                    if now - max(start, self._back_at or start) >= LOST_AFTER_S:
                        break
                    self._back_cond.wait(0.1)
                missing = self._newest_back < last
            if missing:
                self.say(f"connect: stopped before the last frame sent came back "
                         f"(waited {time.monotonic() - start:.1f} s{'' if self.connected else '; the connection is lost'})")
        with self._back_cond:  # the delivering thread publishes under this lock: none is half-sent now
            self.publishing = False
        return []

    def restart(self):
        return []

    def abandon_in_flight(self):
        return []

    def frames_lost(self) -> int:
        """Frames lost on the link both ways (a packet that no retransmission brought in time):
        on the way back, counted by this side's receiver; on the way up, as the server says."""
        from .media import frames_lost

        return self._lost_before + self._up_lost + (frames_lost(self._pc) if self._pc is not None else 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, wait_s: float = 60.0) -> "RemotePipeline":
        """Starts the link; returns once the first offer is answered (or refused for good: raises
        Refused), or after ``wait_s`` with the link still trying in the background."""
        self._threads = [threading.Thread(target=self._run_loop, name="webrtc", daemon=True),
                         threading.Thread(target=self._deliver_loop, name="remote-frames", daemon=True)]
        for t in self._threads:
            t.start()
        self._first_done.wait(wait_s)
        if self._first_error is not None:
            raise self._first_error
        return self

    def stop(self) -> None:
        self._stop.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(lambda: None)
            except RuntimeError:
                pass
        for t in self._threads:
            t.join(timeout=6)

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._link())
        finally:
            loop.close()

    async def _link(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            why = await self._one_connection(first=self.connections == 0 and attempt == 0)
            if self._stop.is_set() or why is None:
                break
            self.connected = False
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            if self.session_url is not None:
                delay = min(delay, RESUME_BACKOFF_S)
            retry_after, self._retry_after = self._retry_after, None
            if retry_after is not None:
                delay = max(retry_after, BACKOFF_S[0])  # a Retry-After of 0 must not become a busy loop
            attempt = 0 if why == "lost" else attempt + 1
            if self.on_lost is not None:
                self.on_lost("remote engine: no signal" if why == "lost" else f"remote engine: {why}")
            self.say(f"connect: {'connection lost' if why == 'lost' else why}; trying again in {delay:g} s"
                     + (" (the engine's Retry-After)" if retry_after is not None else ""))
            end = time.monotonic() + delay
            while not self._stop.is_set() and time.monotonic() < end:
                await asyncio.sleep(0.1)
        await self._close_stale()

    async def _close_stale(self) -> None:
        stale, self._stale_pc = self._stale_pc, None
        if stale is not None:
            try:
                await asyncio.wait_for(stale.close(), 5)
            except Exception:
                pass

    def _headers(self, sdp: bool = False) -> dict:
        headers = {"Content-Type": "application/sdp"} if sdp else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _delete(self, http, url: str, timeout: float = 3.0) -> None:
        """Ends a session of ours on the server (a 404: it is gone already)."""
        import aiohttp

        try:
            async with http.delete(url, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=timeout)):
                pass
        except Exception:
            pass

    async def _create(self, http, offer: str, first: bool):
        """A new session (POST to the endpoint): (answer, its URL); or why not (a line, tried
        again; a 503's Retry-After kept for the wait); or None, refused for good on the first try
        (_first_error set)."""
        import aiohttp

        from .server import ENGINE_COOKIE, QUEUE_COOKIE

        headers = self._headers(sdp=True)
        if self._front_cookies is not None:  # sent back by hand: each try has a session (and a cookie jar) of its own
            headers["Cookie"] = self._front_cookies
        async with http.post(self.endpoint, data=offer, headers=headers,
                             timeout=aiohttp.ClientTimeout(total=30)) as resp:
            text = await resp.text()
            # A fleet front's 503 "starting" names the engine loading for this stream, its "queued" when
            # the wait for a GPU began: both go back with the next offer (and only after a 503).
            kept = [f"{name}={resp.cookies[name].value}" for name in (ENGINE_COOKIE, QUEUE_COOKIE)
                    if name in resp.cookies and resp.cookies[name].value]
            self._front_cookies = "; ".join(kept) if resp.status == 503 and kept else None
            if resp.status == 201:
                return text, urllib.parse.urljoin(self.endpoint, resp.headers.get("Location", ""))
            line = text.strip().splitlines()[0][:200] if text.strip() else f"HTTP {resp.status}"
            try:  # the API's guard answers in JSON
                line = str(json.loads(text)["error"])[:200]
            except (ValueError, KeyError, TypeError):
                pass
            if resp.status in (401, 403, 404) and first:
                hint = " (give the server's token with --token or LIVE2DIFF_API_TOKEN)" if resp.status == 401 else ""
                self._first_error = Refused(f"{self.endpoint} refused the stream: {line}{hint}")
                return None
            if resp.status == 503:
                self._retry_after = retry_after(resp.headers.get("Retry-After"))
            return f"the engine answered {resp.status}: {line}"

    async def _resume(self, http, offer: str) -> tuple[int, str] | None:
        """Offers ``offer`` to the session held (PATCH on its URL). Returns (status, answer) once
        resumed; None when the session cannot be resumed: forgotten, and deleted unless the server
        says it is gone (then a new one is made). Raises what the network raises (tried again)."""
        import aiohttp

        url = self.session_url
        async with http.patch(url, data=offer, headers=self._headers(sdp=True),
                              timeout=aiohttp.ClientTimeout(total=15, sock_connect=5)) as resp:
            text = await resp.text()
            status = resp.status
        if status in (200, 201):
            return status, text
        self.session_url = None
        if status == 404:
            line = text.strip().splitlines()[0][:200] if text.strip() else ""
            if "fleet node" in line:  # the front's word: the session's node or engine is gone
                self.say(f"connect: {line.rstrip('.')}; starting a new session (a new warmup)")
            else:
                self.say("connect: the engine has ended the old session (past its --session-grace, or restarted); "
                         "starting a new one")
        else:
            line = text.strip().splitlines()[0][:200] if text.strip() else f"HTTP {status}"
            self.say(f"connect: the engine cannot resume the session ({status}: {line}); ending it and starting a new one")
            await self._delete(http, url)
        return None

    async def _one_connection(self, first: bool) -> str | None:
        """One peer connection, until it is lost ("lost"), cannot be made (the reason), refused
        for good on the first try (None, with _first_error set), or stopped (None)."""
        import aiohttp
        from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import MediaStreamError

        from .ice import rtc_configuration
        from .link import LinkStats, prefer_codec
        from .media import LatestFrames

        outbox = LatestFrames(keep=2)
        state = {"base": None, "last_back": None, "last_status": None, "stylised": False, "closed": False}

        class Camera(MediaStreamTrack):
            kind = "video"

            async def recv(self):
                from .media import to_video_frame

                item = await outbox.get()
                if item is None:
                    self.stop()
                    raise MediaStreamError
                image, index = item
                if state["base"] is None:
                    state["base"] = index  # this connection's pts 0 (the RTP timestamp on the wire: media.py)
                return to_video_frame(image, (index - state["base"]) * PERIOD)

        pc = RTCPeerConnection(rtc_configuration(self.ice_servers, self.relay_only))
        self._pc = pc
        camera = Camera()
        transceiver = pc.addTransceiver(camera, direction="sendrecv")
        prefer_codec(transceiver, self.codec)
        sender = transceiver.sender
        link = LinkStats()

        async def end_input():
            """No more frames: the last one goes out, then the track ends with an RTCP BYE, on
            which the server finishes what it holds and sends it back."""
            outbox.close()
            deadline = time.monotonic() + 5.0
            while camera.readyState == "live" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            try:
                await sender.stop()
            except Exception:
                pass
        channel = pc.createDataChannel("control")

        @channel.on("message")
        def on_message(message):
            state["last_status"] = time.monotonic()
            self._on_channel_message(message)

        @channel.on("open")
        def on_open():
            if not state.get("resumed"):  # a resumed session kept its settings
                self._send_settings_again(channel)

        @pc.on("track")
        def on_track(track):
            if track.kind == "video":
                asyncio.get_running_loop().create_task(self._receive(track, state))

        @pc.on("connectionstatechange")
        def on_state():
            if pc.connectionState in ("failed", "closed"):
                state["closed"] = True

        location = None
        lost = False
        try:
            await pc.setLocalDescription(await pc.createOffer())
            try:
                async with aiohttp.ClientSession() as http:
                    resumed = await self._resume(http, pc.localDescription.sdp) if self.session_url else None
                    state["resumed"] = resumed is not None
                    if resumed is not None:
                        text, location = resumed[1], self.session_url
                        self.resumed += 1
                    else:
                        made = await self._create(http, pc.localDescription.sdp, first)
                        if not isinstance(made, tuple):
                            return made
                        text, location = made
                        self.session_url = location
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                return f"cannot reach {self.endpoint} ({type(exc).__name__}: {str(exc)[:120] or 'no answer'})"
            finally:
                await self._close_stale()  # answered or not: the next try is a new connection again
            await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
            self._channel = channel
            self._outbox = outbox
            self._end_input = end_input
            self.connected = True
            self.connections += 1
            self.say(f"connect: streaming to {self.base}"
                     + (" (resumed its session: no new warmup)" if resumed is not None else ""))
            state["last_back"] = time.monotonic()
            self._first_done.set()
            sampled = time.monotonic()
            while not self._stop.is_set():
                await asyncio.sleep(0.2)
                if time.monotonic() - sampled >= 1.0:
                    sampled = time.monotonic()
                    try:
                        self.link = await link.sample(pc)
                    except Exception as exc:  # the connection closing under the sample
                        log.debug("link stats: %s", exc)
                if state["closed"]:
                    return "lost"
                if self._fleet_silent(max(state["last_back"], state["last_status"] or 0.0)):
                    self.say(f"connect: no word from the fleet node serving the session for {NODE_SILENT_S:g} s")
                    return "lost"
                alive = state["last_back"] if state["stylised"] else max(state["last_back"], state["last_status"] or 0)
                if time.monotonic() - alive > LOST_AFTER_S:
                    lost = True  # the link may come back: this connection stays open until the next is answered
                    return "lost"
            return None
        finally:
            self.connected = False
            self.link = None
            self._outbox = None
            self._end_input = None
            self._channel = None
            self._fail_pending("the connection to the engine was lost")
            outbox.close()
            if location and self._stop.is_set():  # a clean end: tell the server at once
                self.session_url = None
                try:
                    async with aiohttp.ClientSession() as http:
                        await self._delete(http, location, timeout=STOP_NOTICE_S)
                except Exception:
                    pass
            if lost and not self._stop.is_set() and self.session_url is not None:
                # Closed now, it would say goodbye (an RTCP BYE: the end of the session's video)
                # if the link is up after all: it is closed once the resume is answered.
                self._stale_pc = pc
            else:
                try:
                    await asyncio.wait_for(pc.close(), STOP_CLOSE_S if self._stop.is_set() else 5)
                except Exception:
                    pass
            from .media import frames_lost

            self._lost_before += frames_lost(pc) + self._up_lost
            self._up_lost = 0
            self._pc = None
            self._first_done.set()

    def _fleet_silent(self, alive: float) -> bool:
        """A fleet session's node has said nothing (no status, no frame) for NODE_SILENT_S since ``alive``."""
        return bool((self.remote_status or {}).get("node")) and time.monotonic() - alive > NODE_SILENT_S

    async def _receive(self, track, state) -> None:
        from .media import PTS_SHIFT, frame_pts, recv_newest

        try:
            while True:
                frame, older = await recv_newest(track)  # a stale backlog is dropped, not shown late
                state["last_back"] = time.monotonic()
                self.received += 1 + older
                self.stale += older
                pts = frame_pts(frame)
                if pts == 0 or state["base"] is None:
                    continue  # the server's "connected" card
                index = state["base"] + round((pts - PTS_SHIFT) / PERIOD)
                last = self._last_sent
                if index < state["base"] or (last is not None and index > last):
                    continue  # no frame of this connection's (a stale one from before a resume)
                state["stylised"] = True
                try:
                    self._back.put_nowait((index, frame))
                except queue.Full:  # the sinks fell behind: the oldest goes
                    try:
                        self._back.get_nowait()
                    except queue.Empty:
                        pass
                    self._back.put_nowait((index, frame))
        except Exception:
            pass

    def _deliver_loop(self) -> None:
        """Converts returned frames and hands them to the engine's sinks, off the event loop."""
        from .media import CLOCK, STALE_S, frame_pts

        while not self._stop.is_set():
            try:
                index, frame = self._back.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._back.mutex:  # stale frames go: more than STALE_S behind the newest one waiting
                while self._back.queue and frame_pts(self._back.queue[-1][1]) - frame_pts(frame) > STALE_S * CLOCK:
                    index, frame = self._back.queue.popleft()
                    self.stale += 1
            image = frame.to_ndarray(format="rgb24")
            with self._back_cond:
                if not self.publishing:
                    continue
                self.returned += 1
                if self.emit is not None:
                    try:
                        self.emit([(index, image)])
                    except Exception as exc:
                        log.warning("publishing a returned frame failed: %s", exc)
                self._newest_back = max(self._newest_back, index)
                self._back_at = time.monotonic()
                self._back_cond.notify_all()

    # -- control over the data channel --------------------------------------------------------

    def _on_channel_message(self, message) -> None:
        try:
            msg = json.loads(message)
        except (ValueError, TypeError):
            return
        if not isinstance(msg, dict):
            return
        if msg.get("kind") == "status":
            self.remote_status = msg
            if isinstance(msg.get("frames_lost"), int):
                self._up_lost = msg["frames_lost"]  # this session's, counted by the server
            if self.on_status is not None:
                self.on_status(msg)
        elif msg.get("kind") == "reply":
            pending = self._pending_replies.pop(str(msg.get("id")), None)
            if pending is not None:
                orig_id, reply = pending
                out = dict(msg)
                if orig_id is None:
                    out.pop("id", None)
                else:
                    out["id"] = orig_id
                reply(out)

    def forward(self, obj: dict, reply) -> None:
        """Sends a decoded command to the remote engine; ``reply`` gets its reply (any thread). A
        setting the engine took is kept to be sent again to a new session (REPLAYED)."""
        kind = REPLAYED.get(obj.get("cmd"))
        again = {k: v for k, v in obj.items() if k not in ("id", "transition_s")}  # a new session takes it at once
        self._send_for_reply(obj.get("id"), self._keeping(kind, lambda local: [json.dumps({**again, "id": local})], reply),
                             lambda local: [json.dumps({**obj, "id": local})])

    def forward_picture(self, data: bytes, reply) -> None:
        """Sends a style picture's bytes to the remote engine (remote/picture.py: an announce, then
        the bytes); ``reply`` gets the engine's answer once the picture steers its stream, or why not."""
        messages = (lambda local: picture_messages(data, local))
        self._send_for_reply(None, self._keeping("picture", messages, reply), messages)

    def _keeping(self, kind: str | None, messages, reply):
        """``reply``, and once the engine took the setting: ``messages`` kept as its kind's (REPLAYED)."""
        if kind is None:
            return reply

        def done(msg):
            if msg.get("ok") and not msg.get("superseded"):
                self._settings.pop(kind, None)
                self._settings[kind] = messages
            reply(msg)
        return done

    def _send_settings_again(self, channel) -> None:
        """On a new session's channel (the connection's loop): the settings set through connect."""
        if not self._settings or channel.readyState != "open":
            return
        self.say(f"connect: a new session on the engine: the settings set through connect ({len(self._settings)}) "
                 "are sent to it again")

        def refused(msg):
            if not msg.get("ok"):
                self.say(f"connect: the new session refused a setting sent again: {msg.get('error')}")

        for messages in list(self._settings.values()):
            self._next_id += 1
            local = f"c{self._next_id}"
            self._pending_replies[local] = (None, refused)
            for message in messages(local):
                channel.send(message)

    def _send_for_reply(self, orig, reply, messages) -> None:
        """Sends ``messages(local id)`` on the data channel (from the connection's loop); the reply
        that carries that id goes to ``reply`` with ``orig`` as its id."""
        loop = self._loop
        if loop is None or not self.connected:
            reply(reply_message(orig, False, f"not connected to the engine at {self.base}; reconnecting"))
            return

        def send():
            channel = self._channel
            if channel is None or channel.readyState != "open":
                reply(reply_message(orig, False, f"not connected to the engine at {self.base}; reconnecting"))
                return
            self._next_id += 1
            local = f"c{self._next_id}"
            if len(self._pending_replies) > 1024:  # replies that never came: forget the oldest
                for key in list(self._pending_replies)[:512]:
                    self._pending_replies.pop(key, None)
            self._pending_replies[local] = (orig, reply)
            for message in messages(local):
                channel.send(message)

        try:
            loop.call_soon_threadsafe(send)
        except RuntimeError:
            reply(reply_message(orig, False, "connect is stopping"))

    def _fail_pending(self, why: str) -> None:
        pending, self._pending_replies = self._pending_replies, {}
        for orig, reply in pending.values():
            reply(reply_message(orig, False, why))


class _StyleInfo:
    def __init__(self, name):
        self.name, self.description = name, ""


class _Styles:
    def __init__(self, remote: RemotePipeline):
        self.remote = remote

    @property
    def styles(self) -> dict:
        names = (self.remote.remote_status or {}).get("styles") or []
        return {n: _StyleInfo(n) for n in names if isinstance(n, str)}


class ForwardingController:
    """What the local API talks to in `connect`: commands go to the remote engine over the data
    channel (it validates them, as every engine does); status is the remote engine's, with this
    side's figures (the round trip) in it."""

    def __init__(self, remote: RemotePipeline):
        self.remote = remote
        self.manager = _Styles(remote)
        self.engine = None
        self.api_url = None
        self.api_token = None
        self.stream_clients = None
        self.paused = False
        self.instance: str | None = os.environ.get(INSTANCE_ENV) or None  # as Controller's: who may quit it
        self._listeners = []
        remote.on_status = lambda msg: self.changed()

    def submit(self, raw, reply=None, *, local: bool = False):  # local: as Controller.submit (quit)
        reply = reply or (lambda msg: None)
        try:
            obj = decode(raw)  # size and JSON checked here too: nothing oversized crosses the network
        except CommandError as exc:
            reply(reply_message(None, False, str(exc)))
            return None
        if not isinstance(obj, dict):
            reply(reply_message(None, False, "a command must be a JSON object"))
            return None
        if obj.get("cmd") == "status":  # answered here: the remote's status with this side's figures
            reply(reply_message(message_id(obj), True, status=self.status()))
            return obj
        if obj.get("cmd") == "quit":  # stops this connect (as Ctrl-C does), never the remote engine
            try:
                cmd = parse_command(obj, ())
            except CommandError as exc:
                reply(reply_message(message_id(obj), False, str(exc)))
                return None
            return obj if quit_engine(self.engine, self.instance, cmd, reply, local) else None
        self.remote.forward(obj, reply)
        return obj

    def submit_style_image(self, data: bytes, reply) -> bool:  # as Controller's: the remote engine decodes it
        self.remote.forward_picture(data, reply)
        return True

    def apply_pending(self) -> int:
        return 0

    def add_listener(self, fn) -> None:
        self._listeners.append(fn)

    def changed(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                pass

    def status(self) -> dict:
        remote = dict(self.remote.remote_status or {})
        for key in ("app", "v", "kind"):
            remote.pop(key, None)
        stats = self.engine.stats if self.engine is not None else None
        remote_latency = remote.get("latency_ms")
        local = {
            "state": (stats.state if stats is not None else "starting") if self.remote.connected else "no signal",
            "remote": self.remote.base,
            "remote_state": remote.get("state"),
            "connected": self.remote.connected,
            "fps": stats.fps_out if stats else 0.0,
            "fps_in": stats.fps_in if stats else 0.0,
            "latency_ms": stats.latency_ms_p50 if stats else None,
            "latency_ms_p95": stats.latency_ms_p95 if stats else None,
            "remote_latency_ms": remote_latency,
            "frames_out": stats.frames_out if stats else 0,
            "dropped": stats.dropped if stats else 0,
            "frames_lost": self.remote.frames_lost(),  # on the link, both ways
            "api_url": self.api_url,
            "link": self.remote.link,  # this side's view of the network (remote/link.py)
            "remote_link": remote.get("link"),  # the engine's view of it
            "time": round(time.time(), 3),
        }
        if local["latency_ms"] is not None and remote_latency is not None:
            local["network_ms"] = round(local["latency_ms"] - remote_latency, 1)
        return {**remote, **local}

    def status_message(self) -> dict:
        return status_message(self.status())
