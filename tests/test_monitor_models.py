"""EntropyMonitor on Transformers nobody here wrote: Hugging Face GPT-2, BERT, Llama, x-transformers,
torch.nn.TransformerEncoder, and bare scaled_dot_product_attention calls.

Reference: the probabilities the model itself returns (``output_attentions=True`` with the eager
implementation), or a float64 brute force.  Every model is tiny and random-initialised from a
config (tests/thirdparty_models.py); a test skips when its library is absent.
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.adapters import ADAPTERS, register_adapter
from sigma_core.monitor import BoundViolationWarning, EntropyMonitor
from thirdparty_models import (
    tiny_bart, tiny_bert, tiny_distilbert, tiny_gemma2, tiny_gpt2, tiny_gpt_neox, tiny_llama, tiny_mistral, tiny_qwen2,
    tiny_t5, tiny_vit, tiny_whisper, tiny_xtransformer,
)

VARIANTS = ("theorem", "per_query", "centered", "exact")
NO_DROPOUT = {
    tiny_gpt2: dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    tiny_bert: dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    tiny_llama: {},
}


def entropy_of(p):
    p = p.detach().double()
    return -torch.where(p > 0, p * p.log(), 0).sum(-1)  # (B, H, Tq)


def _strict():
    """A context in which a bound violation is an error (it would contradict a theorem)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", BoundViolationWarning)
    return ctx


def _no_violations(records):
    for r in records:
        for v in VARIANTS:
            assert r[f"violations_{v}"] in (0, None), (r["name"], v)
        assert r["violations_exact"] == 0


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert, tiny_llama], ids=["gpt2", "bert", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_entropies_match_the_models_own_attention_probabilities(factory, impl, mode):
    """GPT-2 (causal), BERT (padding mask), Llama (grouped-query, rotary), eager and sdpa, train and
    eval: per-head mean and min entropy agree with -sum p log p of output_attentions to 1e-5."""
    model, inputs = factory(impl, **NO_DROPOUT[factory])
    ref_model, _ = factory("eager", **NO_DROPOUT[factory])  # same seed: the same weights
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)
    model.train(mode == "train")
    ref_model.train(mode == "train")
    with torch.no_grad():
        probs = ref_model(**inputs, output_attentions=True).attentions  # per layer (B, H, T, T)
    ctx = _strict()
    try:
        with EntropyMonitor(model, bound_samples=None) as mon:
            model(**inputs)
    finally:
        ctx.__exit__(None, None, None)
    L, H = len(probs), probs[0].shape[1]
    assert len(mon.last) == L * H
    assert [r["layer"] for r in mon.last] == [h // H for h in range(L * H)]
    assert {r["source"] for r in mon.last} == {"softmax" if impl == "eager" else "sdpa"}
    for r in mon.last:
        ent = entropy_of(probs[r["layer"]][:, r["head"]])  # (B, T)
        assert r["entropy_mean"] == pytest.approx(float(ent.mean()), abs=1e-5)
        assert r["entropy_min"] == pytest.approx(float(ent.min()), abs=1e-5)
        assert r["entropy_max"] == pytest.approx(float(ent.max()), abs=1e-5)
    _no_violations(mon.last)


@pytest.mark.parametrize("factory,names", [
    (tiny_gpt2, ["transformer.h.0.attn", "transformer.h.1.attn"]),
    (tiny_bert, ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]),
    (tiny_llama, ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
], ids=["gpt2", "bert", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_records_name_the_owning_module_and_the_weight_variants_that_apply(factory, names, impl):
    model, inputs = factory(impl)
    with EntropyMonitor(model, bound_samples=None) as mon:
        model(**inputs)
    assert [r["name"] for r in mon.last if r["head"] == 0] == names
    assert all(n in dict(model.named_modules()) for n in names)
    for r in mon.last:
        if factory is tiny_llama:  # rotary: only the exact variant
            assert "rotary" in r["weight_bound_note"]
            assert r["sigma"] is None and r["bound_theorem"] is None and r["bound_exact"] is not None
        else:
            assert r["weight_bound_note"] is None and r["sigma"] > 0
            assert r["bound_theorem"] <= r["bound_per_query"] <= r["bound_centered"] <= r["bound_exact"] + 1e-9
            assert r["bound_exact"] <= r["entropy_min"] + 1e-4
    _no_violations(mon.last)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert, tiny_llama], ids=["gpt2", "bert", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_outputs_and_gradients_are_bit_identical_with_and_without_the_monitor(factory, impl):
    model, inputs = factory(impl)  # default dropout: the monitor must not consume random numbers
    model.train()

    def run():
        torch.manual_seed(123)
        model.zero_grad()
        out = model(**inputs).last_hidden_state if factory is tiny_bert else model(**inputs).logits
        out.square().mean().backward()
        return out.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None], \
            torch.rand(3)

    y0, g0, r0 = run()
    with EntropyMonitor(model) as mon:
        y1, g1, r1 = run()
    assert len(mon.last) > 0
    assert torch.equal(y0, y1) and torch.equal(r0, r1) and len(g0) == len(g1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_a_forward_that_does_not_record_installs_nothing():
    """every=2: the second forward runs with no torch-function mode and no submodule hooks."""
    model, inputs = tiny_gpt2("sdpa")
    seen = []
    probe = model.transformer.h[0].attn
    handle = probe.register_forward_pre_hook(
        lambda m, a: seen.append((torch._C._is_torch_function_mode_enabled(),
                                  sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in model.modules()))))
    with EntropyMonitor(model, every=2) as mon:
        model(**inputs)
        model(**inputs)
        hooks_between = sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in model.modules())
    handle.remove()
    assert seen[0][0] and not seen[1][0]  # the mode is active only in the recorded forward
    assert seen[1][1] == 1 + 2  # the probe hook above, and the monitor's two root hooks
    assert hooks_between == 1 + 2
    assert not torch._C._is_torch_function_mode_enabled() and mon.last[0]["step"] == 0
    assert sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in model.modules()) == 0


