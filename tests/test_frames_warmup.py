"""The frame pipeline's warmup and build. The warmup's VAE encode in chunks (ENCODE_CHUNK images
a call) draws the noise one call drew, and on the tiny models gives that call's latents and frames
bit for bit (issue 22, point 11). With acceleration on, the VAE's encode and decode compile while
the pipeline is built, announced, never on the first live frame (point 10).

The compile tests trace with dynamo and run the traced graphs with its "eager" backend behind a
counter (as test_accelerate.py does): what compiles, and when, in seconds."""

import dataclasses

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import live2diff_engine.pipeline.frames as frames_mod
from conftest import build_mini_unet
from live2diff_engine.models.components import build_tiny_components
from live2diff_engine.pipeline.accelerate import accelerator_for
from live2diff_engine.pipeline.frames import ENCODE_CHUNK, FramePipeline, fit_frame
from test_frames import clip


@pytest.fixture(scope="module")
def comps():
    return build_tiny_components(seed=0)


def tiny_taesd():
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
        ).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["full VAE", "TAESD"])
def vae_comps(request, comps):
    return comps if request.param == "full VAE" else dataclasses.replace(comps, vae=tiny_taesd())


# -- point 11: the warmup's encode in chunks -----------------------------------------------------


def _warmup_batch(fp, n=8):
    x = torch.cat([fp._upload(fit_frame(f, 64, 64, "crop")[0]) for f in clip(n, seed=5)])
    return torch.cat([x, fp._depth_images(x).expand(-1, 3, -1, -1)])  # 8 frames, then 8 depth images


@torch.no_grad()
def test_the_warmup_encodes_in_chunks_and_samples_once_as_one_call_did(vae_comps):
    fp = FramePipeline(vae_comps, width=64, height=64, seed=3)
    images = _warmup_batch(fp)
    assert images.shape[0] == 16 and ENCODE_CHUNK < 16
    sizes = []
    encode = vae_comps.vae.encode
    vae_comps.vae.encode = lambda part: sizes.append(part.shape[0]) or encode(part)
    try:
        fp.generator.manual_seed(11)
        chunked = fp._encode_batch(images)
        after = torch.randn(8, generator=fp.generator)  # where the random stream stands afterwards
    finally:
        del vae_comps.vae.encode
    assert sizes == [ENCODE_CHUNK] * (16 // ENCODE_CHUNK)
    # One call of 16, sampled (the full VAE) from a generator at the same seed.
    g = torch.Generator().manual_seed(11)
    out = vae_comps.vae.encode(images)
    dist = getattr(out, "latent_dist", None)
    whole = (dist.sample(generator=g) if dist is not None else out.latents) * getattr(vae_comps.vae.config, "scaling_factor", 1.0)
    # The same noise; the encoder's own arithmetic may round its last bit differently in a batch of
    # 4 than in one of 16 (the CPU's convolution picks its kernel by batch size).
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, torch.randn(8, generator=g))  # the same draws were taken, no more
    if dist is not None:  # the full VAE's sample is noise indeed: not the mean
        assert not torch.equal(chunked, dist.mean * vae_comps.vae.config.scaling_factor)


@pytest.fixture(scope="module")
def mini_comps(comps):
    """The tiny VAE, text encoder and depth model around a two-level UNet (half the tiny UNet's time)."""
    return dataclasses.replace(comps, unet=build_mini_unet())


def _frames(fp):
    out = []
    for f in clip(10, seed=1):
        out += fp.push(f)
    fp.request_reset()  # a re-warm mid-stream encodes its 16 images again
    for f in clip(2, seed=2):
        out += fp.push(f)
    out += fp.flush()
    assert [i for i, _ in out] == list(range(12))
    return np.stack([img for _, img in out])


