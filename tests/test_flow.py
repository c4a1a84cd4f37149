"""Properties of the TransformerFlow that catch real bugs: invertibility, exact log-determinants, causality, and
agreement between the training forward, sequential decoding, cached steps and Jacobi decoding."""
import math

import pytest
import torch
from conftest import IMAGE, VIDEO, tiny_model

from transformer_flow import BlockDecoding, KVCache, Model, bits_per_dim, guide

IMAGE_SHAPE, VIDEO_SHAPE = (4, 8, 8), (3, 4, 4, 4)


def inputs(shape, batch=2, guided=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randn((2 if guided else 1) * batch, 6, 16, generator=g)
    return x, y


@pytest.mark.parametrize("cfg,shape", [(IMAGE, IMAGE_SHAPE), (VIDEO, VIDEO_SHAPE)], ids=["image", "video"])
def test_reverse_inverts_forward(cfg, shape):
    model = tiny_model(**cfg)
    x, y = inputs(shape)
    with torch.no_grad():
        z, _, outputs, logdets = model(x, y)
    assert len(outputs) == cfg["num_blocks"] + 1 and len(logdets) == cfg["num_blocks"]
    assert (z - x).abs().max() > 0.1  # the random flow is not the identity
    torch.testing.assert_close(model.reverse(z, y, jacobi=False), x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg,shape", [(IMAGE, (2, 3, 3)), (VIDEO, (2, 2, 2, 2))], ids=["image", "video"])
def test_logdet_equals_autograd_jacobian(cfg, shape):
    model = tiny_model(**dict(cfg, in_channels=shape[-3], img_size=shape[-1]))
    x, y = inputs(shape, batch=1)
    jacobian = torch.autograd.functional.jacobian(lambda v: model(v.view(1, *shape), y)[0].flatten(), x.flatten())
    _, logabsdet = torch.linalg.slogdet(jacobian.double())
    logdets = model(x, y)[3]
    assert abs(sum(ld.sum() for ld in logdets).item() - logabsdet.item()) < 1e-3


def test_blocks_are_causal():
    model = tiny_model(**VIDEO)
    x, y = inputs(VIDEO_SHAPE)
    h = model.patchify(x)
    for block in model.blocks:
        n_txt = y.size(1) if block.txt_dim else 0
        rope = model.rope_tables(h.shape, n_txt, h.device)
        base = block.to_seq(block(h, y, rope)[0])
        for t in (0, 5, h[0].numel() // h.size(-1) - 1):
            s = block.to_seq(h).clone()
            s[:, t] += 1.0
            moved = block.to_seq(block(block.from_seq(s, h.shape), y, rope)[0])
            assert torch.equal(moved[:, :t], base[:, :t]), "a token changed an earlier output"
            assert not torch.allclose(moved[:, t], base[:, t])


def test_cached_step_equals_full_forward():
    model = tiny_model(**IMAGE)
    x, y = inputs(IMAGE_SHAPE)
    block = model.blocks[-1]
    h = model.patchify(x)
    rope = model.rope_tables(h.shape, y.size(1), h.device)
    with torch.no_grad():
        inp = block._shift(block.to_seq(h))
        mu, sigma = block.params(block.run(inp, y, rope)[0])
        cache = KVCache()
        block.run(inp[:, :0], y, rope, cache)  # text prefix
        for t in range(inp.size(1)):
            mu_t, sigma_t = block.params(block.run(inp[:, t:t + 1], None, rope, cache)[0])
            torch.testing.assert_close(mu_t[:, 0], mu[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sigma_t[:, 0], sigma[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg,shape", [(IMAGE, IMAGE_SHAPE), (VIDEO, VIDEO_SHAPE)], ids=["image", "video"])
def test_converged_jacobi_equals_sequential(cfg, shape):
    model = tiny_model(**cfg)
    z, y = inputs(shape, guided=True)
    exact = model.reverse(z, y, guidance=1.5, jacobi=False)
    for block_size in (4, 16):
        jacobi = model.reverse(z, y, guidance=1.5, jacobi=True, jacobi_block_size=block_size, jacobi_th=1e-12,
                               jacobi_max_iter=1000)
        torch.testing.assert_close(jacobi, exact, atol=1e-4, rtol=0)
    loose = model.reverse(z, y, guidance=1.5, jacobi=True, jacobi_block_size=16, jacobi_th=1e-2, jacobi_max_iter=3)
    assert (loose - exact).norm() / exact.norm() < 0.2


@pytest.mark.parametrize("cfg,shape", [(IMAGE, IMAGE_SHAPE), (VIDEO, VIDEO_SHAPE)], ids=["image", "video"])
def test_jacobi_sample_does_not_depend_on_its_batch(cfg, shape):
    """Loose Jacobi settings (far from converged) make each sample settle at its own pace: a sample decoded in a
    batch of 5 equals the same sample decoded alone, whatever its companions."""
    model = tiny_model(**cfg)
    z, y = inputs(shape, batch=5, guided=True)
    loose = BlockDecoding(window=8, threshold=3e-2, max_iter=4)
    batch = model.reverse(z, y, guidance=1.5, decoding=loose)
    exact = model.reverse(z, y, guidance=1.5, jacobi=False)
    assert (batch - exact).abs().max() > 1e-3  # far from the exact inverse: the stopping rule decides the result
    for i in range(5):
        alone = model.reverse(z[i:i + 1], y[i::5], guidance=1.5, decoding=loose)
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)
    shuffled = model.reverse(z.flip(0), torch.cat([y[:5].flip(0), y[5:].flip(0)]), guidance=1.5, decoding=loose)
    torch.testing.assert_close(shuffled.flip(0), batch, atol=1e-5, rtol=0)


def test_guidance_formula_matches_gaussian_product():
    """(1+w) log N(mu_c, s_c) - w log N(mu_u, s_u) is Gaussian; the unconditional variance is clipped at s_c."""
    mu = torch.tensor([[0.3], [-0.5]])
    for sigma_c, sigma_u in [(0.7, 1.3), (1.3, 0.7)]:
        sigma = torch.tensor([[sigma_c], [sigma_u]])
        w = 2.0
        s_u = max(sigma_u, sigma_c)
        precision = (1 + w) / sigma_c ** 2 - w / s_u ** 2
        mean = ((1 + w) * 0.3 / sigma_c ** 2 - w * -0.5 / s_u ** 2) / precision
        g_mu, g_sigma = guide(mu, sigma, w)
        torch.testing.assert_close(g_mu, torch.full((2, 1), mean), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_sigma, torch.full((2, 1), precision ** -0.5), rtol=1e-6, atol=1e-6)
    g_mu, g_sigma = guide(mu, sigma, 0.0)
    assert torch.equal(g_mu[1], mu[0]) and torch.equal(g_sigma[1], sigma[0])


def test_vanishing_guidance_equals_conditional_model():
    model = tiny_model(**IMAGE)
    z, y = inputs(IMAGE_SHAPE, guided=True)
    conditional = model.reverse(z, y[:2], jacobi=False)
    torch.testing.assert_close(model.reverse(z, y, guidance=1e-9, jacobi=False), conditional, atol=1e-5, rtol=0)
    assert (model.reverse(z, y, guidance=2.0, jacobi=False) - conditional).abs().max() > 1e-2


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_prefilled_context_equals_whole_sequence(guidance, sweeps):
    model = tiny_model(**VIDEO)
    z, y = inputs(VIDEO_SHAPE, guided=guidance > 0)
    whole = model.reverse(z, y, guidance=guidance, jacobi=False)
    for jacobi in (False, True):
        caches = model.prefill(whole[:, :1], y)
        cont = model.reverse(z, y, guidance=guidance, kv_caches=caches, jacobi=jacobi, jacobi_th=1e-12,
                             jacobi_block_size=8, jacobi_max_iter=1000)
        torch.testing.assert_close(cont, whole, atol=1e-4, rtol=0)


def test_windowed_jacobi_equals_windowed_sequential(sweeps):
    model = tiny_model(**dict(VIDEO, local_attn_window=2))
    z, y = inputs((5, 4, 4, 4), guided=True)
    seq = model.reverse(z, y, guidance=1.5, jacobi=False, context_length=1)
    jac = model.reverse(z, y, guidance=1.5, jacobi=True, jacobi_block_size=4, jacobi_th=1e-12, jacobi_max_iter=1000,
                        context_length=1)
    torch.testing.assert_close(jac, seq, atol=1e-4, rtol=0)
    # the window matters: frames beyond it decode differently from full attention
    full = tiny_model(**VIDEO).reverse(z, y, guidance=1.5, jacobi=False)
    assert torch.allclose(seq[:, :2], full[:, :2], atol=1e-4) and not torch.allclose(seq[:, 3:], full[:, 3:])
    with pytest.raises(ValueError, match="context_length"):
        model.reverse(z, y, guidance=1.5)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_windowed_decoding_equals_each_window_afresh(guidance):
    """The official sliding window: past the first window, each frame is decoded as the last frame of a fresh clip
    of its `context_length` predecessors (given) and itself, at the positions of that clip.  The refilled KV cache
    (text kept, context K/V only) must give what a fresh prefilled decode of that clip gives."""
    model = tiny_model(**dict(VIDEO, local_attn_window=2))
    z, y = inputs((5, 4, 4, 4), guided=guidance > 0)
    seq = model.reverse(z, y, guidance=guidance, jacobi=False, context_length=1)
    for t in range(2, 5):
        fresh = model.reverse(z[:, t - 1:t + 1], y, guidance=guidance, jacobi=False, context_length=1,
                              kv_caches=model.prefill(seq[:, t - 1:t], y))
        torch.testing.assert_close(fresh[:, 1], seq[:, t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("hf_style", [0, 1])
@pytest.mark.parametrize("context", [1, 2])
def test_rolling_kv_cache_equals_reencoding_for_one_layer(context, hf_style, sweeps):
    """A rolling KV cache keeps the context's keys and values as computed and re-rotates each key to its new slot.
    With one layer in the deep block a key or value depends only on its own token and slot, so the rolled cache is
    what the official re-encoding writes: the same frames (a wrong shift or rotation would change every frame past
    the first window); sequential and Jacobi decoding, context 1 and 2 of a window of 3, both RoPE layouts."""
    cfg = dict(VIDEO, local_attn_window=3, layers_per_block=[1, 1, 1], hf_style_rope=hf_style)
    model = tiny_model(**cfg)
    z, y = inputs((7, 4, 4, 4), guided=True)
    for jacobi in (False, True):
        options = dict(jacobi=jacobi, jacobi_block_size=4, jacobi_th=1e-12, jacobi_max_iter=1000) if jacobi else \
            dict(jacobi=False)
        reencoded = model.reverse(z, y, guidance=1.5, context_length=context, **options)
        rolled = model.reverse(z, y, guidance=1.5, context_length=context, rolling_kv_cache=True, **options)
        torch.testing.assert_close(rolled, reencoded, atol=1e-4, rtol=0)
    # with more layers the kept frames carry what they attended to when made: past the first window it differs
    deep = tiny_model(**dict(cfg, layers_per_block=[1, 1, 2]))
    reencoded = deep.reverse(z, y, guidance=1.5, jacobi=False, context_length=context)
    rolled = deep.reverse(z, y, guidance=1.5, jacobi=False, context_length=context, rolling_kv_cache=True)
    torch.testing.assert_close(rolled[:, :3], reencoded[:, :3], atol=1e-5, rtol=0)
    assert not torch.allclose(rolled[:, 3:], reencoded[:, 3:], atol=1e-3)


def test_kv_only_run_fills_the_same_cache():
    """Transformer.run(kv_only=True) skips the last layer's attention output and MLP: the cache must hold exactly
    what a full call leaves there, text rows included."""
    model = tiny_model(**VIDEO)
    block = model.blocks[-1]
    x, y = inputs(VIDEO_SHAPE)
    s = block.to_seq(model.patchify(x))
    rope = model.rope_tables(model.patchify(x).shape, y.size(1), x.device)
    full, only = KVCache(), KVCache()
    with torch.no_grad():
        block.run(s, y, rope, full)
        assert block.run(s, y, rope, only, kv_only=True) is None
    assert len(only) == len(full) and len(only.keys) == len(full.keys) == len(block.attn_blocks)
    for a, b in zip(full.keys + full.values, only.keys + only.values):
        assert torch.equal(a[:, :, :len(full)], b[:, :, :len(only)])
    with pytest.raises(ValueError, match="kv_only"):
        block.run(s, y, rope, None, kv_only=True)


FLOW_SCORE_VIDEO = dict(VIDEO, learnable_self_denoiser=0, conditional_denoiser=0, denoiser_window=None)


@pytest.mark.parametrize("cfg", [FLOW_SCORE_VIDEO, dict(FLOW_SCORE_VIDEO, sos=0, cond_top_only=0, shallow_block_local=0),
                                 dict(FLOW_SCORE_VIDEO, shallow_block_local=0, num_blocks=2, layers_per_block=[2, 2])],
                         ids=["official-shaped", "no-sos-text-everywhere", "time-ordered-shallow"])
def test_windowed_self_denoising_equals_the_official_windows(cfg):
    """Self-denoising a long video in windows: each window after the first runs only its new frames with autograd
    (Model.nll_given_context), and gives what the official process_denoising gives, a full Tweedie step of the
    window (flow_score_step) keeping its new frames; with overlap 2 and 1 (one and two new frames per window: those
    windows take 3 and 1 mini-batches of samples at once, 7 samples making an uneven last group)."""
    from utils.inference import denoise, flow_score_step

    model = tiny_model(**cfg)
    x, y = inputs((7, 4, 4, 4))
    for overlap in (2, 1):
        official, start, written = x.clone(), 0, 0  # process_denoising's loop, with the whole window's step
        while written < x.size(1):
            step = flow_score_step(model, official[:, start:start + 3], y, 0.3)
            official[:, written:start + 3] = step[:, written - start:]
            written, start = start + 3, start + 3 - overlap
        ours = denoise(model, x, y, 0.3, learnable=False, batch_size=2, window=3, overlap=overlap)
        torch.testing.assert_close(ours, official, atol=1e-5, rtol=0)
        assert (ours - x).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-2  # every frame moved
    whole = x[:, :3].clone().requires_grad_(True)
    z, _, _, logdets = model(whole, y)
    (model.get_loss(z, logdets)["loss"] * whole.numel()).backward()  # the batch's summed NLL
    part = x[:, :3].clone().requires_grad_(True)
    model.nll_given_context(part, y, 2).backward()
    torch.testing.assert_close(part.grad[:, 2:], whole.grad[:, 2:], atol=1e-5, rtol=1e-5)
    assert part.grad[:, :2].abs().max() == 0  # the context runs without autograd
    if model.frame_local_shallow:  # the context's shallow blocks computed once per frame: the same likelihood
        torch.testing.assert_close(model.nll_given_context(x[:, :3], y, 2, model.frame_features(x[:, :2], y)),
                                   model.nll_given_context(x[:, :3], y, 2))
    else:
        with pytest.raises(ValueError, match="one frame at a time"):
            model.frame_features(x, y)
    with pytest.raises(ValueError, match="temporally causal"):
        tiny_model(**dict(FLOW_SCORE_VIDEO, temporal_causal=0)).nll_given_context(x, y, 2)


@pytest.mark.parametrize("cfg", [FLOW_SCORE_VIDEO, dict(FLOW_SCORE_VIDEO, sos=0, cond_top_only=0, shallow_block_local=0),
                                 dict(FLOW_SCORE_VIDEO, shallow_block_local=0, num_blocks=2, layers_per_block=[2, 2])],
                         ids=["official-shaped", "no-sos-text-everywhere", "time-ordered-shallow"])
def test_loss_with_given_frames_is_the_nll_of_the_rest_given_them(cfg):
    """get_loss(context=c): sample b's loss is the mean over its frames after c[b], which in a temporally causal
    model is their NLL given the first c[b] frames: the value of nll_given_context, and the parameters' gradient of
    the whole clip's NLL less that of its first c[b] frames alone (whose NLL no later frame changes); context 0 is
    the whole clip's loss (continuation clips of the shapes data, --shapes_continuation)."""
    model = tiny_model(**cfg)
    x, y = inputs((4, 4, 4, 4))  # (B, T, C, H, W)
    per_frame = x[0, 0].numel()
    contexts = torch.tensor([3, 1])

    def nll(v, t):  # summed over the sample's dimensions
        z, _, _, logdets = model(v, t)
        return model.get_loss(z, logdets)["loss"] * v.numel()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in model.parameters()])

    z, _, _, logdets = model(x, y)
    masked = model.get_loss(z, logdets, context=contexts)["loss"]
    scored = [(x.size(1) - int(c)) * per_frame for c in contexts]
    given = sum(model.nll_given_context(x[b:b + 1], y[b:b + 1], int(c)).detach() / scored[b]
                for b, c in enumerate(contexts)) / x.size(0)
    torch.testing.assert_close(masked, given, atol=1e-5, rtol=1e-5)
    rest = sum((nll(x[b:b + 1], y[b:b + 1]) - nll(x[b:b + 1, :int(c)], y[b:b + 1])) / scored[b]
               for b, c in enumerate(contexts)) / x.size(0)
    torch.testing.assert_close(rest.detach(), given, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads(masked), grads(rest), atol=1e-5, rtol=1e-4)
    z, _, _, logdets = model(x, y)
    torch.testing.assert_close(model.get_loss(z, logdets, context=torch.zeros(2, dtype=torch.long))["loss"],
                               model.get_loss(z, logdets)["loss"])


def test_denoiser_mask_is_its_frame_window():
    """temporal_causal 2, denoiser_window 2: a frame-f token sees all text and frames f-1 .. f+1; text sees frames 0, 1."""
    model = tiny_model(**VIDEO)
    n_txt, frames, per_frame = 3, 5, 4
    mask = model.learnable_self_denoiser.mask((1, frames, 2, 2, 4), n_txt, "cpu")
    frame_of = lambda i: None if i < n_txt else (i - n_txt) // per_frame
    for q in range(mask.size(0)):
        f = frame_of(q)
        seen = {frame_of(k) for k in range(mask.size(1)) if mask[q, k]}
        expected = {None} | (set(range(f - 1, f + 2)) if f is not None else {0, 1})
        assert seen == expected & ({None} | set(range(frames))), (q, seen)
    x, y = inputs((5, 4, 4, 4))
    assert model.denoise(x, y).shape == x.shape
    y2 = y.clone()
    y2[:, 0] += 1.0
    assert (model.denoise(x, y2) - model.denoise(x, y)).abs().max() > 1e-6  # conditional on text


def test_gradient_checkpointing_keeps_gradients():
    x, y = inputs(IMAGE_SHAPE)
    grads = []
    for every in (0, 1):
        model = tiny_model(**dict(IMAGE, use_checkpoint=every)).train()
        z, _, _, logdets = model(x, y)
        model.get_loss(z, logdets)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_patchify_round_trip():
    model = Model(**dict(IMAGE, patch_size=2))
    x = torch.randn(2, 3, 4, 8, 6)
    h = model.patchify(x)
    assert h.shape == (2, 3, 4, 3, 16)
    assert torch.equal(h[0, 0, 1, 2, :4], x[0, 0, :, 2, 4])  # patch (1, 2), pixel (0, 0): all channels
    assert torch.equal(model.unpatchify(h), x)


def test_loss_is_gaussian_nll_per_dimension():
    z = torch.randn(64, 4, 16, 16)
    out = Model.get_loss(z, [torch.zeros(64, 256, 4)])
    assert abs(out["loss"].item() - 0.5) < 0.01
    assert abs(bits_per_dim(out["loss"]).item() - 0.5 * math.log2(2 * math.pi * math.e)) < 0.02
    weighted = Model.get_loss(z, [torch.full((64, 256, 4), -0.1)], weights=2.0)
    torch.testing.assert_close(weighted["loss"], 2 * (out["loss"] + 0.1))


def test_bad_options_are_named():
    with pytest.raises(TypeError, match="colour"):
        Model(**IMAGE, colour=1)
    with pytest.raises(ValueError, match="use_pretrained_lm"):
        Model(**IMAGE, use_pretrained_lm="gemma3_1b")
    with pytest.raises(ValueError, match="layers_per_block"):
        Model(**dict(IMAGE, num_blocks=4))
    Model(**IMAGE, use_pretrained_lm=None, use_mm_attn=0, noise_embed_denoiser=0)  # official inert values


def test_bad_inputs_are_named():
    model = tiny_model(**IMAGE)
    z, y = inputs(IMAGE_SHAPE, guided=True)
    with pytest.raises(ValueError, match=r"with guidance > 0, y is \[conditional; unconditional\]"):
        model.reverse(z, y[:2], guidance=2.0)
    with pytest.raises(ValueError, match="text-conditioned"):
        model(z)
    with pytest.raises(ValueError, match="latents must be"):
        model.reverse(z[0], y[:1])


def test_hf_style_rope_pairs_other_channels_and_stays_invertible():
    """hf_style_rope rotates channel pairs (k, k + d/2) instead of (2k, 2k + 1): a different map, the same flow."""
    x, y = inputs(IMAGE_SHAPE)
    hf, plain = tiny_model(**IMAGE, hf_style_rope=True), tiny_model(**IMAGE)
    with torch.no_grad():
        z_hf, z_plain = hf(x, y)[0], plain(x, y)[0]
    assert (z_hf - z_plain).abs().max() > 1e-3
    torch.testing.assert_close(hf.reverse(z_hf, y, jacobi=False), x, atol=1e-4, rtol=0)
