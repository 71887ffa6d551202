"""Inductor for real on the golden fixture: the compiled kernels against the original
implementation's numbers, then `bench` comparing eager and compiled in one run. It compiles the
tiny model's stream step with inductor's C++ backend, which takes minutes on a CPU; the two runs
share an inductor cache folder, as a user's runs do, so the second reuses the first's kernels."""

import json

from conftest import FIXTURE_A, run_cli


def test_compiled_kernels_reproduce_the_golden_fixture(tmp_path):
    """Inductor for real: the compiled stream step against the original implementation's numbers,
    at the fixture's own tolerance; then `bench` compares eager and compiled in one run, reusing
    the compiled code from the cache folder."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
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
