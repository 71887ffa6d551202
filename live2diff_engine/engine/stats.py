"""The engine's figures: the counters and rates of a run (`Stats`, written to --stats as JSON and
sent as the live status), how a rate is measured, and the one status line."""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from dataclasses import asdict, dataclass, field

log = logging.getLogger("live2diff.engine")


@dataclass
class Stats:
    state: str = "starting"
    frames_in: int = 0
    frames_out: int = 0
    frames_published: int = 0
    dropped: int = 0
    errors: int = 0
    source_failures: int = 0
    fps_in: float = 0.0
    fps_out: float = 0.0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    gpu_memory_mb: float | None = None
    rss_mb: float | None = None
    uptime_s: float = 0.0
    last_error: str | None = None
    extra: dict = field(default_factory=dict)


class _Rate:
    """Events per second over the last ``n`` events, however slow they come: ``(k - 1) / (t_last -
    t_first)`` over the newest ``k <= n`` ticks (those within ``span_s`` of the newest, at least the
    newest ``min_ticks``). A fixed time window reads 0 once events are further apart than the
    window; this reads 0.67 for a frame every 1.5 s. When events stop, the rate falls as the gap
    grows past one interval, and reads 0 once no event has come for ``idle_intervals`` intervals
    (and at least ``idle_min_s``)."""

    def __init__(self, n: int = 30, span_s: float = 5.0, min_ticks: int = 4, idle_intervals: float = 3.0, idle_min_s: float = 1.0):
        self.span_s, self.min_ticks = span_s, min_ticks
        self.idle_intervals, self.idle_min_s = idle_intervals, idle_min_s
        self.times: deque[float] = deque(maxlen=n)

    def tick(self, now: float) -> None:
        self.times.append(now)

    def clear(self) -> None:
        self.times.clear()

    def rate(self, now: float) -> float:
        times = self.times
        if len(times) < 2:
            return 0.0
        last = times[-1]
        k = len(times)
        while k > self.min_ticks and last - times[-k] > self.span_s:
            k -= 1
        span = last - times[-k]
        if span <= 0:
            return 0.0
        interval = span / (k - 1)
        gap = now - last
        if gap > max(self.idle_intervals * interval, self.idle_min_s):
            return 0.0  # nothing for several intervals: stopped, not slow
        if gap > interval:  # overdue: count the wait so far as part of the next interval
            span += gap - interval
        return (k - 1) / span


def rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return None


def write_stats(path, stats: Stats) -> None:
    """The figures as JSON, written whole to a temporary file and moved over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(asdict(stats), indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write stats to %s: %s", path, exc)


def status_line(s: Stats) -> str:
    lat = f"{s.latency_ms_p50:.0f}/{s.latency_ms_p95:.0f} ms" if s.latency_ms_p50 is not None else "-"
    mem = f" | GPU {s.gpu_memory_mb / 1024:.1f} GB" if s.gpu_memory_mb else ""
    return (
        f"[{s.state}] in {s.fps_in:.1f} fps | out {s.fps_out:.1f} fps | latency p50/p95 {lat} | "
        f"dropped {s.dropped} | errors {s.errors}{mem}"
    )
