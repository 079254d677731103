"""The abstract's language-modelling claim at classroom scale: the byte-level GPT, baseline
against sigmaReparam, each at its own tuned learning rate, at an equal step budget.

``python -m sigma_core.experiments.lm_claim run [--out results/claims/lm] [--jobs 2]`` trains
:func:`planned_runs` (the ``cpu-compare`` GPT, d=64, 2 layers, T=64, 200 AdamW steps, with
``--test-split``: the held-out bytes halved into validation and test) for both methods at every
learning rate of :data:`LRS` and every seed of :data:`SEEDS`; :func:`claim_verdict` chooses each
method's learning rate on the validation loss and reports the test loss there.

Example
-------
>>> [rel for rel, _ in planned_runs(lrs=(0.01,), seeds=(0,))]
['baseline/lr_0.01/seed_0', 'sigma/lr_0.01/seed_0']
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sigma_core.experiments.sweep_cli import sweep_main

LRS = (3e-3, 1e-2, 3e-2, 1e-1)
SEEDS = (0, 1, 2)
METHODS = {"baseline": "none", "sigma": "sigma"}
PRESET = "cpu-compare"


def _lr(x: float) -> str:
    return f"{x:g}"


def planned_runs(lrs=LRS, seeds=SEEDS) -> list[tuple[str, list[str]]]:
    """``(run path relative to the sweep folder, train flags)`` of every run."""
    return [(f"{label}/lr_{_lr(lr)}/seed_{seed}",
             ["--preset", PRESET, "--reparam", reparam, "--lr", _lr(lr), "--seed", str(seed), "--test-split",
              "--log-every", "5"])
            for lr in lrs for seed in seeds for label, reparam in METHODS.items()]


def run_all(out_dir: str | os.PathLike, *, jobs: int = 1, lrs=LRS, seeds=SEEDS) -> None:
    """Train every planned run into ``out_dir`` (skipping finished ones), ``jobs`` at a time."""
    from sigma_core.experiments.claims import _train  # noqa: PLC0415

    out = Path(out_dir)
    todo = [(out / rel, flags) for rel, flags in planned_runs(lrs, seeds)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for msg in pool.map(lambda job: _train(job[0], job[1], 1), todo):
            print(msg, flush=True)


def load_sweep(root: str | os.PathLike) -> list[dict]:
    """One row per finished run: method, lr, seed, final validation and test loss, records."""
    rows = []
    for p in sorted(Path(root).rglob("summary.json")):
        d = p.parent
        cfg = json.loads((d / "config.json").read_text())
        summary = json.loads(p.read_text())
        records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows.append({"dir": d, "method": "sigma" if cfg["reparam"] == "sigma" else "baseline", "lr": cfg["lr"],
                     "seed": cfg["seed"], "config": cfg, "summary": summary, "records": records,
                     "val_loss": summary.get("final_val_loss"), "test_loss": summary.get("final_test_loss"),
                     "entropy_min_head": summary.get("entropy_min_head")})
    return sorted(rows, key=lambda r: (r["method"], r["lr"], r["seed"]))


def claim_verdict(rows: list[dict], definitions=None) -> dict:
    """The language-modelling verdict from the sweep's rows under ``definitions``
    (:mod:`sigma_core.experiments.definitions`).

    Per method: the *stable* learning rates (every seed learned, none collapsed or diverged), and
    the learning rate of lowest mean validation loss with the mean and spread of the test loss
    there (a diverged run counts as the chance loss, log 256).  *Competitive*: sigmaReparam's test
    loss is lower than the baseline's, or the two do not differ (``definitions.differ``).
    *More robust*: sigmaReparam has at least as many stable learning rates.  *reproduced*: both;
    *partly*: one of them; *not reproduced at this scale*: neither.
    """
    import math  # noqa: PLC0415

    from sigma_core.experiments import definitions as defs  # noqa: PLC0415

    d = defs.DEFAULT if definitions is None else definitions
    if not rows:
        return {"verdict": "not attempted", "numbers": {}}
    chance = math.log(256)
    per = {}
    for r in rows:
        ok = defs.stable_run(r["records"], r["summary"], r["config"], definitions=d)
        div = defs.diverged(r["records"], r["summary"])
        val = chance if div or r["val_loss"] is None else r["val_loss"]
        test = chance if div or r["test_loss"] is None else r["test_loss"]
        per.setdefault(r["method"], {}).setdefault(r["lr"], []).append((ok, val, test))
    numbers = {}
    for m, by in per.items():
        stable = sorted(lr for lr, v in by.items() if defs.stable_setting([x[0] for x in v], definitions=d))
        best = min(by, key=lambda lr: defs.mean([x[1] for x in by[lr]]))
        tests = [x[2] for x in by[best]]
        numbers[m] = {"stable_lrs": stable, "chosen_lr": best, "test_losses": tests,
                      "test_mean": defs.mean(tests), "test_spread": defs.spread(tests, definitions=d),
                      "val_mean": defs.mean([x[1] for x in by[best]]),
                      "per_lr": {lr: {"val_mean": defs.mean([x[1] for x in v]), "test_mean": defs.mean([x[2] for x in v]),
                                      "stable_seeds": sum(x[0] for x in v), "n": len(v)} for lr, v in sorted(by.items())}}
    if set(numbers) != {"baseline", "sigma"}:
        return {"verdict": "not attempted", "numbers": numbers}
    s, b = numbers["sigma"], numbers["baseline"]
    competitive = s["test_mean"] <= b["test_mean"] or not defs.differ(s["test_losses"], b["test_losses"], definitions=d)
    robust = len(s["stable_lrs"]) >= len(b["stable_lrs"])
    numbers.update(competitive=competitive, robust=robust)
    verdict = ("reproduced" if competitive and robust else "partly reproduced" if competitive or robust
               else "not reproduced at this scale")
    return {"verdict": verdict, "numbers": numbers}


def claim_sensitivity(rows: list[dict]) -> dict[str, str]:
    """Definition name -> the verdict under it, over :func:`definitions.alternatives`."""
    from sigma_core.experiments import definitions as defs  # noqa: PLC0415

    return {d.name: claim_verdict(rows, d)["verdict"] for d in defs.alternatives()}


def _summary(results: str) -> dict:
    rows = load_sweep(results)
    v = claim_verdict(rows)
    return {"verdict": v["verdict"], "numbers": v["numbers"], "sensitivity": claim_sensitivity(rows)}


def main(argv=None) -> int:
    return sweep_main(argv, prog="python -m sigma_core.experiments.lm_claim", doc=__doc__,
                      default_results="results/claims/lm", run_all=run_all, summary=_summary)


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------- the ledger
def rows_from_runs(runs: list[dict]) -> list[dict]:
    """The :func:`load_sweep` rows of the language-modelling sweep's runs among ``runs`` (dicts of
    :func:`sigma_core.experiments.claims.read_run`): GPT runs with a test split in a folder ``lm``."""
    rows = []
    for r in runs:
        c = r["config"]
        if c.get("model") != "gpt" or not c.get("test_split") or "lm" not in Path(r["dir"]).parts:
            continue
        rows.append({"dir": r["dir"], "method": "sigma" if c["reparam"] == "sigma" else "baseline", "lr": c["lr"],
                     "seed": c["seed"], "config": c, "summary": r["summary"], "records": r["records"],
                     "val_loss": r["summary"].get("final_val_loss"), "test_loss": r["summary"].get("final_test_loss"),
                     "entropy_min_head": r["summary"].get("entropy_min_head")})
    return sorted(rows, key=lambda x: (x["method"], x["lr"], x["seed"]))


def ledger_entry(runs: list[dict], definitions=None) -> dict:
    """The language-modelling claim's ``{"verdict", "numbers", "evidence"}`` (:func:`claim_verdict`)."""
    rows = rows_from_runs(runs)
    if not rows:
        return {"verdict": "not attempted", "numbers": {}, "evidence": ["No language-modelling sweep in this ledger's results."]}
    v = claim_verdict(rows, definitions)
    n = v["numbers"]
    ev = [f"{'sigmaReparam' if m == 'sigma' else 'baseline'} (pre-LN GPT, AdamW, no warm-up): learning rate "
          f"{n[m]['chosen_lr']:g} chosen on validation loss ({n[m]['val_mean']:.3f} nats/byte); test loss "
          f"{n[m]['test_mean']:.3f} (spread {n[m]['test_spread']:.3f} over {len(n[m]['test_losses'])} seeds); stable "
          f"learning rates {n[m]['stable_lrs'] or 'none'} of {sorted(n[m]['per_lr'])}."
          for m in ("baseline", "sigma") if m in n]
    if "competitive" in n:
        ev.append(f"Competitive (test loss lower, or no difference beyond the spread): {n['competitive']}; at least "
                  f"as many stable learning rates: {n['robust']}.")
    return {"verdict": v["verdict"], "numbers": n, "evidence": ev}


