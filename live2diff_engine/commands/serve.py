"""`live2diff-engine serve`: the engine on a GPU box, for cameras elsewhere, over WebRTC (WHIP).
Its options and its run; the sessions and the WHIP endpoint are in `remote/`."""

from __future__ import annotations

import signal
import sys
import threading

from ..options import (add_control_args, add_link_args, add_model_args, add_relay_only_arg, control_settings,
                       warn_secrets_on_command_line)


def add_parser(sub) -> None:
    sv = sub.add_parser(
        "serve",
        help="the engine as a server: cameras elsewhere send video over WebRTC (WHIP), the stylised video goes back",
        description="Serve the engine over the network: a laptop (`live2diff-engine connect`), a browser (/studio) or "
        "OBS 30+ (WHIP) sends its camera; the stylised video comes back on the same WebRTC connection. The local API "
        "and dock are there too. Bound beyond 127.0.0.1 (--api-host), every request needs --api-token.",
    )
    g = sv.add_argument_group("sessions and network")
    g.add_argument("--max-sessions", type=int, default=1,
                   help="streams served at once, each with its own model state (default 1: one stream per GPU; "
                   "each more holds another copy of the model)")
    g.add_argument("--session-grace", type=float, default=10.0, metavar="S",
                   help="a cut link (no video) keeps its session this long (default 10 s): its engine, cache, prompt "
                   "and style wait for `connect` to resume it with no new warmup; past it the session is freed")
    g.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="a STUN or TURN server for connections across networks, e.g. stun:stun.example.org:3478 or "
                   "turn:USER:PASSWORD@turn.example.org:3478 (repeatable; default none: nothing is contacted). A TURN "
                   "password here is visible in the process list: put such servers in LIVE2DIFF_ICE_SERVERS (space-separated)")
    add_relay_only_arg(g)
    g.add_argument("--tls-cert", metavar="FILE", default=None, help="serve HTTPS with this certificate (PEM); with --tls-key")
    g.add_argument("--tls-key", metavar="FILE", default=None, help="the certificate's private key (PEM)")
    g.add_argument("--fps", type=float, default=30.0, help="the frame rate the clients send (default 30)")
    g.add_argument("--udp-ports", metavar="LO-HI", default=None,
                   help="media only on these UDP ports, e.g. 40000-40099, so a firewall can open just them (default: any "
                   "free port). Each stream (and each WHEP viewer) takes one port per network address of this machine")
    g.add_argument("--public-ip", metavar="ADDR", default=None,
                   help="the public address of this machine when it sits behind 1:1 NAT (a cloud VM): the host "
                   "candidates it offers carry ADDR instead of the private address")
    add_link_args(g)
    f = sv.add_argument_group("fleet (a Ray cluster of GPU machines; needs the [fleet] extra)")
    f.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="place each stream on a GPU of this Ray cluster (HOST:PORT of its head; auto: the cluster this "
                   "machine belongs to; local: start a one-machine cluster). This process is then the front: it "
                   "answers /whip and /api, the media goes straight to the GPU node")
    f.add_argument("--gpus-per-session", type=float, default=1.0, metavar="N",
                   help="GPUs each stream holds (default 1; a fraction such as 0.5 packs streams onto one card)")
    f.add_argument("--warm-per-gpu", type=int, default=0, metavar="N",
                   help="engines kept loaded on every GPU ahead of any stream (default 0): a new stream takes one and "
                   "starts without loading the models")
    f.add_argument("--queue-s", type=float, default=0.0, metavar="S",
                   help="with every GPU in use, wait up to S seconds for one to free (or the cluster to grow) before "
                   "answering 503 (default 0)")
    add_model_args(sv)
    add_control_args(sv)


