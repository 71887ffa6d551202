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


def rtc_configuration(ice_servers: list[dict]):
    import os

    from aiortc import RTCConfiguration, RTCIceServer

    from .media import install_prompt_jitter_buffer

    install_prompt_jitter_buffer()
    if os.environ.get(LOOPBACK_ENV, "") not in ("", "0"):
        use_loopback_candidates()

    return RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers])
