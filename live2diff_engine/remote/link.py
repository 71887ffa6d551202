"""What the network does to a remote stream, and the two knobs a user has on it; both ends.

``LinkStats`` samples a peer connection's WebRTC statistics (aiortc's ``getStats()``) and sums
them up in a few figures: the selected candidate pair's type (host, srflx, relay), the round-trip
time, the loss each way, the jitter and the bitrate each way, and the negotiated codec. `connect`
shows them in its status line and its API's status (so `ctl status` and the dock), `serve` in the
session's status.

``prefer_codec`` (--codec) puts one codec first and alone in a video transceiver's SDP (the
standard RTCRtpTransceiver.setCodecPreferences); ``limit_bitrate`` (--max-bitrate) caps what
aiortc's encoders aim for.
"""

from __future__ import annotations

import time

CODECS = {"vp8": "video/VP8", "h264": "video/H264"}


def prefer_codec(transceiver, codec: str | None) -> None:
    """Offers or accepts only ``codec`` ("vp8" or "h264") on this video transceiver (and its
    retransmissions). For an answer, call it on a transceiver made before the offer is applied:
    aiortc filters the offered codecs through the preferences as it applies the offer."""
    if not codec:
        return
    from aiortc import RTCRtpSender

    mime = CODECS[codec].lower()
    caps = RTCRtpSender.getCapabilities("video").codecs
    chosen = [c for c in caps if c.mimeType.lower() == mime] + [c for c in caps if c.mimeType.lower() == "video/rtx"]
    transceiver.setCodecPreferences(chosen)


def limit_bitrate(kbps: int | None) -> None:
    """Caps the target bitrate of aiortc's video encoders (VP8 and H.264) at ``kbps``, for every
    stream this process sends. aiortc starts each encoder at its DEFAULT_BITRATE and moves it
    within [MIN_BITRATE, MAX_BITRATE] as the receiver's bandwidth estimates (REMB) arrive; those
    module constants are what its ``target_bitrate`` setter reads, so they are the knob."""
    if kbps is None:
        return
    if kbps < 50:
        from ..errors import ConfigError

        raise ConfigError(f"--max-bitrate is in kilobits per second and must be at least 50, got {kbps}")
    from aiortc.codecs import h264, vpx

    bps = int(kbps) * 1000
    for module in (vpx, h264):
        module.MAX_BITRATE = bps
        module.MIN_BITRATE = min(module.MIN_BITRATE, bps)
        module.DEFAULT_BITRATE = min(module.DEFAULT_BITRATE, bps)


def negotiated_codec(sdp: str | None) -> str | None:
    """The first video codec of an SDP (the answer's is the one in use): "VP8", "H264"."""
    if not sdp:
        return None
    in_video, first = False, None
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_video = line.startswith("m=video")
            parts = line.split()
            first = parts[3] if in_video and len(parts) > 3 else None
        elif in_video and first is not None and line.startswith(f"a=rtpmap:{first} "):
            return line.split(" ", 1)[1].split("/")[0]
    return None


def _pair_type(local: str | None, remote: str | None) -> str | None:
    """One word for a candidate pair: relay if either end is relayed, srflx if either went
    through a NAT (server- or peer-reflexive), else host."""
    kinds = {local, remote} - {None}
    if not kinds:
        return None
    if "relay" in kinds:
        return "relay"
    if kinds & {"srflx", "prflx"}:
        return "srflx"
    return "host"


def selected_pair(pc) -> tuple[str | None, str | None]:
    """(local, remote) candidate types of the pair ICE selected, or (None, None) before one is.
    aiortc 1.16's getStats() has no candidate-pair entry; the pair is aioice's nominated one."""
    for transceiver in pc.getTransceivers():
        dtls = transceiver.sender.transport or transceiver.receiver.transport
        if dtls is None:
            continue
        nominated = getattr(dtls.transport._connection, "_nominated", None) or {}
        pair = nominated.get(1)
        if pair is not None:
            return pair.local_candidate.type, pair.remote_candidate.type
    for dtls in filter(None, [getattr(pc.sctp, "transport", None)]):
        nominated = getattr(dtls.transport._connection, "_nominated", None) or {}
        pair = nominated.get(1)
        if pair is not None:
            return pair.local_candidate.type, pair.remote_candidate.type
    return None, None