def ledger_lines(runs: list[dict], base: Path) -> list[str]:
    """The language-modelling section's table, command and caveats (after its verdict and evidence)."""
    rows = rows_from_runs(runs)
    if not rows:
        return []
    n = claim_verdict(rows)["numbers"]
    L = ["", "Command: `python -m sigma_core.experiments.lm_claim run --out results/claims/lm --jobs 2` (each run "
         f"`entropy-collapse train --preset {PRESET} --reparam none|sigma --lr LR --seed S --test-split`).", "",
         "| method | lr | seeds | validation loss (mean) | test loss (mean) | stable seeds |", "|---|---|---|---|---|---|"]
    for m in ("baseline", "sigma"):
        for lr, p in n.get(m, {}).get("per_lr", {}).items():
            chosen = " (chosen)" if lr == n[m]["chosen_lr"] else ""
            L.append(f"| {m} | {lr:g}{chosen} | {p['n']} | {p['val_mean']:.3f} | {p['test_mean']:.3f} | {p['stable_seeds']} |")
    c = rows[0]["config"]
    edge = [f"{m} ({n[m]['chosen_lr']:g})" for m in ("baseline", "sigma") if m in n
            and n[m]["chosen_lr"] in (min(n[m]["per_lr"]), max(n[m]["per_lr"]))]
    L += ["", ("Validation chose a rate at the edge of the grid for " + ", ".join(edge) + ": a rate beyond it was "
               "not tried, so that method's tuned loss may be better than shown. " if edge else "") + f"Caveats: a {c['n_layer']}-layer d={c['d_model']} byte-level GPT (T={c['block_size']}), {c['steps']} AdamW "
          "steps on CPython standard-library bytes; the held-out bytes are halved into validation and test. A "
          "diverged run counts as the chance loss, log 256 = 5.545 nats. The paper trains GPT-style models of "
          "hundreds of millions of parameters.", ""]
    return L
