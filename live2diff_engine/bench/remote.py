"""What WebRTC adds: capture-to-publish latency through `connect` + `serve` over loopback against
`run`, on the same synthetic frames, in one run; and frames lost on the way back.

    python -m live2diff_engine.bench.remote [--size 512x512] [--fps 10] [--seconds 60] [--model-size 64]
        [--delay-ms 50] [--jitter-ms 10] [--loss 0.05] [--burst 3] [--reorder 0.01] [--outage 20:2.5] [--refuse PATCH]

Runs `run` (synthetic source, null sink) for the given time, then `serve` and `connect` (the same
source and sink) for the same time, each a process of its own with the tiny model, and prints one
line per path from their --stats files: p50/p95 of capture to publish, output fps; for the remote
path also where every frame connect sent went: dropped by serve for a newer one (the engine
slower than the camera: by design, counted), finished by serve, published by connect, and lost
(finished but never published). With link faults (the options of bench/netfault.py), connect
reaches serve through that relay on 127.0.0.1; the result then also says how the latency went
second by second: the seconds whose p50 was above the engine's own time + 200 ms, and the
longest such stretch (the recovery time), over 3 s windows too, each also judged against
serve's own time in that window (the p50 its status reported then: a busy machine slows the
engine itself for a while, which is no fault of the link), and the requests through the relay
(after an outage: a PATCH that resumed the session, or a new session's POST; ``--refuse
PATCH`` plays an engine without resume). The session ends as a user ends it (Ctrl-C to connect): connect
waits, within its bound, for the frames on their way back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .netfault import Relay, add_fault_options, faults_from


WINDOW_S = 3.0  # at 3 fps, one second's p50 is the median of 3 frames; over 3 s, of about 9


def longest_run(seconds: list[int]) -> int:
    """The longest stretch of consecutive whole seconds in ``seconds`` (ascending)."""
    longest, run, last = 0, 0, None
    for s in seconds:
        run = run + 1 if last is not None and s == last + 1 else 1
        longest, last = max(longest, run), s
    return longest


def judge_windows(windows: list[tuple[int, float]], engine_samples: list, window_s: float) -> list[tuple[int, float, float]]:
    """[(second, window p50 ms, the engine's own ms then)] for each window of ``window_p50s`` in
    which the remote engine reported its own time (``engine_samples``: [s, ms], the same clock,
    reported once it streams): the median of its reports in that window. A window that begins
    before the first report holds the warmup's frames (they go straight out, no loss burst to
    recover from): not judged."""
    out = []
    first = engine_samples[0][0] if engine_samples else None
    for s, p50 in windows:
        if first is None or s - window_s < first:
            continue
        own = sorted(ms for t, ms in engine_samples if s - window_s <= t < s)
        if own:
            out.append((s, p50, own[len(own) // 2]))
    return out


def window_p50s(samples: list, window_s: float, least: int = 5) -> list[tuple[int, float]]:
    """[(second, p50 ms)] of every frame whose time (s since the first frame back) lies in the
    ``window_s`` up to the end of each whole second, for the windows with at least ``least`` frames."""
    if not samples:
        return []
    out = []
    end = int(samples[-1][0]) + 1
    for s in range(int(window_s), end + 1):
        v = sorted(ms for t, ms in samples if s - window_s <= t < s)
        if len(v) >= least:
            out.append((s, v[len(v) // 2]))
    return out


def _cli(*args):
    return [sys.executable, "-m", "live2diff_engine", *map(str, args)]


def _run_for(cmd, seconds, stats: Path, env) -> dict:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    while not (stats.exists() and json.loads(stats.read_text()).get("frames_out", 0) > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("".join(lines))
        time.sleep(0.2)
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    proc.wait(120)
    time.sleep(0.5)
    return {**json.loads(stats.read_text()), "log": "".join(lines)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="512x512", help="camera frame size, WxH (default 512x512)")
    p.add_argument("--fps", type=float, default=10.0, help="camera rate (default 10)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured time per path (default 60)")
    p.add_argument("--model-size", type=int, default=64, help="the tiny model's width and height (default 64)")
    p.add_argument("--remote-only", action="store_true", help="only connect + serve (e.g. a long session for lost frames)")
    p.add_argument("--redundancy", choices=("auto", "on", "off"), default="auto",
                   help="serve's and connect's --redundancy (default auto: each packet twice while loss is reported)")
    add_fault_options(p)
    a = p.parse_args(argv)
    faults = faults_from(a)
    # The media on 127.0.0.1 (the relay forwards only there): remote/ice.py's LOOPBACK_ENV.
    env = {**os.environ, "LIVE2DIFF_ICE_LOOPBACK": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="l2d-bench-remote-"))
    common = ["--source", "synthetic", "--camera-size", a.size, "--camera-fps", a.fps, "--sink", "null", "--no-api"]
    model = ["--model", "tiny", "--width", a.model_size, "--height", a.model_size]

    local = None
    if not a.remote_only:
        local = _run_for(_cli("run", *model, *common, "--fresh", "--stats", tmp / "run.json"), a.seconds, tmp / "run.json", env)

    serve = subprocess.Popen(_cli("serve", *model, "--api-port", 0, "--fps", a.fps, "--redundancy", a.redundancy), stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True, env=env)
    slines: list[str] = []
    threading.Thread(target=lambda: slines.extend(iter(serve.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any(l.startswith("serving: ") for l in slines):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("".join(slines))
            time.sleep(0.2)
        url = re.search(r"WHIP (\S+)/whip", next(l for l in slines if l.startswith("serving: "))).group(1)
        relay = Relay(url, faults, refuse=a.refuse).start()
        print(f"link: {relay.describe()} (relay {relay.url})", flush=True)
        try:
            remote = _run_for(_cli("connect", relay.url, *common, "--redundancy", a.redundancy, "--stats", tmp / "connect.json"), a.seconds,
                              tmp / "connect.json", env)
        finally:
            relay.close()
        print(f"datagrams through the relay: {relay.counts()}")
        # What the signalling did: a resume after an outage is a PATCH, a new session a POST.
        asked = [f"{m} {s}" for m, _, s in relay.requests]
        print("requests through the relay: " + ", ".join(f"{asked.count(r)}x {r}" for r in dict.fromkeys(asked)))
        deadline = time.monotonic() + 60
        while not any(" ended: " in l for l in slines) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
    (tmp / "serve.log").write_text("".join(slines))
    (tmp / "connect.log").write_text(remote["log"])
    ends = [l.split(" ended: ", 1)[1].split(" (")[0].strip() for l in slines if " ended: " in l]
    if len(ends) > 1:
        print(f"serve's sessions ended: {', '.join(f'{ends.count(w)}x {w}' for w in dict.fromkeys(ends))} (logs in {tmp})")
    ended = next((l for l in slines if " ended: " in l), "")
    m = re.search(r"\((\d+) frames in, (\d+) out, (\d+) dropped", ended)
    served_in, served_out, served_dropped = (int(g) for g in m.groups()) if m else (None, None, None)
    back = remote["frames_out"]
    for name, s in (("run", local), ("connect + serve", remote)):
        if s is None:
            continue
        print(f"{name:16} capture to publish p50 {s['latency_ms_p50']} ms, p95 {s['latency_ms_p95']} ms; "
              f"frames in {s['frames_in']}, out {s['frames_out']}, fps out {s['fps_out']}")
    extra = remote.get("extra") or {}
    if extra.get("remote_latency_ms_p50") is not None and remote["latency_ms_p50"] is not None:
        print(f"serve's own part p50 {extra['remote_latency_ms_p50']} ms (its receive to its send): network and codecs "
              f"p50 {remote['latency_ms_p50'] - extra['remote_latency_ms_p50']:+.1f} ms")
    if local is not None and local["latency_ms_p50"] is not None and remote["latency_ms_p50"] is not None:
        print(f"added by WebRTC  p50 {remote['latency_ms_p50'] - local['latency_ms_p50']:+.1f} ms, "
              f"p95 {remote['latency_ms_p95'] - local['latency_ms_p95']:+.1f} ms")
    reconnects = remote["log"].count("connect: connection lost")
    if reconnects:
        print(f"connect lost the connection {reconnects} time(s) and reconnected (no frame back for 5 s); serve's "
              f"figures below are its first session's")
    lost = extra.get("frames_lost")
    if lost is not None:
        print(f"frames lost (skipped at a hole no retransmission filled in time, or left undecoded by a decoder that fell behind), both ways: {lost}")
    own = local["latency_ms_p50"] if local is not None and local["latency_ms_p50"] is not None else extra.get("remote_latency_ms_p50")
    rows = extra.get("latency_by_s") or []
    if own is not None and rows:
        bound = own + 200
        over = [s for s, p50, _ in rows if p50 > bound]
        longest = longest_run(over)
        tail = rows[len(rows) // 2:]
        print(f"second by second: {len(over)} of {len(rows)} s with p50 above the engine's own {own:.0f} ms + 200 ms; "
              f"recovery time (the longest such stretch) {longest} s; p50 of the second half "
              f"{sorted(p for _, p, _ in tail)[len(tail) // 2]:.0f} ms")
        windows = window_p50s(extra.get("latency_samples") or [], WINDOW_S)
        if windows:
            over_w = [s for s, p50 in windows if p50 > bound]
            print(f"over {WINDOW_S:g} s windows (the p50 of every frame in the {WINDOW_S:g} s up to each second): "
                  f"{len(over_w)} of {len(windows)} above the bound; recovery time (the longest such stretch) "
                  f"{longest_run(over_w)} s; highest window p50 {max(p for _, p in windows):.0f} ms")
            judged = judge_windows(windows, extra.get("engine_samples") or [], WINDOW_S)
            if judged:
                over_e = [s for s, p50, own_then in judged if p50 > own_then + 200]
                worst = max(judged, key=lambda row: row[1] - row[2])
                print(f"against serve's own time then (its status's p50 in each window + 200 ms): {len(over_e)} of "
                      f"{len(judged)} windows above; recovery time (the longest such stretch) {longest_run(over_e)} s; "
                      f"worst window p50 {worst[1]:.0f} ms with serve's own {worst[2]:.0f} ms")
    if served_out is not None:
        sent = extra.get("frames_sent")
        unseen = sent - served_in - served_dropped if sent is not None else None
        print(f"connect sent {sent}; serve took {served_in} and dropped {served_dropped} for newer ones (it takes the newest "
              f"when it falls behind: by design, counted); {unseen} never reached serve's engine; serve finished "
              f"{served_out}; connect published {back}: lost {served_out - back} (finished but not published)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
