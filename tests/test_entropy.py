"""Row entropy and centred logit norms: dense and streaming against an independent float64 reference."""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from scipy.special import entr

from sigma_core.entropy import (
    attention_entropy, attention_row_stats, bound_variant_norms, head_sigma, logit_row_norms, logits_row_stats,
    prefix_token_norms,
)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def reference(q, k, scale, visible, bias=None):
    """float64 numpy: per-row entropy (scipy.special.entr) and centred norm over visible keys."""
    q, k = q.double().numpy(), k.double().numpy()
    s = scale * q @ np.swapaxes(k, -1, -2)
    if bias is not None:
        s = s + bias
    vis = np.broadcast_to(visible, s.shape)
    B, H, Tq, Tk = s.shape
    ent = np.empty((B, H, Tq))
    nrm = np.empty((B, H, Tq))
    for idx in np.ndindex(B, H, Tq):
        row = s[idx][vis[idx]]
        p = np.exp(row - row.max())
        p /= p.sum()
        ent[idx] = entr(p).sum()
        nrm[idx] = np.linalg.norm(row - row.mean())
    return ent, nrm


@st.composite
def instances(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Tq = draw(st.integers(1, 9))
    Tk = draw(st.integers(1, 9))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.floats(0.1, 4.0))
    causal = draw(st.booleans())
    pad = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    block = draw(st.integers(1, 10))
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Tq, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    k = (torch.randn(B, H, Tk, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    mask = None
    if pad:  # random padding per (batch, key); key 0 always visible so no row is empty
        keep = torch.rand(B, 1, 1, Tk, generator=g) < 0.6
        keep[..., 0] = True
        mask = keep
    return q, k, causal, mask, dtype, block


def _visible(Tq, Tk, causal, mask):
    vis = np.ones((1, 1, Tq, Tk), dtype=bool)
    if causal:
        vis = vis & np.tril(np.ones((Tq, Tk), dtype=bool))
    if mask is not None:
        vis = vis & mask.numpy()
    return vis


@given(instances())
@settings(max_examples=60)
def test_dense_and_streaming_match_float64_reference(inst):
    q, k, causal, mask, dtype, block = inst
    scale = 0.7
    ent_ref, nrm_ref = reference(q, k, scale, _visible(q.shape[2], k.shape[2], causal, mask))
    tol = TOL[dtype]
    for method in ("dense", "streaming"):
        st_ = attention_row_stats(q, k, scale=scale, causal=causal, attn_mask=mask, method=method,
                                  block_size=block)
        assert st_.entropy.dtype == dtype
        np.testing.assert_allclose(st_.entropy.double().numpy(), ent_ref, rtol=0, atol=tol * max(1, ent_ref.max()))
        np.testing.assert_allclose(st_.logit_norm.double().numpy(), nrm_ref, rtol=tol * 10,
                                   atol=tol * 10 * max(1.0, nrm_ref.max()))
        # the public one-quantity functions return exactly the fields of the combined pass
        kw = dict(scale=scale, causal=causal, attn_mask=mask, method=method, block_size=block)
        assert torch.equal(attention_entropy(q, k, **kw), st_.entropy)
        assert torch.equal(logit_row_norms(q, k, **kw), st_.logit_norm)


def test_single_key_rows_have_zero_entropy_and_norm():
    q, k = torch.randn(2, 3, 6, 4, dtype=torch.float64), torch.randn(2, 3, 6, 4, dtype=torch.float64)
    for method in ("dense", "streaming"):
        st_ = attention_row_stats(q, k, causal=True, method=method, block_size=4)
        assert st_.n_keys[..., 0].eq(1).all() and st_.entropy[..., 0].eq(0).all()
        assert st_.logit_norm[..., 0].eq(0).all()
        assert st_.extent[0, 0].tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("method", ["dense", "streaming"])
def test_fully_masked_row_raises(method):
    q, k = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 4, 2)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False
    with pytest.raises(ValueError, match="no visible key"):
        attention_entropy(q, k, attn_mask=mask, method=method, block_size=3)
    fmask = torch.zeros(1, 1, 3, 4).masked_fill(~mask, -math.inf)
    with pytest.raises(ValueError, match="no visible key"):
        attention_entropy(q, k, attn_mask=fmask, method=method, block_size=3)


@pytest.mark.parametrize("method", ["dense", "streaming"])
def test_float_mask_is_additive_and_matches_bool_mask(method):
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 5, 3, dtype=torch.float64), torch.randn(2, 2, 7, 3, dtype=torch.float64)
    keep = torch.rand(2, 1, 5, 7) < 0.7
    keep[..., 0] = True
    as_float = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -math.inf)
    a = attention_entropy(q, k, attn_mask=keep, method=method, block_size=3)
    b = attention_entropy(q, k, attn_mask=as_float, method=method, block_size=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64)  # a real additive bias (ALiBi-like)
    got = attention_entropy(q, k, attn_mask=bias + as_float, method=method, block_size=3)
    ref, _ = reference(q, k, 1 / math.sqrt(3), keep.numpy(), bias.numpy())
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)


