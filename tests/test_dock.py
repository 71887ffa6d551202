"""The dock page (plugin/) in a real headless Chromium against a real engine with the tiny model.

Needs Debian's chromium and chromedriver (selenium never downloads a browser or driver here):
without them the tests skip, except on CI (conftest.on_ci) where they fail.
"""

import json
import os
import threading
import time
import urllib.request

import pytest

from conftest import need
from live2diff_engine.control.api import ApiServer
from live2diff_engine.control.controller import Controller
from live2diff_engine.engine import Engine
from live2diff_engine.io.sources import SyntheticSource
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.models.ip_adapter import load_style_image_models
from live2diff_engine.pipeline.frames import FramePipeline
from live2diff_engine.styles import StyleManager, load_styles

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SIZE = (96, 80)


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    need(f"the dock test needs Debian's chromium and chromedriver and selenium; missing: {', '.join(missing)}" if missing else None,
         "apt-get install chromium chromium-driver")


class PacedSynthetic(SyntheticSource):
    """The synthetic pattern at a steady rate, so the engine leaves the CPU to the browser."""

    def read(self):
        time.sleep(1.0 / self.fps)
        return super().read()


class Running:
    def __init__(self, frames, manager, controller, api, engine, thread):
        self.frames, self.manager, self.controller = frames, manager, controller
        self.api, self.engine, self.thread = api, engine, thread


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A real engine (tiny model, synthetic source) with its local API on a free port."""
    import torch

    home = tmp_path_factory.mktemp("l2d_home")  # no user styles file, no downloaded style weights
    old_home = os.environ.get("LIVE2DIFF_HOME")
    os.environ["LIVE2DIFF_HOME"] = str(home)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores here: one for the engine, one for the browser
    comps = build_tiny_components(seed=0)
    load_style_image_models(comps)  # a random tiny IP-Adapter and image encoder: the dock's style picture
    frames = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=0, output_size=SIZE)
    styles = load_styles()
    manager = StyleManager(comps, styles)
    manager.current = styles["default"]
    api = ApiServer("127.0.0.1", 0).start()
    controller = Controller(frames, manager, label="tiny")
    api.set_controller(controller)
    engine = Engine(frames, PacedSynthetic(SIZE, fps=10.0), [api.stream], output_size=SIZE, status=False, controller=controller)
    thread = threading.Thread(target=engine.run, kwargs={"install_signals": False}, name="engine", daemon=True)
    thread.start()
    run = Running(frames, manager, controller, api, engine, thread)
    try:
        yield run
    finally:
        run.engine.stop()
        run.thread.join(20)
        run.api.stop()
        torch.set_num_threads(old_threads)
        if old_home is None:
            os.environ.pop("LIVE2DIFF_HOME", None)
        else:
            os.environ["LIVE2DIFF_HOME"] = old_home


@pytest.fixture(scope="module")
def browser(running, tmp_path_factory):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Service(path) and binary_location given: selenium skips selenium-manager (no download).
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=360,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(20)
    try:
        driver.get(f"{running.api.url}/dock")
        watch_connection(driver)
        PAGE[0] = driver
        yield driver
    finally:
        PAGE[0] = None
        driver.quit()


PAGE = [None]  # the browser, while there is one: a failed wait says what the dock's connection did


# Waiting is not judging: a busy machine may take long; only a wait that never ends is a failure.
WAIT_FLOOR_S = 60.0


def wait_for(fn, timeout=10.0, what="condition"):
    end = time.monotonic() + max(timeout, WAIT_FLOOR_S)
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
        except Exception as exc:  # an element being re-rendered
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r}){dock_state(PAGE[0])}")


def watch_connection(driver):
    """Keeps, in the page, the dock's connection states in order (for a failure's message)."""
    driver.execute_script("""
        const conn = document.getElementById('conn');
        window.l2dConnLog = [[Date.now(), conn.dataset.state]];
        new MutationObserver(() => {
          const log = window.l2dConnLog, state = conn.dataset.state;
          if (log[log.length - 1][1] !== state) log.push([Date.now(), state]);
        }).observe(conn, {attributes: true, attributeFilter: ['data-state']});
    """)


def dock_state(driver):
    """The dock's connection history and its message, or '' without a page."""
    if driver is None:
        return ""
    try:
        log = driver.execute_script("return window.l2dConnLog || []")
        toast = driver.execute_script("const t = document.getElementById('toast'); return t.hidden ? '' : t.textContent")
        now = driver.execute_script("return Date.now()")
    except Exception as exc:
        return f"; the dock's state could not be read ({exc})"
    seen = ", ".join(f"{state} {(now - at) / 1000:.1f} s ago" for at, state in log)
    return f"; the dock's connection: {seen}; its message: {toast!r}"


