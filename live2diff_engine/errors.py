"""Errors a user can act on.

Anything raised as a :class:`UserError` reaches the terminal as one line (what is wrong and how to
fix it) and a non-zero exit status, never as a traceback. Its text goes through :func:`one_line`
here, the one place an error becomes a line: whatever a file name, a file or a library put in it,
no terminal escape sequence or control character reaches the terminal, a log or an API reply.
"""

import re

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), other two-byte escapes, and 8-bit CSI.
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -/]*[0-~])?|\x9b[0-?]*[ -/]*[@-~]")
_BREAKS = re.compile("\\s*[\r\n\t\v\f\x85\u2028\u2029]+\\s*")
# C0 and C1 controls, DEL, zero-width and bidirectional formatting characters.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def one_line(text: object) -> str:
    """Text fit for an error line: escape sequences and control characters removed, line breaks
    and tabs folded into one space."""
    text = _ESCAPES.sub("", str(text))
    return _CONTROLS.sub("", _BREAKS.sub(" ", text)).strip()


class UserError(Exception):
    """A problem with the user's input, files or settings; the message says how to fix it."""

    exit_code = 2

    def __init__(self, message: object = "", *args) -> None:
        super().__init__(one_line(message), *args)


class ModelLoadError(UserError):
    """A model file is missing, unreadable, or does not fit the model being built."""


class ConfigError(UserError):
    """A setting is out of range or inconsistent with the model."""


class DeviceLost(UserError):
    """The GPU hit an error its CUDA context cannot recover from (an illegal address, a device-side
    assert, a launch failure): every later call on it fails too, so the engine stops."""

    exit_code = 3


# cudaGetErrorString's texts for the "sticky" errors: after one of these the CUDA context is
# corrupt and every later call in the process fails with the same error (CUDA runtime API docs).
_STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "misaligned address",
    "operation not supported on global/shared address space",
    "invalid program counter",
    "the launch timed out and was terminated",
    "uncorrectable ecc error encountered",
    "hardware stack error",
)


def device_failure(exc: BaseException) -> str | None:
    """What a GPU error is, so that nothing takes it for a compiler's failure: ``"oom"`` (out of
    device memory: the caller may free memory or stop with advice), ``"lost"`` (a sticky CUDA
    error: the context is dead, stop), or None (not a device failure). Follows the chain of causes
    (a compiler wraps what its kernels raised)."""
    seen = 0
    while exc is not None and seen < 8:
        try:
            import torch

            if isinstance(exc, torch.OutOfMemoryError):
                return "oom"
        except Exception:  # torch not importable: judge by the text alone
            pass
        text = str(exc).lower()
        if "out of memory" in text and ("cuda" in text or "hip" in text or "device" in text):
            return "oom"
        if any(s in text for s in _STICKY_CUDA_ERRORS):
            return "lost"
        exc, seen = getattr(exc, "inner_exception", None) or exc.__cause__, seen + 1
    return None
