"""A real WebRTC client (aiortc) for the `serve` tests: sends synthetic frames numbered by pts
(frame i at pts i * 3000, the 90 kHz clock at 30 fps), receives the stylised track, talks over
the data channel ``control``.

Used in-process (``WhipClient``) and as a process of its own that a test can kill:

    python whip_client.py URL [--token T] [--fps F] [--size WxH] [--print-answer] [--endpoint /whep?...]
    (runs until killed; prints one JSON line per second: {"sent": n, "received": m}; first
    {"status": s, "location": L}; an endpoint under /whep makes it a receive-only viewer)
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import sys
import time

import numpy as np

CLOCK = 90_000
PERIOD = 3000  # pts between frames
PTS_SHIFT = 3000  # what the engine adds to the pts of each output (live2diff_engine/remote/media.py)


def pattern(i: int, size) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 4 + i * 8) % 256, (yy * 4) % 256, ((xx + yy) * 2 + i * 3) % 256], axis=-1).astype(np.uint8)
    return img


class WhipClient:
    def __init__(self, url: str, *, token: str | None = None, fps: float = 10.0, size=(64, 48), frames: int | None = None,
                 direction: str = "sendrecv", endpoint: str = "/whip", grain: bool = False):
        self.url, self.token, self.fps, self.size, self.limit = url.rstrip("/"), token, fps, size, frames
        self.direction, self.endpoint = direction, endpoint
        self.grain = grain  # noise on every frame: frames of many packets (the pattern alone is one or two)
        self.sent = 0
        self.sent_at: dict[int, float] = {}  # frame index -> when it went to the encoder
        self.received: list[tuple[int, tuple[int, int], float]] = []  # (pts, (w, h), monotonic time)
        self.images: list[np.ndarray] = []
        self.messages: list[dict] = []
        self.replies: dict = {}
        self.status: dict | None = None
        self.pc = None
        self.channel = None
        self.location = None
        self.answer_status = None
        self.answer_headers = {}
        self.answer_text = ""
        self._tasks = []
        self.channel_open = None

    def headers(self, ctype="application/sdp"):
        h = {"Content-Type": ctype}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def start(self) -> int:
        """Offer, answer; returns the HTTP status of the POST (201 when served)."""
        import aiohttp
        from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

        client = self

        class Camera(MediaStreamTrack):
            kind = "video"

            def __init__(self):
                super().__init__()
                self.i = 0
                self.t0 = None

            async def recv(self):
                import av

                if client.limit is not None and self.i >= client.limit:
                    await asyncio.sleep(3600)
                if self.t0 is None:
                    self.t0 = time.monotonic()
                due = self.t0 + self.i / client.fps
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                image = pattern(self.i, client.size)
                if client.grain:
                    image = image ^ np.random.default_rng(self.i).integers(0, 64, image.shape, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = self.i * PERIOD
                frame.time_base = fractions.Fraction(1, CLOCK)
                client.sent_at[self.i] = time.monotonic()
                self.i += 1
                client.sent = self.i
                return frame

        self.channel_open = asyncio.Event()
        from live2diff_engine.remote.ice import rtc_configuration

        # As the engine's own peers: its jitter buffer (the last frame comes without waiting for a
        # next one) and, under LIVE2DIFF_ICE_LOOPBACK (tests/conftest.py), media on 127.0.0.1 only.
        pc = RTCPeerConnection(rtc_configuration([]))
        self.pc = pc
        if self.direction == "recvonly":  # a WHEP viewer
            pc.addTransceiver("video", direction="recvonly")
        else:
            pc.addTransceiver(Camera(), direction=self.direction)
        self.channel = pc.createDataChannel("control")

        @self.channel.on("open")
        def _open():
            self.channel_open.set()

        @self.channel.on("message")
        def _message(m):
            msg = json.loads(m)
            self.messages.append(msg)
            if msg.get("kind") == "status":
                self.status = msg
            elif msg.get("kind") == "reply":
                self.replies.setdefault(msg.get("id"), msg)

        @pc.on("track")
        def _track(track):
            if track.kind == "video":
                self._tasks.append(asyncio.get_running_loop().create_task(self._receive(track)))

        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(self.url + self.endpoint, data=pc.localDescription.sdp, headers=self.headers(),
                                 ssl=False if self.url.startswith("https") else None) as resp:  # a test's own certificate
                self.answer_status = resp.status
                self.answer_headers = dict(resp.headers)
                self.answer_text = await resp.text()
                if resp.status != 201:
                    await pc.close()
                    return resp.status
                self.location = resp.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=self.answer_text, type="answer"))
        return 201

    async def _receive(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                pts = int(round(frame.pts * frame.time_base * CLOCK))
                self.received.append((pts, (frame.width, frame.height), time.monotonic()))
                if len(self.images) < 400:
                    self.images.append(frame.to_ndarray(format="rgb24"))
        except Exception:
            pass

    def sent_index(self, pts: int) -> int | None:
        """Which sent frame a returned pts belongs to (None: the card at pts 0)."""
        if pts == 0:
            return None
        return round((pts - PTS_SHIFT) / PERIOD)  # the clock conversions on the way round to +-1

    def round_trips(self, since: float = 0.0) -> list[float]:
        """Seconds from sending to getting back, for each frame back at or after ``since`` (monotonic)."""
        out = []
        for pts, _, at in self.received:
            i = self.sent_index(pts)
            if i is not None and at >= since and i in self.sent_at:
                out.append(at - self.sent_at[i])
        return out

    def selected_pair(self):
        """The addresses of the ICE candidate pair the media uses: ((local ip, port), (remote ip, port))."""
        transport = self.pc.getTransceivers()[0].receiver.transport.transport
        pair = transport._connection._nominated.get(1)  # aioice's nominated pair for the (bundled) component
        return None if pair is None else (tuple(pair.local_addr), tuple(pair.remote_addr))

    async def command(self, msg: dict, timeout: float = 120.0) -> dict:
        await asyncio.wait_for(self.channel_open.wait(), timeout)
        self.channel.send(json.dumps(msg))
        t = time.monotonic()
        while msg.get("id") not in self.replies:
            if time.monotonic() - t > timeout:
                raise TimeoutError(f"no reply to {msg}")
            await asyncio.sleep(0.05)
        return self.replies[msg["id"]]

    async def delete(self) -> int:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.delete(self.url + self.location, headers=self.headers("text/plain"),
                                   ssl=False if self.url.startswith("https") else None) as resp:
                return resp.status

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.pc is not None:
            await self.pc.close()


async def wait_for(cond, timeout: float, what: str) -> None:
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        await asyncio.sleep(0.05)


async def _main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--token")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--size", default="64x48")
    p.add_argument("--print-answer", action="store_true", help="print the SDP answer as a JSON line too")
    p.add_argument("--endpoint", default="/whip")
    a = p.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    c = WhipClient(a.url, token=a.token, fps=a.fps, size=(w, h), endpoint=a.endpoint,
                   direction="recvonly" if a.endpoint.startswith("/whep") else "sendrecv")
    code = await c.start()
    print(json.dumps({"status": code, "location": c.location, "text": "" if code == 201 else c.answer_text}), flush=True)
    if a.print_answer:
        print(json.dumps({"answer": c.answer_text}), flush=True)
    if code != 201:
        return 1
    while True:
        await asyncio.sleep(1.0)
        print(json.dumps({"sent": c.sent, "received": len(c.received)}), flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
