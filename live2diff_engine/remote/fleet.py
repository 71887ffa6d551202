"""The fleet: `serve --ray ADDRESS` places each stream on a GPU of a Ray cluster.

A session is a Ray actor (SessionEngine) holding one engine on the GPU Ray gave it (Ray's GPU
assignment replaces --device). The actor runs the session's WebRTC peer connection itself (the
same WebRtcService as plain `serve`, with one slot), so the media goes straight between the client
and the GPU node, never through the front or Ray's object store. Actors are named and detached in
the namespace NAMESPACE: the HTTP front (FleetFront, the same API app as `serve`) keeps no state
of its own and finds a session's actor by its name, which is the first part of the session's URL
(/whip/ACTOR.SESSION). A front that stops or restarts leaves the sessions streaming; several fronts
can sit behind one load balancer.

Names: every engine actor on a node is called ``l2d-NODE-K`` with K below the node's capacity
(its GPUs / --gpus-per-session). Ray refuses a second actor of a name that exists, so two fronts
never put more engines on a node than it has room for, and a warm pool is never topped up twice.

Warm engines (--warm-per-gpu N): the front keeps N loaded engines per GPU of every node, idle,
ahead of any session, compiled too when --accelerate compiles (an engine answers only once its
models are loaded and its stream step compiled; /api/fleet shows loaded, compiled, compiles). An
offer goes to an idle warm engine first (its first stylised frame comes after the warmup frames
only, no load, no compile), which gives its slot back reset when the session ends and stays. An
engine made for one offer (no warm one was free) ends with its session. A warm engine that dies
is replaced by the next top-up.

Admission: no warm engine and no GPU free: 503 with Retry-After (after waiting up to --queue-s
for the cluster to grow). An engine made for an offer that is not loaded within ANSWER_S (a
loaded machine, a cold cache) is not waited on: the front answers 503 "starting" with a short
Retry-After and a cookie naming the engine, the engine goes on loading, and the client's retry
(which sends the cookie back) takes it and makes no other: no client gives up on a POST while
its engine is being made, leaving a session nobody streams to, and no client's retries fill the
cluster with engines made for it. (A real model's cold load and compile take minutes: this is
the usual path of a cold session, not only a loaded machine's.) A node whose engine cannot load
the models answers with one line naming the node and the `models download` command; the front
tries the next node.

WHEP: a viewer's offer (POST /whep?session=ID, or plain /whep when the fleet has one stream) goes
to that stream's engine; the video goes from its node to the viewer.

Niceness: Ray starts its workers at niceness 15; an engine lowers every thread of its own to 0
where it may (``unnice``), and the nodes should run RAY_worker_niceness=0 (README).

Ray is imported here only, and this module only by `serve --ray`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time

import ray

from .server import ENGINE_COOKIE, QUEUE_COOKIE, RETRY_AFTER_S, Slot, WebRtcService, studio_page

log = logging.getLogger("live2diff.fleet")

NAMESPACE = "live2diff"
PREFIX = "l2d-"
UNCLAIMED_S = 60.0  # an engine made for one offer that never got it (its front died) ends after this
READY_S = 600.0  # a new engine has this long to load its models
TOP_UP_S = 2.0  # how often the front tops up the warm engines
CALL_S = 30.0  # a call on an engine actor (an offer takes a peer connection's setup)
STATUS_EVERY_S = 0.5  # a session's status on its data channel at least this often: `connect` reads 1.5 s
# of silence as its node or engine gone (client.py, NODE_SILENT_S), so a lost node is noticed within 2 s
REFUSED_S = 60.0  # a node that could not load the models is not asked again for this long
ANSWER_S = 20.0  # an offer is answered within this (connect's POST waits 30 s, a browser's fetch not much longer):
# an engine still loading its models then answers 503 "starting" with STARTING_RETRY_S, goes on loading, and the
# client's next offer takes it (an engine made for an offer waits UNCLAIMED_S for one)
STARTING_RETRY_S = 2
QUEUED_RETRY_S = 1  # --queue-s longer than one answer: "queued", offer again at once (the wait goes on)


ENGINE_NAME = re.compile(r"l2d-[0-9a-f]{1,12}-[0-9]{1,4}")


def unnice() -> tuple[int, int]:
    """Ray starts its workers at niceness 15 (RAY_worker_niceness, a setting of each node's
    raylet), for batch work that should yield. An engine is the opposite: a live stream that
    anything else on the node (the raylet, a front on the same box, someone's job) would otherwise
    starve. Back to 0 for every thread of this process where the system allows it (root, or
    CAP_SYS_NICE; Linux counts niceness per thread, and threads made later inherit it); the nodes
    should be started with RAY_worker_niceness=0 all the same (README, installers/fleet/).
    Returns (the niceness Ray gave, the niceness now)."""
    given = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc (macOS): 0 is the whole process there
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:  # not allowed (an unprivileged user), or the thread ended meanwhile
            pass
    return given, os.getpriority(os.PRIO_PROCESS, 0)


def session_url_id(actor: str, sid: str) -> str:
    return f"{actor}.{sid}"


def split_id(value: str) -> tuple[str, str] | None:
    actor, _, sid = value.partition(".")
    return (actor, sid) if actor.startswith(PREFIX) and sid else None


def _response(resp, actor: str) -> tuple[int, dict, str]:
    """An aiohttp response of the session's service as plain data for the front, its Location
    naming the actor."""
    headers = {k: v for k, v in resp.headers.items() if k in ("Retry-After", "Location", "ETag")}
    if "Location" in headers:
        kind, _, sid = headers["Location"].lstrip("/").partition("/")  # whip/SESSION or whep/VIEWER
        headers["Location"] = f"/{kind}/{session_url_id(actor, sid)}"
        headers["ETag"] = f'"{session_url_id(actor, sid)}"'
    return resp.status, headers, resp.text or ""


class SessionEngine:
    """One engine on one GPU (made a Ray actor by FleetFront: ``ray.remote(num_gpus=...)``), and
    the WebRTC service of its one session. ``warm``: it stays (reset) when its session ends."""

    def __init__(self, args, name: str, warm: bool, ice_servers: list[dict]):
        import torch

        from ..assemble import build_frame_pipeline, preflight
        from ..control.controller import Controller  # noqa: F401  (the service's sessions use it)
        from ..engine import Engine
        from ..errors import UserError
        from .link import limit_bitrate
        from .redundancy import set_redundancy

        self.name, self.warm = name, warm
        self.niceness_given, self.niceness = unnice()  # before any thread of the engine is made: they inherit it
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.address = ray.util.get_node_ip_address()
        self.label = f"{self.address} (Ray node {self.node_id[:8]})"  # what a session's status calls its node
        self.refusal = None
        self.state = "loading"
        self.claimed = False
        self.created = time.monotonic()
        self.lock = threading.Lock()
        self.say = lambda text: print(f"[{name}] {text}", flush=True)
        t0 = time.monotonic()
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"  # CUDA_VISIBLE_DEVICES: Ray's choice
        self.gpus = [str(g) for g in ray.get_gpu_ids()]
        self.device = args.device
        try:
            preflight(args, lambda text: None)
            comps, frames, manager, _style = build_frame_pipeline(args, say=lambda text: None)
        except UserError as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.refusal = (f"node {self.label} cannot load the models: run `live2diff-engine models download` "
                            f"on it ({line[:160]})")
            self.state = "refused"
            return
        self.load_s = time.monotonic() - t0
        # With --accelerate on, building the frame pipeline compiled the stream step and the VAE's
        # encode and decode for the stream's shapes (FramePipeline: stream.precompile and
        # _precompile_vae), the very calls the first frames make: only now does this engine count as
        # loaded (and warm), and a session that takes it compiles nothing. (A CUDA graph is captured
        # at a session's first frames: it is bound to that stream's buffers; capturing is no compile.)
        self.frames = frames
        limit_bitrate(getattr(args, "max_bitrate", None))
        set_redundancy(getattr(args, "redundancy", None))
        fps = args.fps

        def make_engine(session, pipeline, sinks):
            engine = Engine(pipeline, session.source, sinks, fps=fps, status=False, controller=session.controller)
            engine.stats.extra["node"] = self.label
            return engine

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="session-loop", daemon=True).start()
        udp_ports = None
        if getattr(args, "udp_ports", None):
            from .ice import parse_port_range

            udp_ports = parse_port_range(args.udp_ports)
        self.service = WebRtcService([Slot(frames, manager, comps.label)], ice_servers=ice_servers,
                                     make_engine=make_engine, on_change=self._changed, say=self.say, fps=fps,
                                     session_grace=args.session_grace, udp_ports=udp_ports, codec=args.codec,
                                     status_every=STATUS_EVERY_S, relay_only=getattr(args, "ice_relay_only", False))
        self.state = "idle"
        if not warm:
            threading.Thread(target=self._unclaimed, daemon=True).start()

    # -- what the front calls -------------------------------------------------------------------

    def ready(self) -> dict:
        return {"ok": self.refusal is None, "why": self.refusal, "node": self.address, "niceness": self.niceness}

    def offer(self, sdp: str) -> tuple[int, dict, str]:
        """A new session on this engine, or 409 when it has one (the front tries another)."""
        if self.refusal is not None:
            return 503, {}, self.refusal + "\n"
        with self.lock:
            if self.claimed or self.state not in ("idle",):
                return 409, {}, "this engine serves another stream\n"
            self.claimed = True
        try:
            resp = self._call(self.service.open(sdp))
        except Exception:
            self.claimed = False
            raise
        if resp.status != 201:
            self.claimed = False
        else:
            self.state = "streaming"
        return _response(resp, self.name)

    def resume(self, sid: str, sdp: str) -> tuple[int, dict, str]:
        return _response(self._call(self.service.resume(sid, sdp)), self.name)

    def view(self, sdp: str) -> tuple[int, dict, str]:
        """A WHEP viewer of this engine's stream (the media goes from this node to the viewer)."""
        return _response(self._call(self.service.view(sdp)), self.name)

    def unview(self, vid: str) -> tuple[int, dict, str]:
        return _response(self._call(self.service.unview(vid)), self.name)

    def delete(self, sid: str) -> tuple[int, dict, str]:
        session = self.service.sessions.get(sid)
        if session is None:
            return 404, {}, "no such session\n"
        self._call(self.service.end(session, "ended by the client"))
        return 200, {}, "session ended\n"

    def retire(self) -> bool:
        """Ends this engine if it is idle (a warm one no stream holds); whether it does."""
        with self.lock:
            if self.claimed or self.state != "idle":
                return False
            self.state = "ending"
        threading.Thread(target=self._exit, daemon=True).start()
        return True

    def info(self) -> dict:
        """This engine and its session as plain data (the shapes of /api/fleet and /metrics)."""
        import os

        out = {"engine": self.name, "pid": os.getpid(), "node": self.address, "node_id": self.node_id, "warm": self.warm,
               "state": self.state, "gpus": self.gpus, "device": self.device, "refusal": self.refusal,
               "load_s": round(getattr(self, "load_s", 0.0), 3), "session": None,
               "niceness": self.niceness, "niceness_given": self.niceness_given}
        frames = getattr(self, "frames", None)
        if frames is not None:
            from ..pipeline.accelerate import compiled_graphs

            accel = frames.stream.accelerator
            # loaded: its models are in memory; compiled: its stream step is compiled for the
            # stream's shapes (with --accelerate off there is nothing to compile); compiles: the
            # graphs the compiler made in this engine so far, which a session on it leaves as it was
            out.update(loaded=True, accelerate=frames.stream.accelerated,
                       compiled=frames.stream.accelerated != "off" and bool(accel.compile_seconds),
                       compiles=compiled_graphs(), compile_s=round(sum(accel.compile_seconds.values()), 3))
        else:
            out.update(loaded=False, accelerate=None, compiled=False, compiles=0, compile_s=0.0)
        service = getattr(self, "service", None)
        session = next(iter(service.sessions.values()), None) if service is not None else None
        if session is not None:
            st = session.engine.stats if session.engine is not None else None
            out["session"] = {
                "id": session_url_id(self.name, session.id), "node": self.label, "address": self.address,
                "node_id": self.node_id, "state": st.state if st else "starting",
                "frames_in": st.frames_in if st else 0, "frames_out": st.frames_out if st else 0,
                "fps": round(st.fps_out, 2) if st else 0.0, "latency_ms_p50": st.latency_ms_p50 if st else None,
                "latency_ms_p95": st.latency_ms_p95 if st else None, "resumed": session.resumed,
                "age_s": round(time.monotonic() - session.created, 1),
            }
        try:
            import torch

            if torch.cuda.is_available():
                out["gpu_memory_bytes"] = torch.cuda.memory_reserved()
        except Exception:
            pass
        try:
            from ..engine.stats import rss_mb

            out["rss_mb"] = rss_mb()
        except Exception:
            pass
        return out

    # -- inside -----------------------------------------------------------------------------------

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_S)

    def _changed(self) -> None:
        """Sessions started or ended (any thread): an ended one frees the engine (warm: back to idle)."""
        if self.service.sessions or self.state != "streaming":
            return
        if self.warm:
            with self.lock:
                self.state, self.claimed = "idle", False
            self.say("session over: back to the warm pool")
        else:
            self.state = "ending"
            threading.Thread(target=self._exit, daemon=True).start()

    def _unclaimed(self) -> None:
        time.sleep(UNCLAIMED_S)
        if not self.claimed and self.state == "idle":
            self.state = "ending"
            self._exit()

    def _exit(self) -> None:
        self.say("ended: its GPU is free")
        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception as exc:  # never: then the process goes, and Ray frees what it held
            log.warning("cannot end the actor through Ray (%s); exiting", exc)
            import os

            os._exit(0)


