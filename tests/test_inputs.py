"""Every class of bad input to the public APIs gets a ValueError/TypeError naming the argument.

Classes tried: wrong type, wrong dtype, wrong shape, out-of-range value, non-finite value,
mismatched devices, unknown choice.  Each case names the exception and a regex that must appear
in the message (the argument's name), so an error that only happens to be raised deep inside
numpy or torch does not count.
"""
import math

import numpy as np
import pytest
import torch

import theory
from sigma_core.experiments.config import TrainConfig, preset
from sigma_core.entropy import attention_entropy, head_sigma
from sigma_core.models.gpt import build_model
from sigma_core.monitor import EntropyMonitor
from sigma_core.reparam import sigma_reparam

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
