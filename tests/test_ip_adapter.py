"""IP-Adapter (issue 30, point 4, first step): a tiny random IP-Adapter in the released on-disk
layout, read and loaded through diffusers' own loader into the streaming UNet's 2D blocks; with
the temporal attention silenced, the streaming UNet with image tokens is diffusers' 2D UNet with
the same adapter and the same image embedding."""

import pytest
import torch
from safetensors.torch import save_file

from live2diff_engine.errors import ConfigError, ModelLoadError
from live2diff_engine.models.ip_adapter import (attach_ip_adapter, has_ip_adapter, image_tokens, read_ip_adapter,
                                                set_ip_adapter_scale)
from live2diff_engine.models.motion import SequenceContext, TemporalTransformer
from live2diff_engine.models.tiny import TINY_IMAGE_DIM, build_tiny_unet, tiny_ip_adapter, tiny_prompt_embeds

IMAGE_DIM = TINY_IMAGE_DIM  # the tiny image encoder's projection size


def _silenced(seed):
    unet = build_tiny_unet(seed=seed)
    for m in unet.modules():
        if isinstance(m, TemporalTransformer):
            m.proj_out.weight.data.zero_()
            m.proj_out.bias.data.zero_()
    return unet


@pytest.fixture
def adapter_file(tmp_path):
    path = tmp_path / "ip-adapter_sd15.safetensors"
    save_file(tiny_ip_adapter(build_tiny_unet(seed=4)), str(path))
    return path