def by_id(driver, id_):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def text_of(driver, id_):
    return by_id(driver, id_).text.strip()


def connected(driver):
    wait_for(lambda: by_id(driver, "conn").get_attribute("data-state") == "connected", 15, "the dock to connect")
    wait_for(lambda: text_of(driver, "f-style") == "default", 10, "the status to show")


def live(driver):
    """Waits until the dock is connected: while it reconnects (a loaded machine can hold its status
    past the dock's stale limit) its controls are disabled and a click on them does nothing."""
    wait_for(lambda: by_id(driver, "conn").get_attribute("data-state") == "connected", 15, "the dock to be connected")


def press(driver, element):
    """Clicks a control of the dock once it is connected and the control enabled, as a user would."""
    live(driver)
    wait_for(lambda: element.is_enabled(), 5, "the control to be enabled")
    element.click()


def retype(element, text):
    """Replaces a field's text as a user does (select all, type) in one action that keeps the focus.
    WebDriver's clear() blurs the field and fires no input event, so a status update arriving
    between clear() and the typing would put the engine's value back in front of the new text."""
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a", Keys.NULL, text)


def statuses_shown(driver, n):
    """Waits until the page has shown ``n`` more statuses than now (its frame count, which every
    status moves on while the engine streams): the positive sign that time has passed for it."""
    start = int(text_of(driver, "f-frames"))
    seen = [start]

    def moved():
        now = int(text_of(driver, "f-frames"))
        if now != seen[-1]:
            seen.append(now)
        return len(seen) > n

    wait_for(moved, 15, f"{n} statuses in the page")