def test_streaming_is_stable_for_huge_logits():
    # logits of order 1e4: the naive m + log l - r/l loses everything in float32
    torch.manual_seed(0)
    q = torch.randn(1, 2, 16, 8) * 40
    k = torch.randn(1, 2, 300, 8) * 40
    ref, _ = reference(q, k, 1.0, np.ones((1, 1, 16, 300), dtype=bool))
    got = attention_entropy(q, k, scale=1.0, method="streaming", block_size=32)
    assert (got >= 0).all()
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-5)


def test_auto_streams_long_sequences_and_agrees():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 2100, 4), torch.randn(1, 1, 2100, 4)
    a = attention_entropy(q, k, causal=True)  # 2100^2 > 2^22 elements: streaming
    b = attention_entropy(q, k, causal=True, method="dense")
    ref, _ = reference(q, k, 0.5, np.tril(np.ones((2100, 2100), dtype=bool)))
    for got in (a, b):  # float32: 1e-6 relative to max(1, entropy)
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, err", [
    (dict(q=torch.randn(2, 3, 4)), ValueError),
    (dict(k=torch.randn(1, 1, 4, 5)), ValueError),
    (dict(method="sparse"), ValueError),
    (dict(attn_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError),
    (dict(attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.int64)), TypeError),
    (dict(causal=1), TypeError),
    (dict(q=torch.ones(1, 1, 4, 2, dtype=torch.int64)), TypeError),
])
def test_bad_inputs_are_rejected(bad, err):
    args = dict(q=torch.randn(1, 1, 4, 2), k=torch.randn(1, 1, 4, 2))
    args.update(bad)
    q, k = args.pop("q"), args.pop("k")
    with pytest.raises(err):
        attention_entropy(q, k, **args)


@given(st.integers(0, 2**31 - 1), st.booleans(), st.floats(0.1, 5.0))
@settings(max_examples=40)
@example(0, True, 5.0)
def test_bound_variants_are_valid_ordered_and_match_theory(seed, causal, mag):
    """Entropy >= h_{T_i}(variant) for every variant; torch norms match theory's numpy ones."""
    from theory.bound import entropy_lower_bound
    from theory.instances import row_logit_norm_bounds
    g = torch.Generator().manual_seed(seed)
    B, T, d, H, dh = 2, 11, 6, 2, 3
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64) + 0.5  # a shared mean direction
    wq = torch.randn(H, d, dh, generator=g, dtype=torch.float64) * mag
    wk = torch.randn(H, d, dh, generator=g, dtype=torch.float64)
    q, k = torch.einsum("btd,hde->bhte", x, wq), torch.einsum("btd,hde->bhte", x, wk)
    stats = attention_row_stats(q, k, scale=0.5, causal=causal)
    norms = bound_variant_norms(stats, head_sigma(wq, wk, 0.5), x)
    order = ["theorem", "per_query", "centered", "exact"]
    for a, b in zip(order, order[1:]):
        assert (norms[a] >= norms[b] * (1 - 1e-12) - 1e-12).all()
    for v in order:
        h = entropy_lower_bound(norms[v].numpy(), stats.n_keys.numpy())
        assert (stats.entropy.numpy() >= h - 1e-10).all(), v
    for b in range(B):
        for hd in range(H):
            ref = row_logit_norm_bounds(x[b].numpy(), wq[hd].numpy(), wk[hd].numpy(), scale=0.5,
                                        causal=causal)
            for v in order:
                mine = norms[v][b, hd].numpy()
                if causal and v in ("per_query", "centered"):
                    # power-of-four prefix envelope: an upper bound on the exact prefix norm (theory's
                    # reference carries a rounding slack of a few eps, hence the absolute term)
                    assert (mine >= ref[v] * (1 - 1e-12) - 1e-12).all(), v
                    # ... and equal at the prefixes that are checkpoints (T_i = 1, 4, T)
                    at = np.array([0, 3, T - 1])
                    np.testing.assert_allclose(mine[at], ref[v][at], rtol=1e-9, atol=1e-12)
                else:
                    np.testing.assert_allclose(mine, ref[v], rtol=1e-9, atol=1e-12)