@pytest.mark.parametrize("padding", [False, True])
def test_llama_grouped_query_attention_both_sdpa_layouts(padding):
    """Without a mask HF passes enable_gqa=True (2 key heads); with a padding mask it repeats the key
    heads itself: both give the eager reference."""
    model, inputs = tiny_llama("sdpa")
    ref, _ = tiny_llama("eager")
    if padding:
        mask = torch.ones_like(inputs["input_ids"])
        mask[1, 8:] = 0
        inputs["attention_mask"] = mask
    calls = []
    orig = F.scaled_dot_product_attention

    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is orig:
                calls.append((args[1].shape[1], bool((kwargs or {}).get("enable_gqa", False))))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        probs = ref(**inputs, output_attentions=True).attentions
        with EntropyMonitor(model, bound_samples=None) as mon, Spy():
            model(**inputs)
    assert calls[0] == ((2, True) if not padding else (4, False))
    for r in mon.last:
        ent = entropy_of(probs[r["layer"]][:, r["head"]])
        if padding:  # the padded rows of sample 1 still attend to earlier keys: all rows compare
            pass
        assert r["entropy_mean"] == pytest.approx(float(ent.mean()), abs=1e-5)
        assert r["entropy_min"] == pytest.approx(float(ent.min()), abs=1e-5)
    _no_violations(mon.last)


def test_xtransformers_flash_and_eager_paths_agree_and_rotary_switches_the_weight_variants_off():
    flash, inputs = tiny_xtransformer(flash=True)
    eager, _ = tiny_xtransformer(flash=False)
    eager.load_state_dict(flash.state_dict())
    recs = {}
    for name, model in (("flash", flash), ("eager", eager)):
        ctx = _strict()
        try:
            with EntropyMonitor(model, bound_samples=None) as mon:
                model(**inputs)
        finally:
            ctx.__exit__(None, None, None)
        recs[name] = mon.last
        _no_violations(mon.last)
    assert {r["source"] for r in recs["flash"]} == {"sdpa"} and {r["source"] for r in recs["eager"]} == {"softmax"}
    assert len(recs["flash"]) == len(recs["eager"]) == 2 * 4
    for a, b in zip(recs["flash"], recs["eager"]):
        assert (a["name"], a["layer"], a["head"]) == (b["name"], b["layer"], b["head"])
        assert a["entropy_mean"] == pytest.approx(b["entropy_mean"], abs=1e-5)
        assert a["entropy_min"] == pytest.approx(b["entropy_min"], abs=1e-5)
        assert a["sigma"] == pytest.approx(b["sigma"], rel=1e-9) and a["weight_bound_note"] is None
        assert a["bound_centered"] == pytest.approx(b["bound_centered"], rel=1e-6, abs=1e-9)
    rot, inputs = tiny_xtransformer(rotary_pos_emb=True)
    with EntropyMonitor(rot) as mon:
        rot(**inputs)
    assert all("rotary" in r["weight_bound_note"] and r["bound_theorem"] is None for r in mon.last)
    _no_violations(mon.last)
    qkn, inputs = tiny_xtransformer(qk_norm=True)
    with EntropyMonitor(qkn) as mon:
        qkn(**inputs)
    assert all("QK-normalisation" in r["weight_bound_note"] for r in mon.last)
    _no_violations(mon.last)


