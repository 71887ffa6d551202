"""A style picture over the data channel ``control`` (connect's local API and /studio to a remote
engine). A data-channel message is capped (64 KB is what every peer takes: aiortc's default for a
peer that names no limit, and browsers'), and a picture may be up to 8 MB (MAX_PICTURE_BYTES), so it goes
as one announce and then its bytes:

    text   {"cmd": "style_image", "id": ID, "size": N}
    binary N bytes in order, each message at most CHUNK_BYTES

The channel is ordered and reliable, so the bytes arrive whole and in order. The receiver holds at
most one picture being assembled (a newer announce replaces it, and the older one is answered);
once N bytes are in, the picture goes to the session's controller as an upload through POST
/api/style-image would, and the reply carries ID. Bytes only: nothing here names a file."""

from __future__ import annotations

import json

from ..control.schema import reply_message

ANNOUNCE = "style_image"
CHUNK_BYTES = 64 * 1024


def picture_messages(data: bytes, msg_id: str) -> list:
    """The announce (text) and the byte messages that carry ``data``."""
    out: list = [json.dumps({"cmd": ANNOUNCE, "id": msg_id, "size": len(data)})]
    out += [bytes(data[i:i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)]
    return out


def announce_of(message) -> dict | None:
    """The announce in a text message, or None for any other message (those go to the controller).
    Only short texts are parsed here: an announce is a few dozen bytes."""
    if not isinstance(message, str) or len(message) > 512 or ANNOUNCE not in message:
        return None
    try:
        obj = json.loads(message)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("cmd") == ANNOUNCE else None


class PictureAssembler:
    """One picture's bytes being collected. ``reply`` answers the sender (a reply message carrying
    the announce's id); ``deliver(data, reply)`` hands a whole picture on."""

    def __init__(self, reply, deliver, on_refuse=lambda: None, limit: int | None = None):
        from ..models.ip_adapter import MAX_PICTURE_BYTES  # torch: imported where a session is served

        self.reply, self.deliver, self.on_refuse = reply, deliver, on_refuse
        self.limit = MAX_PICTURE_BYTES if limit is None else limit
        self._stray = False  # bytes with no announce: answered once, not per message
        self._reset()

    def _reset(self) -> None:
        self._open, self._id, self._size, self._parts, self._got = False, None, 0, [], 0

    def _refuse(self, msg_id, text: str) -> None:
        self.on_refuse()
        self.reply(reply_message(msg_id, False, text))

    def announce(self, obj: dict) -> None:
        msg_id = obj.get("id")
        msg_id = msg_id if isinstance(msg_id, (str, int)) and not isinstance(msg_id, bool) else None
        size = obj.get("size")
        if self._open:  # the one before never finished: the newer one wins
            self._refuse(self._id, "a newer picture was sent before all of this one's bytes arrived")
            self._reset()
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            self._refuse(msg_id, "style_image needs 'size': the picture's length in bytes (sent next, as binary messages)")
        elif size > self.limit:
            self._refuse(msg_id, f"the style picture is larger than {self.limit} bytes; send a smaller PNG, JPEG or WebP")
        else:
            self._open, self._id, self._size, self._stray = True, msg_id, size, False

    def add(self, data) -> None:
        if not self._open:
            if not self._stray:
                self._stray = True
                self._refuse(None, 'picture bytes arrived without an announce; send {"cmd": "style_image", "size": N} '
                             "first, then the N bytes")
            return
        if self._got + len(data) > self._size:
            self._refuse(self._id, f"more bytes arrived than the {self._size} announced; the picture is dropped")
            self._reset()
            self._stray = True  # the rest of those bytes are not answered again
            return
        self._parts.append(bytes(data))
        self._got += len(data)
        if self._got == self._size:
            msg_id, whole = self._id, b"".join(self._parts)
            self._reset()
            self.deliver(whole, lambda msg: self.reply({**msg, "id": msg_id}))
