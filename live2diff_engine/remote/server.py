"""WebRTC signalling for `serve`: WHIP (RFC 9725) sessions and WHEP viewers, on the local API.

    POST   /whip            an SDP offer (Content-Type: application/sdp) with the client's camera
                            track -> 201 Created, the SDP answer, Location: /whip/ID. The answer
                            sends the stylised video back on the same peer connection; a data
                            channel named ``control`` carries the command schema both ways
                            (commands in, replies and status out).
    DELETE /whip/ID         ends that session.
    POST   /whep            an SDP offer (receive-only video) -> the stylised stream of the current
                            session (the oldest one running), read-only.
    DELETE /whep/ID         ends that viewer.
    GET    /studio          a page: the browser's camera to the engine, the stylised video beside it,
                            the dock's controls over the data channel.

Sessions: at most ``max_sessions`` (default 1): another offer gets 503, a Retry-After and one line.
A session whose peer goes away (closed, failed, or no video for SESSION_IDLE_S) is freed.

The end of the client's video (its track stopped: an RTCP BYE, as `connect` sends at the end of
its input) is an end, not a cut: the session's engine finishes every frame it holds and sends it
back, as `run` does at the end of a file; the client then ends the session (DELETE), or it is freed
SESSION_IDLE_S after the engine is done.

The routes sit behind the API's guard: beyond loopback every request needs the token, on
loopback the Host header must name this machine. Nothing that arrives names a file or code: the
data channel's messages go through the same validation as every other control path.

ICE servers are the ones given (``ice_servers``), none by default: aiortc would otherwise ask a
public STUN server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

from ..control.controller import Controller, Pacer
from ..control.schema import reply_message
from ..io.sinks import Sink
from .ice import rtc_configuration
from .media import PtsBook, PtsPipeline, TrackSink, TrackSource, frames_lost, outgoing_track, recv_newest

log = logging.getLogger("live2diff.webrtc")

SESSION_IDLE_S = 3.0  # no video from the peer this long: it is gone (ICE consent alone takes 30 s)
FIRST_FRAME_S = 20.0  # a new session that never sends video is freed after this
RETRY_AFTER_S = 5
MAX_SDP_BYTES = 64 * 1024
MAX_CHANNEL_PENDING = 1024  # data-channel messages waiting for the pacer; beyond: refused at once


@dataclass
class Slot:
    """One stream's worth of model state: a frame pipeline and its style manager."""

    frames: object
    manager: object
    label: str
    busy: bool = False


@dataclass
class Session:
    id: str
    pc: object
    slot: Slot
    source: TrackSource
    track: object
    controller: Controller
    engine: object = None
    thread: threading.Thread | None = None
    channel: object = None
    created: float = field(default_factory=time.monotonic)
    ended: bool = False
    why: str = ""
    input_ended: bool = False  # the client's video ended cleanly: what is in flight still goes back
    finished_at: float | None = None  # when the engine was done with it


