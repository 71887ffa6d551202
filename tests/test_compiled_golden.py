"""Inductor for real on the golden fixture: the compiled kernels against the original
implementation's numbers, then `bench` comparing eager and compiled in one run. It compiles the
tiny models' stream steps with inductor's C++ backend, which takes minutes of CPU.

Both compiles run with ATEN_CPU_CAPABILITY=default: inductor then writes plain C++ loops instead of
AVX ones for the same lowered graph. What this test guards is the engine's side (the whole stream
call traced in one graph, its in-place buffer and KV-cache writes lowered correctly, `bench`
comparing modes in one run); the vector code generator is torch's own and tested there. `bench
--model tiny` has the fixture's geometry (same UNet config, latent 8x8, steps 32,45), so with the
same cache folder its compile finds the fixture's kernels in inductor's cache and only traces.
Measured on a 2-core box: fixture compile 137-190 s plain instead of 202 s with AVX; the bench
compile 27 s from the cache instead of 100-285 s with AVX into an empty one."""

import json

from conftest import FIXTURE_A, run_cli


def test_compiled_kernels_reproduce_the_golden_fixture(tmp_path):
    """Inductor for real: the compiled stream step against the original implementation's numbers,
    at the fixture's own tolerance; then `bench` compares eager and compiled in one run."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1",
           "ATEN_CPU_CAPABILITY": "default"}
    result = run_cli("check-reference", FIXTURE_A, "--accelerate", "compile", timeout=1800, env=env)
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert last.startswith("24/24 frames match") and "stream step compile" in last, last
    assert "compiling the stream step" in result.stderr and "warning" not in result.stderr

    bench = run_cli("bench", "--model", "tiny", "--accelerate", "off,compile", "--frames", "16",
                    "--json", tmp_path / "bench.json", timeout=1800, env=env)
    assert bench.returncode == 0, bench.stderr[-2000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    assert set(record["modes"]) == {"off", "compile"}
    assert record["modes"]["compile"]["in_use"] == "compile"
    assert all(m["median"] > 0 for m in record["modes"].values())
