"""The tests' way of running the command line (conftest.run_cli through tests/cli_server.py) gives
what a fresh interpreter gives: exit status, stdout and stderr, the environment and folder of the
call, and a timeout that ends the run."""

import os
import subprocess

import cli_server

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


def test_a_spawned_run_is_a_process_to_read_signal_and_wait_for(tmp_path):
    """spawn_cli (Popen's way: the caller reads the run while it runs) through the server: the
    run's stderr arrives line by line while it runs, a signal reaches the run itself, and its exit
    status is the run's; the same run started fresh behaves the same."""
    import signal
    import time

    from conftest import ForkedProcess, spawn_cli

    server = _CliServer.get()
    assert server is not None, "the server did not start"
    for fresh in (False, True):
        out = tmp_path / f"out{int(fresh)}.mp4"
        proc = spawn_cli("run", "--model", "tiny", "--source", "synthetic", "--camera-size", "64x48", "--sink", "null",
                         "--sink", f"file:{out}", "--no-api", fresh=fresh)
        # Forked unless this process's environment now differs in what is read while importing
        # (an earlier test in this worker may have set one, e.g. inductor's cache folder).
        same = server.import_env == cli_server.import_time_env(dict(os.environ))
        assert isinstance(proc, ForkedProcess) == (same and not fresh)
        assert proc.poll() is None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "[streaming]" in line:
                break
        assert any("[streaming]" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(lines) + (rest or "")
        assert out.is_file() and out.stat().st_size > 0

    # A run that ignores nothing is ended by SIGKILL with the status a fresh process gets.
    proc = spawn_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "null", "--no-api",
                     stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL
    # stdout as a pipe too, and a wait that runs out raises as Popen's does.
    proc = spawn_cli("--version", stdout=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() and "Traceback" not in err
    slow = spawn_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "null", "--no-api")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            slow.wait(0.5)
    finally:
        slow.kill()
        slow.wait(60)
