"""The /studio page in a real headless Chromium with its fake camera, against a real `serve`
(tiny model): the webcam goes to the engine over WebRTC, stylised frames come back beside it,
and the page's controls change the prompt and send a style picture over the data channel.

Needs Debian's chromium and chromedriver (selenium never downloads a browser or driver here):
without them the test skips, except under CI=true where it fails.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from test_dock import CHROMEDRIVER, CHROMIUM, _need_browser, by_id, wait_for
from test_remote import WAIT, Server

pytestmark = pytest.mark.browser

# The mean difference of the two pictures, drawn at one size (the stylised one comes back at the
# camera's size); -1 while either has no frame yet.
DIFF_JS = """
const a = document.getElementById('local'), b = document.getElementById('remote');
if (!a.videoWidth || !b.videoWidth) return -1;
const w = 64, h = 48, c = document.createElement('canvas'); c.width = w; c.height = h;
const g = c.getContext('2d', {willReadFrequently: true});
g.drawImage(a, 0, 0, w, h); const pa = g.getImageData(0, 0, w, h).data;
g.drawImage(b, 0, 0, w, h); const pb = g.getImageData(0, 0, w, h).data;
let s = 0; for (let i = 0; i < pa.length; i += 4) s += Math.abs(pa[i] - pb[i]) + Math.abs(pa[i+1] - pb[i+1]) + Math.abs(pa[i+2] - pb[i+2]);
return s / (w * h * 3);
"""


@pytest.fixture(scope="module")
def server():
    s = Server("--ip-adapter")  # style pictures on (a tiny random adapter): none until the page sends one
    yield s
    s.stop()


def studio_browser(tmp_path_factory, network_log: bool = False, extra_args=()):
    """A headless Chromium with the fake camera; ``network_log``: its log of every request sent
    (``driver.get_log("performance")``); ``extra_args``: more command-line switches."""
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                # 127.0.0.1 among the page's ICE candidates (Chromium leaves loopback out otherwise):
                # the engine takes only loopback candidates in the tests (LIVE2DIFF_ICE_LOOPBACK).
                "--allow-loopback-in-peer-connection",
                "--window-size=900,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", *extra_args):
        opts.add_argument(arg)
    if network_log:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    driver = studio_browser(tmp_path_factory)
    try:
        yield driver
    finally:
        driver.quit()


def engine_status(server) -> dict:
    with urllib.request.urlopen(server.url + "/api/status", timeout=30) as resp:
        return json.loads(resp.read())


def test_studio_sends_the_webcam_and_shows_stylised_frames_and_its_controls_change_the_prompt(server, browser):
    d = browser
    d.get(f"{server.url}/studio?w=160&h=120")
    by_id(d, "start").click()
    wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "connected", WAIT, "the page to connect")
    wait_for(lambda: d.execute_script("return document.getElementById('remote').videoWidth") > 0, WAIT, "returned frames")
    # The first frame back is the engine's "connected" card, at its own size: wait for the stream's.
    same_size = ("const r = document.getElementById('remote'), l = document.getElementById('local'); "
                 "return r.videoWidth == l.videoWidth && r.videoHeight == l.videoHeight && l.videoWidth > 0")
    wait_for(lambda: d.execute_script(same_size), WAIT, "the returned stream at the camera's size")
    # Past the warmup (the camera as it is) the engine's frames are not the camera's.
    diffs = []

    def differs():
        diffs.append(d.execute_script(DIFF_JS))
        return diffs[-1] > 50  # the camera passed through (warmup, codecs) differs by about 15, the model's by 90

    wait_for(differs, WAIT, "returned frames that differ from the camera")
    # The first frame back is the engine's "connected" card; the stream is at the camera's size.
    size = d.execute_script("const v = document.getElementById('remote'); return [v.videoWidth, v.videoHeight]")
    local = d.execute_script("const v = document.getElementById('local'); return [v.videoWidth, v.videoHeight]")

    t = d.execute_script("return document.getElementById('remote').currentTime")
    wait_for(lambda: d.execute_script("return document.getElementById('remote').currentTime") > t, WAIT, "the video to move on")
    wait_for(lambda: by_id(d, "f-state").text.strip() == "streaming", WAIT, "the status over the data channel")
    # The engine's view of this page's link (remote/link.py), over the same channel: type, RTT, ..., codec.
    wait_for(lambda: re.match(r"Link: (host|srflx) \u00b7 RTT \d+ ms \u00b7 loss [\d.]+% in, [\d.]+% out \u00b7 jitter "
                              r"\d+ ms \u00b7 \d+ kbps out, \d+ in \u00b7 VP8$", by_id(d, "link").text.strip()),
             WAIT, "the link line")

    box = by_id(d, "prompt")
    box.clear()
    box.send_keys("a paper lantern")
    by_id(d, "prompt-apply").click()
    wait_for(lambda: engine_status(server).get("prompt") == "a paper lantern", WAIT, "the engine's prompt")
    wait_for(lambda: by_id(d, "prompt").get_attribute("value") == "a paper lantern", WAIT, "the page's prompt")

    by_id(d, "stop").click()
    wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "disconnected", WAIT, "the page to stop")
    deadline = time.monotonic() + WAIT
    while not any(" ended: ended by the client" in l for l in server.lines):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    print(f"\ncamera {local}, returned {size}, differences seen {[round(x, 1) for x in diffs[-3:]]}")
    assert size == local


def test_studio_says_busy_and_retries_after_the_engines_retry_after_when_every_slot_is_in_use(server, browser):
    """`serve` (one stream at a time) busy with another client: the page's start gets 503 and
    shows "busy, retrying in N s" (N: the Retry-After), then gets in by itself once the slot frees."""
    import subprocess
    import sys

    from conftest import ROOT

    d = browser
    wait_for(lambda: engine_status(server).get("state") == "waiting for a stream", WAIT, "no stream on the engine")
    other = subprocess.Popen([sys.executable, str(ROOT / "tests" / "whip_client.py"), server.url],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_for(lambda: engine_status(server).get("state") not in (None, "waiting for a stream"), WAIT,
                 "the other client's stream")
        d.get(f"{server.url}/studio?w=160&h=120")
        by_id(d, "start").click()
        wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "busy", WAIT, "the page to say busy")
        assert re.fullmatch(r"busy, retrying in \d+ s", by_id(d, "conn").text.strip()), by_id(d, "conn").text
        other.terminate()  # its stream ends: the page's next try gets the slot
        wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "connected", WAIT,
                 "the page to get in by itself")
    finally:
        if other.poll() is None:
            other.kill()
        other.wait()
    by_id(d, "stop").click()
    wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "disconnected", WAIT, "the page to stop")


def test_studio_sends_a_style_picture_over_the_data_channel_and_clears_it(server, browser, tmp_path):
    """A picture chosen on the page goes to the engine as bytes over the data channel, in pieces
    (remote/picture.py): the engine's status says it is in use, and Clear drops it."""
    import cv2
    import numpy as np

    d = browser
    d.get(f"{server.url}/studio?w=160&h=120")
    by_id(d, "start").click()
    wait_for(lambda: by_id(d, "f-state").text.strip() == "streaming", WAIT, "the status over the data channel")
    wait_for(lambda: by_id(d, "picture-state").text.strip() == "No picture", WAIT, "the picture control")
    look = tmp_path / "look.png"  # noise: a PNG of several data-channel messages
    look.write_bytes(cv2.imencode(".png", np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8))[1].tobytes())
    assert look.stat().st_size > 3 * 64 * 1024
    by_id(d, "picture-file").send_keys(str(look))
    wait_for(lambda: engine_status(server).get("style_image") == "upload", WAIT, "the engine to take the picture")
    wait_for(lambda: by_id(d, "picture-state").text.strip() == "In use: the picture you sent", WAIT, "the page to say so")
    assert by_id(d, "toast").text.strip() == "", by_id(d, "toast").text
    by_id(d, "picture-clear").click()
    wait_for(lambda: engine_status(server).get("style_image") is None, WAIT, "the picture cleared")
    wait_for(lambda: by_id(d, "picture-state").text.strip() == "No picture", WAIT, "the page to say so")
    by_id(d, "stop").click()
    wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "disconnected", WAIT, "the page to stop")