def style_button(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#styles button[data-style="{name}"]')


def test_dock_connects_and_shows_live_status(running, browser):
    d = browser
    connected(d)
    assert text_of(d, "conn") == "connected"
    wait_for(lambda: text_of(d, "f-state") == "streaming", 15, "the engine to stream")
    wait_for(lambda: int(text_of(d, "f-frames")) > 0, 15, "frames to count up")
    wait_for(lambda: float(text_of(d, "f-fps")) > 0, 15, "a frame rate above 0")
    wait_for(lambda: text_of(d, "f-latency").endswith(" ms"), 10, "a latency figure")
    # One button per style, the current one pressed.
    names = [b.get_attribute("data-style") for b in d.find_elements("css selector", "#styles button")]
    assert names == running.controller.style_names
    assert style_button(d, "default").get_attribute("aria-pressed") == "true"
    assert style_button(d, names[-1]).get_attribute("aria-pressed") == "false"
    assert by_id(d, "prompt").get_attribute("value") == "a cat"
    assert by_id(d, "strength-value").text == "0.36"
    assert by_id(d, "steps").get_attribute("value") == "2"
    assert by_id(d, "pause").text == "Pause"
    # Every control has an accessible name.
    for id_ in ("prompt", "negative", "guidance", "strength", "steps", "seed"):
        assert d.find_elements("css selector", f'label[for="{id_}"]'), id_
    # No inline handlers or scripts (CSP-friendly).
    assert d.execute_script(
        "return [...document.querySelectorAll('*')].some(e => [...e.attributes].some(a => a.name.startsWith('on')))"
        " || [...document.scripts].some(s => !s.src)"
    ) is False


def test_prompt_apply_history_and_edits_kept(running, browser):
    from selenium.webdriver.common.keys import Keys

    d = browser
    connected(d)
    box = by_id(d, "prompt")
    retype(box, "a watercolor fox")
    press(d, by_id(d, "prompt-apply"))
    wait_for(lambda: running.frames.prompt == "a watercolor fox", 10, "the engine's prompt")
    wait_for(lambda: d.find_elements("css selector", '#history button[data-prompt="a watercolor fox"]'), 5, "the history entry")
    stored = json.loads(d.execute_script("return localStorage.getItem('live2diff.dock.history')"))
    assert stored[0] == "a watercolor fox"

    # Ctrl+Enter applies too.
    retype(box, "an origami crane")
    live(d)
    box.send_keys(Keys.CONTROL, Keys.ENTER)
    wait_for(lambda: running.frames.prompt == "an origami crane", 10, "the prompt from Ctrl+Enter")
    wait_for(lambda: len(d.find_elements("css selector", "#history button")) == 2, 5, "two history entries")
    assert d.find_elements("css selector", "#history button")[0].get_attribute("data-prompt") == "an origami crane"

    # A prompt being typed survives the status that arrives every second (focused, then not):
    # judged once the page has shown two newer statuses (its frame count moved on twice).
    retype(box, "half typed")
    statuses_shown(d, 2)
    assert box.get_attribute("value") == "half typed"
    by_id(d, "seed").click()  # focus elsewhere: the edit is still not applied, so it stays
    statuses_shown(d, 2)
    assert box.get_attribute("value") == "half typed"
    assert running.frames.prompt == "an origami crane"

    # A history entry applies again.
    d.find_element("css selector", "#history-box summary").click()
    press(d, d.find_element("css selector", '#history button[data-prompt="a watercolor fox"]'))
    wait_for(lambda: running.frames.prompt == "a watercolor fox", 10, "the prompt from the history")
    wait_for(lambda: box.get_attribute("value") == "a watercolor fox", 5, "the box to show it")

    neg = by_id(d, "negative")
    retype(neg, "blurry")
    press(d, by_id(d, "negative-apply"))
    wait_for(lambda: running.frames.negative_prompt == "blurry", 10, "the negative prompt")


def test_settings_strength_steps_seed(running, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser
    connected(d)
    live(d)
    Select(by_id(d, "steps")).select_by_value("3")
    wait_for(lambda: running.controller.schedule()["steps"] == 3, 10, "3 steps")
    slider = by_id(d, "strength")
    live(d)
    slider.send_keys(Keys.END)  # to 1.0: a change event, as on release
    wait_for(lambda: running.controller.schedule()["strength"] == 1.0, 10, "strength 1")
    wait_for(lambda: by_id(d, "strength-value").text == "1.00", 5, "the strength shown")
    seed = by_id(d, "seed")
    retype(seed, "1234")
    press(d, by_id(d, "seed-apply"))
    wait_for(lambda: running.frames.seed == 1234, 10, "the seed")
    # A refused value shows its reason in the page (and never an alert()).
    retype(seed, "-5")
    press(d, by_id(d, "seed-apply"))
    wait_for(lambda: by_id(d, "toast").is_displayed() and "Seed" in text_of(d, "toast"), 5, "the seed error")
    assert running.frames.seed == 1234
    guidance = by_id(d, "guidance")
    retype(guidance, "1.5")
    press(d, by_id(d, "guidance-apply"))
    wait_for(lambda: running.frames.guidance_scale == 1.5, 10, "the guidance")
    retype(guidance, "1.0")
    live(d)
    guidance.send_keys(Keys.ENTER)
    wait_for(lambda: running.frames.guidance_scale == 1.0, 10, "guidance back to 1")


def test_styles_without_weights_are_marked_and_say_how_to_get_them(running, browser):
    d = browser
    connected(d)
    missing = running.controller.style_availability()[0]
    assert sorted(missing) == [n for n in running.controller.style_names if n != "default"]  # the six presets
    for name in running.controller.style_names:
        b = style_button(d, name)
        if name in missing:
            assert b.get_attribute("data-missing") == "true" and "missing" in b.get_attribute("class")
            assert b.get_attribute("aria-label") == f"{name} (not downloaded)"
            assert f"not downloaded: live2diff-engine models download --style {name}" in b.get_attribute("title")
        else:
            assert b.get_attribute("data-missing") is None
    other = sorted(missing)[0]
    sent = (running.controller.accepted, running.controller.refused)
    press(d, style_button(d, other))  # nothing to switch to: the page says how to get it
    wait_for(lambda: by_id(d, "style-fetch").is_displayed(), 5, "the how-to-get-it box")
    assert text_of(d, "style-fetch-command") == f"live2diff-engine models download --style {other}"
    assert other in text_of(d, "style-fetch-text")
    assert not by_id(d, "style-download").is_displayed()  # no civitai token in this engine
    assert "civitai token" in text_of(d, "style-fetch-note")
    statuses_shown(d, 2)  # two statuses later: still on the default style, nothing was sent
    assert (running.controller.accepted, running.controller.refused) == sent
    assert running.manager.current.name == "default" and text_of(d, "f-style") == "default"
    assert style_button(d, other).get_attribute("aria-pressed") == "false"
    by_id(d, "style-fetch-close").click()
    assert not by_id(d, "style-fetch").is_displayed()


def test_a_style_downloads_from_the_dock_with_its_progress(running, browser, monkeypatch):
    import http.server

    from live2diff_engine.styles import Style
    from test_style_availability import FILES, TOKEN, Civitai

    Civitai.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Civitai)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LIVE2DIFF_CIVITAI_URL", f"http://127.0.0.1:{server.server_address[1]}")
    styles = running.manager.styles
    styles["tinytoon"] = Style("tinytoon", "a test style", dreambooth="tinytoon_db.safetensors",
                               dreambooth_url="https://civitai.com/api/download/models/9001")
    running.controller.civitai_token = TOKEN
    d = browser
    try:
        connected(d)
        wait_for(lambda: style_button(d, "tinytoon").get_attribute("data-missing") == "true", 10, "the new style, marked")
        press(d, style_button(d, "tinytoon"))
        button = wait_for(lambda: by_id(d, "style-download").is_displayed() and by_id(d, "style-download"), 5, "Download")
        assert button.text == "Download tinytoon" and not by_id(d, "style-fetch-note").is_displayed()
        press(d, button)
        wait_for(lambda: "Downloading tinytoon" in text_of(d, "download-text"), 10, "the progress line")
        wait_for(lambda: float(by_id(d, "download-progress").get_attribute("value") or 0) > 0, 20, "the progress bar to move")
        assert by_id(d, "download-progress").get_attribute("max") == str(len(FILES["/api/download/models/9001"]))
        wait_for(lambda: "downloaded" in text_of(d, "download-text"), 60, "the download to finish")
        wait_for(lambda: style_button(d, "tinytoon").get_attribute("data-missing") is None, 10, "the style no longer marked")
        assert not by_id(d, "style-fetch").is_displayed()
        assert "downloaded" in text_of(d, "toast")
        assert TOKEN not in d.page_source
    finally:
        del styles["tinytoon"]
        running.controller.civitai_token = None
        server.shutdown()
        server.server_close()


def test_the_dock_shows_a_style_loading_while_the_current_one_streams(running, browser):
    """The engine reads a style's files beside the stream (status ``style_loading``); the loader is
    held here once they are read, so the page can be looked at while the load is under way."""
    from live2diff_engine.styles import Style

    styles = running.manager.styles
    styles["slowload"] = Style("slowload", "a style that takes its time", template="slow, {}")
    loaded, release = threading.Event(), threading.Event()

    def hold(style):
        loaded.set()
        assert release.wait(120)

    running.controller.style_load_hook = hold
    d = browser
    try:
        connected(d)
        wait_for(lambda: style_button(d, "slowload"), 10, "the new style's button")
        assert not by_id(d, "style-loading").is_displayed()
        press(d, style_button(d, "slowload"))
        assert loaded.wait(60), "the loader never ran"
        notice = wait_for(lambda: by_id(d, "style-loading").is_displayed() and text_of(d, "style-loading"), 15, "the loading line")
        assert notice == "Loading style slowload\u2026 default keeps streaming until it is in"
        button = style_button(d, "slowload")
        assert "loading" in button.get_attribute("class") and button.get_attribute("aria-busy") == "true"
        assert button.get_attribute("aria-pressed") == "false" and text_of(d, "f-style") == "default"
        frames = int(text_of(d, "f-frames"))
        wait_for(lambda: int(text_of(d, "f-frames")) > frames, 30, "frames to go on while it loads")
        release.set()
        wait_for(lambda: text_of(d, "f-style") == "slowload", 30, "the new style in place")
        # The reply says what the style changed beside the look, and the page shows it.
        said = wait_for(lambda: by_id(d, "toast").is_displayed() and text_of(d, "toast"), 15, "what the style changed")
        assert said.startswith("style slowload: ") and "prompt template '{}' -> 'slow, {}'" in said, said
        assert "ok" in by_id(d, "toast").get_attribute("class")
        wait_for(lambda: not by_id(d, "style-loading").is_displayed(), 10, "the loading line to go")
        button = style_button(d, "slowload")
        assert "loading" not in button.get_attribute("class") and button.get_attribute("aria-busy") is None
        assert button.get_attribute("aria-pressed") == "true"
    finally:
        release.set()
        running.controller.style_load_hook = None
        press(d, style_button(d, "default"))
        wait_for(lambda: running.manager.current.name == "default", 30, "the default style back")
        del styles["slowload"]


def test_pause_and_resume(running, browser):
    d = browser
    connected(d)
    button = by_id(d, "pause")
    press(d, button)
    wait_for(lambda: running.controller.paused, 10, "the engine to pause")
    wait_for(lambda: text_of(d, "f-state") == "paused", 5, "the page to show paused")
    assert button.text == "Resume" and button.get_attribute("aria-pressed") == "true"
    with urllib.request.urlopen(f"{running.api.url}/api/status", timeout=5) as r:
        assert json.load(r)["paused"] is True
    press(d, button)
    wait_for(lambda: not running.controller.paused, 10, "the engine to resume")
    wait_for(lambda: by_id(d, "pause").text == "Pause", 5, "the page to show it running")
    press(d, by_id(d, "reset"))
    wait_for(lambda: "Reset" in text_of(d, "toast") and "ok" in by_id(d, "toast").get_attribute("class"), 10, "the reset")
    by_id(d, "toast").click()  # dismissed by a click
    assert not by_id(d, "toast").is_displayed()


def test_websocket_from_a_foreign_origin_is_refused(running):
    import websocket

    url = running.api.url.replace("http://", "ws://") + "/api/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(url, origin="http://evil.example", timeout=5)
    assert err.value.status_code == 403
    ws = websocket.create_connection(url, origin=running.api.url, timeout=5)  # the dock's own origin
    try:
        assert json.loads(ws.recv())["kind"] == "status"
    finally:
        ws.close()


def test_dock_passes_the_page_token_on(running, browser):
    api = ApiServer("127.0.0.1", 0, token="tok-dock-42").start()
    try:
        api.set_controller(running.controller)
        d = browser
        d.get(f"{api.url}/dock?token=tok-dock-42")
        wait_for(lambda: by_id(d, "conn").get_attribute("data-state"), 5, "dock.js to load (with the token)")
        connected(d)  # the WebSocket needs the token: connected means it was passed on
    finally:
        api.stop()
        browser.get(f"{running.api.url}/dock")
        watch_connection(browser)


def test_dock_reconnects_when_the_engine_api_restarts(running, browser):
    d = browser
    connected(d)
    port = running.api.port
    wait_for(lambda: text_of(d, "f-fps") not in ("", "\u2013"), 10, "a frame rate")
    running.api.stop()
    wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "disconnected", 10, "the dock to notice")
    assert "retry" in text_of(d, "conn")
    # Its last word was 'stopped': no frame rate or latency stays on show from before.
    assert text_of(d, "f-state") == "stopped"
    assert (text_of(d, "f-fps"), text_of(d, "f-latency")) == ("\u2013", "\u2013")
    assert by_id(d, "prompt-apply").get_attribute("disabled") is not None
    api = ApiServer("127.0.0.1", port).start()
    running.api = api  # stopped by the fixture
    api.set_controller(running.controller)
    connected(d)
    assert by_id(d, "prompt-apply").get_attribute("disabled") is None


