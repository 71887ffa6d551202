"""The fleet's deployment files (installers/fleet/): a Ray cluster-launcher config for AWS and a
KubeRay RayCluster, plus the Prometheus example. Never run on a cloud or a Kubernetes cluster here;
what can be checked without one is checked: each file parses; the launcher config passes Ray's own
validation (what `ray up` runs first); the head starts the front (`live2diff-engine serve --ray auto`)
and the GPU workers install the package with the [fleet] extra and download the models before they
join; every `live2diff-engine` command in them parses with the real command line; the ports the
front listens on are the ports opened; the Ray version is one everywhere (images, rayVersion, the
[fleet] extra)."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import yaml

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FLEET = ROOT / "installers" / "fleet"
# serve's fleet options (remote/fleet.py, another branch until merged): checked by the real parser
# once it has them, left out of the check before.
FLEET_OPTIONS = {"--ray", "--gpus-per-session", "--warm-per-gpu", "--queue-s"}


def launcher():
    return yaml.safe_load((FLEET / "cluster-aws.yaml").read_text())


def kuberay():
    docs = [d for d in yaml.safe_load_all((FLEET / "raycluster.yaml").read_text()) if d]
    cluster = next(d for d in docs if d.get("kind") == "RayCluster")
    return cluster, [d for d in docs if d is not cluster]


def invocations(shell: str) -> list[list[str]]:
    """Each `live2diff-engine ...` in a shell command line, as its argv (up to the next ; & | > or newline)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    words, found, current = list(lexer), [], None
    for w in words:
        if w == "live2diff-engine":
            current = []
            found.append(current)
        elif current is not None:
            if w and set(w) <= set(";&|<>()"):
                current = None
            else:
                current.append(w)
    return found


def parse_cli(argv: list[str]):
    """The real command line's reading of ``argv`` (a bad option fails the test)."""
    from live2diff_engine.cli import build_parser

    parser = build_parser()
    if argv[0] == "serve":
        known = {o for a in parser._subparsers._group_actions[0].choices["serve"]._actions for o in a.option_strings}
        if "--ray" not in known:  # before the fleet's branch is merged: its options are not there yet
            rest, i = [], 1
            while i < len(argv):
                if argv[i] in FLEET_OPTIONS:
                    i += 2
                    continue
                rest.append(argv[i])
                i += 1
            argv = ["serve", *rest]
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`live2diff-engine {' '.join(argv)}` does not parse")


def serve_of(commands: list[str]) -> list[str]:
    found = [argv for c in commands for argv in invocations(c) if argv[:1] == ["serve"]]
    assert len(found) == 1, f"one front, started once: {found}"
    argv = found[0]
    assert argv[1:3] == ["--ray", "auto"], f"the front joins the cluster it runs on: {argv}"
    parse_cli(argv)
    return argv


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def fleet_pin() -> str:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["fleet"]
    (req,) = [r for r in extra if r.startswith("ray")]
    m = re.fullmatch(r"ray(\[[a-z,]+\])?==([0-9.]+)", req.replace(" ", ""))
    assert m, f"the [fleet] extra pins one Ray: {req}"
    return m.group(2)


# -- the Ray cluster launcher (AWS) ------------------------------------------------------------------


def test_the_launcher_config_passes_rays_own_validation():
    pytest.importorskip("ray")  # the [fleet] extra; the checks below need no Ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)  # and the validation does refuse what `ray up` would
    broken["available_node_types"]["gpu"]["resources"]["GPUs"] = "one"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_the_launcher_starts_the_front_on_a_head_without_gpus_and_engines_on_gpu_workers():
    config = launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "no engine is placed on the front's machine"
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["max_workers"] >= gpu[0]["min_workers"] >= 1
    argv = serve_of(config["head_start_ray_commands"])
    assert option(argv, "--api-host") == "0.0.0.0" and "--api-token" not in argv  # the token comes from the env file
    start = config["head_start_ray_commands"]
    assert any("ray start --head" in c for c in start[: start.index(next(c for c in start if "live2diff-engine" in c))]), \
        "Ray's head starts before the front that joins it"
    assert not any("live2diff-engine" in c for c in config["worker_start_ray_commands"])


