"""`live2diff-engine doctor URL`: what works between this machine and a `serve`, checked step by
step from here, as `connect` would use it.

1. signalling: the API answers (HTTP or HTTPS, the certificate trusted) and takes the token;
2. candidates here: what this side gathers (host; srflx with a STUN server; relay with TURN: a TURN
   allocation is made where a TURN server is configured);
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


class Doctor:
    def __init__(self, url: str, *, token: str | None, ice_servers: list[dict], say, codec: str | None = None,
                 media_s: float = MEDIA_S):
        from ..errors import ConfigError

        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"doctor URL must be the engine's address, e.g. http://gpu-box:8765, got {url!r}")
        self.base = f"{parsed.scheme}://{parsed.netloc}"
        path = parsed.path.rstrip("/")
        self.endpoint = self.base + (path if path.endswith("/whip") else path + "/whip")
        self.token, self.ice_servers, self.say, self.codec, self.media_s = token, ice_servers, say, codec, media_s
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
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
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
            self.say(f"candidates here: {_kinds(here)}")
            turn = [s["urls"] for s in self.ice_servers if str(s.get("urls", "")).startswith("turn")]
            stun = [s["urls"] for s in self.ice_servers if str(s.get("urls", "")).startswith("stun")]
            if turn:
                if not any(k == "relay" for k, _, _ in here):
                    return self._fail("TURN", f"no relay address from {', '.join(turn)}: check its address, port and "
                                      "user/password, and that this network lets UDP out to it (or use ?transport=tcp)")
                self.works.append("TURN allocation")
                self.say("TURN: allocation ok")
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
                if there and all(_is_private(a) for k, a, _ in there if k == "host") and \
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
