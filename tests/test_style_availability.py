"""Styles carry their availability (issue 11, point 4): a style whose weights are not here is
marked with the command that fetches it (`styles list`, status, `ctl styles`), and the engine can
download a style by its name, with its progress in the status, against a real local HTTP server
standing in for civitai (its address comes from the environment only, never from a command)."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli
from live import LiveEngine, PacedSource, wait_for
from live2diff_engine.config import civitai_token
from live2diff_engine.control.schema import command_message
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.styles import fetch_hint, load_styles

PRESETS = ["disneyPixar", "kFelted", "moxin", "origami", "pixart", "toonyou"]
TOKEN = "civitai-test-token-5f1"
FILES = {  # what the stand-in server serves, by civitai model id
    "/api/download/models/9001": bytes(range(256)) * (12 * 1024),  # 3 MiB: a few progress steps
    "/api/download/models/9002": b"lora bytes " * 1000,
}


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def post(url, msg):
    req = urllib.request.Request(url + "/api/command", data=json.dumps(msg).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def status(url):
    with urllib.request.urlopen(url + "/api/status", timeout=30) as r:
        return json.load(r)


# -- marked everywhere ------------------------------------------------------------------------------


def test_styles_list_marks_the_presets_without_weights():
    r = run_cli("styles", "list", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in PRESETS:
        at = next(i for i, l in enumerate(lines) if l.startswith(name + " "))
        assert lines[at + 1].split() == ["missing:", "get", "it", "with", f"`live2diff-engine", "models", "download",
                                         "--style", f"{name}`"]
    at = next(i for i, l in enumerate(lines) if l.startswith("default "))
    assert at + 1 == len(lines) or "missing" not in lines[at + 1]


def test_status_and_ctl_styles_mark_missing_styles(comps):
    with LiveEngine(comps, PacedSource(fps=10)) as live:
        s = status(live.api.url)
        assert s["styles"] == ["default"] + PRESETS
        assert s["styles_missing"] == {n: f"live2diff-engine models download --style {n}" for n in PRESETS}
        assert s["styles_downloadable"] == []  # civitai styles, and no token here
        r = run_cli("ctl", "styles", "--api", live.api.url, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "* default"
        for name, line in zip(PRESETS, lines[1:]):
            assert line.split() == [name, "missing:", "live2diff-engine", "models", "download", "--style", name]
        # switching to one stays refused, with the way to get it
        reply = post(live.api.url, command_message("set_style", style="toonyou"))
        assert not reply["ok"] and "missing" in reply["error"] and "models download --style toonyou" in reply["error"]


def test_the_civitai_token_comes_from_the_environment_or_the_config_file(monkeypatch):
    monkeypatch.delenv("CIVITAI_TOKEN", raising=False)
    assert civitai_token({}) is None
    assert civitai_token({"civitai": {"token": " abc "}}) == "abc"
    monkeypatch.setenv("CIVITAI_TOKEN", "from-env")
    assert civitai_token({"civitai": {"token": "abc"}}) == "from-env"


# -- downloads --------------------------------------------------------------------------------------


class Civitai(http.server.BaseHTTPRequestHandler):
    """Serves FILES slowly (so that progress can be seen) and records the requests. With ``gate``
    set to an Event, the first file stops after its first megabyte until the test has seen that partial
    progress and sets it: the test then does not depend on catching a window in time."""

    seen: list[str] = []
    gate: threading.Event | None = None

    def log_message(self, *a):
        pass

    def do_GET(self):
        Civitai.seen.append(self.path)
        path, _, query = self.path.partition("?")
        body = FILES.get(path)
        if body is None or f"token={TOKEN}" not in query:
            self.send_response(404 if body is None else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(0, len(body), 256 * 1024):
            self.wfile.write(body[i:i + 256 * 1024])
            self.wfile.flush()
            # The downloader reads a megabyte at a time (models/download.py: CHUNK), so the hold
            # comes once the first one is out.
            if i + 256 * 1024 == 1 << 20 and path == "/api/download/models/9001" and Civitai.gate is not None:
                Civitai.gate.wait(60)
            time.sleep(0.15)


@pytest.fixture
def civitai(monkeypatch):
    Civitai.seen, Civitai.gate = [], None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Civitai)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LIVE2DIFF_CIVITAI_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    if Civitai.gate is not None:
        Civitai.gate.set()
    server.shutdown()
    server.server_close()


def write_user_style():
    """A style in the user's styles file with two civitai files (a DreamBooth and a LoRA)."""
    home = Path(os.environ["LIVE2DIFF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "styles.toml").write_text(
        '[styles.tinytoon]\n'
        'description = "a test style"\n'
        'dreambooth = "tinytoon_db.safetensors"\n'
        'dreambooth_url = "https://civitai.com/api/download/models/9001"\n'
        'loras = [{ file = "tinytoon_lora.safetensors", url = "https://civitai.com/api/download/models/9002" }]\n'
    )
    return home / "styles"


def test_a_style_downloads_in_the_background_with_its_progress_in_the_status(comps, civitai):
    cache = write_user_style()
    with LiveEngine(comps, PacedSource(fps=10)) as live:
        live.controller.civitai_token = TOKEN
        url = live.api.url
        s = status(url)
        assert s["styles_missing"]["tinytoon"] == "live2diff-engine models download --style tinytoon"
        assert "tinytoon" in s["styles_downloadable"] and "toonyou" in s["styles_downloadable"]
        Civitai.gate = threading.Event()  # the first file waits after its first megabyte until we saw it
        r = run_cli("ctl", "download", "tinytoon", "--api", url, timeout=60)
        assert r.returncode == 0 and "downloading style tinytoon" in r.stdout, r.stderr
        seen = []
        while True:
            d = status(url)["download"]
            seen.append(d)
            if d["state"] != "downloading":
                break
            if d["file_index"] == 0 and 0 < d["bytes"] < d["total"]:
                Civitai.gate.set()
            assert len(seen) < 2000, seen[-1]
            time.sleep(0.05)
        assert d["state"] == "done" and d["style"] == "tinytoon", d
        partial = [x for x in seen if x["state"] == "downloading" and x["file_index"] == 0 and 0 < x["bytes"] < x["total"]]
        assert partial and partial[0]["total"] == len(FILES["/api/download/models/9001"]) and partial[0]["files"] == 2
        assert (cache / "tinytoon_db.safetensors").read_bytes() == FILES["/api/download/models/9001"]
        assert (cache / "tinytoon_lora.safetensors").read_bytes() == FILES["/api/download/models/9002"]
        s = status(url)
        assert "tinytoon" not in s["styles_missing"] and "tinytoon" not in s["styles_downloadable"]
        assert TOKEN not in json.dumps(s)  # the token never shows
        assert len(Civitai.seen) == 2 and all(f"token={TOKEN}" in p for p in Civitai.seen)
        r = run_cli("ctl", "status", "--api", url, timeout=60)
        assert "download of style tinytoon: done" in r.stdout
        # once here, there is nothing to download
        reply = post(url, command_message("download_style", style="tinytoon"))
        assert not reply["ok"] and reply["error"] == "style 'tinytoon' is already downloaded"


def test_a_download_without_a_token_is_refused_in_one_line(comps, civitai):
    write_user_style()
    with LiveEngine(comps, PacedSource(fps=10)) as live:
        assert live.controller.civitai_token is None
        reply = post(live.api.url, command_message("download_style", style="tinytoon", id="d1"))
        assert reply["id"] == "d1" and not reply["ok"]
        assert "needs an API token" in reply["error"] and "CIVITAI_TOKEN" in reply["error"] and "[civitai] token" in reply["error"]
        assert "\n" not in reply["error"]
        assert reply["status"]["download"] is None and Civitai.seen == []
        assert status(live.api.url)["styles_downloadable"] == []


def test_a_failed_download_is_in_the_status_and_the_engine_goes_on(comps, civitai):
    write_user_style()
    with LiveEngine(comps, PacedSource(fps=10)) as live:
        live.controller.civitai_token = "a-wrong-token"
        assert post(live.api.url, command_message("download_style", style="tinytoon"))["ok"]
        d = wait_for(lambda: (lambda d: d if d["state"] != "downloading" else None)(status(live.api.url)["download"]),
                     30, "the download to end")
        assert d["state"] == "failed" and "HTTP 401" in d["error"] and "a-wrong-token" not in d["error"]
        before = live.engine.stats.frames_out
        wait_for(lambda: live.engine.stats.frames_out > before + 3, 30, "frames after the failed download")
        assert fetch_hint(load_styles()["tinytoon"]) is not None  # nothing half-written counts as here
