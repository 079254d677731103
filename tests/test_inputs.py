"""Every class of bad input to the public APIs gets a ValueError/TypeError naming the argument.

Classes tried: wrong type, wrong dtype, wrong shape, out-of-range value, non-finite value,
mismatched devices, unknown choice.  Each case names the exception and a regex that must appear
in the message (the argument's name), so an error that only happens to be raised deep inside
numpy or torch does not count.
"""
import math
import warnings
from decimal import Decimal

import numpy as np
import pytest
import torch

import theory
from sigma_core.experiments.config import TrainConfig, preset
from sigma_core.entropy import attention_entropy, attention_row_stats, head_sigma
from sigma_core.models.gpt import build_model
from sigma_core.monitor import EntropyMonitor
from sigma_core.reparam import convert_to_sigma_reparam, sigma_reparam, sigma_reparam_state

NAN, INF = math.nan, math.inf
RNG = np.random.default_rng(0)
X, W = RNG.standard_normal((5, 4)), RNG.standard_normal((4, 4))
Q, K = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)


def _linear_with_nan():
    lin = torch.nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight[0, 0] = NAN
    return lin


CASES = {
    # theory.entropy_lower_bound(logit_norm, seq_len), eq. (2)
    "elb/non-finite": (lambda: theory.entropy_lower_bound(NAN, 5), ValueError, "logit_norm"),
    "elb/negative": (lambda: theory.entropy_lower_bound(-1.0, 5), ValueError, "logit_norm"),
    "elb/seq_len 0": (lambda: theory.entropy_lower_bound(1.0, 0), ValueError, "seq_len"),
    "elb/seq_len fractional": (lambda: theory.entropy_lower_bound(1.0, 2.5), ValueError, "seq_len"),
    "elb/type": (lambda: theory.entropy_lower_bound("1", 5), TypeError, "logit_norm"),
    "elb/dtype complex": (lambda: theory.entropy_lower_bound(np.ones(3) + 1j, 5), TypeError, "logit_norm"),
    "elb/shapes": (lambda: theory.entropy_lower_bound(np.ones(3), np.full(4, 5)), ValueError, "logit_norm"),
    # theory.softmax_entropy(logits, axis)
    "se/nan": (lambda: theory.softmax_entropy(np.array([1.0, NAN])), ValueError, "logits"),
    "se/+inf": (lambda: theory.softmax_entropy(np.array([1.0, INF])), ValueError, "logits"),
    "se/empty": (lambda: theory.softmax_entropy(np.array([])), ValueError, "logits"),
    "se/dtype": (lambda: theory.softmax_entropy(np.array(["a", "b"])), TypeError, "logits"),
    "se/axis": (lambda: theory.softmax_entropy(np.ones((2, 3)), axis=5), ValueError, "axis"),
    # theory.max_logit_norm(entropy, seq_len), the inverse of eq. (2)
    "mln/nan": (lambda: theory.max_logit_norm(NAN, 5), ValueError, "entropy"),
    # issue 13: strings, integers beyond float64, axis type, empty input checked alike
    "elb/str seq_len": (lambda: theory.entropy_lower_bound(1.0, "5"), TypeError, "seq_len"),
    "elb/int beyond float64": (lambda: theory.entropy_lower_bound(1.0, 10**400), ValueError, "seq_len"),
    "elb/empty fractional T": (lambda: theory.entropy_lower_bound([], 2.5), ValueError, "seq_len"),
    "mln/empty fractional T": (lambda: theory.max_logit_norm([], 2.5), ValueError, "seq_len"),
    "mln/str": (lambda: theory.max_logit_norm("0.5", 5), TypeError, "entropy"),
    "se/axis float": (lambda: theory.softmax_entropy(np.ones((2, 3)), axis=1.0), TypeError, "axis"),
    "se/str": (lambda: theory.softmax_entropy("1 2"), TypeError, "logits"),
    "tb/scale str": (lambda: theory.theorem_bound(X, W, W, scale="2"), TypeError, "scale"),
    "tb/causal": (lambda: theory.theorem_bound(X, W, W, causal=None), TypeError, "causal"),
    "mp/str": (lambda: theory.entropy_lower_bound_mp("0.1", 5), TypeError, "logit_norm"),
    "me/seq_len huge": (lambda: theory.minimize_entropy(1.0, 10**20), ValueError, "seq_len"),
    "box/str": (lambda: theory.box_min_entropy("1", 5), TypeError, "bound"),
    "adam/str": (lambda: theory.adam_update_bound("1", 0.1), TypeError, "mean"),
    # theory.row_entropy_bounds(X, W_Q, W_K)
    "reb/shape": (lambda: theory.row_entropy_bounds(X, W[:3], W), ValueError, "W_Q"),
    "reb/ndim": (lambda: theory.row_entropy_bounds(X[0], W, W), ValueError, "X"),
    "reb/nan": (lambda: theory.row_entropy_bounds(np.where(X > 0, NAN, X), W, W), ValueError, "X"),
    "reb/scale nan": (lambda: theory.row_entropy_bounds(X, W, W, scale=NAN), ValueError, "scale"),
    # theory.extremal_instance(sigma, seq_len, dim, row, token_norm)
    "ei/negative": (lambda: theory.extremal_instance(-1.0, 5), ValueError, "sigma"),
    "ei/nan": (lambda: theory.extremal_instance(NAN, 5), ValueError, "sigma"),
    "ei/seq_len": (lambda: theory.extremal_instance(1.0, 0), ValueError, "seq_len"),
    "ei/dim": (lambda: theory.extremal_instance(1.0, 5, dim=1), ValueError, "dim"),
    "ei/row": (lambda: theory.extremal_instance(1.0, 5, row=5), ValueError, "row"),
    "ei/token_norm": (lambda: theory.extremal_instance(1.0, 5, token_norm=INF), ValueError, "token_norm"),
    # sigma_core.entropy.attention_entropy(q, k)
    "ae/type": (lambda: attention_entropy(Q.numpy(), K.numpy()), TypeError, "q"),
    "ae/dtype": (lambda: attention_entropy(Q.long(), K.long()), TypeError, "q"),
    "ae/ndim": (lambda: attention_entropy(Q[0, 0, 0], K[0, 0, 0]), ValueError, "q"),
    "ae/shapes": (lambda: attention_entropy(Q, K[..., :3]), ValueError, "k"),
    "ae/scale": (lambda: attention_entropy(Q, K, scale=NAN), ValueError, "scale"),
    "ae/method": (lambda: attention_entropy(Q, K, method="magic"), ValueError, "method"),
    "ae/mask": (lambda: attention_entropy(Q, K, attn_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError,
                "attn_mask"),
    "hs/shapes": (lambda: head_sigma(torch.randn(4, 4), torch.randn(3, 4)), ValueError, "w_k"),
    # sigma_core.reparam.sigma_reparam(module, name, gamma_init, n_power_iterations, eps)
    "sr/type": (lambda: sigma_reparam("linear"), TypeError, "module"),
    "sr/name": (lambda: sigma_reparam(torch.nn.Linear(3, 3), "bias2"), ValueError, "name"),
    "sr/gamma choice": (lambda: sigma_reparam(torch.nn.Linear(3, 3), gamma_init="two"), ValueError, "gamma_init"),
    "sr/gamma nan": (lambda: sigma_reparam(torch.nn.Linear(3, 3), gamma_init=NAN), ValueError, "gamma_init"),
    "sr/iterations": (lambda: sigma_reparam(torch.nn.Linear(3, 3), n_power_iterations=0), ValueError,
                      "n_power_iterations"),
    "sr/eps": (lambda: sigma_reparam(torch.nn.Linear(3, 3), eps=-1.0), ValueError, "eps"),
    "sr/nan weight": (lambda: sigma_reparam(_linear_with_nan()), ValueError, "weight"),
    # sigma_core.monitor.EntropyMonitor(model, every, path, bound_samples, method, block_size)
    "em/type": (lambda: EntropyMonitor("gpt"), TypeError, "model"),
    "em/no attention": (lambda: EntropyMonitor(torch.nn.Linear(2, 2), capture=False), ValueError, "model"),
    "em/capture": (lambda: EntropyMonitor(torch.nn.Linear(2, 2), capture=1), TypeError, "capture"),
    "em/every": (lambda: EntropyMonitor(build_model(preset("cpu-smoke")), every=0), ValueError, "every"),
    "em/method": (lambda: EntropyMonitor(build_model(preset("cpu-smoke")), method="x"), ValueError, "method"),
    "em/block_size": (lambda: EntropyMonitor(build_model(preset("cpu-smoke")), block_size=0), ValueError,
                      "block_size"),
    "em/path": (lambda: EntropyMonitor(build_model(preset("cpu-smoke")), path=3), TypeError, "path"),
    "em/bound_samples": (lambda: EntropyMonitor(build_model(preset("cpu-smoke")), bound_samples=-1), ValueError,
                         "bound_samples"),
    # sigma_core.experiments.config.TrainConfig
    "tc/lr type": (lambda: TrainConfig(lr="0.1"), TypeError, "lr"),
    "tc/lr nan": (lambda: TrainConfig(lr=NAN), ValueError, "lr"),
    "tc/lr negative": (lambda: TrainConfig(lr=-1e-3), ValueError, "lr"),
    "tc/grad_clip inf": (lambda: TrainConfig(grad_clip=INF), ValueError, "grad_clip"),
    "tc/weight_decay nan": (lambda: TrainConfig(weight_decay=NAN), ValueError, "weight_decay"),
    "tc/steps float": (lambda: TrainConfig(steps=2.5), TypeError, "steps"),
    "tc/steps 0": (lambda: TrainConfig(steps=0), ValueError, "steps"),
    "tc/seed float": (lambda: TrainConfig(seed=1.5), TypeError, "seed"),
    "tc/device type": (lambda: TrainConfig(device=0), TypeError, "device"),
    "tc/compile type": (lambda: TrainConfig(compile="yes"), TypeError, "compile"),
    "tc/reparam choice": (lambda: TrainConfig(reparam="weightnorm"), ValueError, "reparam"),
    "tc/heads": (lambda: TrainConfig(d_model=30, n_head=4), ValueError, "n_head"),
    "tc/betas": (lambda: TrainConfig(betas=(0.9,)), ValueError, "betas"),
    "tc/checkpoint_every": (lambda: TrainConfig(checkpoint_every=-1), ValueError, "checkpoint_every"),
    "tc/unknown key": (lambda: TrainConfig.from_dict({"learning_rate": 0.1}), ValueError, "learning_rate"),
    "preset/name": (lambda: preset("tpu"), ValueError, "name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_naming_the_argument(case):
    call, exc, names = CASES[case]
    with pytest.raises(exc, match=names):
        call()


# Bad inputs of sigma_core.entropy: mixed dtypes or devices, non-finite tensors.
ENTROPY_CASES = {
    "ae/mixed dtypes": (lambda: attention_entropy(Q, K.double()), TypeError, "k"),
    "ae/non-finite q": (lambda: attention_entropy(Q.masked_fill(Q > 1, NAN), K), ValueError, "q"),
    "ae/devices": (lambda: attention_entropy(Q, K.to("meta")), ValueError, "device"),
    "hs/non-finite": (lambda: head_sigma(torch.full((2, 4, 4), NAN), torch.randn(2, 4, 4)), ValueError, "w_q"),
}


@pytest.mark.parametrize("case", sorted(ENTROPY_CASES))
def test_bad_entropy_inputs_raise_naming_the_argument(case):
    call, exc, names = ENTROPY_CASES[case]
    with pytest.raises(exc, match=names):
        call()


def test_valid_inputs_still_pass():
    """The checks reject only bad inputs: the same calls with good arguments give finite results."""
    assert np.isfinite(theory.entropy_lower_bound(1.0, 5))
    assert np.isfinite(theory.softmax_entropy(np.array([1.0, -INF, 0.0])))
    assert torch.isfinite(attention_entropy(Q, K, causal=True)).all()
    assert TrainConfig(lr=1, grad_clip=0, seed=int(np.int64(3))).lr == 1  # ints are reals


# Issue 27, items 12 and 13: each case a one-line error naming the argument.
def _monitor_model():
    return torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)


def _sigma_reparam_linear(in_features, out_features):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors"
        module = torch.nn.Linear(in_features, out_features)
    return sigma_reparam(module)


ISSUE27_CASES = {
    "ei/str sigma": (lambda: theory.extremal_instance("1", 4), TypeError, "sigma"),
    "ei/bytes sigma": (lambda: theory.extremal_instance(b"2", 4), TypeError, "sigma"),
    "ei/Decimal sigma": (lambda: theory.extremal_instance(Decimal(1), 4), TypeError, "sigma"),
    "ei/None sigma": (lambda: theory.extremal_instance(None, 4), TypeError, "sigma"),
    "ei/complex sigma": (lambda: theory.extremal_instance(1j, 4), TypeError, "sigma"),
    "ei/str token_norm": (lambda: theory.extremal_instance(1.0, 4, token_norm="x"), TypeError, "token_norm"),
    "ei/2**1100 sigma": (lambda: theory.extremal_instance(2**1100, 4), ValueError, "sigma.*finite"),
    "ei/huge T": (lambda: theory.extremal_instance(1.0, 10**12, dim=2), ValueError, "MAX_ELEMENTS"),
    "ei/T 1e9 default dim": (lambda: theory.extremal_instance(1.0, 10**9), ValueError, "seq_len"),
    "el/huge T": (lambda: theory.extremal_logits(1.0, 2**40), ValueError, "seq_len.*MAX_ELEMENTS"),
    "el/T 1e9": (lambda: theory.extremal_logits(1.0, 10**9), ValueError, "MAX_ELEMENTS"),
    "sr/Linear(5, 0)": (lambda: _sigma_reparam_linear(5, 0), ValueError, "zero-size"),
    "sr/Linear(0, 5)": (lambda: _sigma_reparam_linear(0, 5), ValueError, "zero-size"),
    "ars/d_head 0": (lambda: attention_row_stats(Q[..., :0], K[..., :0]), ValueError, "d_head"),
    "ae/scale str": (lambda: attention_entropy(Q, K, scale="1"), TypeError, "scale"),
    "hs/scale str": (lambda: head_sigma(torch.randn(2, 4, 4), torch.randn(2, 4, 4), scale="1"), TypeError,
                     "scale"),
    "em/every float": (lambda: EntropyMonitor(_monitor_model(), every=2.0), ValueError, "every"),
    "csr/layer_types int": (lambda: convert_to_sigma_reparam(torch.nn.Linear(2, 2), layer_types=3), TypeError,
                            "layer_types"),
}


@pytest.mark.parametrize("case", sorted(ISSUE27_CASES))
def test_issue27_bad_input_raises_naming_the_argument(case):
    call, exc, names = ISSUE27_CASES[case]
    with pytest.raises(exc, match=names):
        call()


def test_size_limit_is_exact():
    """MAX_ELEMENTS is the limit itself: T * d at the limit is built, one row more is refused."""
    limit = theory.bound.MAX_ELEMENTS
    assert theory.extremal_logits(np.zeros(limit // 8), 8).shape == (limit // 8, 8)
    with pytest.raises(ValueError, match="MAX_ELEMENTS"):
        theory.extremal_logits(np.zeros(limit // 8 + 1), 8)


@pytest.mark.parametrize("value", [1e308, 1.7e308, -1.7e308])
def test_finiteness_check_does_not_overflow(value):
    """Finite entries near the float64 limit are finite: min + max (inf) is not the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = theory.adam_update_bound([[value, value]], 0)
    np.testing.assert_array_equal(r.update, np.sign([[value, value]]))  # mu/|mu| with no noise
    assert r.spectral_norm == pytest.approx(math.sqrt(2)) and r.bound == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match=r"entropy must be <= log\(seq_len\)"):  # not "finite"
        theory.max_logit_norm([abs(value), abs(value)], 4)


@pytest.mark.parametrize("s", [1e155, 1e300, 1e-160, 1e-200, 1e-320])
def test_minimize_entropy_extreme_norms(s):
    """No OverflowError/ZeroDivisionError where s**2 leaves float64: the right minimum, h_T(s)
    (0 for huge s, log T for tiny s, as mpmath's 50-digit value rounds), never below the bound."""
    import mpmath
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = theory.minimize_entropy(s, 4, restarts=2)
    ref = float(theory.entropy_lower_bound_mp(mpmath.mpf(s), 4))
    assert r.value == pytest.approx(ref, rel=1e-15, abs=1e-300)
    assert r.gap >= -4 * np.finfo(float).eps * max(ref, 1e-300)
    # (s**2 would overflow); subnormal s keeps fewer digits
    assert np.linalg.norm(r.logits / s) == pytest.approx(1.0, rel=1e-12 if s > 1e-300 else 1e-3)


@pytest.mark.parametrize("b", [1e308, 1.7e308, 400.0])
def test_box_min_entropy_huge_bound_no_warning(b):
    """b -> inf: e^{-2b} is 0, the one-high vertex has entropy 0 and H_k = log k, eq. (11)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = theory.box_min_entropy(b, 5)
    np.testing.assert_allclose(r.vertex_values, np.log([5, 1, 2, 3, 4, 5]), rtol=0, atol=1e-15)
    assert (r.value, r.n_high) == (0.0, 1)


@pytest.mark.parametrize("every", [np.int64(2), np.int32(2), 2])
def test_monitor_accepts_numpy_ints(every):
    layer = _monitor_model()
    x = torch.randn(2, 5, 8)
    with EntropyMonitor(layer, every=every, bound_samples=np.int64(1), block_size=np.int64(64)) as mon:
        steps = []
        for _ in range(3):
            layer(x)
            steps.append(mon.last[0]["step"])
    assert type(mon.every) is int and steps == [0, 0, 2]  # recorded at forwards 0 and 2


def test_monitor_path_that_cannot_be_opened_registers_no_hook(tmp_path):
    """A path that cannot be opened raises before any hook: no orphaned monitor keeps recording."""
    layer = _monitor_model()
    with pytest.raises(OSError):
        EntropyMonitor(layer, path=tmp_path / "missing-dir" / "log.jsonl")
    hooks = [m._forward_hooks or m._forward_pre_hooks for m in layer.modules()]
    assert not any(hooks)


def test_layer_types_single_class():
    """layer_types=nn.Linear (one class, not a tuple) converts the Linear layers only."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv1d(4, 4, 1))
    convert_to_sigma_reparam(net, layer_types=torch.nn.Linear)
    assert sorted(sigma_reparam_state(net)) == ["0.weight"]


def test_sigma_reparam_on_meta_device():
    """Built on the meta device, moved with to_empty and loaded, the layer equals the CPU one."""
    torch.manual_seed(0)
    ref = sigma_reparam(torch.nn.Linear(5, 3))
    lazy = sigma_reparam(torch.nn.Linear(5, 3, device="meta"))
    out = lazy(torch.randn(2, 5, device="meta"))
    assert out.shape == (2, 3) and out.is_meta
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(ref.state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(lazy.eval()(x), ref.eval()(x), rtol=0, atol=0)


def test_scale_of_numpy_or_tensor_type_still_accepted():
    ref = attention_entropy(Q, K, scale=0.5)
    torch.testing.assert_close(attention_entropy(Q, K, scale=np.float32(0.5)), ref)
    torch.testing.assert_close(attention_entropy(Q, K, scale=torch.tensor(0.5)), ref)
