"""ICE servers (STUN, TURN) for both ends of a remote stream, `serve` and `connect`: from
--ice-server and LIVE2DIFF_ICE_SERVERS, shown without their credentials, and as aiortc's
configuration."""

from __future__ import annotations


ICE_SERVERS_ENV = "LIVE2DIFF_ICE_SERVERS"
# LIVE2DIFF_ICE_LOOPBACK=1: media over 127.0.0.1 only. aioice (aiortc's ICE) leaves loopback out of
# the host candidates it gathers (aioice.ice.get_host_addresses skips 127.0.0.1, and no option of
# its Connection, nor of aiortc's RTCConfiguration, brings it back), so two peers on one machine
# meet on its network interface's address, and on a machine (or network namespace) with loopback
# only they gather nothing and no frame flows. With this set, 127.0.0.1 is the one host candidate:
# serve and connect on one machine without a network, and the tests (tests/conftest.py sets it, so
# that no test's media leaves loopback). Not for two machines: they cannot reach each other's
# 127.0.0.1.
LOOPBACK_ENV = "LIVE2DIFF_ICE_LOOPBACK"


def _without_credential(text: str) -> str:
    """The URL as it may be shown: a ``USER:PASSWORD@`` part reads ``USER:***@``."""
    head, at, where = text.rpartition("@")
    if not at:
        return text
    scheme, _, cred = head.partition(":")
    return f"{scheme}:{cred.partition(':')[0]}:***@{where}"


def parse_ice_server(text: str) -> dict:
    """``stun:host:port`` or ``turn:user:password@host:port[?transport=tcp]`` (also turns:)."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("stun", "turn", "turns"):
        raise ValueError(f"expected stun:HOST:PORT or turn:USER:PASSWORD@HOST:PORT, got {_without_credential(text)!r}")
    if "@" in rest and scheme != "stun":
        cred, _, where = rest.rpartition("@")
        user, _, password = cred.partition(":")
        return {"urls": f"{scheme}:{where}", "username": user, "credential": password}
    return {"urls": text}


def ice_servers_from(options: list[str], env, say) -> list[dict]:
    """The ICE servers of ``--ice-server`` (repeatable) and of the environment variable
    LIVE2DIFF_ICE_SERVERS (URLs separated by spaces). A TURN password given as an option is in the
    process list, where every user of the machine can read it: that gets one warning (never the
    password) saying where it goes instead. A malformed URL is a ConfigError that never shows one."""
    from ..errors import ConfigError

    servers = []
    for where, urls in (("--ice-server", list(options)), (ICE_SERVERS_ENV, env.get(ICE_SERVERS_ENV, "").split())):
        for url in urls:
            try:
                servers.append(parse_ice_server(url))
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    if any("credential" in server for server in servers[: len(options)]):  # the options' come first
        say("warning: --ice-server with a TURN password is visible to every user of this machine in the process "
            f"list; put the server in the environment variable {ICE_SERVERS_ENV} instead")
    return servers


def use_loopback_candidates() -> None:
    """Media on 127.0.0.1 only, in this process (see LOOPBACK_ENV): 127.0.0.1 is the one host
    address aioice gathers, and a peer's candidates elsewhere (its interface address, an mDNS
    name: a browser offers those) are left out, so no pair reaches beyond loopback."""
    import aioice.ice

    if getattr(aioice.ice.get_host_addresses, "loopback_only", False):
        return

    def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    loopback_only.loopback_only = True
    aioice.ice.get_host_addresses = loopback_only  # looked up at each gathering, by Connection.gather_candidates
    add_remote = aioice.ice.Connection.add_remote_candidate

    async def add_remote_on_loopback(self, remote_candidate):
        if remote_candidate is None or remote_candidate.host == "127.0.0.1":
            return await add_remote(self, remote_candidate)

    aioice.ice.Connection.add_remote_candidate = add_remote_on_loopback


def check_relay_only(servers: list[dict], relay_only: bool) -> None:
    """``--ice-relay-only`` needs a TURN server to relay through: without one that side gathers no
    candidate at all and no stream could ever start. A ConfigError says so."""
    from ..errors import ConfigError

    if relay_only and not any(str(s.get("urls", "")).startswith("turn") for s in servers):
        raise ConfigError("--ice-relay-only needs a TURN server: give one in the environment variable "
                          f"{ICE_SERVERS_ENV} (turn:USER:PASSWORD@HOST:PORT) or with --ice-server")


def rtc_configuration(ice_servers: list[dict], relay_only: bool = False):
    """aiortc's configuration with these ICE servers. ``relay_only`` (--ice-relay-only): the ICE
    transport policy "relay" (aioice's TransportPolicy.RELAY), so this side gathers only its TURN
    relay candidate, no host or server-reflexive one, and every pair it can use goes through the
    TURN server: the way to test a TURN server, or to keep this machine's addresses to itself."""
    import os

    from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy

    from .media import install_prompt_jitter_buffer, install_shared_rtp_clock
    from .redundancy import install_redundant_sending

    install_prompt_jitter_buffer()
    install_shared_rtp_clock()
    install_redundant_sending()
    if os.environ.get(LOOPBACK_ENV, "") not in ("", "0"):
        use_loopback_candidates()

    return RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers],
                            iceTransportPolicy=RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL)