class BareSDPA(nn.Module):
    """Attention written directly on scaled_dot_product_attention, with every option exposed."""

    def __init__(self, d=12, heads=3, kv_heads=3, three_d=False):
        super().__init__()
        self.h, self.kv, self.dh, self.three_d = heads, kv_heads, d // heads, three_d
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, kv_heads * (d // heads))

    def forward(self, x, mask=None, causal=False, scale=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        if self.three_d:
            q, k = q.reshape(B * self.h, T, self.dh), k.reshape(B * self.kv, T, self.dh)
        return F.scaled_dot_product_attention(q, k, k, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=self.kv != self.h)


def _brute(q, k, scale, visible, bias=None):
    s = scale * q.double() @ k.double().transpose(-1, -2)
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~visible, -math.inf)
    return entropy_of(s.softmax(-1))


@pytest.mark.parametrize("case", ["plain", "causal_scale", "finfo_min_padding", "bias", "gqa", "three_d"])
def test_bare_sdpa_calls_against_a_float64_brute_force(case):
    torch.manual_seed(0)
    B, T, d = 2, 7, 12
    mod = BareSDPA(kv_heads=1 if case == "gqa" else 3, three_d=case == "three_d")
    x = torch.randn(B, T, d)
    kw, bias = {}, None
    visible = torch.ones(B, 1, T, T, dtype=torch.bool)
    if case == "causal_scale":
        kw = dict(causal=True, scale=0.9)
        visible = visible & torch.ones(T, T, dtype=torch.bool).tril()
    elif case == "finfo_min_padding":  # the Hugging Face convention: finfo.min, not -inf
        keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
        keep[1, ..., 4:] = False
        kw = dict(mask=torch.zeros(B, 1, 1, T).masked_fill(~keep, torch.finfo(torch.float32).min))
        visible = visible & keep
    elif case == "bias":
        bias = torch.randn(1, 3, T, T)
        kw = dict(mask=bias)
    with EntropyMonitor(mod, bound_samples=None) as mon:
        mod(x, **kw)
    with torch.no_grad():
        q = mod.q(x).view(B, T, 3, 4).transpose(1, 2)
        k = mod.k(x).view(B, T, mod.kv, 4).transpose(1, 2).repeat_interleave(3 // mod.kv, 1)
        ent = _brute(q, k, kw.get("scale") or 0.5, visible, bias)
    heads = 1 if case == "three_d" else 3
    assert len(mon.last) == heads
    for r in mon.last:
        e = ent.reshape(B * 3, 1, T)[:, 0] if case == "three_d" else ent[:, r["head"]]
        assert r["entropy_mean"] == pytest.approx(float(e.mean()), abs=1e-6)
        assert r["entropy_min"] == pytest.approx(float(e.min()), abs=1e-6)
        assert math.isfinite(r["logit_norm_max"]) and r["name"] == ""
        assert r["weight_bound_note"] is not None  # no adapter for BareSDPA: exact variant only
        assert r["violations_exact"] == 0 and r["bound_theorem"] is None
    if case == "finfo_min_padding":  # padded keys are hidden: sample 1 sees 4 keys, not 7
        assert mon.last[0]["entropy_max"] <= math.log(7) + 1e-6


def test_a_registered_adapter_enables_the_weight_variants_and_a_wrong_one_is_caught():
    from sigma_core.adapters import Projections, _heads
    torch.manual_seed(1)
    mod = BareSDPA()
    x = torch.randn(2, 6, 12)
    key = (BareSDPA.__module__, BareSDPA.__qualname__)

    def adapter(scale_error):
        def fn(module, args, kwargs):
            xa = torch.cat([args[0], args[0].new_ones(*args[0].shape[:-1], 1)], -1)
            return Projections(xa, xa, _heads(module.q.weight.T, module.q.bias, 3),
                               _heads(module.k.weight.T, module.k.bias, 3), 0.5 * scale_error)
        return fn

    try:
        register_adapter(*key, adapter(1.0))
        with EntropyMonitor(mod) as mon:
            mod(x, causal=True)
        assert all(r["weight_bound_note"] is None and r["violations_theorem"] == 0 for r in mon.last)
        register_adapter(*key, adapter(0.5))  # a wrong scale: the logits check must refuse it
        with EntropyMonitor(mod) as mon:
            mod(x, causal=True)
        assert all("differ" in r["weight_bound_note"] and r["bound_theorem"] is None for r in mon.last)
    finally:
        ADAPTERS.pop(key, None)


def test_a_failing_adapter_warns_and_never_breaks_the_forward():
    torch.manual_seed(2)
    mod = BareSDPA()
    x = torch.randn(2, 5, 12)
    key = (BareSDPA.__module__, BareSDPA.__qualname__)
    ref = mod(x)

    def broken(module, args, kwargs):
        raise KeyError("no such weight")

    try:
        register_adapter(*key, broken)
        with EntropyMonitor(mod) as mon, pytest.warns(RuntimeWarning, match="could not record.*KeyError"):
            out = mod(x)
    finally:
        ADAPTERS.pop(key, None)
    assert torch.equal(out, ref) and mon.last == []


def test_an_exception_in_the_forward_leaves_no_mode_and_no_hooks_behind():
    model, inputs = tiny_gpt2("sdpa")
    with EntropyMonitor(model) as mon:
        with pytest.raises(Exception):
            model(input_ids=inputs["input_ids"], attention_mask=torch.ones(5, 5))  # wrong shape
        assert not torch._C._is_torch_function_mode_enabled()
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 1  # only the root's
        model(**inputs)  # the monitor still works
    assert len(mon.last) == 2 * 4 and mon.last[0]["step"] == 1


@pytest.mark.parametrize("every", [1, 2])
def test_transformer_encoder_fast_path_with_a_padding_mask_never_crashes(every):
    """nn.TransformerEncoder in eval mode with a padding mask takes the nested-tensor fast path; a
    recorded forward steps off it (and records), a forward that does not record keeps it."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), num_layers=2,
                                enable_nested_tensor=True).eval()
    x = torch.randn(3, 9, 16)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 3:] = True
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
        with EntropyMonitor(enc, every=every, bound_samples=None, bound_every=1) as mon:
            outs = [enc(x, src_key_padding_mask=pad) for _ in range(2)]
    assert len(mon.last) == 2 * 4 and mon.last[0]["step"] == (1 if every == 1 else 0)
    _no_violations(mon.last)
    keep = ~pad
    for out in outs:  # padded positions are undefined (0 on the fast path): compare the real ones
        assert torch.allclose(out[keep], ref[keep], atol=1e-5)
    if every == 2:
        assert torch.equal(outs[1], ref)  # unrecorded: the fast path, bit-identical
    # sample 2 sees 3 keys: no row of it can exceed log 3
    assert all(r["entropy_min"] <= math.log(3) + 1e-6 for r in mon.last)


def test_nested_tensors_reaching_multihead_attention_are_stepped_over_with_a_warning():
    """Without the capture mode nothing steps the encoder off its nested-tensor path: the MHA hook
    then sees nested tensors, warns once and records nothing; the forward is untouched."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), num_layers=2,
                                enable_nested_tensor=True).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
        with EntropyMonitor(enc, capture=False) as mon, pytest.warns(RuntimeWarning, match="nested tensors"):
            out = enc(x, src_key_padding_mask=pad)
    assert torch.equal(out, ref) and mon.last == []


def test_torch_nn_transformer_encoder_decoder_self_and_cross_attention():
    """nn.Transformer: encoder self-attention, decoder self-attention (causal) and cross-attention,
    each recorded once (the SDPA call inside nn.MultiheadAttention is not a second layer)."""
    torch.manual_seed(0)
    tr = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                        dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with EntropyMonitor(tr, bound_samples=None) as mon:
        tr(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    names = [r["name"] for r in mon.last if r["head"] == 0]
    assert names == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                     "decoder.layers.0.multihead_attn"]
    by_name = {r["name"]: r for r in mon.last if r["head"] == 0}
    assert by_name["decoder.layers.0.multihead_attn"]["seq_len"] == 7  # keys: the encoder output
    assert by_name["decoder.layers.0.self_attn"]["entropy_max"] <= math.log(5) + 1e-6
    _no_violations(mon.last)
    assert all(r["bound_theorem"] is not None for r in mon.last)


def test_two_monitors_on_one_model_record_the_same_entropies():
    model, inputs = tiny_gpt2("sdpa")
    with EntropyMonitor(model) as outer, EntropyMonitor(model, every=2) as inner:
        model(**inputs)
    assert len(outer.last) == len(inner.last) == 2 * 4
    for a, b in zip(outer.last, inner.last):
        assert (a["name"], a["head"]) == (b["name"], b["head"])
        assert a["entropy_mean"] == pytest.approx(b["entropy_mean"], abs=1e-7)
        assert a["bound_centered"] == pytest.approx(b["bound_centered"], abs=1e-9)


def _sdpa_of(x, proj):
    """A free function (not a module method) that calls SDPA, as Hugging Face's attention helpers do."""
    B, T, _ = x.shape
    q, k, v = proj(x).view(B, T, 3, 2, -1).permute(2, 0, 3, 1, 4)  # (B, 2 heads, T, d_head) each
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)


