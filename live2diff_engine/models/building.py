"""Building modules cheaply, for the loaders and the random-weight models alike: parameters on
the meta device while a module is constructed (no memory, no init that a checkpoint overwrites),
and the byte-level CLIP vocabulary of the random-weight text encoders."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def parameters_on_meta():
    """Construct modules with every parameter on the meta device (no memory, no init cost) while
    buffers are made for real: positional tables and index buffers keep their computed values."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def byte_vocab() -> dict[str, int]:
    """A CLIP-style byte-level vocabulary without merges (514 tokens): real tokenizer code, tiny table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}
