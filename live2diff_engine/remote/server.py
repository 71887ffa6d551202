"""WebRTC signalling for `serve`: WHIP (RFC 9725) sessions and WHEP viewers, on the local API.

    POST   /whip            an SDP offer (Content-Type: application/sdp) with the client's camera
                            track -> 201 Created, the SDP answer, Location: /whip/ID. The answer
                            sends the stylised video back on the same peer connection; a data
                            channel named ``control`` carries the command schema both ways
                            (commands in, replies and status out).
    PATCH  /whip/ID         a new SDP offer for that session (Content-Type: application/sdp), from
                            the client that made it, after its link was cut -> 200 OK, the SDP
                            answer: a new peer connection takes the place of the old one and the
                            session goes on where it was (the same engine, cache, prompt and style,
                            no new warmup). 404 once the session is gone (make a new one with POST).
    DELETE /whip/ID         ends that session.
    POST   /whep            an SDP offer (receive-only video) -> the stylised stream of the current
                            session (the oldest one running), read-only.
    DELETE /whep/ID         ends that viewer.
    GET    /studio          a page: the browser's camera to the engine, the stylised video beside it,
                            the dock's controls over the data channel.
    GET    /metrics         the sessions and this machine in Prometheus' text format (remote/metrics.py):
                            frames, FPS, latency histograms, GPU memory on CUDA.

Sessions: at most ``max_sessions`` (default 1): another offer gets 503, a Retry-After (the seconds
until a slot may free: the rest of a cut session's grace, else RETRY_AFTER_S) and one line.
A session whose peer closes the connection is freed at once. A cut link (no video, ICE failed) is
a blip until ``session_grace`` seconds (`serve --session-grace`, default 10) have passed without
video: meanwhile the session keeps its slot and its engine, and the client resumes it with a new
offer on the session's URL (PATCH, above); past the grace it is freed.

The end of the client's video (its track stopped: an RTCP BYE, as `connect` sends at the end of
its input) is an end, not a cut: the session's engine finishes every frame it holds and sends it
back, as `run` does at the end of a file; the client then ends the session (DELETE), or it is freed
SESSION_IDLE_S after the engine is done.

The routes sit behind the API's guard: beyond loopback every request needs the token, on
loopback the Host header must name this machine. Nothing that arrives names a file or code: the
data channel's messages go through the same validation as every other control path.

ICE servers are the ones given (``ice_servers``), none by default: aiortc would otherwise ask a
public STUN server. Behind a firewall (``udp_ports``) the media sockets take ports of that range
only (an offer that finds none free gets 503); behind 1:1 NAT (``public_ip``) the answer's host
candidates carry the public address (remote/ice.py). ``codec`` makes the answer accept only that
video codec (remote/link.py). Each session's link figures (candidate type, RTT, loss, jitter,
bitrate) are in its status as ``link``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from ..control.api import BodyError, read_body
from ..control.controller import Controller, Pacer
from ..control.schema import reply_message
from ..io.sinks import Sink
from .ice import advertise_public_ip, constrain_udp_ports, rtc_configuration
from .link import LinkStats, prefer_codec
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Histogram, render
from .media import PtsBook, PtsPipeline, TrackSink, TrackSource, frames_lost, outgoing_track, recv_newest
from .picture import PictureAssembler, announce_of

log = logging.getLogger("live2diff.webrtc")

SESSION_IDLE_S = 3.0  # a session whose video ended cleanly is freed this long after its engine is done
SESSION_GRACE_S = 10.0  # no video from the peer this long: it is gone (ICE consent alone takes 30 s)
FIRST_FRAME_S = 20.0  # a new session that never sends video is freed after this
RETRY_AFTER_S = 5
ENGINE_COOKIE = "l2d_engine"  # the 503 "starting" names the engine made for that offer; the client's next offer
# (a browser sends the cookie by itself, `connect` sends it back) takes that engine and makes no other
QUEUE_COOKIE = "l2d_queued"  # a fleet front with --queue-s: when this client's wait for a GPU began (wall
# clock), so that a wait longer than one request (each answered within fleet.ANSWER_S) goes on where it was
MAX_SDP_BYTES = 64 * 1024
MAX_CHANNEL_PENDING = 1024  # data-channel messages waiting for the pacer; beyond: refused at once


def gpu_memory_bytes(devices: list[str]) -> int | None:
    """What this process holds on these CUDA devices (torch's caching allocator, reserved), None without any."""
    if not devices:
        return None
    try:
        import torch

        return sum(int(torch.cuda.memory_reserved(d)) for d in devices)
    except Exception:
        return None


class NoFreePort(Exception):
    """--udp-ports has no free port left for another peer connection (the text: the reply's line)."""


@dataclass
class Slot:
    """One stream's worth of model state: a frame pipeline and its style manager."""

    frames: object
    manager: object
    label: str
    busy: bool = False
    # Seconds a prompt/style/seed change takes when its command names none (the config's
    # [control] transition_s), given to each session's controller.
    transition_s: float = 0.0


@dataclass
class Session:
    id: str
    pc: object
    slot: Slot
    source: TrackSource
    track: object
    controller: Controller
    engine: object = None
    pipeline: object = None  # the PtsPipeline: which input each output came from
    sink: object = None  # the TrackSink onto the peer's return track (None: a send-only client)
    thread: threading.Thread | None = None
    channel: object = None
    created: float = field(default_factory=time.monotonic)
    ended: bool = False
    why: str = ""
    input_ended: bool = False  # the client's video ended cleanly: what is in flight still goes back
    finished_at: float | None = None  # when the engine was done with it
    resumed: int = 0  # new peer connections that took the place of a cut one (PATCH)
    link: LinkStats = field(default_factory=LinkStats)
    latency: Histogram = field(default_factory=Histogram)  # capture to output of each frame after the warmup


class ChannelControl:
    """The data channel ``control`` as one more control transport: each message goes to the
    session's controller (validated there) at most Pacer's rate; replies and status go back."""

    def __init__(self, channel, controller: Controller, loop: asyncio.AbstractEventLoop, link=lambda: {},
                 every: float = 1.0):
        self.channel, self.controller, self.loop = channel, controller, loop
        self.every = every  # the status goes out at least this often (a fleet's client reads its silence)
        self.link = link  # figures of the session's link added to each status (frames lost on the way in)
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.pacer = Pacer()
        self.changed = asyncio.Event()
        self.tasks = [loop.create_task(self._reader()), loop.create_task(self._status())]
        self.picture = PictureAssembler(self._reply, controller.submit_style_image, self._refused)  # remote/picture.py
        controller.add_listener(self._notify)
        channel.on("message", self._on_message)
        channel.on("close", self.close)

    def _notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.changed.set)
        except RuntimeError:
            pass

    def send(self, msg: dict) -> None:
        if self.channel.readyState == "open":
            try:
                self.channel.send(json.dumps(msg))
            except Exception:
                pass

    def _refused(self) -> None:
        self.controller.refused += 1

    def _reply(self, msg: dict) -> None:  # from any thread
        try:
            self.loop.call_soon_threadsafe(self.send, msg)
        except RuntimeError:
            pass

    def _on_message(self, message) -> None:
        # A style picture: its announce and its bytes are taken here, in order, never queued behind
        # the pacer (the bytes follow the announce at once).
        if isinstance(message, (bytes, bytearray)):
            self.picture.add(message)
            return
        announce = announce_of(message)
        if announce is not None:
            self.picture.announce(announce)
            return
        if self.inbox.qsize() >= MAX_CHANNEL_PENDING:
            self.controller.refused += 1
            self.send(reply_message(None, False, "busy: too many messages waiting; slow down"))
            return
        self.inbox.put_nowait(message)

    async def _reader(self) -> None:
        while True:
            raw = await self.inbox.get()
            wait = self.pacer.delay()
            if wait:
                await asyncio.sleep(wait)
            self.controller.submit(raw, self._reply)

    async def _status(self) -> None:
        while True:
            self.send({**self.controller.status_message(), **self.link()})
            try:
                await asyncio.wait_for(self.changed.wait(), self.every)
            except asyncio.TimeoutError:
                pass
            self.changed.clear()
            await asyncio.sleep(0.1)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.controller.remove_listener(self._notify)