# -- serve behind a firewall: a fixed UDP port range, a public address ------------------------------

def parse_port_range(text: str) -> tuple[int, int]:
    """``LO-HI`` (inclusive, 1024..65535) for ``serve --udp-ports``."""
    from ..errors import ConfigError

    lo, sep, hi = text.partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ConfigError(f"--udp-ports must be a range LO-HI such as 40000-40099, got {text!r}") from None
    if not 1024 <= lo_n <= hi_n <= 65535:
        raise ConfigError(f"--udp-ports must be LO-HI with 1024 <= LO <= HI <= 65535, got {text!r}")
    return lo_n, hi_n


def check_public_ip(text: str) -> str:
    """``serve --public-ip``: a literal address (a 1:1-NAT VM's public one), not a host name."""
    import ipaddress

    from ..errors import ConfigError

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(f"--public-ip must be an IP address such as 203.0.113.7, got {text!r}") from None


def constrain_udp_ports(loop, ports: tuple[int, int]) -> None:
    """Makes every UDP socket that ``loop`` binds to "any free port" take one of ``ports`` instead.

    aioice (0.13, under aiortc) binds each host candidate with ``loop.create_datagram_endpoint(...,
    local_addr=(address, 0))`` and has no option for a port range (aiortc/aioice issue #47, PR #112
    still open), so the range is applied at that one call, on the event loop that runs serve's peer
    connections: a bind to port 0 tries the range's ports in turn, going round from after the last
    one taken (a port freed a moment ago is not the next one handed out). Binds to a given port (mDNS
    on 5353) and sockets with only a remote address (the connection to a TURN server, which is
    outgoing) are left as they are. When every port of the range is in use the bind fails as aioice
    expects (OSError) and that address yields no candidate."""
    import errno

    original = loop.create_datagram_endpoint
    if getattr(original, "udp_ports", None) == ports:
        return
    lo, hi = ports
    count = hi - lo + 1
    cursor = [0]

    async def create_datagram_endpoint(protocol_factory, local_addr=None, remote_addr=None, **kwargs):
        if local_addr is None or local_addr[1] != 0 or remote_addr is not None:
            return await original(protocol_factory, local_addr=local_addr, remote_addr=remote_addr, **kwargs)
        for k in range(count):
            port = lo + (cursor[0] + k) % count
            try:
                result = await original(protocol_factory, local_addr=(local_addr[0], port, *local_addr[2:]), **kwargs)
            except OSError:
                continue
            cursor[0] = (port - lo + 1) % count
            return result
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {lo}-{hi}")

    create_datagram_endpoint.udp_ports = ports
    loop.create_datagram_endpoint = create_datagram_endpoint


def free_port_in(ports: tuple[int, int]) -> int | None:
    """The first UDP port of the range that can be bound now (on every address), or None."""
    import socket

    for port in range(ports[0], ports[1] + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    return None


def advertise_public_ip(sdp: str, public_ip: str) -> str:
    """The SDP with its host candidates (of the public address's family) carrying ``public_ip``: a
    VM behind 1:1 NAT (most clouds) knows only its private address, while a peer elsewhere must
    send to the public one, which the NAT maps port for port onto the private one. The connection
    line that named a replaced address names the public one too. Server-reflexive and relay
    candidates are left as they are."""
    import ipaddress

    version = ipaddress.ip_address(public_ip).version
    replaced: set[str] = set()
    out = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            f = line.split(" ")
            # foundation component transport priority address port "typ" type ...
            if len(f) >= 8 and f[6] == "typ" and f[7] == "host":
                try:
                    same_family = ipaddress.ip_address(f[4]).version == version
                except ValueError:  # an mDNS name
                    same_family = False
                if same_family:
                    replaced.add(f[4])
                    f[4] = public_ip
                    line = " ".join(f)
        out.append(line)
    family = "IP4" if version == 4 else "IP6"
    for i, line in enumerate(out):
        if line.startswith("c=IN ") and line.split(" ")[-1] in replaced:
            out[i] = f"c=IN {family} {public_ip}"
    return "\r\n".join(out)
