"""Reading weight files and configs: a UNet's config.json, and a checkpoint (safetensors, or a
torch pickle read with ``weights_only=True``: a checkpoint cannot run code, and one that names
other Python objects is refused as such, its opcodes read, never run). Every failure is one
:class:`ModelLoadError` line that names the file and what to do. The loaders (`loading`,
`single_file`, `components`) and the styles read through here."""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings
from pathlib import Path

import torch

from ..errors import ModelLoadError

_SHOW = 5  # how many offending keys an error message names


def _first(names, n: int = _SHOW) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def read_unet_config(folder: Path) -> dict:
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {exc}; re-download the base model") from None
    if not isinstance(config, dict) or "block_out_channels" not in config:
        raise ModelLoadError(f"{folder / 'config.json'} is not a diffusers UNet config (no block_out_channels)")
    return config


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's business
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # corrupt, truncated, or a pickle that wants to run code
        objects = _pickled_objects(path) if suffix != ".safetensors" else []
        if objects:
            raise ModelLoadError(
                f"refused checkpoint {path}: the file holds Python objects besides tensors ({_first(objects, 3)}), "
                "and loading it could run code; get a .safetensors version of it"
            ) from None
        # torch's own words for a pickle it refuses say how to load it anyway: not for this line.
        reason = "" if isinstance(exc, pickle.UnpicklingError) else _first_sentence(exc)
        raise ModelLoadError(
            f"cannot read checkpoint {path}: {reason + '; ' if reason else ''}the file is damaged or not a checkpoint, download it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ModelLoadError(f"checkpoint {path} holds no state dict; expected a mapping of tensor names to tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelLoadError(f"checkpoint {path} has entries that are not tensors: {_first(map(str, bad))}")
    return obj


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0].split(". ")[0] if text else type(exc).__name__)[:160]


# What torch's weights-only unpickler takes besides torch's own names: a file naming only these
# and still refused is damaged, not dangerous.
_PLAIN_GLOBALS = {"collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                  "builtins.bytearray", "builtins.slice", "builtins.complex"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GLOBAL_NAME = re.compile(r"[A-Za-z_][\w.]{0,99}")


def _pickled_objects(path: Path) -> list[str]:
    """The Python names (module.attr) a checkpoint's pickle would call besides torch's, found by
    reading its opcodes without running any; [] when it names none or is not a well-formed pickle."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):  # torch.save's format: the pickle is <name>/data.pkl
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
                streams = [io.BytesIO(z.read(pkl[0]))] if pkl else []
        else:
            streams = [open(path, "rb")]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: set[str] = set()
    for f in streams:
        with f:
            for _ in range(8):  # the legacy format is several pickles in a row, then raw storage bytes
                names: set[str] = set()
                memo: dict = {}
                top: list = [None, None]  # the last two values pushed, where they are strings
                try:
                    for op, arg, _pos in pickletools.genops(f):
                        name = op.name
                        if name in ("GLOBAL", "INST"):
                            names.add(str(arg).replace(" ", ".", 1))
                        elif name == "STACK_GLOBAL":
                            if isinstance(top[0], str) and isinstance(top[1], str):
                                names.add(f"{top[0]}.{top[1]}")
                        if name in _STRING_OPS:
                            top = [top[1], str(arg)]
                        elif name == "MEMOIZE":
                            memo[len(memo)] = top[1]
                        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                            memo[arg] = top[1]
                        elif name in ("GET", "BINGET", "LONG_BINGET"):
                            top = [top[1], memo.get(arg)]
                        elif name not in ("FRAME", "PROTO"):
                            top = [top[1], None]
                except Exception:  # not (or no longer) a pickle: what came before still counts
                    break
                found |= names
    return sorted(n for n in found
                  if _GLOBAL_NAME.fullmatch(n) and not n.startswith("torch.") and n not in _PLAIN_GLOBALS)
