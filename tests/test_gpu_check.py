"""tests/gpu_check.sh rehearsed without a GPU: the real script in a subprocess, with a fake
nvidia-smi on PATH, ``GPU_CHECK_DEVICE=cpu`` (every command gets ``--device cpu``; the CUDA-graph
steps are skipped as not on a GPU, never reported as passed) and ``GPU_CHECK_QUICK=1`` (one
fixture, one check-accelerate case, a few frames). torch.compile is the identity here
(tests/gpu_rehearsal/sitecustomize.py): what is checked is the script, not a compiler. Also: the
preflight's one line when diffusers or CUDA is missing, a cut-off step's own exit status, and the
carried wheel's pin against our venv."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile

from conftest import ROOT

SCRIPT = ROOT / "tests" / "gpu_check.sh"
FAKE_SMI = "#!/bin/sh\necho 'Fake GPU (rehearsal), 000.00, 8192 MiB'\n"


def _probe_wheel(folder):
    """A tiny pure-Python wheel: the install step puts it into its --target folder offline."""
    folder.mkdir()
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    info = "gpu_check_probe-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpu_check_probe.py", "VALUE = 1\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return folder


def _run(tmp_path, env_extra, timeout=400):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text(FAKE_SMI)
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"), PY=sys.executable,
               GPU_CHECK_WHEELS=str(tmp_path / "no_wheels"), OMP_NUM_THREADS="1",
               PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    env.update(env_extra)
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    return result, summary


def test_the_check_rehearsed_on_the_cpu(tmp_path):
    wheels = _probe_wheel(tmp_path / "wheels")
    result, summary = _run(tmp_path, {
        "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_QUICK": "1", "GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_NO_COMPILE": "1",
        "PYTHONPATH": str(ROOT / "tests" / "gpu_rehearsal"),
    })
    assert result.returncode == 0, result.stdout + result.stderr
    lines = summary.splitlines()
    status = {m.group(1): m.group(2) for m in (re.match(r"^([a-z0-9-]+): (passed|FAILED|CUT OFF|skipped \(not on a GPU)", ln) for ln in lines) if m}
    assert status == {"install": "passed", "preflight": "passed", "reference-eager": "passed", "reference-cudagraph": "skipped (not on a GPU",
                      "reference-fp16": "skipped (not on a GPU", "bench-gpu": "passed", "check-accelerate": "passed"}, summary
    assert "nvidia-smi: Fake GPU (rehearsal)" in summary and "diffusers" in summary
    assert "24/24 frames match" in summary and "1/1 accelerated streams match eager" in summary and "warmup memory" in summary
    assert lines[-1].startswith("gpu check (rehearsal on cpu): every step that runs here passed")
    assert "reference-cudagraph" in lines[-1] and "not run here" in lines[-1]
    assert lines[-1] in result.stdout.splitlines()
    # what comes back from $OUT: a few plain files, no folders (the compile cache and logs are in the work folder)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bench-gpu.json", "check-accelerate.json", "steps.log", "summary.txt"]
    assert (tmp_path / "work" / "site" / "gpu_check_probe.py").exists()  # the carried wheel, installed offline
    assert sorted(p.name for p in (tmp_path / "work" / "logs").iterdir()) == [
        "bench-gpu.log", "check-accelerate.log", "install.log", "preflight.log", "reference-eager.log"]
    bench = json.loads((out / "bench-gpu.json").read_text())
    assert bench["device"] == "cpu" and list(bench["stream"]) == ["off"] and not bench["errors"]
    assert [m["size"] for m in bench["warmup_memory"]] == ["64x64", "96x64"] and bench["warmup_memory"][0]["fits"] is None
    check = json.loads((out / "check-accelerate.json").read_text())
    assert [c["mode"] for c in check["cases"]] == ["compile"] and all(c["ok"] for c in check["cases"])
    # each command got the budget left to it, less its margin
    assert re.search(r"== bench-gpu \(limit (\d+) s\):.* --budget-s (\d+)", (out / "steps.log").read_text())


def _fake_python(tmp_path, body):
    """A python for the cut-off test: the preflight passes at once, check-reference runs ``body``."""
    path = tmp_path / "python"
    path.write_text("#!/bin/bash\n"
                    "if [[ $1 == -c ]]; then echo 'python 3 (fake); torch x; diffusers y; device cpu'; exit 0; fi\n"
                    f"if [[ $* == *check-reference* ]]; then {body}; fi\n"
                    "exit 3\n")
    path.chmod(0o755)
    return str(path)


def test_a_cut_off_step_keeps_its_status_and_the_rest_is_skipped(tmp_path):
    """`timeout`'s 124 (and 137 when TERM is ignored and the kill is needed) reach the summary; the
    steps after it, with no time left, are skipped as such, and the check fails."""
    for body, code in (("exec sleep 60", 124), ("trap '' TERM; sleep 60 & wait; sleep 60", 137)):
        result, summary = _run(tmp_path, {"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SECONDS": "9", "PY": _fake_python(tmp_path, body)},
                               timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert re.search(rf"^reference-eager: CUT OFF \(exit {code}\) in \d+ s \(limit [3-5] s\)$", summary, re.M), summary
        assert "bench-gpu: skipped (the time is spent)" in summary and "check-accelerate: skipped (the time is spent)" in summary
        assert summary.splitlines()[-1].startswith("gpu check: 3 step(s) failed or were cut off (reference-eager bench-gpu check-accelerate)")


def test_the_preflight_stops_with_one_line(tmp_path):
    """Without diffusers (as on the GPU machine before the wheels are installed), and without CUDA,
    the check stops at once with one line that says why (exit 2)."""
    shadow = tmp_path / "shadow" / "diffusers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'diffusers'\", name='diffusers')\n")
    result, summary = _run(tmp_path, {"GPU_CHECK_DEVICE": "cpu", "PYTHONPATH": str(shadow.parent)}, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu check: cannot start: ModuleNotFoundError: No module named 'diffusers'") and "gpu_wheels.sh" in last
    assert summary.strip().splitlines()[-1] == last and "reference-eager" not in summary

    result, summary = _run(tmp_path, {}, timeout=120)  # the default device, cuda, on this machine
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("gpu check: cannot start: torch ") and "sees no CUDA device" in summary


def test_the_carried_wheel_is_the_version_our_venv_runs():
    pins = re.search(r"^WHEELS=\((.*)\)$", (ROOT / "tests" / "gpu_wheels.sh").read_text(), re.M).group(1).split()
    assert pins == [f"diffusers=={importlib.metadata.version('diffusers')}"]
    assert ".gpu_wheels" in (ROOT / ".gitignore").read_text()
