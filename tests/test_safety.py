"""Nothing the engine reads can run code: pickles only with weights_only=True, safetensors first."""

import re
from pathlib import Path

from conftest import ROOT


def test_every_torch_load_is_weights_only():
    calls = []
    for path in (ROOT / "live2diff_engine").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth:  # up to the call's own closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((path.name, text[m.start() : end]))
    assert calls, "expected the loaders to read pickles somewhere"
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


def test_default_downloads_fetch_safetensors_not_pickles():
    from live2diff_engine.models.hub import MODELS

    for spec in MODELS.values():
        files = list(spec.allow_patterns) + ([spec.filename] if spec.filename else [])
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files), spec.name
        if spec.name != "live2diff":  # the motion checkpoint is only published as a pickle
            assert not any(f.endswith(".ckpt") for f in files), spec.name