class ViewSink(Sink):
    """The session's outputs to the viewers (``view_sinks``: the MJPEG stream, WHEP) while it is
    the current session (the oldest running)."""

    paced = False
    name = "viewers"

    def __init__(self, service: "WebRtcService", session: Session):
        self.service, self.session = service, session

    def send(self, frame) -> None:
        if self.service.current() is self.session:
            for sink in list(self.service.view_sinks):
                try:
                    sink.send(frame)
                except Exception:
                    pass


class Viewer(Sink):
    """A WHEP viewer: the frames shown to viewers go out on its track, timed by the clock."""

    paced = False
    name = "WHEP viewer"

    def __init__(self, vid: str, pc, track):
        self.id, self.pc, self.track = vid, pc, track
        self.t0 = time.monotonic()
        self.sent = 0

    def send(self, frame) -> None:
        self.sent += 1
        self.track.frames.put((frame, int((time.monotonic() - self.t0) * 90_000) + 1))


class WebRtcService:
    """The WHIP/WHEP endpoints and the sessions. Runs on the API's event loop; each session's
    engine runs on a thread of its own."""

    def __init__(self, slots: list[Slot], *, ice_servers: list[dict] | None = None, make_engine=None,
                 on_change=None, say=None, fps: float = 30.0, session_grace: float = SESSION_GRACE_S,
                 udp_ports: tuple[int, int] | None = None, public_ip: str | None = None, codec: str | None = None,
                 status_every: float = 1.0, relay_only: bool = False):
        self.slots = slots
        self.status_every = status_every  # the data channel's status, at least this often
        self.session_grace = session_grace
        self.udp_ports, self.public_ip, self.codec = udp_ports, public_ip, codec
        self.ice_servers = list(ice_servers or [])
        self.relay_only = relay_only  # --ice-relay-only: media through the TURN server only (remote/ice.py)
        self.make_engine = make_engine  # (session, pipeline, sinks) -> Engine
        self.on_change = on_change or (lambda: None)  # sessions started or ended (any thread)
        self.say = say or (lambda text: None)
        self.fps = fps
        self.sessions: dict[str, Session] = {}
        self.viewers: dict[str, object] = {}
        self.view_sinks: list = []  # sinks that show the current session (the API's MJPEG stream, WHEP viewers)
        self.max_viewers = 4
        self.loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.Task | None = None
        self.served = 0
        # /metrics: this machine as the one node; counters over every session, ended ones included
        self.node = socket.gethostname() or "localhost"
        self.address = ""  # the API's URL, once it listens (commands/serve.py)
        self.latency = Histogram()
        self.ended_frames = [0, 0]  # frames in, out of the sessions that ended

    @property
    def max_sessions(self) -> int:
        return len(self.slots)

    def current(self) -> Session | None:
        live = [s for s in self.sessions.values() if not s.ended]
        return min(live, key=lambda s: s.created) if live else None

    def add_routes(self, app) -> None:
        app.router.add_post("/whip", self._whip)
        app.router.add_delete("/whip/{id}", self._whip_delete)
        app.router.add_patch("/whip/{id}", self._whip_patch)
        app.router.add_route("OPTIONS", "/whip", self._options)
        app.router.add_get("/studio", self._studio)
        app.router.add_post("/whep", self._whep)
        app.router.add_delete("/whep/{id}", self._whep_delete)
        app.router.add_route("OPTIONS", "/whep", self._options)
        app.router.add_get("/metrics", self._metrics)
        app.on_shutdown.append(self._on_shutdown)

    # -- WHIP --------------------------------------------------------------------------------

    def _peer_connection(self):
        """A new peer connection on this loop, its sockets in ``udp_ports``; with ``codec``, a
        video transceiver that accepts only that codec, made before the offer is applied."""
        from aiortc import RTCPeerConnection

        if self.udp_ports is not None:
            constrain_udp_ports(asyncio.get_running_loop(), self.udp_ports)
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers, self.relay_only))
        if self.codec:
            prefer_codec(pc.addTransceiver("video", direction="recvonly"), self.codec)
        return pc

    def _answer(self, pc) -> str:
        sdp = pc.localDescription.sdp
        return advertise_public_ip(sdp, self.public_ip) if self.public_ip else sdp

    def _offer_error(self, exc: Exception) -> str:
        if self.codec and "send parameters" in str(exc):
            return f"the offer has no {self.codec.upper()} video, and this engine takes only that (serve --codec {self.codec})"
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__

    def _no_port(self) -> str | None:
        """With ``udp_ports`` all taken, the line that says so (the answer would have no candidate)."""
        if self.udp_ports is None:
            return None
        lo, hi = self.udp_ports
        self.say(f"a stream was refused: no free UDP port in --udp-ports {lo}-{hi}; widen the range")
        return f"busy: no free UDP port in this engine's --udp-ports {lo}-{hi} for another stream\n"

    async def _options(self, request):
        from aiohttp import web

        return web.Response(status=204, headers={"Accept-Post": "application/sdp"})

    @staticmethod
    async def read_offer(request):
        """The offer's text, or the response that refuses it (before any session or slot exists)."""
        from aiohttp import web

        if request.content_type != "application/sdp":
            return web.Response(status=415, text="send the SDP offer with Content-Type: application/sdp\n")
        try:  # whole, however many pieces it comes in; over the cap refused unread
            body = await read_body(request, MAX_SDP_BYTES, "the SDP offer")
        except BodyError as exc:
            return web.Response(status=exc.status, text=exc.text + "\n")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return web.Response(status=400, text="the SDP offer is not UTF-8 text\n")

    def _retry_after(self) -> int:
        """Seconds until a slot may free: the rest of the grace of a session whose link is cut (no
        video for a while), else RETRY_AFTER_S."""
        now, waits = time.monotonic(), []
        for s in self.sessions.values():
            last = s.source.last_frame_at
            if not s.ended and not s.input_ended and last is not None and now - last > 1.0:
                waits.append(self.session_grace - (now - last))
        return max(1, min(RETRY_AFTER_S, math.ceil(min(waits)))) if waits else RETRY_AFTER_S

    async def _whip(self, request):
        sdp = await self.read_offer(request)
        if not isinstance(sdp, str):
            return sdp
        return await self.open(sdp)

    async def open(self, sdp: str):
        """A new session answering the offer ``sdp`` (POST /whip, or a fleet front's forwarded
        offer): the response to give (201 with the answer, 503, 400)."""
        from aiohttp import web

        self.loop = asyncio.get_running_loop()
        if self._watch is None:
            self._watch = self.loop.create_task(self._watchdog())
        slot = next((s for s in self.slots if not s.busy), None)
        if slot is None:
            n = self.max_sessions
            return web.Response(
                status=503, headers={"Retry-After": str(self._retry_after())},
                text=f"busy: this engine serves {n} stream{'s' if n != 1 else ''} at a time (--max-sessions {n}) and "
                f"{'it is' if n == 1 else 'all are'} in use; try again when one ends\n",
            )
        slot.busy = True
        sid = secrets.token_urlsafe(12)
        book = PtsBook()
        source = TrackSource(book, name=f"remote camera ({sid[:6]})", fps=self.fps)
        controller = Controller(slot.frames, slot.manager, label=slot.label)
        controller.default_transition_s = slot.transition_s
        session = Session(sid, None, slot, source, None, controller)
        try:
            session.pc, session.track = await self._peer(session, sdp, "Live2Diff: connected", "warming up ...")
        except NoFreePort as exc:
            slot.busy = False
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)}, text=str(exc))
        except ValueError as exc:
            slot.busy = False
            return web.Response(status=400, text=f"cannot use this offer: {exc}\n")
        self.sessions[sid] = session
        self._start_engine(session)
        self.loop.create_task(self._sample_link(session))
        self.served += 1
        self.say(f"session {sid[:6]} started ({len(self.sessions)} of {self.max_sessions})")
        self.on_change()
        return web.Response(status=201, text=self._answer(session.pc), content_type="application/sdp",
                            headers={"Location": f"/whip/{sid}", "ETag": f'"{sid}"'})

    async def _peer(self, session: Session, sdp: str, card: str, subtitle: str):
        """A peer connection for ``session`` answering ``sdp``: its video goes to the session's
        source, the stylised video comes back on a new track (first ``card`` at pts 0), its data
        channel ``control`` to the session's controller. Returns (pc, track or None for a send-only
        offer); a bad offer raises ValueError (one line) with nothing left open, NoFreePort when
        --udp-ports has no port left for it."""
        from aiortc import RTCSessionDescription

        pc = self._peer_connection()
        slot = session.slot
        track = outgoing_track((slot.frames.width, slot.frames.height, card, subtitle))
        got_video = False

        @pc.on("track")
        def on_track(remote):
            nonlocal got_video
            if remote.kind == "video" and not got_video:
                got_video = True
                self.loop.create_task(self._pump(session, pc, remote))
            else:  # audio (OBS sends its mix), a second video: read and dropped, so nothing piles up
                self.loop.create_task(self._drain(remote))

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label == "control" and session.pc is pc:
                if session.channel is not None:  # the cut connection's
                    session.channel.close()
                session.channel = ChannelControl(
                    channel, session.controller, self.loop,
                    lambda: {"frames_lost": frames_lost(session.pc), "frames_stale": session.source.stale},
                    every=self.status_every)

        @pc.on("connectionstatechange")
        async def on_state():
            if session.pc is not pc or session.ended:  # a connection a resume replaced, or one being set up
                return
            if pc.connectionState == "closed":  # the peer closed it: it is done with the session
                await self.end(session, "connection closed")
            elif pc.connectionState == "failed":  # a cut link: the session waits out its grace for a resume
                self.say(f"session {session.id[:6]}: connection failed; kept {self.session_grace:g} s for the "
                         "client to resume it")
                session.pc = None
                self.loop.create_task(self._close_pc(pc))

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            # What this side may do with the offered video (aiortc keeps it from our point of view).
            offered = getattr(video[0], "_offerDirection", None) if video else None
            if offered not in ("sendrecv", "recvonly"):
                raise ValueError("the offer sends no video to stylise (add the camera track)")
            if offered == "sendrecv" and (session.engine is None or session.sink is not None):
                pc.addTrack(track)
            else:  # send-only (OBS 30's WHIP output): the stylised video goes to /stream.mjpg and WHEP only
                track = None
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await self._close_pc(pc)
            raise ValueError(self._offer_error(exc)) from None
        if "a=candidate:" not in pc.localDescription.sdp and self.udp_ports is not None:
            await self._close_pc(pc)
            raise NoFreePort(self._no_port())
        return pc, track

    @staticmethod
    async def _close_pc(pc) -> None:
        try:
            await asyncio.wait_for(pc.close(), 5)
        except Exception:
            pass

    async def _whip_patch(self, request):
        """A new offer for a session whose link was cut: a new peer connection in place of the old
        one; the engine, its cache, prompt and style go on (no new warmup)."""
        from aiohttp import web

        session = self.sessions.get(request.match_info["id"])
        if session is None or session.ended:
            return web.Response(status=404, text="no such session (it ended): make a new one with POST /whip\n")
        sdp = await self.read_offer(request)
        if not isinstance(sdp, str):
            return sdp
        return await self.resume(session.id, sdp)

    async def resume(self, sid: str, sdp: str):
        """The new offer ``sdp`` for session ``sid`` (PATCH /whip/ID, or a fleet front's forwarded
        one): the response to give (200 with the answer, 404, 409, 503, 400)."""
        from aiohttp import web

        session = self.sessions.get(sid)
        if session is None or session.ended:
            return web.Response(status=404, text="no such session (it ended): make a new one with POST /whip\n")
        if session.input_ended:
            return web.Response(status=409, text="this session's video has ended: make a new one with POST /whip\n")
        try:
            pc, track = await self._peer(session, sdp, "Live2Diff: resumed", "")
        except NoFreePort as exc:
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)}, text=str(exc))
        except ValueError as exc:
            return web.Response(status=400, text=f"cannot use this offer: {exc}\n")
        if session.ended:  # ended while the answer was made
            await self._close_pc(pc)
            return web.Response(status=404, text="no such session (it ended): make a new one with POST /whip\n")
        old, session.pc = session.pc, pc
        session.resumed += 1
        # The frames still in the engine came from the old connection: their pts mean nothing on
        # the new one (the client counts pts afresh from its first frame on it), so they do not go back on it.
        session.pipeline.forget()
        if session.sink is not None and track is not None:
            stale, session.sink.track, session.track = session.sink.track, track, track
            stale.frames.close()
        if old is not None:
            self.loop.create_task(self._close_pc(old))
        self.say(f"session {session.id[:6]} resumed on a new connection (the same engine: no new warmup)")
        return web.Response(status=200, text=self._answer(pc), content_type="application/sdp",
                            headers={"Location": f"/whip/{session.id}", "ETag": f'"{session.id}"'})

    async def _studio(self, request):
        return await studio_page(request)

    # -- WHEP ---------------------------------------------------------------------------------

    async def _whep(self, request):
        """A viewer: the current session's stylised stream, read-only (nothing it sends is read)."""
        sdp = await self.read_offer(request)
        if not isinstance(sdp, str):
            return sdp
        return await self.view(sdp)

    async def view(self, sdp: str):
        """A viewer's offer read whole (POST /whep here, or a fleet front's forwarded): the response."""
        from aiohttp import web
        from aiortc import RTCSessionDescription

        self.loop = asyncio.get_running_loop()
        if len(self.viewers) >= self.max_viewers:
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                text=f"busy: {self.max_viewers} viewers already watch this engine; try again later\n")
        vid = secrets.token_urlsafe(12)
        current = self.current()
        size = (current.slot.frames.width, current.slot.frames.height) if current else (640, 360)
        track = outgoing_track((*size, "Live2Diff", "waiting for a stream ..." if current is None else "joining ..."))
        viewer = Viewer(vid, None, track)
        pc = self._peer_connection()
        viewer.pc = pc

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await self.end_viewer(viewer)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            offered = getattr(video[0], "_offerDirection", None) if video else None  # from our point of view
            if offered not in ("sendonly", "sendrecv"):
                raise ValueError("the offer receives no video (add a recvonly video transceiver)")
            pc.addTrack(track)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await pc.close()
            return web.Response(status=400, text=f"cannot use this offer: {self._offer_error(exc)}\n")
        if "a=candidate:" not in pc.localDescription.sdp and self.udp_ports is not None:
            await pc.close()
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)}, text=self._no_port())
        self.viewers[vid] = viewer
        self.view_sinks.append(viewer)
        return web.Response(status=201, text=self._answer(pc), content_type="application/sdp",
                            headers={"Location": f"/whep/{vid}", "ETag": f'"{vid}"'})

    async def _whep_delete(self, request):
        return await self.unview(request.match_info["id"])

    async def unview(self, vid: str):
        from aiohttp import web

        viewer = self.viewers.get(vid)
        if viewer is None:
            return web.Response(status=404, text="no such viewer\n")
        await self.end_viewer(viewer)
        return web.Response(status=200, text="viewer ended\n")

    async def end_viewer(self, viewer: "Viewer") -> None:
        if self.viewers.pop(viewer.id, None) is None:
            return
        try:
            self.view_sinks.remove(viewer)
        except ValueError:
            pass
        viewer.track.frames.close()
        try:
            await asyncio.wait_for(viewer.pc.close(), 5)
        except Exception:
            pass

    async def _whip_delete(self, request):
        from aiohttp import web

        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return web.Response(status=404, text="no such session\n")
        await self.end(session, "ended by the client")
        return web.Response(status=200, text="session ended\n")

    async def _pump(self, session: Session, pc, remote) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while not session.ended:
                frame, older = await recv_newest(remote)
                if session.pc is pc:  # a replaced connection's last frames are not the session's
                    session.source.stale += older
                    session.source.feed(frame)
        except MediaStreamError:  # the track ended: an RTCP BYE, or the connection going (ended elsewhere)
            if session.pc is not pc:  # a connection that a resume replaced, or a failed one: not an end
                return
            if not session.ended:
                session.input_ended = True
                session.source.end()  # the engine finishes the frames it holds, sends them, and ends
            return
        except Exception as exc:
            log.warning("session %s: receiving video failed: %s", session.id[:6], exc)
        await self.end(session, "the video track ended")

    async def _sample_link(self, session: Session) -> None:
        """The session's link figures, once a second, into its engine's status (``link``); none
        while its link is cut (no peer connection until the client resumes)."""
        while not session.ended:
            await asyncio.sleep(1.0)
            figures = None
            if session.pc is not None:
                try:
                    figures = await session.link.sample(session.pc)
                except Exception as exc:  # a connection closing under the sample
                    log.debug("session %s: link stats: %s", session.id[:6], exc)
                    continue
            if session.engine is not None and session.engine.stats.extra.get("link") != figures:
                session.engine.stats.extra["link"] = figures
                session.controller.changed()

    @staticmethod
    async def _drain(remote) -> None:
        try:
            while True:
                await remote.recv()
        except Exception:
            pass

    def _start_engine(self, session: Session) -> None:
        slot = session.slot
        slot.frames.restart()  # a fresh stream: nothing of the slot's last session remains in flight
        sinks = [ViewSink(self, session)]
        if session.track is not None:
            session.sink = TrackSink(session.track, session.source.book)
            sinks.insert(0, session.sink)
        session.pipeline = PtsPipeline(slot.frames, session.source.book, on_warm=lambda: self.say(
            f"session {session.id[:6]} warmed up"))
        engine = self.make_engine(session, session.pipeline, sinks)

        def on_latency(seconds, own=session.latency, node=self.latency):
            own.observe(seconds)
            node.observe(seconds)

        engine.on_latency = on_latency
        session.engine = engine
        session.thread = threading.Thread(target=self._run_engine, args=(session,), name=f"session-{session.id[:6]}",
                                          daemon=True)
        session.thread.start()

    def _run_engine(self, session: Session) -> None:
        try:
            session.engine.run(install_signals=False)
        except Exception as exc:
            log.warning("session %s: the engine stopped: %s", session.id[:6], exc)
        loop = self.loop
        if session.input_ended:  # its frames are out: the client ends it, or the watchdog frees it
            session.finished_at = time.monotonic()
            return
        if loop is not None and not session.ended:
            try:
                asyncio.run_coroutine_threadsafe(self.end(session, "the engine stopped"), loop)
            except RuntimeError:
                pass

    async def end(self, session: Session, why: str) -> None:
        if session.ended:
            return
        session.ended, session.why = True, why
        session.source.end()
        if session.engine is not None:
            session.engine.stop()
        if session.channel is not None:
            session.channel.close()
        if session.pc is not None:
            await self._close_pc(session.pc)
        if session.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, session.thread.join, 10)
        self.sessions.pop(session.id, None)
        session.slot.busy = False
        st = session.engine.stats if session.engine is not None else None
        if st is not None:  # its frames stay in the node's counters (no await since the pop: /metrics sees both or neither)
            self.ended_frames[0] += st.frames_in
            self.ended_frames[1] += st.frames_out
        counts = f" ({st.frames_in} frames in, {st.frames_out} out, {st.dropped} dropped for newer ones)" if st else ""
        self.say(f"session {session.id[:6]} ended: {why}{counts}")
        self.on_change()

    # -- /metrics ------------------------------------------------------------------------------

    def figures(self) -> tuple[list[dict], list[dict]]:
        """The sessions and this machine as one node, as metrics.render takes them."""
        sessions, frames_in, frames_out = [], self.ended_frames[0], self.ended_frames[1]
        for s in self.sessions.values():
            st = s.engine.stats if s.engine is not None else None
            if st is None:
                continue
            frames_in += st.frames_in
            frames_out += st.frames_out
            sessions.append({"id": s.id[:6], "node": self.node, "state": "ended" if s.ended else st.state,
                             "frames_in": st.frames_in, "frames_out": st.frames_out, "fps": st.fps_out,
                             "fps_in": st.fps_in, "latency_ms_p50": st.latency_ms_p50,
                             "latency_ms_p95": st.latency_ms_p95, "latency": s.latency})
        devices = {}
        for slot in self.slots:
            device = getattr(getattr(slot.frames, "comps", None), "device", None)
            if device is not None and str(device).startswith("cuda"):
                devices[str(device)] = devices.get(str(device), False) or slot.busy
        node = {"id": self.node, "address": self.address, "gpus": len(devices),
                "gpus_free": sum(not busy for busy in devices.values()),
                "warm_engines": sum(not slot.busy for slot in self.slots), "max_sessions": self.max_sessions,
                "gpu_memory_bytes": gpu_memory_bytes(list(devices)), "sessions_started": self.served,
                "frames_in": frames_in, "frames_out": frames_out, "latency": self.latency}
        return sessions, [node]

    async def _metrics(self, request):
        """Prometheus' text format (remote/metrics.py); behind the API's guard (the token) as every route."""
        from aiohttp import web

        body = render(*self.figures())
        return web.Response(body=body.encode("utf-8"), headers={"Content-Type": METRICS_TYPE})

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                last = s.source.last_frame_at
                if s.input_ended:  # no video is expected: the engine finishes what it holds first
                    if s.finished_at is not None and now - s.finished_at > SESSION_IDLE_S:
                        await self.end(s, "its video ended")
                    continue
                if last is None and now - s.created > FIRST_FRAME_S:
                    await self.end(s, f"no video within {FIRST_FRAME_S:.0f} s")
                elif last is not None and now - last > self.session_grace:
                    await self.end(s, f"no video for {self.session_grace:g} s (--session-grace): the peer is gone")

    async def _on_shutdown(self, app) -> None:
        await self.close()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        # All at once: each waits for its engine's frame in flight, so one after another would add up.
        await asyncio.gather(*(self.end(s, "the engine is stopping") for s in list(self.sessions.values())),
                             *(self.end_viewer(v) for v in list(self.viewers.values())), return_exceptions=True)


async def studio_page(request):
    """The studio page (plugin/studio.html): the browser's camera to the engine and back (served by
    `serve` and by a fleet front alike)."""
    from aiohttp import web

    from ..control.api import dock_dir

    folder = dock_dir()
    page = folder / "studio.html" if folder is not None else None
    if page is None or not page.is_file():
        return web.Response(status=404, text="the studio page is not installed (plugin/ is missing)\n")
    # No Referer: the link may hold the token until the page takes it out (plugin/studio.js).
    return web.Response(body=page.read_bytes(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"})
