"""A real multi-node Ray cluster on this machine for the fleet tests (tests/test_fleet.py), run
inside the test's network namespace (tests/netns.py), where Ray finds only loopback and puts every
node at 127.0.0.1 (/work/shared/notes/ray.md: outside one it advertises the machine's interface).

`ray.cluster_utils.Cluster`: a head with no GPU and NODES worker nodes declaring one GPU each
(they have none: the engines run the tiny model on the CPU). Small footprints: one CPU per node,
100 MB object store, no dashboard.

Driven over stdin/stdout, one JSON line each way:
    {"op": "add", "gpus": N, "env": {...}} -> {"node": INDEX, "node_id": ID}   a node more with N GPUs
                              (default 1); its raylet and workers get ``env`` on top of ours (e.g.
                              an HF_HOME of its own: a node whose hub cache holds the models)
    {"op": "remove", "node": INDEX} -> {"removed": ID}          that node's processes killed
    {"op": "kill", "name": NAME} -> {"killed": NAME or null}   that actor ended (as if it failed)
    {"op": "state"}           -> {"gpus": total, "gpus_free": free, "actors": [names alive]}
    {"op": "quit"}            -> {"stopped": true}               every process of the cluster ended
The first line out is {"address": HEAD, "nodes": [ID, ...]}.
"""

from __future__ import annotations

import json
import sys

NODES = 2
SMALL = {"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024}


def main() -> int:
    import os

    # The answers go out on the stdout we were given; anything else printed there (Ray's own
    # notices, e.g. "Raylet is terminated" when a node is removed) goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # Every node as the README starts them: Ray's workers (the engines) at niceness 0, not its
    # default 15, under which an engine beside two CPU hogs took minutes to load (fleet.unnice:
    # inside the test's user namespace an engine cannot lower it itself). A node added with
    # {"env": {"RAY_worker_niceness": "15"}} gets Ray's default.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**SMALL, "num_gpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(**SMALL, num_gpus=1) for _ in range(NODES)]
    ray.init(address=cluster.address, namespace="live2diff", log_to_driver=False)
    cluster.wait_for_nodes()

    def say(obj):
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    say({"address": cluster.address, "nodes": [w.node_id for w in workers]})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "add":
                workers.append(cluster.add_node(**SMALL, num_gpus=cmd.get("gpus", 1), env_vars=cmd.get("env") or None))
                cluster.wait_for_nodes()
                say({"node": len(workers) - 1, "node_id": workers[-1].node_id})
            elif op == "remove":
                node = workers[cmd["node"]]
                cluster.remove_node(node, allow_graceful=False)
                say({"removed": node.node_id})
            elif op == "state":
                names = [n for n in ray.util.list_named_actors() if isinstance(n, str)]
                say({"gpus": ray.cluster_resources().get("GPU", 0.0), "gpus_free": ray.available_resources().get("GPU", 0.0),
                     "actors": names})
            elif op == "kill":
                try:
                    ray.kill(ray.get_actor(cmd["name"]), no_restart=True)
                    say({"killed": cmd["name"]})
                except ValueError:
                    say({"killed": None})
            elif op == "quit":
                break
    finally:
        ray.shutdown()
        cluster.shutdown()
    say({"stopped": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
