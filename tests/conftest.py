import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# One torch thread in the tests and in every process they start: on a busy 2-core machine torch's
# default two OpenMP threads wait seconds at each barrier for a core another process holds (the
# oversubscription in BENCHMARKS.md), and the tiny models gain nothing from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The engine's own folder (LIVE2DIFF_HOME: config, styles file, downloaded styles, the settings a
# run leaves for the next): never the user's real one, and empty for each test (below), so that
# what one test's engine saved never becomes the next test's starting point.
os.environ["LIVE2DIFF_HOME"] = tempfile.mkdtemp(prefix="l2d-tests-home-")
atexit.register(shutil.rmtree, os.environ["LIVE2DIFF_HOME"], True)


@pytest.fixture(autouse=True)
def _own_live2diff_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LIVE2DIFF_HOME", str(tmp_path_factory.mktemp("l2d_home")))

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
FIXTURE_A = GOLDEN / "live2diff_tiny_a"  # the shared golden fixture (its .ckpt copy is rebuilt by tests)


# The files that take longest, longest first (minutes each on a 2-core CI box: inductor's C++
# compile, a real install, the soak, the webcam sizes). They run first, so that with two workers
# (`-n 2 --dist loadfile`, README) the short files fill in beside them instead of one worker
# finishing a long file alone at the end; a plain run keeps the same order.
LONG_FILES_FIRST = ("test_compiled_golden.py", "test_install_script.py", "test_accelerate.py", "test_sizes.py",
                    "test_engine.py", "test_reference.py", "test_control.py", "test_obs_real.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(*args, timeout=300, env=None):
    """Run the installed command line in a subprocess; returns CompletedProcess (text). ``env``
    adds to (or overrides) this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "live2diff_engine", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture
def fixture_copy(tmp_path):
    """A writable copy of the golden fixture."""
    dst = tmp_path / "fixture"
    shutil.copytree(FIXTURE_A, dst)
    return dst
