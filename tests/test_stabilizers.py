"""QK-LayerNorm, logit soft-capping, sigmaReparam without LayerNorm, spectral norm: each option
changes what it should, combines with every norm placement, and the bound checks stay exact."""
import math

import pytest
import torch
import torch.nn.functional as F

from sigma_core.experiments.config import TrainConfig, preset
from sigma_core.models.gpt import GPT, ModelConfig, apply_reparam
from sigma_core.monitor import EntropyMonitor
from sigma_core.experiments.train import Trainer

NORMS = ("pre", "post", "none")


def tiny(norm="pre", **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(d_model=16, n_layer=2, n_head=4, block_size=12, norm=norm, **kw))


def probe_args(model, idx):
    seen = []
    hooks = [a.probe.register_forward_hook(lambda m, args, out: seen.append(args))
             for a in model.attention_modules()]
    try:
        with torch.no_grad():
            out = model(idx)[0]
    finally:
        for h in hooks:
            h.remove()
    return seen, out


IDX = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("norm", NORMS)
def test_qk_layernorm_probe_sees_normalised_queries_and_keys(norm):
    model = tiny(norm, qk_norm=True).eval()
    for attn in model.attention_modules():  # non-trivial affine parameters
        for ln in (attn.q_norm, attn.k_norm):
            torch.nn.init.normal_(ln.weight, 1.0, 0.5)
            torch.nn.init.normal_(ln.bias, 0.0, 0.5)
    seen, _ = probe_args(model, IDX)
    for attn, (x, q, k) in zip(model.attention_modules(), seen, strict=True):
        assert attn.weight_bounds_valid is False
        w_q, w_k = attn.head_weights()
        raw_q = torch.einsum("btd,hde->bhte", x, w_q)
        raw_k = torch.einsum("btd,hde->bhte", x, w_k)
        torch.testing.assert_close(q, F.layer_norm(raw_q, (attn.d_head,), attn.q_norm.weight, attn.q_norm.bias))
        torch.testing.assert_close(k, F.layer_norm(raw_k, (attn.d_head,), attn.k_norm.weight, attn.k_norm.bias))
        assert not torch.allclose(q, raw_q, atol=1e-3)


@pytest.mark.parametrize("norm", NORMS)
def test_softcap_bounds_logits_and_probe_factors_give_the_capped_logits(norm):
    cap = 0.5
    model = tiny(norm, logit_softcap=cap).eval()
    with torch.no_grad():
        for attn in model.attention_modules():  # large logits, so the cap binds
            attn.q_proj.weight.mul_(500.0)
            attn.k_proj.weight.mul_(500.0)
    seen, _ = probe_args(model, IDX)
    for attn, (x, q_obs, k_obs) in zip(model.attention_modules(), seen, strict=True):
        w_q, w_k = attn.head_weights()
        raw = torch.einsum("btd,hde->bhte", x, w_q) @ torch.einsum("btd,hde->bhte", x, w_k).transpose(-1, -2)
        raw = raw * attn.scale
        capped = attn.scale * q_obs @ k_obs.transpose(-1, -2)  # what the observers measure
        assert capped.abs().max() <= cap * (1 + 1e-6)
        assert raw.abs().max() > 2 * cap  # the cap did bind
        torch.testing.assert_close(capped, cap * torch.tanh(raw / cap), atol=1e-5, rtol=1e-5)