def test_a_connection_that_goes_quiet_is_replaced(running, browser):
    """An engine that freezes with its socket still open (here: its API's event loop held, as a
    hung process or a machine waking from sleep holds it) sends nothing: the dock says so within
    its 10 s limit and connects again once the engine answers, with no reload."""
    d = browser
    connected(d)
    release = threading.Event()
    running.api._loop.call_soon_threadsafe(release.wait, 120)  # nothing is sent while this holds
    try:
        wait_for(lambda: by_id(d, "conn").get_attribute("data-state") == "disconnected", 40, "the dock to notice the silence")
        assert by_id(d, "prompt-apply").get_attribute("disabled") is not None
    finally:
        release.set()
    connected(d)
    assert by_id(d, "prompt-apply").get_attribute("disabled") is None


def test_the_dock_says_when_obs_does_not_pull_the_stream(running, browser):
    """'OBS connected' is not 'OBS shows the output': the engine's source in OBS may exist and read
    nothing. Against the protocol-faithful obs-websocket server of tests/fake_obs.py, which reads
    no stream (the real OBS pulling it: tests/test_obs_real.py)."""
    from fake_obs import FakeOBS

    from live2diff_engine.control.obs import ObsBridge

    connected(browser)
    with FakeOBS(password="dock-pw") as fake:
        bridge = ObsBridge(running.controller, "127.0.0.1", fake.port, "dock-pw", output_url=running.api.url,
                           retry_max_s=0.5, source_stale_s=0.5).start()
        try:
            wait_for(lambda: "no Live2Diff source in OBS" in text_of(browser, "about"), 20, "'no source' in the dock")
            assert not by_id(browser, "obs-source").is_displayed()
            added = threading.Event()
            bridge.add_to_scene(None, lambda ok, err: added.set())
            assert added.wait(20)
            wait_for(lambda: by_id(browser, "obs-source").is_displayed(), 15, "the warning")
            assert "OBS source not pulling the stream" in text_of(browser, "obs-source")
            # A reader that is OBS's source (ffmpeg asks with ?client=obs): the warning goes.
            with urllib.request.urlopen(running.api.url + "/stream.mjpg?client=obs", timeout=10):  # headers: counted
                wait_for(lambda: not by_id(browser, "obs-source").is_displayed(), 15, "the warning to go")
                assert "OBS pulls the stream" in text_of(browser, "about")
        finally:
            bridge.stop()
            running.controller.obs = None


