"""σReparam (sigma_core.reparam): the claims of theory/README.md "σReparam" and issue 4."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sigma_core.reparam import (
    SigmaReparam,
    SigmaReparamLinear,
    convert_to_sigma_reparam,
    fold_sigma_reparam,
    is_sigma_reparametrized,
    sigma_reparam,
    sigma_reparam_state,
)

torch.set_num_threads(1)


def _param(module: nn.Module, name: str = "weight") -> SigmaReparam:
    return module.parametrizations[name][0]


def _original(module: nn.Module, name: str = "weight") -> torch.Tensor:
    return module.parametrizations[name].original


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


class Net(nn.Module):
    """Linear, Conv1d and MultiheadAttention in one model (B, T, d) -> (B, T, d)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))  # (B, T, d)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # (B, T, d)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(h)


def _convert(net: nn.Module, **opts) -> nn.Module:
    return convert_to_sigma_reparam(
        net, layer_types=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention), **opts)


def _scramble_vectors(model: nn.Module) -> nn.Module:
    """Random unit vectors in every SigmaReparam, so that each power-iteration step shows."""
    with torch.no_grad():
        for p in model.modules():
            if isinstance(p, SigmaReparam):
                p._v.copy_(F.normalize(torch.randn_like(p._v), dim=-1))
                p._u.copy_(F.normalize(torch.randn_like(p._u), dim=-1))
    return model


def _manual_step(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """One power-iteration step, written out: v <- Wu/|Wu|, u <- Wᵀv/|Wᵀv|."""
    v = W @ u
    v = v / v.norm()
    u = W.T @ v
    return u / u.norm(), v


# ---------------------------------------------------------------- initialisation ----------

@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(7, 5), (5, 7)),
    (lambda: nn.Conv1d(3, 4, 5), (4, 15)),
    (lambda: nn.Conv2d(3, 6, 3), (6, 27)),
])
def test_svd_init_gives_top_singular_vectors_and_flattened_matrix(make, shape):
    torch.manual_seed(0)
    layer = make()
    W = layer.weight.detach().reshape(shape).double()
    sigma_reparam(layer)
    U, S, Vh = torch.linalg.svd(W)
    p = _param(layer)
    # singular vectors up to a common sign
    sign = torch.sign(p._u[0].double() @ U[:, 0])
    torch.testing.assert_close(p._u[0].double() * sign, U[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(p._v[0].double() * sign, Vh[0], atol=1e-5, rtol=0)
    assert p._v.dtype == p._u.dtype == torch.float32
    assert sigma_reparam_state(layer)["weight"]["sigma"] == pytest.approx(S[0].item(), rel=1e-6)


def test_multihead_in_proj_is_reparametrised_per_qkv_chunk():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    with torch.no_grad():
        mha.in_proj_weight[8:16] *= 5.0  # k chunk with a much larger norm
    sigma_reparam(mha, gamma_init="one")
    p = _param(mha, "in_proj_weight")
    assert p.gamma.shape == (3,)
    state = sigma_reparam_state(mha)
    assert sorted(state) == ["in_proj_weight.k", "in_proj_weight.q", "in_proj_weight.v"]
    W_hat = mha.in_proj_weight.detach()
    for i, c in enumerate("qkv"):
        chunk = _original(mha, "in_proj_weight")[8 * i:8 * (i + 1)].detach()
        assert state[f"in_proj_weight.{c}"]["sigma"] == pytest.approx(
            torch.linalg.matrix_norm(chunk, 2).item(), rel=1e-5)
        # gamma = 1 per chunk: every chunk of W_hat has unit spectral norm
        assert torch.linalg.matrix_norm(W_hat[8 * i:8 * (i + 1)], 2).item() == pytest.approx(1.0, rel=1e-5)


def test_gamma_init_options():
    torch.manual_seed(0)
    W0 = torch.randn(6, 4)
    for init, expected in [("sigma", torch.linalg.matrix_norm(W0, 2).item()), ("one", 1.0), (0.5, 0.5)]:
        layer = nn.Linear(4, 6)
        layer.weight.data.copy_(W0)
        sigma_reparam(layer, gamma_init=init)
        assert _param(layer).gamma.item() == pytest.approx(expected, rel=1e-6)
        assert isinstance(_param(layer).gamma, nn.Parameter) and _param(layer).gamma.shape == (1,)
        assert torch.linalg.matrix_norm(layer.weight.detach(), 2).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_gamma_sigma_conversion_leaves_outputs_unchanged(training):
    torch.manual_seed(0)
    net = Net().train(training)
    x = torch.randn(3, 5, 8)
    before = net(x)
    _convert(net)
    assert len(sigma_reparam_state(net)) == 3 + 3 + 1  # inp, conv, q/k/v, out_proj, out
    after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- power iteration ---------

def _layer_with_random_vectors(seed=0, out=6, inp=4, **opts):
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out)
    # start away from the singular vectors so that a step visibly moves them
    return _scramble_vectors(sigma_reparam(layer, **opts))


@pytest.mark.parametrize("n_steps", [1, 3])
def test_one_power_iteration_step_per_training_forward(n_steps):
    layer = _layer_with_random_vectors(n_power_iterations=n_steps)
    p = _param(layer)
    W = _original(layer).detach()
    u, v = p._v[0].clone(), p._u[0].clone()
    for _ in range(2):  # two forwards: two (groups of) steps
        layer(torch.randn(2, 4))
        for _ in range(n_steps):
            u, v = _manual_step(W, u, v)
        torch.testing.assert_close(p._v[0], u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p._u[0], v, rtol=1e-5, atol=1e-6)
    assert not p._v.requires_grad and not p._u.requires_grad


def test_parametrize_cached_reads_weight_twice_with_one_step():
    from torch.nn.utils import parametrize

    layer = _layer_with_random_vectors()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 4)
    with parametrize.cached():
        y = layer(x) + layer(x)  # W_hat computed once: one step
    twin(x)
    assert torch.equal(_param(layer)._v, _param(twin)._v)
    y.sum().backward()
    assert torch.isfinite(_original(layer).grad).all()


