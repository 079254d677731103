"""The claims ledger: event detection on hand-made trajectories, the verdict rules, and the
committed docs/claims.md agreeing with what the committed results say."""
import re
from pathlib import Path

import pytest

from sigma_core.experiments import claims
from sigma_core.experiments.claims import (NOT_ATTEMPTED, NOT_REPRODUCED, PARTLY, REPRODUCED,
                                           first_collapse_step, first_spike_step, instability, verdicts)

ROOT = Path(__file__).resolve().parent.parent


def rec(step, loss, ent, **kw):
    return {"step": step, "train_loss": loss, "entropy_min_head": ent, "rows_checked": 1, **kw}


def run(records, *, model="gpt", reparam="none", lr=0.1, diverged_step=None, acc=None, seed=0, n_layer=2,
        optimizer="adamw", steps=30, preset="custom"):
    return {"dir": Path(f"/x/{model}/{reparam}/{lr}/{seed}/{n_layer}"),
            "config": {"model": model, "reparam": reparam, "lr": lr, "seed": seed, "n_layer": n_layer,
                       "optimizer": optimizer, "log_every": 10, "steps": steps, "preset": preset},
            "summary": {"diverged": diverged_step is not None, "diverged_step": diverged_step,
                        "final_val_accuracy": acc, "bound_violations": 0},
            "records": records}


def test_collapse_and_spike_detection_edges():
    recs = [rec(10, 3.0, 2.0), rec(20, 2.0, 0.1), rec(30, 2.49, 0.0999), rec(40, 2.51, 0.05)]
    assert first_collapse_step(recs) == 30  # strictly below 0.1 nats
    assert first_spike_step(recs) == 40  # 2.51 > 2.0 + 0.5, 2.49 is not
    assert first_spike_step([rec(10, 3.0, 1.0), rec(20, float("nan"), 1.0)]) == 20
    assert first_spike_step([rec(10, 3.0, 1.0), rec(20, 2.0, 1.0)]) is None
    ev = instability(run(recs))
    assert (ev["collapse_step"], ev["unstable_step"], ev["lead"]) == (30, 40, 10)
    # divergence earlier than any spike wins, and the lead turns negative when collapse comes later
    diverged = run([rec(10, 3.0, 2.0), rec(20, 2.0, 2.0), {"step": 25, "diverged": True, "train_loss": None}],
                   diverged_step=25)
    ev = instability(diverged)
    assert (ev["unstable_step"], ev["collapse_step"], ev["lead"]) == (25, None, None)


def _c1(runs):
    return verdicts(runs, [])[1]["verdict"]


def test_claim1_verdict_rules():
    collapse_then_spike = run([rec(10, 3.0, 2.0), rec(20, 2.0, 0.05), rec(30, 3.0, 0.01)])
    spike_then_collapse = run([rec(10, 3.0, 2.0), rec(20, 2.0, 1.0), rec(30, 3.0, 1.0), rec(40, 3.0, 0.01)])
    spike_no_collapse = run([rec(10, 3.0, 2.0), rec(20, 2.0, 1.0), rec(30, 3.0, 1.0)])
    stable = run([rec(10, 3.0, 2.0), rec(20, 2.0, 1.5)])
    assert _c1([collapse_then_spike, stable]) == REPRODUCED
    assert _c1([collapse_then_spike, spike_then_collapse]) == PARTLY
    assert _c1([spike_no_collapse]) == NOT_REPRODUCED
    assert _c1([stable]) == NOT_REPRODUCED


def test_claim3_and_claim4_verdict_rules():
    vit = lambda recipe_opt, reparam, acc, lr=0.1: run([rec(10, 1.0, 2.0)], model="vit", reparam=reparam,  # noqa: E731
                                                       acc=acc, optimizer=recipe_opt, lr=lr)
    assert verdicts([vit("adamw", "none", 0.93, 1e-3), vit("sgd", "sigma", 0.92)], [])[3]["verdict"] == REPRODUCED
    assert verdicts([vit("adamw", "none", 0.93, 1e-3), vit("sgd", "sigma", 0.88)], [])[3]["verdict"] == PARTLY
    assert verdicts([vit("adamw", "none", 0.93, 1e-3), vit("sgd", "sigma", 0.27)], [])[3]["verdict"] == NOT_REPRODUCED
    assert verdicts([], [])[3]["verdict"] == NOT_ATTEMPTED
    s2s = lambda reparam, acc, depth, div=None: run([rec(10, 1.0, 2.0)], model="seq2seq", reparam=reparam,  # noqa: E731
                                                    acc=acc, n_layer=depth, diverged_step=div)
    ok = [s2s("none", 0.9, 2), s2s("sigma", 0.9, 2), s2s("none", 0.1, 12, div=30), s2s("sigma", 0.8, 12)]
    assert verdicts(ok, [])[4]["verdict"] == REPRODUCED
    assert verdicts(ok + [s2s("sigma", 0.1, 24), s2s("none", 0.1, 24)], [])[4]["verdict"] == PARTLY
    assert verdicts([s2s("none", 0.9, 12), s2s("sigma", 0.9, 12)], [])[4]["verdict"] == NOT_REPRODUCED
    assert verdicts([], [])[5]["verdict"] == NOT_ATTEMPTED


def test_committed_ledger_states_the_verdicts_the_committed_results_give():
    ledger = ROOT / "docs" / "claims.md"
    results = ROOT / "results" / "claims"
    if not results.exists():
        pytest.skip("no committed results/claims")
    runs = claims.load_runs(results) + claims.load_runs(ROOT / "results" / "cpu-demo")
    computed = verdicts(runs, claims.compare_rows(ROOT / "results" / "compare-cpu" / "runs.csv"))
    table = dict(re.findall(r"^\| (\d) \| .*? \| \*\*(.+?)\*\* \|$", ledger.read_text(), flags=re.M))
    assert {int(k): v for k, v in table.items()} == {k: c["verdict"] for k, c in computed.items()}
    assert len(table) == 6
    # every run path the ledger names exists, and no absolute path of a machine is in it
    text = ledger.read_text()
    for path in re.findall(r"`(\.\./results/[^`]+)`", text):
        assert (ledger.parent / path).exists(), path
    assert "/tmp/" not in text and "/work/" not in text and "/home/" not in text
    for png in re.findall(r"\]\((\.\./results/[^)]+\.png)\)", text):
        assert (ledger.parent / png).exists(), png