def test_the_launcher_installs_the_fleet_extra_everywhere_and_downloads_the_models_on_each_worker():
    config = launcher()
    setup = " ; ".join(config["setup_commands"])  # every node, before its start commands
    assert re.search(r"pip install .*live2diff-engine\[fleet\]", setup), setup
    downloads = [argv for c in config["worker_setup_commands"] for argv in invocations(c)]
    assert downloads and downloads[0][:2] == ["models", "download"], config["worker_setup_commands"]
    parse_cli(downloads[0])
    assert "." in config["file_mounts"].values(), "the checkout that is installed travels to the nodes"


def test_the_launcher_opens_the_ports_the_front_and_engines_use():
    config = launcher()
    argv = serve_of(config["head_start_ray_commands"])
    rules = config["provider"]["security_group"]["IpPermissions"]
    opened = {(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in rules}
    port = int(option(argv, "--api-port"))
    lo, hi = map(int, option(argv, "--udp-ports").split("-"))
    assert ("tcp", port, port) in opened and ("udp", lo, hi) in opened, (opened, argv)


# -- KubeRay ------------------------------------------------------------------------------------------


def test_the_kuberay_manifest_is_a_raycluster_with_a_head_and_a_gpu_worker_group():
    cluster, others = kuberay()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu, "a worker group with GPUs"
    g = gpu[0]
    assert g["groupName"] and g["maxReplicas"] >= g["replicas"] >= g["minReplicas"] >= 1
    limits = g["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"]["nvidia.com/gpu"] == limits["requests"]["nvidia.com/gpu"]


def test_kuberay_runs_our_commands_around_its_own_ray_start():
    cluster, _ = kuberay()
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    for container in (head, worker["containers"][0]):
        script = " ".join(container["args"])
        assert script.rstrip().endswith("$KUBERAY_GEN_RAY_START_CMD"), "Ray runs in the foreground, as KubeRay made it"
        assert re.search(r"pip install .*live2diff-engine\[fleet\]", script), script
    argv = serve_of(head["args"])
    assert option(argv, "--api-host") == "0.0.0.0" and "--api-token" not in argv
    env = {e["name"]: e for e in head["env"]}
    assert "secretKeyRef" in env["LIVE2DIFF_API_TOKEN"]["valueFrom"], "the token comes from a Secret, never the manifest"
    # The models before the pod joins (an init container, so KubeRay's health checks do not time it).
    init = " ".join(a for c in worker["initContainers"] for a in c["args"])
    assert re.search(r"pip install .*live2diff-engine\[fleet\]", init)
    downloads = [argv for argv in invocations(init) if argv[:1] == ["models"]]
    assert downloads and downloads[0][:2] == ["models", "download"]
    parse_cli(downloads[0])
    mounts = {m["mountPath"] for c in worker["initContainers"] for m in c["volumeMounts"]}
    homes = {e["value"] for c in (*worker["initContainers"], *worker["containers"]) for e in c["env"] if e["name"] == "HF_HOME"}
    assert len(homes) == 1 and any(next(iter(homes)).startswith(m) for m in mounts), "the engines read what was downloaded"


def test_the_front_is_published_on_the_port_it_listens_on():
    cluster, others = kuberay()
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    port = int(option(serve_of(head["args"]), "--api-port"))
    assert port in {p["containerPort"] for p in head["ports"]}
    (service,) = [d for d in others if d["kind"] == "Service"]
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port]


# -- both, and Prometheus -------------------------------------------------------------------------------


def test_one_ray_version_everywhere():
    version = fleet_pin()
    cluster, _ = kuberay()
    assert cluster["spec"]["rayVersion"] == version
    images = [launcher()["docker"]["image"]]
    spec = cluster["spec"]
    images += [c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for g in spec["workerGroupSpecs"]:
        t = g["template"]["spec"]
        images += [c["image"] for c in (*t["containers"], *t.get("initContainers", []))]
    for image in images:
        assert image.startswith(f"rayproject/ray:{version}-"), image


def test_the_prometheus_example_scrapes_metrics_with_the_token_from_a_file():
    config = yaml.safe_load((FLEET / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and "credentials_file" in job["authorization"]
    assert "credentials" not in job["authorization"]
    assert job["static_configs"][0]["targets"]


def test_the_invocation_reader_finds_commands_in_shell_lines():
    line = 'set -a; . ~/x.env; nohup live2diff-engine serve --ray auto --api-port 8765 > log 2>&1 & echo $!'
    assert invocations(line) == [["serve", "--ray", "auto", "--api-port", "8765"]]
    assert invocations("pip install x && live2diff-engine models download") == [["models", "download"]]