def test_no_update_in_eval_or_under_no_grad():
    """The project-wide contract: only training-mode forwards with grad enabled move the vectors."""
    torch.manual_seed(0)
    # vectors not converged in the first, so any update would show
    nets = [_layer_with_random_vectors(), _convert(Net())]
    x4, x8 = torch.randn(2, 4), torch.randn(2, 3, 8)
    for model, x in zip(nets, (x4, x8)):
        before = _buffers(model)
        model.eval()
        for _ in range(3):
            model(x)
            model(x).sum().backward()
        model.train()
        with torch.no_grad():
            model(x)
        sigma_reparam_state(model)
        with torch.no_grad():
            for m in model.modules():
                getattr(m, "weight", None)
        after = _buffers(model)
        assert after.keys() == before.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), k
        model(x)  # and a training forward with grad does move them
        assert any(not torch.equal(before[k], b) for k, b in model.named_buffers())


def test_autocast_bf16_keeps_vectors_fp32_without_grad():
    layer = _layer_with_random_vectors()
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with torch.no_grad():  # (a read under no_grad does not step the vectors)
            assert layer.weight.dtype == torch.float32  # W_hat itself is built in fp32
    assert y.dtype == torch.bfloat16
    twin(x)  # the same step in plain fp32
    p, q = _param(layer), _param(twin)
    assert p._v.dtype == p._u.dtype == torch.float32
    assert not p._v.requires_grad and p._v.grad_fn is None
    assert torch.equal(p._v, q._v) and torch.equal(p._u, q._u)
    y.float().sum().backward()
    assert torch.isfinite(_original(layer).grad).all()


def test_bf16_weights_keep_fp32_vectors():
    torch.manual_seed(0)
    layer = _scramble_vectors(SigmaReparamLinear(8, 4, dtype=torch.bfloat16))
    twin = SigmaReparamLinear(8, 4)
    twin.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    y = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    twin(torch.randn(2, 8))
    p, q = _param(layer), _param(twin)
    assert y.dtype == torch.bfloat16 and p._v.dtype == torch.float32
    torch.testing.assert_close(p._v, q._v)  # the same fp32 step as an fp32 copy takes


def test_sigma_is_v_W_u_with_gradient():
    layer = _layer_with_random_vectors()
    p = _param(layer)
    W = _original(layer)
    sigma = p.sigma(W)
    assert sigma.requires_grad
    (g,) = torch.autograd.grad(sigma.sum(), W)
    torch.testing.assert_close(g, torch.outer(p._u[0], p._v[0]))  # d(vᵀWu)/dW = v uᵀ
    assert sigma.item() == pytest.approx((p._u[0] @ W @ p._v[0]).item(), rel=1e-6)


def test_sigma_tracks_spectral_norm_of_slowly_changing_weight():
    torch.manual_seed(1)
    m, n = 24, 16
    Q1, _ = torch.linalg.qr(torch.randn(m, m))
    Q2, _ = torch.linalg.qr(torch.randn(n, n))
    s = 2.0 * 0.8 ** torch.arange(n, dtype=torch.float32)  # spectral gap sigma2/sigma1 = 0.8
    W0 = Q1[:, :n] @ torch.diag(s) @ Q2.T
    drift = 1e-3 * torch.randn(m, n)  # per step, ~0.05% of the norm
    layer = _layer_with_random_vectors(out=m, inp=n)
    x = torch.randn(2, n)
    for t in range(40):
        with torch.no_grad():
            _original(layer).copy_(W0 + t * drift)
        layer(x)
    estimate = sigma_reparam_state(layer)["weight"]["sigma"]
    exact = torch.linalg.matrix_norm(_original(layer).detach().double(), 2).item()
    assert abs(estimate - exact) <= 1e-4 * exact


# ---------------------------------------------------------------- gradient ----------------

def _reparam_fn(p: SigmaReparam):
    """(W, gamma) -> W_hat, with the parametrization's vectors held fixed."""
    return lambda W, gamma: torch.func.functional_call(p, {"gamma": gamma}, (W,))


def test_gradient_matches_closed_form_and_gradcheck_float64():
    torch.manual_seed(0)
    layer = nn.Linear(5, 7).double()
    sigma_reparam(layer, gamma_init=1.7)
    layer.train()
    layer(torch.randn(2, 5, dtype=torch.float64))  # one step: v, u no longer exact
    layer.eval()  # freeze the vectors: W_hat is a function of W alone
    p = _param(layer)
    W = _original(layer)
    C = torch.randn(7, 5, dtype=torch.float64)
    W.grad = None
    (layer.weight * C).sum().backward()  # G = dL/dW_hat = C
    u, v, gamma = p._v[0], p._u[0], p.gamma.detach()
    sigma = v @ W.detach() @ u
    closed = gamma / sigma * (C - (C * W.detach()).sum() / sigma * torch.outer(v, u))
    torch.testing.assert_close(W.grad, closed, rtol=1e-12, atol=1e-12)
    Wd = W.detach().clone().requires_grad_()
    gd = p.gamma.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(_reparam_fn(p), (Wd, gd))
    assert torch.autograd.gradgradcheck(_reparam_fn(p), (Wd, gd))


@settings(max_examples=25)
@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 2**16),
       log_scale=st.floats(-3, 3))
