"""Sends the 1,000 hostile commands from a process of its own (as a browser, a script in OBS or
another tool would) and prints what came back, as JSON.

    python hostile_sender.py ws URL
    python hostile_sender.py obs PORT PASSWORD
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import numpy as np

MAX_MESSAGE_BYTES = 8192


def hostile_messages(n=1000):
    rng = np.random.default_rng(0)
    shapes = [
        lambda i: "{not json",
        lambda i: json.dumps([i]),
        lambda i: json.dumps({"app": "live2diff", "v": 1, "cmd": "load_model", "path": f"/etc/passwd{i}"}),
        lambda i: json.dumps({"app": "live2diff", "v": 1, "cmd": "set_style", "style": f"../../models/{i}.ckpt"}),
        lambda i: json.dumps({"app": "live2diff", "v": 1, "cmd": "set_prompt", "prompt": "x" * (MAX_MESSAGE_BYTES + i)}),
        lambda i: json.dumps({"app": "live2diff", "v": 1, "cmd": "set_prompt", "prompt": "ok", "exec": "import os"}),
        lambda i: json.dumps({"app": "live2diff", "v": 1, "cmd": "set_seed", "seed": "1; rm -rf /"}),
        lambda i: json.dumps({"app": "live2diff", "v": 9, "cmd": "pause"}),
        lambda i: json.dumps({"app": "other", "v": 1, "cmd": "pause"}),
        lambda i: bytes(rng.integers(0, 256, 64, dtype=np.uint8)).decode("latin-1"),
    ]
    return [shapes[i % len(shapes)](i) for i in range(n)]


def as_event_data(i: int, m: str) -> dict:
    """CustomEvent data must be an object: what is not one is wrapped, as a hostile client could."""
    try:
        obj = json.loads(m)
    except ValueError:
        obj = {"raw": m}
    if not isinstance(obj, dict):
        obj = {"app": "live2diff", "v": 1, "kind": "command", "cmd": obj}
    if obj.get("app") != "live2diff":  # other apps' events are not ours to answer
        obj.update(app="live2diff", v=99)
    obj["id"] = i
    return obj


def over_ws(url: str) -> dict:
    import websocket

    ws = websocket.create_connection(url, timeout=60)
    msgs = hostile_messages()
    t0 = time.time()
    for m in msgs:
        ws.send(m)
    replies = []
    while len(replies) < len(msgs):
        m = json.loads(ws.recv())
        if m.get("kind") == "reply":
            replies.append(m)
    ws.close()
    return {"replies": replies, "t0": t0, "t1": time.time()}


def over_obs(port: int, password: str) -> dict:
    import obsws_python as obs

    logging.getLogger("obsws_python").setLevel(logging.CRITICAL + 10)
    replies = []
    done = threading.Event()

    def on_custom_event(data):
        d = {k: getattr(data, k) for k in data.attrs()}
        if d.get("kind") == "reply":
            replies.append(d)
            if len(replies) >= 1000:
                done.set()

    events = obs.EventClient(host="127.0.0.1", port=port, password=password, timeout=10, subs=1)
    events.callback.register(on_custom_event)
    req = obs.ReqClient(host="127.0.0.1", port=port, password=password, timeout=10)
    t0 = time.time()
    for i, m in enumerate(hostile_messages()):
        req.broadcast_custom_event({"eventData": as_event_data(i, m)})
    done.wait(60)
    t1 = time.time()
    req.disconnect()
    events.disconnect()
    return {"replies": replies, "t0": t0, "t1": t1}


if __name__ == "__main__":
    if sys.argv[1] == "ws":
        out = over_ws(sys.argv[2])
    else:
        out = over_obs(int(sys.argv[2]), sys.argv[3])
    print(json.dumps(out))
