"""sigma_core.course: the notebooks' sliders and exercise checks.

The checks answer a student back: a wrong answer (the tempting ones included: log T as the allowed
norm in Exercise 1.1, the one-hot row k = 1 in Exercise 2.2) gets "not yet" with a hint, a right one
"correct", an untouched ``...`` "not answered"; the references are computed here independently (a
brute-force scan, a root finder), not taken from the checks. The executed notebooks
(tests/test_notebooks.py) run the same checks on the solutions and on wrong answers in student copies.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from sigma_core import course
from theory.bound import entropy_lower_bound


def test_exercise_1_1_knows_log_T_is_wrong_and_accepts_the_inverse_of_the_bound():
    ex = course.Exercises("1")
    # independent reference: solve h_128(s) = 1 by bisection on the closed form
    s_ref = brentq(lambda s: float(entropy_lower_bound(s, 128)) - 1.0, 0.1, 50.0, xtol=1e-13)
    e_ref = float(entropy_lower_bound(1.1 * s_ref, 128))
    assert ex.grade("1.1", allowed_norm=s_ref, entropy_at_110=e_ref)[0] == "correct"
    status, hint = ex.grade("1.1", allowed_norm=np.log(128), entropy_at_110=e_ref)
    assert status == "not yet" and "log T" in hint and "max_logit_norm" in hint
    assert ex.grade("1.1", allowed_norm=1.01 * s_ref, entropy_at_110=e_ref)[0] == "not yet"
    assert ex.grade("1.1", allowed_norm=s_ref, entropy_at_110=0.5)[0] == "not yet"
    assert ex.grade("1.1", allowed_norm="six", entropy_at_110=e_ref)[0] == "not yet"
    assert ex.grade("1.1", allowed_norm=..., entropy_at_110=e_ref)[0] == "not answered"


def test_exercise_2_2_knows_the_one_hot_row_is_not_the_box_minimum():
    ex = course.Exercises("2")
    # independent reference: every vertex of the box [-b, b]^T with k logits at +b, entropy computed directly
    T, b = 100, 0.5
    H = []
    for k in range(1, T):
        z = np.r_[np.full(k, b), np.full(T - k, -b)]
        p = np.exp(z - z.max()); p /= p.sum()
        H.append(-(p * np.log(p)).sum())
    H = np.array(H)
    k_best = 1 + int(np.argmin(H))
    assert k_best > 1
    assert ex.grade("2.2", best_k=k_best, H_best=H.min(), H_one_hot=H[0])[0] == "correct"
    status, hint = ex.grade("2.2", best_k=1, H_best=H[0], H_one_hot=H[0])
    assert status == "not yet" and "one-hot" in hint
    assert ex.grade("2.2", best_k=k_best + 1, H_best=H.min(), H_one_hot=H[0])[0] == "not yet"


def test_verdict_claims_only_without_a_wrong_answer(capsys):
    ex = course.Exercises("2")
    assert ex.verdict("all claims of notebook 2 hold") == "all claims of notebook 2 hold"
    assert ex.check("2.2", best_k=..., H_best=..., H_one_hot=...) == "not answered"
    assert ex.verdict("all claims of notebook 2 hold").startswith("all claims of notebook 2 hold (exercises: 2.2 not answered")
    assert ex.check("2.2", best_k=1, H_best=0.0, H_one_hot=0.0) == "not yet"
    out = capsys.readouterr().out
    assert "exercise 2.2: not yet." in out
    verdict = ex.verdict("all claims of notebook 2 hold")
    assert "all claims" not in verdict and "2.2" in verdict and "one-hot" in verdict
    # a later right answer replaces the wrong one
    from theory.certify import box_min_entropy
    ref = box_min_entropy(0.5, 100)
    assert ex.check("2.2", best_k=ref.n_high, H_best=ref.value, H_one_hot=float(ref.vertex_values[1])) == "correct"
    assert ex.verdict("all claims of notebook 2 hold").startswith("all claims of notebook 2 hold")


def test_bad_calls_are_refused_by_name():
    ex = course.Exercises("1")
    with pytest.raises(ValueError, match="exercise"):
        ex.grade("9.9", answer=1)
    with pytest.raises(TypeError, match="entropy_at_110"):
        ex.grade("1.1", allowed_norm=1.0)
    with pytest.raises(ValueError, match="notebook"):
        course.Exercises("")
    with pytest.raises(TypeError, match="fn"):
        course.controls(3, s=(0, 1, 0.1, 0.5))
    with pytest.raises(ValueError, match="s:"):
        course.controls(lambda s: s, s=3)


def test_controls_makes_the_plain_call_and_returns_its_value(capsys):
    seen = []
    out = course.controls(lambda s=0.0, kind="a": seen.append((s, kind)) or 2 * s,
                          s=(0.0, 4.0, 0.5, 1.5), kind=["b", "c"])
    assert out == 3.0 and seen == [(1.5, "b")]
    assert "plain parameters" in capsys.readouterr().out


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_exercise_6_1_reads_claim_1_under_persistence_1_as_the_committed_ledger_does():
    import re

    ex = course.Exercises("6")
    # independent reference: the committed ledger's sensitivity row for spike_persist=1 (first column: claim 1)
    ledger = (ROOT / "docs" / "claims.md").read_text()
    want = re.search(r"^\| spike_persist=1 \| (?:\*\*)?([a-z ]+?)(?:\*\*)? \|", ledger, flags=re.M).group(1)
    default = re.search(r"^\| 1 \| .*? \| \*\*(.+?)\*\*", ledger, flags=re.M).group(1)
    assert want != default  # the committed ledger flags claim 1 as sensitive to the persistence
    from sigma_core.experiments import claims, definitions

    runs, sweep = course._ledger_runs(str(ROOT))
    n = claims.verdict_claim1(runs + sweep, definitions.Definitions(spike_persist=1))["numbers"]["unstable"]
    assert ex.grade("6.1", n_unstable_persist_1=n, verdict_persist_1=want, flips=True, root=ROOT)[0] == "correct"
    for wrong in ({"verdict_persist_1": default}, {"flips": False}, {"n_unstable_persist_1": n - 1}):
        answers = {"n_unstable_persist_1": n, "verdict_persist_1": want, "flips": True, **wrong}
        status, hint = ex.grade("6.1", root=ROOT, **answers)
        assert status == "not yet" and list(wrong)[0] in hint, (wrong, hint)
    assert ex.grade("6.1", n_unstable_persist_1=..., verdict_persist_1=want, flips=True, root=ROOT)[0] == "not answered"


def test_exercise_6_2_knows_the_every_seed_rule_from_the_run_folders():
    import json
    import math

    # independent reference: the sweep's run folders read with json, the rule of notebook 6's section 4
    ok = {}
    for cfg in sorted((ROOT / "results" / "compare-cpu" / "runs").rglob("config.json")):
        c = json.loads(cfg.read_text())
        if c.get("qk_norm") or c.get("logit_softcap") or c.get("reparam") == "spectral" or c.get("norm") == "none":
            continue
        s = json.loads((cfg.parent / "summary.json").read_text())
        recs = [json.loads(x) for x in (cfg.parent / "metrics.jsonl").read_text().splitlines() if x.strip()]
        val = [r["val_loss"] for r in recs if "val_loss" in r][-1]
        fine = (not s.get("diverged") and math.isfinite(val) and val < math.log(256) - 0.05
                and all(r.get("entropy_min_head", 1.0) >= 0.1 for r in recs))
        ok.setdefault(c["reparam"], {}).setdefault(c["lr"], []).append(fine)
    best = {m: max((lr for lr, f in by.items() if all(f)), default=None) for m, by in ok.items()}
    ex = course.Exercises("6")
    assert ex.grade("6.2", baseline_lr=best["none"], sigma_lr=best["sigma"], root=ROOT)[0] == "correct"
    higher = {m: min(lr for lr in ok[m] if lr > best[m]) for m in ok}
    status, hint = ex.grade("6.2", baseline_lr=higher["none"], sigma_lr=best["sigma"], root=ROOT)
    assert status == "not yet" and "baseline_lr" in hint
    status, hint = ex.grade("6.2", baseline_lr=best["none"], sigma_lr=higher["sigma"], root=ROOT)
    assert status == "not yet" and "sigma_lr" in hint


# --- the classroom-spike preset (a live instability demonstration the course still lacks; notebook 05, section 6,
# shows the order from a committed run instead: the last test below) --------------------------------------------

@pytest.fixture(scope="module")
def classroom_spike_pair(tmp_path_factory):
    """The ``classroom-spike`` pair as notebook 4 would train it (one thread from the preset,
    deterministic algorithms), with each run's collapse and instability steps by the ledger's rules."""
    import torch

    from sigma_core.experiments import definitions
    from sigma_core.experiments.config import preset
    from sigma_core.experiments.report import read_metrics
    from sigma_core.experiments.train import Trainer

    root = tmp_path_factory.mktemp("classroom-spike")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    out = {}
    try:
        for reparam in ("none", "sigma"):
            cfg = preset("classroom-spike", reparam=reparam, progress=False)
            summary = Trainer(cfg, root / reparam).run()
            recs = read_metrics(root / reparam)
            out[reparam] = {
                "collapse": definitions.first_collapse_step(recs, seq_len=cfg.block_size),
                "instability": definitions.first_instability_step(recs, summary=summary),
                "summary": summary, "losses": [r["train_loss"] for r in recs if "train_loss" in r]}
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    return out


def test_classroom_spike_preset_is_what_its_docstring_says(classroom_spike_pair):
    """What ``classroom-spike`` (lr 0.3, 80 steps, logged every step) does today, as
    sigma_core/experiments/config.py describes it: the baseline's loss spikes in its first steps,
    no later than its least head falls below 0.1 nats, and it collapses; sigmaReparam does not
    collapse, but the instability rule flags a rise of its loss too, so the pair does not show
    "collapse, then instability" (the test below)."""
    base, rep = classroom_spike_pair["none"], classroom_spike_pair["sigma"]
    assert base["collapse"] is not None and base["instability"] is not None
    assert base["instability"] <= base["collapse"] <= 5, base                 # a spike at the first steps
    assert max(base["losses"][:5]) > 2 * base["losses"][0], base["losses"][:5]   # 5.55 -> 18.7 nats
    assert rep["collapse"] is None and rep["summary"]["entropy_min_head"] > 0.1, rep["summary"]
    assert rep["instability"] is not None, rep                                 # step 14 on AMD EPYC
    assert not base["summary"]["diverged"] and not rep["summary"]["diverged"]


@pytest.mark.xfail(strict=True, reason="no tuning of classroom-spike found yet where the baseline collapses "
                   "BEFORE its loss becomes unstable and sigmaReparam stays stable (remove this marker when one is)")
def test_classroom_spike_shows_collapse_then_instability(classroom_spike_pair):
    """The shape of the paper's Figure 1 by the ledger's definitions: the baseline's least head falls
    below the collapse threshold and only THEN its loss becomes unstable; sigmaReparam neither."""
    base, rep = classroom_spike_pair["none"], classroom_spike_pair["sigma"]
    assert base["collapse"] is not None and base["instability"] is not None
    assert base["collapse"] < base["instability"], base
    assert rep["collapse"] is None and rep["instability"] is None, rep


# --- the shape of the paper's Figure 1 from a committed run (notebook 05, section 6) -----------------------------

FIGURE_1_RUNS = ROOT / "results" / "claims" / "speech"


def _committed_run(d):
    """A committed run folder read with json alone: config, summary, logged records."""
    import json

    return (json.loads((d / "config.json").read_text()), json.loads((d / "summary.json").read_text()),
            [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()])


def test_committed_speech_run_has_the_figure_1_order():
    """Notebook 05, section 6: claim 5's speech baseline at lr 0.1, seed 0, collapses (least head below
    0.1 nats) at an earlier logged step than its loss becomes unstable, while its loss is still falling,
    and diverges after both, by the ledger's rules; its sigmaReparam twin never collapses (it is
    unstable from step 10 as well, which the section says). Checked twice: with
    sigma_core.experiments.definitions, and with the rules written out here over the raw records."""
    import math

    from sigma_core.experiments import definitions

    cfg, summary, recs = _committed_run(FIGURE_1_RUNS / "baseline" / "lr_0.1" / "seed_0")
    assert (cfg["preset"], cfg["reparam"], cfg["lr"], cfg["seed"], cfg["git_dirty"]) == ("speech-digits", "none", 0.1, 0, False)
    collapse = definitions.first_collapse_step(recs, seq_len=cfg["block_size"])
    unstable = definitions.first_instability_step(recs, summary=summary)
    diverged = definitions.diverged_step(recs, summary)
    assert (collapse, unstable, diverged) == (5, 10, 20)
    assert collapse < unstable < diverged

    # the same from the raw records: the first logged step below 0.1 nats ...
    ok = [r for r in recs if isinstance(r.get("train_loss"), float) and math.isfinite(r["train_loss"])]
    first_low = next(r["step"] for r in ok if r["entropy_min_head"] < 0.1)
    # ... is a step at which the loss is the lowest logged so far (still falling) ...
    at = {r["step"]: r for r in ok}
    assert at[first_low]["train_loss"] == min(r["train_loss"] for r in ok if r["step"] <= first_low)
    # ... and every earlier logged loss is within 0.5 nats of the best before it: no spike before the collapse
    best = math.inf
    for r in ok:
        if r["step"] > first_low:
            break
        assert r["train_loss"] <= best + 0.5, r
        best = min(best, r["train_loss"])
    # then a loss more than 0.5 nats above the best that never comes back before the run diverges
    after = [r for r in ok if r["step"] > first_low]
    assert after and all(r["train_loss"] > best + 0.5 for r in after)
    assert recs[-1]["step"] == summary["diverged_step"] == diverged and recs[-1].get("diverged")

    # the sigmaReparam twin: the same command with --reparam sigma; no logged head below 0.1 nats
    t_cfg, t_summary, t_recs = _committed_run(FIGURE_1_RUNS / "sigma" / "lr_0.1" / "seed_0")
    assert {k: v for k, v in t_cfg.items() if cfg.get(k) != v}.keys() <= {"reparam", "n_params", "flops_per_token", "argv"}
    assert t_cfg["reparam"] == "sigma"
    assert definitions.first_collapse_step(t_recs, seq_len=t_cfg["block_size"]) is None
    assert min(r["entropy_min_head"] for r in t_recs if "entropy_min_head" in r) > 0.1
    assert definitions.first_instability_step(t_recs, summary=t_summary) == 10 and not t_summary["diverged"]