def test_weight_gradient_is_orthogonal_to_weight(m, n, seed, log_scale):
    """<dL/dW, W> = 0 for any loss: W_hat does not change when W is rescaled."""
    torch.manual_seed(seed)
    layer = nn.Linear(n, m).double()
    with torch.no_grad():
        layer.weight.mul_(10.0 ** log_scale)
    sigma_reparam(layer, gamma_init="one")
    x = torch.randn(4, n, dtype=torch.float64)
    W_hat = layer.weight  # training read: includes a power-iteration step
    W_hat.retain_grad()
    torch.sin(F.linear(x, W_hat, layer.bias)).pow(2).sum().backward()
    W, g, G = _original(layer).detach(), _original(layer).grad, W_hat.grad
    sigma = sigma_reparam_state(layer)["weight"]["sigma"]
    # size of each of the two terms of the closed form: (gamma/sigma)|G||W|
    assert abs((g * W).sum().item()) <= 1e-12 * G.norm().item() * W.norm().item() / sigma


# ---------------------------------------------------------------- fold, state, copies -----

def _trained(seed=0, steps=3):
    torch.manual_seed(seed)
    net = _convert(Net())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(2, 5, 8)).pow(2).mean().backward()
        opt.step()
    return net


def test_fold_equals_reparametrised_eval_output():
    net = _trained().eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = net(x)
    state = sigma_reparam_state(net)
    assert any(abs(s["gamma"] - s["sigma"]) > 1e-3 for s in state.values())  # gamma moved
    fold_sigma_reparam(net)
    assert sigma_reparam_state(net) == {}
    assert not any(is_sigma_reparametrized(m) for m in net.modules())
    assert set(net.state_dict()) == set(Net().state_dict())  # a plain model's keys
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_into_fresh_converted_model():
    net = _trained(seed=0)
    sd = net.state_dict()
    assert any(k.endswith("_u") for k in sd) and any(k.endswith("gamma") for k in sd)
    fresh = _convert(Net())  # different init (global RNG moved on)
    fresh.load_state_dict(sd)
    assert sigma_reparam_state(fresh) == sigma_reparam_state(net)
    x = torch.randn(2, 5, 8)
    for mode in (False, True):  # eval, then a training forward (which also steps the vectors)
        net.train(mode), fresh.train(mode)
        torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    for k, b in net.named_buffers():
        assert torch.equal(b, fresh.get_buffer(k))


def test_state_dict_with_the_earlier_0d_gamma_loads():
    """gamma is (n_chunks,) ((1,) for a plain weight: fully_shard refuses 0-d parameters);
    a state_dict written when a plain weight's gamma was 0-d loads, with the same values."""
    net = _trained(seed=0)
    sd = net.state_dict()
    old = {k: (v.reshape(()) if k.endswith("gamma") and v.numel() == 1 else v) for k, v in sd.items()}
    assert sum(v.ndim == 0 for k, v in old.items() if k.endswith("gamma")) >= 2
    fresh = _convert(Net())
    fresh.load_state_dict(old)
    assert all(fresh.state_dict()[k].shape == sd[k].shape for k in sd)
    assert sigma_reparam_state(fresh) == sigma_reparam_state(net)
    x = torch.randn(2, 5, 8)
    net.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_deepcopy_is_equal_and_independent():
    net = _trained()
    twin = copy.deepcopy(net)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(twin(x), net(x), rtol=0, atol=0)  # both stepped once, identically
    before = _buffers(net)
    twin(x)
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k])
    assert not torch.equal(twin.get_buffer("inp.parametrizations.weight.0._v"),
                           before["inp.parametrizations.weight.0._v"])


def test_double_forward_before_one_backward():
    layer = _layer_with_random_vectors()
    p = _param(layer)
    W = _original(layer).detach()
    u, v = p._v[0].clone(), p._u[0].clone()
    x = torch.randn(2, 4)
    loss = layer(x).sum() + layer(x).pow(2).sum()
    loss.backward()
    for _ in range(2):
        u, v = _manual_step(W, u, v)
    torch.testing.assert_close(p._v[0], u)
    assert torch.isfinite(_original(layer).grad).all()


def test_zero_weight_gives_no_nan():
    layer = SigmaReparamLinear(4, 3, gamma_init="one")
    with torch.no_grad():
        _original(layer).zero_()
    y = layer(torch.randn(2, 4))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(_original(layer).grad).all()
    assert torch.isfinite(_param(layer)._v).all() and torch.isfinite(_param(layer)._u).all()
    assert torch.equal(layer.weight, torch.zeros(3, 4))


