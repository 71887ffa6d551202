"""`live2diff-engine connect`: `run` with the model on another machine (`serve`), over WebRTC.
Its options and its run; the remote end (RemotePipeline, the forwarding controller) is in `remote/client.py`."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque

from ..errors import ConfigError
from ..options import (add_control_args, add_io_args, add_link_args, add_relay_only_arg, control_settings,
                       warn_secrets_on_command_line)


def add_parser(sub) -> None:
    c = sub.add_parser(
        "connect",
        help="use an engine on another machine (`serve`): this camera in, its stylised video out here",
        description="Send this machine's camera to a remote engine (`live2diff-engine serve` on a GPU box) over WebRTC "
        "and publish the stylised video here: virtual camera, window, file, the local MJPEG stream for OBS. "
        "`ctl` works against it as against `run`.",
    )
    c.add_argument("url", help="the remote engine's address, e.g. http://gpu-box:8765")
    c.add_argument("--token", default=None, help="the remote engine's token (or LIVE2DIFF_API_TOKEN); never printed")
    c.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="a STUN or TURN server, e.g. turn:USER:PASSWORD@turn.example.org:3478 (repeatable; default none). "
                   "A TURN password here is visible in the process list: put such servers in LIVE2DIFF_ICE_SERVERS")
    add_relay_only_arg(c)
    add_link_args(c)
    add_io_args(c)
    add_control_args(c)


def cmd_connect(args) -> int:
    import os

    from ..remote.client import ForwardingController, RemotePipeline
    from ..remote.ice import check_relay_only, ice_servers_from
    from ..remote.link import limit_bitrate
    from ..remote.redundancy import set_redundancy
    from ..engine import Engine
    from ..io.sinks import SinkUnavailable, no_signal_card, parse_sink
    from ..io.sources import open_at_start, parse_source

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError("--max-frames must be at least 1")
    ice = ice_servers_from(args.ice_server, os.environ, say)
    check_relay_only(ice, args.ice_relay_only)
    limit_bitrate(args.max_bitrate)
    set_redundancy(args.redundancy)
    token = args.token or os.environ.get("LIVE2DIFF_API_TOKEN") or None
    if args.token:
        say("warning: --token is visible to every user of this machine in the process list; "
            "put it in the environment variable LIVE2DIFF_API_TOKEN instead")
    warn_secrets_on_command_line(args, say)
    remote = RemotePipeline(args.url, token=token, ice_servers=ice, say=say, codec=args.codec,
                            relay_only=args.ice_relay_only)
    settings = control_settings(args)
    source = parse_source(args.source, camera_size=args.camera_size, camera_fps=args.camera_fps, loop=args.loop,
                          synthetic_size=args.camera_size or (640, 480))
    sinks = [parse_sink(s, vcam_device=args.vcam_device, vcam_fps=args.vcam_fps, mirror=args.mirror)
             for s in (args.sink or ["virtualcam"])]
    open_at_start(source, say)
    size = source.frame_size() or (640, 480)
    fps = args.vcam_fps or source.fps or 30.0
    opened, api = [], None
    try:
        for sink in list(sinks):
            try:
                sink.open(size[0], size[1], fps)
            except SinkUnavailable as exc:
                if args.sink is not None or settings["api"] is None:
                    raise
                say(f"warning: {exc}; going on without a virtual camera (the output is on the local stream)")
                sinks.remove(sink)
                continue
            opened.append(sink)
        controller = ForwardingController(remote)
        if settings["api"] is not None:
            from ..control.api import ApiServer

            a = settings["api"]
            api = ApiServer(a["host"], a["port"], a["token"]).start()
            api.stream.max_fps = fps
            api.stream.send(no_signal_card(size[0], size[1], "Live2Diff", f"connecting to {remote.base} ..."))
            controller.api_url = api.url
            api.set_controller(controller)
            sinks.append(api.stream)
            say(f"control: output for OBS {api.url}/stream.mjpg | `live2diff-engine ctl status` (forwarded to {remote.base})")
        engine = Engine(remote, source, sinks, output_size=size, max_frames=args.max_frames, stats_path=args.stats, fps=fps,
                        controller=controller, pace=True, status=False)

        link = {"down": False}
        timeline = LatencyTimeline(engine.stats.extra)

        def emit(ready):  # the delivering thread; it stops once remote.flush (the engine's last call) is over
            if link["down"]:  # frames flow again: out of "no signal" (the engine leaves it only for its source)
                link["down"] = False
                if engine.stats.state == "no signal":
                    engine.stats.state = "streaming"
                    controller.changed()
            engine.stats.extra["frames_sent"] = remote.sent
            engine.stats.extra["frames_lost"] = remote.frames_lost()
            caps = engine._capture_times
            newest = max(i for i, _ in ready)
            timeline.add([caps.get(i) for i, _ in ready])
            try:
                for k in [k for k in list(caps.keys()) if k < newest]:  # frames the server dropped
                    caps.pop(k, None)
            except RuntimeError:
                pass
            engine._emit(ready)

        def lost(text):
            engine._deliver(no_signal_card(size[0], size[1], text, "reconnecting ..."), paced_only=True, count=False)
            link["down"] = True
            engine.stats.state = "no signal"
            controller.changed()

        remote.emit, remote.on_lost = emit, lost
        remote.stop_requested = lambda: engine.stopping

        def remote_status(msg):  # the remote engine's own part of the round trip, in --stats too
            if msg.get("latency_ms") is not None:  # a new session's warmup has none yet: the last one stays
                engine.stats.extra["remote_latency_ms_p50"] = msg["latency_ms"]
                if msg.get("state") == "streaming":  # a warmup's frames go straight out: not the engine's time
                    timeline.engine(msg["latency_ms"])
            engine.stats.extra.update(remote_frames_out=msg.get("frames_out"), frames_sent=remote.sent,
                                      frames_back=remote.received, frames_lost=remote.frames_lost())
            controller.changed()

        remote.on_status = remote_status
        # A quit through this API as soon as it says "streaming" (before run() below takes stops):
        # kept as a stop, and run() then ends at once (was: "cannot be stopped through its API").
        engine.api_quit = engine._quit_from_api
        remote.start()
        status = threading.Thread(target=_status_lines, args=(engine, remote, controller, say), name="status", daemon=True)
        status.start()
        return engine.run()
    finally:
        remote.stop()
        for sink in opened:
            try:
                sink.close()
            except Exception:
                pass
        source.close()
        if api is not None:
            api.stop()
        global exit_at_once
        exit_at_once = True


exit_at_once = False  # set once connect's link, sinks and API are closed: the process may end without the interpreter's teardown


class LatencyTimeline:
    """Capture to publish, second by second: ``extra["latency_by_s"]`` (in --stats) is a list of
    [seconds since the first frame back, p50 ms, frames] for every second with frames, so that a
    bench sees when latency rose and when it came back (the p50 of the whole run hides both); and
    ``extra["latency_samples"]``, [seconds since the first frame back, ms] for every frame (the last
    ``keep_samples``), so that a bench can take the p50 over a window of several seconds (at a few
    frames a second, one second's p50 is the median of three); and ``extra["engine_samples"]``,
    [seconds since the first frame back, ms] of the remote engine's own time (its receive to its
    send, the p50 its status reports a few times a second, once it streams: not in its warmup),
    so that a bench judges each window against what the engine itself took then (a loaded machine's engine is slower for a while, and
    the network is not to blame for that)."""

    def __init__(self, extra: dict, keep: int = 3600, keep_samples: int = 20000):
        self.extra, self.keep, self.keep_samples = extra, keep, keep_samples
        self.t0: float | None = None
        self.second: int | None = None
        self.values: list[float] = []
        extra["latency_by_s"] = []
        extra["latency_samples"] = []
        extra["engine_samples"] = []

    def engine(self, ms: float) -> None:
        if self.t0 is not None:  # before the first frame back there is no window to judge
            samples = self.extra["engine_samples"]
            samples.append([round(time.monotonic() - self.t0, 2), ms])
            del samples[:-self.keep_samples]

    def add(self, capture_times) -> None:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        second = int(now - self.t0)
        if second != self.second:
            self._close()
            self.second = second
        values = [now - t for t in capture_times if t is not None]
        self.values += values
        samples = self.extra["latency_samples"]
        samples += [[round(now - self.t0, 2), round(v * 1000, 1)] for v in values]
        del samples[:-self.keep_samples]

    def _close(self) -> None:
        if self.second is not None and self.values:
            v = sorted(self.values)
            rows = self.extra["latency_by_s"]
            rows.append([self.second, round(v[len(v) // 2] * 1000, 1), len(v)])
            del rows[:-self.keep]
        self.values = []


def _status_lines(engine, remote, controller, say) -> None:
    """The round trip, every few seconds: capture to local publish p50/p95, the remote engine's
    own part, what the network (and the codecs) add, and the link (candidate type, RTT, loss,
    jitter, bitrate, codec)."""
    from ..remote.link import describe

    window: deque = deque(maxlen=4)
    while not engine.stopping:
        engine._stop.wait(2.0 if sys.stderr.isatty() else 10.0)
        if engine.stopping:
            break
        s = controller.status()
        window.append(s)
        if not remote.connected:
            say(f"[no signal] reconnecting to {remote.base} ...")
            continue
        lat = s.get("latency_ms")
        p95 = s.get("latency_ms_p95")
        rt = f"{lat:.0f}/{p95:.0f} ms" if lat is not None and p95 is not None else "-"
        eng = s.get("remote_latency_ms")
        net = s.get("network_ms")
        say(f"[{s.get('state')}] {remote.base} | out {s.get('fps', 0):.1f} fps | capture to publish p50/p95 {rt} | "
            f"engine {eng if eng is not None else '-'} ms | network and codecs {net if net is not None else '-'} ms | "
            f"sent {remote.sent} back {remote.returned} lost {remote.frames_lost()} | {describe(remote.link)}")


COMMANDS = {"connect": (add_parser, cmd_connect)}
