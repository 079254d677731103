"""EntropyMonitor: hooks leave outputs bit-identical, records match direct measurement, bounds hold."""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.monitor import BoundViolationWarning, CollapseDetector, EntropyMonitor
from sigma_core.probe import AttentionProbe, probe_active


class TinyProbeAttention(nn.Module):
    """Minimal module following the probe protocol of sigma_core.probe (bias-free q/k/v)."""

    def __init__(self, d=8, n_head=2, causal=True, lie=1.0):
        super().__init__()
        self.n_head, self.d_head, self.causal = n_head, d // n_head, causal
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.probe = AttentionProbe()
        self.lie = lie  # head_weights() scaled by this: != 1 breaks the protocol on purpose
        self.last_probs = None

    def head_weights(self):
        d = self.qkv.in_features
        w = self.qkv.weight.T  # (d, 3d)
        w_q = w[:, :d].reshape(d, self.n_head, self.d_head).permute(1, 0, 2)
        w_k = w[:, d:2 * d].reshape(d, self.n_head, self.d_head).permute(1, 0, 2)
        return w_q * self.lie, w_k

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in self.qkv(x).split(C, -1))
        if probe_active(self.probe):
            self.probe(x, q, k)
        s = (q @ k.transpose(-1, -2)) * self.scale
        if self.causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
        p = s.softmax(-1)
        self.last_probs = p.detach()
        return x + (p @ v).transpose(1, 2).reshape(B, T, C)


def tiny_model(n_layer=2, causal=True, lie=1.0):
    return nn.Sequential(*[TinyProbeAttention(causal=causal, lie=lie) for _ in range(n_layer)])


def entropy_of(p):
    p = p.detach()
    return -torch.where(p > 0, p * p.log(), 0).sum(-1)


def test_probe_records_match_direct_entropy_and_bounds_hold():
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randn(3, 10, 8)
    with EntropyMonitor(model) as mon:
        model(x)
    assert len(mon.last) == 2 * 2
    for rec in mon.last:
        ent = entropy_of(model[rec["layer"]].last_probs[:, rec["head"]])  # (B, T)
        assert rec["entropy_mean"] == pytest.approx(float(ent.mean()), abs=1e-5)
        assert rec["entropy_min"] == pytest.approx(float(ent.min()), abs=1e-5)
        assert rec["entropy_mean_half"] == pytest.approx(float(ent[:, 4:].mean()), abs=1e-5)  # T_i >= 5
        assert rec["step"] == 0 and rec["seq_len"] == 10
        for v in ("theorem", "per_query", "centered", "exact"):
            assert rec[f"violations_{v}"] == 0
        assert rec["bound_theorem"] <= rec["bound_per_query"] <= rec["bound_centered"] <= rec["bound_exact"] + 1e-9
        assert rec["bound_exact"] <= rec["entropy_min"] + 1e-4


def test_a_wrong_bound_is_reported_loudly():
    """If head_weights() understates sigma the weight-based bounds break: the monitor must say so."""
    torch.manual_seed(0)
    model = tiny_model(lie=1e-3)
    with torch.no_grad():
        model[0].qkv.weight.mul_(4)
    with EntropyMonitor(model) as mon, pytest.warns(BoundViolationWarning, match="violated"):
        model(torch.randn(2, 12, 8))
    assert any(r["violations_theorem"] > 0 for r in mon.last)
    assert all(r["violations_exact"] == 0 for r in mon.last)


