"""`live2diff-engine doctor URL`: checks from this machine what works with a remote engine (`serve`):
signalling and token, the candidates each side gathers, a TURN allocation where one is configured,
and a short media round trip. Its options and its run; the checks are in `remote/doctor.py`."""

from __future__ import annotations

import sys

from ..options import add_relay_only_arg


def add_parser(sub) -> None:
    d = sub.add_parser(
        "doctor",
        help="check the way to a remote engine (`serve`): signalling, token, ICE candidates, TURN, a media round trip",
        description="Check, from this machine, what works with a remote engine as `connect` would use it: the "
        "signalling (HTTP/HTTPS) and the token, the ICE candidates each side gathers, a TURN allocation where a TURN "
        "server is configured, and a short media round trip. The last line says what works and what to open or "
        "configure; the exit status is 1 when something failed.",
    )
    d.add_argument("url", help="the remote engine's address, e.g. http://gpu-box:8765")
    d.add_argument("--token", default=None, help="the remote engine's token (or LIVE2DIFF_API_TOKEN); never printed")
    d.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="a STUN or TURN server, as for connect (repeatable; or LIVE2DIFF_ICE_SERVERS)")
    add_relay_only_arg(d)
    d.add_argument("--codec", choices=("vp8", "h264"), default=None, help="offer only this video codec, as connect --codec")
    d.add_argument("--media-timeout", type=float, default=20.0, metavar="S",
                   help="how long the media round trip may take, the engine's warmup included (default 20)")


def cmd_doctor(args) -> int:
    import asyncio
    import logging
    import os

    from ..errors import ConfigError
    from ..remote.doctor import Doctor
    from ..remote.ice import check_relay_only, ice_servers_from

    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.media_timeout <= 0:
        raise ConfigError("--media-timeout must be more than 0 seconds")
    ice = ice_servers_from(args.ice_server, os.environ, say)
    check_relay_only(ice, args.ice_relay_only)
    if args.token:
        say("warning: --token is visible to every user of this machine in the process list; "
            "put it in the environment variable LIVE2DIFF_API_TOKEN instead")
    token = args.token or os.environ.get("LIVE2DIFF_API_TOKEN") or None
    doctor = Doctor(args.url, token=token, ice_servers=ice, say=say, codec=args.codec, media_s=args.media_timeout,
                    relay_only=args.ice_relay_only)
    return 0 if asyncio.run(doctor.run()) else 1


COMMANDS = {"doctor": (add_parser, cmd_doctor)}
