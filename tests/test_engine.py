"""The live engine with the tiny model: sources, sinks, pacing, faults, and a long soak."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyvirtualcam
import pytest

from conftest import ROOT, run_cli
from live2diff_engine.engine import Engine
from live2diff_engine.io.sinks import FileSink, NullSink, VirtualCameraSink
from live2diff_engine.io.sources import Source, SourceEnded, SourceError, SyntheticSource
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.pipeline.frames import FramePipeline


class RecordingBackend:
    """A pyvirtualcam backend that keeps what it is sent (registered under the name 'l2dtest')."""

    instances = []

    def __init__(self, width, height, fps, fourcc, device, **kw):
        self.width, self.height, self.fps = width, height, fps
        self.frames = []
        self.closed = False
        RecordingBackend.instances.append(self)

    def send(self, frame):
        self.frames.append(np.array(frame, copy=True).reshape(self.height, self.width, 3))

    def close(self):
        self.closed = True

    def device(self):
        return "l2dtest-device"

    def native_fourcc(self):
        return None


pyvirtualcam.register_backend("l2dtest", RecordingBackend)


def digest(img):
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def make_engine(comps, source, sinks, size=(96, 80), seed=0, **kw):
    frames = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=seed, output_size=size)
    outputs = []
    for s in sinks:
        s.open(size[0], size[1], kw.pop("fps", 30.0) if "fps" in kw else 30.0)
    engine = Engine(frames, source, sinks, output_size=size, status=False, on_output=outputs.append, **kw)
    return engine, outputs


class ListSource(Source):
    """Frames from a list, in order (a stand-in for a video file that we can fault)."""

    def __init__(self, frames, fail_reads=(), fail_opens=0):
        self.frames = frames
        self.i = 0
        self.reads = 0
        self.fail_reads = set(fail_reads)
        self.fail_opens = fail_opens
        self.opens = 0
        self.name = "list"

    def open(self):
        self.opens += 1
        if 1 < self.opens <= 1 + self.fail_opens:
            raise SourceError("device gone")

    def read(self):
        self.reads += 1
        if self.reads in self.fail_reads:
            raise SourceError("read failed")
        if self.i >= len(self.frames):
            raise SourceEnded
        f = self.frames[self.i]
        self.i += 1
        return f


def synthetic_frames(n, seed=0, size=(96, 80)):
    src = SyntheticSource(size, 30.0, seed)
    return [src.read() for _ in range(n)]


def test_end_to_end_into_a_real_pyvirtualcam_camera_and_a_file(comps, tmp_path):
    RecordingBackend.instances.clear()
    vcam = VirtualCameraSink(backend="l2dtest", fps=120)
    out_file = tmp_path / "out.mp4"
    engine, outputs = make_engine(comps, SyntheticSource((96, 80), 30.0), [vcam, FileSink(str(out_file))], max_frames=24)
    assert engine.run(install_signals=False) == 0
    backend = RecordingBackend.instances[-1]
    assert backend.closed and backend.width == 96 and backend.height == 80
    assert len(outputs) == 24 and all(o.shape == (80, 96, 3) for o in outputs)
    assert len(backend.frames) == engine.stats.frames_published > 0
    assert all(f.shape == (80, 96, 3) for f in backend.frames)
    # The camera only ever shows engine outputs, in order (repeats allowed, it is paced).
    order = {digest(o): i for i, o in enumerate(outputs)}
    seen = [order[digest(f)] for f in backend.frames]
    assert seen == sorted(seen)
    assert len(set(seen)) >= 0.5 * len(outputs)
    import cv2

    cap = cv2.VideoCapture(str(out_file))
    written = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        written.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    assert len(written) == 24
    # The same frames, up to the codec's loss: each is far closer to its own output than to others.
    for i, (w, o) in enumerate(zip(written, outputs)):
        own = np.abs(w.astype(int) - o.astype(int)).mean()
        other = np.abs(w.astype(int) - outputs[(i + 12) % 24].astype(int)).mean()
        assert own < 12 and own < other, (i, own, other)


def test_same_seed_same_frames_and_no_look_ahead(comps):
    a_in = synthetic_frames(20, seed=1)
    b_in = a_in[:12] + synthetic_frames(8, seed=9)
    runs = []
    for frames in (a_in, a_in, b_in):
        engine, outputs = make_engine(comps, ListSource(frames), [NullSink()])
        engine.run(install_signals=False)
        runs.append([digest(o) for o in outputs])
    assert len(runs[0]) == 20 and runs[0] == runs[1]
    assert runs[2][:12] == runs[0][:12]
    assert runs[2][12:] != runs[0][12:]


class LiveListSource(ListSource):
    """The same, as a live source: read from the capture thread at a camera's pace."""

    live = True

    def read(self):
        time.sleep(1 / 30)
        return super().read()