def test_the_streaming_unet_with_image_tokens_is_diffusers_unet_with_the_same_ip_adapter(adapter_file):
    unet = _silenced(4)
    attach_ip_adapter(unet, read_ip_adapter(adapter_file))
    assert has_ip_adapter(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([700, 300])
    text = tiny_prompt_embeds(0).expand(2, -1, -1)
    embeds = torch.randn(2, IMAGE_DIM, generator=g)
    with torch.no_grad():
        tokens = image_tokens(unet, embeds)
        ours = unet(x, t, text, None, SequenceContext(num_frames=1), image_tokens=tokens)
        theirs = unet.unet2d(x, t, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        without = unet(x, t, text, None, SequenceContext(num_frames=1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours - without).abs().max() > 1e-3  # the picture steers


def test_the_scale_sets_how_much_the_picture_steers(adapter_file):
    unet = _silenced(4)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    text, embeds = tiny_prompt_embeds(1), torch.randn(1, IMAGE_DIM, generator=g)
    with torch.no_grad():
        plain = unet(x, t, text, None, SequenceContext(num_frames=1))
    attach_ip_adapter(unet, read_ip_adapter(adapter_file))
    outs = {}
    for scale in (0.0, 0.5, 1.0):
        set_ip_adapter_scale(unet, scale)
        with torch.no_grad():
            outs[scale] = unet(x, t, text, None, SequenceContext(num_frames=1), image_tokens=image_tokens(unet, embeds))
    torch.testing.assert_close(outs[0.0], plain, rtol=1e-4, atol=1e-5)  # scale 0: the text alone
    assert 0 < (outs[0.5] - plain).abs().max() < (outs[1.0] - plain).abs().max()


def test_a_file_that_is_not_an_ip_adapter_or_does_not_fit_is_one_clear_error(tmp_path):
    bad = tmp_path / "not.safetensors"
    save_file({"weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ModelLoadError, match="not an IP-Adapter"):
        read_ip_adapter(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        read_ip_adapter(tmp_path / "missing.safetensors")
    unet = build_tiny_unet(seed=0)
    sd = tiny_ip_adapter(unet)
    del sd["ip_adapter.31.to_v_ip.weight"]
    with pytest.raises(ModelLoadError, match="does not fit"):
        attach_ip_adapter(unet, sd)
    with pytest.raises(ConfigError, match="no IP-Adapter"):
        set_ip_adapter_scale(build_tiny_unet(seed=0), 0.5)


def _image_stream(unet, mode="off", with_image=True, **options):
    from live2diff_engine.pipeline.schedule import make_schedule
    from live2diff_engine.pipeline.stream import StreamPipeline

    pipe = StreamPipeline(unet, make_schedule(50, t_index_list=[32, 45]), (8, 8), generator=torch.Generator().manual_seed(1),
                          accelerate=mode, accelerator_options=options or None)
    pipe.set_prompt_embeds(tiny_prompt_embeds(0))
    g = torch.Generator().manual_seed(3)
    pictures = [image_tokens(unet, torch.randn(1, IMAGE_DIM, generator=g))[0] for _ in range(2)]
    if with_image:
        pipe.set_image_tokens(pictures[0])
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    pipe.prepare(x, x.flip(0))
    buffer = pipe._image
    out = []
    for i in range(10):
        if i == 5 and with_image:
            pipe.set_image_tokens(pictures[1])  # another picture, between frames
        if i == 7:
            set_ip_adapter_scale(unet, 0.5)  # a weaker picture: written into the weights in place
        out.append(pipe.step(x[i % 8 : i % 8 + 1], x[(i + 3) % 8 : (i + 3) % 8 + 1]).clone())
    assert pipe._image is buffer  # written in place
    set_ip_adapter_scale(unet, 1.0)
    return torch.cat(out), pipe


def test_a_stream_with_a_picture_differs_and_compiled_matches_eager_without_recompiling(adapter_file):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    unet = build_tiny_unet(seed=4)
    attach_ip_adapter(unet, read_ip_adapter(adapter_file))
    eager, _ = _image_stream(unet)
    plain, _ = _image_stream(unet, with_image=False)
    assert (eager - plain).abs().max() > 1e-3  # the picture steers the stream, warmup and stream alike
    counter = CompileCounterWithBackend("eager")
    compiled, pipe = _image_stream(unet, "compile", backend=counter)
    assert pipe.accelerated == "compile" and counter.frame_count == 1  # a new picture, a new scale: no recompile
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_a_style_picture_as_bytes_through_a_saved_image_encoder_steers_the_frame_pipeline(adapter_file, tmp_path):
    import cv2
    import numpy as np
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from live2diff_engine.models.components import build_tiny_components
    from live2diff_engine.models.ip_adapter import decode_picture, encode_picture
    from live2diff_engine.pipeline.frames import FramePipeline
    from test_frames import clip

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=8, projection_dim=IMAGE_DIM)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "image_encoder")  # the real on-disk format
    encoder = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "image_encoder").eval()
    picture = np.zeros((48, 64, 3), np.uint8)
    cv2.circle(picture, (32, 24), 15, (255, 40, 40), -1)
    ok, png = cv2.imencode(".png", picture)
    rgb = decode_picture(png.tobytes())
    assert rgb.shape == (48, 64, 3) and tuple(rgb[24, 32]) == (40, 40, 255)  # RGB, as sent (BGR written)
    embeds = encode_picture(encoder, rgb)
    assert embeds.shape == (1, IMAGE_DIM)
    for bad, error in ((b"", "empty"), (b"not an image", "not an image"), (b"x" * (9 << 20), "too large")):
        with pytest.raises(ConfigError, match=error):
            decode_picture(bad)

    outs = []
    for with_picture in (False, True):
        comps = build_tiny_components(seed=0)
        attach_ip_adapter(comps.unet, read_ip_adapter(adapter_file))
        comps.image_encoder = encoder
        fp = FramePipeline(comps, width=64, height=64, prompt="a cat", seed=1)
        if with_picture:
            fp.set_style_image(embeds)
        frames = [img for f in clip(12, seed=2) for _, img in fp.push(f)] + [img for _, img in fp.flush()]
        outs.append(np.stack(frames[8:]).astype(int))  # after the warmup frames (the camera as it is)
    assert np.abs(outs[0] - outs[1]).max() > 0
    fp.set_style_image_scale(0.0)
    fp.set_style_image(None)
    with pytest.raises(ConfigError, match="0 to 2"):
        fp.set_style_image_scale(3)
