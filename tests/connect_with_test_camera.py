"""Runs `live2diff-engine connect ...` with a pyvirtualcam backend registered under the name
'l2dtest' that keeps every frame it is sent and writes them to $L2D_TEST_CAMERA_OUT (.npy, an
array [n, h, w, 3]) when the camera closes. For the connect tests: the real command in a process
of its own, publishing into a real pyvirtualcam Camera.

    python connect_with_test_camera.py URL --sink virtualcam:l2dtest ...
"""

import os
import sys

import numpy as np
import pyvirtualcam


class KeepingBackend:
    def __init__(self, width, height, fps, fourcc, device, **kw):
        self.width, self.height = width, height
        self.frames = []

    def send(self, frame):
        self.frames.append(np.array(frame, copy=True).reshape(self.height, self.width, 3))

    def close(self):
        out = os.environ["L2D_TEST_CAMERA_OUT"]
        np.save(out + ".tmp.npy", np.stack(self.frames) if self.frames else np.zeros((0, self.height, self.width, 3), np.uint8))
        os.replace(out + ".tmp.npy", out)

    def device(self):
        return "l2dtest-device"

    def native_fourcc(self):
        return None


pyvirtualcam.register_backend("l2dtest", KeepingBackend)

if __name__ == "__main__":
    from live2diff_engine.cli import main

    sys.exit(main(["connect", *sys.argv[1:]]))