def test_hooks_leave_outputs_and_gradients_bit_identical():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, dropout=0.1, batch_first=True)
    x = torch.randn(4, 9, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(9)

    def run():
        torch.manual_seed(123)  # same dropout masks
        layer.zero_grad()
        y = layer(x, src_mask=mask, is_causal=True)
        y.square().sum().backward()
        return y.detach().clone(), [p.grad.clone() for p in layer.parameters()]

    y0, g0 = run()
    with EntropyMonitor(layer) as mon:
        y1, g1 = run()
    assert len(mon.last) == 4
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    y2, _ = run()  # closed: hooks gone
    assert torch.equal(y0, y2) and not layer.self_attn._forward_pre_hooks


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal_bool", "causal_float_kwargs", "padding", "per_head"])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_records_match_its_own_attention_weights(batch_first, masks, bias):
    torch.manual_seed(1)
    E, H, N, L = 12, 3, 2, 7
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=bias)
    x = torch.randn(N, L, E)
    inp = x if batch_first else x.transpose(0, 1)
    kwargs = {}
    if masks == "causal_bool":
        kwargs["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    elif masks == "causal_float_kwargs":
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(L), is_causal=True)
    elif masks == "padding":
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[0, 4:] = True
        kwargs["key_padding_mask"] = kpm
    elif masks == "per_head":
        am = torch.rand(N * H, L, L) < 0.4
        am[..., 0] = False
        kwargs["attn_mask"] = am
    with EntropyMonitor(mha, bound_samples=None) as mon:
        _, w = mha(inp, inp, inp, need_weights=True, average_attn_weights=False, **kwargs)  # w: (N, H, L, L)
    ent = entropy_of(w)
    for rec in mon.last:
        assert rec["entropy_mean"] == pytest.approx(float(ent[:, rec["head"]].mean()), abs=1e-5)
        assert rec["entropy_min"] == pytest.approx(float(ent[:, rec["head"]].min()), abs=1e-5)
        for v in ("theorem", "per_query", "centered", "exact"):
            assert rec[f"violations_{v}"] == 0, v


def test_mha_cross_attention_with_kdim_vdim_and_unbatched_input():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    q_in, k_in, v_in = torch.randn(4, 8), torch.randn(6, 5), torch.randn(6, 3)  # unbatched (L, E)
    with EntropyMonitor(mha) as mon:
        _, w = mha(q_in, k_in, v_in, average_attn_weights=False)  # (H, L, S)
    ent = entropy_of(w)
    assert len(mon.last) == 2
    for rec in mon.last:
        assert rec["entropy_mean"] == pytest.approx(float(ent[rec["head"]].mean()), abs=1e-5)
        assert rec["seq_len"] == 6 and rec["violations_theorem"] == 0 and rec["violations_centered"] == 0


def test_additive_bias_mask_keeps_only_the_exact_variant():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    bias = torch.randn(5, 5)
    with EntropyMonitor(mha) as mon:
        _, w = mha(x, x, x, attn_mask=bias, average_attn_weights=False)
    for rec in mon.last:
        assert rec["bound_theorem"] is None and rec["violations_exact"] == 0
        assert rec["entropy_mean"] == pytest.approx(float(entropy_of(w)[:, rec["head"]].mean()), abs=1e-5)


def test_every_counts_model_forwards_and_jsonl_holds_only_recorded_steps(tmp_path):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), num_layers=3,
                                enable_nested_tensor=False)
    path = tmp_path / "ent.jsonl"
    x = torch.randn(5, 2, 8)
    with EntropyMonitor(enc, every=3, path=path) as mon:
        steps = []
        for _ in range(7):
            enc(x)
            steps.append(sorted({r["step"] for r in mon.last}))
    assert steps == [[0], [0], [0], [3], [3], [3], [6]]
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert len(lines) == 3 * 3 * 2  # 3 recorded steps x 3 layers x 2 heads
    assert sorted({r["layer"] for r in lines}) == [0, 1, 2]
    assert len(mon.last) == 3 * 2