def test_softcap_path_matches_reference_attention_and_large_cap_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 4) * 3, torch.randn(2, 3, 7, 4) * 3, torch.randn(2, 3, 7, 4)
    from sigma_core.models.gpt import CausalSelfAttention

    attn = CausalSelfAttention(12, 3, logit_softcap=1.5)
    a = 1.5 * torch.tanh((q @ k.transpose(-1, -2)) * attn.scale / 1.5)
    a = a.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(attn.attend(q, k, v), torch.softmax(a, -1) @ v)
    wide = CausalSelfAttention(12, 3, logit_softcap=1e6)
    plain = CausalSelfAttention(12, 3)
    torch.testing.assert_close(wide.attend(q, k, v), plain.attend(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reparam", ["none", "sigma", "spectral"])
def test_every_combination_trains_and_stays_causal(norm, reparam):
    model = apply_reparam(tiny(norm, qk_norm=True, logit_softcap=3.0), reparam).train()
    idx = IDX.clone()
    logits, loss = model(idx, idx)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    idx2 = idx.clone()
    idx2[:, 6:] = (idx2[:, 6:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(idx2)[0][:, :6], model(idx)[0][:, :6], atol=1e-5, rtol=1e-5)


def test_monitor_measures_the_capped_attention_and_checks_only_valid_variants():
    model = tiny("pre", qk_norm=True, logit_softcap=2.0).eval()
    with EntropyMonitor(model, bound_samples=None, bound_every=1) as mon:
        seen, _ = probe_args(model, IDX)
        with torch.no_grad():
            model(IDX)
        recs = mon.last
    x, q_obs, k_obs = seen[0]
    attn = model.attention_modules()[0]
    # entropy of softmax(c tanh(a/c)) computed independently of the probe's factors
    with torch.no_grad():
        a = attn.logits(q=attn.q_norm(attn._split_heads(attn.q_proj(x))),
                        k=attn.k_norm(attn._split_heads(attn.k_proj(x))))
    a = a.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(a.double(), -1)
    ent = -(torch.xlogy(p, p)).sum(-1)  # (B, H, T)
    layer0 = [r for r in recs if r["layer"] == 0]
    for r in layer0:
        assert r["entropy_min"] == pytest.approx(float(ent[:, r["head"]].min()), abs=1e-5)
        assert r["bound_theorem"] is None and r["violations_theorem"] is None  # QK-LN: not x W_Q W_K^T x^T
        assert r["violations_exact"] == 0 and r["bound_exact"] is not None


def test_softcap_without_qk_norm_keeps_the_weight_variants_and_they_hold():
    model = tiny("pre", logit_softcap=0.3).eval()
    with torch.no_grad():
        model.attention_modules()[0].q_proj.weight.mul_(30.0)
    with EntropyMonitor(model, bound_samples=None) as mon:
        with torch.no_grad():
            model(IDX)
    assert all(r["violations_theorem"] == 0 and r["violations_centered"] == 0 for r in mon.last)
    assert all(r["bound_theorem"] is not None for r in mon.last)


def test_head_weights_do_not_advance_spectral_power_iteration():
    model = apply_reparam(tiny(), "spectral").train()
    attn = model.attention_modules()[0]
    u = attn.q_proj.parametrizations.weight[0]._u.clone()
    attn.head_weights()
    assert torch.equal(u, attn.q_proj.parametrizations.weight[0]._u)
    assert attn.q_proj.parametrizations.weight[0].training  # mode restored


@pytest.mark.parametrize("overrides", [
    {}, {"reparam": "sigma"}, {"reparam": "sigma", "norm": "none"}, {"qk_norm": True},
    {"logit_softcap": 5.0}, {"reparam": "spectral"}, {"qk_norm": True, "logit_softcap": 2.0, "norm": "post"},
], ids=["baseline", "sigma", "sigma-no-ln", "qk-ln", "softcap", "spectral", "qk-ln+softcap-post"])
def test_zero_bound_violations_with_every_method_on_cpu_smoke(overrides):
    cfg = preset("cpu-smoke", steps=12, log_every=3, eval_every=12, lr=3e-2, threads=1, **overrides)
    summary = Trainer(cfg, None).run()
    assert summary["bound_violations"] == 0
    assert math.isfinite(summary["final_train_loss"])


@pytest.mark.parametrize("bad", [{"qk_norm": 1}, {"logit_softcap": -1.0}, {"logit_softcap": math.inf}])
def test_config_rejects_bad_stabiliser_options(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        TrainConfig(**bad)
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        ModelConfig(**bad)


def test_config_round_trip_keeps_the_options():
    cfg = preset("cpu-compare", qk_norm=True, logit_softcap=30.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("reparam", ["sigma", "spectral"])
def test_apply_reparam_takes_one_class_or_conv1d_by_name(reparam):
    """layer_types as a user writes it: one class (not a one-element tuple), or "Conv1D" for
    Hugging Face's GPT-2 layers (a TypeError before); each matched layer is reparametrised
    (spectral: its weight's spectral norm is 1 to the power iteration's 2 %, where the raw
    weight's is about 0.3), the others not."""
    from tests.thirdparty_models import tiny_gpt2

    net = apply_reparam(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv1d(4, 4, 1)), reparam,
                        layer_types=torch.nn.Linear)
    assert [hasattr(m, "parametrizations") for m in net] == [True, False]
    gpt2, inputs = tiny_gpt2()
    convs = [m for m in gpt2.modules() if type(m).__name__ == "Conv1D"]
    apply_reparam(gpt2, reparam, layer_types="Conv1D")
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    assert not hasattr(gpt2.lm_head, "parametrizations")  # an nn.Linear: not asked for
    gpt2.eval()
    gpt2(**inputs)
    for m in convs:
        if reparam == "spectral":
            assert torch.linalg.matrix_norm(m.weight.detach().double(), 2).item() == pytest.approx(1.0, rel=0.02)
        else:
            assert type(m.parametrizations.weight[0]).__name__ == "SigmaReparam"


@pytest.mark.parametrize("kwargs, exc, names", [
    (dict(reparam="spectral", layer_types="Linear"), TypeError, "layer_types"),
    (dict(reparam="spectral", layer_types=3), TypeError, "layer_types.*got 3"),
    (dict(reparam="sigma", layer_types=()), TypeError, "layer_types"),
    (dict(reparam=("spectral",)), TypeError, "reparam"),
    (dict(reparam="weightnorm"), ValueError, "reparam"),
])
def test_apply_reparam_refuses_bad_arguments_by_name(kwargs, exc, names):
    with pytest.raises(exc, match=names):
        apply_reparam(torch.nn.Linear(2, 2), **kwargs)
