"""`live2diff-engine doctor URL`: what works between this machine and a `serve`, checked step by
step from here, as `connect` would use it.

1. signalling: the API answers (HTTP or HTTPS, the certificate trusted) and takes the token;
2. candidates here: what this side gathers (host; srflx with a STUN server; relay with TURN: a TURN
   allocation is made where a TURN server is configured, and when none comes, the server is asked
   once more outside ICE to learn why: a refused user/password, another refusal, or no answer);
   with ``relay_only`` (--ice-relay-only) only the relay, so the round trip must go through TURN;
3. candidates there: what the engine offers in its answer to a real offer (WHIP);
4. media: a short round trip, frames out and stylised frames back, over the pair ICE selects.

Each step says one line as it goes; the last line says what works and, where something failed,
what to open or configure. ``run`` returns True when everything worked. The session it makes is
ended (DELETE) before it returns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import urllib.parse

import numpy as np

MEDIA_S = 20.0  # the round trip's limit: ICE, DTLS, the engine's warmup and a few frames
FRAMES_BACK = 5  # stylised frames back that make the round trip a success
FPS = 10.0
TURN_PROBE_S = 6.0  # how long the second allocation (the one that learns why the first failed) may take
OPEN_PORTS = ("open the server's UDP media ports to this side (serve --udp-ports LO-HI, then allow that range in its "
              "firewall or cloud security group; behind 1:1 NAT add --public-ip) or configure a TURN server on both "
              "sides (LIVE2DIFF_ICE_SERVERS)")


def candidates_of(sdp: str) -> list[tuple[str, str, int]]:
    """(type, address, port) of every candidate in an SDP, once each (a bundled SDP repeats them
    in every media section)."""
    found = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            f = line.split()
            if len(f) >= 8 and f[6] == "typ":
                try:
                    cand = (f[7], f[4], int(f[5]))
                except ValueError:
                    continue
                if cand not in found:
                    found.append(cand)
    return found


def _kinds(cands) -> str:
    counts: dict[str, int] = {}
    for kind, _, _ in cands:
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "none"


def _is_private(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True  # an mDNS name: reachable on the same network only
    return ip.is_private or ip.is_loopback or ip.is_link_local


async def why_no_allocation(server: dict) -> str:
    """Why a TURN server gave no relay address, learnt by asking it for one allocation outside ICE
    (aioice's gathering drops the reason): the advice for doctor's one line. The URL is shown
    without the password."""
    from aioice import stun, turn
    from aiortc import RTCIceServer
    from aiortc.rtcicetransport import connection_kwargs

    url = server["urls"]
    try:
        kw = connection_kwargs([RTCIceServer(**server)])
    except ValueError:
        kw = {}
    if "turn_server" not in kw:
        return (f"{url} is not a TURN address this engine can use: write turn:USER:PASSWORD@HOST:PORT (UDP), add "
                "?transport=tcp for TCP, or turns:USER:PASSWORD@HOST:PORT for TLS")
    try:
        transport, _ = await asyncio.wait_for(turn.create_turn_endpoint(
            asyncio.DatagramProtocol, server_addr=kw["turn_server"], username=kw["turn_username"],
            password=kw["turn_password"], ssl=kw["turn_ssl"], transport=kw["turn_transport"]), TURN_PROBE_S)
    except stun.TransactionFailed as exc:
        code, reason = exc.response.attributes.get("ERROR-CODE", (0, "no reason given"))
        if code == 401:
            return (f"{url} refused the user name or password ({code} {reason}): give the TURN server's own user and "
                    "password as turn:USER:PASSWORD@HOST:PORT in LIVE2DIFF_ICE_SERVERS")
        return f"{url} refused the allocation ({code} {reason}): see the TURN server's log"
    except (stun.TransactionTimeout, asyncio.TimeoutError, ConnectionError):
        return (f"no answer from {url}: check its address and port, and that this network lets "
                f"{kw['turn_transport'].upper()} out to it (or try ?transport=tcp, or turns: on port 443)")
    except OSError as exc:
        return f"cannot reach {url} ({exc.strerror or exc}): check its address and port"
    transport.close()
    return (f"{url} gave no relay address while ICE gathered, though it gives one now: it may be overloaded; try "
            "again, and check the address, port and user/password")


class Doctor:
    def __init__(self, url: str, *, token: str | None, ice_servers: list[dict], say, codec: str | None = None,
                 media_s: float = MEDIA_S, relay_only: bool = False):
        from ..errors import ConfigError

        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"doctor URL must be the engine's address, e.g. http://gpu-box:8765, got {url!r}")
        self.base = f"{parsed.scheme}://{parsed.netloc}"
        path = parsed.path.rstrip("/")
        self.endpoint = self.base + (path if path.endswith("/whip") else path + "/whip")
        self.token, self.ice_servers, self.say, self.codec, self.media_s = token, ice_servers, say, codec, media_s
        self.relay_only = relay_only
        self.works: list[str] = []

    def _headers(self, **extra) -> dict:
        return {**extra, **({"Authorization": f"Bearer {self.token}"} if self.token else {})}

    def _fail(self, what: str, advice: str) -> bool:
        done = f"; works: {', '.join(self.works)}" if self.works else ""
        self.say(f"doctor: FAILED at {what}{done}. To fix: {advice}")
        return False

    async def run(self) -> bool:
        import aiohttp

        # 1. signalling and token
        self.say(f"signalling: asking {self.base}/api/status ...")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(self.base + "/api/status", headers=self._headers(),
                                    timeout=aiohttp.ClientTimeout(total=15)) as resp:
                    text = await resp.text()
                    status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            return self._fail("TLS", f"the certificate of {self.base} is not trusted here ({exc.certificate_error}); "
                              "give serve a certificate this machine trusts (--tls-cert/--tls-key), or point "
                              "SSL_CERT_FILE at the certificate that signed it (connect reads it too)")
        except aiohttp.ClientSSLError as exc:
            return self._fail("TLS", f"the TLS handshake with {self.base} failed ({str(exc)[:120]}); is it HTTPS "
                              "(serve --tls-cert), and is the address http:// for a plain serve?")
        except aiohttp.ServerDisconnectedError:
            return self._fail("signalling", f"{self.base} closed the connection at once: is it https:// (serve with "
                              "--tls-cert) while you wrote http://?")
        except (aiohttp.ClientConnectorError, OSError) as exc:
            return self._fail("signalling", f"nothing answers at {self.base} ({str(exc)[:120]}): start `live2diff-engine "
                              "serve` there, check the address and port, and open that TCP port in its firewall")
        except asyncio.TimeoutError:
            return self._fail("signalling", f"no answer from {self.base} within 15 s: a firewall drops that TCP port, or "
                              "the address is wrong")
        except aiohttp.ClientError as exc:
            return self._fail("signalling", f"{self.base}: {type(exc).__name__}: {str(exc)[:120]}")
        if status in (401, 403):
            return self._fail("the token", f"{self.base} refused the token ({'none given' if not self.token else 'wrong'}): "
                              "give the server's --api-token in LIVE2DIFF_API_TOKEN (or --token)")
        if status != 200:
            return self._fail("signalling", f"{self.base}/api/status answered HTTP {status}: is this a live2diff-engine serve?")
        try:
            remote = json.loads(text)
        except ValueError:
            remote = {}
        self.works.append(f"signalling ({urllib.parse.urlparse(self.base).scheme}"
                          f"{', token accepted' if self.token else ''})")
        self.say(f"signalling: ok ({remote.get('state', '?')}; {remote.get('max_sessions', '?')} session(s) at most)")
        return await self._media()

    async def _media(self) -> bool:
        import aiohttp
        from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

        from .ice import rtc_configuration
        from .link import LinkStats, describe, prefer_codec
        from .media import frame_pts, to_video_frame

        class Pattern(MediaStreamTrack):
            kind = "video"

            def __init__(self):
                super().__init__()
                self.i, self.t0 = 0, None

            async def recv(self):
                self.t0 = self.t0 or time.monotonic()
                wait = self.t0 + self.i / FPS - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                yy, xx = np.mgrid[0:96, 0:128]
                image = np.stack([(xx * 2 + self.i * 6) % 256, (yy * 2) % 256, (xx + yy + self.i) % 256], -1)
                self.i += 1
                return to_video_frame(image.astype(np.uint8), (self.i - 1) * 3000)

        # 2. candidates here (a TURN allocation, where one is configured, happens in this gathering)
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers, self.relay_only))
        location = None
        try:
            prefer_codec(pc.addTransceiver(Pattern(), direction="sendrecv"), self.codec)
            pc.createDataChannel("control")
            back = {"frames": 0, "first": None}

            @pc.on("track")
            def on_track(track):
                async def receive():
                    try:
                        while True:
                            frame = await track.recv()
                            if frame_pts(frame) > 0:  # pts 0 is the engine's "connected" card
                                back["frames"] += 1
                                back["first"] = back["first"] or time.monotonic()
                    except Exception:
                        pass

                asyncio.get_running_loop().create_task(receive())

            self.say("candidates here: gathering ...")
            await pc.setLocalDescription(await pc.createOffer())
            here = candidates_of(pc.localDescription.sdp)
            self.say(f"candidates here: {_kinds(here)}" + (" (relay only)" if self.relay_only else ""))
            turn = [s for s in self.ice_servers if str(s.get("urls", "")).startswith("turn")]
            stun = [s["urls"] for s in self.ice_servers if str(s.get("urls", "")).startswith("stun")]
            if turn:
                relay = next((f"{a}:{p}" for k, a, p in here if k == "relay"), None)
                if relay is None:
                    # the engine takes the first TURN server (aiortc uses one), so that is the one asked
                    return self._fail("TURN", await why_no_allocation(turn[0]))
                self.works.append("TURN allocation")
                self.say(f"TURN: allocation ok (relay address {relay} from {turn[0]['urls']})")
            if stun and not any(k == "srflx" for k, _, _ in here):
                self.say(f"STUN: no answer from {', '.join(stun)} (no public address learnt here)")

            # 3. candidates there
            try:
                async with aiohttp.ClientSession() as http:
                    async with http.post(self.endpoint, data=pc.localDescription.sdp,
                                         headers=self._headers(**{"Content-Type": "application/sdp"}),
                                         timeout=aiohttp.ClientTimeout(total=30)) as resp:
                        answer = await resp.text()
                        if resp.status != 201:
                            line = (answer.strip().splitlines() or [f"HTTP {resp.status}"])[0][:200]
                            if resp.status == 503:
                                return self._fail("the offer", f"the engine is busy ({line}); try again when its "
                                                  "stream ends, or serve with a higher --max-sessions")
                            return self._fail("the offer", f"the engine answered {resp.status}: {line}")
                        location = urllib.parse.urljoin(self.endpoint, resp.headers.get("Location", ""))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                return self._fail("the offer", f"posting the offer to {self.endpoint} failed ({type(exc).__name__})")
            there = candidates_of(answer)
            self.say(f"candidates there: {_kinds(there)} ({', '.join(sorted({f'{a}:{p}' for _, a, p in there}))})")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

            # 4. a short round trip
            self.say(f"media: sending a test pattern, waiting for {FRAMES_BACK} stylised frames back "
                     f"(at most {self.media_s:.0f} s) ...")
            start = time.monotonic()
            while back["frames"] < FRAMES_BACK and time.monotonic() - start < self.media_s:
                if pc.connectionState == "failed":
                    break
                await asyncio.sleep(0.1)
            link = LinkStats()
            await link.sample(pc)
            await asyncio.sleep(1.0)
            figures = await link.sample(pc)
            if back["frames"] < FRAMES_BACK:
                how = "ICE found no working pair" if pc.connectionState == "failed" or figures.get("type") is None else \
                    f"connected over a {figures.get('type')} pair, but only {back['frames']} frames came back"
                advice = OPEN_PORTS
                if self.relay_only:
                    advice = ("with --ice-relay-only every packet goes through the TURN server: it must reach the "
                              "engine's media addresses (candidates there), or give serve the same TURN server")
                elif there and all(_is_private(a) for k, a, _ in there if k == "host") and \
                        not any(k in ("srflx", "relay") for k, _, _ in there):
                    advice = ("the engine offers only private addresses (" + ", ".join(sorted({a for _, a, _ in there}))
                              + "): " + OPEN_PORTS)
                return self._fail("media", f"{how} within {self.media_s:.0f} s; {advice}")
            self.works.append(f"media round trip over {figures.get('type')} ({back['frames']} frames back, "
                              f"first after {back['first'] - start:.1f} s)")
            self.say(f"media: ok; {describe(figures)}")
        finally:
            if location:
                try:
                    async with aiohttp.ClientSession() as http:
                        async with http.delete(location, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=5)):
                            pass
                except Exception:
                    pass
            try:
                await asyncio.wait_for(pc.close(), 5)
            except Exception:
                pass
        self.say(f"doctor: everything works: {', '.join(self.works)}; candidates here {_kinds(here)}, "
                 f"there {_kinds(there)}")
        return True
