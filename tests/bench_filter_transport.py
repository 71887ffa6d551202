"""Manual measurement (not a test): what each way into OBS adds per frame, the model left out.

    PYTHONPATH=. python tests/bench_filter_transport.py [--frames 200]

* filter path: an RGBA frame over loopback TCP to the engine's FilterLink, read there as the
  engine's source does, sent back as the engine's FilterSink does (the "model" is the identity),
  received by a client speaking the filter's wire. Both directions: the filter brings the frame.
* Media Source (MJPEG) path: a frame handed to the engine's local stream (StreamSink), JPEG-encoded
  by the API, read from /stream.mjpg over loopback HTTP and decoded with OpenCV (OBS's Media Source
  decodes with FFmpeg). One direction: on that path the engine owns the camera.

Latency: wall time from the frame handed over to the frame decoded on the other side (median, p95).
CPU: this process's CPU time per frame (both ends run here). Results go in BENCHMARKS.md."""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import threading
import time

import cv2
import numpy as np

from live2diff_engine.control.api import ApiServer
from live2diff_engine.io.obs_filter import HEADER, KIND_FRAME, FilterLink


def _exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def filter_path(frames: list[np.ndarray]) -> tuple[list[float], float]:
    link = FilterLink(0).start()
    stop = threading.Event()

    def engine():  # the engine's source and sink, the model being the identity
        taken = -1
        while not stop.is_set():
            got = link.next_frame(taken, 0.2)
            if got is not None:
                taken, rgb, stamp = got
                link.send_frame(rgb, stamp)

    threading.Thread(target=engine, daemon=True).start()
    sock = socket.create_connection(("127.0.0.1", link.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    cpu0 = time.process_time()
    for i, rgb in enumerate(frames, 1):
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])  # the filter maps RGBA from the GPU
        sock.sendall(HEADER.pack(b"L2DF", KIND_FRAME, w, h, i, w * h * 4, 1) + rgba.tobytes())
        while True:
            _, kind, fw, fh, stamp, length, _ = HEADER.unpack(_exact(sock, HEADER.size))
            payload = _exact(sock, length)
            if kind == KIND_FRAME and stamp == i:
                break
        np.frombuffer(payload, np.uint8).reshape(fh, fw, 4)
        lat.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / len(frames)
    stop.set()
    sock.close()
    link.close()
    return lat, cpu


def mjpeg_path(frames: list[np.ndarray]) -> tuple[list[float], float]:
    api = ApiServer("127.0.0.1", 0).start()
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    conn.request("GET", "/stream.mjpg?client=obs")
    resp = conn.getresponse()
    buf = bytearray()

    def next_jpeg() -> bytes:
        while True:
            start = buf.find(b"\xff\xd8")
            end = buf.find(b"\xff\xd9", start + 2) if start >= 0 else -1
            if end >= 0:
                jpg = bytes(buf[start:end + 2])
                del buf[:end + 2]
                return jpg
            buf.extend(resp.read1(65536))

    api.stream.send(frames[0])
    next_jpeg()  # the stream is open and flowing
    lat = []
    cpu0 = time.process_time()
    for rgb in frames:
        t0 = time.perf_counter()
        api.stream.send(rgb)
        img = cv2.imdecode(np.frombuffer(next_jpeg(), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None
        lat.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / len(frames)
    conn.close()
    api.stop()
    return lat, cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=200)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for w, h in ((512, 512), (64, 64)):
        base = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (0, 0), 3)  # camera-like, not white noise
        frames = [np.roll(base, i, axis=1).copy() for i in range(args.frames)]
        for name, fn in (("filter (TCP, RGBA both ways)", filter_path), ("Media Source (MJPEG, one way)", mjpeg_path)):
            lat, cpu = fn(frames)
            lat_ms = sorted(x * 1000 for x in lat)
            print(f"{w}x{h} {name}: latency median {statistics.median(lat_ms):.2f} ms, p95 "
                  f"{lat_ms[int(len(lat_ms) * 0.95) - 1]:.2f} ms; CPU {cpu * 1000:.2f} ms per frame", flush=True)


if __name__ == "__main__":
    main()
