"""The stream itself: one direction only, equal to the offline computation, constant state."""

import pytest
import torch

from live2diff_engine.errors import ConfigError
from live2diff_engine.models.motion import SequenceContext
from live2diff_engine.models.tiny import TINY_LATENT_SIZE, build_tiny_unet, tiny_prompt_embeds
from live2diff_engine.pipeline import Bookkeeping, StreamPipeline, make_schedule, warmup_causal_mask

H, W = TINY_LATENT_SIZE


@pytest.fixture(scope="module")
def unet():
    return build_tiny_unet(seed=3)


def make_pipe(unet, t_index_list=(32, 45), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return StreamPipeline(unet, make_schedule(50, t_index_list=list(t_index_list)), (H, W), generator=gen)


def inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, H, W, generator=g), torch.randn(n, 1, 4, H, W, generator=g)


def run_stream(unet, frames, depths, t_index_list=(32, 45), prompt_seed=0):
    pipe = make_pipe(unet, t_index_list)
    g = torch.Generator().manual_seed(99)
    warm = torch.randn(8, 4, H, W, generator=g)
    pipe.prepare(pipe.add_noise(warm), warm.flip(0), tiny_prompt_embeds(prompt_seed))
    outs = []
    for x, d in zip(frames, depths):
        outs.append(pipe.step(pipe.add_noise(x), d).clone())
    return outs, pipe


@pytest.mark.parametrize("t_index_list", [(32, 45), (20, 32, 45)])
def test_stream_is_uni_directional(unet, t_index_list):
    n, k = 44, 23
    frames, depths = inputs(n, seed=1)
    changed_frames, changed_depths = frames.clone(), depths.clone()
    other_frames, other_depths = inputs(n, seed=2)
    changed_frames[k + 1 :] = other_frames[k + 1 :]
    changed_depths[k + 1 :] = other_depths[k + 1 :]

    a, pipe = run_stream(unet, frames, depths, t_index_list)
    b, _ = run_stream(unet, changed_frames, changed_depths, t_index_list)
    lag = pipe.lag
    # Call i finishes input frame i - lag: every output of frames 0..k is bit-identical.
    for call in range(k + lag + 1):
        assert torch.equal(a[call], b[call]), f"call {call} (input frame {call - lag}) changed"
    # and the changed frames do change what follows.
    for call in range(k + lag + 1, n):
        assert not torch.equal(a[call], b[call]), f"call {call} did not change"


def test_a_past_frame_changes_every_later_frame_none_before_it_and_only_through_the_stream_state(unet):
    frames, depths = inputs(30, seed=4)
    nudged = frames.clone()
    nudged[5] += 0.5
    a, pipe = run_stream(unet, frames, depths)
    b, _ = run_stream(unet, nudged, depths)
    lag = pipe.lag
    assert all(torch.equal(a[i], b[i]) for i in range(5 + lag))
    later = [float((a[i] - b[i]).abs().max()) for i in range(5 + lag + 1, 30)]
    assert min(later) > 0  # the temporal layers carry frame 5 into every later frame
    # Through the state the stream carries (KV-cache, frames in flight) and nothing else: with
    # the plain run's state put back once frame 5 is out, the nudged run's later frames are the
    # plain run's, bit for bit.
    swap = 5 + lag + 1
    saved = []

    def run(xs, at_swap):
        p = make_pipe(unet)
        g = torch.Generator().manual_seed(99)
        warm = torch.randn(8, 4, H, W, generator=g)
        p.prepare(p.add_noise(warm), warm.flip(0), tiny_prompt_embeds(0))
        outs = []
        for i, (x, d) in enumerate(zip(xs, depths)):
            if i == swap:
                at_swap(p)
            outs.append(p.step(p.add_noise(x), d).clone())
        return outs

    a2 = run(frames, lambda p: saved.extend(t.clone() for t in p.state_tensors()))
    b2 = run(nudged, lambda p: [t.copy_(s) for t, s in zip(p.state_tensors(), saved)])
    assert all(torch.equal(x, y) for x, y in zip(a2, a))
    assert all(torch.equal(a2[i], b2[i]) for i in range(swap, 30))