class ChannelControl:
    """The data channel ``control`` as one more control transport: each message goes to the
    session's controller (validated there) at most Pacer's rate; replies and status go back."""

    def __init__(self, channel, controller: Controller, loop: asyncio.AbstractEventLoop, link=lambda: {}):
        self.channel, self.controller, self.loop = channel, controller, loop
        self.link = link  # figures of the session's link added to each status (frames lost on the way in)
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.pacer = Pacer()
        self.changed = asyncio.Event()
        self.tasks = [loop.create_task(self._reader()), loop.create_task(self._status())]
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

    def _on_message(self, message) -> None:
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

            def reply(msg, loop=self.loop):
                try:
                    loop.call_soon_threadsafe(self.send, msg)
                except RuntimeError:
                    pass

            self.controller.submit(raw, reply)

    async def _status(self) -> None:
        while True:
            self.send({**self.controller.status_message(), **self.link()})
            try:
                await asyncio.wait_for(self.changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self.changed.clear()
            await asyncio.sleep(0.1)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()


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
                 on_change=None, say=None, fps: float = 30.0):
        self.slots = slots
        self.ice_servers = list(ice_servers or [])
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

    @property
    def max_sessions(self) -> int:
        return len(self.slots)

    def current(self) -> Session | None:
        live = [s for s in self.sessions.values() if not s.ended]
        return min(live, key=lambda s: s.created) if live else None

    def add_routes(self, app) -> None:
        app.router.add_post("/whip", self._whip)
        app.router.add_delete("/whip/{id}", self._whip_delete)
        app.router.add_route("OPTIONS", "/whip", self._options)
        app.router.add_get("/studio", self._studio)
        app.router.add_post("/whep", self._whep)
        app.router.add_delete("/whep/{id}", self._whep_delete)
        app.router.add_route("OPTIONS", "/whep", self._options)
        app.on_shutdown.append(self._on_shutdown)

    # -- WHIP --------------------------------------------------------------------------------

    async def _options(self, request):
        from aiohttp import web

        return web.Response(status=204, headers={"Accept-Post": "application/sdp"})

    async def _read_offer(self, request):
        from aiohttp import web

        if request.content_type != "application/sdp":
            raise web.HTTPUnsupportedMediaType(text="send the SDP offer with Content-Type: application/sdp\n")
        body = await request.content.read(MAX_SDP_BYTES + 1)
        if len(body) > MAX_SDP_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_SDP_BYTES, actual_size=len(body),
                                                text=f"SDP offer too large (at most {MAX_SDP_BYTES} bytes)\n")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise web.HTTPBadRequest(text="the SDP offer is not UTF-8 text\n") from None

    async def _whip(self, request):
        from aiohttp import web
        from aiortc import RTCPeerConnection, RTCSessionDescription

        self.loop = asyncio.get_running_loop()
        if self._watch is None:
            self._watch = self.loop.create_task(self._watchdog())
        sdp = await self._read_offer(request)
        slot = next((s for s in self.slots if not s.busy), None)
        if slot is None:
            n = self.max_sessions
            return web.Response(
                status=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                text=f"busy: this engine serves {n} stream{'s' if n != 1 else ''} at a time (--max-sessions {n}) and "
                f"{'it is' if n == 1 else 'all are'} in use; try again when one ends\n",
            )
        slot.busy = True
        sid = secrets.token_urlsafe(12)
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
        book = PtsBook()
        source = TrackSource(book, name=f"remote camera ({sid[:6]})", fps=self.fps)
        track = outgoing_track((slot.frames.width, slot.frames.height, "Live2Diff: connected", "warming up ..."))
        controller = Controller(slot.frames, slot.manager, label=slot.label)
        session = Session(sid, pc, slot, source, track, controller)
        got_video = False

        @pc.on("track")
        def on_track(remote):
            nonlocal got_video
            if remote.kind == "video" and not got_video:
                got_video = True
                self.loop.create_task(self._pump(session, remote))
            else:  # audio (OBS sends its mix), a second video: read and dropped, so nothing piles up
                self.loop.create_task(self._drain(remote))

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label == "control" and session.channel is None:
                session.channel = ChannelControl(channel, controller, self.loop,
                                                 lambda: {"frames_lost": frames_lost(pc), "frames_stale": source.stale})

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await self.end(session, f"connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            # What this side may do with the offered video (aiortc keeps it from our point of view).
            offered = getattr(video[0], "_offerDirection", None) if video else None
            if offered not in ("sendrecv", "recvonly"):
                raise ValueError("the offer sends no video to stylise (add the camera track)")
            if offered == "sendrecv":
                pc.addTrack(track)
            else:  # send-only (OBS 30's WHIP output): the stylised video goes to /stream.mjpg and WHEP only
                session.track = None
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            slot.busy = False
            await pc.close()
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return web.Response(status=400, text=f"cannot use this offer: {msg}\n")
        self.sessions[sid] = session
        self._start_engine(session)
        self.served += 1
        self.say(f"session {sid[:6]} started ({len(self.sessions)} of {self.max_sessions})")
        self.on_change()
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whip/{sid}", "ETag": f'"{sid}"'})

    async def _studio(self, request):
        """The studio page (plugin/studio.html): the browser's camera to the engine and back."""
        from aiohttp import web

        from ..control.api import dock_dir

        folder = dock_dir()
        page = folder / "studio.html" if folder is not None else None
        if page is None or not page.is_file():
            return web.Response(status=404, text="the studio page is not installed (plugin/ is missing)\n")
        return web.Response(body=page.read_bytes(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    # -- WHEP ---------------------------------------------------------------------------------

    async def _whep(self, request):
        """A viewer: the current session's stylised stream, read-only (nothing it sends is read)."""
        from aiohttp import web
        from aiortc import RTCPeerConnection, RTCSessionDescription

        self.loop = asyncio.get_running_loop()
        sdp = await self._read_offer(request)
        if len(self.viewers) >= self.max_viewers:
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                text=f"busy: {self.max_viewers} viewers already watch this engine; try again later\n")
        vid = secrets.token_urlsafe(12)
        current = self.current()
        size = (current.slot.frames.width, current.slot.frames.height) if current else (640, 360)
        track = outgoing_track((*size, "Live2Diff", "waiting for a stream ..." if current is None else "joining ..."))
        viewer = Viewer(vid, None, track)
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
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
            msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return web.Response(status=400, text=f"cannot use this offer: {msg}\n")
        self.viewers[vid] = viewer
        self.view_sinks.append(viewer)
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whep/{vid}", "ETag": f'"{vid}"'})

    async def _whep_delete(self, request):
        from aiohttp import web

        viewer = self.viewers.get(request.match_info["id"])
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

    async def _pump(self, session: Session, remote) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while not session.ended:
                frame, older = await recv_newest(remote)
                session.source.stale += older
                session.source.feed(frame)
        except MediaStreamError:  # the track ended: an RTCP BYE, or the connection going (ended elsewhere)
            if not session.ended:
                session.input_ended = True
                session.source.end()  # the engine finishes the frames it holds, sends them, and ends
            return
        except Exception as exc:
            log.warning("session %s: receiving video failed: %s", session.id[:6], exc)
        await self.end(session, "the video track ended")

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
            sinks.insert(0, TrackSink(session.track, session.source.book))
        engine = self.make_engine(session, PtsPipeline(slot.frames, session.source.book), sinks)
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
        try:
            await asyncio.wait_for(session.pc.close(), 5)
        except Exception:
            pass
        if session.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, session.thread.join, 10)
        self.sessions.pop(session.id, None)
        session.slot.busy = False
        st = session.engine.stats if session.engine is not None else None
        counts = f" ({st.frames_in} frames in, {st.frames_out} out, {st.dropped} dropped for newer ones)" if st else ""
        self.say(f"session {session.id[:6]} ended: {why}{counts}")
        self.on_change()

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
                elif last is not None and now - last > SESSION_IDLE_S:
                    await self.end(s, f"no video for {SESSION_IDLE_S:.0f} s: the peer is gone")

    async def _on_shutdown(self, app) -> None:
        await self.close()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for s in list(self.sessions.values()):
            await self.end(s, "the engine is stopping")
        for v in list(self.viewers.values()):
            await self.end_viewer(v)