def test_frames_warmed_up_in_chunks_are_the_frames_of_one_call(vae_comps, mini_comps, monkeypatch):
    both = dataclasses.replace(mini_comps, vae=vae_comps.vae)
    chunked = _frames(FramePipeline(both, width=64, height=64, prompt="a cat", seed=4))
    monkeypatch.setattr(frames_mod, "ENCODE_CHUNK", 16)  # the warmup in one call, as before
    whole = _frames(FramePipeline(both, width=64, height=64, prompt="a cat", seed=4))
    diff = np.abs(chunked.astype(np.int16) - whole.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.01  # the encoder's last-bit rounding at most, never another picture
    assert chunked[8:].std() > 1  # stylised frames, not the camera


# -- point 10: the VAE compiles while the pipeline is built --------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiles(text):
    """The lines about compiling, without the progress lines a long compile adds every few seconds."""
    return [ln for ln in text.splitlines() if "compil" in ln and not ln.rstrip().endswith("s so far ...")]


def test_the_vae_compiles_while_the_pipeline_is_built_not_on_the_first_frames(mini_comps, fresh_dynamo, capsys):
    counter = CompileCounterWithBackend("eager")
    accel = accelerator_for(mini_comps.unet, "compile", backend=counter)
    fp = FramePipeline(mini_comps, width=64, height=64, prompt="a cat", seed=1, accelerate="compile")
    said = _compiles(capsys.readouterr().err)
    assert [ln.split(" in ")[0] if "compiled in" in ln else ln for ln in said[2:]] == [
        "compiling the VAE encoder for 64x64 (once per size) ...", "VAE encoder compiled",
        "compiling the VAE decoder for 64x64 (once per size) ...", "VAE decoder compiled"]
    assert said[0].startswith("compiling the stream step") and said[1].startswith("stream step compiled in")
    assert counter.frame_count == 3  # the stream step, the encoder, the decoder
    # Each compiled VAE call was checked against eager on the build's inputs, and passed.
    assert {c["what"]: c["passed"] for c in accel.checks} == {"compiled VAE encoder": True, "compiled VAE decoder": True}
    # Nothing drawn from the pipeline's generator: its random stream is where the seed put it.
    assert torch.equal(fp.generator.get_state(), torch.Generator().manual_seed(1).get_state())

    frames = clip(12, seed=4)
    got = [img for f in frames for _, img in fp.push(f)] + [img for _, img in fp.flush()]
    assert len(got) == 12 and fp.stream.accelerated == "compile"
    assert counter.frame_count == 3  # the streamed frames compiled nothing more
    assert _compiles(capsys.readouterr().err) == []
    # (That the compiled frames are eager's: test_accelerate.py, with the same pipeline.)
    FramePipeline(mini_comps, width=64, height=48, prompt="a cat", seed=1, accelerate="off")
    assert counter.frame_count == 3 and _compiles(capsys.readouterr().err) == []  # off: nothing compiles, nothing said


def test_a_new_size_compiles_the_vae_once_more_and_a_new_stream_of_the_same_size_does_not(mini_comps, fresh_dynamo, capsys):
    counter = CompileCounterWithBackend("eager")
    accelerator_for(mini_comps.unet, "compile", backend=counter)
    fp = FramePipeline(mini_comps, width=64, height=64, prompt="a cat", seed=1, accelerate="compile")
    assert counter.frame_count == 3
    capsys.readouterr()
    fp.restart()  # a new stream, the same size and mode
    FramePipeline(mini_comps, width=64, height=64, prompt="a dog", seed=2, accelerate="compile")
    assert counter.frame_count == 3 and _compiles(capsys.readouterr().err) == []
    wide = FramePipeline(mini_comps, width=64, height=48, prompt="a cat", seed=1, accelerate="compile")
    said = _compiles(capsys.readouterr().err)
    assert "compiling the VAE encoder for 64x48 (once per size) ..." in said
    assert "compiling the VAE decoder for 64x48 (once per size) ..." in said
    assert counter.frame_count == 6  # each of the three once more, for the new shapes
    for f in clip(10, seed=4):  # 8 warmup frames, then the first stream frames: one encoded, one decoded
        wide.push(f)
    assert counter.frame_count == 6 and _compiles(capsys.readouterr().err) == []