def test_stream_equals_offline_batched_computation(unet):
    """Two steps: the stream's frames equal the same frames denoised together, step by step, in
    whole-clip UNet calls under the warmup+causal mask, at the same noise."""
    torch.manual_seed(0)
    n = 8  # 8 warmup + 8 frames fill the 16-slot window exactly
    pipe = make_pipe(unet, (32, 45))
    prompt = tiny_prompt_embeds(0)
    g = torch.Generator().manual_seed(5)
    warm_x = torch.randn(8, 4, H, W, generator=g)
    warm_d = torch.randn(8, 4, H, W, generator=g)
    warm_noise = torch.randn(8, 4, H, W, generator=g)
    xs = torch.randn(n, 4, H, W, generator=g)
    ds = torch.randn(n, 4, H, W, generator=g)
    step_noise = torch.randn(n + 1, 1, 4, H, W, generator=g)  # per call, moves row 0 on to step 1

    warm_out = pipe.prepare(warm_x, warm_d, prompt, [warm_noise])
    streamed = []
    for i in range(n + 1):  # one extra call finishes the last frame
        x = xs[i : i + 1] if i < n else torch.zeros(1, 4, H, W)
        d = ds[i : i + 1] if i < n else torch.zeros(1, 4, H, W)
        streamed.append(pipe.step(x, d, step_noise[i]).clone())
    streamed = torch.cat(streamed[1:])  # call i + 1 finishes frame i

    s = pipe.schedule
    mask = warmup_causal_mask(8 + n, 8)
    ctx = SequenceContext(num_frames=8 + n, mask=mask)
    x = torch.cat([warm_x, xs])
    d = torch.cat([warm_d, ds])
    a, b, cs, co = s.alpha, s.beta, s.c_skip, s.c_out
    eps = unet(x, s.timesteps[:1], prompt, d, ctx)
    x0 = co[0] * ((x - b[0] * eps) / a[0]) + cs[0] * x
    x = a[1] * x0 + b[1] * torch.cat([warm_noise, step_noise[:n, 0]])
    eps = unet(x, s.timesteps[1:2], prompt, d, ctx)
    offline = co[1] * ((x - b[1] * eps) / a[1]) + cs[1] * x

    torch.testing.assert_close(offline[:8], warm_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(offline[8:], streamed, rtol=1e-4, atol=1e-5)
    assert float(streamed.std()) > 0.1  # a real signal, not a degenerate one


def test_cache_is_preallocated_and_never_grows(unet):
    frames, depths = inputs(16, seed=6)
    pipe = make_pipe(unet, (20, 32, 45))
    warm = torch.randn(8, 4, H, W)
    pipe.prepare(warm, warm, tiny_prompt_embeds(0))
    caches = unet.cache_tensors()
    before = [(c.data_ptr(), tuple(c.shape)) for c in caches]
    assert all(c.shape[1] == 3 and c.shape[4] == 16 for c in caches)  # [2, T, hw, heads, window, hd]
    table_len = len(pipe.bookkeeping)
    # The window (16) fills at call 16; from there the cache's states repeat every 8 calls (the
    # frames past the 8 warmup ones), so 64 calls go through every state six times over.
    for i in range(64):
        pipe.step(frames[i % 16], depths[i % 16])
    assert [(c.data_ptr(), tuple(c.shape)) for c in unet.cache_tensors()] == before
    assert len(pipe.bookkeeping) == table_len
    assert pipe.calls == 64


def test_bookkeeping_follows_the_original_rules():
    bk = Bookkeeping(steps=2, window=16, sink=8)

    def row(call, r):
        ctx = bk.context(call)
        bias = "".join("0" if v == 0 else "-" for v in ctx.bias[r].tolist())
        return bias, ctx.pe_idx[r, 8:].tolist(), int(ctx.update_idx[r])

    r8 = list(range(8, 16))
    assert row(0, 0) == ("000000000-------", r8, 8)
    assert row(0, 1) == ("00000000--------", r8, 9)
    assert row(1, 1) == ("000000000-------", r8, 8)
    assert row(7, 0) == ("0" * 16, r8, 15)
    assert row(8, 0) == ("0" * 16, [15, 8, 9, 10, 11, 12, 13, 14], 8)
    assert row(8, 1) == ("0" * 16, r8, 15)
    assert row(9, 1) == ("0" * 16, [15, 8, 9, 10, 11, 12, 13, 14], 8)
    assert row(15, 1) == ("0" * 16, [9, 10, 11, 12, 13, 14, 15, 8], 14)
    assert row(16, 0) == row(8, 0)
    # An endless stream cycles through one window's worth of states.
    for call in range(16, 200):
        assert row(call, 0) == row(call - 8, 0) and row(call, 1) == row(call - 8, 1)
    # The newest frame always carries the largest position once the window is full.
    for call in range(9, 40):
        ctx = bk.context(call)
        assert ctx.q_idx.tolist() == [15, 15]


def test_rows_beyond_one_keep_their_placeholders_like_the_original():
    bk = Bookkeeping(steps=4, window=16, sink=8)
    ctx = bk.context(0)
    assert ctx.update_idx.tolist() == [8, 9, 8, 8]
    # From call 1 on, rows 1..3 share one state, one call behind row 0.
    for call in range(1, 40):
        c = bk.context(call)
        for r in (2, 3):
            assert torch.equal(c.bias[r], c.bias[1]) and torch.equal(c.pe_idx[r], c.pe_idx[1])
            assert c.update_idx[r] == c.update_idx[1]


def test_prompt_swap_between_frames_needs_no_rewarmup(unet):
    frames, depths = inputs(20, seed=7)
    base, _ = run_stream(unet, frames, depths)
    pipe = make_pipe(unet)
    g = torch.Generator().manual_seed(99)
    warm = torch.randn(8, 4, H, W, generator=g)
    pipe.prepare(pipe.add_noise(warm), warm.flip(0), tiny_prompt_embeds(0))
    outs = []
    for i, (x, d) in enumerate(zip(frames, depths)):
        if i == 10:
            pipe.update_prompt(tiny_prompt_embeds(123))
        outs.append(pipe.step(pipe.add_noise(x), d).clone())
    assert all(torch.equal(outs[i], base[i]) for i in range(10))
    assert all(not torch.equal(outs[i], base[i]) for i in range(10, 20))
    assert pipe.calls == 20


def test_reset_rewarms_and_reproduces_the_stream(unet):
    frames, depths = inputs(12, seed=8)
    pipe = make_pipe(unet)
    warm = torch.randn(8, 4, H, W)
    noise = [torch.randn(8, 4, H, W)]
    step_noise = torch.randn(12, 1, 4, H, W)

    def once():
        pipe.reset(warm, warm, tiny_prompt_embeds(0), noise)
        return [pipe.step(x, d, step_noise[i]).clone() for i, (x, d) in enumerate(zip(frames, depths))]

    first = once()
    assert pipe.calls == 12
    second = once()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_step_before_warmup_is_a_clear_error(unet):
    pipe = make_pipe(unet)
    with pytest.raises(ConfigError, match="warmed up"):
        pipe.step(torch.zeros(1, 4, H, W), torch.zeros(1, 4, H, W))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"t_index_list": [32, 50]}, "out of range"),
        ({"t_index_list": [-1, 45]}, "out of range"),
        ({"t_index_list": [45, 32]}, "increasing"),
        ({"t_index_list": []}, "empty"),
        ({"strength": 1.5}, "strength"),
        ({}, "exactly one"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_schedule(50, **kwargs)


def test_strength_picks_the_last_steps():
    s = make_schedule(4, strength=0.5)
    assert s.t_index_list == (2, 3)
    full = make_schedule(4, t_index_list=[0, 1, 2, 3])
    assert torch.equal(s.timesteps, full.timesteps[2:])


def run_guided(unet, frames, depths, guidance, negative_seed, t_index_list=(32, 45)):
    gen = torch.Generator().manual_seed(0)
    pipe = StreamPipeline(unet, make_schedule(50, t_index_list=list(t_index_list)), (H, W), generator=gen,
                          guidance_scale=guidance)
    pipe.set_negative_embeds(tiny_prompt_embeds(negative_seed))
    g = torch.Generator().manual_seed(99)
    warm = torch.randn(8, 4, H, W, generator=g)
    pipe.prepare(pipe.add_noise(warm), warm.flip(0), tiny_prompt_embeds(0))
    return [pipe.step(pipe.add_noise(x), d).clone() for x, d in zip(frames, depths)], pipe


@pytest.mark.parametrize("t_index_list", [(32, 45), (20, 32, 45)])
def test_guidance_with_the_prompt_as_negative_is_the_unguided_stream(unet, t_index_list):
    """eps_u + g (eps_c - eps_u) = eps_c when both branches see the same text: the guided stream,
    its doubled batch and its second set of cache rows reproduce the unguided stream."""
    frames, depths = inputs(24, seed=5)
    base, _ = run_stream(unet, frames, depths, t_index_list)
    guided, pipe = run_guided(unet, frames, depths, 3.0, negative_seed=0, t_index_list=t_index_list)
    # Equal up to float noise, which the random tiny model amplifies to ~1e-3 on some frames (the
    # two branches' cache rows agree to 1e-6); a wrong row or table would differ by ~0.1 and more,
    # as a real negative prompt does (next test).
    diffs = [float((a - b).abs().max()) for a, b in zip(base, guided)]
    assert max(diffs) < 1e-2 and sorted(diffs)[len(diffs) // 2] < 1e-3, diffs
    T = len(t_index_list)
    assert all(c.shape[1] == 2 * T for c in unet.cache_tensors())  # one row per step and branch


def test_a_negative_prompt_steers_the_guided_stream(unet):
    frames, depths = inputs(12, seed=6)
    base, _ = run_stream(unet, frames, depths)
    steered, _ = run_guided(unet, frames, depths, 2.0, negative_seed=77)
    assert all(float((a - b).abs().max()) > 0.02 for a, b in zip(base, steered))
    with pytest.raises(ConfigError, match="at least 1"):
        StreamPipeline(unet, make_schedule(50, t_index_list=[32, 45]), (H, W), guidance_scale=0.5)


def _weight_copies(run) -> list[str]:
    """Copies of a convolution's weight that ``run`` makes, by the profiler: a copy, clone or
    layout change made inside a convolution, of a tensor shaped like its weight (a linear layer's
    weight goes to BLAS as it is, transposed by a flag; the copies inside addmm are its output)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    layers = ("aten::conv2d", "aten::convolution", "aten::_convolution", "aten::conv_transpose2d")
    copying = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to_mkldnn")
    found = []
    for e in prof.events():
        if e.name not in copying or not e.input_shapes:
            continue
        parent = e.cpu_parent
        while parent is not None:
            if parent.name in layers and len(parent.input_shapes) > 1 and parent.input_shapes[1] == e.input_shapes[0]:
                found.append(f"{e.name} of a {parent.name} weight {e.input_shapes[0]}")
                break
            parent = parent.cpu_parent
    return found


def test_the_warmup_and_a_stream_call_copy_no_weights():
    """Every convolution of the UNet gets its input in the weight's own (contiguous) layout. A
    channels-last feature map (the motion modules' output once was) makes each convolution
    re-layout its weight on every call: 0.67 s of a 6.3 s full-size frame on the CPU, 8 weight
    copies a call on this model. (Outside the UNet, diffusers' VAE mid-block attention and
    transformers' DPT neck hand channels-last maps to a few convolutions of their own: three
    512-channel weights a VAE encode at full size, a small share of a frame; not ours to change.)"""
    unet = build_tiny_unet(seed=3)
    pipe = make_pipe(unet)
    g = torch.Generator().manual_seed(4)
    warm = torch.randn(8, 4, H, W, generator=g)
    assert _weight_copies(lambda: pipe.prepare(pipe.add_noise(warm), warm.flip(0), tiny_prompt_embeds(0))) == []
    for i in range(3):
        pipe.step(warm[i : i + 1], warm[i + 1 : i + 2])
    assert _weight_copies(lambda: pipe.step(warm[3:4], warm[4:5])) == []
