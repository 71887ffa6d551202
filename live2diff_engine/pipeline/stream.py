"""The latent-level stream: warmup, then one batched UNet call per incoming frame.

With ``T`` denoising steps, each call carries ``T`` frames: the newest at the noisiest step (row
0), and the frame that arrived ``k`` calls earlier at step ``k`` (row ``k``). Every call finishes
the frame in row ``T - 1``, so an output lags its input by ``T - 1`` calls; the first ``T - 1``
outputs are placeholders that come from the zero buffers the stream starts with (exactly as in the
original).

Everything a call touches is allocated in :meth:`StreamPipeline.prepare`: the latent and depth
batches, the prompt batch, the scalars, the KV-cache of every temporal layer and the bookkeeping
table. A call writes into those buffers; its cost does not depend on how long the stream has run.
With classifier-free guidance (a scale above 1) the batch and the cache rows double: rows
``T..2T-1`` carry the same frames with the negative prompt's text.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..models.motion import SequenceContext
from ..models.unet import StreamingUNet
from .accelerate import accelerator_for
from .bookkeeping import Bookkeeping
from .schedule import StreamSchedule


def warmup_causal_mask(num_frames: int, sink: int, device=None) -> torch.Tensor:
    """Additive mask for a clip of ``sink`` warmup frames followed by streamed frames: the warmup
    frames see each other; every later frame sees the warmup frames, its predecessors and itself."""
    i = torch.arange(num_frames, device=device)
    allowed = (i[None, :] < sink) | ((i[:, None] >= sink) & (i[None, :] <= i[:, None]))
    return torch.zeros(num_frames, num_frames, device=device).masked_fill(~allowed, float("-inf"))


def ease(x: float) -> float:
    """Smoothstep: 0 at 0, 1 at 1, rising monotonically, with no kink at either end (the look
    starts and stops moving gently rather than at full speed)."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


class _Fade:
    """A branch's text on its way from ``start`` (the rows as they were when the change came) to
    the branch's target, over ``frames`` stream calls; ``done`` calls made so far.

    The interpolation is linear in embedding space (``torch.lerp``), with the weight eased by
    :func:`ease`. Linear because the UNet's cross attention takes its keys and values from the
    text by linear maps: a linear path between two embeddings is a linear path between their
    keys and values, it ends exactly on the new prompt, and it is the same operation as a weighted
    blend, so a transition between two blends is a blend at every frame. (Spherical interpolation
    keeps norms, which matters for Gaussian noise, see :func:`blend_noise`; CLIP's output tokens
    come out of a final layer norm, so their norms differ little and a lerp shrinks them little.)"""

    __slots__ = ("start", "frames", "done")

    def __init__(self, start, frames: int, done: int = 0):
        self.start, self.frames, self.done = start, max(int(frames), 1), done

    def weight(self) -> float:
        return ease((self.done + 1) / self.frames)


class _SeedFade(_Fade):
    """The old seed's generator (kept in ``start``), fading out over ``frames`` calls."""

    __slots__ = ()

    @property
    def generator(self) -> torch.Generator:
        return self.start