def test_the_dock_shows_a_remote_streams_link_in_one_line(running, browser):
    """A remote stream's link figures (status "link": remote/link.py, from the WebRTC stats; real ones
    in tests/test_remote_network.py) as one line under the figures; nothing without a link."""
    connected(browser)
    assert not by_id(browser, "link").is_displayed()
    running.engine.stats.extra["link"] = {"type": "relay", "rtt_ms": 42.4, "loss_pct": 1.25, "loss_out_pct": 0.0,
                                          "jitter_ms": 7.6, "bitrate_kbps": 812.0, "bitrate_in_kbps": 95.4, "codec": "VP8"}
    try:
        running.controller.changed()
        wait_for(lambda: by_id(browser, "link").is_displayed(), 15, "the link line")
        assert text_of(browser, "link") == ("Link: relay \u00b7 RTT 42 ms \u00b7 loss 1.3% in, 0.0% out \u00b7 jitter 8 ms "
                                            "\u00b7 812 kbps out, 95 in \u00b7 VP8")
        assert by_id(browser, "link").get_attribute("data-type") == "relay"
    finally:
        running.engine.stats.extra.pop("link", None)
        running.controller.changed()
    wait_for(lambda: not by_id(browser, "link").is_displayed(), 15, "the link line to go with the link")


