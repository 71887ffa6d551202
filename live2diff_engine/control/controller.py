"""Commands in, applied between frames; status out.

Commands are validated on the thread that receives them (the API's event loop, the OBS bridge):
a refused command gets its error reply at once and never reaches the engine. Accepted ones wait
in a bounded queue that the inference thread empties between two frames, so a change never
tears a frame and never races the model. A burst of the same setting collapses to its last value.

A style change is the one command that takes long (a DreamBooth checkpoint is gigabytes to read
and convert): its files are read and converted, its LoRAs fused and its prompt encoded on a loader
thread beside the running stream (status: ``style_loading``), and only the swap of the prepared
weights (constant time per tensor, see StyleManager) happens between two frames.
Its reply comes then, or with the reason it failed (the style in place stays). A newer style
request while one loads wins: the older one is answered as superseded.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from typing import Any, Callable

from .. import __version__
from ..pipeline.schedule import LIVE_SCHEDULE_STEPS, live_strength, live_t_index
from .schema import (
    INSTANCE_ENV, Command, CommandError, decode, message_id, parse_command, reply_message, status_message,
)

log = logging.getLogger("live2diff.control")

Reply = Callable[[dict], None]
MAX_PENDING = 256


class Pacer:
    """A token bucket: at most ``rate`` messages a second after a ``burst``. A flood of commands
    is read at this pace (the sender waits; every message still gets its reply), so that the
    control threads never take more than a sliver of the CPU and the GIL from the inference
    thread. PyTorch releases the GIL around every op, so a busy Python thread beside it slows
    each frame by its many re-acquisitions."""

    def __init__(self, rate: float = 100.0, burst: float = 50.0):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()
        self._lock = threading.Lock()

    def delay(self) -> float:
        """Take a token; returns how long to wait before handling this message."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            self.tokens -= 1.0
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def _schedule_of(schedule_args) -> dict:
    """{"strength", "steps"} of (num_inference_steps, t_index_list, strength), as the live controls
    show them."""
    steps, t_index, strength = schedule_args
    if t_index is None:  # a style given by strength over its own schedule
        from ..pipeline.schedule import make_schedule

        t_index = list(make_schedule(steps, strength=strength).t_index_list)
    return {"strength": live_strength(t_index, steps), "steps": len(t_index)}


def _rounded(value):
    return round(value, 3) if isinstance(value, float) else None


