"""Few-step LCM schedule for the stream: which timesteps, and the per-step scalars.

The timesteps come from diffusers' ``LCMScheduler`` (built from SD1.5's DDIM settings, as the
original does), picked either by a ``t_index_list`` (indices into the full schedule, noisiest
first) or by a ``strength`` (the last ``int(steps * strength)`` timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:  # torch and diffusers load with the first schedule, not with this module
    import torch
    from diffusers import LCMScheduler

# The LCM distillation schedule's length (LCMScheduler's original_inference_steps): with the
# default scheduler, num_inference_steps 1..50 give that many timesteps.
LCM_ORIGINAL_STEPS = 50

# SD1.5's training noise schedule, as in Live2Diff's configs/base_config.yaml.
SD15_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class StreamSchedule:
    """Per denoising step ``i`` (noisiest first): timestep, sqrt(alpha_bar), sqrt(1 - alpha_bar),
    and LCM's boundary-condition scalings ``c_skip``, ``c_out``. Tensors are 1-D of length T."""

    timesteps: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    t_index_list: tuple[int, ...]
    num_inference_steps: int

    @property
    def steps(self) -> int:
        return len(self.t_index_list)


def make_scheduler(config: dict | None = None) -> LCMScheduler:
    """An LCMScheduler configured like the original (from the DDIM noise settings, or a saved config)."""
    from diffusers import DDIMScheduler, LCMScheduler

    if config is None:
        return LCMScheduler.from_config(DDIMScheduler(**SD15_NOISE_SCHEDULE).config)
    return LCMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def make_schedule(
    num_inference_steps: int = 50,
    t_index_list: list[int] | tuple[int, ...] | None = None,
    strength: float | None = None,
    scheduler_config: dict | None = None,
) -> StreamSchedule:
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    import torch

    scheduler = make_scheduler(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    all_steps = scheduler.timesteps
    picked = pick_steps(len(all_steps), num_inference_steps, t_index_list, strength)
    timesteps = torch.stack([all_steps[i] for i in picked]).long()
    acp = scheduler.alphas_cumprod
    alpha = torch.stack([acp[t].sqrt() for t in timesteps])
    beta = torch.stack([(1 - acp[t]).sqrt() for t in timesteps])
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
    c_skip = torch.stack([torch.as_tensor(s[0]) for s in scalings]).float()
    c_out = torch.stack([torch.as_tensor(s[1]) for s in scalings]).float()
    return StreamSchedule(timesteps, alpha, beta, c_skip, c_out, tuple(picked), num_inference_steps)


def pick_steps(n: int, num_inference_steps: int, t_index_list=None, strength: float | None = None) -> list[int]:
    """The indices into a schedule of ``n`` timesteps that ``t_index_list`` or ``strength`` pick;
    a setting that picks none, or indices out of range, is a ConfigError."""
    if (t_index_list is None) == (strength is None):
        raise ConfigError("give exactly one of t_index_list (e.g. 32,45) or strength (e.g. 0.4)")
    if strength is not None:
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {strength}")
        start = max(n - min(int(num_inference_steps * strength), n), 0)
        picked = list(range(start, n))
        if not picked:
            raise ConfigError(
                f"strength {strength} with {num_inference_steps} inference steps selects no step; raise either one"
            )
        return picked
    picked = [int(i) for i in t_index_list]
    if not picked:
        raise ConfigError("t_index_list is empty; give at least one index, e.g. 32,45")
    bad = [i for i in picked if not 0 <= i < n]
    if bad:
        raise ConfigError(
            f"t_index_list {picked} is out of range: indices must be 0..{n - 1} for {num_inference_steps} inference steps"
        )
    if any(b <= a for a, b in zip(picked, picked[1:])):
        raise ConfigError(f"t_index_list {picked} must be strictly increasing (noisiest step first)")
    return picked


def check_schedule(num_inference_steps: int = 50, t_index_list=None, strength: float | None = None) -> None:
    """What ``make_schedule`` refuses with the default scheduler, without building it (no torch,
    no diffusers: `styles list` checks every style this way)."""
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if num_inference_steps > LCM_ORIGINAL_STEPS:
        raise ConfigError(f"num_inference_steps must be at most {LCM_ORIGINAL_STEPS} (the LCM schedule's length), "
                          f"got {num_inference_steps}")
    pick_steps(num_inference_steps, num_inference_steps, t_index_list, strength)


# -- the live controls' schedule: what `strength` and `steps` (dock, ctl, OBS) pick -------------

LIVE_SCHEDULE_STEPS = 50  # the LCM schedule the live strength/steps controls index into
LAST_STEP = 45  # the original's last denoising index at 50 steps


def live_t_index(strength: float, steps: int, n: int = LIVE_SCHEDULE_STEPS) -> list[int]:
    """Timestep indices for a live strength (how much of the picture is re-imagined: how far into
    the noise the first step starts) and a number of steps (speed). strength 0.36 with 2 steps is
    the original's default [32, 45]; 0.1 with 1 step its [45]."""
    first = min(max(round(n * (1.0 - strength)), 0), n - steps)
    if steps == 1:
        return [first]
    last = min(max(LAST_STEP, first + steps - 1), n - 1)
    idx = [round(first + i * (last - first) / (steps - 1)) for i in range(steps)]
    for i in range(1, steps):  # strictly increasing even where rounding meets
        idx[i] = max(idx[i], idx[i - 1] + 1)
    return idx


def live_strength(t_index_list, n: int) -> float:
    return round(1.0 - t_index_list[0] / n, 3)