def test_zero_violations_after_training_with_a_large_learning_rate():
    torch.manual_seed(0)
    model = tiny_model(n_layer=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(8, 16, 8)
    target = torch.randn(8, 16, 8)
    det = CollapseDetector()
    with EntropyMonitor(model, every=5, detector=det, bound_every=1) as mon:
        for _ in range(40):
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert all(r[f"violations_{v}"] == 0 for r in mon.last
                       for v in ("theorem", "per_query", "centered", "exact"))
    assert max(r["sigma"] for r in mon.last) > 0


def _records(step, values, T=64):
    return [{"layer": 0, "head": h, "step": step, "seq_len": T, "entropy_mean": v, "entropy_mean_half": v}
            for h, v in enumerate(values)]


def test_detector_fires_on_a_constructed_collapse_and_not_on_a_healthy_run():
    torch.manual_seed(0)
    model = tiny_model(n_layer=1, causal=False)
    x = torch.randn(4, 32, 8)
    det = CollapseDetector(fraction=0.1)
    events = []
    with EntropyMonitor(model, detector=det) as mon:
        for _ in range(3):  # healthy: small random weights, entropy near log T
            model(x)
            events += mon.events
        assert events == []
        with torch.no_grad():  # constructed collapse: blow up head 1's query weights
            model[0].qkv.weight[6:8].mul_(300.0)
            model[0].qkv.weight[8 + 6:8 + 8].mul_(300.0)
        model(x)
        events = mon.events
    assert [(e["layer"], e["head"], e["reason"], e["step"]) for e in events] == [(0, 1, "low_entropy", 3)]
    assert events[0]["entropy"] < 0.1 * math.log(32)


def test_detector_drop_rule_and_refiring_after_recovery():
    det = CollapseDetector(fraction=0.05, drop_nats=1.5, window=3)
    assert det.update(_records(0, [4.0, 4.0])) == []
    assert det.update(_records(1, [3.5, 3.9])) == []
    assert [(e["head"], e["reason"]) for e in det.update(_records(2, [2.0, 3.8]))] == [(0, "drop")]
    assert det.update(_records(3, [1.9, 3.8])) == []  # still below: no repeat
    ev = det.update(_records(4, [0.1, 3.8]))
    assert [(e["head"], e["reason"]) for e in ev] == [(0, "low_entropy")]
    det.update(_records(5, [4.0, 3.8]))  # recovered
    assert [e["reason"] for e in det.update(_records(6, [0.1, 3.8]))] == ["low_entropy", "drop"]


def test_monitor_rejects_models_without_attention_and_bad_arguments():
    with pytest.raises(ValueError, match="no supported attention"):
        EntropyMonitor(nn.Linear(3, 3), capture=False)
    lin = nn.Linear(3, 3)
    with EntropyMonitor(lin) as mon, pytest.warns(RuntimeWarning, match="no attention call"):
        lin(torch.randn(2, 3))  # nothing to see: a warning, not an error, and no records
    assert mon.last == []
    with pytest.raises(ValueError, match="every"):
        EntropyMonitor(tiny_model(), every=0)
    with pytest.raises(ValueError, match="fraction"):
        CollapseDetector(fraction=1.5)


def test_project_gpt_is_observed_without_changing_its_output():
    model_mod = pytest.importorskip("sigma_core.models.gpt")
    torch.manual_seed(0)
    cfg = model_mod.ModelConfig(d_model=32, n_layer=2, n_head=4, block_size=16)
    gpt = model_mod.GPT(cfg)
    idx = torch.randint(0, 256, (3, 16))
    ref = gpt(idx)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", BoundViolationWarning)
        with EntropyMonitor(gpt) as mon:
            out = gpt(idx)[0]
    assert torch.equal(ref, out)
    assert len(mon.last) == 2 * 4
    assert {r["name"] for r in mon.last} == {n for n, m in gpt.named_modules() if hasattr(m, "probe")}
    assert all(r["violations_centered"] == 0 and r["violations_exact"] == 0 for r in mon.last)
    assert all(0 <= r["entropy_min"] <= r["entropy_mean"] <= math.log(16) + 1e-5 for r in mon.last)


def test_non_finite_queries_are_skipped_with_a_warning_not_an_exception():
    """A diverging model (inf/NaN activations) must not crash the forward: the monitor warns,
    records nothing for that step, and the training loop reports the divergence."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with EntropyMonitor(mha) as mon:
        mha(x, x, x)
        assert len(mon.last) == 2  # healthy forward: one record per head
        bad = x.clone()
        bad[0, 1, 3] = math.inf
        with pytest.warns(RuntimeWarning, match="non-finite queries or keys"):
            out, _ = mha(bad, bad, bad)
        assert mon.last == []
        assert torch.isnan(out).any()  # the output is the model's own business, unchanged


def test_non_finite_queries_on_the_fused_path_are_skipped_with_a_warning():
    """The probe path (fused entropy pass) sees inf/NaN queries: a warning, no records, no crash."""
    torch.manual_seed(0)
    model = tiny_model(n_layer=1)
    x = torch.randn(2, 6, 8)
    x[1, 2, 0] = math.inf
    with EntropyMonitor(model) as mon, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(x)
    assert mon.last == []
    messages = [str(w.message) for w in seen]
    assert any("non-finite queries or keys" in m for m in messages)
    assert not any("no attention call" in m for m in messages)  # it did see one


def _overflow_case(kind, T=6):
    """(model, forward) of an attention whose logits overflow their float32 norm for large inputs:
    the probe protocol (fused entropy pass, causal, two layers), nn.MultiheadAttention without a
    mask, and with a causal mask (blocked pass)."""
    if kind == "probe":
        model = tiny_model()
        return model, model
    model = nn.MultiheadAttention(8, 2, batch_first=True)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if kind == "mha-masked" else None
    return model, lambda x: model(x, x, x, attn_mask=mask, need_weights=False)[0]


def strict_monitor_warnings():
    """Make the monitor's warnings errors (not others': the first build of the native kernel warns)."""
    warnings.filterwarnings("error", message="EntropyMonitor")
    warnings.filterwarnings("error", category=BoundViolationWarning)


def _record_strictly(model, forward, x, **kw):
    """The records of one forward, which must give no warning and skip nothing."""
    with warnings.catch_warnings():
        strict_monitor_warnings()  # no skipped call, no failed record, no bound violation
        with EntropyMonitor(model, bound_samples=None, **kw) as mon:
            out = forward(x)
    assert torch.isfinite(out).all()
    assert mon.skipped == [] and mon.n_skipped == 0
    return mon.last


@pytest.mark.parametrize("kind", ["probe", "mha", "mha-masked"])
def test_an_overflowing_logit_norm_keeps_every_record_and_counts_the_rows_left_unchecked(kind, tmp_path):
    """Issue 24: a diverging model can overflow its logits' centred norm while its queries, keys
    and output stay finite.  Sample 0's inputs scaled by 1e12 give logits of ~1e24 whose squares
    pass the largest float32 (3.4e38): those rows have no bound.  Every layer and head keeps its
    record (also in the JSONL file, as standard JSON), the ordinary sample's rows are checked
    exactly as when it runs alone, and the rows left out are counted in ``rows_nonfinite``."""
    from sigma_core.entropy import VARIANTS

    T = 6
    torch.manual_seed(0)
    model, forward = _overflow_case(kind, T)
    x = torch.randn(2, T, 8)
    big = x.clone()
    big[0] *= 1e12
    alone = _record_strictly(model, forward, x[1:])
    recs = _record_strictly(model, forward, big, path=tmp_path / "records.jsonl")
    assert [(r["layer"], r["head"]) for r in recs] == [(r["layer"], r["head"]) for r in alone]
    assert len(recs) == (4 if kind == "probe" else 2)
    for r, a in zip(recs, alone):
        assert (a["bound_rows"], a["rows_nonfinite"]) == (T, 0)
        assert r["n_rows"] == r["bound_rows"] + r["rows_nonfinite"] == 2 * T
        # sample 0's rows; its first row in a causal model sees one key (centred norm 0) and may stay
        assert T - 1 <= r["rows_nonfinite"] <= T
        assert r["logit_norm_max"] == pytest.approx(a["logit_norm_max"], rel=1e-5)
        for v in VARIANTS:
            assert r[f"violations_{v}"] == 0
            assert r[f"bound_{v}"] == pytest.approx(a[f"bound_{v}"], rel=1e-5, abs=1e-9), v
    json.dumps(recs, allow_nan=False)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == recs
    # what the loggers show (sigma_core.sinks.record_scalars): the rows left out, only when there are some
    from sigma_core.sinks import record_scalars

    assert record_scalars(recs)["rows_nonfinite"] == sum(r["rows_nonfinite"] for r in recs)
    assert "rows_nonfinite" not in record_scalars(alone)


def test_a_head_with_no_finite_logit_norm_has_no_bound_and_zero_violations():
    """Every checked row overflows (non-causal, the one checked sample scaled by 1e12): the record
    stays, with ``None`` for ``logit_norm_max`` and every ``bound_*``, 0 violations and every row
    counted in ``rows_nonfinite``; a forward that does not check the bound counts none."""
    from sigma_core.entropy import VARIANTS

    torch.manual_seed(0)
    model = tiny_model(n_layer=1, causal=False)
    x = torch.randn(2, 6, 8)
    x[0] *= 1e12
    with warnings.catch_warnings():
        strict_monitor_warnings()
        with EntropyMonitor(model, bound_samples=1, bound_every=2) as mon:
            model(x)
            checked = mon.last
            model(x)
            unchecked = mon.last
    assert len(checked) == len(unchecked) == 2
    for r in checked:
        assert (r["n_rows"], r["bound_rows"], r["rows_nonfinite"]) == (12, 0, 6)
        assert r["logit_norm_max"] is None and r["entropy_min"] is not None
        assert all(r[f"bound_{v}"] is None and r[f"violations_{v}"] == 0 for v in VARIANTS)
    assert all((r["bound_rows"], r["rows_nonfinite"]) == (0, 0) for r in unchecked)


def test_bound_every_checks_the_bound_on_every_nth_recorded_forward_only():
    torch.manual_seed(0)
    model = tiny_model(n_layer=1)
    x = torch.randn(2, 6, 8)
    checked = []
    with EntropyMonitor(model, every=2, bound_every=3) as mon:
        for _ in range(12):  # recorded forwards 0, 2, ..., 10: the 1st and 4th check the bound
            model(x)
            r = mon.last[0]
            checked.append((r["step"], r["bound_rows"] > 0, r["bound_exact"] is not None, r["sigma"] is not None))
    assert sorted(set(checked)) == [(0, True, True, True), (2, False, False, False), (4, False, False, False),
                                    (6, True, True, True), (8, False, False, False), (10, False, False, False)]
    assert all(r["entropy_mean"] > 0 and r["entropy_min"] is not None for r in mon.last)  # entropies always
    # the defaults: every forward recorded, the bound (and sigma_h) on the 1st and every 10th after it
    with EntropyMonitor(model) as mon:
        steps = []
        for _ in range(21):
            model(x)
            steps += [r["step"] for r in mon.last if r["bound_rows"] > 0 and r["sigma"] is not None]
    assert sorted(set(steps)) == [0, 10, 20]
    with pytest.raises(ValueError, match="bound_every"):
        EntropyMonitor(model, bound_every=0)


def test_events_are_seen_once_by_a_loop_that_reads_them_after_every_forward():
    """mon.events holds the new events of the most recent forward: a loop reading it after every
    step (the docs' example, every=10) sees each event once, not once per unrecorded forward."""

    class Every(CollapseDetector):  # one new event per recorded step, whatever the entropies
        def update(self, records):
            return [{"step": records[0]["step"]}]

    torch.manual_seed(0)
    model = tiny_model(n_layer=1)
    x = torch.randn(2, 6, 8)
    seen = []
    with EntropyMonitor(model, every=10, detector=Every()) as mon:
        for _ in range(25):
            model(x)
            seen += mon.events
    assert seen == [{"step": 0}, {"step": 10}, {"step": 20}]



def test_a_failure_in_the_probe_or_mha_hook_is_a_warning_and_never_fails_the_forward(monkeypatch):
    torch.manual_seed(0)
    model = tiny_model(n_layer=1)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    expected, expected_mha = model(x), mha(x, x, x)[0]

    def broken():
        raise RuntimeError("head_weights is broken")

    monkeypatch.setattr(model[0], "head_weights", broken)
    monkeypatch.setattr("sigma_core.monitor.mha_call", lambda *a: 1 / 0)
    for module, args, want in ((model, (x,), expected), (mha, (x, x, x), expected_mha)):
        with pytest.warns(RuntimeWarning, match="could not record"), EntropyMonitor(module, bound_every=1) as mon:
            out = module(*args)
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, want, rtol=0, atol=0)
        assert mon.last == [] and len(mon.skipped) == 1 and mon.n_skipped == 1
