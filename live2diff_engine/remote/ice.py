"""ICE servers (STUN, TURN) for both ends of a remote stream, `serve` and `connect`: from
--ice-server and LIVE2DIFF_ICE_SERVERS, shown without their credentials, and as aiortc's
configuration."""

from __future__ import annotations


ICE_SERVERS_ENV = "LIVE2DIFF_ICE_SERVERS"


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


def rtc_configuration(ice_servers: list[dict]):
    from aiortc import RTCConfiguration, RTCIceServer

    from .media import install_prompt_jitter_buffer

    install_prompt_jitter_buffer()

    return RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers])
