"""``live2diff-engine eval INPUT [OUTPUT...]``: measure stylised videos against their input.

The measuring is :mod:`.quality` (it reads videos only). What this adds: the options, finding the
models the metrics look through (never downloading them), and ``--compare per-frame``, which
makes the baseline video first: the same model, style and steps through the frame pipeline with
``temporal=False`` (every frame denoised on its own), written to a file that is then measured
like any other output.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..options import add_model_args, int_list, resolve_device
from ..errors import ConfigError


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def add_parser(sub) -> argparse.ArgumentParser:
    ev = sub.add_parser(
        "eval",
        help="measure stylised videos against their input: warp error, CLIP consistency, depth MSE, flicker, X-T slices",
        description="Compare each OUTPUT (a stylised version of INPUT, from `translate` or any other tool) with INPUT, "
        "frame by frame: warp error (lower is better), CLIP temporal consistency (higher), depth MSE (lower) and "
        "flicker (lower). Prints a table; --json writes every per-frame value, --slices writes X-T / Y-T slices and "
        "per-frame plots. --depth chooses the depth estimator of depth MSE (as for translate). --compare per-frame also runs the model with no temporal attention on INPUT and measures "
        "that beside the outputs (give it the model and style options you gave `translate`).",
    )
    ev.add_argument("input", metavar="INPUT", help="the source video file (or folder of images)")
    ev.add_argument("outputs", metavar="OUTPUT", nargs="*", help="stylised versions of INPUT (video files or image folders)")
    ev.add_argument("--json", metavar="FILE", default=None, help="also write the means and every per-frame value as JSON")
    ev.add_argument("--slices", metavar="DIR", default=None,
                    help="write X-T and Y-T slices (input and outputs side by side) and a per-frame plot of each metric, as PNG")
    ev.add_argument("--rows", type=int_list, default=None, metavar="Y[,Y...]", help="rows for X-T slices, in input pixels (default: the middle)")
    ev.add_argument("--cols", type=int_list, default=None, metavar="X[,X...]", help="columns for Y-T slices (default: the middle)")
    ev.add_argument("--start", type=int, default=0, metavar="N",
                    help="leave out the first N frames (8 for `translate` outputs: its warmup frames are the input as it is)")
    ev.add_argument("--metrics", default=None, metavar="LIST", help="comma-separated choice of warp, clip, depth, flicker (default: all)")
    ev.add_argument("--clip", default="clip", metavar="MODEL",
                    help="CLIP model for the consistency: a folder, a hub id, or clip (default; `live2diff-engine models download clip`)")
    ev.add_argument("--compare", choices=["per-frame"], default=None,
                    help="per-frame: also stylise INPUT with every frame denoised on its own (no temporal attention) and measure it")
    ev.add_argument("--compare-output", metavar="FILE", default=None, help="keep the per-frame video in FILE (.mp4, .avi, .mkv)")
    add_model_args(ev)
    return ev


def _labels(paths: list[str]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    out = []
    for i, name in enumerate(names):
        label = name if names.count(name) == 1 else f"{name} ({names[:i + 1].count(name)})"
        out.append(label)
    return out


def _per_frame_video(args, dest: Path) -> tuple[int, int, int, int]:
    """The per-frame baseline of INPUT into ``dest``: translate's loop with ``temporal=False``.
    Returns where its picture lies in its frames (x, y, w, h): the pipeline's framing (in crop mode
    the centre it kept, between black bars where it cut), so that eval compares that area only."""
    from tqdm.auto import tqdm

    from ..assemble import build_frame_pipeline
    from ..io.video import FrameSource, VideoWriter
    from ..pipeline.frames import fit_rect

    args.accelerate = "off"  # the per-frame path runs eager; nothing to compile
    comps, frames, _, style = build_frame_pipeline(args, say=_say)
    frames.temporal = False
    _say(f"per-frame baseline: {comps.label}; style {style.name}; {frames.steps} denoising steps; no temporal attention")
    source = FrameSource(args.input)
    writer = None
    picture = None
    try:
        with tqdm(total=source.length, unit="frame", desc="per-frame") as bar:
            for frame in source:
                if writer is None:
                    size = args.output_size or (frame.shape[1], frame.shape[0])
                    frames.output_size = size
                    writer = VideoWriter(dest, source.fps, size)
                    # as unfit_frame places the model's content (the crop, or the picture inside the letterbox)
                    content = fit_rect(frame.shape[1], frame.shape[0], frames.width, frames.height, frames.fit).dst_rect
                    picture = fit_rect(content[2], content[3], size[0], size[1], "letterbox").dst_rect
                for _, image in frames.push(frame):
                    writer.write(image)
                bar.update(1)
    finally:
        source.close()
        if writer is not None:
            writer.close()
    if writer is None:
        raise ConfigError(f"{args.input} holds no frames")
    return picture


def cmd_eval(args) -> int:
    from tqdm.auto import tqdm

    from .. import quality
    from ..io.video import FrameSource
    from ..quality.evaluate import check_positions

    keys = quality.parse_metrics(args.metrics)
    if not args.outputs and not args.compare:
        raise ConfigError("nothing to measure: give OUTPUT videos, or --compare per-frame")
    if args.compare_output and not args.compare:
        raise ConfigError("--compare-output keeps the video of --compare per-frame; add --compare per-frame")
    if args.compare_output and not args.compare_output.lower().endswith((".mp4", ".m4v", ".mov", ".avi", ".mkv")):
        raise ConfigError(f"--compare-output {args.compare_output} must be a video file ending in .mp4, .avi or .mkv")
    if args.start < 0:
        raise ConfigError(f"--start must be 0 or more, got {args.start}")
    for name, target in (("--json", args.json), ("--compare-output", args.compare_output)):
        if target and not Path(target).expanduser().parent.is_dir():
            raise ConfigError(f"cannot write {name} {target}: the folder {Path(target).parent} does not exist")
        if target and Path(target).expanduser().is_dir():
            raise ConfigError(f"cannot write {name} {target}: it is a folder; give a file name")
    if args.slices:
        try:
            Path(args.slices).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the --slices folder {args.slices} ({exc.strerror or exc})") from None
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # a damaged file is our one line, not FFmpeg's too
    lengths = []
    for i, path in enumerate([args.input, *args.outputs]):  # unreadable files are one line before any model loads
        source = FrameSource(path)
        try:
            first = next(iter(source), None)
        finally:
            source.close()
        if first is None:
            raise ConfigError(f"{path} holds no frames")
        if i == 0:
            args.rows, args.cols = check_positions(args.rows, args.cols, (first.shape[1], first.shape[0]))
        lengths.append(source.length)
    known = [n for n in lengths if n]
    if known and args.start >= min(known):
        raise ConfigError(f"--start {args.start} leaves no frames to compare (the shortest video has {min(known)})")
    device = resolve_device(args.device)
    clip = depth = None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per small weight file is noise beside eval's own
    try:
        if "clip_consistency" in keys:
            folder = quality.locate(args.clip, "clip", "CLIP model for `eval`",
                                    "or pass --clip FOLDER, or leave CLIP out with --metrics warp,depth,flicker")
            clip = quality.load_clip(folder, device)
        if "depth_mse" in keys:
            depth = quality.load_depth_probe(args.depth, device, tiny_seed=args.seed if args.model == "tiny" else None)
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    outputs = list(zip(_labels(args.outputs), args.outputs))
    framing = {}  # the pictures whose framing eval knows (it made them); other outputs' bars are found
    with tempfile.TemporaryDirectory(prefix="live2diff-eval-") as tmp:
        if args.compare == "per-frame":
            dest = Path(args.compare_output) if args.compare_output else Path(tmp) / "per-frame.mp4"
            framing["per-frame"] = _per_frame_video(args, dest)
            outputs.append(("per-frame", str(dest)))
        total = min(known) - args.start if len(known) == len(lengths) else None
        with tqdm(total=total, unit="frame", desc="eval") as bar:
            ev = quality.evaluate(args.input, outputs, metrics=keys, clip=clip, depth=depth, rows=args.rows, cols=args.cols,
                                  start=args.start, progress=bar.update, say=lambda line: bar.write(line, file=sys.stderr),
                                  framing=framing)
    if args.compare and not args.compare_output:
        ev.videos[-1].path = "(not kept; --compare-output FILE keeps it)"
    print(quality.table(ev))
    if args.json:
        quality.write_json(ev, args.json)
        _say(f"wrote {args.json}")
    if args.slices:
        files = quality.write_pictures(ev, args.slices)
        _say(f"wrote {len(files)} pictures to {args.slices}: {', '.join(f.name for f in files)}")
    return 0


COMMANDS = {"eval": (add_parser, cmd_eval)}
