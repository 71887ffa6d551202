"""torch's thread count: chosen for the machine, said at start, and --threads overrides."""

import pytest

from conftest import run_cli
from live2diff_engine.errors import ConfigError
from live2diff_engine.threads import choose_threads, parse_threads


def test_auto_leaves_one_cpu_for_the_rest_of_the_machine_and_few_beside_a_gpu():
    no_env = {}
    assert choose_threads("cpu", cpus=2, env=no_env)[0] == 1
    assert choose_threads("cpu", cpus=1, env=no_env)[0] == 1
    assert choose_threads("cpu", cpus=16, env=no_env)[0] == 15
    assert choose_threads("cpu", cpus=16, torch_default=8, env=no_env)[0] == 8  # never more than torch's own choice
    assert choose_threads("cuda", cpus=16, env=no_env)[0] == 2
    assert choose_threads("cuda", cpus=2, env=no_env)[0] == 1
    assert choose_threads("mps", cpus=8, env=no_env)[0] == 2


def test_threads_given_or_in_the_environment_win():
    assert choose_threads("cpu", 3, cpus=2, env={"OMP_NUM_THREADS": "1"}) == (3, "--threads")
    assert choose_threads("cpu", cpus=8, env={"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert choose_threads("cpu", cpus=8, env={"OMP_NUM_THREADS": "nonsense"})[0] == 7
    assert parse_threads("auto") is None and parse_threads("4") == 4
    for bad in ("0", "-1", "two"):
        with pytest.raises(ConfigError):
            parse_threads(bad)


def test_run_says_its_thread_count_once_and_threads_overrides_it():
    r = run_cli("run", "--model", "tiny", "--source", "synthetic", "--camera-size", "64x64", "--sink", "null", "--no-api",
                "--max-frames", "2", "--threads", "1")  # over the tests' OMP_NUM_THREADS=1
    assert r.returncode == 0, r.stderr
    said = [l for l in r.stderr.splitlines() if l.startswith("torch threads:")]
    assert said == ["torch threads: 1 (--threads)"], r.stderr
    bad = run_cli("bench", "--model", "tiny", "--threads", "0")
    assert bad.returncode == 2 and "--threads" in bad.stderr and "at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_threads_measures_each_choice_in_a_process_of_its_own(tmp_path):
    import json

    out = tmp_path / "threads.json"
    # No busy process here: two threads beside one take seconds a frame on a busy 2-core machine.
    r = run_cli("bench-threads", "--model", "tiny", "--choices", "1,2,auto", "--frames", "3", "--rounds", "1", "--hogs", "0",
                "--json", out, timeout=600)
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    assert figures["hogs"] == 0 and not figures["failures"]
    labels = list(figures["choices"])
    assert labels[:2] == ["1", "2"] and labels[2].startswith("auto (")
    assert figures["choices"]["1"]["threads"] == 1 and figures["choices"]["2"]["threads"] == 2
    for label in labels:
        assert len(figures["per_frame_ms"][label]) == 3 and all(ms > 0 for ms in figures["per_frame_ms"][label])
        assert figures["choices"][label]["worst_ms"] >= figures["choices"][label]["median_ms"]
    assert "worst" in r.stdout and "0 busy process" in r.stdout
