"""For tests/test_gpu_check.py's rehearsal of tests/gpu_check.sh (on PYTHONPATH there, and nowhere
else): with GPU_CHECK_NO_COMPILE=1, ``torch.compile`` hands back the function it is given. The
rehearsal checks the script (its steps, time shares, statuses and outputs), not a compiler: on a
2-core CI machine inductor takes minutes to compile even the tiny model, and the compiled paths
have tests of their own (tests/test_accelerate.py, tests/test_compiled_golden.py)."""

import os

if os.environ.get("GPU_CHECK_NO_COMPILE") == "1":
    import torch

    def _no_compile(model=None, **kwargs):
        if model is None:  # used as a decorator factory
            return lambda fn: fn
        return model

    torch.compile = _no_compile
