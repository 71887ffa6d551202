"""`live2diff-engine translate`: a video file (or image folder) stylised into a video file."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def add_parser(sub) -> None:
    from ..options import add_model_args

    tr = sub.add_parser(
        "translate",
        help="stylise a video file (or image folder) into a video file",
        description="Run every frame of INPUT through the streaming model and write OUTPUT with exactly as many "
        "frames. The first 8 (the warmup) are the input, framed as the later frames are (see --fit).",
    )
    tr.add_argument("input", metavar="INPUT", help="video file or folder of images")
    tr.add_argument("output", metavar="OUTPUT", help="video file to write (.mp4, .avi, .mkv)")
    tr.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's, 30 for images)")
    tr.add_argument("--prompt-at", action="append", type=_prompt_at, default=[], metavar="FRAME:PROMPT",
                    help="change the prompt at input frame FRAME (repeatable; a blend 'a:0.7|b:0.3' too), as a live "
                    "prompt change would: to compare transitions with `eval`")
    tr.add_argument("--transition", type=float, default=0.0, metavar="SECONDS",
                    help="--prompt-at changes move in over this many seconds of the video (0-10; default 0: at once)")
    add_model_args(tr)


def _prompt_at(text: str) -> tuple[int, str]:
    frame, sep, prompt = text.partition(":")
    if not sep or not frame.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--prompt-at takes FRAME:PROMPT, e.g. 60:'a neon city', got {text!r}")
    return int(frame), prompt


def _cmd_translate(args) -> int:
    import os
    from pathlib import Path

    from tqdm.auto import tqdm

    from ..assemble import build_frame_pipeline, picture_note, preflight

    preflight(args)  # option values, model paths, the models to download: before torch loads
    from ..io.sources import open_frames
    from ..io.video import VideoWriter, frames_word

    from ..assemble import prompt_of
    from ..pipeline.blend import BlendError, check_transition

    try:
        transition = check_transition(args.transition, "--transition")
    except BlendError as exc:
        raise ConfigError(str(exc)) from None
    changes = {frame: prompt_of(argparse.Namespace(prompt=text)) for frame, text in args.prompt_at}
    source = open_frames(args.input, fps=args.fps)  # a damaged file: one line of ours, FFmpeg's held back
    if not args.output.lower().endswith((".mp4", ".m4v", ".mov", ".avi", ".mkv")):
        raise ConfigError(f"output {args.output} must be a video file ending in .mp4, .avi or .mkv")
    comps, frames, manager, style = build_frame_pipeline(args)
    frames.frame_rate = source.fps  # transitions in the video's time: the same frames every run
    print(f"model: {comps.label}; style: {style.name}; {frames.steps} denoising steps{picture_note(frames)}", file=sys.stderr,
          flush=True)
    # Written beside the output under another name and renamed when complete: a translate that
    # fails (or is interrupted) leaves no half-written file, nor a damaged earlier one.
    final = Path(args.output)
    partial = final.with_name(f"{final.stem}.partial{final.suffix}")
    writer = None
    expected = 0
    done = False
    try:
        with tqdm(total=source.length, unit="frame", desc="translate") as bar:
            for n, frame in enumerate(source):
                if n in changes:
                    frames.set_prompt(changes[n], transition)
                if writer is None:
                    size = args.output_size or (frame.shape[1], frame.shape[0])
                    frames.output_size = size
                    writer = VideoWriter(partial, source.fps, size)
                for index, image in frames.push(frame):
                    if index != expected:
                        raise RuntimeError(f"frame order broken: got {index}, expected {expected}")
                    writer.write(image)
                    expected += 1
                bar.update(1)
            for index, image in frames.flush():
                writer.write(image)
                expected += 1
        done = True
    finally:
        source.close()
        if writer is not None:
            writer.close()
            if done:
                os.replace(partial, final)
            else:
                partial.unlink(missing_ok=True)
                print(f"live2diff-engine: translate did not finish; no output written to {final}", file=sys.stderr, flush=True)
    if writer is None:
        raise ConfigError(f"{args.input} holds no frames")
    print(f"wrote {frames_word(writer.count)} to {args.output}", file=sys.stderr)
    return 0


COMMANDS = {"translate": (add_parser, _cmd_translate)}
