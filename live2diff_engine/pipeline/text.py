"""Prompt to text conditioning: CLIP tokens, optional clip skip, per-style templates."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def apply_template(template: str | None, prompt: str) -> str:
    """A style's template holds ``{}`` where the user's prompt goes."""
    if not template:
        return prompt
    if "{}" not in template:
        raise ConfigError(f"prompt template {template!r} has no {{}}: put {{}} where the prompt goes, e.g. 'pixar style, {{}}'")
    return template.replace("{}", prompt)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str, clip_skip: int = 1) -> torch.Tensor:
    """``[1, 77, dim]`` embeddings. ``clip_skip`` counts as in the popular SD UIs and on model pages:
    1 uses the last layer, 2 the one before it (then CLIP's final layer norm), and so on."""
    if clip_skip < 1:
        raise ConfigError(f"clip_skip must be 1 or more (1 = last layer), got {clip_skip}")
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ConfigError(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers")
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    if clip_skip == 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)  # transformers 5 has no text_model