def test_a_captured_call_is_named_by_the_innermost_module_running_it():
    """Names come from the modules with a method on the call stack: a free helper function, a helper
    method, a module called twice, and siblings that ran before the call do not confuse them."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 24)

        def forward(self, x):
            return self._inner(x)

        def _inner(self, x):  # a helper method: still this module
            return _sdpa_of(x, self.proj)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)  # runs (and returns) before the attention call
            self.attn = Attn()

        def forward(self, x):
            return x + self.attn(self.norm(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.proj = nn.Linear(8, 24)

        def forward(self, x):
            for blk in self.blocks:
                x = blk(x)
            x = self.blocks[0](x)  # the same module a second time: a new layer, same name
            return x + _sdpa_of(x, self.proj)  # the root's own call

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 5, 8)
    with EntropyMonitor(net) as mon:
        net(x)
    heads0 = [(r["layer"], r["name"]) for r in mon.last if r["head"] == 0]
    assert heads0 == [(0, "blocks.0.attn"), (1, "blocks.1.attn"), (2, "blocks.0.attn"), (3, "")]
    assert all(r["source"] == "sdpa" and r["seq_len"] == 5 for r in mon.last)


def test_the_capture_mode_is_off_inside_probe_and_mha_modules_and_back_after_them():
    """A probe-protocol attention and nn.MultiheadAttention record themselves, so the monitor leaves
    its torch-function mode while they run (no dispatch cost for their calls) and enters it again
    after: a plain SDPA module later in the same forward is still captured, in call order; an
    exception inside a probe module leaves no mode behind."""
    from sigma_core.models.gpt import CausalSelfAttention

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 24)

        def forward(self, x):
            return _sdpa_of(x, self.proj)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.probe_attn = CausalSelfAttention(8, 2)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.plain = Plain()

        def forward(self, x):
            x = x + self.probe_attn(x)
            x = x + self.mha(x, x, x, need_weights=False)[0]
            return x + self.plain(x)

    torch.manual_seed(0)
    net = Net()
    depth = {}
    for name in ("probe_attn.q_proj", "mha", "plain.proj"):
        net.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: depth.__setitem__(name, torch._C._len_torch_function_stack()))
    x = torch.randn(2, 6, 8)
    with EntropyMonitor(net) as mon:
        net(x)
        assert depth == {"probe_attn.q_proj": 0, "mha": 0, "plain.proj": 1}
        assert [(r["layer"], r["name"], r["source"]) for r in mon.last if r["head"] == 0] == [
            (0, "probe_attn", "probe"), (1, "mha", "mha"), (2, "plain", "sdpa")]
        assert not torch._C._is_torch_function_mode_enabled()

        def boom(module, args):
            raise RuntimeError("boom")

        h = net.probe_attn.o_proj.register_forward_pre_hook(boom)  # raises inside the probe module
        with pytest.raises(RuntimeError, match="boom"):
            net(x)
        h.remove()
        assert torch._C._len_torch_function_stack() == 0
        net(x)
        assert depth["plain.proj"] == 1 and [r["layer"] for r in mon.last if r["head"] == 0] == [0, 1, 2]


# -- left padding, grouped-query decoding: GPT-NeoX, Mistral, Qwen2, Gemma2 -------------------------
CAUSAL_LMS = [(tiny_gpt_neox, "eager"), (tiny_gpt_neox, "sdpa"), (tiny_mistral, "eager"), (tiny_mistral, "sdpa"),
              (tiny_qwen2, "eager"), (tiny_qwen2, "sdpa"), (tiny_gemma2, "eager")]  # Gemma2: eager only in HF


def _left_padded(inputs, pad=(0, 3)):
    """An attention mask with the first ``pad[b]`` positions of sample ``b`` padded."""
    mask = torch.ones_like(inputs["input_ids"])
    for b, p in enumerate(pad):
        mask[b, :p] = 0
    return {**inputs, "attention_mask": mask}


@pytest.mark.parametrize("factory,impl", CAUSAL_LMS, ids=[f"{f.__name__[5:]}-{i}" for f, i in CAUSAL_LMS])
def test_left_padding_skips_and_counts_the_rows_that_see_no_key_and_records_the_rest(factory, impl):
    """A left-padded row of a causal model sees no key in its first positions: those rows are
    skipped and counted (``rows_no_key``), every other row is recorded on every forward and
    agrees with a float64 entropy of the model's own attention probabilities over the rows that
    see keys (eager reference, same weights)."""
    model, inputs = factory(impl)
    ref, _ = factory("eager")
    model.eval(), ref.eval()
    inputs = _left_padded(inputs)
    seen = inputs["attention_mask"].bool()  # (B, T): a left-padded query row sees a key iff it is not padding
    with torch.no_grad():
        probs = ref(**inputs, output_attentions=True).attentions
        ctx = _strict()
        try:
            with EntropyMonitor(model, bound_samples=None, bound_every=1) as mon:
                for step in range(2):  # the second forward too: nothing dropped silently
                    model(**inputs)
                    assert len(mon.last) == len(probs) * 4 and mon.skipped == [], (step, mon.skipped)
        finally:
            ctx.__exit__(None, None, None)
    assert mon.n_skipped == 0 and mon.last[0]["step"] == 1
    for r in mon.last:
        ent = entropy_of(probs[r["layer"]][:, r["head"]])[seen]  # the rows that see keys
        assert r["rows_no_key"] == 3 and r["n_rows"] == int(seen.sum())
        assert r["entropy_mean"] == pytest.approx(float(ent.mean()), abs=1e-5)
        assert r["entropy_min"] == pytest.approx(float(ent.min()), abs=1e-5)
        assert r["entropy_max"] == pytest.approx(float(ent.max()), abs=1e-5)
        assert r["bound_rows"] == int(seen.sum()) and r["bound_exact"] <= r["entropy_min"] + 1e-4
    _no_violations(mon.last)


def test_a_head_whose_every_row_is_padding_is_recorded_as_empty_and_the_detector_passes_it_by():
    """A batch of one fully padded query row: the record says 0 rows measured, 1 with no key,
    and None entropies (never a number made up), and CollapseDetector ignores it."""
    from sigma_core.monitor import CollapseDetector
    mod = BareSDPA()
    x = torch.randn(1, 3, 12)
    keep = torch.tensor([[True, True, True], [False, False, False], [True, False, True]]).view(1, 1, 3, 3)
    with EntropyMonitor(mod, bound_every=1, detector=CollapseDetector()) as mon:
        mod(x, mask=keep)
    assert len(mon.last) == 3 and mon.events == []
    for r in mon.last:
        assert (r["n_rows"], r["rows_no_key"], r["bound_rows"]) == (2, 1, 2) and r["entropy_min"] is not None
    with EntropyMonitor(mod, bound_every=1, detector=CollapseDetector()) as mon:
        mod(x[:, :1], mask=keep[..., 1:2, :1])  # one query row, its only key hidden
    assert all(r["n_rows"] == 0 and r["rows_no_key"] == 1 and r["entropy_mean"] is None
               and r["bound_exact"] is None and r["violations_exact"] == 0 for r in mon.last)
    assert mon.events == []


@pytest.mark.parametrize("factory", [tiny_mistral, tiny_qwen2], ids=["mistral", "qwen2"])
def test_grouped_query_decoding_with_a_cache_and_a_mask_is_recorded_by_query_head(factory):
    """One cached decoding step with a padding mask: transformers packs the 2 query heads sharing
    each key head into the query axis; the monitor records the 4 query heads, one row per sample,
    each equal to the eager model's own attention probabilities (Mistral: over its sliding-window
    cache of 6 keys)."""
    model, inputs = factory("sdpa")
    ref, _ = factory("eager")
    model.eval(), ref.eval()
    inputs = _left_padded(inputs)
    step = {"input_ids": torch.tensor([[5], [7]]),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        ref_cache = ref(**inputs, use_cache=True).past_key_values
        probs = ref(**step, past_key_values=ref_cache, output_attentions=True).attentions  # (B, 4, 1, T + 1)
        with EntropyMonitor(model, bound_samples=None, bound_every=1) as mon:
            model(**step, past_key_values=cache)
    assert [(r["layer"], r["head"]) for r in mon.last] == [(i, h) for i in range(2) for h in range(4)]
    for r in mon.last:
        assert (r["n_rows"], r["seq_len"], r["rows_no_key"]) == (2, probs[r["layer"]].shape[-1], 0)
        ent = entropy_of(probs[r["layer"]][:, r["head"]])
        assert r["entropy_mean"] == pytest.approx(float(ent.mean()), abs=1e-5)
        assert r["entropy_min"] == pytest.approx(float(ent.min()), abs=1e-5)
    _no_violations(mon.last)


# -- padding in the encoder-decoders: T5, BART ------------------------------------------------------
SEQ2SEQ = [(tiny_t5, "eager"), (tiny_t5, "sdpa"), (tiny_bart, "eager"), (tiny_bart, "sdpa")]


@pytest.mark.parametrize("factory,impl", SEQ2SEQ, ids=[f"{f.__name__[5:]}-{i}" for f, i in SEQ2SEQ])
def test_encoder_decoder_padding_in_self_and_cross_attention(factory, impl):
    """T5 and BART with a right-padded encoder input (sample 1: its last 4 tokens) and a left-padded
    decoder input (sample 1: its first 3): every layer (encoder self, decoder causal self, cross)
    is recorded; the padded keys get probability 0 in the model's own attention; each head's
    entropies equal a float64 entropy of ``output_attentions`` over the rows that see at least one
    key (the decoder's first 3 rows of sample 1 see none: skipped and counted in ``rows_no_key``)."""
    model, inputs = factory(impl)
    ref, _ = factory("eager")
    model.eval(), ref.eval()
    B, T = inputs["input_ids"].shape
    Td = inputs["decoder_input_ids"].shape[1]
    enc = torch.ones(B, T, dtype=torch.bool)
    enc[1, T - 4:] = False
    dec = torch.ones(B, Td, dtype=torch.bool)
    dec[1, :3] = False
    inputs = {**inputs, "attention_mask": enc.long(), "decoder_attention_mask": dec.long()}
    causal = torch.ones(Td, Td, dtype=torch.bool).tril()
    visible = {"encoder": enc[:, None, :].expand(B, T, T),  # (B, Tq, Tk): query row i may see key j
               "decoder": causal[None] & dec[:, None, :],
               "cross": enc[:, None, :].expand(B, Td, T)}
    with torch.no_grad():
        out = ref(**inputs, output_attentions=True)
        kinds = ["encoder"] * len(out.encoder_attentions) + ["decoder", "cross"] * len(out.decoder_attentions)
        probs = _probs_in_call_order(out)
        ctx = _strict()
        try:
            with EntropyMonitor(model, bound_samples=None, bound_every=1) as mon:
                model(**inputs)
        finally:
            ctx.__exit__(None, None, None)
    H = probs[0].shape[1]
    assert len(mon.last) == len(probs) * H and mon.skipped == [] and mon.n_skipped == 0
    for r in mon.last:
        vis = visible[kinds[r["layer"]]]
        seen = vis.any(-1)  # (B, Tq): rows that see at least one key
        p = probs[r["layer"]][:, r["head"]].double()  # (B, Tq, Tk)
        assert p.shape == vis.shape and float(p[seen[..., None] & ~vis].abs().max()) == 0.0, r["name"]
        ent = entropy_of(torch.where(vis, p, 0))[seen]
        assert r["rows_no_key"] == int((~seen).sum()) == (3 if kinds[r["layer"]] == "decoder" else 0), r["name"]
        assert r["n_rows"] == int(seen.sum()) and r["seq_len"] == vis.shape[-1]
        assert r["entropy_mean"] == pytest.approx(float(ent.mean()), abs=1e-5), r["name"]
        assert r["entropy_min"] == pytest.approx(float(ent.min()), abs=1e-5), r["name"]
        assert r["entropy_max"] == pytest.approx(float(ent.max()), abs=1e-5), r["name"]
    _no_violations(mon.last)


# -- torch.compile ----------------------------------------------------------------------------------
class _CountingBackend:
    """A torch.compile backend that runs the graph eagerly and counts compilations and graph runs."""

    def __init__(self):
        self.compiled = self.runs = 0

    def __call__(self, gm, example_inputs):
        self.compiled += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)
        return run


