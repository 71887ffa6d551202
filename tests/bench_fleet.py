"""Manual measurement (not a test): what the fleet (`serve --ray`) costs against plain `serve`, on
this machine's fake-GPU Ray cluster (tests/fleet_cluster.py: two worker nodes declaring a GPU each,
the engines on the CPU with the tiny model), everything in a network namespace of its own.

    PYTHONPATH=. python tests/bench_fleet.py [--rounds 5] [--seconds 8] [--out figures.json]
    PYTHONPATH=. python tests/bench_fleet.py full-size-memory     (an engine's models at full size)

Per setup (plain serve; the fleet front with no warm engine; the fleet front with --warm-per-gpu 1),
``--rounds`` streams one after another, each from a real aiortc client (tests/whip_client.py):
  signalling  POST /whip to the answer;
  first       POST /whip to the first stylised frame back (after the 8 warmup frames, which come
              back as the camera: at 10 frames/s they take 0.8 s of it);
  round trip  a frame sent to its stylised frame back (p50 over ``--seconds``), the capture-to-publish
              path, which the fleet does not touch (the media goes straight to the engine).
Then: a stream's node removed, to the stream flowing again on the other node (through `connect`);
the memory (RSS) of the front, of plain serve and of a warm engine actor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


WARMUP_FRAMES = 8  # the model's sink (warmup) frames: until they are in, the engine sends the camera back


def stylised(client, pts: int) -> bool:
    """A frame back made by the model: one of a frame sent after the warmup frames."""
    i = client.sent_index(pts)
    return i is not None and i >= WARMUP_FRAMES


def probe(url: str, token: str, rounds: int, seconds: float) -> int:
    """Inside the namespace: ``rounds`` streams to ``url``, one JSON line of figures each."""
    from whip_client import WhipClient

    async def one():
        c = WhipClient(url, token=token, fps=10.0, size=(64, 48))
        t0 = time.monotonic()
        status = await c.start()
        t_answer = time.monotonic()
        if status != 201:
            return {"status": status, "text": c.answer_text[:200]}
        while not any(stylised(c, p) for p, _, _ in c.received):
            if time.monotonic() - t0 > 300:
                return {"status": status, "error": "no stylised frame in 300 s"}
            await asyncio.sleep(0.01)
        t_first = next(at for p, _, at in c.received if stylised(c, p))
        settle = time.monotonic() + 2.0
        await asyncio.sleep(2.0 + seconds)
        trips = c.round_trips(since=settle)
        await c.delete()
        await c.close()
        return {"status": status, "signalling_ms": round((t_answer - t0) * 1000, 1),
                "first_frame_s": round(t_first - t0, 3),
                "round_trip_ms_p50": round(statistics.median(trips) * 1000, 1) if trips else None,
                "frames": len(trips)}

    async def main():
        for _ in range(rounds):
            print(json.dumps(await one()), flush=True)
            await asyncio.sleep(4.0)  # the engine ends (cold) or goes back to the pool (warm)

    asyncio.run(main())
    return 0


def full_size_memory() -> int:
    """The memory an engine's models take at the full SD1.5 + Live2Diff geometry (random weights,
    float32, on the CPU: the fleet's engines cannot load this bench-only model, so it is measured
    in a process of its own): RSS before and after building them, and their parameter bytes."""
    import os

    import torch

    from live2diff_engine.models.full_random import build_full_components

    before = rss_mb(os.getpid())
    comps = build_full_components("cpu", torch.float32)
    params = sum(p.numel() * p.element_size() for m in (comps.unet, comps.vae, comps.text_encoder, comps.depth)
                 for p in m.parameters())
    print(json.dumps({"rss_before_mb": before, "rss_after_mb": rss_mb(os.getpid()),
                      "parameter_mb_fp32": round(params / 2**20, 1), "parameter_mb_fp16": round(params / 2**21, 1)}))
    return 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_probe(ns, url, token, rounds, seconds) -> list[dict]:
    from test_fleet import ENV, ROOT

    r = subprocess.run(ns.cmd(sys.executable, str(Path(__file__)), "probe", url, token, str(rounds), str(seconds)),
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=1800)
    out = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    if not out:
        print(r.stderr[-3000:], file=sys.stderr)
    return out


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("status") == 201 and "first_frame_s" in r]

    def med(key):
        vals = [r[key] for r in ok if r.get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None

    return {"rounds": len(rows), "ok": len(ok), "signalling_ms_p50": med("signalling_ms"),
            "first_frame_s_p50": med("first_frame_s"), "round_trip_ms_p50": med("round_trip_ms_p50"), "each": rows}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "full-size-memory":
        return full_size_memory()
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        return probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from netns import Netns
    from test_fleet import TOKEN, URL, Cluster, connect, engine, fleet, flowing, front, get_json, wait_until

    ns = Netns()
    cluster = Cluster(ns)
    figures = {"machine": subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip(),
               "load_before": open("/proc/loadavg").read().split()[:3]}
    try:
        # plain serve, the same model, the same client
        serve = engine(ns, "serve", "--model", "tiny", "--api-port", "41350")
        wait_until(lambda: any(l.startswith("serving: ") for l in serve.err), "serve", log=serve.log)
        figures["serve"] = summary(run_probe(ns, "http://127.0.0.1:41350", TOKEN, a.rounds, a.seconds))
        figures["serve"]["rss_mb"] = rss_mb(serve.proc.pid)
        serve.stop()
        print(json.dumps({k: v for k, v in figures["serve"].items() if k != "each"}), file=sys.stderr)

        fr = front(ns, cluster)
        figures["fleet_cold"] = summary(run_probe(ns, URL, TOKEN, a.rounds, a.seconds))
        figures["front_rss_mb"] = rss_mb(fr.proc.pid)
        fr.stop()
        print(json.dumps({k: v for k, v in figures["fleet_cold"].items() if k != "each"}), file=sys.stderr)

        fr = front(ns, cluster, "--warm-per-gpu", "1")
        wait_until(lambda: (lambda n: len(n) == 2 and all(x["warm_idle"] == 1 for x in n))(fleet(ns).get("nodes") or []),
                   "the warm engines", log=fr.log)
        figures["warm_engine_rss_mb"] = [e.get("rss_mb") for e in fleet(ns)["engines"]]
        figures["warm_engine_load_s"] = [e.get("load_s") for e in fleet(ns)["engines"]]
        figures["fleet_warm"] = summary(run_probe(ns, URL, TOKEN, a.rounds, a.seconds))
        print(json.dumps({k: v for k, v in figures["fleet_warm"].items() if k != "each"}), file=sys.stderr)
        fr.stop()

        # a node lost mid-stream: to the stream flowing again on the other node (cold there)
        fr = front(ns, cluster)
        resumes = []
        for _ in range(max(1, a.rounds // 2)):
            p, api = connect(ns)
            st = wait_until(lambda: flowing(ns, api), "a stream", log=p.log)
            node_id = fleet(ns)["sessions"][0]["node_id"]
            t0 = time.monotonic()
            cluster.remove(node_id)
            removed = time.monotonic()  # Cluster.remove_node returns once the node's processes are killed
            noticed = wait_until(lambda: next((time.monotonic() for l in p.err if "no word from the fleet node" in l), None),
                                 "connect to notice")  # polled every 0.3 s: up to 0.3 s late
            wait_until(lambda: (lambda s: s if s and s.get("node") not in (None, st["node"]) else None)(flowing(ns, api)),
                       "the stream on the other node", log=p.log)
            resumes.append({"remove_call_s": round(removed - t0, 2), "noticed_s": round(noticed - t0, 2),
                            "flowing_again_s": round(time.monotonic() - t0, 2)})
            p.stop()
            cluster.nodes.append(cluster.ask(op="add")["node_id"])
        figures["node_loss"] = resumes
        fr.stop()
        figures["load_after"] = open("/proc/loadavg").read().split()[:3]
        _ = get_json
    finally:
        cluster.close()
        ns.close()
    text = json.dumps(figures, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
