"""Inductor for real on the golden fixtures: the compiled kernels against the original
implementation's numbers for 2, 3 and 4 denoising steps, then `bench` comparing eager and compiled
in one run. It compiles the tiny models' stream steps with inductor's C++ backend, which takes
minutes of CPU.

The compiles run with ATEN_CPU_CAPABILITY=default: inductor then writes plain C++ loops instead of
AVX ones for the same lowered graph. What this test guards is the engine's side (the whole stream
call traced in one graph, its buffer and KV-cache writes lowered correctly, the first compiled
call checked against eager, `bench` comparing modes in one run); the vector code generator is
torch's own and tested there. `bench --model tiny` has the 2-step fixture's geometry (same UNet
config, latent 8x8, steps 32,45), so with the same cache folder its compile finds the fixture's
kernels in inductor's cache and only traces. Measured on a 2-core box: a fixture's compile 137-190
s plain instead of 202 s with AVX; the bench compile 27 s from the cache instead of 100-285 s with
AVX into an empty one. The 3-step fixture is the one the compiled step once got wrong (1 frame of 40
matched: BENCHMARKS.md, "A compiler can be wrong")."""

import json
import re

from conftest import FIXTURE_A, GOLDEN, run_cli

FIXTURES = {FIXTURE_A: 24, GOLDEN / "live2diff_tiny_d": 40, GOLDEN / "live2diff_tiny_c": 36}


def test_compiled_kernels_reproduce_the_golden_fixtures(tmp_path):
    """Inductor for real: the compiled stream step against the original implementation's numbers,
    at the fixtures' own tolerance, each stream checked against eager at its first compiled call;
    then `bench` compares eager and compiled in one run."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1",
           "ATEN_CPU_CAPABILITY": "default"}
    result = run_cli("check-reference", *FIXTURES, "--accelerate", "compile", timeout=3600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    verdicts = [ln for ln in result.stdout.splitlines() if re.match(r"\d+/\d+ frames match", ln)]
    assert [v.split(" ")[0] for v in verdicts] == [f"{n}/{n}" for n in FIXTURES.values()], verdicts
    for line in verdicts:
        assert "stream step compile;" in line and "compiled stream step matched eager" in line, line
    starts = [ln for ln in result.stderr.splitlines() if ln.startswith("compiling the stream step for")]
    assert len(starts) == 3 and "warning" not in result.stderr  # once per fixture (progress lines come between)

    bench = run_cli("bench", "--model", "tiny", "--accelerate", "off,compile", "--frames", "16",
                    "--json", tmp_path / "bench.json", timeout=1800, env=env)
    assert bench.returncode == 0, bench.stderr[-2000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    assert set(record["modes"]) == {"off", "compile"}
    assert record["modes"]["compile"]["in_use"] == "compile"
    assert all(m["median"] > 0 for m in record["modes"].values())
