"""`live2diff-engine run`: the live engine, camera in, stylised virtual webcam out."""

from __future__ import annotations

import sys

from ..errors import ConfigError
from ..options import add_run_args, control_settings, ctl_hint, warn_secrets_on_command_line


def add_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        help="the live engine: camera in, stylised virtual webcam out",
        description="Grab frames from a source, stylise them live and publish them to the sinks (by default the "
        "default camera to a virtual camera). Runs until Ctrl-C.",
    )
    add_run_args(run)


def _cmd_run(args) -> int:
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError("--max-frames must be at least 1")
    from ..assemble import model_size, preflight

    # Option values, --lora files, model paths and the models still to download: one line each
    # before torch loads (seconds) and before the camera opens.
    preflight(args)
    import logging

    from ..io.sinks import SinkUnavailable, parse_sink
    from ..io.sources import open_at_start, parse_source

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.source.partition(":")[0] == "obs-filter":
        from ..io.obs_filter import parse_filter_source

        source = parse_filter_source(args.source, model_size(args))
    else:
        source = parse_source(
            args.source, camera_size=args.camera_size, camera_fps=args.camera_fps, loop=args.loop,
            synthetic_size=args.camera_size or (640, 480), seed=args.seed,
        )
    link = getattr(source, "link", None)  # --source obs-filter: the stylised frames go back to the filter
    default_sinks = [] if link is not None else ["virtualcam"]
    sinks = [parse_sink(s, vcam_device=args.vcam_device, vcam_fps=args.vcam_fps, mirror=args.mirror) for s in (args.sink or default_sinks)]
    if link is not None:
        from ..io.obs_filter import FilterSink

        sinks.insert(0, FilterSink(link))
    open_at_start(source, lambda line: print(line, file=sys.stderr, flush=True))
    from ..assemble import build_frame_pipeline, picture_note  # after the camera: a missing one is said before torch loads (seconds)
    from ..engine import Engine

    size = args.output_size or source.frame_size() or (640, 480)
    fps = args.vcam_fps or source.fps or 30.0
    opened = []
    control = None
    api_on = control_settings(args)["api"] is not None  # checks the config file before anything starts
    loading = _SigtermWhileLoading()  # a SIGTERM before the stream starts ends it like Ctrl-C: outputs closed
    try:
        for sink in list(sinks):  # before the long model load, so a missing driver is known at once
            try:
                sink.open(size[0], size[1], fps)
            except SinkUnavailable as exc:
                if args.sink is not None or not api_on:
                    raise
                # The default sink: without a driver the output still reaches OBS and browsers.
                print(f"warning: {exc}; going on without a virtual camera (the output is on the local stream)",
                      file=sys.stderr, flush=True)
                sinks.remove(sink)
                continue
            opened.append(sink)
        args.output_size = size
        from ..io.sinks import CardPublisher

        control = _start_control(args, size)
        if control.api is not None:
            control.api.stream.max_fps = fps  # the MJPEG stream never runs faster than the output
            sinks.append(control.api.stream)
        from ..saved_settings import restore_into_args, start_saving

        saved_seed = restore_into_args(args, lambda line: print(line, file=sys.stderr, flush=True))
        with CardPublisher(sinks, size, "Live2Diff is starting", "loading models ..."):
            comps, frames, manager, style = build_frame_pipeline(args)
        print(f"model: {comps.label}; style: {style.name}; {frames.steps} denoising steps; {frames.width}x{frames.height}"
              f"{picture_note(frames)}", file=sys.stderr, flush=True)
        controller = control.attach(frames, manager, comps.label)
        if link is not None:
            link.attach(controller)
            print(f"OBS filter: listening on 127.0.0.1:{link.port} (add the 'Live2Diff' filter to a source in OBS)",
                  file=sys.stderr, flush=True)
        start_saving(controller, saved_seed, fresh=bool(getattr(args, 'fresh', False)), args=args,
                     say=lambda line: print(line, file=sys.stderr, flush=True))
        engine = Engine(frames, source, sinks, output_size=size, max_frames=args.max_frames, stats_path=args.stats, fps=fps,
                        controller=controller, pace=True)
        loading.over()
        return engine.run()
    finally:
        loading.over()
        # The outputs first (a file is complete once closed), the API last: the dock and OBS hear
        # "stopped" after the final frames are out.
        for sink in opened:
            try:
                sink.close()
            except Exception:
                pass
        source.close()
        if control is not None:
            control.stop()
        global exit_at_once
        exit_at_once = True


class _SigtermWhileLoading:
    """SIGTERM raises KeyboardInterrupt until ``over()`` (the engine then handles it), so a stop
    while the models load closes what is open, as Ctrl-C does. Main thread only."""

    def __init__(self):
        import signal
        import threading

        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def over(self) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


class _Control:
    """The local API (started before the models load, so the dock and OBS show 'starting') and
    the OBS bridge (started once there is an engine to control)."""

    def __init__(self, args, api, settings: dict):
        self.args, self.api, self.settings = args, api, settings
        self.bridge = None
        self.controller = None

    def attach(self, frames, manager, label: str):
        from ..control.controller import Controller

        c = Controller(frames, manager, label=label)
        c.api_token = self.api.token if self.api is not None else None
        from ..config import civitai_token, default_transition, load_config

        config = load_config(self.args.config)
        c.civitai_token = civitai_token(config)
        c.default_transition_s = default_transition(config)
        if self.api is not None:
            self.api.set_controller(c)
        obs = self.settings["obs"]
        if obs is not None:
            from ..control.obs import ObsBridge

            self.bridge = ObsBridge(
                c, obs["host"], obs["port"], obs["password"], output_url=self.api.url if self.api else None,
                source_kind=obs["source"], lipsync_input=obs["lipsync_input"], lipsync_extra_ms=obs["lipsync_extra_ms"],
            ).start()
            origin = f"; password from {obs['from']}" if obs.get("from") else ""
            print(f"OBS control: connecting to ws://{obs['host']}:{obs['port']}{origin}", file=sys.stderr, flush=True)
        self.controller = c
        return c

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        if self.api is not None:
            self.api.stop()


def _start_control(args, size) -> _Control:
    warn_secrets_on_command_line(args, lambda line: print(line, file=sys.stderr, flush=True))
    settings = control_settings(args)
    api = None
    if settings["api"] is not None:
        from ..control.api import ApiServer
        from ..io.sinks import no_signal_card

        a = settings["api"]
        api = ApiServer(a["host"], a["port"], a["token"]).start()
        api.stream.send(no_signal_card(size[0], size[1], "Live2Diff is starting", "loading models ..."))
        print(f"control: dock {api.url}/dock | output for OBS {api.url}/stream.mjpg | `{ctl_hint(api.url, args.config)}`",
              file=sys.stderr, flush=True)
    return _Control(args, api, settings)


exit_at_once = False  # set once run's outputs are closed: the process may end without the interpreter's teardown

COMMANDS = {"run": (add_parser, _cmd_run)}
