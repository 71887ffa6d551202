"""`GET /metrics`: the figures of `serve` (and of a fleet's front) in Prometheus' text exposition
format (version 0.0.4), written here without prometheus_client.

``render(sessions, nodes)`` takes plain data, so `serve` (one node: its machine) and a fleet's front
(the nodes of a Ray cluster) feed it alike:

    sessions: [{"id": str, "node": str, "state": str, "frames_in": int, "frames_out": int,
                "fps": float, "fps_in": float (optional), "latency_ms_p50": float | None,
                "latency_ms_p95": float | None,
                "latency": Histogram | {"buckets": [(le_s, cumulative), ...], "sum": s, "count": n}
                           (optional; le_s ascending, the last may be inf),
                "latency_samples_ms": [ms, ...] (optional, instead of "latency")}]
    nodes:    [{"id": str, "address": str (optional), "gpus": int | float, "gpus_free": int | float,
                "warm_engines": int, "max_sessions": int (optional),
                "gpu_memory_bytes": int | None (absent or None where not known, e.g. on the CPU),
                "sessions_started": int (optional), "frames_in": int (optional), "frames_out": int
                (optional): counters over every session the node served, ended ones included,
                "latency": as a session's (optional): every frame the node finished}]
              (a fleet's node may say "node" (its address: the label, as its sessions' "node"),
              "warm_idle" and "capacity" for "id", "warm_engines" and "max_sessions")

A Histogram holds a lock: across processes (from a Ray actor) send ``histogram.snapshot()``, and
``merged(snapshots)`` adds several up (a node's engines, each with its own).

Latency is in seconds, as Prometheus names base units (``_seconds``); the sessions' p50/p95 come in
milliseconds (as the status has them) and go out in seconds. Counters end in ``_total``; a
session's counters go with the session (its figures stay in the node's counters).
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Capture-to-output latency of one frame: a fast GPU session sits at 30-100 ms, the tiny model on a
# busy CPU at seconds; a stalled engine past 10 s.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations (seconds) counted into fixed buckets; thread-safe (an engine thread observes,
    the event loop reads). ``snapshot()``: cumulative counts, as the exposition format has them."""

    def __init__(self, bounds=LATENCY_BUCKETS_S):
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative); the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        i = bisect_left(self.bounds, seconds)  # the first bound >= seconds: ``le`` is inclusive
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> dict:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), counts):
            running += n
            buckets.append((bound, running))
        return {"buckets": buckets, "sum": total, "count": running}


def merged(snapshots) -> dict:
    """Several histograms' snapshots (the same bounds) as one: counts and sums added."""
    snapshots = [s.snapshot() if isinstance(s, Histogram) else s for s in snapshots]
    if not snapshots:
        return Histogram().snapshot()
    bounds = [b for b, _ in snapshots[0]["buckets"]]
    if any([b for b, _ in s["buckets"]] != bounds for s in snapshots):
        raise ValueError("histograms with different buckets cannot be added up")
    return {"buckets": [(b, sum(s["buckets"][i][1] for s in snapshots)) for i, b in enumerate(bounds)],
            "sum": sum(s["sum"] for s in snapshots), "count": sum(s["count"] for s in snapshots)}


def histogram_of(samples, bounds=LATENCY_BUCKETS_S) -> dict:
    h = Histogram(bounds)
    for s in samples:
        h.observe(s)
    return h.snapshot()


# -- the text format ------------------------------------------------------------------------------


