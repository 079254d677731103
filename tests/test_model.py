"""The GPT model, the stdlib corpus and the training config: claims a user relies on."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sigma_core.experiments.config import PRESETS, TrainConfig, preset
from sigma_core.experiments.data import get_batch, load_stdlib_corpus
from sigma_core.models.gpt import GPT, ModelConfig, apply_reparam, build_model


def tiny(norm="pre", **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(d_model=16, n_layer=2, n_head=4, block_size=12, norm=norm, **kw))


@settings(max_examples=15)
@given(norm=st.sampled_from(["pre", "post", "none"]), cut=st.integers(1, 11), seed=st.integers(0, 99))
def test_future_tokens_do_not_change_past_logits(norm, cut, seed):
    model = tiny(norm).eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (2, 12), generator=g)
    idx2 = idx.clone()
    idx2[:, cut:] = torch.randint(0, 256, (2, 12 - cut), generator=g)
    with torch.no_grad():
        a, b = model(idx)[0], model(idx2)[0]
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reparam", ["none", "spectral"])
@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_probe_sees_queries_keys_matching_head_weights(norm, reparam):
    """The probe's q, k equal x @ W_Q[h], x @ W_K[h] with head_weights() (the bound's weights)."""
    model = apply_reparam(tiny(norm), reparam).eval()
    seen = []
    hooks = [a.probe.register_forward_hook(lambda m, args, out: seen.append(args))
             for a in model.attention_modules()]
    idx = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(idx)
        for attn, (x, q, k) in zip(model.attention_modules(), seen, strict=True):
            w_q, w_k = attn.head_weights()
            assert w_q.shape == w_k.shape == (attn.n_head, 16, 16 // attn.n_head)
            torch.testing.assert_close(q, torch.einsum("btd,hde->bhte", x, w_q), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(k, torch.einsum("btd,hde->bhte", x, w_k), atol=1e-5, rtol=1e-5)
            assert attn.causal and attn.scale == pytest.approx((16 // attn.n_head) ** -0.5)
    assert len(seen) == 2
    for h in hooks:
        h.remove()


def test_spectral_reparam_bounds_every_linear_weight():
    model = apply_reparam(tiny(), "spectral").train()
    for _ in range(30):  # power iteration converges over training-mode forwards
        model(torch.randint(0, 256, (1, 12)))
    model.eval()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.linalg.matrix_norm(m.weight.detach(), ord=2) == pytest.approx(1.0, rel=1e-2), name


def test_loss_starts_near_uniform_and_decreases_on_a_fixed_batch():
    model = tiny()
    idx = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(2))
    _, loss0 = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss0.item() - torch.log(torch.tensor(256.0)).item()) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * loss0.item()


def test_model_rejects_sequences_longer_than_its_context():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(d_model=10, n_head=4)
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="sandwich")


# the corpus itself (shipped bytes, sha256, licence, refusal of a damaged file): tests/test_data.py


def test_batches_are_a_function_of_the_generator_state():
    data = load_stdlib_corpus(max_bytes=20_000).train
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    x1, y1 = get_batch(data, 4, 16, g)
    x_next, _ = get_batch(data, 4, 16, g)
    g.set_state(state)
    x2, y2 = get_batch(data, 4, 16, g)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x_next)
    assert torch.equal(x1[:, 1:], y1[:, :-1])


def test_presets_match_calibration_and_bad_fields_are_named():
    demo = preset("cpu-demo")
    assert (demo.d_model, demo.n_layer, demo.n_head, demo.block_size, demo.batch_size) == (128, 4, 4, 128, 32)
    h200 = preset("h200")
    assert (h200.d_model, h200.n_layer, h200.n_head, h200.block_size, h200.batch_size, h200.lr) == \
        (256, 6, 8, 256, 64, 1e-2)
    assert preset("cpu-smoke", steps=7).sample_steps[-1] == 7
    from sigma_core.experiments.train import build_model as build_any  # every model: gpt, vit, seq2seq

    for name in PRESETS:
        assert build_any(preset(name)).cfg.d_model == preset(name).d_model
    with pytest.raises(ValueError, match="cfg.model must be 'gpt'"):
        build_model(preset("vit-smoke"))
    with pytest.raises(ValueError, match="reparam"):
        TrainConfig(reparam="weightnorm")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="name"):
        preset("tpu")
