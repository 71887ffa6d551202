"""The frame pipeline: RGB frames of any size in, stylised RGB frames out.

Per frame: fit to the model size (``crop``: the centre of the frame with the model's aspect ratio;
``letterbox``: the whole frame between black bars), VAE-encode, estimate and encode depth
(normalised and encoded as the original does), one stream step, VAE-decode, and fit back to the
output size without cutting anything more (:func:`unfit_frame`: at the input's size every pixel
lands where it came from, at the input's scale). The first 8 frames are the warmup: they are
shown as the input framed exactly as the later outputs are (the user sees their camera, not black
frames) and, once all 8 are there, denoised together to fill the cache.

Any model size that is a multiple of 8 works (the VAE's factor): the streaming UNet takes each
up block's size from its skip connection, as diffusers' UNet does, so sizes such as 640x360
(latent 80x45) need no multiple of 64.

Outputs trail inputs by ``T - 1`` stream calls. :meth:`FramePipeline.push` returns the frames
that became ready as ``(input index, image)`` pairs in input order, and :meth:`flush` finishes the
ones still in flight, so a file gets exactly one output per input frame.

Changes that alter the schedule (steps, strength) or ask for a reset are applied at the next
frame: frames in flight are finished first, then the stream re-warms on the last 8 frames it saw,
so the picture never stops for a new warmup.

On the device, per frame: the fitted frame goes up as uint8 (on CUDA from a pinned host buffer,
allocated once and reused, with a non-blocking copy) and becomes [-1, 1] in the compute dtype
there; the depth estimator runs on it at its own working size; the frame and its depth image are
VAE-encoded in one batched call (the warmup: its 8 frames and 8 depth images, :data:`ENCODE_CHUNK`
images a call); one stream step; VAE decode; the picture becomes uint8 on the device and comes
down in one copy (into a pinned buffer on CUDA). That copy is the frame's only host
synchronisation; the optional similarity filter adds one more (its score is read on the host).

Random draws, all from the pipeline's generator (``seed``), in this order. Warmup: the VAE
latent sample of the 16-image batch (8 frames, then 8 depth images) in one draw (encoded in
chunks, sampled once over the whole batch), the noise that takes the 8 frame latents to the first
step, then the stream's own warmup draws. Each later frame: the VAE latent sample of its [frame,
depth] batch in one draw, the first-step noise, then the stream step's draws. (Before the
batching the depth latents were drawn after the first-step noise; the same seed gives the same
frames as before only up to that change.)

With acceleration on, the VAE's encode and decode are compiled while the pipeline is built,
beside the stream step, on inputs of the streamed shapes (:meth:`FramePipeline._precompile_vae`),
each announced with a progress line: the first live frames never wait for a compiler.

``FramePipeline(profile_stages=True)`` times every stream frame's stages (upload, depth, encode,
unet, decode, download); see :meth:`FramePipeline.stage_medians`. Off by default, and then it
costs nothing.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.components import Components
from .blend import BlendError, check_image_scale, format_notation, normalise
from .schedule import make_schedule
from .stream import StreamPipeline
from .text import apply_template, encode_prompt


class FrameError(ValueError):
    """A frame that cannot be processed (wrong type, shape or dtype)."""


@dataclass
class Fit:
    """Where the model-size picture sits in a frame: the crop of the source (crop mode) or the
    content rectangle inside the model picture (letterbox mode)."""

    mode: str
    src_rect: tuple[int, int, int, int]  # x, y, w, h in the source frame
    dst_rect: tuple[int, int, int, int]  # x, y, w, h in the model picture


def fit_rect(src_w: int, src_h: int, dst_w: int, dst_h: int, mode: str) -> Fit:
    """Where a ``src_w x src_h`` frame goes in a ``dst_w x dst_h`` picture.

    ``crop``: the centred part of the source with the picture's aspect ratio (the whole width or
    the whole height is kept), scaled to fill the picture. ``letterbox``: the whole source, scaled
    to fit inside the picture and centred, with black bars on the two other sides.

    Shapes whose aspect ratios differ only by the rounding of a side to whole pixels are taken
    as equal (the picture is filled, nothing is cut): a bar or a cut that thin is a rounding
    error, not framing."""
    if mode == "crop":
        scale = max(dst_w / src_w, dst_h / src_h)
        w, h = round(dst_w / scale), round(dst_h / scale)
        w = src_w if src_w - w <= 1 else max(1, w)  # a cut of one source pixel is rounding
        h = src_h if src_h - h <= 1 else max(1, h)
        return Fit(mode, ((src_w - w) // 2, (src_h - h) // 2, w, h), (0, 0, dst_w, dst_h))
    if mode == "letterbox":
        scale = min(dst_w / src_w, dst_h / src_h)
        slack = 1 + 0.5 * scale  # half a source pixel of rounding, scaled, plus this rounding
        w, h = round(src_w * scale), round(src_h * scale)
        w = dst_w if dst_w - w <= slack else max(1, w)
        h = dst_h if dst_h - h <= slack else max(1, h)
        return Fit(mode, (0, 0, src_w, src_h), ((dst_w - w) // 2, (dst_h - h) // 2, w, h))
    raise ConfigError(f"unknown fit mode {mode!r}; use crop or letterbox")


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    if img.shape[1] == w and img.shape[0] == h:
        return img
    shrink = w < img.shape[1] and h < img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _place(part: np.ndarray, fit: Fit, w: int, h: int) -> np.ndarray:
    """``part`` resized into ``fit.dst_rect`` of a black ``w x h`` picture."""
    dx, dy, dw, dh = fit.dst_rect
    part = _resize(np.ascontiguousarray(part), dw, dh)
    if (dw, dh) == (w, h):
        return part
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    canvas[dy : dy + dh, dx : dx + dw] = part
    return canvas


def fit_frame(frame: np.ndarray, w: int, h: int, mode: str) -> tuple[np.ndarray, Fit]:
    """A frame of any size to the ``w x h`` model picture (see :func:`fit_rect`)."""
    fit = fit_rect(frame.shape[1], frame.shape[0], w, h, mode)
    sx, sy, sw, sh = fit.src_rect
    return _place(frame[sy : sy + sh, sx : sx + sw], fit, w, h), fit


def unfit_frame(img: np.ndarray, fit: Fit, out_w: int, out_h: int) -> np.ndarray:
    """A model-size picture back to an ``out_w x out_h`` output frame, never cropped again.

    The content (the whole picture in crop mode, the rectangle inside the bars in letterbox mode)
    is scaled to fit inside the output and centred. With the output at the input's size that puts
    every pixel back where it came from, at the input's scale: a crop shows the part it kept, with
    black where it cut (a 4:3 frame through a square model comes out as the centre square of the
    4:3 frame, between two bars); a letterbox shows the whole frame. An output of the content's
    own aspect ratio is filled."""
    dx, dy, dw, dh = fit.dst_rect
    content = img[dy : dy + dh, dx : dx + dw]
    return _place(content, fit_rect(dw, dh, out_w, out_h, "letterbox"), out_w, out_h)


STAGES = ("upload", "depth", "encode", "unet", "decode", "download")

# The warmup VAE-encodes its 16 images (8 frames, 8 depth images) this many at a time. In one call
# of 16 the encoder's activations were the warmup's memory peak (at 512x512 its first convolutions
# alone hold 16 x 128 x 512 x 512 values), repeated at every re-warm mid-stream; in chunks of 4 that
# part is a quarter. The latent sample stays one draw over the whole batch (see _encode_batch), so
# the random stream is what one call of 16 drew. The encoder's values are each image's own, up to a
# kernel that rounds the last bit differently at another batch size (the SD VAE's 1x1 shortcut
# convolutions on the CPU: 5e-6 in latents up to 3; the tiny VAE with one thread: up to 1e-5, a
# frame's pixel by one level at most, see tests/test_frames_warmup.py).
ENCODE_CHUNK = 4

# The compiled VAE calls already compiled for a shape by _precompile_vae: {wrapped call: {shapes}}.
# The wrapped calls are the accelerator's (one per VAE function and accelerator, shared by every
# stream on the UNet), so a new stream of the same size and mode compiles nothing more.
_VAE_PRECOMPILED: "weakref.WeakKeyDictionary[object, set]" = weakref.WeakKeyDictionary()

_NOT_TIMED = nullcontext()


class StageTimes:
    """Per-frame time of each stage of the frame pipeline, in ms.

    On CUDA each stage is bracketed by CUDA events, so timing adds no synchronisation: a frame's
    events are read after its output copy has synchronised anyway (or when the figures are asked
    for), and the figures are device time. On the CPU, where every op finishes before it returns,
    they are wall time (``time.perf_counter``). Only the last ``keep`` frames are held.
    """

    def __init__(self, device: torch.device, keep: int = 10_000):
        self.device = device
        self.cuda = device.type == "cuda"
        self._frames: deque[dict] = deque(maxlen=keep)
        self._current: dict | None = None
        self._unread: list[dict] = []  # frames holding CUDA events not yet turned into ms

    def begin(self) -> None:
        self._current = {}

    def drop(self) -> None:
        self._current = None

    def end(self) -> None:
        if self._current is not None:
            self._frames.append(self._current)
            self._current = None

    def stage(self, name: str):
        return _Stage(self, name) if self._current is not None else _NOT_TIMED

    def settle(self) -> None:
        """Turn recorded events into ms; call only once they have completed (after a sync)."""
        for frame in self._unread:
            for name, value in frame.items():
                if isinstance(value, tuple):
                    frame[name] = value[0].elapsed_time(value[1])
        self._unread.clear()

    def frames(self) -> list[dict[str, float]]:
        if self.cuda and self._unread:
            torch.cuda.synchronize(self.device)
            self.settle()
        return [dict(f) for f in self._frames]

    def medians(self) -> dict[str, float]:
        per_stage: dict[str, list[float]] = {}
        for frame in self.frames():
            for name, ms in frame.items():
                per_stage.setdefault(name, []).append(ms)
        return {name: sorted(v)[len(v) // 2] for name in STAGES if (v := per_stage.get(name))}

    def clear(self) -> None:
        self.frames()  # settles what is in flight
        self._frames.clear()


class _Stage:
    __slots__ = ("times", "name", "start")

    def __init__(self, times: StageTimes, name: str):
        self.times, self.name = times, name

    def __enter__(self):
        if self.times.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(torch.cuda.current_stream(self.times.device))
        else:
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        frame = self.times._current
        if frame is None:
            return
        if self.times.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.times.device))
            frame[self.name] = (self.start, end)
            if not self.times._unread or self.times._unread[-1] is not frame:
                self.times._unread.append(frame)
        else:
            frame[self.name] = (time.perf_counter() - self.start) * 1000.0


MAX_GUIDANCE = 20.0


def _check_guidance(scale: float) -> None:
    if not 1.0 <= scale <= MAX_GUIDANCE:
        raise ConfigError(f"guidance scale must be 1 to {MAX_GUIDANCE:g} (1: no guidance), got {scale:g}")


def check_frame(frame) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"a frame must be a numpy array, got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 2 or frame.shape[1] < 2:
        raise FrameError(f"a frame must be H x W x 3 (RGB), got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise FrameError(f"a frame must be uint8, got {frame.dtype}")
    return frame


class FramePipeline:
    """RGB uint8 frames in, RGB uint8 frames out, through the streaming Live2Diff model.

    ``accelerate`` is handed to :class:`StreamPipeline` (how the stream step runs: "off" is eager).

    ``temporal=False`` denoises every frame on its own (:meth:`StreamPipeline.denoise_frame`: no
    temporal attention, no warmup, no lag), the per-frame baseline that ``eval --compare per-frame``
    sets beside the stream.

    ``profile_stages=True`` records, for every frame that makes a stream step, the time of each
    stage: ``upload`` (frame to the device, uint8 to [-1, 1]), ``depth`` (estimate, normalise,
    resize), ``encode`` (one VAE call for frame + depth), ``unet`` (first-step noise and the
    stream step), ``decode`` (VAE decode and conversion to uint8 on the device) and ``download``
    (the copy to the host). Frames whose call finishes no output (the first ``T - 1`` after a
    warmup) have no decode or download. :meth:`stage_medians` gives the median ms of each stage,
    :meth:`stage_times` every frame's figures, :meth:`clear_stage_times` starts afresh (e.g.
    after a few settling frames). CUDA events on a GPU, so profiling adds no synchronisation.
    """

    def __init__(
        self,
        comps: Components,
        *,
        width: int = 512,
        height: int = 512,
        fit: str = "crop",
        num_inference_steps: int = 50,
        t_index_list: list[int] | None = None,
        strength: float | None = None,
        prompt: str = "",
        template: str | None = None,
        clip_skip: int = 1,
        seed: int = 0,
        output_size: tuple[int, int] | None = None,
        similarity_threshold: float | None = None,
        max_skip: int = 10,
        negative_prompt: str = "",
        guidance_scale: float = 1.0,
        accelerate: str = "off",
        profile_stages: bool = False,
        temporal: bool = True,
        frame_rate: float | None = None,
    ):
        factor = comps.vae_scale_factor
        if width % factor or height % factor or width < factor or height < factor:
            raise ConfigError(
                f"model size {width}x{height} cannot work: width and height must be multiples of {factor} "
                f"(the VAE's factor), e.g. 512x512, 640x360, 768x432, 512x384"
            )
        fit_rect(1, 1, 1, 1, fit)  # validates the mode
        if similarity_threshold is not None and not 0.0 < similarity_threshold < 1.0:
            raise ConfigError(f"similarity threshold must be between 0 and 1, got {similarity_threshold}")
        self.comps = comps
        self.device = torch.device(comps.device)
        self.width, self.height, self.fit = width, height, fit
        self.accelerate = accelerate
        self.temporal = temporal
        self.output_size = output_size
        self.similarity_threshold = similarity_threshold
        self.max_skip = max_skip
        self.template, self.clip_skip = template, clip_skip
        self.prompt, self.prompt_blend = _prompt_fields(prompt)
        # Transitions are given in seconds and run in stream calls: at ``frame_rate`` frames a
        # second when it is set (a file's rate: the same frames every run), else at the rate frames
        # arrive, measured (live).
        if frame_rate is not None and not (frame_rate > 0 and frame_rate < 1000):
            raise ConfigError(f"frame rate must be above 0 and below 1000, got {frame_rate}")
        self.frame_rate = frame_rate
        self._arrival: float | None = None
        self._interval: float | None = None  # smoothed seconds between frames, as they arrive
        self.seed = seed
        self.generator = torch.Generator(device=comps.device).manual_seed(seed)
        self.sink = comps.unet.motion_config.sink_size
        if t_index_list is None and strength is None:
            t_index_list = [32, 45]
        self._schedule_args = (num_inference_steps, t_index_list, strength)
        _check_guidance(guidance_scale)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self._negative = self._encode_negative(negative_prompt)
        self._embeds = self._encode(self.prompt_blend or self.prompt)
        # Transfers: reused buffers (pinned host memory on CUDA), and an event that says whether the
        # last upload out of the pinned buffer has been waited for (see _upload).
        self._pinned = self.device.type == "cuda"
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._uploaded = torch.cuda.Event() if self._pinned else None
        self._copied = torch.cuda.Event() if self._pinned else None
        self._upload_unwaited = False
        self._times = StageTimes(self.device) if profile_stages else None
        # A style picture (IP-Adapter): where the one in use came from ("upload", "style NAME",
        # "file NAME"; None: none) and the scale it steers with when there is one.
        self.style_image: str | None = None
        self.style_image_scale = 1.0
        self._image_tokens = None
        if self.style_images:
            self._idle_image_tokens()
        self.stream = self._new_stream()
        self.frame_index = 0
        self._warm: list[torch.Tensor] = []  # preprocessed images waiting for the warmup
        self._history: deque[torch.Tensor] = deque(maxlen=self.sink)  # last frames seen, to re-warm from
        self._pending: deque[list[int]] = deque()  # input indices per call whose output is in flight
        self._fits: dict[int, tuple[Fit, tuple[int, int]]] = {}
        self._last_x: torch.Tensor | None = None
        self._last_model_img: np.ndarray | None = None  # the model-size picture of the last output
        self._skipped = 0
        self._rewarm = False
        self._rewarm_from_history = False
        self.skipped_total = 0

    # -- configuration -----------------------------------------------------------------------

    def _new_stream(self) -> StreamPipeline:
        """A fresh (not yet warm) stream with the current schedule, guidance and text."""
        steps, t_index_list, strength = self._schedule_args
        schedule = make_schedule(steps, t_index_list=t_index_list, strength=strength)
        lh, lw = self.height // self.comps.vae_scale_factor, self.width // self.comps.vae_scale_factor
        extra = {} if self.accelerate == "off" else {"accelerate": self.accelerate}
        stream = StreamPipeline(self.comps.unet, schedule, (lh, lw), generator=self.generator, guidance_scale=self.guidance_scale, **extra)
        stream.set_prompt_embeds(self._embeds)
        stream.set_negative_embeds(self._negative)
        if getattr(self, "_image_tokens", None) is not None:
            stream.set_image_tokens(*self._image_tokens)
        old = getattr(self, "stream", None)
        if old is not None and old.in_transition:  # a re-warm in the middle of a transition: it goes on
            stream.continue_text_from(old)
        stream.precompile()  # the compiler's wait (if any) falls here, not on the first live frames
        self._precompile_vae(stream)
        return stream

    @torch.no_grad()
    def _precompile_vae(self, stream: StreamPipeline) -> None:
        """Compile the VAE's encode and decode for this size now, beside the stream step, so that
        the first streamed frame does not freeze on the compiler unannounced: each wrapped call is
        made once on inputs of the streamed shapes and dtype (encode: the ``[2, 3, H, W]`` batch of
        a frame and its depth image; decode: a ``[1, 4, H/8, W/8]`` latent), with a progress line.
        These calls keep no state, so the wrapped call's first-call check against eager runs on
        them. Only ``encode`` is called, never a sample: the pipeline's generator is not touched
        (the inputs come from a generator of their own). Nothing when the stream is not accelerated;
        once per size and mode (a new stream of the same size and mode compiles nothing)."""
        if stream.accelerated == "off":
            return
        accel, vae = stream.accelerator, self.comps.vae
        lh, lw = self.height // self.comps.vae_scale_factor, self.width // self.comps.vae_scale_factor
        g = torch.Generator(device=self.device).manual_seed(0)
        calls = []
        if self.temporal:  # per-frame (temporal=False) encodes in the eager path, as the warmup does
            images = torch.rand((2, 3, self.height, self.width), generator=g, device=self.device, dtype=self.comps.dtype)
            calls.append(("VAE encoder", vae.encode, (images.mul_(2).sub_(1),), {}))
        latent = torch.randn((1, 4, lh, lw), generator=g, device=self.device, dtype=stream.dtype)
        calls.append(("VAE decoder", vae.decode, (latent,), {"return_dict": False}))  # as _decode calls it
        for label, fn, args, kwargs in calls:
            wrapped = accel.wrap(fn, label)
            if wrapped is fn:  # the accelerator went back to eager
                continue
            done = _VAE_PRECOMPILED.setdefault(wrapped, set())
            shapes = tuple((tuple(a.shape), a.dtype) for a in args)
            if shapes in done:
                continue
            accel.say(f"compiling the {label} for {self.width}x{self.height} (once per size) ...")
            start = time.perf_counter()
            wrapped(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            done.add(shapes)
            if not getattr(wrapped, "failed", False):  # a failure said so in its own warning line
                accel.say(f"{label} compiled in {time.perf_counter() - start:.1f} s")

    def _encode_text(self, text: str) -> torch.Tensor:
        ahead = getattr(self, "_encoded_ahead", None)
        if ahead and (text, self.clip_skip) in ahead:
            return ahead[(text, self.clip_skip)]
        return encode_prompt(self.comps.tokenizer, self.comps.text_encoder, text, self.clip_skip).to(self.comps.dtype)

    def _encode_negative(self, text: str) -> torch.Tensor:
        """The unconditional branch's text: the negative prompt as typed (no style template)."""
        return self._encode_text(text)

    def _encode(self, prompt: str | list[tuple[str, float]]) -> torch.Tensor:
        """A prompt's embeddings; a blend [(text, weight)] (weights summing to 1) is the weighted sum
        of its prompts' embeddings, each with the style's template."""
        if isinstance(prompt, str):
            return self._encode_text(apply_template(self.template, prompt))
        if len(prompt) == 1:
            return self._encode_text(apply_template(self.template, prompt[0][0]))
        mixed = None
        for text, weight in prompt:
            part = self._encode_text(apply_template(self.template, text)).float() * weight
            mixed = part if mixed is None else mixed.add_(part)
        return mixed.to(self.comps.dtype)

    def frames_for(self, seconds: float) -> int:
        """How many stream calls a transition of ``seconds`` takes (0 for 0): at :attr:`frame_rate`
        when set, else at the rate frames have been arriving (30 a second before any have)."""
        if seconds <= 0:
            return 0
        rate = self.frame_rate or (1.0 / self._interval if self._interval else 30.0)
        return max(1, round(seconds * rate))

    def _note_arrival(self) -> None:
        now = time.monotonic()
        if self._arrival is not None:
            dt = min(max(now - self._arrival, 1e-3), 1.0)  # a pause is not a frame interval
            self._interval = dt if self._interval is None else 0.9 * self._interval + 0.1 * dt
        self._arrival = now

    @property
    def transition_progress(self) -> float | None:
        """How far a prompt or seed transition under way has come (0 to 1), or None."""
        return self.stream.transition_progress()

    @property
    def warming_up(self) -> bool:
        return not self.stream._prepared

    @property
    def steps(self) -> int:
        return self.stream.steps

    @property
    def schedule_args(self) -> tuple[int, list[int] | None, float | None]:
        """(num_inference_steps, t_index_list, strength) as last set (applied at the next frame)."""
        return self._schedule_args

    def set_prompt(self, prompt: str | list[tuple[str, float]], transition_s: float = 0.0) -> None:
        """New text between frames: no re-warmup, the stream goes on. ``prompt``: a text, or a blend
        [(text, weight)] (normalised here, at most 4). ``transition_s`` > 0: the conditioning moves
        from where it is to the new prompt over that many seconds of frames, instead of at once."""
        text, blend = _prompt_fields(prompt)
        self._embeds = self._encode(blend or text)
        self.prompt, self.prompt_blend = text, blend
        self.stream.set_prompt_embeds(self._embeds, self.frames_for(transition_s))

    def set_negative_prompt(self, text: str, transition_s: float = 0.0) -> None:
        """What the picture should not show; it steers the frames when the guidance scale is above 1."""
        self._negative = self._encode_negative(text)
        self.negative_prompt = text
        self.stream.set_negative_embeds(self._negative, self.frames_for(transition_s))

    def set_guidance(self, scale: float) -> None:
        """Classifier-free guidance scale (1: none, the original's default; above 1 the negative
        prompt takes effect, at about twice the UNet cost); applied with a re-warmup at the next frame."""
        _check_guidance(scale)
        self.guidance_scale = float(scale)
        self._rewarm = True

    def set_text_style(self, template: str | None, clip_skip: int, encoded: dict | None = None, transition_s: float = 0.0) -> None:
        """A style's prompt template and clip skip; the prompts are encoded again. ``encoded``:
        {(text, clip_skip): embeddings} computed ahead with the text encoder's weights of now (a
        style prepared beside the stream, see StyleManager.prepare); a text not in it is encoded here."""
        old = (self.template, self.clip_skip)
        self.template, self.clip_skip = template, clip_skip
        self._encoded_ahead = encoded
        try:
            self.set_prompt(self.prompt_blend or self.prompt, transition_s)
            self.set_negative_prompt(self.negative_prompt, transition_s)
        except Exception:
            self.template, self.clip_skip = old
            raise
        finally:
            self._encoded_ahead = None

    def set_schedule(self, num_inference_steps: int = 50, t_index_list=None, strength=None) -> None:
        """Change the denoising steps; applied (with a re-warmup on recent frames) at the next frame."""
        make_schedule(num_inference_steps, t_index_list=t_index_list, strength=strength)  # validate now
        self._schedule_args = (num_inference_steps, t_index_list, strength)
        self._rewarm = True

    @property
    def style_images(self) -> bool:
        """Whether this pipeline takes style pictures: an IP-Adapter and its image encoder are loaded."""
        from ..models.ip_adapter import has_ip_adapter

        return self.comps.image_encoder is not None and has_ip_adapter(self.comps.unet)

    def _need_style_images(self) -> None:
        if not self.style_images:
            raise ConfigError("this engine has no IP-Adapter loaded, so it takes no style picture: start it with "
                              "--ip-adapter (or --style-image FILE)")

    def _idle_image_tokens(self) -> None:
        """With an IP-Adapter loaded the stream always carries image tokens (a zero embedding's
        while there is no picture) at scale 0, which adds exactly nothing: setting, replacing or
        clearing a picture then writes buffers and weights in place, and a compiled or captured
        step never compiles again for it."""
        from ..models.ip_adapter import image_embed_dim, image_tokens, set_ip_adapter_scale

        unet = self.comps.unet
        zero = image_tokens(unet, torch.zeros(1, image_embed_dim(unet), device=self.device, dtype=self.comps.dtype))[0]
        self._image_tokens = (zero, zero)
        set_ip_adapter_scale(unet, 0.0)

    @torch.no_grad()
    def encode_style_picture(self, data: bytes) -> torch.Tensor:
        """A picture's bytes (PNG, JPEG, WebP; never a path) -> its CLIP image embedding, for
        :meth:`set_style_image`. Changes nothing in the stream: it runs beside it, on any thread."""
        from ..models.ip_adapter import decode_picture, encode_picture

        self._need_style_images()
        return encode_picture(self.comps.image_encoder, decode_picture(data))

    def set_style_image(self, image_embeds: torch.Tensor | None, source: str = "upload") -> None:
        """A style picture (its CLIP image embedding ``[1, dim]``, computed beside the stream: see
        :meth:`encode_style_picture`), or None to drop it; swapped in between frames. ``source``:
        where it came from, for the status. Needs an IP-Adapter loaded into the UNet. With guidance
        above 1 the unconditional branch gets the tokens of a zero embedding (as diffusers'
        IP-Adapter pipelines do)."""
        from ..models.ip_adapter import image_tokens, set_ip_adapter_scale

        if image_embeds is None:
            if self.style_images:
                set_ip_adapter_scale(self.comps.unet, 0.0)  # the tokens stay, adding nothing
            self.style_image = None
            return
        self._need_style_images()
        cond = image_tokens(self.comps.unet, image_embeds)[0]
        uncond = image_tokens(self.comps.unet, torch.zeros_like(image_embeds))[0]
        self._image_tokens = (cond, uncond)
        self.stream.set_image_tokens(cond, uncond)
        set_ip_adapter_scale(self.comps.unet, self.style_image_scale)
        self.style_image = source

    def set_style_image_scale(self, scale: float) -> None:
        """How strongly the style picture steers: 0 not at all, 1 as the adapter was trained, up to
        2 (see :data:`~.blend.MAX_IMAGE_SCALE`); written into the adapter's
        weights in place, kept for the next picture while none is set."""
        from ..models.ip_adapter import set_ip_adapter_scale

        try:
            scale = check_image_scale(scale, "style image scale")
        except BlendError as exc:
            raise ConfigError(str(exc)) from None
        self._need_style_images()
        self.style_image_scale = float(scale)
        if self.style_image is not None:
            set_ip_adapter_scale(self.comps.unet, scale)

    def set_seed(self, seed: int, transition_s: float = 0.0) -> bool:
        """A new seed. At once (``transition_s`` 0): the generator is reseeded (the controller then
        re-warms the stream, see :meth:`request_reset`); returns False. With a transition, on a warm
        stream: the stream's noise moves from the old seed's draws to the new one's over that time,
        its norm kept (see :func:`~.stream.blend_noise`), with no re-warm; returns True."""
        frames = self.frames_for(transition_s)
        if frames and not self.warming_up and self.temporal:
            old = torch.Generator(device=self.generator.device)
            old.set_state(self.generator.get_state())
            self.generator.manual_seed(seed)
            self.seed = seed
            self.stream.fade_seed(old, frames)
            return True
        self.seed = seed
        self.generator.manual_seed(seed)
        return False

    def request_reset(self) -> None:
        """Re-warm on the most recent frames at the next push (a clean cache, no visible gap)."""
        self._rewarm = True

    def restart(self) -> list[tuple[int, np.ndarray]]:
        """Forget the past entirely (e.g. after a pause): frames in flight come out now, and the
        next frames warm the stream up afresh, shown as they come in until it is warm."""
        ready = self.flush()
        self._rewarm = self._rewarm_from_history = False
        self._history.clear()
        self._warm = []
        self._last_x = None
        self.stream = self._new_stream()
        return ready

    # -- profiling ---------------------------------------------------------------------------

    def _stage(self, name: str):
        return self._times.stage(name) if self._times is not None else _NOT_TIMED

    def stage_times(self) -> list[dict[str, float]]:
        """Each profiled frame's ms per stage, oldest first ([] unless ``profile_stages``)."""
        return self._times.frames() if self._times is not None else []

    def stage_medians(self) -> dict[str, float]:
        """Median ms of each stage over the profiled frames, in pipeline order ({} unless ``profile_stages``)."""
        return self._times.medians() if self._times is not None else {}

    def clear_stage_times(self) -> None:
        if self._times is not None:
            self._times.clear()

    # -- tensors -----------------------------------------------------------------------------

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device, pin: bool = False) -> torch.Tensor:
        """A buffer allocated once per name and size, then reused."""
        key = (name, tuple(shape))
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        return buf

    def _upload(self, img: np.ndarray) -> torch.Tensor:
        """A model-size uint8 RGB picture to ``[1, 3, H, W]`` in [-1, 1], compute dtype, on the device.

        The uint8 bytes travel (a quarter of float32's); the conversion runs on the device, with the
        same arithmetic as the float path before it (``x / 127.5 - 1`` in the compute dtype)."""
        src = torch.from_numpy(img)
        if self._pinned:
            staging = self._buffer("up-host", img.shape, torch.uint8, "cpu", pin=True)
            if self._upload_unwaited:
                # The previous copy out of this buffer may still be queued (no output copy has
                # synchronised since: warmup frames, the first T - 1 stream frames, skipped frames).
                self._uploaded.synchronize()
            staging.copy_(src)
            pixels = self._buffer("up-dev", img.shape, torch.uint8, self.device)
            pixels.copy_(staging, non_blocking=True)
            self._uploaded.record(torch.cuda.current_stream(self.device))
            self._upload_unwaited = True
        else:
            pixels = src
        x = torch.empty((1, 3, img.shape[0], img.shape[1]), dtype=self.comps.dtype, device=self.device)
        x[0].copy_(pixels.permute(2, 0, 1))
        return x.div_(127.5).sub_(1.0)

    def _depth_images(self, x: torch.Tensor) -> torch.Tensor:
        """Depth of a batch ``[N, 3, H, W]``: ``[N, 1, H, W]`` in [-1, 1], compute dtype, normalised
        over the whole batch as the original does (min to -1, max to 1)."""
        raw = self.comps.depth(x)  # [N, h, w] at the estimator's working size, in its dtype
        # The min/max normalisation runs in float32: raw disparity (MiDaS: 0 to thousands) sits
        # where float16's steps are 1-2 units, and (raw - lo) / (hi - lo) in float16 would round
        # twice more. The map is small (N x 384 x 384); the full-size resize below is not float32.
        raw = raw.float()
        lo, hi = raw.amin(), raw.amax()
        norm = (raw - lo).div_((hi - lo).clamp_min(1e-6)).mul_(2).sub_(1)
        img = norm[:, None].to(self.comps.dtype)
        # One channel resized; the three identical RGB channels are a broadcast in the encode batch.
        return F.interpolate(img, (x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latents (scaled) of ``[N, 3, H, W]`` images. The full VAE samples its latent
        distribution in one draw of ``[N, 4, h, w]`` from the generator; TAESD draws nothing.

        A streamed batch (a frame and its depth image) is one call, through the compiled encoder
        when the stream step is compiled. The warmup's batch of 16 stays eager (warmup never
        compiles) and is encoded :data:`ENCODE_CHUNK` images a call: the chunks' distribution
        parameters are joined and sampled once, with the same generator, so the draw is the one a
        single call of N makes (see :data:`ENCODE_CHUNK`); TAESD's latents are joined."""
        vae = self.comps.vae
        if self.warming_up:
            outs = [vae.encode(part) for part in images.split(ENCODE_CHUNK)]
        else:
            outs = [self.stream.accelerator.wrap(vae.encode, "VAE encoder")(images)]
        dists = [getattr(out, "latent_dist", None) for out in outs]
        if dists[0] is not None:
            dist = dists[0]
            if len(dists) > 1:
                from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

                dist = DiagonalGaussianDistribution(torch.cat([d.parameters for d in dists]), deterministic=dist.deterministic)
            latents = dist.sample(generator=self.generator)
        else:
            latents = outs[0].latents if len(outs) == 1 else torch.cat([out.latents for out in outs])
        return latents * getattr(vae.config, "scaling_factor", 1.0)

    def _encode_with_depth(self, x: torch.Tensor, depth: torch.Tensor, out: torch.Tensor | None = None):
        """Frames ``[N, 3, H, W]`` and their depth images ``[N, 1, H, W]`` through one VAE call:
        (frame latents, depth latents). ``out`` is a reused ``[2N, 3, H, W]`` batch buffer."""
        n = x.shape[0]
        batch = torch.cat([x, depth.expand(-1, 3, -1, -1)], out=out) if out is not None else torch.cat([x, depth.expand(-1, 3, -1, -1)])
        latents = self._encode_batch(batch)
        return latents[:n], latents[n:]

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        """A latent to a ``[H, W, 3]`` uint8 picture, on the device (a buffer reused per frame)."""
        vae = self.comps.vae
        img = self.stream.accelerator.wrap(vae.decode, "VAE decoder")(latent / getattr(vae.config, "scaling_factor", 1.0), return_dict=False)[0]
        return self._to_uint8(img)

    def _to_uint8(self, img: torch.Tensor) -> torch.Tensor:
        # float32 for this one step: it makes the 8-bit rounding exact (float16 would shift some
        # pixels by one); a single element-wise pass over one picture.
        pixels = img[0].float().clamp(-1, 1).add_(1).mul_(127.5).round_()
        out = self._buffer("down-dev", (pixels.shape[1], pixels.shape[2], 3), torch.uint8, self.device)
        return out.copy_(pixels.permute(1, 2, 0))

    def _download(self, pixels: torch.Tensor) -> np.ndarray:
        """The one device-to-host copy of a frame, and its one host synchronisation. Returns an
        array of its own (the buffers are reused by the next frame)."""
        if not self._pinned:
            with self._stage("download"):
                return pixels.numpy().copy()
        host = self._buffer("down-host", tuple(pixels.shape), torch.uint8, "cpu", pin=True)
        with self._stage("download"):
            host.copy_(pixels, non_blocking=True)
        self._copied.record(torch.cuda.current_stream(self.device))
        self._copied.synchronize()
        self._upload_unwaited = False  # every earlier copy on the stream is done too
        if self._times is not None:
            self._times.settle()
        return host.numpy().copy()

    # -- frames ------------------------------------------------------------------------------

    def _out_size(self, frame: np.ndarray) -> tuple[int, int]:
        return self.output_size or (frame.shape[1], frame.shape[0])

    def framed(self, frame: np.ndarray) -> np.ndarray:
        """The frame unstylised, framed as every output is (the part the model sees, at the output
        size, never zoomed again), at the frame's own resolution: what a pause or a failed frame
        shows, so that neither jumps to another picture area or stretches the picture."""
        frame = check_frame(frame)
        ow, oh = self._out_size(frame)
        sx, sy, sw, sh = fit_rect(frame.shape[1], frame.shape[0], self.width, self.height, self.fit).src_rect
        return _place(frame[sy : sy + sh, sx : sx + sw], fit_rect(sw, sh, ow, oh, "letterbox"), ow, oh)

    def _emit(self, indices: list[int], model_img: np.ndarray) -> list[tuple[int, np.ndarray]]:
        out = []
        for i in indices:
            fit, (ow, oh) = self._fits.pop(i)
            out.append((i, unfit_frame(model_img, fit, ow, oh)))
        if out:
            self._last_model_img = model_img
        return out

    def _warmup(self, images: list[torch.Tensor]) -> None:
        x = torch.cat(images)
        clean, depth = self._encode_with_depth(x, self._depth_images(x))
        x_t = self.stream.add_noise(clean)
        self.stream.prepare(x_t, depth)  # the stream's text as it is (a transition may be under way)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        with self._stage("depth"):
            depth_img = self._depth_images(x)
        with self._stage("encode"):
            batch = self._buffer("encode", (2, *x.shape[1:]), x.dtype, x.device)
            clean, depth = self._encode_with_depth(x, depth_img, out=batch)
        with self._stage("unet"):
            x_t = self.stream.add_noise(clean)
            return self.stream.step(x_t, depth)

    def _finish_call(self, latent: torch.Tensor) -> list[tuple[int, np.ndarray]]:
        if len(self._pending) <= self.stream.lag:
            return []
        with self._stage("decode"):
            pixels = self._decode(latent)
        return self._emit(self._pending.popleft(), self._download(pixels))

    @torch.no_grad()
    def push(self, frame: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Feed one frame; returns the frames that became ready, as (input index, RGB image)."""
        frame = check_frame(frame)
        self._note_arrival()
        ready: list[tuple[int, np.ndarray]] = []
        if self._rewarm:
            ready += self._apply_rewarm()
        elif self._rewarm_from_history:
            self._rewarm_from_history = False
            self._warmup(list(self._history))
        index = self.frame_index
        self.frame_index += 1
        ow, oh = self._out_size(frame)
        model_img, fit = fit_frame(frame, self.width, self.height, self.fit)
        self._fits[index] = (fit, (ow, oh))
        timed = self._times is not None and not self.warming_up
        if self._times is not None:  # a stream frame is timed; a warmup frame is not
            self._times.begin() if timed else self._times.drop()
        with self._stage("upload"):
            x = self._upload(model_img)

        if not self.temporal:  # every frame on its own: no warmup, no cache, no lag
            clean, depth = self._encode_with_depth(x, self._depth_images(x))
            latent = self.stream.denoise_frame(self.stream.add_noise(clean), depth)
            return ready + self._emit([index], self._download(self._decode(latent)))

        if self.warming_up:
            self._warm.append(x)
            self._history.append(x)
            ready += self._emit([index], model_img)  # the camera, framed as every output, until the stream is warm
            if len(self._warm) == self.sink:
                self._warmup(self._warm)
                self._warm = []
            return ready

        if self._similar(x):
            if timed:
                self._times.drop()
            self.skipped_total += 1
            if self._pending:
                self._pending[-1].append(index)  # shown with the frame it resembles
            else:
                ready += self._emit([index], self._last_output_model())
            return ready
        self._history.append(x)
        self._last_x = x
        self._pending.append([index])
        ready += self._finish_call(self._step(x))
        if timed:
            self._times.end()
        return ready

    def _last_output_model(self) -> np.ndarray:
        # The previous output in model size, so that it goes through the same unfit as any other.
        return self._last_model_img

    def _similar(self, x: torch.Tensor) -> bool:
        if self.similarity_threshold is None or self._last_x is None:
            return False
        if self._skipped >= self.max_skip:
            self._skipped = 0
            return False
        a, b = x.flatten().float(), self._last_x.flatten().float()
        # The filter's one host synchronisation: the score decides on the host whether to step.
        sim = float(F.cosine_similarity(a, b, dim=0))
        if sim >= self.similarity_threshold:
            self._skipped += 1
            return True
        self._skipped = 0
        return False

    @torch.no_grad()
    def flush(self) -> list[tuple[int, np.ndarray]]:
        """Finish every frame still in flight (the last frame is fed again to move them on).
        Frames still collecting for the warmup were already returned as they came."""
        ready: list[tuple[int, np.ndarray]] = []
        if self.warming_up or not self._pending:
            return ready
        x = self._last_x if self._last_x is not None else self._history[-1]
        while self._pending:
            self._pending.append([])  # a filler call: its own output is never shown
            ready += self._finish_call(self._step(x))
            while self._pending and not self._pending[0]:
                self._pending.popleft()
        self._rewarm = True  # filler frames are in the cache rows now: start clean at the next frame
        return ready

    def _apply_rewarm(self) -> list[tuple[int, np.ndarray]]:
        ready = self.flush()
        self._rewarm = False
        self.stream = self._new_stream()
        self._last_x = None
        if len(self._history) == self.sink:
            self._warmup(list(self._history))
        else:
            self._warm = list(self._history)
        return ready

    def abandon_in_flight(self) -> list[int]:
        """After a failed frame: forget the frames in flight (their outputs will not come) and
        re-warm on recent frames at the next push. Returns the abandoned input indices."""
        lost = [i for group in self._pending for i in group]
        self._pending.clear()
        for i in lost:
            self._fits.pop(i, None)
        self._fits = {i: v for i, v in self._fits.items() if i >= self.frame_index}
        self._last_x = None
        self.stream = self._new_stream()
        self._warm = list(self._history) if len(self._history) < self.sink else []
        if len(self._history) == self.sink:
            self._rewarm_from_history = True
        self._rewarm = False
        return lost


def _prompt_fields(prompt) -> tuple[str, list[tuple[str, float]] | None]:
    """(the prompt as one line, the normalised blend or None) for a text or a blend."""
    if isinstance(prompt, str):
        return prompt, None
    try:
        blend = normalise(prompt)
    except BlendError as exc:
        raise ConfigError(str(exc)) from None
    if len(blend) == 1:
        return blend[0][0], None
    return format_notation(blend), blend