def _quote(text, limit: int = 60) -> str:
    text = "" if text is None else str(text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


LOADER_NICE = 10  # how far the style loader's priority sits below the stream's (Linux)


def _yield_to_the_stream() -> None:
    """Lowers the calling thread's CPU priority (on Linux each thread has its own nice value), so
    that reading and converting a style takes the cores the stream leaves and slows its frames
    less. Elsewhere, or where it is refused, nothing changes."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
        except (AttributeError, OSError):
            pass


def quit_engine(engine, instance: str | None, cmd: Command, reply: Reply, local: bool) -> bool:
    """``quit``: stops the engine as Ctrl-C does, through the stop the engine's signal handler makes
    (``Engine.api_quit``: set while the engine runs its own process's main loop). Taken only from
    this machine's local API and, where the command names an instance, from the launcher of this
    one. Replies either way; True when the engine was told to stop."""
    error = None
    if not local:
        error = "quit is taken only from this machine's local API (http://127.0.0.1)"
    elif "instance" in cmd.args and cmd.args["instance"] != instance:
        error = "quit refused: this is not the engine instance that was asked to stop"
    elif engine is None:
        error = "the engine is still starting; try again in a moment"
    quit_now = getattr(engine, "api_quit", None)
    if error is None and quit_now is None and not getattr(engine, "stopping", False):
        error = "this engine cannot be stopped through its API (it runs inside another program)"
    if error is not None:
        reply(reply_message(cmd.id, False, error))
        return False
    log.warning("quit asked for through the local API: stopping")
    reply(reply_message(cmd.id, True))
    if quit_now is not None:
        quit_now()
    return True


class Controller:
    """Owns the live settings of one engine: ``frames`` (a FramePipeline), ``manager`` (a
    StyleManager). ``engine`` and ``obs`` are attached once they exist."""

    def __init__(self, frames, manager, *, label: str = ""):
        self.frames = frames
        self.manager = manager
        self.label = label
        self.engine = None
        self.obs = None  # an ObsBridge, for add_to_scene and the connection state
        self.api_url: str | None = None
        self.api_token: str | None = None  # for the stream URL given to OBS, where the API has one
        self.stream_clients: Callable[..., int] | None = None  # the API's reader count of /stream.mjpg
        self.paused = False
        # Seconds a prompt, negative prompt, style template or seed change takes to move in when its
        # command gives no transition_s (the config's [control] transition_s; 0: at once).
        self.default_transition_s = 0.0
        self.civitai_token: str | None = None  # lets the dock start style downloads from civitai
        self.settings_file = None  # where the live settings are saved after each change (saved_settings)
        self.settings_io = None  # (snapshot, save): how they are read off and written, from saved_settings.start_saving
        self._saved: dict | None = None
        # The bytes of the picture sent in (POST /api/style-image) while it steers the stream, kept
        # with the saved settings so that it survives a restart; None for none, a style's or the
        # command line's picture (those come back by themselves).
        self.sent_picture: bytes | None = None
        self._picture_restoring = False  # a saved picture is being encoded again at start
        self.kept_style_image_scale: float | None = None  # saved, for an engine with an IP-Adapter
        self._download: dict | None = None  # the style download in progress (or the last one)
        self._download_thread: threading.Thread | None = None
        self.accepted = 0
        self.refused = 0
        self.applied = 0
        # The style whose files the loader thread is reading, and the one asked for after it (each
        # {"style", "replies", "mark", ...}); set and taken under self._lock.
        self._style_load: dict | None = None
        self._style_next: dict | None = None
        # The style picture being encoded beside the stream, and the one sent after it (each
        # {"data", "bytes", "reply", "done", "embeds", "error"}); set and taken under self._lock.
        self._picture_load: dict | None = None
        self._picture_next: dict | None = None
        self._schedule_changes = 0  # strength/steps commands applied: a style arriving later keeps theirs
        # What the last style switch changed beside the weights ({"style", "note", "changes", "time"}),
        # in its reply and in the status, so that whoever switched (and everyone else) can see it.
        self.style_change: dict | None = None
        # Called on the loader thread with the style once its weights are read, before the swap is
        # due (tests hold it there to watch the stream go on meanwhile).
        self.style_load_hook: Callable[[Any], None] | None = None
        self._queue: queue.Queue[tuple[Command, Reply]] = queue.Queue(MAX_PENDING)
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # The name its launcher gave this engine (the OBS script sets it): a quit naming another
        # instance is refused, so a launcher never stops an engine it did not start.
        self.instance: str | None = os.environ.get(INSTANCE_ENV) or None

    # -- receiving (any thread) ----------------------------------------------------------------

    @property
    def style_names(self) -> list[str]:
        return sorted(self.manager.styles)

    def submit(self, raw: Any, reply: Reply | None = None, *, local: bool = False) -> Command | None:
        """Validate and queue a command (JSON text, bytes or a decoded object). ``reply`` is called
        exactly once, from whichever thread settles it. Returns the command, or None if refused.
        ``local``: it came from this machine's own local API (loopback, with the API's token where
        it has one); only such a message may ``quit`` the engine."""
        reply = reply or (lambda msg: None)
        try:
            obj = decode(raw)
        except CommandError as exc:
            self.refused += 1
            reply(reply_message(None, False, str(exc)))
            return None
        try:
            cmd = parse_command(obj, self.style_names)
        except CommandError as exc:
            self.refused += 1
            reply(reply_message(message_id(obj), False, str(exc)))
            return None
        if cmd.cmd == "quit":
            return self._quit(cmd, reply, local)
        self.accepted += 1
        if cmd.cmd == "status":
            reply(reply_message(cmd.id, True, status=self.status()))
        elif cmd.cmd == "download_style":
            error = self.start_download(cmd.args["style"])
            reply(reply_message(cmd.id, error is None, error, status=self.status()))
        elif cmd.cmd == "add_to_scene":
            if self.obs is None:
                reply(reply_message(cmd.id, False, "not connected to OBS: start the engine with --obs (and OBS's WebSocket server on)"))
            else:
                self.obs.add_to_scene(cmd.args.get("scene"), lambda ok, err: reply(reply_message(cmd.id, ok, err)))
        else:
            try:
                self._queue.put_nowait((cmd, reply))
            except queue.Full:
                self.refused += 1
                reply(reply_message(cmd.id, False, "busy: too many commands waiting; try again in a moment"))
                return None
        return cmd

    def _quit(self, cmd: Command, reply: Reply, local: bool) -> Command | None:
        if quit_engine(self.engine, self.instance, cmd, reply, local):
            self.accepted += 1
            return cmd
        self.refused += 1  # (not logged: the reply says why, and a flood must not fill the log)
        return None

    # -- applying (the inference thread, between frames) --------------------------------------

    def apply_pending(self) -> int:
        """Apply every queued command, and swap in a style whose files have been read and a style
        picture that has been encoded; returns how many were applied."""
        changed = self._finish_style_load() + self._finish_picture_load()
        batch: list[tuple[Command, Reply]] = []
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not batch:
            if changed:
                self.changed()
                self.save_settings()
            return changed
        last_of = {cmd.cmd: i for i, (cmd, _) in enumerate(batch)}
        for i, (cmd, reply) in enumerate(batch):
            superseded = cmd.cmd.startswith("set_") and last_of[cmd.cmd] != i
            if superseded:  # a later value of the same setting is in this batch
                reply(reply_message(cmd.id, True, superseded=True))
                continue
            try:
                if cmd.cmd == "set_style":
                    self._request_style(cmd, reply)  # answered once loaded and swapped in
                    continue
                self._apply(cmd)
            except Exception as exc:  # a failed change keeps the previous setting
                msg = str(exc) if not isinstance(exc, (KeyError, AttributeError)) else f"{type(exc).__name__}: {exc}"
                log.warning("command %s failed: %s", cmd.cmd, msg)
                reply(reply_message(cmd.id, False, msg))
                continue
            changed += 1
            self.applied += 1
            reply(reply_message(cmd.id, True))
        if changed:
            self.changed()
            self.save_settings()
        return changed

    # -- style pictures, encoded beside the stream ------------------------------------------------

    def submit_style_image(self, data: bytes, reply: Reply) -> bool:
        """A style picture's bytes (an upload: PNG, JPEG, WebP; never a path), from any thread. It is
        decoded and run through the image encoder on a thread beside the stream; its embedding is
        swapped in between two frames, and ``reply`` is called then (or with why not: not an image,
        no IP-Adapter loaded). A newer picture sent while one is encoded wins: a third one waiting
        is answered as superseded. Returns False when refused at once."""
        if not getattr(self.frames, "style_images", False):
            self.refused += 1
            reply(reply_message(None, False, "this engine has no IP-Adapter loaded, so it takes no style picture: start "
                                "it with --ip-adapter (or --style-image FILE)"))
            return False
        self.accepted += 1
        data = bytes(data)  # "bytes" stays for the saved settings once the picture is in (sent_picture)
        entry = {"data": data, "bytes": data, "reply": reply, "done": False, "embeds": None, "error": None}
        superseded = None
        with self._lock:
            if self._picture_load is None:
                self._start_picture_load(entry)
            else:
                superseded, self._picture_next = self._picture_next, entry
        if superseded is not None:
            superseded["reply"](reply_message(None, True, superseded=True))
        self.changed()  # status: style_image_loading
        return True

    def _start_picture_load(self, entry: dict) -> None:  # with self._lock held
        self._picture_load = entry
        threading.Thread(target=self._encode_picture, args=(entry,), name="style-picture", daemon=True).start()

    def _encode_picture(self, entry: dict) -> None:
        from ..errors import UserError, one_line

        _yield_to_the_stream()
        try:
            entry["embeds"] = self.frames.encode_style_picture(entry["data"])
        except UserError as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # a decoder's or a library's fault must never take the engine down
            entry["error"] = one_line(f"{type(exc).__name__}: {exc}")[:300]
        entry["data"] = None
        entry["done"] = True

    @property
    def style_image_loading(self) -> bool:
        with self._lock:
            return self._picture_load is not None

    def _finish_picture_load(self) -> int:
        """Between frames: swap in the picture the encoder has finished (1), or answer why not (0)."""
        with self._lock:
            load = self._picture_load
            if load is None or not load["done"]:
                return 0
            self._picture_load, nxt = None, self._picture_next
            self._picture_next = None
            if nxt is not None:
                self._start_picture_load(nxt)
        if nxt is not None:  # a newer picture came while this one was encoded: it wins
            load["reply"](reply_message(None, True, superseded=True))
            return 0
        if load["error"] is None:
            try:
                self.frames.set_style_image(load["embeds"], source="upload")
            except Exception as exc:
                load["error"] = str(exc)
        load["embeds"] = None
        if load["error"] is not None:
            log.warning("style picture refused: %s", load["error"])
            load["reply"](reply_message(None, False, load["error"]))
            self.changed()
            return 0
        self.sent_picture = load["bytes"]
        self.applied += 1
        load["reply"](reply_message(None, True))
        return 1

    # -- style loads beside the stream ----------------------------------------------------------

    @property
    def style_loading(self) -> str | None:
        """The style being loaded (the newest asked for), or None."""
        with self._lock:
            load = self._style_next or self._style_load
            return load["style"].name if load is not None else None

    def _request_style(self, cmd: Command, reply: Reply) -> None:
        """Start loading a style beside the stream (inference thread). Missing files are refused
        at once; the reply comes when the style is in place, or with why not."""
        style = self.manager.check_files(cmd.args["style"])
        entry = {"style": style, "replies": [(cmd, reply)], "mark": self._schedule_changes,
                 "transition_s": cmd.args.get("transition_s", self.default_transition_s)}
        superseded: list[tuple[Command, Reply]] = []
        with self._lock:
            load, nxt = self._style_load, self._style_next
            if load is None:
                self._start_style_load(entry)
            elif nxt is None and load["style"] == style:  # the one loading already: answer both when it is in
                load["replies"] += entry["replies"]
                load["mark"] = entry["mark"]
            elif nxt is not None and nxt["style"] == style:
                nxt["replies"] += entry["replies"]
                nxt["mark"] = entry["mark"]
            else:  # loads after the one running; replaces any other waiting request
                if nxt is not None:
                    superseded = nxt["replies"]
                self._style_next = entry
        for old, old_reply in superseded:
            old_reply(reply_message(old.id, True, superseded=True))
        self.changed()  # status: style_loading

    def _start_style_load(self, entry: dict) -> None:  # with self._lock held
        entry.update(done=False, prepared=None, error=None)
        self._style_load = entry
        threading.Thread(target=self._load_style, args=(entry,), name="style-load", daemon=True).start()

    def _load_style(self, entry: dict) -> None:
        """The loader thread: read, convert and fuse the style's weights and encode the prompts
        with them; the swap is left to the inference thread."""
        from ..errors import UserError, one_line

        _yield_to_the_stream()
        try:
            frames = self.frames  # the prompts as they are now: encoded ahead with the style's text encoder
            texts = (frames.prompt, frames.negative_prompt) if frames is not None else None
            entry["prepared"] = self.manager.prepare(entry["style"], texts=texts)
            if self.style_load_hook is not None:
                self.style_load_hook(entry["style"])
        except UserError as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # MemoryError, a library's fault: a load must never take the engine down
            entry["error"] = one_line(f"{type(exc).__name__}: {exc}")[:300]
        entry["done"] = True

    def _finish_style_load(self) -> int:
        """Between frames: swap in the style the loader has read (1), or answer why it cannot be (0)."""
        with self._lock:
            load = self._style_load
            if load is None or not load["done"]:
                return 0
            self._style_load, nxt = None, self._style_next
            self._style_next = None
            if nxt is not None:  # asked for since: that one wins, this one is dropped unswapped
                self._start_style_load(nxt)
        if nxt is not None:
            for cmd, reply in load["replies"]:
                reply(reply_message(cmd.id, True, superseded=True))
            self.changed()
            return 0
        error = load["error"]
        if error is None:
            before = self._style_settings()
            keep_schedule = load["mark"] != self._schedule_changes
            try:
                self.manager.apply(load["style"], self.frames, prepared=load["prepared"], schedule=not keep_schedule,
                                   transition_s=load.get("transition_s", 0.0))
            except Exception as exc:  # the manager has put the previous style back
                error = str(exc) if not isinstance(exc, (KeyError, AttributeError)) else f"{type(exc).__name__}: {exc}"
        load["prepared"] = None  # the converted weights go now
        if error is not None:
            log.warning("command set_style failed: %s", error)
            for cmd, reply in load["replies"]:
                reply(reply_message(cmd.id, False, error))
            self.changed()
            return 0
        self.applied += 1
        change = self._describe_style_change(load["style"], before, self._style_settings(), keep_schedule)
        self.style_change = change
        log.info("%s", change["note"])
        for cmd, reply in load["replies"]:
            reply(reply_message(cmd.id, True, note=change["note"], changes=change["changes"]))
        return 1

    def _style_settings(self) -> dict:
        """What a style sets beside the weights, as it is now (the live strength and steps, the
        prompt template, clip skip)."""
        sched = self.schedule()
        return {"strength": sched["strength"], "steps": sched["steps"],
                "clip_skip": getattr(self.frames, "clip_skip", None), "template": getattr(self.frames, "template", None) or "{}"}

    def _describe_style_change(self, style, before: dict, after: dict, kept_schedule: bool) -> dict:
        """{"style", "note", "changes", "time"}: ``changes`` {setting: [before, after]} for each one
        the switch changed; ``note`` in one line: "style toonyou: strength 0.7 -> 0.36, steps 2 -> 3,
        clip skip 1 -> 3, prompt template '{}' -> 'masterpiece, {}'"."""
        changes = {k: [before[k], after[k]] for k in after if before.get(k) != after[k]}
        names = {"strength": "strength", "steps": "steps", "clip_skip": "clip skip", "template": "prompt template"}
        parts = []
        for key, (old, new) in changes.items():
            if key == "template":
                parts.append(f"{names[key]} {_quote(old)} -> {_quote(new)}")
            else:
                numbers = all(isinstance(v, (int, float)) for v in (old, new))
                parts.append(f"{names[key]} {old:g} -> {new:g}" if numbers else f"{names[key]} {old} -> {new}")
        if kept_schedule:
            own = _schedule_of(style.schedule_args())
            if (own["strength"], own["steps"]) != (after["strength"], after["steps"]):
                parts.append(f"strength {after['strength']:g} and steps {after['steps']} kept (set while it loaded; "
                             f"the style's own: {own['strength']:g}, {own['steps']})")
        if not parts:
            parts.append(f"nothing else changed (strength {after['strength']:g}, steps {after['steps']})")
        note = f"style {style.name}: " + ", ".join(parts)
        return {"style": style.name, "note": note, "changes": changes, "time": round(time.time(), 3)}

    # -- saved settings ------------------------------------------------------------------------

    def save_settings(self) -> None:
        """Write the live settings to ``settings_file`` when they differ from the last written."""
        if self.settings_file is None or self.settings_io is None:
            return
        if getattr(self.frames, "style_image", None) != "upload" and not self._picture_restoring:
            self.sent_picture = None  # cleared, or replaced by a style's picture
        snapshot, save = self.settings_io
        data = snapshot(self)
        if data == self._saved:
            return
        try:
            save(data, self.settings_file)
        except OSError as exc:
            if self._saved is not None or not getattr(self, "_save_warned", False):
                log.warning("cannot save the settings to %s (%s); they will not survive a restart", self.settings_file,
                            exc.strerror or exc)
            self._save_warned = True
            self._saved = None
            return
        self._saved = data

    # -- style availability and downloads -------------------------------------------------------

    def style_availability(self) -> tuple[dict[str, str], list[str]]:
        """({style name: what fetches it} for every style whose files are not all here, the names
        of those this engine can download itself: every file has a URL, and a civitai token is
        configured where one is needed)."""
        from ..styles import fetch_hint, missing_files, needs_civitai_token

        missing, downloadable = {}, []
        for name in sorted(self.manager.styles):
            style = self.manager.styles[name]
            hint = fetch_hint(style)
            if hint is None:
                continue
            missing[name] = hint
            if all(url for _, url in missing_files(style)) and (self.civitai_token or not needs_civitai_token(style)):
                downloadable.append(name)
        return missing, downloadable

    def start_download(self, name: str) -> str | None:
        """Start fetching a style's files in the background; None, or why not (one line)."""
        from ..config import config_file
        from ..styles import missing_files, needs_civitai_token

        style = self.manager.get(name)
        missing = missing_files(style)
        if not missing:
            return f"style {name!r} is already downloaded"
        no_url = next((path for path, url in missing if not url), None)
        if no_url is not None:
            return f"style {name!r} gives no download URL for {no_url.name}; put the file at {no_url}"
        if needs_civitai_token(style) and not self.civitai_token:
            return (f"style {name!r} downloads from civitai, which needs an API token: set CIVITAI_TOKEN or put "
                    f'[civitai] token = "..." in {config_file()}, then restart the engine')
        with self._lock:
            running = self._download_thread is not None and self._download_thread.is_alive()
            if running:
                return f"a download is already running (style {self._download['style']!r}); wait for it to finish"
            self._download = {"style": name, "state": "downloading", "file": missing[0][0].name, "file_index": 0,
                              "files": len(missing), "bytes": 0, "total": None, "error": None}
            self._download_thread = threading.Thread(target=self._run_download, args=(style,), name="style-download",
                                                     daemon=True)
            self._download_thread.start()
        self.changed()
        return None

    def _run_download(self, style) -> None:
        from ..errors import UserError, one_line
        from ..styles import download_style

        last = [0.0]

        def progress(index, files, name, done, total):
            self._download = dict(self._download, file=name, file_index=index, files=files, bytes=done, total=total)
            now = time.monotonic()
            if now - last[0] >= 0.5:
                last[0] = now
                self.changed()

        try:
            download_style(style, self.civitai_token, progress=False, on_progress=progress)
        except UserError as exc:
            self._download = dict(self._download, state="failed", error=str(exc))
        except Exception as exc:  # a download must never take the engine down
            self._download = dict(self._download, state="failed", error=one_line(f"{type(exc).__name__}: {exc}")[:300])
        else:
            self._download = dict(self._download, state="done", file_index=self._download["files"])
        if self._download["state"] == "failed":
            log.warning("download of style %s failed: %s", style.name, self._download["error"])
        self.changed()

    def _apply(self, cmd: Command) -> None:
        frames, a = self.frames, cmd.args
        transition = a.get("transition_s", self.default_transition_s)
        if cmd.cmd == "set_prompt":
            frames.set_prompt(a["prompt"], transition)
        elif cmd.cmd == "set_negative_prompt":
            frames.set_negative_prompt(a["negative_prompt"], transition)
        elif cmd.cmd == "set_guidance":
            frames.set_guidance(a["guidance"])
        elif cmd.cmd == "set_style":
            self.manager.apply(a["style"], frames, transition_s=transition)
        elif cmd.cmd in ("set_strength", "set_steps"):
            current = self.schedule()
            strength, steps = a.get("strength", current["strength"]), a.get("steps", current["steps"])
            frames.set_schedule(LIVE_SCHEDULE_STEPS, live_t_index(strength, steps), None)
            self._schedule_changes += 1
        elif cmd.cmd == "set_seed":
            if not frames.set_seed(a["seed"], transition):  # at once: a re-warm on the new seed
                frames.request_reset()
        elif cmd.cmd == "set_style_image_scale":
            frames.set_style_image_scale(a["scale"])
        elif cmd.cmd == "clear_style_image":
            frames.set_style_image(None)
        elif cmd.cmd == "pause":
            if self.engine is not None:
                self.engine.pause()
            self.paused = True
        elif cmd.cmd == "resume":
            if self.engine is not None:
                self.engine.resume()
            self.paused = False
        elif cmd.cmd == "reset":
            frames.request_reset()
        else:  # parse_command knows every command; this is a programming error
            raise CommandError(f"no handler for {cmd.cmd}")

    # -- status ----------------------------------------------------------------------------------

    def schedule(self) -> dict:
        """The live strength and steps of the current schedule."""
        return _schedule_of(self.frames.schedule_args)

    def add_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` is called (from the changing thread; it must not block) on every change."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass

    def changed(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception as exc:
                log.debug("status listener failed: %s", exc)

    def _live_figures(self, stats) -> tuple[float, float, float | None]:
        """(fps out, fps in, latency p50 in ms) as of now. The engine refreshes its stats once a
        second from its frame loop, so a status sent at a state change (the warmup's first frames
        going out, the stream starting) carried the values of a second before: '0.0 fps' while the
        warmup's frames reached OBS, no latency while streaming. The rates are read from the
        engine's counters instead, the latency from its newest samples; a stopped engine has
        neither."""
        if stats.state == "stopped":
            return 0.0, 0.0, None
        fps, fps_in, latency = stats.fps_out, stats.fps_in, stats.latency_ms_p50
        engine, now = self.engine, time.monotonic()
        try:
            fps = round(engine._rate_out.rate(now), 2)
            fps_in = round(engine._rate_in.rate(now), 2)
            samples = sorted(list(engine._latencies))  # (a copy made in one step: the frame loop appends)
            if samples:
                latency = round(samples[len(samples) // 2] * 1000, 1)
        except (AttributeError, IndexError, TypeError, RuntimeError):
            pass  # an engine without those counters (remote sessions): its stats as they are
        return fps, fps_in, latency

    def status(self) -> dict:
        engine = self.engine
        stats = engine.stats if engine is not None else None
        state = "paused" if self.paused else (stats.state if stats is not None else "starting")
        fps, fps_in, latency = self._live_figures(stats) if stats is not None else (0.0, 0.0, None)
        current = self.manager.current
        sched = self.schedule()
        missing, downloadable = self.style_availability()
        return {
            "state": state,
            "paused": self.paused,
            "prompt": self.frames.prompt,
            # a blend's prompts and normalised weights ([{"text", "weight"}]), None for one prompt
            "prompt_blend": ([{"text": t, "weight": round(w, 4)} for t, w in self.frames.prompt_blend]
                             if getattr(self.frames, "prompt_blend", None) else None),
            # how far a prompt, style-template or seed transition has come (0 to 1), None when none runs
            "transition": _rounded(getattr(self.frames, "transition_progress", None)),
            "negative_prompt": self.frames.negative_prompt,
            "guidance": self.frames.guidance_scale,
            "style": current.name if current is not None else None,
            "style_loading": self.style_loading,  # a style whose files are being read beside the stream
            "styles": self.style_names,
            "styles_missing": missing,
            "styles_downloadable": downloadable,
            "download": dict(self._download) if self._download is not None else None,
            "style_change": dict(self.style_change) if self.style_change is not None else None,
            # the style picture (IP-Adapter): where the one in use came from ("upload", "style NAME",
            # "file NAME"; None: none), its scale (None: no IP-Adapter loaded), one being encoded
            "style_image": getattr(self.frames, "style_image", None),
            "style_image_scale": (self.frames.style_image_scale if getattr(self.frames, "style_images", False) else None),
            "style_image_loading": self.style_image_loading,
            "strength": sched["strength"],
            "steps": sched["steps"],
            "seed": self.frames.seed,
            "fps": fps,
            "fps_in": fps_in,
            "latency_ms": latency,
            "frames_out": stats.frames_out if stats else 0,
            "dropped": stats.dropped if stats else 0,
            "errors": stats.errors if stats else 0,
            "last_error": stats.last_error if stats else None,
            "uptime_s": stats.uptime_s if stats else 0.0,
            "obs": self.obs.state if self.obs is not None else "off",
            # "pulling", "not pulling" (the source exists, nothing reads the stream), "absent"; None
            # while OBS is not connected or there is no stream to pull
            "obs_source": getattr(self.obs, "source_state", None),
            "stream_clients": self.stream_clients() if self.stream_clients is not None else None,
            # of which OBS's source (it reads /stream.mjpg?client=obs): the OBS script judges from it
            # whether OBS pulls the stream where the engine has no OBS connection of its own
            "stream_clients_obs": self.stream_clients("obs") if self.stream_clients is not None else None,
            "lipsync_ms": getattr(self.obs, "lipsync_ms", None),
            # a remote session's network figures (remote/link.py): candidate type, RTT, loss, jitter, bitrate
            "link": stats.extra.get("link") if stats else None,
            # the fleet node that serves this session (`serve --ray`: remote/fleet.py); None elsewhere
            "node": stats.extra.get("node") if stats else None,
            "api_url": self.api_url,
            "model": self.label,
            "size": [self.frames.width, self.frames.height],
            "version": __version__,
            "time": round(time.time(), 3),
        }

    def status_message(self) -> dict:
        return status_message(self.status())