def _ssl_context(args):
    if not args.tls_cert and not args.tls_key:
        return None
    from ..errors import ConfigError

    if not (args.tls_cert and args.tls_key):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use --tls-cert/--tls-key: {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def cmd_serve(args) -> int:
    import logging
    import os

    from ..assemble import build_frame_pipeline, picture_note, preflight
    from ..errors import ConfigError

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.max_sessions < 1:
        raise ConfigError("--max-sessions must be at least 1")
    if not 1.0 <= args.session_grace <= 3600.0:
        raise ConfigError("--session-grace must be 1 to 3600 seconds (how long a cut link keeps its session)")
    from ..remote.ice import check_public_ip, check_relay_only, free_port_in, ice_servers_from, parse_port_range

    udp_ports = parse_port_range(args.udp_ports) if args.udp_ports else None
    if udp_ports is not None and free_port_in(udp_ports) is None:
        raise ConfigError(f"--udp-ports {args.udp_ports}: every port of the range is in use; give a free range")
    public_ip = check_public_ip(args.public_ip) if args.public_ip else None
    ice = ice_servers_from(args.ice_server, os.environ, say)
    check_relay_only(ice, args.ice_relay_only)
    if args.ray is not None:
        return _serve_fleet(args, say, ice)
    for name, value in (("--gpus-per-session", args.gpus_per_session != 1.0), ("--warm-per-gpu", args.warm_per_gpu),
                        ("--queue-s", args.queue_s)):
        if value:
            raise ConfigError(f"{name} places streams on a Ray cluster: give --ray ADDRESS too (or leave {name} out)")
    preflight(args, say)  # option values, model paths, the models to download: before torch loads
    from ..control.api import ApiServer
    from ..remote.server import Slot, WebRtcService
    from ..engine import Engine
    from ..remote.idle import IdleController
    from ..remote.link import limit_bitrate
    from ..remote.redundancy import set_redundancy

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    limit_bitrate(args.max_bitrate)
    set_redundancy(args.redundancy)
    warn_secrets_on_command_line(args, say)
    settings = control_settings(args)
    if settings["api"] is None:
        raise ConfigError("serve needs its API (the WHIP endpoint lives there); drop --no-api")
    ssl_context = _ssl_context(args)
    a = settings["api"]
    api = ApiServer(a["host"], a["port"], a["token"])  # refuses a host beyond loopback without a token
    api.ssl_context = ssl_context

    from ..config import default_transition, load_config

    transition_s = default_transition(load_config(args.config))  # the config's [control] transition_s
    slots = []
    for i in range(args.max_sessions):
        comps, frames, manager, style = build_frame_pipeline(args, say=say if i == 0 else (lambda text: None))
        slots.append(Slot(frames, manager, comps.label, transition_s=transition_s))
    say(f"model: {comps.label}; style: {style.name}; {frames.steps} denoising steps; {frames.width}x{frames.height}; "
        f"{args.max_sessions} session{'s' if args.max_sessions != 1 else ''}{picture_note(frames)}")

    def make_engine(session, pipeline, sinks):
        return Engine(pipeline, session.source, sinks, fps=args.fps, status=False, controller=session.controller)

    idle = IdleController(slots[0], args.max_sessions)

    def sessions_changed():
        current = service.current()
        wanted = current.controller if current is not None else idle
        if api.controller is not wanted:
            wanted.api_url = api.url
            api.set_controller(wanted)
        api.notify_changed()

    service = WebRtcService(slots, ice_servers=ice, make_engine=make_engine, on_change=sessions_changed, say=say,
                            fps=args.fps, session_grace=args.session_grace, udp_ports=udp_ports, public_ip=public_ip,
                            codec=args.codec, relay_only=args.ice_relay_only)
    service.view_sinks.append(api.stream)
    api.extra_routes.append(service.add_routes)
    api.start()
    service.address = api.url
    sessions_changed()
    say(f"serving: WHIP {api.url}/whip | dock {api.url}/dock | output {api.url}/stream.mjpg"
        + (" | token required" if api.token else "")
        + (f" | media on UDP {udp_ports[0]}-{udp_ports[1]}" if udp_ports else "")
        + (f" | host candidates advertise {public_ip}" if public_ip else "")
        + (" | media through the TURN relay only" if args.ice_relay_only else ""))

    try:
        _wait_for_signal()
    finally:
        say("stopping")
        if service.loop is not None:
            import asyncio

            try:
                asyncio.run_coroutine_threadsafe(service.close(), service.loop).result(15)
            except Exception:
                pass
        api.stop()
        if not service.sessions:  # every session ended, its engine thread joined: nothing of the user's is open
            global exit_at_once
            exit_at_once = True
    return 0


def _wait_for_signal() -> None:
    """Until Ctrl-C or SIGTERM."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _serve_fleet(args, say, ice: list[dict]) -> int:
    """`serve --ray`: this process is the front; each stream runs on a GPU node of the cluster
    (remote/fleet.py). The front holds no model and no stream: stopping it leaves them running."""
    import logging

    from ..errors import ConfigError, UserError

    if not 0.0 < args.gpus_per_session <= 8.0:
        raise ConfigError("--gpus-per-session must be above 0 and at most 8 (a fraction packs streams onto one GPU)")
    if args.warm_per_gpu < 0 or args.warm_per_gpu * args.gpus_per_session > 1.0 + 1e-9:
        raise ConfigError(f"--warm-per-gpu {args.warm_per_gpu} does not fit: each engine holds --gpus-per-session "
                          f"{args.gpus_per_session:g} GPU; give at most {int(1 / args.gpus_per_session + 1e-9)}")
    if not 0.0 <= args.queue_s <= 3600.0:
        raise ConfigError("--queue-s must be 0 to 3600 seconds")
    if args.max_sessions != 1:
        raise ConfigError("--max-sessions does not apply with --ray: the cluster's GPUs decide how many streams run")
    if args.public_ip:
        raise ConfigError("--public-ip names one machine; with --ray each GPU node offers its own address: give "
                          "--ice-server stun:HOST:PORT (each node then offers its public one), or a TURN server")
    if args.ray not in ("auto", "local"):  # Ray itself would wait for minutes on an address where nothing answers
        import socket

        host, _, port = args.ray.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--ray {args.ray}: give the head's HOST:PORT (e.g. 10.0.0.5:6379), auto or local")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise UserError(f"cannot reach the Ray cluster at {args.ray} ({getattr(exc, 'strerror', None) or exc}); "
                            "is `ray start --head` running there, and its port open?") from None
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # Ray itself is imported by remote/fleet.py only
        raise ConfigError('--ray needs Ray: pip install "live2diff-engine[fleet]"')
    from ..control.api import ApiServer
    from ..remote.fleet import FleetFront, FrontController, add_front_routes

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warn_secrets_on_command_line(args, say)
    settings = control_settings(args)
    if settings["api"] is None:
        raise ConfigError("serve needs its API (the WHIP endpoint lives there); drop --no-api")
    a = settings["api"]
    api = ApiServer(a["host"], a["port"], a["token"])
    api.ssl_context = _ssl_context(args)
    say(f"fleet: joining the Ray cluster ({args.ray}) ...")
    try:
        fleet = FleetFront(args.ray, args, ice, say)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot join the Ray cluster at {args.ray}: {str(exc).strip().splitlines()[0][:200]} "
                        "(is `ray start --head` running there?)") from None
    nodes = fleet.nodes()
    gpus = sum(n["gpus"] for n in nodes)
    say(f"fleet: {len(nodes)} GPU node{'s' if len(nodes) != 1 else ''}, {gpus:g} GPU{'s' if gpus != 1 else ''}; "
        f"{args.gpus_per_session:g} GPU per stream; {args.warm_per_gpu} warm engine(s) per GPU")
    if not gpus:
        say("fleet: the cluster has no GPU yet: every stream is refused (503, Retry-After) until a GPU node joins"
            + (f", or waits up to --queue-s {args.queue_s:g} s for one" if args.queue_s else ""))
    api.extra_routes.append(add_front_routes(fleet))
    api.start()
    api.set_controller(FrontController(fleet))
    say(f"serving: WHIP {api.url}/whip | fleet {api.url}/api/fleet | dock {api.url}/dock"
        + (" | token required" if api.token else ""))
    try:
        _wait_for_signal()
    finally:
        say("stopping the front (the streams go on, on their nodes)")
        api.stop()
        fleet.close()
    return 0


exit_at_once = False  # set once every session has ended: the process may end without the interpreter's teardown

COMMANDS = {"serve": (add_parser, cmd_serve)}