def test_a_blend_of_two_prompts_with_a_transition_from_the_dock(running, browser):
    from selenium.webdriver.common.keys import Keys

    d = browser
    connected(d)
    live(d)
    slider = by_id(d, "transition")
    slider.send_keys(Keys.END)  # 10 s: the longest
    wait_for(lambda: text_of(d, "transition-value") == "10 s", 5, "the transition shown")
    d.find_element("css selector", "#blend-box summary").click()
    retype(by_id(d, "prompt"), "a fox")
    retype(by_id(d, "prompt2"), "neon lights")
    mix = by_id(d, "blend")
    for _ in range(4):
        mix.send_keys(Keys.ARROW_LEFT)  # 0.5 -> 0.3
    wait_for(lambda: text_of(d, "blend-value") == "30%", 5, "the mix shown")
    press(d, by_id(d, "prompt-apply"))
    wait_for(lambda: running.frames.prompt_blend is not None, 10, "the engine's blend")
    (a, wa), (b, wb) = running.frames.prompt_blend
    assert (a, b) == ("a fox", "neon lights") and wa == pytest.approx(0.7) and wb == pytest.approx(0.3)
    assert running.frames.stream.in_transition  # 10 s of frames at 10 fps: still moving
    wait_for(lambda: not by_id(d, "transition-progress").get_attribute("hidden"), 10, "the transition's progress shown")
    assert text_of(d, "transition-progress").startswith("Transition ")
    slider.send_keys(Keys.HOME)  # back to 0 s for the tests after
    retype(by_id(d, "prompt2"), Keys.BACK_SPACE)  # the second prompt emptied: one prompt again
    press(d, by_id(d, "prompt-apply"))
    wait_for(lambda: running.frames.prompt_blend is None and running.frames.prompt == "a fox", 10, "the single prompt again")
    assert not running.frames.stream.in_transition  # 0 s: at once