class LinkStats:
    """Samples one peer connection; ``sample`` (on its event loop) returns the figures:

    type        the selected candidate pair: host, srflx or relay (None before ICE is done)
    rtt_ms      round trip, from the RTCP receiver reports on what this side sends
    loss_pct    of the packets sent to this side, the share lost (since the last sample)
    loss_out_pct  of the packets this side sends, the share the peer reports lost
    jitter_ms   interarrival jitter of what this side receives
    bitrate_kbps / bitrate_in_kbps   video sent / everything received, since the last sample
    codec       the video codec in use
    redundancy  "on" while this side sends each packet twice (--redundancy), else "off"
    nacked      packets this side has asked the peer to send again (lost on the way here)
    """

    def __init__(self):
        self._last: dict | None = None
        self.current: dict = {}

    async def sample(self, pc) -> dict:
        report = await pc.getStats()
        now = time.monotonic()
        out_bytes = in_bytes = 0
        received = lost = 0
        rtt = jitter = fraction = None
        for s in report.values():
            kind = getattr(s, "kind", "video")
            if s.type == "outbound-rtp" and kind == "video":
                out_bytes += s.bytesSent or 0
            elif s.type == "transport":
                in_bytes = max(in_bytes, s.bytesReceived or 0)
            elif s.type == "inbound-rtp" and kind == "video":
                received += s.packetsReceived or 0
                lost += max(0, s.packetsLost or 0)
                jitter = (s.jitter or 0) / 90.0  # RTP timestamp units of the 90 kHz video clock
            elif s.type == "remote-inbound-rtp" and kind == "video":
                if s.roundTripTime is not None:
                    rtt = s.roundTripTime * 1000.0
                if s.fractionLost is not None:
                    fraction = s.fractionLost / 256.0 * 100.0
        last = self._last
        self._last = {"t": now, "out": out_bytes, "in": in_bytes, "received": received, "lost": lost}
        figures: dict = {}
        local, remote = selected_pair(pc)
        figures["type"] = _pair_type(local, remote)
        figures["rtt_ms"] = round(rtt, 1) if rtt is not None else None
        if last is not None and now > last["t"]:
            dt = now - last["t"]
            figures["bitrate_kbps"] = round(max(0, out_bytes - last["out"]) * 8 / dt / 1000.0, 1)
            figures["bitrate_in_kbps"] = round(max(0, in_bytes - last["in"]) * 8 / dt / 1000.0, 1)
            got, gone = received - last["received"], lost - last["lost"]
            figures["loss_pct"] = round(100.0 * gone / (got + gone), 2) if got + gone > 0 else 0.0
        else:
            figures.update(bitrate_kbps=None, bitrate_in_kbps=None,
                           loss_pct=round(100.0 * lost / (received + lost), 2) if received + lost else None)
        figures["loss_out_pct"] = round(fraction, 2) if fraction is not None else None
        figures["jitter_ms"] = round(jitter, 1) if jitter is not None else None
        desc = pc.remoteDescription if pc.remoteDescription is not None and pc.remoteDescription.type == "answer" \
            else pc.localDescription
        figures["codec"] = negotiated_codec(desc.sdp if desc is not None else None)
        from .redundancy import nacked, state

        figures["redundancy"] = state(pc)
        figures["nacked"] = nacked(pc)
        self.current = figures
        return figures


def describe(link: dict | None) -> str:
    """The figures in a few words for a status line: "host, rtt 3 ms, loss 0.0%/0.0%,
    jitter 1 ms, 480/510 kbps up/down, VP8"."""
    if not link:
        return "link -"

    def n(key, fmt):
        v = link.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    return (f"link {link.get('type') or '-'}, rtt {n('rtt_ms', '{:.0f}')} ms, loss {n('loss_pct', '{:.1f}')}%"
            f" in/{n('loss_out_pct', '{:.1f}')}% out, jitter {n('jitter_ms', '{:.0f}')} ms, "
            f"{n('bitrate_kbps', '{:.0f}')}/{n('bitrate_in_kbps', '{:.0f}')} kbps up/down, {link.get('codec') or '-'}"
            + (", packets sent twice" if link.get("redundancy") == "on" else ""))