def _encoder_layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0), {"src": torch.randn(2, 5, 16)}


COMPILED = [(tiny_gpt2, "before"), (tiny_mistral, "after"), (tiny_bart, "wrapper"), (_encoder_layer, "inplace")]


@pytest.mark.parametrize("factory,how", COMPILED, ids=[f"{f.__name__.strip('_')}-{h}" for f, h in COMPILED])
def test_a_compiled_model_records_what_the_eager_model_records_and_runs_its_graph_otherwise(factory, how):
    """GPT-2 compiled and run before the monitor is attached, Mistral compiled after (the wrapper is
    found at its first forward: that one is skipped, counted and warned), BART passed compiled,
    nn.TransformerEncoderLayer compiled in place in eval mode under no_grad: every recorded forward
    gives the eager model's records (it runs eagerly), the forwards in between run the compiled
    graph, outputs are unchanged, and nothing is dropped without being counted."""
    torch._dynamo.reset()
    model, inputs = factory("sdpa") if factory is not _encoder_layer else factory()
    model.eval()
    with torch.no_grad():
        y_ref = model(**inputs)
        y_ref = y_ref if isinstance(y_ref, torch.Tensor) else y_ref.logits
        with EntropyMonitor(model) as mon:
            model(**inputs)
        ref = [(r["name"], r["head"], r["entropy_mean"], r["entropy_min"]) for r in mon.last]
        backend = _CountingBackend()
        if how == "before":
            compiled = torch.compile(model, backend=backend)
            compiled(**inputs)
            mon = EntropyMonitor(model, every=2)
        elif how == "after":
            mon = EntropyMonitor(model, every=2)
            compiled = torch.compile(model, backend=backend)
        elif how == "wrapper":
            compiled = torch.compile(model, backend=backend)
            mon = EntropyMonitor(compiled, every=2)
        else:
            model.compile(backend=backend)
            compiled = model
            mon = EntropyMonitor(model, every=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, outs = [], []
            for step in range(5):
                runs = backend.runs
                y = compiled(**inputs)
                outs.append(y if isinstance(y, torch.Tensor) else y.logits)
                got.append([(r["name"], r["head"], r["entropy_mean"], r["entropy_min"]) for r in mon.last])
                if step % 2 == 1:
                    assert backend.runs > runs, step  # a forward that does not record runs the graph
        mon.close()
    assert backend.compiled >= 1
    for y in outs:
        assert torch.allclose(y, y_ref, atol=1e-5)
    msgs = [str(w.message) for w in caught if "EntropyMonitor" in str(w.message)]
    first = 0
    if how == "after":  # the compiled wrapper did not exist when the monitor was attached
        assert got[0] == [] and mon.n_skipped == 1 and len(msgs) == 1 and "torch.compile" in msgs[0]
        first = 2
    else:
        assert mon.n_skipped == 0 and msgs == []
    for step in range(first, 5, 2):
        assert [g[:2] for g in got[step]] == [r[:2] for r in ref], step
        for g, r in zip(got[step], ref):
            assert g[2] == pytest.approx(r[2], abs=1e-6) and g[3] == pytest.approx(r[3], abs=1e-6)
    if factory is _encoder_layer:
        assert model.__dict__.get("_compiled_call_impl") is not None  # close() gave model.compile() back
        assert "CompiledForwards" not in getattr(model._compiled_call_impl, "__qualname__", "")


def _cxx_compiler():
    import shutil

    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


@pytest.mark.skipif(_cxx_compiler() is None, reason="torch.compile's default backend (inductor) needs a C++ "
                    "compiler on CPU; none found (CXX, g++, c++, clang++)")
@pytest.mark.slow
def test_inductor_a_converted_model_compiled_matches_eager_and_the_monitor_records_around_the_graph():
    """The default backend (inductor, C++ on CPU), cold: a sigmaReparam-converted attention module
    (causal SDPA, eval, ``no_grad``) compiled gives the eager outputs to float tolerance; with the
    monitor attached (``every=2``) the recorded forwards give the eager model's records exactly as
    eager does, the others run the inductor graph, and nothing is skipped."""
    from torch._dynamo.utils import counters

    from sigma_core.reparam import convert_to_sigma_reparam

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    mod = convert_to_sigma_reparam(BareSDPA()).eval()
    x = torch.randn(2, 6, 12)
    with torch.no_grad():
        y_ref = mod(x, causal=True)
        with EntropyMonitor(mod) as mon:
            mod(x, causal=True)
        ref = [(r["name"], r["head"], r["entropy_mean"], r["entropy_min"]) for r in mon.last]
        compiled = torch.compile(mod)  # default backend: inductor
        torch.testing.assert_close(compiled(x, causal=True), y_ref, rtol=1e-5, atol=1e-6)
        assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with EntropyMonitor(mod, every=2) as mon:
                got = []
                for step in range(4):
                    torch.testing.assert_close(compiled(x, causal=True), y_ref, rtol=1e-5, atol=1e-6)
                    got.append([(r["name"], r["head"], r["entropy_mean"], r["entropy_min"]) for r in mon.last])
    assert mon.n_skipped == 0 and not [w for w in caught if "EntropyMonitor" in str(w.message)]
    assert len(ref) == 3 and got[0] == got[1] and got[2] == got[3]  # steps 1, 3 record nothing new
    for step in (0, 2):
        assert [g[:2] for g in got[step]] == [r[:2] for r in ref]
        for g, r in zip(got[step], ref):
            assert g[2] == pytest.approx(r[2], abs=1e-6) and g[3] == pytest.approx(r[3], abs=1e-6)


def test_inside_a_compiled_function_each_recorded_forward_is_skipped_counted_and_warned():
    """A model called from a torch.compile'd function (no compiled module to hook): the monitor
    records nothing there, says so on every recorded forward (``skipped``, ``n_skipped``) and
    warns once with what to do; under ``torch.compiler.set_stance("force_eager")`` it records."""
    torch._dynamo.reset()
    model, inputs = _encoder_layer()
    model.eval()
    step = torch.compile(lambda x: model(x).sum(), backend="eager")
    with EntropyMonitor(model) as mon, torch.no_grad():
        with pytest.warns(RuntimeWarning, match="set_stance"):
            step(inputs["src"])
        step(inputs["src"])
        assert mon.last == [] and mon.n_skipped == 2 and "torch.compile" in mon.skipped[0]["reason"]
        with torch.compiler.set_stance("force_eager"):
            step(inputs["src"])
        assert len(mon.last) == 4 and mon.skipped == [] and mon.n_skipped == 2


# -- flex_attention ---------------------------------------------------------------------------------
def test_flex_attention_calls_are_counted_and_warned_and_the_documented_workaround_records():
    """flex_attention (a bare module, and Hugging Face attn_implementation="flex_attention") is not
    measured: every call is counted in ``skipped`` on every recorded forward, one warning says what
    to do, the output is unchanged; switching the HF model to sdpa (same weights) records it."""
    from torch.nn.attention.flex_attention import flex_attention

    class Flex(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)  # (B, 2, T, 4) each
            return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: torch.where(i >= j, s, -math.inf))

    torch.manual_seed(0)
    mod, x = Flex(), torch.randn(2, 6, 8)
    with torch.no_grad():  # flex_attention has no CPU backward
        ref = mod(x)
        with EntropyMonitor(mod) as mon:
            with pytest.warns(RuntimeWarning, match="flex_attention calls are not recorded"):
                y = mod(x)
            assert torch.equal(y, ref) and mon.last == [] and len(mon.skipped) == 1
            mod(x)
            assert mon.n_skipped == 2 and "flex_attention" in mon.skipped[0]["reason"]
        model, inputs = tiny_llama("flex_attention")
        with EntropyMonitor(model) as mon:
            with pytest.warns(RuntimeWarning, match="set_attn_implementation"):
                model(**inputs)
            assert mon.last == [] and len(mon.skipped) == 2  # one per layer
            model.set_attn_implementation("sdpa")
            model(**inputs)
        assert len(mon.last) == 2 * 4 and mon.skipped == [] and {r["source"] for r in mon.last} == {"sdpa"}