def escape_label(value) -> str:
    """A label value as the format quotes it: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)  # the shortest text that reads back the same float


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


class _Family:
    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = name, kind, help_text
        self.lines: list[str] = []

    def sample(self, labels: dict, value, suffix: str = "") -> None:
        self.lines.append(f"{self.name}{suffix}{_labels(labels)} {format_value(value)}")

    def histogram(self, labels: dict, h) -> None:
        snap = h.snapshot() if isinstance(h, Histogram) else h
        buckets = sorted(snap["buckets"], key=lambda b: b[0])
        if not buckets or not math.isinf(buckets[-1][0]):  # +Inf is required: every observation is at or below it
            buckets.append((math.inf, snap["count"]))
        for bound, cumulative in buckets:
            self.sample({**labels, "le": format_value(float(bound))}, int(cumulative), "_bucket")
        self.sample(labels, float(snap["sum"]), "_sum")
        self.sample(labels, int(snap["count"]), "_count")

    def text(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.lines)


def _latency(item: dict):
    """A session's or node's latency histogram, from whichever form it came in; None if none."""
    if item.get("latency") is not None:
        return item["latency"]
    if item.get("latency_samples_ms") is not None:
        return histogram_of(ms / 1000.0 for ms in item["latency_samples_ms"])
    return None


# Every family /metrics may show, in the order shown: (name, type, help). Per node, then per session.
FAMILIES = (
    ("live2diff_node_info", "gauge", "A node that serves sessions (1), with its address."),
    ("live2diff_node_gpus", "gauge", "GPUs the node has for sessions."),
    ("live2diff_node_gpus_free", "gauge", "GPUs of the node that no session holds."),
    ("live2diff_node_warm_engines", "gauge",
     "Engines loaded on the node and waiting for a session (no model load for the next one)."),
    ("live2diff_node_max_sessions", "gauge", "Sessions the node serves at once at most."),
    ("live2diff_node_gpu_memory_bytes", "gauge",
     "GPU memory the engines hold on the node (absent where the engines run on the CPU)."),
    ("live2diff_sessions", "gauge", "Sessions the node serves now."),
    ("live2diff_sessions_started_total", "counter", "Sessions the node has started."),
    ("live2diff_frames_in_total", "counter", "Frames taken in by the node's sessions, ended ones included."),
    ("live2diff_frames_out_total", "counter", "Frames sent out by the node's sessions, ended ones included."),
    ("live2diff_frame_latency_seconds", "histogram",
     "Capture to output of each frame the node's sessions finished after their warmup."),
    ("live2diff_session_state", "gauge", "A session (1) and its state."),
    ("live2diff_session_frames_in_total", "counter", "Frames the session took in."),
    ("live2diff_session_frames_out_total", "counter", "Frames the session sent out."),
    ("live2diff_session_fps", "gauge", "Frames per second the session sends out now."),
    ("live2diff_session_fps_in", "gauge", "Frames per second the session takes in now."),
    ("live2diff_session_latency_p50_seconds", "gauge", "Median capture-to-output latency of the session's recent frames."),
    ("live2diff_session_latency_p95_seconds", "gauge", "95th percentile of the same."),
    ("live2diff_session_latency_seconds", "histogram",
     "Capture to output of each frame the session finished after its warmup."),
)


# The fleet's names for a node's fields (remote/fleet.py: a Ray node by its address) -> render's.
NODE_ALIASES = {"node": "id", "warm_idle": "warm_engines", "capacity": "max_sessions"}


def _node_fields(n: dict) -> dict:
    out = dict(n)
    for alias, name in NODE_ALIASES.items():
        if out.get(name) is None and n.get(alias) is not None:
            out[name] = n[alias]
    if out.get("address") is None and n.get("node") is not None:
        out["address"] = n["node"]
    return out


def render(sessions: list[dict], nodes: list[dict]) -> str:
    """The exposition text for these sessions and nodes (see the module's docstring)."""
    fam = {name: _Family(name, kind, help_text) for name, kind, help_text in FAMILIES}
    f = {name.removeprefix("live2diff_"): family for name, family in fam.items()}
    info, gpus, gpus_free, warm = f["node_info"], f["node_gpus"], f["node_gpus_free"], f["node_warm_engines"]
    slots, memory, count, started = f["node_max_sessions"], f["node_gpu_memory_bytes"], f["sessions"], f["sessions_started_total"]
    node_in, node_out, node_lat = f["frames_in_total"], f["frames_out_total"], f["frame_latency_seconds"]
    state, s_in, s_out = f["session_state"], f["session_frames_in_total"], f["session_frames_out_total"]
    fps, fps_in, s_lat = f["session_fps"], f["session_fps_in"], f["session_latency_seconds"]
    p50, p95 = f["session_latency_p50_seconds"], f["session_latency_p95_seconds"]

    per_node: dict[str, int] = {}
    for s in sessions:
        per_node[str(s["node"])] = per_node.get(str(s["node"]), 0) + 1
    for n in nodes:
        n = _node_fields(n)
        node = {"node": str(n["id"])}
        info.sample({**node, "address": n.get("address") or ""}, 1)
        gpus.sample(node, n.get("gpus", 0))
        gpus_free.sample(node, n.get("gpus_free", 0))
        warm.sample(node, n.get("warm_engines", 0))
        if n.get("max_sessions") is not None:
            slots.sample(node, n["max_sessions"])
        if n.get("gpu_memory_bytes") is not None:
            memory.sample(node, int(n["gpu_memory_bytes"]))
        count.sample(node, per_node.pop(node["node"], 0))
        for key, fam_ in (("sessions_started", started), ("frames_in", node_in), ("frames_out", node_out)):
            if n.get(key) is not None:
                fam_.sample(node, int(n[key]))
        lat = _latency(n)
        if lat is not None:
            node_lat.histogram(node, lat)
    for node, n in per_node.items():  # sessions on a node the list did not name: still counted
        count.sample({"node": node}, n)

    for s in sessions:
        labels = {"session": str(s["id"]), "node": str(s["node"])}
        state.sample({**labels, "state": s.get("state") or "unknown"}, 1)
        s_in.sample(labels, int(s.get("frames_in", 0)))
        s_out.sample(labels, int(s.get("frames_out", 0)))
        fps.sample(labels, float(s.get("fps", 0.0)))
        if s.get("fps_in") is not None:
            fps_in.sample(labels, float(s["fps_in"]))
        for key, fam_ in (("latency_ms_p50", p50), ("latency_ms_p95", p95)):
            if s.get(key) is not None:
                fam_.sample(labels, float(s[key]) / 1000.0)
        lat = _latency(s)
        if lat is not None:
            s_lat.histogram(labels, lat)

    # A family with no sample says nothing: left out (its HELP and TYPE alone would only confuse a reader).
    return "".join(family.text() for family in fam.values() if family.lines)
