"""Prompt blends and transitions as plain data (no torch: the command schema, ``ctl`` and the CLI
options check and parse them without loading a model).

A blend is a short weighted list of prompts, mixed in embedding space: ``[("a fox", 0.7),
("a wolf", 0.3)]``; its weights are normalised to sum to 1. On a command line it is written
``"a fox:0.7|a wolf:0.3"``: items separated by ``|``, each with an optional ``:WEIGHT`` at its
end (a missing weight is 1, so ``"a fox|a wolf"`` is an even mix). A prompt without ``|`` is a
plain prompt, colons and all.

A style picture (IP-Adapter) mixes in beside the text with its own weight, the style image scale:
checked here too (:func:`check_image_scale`), for the same reason.
"""

from __future__ import annotations

import math
import re

MAX_BLEND_ITEMS = 4
MAX_TRANSITION_S = 10.0
_WEIGHT = re.compile(r"^(.*):\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$", re.S)


class BlendError(ValueError):
    """A blend or transition that cannot be used; the message says why, in one line."""


def check_transition(value, name: str = "transition_s") -> float:
    """Seconds, 0 to :data:`MAX_TRANSITION_S` (0: the change is immediate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BlendError(f"{name} must be a number of seconds, got {value!r:.40}")
    if not 0.0 <= value <= MAX_TRANSITION_S:
        raise BlendError(f"{name} must be 0 to {MAX_TRANSITION_S:g} seconds, got {value:g}")
    return float(value)


# 1 is the IP-Adapter as trained; 2 leaves room to push a weak picture, beyond it the picture's
# tokens swamp the text and the frame.
MAX_IMAGE_SCALE = 2.0


def check_image_scale(value, name: str = "scale") -> float:
    """A style image scale, 0 (the picture does nothing) to :data:`MAX_IMAGE_SCALE`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BlendError(f"{name} must be a number, got {value!r:.40}")
    if not 0.0 <= value <= MAX_IMAGE_SCALE:
        raise BlendError(f"{name} must be 0 to {MAX_IMAGE_SCALE:g} (1: as the IP-Adapter was trained), got {value:g}")
    return float(value)


def normalise(items) -> list[tuple[str, float]]:
    """[(text, weight)] with positive finite weights summing to 1; at most :data:`MAX_BLEND_ITEMS`."""
    items = list(items)
    if not items:
        raise BlendError("a prompt blend needs at least one prompt")
    if len(items) > MAX_BLEND_ITEMS:
        raise BlendError(f"a prompt blend takes at most {MAX_BLEND_ITEMS} prompts, got {len(items)}")
    out = []
    for text, weight in items:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise BlendError(f"a blend weight must be a number of 0 or more, got {weight!r:.40}")
        out.append((text, float(weight)))
    total = math.fsum(w for _, w in out)
    if total <= 0:
        raise BlendError("a prompt blend's weights add up to 0: give at least one a weight above 0")
    return [(t, w / total) for t, w in out]


def parse_notation(text: str) -> str | list[tuple[str, float]]:
    """``"a:0.7|b:0.3"`` -> normalised [("a", 0.7), ("b", 0.3)]; a text without ``|`` comes back as it is."""
    if "|" not in text:
        return text
    items = []
    for part in text.split("|"):
        m = _WEIGHT.match(part)
        prompt, weight = (m.group(1), float(m.group(2))) if m else (part, 1.0)
        items.append((prompt.strip(), weight))
    return normalise(items)


def format_notation(prompt: str | list[tuple[str, float]]) -> str:
    """A prompt or blend as one line, the notation :func:`parse_notation` reads back."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0][0]
    return "|".join(f"{t}:{w:.4g}" for t, w in prompt)