# -- the nine families of the compatibility matrix (docs/monitor.md) --------------------------------
FAMILIES = [(tiny_t5, "eager"), (tiny_t5, "sdpa"), (tiny_gpt_neox, "eager"), (tiny_gpt_neox, "sdpa"),
            (tiny_mistral, "eager"), (tiny_mistral, "sdpa"), (tiny_qwen2, "eager"), (tiny_qwen2, "sdpa"),
            (tiny_gemma2, "eager"), (tiny_vit, "eager"), (tiny_vit, "sdpa"), (tiny_whisper, "eager"),
            (tiny_whisper, "sdpa"), (tiny_bart, "eager"), (tiny_bart, "sdpa"), (tiny_distilbert, "eager"),
            (tiny_distilbert, "sdpa")]


def _probs_in_call_order(out):
    """The model's own attention probabilities, in the order its attention layers run: the encoder,
    then each decoder layer's self- and cross-attention."""
    if getattr(out, "cross_attentions", None):
        enc = list(out.encoder_attentions)
        dec = [p for pair in zip(out.decoder_attentions, out.cross_attentions) for p in pair]
        return enc + dec
    return list(out.attentions)


@pytest.mark.parametrize("factory,impl", FAMILIES, ids=[f"{f.__name__[5:]}-{i}" for f, i in FAMILIES])
def test_nine_families_match_their_own_attention_probabilities_and_a_reloaded_model_records_the_same(
        factory, impl):
    """T5, GPT-NeoX, Mistral, Qwen2, Gemma2, ViT, Whisper, BART, DistilBERT (padding where the
    factory pads): every attention layer (self and cross) recorded once per forward, per-head
    entropies equal to a float64 entropy of ``output_attentions`` to 1e-5, no bound violation; the
    monitor on a copy rebuilt from the state_dict (other initial weights, then loaded) records the
    same."""
    model, inputs = factory(impl)
    ref, _ = factory("eager")
    model.eval(), ref.eval()
    with torch.no_grad():
        probs = _probs_in_call_order(ref(**inputs, output_attentions=True))
        ctx = _strict()
        try:
            with EntropyMonitor(model, bound_samples=None, bound_every=1) as mon:
                model(**inputs)
        finally:
            ctx.__exit__(None, None, None)
        H = probs[0].shape[1]
        assert len(mon.last) == len(probs) * H and mon.skipped == []
        assert [r["layer"] for r in mon.last] == [i // H for i in range(len(probs) * H)]
        for r in mon.last:
            ent = entropy_of(probs[r["layer"]][:, r["head"]])
            assert r["seq_len"] == probs[r["layer"]].shape[-1] and r["rows_no_key"] == 0
            assert r["entropy_mean"] == pytest.approx(float(ent.mean()), abs=1e-5), r["name"]
            assert r["entropy_min"] == pytest.approx(float(ent.min()), abs=1e-5), r["name"]
        _no_violations(mon.last)
        reloaded, _ = factory(impl, seed=1)
        reloaded.eval()
        reloaded.load_state_dict(model.state_dict())
        with EntropyMonitor(reloaded, bound_samples=None, bound_every=1) as mon2:
            reloaded(**inputs)
    assert [(r["name"], r["head"]) for r in mon2.last] == [(r["name"], r["head"]) for r in mon.last]
    for a, b in zip(mon.last, mon2.last):
        assert a["entropy_mean"] == pytest.approx(b["entropy_mean"], abs=1e-7)
        assert a["bound_exact"] == pytest.approx(b["bound_exact"], abs=1e-7)
