"""The frame pipeline: RGB frames of any size in, stylised RGB frames out.

Per frame: fit to the model size (centre-crop or letterbox), VAE-encode, estimate and encode depth
(normalised and encoded as the original does), one stream step, VAE-decode, and fit back to the
output size. The first 8 frames are the warmup: they are shown as they came in (the user sees
their camera, not black frames) and, once all 8 are there, denoised together to fill the cache.

Outputs trail inputs by ``T - 1`` stream calls. :meth:`FramePipeline.push` returns the frames
that became ready as ``(input index, image)`` pairs in input order, and :meth:`flush` finishes the
ones still in flight, so a file gets exactly one output per input frame.

Changes that alter the schedule (steps, strength) or ask for a reset are applied at the next
frame: frames in flight are finished first, then the stream re-warms on the last 8 frames it saw,
so the picture never stops for a new warmup.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.components import Components
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
    if mode == "crop":
        scale = max(dst_w / src_w, dst_h / src_h)
        w, h = min(src_w, round(dst_w / scale)), min(src_h, round(dst_h / scale))
        return Fit(mode, ((src_w - w) // 2, (src_h - h) // 2, w, h), (0, 0, dst_w, dst_h))
    if mode == "letterbox":
        scale = min(dst_w / src_w, dst_h / src_h)
        w, h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        return Fit(mode, (0, 0, src_w, src_h), ((dst_w - w) // 2, (dst_h - h) // 2, w, h))
    raise ConfigError(f"unknown fit mode {mode!r}; use crop or letterbox")


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    if img.shape[1] == w and img.shape[0] == h:
        return img
    shrink = w < img.shape[1] and h < img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fit_frame(frame: np.ndarray, w: int, h: int, mode: str) -> tuple[np.ndarray, Fit]:
    fit = fit_rect(frame.shape[1], frame.shape[0], w, h, mode)
    sx, sy, sw, sh = fit.src_rect
    dx, dy, dw, dh = fit.dst_rect
    part = _resize(np.ascontiguousarray(frame[sy : sy + sh, sx : sx + sw]), dw, dh)
    if (dw, dh) == (w, h):
        return part, fit
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    canvas[dy : dy + dh, dx : dx + dw] = part
    return canvas, fit


def unfit_frame(img: np.ndarray, fit: Fit, out_w: int, out_h: int) -> np.ndarray:
    """Model-size picture back to an output frame: the content, scaled to cover the output."""
    dx, dy, dw, dh = fit.dst_rect
    content = img[dy : dy + dh, dx : dx + dw]
    return fit_frame(content, out_w, out_h, "crop")[0]


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
    """RGB uint8 frames in, RGB uint8 frames out, through the streaming Live2Diff model."""

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
    ):
        factor = comps.vae_scale_factor
        if width % factor or height % factor or width < factor or height < factor:
            raise ConfigError(f"model size {width}x{height} must be positive multiples of {factor} (e.g. 512x512, 768x512)")
        fit_rect(1, 1, 1, 1, fit)  # validates the mode
        if similarity_threshold is not None and not 0.0 < similarity_threshold < 1.0:
            raise ConfigError(f"similarity threshold must be between 0 and 1, got {similarity_threshold}")
        self.comps = comps
        self.width, self.height, self.fit = width, height, fit
        self.output_size = output_size
        self.similarity_threshold = similarity_threshold
        self.max_skip = max_skip
        self.prompt, self.template, self.clip_skip = prompt, template, clip_skip
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
        self._embeds = self._encode(prompt)
        self.stream = self._new_stream()
        self.frame_index = 0
        self._warm: list[torch.Tensor] = []  # preprocessed images waiting for the warmup
        self._history: deque[torch.Tensor] = deque(maxlen=self.sink)  # last frames seen, to re-warm from
        self._pending: deque[list[int]] = deque()  # input indices per call whose output is in flight
        self._fits: dict[int, tuple[Fit, tuple[int, int]]] = {}
        self._last_x: torch.Tensor | None = None
        self._last_output: np.ndarray | None = None
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
        stream = StreamPipeline(self.comps.unet, schedule, (lh, lw), generator=self.generator, guidance_scale=self.guidance_scale)
        stream.set_prompt_embeds(self._embeds)
        stream.set_negative_embeds(self._negative)
        return stream

    def _encode_negative(self, text: str) -> torch.Tensor:
        """The unconditional branch's text: the negative prompt as typed (no style template)."""
        return encode_prompt(self.comps.tokenizer, self.comps.text_encoder, text, self.clip_skip).to(self.comps.dtype)

    def _encode(self, prompt: str) -> torch.Tensor:
        text = apply_template(self.template, prompt)
        return encode_prompt(self.comps.tokenizer, self.comps.text_encoder, text, self.clip_skip).to(self.comps.dtype)

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

    def set_prompt(self, prompt: str) -> None:
        """New text between frames: no re-warmup, the stream goes on."""
        self._embeds = self._encode(prompt)
        self.prompt = prompt
        self.stream.set_prompt_embeds(self._embeds)

    def set_negative_prompt(self, text: str) -> None:
        """What the picture should not show; it steers the frames when the guidance scale is above 1."""
        self._negative = self._encode_negative(text)
        self.negative_prompt = text
        self.stream.set_negative_embeds(self._negative)

    def set_guidance(self, scale: float) -> None:
        """Classifier-free guidance scale (1: none, the original's default; above 1 the negative
        prompt takes effect, at about twice the UNet cost); applied with a re-warmup at the next frame."""
        _check_guidance(scale)
        self.guidance_scale = float(scale)
        self._rewarm = True

    def set_text_style(self, template: str | None, clip_skip: int) -> None:
        old = (self.template, self.clip_skip)
        self.template, self.clip_skip = template, clip_skip
        try:
            self.set_prompt(self.prompt)
            self.set_negative_prompt(self.negative_prompt)
        except Exception:
            self.template, self.clip_skip = old
            raise

    def set_schedule(self, num_inference_steps: int = 50, t_index_list=None, strength=None) -> None:
        """Change the denoising steps; applied (with a re-warmup on recent frames) at the next frame."""
        make_schedule(num_inference_steps, t_index_list=t_index_list, strength=strength)  # validate now
        self._schedule_args = (num_inference_steps, t_index_list, strength)
        self._rewarm = True

    def set_seed(self, seed: int) -> None:
        self.seed = seed
        self.generator.manual_seed(seed)

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

    # -- tensors -----------------------------------------------------------------------------

    def _to_tensor(self, img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(img).to(self.comps.device).permute(2, 0, 1).unsqueeze(0)
        return (t.to(self.comps.dtype) / 127.5 - 1.0).contiguous()

    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.comps.vae
        latents = retrieve_latents(vae.encode(x), generator=self.generator)
        return latents * getattr(vae.config, "scaling_factor", 1.0)

    def _encode_depth(self, x: torch.Tensor) -> torch.Tensor:
        """Depth of a batch, normalised over the batch to [-1, 1] as 3 channels, VAE-encoded."""
        raw = self.comps.depth(x).float()
        lo, hi = raw.amin(), raw.amax()
        norm = (raw - lo) / (hi - lo).clamp_min(1e-6)
        img = norm[:, None].repeat(1, 3, 1, 1) * 2 - 1
        img = F.interpolate(img, (x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
        return self._encode_images(img.to(self.comps.dtype))

    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        vae = self.comps.vae
        img = vae.decode(latent / getattr(vae.config, "scaling_factor", 1.0), return_dict=False)[0]
        img = ((img[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(1, 2, 0).cpu().numpy()

    # -- frames ------------------------------------------------------------------------------

    def _out_size(self, frame: np.ndarray) -> tuple[int, int]:
        return self.output_size or (frame.shape[1], frame.shape[0])

    def _emit(self, indices: list[int], model_img: np.ndarray) -> list[tuple[int, np.ndarray]]:
        out = []
        for i in indices:
            fit, (ow, oh) = self._fits.pop(i)
            out.append((i, unfit_frame(model_img, fit, ow, oh)))
        if out:
            self._last_output = out[-1][1]
        return out

    def _warmup(self, images: list[torch.Tensor]) -> None:
        x = torch.cat(images)
        clean = self._encode_images(x)
        x_t = self.stream.add_noise(clean)
        depth = self._encode_depth(x)
        self.stream.prepare(x_t, depth, self._embeds)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        clean = self._encode_images(x)
        x_t = self.stream.add_noise(clean)
        depth = self._encode_depth(x)
        return self.stream.step(x_t, depth)

    def _finish_call(self, latent: torch.Tensor) -> list[tuple[int, np.ndarray]]:
        if len(self._pending) <= self.stream.lag:
            return []
        return self._emit(self._pending.popleft(), self._decode(latent))

    @torch.no_grad()
    def push(self, frame: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Feed one frame; returns the frames that became ready, as (input index, RGB image)."""
        frame = check_frame(frame)
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
        x = self._to_tensor(model_img)

        if self.warming_up:
            self._warm.append(x)
            self._history.append(x)
            ready += self._emit([index], model_img)  # the camera as it is, until the stream is warm
            if len(self._warm) == self.sink:
                self._warmup(self._warm)
                self._warm = []
            return ready

        if self._similar(x):
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
        return ready

    def _last_output_model(self) -> np.ndarray:
        # The previous output in model size, so that it goes through the same unfit as any other.
        return fit_frame(self._last_output, self.width, self.height, "crop")[0]

    def _similar(self, x: torch.Tensor) -> bool:
        if self.similarity_threshold is None or self._last_x is None:
            return False
        if self._skipped >= self.max_skip:
            self._skipped = 0
            return False
        a, b = x.flatten().float(), self._last_x.flatten().float()
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