def test_non_finite_weight_raises_clear_error_in_training():
    layer = SigmaReparamLinear(4, 3)
    with torch.no_grad():
        _original(layer)[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer(torch.randn(2, 4))
    inf_layer = nn.Linear(2, 2)
    with torch.no_grad():
        inf_layer.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        sigma_reparam(inf_layer)


def test_non_finite_check_deferred_on_accelerators_raises_one_forward_later(monkeypatch):
    """Off the CPU the check must not synchronise: it reads the previous forward's flag."""
    monkeypatch.setattr(SigmaReparam, "SYNC_CHECK_DEVICES", ())
    layer = SigmaReparamLinear(4, 3)
    x = torch.randn(2, 4)
    layer(x)  # finite: no error, flag stays False
    layer(x)
    with torch.no_grad():
        _original(layer)[1, 2] = float("inf")
    layer(x)  # the diverged forward itself passes (flag set without a host read) ...
    with pytest.raises(FloatingPointError, match="weight"):
        layer(x)  # ... and the next training forward raises


def test_input_validation():
    with pytest.raises(ValueError, match="gamma_init"):
        sigma_reparam(nn.Linear(2, 2), gamma_init="two")
    with pytest.raises(ValueError, match="n_power_iterations"):
        sigma_reparam(nn.Linear(2, 2), n_power_iterations=0)
    with pytest.raises(ValueError, match="eps"):
        sigma_reparam(nn.Linear(2, 2), eps=0.0)
    with pytest.raises(ValueError, match="name"):
        sigma_reparam(nn.Linear(2, 2), "kernel")
    with pytest.raises(ValueError, match="already"):
        sigma_reparam(sigma_reparam(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="module"):
        sigma_reparam(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="layer_types"):
        convert_to_sigma_reparam(nn.Linear(2, 2), layer_types=())


def test_convert_respects_layer_types_and_exclude():
    qkv = ["attn.in_proj_weight.k", "attn.in_proj_weight.q", "attn.in_proj_weight.v"]
    net = convert_to_sigma_reparam(Net(), exclude=["out"])
    assert sorted(sigma_reparam_state(net)) == qkv + ["attn.out_proj.weight", "inp.weight"]
    net = convert_to_sigma_reparam(Net(), exclude=lambda name, m: name.startswith("attn"))
    assert sorted(sigma_reparam_state(net)) == ["inp.weight", "out.weight"]
    convert_to_sigma_reparam(net)  # converted layers are left alone, the rest converted
    assert sorted(sigma_reparam_state(net)) == qkv + ["attn.out_proj.weight", "inp.weight", "out.weight"]
    assert all(len(m.parametrizations.weight) == 1 for m in (net.inp, net.out, net.attn.out_proj))


def _train_compiled_beside_eager(model, eager, steps=2):
    """Two forward/backward passes of torch.compile(model) and of ``eager`` on the same inputs:
    outputs and, afterwards, every buffer (the power-iteration vectors) agree."""
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(steps):
        x = torch.randn(3, 8)
        y_c, y_e = compiled(x), eager(x)
        torch.testing.assert_close(y_c, y_e)
        y_c.sum().backward(), y_e.sum().backward()
    for (k, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, c, msg=k)


def test_torch_compile_training_step_matches_eager():
    torch.manual_seed(0)
    eager = nn.Sequential(SigmaReparamLinear(8, 8), nn.Tanh(), SigmaReparamLinear(8, 4))
    model = copy.deepcopy(_scramble_vectors(eager))
    start = _buffers(model)
    _train_compiled_beside_eager(model, eager)
    for k, b in model.named_buffers():
        assert not torch.allclose(b, start[k])  # the power iteration ran inside the graph
    for (k, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=k)


@pytest.mark.slow
def test_torch_compile_of_the_project_gpt_with_sigma_reparam():
    """The whole model in one graph (fullgraph): buffer updates and gradients match eager."""
    from sigma_core.models.gpt import GPT, ModelConfig

    torch.manual_seed(0)
    eager = convert_to_sigma_reparam(GPT(ModelConfig(d_model=16, n_layer=1, n_head=2, block_size=8)))
    model = copy.deepcopy(_scramble_vectors(eager))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    idx = torch.randint(0, 256, (2, 8))
    for _ in range(2):
        loss_c, loss_e = compiled(idx, idx)[1], eager(idx, idx)[1]
        torch.testing.assert_close(loss_c, loss_e)
        loss_c.backward(), loss_e.backward()
    for (k, a), (_, b) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, msg=k)  # the power iteration ran inside the graph
    for (k, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=k)


# ---------------------------------------------------------------- batched power iterations ---

from sigma_core.reparam import batch_power_iterations  # noqa: E402


class Wide(nn.Module):
    """Equal shapes in several places (Linear d x d, the q/k/v chunks and out_proj of an MHA),
    a Conv1d (d x 3d) and a lone Linear (2d x d): groups of several weights and of one."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.net = Net(d)
        self.extra = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.extra(self.net(x)))


def _twins(dtype=torch.float32, stack=None, seed=0):
    torch.manual_seed(seed)
    plain = _scramble_vectors(_convert(Wide().to(dtype)))
    return plain, batch_power_iterations(copy.deepcopy(plain), stack=stack)


def _uv(model):
    return {k: b for k, b in model.named_buffers()}


@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_batched_steps_equal_unbatched_over_training_steps(dtype, tol, stack):
    """Same u, v, sigma, loss and gradients as one step per weight, step after step."""
    plain, batched = _twins(dtype, stack)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, batched)]
    for step in range(4):
        x = torch.randn(3, 5, 8, dtype=dtype)
        losses = []
        for model, opt in zip((plain, batched), opts):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=tol)
        a, b = _uv(plain), _uv(batched)
        assert a.keys() == b.keys() and len(a) == 2 * 7
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol, msg=f"step {step}: {k}")
        for (k, p), (_, q) in zip(plain.named_parameters(), batched.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol, msg=f"step {step}: {k}")
        for opt in opts:
            opt.step()
    sa, sb = sigma_reparam_state(plain), sigma_reparam_state(batched)
    for k in sa:
        assert sb[k]["sigma"] == pytest.approx(sa[k]["sigma"], rel=10 * tol)


def test_batched_one_step_per_forward_and_a_second_read_takes_its_own():
    """A weight read twice without parametrize.cached() steps twice, as without batching."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    torch.manual_seed(0)
    plain = _scramble_vectors(convert_to_sigma_reparam(Twice()))
    batched = batch_power_iterations(copy.deepcopy(plain))
    x = torch.randn(2, 6)
    for model in (plain, batched):
        model(x).sum().backward()
        with parametrize.cached():
            model(x).sum().backward()
    for k, b in _uv(plain).items():
        torch.testing.assert_close(_uv(batched)[k], b, rtol=1e-6, atol=1e-6)
    for (k, p), (_, q) in zip(plain.named_parameters(), batched.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-6, msg=k)


def test_batched_no_update_in_eval_or_no_grad_and_state_dict_unchanged():
    plain, batched = _twins()
    assert batched.state_dict().keys() == plain.state_dict().keys()
    before = _buffers(batched)
    x = torch.randn(2, 3, 8)
    batched.eval()
    batched(x).sum().backward()
    batched.train()
    with torch.no_grad():
        batched(x)
    for k, b in _buffers(batched).items():
        assert torch.equal(b, before[k]), k
    batched(x)
    assert all(not torch.equal(b, before[k]) for k, b in batched.named_buffers())


def test_batched_unread_weight_steps_once_and_leaves_no_pending_step():
    """A weight the forward does not read advances with its group; its step is then dropped,
    so a later training read takes a step of its own."""
    torch.manual_seed(0)
    model = _scramble_vectors(convert_to_sigma_reparam(nn.ModuleDict(
        {"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})))
    model.forward = lambda x: model["a"](x)  # "b" is not read
    batch_power_iterations(model)
    p = _param(model["b"])
    W = _original(model["b"]).detach()
    u, v = p._v[0].clone(), p._u[0].clone()
    model(torch.randn(2, 4))
    u, v = _manual_step(W, u, v)
    torch.testing.assert_close(p._v[0], u)
    assert p._batched_step is None
    model["b"](torch.randn(2, 4))  # outside the model's forward: its own step
    u, v = _manual_step(W, u, v)
    torch.testing.assert_close(p._v[0], u)
    torch.testing.assert_close(p._u[0], v)


def test_batched_deepcopy_fold_and_disable():
    _, batched = _twins()
    twin = copy.deepcopy(batched)
    x = torch.randn(2, 3, 8)
    twin(x).sum().backward()
    assert not torch.equal(_param(twin.extra)._v, _param(batched.extra)._v)  # independent copy
    batched(x)
    torch.testing.assert_close(_param(twin.extra)._v, _param(batched.extra)._v)  # hooks copied too
    batch_power_iterations(twin, enabled=False)
    # no batched hooks left; the forward stays the unit (scope_sigma_reparam's hooks only)
    from sigma_core.reparam import _enter_weight_cache, _exit_weight_cache

    assert list(twin._forward_pre_hooks.values()) == [_enter_weight_cache]
    assert list(twin._forward_hooks.values()) == [_exit_weight_cache]
    batch_power_iterations(twin)
    batch_power_iterations(twin)  # idempotent: one pair of hooks
    assert len(twin._forward_pre_hooks) == len(twin._forward_hooks) == 1
    with pytest.raises(TypeError, match="model"):
        batch_power_iterations(torch.zeros(2))
    with pytest.raises(TypeError, match="stack"):
        batch_power_iterations(twin, stack="yes")
    # (fold only one of the copies: torch's parametrize shares the injected class between them)
    y = batched.eval()(x)
    fold_sigma_reparam(batched)
    assert not batched._forward_pre_hooks and not batched._forward_hooks
    torch.testing.assert_close(batched(x), y, rtol=1e-5, atol=1e-6)


def test_batched_non_finite_weight_raises_naming_it():
    _, batched = _twins()
    with torch.no_grad():
        _original(batched.extra)[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weight.*non-finite"):
        batched(torch.randn(2, 3, 8))
    assert all(p._batched_step is None for p in batched.modules() if isinstance(p, SigmaReparam))


def test_batched_non_finite_check_deferred_on_accelerators(monkeypatch):
    monkeypatch.setattr(SigmaReparam, "SYNC_CHECK_DEVICES", ())
    _, batched = _twins()
    x = torch.randn(2, 3, 8)
    batched(x)
    with torch.no_grad():
        _original(batched.extra)[3, 1] = float("inf")  # (MHA reads in_proj_weight more than once)
    batched(x)  # the diverged forward passes ...
    with pytest.raises(FloatingPointError, match="weight"):
        batched(x)  # ... the next one raises, naming the weight


def test_batched_model_under_torch_compile_matches_eager():
    """Under torch.compile the hooks step aside: each weight steps in the graph, same values."""
    torch.manual_seed(0)
    eager = _scramble_vectors(nn.Sequential(SigmaReparamLinear(8, 8), nn.Tanh(), SigmaReparamLinear(8, 8)))
    model = batch_power_iterations(copy.deepcopy(eager))
    _train_compiled_beside_eager(model, eager)


def test_multihead_attention_takes_one_power_step_per_training_forward():
    """nn.MultiheadAttention reads in_proj_weight several times per forward; sigma_reparam caches
    the weight for the duration of each forward, so the vectors advance exactly one step."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    sigma_reparam(mha)
    param = mha.parametrizations.in_proj_weight[0]
    W = mha.parametrizations.in_proj_weight.original.detach().reshape(3, 16, 16)
    with torch.no_grad():  # start far from the fixed point, so that every extra step would show
        param._v.copy_(torch.nn.functional.normalize(torch.randn_like(param._v), dim=-1))
        param._u.copy_(torch.nn.functional.normalize(torch.randn_like(param._u), dim=-1))
    u0 = param._v.clone()
    x = torch.randn(2, 5, 16)
    mha(x, x, x)[0].sum().backward()
    v1 = torch.nn.functional.normalize((W @ u0.unsqueeze(-1)).squeeze(-1), dim=-1)  # one step by hand
    u1 = torch.nn.functional.normalize((v1.unsqueeze(-2) @ W).squeeze(-2), dim=-1)
    torch.testing.assert_close(param._u, v1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(param._v, u1, rtol=1e-5, atol=1e-6)
    # an entropy monitor reading the weight under no_grad neither steps nor starves the gradient
    from sigma_core.monitor import EntropyMonitor

    mha.zero_grad()
    with EntropyMonitor(mha) as mon:
        u_before = param._v.clone()
        mha(x, x, x)[0].sum().backward()
        assert len(mon.last) == 2
    assert mha.parametrizations.in_proj_weight.original.grad.abs().sum() > 0
    v2 = torch.nn.functional.normalize((W @ u_before.unsqueeze(-1)).squeeze(-1), dim=-1)
    torch.testing.assert_close(param._u, v2, rtol=1e-5, atol=1e-6)
    # the per-forward scope ends even when the forward raises, and folding removes the hooks
    from sigma_core.reparam import _SCOPE

    with pytest.raises(Exception):
        mha(x, torch.randn(2, 5, 7), x)
    assert _SCOPE.depth == 0 and _SCOPE.held == []
    fold_sigma_reparam(mha)
    assert not mha._forward_pre_hooks and not mha._forward_hooks



def test_batched_group_w_hat_is_one_autograd_node():
    """The W_hat of a group of equal-shaped weights (here Linear, MHA q/k/v chunks, out_proj)
    comes from one autograd node (its exact gradients: the twin tests above)."""
    _, batched = _twins()
    seen = {}

    def record(module, args):
        for name, m in (("extra", batched.extra), ("out", batched.net.out),
                        ("in_proj", batched.net.attn)):
            step = m.parametrizations[next(iter(m.parametrizations))][0]._batched_step
            seen[name] = step[3].grad_fn if step is not None and step[3] is not None else None

    batched.net.inp.register_forward_pre_hook(record)
    batched(torch.randn(2, 3, 8)).sum().backward()
    node = seen["extra"]
    assert node is not None and "GroupScaleBySigma" in type(node).__name__
    assert seen["out"] is node and seen["in_proj"] is node


def test_batched_group_double_backward_equals_per_weight_float64():
    """Gradients taken with create_graph and differentiated again equal the per-weight ones."""
    torch.manual_seed(0)
    plain = _scramble_vectors(convert_to_sigma_reparam(nn.Sequential(
        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()))
    batched = batch_power_iterations(copy.deepcopy(plain))
    x = torch.randn(4, 6, dtype=torch.float64)
    out = []
    for model in (plain, batched):
        params = list(model.parameters())
        first = torch.autograd.grad(model(x).square().mean(), params, create_graph=True)
        sum(g.square().sum() for g in first).backward()
        out.append(([g.detach() for g in first], [p.grad for p in params]))
    for a, b in zip(out[0][0] + out[0][1], out[1][0] + out[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- issue 18: conventions, copies, loading ---

import warnings  # noqa: E402

from torch.nn.utils import parametrize as _parametrize  # noqa: E402
from torch.nn.utils.parametrizations import spectral_norm  # noqa: E402

from sigma_core.reparam import sigma_reparam_report  # noqa: E402


def test_u_is_output_side_and_v_input_side_as_in_spectral_norm():
    """Against torch's spectral_norm (its own random start, 200 power iterations)."""
    torch.manual_seed(0)
    ref = nn.Linear(7, 5)
    W = ref.weight.detach().clone()
    spectral_norm(ref, n_power_iterations=200)
    ours = nn.Linear(7, 5)
    with torch.no_grad():
        ours.weight.copy_(W)
    p = _param(sigma_reparam(ours))
    sn = ref.parametrizations.weight[0]
    assert p._u.shape == (1, 5) and sn._u.shape == (5,)
    assert p._v.shape == (1, 7) and sn._v.shape == (7,)
    assert abs(float(p._u[0] @ sn._u)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(p._v[0] @ sn._v)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("metadata", [True, False])
def test_checkpoint_with_the_old_u_v_names_loads(square, metadata):
    """Version-1 checkpoints stored _u input side and _v output side: they load swapped back,
    told apart by the module version in the metadata, else by shape, else by value."""
    torch.manual_seed(0)
    layer = _layer_with_random_vectors(out=4 if square else 6, inp=4)
    layer(torch.randn(2, 4))
    sd = layer.state_dict()
    old = type(sd)(sd)
    old["parametrizations.weight.0._u"], old["parametrizations.weight.0._v"] = sd[
        "parametrizations.weight.0._v"], sd["parametrizations.weight.0._u"]
    if metadata:
        old._metadata = copy.deepcopy(sd._metadata)
        old._metadata["parametrizations.weight.0"]["version"] = 1
    elif hasattr(old, "_metadata"):
        del old._metadata
    if square and not metadata:  # the value test needs converged vectors
        p = _param(layer)
        for _ in range(300):
            p._power_iteration(p._as_matrices(_original(layer).detach()))
        sd = layer.state_dict()
        old["parametrizations.weight.0._u"] = sd["parametrizations.weight.0._v"]
        old["parametrizations.weight.0._v"] = sd["parametrizations.weight.0._u"]
    fresh = sigma_reparam(nn.Linear(4, 4 if square else 6))
    fresh.load_state_dict(old)
    assert torch.equal(_param(fresh)._u, sd["parametrizations.weight.0._u"])
    assert torch.equal(_param(fresh)._v, sd["parametrizations.weight.0._v"])
    fresh.load_state_dict(sd)  # a new checkpoint loads unchanged
    assert torch.equal(_param(fresh)._u, sd["parametrizations.weight.0._u"])


@pytest.mark.parametrize("make, matrix", [
    (lambda: nn.ConvTranspose2d(3, 5, 2), lambda W: W.transpose(0, 1).reshape(5, -1)),
    (lambda: nn.ConvTranspose1d(4, 2, 3), lambda W: W.transpose(0, 1).reshape(2, -1)),
])
def test_conv_transpose_is_normalised_along_its_output_channels(make, matrix):
    torch.manual_seed(0)
    layer = make()
    W = layer.weight.detach().clone()
    sigma_reparam(layer, gamma_init="one")
    assert _param(layer).dim == 1
    sn = make()
    with torch.no_grad():
        sn.weight.copy_(W)
    spectral_norm(sn, n_power_iterations=100, dim=1)  # torch's choice for ConvTranspose
    with torch.no_grad():
        ours = layer.weight
        torch.testing.assert_close(ours, sn.weight, rtol=1e-4, atol=1e-5)
        assert torch.linalg.matrix_norm(matrix(ours), 2).item() == pytest.approx(1.0, rel=1e-5)


def test_deepcopy_fold_and_remove_leave_the_original_intact():
    net = _trained()
    x = torch.randn(2, 5, 8)
    net.eval()
    with torch.no_grad():
        y = net(x)
    fold_sigma_reparam(copy.deepcopy(net))
    twin = copy.deepcopy(net)
    _parametrize.remove_parametrizations(twin.inp, "weight")
    trained = copy.deepcopy(net).train()
    torch.optim.SGD(trained.parameters(), lr=0.1).zero_grad()
    trained(x).sum().backward()
    with torch.no_grad():
        for p in trained.parameters():
            p.sub_(0.1 * p.grad)
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, rtol=0, atol=0)
    assert is_sigma_reparametrized(net.inp) and net.inp.weight.shape == (8, 8)
    fold_sigma_reparam(net)  # the original folds too, after its copies did
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)


def test_tied_weights_are_left_alone_with_a_warning_and_fold_keeps_the_function():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(11, 8), nn.Linear(8, 8), nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.mid(self.emb(idx))))

    torch.manual_seed(0)
    model = Tied()
    with pytest.warns(UserWarning, match="head.weight is shared with emb.weight"):
        convert_to_sigma_reparam(model)
    assert not is_sigma_reparametrized(model.head) and model.head.weight is model.emb.weight
    report = {e["name"]: e for e in sigma_reparam_report(model)}
    assert report["head.weight"]["reason"] == "tied to emb.weight" and report["mid.weight"]["converted"]
    sigma_reparam(model.head, gamma_init=3.0)  # by hand: only the head sees W_hat
    idx = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        y = model.eval()(idx)
    emb = model.emb.weight.detach().clone()
    with pytest.warns(UserWarning, match="tie is broken"):
        fold_sigma_reparam(model)
    assert torch.equal(model.emb.weight, emb)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), y, rtol=1e-5, atol=1e-6)


def test_zero_initialised_head_gets_gamma_one_and_trains():
    """A zero head (torchvision's ViT, many fine-tuning recipes): gamma = sigma(W0) ~ 0 would
    leave it dead; gamma = 1 keeps it zero at init and lets it learn like the plain model."""
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
        nn.init.zeros_(net[2].weight)
        return net

    torch.manual_seed(1)
    x = torch.randn(128, 16)
    y = (x[:, :4] * 3).argmax(-1)

    def train(net):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        for _ in range(40):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        return loss.item()

    plain_loss = train(make())
    net = make()
    with pytest.warns(UserWarning, match="2.weight is \\(near\\) zero"):
        convert_to_sigma_reparam(net)
    assert _param(net[2]).gamma.item() == 1.0
    with torch.no_grad():
        assert torch.equal(net[2].weight, torch.zeros(4, 32))  # zero at init: function unchanged
    loss = train(net)
    # measured: plain 0.054, this 0.51, gamma = sigma(W0) (the dead layer) 1.36 ~ log 4; the
    # head learns its scale through gamma, more slowly than a plain head (Prop. 3.2's point)
    assert plain_loss < loss < 0.5 * math.log(4), (loss, plain_loss)


def test_assigning_the_weight_goes_through_right_inverse():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    sigma_reparam(mha)
    target = torch.randn(24, 8)
    mha.in_proj_weight = target
    torch.testing.assert_close(mha.in_proj_weight, target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_original(mha, "in_proj_weight"), target)
    layer = sigma_reparam(nn.Linear(5, 3))
    layer.weight = nn.init.orthogonal_(torch.empty(3, 5))
    assert torch.linalg.matrix_norm(layer.weight.detach(), 2).item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        layer.weight = torch.randn(5, 3)


@pytest.mark.parametrize("init", [nn.init.normal_, nn.init.zeros_, nn.init.xavier_uniform_])
@pytest.mark.parametrize("training", [True, False])
def test_nn_init_on_the_reparametrised_weight_raises_instead_of_doing_nothing(init, training):
    layer = sigma_reparam(nn.Linear(4, 4)).train(training)
    init(layer.weight)
    with pytest.raises(RuntimeError, match="modified in place.*Assign instead"):
        layer(torch.randn(2, 4))
    layer(torch.randn(2, 4))  # reported once; a fresh read works


def test_plain_state_dict_loads_into_a_converted_model():
    torch.manual_seed(0)
    plain = Wide()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = plain(x)
    torch.manual_seed(1)
    model = _convert(Wide())
    result = model.load_state_dict(plain.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(_original(model.net.attn, "in_proj_weight"), plain.net.attn.in_proj_weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _convert(Wide(d=4)).load_state_dict(plain.state_dict())


def test_bf16_module_weights_keep_fp32_gamma_and_w_hat_equals_w0():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    W0 = layer.weight.detach().clone()
    sigma_reparam(layer)
    p = _param(layer)
    assert p.gamma.dtype == p._u.dtype == p._v.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(layer.weight, W0)
    layer.float().to(torch.bfloat16)
    assert p.gamma.dtype == torch.float32 and isinstance(p.gamma, nn.Parameter)
    layer.double()
    assert p.gamma.dtype == torch.float64  # (only 16-bit casts are refused)


def test_attention_left_unconverted_is_named_in_a_warning_and_in_the_report():
    with pytest.warns(UserWarning, match="attention module attn keeps weights.*in_proj_weight"):
        net = convert_to_sigma_reparam(Net(), layer_types=(nn.Linear,))
    report = {e["name"]: e for e in sigma_reparam_report(net)}
    assert report["attn.in_proj_weight"]["reason"] == "MultiheadAttention is not in layer_types"
    assert report["conv.weight"]["reason"] == "Conv1d is not in layer_types"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded on purpose: no warning
        convert_to_sigma_reparam(Net(), exclude=["attn"])
    with pytest.raises(ValueError, match="model"):
        sigma_reparam_report(Net())


def test_default_conversion_is_batched_and_covers_multihead_attention():
    net = convert_to_sigma_reparam(Net())
    assert len(net._forward_pre_hooks) == 1
    assert is_sigma_reparametrized(net.attn, "in_proj_weight")
    from sigma_core.reparam import _batched_pre_hook, _enter_weight_cache

    assert list(net._forward_pre_hooks.values()) == [_batched_pre_hook]
    unbatched = convert_to_sigma_reparam(Net(), batched=False)  # not batched, still scoped
    assert list(unbatched._forward_pre_hooks.values()) == [_enter_weight_cache]
    with pytest.raises(TypeError, match="batched"):
        convert_to_sigma_reparam(Net(), batched=1)
    with pytest.raises(TypeError, match="split_qkv"):
        convert_to_sigma_reparam(Net(), split_qkv="yes")


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_takes_one_step_with_the_same_gradient_float64(batched, reentrant):
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.on = Wide(), False

        def forward(self, x):
            if self.on:
                return checkpoint(self.net, x, use_reentrant=reentrant)
            return self.net(x)

    torch.manual_seed(0)
    ref = _scramble_vectors(_convert(Ckpt().double(), batched=batched))
    model = copy.deepcopy(ref)
    model.on = True
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    start = _buffers(ref)
    for _ in range(2):
        for m in (ref, model):
            m.zero_grad()
            m(x).square().sum().backward()
        for k, b in ref.named_buffers():
            torch.testing.assert_close(model.get_buffer(k), b, rtol=1e-13, atol=1e-13, msg=k)
        for (k, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=k)
    # exactly one step per training step: by hand, for one weight
    W = _original(ref.net.extra).detach()
    u, v = start["net.extra.parametrizations.weight.0._v"][0], start["net.extra.parametrizations.weight.0._u"][0]
    for _ in range(2):
        u, v = _manual_step(W, u, v)
    torch.testing.assert_close(_param(model.net.extra)._v[0], u)


def test_new_arguments_are_validated_by_name():
    with pytest.raises(ValueError, match="dim"):
        sigma_reparam(nn.Linear(2, 2), dim=2)
    with pytest.raises(ValueError, match="n_chunks"):
        sigma_reparam(nn.Linear(3, 2), n_chunks=3)
    with pytest.raises(TypeError, match="layer_types"):
        convert_to_sigma_reparam(nn.Linear(2, 2), layer_types=("Linear",))


# ------------------------------------------- deepcopy of a trained / evaluated model ------

class _PerWeight(nn.Module):
    """Two σReparam layers and a MultiheadAttention, built on the per-weight path."""

    def __init__(self, how: str) -> None:
        super().__init__()
        if how == "SigmaReparamLinear":
            self.a, self.b = SigmaReparamLinear(8, 8), SigmaReparamLinear(8, 8)
        else:
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            if how == "sigma_reparam":
                sigma_reparam(self.a), sigma_reparam(self.b)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        if how == "sigma_reparam":
            sigma_reparam(self.attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.b(h)


def _deepcopy_model(how: str) -> nn.Module:
    torch.manual_seed(0)
    if how in ("SigmaReparamLinear", "sigma_reparam"):
        return _scramble_vectors(_PerWeight(how))
    return _scramble_vectors(convert_to_sigma_reparam(_PerWeight("plain"), batched=how == "batched"))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


PATHS = ["SigmaReparamLinear", "sigma_reparam", "convert_unbatched", "batched"]


@pytest.mark.parametrize("how", PATHS)
@pytest.mark.parametrize("after", ["train_step", "eval_forward", "eval_forward_no_grad", "weight_read"])
def test_deepcopy_after_training_and_eval(how, after):
    """Issue 25: on the per-weight path ``copy.deepcopy`` after a training step raised "Only
    Tensors created explicitly by the user (graph leaves) support the deepcopy protocol", and
    ``fold_sigma_reparam(copy.deepcopy(m))`` after an eval forward the false "modified in place
    after it was read" (EMA, evaluation and export copies deepcopy a trained model).  The copy
    computes what the original computes, in training (the same step) and eval, folds to the
    original's eval output exactly, and copying, folding and training the copy leave the
    original untouched."""
    model = _deepcopy_model(how)
    x = torch.randn(2, 5, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()  # a training step
    opt.step()
    if after == "eval_forward":
        model.eval()
        model(x)  # with grad enabled: the weights read carry autograd history
    elif after == "eval_forward_no_grad":
        model.eval()
        with torch.no_grad():
            model(x)
    elif after == "weight_read":
        model.a.weight.sum()  # a training-mode read outside a forward (e.g. logging)
    state = _state(model)
    twin = copy.deepcopy(model)
    _assert_state_equal(twin, state)
    folded = fold_sigma_reparam(copy.deepcopy(model))
    assert not any(is_sigma_reparametrized(m) for m in folded.modules())
    assert not is_sigma_reparametrized(folded.attn, "in_proj_weight")
    _assert_state_equal(model, state)
    model.eval(), twin.eval(), folded.eval()
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
        torch.testing.assert_close(folded(x), y, rtol=0, atol=0)  # folds exactly
    # both train one more step, identically; the original does not see the copy's step
    model.train(), twin.train()
    for net in (twin, model):
        net.zero_grad()
        net(x).pow(2).mean().backward()
    for (k, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=k)
        assert q.data_ptr() != p.data_ptr()
    after_step = _state(model)
    twin(x).sum().backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    _assert_state_equal(model, after_step)
    fold_sigma_reparam(model)  # the original still folds


def test_inplace_check_still_works_on_original_and_copy():
    """Dropping the copy's record of the last read keeps the in-place-edit check on both sides."""
    model = _deepcopy_model("SigmaReparamLinear")
    w = model.a.weight  # a read outside a forward, then an in-place edit of the computed copy
    twin = copy.deepcopy(model)
    with torch.no_grad():
        w.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place after it was read"):
        model.a.weight
    w2 = twin.a.weight
    with torch.no_grad():
        w2.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place after it was read"):
        twin.a.weight
