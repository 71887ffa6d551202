"""Manual measurement (not a test): the OBS filter path against the Media Source (MJPEG) path in a
real OBS (Debian's 29.0.2 under Xvfb), the same engine (`run --model tiny`) at the same size.

    PYTHONPATH=. python tests/bench_obs_paths.py [--size 128] [--seconds 30]

* filter: a colour source in OBS with the Live2Diff filter (built here with CMake), the engine
  `run --source obs-filter`;
* media: the engine `run --source synthetic --camera-size SxS` (the engine owns the "camera"), OBS
  reading its /stream.mjpg with a Media Source, as the OBS script sets one up.

Per path, over ``--seconds`` after the stream has settled: the CPU time of the OBS process and of the
engine process (utime + stime from /proc) per frame the engine put out, the engine's own latency
(capture to publish, its /api/status), and for the filter the filter's latency (capture in OBS to
the stylised frame back in OBS, its status line): the difference is what the filter path adds."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import spawn_cli  # noqa: E402
from obs_plugin import build, install  # noqa: E402
from obs_real import SCENE, RealOBS, free_port  # noqa: E402
from test_control import get  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status(api_port: int) -> dict:
    return json.loads(get(f"http://127.0.0.1:{api_port}", "/api/status")[1])


def obs_pid(real: RealOBS) -> int:
    for pid in real.pids():
        if Path(f"/proc/{pid}/comm").read_text().strip() == "obs":
            return pid
    raise RuntimeError("no obs process")


def engine(args: list[str], home: Path):
    env = {"HOME": str(home), "LIVE2DIFF_HOME": str(home / "l2d"), "LIVE2DIFF_CONFIG": "", "OMP_NUM_THREADS": "1",
           "OBS_WEBSOCKET_PASSWORD": "", "LIVE2DIFF_API_TOKEN": ""}
    return spawn_cli("run", "--model", "tiny", "--fresh", *args, env=env, stderr=open(home / "engine.log", "a"), fresh=True)


def settle(api_port: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if status(api_port).get("state") == "streaming":
                time.sleep(5)
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the engine never streamed")


def measure(real, proc, api_port, seconds, filter_status=None) -> dict:
    opid = obs_pid(real)
    o0, e0, s0, t0 = cpu_s(opid), cpu_s(proc.pid), status(api_port), time.monotonic()
    filt = []
    while time.monotonic() - t0 < seconds:
        time.sleep(1)
        if filter_status is not None:
            m = re.search(r"([\d.]+) fps \| latency (\d+) ms", filter_status())
            if m:
                filt.append((float(m.group(1)), float(m.group(2))))
    o1, e1, s1, t1 = cpu_s(opid), cpu_s(proc.pid), status(api_port), time.monotonic()
    frames = s1["frames_out"] - s0["frames_out"]
    out = {"seconds": round(t1 - t0, 1), "engine_frames": frames, "engine_fps": round(frames / (t1 - t0), 2),
           "obs_cpu_ms_per_frame": round((o1 - o0) / max(frames, 1) * 1000, 1),
           "obs_cpu_pct": round((o1 - o0) / (t1 - t0) * 100, 1),
           "engine_cpu_ms_per_frame": round((e1 - e0) / max(frames, 1) * 1000, 1),
           "engine_latency_ms": s1.get("latency_ms")}
    if filt:
        lat = sorted(x[1] for x in filt)
        out["filter_latency_ms"] = lat[len(lat) // 2]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=30)
    args = p.parse_args()
    size = str(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "b").mkdir()
        build(tmp / "b")
        results = {}
        for path in ("filter", "media"):
            home = tmp / f"home-{path}"
            home.mkdir()
            real = RealOBS(tmp / f"obs-{path}")
            install(tmp / "b", real.config_dir)
            api_port = free_port()
            if path == "filter":
                port = free_port()
                proc = engine(["--source", f"obs-filter:{port}", "--width", size, "--height", size, "--api-port", str(api_port)], home)
            else:
                proc = engine(["--source", "synthetic", "--camera-size", f"{size}x{size}", "--width", size, "--height", size,
                               "--sink", "null", "--api-port", str(api_port)], home)
            try:
                with real:
                    cl = real.client(timeout=30)
                    if path == "filter":
                        cl.send("CreateInput", {"sceneName": SCENE, "inputName": "cam", "inputKind": "color_source_v3",
                                                "inputSettings": {"color": 0xFF5AA028, "width": 640, "height": 480},
                                                "sceneItemEnabled": True})
                        cl.send("CreateSourceFilter", {"sourceName": "cam", "filterName": "Live2Diff", "filterKind": "live2diff_filter",
                                                       "filterSettings": {"port": port}})

                        def fstatus():
                            return cl.send("GetSourceFilter", {"sourceName": "cam", "filterName": "Live2Diff"}, raw=True)["filterSettings"]["status"]
                    else:
                        cl.send("CreateInput", {"sceneName": SCENE, "inputName": "cam", "inputKind": "ffmpeg_source", "sceneItemEnabled": True,
                                                "inputSettings": {"is_local_file": False, "input": f"http://127.0.0.1:{api_port}/stream.mjpg?client=obs",
                                                                  "input_format": "mpjpeg", "buffering_mb": 0, "reconnect_delay_sec": 1,
                                                                  "restart_on_activate": False, "close_when_inactive": False,
                                                                  "hw_decode": False, "clear_on_media_end": False}})
                        fstatus = None
                    settle(api_port)
                    results[path] = measure(real, proc, api_port, args.seconds, fstatus)
                    print(path, json.dumps(results[path]), flush=True)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)


if __name__ == "__main__":
    main()
