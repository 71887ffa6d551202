"""Building modules cheaply, for the loaders and the random-weight models alike: parameters on
the meta device while a module is constructed (no memory, no init that a checkpoint overwrites),
the byte-level CLIP vocabulary of the random-weight text encoders, and CLIP's tokenizer
from a vocabulary held in memory (the same on transformers 4 and 5)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

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


def byte_characters() -> list[str]:
    """CLIP's 256 byte characters in its order: the printable bytes stand for themselves, the others
    are mapped past 255 (so a BPE over text never meets a control or space character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def byte_vocab() -> dict[str, int]:
    """A CLIP-style byte-level vocabulary without merges (514 tokens): real tokenizer code, tiny table."""
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def clip_tokenizer(vocab: dict[str, int], merges, model_max_length: int = 77):
    """transformers' ``CLIPTokenizer`` from a vocabulary and BPE merges (pairs) held in memory.

    transformers 5 takes them as they are (``vocab=``, ``merges=``; it ignores ``vocab_file=``). transformers 4,
    the last line for torch < 2.6 (Intel Macs have torch 2.2.2), reads them only from files
    (``vocab_file``, ``merges_file``): they are written to a temporary folder, read once in the constructor, and
    the folder is removed. Either way the ids are CLIP's (the same BPE, regex split and lower-casing)."""
    import inspect

    from transformers import CLIPTokenizer

    if "vocab_file" not in inspect.signature(CLIPTokenizer.__init__).parameters:
        return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges], model_max_length=model_max_length)
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="l2d-clip-tokenizer-") as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(dict(vocab), ensure_ascii=False), encoding="utf-8")
        # Its reader skips the first line (the "#version" header of CLIP's merges.txt).
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), model_max_length=model_max_length)