@pytest.mark.parametrize("live", [False, True])
def test_a_source_that_fails_and_comes_back(comps, live):
    RecordingBackend.instances.clear()
    src = (LiveListSource if live else ListSource)(synthetic_frames(24), fail_reads={14}, fail_opens=2)
    vcam = VirtualCameraSink(backend="l2dtest", fps=120)
    engine, outputs = make_engine(comps, src, [vcam], retry_max_s=0.2)
    engine.run(install_signals=False)
    backend = RecordingBackend.instances[-1]
    assert engine.stats.source_failures == 1
    if live:  # the newest frame wins: some may be skipped, none is queued
        assert 12 <= len(outputs) + engine.stats.dropped and len(outputs) <= 24
    else:
        assert len(outputs) == 24  # every frame the source gave came out
    # While it was away the camera showed the 'no signal' card, never nothing.
    def is_card(f):  # the card's dark background covers most of it
        return (f == 24).all(axis=-1).mean() > 0.6

    cards = [f for f in backend.frames if is_card(f)]
    assert cards, "no 'no signal' card was shown"
    last_card = max(i for i, f in enumerate(backend.frames) if is_card(f))
    assert last_card < len(backend.frames) - 1  # and normal frames followed


def test_a_frame_that_raises_is_passed_through_and_the_stream_goes_on(comps):
    calls = {"n": 0}
    original = comps.vae.decode

    def flaky_decode(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("decoder hiccup")
        return original(*a, **k)

    frames_in = synthetic_frames(30)
    comps.vae.decode = flaky_decode
    try:
        engine, outputs = make_engine(comps, ListSource(frames_in), [NullSink()])
        engine.run(install_signals=False)
    finally:
        comps.vae.decode = original
    assert engine.stats.errors == 1 and "decoder hiccup" in engine.stats.last_error
    assert engine.stats.frames_in == 30
    assert len(outputs) == 30 - engine.stats.dropped
    failed = int(engine.stats.last_error.split()[1].rstrip(":"))
    assert any(np.array_equal(o, frames_in[failed]) for o in outputs)  # shown as it came in


def test_the_virtual_camera_shows_a_card_while_the_models_load():
    from live2diff_engine.cli import main

    RecordingBackend.instances.clear()
    rc = main(["run", "--model", "tiny", "--source", "synthetic", "--camera-size", "96x80",
               "--sink", "virtualcam:l2dtest", "--vcam-fps", "60", "--max-frames", "10"])
    assert rc == 0
    frames = RecordingBackend.instances[-1].frames
    assert frames and (frames[0] == 24).all(axis=-1).mean() > 0.6  # the dark card came first
    assert not (frames[-1] == 24).all(axis=-1).mean() > 0.6  # then the stream


def test_out_of_gpu_memory_is_one_clear_line(comps):
    import torch

    from live2diff_engine.errors import UserError

    original = comps.vae.decode

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    comps.vae.decode = oom
    try:
        engine, _ = make_engine(comps, ListSource(synthetic_frames(12)), [NullSink()])
        with pytest.raises(UserError, match="ran out of memory; lower --width/--height"):
            engine.run(install_signals=False)
    finally:
        comps.vae.decode = original


def test_missing_camera_unknown_sink_and_no_virtual_camera_are_one_line():
    def one_line(result, needle):
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        errors = [l for l in result.stderr.splitlines() if "error:" in l]
        assert len(errors) == 1 and needle in errors[0], result.stderr

    one_line(run_cli("run", "--model", "tiny", "--source", "camera:7", "--sink", "null"), "camera 7")
    one_line(run_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "hologram"), "unknown sink")
    if sys.platform.startswith("linux") and not any(p.startswith("video") for p in os.listdir("/dev")):
        one_line(run_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "virtualcam"), "modprobe v4l2loopback")


def test_sigint_stops_within_two_seconds_and_closes_the_file(tmp_path):
    out = tmp_path / "live.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "live2diff_engine", "run", "--model", "tiny", "--source", "synthetic",
         "--camera-size", "96x80", "--sink", "null", "--sink", f"file:{out}"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any("[streaming]" in l for l in lines):
        assert proc.poll() is None, "".join(lines)
        time.sleep(0.2)
    assert any("[streaming]" in l for l in lines), "".join(lines)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    rc = proc.wait(timeout=30)
    took = time.monotonic() - sent
    reader.join(timeout=5)
    assert rc == 0, "".join(lines)
    assert took < 2.0 + 1.0, f"stopped after {took:.1f} s"  # 2 s, plus interpreter exit
    import cv2

    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened() and cap.read()[0]


def test_soak_memory_stays_flat(comps):
    """2,000 frames: resident memory at the end within a generous bound of that after warmup."""
    from live2diff_engine.engine import rss_mb

    marks = {}

    def on_output(img, count=[0]):
        count[0] += 1
        if count[0] in (200, 2000):
            marks[count[0]] = rss_mb()

    frames = FramePipeline(comps, width=64, height=64, seed=0, output_size=(64, 64))
    engine = Engine(frames, SyntheticSource((64, 64), 30.0), [NullSink()], output_size=(64, 64), max_frames=2000,
                    status=False, on_output=on_output)
    engine.run(install_signals=False)
    assert engine.stats.frames_out == 2000
    growth = (marks[2000] - marks[200]) / marks[200]
    print(f"\nsoak: RSS after warmup {marks[200]:.1f} MB, after 2000 frames {marks[2000]:.1f} MB ({growth:+.2%})")
    assert growth < 0.15
