"""What serve's local API talks to while no stream runs (`live2diff-engine serve`, see
commands/serve.py): the status says so, commands are refused with one line saying how to send a
stream. The streams themselves are server.py's sessions."""

from __future__ import annotations


class IdleController:
    """What the API talks to while no stream runs: the status says so, commands are refused with
    one line saying how to send a stream."""

    def __init__(self, slot, max_sessions: int):
        self.manager = slot.manager
        self.slot = slot
        self.max_sessions = max_sessions
        self.engine = None
        self.api_url = None
        self.api_token = None
        self.stream_clients = None
        self._listeners = []

    def add_listener(self, fn) -> None:
        self._listeners.append(fn)

    def changed(self) -> None:
        for fn in list(self._listeners):
            fn()

    def submit(self, raw, reply=None, *, local: bool = False):  # local: as Controller.submit (quit)
        return status_only(raw, reply, self.status, "no stream yet: send one to /whip (`live2diff-engine connect`, the "
                                                    "/studio page or OBS's WHIP output); commands apply to a running stream")

    def status(self) -> dict:
        import time

        from .. import __version__

        frames = self.slot.frames
        return {"state": "waiting for a stream", "paused": False, "prompt": frames.prompt, "style": getattr(
            self.manager.current, "name", None), "styles": sorted(self.manager.styles), "fps": 0.0, "fps_in": 0.0,
            "latency_ms": None, "frames_out": 0, "dropped": 0, "errors": 0, "sessions": 0,
            "max_sessions": self.max_sessions, "api_url": self.api_url, "model": self.slot.label,
            "size": [frames.width, frames.height], "obs": "off", "version": __version__, "time": round(time.time(), 3)}

    def status_message(self) -> dict:
        from ..control.schema import status_message

        return status_message(self.status())


def status_only(raw, reply, status, refusal: str):
    """A controller with no stream of its own (serve before any session, a fleet front): it answers
    ``status`` with ``status()`` and every other command with ``refusal``."""
    from ..control.schema import decode, message_id, reply_message

    reply = reply or (lambda msg: None)
    try:
        obj = decode(raw)
    except Exception as exc:
        reply(reply_message(None, False, str(exc)))
        return None
    mid = message_id(obj) if isinstance(obj, dict) else None
    if isinstance(obj, dict) and obj.get("cmd") == "status":
        reply(reply_message(mid, True, status=status()))
    else:
        reply(reply_message(mid, False, refusal))
    return None
