"""The measurement behind BENCHMARKS.md's "Output during a DreamBooth style switch" (not a test: it
takes minutes of CPU and about 12 GB of memory).

    python tests/style_gap.py make CKPT
        writes a full-size SD1.5 DreamBooth single-file checkpoint (original LDM layout, float16,
        random weights, 2.1 GB)
    python tests/style_gap.py run TREE LABEL CKPT OUT_JSON
        the engine (Engine + Controller, as `run` builds them) of the live2diff_engine package found
        in TREE (a checkout, to compare two commits) on the full-size SD1.5 + Live2Diff geometry
        with random weights, float32, TAESD, 64x64, one denoising step and the miniature MiDaS, fed
        by a 30 fps synthetic source; after six frames it is switched to the checkpoint, whose
        pages are first dropped from the page cache (read from disk). Writes the longest gap
        between output frames from the request to four frames after the reply, the median frame
        interval before, the time the swap held the inference thread, the loader's time, and the
        process's memory (RSS) before, at its peak during the switch and after.

Run it with OMP_NUM_THREADS=1 (what `run` picks on two CPUs).
"""

import json
import os
import statistics
import sys
import threading
import time


def make(path: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from live2diff_engine.models.full_random import SD15_UNET_CONFIG, SD15_VAE_CONFIG, _built, build_full_text, build_full_vae
    from sd_formats import text_encoder_diffusers_to_ldm, unet_diffusers_to_ldm, vae_diffusers_to_ldm

    out = {}
    unet = _built(lambda: UNet2DConditionModel(**SD15_UNET_CONFIG), "cpu", torch.float16, 7)
    out.update(unet_diffusers_to_ldm(unet.state_dict(), SD15_UNET_CONFIG))
    del unet
    vae = build_full_vae("cpu", torch.float16, 8)
    out.update(vae_diffusers_to_ldm(vae.state_dict(), SD15_VAE_CONFIG))
    del vae
    te, _ = build_full_text("cpu", torch.float16, 9)
    out.update(text_encoder_diffusers_to_ldm(te.state_dict()))
    save_file({k: v.contiguous() for k, v in out.items()}, path, {"format": "pt"})
    print(f"{len(out)} tensors, {sum(v.numel() for v in out.values()) / 1e6:.0f}M parameters")


def run(tree: str, label: str, ckpt: str, out_json: str) -> None:
    sys.path.insert(0, tree)
    sys.path.insert(1, os.path.dirname(__file__))
    import torch

    torch.set_num_threads(1)
    import live2diff_engine

    assert live2diff_engine.__file__.startswith(os.path.abspath(tree)), live2diff_engine.__file__
    from live import PacedSource
    from live2diff_engine.control.controller import Controller
    from live2diff_engine.control.schema import command_message
    from live2diff_engine.depth import build_tiny_depth
    from live2diff_engine.engine import Engine
    from live2diff_engine.models.full_random import build_full_components
    from live2diff_engine.pipeline.frames import FramePipeline
    from live2diff_engine.styles import StyleManager, load_styles

    comps = build_full_components("cpu", torch.float32, seed=0, vae="taesd")
    comps.depth = build_tiny_depth("midas", seed=0, size=64)
    fd = os.open(ckpt, os.O_RDONLY)  # read from disk, as a file not read lately
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    styles_file = f"{out_json}.styles.toml"
    with open(styles_file, "w") as f:
        f.write(f'[styles.db]\ndreambooth = "{ckpt}"\n')
    manager = StyleManager(comps, load_styles(styles_file))
    frames = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=0, t_index_list=[45])
    manager.apply("default", frames)
    controller = Controller(frames, manager, label="full random")
    times: list[float] = []
    engine = Engine(frames, PacedSource(fps=30, size=(64, 64)), [], output_size=(64, 64), status=False,
                    controller=controller, on_output=lambda img: times.append(time.monotonic()))
    th = threading.Thread(target=engine.run, kwargs={"install_signals": False}, daemon=True)
    th.start()

    def wait(pred, timeout=1800):
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end or not th.is_alive():
                raise SystemExit(f"[{label}] timed out")
            time.sleep(0.05)

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    wait(lambda: engine.stats.state == "streaming")
    n = len(times)
    wait(lambda: len(times) >= n + 6)
    samples, sampling = [], threading.Event()

    def sampler():
        while not sampling.is_set():
            samples.append(rss())
            time.sleep(0.05)

    rss_before = rss()
    threading.Thread(target=sampler, daemon=True).start()
    replies, marks = [], []
    controller.style_load_hook = lambda style: marks.append(time.monotonic())
    t_req = time.monotonic()
    controller.submit(command_message("set_style", style="db"), lambda r: replies.append((time.monotonic(), r)))
    wait(lambda: replies)
    t_rep, reply = replies[0]
    n = len(times)
    wait(lambda: len(times) >= n + 4)
    sampling.set()
    rss_after = rss()
    engine.stop()
    th.join(60)
    before = [b - a for a, b in zip(times, times[1:]) if b < t_req][-5:]
    window = [t_req] + [t for t in times if t > t_req]
    gaps = [b - a for a, b in zip(window, window[1:])]
    result = {
        "label": label, "ok": reply.get("ok"), "error": reply.get("error"),
        "frame_interval_before_s": round(statistics.median(before), 2),
        "switch_reply_s": round(t_rep - t_req, 2),
        "outputs_while_switching": sum(t_req < t <= t_rep for t in times),
        "longest_gap_s": round(max(gaps), 2),
        "prepare_s": round(manager.last_prepare_s, 2),
        "swap_s": round(manager.last_swap_s, 3),
        "load1": os.getloadavg()[0],
        "prepared_at_s": round(marks[0] - t_req, 2) if marks else None,
        "outputs_at_s": [round(t - t_req, 2) for t in times if t > t_req - 15],
        "rss_before_gb": round(rss_before / 1e9, 2), "rss_peak_gb": round(max(samples) / 1e9, 2),
        "rss_after_gb": round(rss_after / 1e9, 2),
    }
    print(json.dumps(result), flush=True)
    with open(out_json, "w") as f:
        json.dump(result, f)
    os._exit(0)  # no teardown of gigabytes of tensors


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make(sys.argv[2])
    elif sys.argv[1:2] == ["run"]:
        run(*sys.argv[2:6])
    else:
        raise SystemExit(__doc__)
