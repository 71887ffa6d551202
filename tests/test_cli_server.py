"""The tests' way of running the command line (conftest.run_cli through tests/cli_server.py) gives
what a fresh interpreter gives: exit status, stdout and stderr, the environment and folder of the
call, and a timeout that ends the run."""

import subprocess

import pytest

from conftest import FIXTURE_A, _CliServer, run_cli


def test_a_forked_run_gives_what_a_fresh_interpreter_gives(tmp_path):
    assert _CliServer.get() is not None, "the server did not start"
    for args in (["--version"], ["check-reference", FIXTURE_A, "--rtol", "-1"], ["styles", "--no-such-option"]):
        forked, fresh = run_cli(*args), run_cli(*args, fresh=True)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr), args
    assert run_cli("check-reference", FIXTURE_A, "--rtol", "-1").returncode == 2


def test_a_forked_run_reads_the_environment_and_an_import_time_variable_gets_a_fresh_interpreter(tmp_path):
    home = tmp_path / "home"
    r = run_cli("styles", "path", env={"LIVE2DIFF_HOME": str(home)})  # read at run time: forked
    assert r.returncode == 0 and str(home) in r.stdout, r.stdout + r.stderr
    server = _CliServer.get()
    runs = server.runs
    r = run_cli("--version", env={"HF_HUB_OFFLINE": "1"})  # read while importing: a fresh interpreter
    assert r.returncode == 0 and server.runs == runs


def test_a_forked_run_that_runs_past_its_timeout_is_ended():
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "null", "--no-api", timeout=3)