def test_a_style_picture_dropped_on_the_dock_steers_the_engine_and_its_scale_and_clear_work(running, browser, tmp_path):
    import base64

    import cv2
    import numpy as np
    from selenium.webdriver.common.keys import Keys

    d = browser
    connected(d)
    live(d)
    wait_for(lambda: text_of(d, "picture-state") == "No picture", 10, "the dock to say there is no picture")
    img = np.zeros((40, 60, 3), np.uint8)
    cv2.circle(img, (30, 20), 12, (40, 40, 255), -1)
    png = base64.b64encode(cv2.imencode(".png", img)[1].tobytes()).decode()
    # What a drag from the desktop gives the page: a File in a DataTransfer, dropped on the zone.
    d.execute_script("""
        const [b64, name] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        const zone = document.getElementById('picture-drop');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    """, png, "look.png")
    wait_for(lambda: running.frames.style_image == "upload", 30, "the engine's style picture")
    wait_for(lambda: text_of(d, "picture-state") == "In use: the picture you sent", 15, "the dock to show the picture in use")
    wait_for(lambda: "look.png is in" in text_of(d, "toast"), 10, "the dock to say it is in")
    # The file chooser, with a file that is no picture: refused in the page, nothing sent.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    by_id(d, "picture-file").send_keys(str(notes))
    wait_for(lambda: "notes.txt is not a PNG, JPEG or WebP picture" in text_of(d, "toast"), 10, "the refusal")
    # The scale slider, as a keyboard user moves it.
    scale = by_id(d, "picture-scale")
    live(d)
    scale.send_keys(Keys.HOME)
    wait_for(lambda: running.frames.style_image_scale == 0.0, 15, "scale 0 in the engine")
    scale.send_keys(Keys.END)
    wait_for(lambda: running.frames.style_image_scale == 2.0, 15, "scale 2 in the engine")
    wait_for(lambda: text_of(d, "picture-scale-value") == "2.00", 10, "the scale shown")
    for _ in range(20):
        scale.send_keys(Keys.ARROW_LEFT)  # back to 1 for the tests after
    wait_for(lambda: running.frames.style_image_scale == 1.0, 15, "scale 1 again")
    press(d, by_id(d, "picture-clear"))
    wait_for(lambda: running.frames.style_image is None, 15, "the picture cleared in the engine")
    wait_for(lambda: text_of(d, "picture-state") == "No picture", 10, "the dock to show no picture")
