"""Sending every media packet twice while the link loses packets (--redundancy; both ends).

A lost video packet holds its frame, and every frame after it, until the receiver has noticed the
gap, asked for it (NACK) and the retransmission has come back: one round trip at best. Over a
link that loses a few % of its packets most frames at a few hundred kbps are several packets
long, so a third or more of them wait that round trip each way, and the stream's latency rises by
a round trip whenever a run of frames is hit. aiortc has no forward error correction (no ULPFEC,
FlexFEC or RED for video); the simplest code that repairs a loss without a round trip is
repetition: each packet goes twice, its copy right after the next original (the last packet's
COPY_AFTER_S after it), so that a burst of two datagrams does not take both. At 5 % loss then a packet is lost only when both copies are (0.25 %),
and a retransmission is needed for about one frame in a hundred instead of one in three.

The receiver needs nothing: a copy is the same SRTP packet (same sequence number and index), and
SRTP's replay check drops whichever arrives second, before anything else sees it (aiortc's own,
a browser's, OBS's WebRTC stack alike).

It doubles the bitrate, so it is on only while the peer reports loss (``auto``, the default):

- on when a receiver report from the peer says ``ON_AT`` or more of our packets were lost since
  its last report (reports come about every second);
- while on, the reports show only what both copies lost; it stays on while any report within
  ``HOLD_S`` shows a loss, and goes off after ``HOLD_S`` without one (the link has healed);
- off for ``HOLD_S`` when copies do not help: the mean loss while on stays at ``FUTILE_AT`` or more
  over ``FUTILE_S`` (a congested link, where doubling the packets adds to the loss).

``on`` sends copies always, ``off`` never. The state shows in the link figures (``redundancy``).
"""

from __future__ import annotations

import asyncio
import time

MODES = ("auto", "on", "off")
ON_AT = 0.02
HOLD_S = 60.0
FUTILE_AT = 0.05
FUTILE_S = 10.0
COPY_AFTER_S = 0.004  # the copy of the last packet sent goes this long after it (others: after the next one)
NACK_WAIT_S = 0.015  # a receiver's wait before it asks for a missing packet: its copy may be on the way

_mode = "auto"


