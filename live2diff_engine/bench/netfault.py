"""A bad network on 127.0.0.1: a UDP relay between `connect` (or any WHIP client) and `serve` that
delays, jitters, drops (in bursts), reorders and cuts (outage windows) the datagrams of the media,
both ways. This kernel has no netem, so the faults are made here.

    python -m live2diff_engine.bench.netfault http://127.0.0.1:8765 [--delay-ms 50] [--jitter-ms 10]
        [--loss 0.05] [--burst 3] [--reorder 0.01] [--outage 30:2.5] [--refuse PATCH]
        (prints the URL to give connect, then each request it forwards)

How the media gets into the relay: the relay is also the signalling hop. It is an HTTP proxy in
front of the engine's API: every request goes through unchanged, except the SDP of a WHIP/WHEP
offer (a new session's POST or a resumed session's PATCH) and its answer, whose ICE candidates it rewrites to point at a pair of its own UDP sockets
(the client's candidate becomes the relay's server-facing socket, the server's candidate the
relay's client-facing one). Each peer then sees the other at the relay's address and nothing else,
so every datagram (ICE checks, DTLS, RTP, RTCP, the data channel) crosses the faults; this is what
a media relay behind a session border controller does, with no TURN or peer change needed. It
handles peers whose candidates are on 127.0.0.1 (see ``live2diff_engine.remote.ice.LOOPBACK_ENV``):
the relay forwards only to loopback.

Besides the faults of every datagram (``Faults``), a caller can cut the link at will
(``faults.cut = True``, then False: a Wi-Fi blip of the length it wants), have the relay answer
chosen HTTP methods with 405 as an older engine would (``Relay(..., refuse=("PATCH",))``: one
without session resume), and read what the signalling did (``relay.requests``: the method, path
and status of every request, in order).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)( typ .*)$", re.IGNORECASE)


@dataclass
class Faults:
    """What the link does to every datagram, each way on its own."""

    delay_ms: float = 0.0  # one way
    jitter_ms: float = 0.0  # + uniform 0..jitter on top of the delay (datagrams may overtake each other)
    loss: float = 0.0  # the share of datagrams dropped (0.05: 5 %), in runs of mean length ``burst``
    burst: float = 1.0
    reorder: float = 0.0  # the share held back one more delay + jitter + 5 ms (arriving after later ones)
    outages: list[tuple[float, float]] = field(default_factory=list)  # (start s after the first datagram, length s)
    # Video frames whose RTP packets (retransmissions too) never get through on the way up:
    # (first, count), numbered from 0 in the order their RTP timestamps first pass the relay.
    up_frames_lost: list[tuple[int, int]] = field(default_factory=list)
    # The share of video frames whose last packet's first transmission is dropped, each way (its
    # retransmission, on the RTX stream, goes through): the loss that only the next frame reveals.
    tails_lost: float = 0.0
    # Switched on and off by the caller while the link runs (a test, a bench): every datagram both
    # ways is dropped while it is on, counted as ``cut`` like an outage's.
    cut: bool = False
    seed: int | None = None

    def describe(self) -> str:
        parts = [f"delay {self.delay_ms:g} ms", f"jitter {self.jitter_ms:g} ms", f"loss {self.loss * 100:g} %"]
        if self.loss and self.burst > 1:
            parts.append(f"bursts of {self.burst:g}")
        if self.reorder:
            parts.append(f"reorder {self.reorder * 100:g} %")
        parts += [f"outage {s:g}+{d:g} s" for s, d in self.outages]
        if self.cut:
            parts.append("cut")
        parts += [f"video frames {a}-{a + n - 1} lost on the way up" for a, n in self.up_frames_lost if n > 0]
        if self.tails_lost:
            parts.append(f"last packet of {self.tails_lost * 100:g} % of frames lost")
        return ", ".join(parts)


@dataclass
class Counts:
    forwarded: int = 0
    lost: int = 0  # dropped by ``loss``
    cut: int = 0  # dropped in an outage or while ``Faults.cut`` is on
    reordered: int = 0


class _Face(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.on_datagram(data, addr)


class Direction:
    """One way through the relay: the faults, applied datagram by datagram."""

    def __init__(self, faults: Faults, rng: random.Random, clock, up: bool = False):
        self.faults, self.rng, self.clock, self.up = faults, rng, clock, up
        self.counts = Counts()
        self._in_burst = 0
        self._frame_of: dict[int, int] = {}  # RTP timestamp -> the frame's number (up_frames_lost)
        self._tails_seen: set[tuple[int, int]] = set()  # (SSRC, sequence number) of marker packets seen (tails_lost)
        self._media_ssrc: int | None = None

    def _lost_frame(self, data: bytes) -> bool:
        """Whether ``data`` is an RTP packet of a video frame that ``up_frames_lost`` names. The RTP
        header is in the clear under SRTP (RFC 3711); RTCP (RFC 5761: second byte 192-223), DTLS,
        STUN and the data channel are none of its business."""
        spans = self.faults.up_frames_lost if self.up else ()
        if not spans or len(data) < 12 or data[0] >> 6 != 2 or 192 <= data[1] <= 223:
            return False
        ts = int.from_bytes(data[4:8], "big")
        number = self._frame_of.get(ts)
        if number is None:
            if len(self._frame_of) >= max(a + n for a, n in spans):
                return False  # past every span: nothing more to number
            number = self._frame_of[ts] = len(self._frame_of)
        return any(a <= number < a + n for a, n in spans)

    def _lost_tail(self, data: bytes) -> bool:
        """Whether ``data`` is the first transmission of a video frame's last packet (RTP marker
        bit) that ``tails_lost`` drops; a retransmission comes on its own RTX SSRC and sequence."""
        if not self.faults.tails_lost or len(data) < 12 or data[0] >> 6 != 2 or 192 <= data[1] <= 223:
            return False
        ssrc = int.from_bytes(data[8:12], "big")
        if self._media_ssrc is None:
            self._media_ssrc = ssrc  # the media's stream comes first; an RTX stream only after a loss
        if not data[1] & 0x80 or ssrc != self._media_ssrc:
            return False
        key = (ssrc, int.from_bytes(data[2:4], "big"))
        if key in self._tails_seen:
            return False
        self._tails_seen.add(key)
        return self.rng.random() < self.faults.tails_lost

    def fate(self, data: bytes = b"") -> float | None:
        """Seconds to hold this datagram, or None to drop it."""
        f, now = self.faults, self.clock()
        if self._lost_frame(data) or self._lost_tail(data):
            self.counts.lost += 1
            return None
        if f.cut or (now is not None and any(start <= now < start + length for start, length in f.outages)):
            self.counts.cut += 1
            return None
        if self._in_burst > 0:
            self._in_burst -= 1
            self.counts.lost += 1
            return None
        if f.loss > 0 and self.rng.random() < f.loss / max(f.burst, 1.0):
            # a run of mean length ``burst`` (geometric), so that the share dropped stays ``loss``
            run = 1
            while f.burst > 1 and self.rng.random() < 1 - 1 / f.burst:
                run += 1
            self._in_burst = run - 1
            self.counts.lost += 1
            return None
        hold = (f.delay_ms + self.rng.uniform(0, f.jitter_ms)) / 1000
        if f.reorder > 0 and self.rng.random() < f.reorder:
            hold += (f.delay_ms + f.jitter_ms + 5) / 1000
            self.counts.reordered += 1
        self.counts.forwarded += 1
        return hold


class Link:
    """One candidate pair through the relay: a socket that the client talks to and one that the
    server talks to; what arrives at one leaves by the other, after the faults."""

    def __init__(self, relay: "Relay", client_addr: tuple[str, int]):
        self.relay, self.client_addr = relay, client_addr
        self.server_addr: tuple[str, int] | None = None
        self.up = Direction(relay.faults, relay.rng, relay.since_first, up=True)  # client -> server
        self.down = Direction(relay.faults, relay.rng, relay.since_first)  # server -> client
        self.to_client = self.to_server = None  # the two faces (transports)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.to_client, _ = await loop.create_datagram_endpoint(lambda: _Face(self._from_client), local_addr=(LOOPBACK, 0))
        self.to_server, _ = await loop.create_datagram_endpoint(lambda: _Face(self._from_server), local_addr=(LOOPBACK, 0))

    @property
    def client_face_port(self) -> int:
        return self.to_client.get_extra_info("sockname")[1]

    @property
    def server_face_port(self) -> int:
        return self.to_server.get_extra_info("sockname")[1]

    def _from_client(self, data, addr):
        if self.server_addr is not None:
            self._pass(self.up, self.to_server, data, self.server_addr)

    def _from_server(self, data, addr):
        self._pass(self.down, self.to_client, data, self.client_addr)

    def _pass(self, direction: Direction, out, data, addr):
        self.relay.saw_datagram()
        hold = direction.fate(data)
        if hold is None:
            return
        if hold <= 0:
            out.sendto(data, addr)
        else:
            asyncio.get_running_loop().call_later(hold, self._send_late, out, data, addr)

    @staticmethod
    def _send_late(out, data, addr):
        if not out.is_closing():
            out.sendto(data, addr)

    def close(self) -> None:
        for t in (self.to_client, self.to_server):
            if t is not None:
                t.close()


def _candidates(sdp: str) -> list[tuple[str, int]]:
    found = []
    for line in sdp.splitlines():
        m = CANDIDATE.match(line.strip())
        if m:
            found.append((m.group(2), int(m.group(3))))
    return found


def rewrite_candidates(sdp: str, to: dict[tuple[str, int], int]) -> str:
    """The SDP with every UDP candidate ``(address, port)`` in ``to`` replaced by the relay's
    ``127.0.0.1:port``, and every other candidate left out (nothing may bypass the relay)."""
    out = []
    for line in sdp.split("\r\n"):
        m = CANDIDATE.match(line)
        if m:
            port = to.get((m.group(2), int(m.group(3))))
            if port is None:
                continue
            line = f"{m.group(1)}{LOOPBACK} {port}{m.group(4)}"
        elif line.startswith("a=candidate:"):
            continue  # TCP candidates and the like
        out.append(line)
    return "\r\n".join(out)


class Relay:
    """The HTTP proxy and its UDP links (see the module's note). Runs on its own thread and event
    loop: ``Relay(upstream, faults).start()`` returns once ``url`` is set; ``close()`` ends it.
    ``refuse``: HTTP methods answered 405 without reaching the engine (``("PATCH",)``: an engine
    from before session resume). ``requests``: (method, path, status) of every request answered,
    in order, refused ones included."""

    def __init__(self, upstream: str, faults: Faults | None = None, host: str = LOOPBACK, port: int = 0,
                 refuse: tuple[str, ...] | list[str] = ()):
        self.upstream = upstream.rstrip("/")
        self.faults = faults or Faults()
        self.refuse = frozenset(m.upper() for m in refuse)
        self.requests: list[tuple[str, str, int]] = []
        self.rng = random.Random(self.faults.seed)
        self.host, self.port = host, port
        self.links: list[Link] = []
        self.url: str | None = None
        self.first_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._runner = None
        self._error: BaseException | None = None

    def describe(self) -> str:
        """The link's faults, and the methods refused."""
        refused = f"; refuses {', '.join(sorted(self.refuse))}" if self.refuse else ""
        return self.faults.describe() + refused

    # -- the clock of the outages --------------------------------------------------------------

    def saw_datagram(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()

    def since_first(self) -> float | None:
        return None if self.first_at is None else time.monotonic() - self.first_at

    def counts(self) -> dict:
        """Datagrams each way, over every link so far."""
        total = {}
        for way in ("up", "down"):
            c = Counts()
            for link in self.links:
                d = getattr(link, way).counts
                c.forwarded += d.forwarded
                c.lost += d.lost
                c.cut += d.cut
                c.reordered += d.reordered
            total[way] = c.__dict__
        return total

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Relay":
        self._thread = threading.Thread(target=self._run, name="netfault", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def close(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for link in self.links:
                link.close()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{port}"

    async def _proxy(self, request):
        response = await self._forward(request)
        self.requests.append((request.method, request.path, response.status))
        return response

    async def _forward(self, request):
        import aiohttp
        from aiohttp import web

        body = await request.read()
        if request.method in self.refuse:
            return web.Response(status=405, text=f"Method Not Allowed (the relay refuses {request.method})\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization", "accept")}
        # A new session's offer (POST) and a resumed session's re-offer (PATCH on its URL, a new
        # peer connection with new ports): both must be rewritten, or a resumed session's media
        # would go straight between the peers, around the faults.
        sdp = request.method in ("POST", "PATCH") and request.content_type == "application/sdp"
        links: dict[tuple[str, int], Link] = {}
        if sdp:
            text = body.decode("utf-8", "replace")
            for addr in _candidates(text):
                if addr[0] == LOOPBACK and addr not in links:
                    link = Link(self, addr)
                    await link.open()
                    links[addr] = link
            body = rewrite_candidates(text, {a: l.server_face_port for a, l in links.items()}).encode()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.request(request.method, self.upstream + request.path_qs, data=body or None,
                                        headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    data = await resp.read()
                    out_headers = {k: v for k, v in resp.headers.items()
                                   if k.lower() in ("content-type", "location", "retry-after", "etag", "www-authenticate")}
                    status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            for link in links.values():
                link.close()
            return web.Response(status=502, text=f"relay: cannot reach {self.upstream}: {type(exc).__name__}\n")
        if sdp and status in (200, 201) and links:
            answer = data.decode("utf-8", "replace")
            served = [a for a in _candidates(answer) if a[0] == LOOPBACK]
            # One transport each side (BUNDLE, rtcp-mux): the first client candidate pairs with the
            # first server candidate; any other candidate is left out of both descriptions.
            link = next(iter(links.values()))
            if served:
                link.server_addr = served[0]
                data = rewrite_candidates(answer, {served[0]: link.client_face_port}).encode()
            for other in list(links.values())[1:]:
                other.close()
            self.links.append(link)
        else:
            for link in links.values():
                link.close()
        return web.Response(status=status, body=data, headers=out_headers)


def parse_outage(text: str) -> tuple[float, float]:
    """``START:LENGTH`` in seconds (START after the first datagram), e.g. ``30:2.5``."""
    start, sep, length = text.partition(":")
    try:
        out = (float(start), float(length))
    except ValueError:
        out = None
    if not sep or out is None or out[0] < 0 or out[1] <= 0:
        raise argparse.ArgumentTypeError(f"expected START:LENGTH in seconds, e.g. 30:2.5, got {text!r}")
    return out


def _share(text: str) -> float:
    try:
        v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        v = -1
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1 (0.05) or a percentage (5%), got {text!r}")
    return v


def _ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds (0 or more), got {text!r}")
    return v


def add_fault_options(p: argparse.ArgumentParser) -> None:
    """The link's faults as options (bench-remote and this module's command); ``--refuse`` is the
    Relay's ``refuse``."""
    p.add_argument("--delay-ms", type=_ms, default=0.0, help="one-way delay added to every datagram (default 0)")
    p.add_argument("--jitter-ms", type=_ms, default=0.0, help="random extra delay, 0 to this, per datagram (default 0)")
    p.add_argument("--loss", type=_share, default=0.0, help="share of datagrams dropped each way: 0.05 or 5%% (default 0)")
    p.add_argument("--burst", type=float, default=1.0, help="mean length of a run of dropped datagrams (default 1)")
    p.add_argument("--reorder", type=_share, default=0.0, help="share of datagrams held back past later ones (default 0)")
    p.add_argument("--outage", type=parse_outage, action="append", default=[], metavar="START:LENGTH",
                   help="cut the link for LENGTH s, START s after its first datagram (repeatable), e.g. 30:2.5")
    p.add_argument("--seed", type=int, default=None, help="random seed of the faults (default: a new one each run)")
    p.add_argument("--refuse", type=str.upper, action="append", default=[], metavar="METHOD",
                   help="answer this HTTP method with 405 as an older engine would (repeatable), e.g. PATCH: "
                        "an engine without session resume")


def faults_from(a: argparse.Namespace) -> Faults:
    return Faults(delay_ms=a.delay_ms, jitter_ms=a.jitter_ms, loss=a.loss, burst=max(1.0, a.burst), reorder=a.reorder,
                  outages=list(a.outage), seed=a.seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("upstream", help="the engine's address, e.g. http://127.0.0.1:8765")
    p.add_argument("--port", type=int, default=0, help="the relay's own port on 127.0.0.1 (default: any free one)")
    add_fault_options(p)
    a = p.parse_args(argv)
    faults = faults_from(a)
    relay = Relay(a.upstream, faults, port=a.port, refuse=a.refuse).start()
    print(f"relay: {relay.url} -> {relay.upstream} ({relay.describe()}); give connect {relay.url}", flush=True)
    shown, counted = 0, time.monotonic()
    try:
        while True:
            time.sleep(0.5)
            for method, path, status in relay.requests[shown:]:
                print(f"relay: {method} {path} {status}", flush=True)
                shown += 1
            if time.monotonic() - counted >= 10:
                counted = time.monotonic()
                print(f"relay: datagrams {relay.counts()}", flush=True)
    except KeyboardInterrupt:
        relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
