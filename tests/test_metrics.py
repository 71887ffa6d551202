"""`GET /metrics` (remote/metrics.py): Prometheus' text format, read back by a strict parser
(tests/prom_text.py). The renderer on plain data (escaping, histograms, absent figures), then a
real `serve` (tiny model) with a real aiortc client streaming: the scraped figures agree with the
engine's own (its status, the counts it prints when the session ends), and without the token
the scrape is refused.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from prom_text import FormatError, parse  # noqa: E402

from live2diff_engine.remote.metrics import Histogram, histogram_of, merged, render  # noqa: E402

TOKEN = "metrics-test-token"


def test_label_values_with_quotes_backslashes_and_newlines_read_back_as_they_were():
    odd = 'a "node"\\with\nnewline'
    text = render([{"id": 'se"s\\1', "node": odd, "state": "streaming", "frames_in": 3, "frames_out": 2, "fps": 1.5}],
                  [{"id": odd, "address": "http://10.0.0.1:8765", "gpus": 2, "gpus_free": 1, "warm_engines": 1}])
    fams = parse(text)
    assert fams["live2diff_session_frames_out_total"].value(session='se"s\\1', node=odd) == 2
    assert fams["live2diff_node_gpus"].value(node=odd) == 2
    assert fams["live2diff_node_info"].value(node=odd, address="http://10.0.0.1:8765") == 1
    assert fams["live2diff_sessions"].value(node=odd) == 1
    assert fams["live2diff_session_state"].value(session='se"s\\1', node=odd, state="streaming") == 1
    assert fams["live2diff_session_frames_in_total"].kind == "counter"
    assert fams["live2diff_session_fps"].kind == "gauge"


def test_histograms_are_cumulative_with_sum_and_count_and_le_inclusive():
    h = Histogram((0.1, 0.5, 1.0))
    for s in (0.05, 0.1, 0.3, 0.7, 3.0, float("nan")):  # NaN is no observation
        h.observe(s)
    text = render([{"id": "s1", "node": "n", "state": "streaming", "frames_in": 5, "frames_out": 5, "fps": 0,
                    "latency": h}], [{"id": "n", "gpus": 1, "gpus_free": 0, "warm_engines": 0}])
    fam = parse(text)["live2diff_session_latency_seconds"]
    assert fam.kind == "histogram"
    assert fam.buckets(session="s1", node="n") == [(0.1, 2), (0.5, 3), (1.0, 4), (math.inf, 5)]
    assert fam.value("_count", session="s1", node="n") == 5
    assert fam.value("_sum", session="s1", node="n") == pytest.approx(4.15)


def test_latency_samples_in_ms_and_prebuilt_bucket_counts_are_both_taken():
    text = render(
        [{"id": "a", "node": "n", "state": "streaming", "frames_in": 2, "frames_out": 2, "fps": 0,
          "latency_samples_ms": [20.0, 400.0], "latency_ms_p50": 20.0, "latency_ms_p95": 400.0},
         {"id": "b", "node": "n", "state": "streaming", "frames_in": 1, "frames_out": 1, "fps": 0,
          "latency": {"buckets": [(0.05, 1), (1.0, 1)], "sum": 0.04, "count": 1}}],
        [{"id": "n", "gpus": 1, "gpus_free": 0, "warm_engines": 0}])
    fams = parse(text)
    lat = fams["live2diff_session_latency_seconds"]
    a = dict(lat.buckets(session="a", node="n"))
    assert a[0.025] == 1 and a[0.3] == 1 and a[0.5] == 2 and a[math.inf] == 2
    assert lat.buckets(session="b", node="n") == [(0.05, 1), (1.0, 1), (math.inf, 1)]  # +Inf added
    assert fams["live2diff_session_latency_p95_seconds"].value(session="a", node="n") == pytest.approx(0.4)
    assert fams["live2diff_session_latency_p50_seconds"].value(session="b", node="n") is None
    assert fams["live2diff_sessions"].value(node="n") == 2


def test_figures_not_known_are_left_out_not_shown_as_zero():
    text = render([], [{"id": "cpu-box", "gpus": 0, "gpus_free": 0, "warm_engines": 1, "gpu_memory_bytes": None},
                       {"id": "gpu-box", "gpus": 1, "gpus_free": 1, "warm_engines": 2,
                        "gpu_memory_bytes": 3 * 2**30}])
    fams = parse(text)
    mem = fams["live2diff_node_gpu_memory_bytes"]
    assert mem.value(node="gpu-box") == 3 * 2**30 and mem.value(node="cpu-box") is None
    assert fams["live2diff_sessions"].value(node="cpu-box") == 0
    assert "live2diff_session_fps" not in fams and "live2diff_frame_latency_seconds" not in fams


def test_a_fleet_node_in_its_own_names_is_shown_under_the_same_label_as_its_sessions():
    text = render([{"id": "l2d-abc-0.s1", "node": "10.0.0.7", "state": "streaming", "frames_in": 9, "frames_out": 8,
                    "fps": 7.5}],
                  [{"node": "10.0.0.7", "node_id": "abc", "gpus": 1.0, "gpus_free": 0.0, "capacity": 1, "warm_idle": 0,
                    "gpu_memory_bytes": None}])
    fams = parse(text)
    assert fams["live2diff_sessions"].value(node="10.0.0.7") == 1
    assert fams["live2diff_node_max_sessions"].value(node="10.0.0.7") == 1
    assert fams["live2diff_node_info"].value(node="10.0.0.7", address="10.0.0.7") == 1


def test_the_parser_is_strict():
    """The test's parser catches what a broken renderer would write (so the tests above can fail)."""
    good = "# HELP x_total A count.\n# TYPE x_total counter\nx_total{a=\"1\"} 3\n"
    assert parse(good)["x_total"].value(a="1") == 3
    for bad in ("x_total 3\n",  # no HELP/TYPE
                good.replace("x_total{", "x{").replace("TYPE x_total", "TYPE x").replace("HELP x_total", "HELP x"),  # counter without _total
                good.replace('a="1"', 'a="1\\t"'),  # bad escape
                good.replace('a="1"', "a=1"),  # unquoted
                good + 'x_total{a="1"} 4\n',  # the same series twice
                good.rstrip("\n"),  # no final newline
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",  # not cumulative
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_sum 1\nh_count 1\n"):  # no +Inf
        with pytest.raises(FormatError):
            parse(bad)


def test_histogram_of_samples_matches_observing_them_and_snapshots_add_up():
    h = Histogram()
    for s in (0.01, 0.2, 7.0):
        h.observe(s)
    assert histogram_of([0.01, 0.2, 7.0]) == h.snapshot()
    both = merged([h, histogram_of([0.2, 30.0])])  # a node's two engines, one a snapshot from another process
    alone = histogram_of([0.01, 0.2, 7.0, 0.2, 30.0])
    assert both["buckets"] == alone["buckets"] and both["count"] == 5 and both["sum"] == pytest.approx(alone["sum"])
    with pytest.raises(ValueError):
        merged([h, histogram_of([1.0], bounds=(1.0,))])


# -- a real serve -----------------------------------------------------------------------------------


def scrape(url: str, token: str | None = TOKEN):
    req = urllib.request.Request(url + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4"), resp.headers["Content-Type"]
        return parse(resp.read().decode("utf-8"))


def test_a_real_serve_scraped_while_a_client_streams_agrees_with_its_own_figures():
    from test_remote import WAIT, Server, run
    from whip_client import WhipClient, wait_for

    s = Server("--session-grace", "120", env={"LIVE2DIFF_API_TOKEN": TOKEN})
    try:
        for token in (None, "wrong"):
            with pytest.raises(urllib.error.HTTPError) as err:
                scrape(s.url, token)
            assert err.value.code == 401
        before = scrape(s.url)
        node = next(iter(before["live2diff_node_info"].samples))[1]["node"]
        assert before["live2diff_sessions"].value(node=node) == 0
        assert before["live2diff_node_warm_engines"].value(node=node) == 1
        assert before["live2diff_node_max_sessions"].value(node=node) == 1
        assert before["live2diff_node_gpus"].value(node=node) == 0  # the engine runs on the CPU here
        assert "live2diff_node_gpu_memory_bytes" not in before  # known only on CUDA
        assert before["live2diff_frames_out_total"].value(node=node) == 0

        async def stream():
            c = WhipClient(s.url, token=TOKEN, fps=8, size=(64, 48))
            assert await c.start() == 201, c.answer_text
            try:
                await wait_for(lambda: len(c.received) >= 20, WAIT, "20 frames back")
                c.limit = c.sent  # no more frames: the figures settle (the grace keeps the session meanwhile)
                last, still = -1, 0
                while still < 3:
                    await asyncio.sleep(1.0)
                    n = len(c.received)
                    still, last = (still + 1 if n == last else 0), n
                count = len(c.messages)
                await wait_for(lambda: len(c.messages) > count + 1 and c.status is not None, WAIT, "a fresh status")
                during = await asyncio.get_running_loop().run_in_executor(None, scrape, s.url)
                status = c.status
                await c.delete()
            finally:
                await c.close()
            return during, status

        during, status = run(stream())
        sid = during["live2diff_session_state"].samples[0][1]["session"]
        labels = {"session": sid, "node": node}
        assert during["live2diff_sessions"].value(node=node) == 1
        assert during["live2diff_node_warm_engines"].value(node=node) == 0
        assert during["live2diff_session_state"].value(**labels, state="streaming") == 1
        frames_out = during["live2diff_session_frames_out_total"].value(**labels)
        assert frames_out == status["frames_out"] >= 20
        assert during["live2diff_session_frames_in_total"].value(**labels) >= frames_out
        lat = during["live2diff_session_latency_seconds"]
        # Every frame out after the warmup is in the histogram, the warmup's are not; and the
        # histogram holds the samples of the engine's own median (the status's latency_ms): at
        # least half of them at or below it, at most half below it.
        n = lat.value("_count", **labels)
        assert 0 < n < frames_out
        median = status["latency_ms"] / 1000.0
        for le, cumulative in lat.buckets(**labels):
            if le >= median + 1e-4:
                assert cumulative >= n // 2 + 1, (le, median, lat.buckets(**labels))
            elif le < median - 1e-4:
                assert cumulative <= n // 2, (le, median, lat.buckets(**labels))
        assert during["live2diff_session_latency_p50_seconds"].value(**labels) > 0

        # Ended: its figures stay in the node's counters, exactly as serve counted them.
        ended = rf"session {sid} ended: .*\((\d+) frames in, (\d+) out"
        deadline = time.monotonic() + WAIT
        while not re.search(ended, s.log()):
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.2)
        n_in, n_out = map(int, re.search(ended, s.log()).groups())
        after = scrape(s.url)
        assert after["live2diff_frames_in_total"].value(node=node) == n_in
        assert after["live2diff_frames_out_total"].value(node=node) == n_out == frames_out
        assert after["live2diff_sessions_started_total"].value(node=node) == 1
        assert after["live2diff_sessions"].value(node=node) == 0
        assert after["live2diff_node_warm_engines"].value(node=node) == 1
        assert "live2diff_session_frames_out_total" not in after
        assert after["live2diff_frame_latency_seconds"].value("_count", node=node) == lat.value("_count", **labels)
    finally:
        s.stop()


def test_on_cuda_the_node_has_its_gpu_and_the_memory_the_engines_hold(monkeypatch):
    """No CUDA here: the slots say cuda:0 and torch's allocator figure is faked at its one call;
    the rest (which GPUs, which are free, the text) is serve's own code."""
    import torch

    from live2diff_engine.remote.server import Slot, WebRtcService

    comps = type("Comps", (), {"device": "cuda:0"})()
    frames = type("Frames", (), {"comps": comps})()
    asked = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: asked.append(str(d)) or 3 * 2**30)
    service = WebRtcService([Slot(frames, None, "tiny", busy=True), Slot(frames, None, "tiny")])
    sessions, (node,) = service.figures()
    assert (node["gpus"], node["gpus_free"], node["warm_engines"], node["max_sessions"]) == (1, 0, 1, 2)
    assert node["gpu_memory_bytes"] == 3 * 2**30 and asked == ["cuda:0"]  # one card, asked once
    fams = parse(render(sessions, [node]))
    assert fams["live2diff_node_gpu_memory_bytes"].value(node=node["id"]) == 3 * 2**30