def set_redundancy(mode: str | None) -> None:
    """The mode for every peer connection of this process (--redundancy): auto, on or off."""
    global _mode
    if mode is None:
        return
    if mode not in MODES:
        from ..errors import ConfigError

        raise ConfigError(f"--redundancy is one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode
    install_redundant_sending()


class Redundancy:
    """The decision for one connection (its DTLS transport: video, retransmissions and RTCP)."""

    def __init__(self, mode: str | None = None):
        self.mode = mode or _mode
        self.on = False
        self.last_loss = 0.0  # when a report last showed a loss, while on
        self.pause_until = 0.0  # copies did not help: not again before this
        self.reports: list[tuple[float, float]] = []  # (when, fraction lost) while on
        self.turned_on = 0
        self.copies = 0

    def report(self, fraction: float, now: float) -> None:
        """A receiver report on what this side sends: ``fraction`` (0..1) lost since the last."""
        if self.mode != "auto":
            return
        self.active(now)
        if not self.on:
            if fraction >= ON_AT and now >= self.pause_until:
                self.on, self.last_loss, self.reports = True, now, [(now, fraction)]
                self.turned_on += 1
            return
        if fraction > 0:
            self.last_loss = now
        self.reports = [(t, f) for t, f in self.reports if now - t <= FUTILE_S] + [(now, fraction)]
        span = now - self.reports[0][0]
        if span >= FUTILE_S * 0.8 and sum(f for _, f in self.reports) / len(self.reports) >= FUTILE_AT:
            self.on, self.pause_until, self.reports = False, now + HOLD_S, []

    def active(self, now: float | None = None) -> bool:
        """Whether to send copies now."""
        if self.mode != "auto":
            return self.mode == "on"
        if self.on and (now if now is not None else time.monotonic()) - self.last_loss > HOLD_S:
            self.on, self.reports = False, []
        return self.on


def of(transport) -> Redundancy:
    """The decision kept on a DTLS transport (made at first use, in the process's mode then)."""
    found = transport.__dict__.get("_l2d_redundancy")
    if found is None:
        found = transport._l2d_redundancy = Redundancy()
    return found


def state(pc) -> str | None:
    """"on" or "off" for a peer connection's media, None before it has any."""
    for transceiver in pc.getTransceivers():
        dtls = transceiver.sender.transport or transceiver.receiver.transport
        if dtls is not None:
            return "on" if of(dtls).active() else "off"
    return None


async def _copy(ice, data: bytes, policy: Redundancy) -> None:
    try:
        await ice._send(data)
        policy.copies += 1
    except Exception:  # the connection went meanwhile: a copy is only a copy
        pass


def nacked(pc) -> int:
    """Packets this peer connection's receivers asked the peer to send again (NACK), so far, each
    counted once however often it was asked: what the copies spare shows here."""
    return sum(t.receiver.__dict__.get("_l2d_nacked", 0) for t in pc.getTransceivers())


def install_redundant_sending() -> None:
    """Hooks aiortc (every peer connection of this process): a sender's receiver reports feed its
    transport's :class:`Redundancy`; the DTLS transport sends each protected RTP and RTCP packet a
    second time while it is active; receivers count the packets they ask for again (:func:`nacked`)."""
    from aiortc import rtcdtlstransport, rtcrtpreceiver, rtcrtpsender
    from aiortc.rtp import RtcpRrPacket, RtcpSrPacket, is_rtcp

    dtls = rtcdtlstransport.RTCDtlsTransport
    if getattr(dtls, "_l2d_copies", False):
        return
    handle_rtcp = rtcrtpsender.RTCRtpSender._handle_rtcp_packet

    async def handle_rtcp_and_loss(self, packet):
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)) and self.transport is not None:
            for report in packet.reports:
                if report.ssrc == self._ssrc:
                    of(self.transport).report(report.fraction_lost / 256.0, time.monotonic())
        return await handle_rtcp(self, packet)

    send_rtp = dtls._send_rtp

    async def send_rtp_with_copy(self, data: bytes) -> None:
        policy = of(self)
        if not policy.active():
            return await send_rtp(self, data)
        if self._state != rtcdtlstransport.State.CONNECTED:
            raise ConnectionError("Cannot send encrypted RTP, not connected")
        data = self._tx_srtp.protect_rtcp(data) if is_rtcp(data) else self._tx_srtp.protect(data)
        ice = self.transport
        await ice._send(data)
        self._RTCDtlsTransport__tx_bytes += len(data)
        self._RTCDtlsTransport__tx_packets += 1
        # The previous packet's copy goes right after this original (o1 o2 c1 o3 c2 ...): it is
        # there before the receiver's NACK wait is out however late this loop runs, and a burst
        # of two datagrams takes one copy of each. The last one's copy goes COPY_AFTER_S later.
        previous, self._l2d_pending = self.__dict__.get("_l2d_pending"), data
        if previous is not None:
            await _copy(ice, previous, policy)
        loop = asyncio.get_running_loop()
        loop.call_later(COPY_AFTER_S, lambda: loop.create_task(flush(self, data)))

    async def flush(transport, data):
        if transport.__dict__.get("_l2d_pending") is data:
            transport._l2d_pending = None
            await _copy(transport.transport, data, of(transport))

    send_nack = rtcrtpreceiver.RTCRtpReceiver._send_rtcp_nack

    async def send_nack_counted(self, media_ssrc, lost):
        """aiortc asks for a packet the moment a later one arrives; a copy on its way (or a packet
        merely overtaken) fills the hole a few ms later. Asked NACK_WAIT_S later, for what is
        still missing then, without holding up the packets behind (the call returns at once)."""
        gen = getattr(self, "_RTCRtpReceiver__nack_generator", None)

        async def later():
            await asyncio.sleep(NACK_WAIT_S)
            still = [s for s in lost if gen is None or s in gen.missing]
            if still:
                asked = self.__dict__.setdefault("_l2d_asked", {})  # sequence number -> None, oldest first
                for s in still:
                    if s not in asked:
                        asked[s] = None
                        self._l2d_nacked = self.__dict__.get("_l2d_nacked", 0) + 1
                while len(asked) > 2048:
                    del asked[next(iter(asked))]
                try:
                    await send_nack(self, media_ssrc, still)
                except ConnectionError:  # the connection went meanwhile
                    pass

        asyncio.get_running_loop().create_task(later())

    rtcrtpreceiver.RTCRtpReceiver._send_rtcp_nack = send_nack_counted
    rtcrtpsender.RTCRtpSender._handle_rtcp_packet = handle_rtcp_and_loss
    dtls._send_rtp = send_rtp_with_copy
    dtls._l2d_copies = True