class FleetFront:
    """The front's side: which engines exist, where a new stream goes, the warm pool."""

    def __init__(self, address: str, args, ice_servers: list[dict], say):
        self.args, self.ice, self.say = args, ice_servers, say
        self.gpus_per_session = args.gpus_per_session
        self.warm_per_gpu = args.warm_per_gpu
        self.queue_s = args.queue_s
        # LIVE2DIFF_FLEET_ANSWER_S: for checks (tests/test_fleet.py), an answer bound every engine's load outlasts
        self.answer_s = float(os.environ.get("LIVE2DIFF_FLEET_ANSWER_S", ANSWER_S))
        kwargs = dict(namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
        if address == "local":  # always a new cluster of its own: never one another process left running here
            os.environ.setdefault("RAY_worker_niceness", "0")  # its raylet's workers: the engines (see unnice)
            ray.init(address="local", include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
        self.actor_class = ray.remote(SessionEngine)
        self._refused: dict[str, tuple[str, float]] = {}  # node id -> (why its engine could not load the models, when)
        self._niced: set[str] = set()  # the nodes whose engines run niced (said once each)
        self.stopping = threading.Event()
        self._pool_lock = threading.Lock()
        self._thread = None
        if self.warm_per_gpu > 0:
            self._thread = threading.Thread(target=self._keep_warm, name="warm-pool", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """The front goes; the streams stay on their engines (they are detached). The idle warm
        engines this front kept go too (another front with --warm-per-gpu tops its pool up again)."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(10)
            refs = []
            for name in ray.util.list_named_actors():
                if isinstance(name, str) and name.startswith(PREFIX):
                    try:
                        refs.append(ray.get_actor(name).retire.remote())
                    except ValueError:
                        pass
            try:
                ray.get(refs, timeout=10)
            except Exception:
                pass
        try:
            ray.shutdown()
        except Exception:
            pass

    # -- the cluster ----------------------------------------------------------------------------

    @property
    def refused(self) -> dict[str, str]:
        """The nodes that refused a stream lately (no models), with their line."""
        now = time.monotonic()
        return {nid: why for nid, (why, at) in self._refused.items() if now - at < REFUSED_S}

    def engines(self) -> list[dict]:
        """Every live engine's info (one call each, at once); one that does not answer is left out."""
        names = [n for n in ray.util.list_named_actors() if isinstance(n, str) and n.startswith(PREFIX)]
        refs = {}
        for name in names:
            try:
                refs[ray.get_actor(name).info.remote()] = name
            except ValueError:  # gone meanwhile
                continue
        done, _pending = ray.wait(list(refs), num_returns=len(refs), timeout=3.0) if refs else ([], [])
        out = []
        for ref, name in refs.items():
            try:
                out.append(ray.get(ref, timeout=0.1) if ref in done else None)
            except Exception:  # died meanwhile
                continue
            if out[-1] is None:  # still loading its models (its first call waits for that)
                node_prefix = name[len(PREFIX):].rsplit("-", 1)[0]
                out[-1] = {"engine": name, "node": None, "node_id": None, "node_prefix": node_prefix, "warm": None,
                           "state": "loading", "session": None, "refusal": None, "loaded": False, "compiled": False}
        return out

    def nodes(self, engines: list[dict] | None = None) -> list[dict]:
        from ray._private.state import state

        engines = self.engines() if engines is None else engines
        free = state.available_resources_per_node()
        total = state.total_resources_per_node()
        out = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            nid = node["NodeID"]
            gpus = float(total.get(nid, {}).get("GPU", 0.0))
            if gpus <= 0:
                continue
            mine = [e for e in engines if e["node_id"] == nid or (e["node_id"] is None and nid.startswith(e["node_prefix"]))]
            mem = [e["gpu_memory_bytes"] for e in mine if e.get("gpu_memory_bytes") is not None]
            address = node.get("NodeManagerAddress")
            out.append({
                # the label its sessions' status and /metrics give it (several nodes may share an address)
                "node": f"{address} (Ray node {nid[:8]})", "address": address, "node_id": nid, "gpus": gpus,
                "gpus_free": float(free.get(nid, {}).get("GPU", 0.0)),
                "capacity": int(math.floor(gpus / self.gpus_per_session + 1e-9)),
                "engines": len(mine), "warm_idle": sum(1 for e in mine if e["warm"] and e["state"] == "idle"),
                "loading": sum(1 for e in mine if e["state"] == "loading"),
                "sessions": sum(1 for e in mine if e["session"] is not None),
                "gpu_memory_bytes": sum(mem) if mem else None, "refuses": self.refused.get(nid),
            })
        return out

    def snapshot(self) -> dict:
        """What /api/fleet shows; ``sessions`` and ``nodes`` are the lists remote/metrics.py's
        ``render(sessions, nodes)`` takes."""
        engines = self.engines()
        nodes = self.nodes(engines)
        sessions = [e["session"] for e in engines if e["session"] is not None]
        return {"nodes": nodes, "sessions": sessions, "engines": engines,
                "gpus": sum(n["gpus"] for n in nodes), "gpus_free": sum(n["gpus_free"] for n in nodes),
                "gpus_per_session": self.gpus_per_session, "warm_per_gpu": self.warm_per_gpu}

    def sessions_and_nodes(self) -> tuple[list[dict], list[dict]]:
        """For /metrics (remote/metrics.py's ``render(sessions, nodes)``), the dicts /api/fleet shows.
        A session: id, node (its node's label: address and Ray node id), address, node_id, state, frames_in, frames_out, fps, latency_ms_p50,
        latency_ms_p95, resumed, age_s. A node: node (the label), address, node_id, gpus, gpus_free, capacity,
        engines, warm_idle, loading, sessions, gpu_memory_bytes (None without CUDA), refuses."""
        snap = self.snapshot()
        return snap["sessions"], snap["nodes"]

    def _create(self, node: dict, warm: bool):
        """A new engine on ``node`` under the first free name of its slots, or None (all taken)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for k in range(node["capacity"]):
            name = f"{PREFIX}{node['node_id'][:12]}-{k}"
            try:
                return name, self.actor_class.options(
                    name=name, lifetime="detached", num_gpus=self.gpus_per_session, num_cpus=0, max_restarts=0,
                    max_concurrency=16, scheduling_strategy=NodeAffinitySchedulingStrategy(node["node_id"], soft=False),
                ).remote(self.args, name, warm, self.ice)
            except ValueError:  # the name is taken: that slot has an engine
                continue
        return None

    def _wait_ready(self, name: str, handle, node: dict) -> bool:
        try:
            ok = ray.get(handle.ready.remote(), timeout=READY_S)
        except Exception as exc:
            self.say(f"fleet: the engine on node {node['node']} failed to start ({type(exc).__name__}); trying elsewhere")
            self._kill(handle)
            return False
        if not ok["ok"]:
            self._refused[node["node_id"]] = (ok["why"], time.monotonic())
            self.say(ok["why"])
            self._kill(handle)
            return False
        if ok.get("niceness", 0) > 0 and node["node_id"] not in self._niced:
            self._niced.add(node["node_id"])
            self.say(f"fleet: the engines on node {node['node']} run at niceness {ok['niceness']} (Ray's default for "
                     f"its workers; they cannot change it there): anything else on that node takes the CPU before "
                     f"their streams. Start Ray there with RAY_worker_niceness=0 (`RAY_worker_niceness=0 ray start ...`)")
        return True

    @staticmethod
    def _kill(handle) -> None:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass

    def _free_nodes(self) -> list[dict]:
        nodes = [n for n in self.nodes() if n["node_id"] not in self.refused
                 and n["gpus_free"] + 1e-9 >= self.gpus_per_session and n["engines"] < n["capacity"]]
        return sorted(nodes, key=lambda n: (-n["gpus_free"], n["sessions"]))

    # -- a new stream -----------------------------------------------------------------------------

    def place(self, sdp: str, gone=None, mine: str | None = None, queued_since: str | None = None) -> tuple[int, dict, str]:
        """The response to a new offer: a warm engine's, else a new engine's on a free GPU, else 503.
        ``gone()``: whether the client has closed its connection meanwhile (then no session is made
        for it; an engine made for it stays idle for its retry). ``mine``: the engine an earlier
        "starting" answer made for this client (its cookie): taken first, and while it still loads
        the answer is "starting" again, not one more engine. ``queued_since``: the queue cookie of an
        earlier "queued" answer (--queue-s): the wait goes on from then, not from this offer."""
        if not sdp.lstrip().startswith("v=") or "\nm=video" not in sdp:  # no engine is made for what is no offer
            return 400, {}, "cannot use this offer: it is not an SDP offer with video (m=video)\n"
        start = time.monotonic()
        # The wait for a GPU (--queue-s) may outlast what a client waits for one answer: each offer is
        # answered within answer_s, "queued" while the wait goes on, and the client offers again at once.
        began = time.time()
        try:
            since = float(queued_since) if queued_since is not None else began
        except ValueError:
            since = began
        if not began - self.queue_s <= since <= began:  # no cookie, a wait spent long ago, or no time at all
            since = began
        queue_left = since + self.queue_s - began
        deadline, answer_by = start + min(queue_left, self.answer_s), start + self.answer_s
        left = lambda: gone is not None and gone()  # noqa: E731
        while True:
            if left():  # a queued offer whose client went: nothing to place
                return 499, {}, "the client closed its connection\n"
            engines = self.engines()
            own = next((e for e in engines if mine is not None and e["engine"] == mine), None)
            if own is not None and own["state"] == "loading":
                node = next((n for n in self.nodes(engines) if own["node_id"] == n["node_id"]
                             or (own["node_id"] is None and n["node_id"].startswith(own["node_prefix"]))), None)
                return self._starting(mine, node, None)
            for e in sorted((e for e in engines if e["state"] == "idle" and e["refusal"] is None),
                            key=lambda e: (e is not own, not e["warm"])):
                if left():
                    return 499, {}, "the client closed its connection\n"
                got = self._offer(e["engine"], sdp)
                if got is not None:
                    return got
            for node in self._free_nodes():
                made = self._start(node, warm=False)
                if made is None:
                    continue
                name, handle, box = made
                if not box["done"].wait(max(0.0, answer_by - time.monotonic())):
                    return self._starting(name, node, time.monotonic() - start)
                if not box["ok"]:
                    continue
                if left():
                    return 499, {}, "the client closed its connection\n"
                got = self._offer(name, sdp)
                if got is not None and got[0] != 201:  # the offer itself was refused: the engine made for it goes
                    self._kill(handle)
                    return got
                if got is not None:
                    self.say(f"fleet: a new engine on node {node['node']} (no warm one was free: it loaded its models)")
                    return got
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        left = since + self.queue_s - time.time()
        if left >= 1.0:
            cookie = f"{QUEUE_COOKIE}={since:.3f}; Path=/whip; Max-Age={int(self.queue_s) + 60}; HttpOnly; SameSite=Strict"
            return 503, {"Retry-After": str(QUEUED_RETRY_S), "Set-Cookie": cookie}, (
                f"queued: every GPU of the fleet is in use; waiting for one ({left:.0f} s of --queue-s {self.queue_s:g} "
                f"left); offer again in {QUEUED_RETRY_S} s\n")
        nodes, refused = self.nodes(), self.refused
        if refused and all(n["node_id"] in refused for n in nodes):
            return 503, {"Retry-After": str(RETRY_AFTER_S)}, (
                f"no node of the fleet can serve a stream: {next(iter(refused.values()))}"
                + (f" (and {len(refused) - 1} more node{'s' if len(refused) > 2 else ''} the same)" if len(refused) > 1 else "")
                + "\n")
        gpus = sum(n["gpus"] for n in nodes)
        loading = sum(n["loading"] for n in nodes if n["node_id"] not in refused)
        return 503, {"Retry-After": str(RETRY_AFTER_S)}, (
            f"busy: every GPU of the fleet is in use ({gpus:g} GPU{'s' if gpus != 1 else ''}, "
            f"{self.gpus_per_session:g} per stream"
            + (f"; {loading} engine{'s' if loading != 1 else ''} starting for other streams" if loading else "")
            + "); try again when one ends\n")

    @staticmethod
    def _starting(name: str, node: dict | None, waited: float | None) -> tuple[int, dict, str]:
        """503 "starting": the engine ``name`` is loading for this client; its cookie names it."""
        so_far = f", {waited:.0f} s so far" if waited is not None else ""
        where = f" on node {node['node']}" if node is not None else ""
        cookie = f"{ENGINE_COOKIE}={name}; Path=/whip; Max-Age={int(UNCLAIMED_S)}; HttpOnly; SameSite=Strict"
        return 503, {"Retry-After": str(STARTING_RETRY_S), "Set-Cookie": cookie}, (
            f"starting: an engine is loading its models{where} for this stream{so_far}; "
            f"offer again in {STARTING_RETRY_S} s and it takes the stream\n")

    def _start(self, node: dict, warm: bool):
        """A new engine on ``node`` (see _create) and a thread waiting for it to load:
        (name, handle, box), box["done"] set once it is ready or failed, box["ok"] which; or None."""
        made = self._create(node, warm)
        if made is None:
            return None
        name, handle = made
        box = {"done": threading.Event(), "ok": False}

        def wait() -> None:
            box["ok"] = self._wait_ready(name, handle, node)
            box["done"].set()

        threading.Thread(target=wait, name=f"ready-{name}", daemon=True).start()
        return name, handle, box

    def _offer(self, name: str, sdp: str):
        try:
            status, headers, text = ray.get(ray.get_actor(name).offer.remote(sdp), timeout=CALL_S + 5)
        except Exception:
            return None
        return None if status == 409 else (status, headers, text)

    def view(self, sdp: str, session: str | None) -> tuple[int, dict, str]:
        """A WHEP viewer's offer, forwarded to the engine of the stream it watches: ``session`` (an
        ID of /api/fleet), else the fleet's one stream."""
        if not sdp.lstrip().startswith("v=") or "\nm=video" not in sdp:
            return 400, {}, "cannot use this offer: it is not an SDP offer with video (m=video)\n"
        streams = [e for e in self.engines() if e["session"] is not None]
        if session is not None:
            got = split_id(session)
            streams = [e for e in streams if got is not None and e["engine"] == got[0]]
            if not streams:
                return 404, {}, f"no stream {session[:80]!r} on the fleet (GET /api/fleet lists them)\n"
        elif not streams:
            return 503, {"Retry-After": str(RETRY_AFTER_S)}, "no stream on the fleet to watch yet; try again later\n"
        elif len(streams) > 1:
            return 400, {}, (f"the fleet has {len(streams)} streams: name one, POST /whep?session=ID "
                             "(GET /api/fleet lists their IDs)\n")
        try:
            return ray.get(ray.get_actor(streams[0]["engine"]).view.remote(sdp), timeout=CALL_S + 5)
        except Exception:
            return 404, {}, "the stream ended meanwhile\n"

    def on_session(self, value: str, method: str, *params) -> tuple[int, dict, str]:
        """PATCH or DELETE on /whip/ACTOR.SESSION, forwarded to that session's engine."""
        got = split_id(value)
        if got is None:
            return 404, {}, "no such session\n"
        name, sid = got
        try:
            handle = ray.get_actor(name)
            return ray.get(getattr(handle, method).remote(sid, *params), timeout=CALL_S + 5)
        except Exception:
            return 404, {}, ("the fleet node that served this session is gone: make a new one with POST /whip "
                             "(another node, a new warmup)\n")

    # -- the warm pool ------------------------------------------------------------------------------

    def top_up(self) -> int:
        """Starts the engines missing from the warm pool (without waiting for them); how many."""
        made = 0
        with self._pool_lock:
            for node in self.nodes():
                if node["node_id"] in self.refused:
                    continue
                want = min(int(self.warm_per_gpu * node["gpus"]), node["capacity"])
                missing = want - node["warm_idle"] - node["loading"]
                free_slots = int(math.floor(node["gpus_free"] / self.gpus_per_session + 1e-9))
                for _ in range(max(0, min(missing, free_slots))):
                    if self._start(node, warm=True) is None:
                        break
                    made += 1
        return made

    def _keep_warm(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.top_up():
                    self.say("fleet: warm engines starting")
            except Exception as exc:
                log.warning("fleet: topping up the warm engines failed: %s", exc)
            self.stopping.wait(TOP_UP_S)


class FrontController:
    """What the front's own API (/api/status, ctl, the dock) talks to: the fleet's figures; commands
    go to a session (its data channel, or `connect`'s local API), not to the front."""

    class _NoStyles:
        styles: dict = {}
        current = None

    def __init__(self, fleet: FleetFront):
        self.fleet = fleet
        self.manager = self._NoStyles()
        self.engine = None
        self.api_url = None
        self.api_token = None
        self.stream_clients = None
        self._listeners = []
        self._snapshot: dict = {}
        threading.Thread(target=self._refresh, name="fleet-status", daemon=True).start()

    def _refresh(self) -> None:
        """The fleet's figures, every 2 s, off the API's event loop (each takes calls to the engines)."""
        stop = self.fleet.stopping
        while not stop.is_set():
            try:
                self._snapshot = self.fleet.snapshot()
            except Exception as exc:
                self._snapshot = {"error": str(exc)[:200]}
            self.changed()
            stop.wait(2.0)

    def add_listener(self, fn) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def changed(self) -> None:
        for fn in list(self._listeners):
            fn()

    def submit(self, raw, reply=None, *, local: bool = False):
        from .idle import status_only

        return status_only(raw, reply, self.status, "this is a fleet front: commands go to a stream's own engine (its "
                                                    "data channel, or `ctl --api` on the `connect` that sends it)")

    def status(self) -> dict:
        from .. import __version__

        snap = self._snapshot
        n = len(snap.get("sessions", []))
        return {"state": f"fleet front: {n} stream{'s' if n != 1 else ''}", "paused": False, "styles": [],
                "fps": 0.0, "fps_in": 0.0, "latency_ms": None, "frames_out": 0, "dropped": 0, "errors": 0,
                "sessions": n, "gpus": snap.get("gpus"), "gpus_free": snap.get("gpus_free"), "api_url": self.api_url,
                "obs": "off", "version": __version__, "time": round(time.time(), 3)}

    def status_message(self) -> dict:
        from ..control.schema import status_message

        return status_message(self.status())


def add_front_routes(fleet: FleetFront):
    """The front's HTTP routes on the API app: WHIP and WHEP forwarded to the engines, /studio,
    /api/fleet, /metrics."""

    async def blocking(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def respond(got):
        from aiohttp import web

        status, headers, text = got
        kind = "application/sdp" if status in (200, 201) and text.startswith("v=") else "text/plain"
        return web.Response(status=status, text=text, headers=headers, content_type=kind)

    async def whip(request):
        sdp = await WebRtcService.read_offer(request)
        if not isinstance(sdp, str):
            return sdp

        def gone() -> bool:  # read from place's thread: a closed connection only ever stays closed
            transport = request.transport
            return transport is None or transport.is_closing()

        mine = request.cookies.get(ENGINE_COOKIE)
        if mine is not None and not ENGINE_NAME.fullmatch(mine):  # only ever a name the front gave; else ignored
            mine = None
        queued = request.cookies.get(QUEUE_COOKIE)  # a time; anything else counts as none (place)
        status, headers, text = await blocking(fleet.place, sdp, gone, mine, queued[:32] if queued else None)
        if queued is not None and status != 503:  # the wait is over: the next stream's starts afresh
            headers = {**headers, "Set-Cookie": f"{QUEUE_COOKIE}=; Path=/whip; Max-Age=0; HttpOnly; SameSite=Strict"}
        return respond((status, headers, text))

    async def whip_patch(request):
        sdp = await WebRtcService.read_offer(request)
        if not isinstance(sdp, str):
            return sdp
        return respond(await blocking(fleet.on_session, request.match_info["id"], "resume", sdp))

    async def whip_delete(request):
        return respond(await blocking(fleet.on_session, request.match_info["id"], "delete"))

    async def options(request):
        from aiohttp import web

        return web.Response(status=204, headers={"Accept-Post": "application/sdp"})

    async def whep(request):
        sdp = await WebRtcService.read_offer(request)
        if not isinstance(sdp, str):
            return sdp
        return respond(await blocking(fleet.view, sdp, request.query.get("session")))

    async def whep_delete(request):
        return respond(await blocking(fleet.on_session, request.match_info["id"], "unview"))

    async def fleet_status(request):
        from aiohttp import web

        return web.json_response(await blocking(fleet.snapshot))

    async def metrics(request):
        from aiohttp import web

        from .metrics import CONTENT_TYPE, render

        body = render(*await blocking(fleet.sessions_and_nodes))
        return web.Response(body=body.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})

    def add(app) -> None:
        app.router.add_post("/whip", whip)
        app.router.add_patch("/whip/{id}", whip_patch)
        app.router.add_delete("/whip/{id}", whip_delete)
        app.router.add_route("OPTIONS", "/whip", options)
        app.router.add_get("/studio", studio_page)
        app.router.add_post("/whep", whep)
        app.router.add_delete("/whep/{id}", whep_delete)
        app.router.add_route("OPTIONS", "/whep", options)
        app.router.add_get("/api/fleet", fleet_status)
        app.router.add_get("/metrics", metrics)

    return add