def test_exact_bound_is_attained_by_the_extremal_instance():
    """Tightness (theory/README.md): orthogonal tokens, rank-one maps: row 0's entropy equals h_T(sigma c^2)."""
    from theory.bound import entropy_lower_bound
    T, c, sigma = 7, 1.3, 2.0
    x = c * torch.eye(T, dtype=torch.float64).unsqueeze(0)  # (1, T, T)
    u = torch.full((T,), -1.0 / T, dtype=torch.float64)
    u[0] += 1.0
    u /= u.norm()
    wq = torch.zeros(1, T, 1, dtype=torch.float64)
    wq[0, 0, 0] = math.sqrt(sigma)
    wk = (math.sqrt(sigma) * u).view(1, T, 1)
    q, k = torch.einsum("btd,hde->bhte", x, wq), torch.einsum("btd,hde->bhte", x, wk)
    stats = attention_row_stats(q, k, scale=1.0)
    norms = bound_variant_norms(stats, head_sigma(wq, wk), x)
    for v in ("theorem", "per_query", "exact"):
        h = entropy_lower_bound(float(norms[v][0, 0, 0]), T)
        assert float(stats.entropy[0, 0, 0]) == pytest.approx(float(h), abs=1e-12), v
    assert float(norms["theorem"][0, 0, 0]) == pytest.approx(sigma * c * c, rel=1e-12)


def test_head_sigma_handles_unequal_input_dims_and_is_detached():
    wq = torch.randn(3, 5, 4, requires_grad=True)
    wk = torch.randn(3, 9, 4)
    direct = torch.linalg.matrix_norm(wq.double() @ wk.double().transpose(-1, -2), ord=2) * 0.25
    got = head_sigma(wq, wk, 0.25)
    assert not got.requires_grad
    torch.testing.assert_close(got, direct.detach(), rtol=1e-10, atol=0)


def test_prefix_token_norms_upper_bound_every_prefix():
    torch.manual_seed(3)
    x = torch.randn(1, 13, 4, dtype=torch.float64) + 2.0
    ext = torch.arange(1, 14).view(1, 13)
    full, cent, _ = prefix_token_norms(x, ext)
    for i in range(13):
        xi = x[0, : i + 1]
        assert full[0, i] >= torch.linalg.matrix_norm(xi, ord=2) * (1 - 1e-12)
        assert cent[0, i] >= torch.linalg.matrix_norm(xi - xi.mean(0), ord=2) * (1 - 1e-12) - 1e-12


