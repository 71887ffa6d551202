"""The last applied settings survive an engine restart (issue 11, point 6): the file, its atomic
write, what `run` takes from it, what wins over it, and a real engine stopped and started again."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli, spawn_cli
from live2diff_engine import saved_settings
from live2diff_engine.cli import build_parser
from live2diff_engine.control.schema import command_message

SAVED = {
    "prompt": "a red fox", "negative_prompt": "blurry", "guidance": 1.5, "style": "default", "strength": 0.5, "steps": 3,
    "seed": 7, "schedule": {"num_inference_steps": 50, "t_index_list": [25, 35, 45], "strength": None},
}


def home() -> Path:
    return Path(os.environ["LIVE2DIFF_HOME"])  # each test's own (conftest)


def run_args(*argv):
    argv = ["run", "--model", "tiny", *argv]
    args = build_parser().parse_args(argv)
    args._argv = argv
    return args


# -- the file ---------------------------------------------------------------------------------------


def test_saved_in_the_users_folder_atomically_and_read_back():
    path = saved_settings.save(SAVED)
    assert path == home() / "last_settings.json"
    assert json.loads(path.read_text())["prompt"] == "a red fox"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last_settings.json"]  # no temporary file left
    data, warning = saved_settings.load()
    assert warning is None and data == SAVED


def test_a_write_that_fails_half_way_leaves_the_previous_file_whole(monkeypatch):
    saved_settings.save(SAVED)
    before = (home() / "last_settings.json").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saved_settings.os, "fsync", disk_full)  # fails after the new text is written
    with pytest.raises(OSError):
        saved_settings.save(dict(SAVED, prompt="never saved"))
    assert (home() / "last_settings.json").read_bytes() == before
    assert sorted(p.name for p in home().iterdir()) == ["last_settings.json"]


@pytest.mark.parametrize("content, why", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"version": 1, "prompt": 5}).encode(), "prompt must be a string"),
    (json.dumps({"version": 1, "guidance": 99}).encode(), "guidance"),
    (json.dumps({"version": 1, "seed": -3}).encode(), "seed"),
    (json.dumps({"version": 1, "prompt": "a\x1b[31mred"}).encode(), "control characters"),
    (json.dumps({"version": 1, "schedule": {"num_inference_steps": 50, "t_index_list": [70], "strength": None}}).encode(),
     "out of range"),
    (json.dumps({"version": 7}).encode(), "unknown version"),
])
def test_a_damaged_file_is_one_warning_and_a_clean_start(content, why):
    (home() / "last_settings.json").write_bytes(content)
    data, warning = saved_settings.load()
    assert data is None
    assert warning.startswith("warning: the saved settings ") and why in warning and warning.endswith("starting clean")
    assert "\n" not in warning and "\x1b" not in warning


# -- what `run` takes from it ------------------------------------------------------------------------


def test_run_takes_every_saved_setting_where_no_option_is_given():
    saved_settings.save(SAVED)
    said = []
    args = run_args()
    seed = saved_settings.restore_into_args(args, said.append)
    assert said == []
    assert (args.prompt, args.negative_prompt, args.guidance, args.style) == ("a red fox", "blurry", 1.5, "default")
    assert (args.num_inference_steps, args.t_index_list, args.strength) == (50, [25, 35, 45], None)
    assert seed == 7 and args.seed == 0  # the seed goes to the frames, not to the tiny model's weights


def test_options_on_the_command_line_win():
    saved_settings.save(SAVED)
    args = run_args("--prompt", "a blue whale", "--seed", "0", "--steps", "1", "--guidance", "1.0")
    seed = saved_settings.restore_into_args(args, print)
    assert args.prompt == "a blue whale" and args.guidance == 1.0 and seed is None
    assert args.steps == 1 and args.t_index_list is None  # the saved schedule does not override --steps
    assert args.negative_prompt == "blurry"  # not given: the saved one
    # an empty prompt typed on purpose also wins
    args = run_args("--prompt", "")
    saved_settings.restore_into_args(args, print)
    assert args.prompt == ""


def test_fresh_starts_clean():
    saved_settings.save(SAVED)
    args = run_args("--fresh")
    assert saved_settings.restore_into_args(args, print) is None
    assert (args.prompt, args.negative_prompt, args.guidance, args.style) == ("", "", 1.0, None)


def test_a_saved_style_no_longer_available_falls_back_to_default_with_one_warning():
    saved_settings.save(dict(SAVED, style="toonyou"))  # a preset whose weights are not here
    said = []
    args = run_args()
    saved_settings.restore_into_args(args, said.append)
    assert args.style is None and args.t_index_list is None  # the default style, with its own schedule
    assert args.prompt == "a red fox"  # the rest still comes back
    assert len(said) == 1 and "saved style 'toonyou' is not available" in said[0]
    assert "live2diff-engine models download --style toonyou" in said[0]

    saved_settings.save(dict(SAVED, style="gone"))  # no longer in the styles file
    said = []
    saved_settings.restore_into_args(run_args(), said.append)
    assert len(said) == 1 and "'gone'" in said[0] and "no longer in the styles file" in said[0]


def test_a_file_written_by_hand_with_strength_and_steps_only():
    (home() / "last_settings.json").write_text(json.dumps({"version": 1, "prompt": "a fox", "strength": 0.5, "steps": 3}))
    args = run_args()
    saved_settings.restore_into_args(args, print)
    assert args.prompt == "a fox" and (args.num_inference_steps, args.t_index_list) == (50, [25, 35, 45])


def test_a_saved_style_that_does_not_load_falls_back_to_default(tmp_path):
    from sd_formats import save_kohya_lora_for_other_model

    lora = save_kohya_lora_for_other_model(tmp_path / "big_lora.safetensors")
    styles = tmp_path / "styles.toml"
    styles.write_text(f'[styles.big]\nloras = [{{ file = "{lora}" }}]\n')  # its file is here, for another model
    saved_settings.save(dict(SAVED, style="big"))
    r = run_cli("run", "--model", "tiny", "--styles", styles, "--source", "synthetic", "--sink", "null", "--no-api",
                "--max-frames", "2", timeout=300)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: the saved style")]
    assert len(warnings) == 1 and "'big' does not load" in warnings[0] and "starting with the default style" in warnings[0]
    assert "style: default" in r.stderr and "Traceback" not in r.stderr
    assert saved_settings.load()[0]["style"] == "default"


def test_a_damaged_file_never_stops_run():
    (home() / "last_settings.json").write_text('{"version": 1, "prompt": ')
    r = run_cli("run", "--model", "tiny", "--source", "synthetic", "--sink", "null", "--no-api", "--max-frames", "2",
                timeout=300)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if "saved settings" in l]
    assert len(warnings) == 1 and "damaged" in warnings[0] and "Traceback" not in r.stderr
    data, warning = saved_settings.load()  # started clean, and saved the clean start
    assert warning is None and data["prompt"] == "" and data["style"] == "default"


# -- a real engine, restarted ------------------------------------------------------------------------


class EngineProcess:
    """`live2diff-engine run` (tiny model, synthetic source, API on a free port) in a subprocess."""

    def __init__(self, *options):
        self.proc = spawn_cli("run", "--model", "tiny", "--source", "synthetic", "--camera-fps", "10", "--sink", "null",
                              "--api-port", "0", *options)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        deadline = time.monotonic() + 240
        self.url = None
        while self.url is None:
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)
            found = [re.search(r"dock (http://127\.0\.0\.1:\d+)/dock", l) for l in self.lines]
            self.url = next((m.group(1) for m in found if m), None)
            time.sleep(0.1)
        while self.status().get("state") in (None, "starting"):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.2)

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/status", timeout=30) as r:
            return json.load(r)

    def command(self, cmd, **args) -> dict:
        body = json.dumps(command_message(cmd, **args)).encode()
        req = urllib.request.Request(self.url + "/api/command", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=130) as r:
            reply = json.load(r)
        assert reply["ok"], reply
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 0, "".join(self.lines)


def wait_line(engine: EngineProcess, match, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(match(l) for l in list(engine.lines)):
        assert time.monotonic() < deadline, "".join(engine.lines)
        time.sleep(0.1)


def test_a_restarted_engine_comes_back_with_the_last_applied_settings():
    first = EngineProcess()
    try:
        first.command("set_prompt", prompt="a red fox")
        first.command("set_negative_prompt", negative_prompt="blurry")
        first.command("set_guidance", guidance=1.5)
        first.command("set_strength", strength=0.5)
        first.command("set_steps", steps=3)
        first.command("set_seed", seed=7)
        s = first.status()
        assert (s["prompt"], s["negative_prompt"], s["guidance"], s["strength"], s["steps"], s["seed"]) == \
            ("a red fox", "blurry", 1.5, 0.5, 3, 7)
    finally:
        first.stop()
    saved = json.loads((home() / "last_settings.json").read_text())
    assert saved["prompt"] == "a red fox" and saved["steps"] == 3 and saved["seed"] == 7

    second = EngineProcess("--prompt", "a blue whale")  # an option given wins over the saved value
    try:
        s = second.status()
        assert s["prompt"] == "a blue whale"
        assert (s["negative_prompt"], s["guidance"], s["style"], s["strength"], s["steps"], s["seed"]) == \
            ("blurry", 1.5, "default", 0.5, 3, 7)
    finally:
        second.stop()

    kept = (home() / "last_settings.json").read_text()
    third = EngineProcess("--fresh")
    try:
        s = third.status()
        assert (s["prompt"], s["negative_prompt"], s["guidance"], s["strength"], s["steps"], s["seed"]) == \
            ("", "", 1.0, 0.36, 2, 0)
        # started from the defaults, the saved look is not destroyed until the user changes something
        assert (home() / "last_settings.json").read_text() == kept
        third.command("set_prompt", prompt="a green owl")
        deadline = time.monotonic() + 60  # written between two frames, after the reply
        while "a green owl" not in (home() / "last_settings.json").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        saved = json.loads((home() / "last_settings.json").read_text())
        assert saved["prompt"] == "a green owl" and saved["steps"] == 2 and saved["seed"] == 0
    finally:
        third.stop()


def test_a_prompt_with_a_bar_stays_a_prompt_and_a_blend_stays_a_blend_across_a_restart():
    """A "|" typed in a prompt is a character (the blend notation is only for the command line):
    saved and read back it must not turn into a blend of two prompts; a blend set by a command
    comes back as the same blend."""
    first = EngineProcess()
    try:
        first.command("set_prompt", prompt="neon | dark")
        assert first.status()["prompt"] == "neon | dark"
    finally:
        first.stop()
    second = EngineProcess()
    try:
        s = second.status()
        assert s["prompt"] == "neon | dark" and s["prompt_blend"] is None, s
        second.command("set_prompt", prompt=[{"text": "a fox", "weight": 3}, {"text": "a wolf", "weight": 1}])
        assert second.status()["prompt_blend"] == [{"text": "a fox", "weight": 0.75}, {"text": "a wolf", "weight": 0.25}]
    finally:
        second.stop()
    third = EngineProcess()
    try:
        assert third.status()["prompt_blend"] == [{"text": "a fox", "weight": 0.75}, {"text": "a wolf", "weight": 0.25}]
    finally:
        third.stop()


def test_a_style_picture_sent_in_comes_back_after_a_restart_and_a_damaged_one_never_does():
    """The picture sent in (the dock, `ctl style-image`: bytes) and its scale are kept beside the
    settings (last_style_picture, its SHA-256 in the JSON): a restarted engine with the IP-Adapter
    encodes it again; one without keeps it in the file for the next; a picture file that does not
    match is one warning and no picture; clearing the picture removes the file."""
    from test_style_image import picture, upload

    pic = home() / "last_style_picture"
    first = EngineProcess("--ip-adapter")  # --model tiny: a tiny random adapter
    try:
        code, reply = upload(first.url, picture((200, 200, 200)))
        assert code == 200 and reply["ok"], reply
        deadline = time.monotonic() + 60  # written between two frames, after the reply
        while not pic.exists():
            assert time.monotonic() < deadline, "".join(first.lines)
            time.sleep(0.05)
        first.command("clear_style_image")  # cleared: the file goes with it
        while pic.exists():
            assert time.monotonic() < deadline, "".join(first.lines)
            time.sleep(0.05)
        code, reply = upload(first.url, picture((30, 200, 90)))
        assert code == 200 and reply["ok"], reply
        first.command("set_style_image_scale", scale=0.6)
        s = first.status()
        assert (s["style_image"], s["style_image_scale"]) == ("upload", 0.6)
    finally:
        first.stop()
    saved = json.loads((home() / "last_settings.json").read_text())
    assert pic.read_bytes() == picture((30, 200, 90)) and saved["style_image_scale"] == 0.6
    assert saved["style_picture"]["sha256"] == hashlib.sha256(pic.read_bytes()).hexdigest()

    without = EngineProcess()  # no adapter: nothing to steer with, and nothing lost
    try:
        assert without.status()["style_image_scale"] is None
        wait_line(without, lambda l: "kept but not used" in l and "--ip-adapter" in l)
    finally:
        without.stop()
    assert pic.exists() and json.loads((home() / "last_settings.json").read_text())["style_image_scale"] == 0.6

    second = EngineProcess("--ip-adapter")
    try:
        deadline = time.monotonic() + 120  # encoded beside the stream, swapped in between frames
        while second.status()["style_image"] != "upload":
            assert time.monotonic() < deadline, "".join(second.lines)
            time.sleep(0.2)
        assert second.status()["style_image_scale"] == 0.6
        wait_line(second, lambda l: "style picture: the one sent in the last session" in l)  # said once it is in
    finally:
        second.stop()

    pic.write_bytes(picture((200, 30, 30)))  # not the picture the settings name
    third = EngineProcess("--ip-adapter")
    try:
        assert third.status()["style_image"] is None
        wait_line(third, lambda l: "style picture of the last session" in l)
    finally:
        third.stop()
    warnings = [l for l in third.lines if "style picture of the last session" in l]
    assert len(warnings) == 1 and "does not match" in warnings[0], "".join(third.lines)
    assert json.loads((home() / "last_settings.json").read_text())["style_picture"] is None
