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

#: minimum-head entropy (nats) below which a head counts as collapsed (as in the run report)
COLLAPSE_NATS = 0.1
#: a loss spike: a logged training loss this many nats above the lowest earlier logged loss
SPIKE_NATS = 0.5

VIT_STD_LRS = (1e-3, 3e-3)
VIT_SGD_LRS = (0.03, 0.1, 0.3)
VIT_SEEDS = (1, 2)  # extra seeds at the middle learning rate of each recipe
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


def write_ledger(results, out):  # filled in below (the analysis)
    raise NotImplementedError


if __name__ == "__main__":
    sys.exit(main())