def blend_noise(a: torch.Tensor, b: torch.Tensor, w: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian noise ``a`` moved towards ``b`` by ``w`` (0: ``a``, 1: ``b``) along the quarter
    circle ``cos(w pi/2) a + sin(w pi/2) b``: for independent standard normal draws the mix is
    standard normal too (its variance is cos^2 + sin^2 = 1), where a linear mix would shrink it by
    up to half at the midpoint. The result is then scaled to the norm ``(1 - w)|a| + w|b|``, so its
    norm moves from the one to the other exactly. On the device, no host synchronisation; ``out``
    may be ``b``."""
    theta = w * math.pi / 2
    c, s = math.cos(theta), math.sin(theta)
    na, nb = torch.linalg.vector_norm(a.float()), torch.linalg.vector_norm(b.float())
    want = (1.0 - w) * na + w * nb
    mixed = a * c + b * s
    have = torch.linalg.vector_norm(mixed.float())
    scale = torch.where(have > 0, want / have.clamp_min(1e-30), torch.ones_like(have)).to(mixed.dtype)
    if out is None:
        return mixed.mul_(scale)
    return torch.mul(mixed, scale, out=out)


class StreamPipeline:
    """Streaming Live2Diff denoiser at latent level.

    ``prepare`` runs the warmup; ``step`` takes one noisy frame latent (``[1, 4, h, w]``) and its
    depth latent and returns the latent it finishes. Noise can be injected everywhere it is drawn,
    which is how the golden fixtures are replayed; otherwise it comes from ``generator``.
    """

    def __init__(
        self,
        unet: StreamingUNet,
        schedule: StreamSchedule,
        latent_size: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        accelerate: str = "off",
        accelerator_options: dict | None = None,
    ):
        if guidance_scale < 1.0:
            raise ConfigError(f"guidance scale must be at least 1 (1: no guidance), got {guidance_scale}")
        self.unet = unet
        # Classifier-free guidance (above 1) runs an unconditional branch (the negative prompt)
        # beside every row: the batch and the cache rows double, rows T..2T-1 are that branch.
        self.guidance_scale = float(guidance_scale)
        self.branches = 2 if self.guidance_scale > 1.0 else 1
        self.schedule = schedule
        self.device = unet.device
        self.dtype = unet.dtype
        self.height, self.width = latent_size
        cfg = unet.motion_config
        self.window, self.sink = cfg.window_size, cfg.sink_size
        self.steps = schedule.steps
        if self.steps > self.window - self.sink:
            raise ConfigError(f"{self.steps} denoising steps do not fit a cache window of {self.window} with {self.sink} sink frames")
        self.generator = generator
        self.calls = 0
        self._prepared = False
        # Resolved before any allocation: a bad mode is one line, not a half-built stream.
        self._accel = accelerator_for(unet, accelerate, **(accelerator_options or {}))

        dev, dt, T = self.device, self.dtype, self.steps

        def col(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=dev, dtype=dt).view(T, 1, 1, 1)

        # Every input of the stream call lives in a buffer allocated here (the text buffer at the
        # first prompt) and is updated in place, so a compiled or captured call can replay it.
        self.timesteps = schedule.timesteps.to(dev)
        self.alpha, self.beta = col(schedule.alpha), col(schedule.beta)
        self.c_skip, self.c_out = col(schedule.c_skip), col(schedule.c_out)
        self.bookkeeping = Bookkeeping(T, self.window, self.sink, device=dev, branches=self.branches)
        self._tables = self.bookkeeping.tables()
        self._row = torch.zeros(1, dtype=torch.long, device=dev)  # which bookkeeping row this call uses
        self._latents = torch.zeros(T, 4, self.height, self.width, device=dev, dtype=dt)
        self._depth = torch.zeros_like(self._latents)
        self._noise = torch.zeros(max(T - 1, 0), 4, self.height, self.width, device=dev, dtype=dt)
        # The call writes the rows that move on into the carry; step() moves them (and the depth
        # rows, through _depth_prev) into place after it, so the call never copies a buffer onto
        # itself (see accelerate.stream_call).
        self._carry = torch.zeros_like(self._noise)
        self._depth_prev = torch.zeros_like(self._noise)
        self._guidance = torch.tensor(self.guidance_scale, device=dev, dtype=dt)
        self._text: torch.Tensor | None = None  # [branches * T, tokens, dim]: prompt rows, then negative rows
        self._prompt: torch.Tensor | None = None  # [1, tokens, dim] as last set
        self._negative: torch.Tensor | None = None  # [1, tokens, dim] for the unconditional branch
        # With an IP-Adapter: the image tokens, [branches * T, 1, tokens, dim] (None: no picture).
        self._image: torch.Tensor | None = None
        # A text transition per branch (0: the prompt, 1: the negative prompt), or None: see _Fade.
        self._fades: list[_Fade | None] = [None, None]
        # A seed transition: the old seed's generator, fading out over a number of calls (see fade_seed).
        self._seed_fade: _SeedFade | None = None
        self._noise_old: torch.Tensor | None = None  # the old seed's step noise, drawn beside _noise
        self.last_model_pred: torch.Tensor | None = None
        self.last_x0_batch: torch.Tensor | None = None

    @property
    def accelerator(self):
        """The UNet's :class:`~.accelerate.StreamAccelerator` (its ``wrap`` compiles other calls alike)."""
        return self._accel

    @property
    def accelerated(self) -> str:
        """The acceleration in use: off, compile or cudagraph (lower than asked after a fallback)."""
        return self._accel.mode

    # -- helpers -----------------------------------------------------------------------------

    @property
    def lag(self) -> int:
        """How many calls an output trails its input."""
        return self.steps - 1

    def output_is_placeholder(self, call: int) -> bool:
        return call < self.lag

    def randn(self, shape) -> torch.Tensor:
        noise = torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
        fade = self._seed_fade
        if fade is not None:
            old = torch.randn(shape, generator=fade.generator, device=self.device, dtype=self.dtype)
            blend_noise(old, noise, fade.weight(), out=noise)
        return noise

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise clean latents to the first (noisiest) step: ``alpha_0 * x + beta_0 * noise``."""
        clean = clean.to(device=self.device, dtype=self.dtype)
        noise = self.randn(clean.shape) if noise is None else noise.to(device=self.device, dtype=self.dtype)
        return self.alpha[0] * clean + self.beta[0] * noise

    def _x0(self, eps: torch.Tensor, x_t: torch.Tensor, alpha, beta, c_skip, c_out) -> torch.Tensor:
        return c_out * ((x_t - beta * eps) / alpha) + c_skip * x_t

    def _check(self, name: str, t: torch.Tensor, frames: int | None) -> torch.Tensor:
        want = (frames, 4, self.height, self.width)
        if t.dim() != 4 or t.shape[1:] != want[1:] or (frames is not None and t.shape[0] != frames):
            raise ConfigError(f"{name} has shape {tuple(t.shape)}, expected {tuple(s if s is not None else 'F' for s in want)}")
        return t.to(device=self.device, dtype=self.dtype)

    # -- lifecycle ---------------------------------------------------------------------------

    def _embeds(self, embeds: torch.Tensor, what: str) -> torch.Tensor:
        emb = embeds.to(device=self.device, dtype=self.dtype)
        if emb.dim() == 2:
            emb = emb.unsqueeze(0)
        if emb.dim() != 3 or emb.shape[0] != 1:
            raise ConfigError(f"{what} embeddings must have batch 1, got shape {tuple(emb.shape)}")
        return emb

    def _target(self, branch: int) -> torch.Tensor | None:
        return self._prompt if branch == 0 else self._negative

    def _write_text(self) -> None:
        T = self.steps
        if self._text is None or self._text.shape[1:] != self._prompt.shape[1:]:
            self._text = torch.zeros(self.branches * T, *self._prompt.shape[1:], device=self.device, dtype=self.dtype)
            self._fades = [None, None]  # a new buffer: nothing to move from
        if self.branches > 1 and self._negative is not None and self._negative.shape[1:] != self._prompt.shape[1:]:
            raise ConfigError(f"negative prompt embeddings {tuple(self._negative.shape)} do not match the prompt's {tuple(self._prompt.shape)}")
        for branch in range(self.branches):
            self._write_branch(branch)

    def _write_branch(self, branch: int) -> None:
        """The branch's text rows as they stand: its target, or where its transition is now. In
        place: the buffer a compiled or captured call reads stays the same tensor."""
        target, T = self._target(branch), self.steps
        if target is None:
            return
        rows = self._text[branch * T : (branch + 1) * T]
        fade = self._fades[branch]
        if fade is None:
            rows.copy_(target.expand(T, -1, -1))
        else:
            torch.lerp(fade.start.expand(T, -1, -1), target.expand(T, -1, -1), fade.weight(), out=rows)

    def _fade_to(self, branch: int, new: torch.Tensor, frames: int) -> None:
        """Set a branch's text: at once (``frames`` 0, exactly as ever), or moving there from where
        it is now over ``frames`` stream calls. A change during a transition starts from the blend
        of that moment."""
        old = self._target(branch)
        T = self.steps
        moving = (frames > 0 and old is not None and self._text is not None and old.shape == new.shape
                  and branch < self.branches)
        start = self._text[branch * T : branch * T + 1].clone() if moving else None
        if branch == 0:
            self._prompt = new
        else:
            self._negative = new
        self._fades[branch] = _Fade(start, int(frames)) if moving else None

    @property
    def in_transition(self) -> bool:
        """Whether a text or seed transition is under way."""
        return any(f is not None for f in self._fades) or self._seed_fade is not None

    def transition_progress(self) -> float | None:
        """How far the slowest transition under way has come (0 to 1), or None when none is."""
        going = [f.done / f.frames for f in (*self._fades, self._seed_fade) if f is not None]
        return min(going) if going else None

    def _advance(self) -> None:
        """One stream call on: every transition under way moves one step (between calls, never
        inside one: the call reads the buffers as they are)."""
        for branch, fade in enumerate(self._fades):
            if fade is None:
                continue
            fade.done += 1
            if fade.done >= fade.frames:
                self._fades[branch] = None
            self._write_branch(branch)
        if self._seed_fade is not None:
            self._seed_fade.done += 1
            if self._seed_fade.done >= self._seed_fade.frames:
                self._seed_fade = self._noise_old = None

    def set_prompt_embeds(self, prompt_embeds: torch.Tensor, frames: int = 0) -> None:
        """Swap the text conditioning (``[1, tokens, dim]``) between frames; no re-warmup, no
        recompile (written into the same buffer). ``frames`` > 0: move there from the text of now
        over that many stream calls (see :class:`_Fade`)."""
        self._fade_to(0, self._embeds(prompt_embeds, "prompt"), frames)
        self._write_text()

    update_prompt = set_prompt_embeds

    def set_negative_embeds(self, negative_embeds: torch.Tensor, frames: int = 0) -> None:
        """The unconditional branch's text (the negative prompt, or the empty prompt); used when the
        guidance scale is above 1. Swappable between frames like the prompt, with a transition too."""
        self._fade_to(1, self._embeds(negative_embeds, "negative prompt"), frames)
        if self._prompt is not None:
            self._write_text()

    def continue_text_from(self, other: "StreamPipeline") -> None:
        """Take over another stream's text and any transition it has under way (a re-warm makes a
        new stream: a transition goes on through it instead of jumping to its end)."""
        if other._prompt is None:
            return
        self._prompt, self._negative = other._prompt, other._negative
        self._write_text()
        if other._text is not None and other._text.shape[1:] == self._text.shape[1:]:
            self._fades = [None if f is None else _Fade(f.start, f.frames, f.done) for f in other._fades]
            for branch in range(self.branches):
                self._write_branch(branch)
        if other._seed_fade is not None:
            f = other._seed_fade
            self._seed_fade = _SeedFade(f.generator, f.frames, f.done)

    def fade_seed(self, old_generator: torch.Generator, frames: int) -> None:
        """Move the stream's noise from ``old_generator``'s draws to ``self.generator``'s over
        ``frames`` calls: every draw comes from both, mixed by :func:`blend_noise` with a weight
        that goes from 0 to 1, so the noise keeps its norm and its distribution all the way."""
        self._seed_fade = _SeedFade(old_generator, int(frames)) if frames > 0 else None
        self._noise_old = None

    def _text_batch(self) -> torch.Tensor:
        if self._text is None:
            raise ConfigError("no prompt embeddings: pass prompt_embeds to prepare() or call set_prompt_embeds() first")
        if self.branches > 1 and self._negative is None:
            raise ConfigError("guidance above 1 needs the negative (unconditional) prompt: call set_negative_embeds() first")
        return self._text

    def _call_args(self) -> tuple:
        return (self._latents, self._depth, self._text_batch(), self.timesteps, self.alpha, self.beta, self.c_skip,
                self.c_out, self._noise, self._carry, self._guidance, self._row, self._image, self._tables)

    def set_image_tokens(self, tokens: torch.Tensor | None, uncond: torch.Tensor | None = None) -> None:
        """A style picture's IP-Adapter image tokens (``[1, 1, tokens, dim]``, see
        :func:`~..models.ip_adapter.image_tokens`), or None for none; between frames. Written into
        the same buffer while its shape holds (a compiled or captured step reads the new picture
        without compiling again; the first picture of a stream, or None after one, changes the
        call's inputs and compiles once). ``uncond``: the unconditional branch's tokens with
        guidance above 1 (default: the same picture, so guidance acts on the text only)."""
        if tokens is None:
            self._image = None
            return
        T = self.steps
        tokens = tokens.to(device=self.device, dtype=self.dtype)
        if tokens.dim() != 4 or tokens.shape[:2] != (1, 1):
            raise ConfigError(f"image tokens must have shape [1, 1, tokens, dim], got {tuple(tokens.shape)}")
        if self._image is None or self._image.shape[2:] != tokens.shape[2:]:
            self._image = torch.zeros(self.branches * T, *tokens.shape[1:], device=self.device, dtype=self.dtype)
        self._image[:T].copy_(tokens.expand(T, -1, -1, -1))
        if self.branches > 1:
            other = tokens if uncond is None else uncond.to(device=self.device, dtype=self.dtype)
            self._image[T:].copy_(other.expand(T, -1, -1, -1))

    def _image_rows(self, start: int) -> list[torch.Tensor] | None:
        return None if self._image is None else [self._image[start : start + 1]]

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything a stream carries from one call to the next, besides the call count: the
        latent and depth batches and every temporal layer's KV-cache (to set a stream aside and
        resume it, as the benchmarks do)."""
        return [self._latents, self._depth, *self.unet.cache_tensors()]

    @torch.no_grad()
    def precompile(self) -> float:
        """Compile (and, for CUDA graphs, warm up) the accelerated stream call now, on empty
        buffers, so that the first streamed frames do not wait for the compiler. Returns the
        seconds it took (0 when not accelerated, or when the stream is already running: the call
        compiles at its first frame then). :meth:`prepare` resets everything this touches."""
        if self.accelerated == "off" or self._prepared:
            return 0.0
        import time

        start = time.perf_counter()
        self.unet.allocate_cache(self.steps * self.branches, self.height, self.width)
        self._row.zero_()
        self._accel.precompile(*self._call_args())
        return time.perf_counter() - start

    @torch.no_grad()
    def prepare(
        self,
        warmup_latents: torch.Tensor,
        warmup_depth: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        noise: list[torch.Tensor] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Warm up on ``sink`` frames (noisy latents ``[8, 4, h, w]`` at the first step, and their
        depth latents): denoise them together with full attention among themselves, filling cache
        row ``s`` during step ``s``. ``noise[s]`` re-noises step ``s``'s estimate for step ``s+1``.
        Returns the warmup frames' finished latents. Any earlier stream state is discarded."""
        if prompt_embeds is not None:
            self.set_prompt_embeds(prompt_embeds)
        text = self._text_batch()
        x = self._check("warmup latents", warmup_latents, self.sink)
        depth = self._check("warmup depth", warmup_depth, self.sink)
        T = self.steps
        self.unet.allocate_cache(T * self.branches, self.height, self.width)
        self._latents.zero_()
        self._depth.zero_()
        self._carry.zero_()
        self.calls = 0
        ctx_of = [SequenceContext(num_frames=self.sink, mask=None, cache_row=s) for s in range(T)]
        x0 = x
        for s in range(T):
            eps = self.unet(x, self.timesteps[s : s + 1], text[:1], depth, ctx_of[s], image_tokens=self._image_rows(0))
            if self.branches > 1:  # the unconditional branch fills its own cache row T + s
                ctx = SequenceContext(num_frames=self.sink, mask=None, cache_row=T + s)
                uncond = self.unet(x, self.timesteps[s : s + 1], text[T : T + 1], depth, ctx, image_tokens=self._image_rows(T))
                eps = uncond + self.guidance_scale * (eps - uncond)
            x0 = self._x0(eps, x, self.alpha[s], self.beta[s], self.c_skip[s], self.c_out[s])
            if s < T - 1:
                n = self.randn(x0.shape) if noise is None else noise[s].to(device=self.device, dtype=self.dtype)
                x = self.alpha[s + 1] * x0 + self.beta[s + 1] * n
        self._prepared = True
        return x0

    reset = prepare

    @torch.no_grad()
    def denoise_frame(self, x_t: torch.Tensor, depth: torch.Tensor, noise: list[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        """One frame on its own, through every denoising step in turn, with no temporal attention:
        the motion modules see a clip of this one frame, and no cache is read or written (no warmup
        needed). The per-frame (StreamDiffusion-style) baseline with the same weights, text, steps and
        guidance. ``x_t`` ``[1, 4, h, w]`` at the first step; ``noise[s]`` re-noises step ``s``'s
        estimate for step ``s+1``. Returns the finished latent ``[1, 4, h, w]``."""
        text = self._text_batch()
        x = self._check("frame latent", x_t, 1)
        depth = self._check("depth latent", depth, 1)
        T = self.steps
        alone = SequenceContext(num_frames=1)
        x0 = x
        for s in range(T):
            t = self.timesteps[s : s + 1]
            eps = self.unet(x, t, text[:1], depth, alone, image_tokens=self._image_rows(0))
            if self.branches > 1:
                uncond = self.unet(x, t, text[T : T + 1], depth, alone, image_tokens=self._image_rows(T))
                eps = uncond + self.guidance_scale * (eps - uncond)
            x0 = self._x0(eps, x, self.alpha[s], self.beta[s], self.c_skip[s], self.c_out[s])
            if s < T - 1:
                n = self.randn(x0.shape) if noise is None else noise[s].to(device=self.device, dtype=self.dtype)
                x = self.alpha[s + 1] * x0 + self.beta[s + 1] * n
        return x0

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, depth: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One stream call: ``x_t`` ``[1, 4, h, w]`` (a frame latent noised to the first step) and its
        depth latent in; the latent finished by this call out (``[1, 4, h, w]``, a view into an
        internal buffer that stays valid until the next call). ``noise`` ``[T-1, 4, h, w]`` moves the
        unfinished rows on to their next step."""
        if not self._prepared:
            raise ConfigError("the stream is not warmed up: call prepare() with the warmup frames first")
        T = self.steps
        self._latents[0:1].copy_(x_t)
        self._depth[0:1].copy_(depth)
        if T > 1:
            if noise is None:
                self._noise.normal_(generator=self.generator)
                fade = self._seed_fade
                if fade is not None:
                    if self._noise_old is None:
                        self._noise_old = torch.empty_like(self._noise)
                    self._noise_old.normal_(generator=fade.generator)
                    blend_noise(self._noise_old, self._noise, fade.weight(), out=self._noise)
            else:
                self._noise.copy_(noise)
        self._row.fill_(self.bookkeeping.index(self.calls))
        eps, x0 = self._accel(*self._call_args())
        if self._fades[0] is not None or self._fades[1] is not None or self._seed_fade is not None:
            self._advance()
        if T > 1:  # the next call's rows 1..T-1: this call's rows 0..T-2 one step further, same depth
            self._latents[1:].copy_(self._carry)
            self._depth_prev.copy_(self._depth[:-1])
            self._depth[1:].copy_(self._depth_prev)
        self.last_model_pred, self.last_x0_batch = eps, x0
        self.calls += 1
        return x0[T - 1 : T]
