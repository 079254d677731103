"""The paper's six claims at classroom scale: the runs that test them and the ledger they feed.

``python -m sigma_core.experiments.claims run [--out results/claims] [--jobs 2]`` trains every
run of :data:`RUNS` with ``entropy-collapse train`` (one subprocess each, so every
``config.json`` records the command that made it), skipping runs already finished, and drops the
checkpoints (results keep config, metrics, summary and samples).  Run it from a clean commit.

``python -m sigma_core.experiments.claims ledger [--results results/claims] [--out docs/claims.md]``
reads the committed runs, computes every verdict from the data (:func:`verdicts`), draws the
figures into ``RESULTS/figures/`` and writes the ledger.  Nothing in the ledger is typed by
hand: rerunning it on the same results gives the same file.

Claims (abstract of Zhai et al., ICML 2023, arXiv 2303.06296):

1. low attention entropy accompanies training instability (oscillating loss or divergence);
2. sigmaReparam prevents entropy collapse and makes training more robust to hyperparameters;
3. sigmaReparam trains a ViT to competitive accuracy without warm-up, weight decay, LayerNorm or
   adaptive optimisers;
4. ... deep machine-translation (post-LN) models without warm-up and adaptive optimisers;
5. ... speech recognition (not attempted: no speech data ships in an installed package);
6. a tight lower bound on attention entropy, decreasing exponentially in the spectral norm of
   the attention logits (checked in ``theory/`` and by ``tests/test_bound.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sigma_core.experiments import definitions as defs

#: minimum-head entropy (nats) below which a head counts as collapsed (definitions.py, as everywhere)
COLLAPSE_NATS = defs.COLLAPSE_NATS
#: a loss spike: a logged training loss this many nats above the lowest earlier logged loss
SPIKE_NATS = defs.SPIKE_NATS

VIT_STD_LRS = (1e-3, 3e-3)
VIT_SGD_LRS = (0.03, 0.1, 0.3)
VIT_SEEDS = (1, 2)  # extra seeds at the middle learning rate of each recipe
VIT_LONG_STEPS = 1200  # the harsh recipe once more with four times the steps
S2S_DEPTHS = (2, 6, 12)
S2S_LRS = (0.1, 0.5)
GPT_LRS = (0.03, 0.1, 0.3)


def _lr(x: float) -> str:
    return f"{x:g}"


def planned_runs() -> list[tuple[str, list[str]]]:
    """``(run path relative to the results folder, train flags)`` of every run, in order."""
    runs = []
    for lr in VIT_STD_LRS:
        runs.append((f"vit/standard/lr_{_lr(lr)}/seed_0", ["--preset", "vit-digits", "--lr", _lr(lr)]))
    for seed in VIT_SEEDS:
        runs.append((f"vit/standard/lr_{_lr(VIT_STD_LRS[0])}/seed_{seed}",
                     ["--preset", "vit-digits", "--lr", _lr(VIT_STD_LRS[0]), "--seed", str(seed)]))
    for label, reparam in (("sigma-sgd", "sigma"), ("baseline-sgd", "none")):
        for lr in VIT_SGD_LRS:
            runs.append((f"vit/{label}/lr_{_lr(lr)}/seed_0",
                         ["--preset", "vit-digits-sgd", "--reparam", reparam, "--lr", _lr(lr)]))
        for seed in VIT_SEEDS:
            runs.append((f"vit/{label}/lr_{_lr(VIT_SGD_LRS[1])}/seed_{seed}",
                         ["--preset", "vit-digits-sgd", "--reparam", reparam, "--lr", _lr(VIT_SGD_LRS[1]),
                          "--seed", str(seed)]))
    for label, reparam in (("sigma-sgd", "sigma"), ("baseline-sgd", "none")):  # a 4x longer budget
        runs.append((f"vit/{label}/lr_0.1/steps_{VIT_LONG_STEPS}/seed_0",
                     ["--preset", "vit-digits-sgd", "--reparam", reparam, "--lr", "0.1",
                      "--steps", str(VIT_LONG_STEPS), "--log-every", "10"]))
    for lr in S2S_LRS:
        for depth in S2S_DEPTHS:
            for label, reparam in (("baseline", "none"), ("sigma", "sigma")):
                runs.append((f"seq2seq/{label}/depth_{depth}/lr_{_lr(lr)}",
                             ["--preset", "seq2seq-reverse", "--reparam", reparam, "--n-layer", str(depth),
                              "--lr", _lr(lr)]))
    for lr in GPT_LRS:
        runs.append((f"gpt/baseline/lr_{_lr(lr)}", ["--preset", "cpu-compare", "--lr", _lr(lr), "--log-every", "2"]))
    runs.append((f"gpt/sigma/lr_{_lr(0.1)}", ["--preset", "cpu-compare", "--reparam", "sigma", "--lr", "0.1",
                                               "--log-every", "2"]))
    return runs


def _train(out: Path, flags: list[str], threads: int) -> str:
    if (out / "summary.json").exists():
        return f"skip {out}"
    if (out / "metrics.jsonl").exists():  # a killed run: start again
        for f in out.rglob("*"):
            if f.is_file():
                f.unlink()
    cmd = [sys.executable, "-m", "sigma_core.cli", "train", "--out", str(out), "--threads", str(threads),
           "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return f"FAILED {out} ({proc.returncode}): {proc.stderr[-2000:]}"
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        ckpt.unlink()  # results keep config, metrics, summary and samples, not weights
    return f"done {out}"


def run_all(out_dir: str | os.PathLike, *, jobs: int = 1, only: str | None = None) -> None:
    """Train every planned run (those whose path starts with ``only``) into ``out_dir``."""
    out = Path(out_dir)
    todo = [(out / rel, flags) for rel, flags in planned_runs() if only is None or rel.startswith(only)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for msg in pool.map(lambda job: _train(job[0], job[1], 1), todo):
            print(msg, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigma_core.experiments.claims", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the planned runs")
    run.add_argument("--out", default="results/claims")
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--only", default=None, help="only runs whose path starts with this (vit, seq2seq, gpt)")
    led = sub.add_parser("ledger", help="write docs/claims.md and the figures from the results")
    led.add_argument("--results", default="results/claims")
    led.add_argument("--out", default="docs/claims.md")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {args.jobs}")
        run_all(args.out, jobs=args.jobs, only=args.only)
        return 0
    path = write_ledger(args.results, args.out)
    print(f"ledger written to {path}")
    return 0



# ---------------------------------------------------------------------------------- reading
def read_run(run_dir: str | os.PathLike) -> dict:
    """``{"dir", "config", "summary", "records"}`` of one finished run directory."""
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    from sigma_core.experiments.config import TrainConfig  # noqa: PLC0415

    # runs written before a field existed hold its default (model gpt, AdamW, no warm-up, ...)
    config = {**TrainConfig().to_dict(), **json.loads((run_dir / "config.json").read_text())}
    return {"dir": run_dir, "config": config,
            "summary": json.loads((run_dir / "summary.json").read_text()), "records": records}


def load_runs(root: str | os.PathLike) -> list[dict]:
    """Every finished run (a folder with ``summary.json`` and ``metrics.jsonl``) under ``root``."""
    root = Path(root)
    dirs = sorted(p.parent for p in root.rglob("summary.json") if (p.parent / "metrics.jsonl").exists())
    return [read_run(d) for d in dirs]


# ---------------------------------------------------------------------------------- events
def first_collapse_step(records: list[dict], nats: float = COLLAPSE_NATS, *, seq_len: int | None = None,
                        definitions: defs.Definitions = defs.DEFAULT) -> int | None:
    """First logged step at which some head's mean entropy is below ``nats``
    (:func:`sigma_core.experiments.definitions.first_collapse_step`)."""
    if nats != definitions.collapse_nats:
        definitions = defs.dataclasses.replace(definitions, collapse_nats=nats)
    return defs.first_collapse_step(records, seq_len=seq_len, definitions=definitions)


def first_spike_step(records: list[dict], nats: float = SPIKE_NATS, persist: int = 1) -> int | None:
    """First logged step whose training loss exceeds the lowest earlier logged loss by ``nats`` and
    stays there for ``persist`` logged steps (default 1: a single step; instability asks for
    :data:`~sigma_core.experiments.definitions.SPIKE_PERSIST`); a non-finite loss counts as a spike."""
    return defs.first_instability_step(records, spike_nats=nats, spike_persist=persist)


def instability(run: dict, definitions: defs.Definitions = defs.DEFAULT) -> dict:
    """When (if) the run became unstable and when its attention collapsed, by ``definitions``.

    ``diverged_step`` (non-finite loss or gradient), ``spike_step`` (a persistent loss spike,
    :func:`sigma_core.experiments.definitions.first_instability_step`), ``unstable_step`` (the
    earlier of the two), ``collapse_step``
    (:func:`sigma_core.experiments.definitions.first_collapse_step`) and ``lead`` =
    unstable_step - collapse_step (positive: the collapse came first), with ``log_every`` (the
    resolution of both).
    """
    recs = run["records"]
    div = defs.diverged_step(recs, run["summary"])
    spike = defs.first_instability_step([r for r in recs if not r.get("diverged")], definitions=definitions)
    if div is not None and spike is not None and spike >= div:
        spike = None
    unstable = min((s for s in (div, spike) if s is not None), default=None)
    collapse = defs.first_collapse_step(recs, seq_len=run["config"].get("block_size"), definitions=definitions)
    lead = unstable - collapse if unstable is not None and collapse is not None else None
    return {"diverged_step": div, "spike_step": spike, "unstable_step": unstable, "collapse_step": collapse,
            "lead": lead, "log_every": run["config"].get("log_every")}


# ---------------------------------------------------------------------------------- tables
def _final(run: dict, key: str):
    return run["summary"].get(key)


def _label(run: dict, root: Path) -> str:
    try:
        return run["dir"].relative_to(root).as_posix()
    except ValueError:
        return run["dir"].as_posix()


def _group(run: dict) -> str:
    """Recipe of a ViT run: standard / sigma-sgd / baseline-sgd (from its config)."""
    c = run["config"]
    name = "standard" if c["optimizer"] == "adamw" else "sigma-sgd" if c["reparam"] == "sigma" else "baseline-sgd"
    from sigma_core.experiments.config import PRESETS  # noqa: PLC0415

    default = PRESETS.get(c.get("preset"), {}).get("steps")
    return name if default in (None, c["steps"]) else f"{name} ({c['steps']} steps)"


def vit_table(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        if r["config"]["model"] != "vit":
            continue
        ev = instability(r)
        rows.append({"recipe": _group(r), "lr": r["config"]["lr"], "seed": r["config"]["seed"],
                     "accuracy": _final(r, "final_val_accuracy"), "val_loss": _final(r, "final_val_loss"),
                     "entropy_min_head": _final(r, "entropy_min_head"), "entropy_mean": _final(r, "entropy_mean"),
                     "sigma_max": _final(r, "sigma_max"), "diverged": r["summary"]["diverged"],
                     "collapse_step": ev["collapse_step"], "dir": r["dir"]})
    return sorted(rows, key=lambda x: (x["recipe"], x["lr"], x["seed"]))


def seq2seq_table(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        if r["config"]["model"] != "seq2seq":
            continue
        ev = instability(r)
        rows.append({"reparam": r["config"]["reparam"], "depth": r["config"]["n_layer"], "lr": r["config"]["lr"],
                     "accuracy": _final(r, "final_val_accuracy"), "val_loss": _final(r, "final_val_loss"),
                     "entropy_min_head": _final(r, "entropy_min_head"), "sigma_max": _final(r, "sigma_max"),
                     "diverged": r["summary"]["diverged"], "diverged_step": ev["diverged_step"],
                     "collapse_step": ev["collapse_step"], "spike_step": ev["spike_step"], "dir": r["dir"]})
    return sorted(rows, key=lambda x: (x["lr"], x["depth"], x["reparam"]))


def claim1_table(runs: list[dict]) -> list[dict]:
    """One row per run that became unstable or collapsed: the two times and the lead."""
    rows = []
    for r in runs:
        ev = instability(r)
        if ev["unstable_step"] is None and ev["collapse_step"] is None:
            continue
        rows.append({"dir": r["dir"], "model": r["config"]["model"], "reparam": r["config"]["reparam"],
                     "lr": r["config"]["lr"], **ev})
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return 0.0 if xs else None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ---------------------------------------------------------------------------------- verdicts
REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_ATTEMPTED = (
    "reproduced", "partly reproduced", "not reproduced at this scale", "not attempted")
#: a seq2seq run "trains" when it did not diverge and predicts at least this fraction of tokens
S2S_TRAINS = 0.5
#: "competitive": the harsh recipe's best accuracy within this many points of the standard one's
COMPETITIVE_POINTS = 2.0


def compare_rows(path: str | os.PathLike) -> list[dict]:
    """The per-run rows of a committed ``entropy-collapse compare`` sweep (runs.csv)."""
    import csv  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def verdicts(runs: list[dict], compare: list[dict]) -> dict[int, dict]:
    """Claim number -> ``{"verdict", "evidence": [sentences], "numbers": {...}}``, from the data."""
    out: dict[int, dict] = {}
    # claim 1 ----------------------------------------------------------------------------------
    c1 = claim1_table(runs)
    unstable = [r for r in c1 if r["unstable_step"] is not None]
    with_collapse = [r for r in unstable if r["collapse_step"] is not None]
    first = [r for r in with_collapse if r["lead"] >= 0]
    collapsed_stable = [r for r in c1 if r["unstable_step"] is None]
    leads = sorted(r["lead"] for r in with_collapse)
    n1 = {"unstable": len(unstable), "unstable_with_collapse": len(with_collapse),
          "collapse_first_or_same": len(first), "collapsed_but_stable": len(collapsed_stable), "leads": leads}
    if not unstable:
        v1 = NOT_REPRODUCED
    elif len(with_collapse) == len(unstable) and len(first) == len(unstable):
        v1 = REPRODUCED
    elif with_collapse:
        v1 = PARTLY
    else:
        v1 = NOT_REPRODUCED
    out[1] = {"verdict": v1, "numbers": n1, "evidence": [
        f"{len(unstable)} runs became unstable (loss spike of >= {SPIKE_NATS} nats above the lowest earlier "
        f"logged loss, or a non-finite loss); {len(with_collapse)} of them also collapsed (a head below "
        f"{COLLAPSE_NATS} nats), in {len(first)} the collapse came first or at the same logged step.",
        f"Lead of the collapse over the instability (steps, positive = collapse first): {leads or 'none'}.",
        f"{len(collapsed_stable)} runs collapsed without a loss spike or divergence (collapse without "
        "instability: the loss plateaus instead)."]}
    # claim 2 ----------------------------------------------------------------------------------
    base = [r for r in runs if r["config"]["reparam"] == "none"]
    sig = [r for r in runs if r["config"]["reparam"] == "sigma"]
    base_c = sum(first_collapse_step(r["records"]) is not None for r in base)
    sig_c = sum(first_collapse_step(r["records"]) is not None for r in sig)
    cmp_b = [r for r in compare if r["method"] == "baseline"]
    cmp_s = [r for r in compare if r["method"] == "sigma-reparam"]
    cb = sum(r["collapsed"] == "True" for r in cmp_b)
    cs = sum(r["collapsed"] == "True" for r in cmp_s)
    trains_b = {(r["lr"]) for r in cmp_b if r["diverged"] != "True" and r["collapsed"] != "True"}
    trains_s = {(r["lr"]) for r in cmp_s if r["diverged"] != "True" and r["collapsed"] != "True"}
    robust = len(trains_s) >= len(trains_b)
    prevents = (base_c + cb) > 0 and (sig_c + cs) == 0
    v2 = REPRODUCED if prevents and robust else PARTLY if (prevents or (sig_c + cs) < (base_c + cb)) else NOT_REPRODUCED
    out[2] = {"verdict": v2, "numbers": {"baseline_runs": len(base), "baseline_collapsed": base_c,
                                         "sigma_runs": len(sig), "sigma_collapsed": sig_c,
                                         "compare_baseline_collapsed": cb, "compare_baseline_runs": len(cmp_b),
                                         "compare_sigma_collapsed": cs, "compare_sigma_runs": len(cmp_s),
                                         "compare_lrs_ok_baseline": sorted(trains_b, key=float),
                                         "compare_lrs_ok_sigma": sorted(trains_s, key=float)},
              "evidence": [
        f"This ledger's runs: {base_c} of {len(base)} baseline runs collapsed, {sig_c} of {len(sig)} sigmaReparam "
        "runs (by model, baseline / sigmaReparam collapsed of run: " + "; ".join(
            f"{m} {sum(first_collapse_step(r['records']) is not None for r in base if r['config']['model'] == m)}/"
            f"{sum(r['config']['model'] == m for r in base)} vs "
            f"{sum(first_collapse_step(r['records']) is not None for r in sig if r['config']['model'] == m)}/"
            f"{sum(r['config']['model'] == m for r in sig)}" for m in ("gpt", "vit", "seq2seq")) + ").",
        f"Committed GPT stabiliser sweep (results/compare-cpu/runs.csv): {cb} of {len(cmp_b)} baseline runs "
        f"collapsed, {cs} of {len(cmp_s)} sigmaReparam runs; learning rates at which some seed neither "
        f"collapsed nor diverged: baseline {sorted(trains_b, key=float)}, sigmaReparam "
        f"{sorted(trains_s, key=float)}."]}
    # claim 3 ----------------------------------------------------------------------------------
    vt = vit_table(runs)
    best = {}
    for recipe in sorted({r["recipe"] for r in vt}):
        rows = [r for r in vt if r["recipe"] == recipe]
        by_lr = {}
        for r in rows:
            by_lr.setdefault(r["lr"], []).append(0.0 if r["diverged"] else (r["accuracy"] or 0.0))
        if by_lr:
            lr, accs = max(by_lr.items(), key=lambda kv: (_mean(kv[1]), len(kv[1])))
            best[recipe] = {"lr": lr, "mean": _mean(accs), "std": _std(accs), "n": len(accs),
                            "by_lr": {k: _mean(v) for k, v in sorted(by_lr.items())}}
    harsh = [k for k in best if k.startswith("sigma-sgd")]
    if "standard" in best and harsh:
        top = max(harsh, key=lambda k: best[k]["mean"])
        gap = 100 * (best["standard"]["mean"] - best[top]["mean"])
        v3 = REPRODUCED if gap <= COMPETITIVE_POINTS else PARTLY if gap <= 10 else NOT_REPRODUCED
    else:
        gap, v3 = None, NOT_ATTEMPTED
    ev3 = [f"{k}: best test accuracy {100 * b['mean']:.1f} % (lr {b['lr']:g}, {b['n']} seed(s), sd "
           f"{100 * b['std']:.1f}); per lr (seed 0 and extra seeds averaged): "
           + ", ".join(f"{lr:g}: {100 * a:.1f} %" for lr, a in b["by_lr"].items()) for k, b in best.items()]
    if gap is not None:
        ev3.append(f"Gap standard - best sigmaReparam/SGD ({top}): {gap:.1f} points (competitive: <= "
                   f"{COMPETITIVE_POINTS:g}).")
    out[3] = {"verdict": v3, "numbers": {"best": best, "gap_points": gap}, "evidence": ev3}
    # claim 4 ----------------------------------------------------------------------------------
    st = seq2seq_table(runs)

    def ok(r):
        return not r["diverged"] and (r["accuracy"] or 0.0) >= S2S_TRAINS

    pairs = {}
    for r in st:
        pairs.setdefault((r["depth"], r["lr"]), {})[r["reparam"]] = r
    rescued = [k for k, p in pairs.items() if "none" in p and "sigma" in p and not ok(p["none"]) and ok(p["sigma"])]
    base_fail = [k for k, p in pairs.items() if "none" in p and not ok(p["none"])]
    sigma_fail = [k for k, p in pairs.items() if "sigma" in p and not ok(p["sigma"])]
    if not pairs:
        v4 = NOT_ATTEMPTED
    elif base_fail and len(rescued) == len(base_fail) and not sigma_fail:
        v4 = REPRODUCED
    elif rescued:
        v4 = PARTLY
    else:
        v4 = NOT_REPRODUCED
    out[4] = {"verdict": v4, "numbers": {"base_fail": sorted(base_fail), "sigma_fail": sorted(sigma_fail),
                                         "rescued": sorted(rescued)}, "evidence": [
        f"A run trains when it does not diverge and predicts >= {S2S_TRAINS:.0%} of the held-out target "
        "tokens (chance: 1/vocab).",
        f"(depth, lr) where the post-LN baseline fails: {sorted(base_fail) or 'none'}; where sigmaReparam "
        f"fails: {sorted(sigma_fail) or 'none'}; where sigmaReparam trains and the baseline does not: "
        f"{sorted(rescued) or 'none'}."]}
    # claim 5 ----------------------------------------------------------------------------------
    out[5] = {"verdict": NOT_ATTEMPTED, "numbers": {}, "evidence": [
        "No speech corpus ships inside an installed Python package and nothing may be downloaded here, so "
        "there is no speech-recognition run."]}
    # claim 6 ----------------------------------------------------------------------------------
    viol = sum(int(r["summary"].get("bound_violations") or 0) for r in runs)
    rows_checked = sum(int(rec.get("rows_checked") or 0) for r in runs for rec in r["records"])
    out[6] = {"verdict": REPRODUCED if viol == 0 and rows_checked > 0 else NOT_REPRODUCED,
              "numbers": {"bound_violations": viol, "rows_checked": rows_checked}, "evidence": [
        "The evidence for the bound (Theorem 3.1 / eq. (2)) is its proof in theory/README.md: the "
        "deductions (steps 4(b), 4(d)-(e), 6, d = 1) are proven on paper; `python -m theory.proof` verifies "
        "the proof's sympy identities for every T and corroborates the deductions on finite grids "
        "(tests/test_proof.py, tests/test_symbolic.py, tests/test_bound.py).",
        "The tightness construction (one-high rows, eq. (5)) attains the bound, checked against 50-digit "
        "mpmath, and an adversarial search for rows below the bound finds none (theory/certify.py, tests/test_certify.py).",
        f"Check of the software, not of the theorem: every logged step of every run here checks every "
        f"attention row of (part of) its batch against the bound: {rows_checked} row checks, {viol} "
        f"violations; these can only fail through a bug in the code."]}
    return out


# ---------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


RECIPE_STYLE = {"standard": ("tab:blue", "standard: pre-LN, AdamW, warm-up, wd"),
                "sigma-sgd": ("tab:green", "sigmaReparam: no LN, SGD, no warm-up, no wd"),
                "baseline-sgd": ("tab:red", "baseline: no LN, SGD, no warm-up, no wd")}


def plot_vit(runs: list[dict], out_dir: Path) -> list[Path]:
    plt = _plt()
    vt = vit_table(runs)
    if not vt:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for recipe, (color, label) in RECIPE_STYLE.items():
        rows = [r for r in vt if r["recipe"] == recipe]
        if not rows:
            continue
        lrs = sorted({r["lr"] for r in rows})
        for ax, key, scale in ((axes[0], "accuracy", 100), (axes[1], "entropy_min_head", 1), (axes[2], "sigma_max", 1)):
            mean = [_mean([(0.0 if (r["diverged"] and key == "accuracy") else r[key]) for r in rows if r["lr"] == lr])
                    for lr in lrs]
            ax.plot(lrs, [m * scale if m is not None else math.nan for m in mean], "o-", color=color, label=label)
            pts = [(r["lr"], r[key]) for r in rows if r[key] is not None]
            ax.scatter([p[0] for p in pts], [p[1] * scale for p in pts], color=color, s=12, alpha=0.6)
    axes[0].set(xscale="log", xlabel="learning rate (peak)", ylabel="test accuracy (%)",
                title="ViT on 8x8 digits: accuracy (line: mean over seeds)")
    axes[1].set(xscale="log", yscale="log", xlabel="learning rate (peak)", ylabel="nats",
                title="lowest head entropy at the end")
    axes[1].axhline(COLLAPSE_NATS, color="k", ls=":", lw=1)
    axes[2].set(xscale="log", yscale="log", xlabel="learning rate (peak)", ylabel="sigma_h",
                title="largest sigma_h at the end")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p1 = out_dir / "vit_sweep.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for recipe, (color, label) in RECIPE_STYLE.items():
        for r in runs:
            if r["config"]["model"] != "vit" or _group(r).split(" (")[0] != recipe or r["config"]["seed"] != 0:
                continue
            recs = [x for x in r["records"] if not x.get("diverged")]
            lr = r["config"]["lr"]
            long = _group(r) != recipe
            ls = "--" if long else "-"
            alpha = 1.0 if lr in (VIT_STD_LRS[0], VIT_SGD_LRS[1]) else 0.35
            steps = [x["step"] for x in recs]
            axes[0].plot(steps, [x["train_loss"] for x in recs], ls, color=color, alpha=alpha,
                         label=f"{recipe} lr {lr:g}" + (f", {r['config']['steps']} steps" if long else ""))
            axes[1].plot(steps, [x["entropy_min_head"] for x in recs], ls, color=color, alpha=alpha)
            axes[2].plot(steps, [x["sigma_max"] for x in recs], ls, color=color, alpha=alpha)
    axes[0].set(xlabel="step", ylabel="train loss", title="ViT training loss (seed 0; faint: other lrs; dashed: longer runs)")
    axes[1].set(xlabel="step", ylabel="nats", yscale="log", title="lowest head entropy")
    axes[1].axhline(COLLAPSE_NATS, color="k", ls=":", lw=1)
    axes[2].set(xlabel="step", ylabel="sigma_h", yscale="log", title="largest sigma_h")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p2 = out_dir / "vit_curves.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def plot_seq2seq(runs: list[dict], out_dir: Path) -> list[Path]:
    plt = _plt()
    st = seq2seq_table(runs)
    if not st:
        return []
    lrs = sorted({r["lr"] for r in st})
    fig, axes = plt.subplots(2, len(lrs), figsize=(5.5 * len(lrs), 7.5), squeeze=False)
    for j, lr in enumerate(lrs):
        for reparam, color in (("none", "tab:red"), ("sigma", "tab:green")):
            rows = sorted((r for r in st if r["lr"] == lr and r["reparam"] == reparam), key=lambda r: r["depth"])
            depths = [r["depth"] for r in rows]
            acc = [0.0 if r["diverged"] else 100 * (r["accuracy"] or 0.0) for r in rows]
            name = "baseline (post-LN)" if reparam == "none" else "sigmaReparam (post-LN)"
            axes[0, j].plot(depths, acc, "o-", color=color, label=name)
            for r, a in zip(rows, acc):
                if r["diverged"]:
                    axes[0, j].annotate(f"diverged @ {r['diverged_step']}", (r["depth"], a), fontsize=8,
                                        color=color, xytext=(3, 6), textcoords="offset points")
            ent = [r["entropy_min_head"] if r["entropy_min_head"] is not None else math.nan for r in rows]
            axes[1, j].plot(depths, ent, "o-", color=color, label=name)
        axes[0, j].set(xlabel="layers (encoder = decoder)", ylabel="held-out token accuracy (%)",
                       title=f"reversal, SGD momentum 0.9, no warm-up, lr {lr:g}", xscale="log")
        axes[0, j].axhline(100 * S2S_TRAINS, color="k", ls=":", lw=1)
        axes[1, j].set(xlabel="layers (encoder = decoder)", ylabel="nats", yscale="log", xscale="log",
                       title="lowest head entropy at the end (last logged step)")
        axes[1, j].axhline(COLLAPSE_NATS, color="k", ls=":", lw=1)
        for ax in axes[:, j]:
            ax.minorticks_off()
            ax.set_xticks(sorted({r["depth"] for r in st}))
            ax.set_xticklabels([str(d) for d in sorted({r["depth"] for r in st})])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "seq2seq_depth.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def plot_claim1(runs: list[dict], out_dir: Path, root: Path, max_runs: int = 8) -> list[Path]:
    plt = _plt()
    rows = [(r, instability(r)) for r in runs]
    rows = [(r, ev) for r, ev in rows if ev["unstable_step"] is not None][:max_runs]
    if not rows:
        return []
    n = len(rows)
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.6 * cols, 3.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (r, ev) in zip(axes.ravel(), rows):
        recs = [x for x in r["records"] if not x.get("diverged") and x.get("train_loss") is not None]
        steps = [x["step"] for x in recs]
        ax.plot(steps, [x["train_loss"] for x in recs], color="tab:blue", lw=1.2)
        ax.set_ylabel("train loss", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(steps, [x["entropy_min_head"] for x in recs], color="tab:orange", lw=1.2)
        ax2.set_yscale("log")
        ax2.set_ylabel("lowest head entropy (nats)", color="tab:orange")
        ax2.axhline(COLLAPSE_NATS, color="tab:orange", ls=":", lw=1)
        if ev["collapse_step"] is not None:
            ax.axvline(ev["collapse_step"], color="tab:orange", ls="--", lw=1, label=f"collapse {ev['collapse_step']}")
        ax.axvline(ev["unstable_step"], color="k", ls="--", lw=1,
                   label=("diverged " if ev["diverged_step"] == ev["unstable_step"] else "spike ")
                   + str(ev["unstable_step"]))
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("step")
        ax.set_title(_label(r, root), fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("Claim 1: entropy collapse and instability in time (dashed: first collapse / first instability)")
    fig.tight_layout()
    p = out_dir / "claim1_timelines.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


# ---------------------------------------------------------------------------------- the ledger
CLAIMS = {
    1: "Across architectures and tasks, pathologically low attention entropy accompanies training "
       "instability (oscillating loss or divergence).",
    2: "sigmaReparam prevents entropy collapse and makes training more robust to hyperparameters.",
    3: "sigmaReparam trains a Vision Transformer to competitive accuracy without warm-up, weight decay, "
       "LayerNorm or adaptive optimisers.",
    4: "sigmaReparam trains deep machine-translation (post-LN) architectures without warm-up and adaptive "
       "optimisers.",
    5: "The same for speech recognition.",
    6: "A tight lower bound on attention entropy, decreasing exponentially in the spectral norm of the "
       "attention logits.",
}


def _fmt(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:
        return path.as_posix()


def write_ledger(results: str | os.PathLike = "results/claims", out: str | os.PathLike = "docs/claims.md", *,
                 extra_roots=("results/cpu-demo",), compare_csv="results/compare-cpu/runs.csv") -> Path:
    """Read the runs under ``results`` (and ``extra_roots``: other committed GPT runs, for claim 1),
    draw the figures into ``results/figures`` and write the ledger ``out``; returns its path."""
    root, out = Path(results), Path(out)
    runs = load_runs(root)
    extra = [r for e in extra_roots if Path(e).exists() for r in load_runs(e)]
    cmp_rows = compare_rows(compare_csv)
    figs = root / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    fig_vit = plot_vit(runs, figs)
    fig_s2s = plot_seq2seq(runs, figs)
    fig_c1 = plot_claim1(runs + extra, figs, root.parent)
    v = verdicts(runs + extra, cmp_rows)
    base = out.parent
    commits = sorted({r["config"].get("git_commit", "unknown") for r in runs})
    dirty = [r for r in runs if r["config"].get("git_dirty") or str(r["config"].get("git_commit", "")).endswith("-dirty")]
    L = ["# The paper's claims, checked at classroom scale", "",
         "Zhai et al., \"Stabilizing Transformer Training by Preventing Attention Entropy Collapse\", ICML 2023 "
         "(PMLR 202:40770-40803, arXiv 2303.06296). This page is generated from committed results by "
         "`python -m sigma_core.experiments.claims ledger`; every verdict is computed from the data "
         "(the rules are in `sigma_core/experiments/claims.py`). Negative and partial results stay in.", "",
         f"Runs: {len(runs)} under `{root.as_posix()}/` (trained by `python -m sigma_core.experiments.claims run "
         f"--out {root.as_posix()} --jobs 2`, each run one `entropy-collapse train` command recorded in its "
         f"`config.json`), from commit(s) {', '.join('`' + c[:12] + '`' for c in commits)}"
         + (f"; {len(dirty)} from a dirty tree" if dirty else ", all from a clean tree")
         + f"; plus {len(extra)} committed GPT runs ({', '.join('`' + e + '/`' for e in extra_roots)}) for claim 1 "
         f"and the committed stabiliser sweep `{compare_csv}` for claim 2. CPU only, two cores.", "",
         "| # | claim | verdict |", "|---|---|---|"]
    for k in sorted(CLAIMS):
        L.append(f"| {k} | {CLAIMS[k]} | **{v[k]['verdict']}** |")
    L += ["", "Definitions used by the verdicts: a head has *collapsed* when its mean entropy (rows with at "
          f"least half the keys) falls below {COLLAPSE_NATS} nats; a run is *unstable* at the first logged step "
          f"whose training loss exceeds the lowest earlier logged loss by {SPIKE_NATS} nats, or at a non-finite "
          "loss or gradient (the run stops there: *diverged*). Steps are logged every `log_every` steps, so every "
          "time below is known to that resolution.", ""]

    def figure(paths):
        return [f"![{p.stem}]({_rel(p, base)})" for p in paths] + [""]

    # claim 1
    c1 = claim1_table(runs + extra)
    L += [f"## Claim 1: {CLAIMS[1]}", "", f"**Verdict: {v[1]['verdict']}.**", ""] + [f"- {e}" for e in v[1]["evidence"]]
    L += ["", "Command: the runs of claims 2-4 plus `entropy-collapse train --preset cpu-compare --lr 0.1 "
          "--log-every 2 --out ...` (the GPT runs under `results/claims/gpt/`).", "",
          "| run | model | reparam | lr | first collapse | first instability | diverged at | lead (steps) | log every |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in c1:
        L.append(f"| `{_rel(r['dir'], base)}` | {r['model']} | {r['reparam']} | {r['lr']:g} | {_fmt(r['collapse_step'])} "
                 f"| {_fmt(r['unstable_step'])} | {_fmt(r['diverged_step'])} | {_fmt(r['lead'])} | {r['log_every']} |")
    L += [""] + figure(fig_c1)
    L += ["Caveats: the runs are tiny and short; a loss spike here is a rise of half a nat over the run's best "
          "logged loss, which also catches a run that simply stops improving after an early dip only if it rises "
          "again. The paper's Figure 1 pattern (entropy falls, then the loss spikes) is what the lead column measures; "
          "runs that collapse but never spike (loss plateau) are counted separately above. "
          "At the GPT's large learning rates (0.1, 0.3) the first logged steps already spike and collapse "
          "within 2-6 steps of each other, at the logging resolution (every 2 steps): there the order is not "
          "resolved. A negative lead means the loss spiked before any head fell below 0.1 nats.", ""]
    # claim 2
    L += [f"## Claim 2: {CLAIMS[2]}", "", f"**Verdict: {v[2]['verdict']}.**", ""] + [f"- {e}" for e in v[2]["evidence"]]
    L += ["", "Command: the baseline/sigmaReparam pairs of claims 3 and 4 (same recipe, learning rate and seed), "
          "and `entropy-collapse compare` (results/compare-cpu: 6 methods x 6 learning rates x 3 seeds).", "",
          "Caveats: robustness to hyperparameters is measured over learning rates only (and, for the ViT, the "
          "harsh recipe; for the seq2seq model, depth); the paper also varies warm-up and optimiser at far larger "
          "scale. The 0.1-nat collapse threshold counts every head, but in sequence reversal each output token "
          "should attend to exactly one source position, so a near-one-hot cross-attention head is the task's "
          "solution, not a pathology: a sigmaReparam seq2seq run that solves the task can count as "
          "'collapsed' here (compare its accuracy in claim 4).", ""]
    # claim 3
    L += [f"## Claim 3: {CLAIMS[3]}", "", f"**Verdict: {v[3]['verdict']}.**", ""] + [f"- {e}" for e in v[3]["evidence"]]
    L += ["", "Commands:", "", "```", "entropy-collapse train --preset vit-digits --out runs/vit-standard            "
          "# pre-LN, AdamW, 30 warm-up steps, wd 0.05, cosine",
          "entropy-collapse train --preset vit-digits-sgd --out runs/vit-sigma-sgd       "
          "# sigmaReparam, no LN, SGD m=0.9, no warm-up, no wd",
          "entropy-collapse train --preset vit-digits-sgd --reparam none --out runs/vit-baseline-sgd", "```", "",
          "| recipe | lr | seed | test accuracy | val loss | lowest head entropy | mean entropy | max sigma_h | collapse step | run |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in vit_table(runs):
        acc = "diverged" if r["diverged"] else f"{100 * r['accuracy']:.1f} %"
        L.append(f"| {r['recipe']} | {r['lr']:g} | {r['seed']} | {acc} | {_fmt(r['val_loss'])} | {_fmt(r['entropy_min_head'])} "
                 f"| {_fmt(r['entropy_mean'])} | {_fmt(r['sigma_max'])} | {_fmt(r['collapse_step'])} | `{_rel(r['dir'], base)}` |")
    L += [""] + figure(fig_vit)
    L += [f"Caveats: 1 437 training images of 8x8 pixels, 300 steps (one harsh-recipe pair {VIT_LONG_STEPS} steps), a 4-layer d=64 ViT with 2x2 patches "
          "(17 tokens); the paper trains ViT-B on ImageNet for hundreds of epochs. Both recipes keep a cosine "
          "decay of the learning rate; the harsh recipe removes LayerNorm, warm-up, weight decay and Adam. "
          "sigmaReparam here reparametrises every linear layer and the patch-embedding convolution with "
          "gamma initialised to 1. A near-uniform attention head on 17 tokens has entropy log 17 = 2.83 nats.", ""]
    # claim 4
    L += [f"## Claim 4: {CLAIMS[4]}", "", f"**Verdict: {v[4]['verdict']}.**", ""] + [f"- {e}" for e in v[4]["evidence"]]
    L += ["", "Command (depth N encoder + N decoder layers):", "", "```",
          "entropy-collapse train --preset seq2seq-reverse --n-layer 6 --lr 0.1 --out runs/s2s-base",
          "entropy-collapse train --preset seq2seq-reverse --n-layer 6 --lr 0.1 --reparam sigma --out runs/s2s-sigma",
          "```", "", "| lr | depth | reparam | token accuracy | val loss | lowest head entropy | max sigma_h | diverged at | first spike | collapse step | run |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in seq2seq_table(runs):
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f} %"
        L.append(f"| {r['lr']:g} | {r['depth']} | {r['reparam']} | {acc} | {_fmt(r['val_loss'])} | {_fmt(r['entropy_min_head'])} "
                 f"| {_fmt(r['sigma_max'])} | {_fmt(r['diverged_step'])} | {_fmt(r['spike_step'])} | {_fmt(r['collapse_step'])} "
                 f"| `{_rel(r['dir'], base)}` |")
    L += [""] + figure(fig_s2s)
    L += ["Caveats: reversal of 8 symbols (vocabulary 10) stands in for translation; d=32, 200 SGD steps "
          "(momentum 0.9, constant learning rate), at most 12+12 layers against the paper's 100+100. Accuracy is "
          "per target token under teacher forcing on 256 held-out sequences. Cross-attention rows are checked "
          "against the bound with the encoder tokens as keys.", ""]
    # claims 5, 6
    L += [f"## Claim 5: {CLAIMS[5]}", "", f"**Verdict: {v[5]['verdict']}.**", ""] + [f"- {e}" for e in v[5]["evidence"]]
    L += ["", f"## Claim 6: {CLAIMS[6]}", "", f"**Verdict: {v[6]['verdict']}.**", ""] + [f"- {e}" for e in v[6]["evidence"]]
    L += ["", "Commands: `pytest tests/test_bound.py tests/test_proof.py tests/test_symbolic.py`; the bound's "
          "derivation and tightness are in `theory/README.md`.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L))
    return out


if __name__ == "__main__":
    sys.exit(main())