@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 1, 5, 7), (1, 3, 1, 7), (2, 3, 5, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method, block", [("dense", 512), ("streaming", 3), ("streaming", 1)])
def test_every_broadcast_mask_shape_matches_the_reference(shape, causal, method, block):
    """Masks are kept at their own (broadcast) shape internally; bool and biased float alike."""
    g = torch.Generator().manual_seed(len(shape) * 10 + causal)
    B, H, Tq, Tk = 2, 3, 5, 7
    q = torch.randn(B, H, Tq, 4, generator=g, dtype=torch.float64) * 3
    k = torch.randn(B, H, Tk, 4, generator=g, dtype=torch.float64) * 3
    keep = torch.rand(shape, generator=g) < 0.6
    keep[..., 0] = True  # key 0 visible to every row (also when causal)
    bias = torch.randn(shape, generator=g, dtype=torch.float64).masked_fill(~keep, -math.inf)
    vis = _visible(Tq, Tk, causal, keep.expand(B, H, Tq, Tk))
    for mask, b in ((keep, None), (bias, torch.where(keep, bias, 0).expand(B, H, Tq, Tk).numpy())):
        ent_ref, nrm_ref = reference(q, k, 0.5, vis, b)
        st_ = attention_row_stats(q, k, scale=0.5, causal=causal, attn_mask=mask, method=method,
                                  block_size=block)
        np.testing.assert_allclose(st_.entropy.numpy(), ent_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(st_.logit_norm.numpy(), nrm_ref, rtol=1e-10, atol=1e-10)
        assert st_.n_keys.tolist() == vis.sum(-1).tolist()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rows_with_logit_gaps_beyond_the_exp_floor_are_exact(dtype, tol):
    """Keys far (>> 80 nats) below the row max are clamped inside exp: entropy unaffected."""
    s = torch.tensor([0.0, -1.0, -2.5, -90.0, -300.0, -1e4, -1e6], dtype=torch.float64)
    q = torch.ones(1, 1, 1, 1, dtype=dtype)
    k = s.to(dtype).view(1, 1, -1, 1)
    ref, nrm = reference(q, k, 1.0, np.ones((1, 1, 1, 7), dtype=bool))
    for method, block in (("dense", 512), ("streaming", 2)):
        st_ = attention_row_stats(q, k, scale=1.0, method=method, block_size=block)
        np.testing.assert_allclose(st_.entropy.double().numpy(), ref, rtol=0, atol=tol)
        np.testing.assert_allclose(st_.logit_norm.double().numpy(), nrm, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["dense", "streaming"])
def test_finfo_min_masks_hide_keys_like_bool_masks(dtype, method):
    """Hugging Face masks with torch.finfo(dtype).min, not -inf: finite values, equal to a bool mask."""
    torch.manual_seed(4)
    q = torch.randn(2, 2, 6, 4, dtype=torch.float64).to(dtype)
    k = torch.randn(2, 2, 6, 4, dtype=torch.float64).to(dtype)
    keep = torch.rand(2, 1, 6, 6) < 0.6
    keep[..., 0] = True
    fmin = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    ent_ref, nrm_ref = reference(q, k, 0.5, keep.numpy())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for mask in (fmin, fmin.view(2, 1, 6, 6).expand(2, 2, 6, 6)):
        st_ = attention_row_stats(q, k, scale=0.5, attn_mask=mask, method=method, block_size=4)
        assert torch.isfinite(st_.logit_norm).all() and torch.isfinite(st_.entropy).all()
        np.testing.assert_allclose(st_.entropy.double().numpy(), ent_ref, atol=tol * 10)
        np.testing.assert_allclose(st_.logit_norm.double().numpy(), nrm_ref, rtol=tol * 10, atol=tol * 10)
        assert st_.n_keys.tolist() == np.broadcast_to(keep.numpy(), (2, 2, 6, 6)).sum(-1).tolist()
    # logits plus finfo.min (an eager attention's softmax input) read the same way
    z = 0.5 * q.double() @ k.double().transpose(-1, -2) + fmin.double()
    z = z.to(dtype) if dtype != torch.float64 else z
    st_ = logits_row_stats(z)
    np.testing.assert_allclose(st_.entropy.double().numpy(), ent_ref,
                               atol=1e-12 if dtype == torch.float64 else 5e-3 if dtype in (
                                   torch.float16, torch.bfloat16) else 1e-5)


def test_a_zero_one_float_mask_is_rejected_with_what_to_pass_instead():
    q, k = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3)
    keep01 = torch.tensor([1.0, 1.0, 0.0, 1.0]).expand(4, 4)
    for fn in (attention_entropy, logit_row_norms, attention_row_stats):
        with pytest.raises(ValueError, match="attn_mask.*only 0 and 1.*bool"):
            fn(q, k, attn_mask=keep01)
    # the bool keep-mask it stands for works, and so does an all-zero float mask (no bias at all)
    ok = attention_entropy(q, k, attn_mask=keep01.bool())
    assert torch.equal(ok, attention_entropy(q, k, attn_mask=torch.where(keep01.bool(), 0.0, -math.inf)))
    assert torch.equal(attention_entropy(q, k, attn_mask=torch.zeros(4, 4)), attention_entropy(q, k))


@given(instances())
@settings(max_examples=40)
def test_logits_row_stats_match_the_float64_reference(inst):
    """The statistics of formed logits (eager attention) equal those of their factors."""
    q, k, causal, mask, dtype, block = inst
    vis = np.broadcast_to(_visible(q.shape[2], k.shape[2], causal, mask),
                          (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    ent_ref, nrm_ref = reference(q, k, 0.7, vis)
    z = 0.7 * q @ k.transpose(-1, -2)
    z = z.masked_fill(~torch.from_numpy(vis.copy()), torch.finfo(dtype).min if block % 2 else -math.inf)
    st_ = logits_row_stats(z, block_rows=block)
    tol = TOL[dtype]
    np.testing.assert_allclose(st_.entropy.double().numpy(), ent_ref, rtol=0, atol=tol * max(1, ent_ref.max()))
    np.testing.assert_allclose(st_.logit_norm.double().numpy(), nrm_ref, rtol=tol * 10,
                               atol=tol * 10 * max(1.0, nrm_ref.max()))
    assert st_.n_keys.tolist() == vis.sum(-1).tolist()
    ref = attention_row_stats(q, k, scale=0.7, causal=causal, attn_mask=mask)
    assert torch.equal(st_.extent, ref.extent)


def test_logits_row_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="logits"):
        logits_row_stats(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="logits"):
        logits_row_stats(torch.zeros(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        logits_row_stats(torch.tensor([[[[0.0, math.nan]]]]))
    with pytest.raises(ValueError, match="no visible key"):
        logits_row_stats(torch.full((1, 1, 1, 3), -math.inf))


@pytest.fixture(params=["native", "dense", "flash"])
def fused_path(request, monkeypatch):
    """The paths of fused_row_entropy, as its keyword arguments: the compiled kernel, and the PyTorch
    path's logits in cached blocks (short sequences) and flash pass (long ones)."""
    import sigma_core.entropy as E
    from sigma_core.native import row_entropy_kernel
    if request.param == "native":
        if row_entropy_kernel() is None:  # test_native.py asserts that it builds where a compiler is
            pytest.skip("the compiled kernel is not available here")
        return {"native": True}
    if request.param == "flash":
        monkeypatch.setattr(E, "FUSED_DENSE_MAX_KEYS", 0)
    return {"native": False}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mag", [0.3, 1.0, 3.0, 6.0])
def test_fused_row_entropy_matches_the_float64_reference(causal, mag, fused_path):
    """Within 1e-5 nats of the float64 reference, for small logits and for large ones: the dense
    blocks never cancel; the flash pass (lse - scale q.(P K)) recomputes those heads exactly."""
    from sigma_core.entropy import fused_row_entropy
    g = torch.Generator().manual_seed(int(mag * 10) + causal)
    q = torch.randn(3, 4, 33, 16, generator=g) * mag
    k = torch.randn(3, 4, 33, 16, generator=g) * mag
    fast = fused_row_entropy(q, k, scale=0.25, causal=causal, **fused_path)
    ref, _ = reference(q, k, 0.25, _visible(33, 33, causal, None))
    assert fast is not None and fast.shape == (3, 4, 33) and fast.dtype == torch.float32
    np.testing.assert_allclose(fast.double().numpy(), ref, rtol=0, atol=1e-5)


def test_fused_row_entropy_recomputes_large_logit_heads_and_declines_what_it_cannot_do(monkeypatch):
    import sigma_core.entropy as E
    from sigma_core.entropy import fused_row_entropy
    monkeypatch.setattr(E, "FUSED_DENSE_MAX_KEYS", 0)  # the flash pass, whose terms can cancel
    torch.manual_seed(5)
    q, k = torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8)
    q[1, 2] *= 60.0  # one head with logits of order 1e2: its rows must come from the exact pass
    ref, _ = reference(q, k, 1.0, _visible(20, 20, True, None))
    loose = fused_row_entropy(q, k, scale=1.0, causal=True, max_logit_scale=math.inf, native=False)  # no recompute
    fast = fused_row_entropy(q, k, scale=1.0, causal=True, native=False)
    np.testing.assert_allclose(fast.double().numpy(), ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast[1, 2].double().numpy(), ref[1, 2], rtol=0, atol=1e-6)  # recomputed
    assert (loose[1, 2].double().numpy() - ref[1, 2]).__abs__().max() > (
        fast[1, 2].double().numpy() - ref[1, 2]).__abs__().max()
    for native in (True, False):
        assert fused_row_entropy(q.double(), k.double(), native=native) is None  # float64: the blocked pass
        assert fused_row_entropy(q[:, :, :5], k, causal=True, native=native) is None  # causal, Tq != Tk
        assert fused_row_entropy(q.to("meta"), k.to("meta"), native=native) is None
        assert fused_row_entropy(q[:, :, :0], k, native=native) is None  # empty: the blocked pass


@pytest.mark.parametrize("chunk", [1, 2 * 3 * 17 * 8, 5 * 3 * 17 * 8])
def test_fused_row_entropy_in_batch_chunks_equals_one_pass(monkeypatch, chunk):
    """The batch is worked through in chunks of FUSED_CHUNK_ELEMENTS query entries: one sequence,
    two (a remainder at the end) or all five per chunk give the same entropies, and a head with
    large logits in the last chunk is still recomputed exactly."""
    import sigma_core.entropy as E
    torch.manual_seed(11)
    q, k = torch.randn(5, 3, 17, 8), torch.randn(5, 3, 17, 8)
    q[4, 1] *= 60.0
    ref, _ = reference(q, k, 0.5, _visible(17, 17, True, None))
    monkeypatch.setattr(E, "FUSED_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(E, "FUSED_DENSE_MAX_KEYS", 0)
    got = E.fused_row_entropy(q, k, scale=0.5, causal=True, native=False)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[4, 1].double().numpy(), ref[4, 1], rtol=0, atol=1e-6)  # recomputed


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block, rows", [(1, 1), (7 * 5, 3), (1 << 17, 32)])
def test_fused_row_entropy_dense_blocks_of_any_size_agree(monkeypatch, causal, block, rows):
    """The dense path's blocks (heads per block from the element budget; causal query rows per
    block, with only the keys they see) give the reference entropies whatever their sizes,
    including blocks that do not divide the heads or the rows, and Tq != Tk when not causal."""
    import sigma_core.entropy as E
    monkeypatch.setattr(E, "_DENSE_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(E, "_DENSE_CAUSAL_ROWS", rows)
    torch.manual_seed(3)
    Tq = 19 if causal else 11
    q, k = torch.randn(3, 5, Tq, 8) * 2, torch.randn(3, 5, 19, 8) * 2
    ref, _ = reference(q, k, 0.4, _visible(Tq, 19, causal, None))
    got = E.fused_row_entropy(q, k, scale=0.4, causal=causal, native=False)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_fused_row_entropy_declines_non_finite_inputs(native):
    from sigma_core.entropy import fused_row_entropy
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    q[0, 1, 3, 2] = math.nan
    assert fused_row_entropy(q, k, native=native) is None
    q[0, 1, 3, 2] = math.inf
    assert fused_row_entropy(q, k, causal=True, native=native) is None
    q[0, 1, 3, 2] = 0.0
    k[0, 0, 5, 0] = -math.inf  # a key no causal row before the last sees: still declined
    assert fused_row_entropy(q, k, causal=True, native=native) is None
