"""The speech claim at classroom scale: spoken digit strings, a deep post-LN CTC encoder, SGD.

:class:`SpokenDigitsTask` (``model="speech"``) serves the corpus of
:mod:`sigma_core.experiments.speech_data` (espeak-ng digit strings as log-mel frames, split by
utterance into train / validation / test) to :class:`~sigma_core.experiments.train.Trainer`:
features standardised with the training frames' mean and standard deviation, every utterance
padded (with the standardised floor of the dB range, :data:`~sigma_core.experiments.speech_data.DB_MIN`)
to ``STACK * block_size`` frames (:data:`sigma_core.models.speech.STACK` frames per token), targets padded with -1.  During training the held-out set is the
validation split, and ``val_accuracy`` is ``1 - digit error rate`` on it (:func:`error_rate`:
Levenshtein edits of the best-path decoding over reference digits).

``python -m sigma_core.experiments.speech run [--out results/claims/speech] [--jobs 2]`` trains
the sweep of :func:`planned_runs` (baseline and sigmaReparam, each at :data:`LRS` and
:data:`SEEDS`, the same step budget) with ``entropy-collapse train`` subprocesses, then
evaluates each finished run's final model on the validation *and* test splits
(:func:`evaluate_run`, written to ``eval.json``) and drops the checkpoint.  The learning rate
of each method is chosen on validation error and reported on test error (:func:`summarise`).

Example
-------
>>> edit_distance([1, 2, 3], [1, 3]), edit_distance([], [4, 4]), edit_distance([5, 6], [6, 5])
(1, 2, 2)
>>> error_rate([[1, 2, 3], [7]], [[1, 3], [7, 7]])     # 1 + 1 edits over 2 + 2 reference digits
0.5
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sigma_core.experiments import speech_data

LRS = (0.01, 0.03, 0.1, 0.3)
SEEDS = (0, 1, 2)
METHODS = {"baseline": "none", "sigma": "sigma"}
PRESET = "speech-digits"
#: held-out splits are evaluated in this many batches
EVAL_BATCHES = 2


# ---------------------------------------------------------------------------------- metrics
def edit_distance(hyp, ref) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1) of two sequences."""
    hyp, ref = list(hyp), list(ref)
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        cur = [i]
        for j, r in enumerate(ref, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def error_rate(hyps, refs) -> float:
    """Total :func:`edit_distance` over total reference length (the digit error rate)."""
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
    n = sum(len(r) for r in refs)
    if n == 0:
        raise ValueError("refs must hold at least one symbol")
    return sum(edit_distance(h, r) for h, r in zip(hyps, refs)) / n


# ---------------------------------------------------------------------------------- the task
@functools.lru_cache(maxsize=1)
def _corpus(path: str):
    return speech_data.load(path)


class SpokenDigitsTask:
    """espeak-ng digit strings as log-mel frames (the speech model's task)."""

    name = "espeak-ng-spoken-digits"

    def __init__(self, cfg, path: str | os.PathLike = speech_data.PATH):
        data = _corpus(str(path))
        self.manifest = data["manifest"]
        self.sha256 = self.manifest["sha256"]
        from sigma_core.models.speech import STACK  # noqa: PLC0415

        self.n_frames = STACK * cfg.block_size
        train_feats = data["train"][0]
        longest = max(len(f) for split in speech_data.SPLITS for f in data[split][0])
        if longest > self.n_frames:
            raise ValueError(f"block_size must be at least {math.ceil(longest / STACK)} (the longest utterance "
                             f"has {longest} frames, {STACK} per token), got {cfg.block_size}")
        frames = np.concatenate(train_feats)
        self.mean, self.std = float(frames.mean()), float(frames.std())
        self.splits = {s: self._tensors(*data[s]) for s in speech_data.SPLITS}
        self.batch_size, self.sample_batch = cfg.batch_size, cfg.sample_batch
        self.test_split = bool(getattr(cfg, "test_split", False))
        self.tokens_per_example = cfg.block_size
        self.n_train = len(self.splits["train"][0])

    def _tensors(self, feats, labels):
        pad = (speech_data.DB_MIN - self.mean) / self.std
        x = np.full((len(feats), self.n_frames, speech_data.N_MELS), pad, dtype=np.float32)
        y = np.full((len(labels), speech_data.MAX_DIGITS), -1, dtype=np.int64)
        for i, (f, lab) in enumerate(zip(feats, labels)):
            x[i, : len(f)] = (f - self.mean) / self.std
            y[i, : len(lab)] = lab
        return torch.from_numpy(x), torch.from_numpy(y)  # (N, F, n_mels), (N, S)

    def describe(self) -> dict:
        m = self.manifest
        return {"source": self.name, "espeak_ng": m["espeak_ng"], "sha256": self.sha256,
                "n_split": m["n_split"], "build_seed": m["seed"], "command": m["command"],
                "path": "sigma_core/experiments/corpus/spoken_digits.npz"}

    def config_fields(self) -> dict:
        return {"data": self.describe(), "data_sha256": self.sha256}

    def train_batch(self, batch_size: int, generator: torch.Generator, device="cpu"):
        x, y = self.splits["train"]
        idx = torch.randint(len(x), (batch_size,), generator=generator)  # (B,)
        return x[idx].to(device), y[idx].to(device)

    def batches(self, split: str, device="cpu"):
        """The whole ``split`` (train, val or test) in :data:`EVAL_BATCH` batches of equal size
        (every utterance is padded to the same length, so the batching changes no output)."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {speech_data.SPLITS}, got {split!r}")
        x, y = self.splits[split]
        size = math.ceil(len(x) / EVAL_BATCHES)
        return [(x[i:i + size].to(device), y[i:i + size].to(device)) for i in range(0, len(x), size)]

    def eval_batches(self, device="cpu"):
        """The validation split (what the run sees while it trains)."""
        return self.batches("val", device)

    def test_batches(self, device="cpu"):
        """The test split when the config asks for one (``test_split``), else ``None``."""
        return self.batches("test", device) if self.test_split else None

    def sample_inputs(self, device="cpu") -> tuple:
        return (self.splits["val"][0][: self.sample_batch].to(device),)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """``(reference digits - edits, reference digits)``: their ratio is 1 - digit error rate."""
        from sigma_core.models.speech import greedy_decode  # noqa: PLC0415

        refs = [[int(v) for v in row if v >= 0] for row in y.tolist()]
        hyps = greedy_decode(logits.argmax(-1))
        n = sum(len(r) for r in refs)
        return n - sum(edit_distance(h, r) for h, r in zip(hyps, refs)), n


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: SpokenDigitsTask, split: str) -> dict:
    """``{"loss", "error_rate", "digits"}`` of ``model`` (eval mode) on a split of ``task``."""
    from sigma_core.models.speech import greedy_decode  # noqa: PLC0415

    was = model.training
    model.eval()
    losses, hyps, refs, sizes = [], [], [], []
    for x, y in task.batches(split):
        logits, loss = model(x, y)
        losses.append(float(loss))
        sizes.append(len(x))
        hyps += greedy_decode(logits.argmax(-1))
        refs += [[int(v) for v in row if v >= 0] for row in y.tolist()]
    model.train(was)
    return {"loss": float(np.average(losses, weights=sizes)), "error_rate": error_rate(hyps, refs),
            "digits": sum(len(r) for r in refs)}


def evaluate_run(run_dir: str | os.PathLike) -> dict:
    """Evaluate a finished run's final model (its ``checkpoint.pt``) on validation and test and
    write ``eval.json``; a diverged run (no finite final model) gets error rate 1 on both."""
    from sigma_core.experiments.train import Trainer  # noqa: PLC0415

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["diverged"]:
        out = {"diverged": True, "val": {"loss": None, "error_rate": 1.0}, "test": {"loss": None, "error_rate": 1.0}}
    else:
        trainer = Trainer.resume(run_dir, allow_dirty=True)
        out = {"diverged": False, **{s: evaluate(trainer.model, trainer.task, s) for s in ("val", "test")}}
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------- the sweep
def _lr(x: float) -> str:
    return f"{x:g}"


def method_of(config: dict) -> str:
    """``"baseline"``, ``"sigma"`` (sigmaReparam, gamma initialised to 1, the training default) or
    ``"sigma-gamma-sigma"`` (gamma initialised to sigma(W_0), so that W_hat = W_0 at the start)."""
    if config["reparam"] != "sigma":
        return "baseline"
    return "sigma" if config.get("gamma_init", "one") == "one" else "sigma-gamma-sigma"


def planned_runs(lrs=LRS, seeds=SEEDS, extra_flags=(), methods=tuple(METHODS), gamma_init="one") -> list[tuple[str, list[str]]]:
    """``(run path relative to the sweep folder, train flags)`` of every run (``gamma_init="sigma"``:
    the sigmaReparam runs with gamma = sigma(W_0), in folder ``sigma-gamma-sigma``)."""
    out = []
    for label in methods:
        reparam = METHODS[label]
        flags = ["--gamma-init", gamma_init] if reparam == "sigma" and gamma_init != "one" else []
        name = "sigma-gamma-sigma" if flags else label
        out += [(f"{name}/lr_{_lr(lr)}/seed_{seed}",
                 ["--preset", PRESET, "--reparam", reparam, "--lr", _lr(lr), "--seed", str(seed), *flags, *extra_flags])
                for lr in lrs for seed in seeds]
    return out


def _train_and_evaluate(out: Path, flags: list[str]) -> str:
    if (out / "eval.json").exists():
        return f"skip {out}"
    cmd = [sys.executable, "-m", "sigma_core.cli", "train", "--out", str(out), "--threads", "1",
           "--no-progress", "--checkpoint-every", "0", *flags]
    if (out / "summary.json").exists() and (out / "checkpoint.pt").exists():
        pass  # trained, not yet evaluated
    else:
        for f in (out.rglob("*") if out.exists() else []):
            if f.is_file():
                f.unlink()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:  # a diverged run exits 0 (divergence is a result)
            return f"FAILED {out} ({proc.returncode}): {proc.stderr[-2000:]}"
    torch.set_num_threads(1)
    ev = evaluate_run(out)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        ckpt.unlink()  # results keep config, metrics, summary, eval and samples, not weights
    return f"done {out}: val {ev['val']['error_rate']:.3f} test {ev['test']['error_rate']:.3f}"


def run_all(out_dir: str | os.PathLike, *, jobs: int = 1, lrs=LRS, seeds=SEEDS, extra_flags=(),
            methods=tuple(METHODS), gamma_init="one") -> None:
    """Train and evaluate every planned run into ``out_dir`` (``jobs`` at a time, one thread each)."""
    out = Path(out_dir)
    todo = [(out / rel, flags) for rel, flags in planned_runs(lrs, seeds, extra_flags, methods, gamma_init)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for msg in pool.map(lambda job: _train_and_evaluate(*job), todo):
            print(msg, flush=True)


# ---------------------------------------------------------------------------------- reading
def load_sweep(root: str | os.PathLike) -> list[dict]:
    """One row per evaluated run under ``root``: method, lr, seed, val/test error, divergence,
    final lowest-head entropy and largest sigma_h."""
    rows = []
    for ev_path in sorted(Path(root).rglob("eval.json")):
        d = ev_path.parent
        cfg = json.loads((d / "config.json").read_text())
        summary = json.loads((d / "summary.json").read_text())
        ev = json.loads(ev_path.read_text())
        records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows.append({"records": records, "summary": summary, "block_size": cfg["block_size"], "dir": d, "method": method_of(cfg), "lr": cfg["lr"],
                     "seed": cfg["seed"], "steps": cfg["steps"], "n_layer": cfg["n_layer"],
                     "val_error": ev["val"]["error_rate"], "test_error": ev["test"]["error_rate"],
                     "diverged": summary["diverged"], "diverged_step": summary["diverged_step"],
                     "entropy_min_head": summary.get("entropy_min_head"), "sigma_max": summary.get("sigma_max")})
    return sorted(rows, key=lambda r: (r["method"], r["lr"], r["seed"]))


def _sd(xs) -> float:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def summarise(rows: list[dict]) -> dict:
    """Per method: the mean (and sd) validation and test error per learning rate over seeds, and
    the learning rate of lowest mean *validation* error with its *test* error (mean, sd, n)."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        by_lr = {}
        for r in rows:
            if r["method"] == method:
                by_lr.setdefault(r["lr"], []).append(r)
        per_lr = {lr: {"val_mean": float(np.mean([r["val_error"] for r in rs])),
                       "val_sd": _sd([r["val_error"] for r in rs]),
                       "test_mean": float(np.mean([r["test_error"] for r in rs])),
                       "test_sd": _sd([r["test_error"] for r in rs]), "n": len(rs),
                       "diverged": sum(r["diverged"] for r in rs)} for lr, rs in sorted(by_lr.items())}
        best = min(per_lr, key=lambda lr: per_lr[lr]["val_mean"])
        out[method] = {"per_lr": per_lr, "chosen_lr": best, **{k: per_lr[best][k] for k in
                                                                ("val_mean", "test_mean", "test_sd", "n")}}
    return out


def run_events(row: dict, definitions=None) -> dict:
    """Collapse, instability, divergence and learning of one run under ``definitions``
    (:mod:`sigma_core.experiments.definitions`; default its ``DEFAULT``).  A run *learned* when its
    final validation error rate is below 1 (the error of an empty transcript) by the definitions'
    ``learn_margin``; it is *stable* when it learned and neither collapsed nor diverged."""
    from sigma_core.experiments import definitions as defs  # noqa: PLC0415

    d = defs.DEFAULT if definitions is None else definitions
    recs = row["records"]
    div = defs.diverged(recs, row["summary"])
    collapse = defs.first_collapse_step(recs, seq_len=row["block_size"], definitions=d)
    unstable = defs.first_instability_step(recs, summary=row["summary"], definitions=d)
    learned = not div and defs.learned(row["val_error"], 1.0, definitions=d)
    return {"diverged": div, "collapse_step": collapse, "unstable_step": unstable, "learned": learned,
            "stable": learned and collapse is None and not div}


def claim_verdict(rows: list[dict], definitions=None) -> dict:
    """Claim 5's verdict from the sweep's rows under ``definitions``.

    Each method's learning rate is the one of lowest mean validation error (:func:`summarise`);
    its test error rate, as accuracy ``1 - error``, is compared with the baseline's by
    ``definitions.competitive`` (points; a difference within the seeds' spread is no difference).
    *reproduced*: sigmaReparam's chosen setting is stable (every seed learned, none collapsed or
    diverged) and competitive with the tuned baseline; *partly*: some sigmaReparam setting is
    stable but it is not competitive; *not reproduced at this scale*: no sigmaReparam setting is
    stable.  Returns ``{"verdict", "numbers"}``.
    """
    from sigma_core.experiments import definitions as defs  # noqa: PLC0415

    d = defs.DEFAULT if definitions is None else definitions
    if not rows:
        return {"verdict": "not attempted", "numbers": {}}
    summ = summarise(rows)
    stable = {}
    for r in rows:
        stable.setdefault(r["method"], {}).setdefault(r["lr"], []).append(run_events(r, d)["stable"])
    stable = {m: {lr: defs.stable_setting(v, definitions=d) for lr, v in by.items()} for m, by in stable.items()}

    def acc(method):
        lr = summ[method]["chosen_lr"]
        return [1.0 - r["test_error"] for r in rows if r["method"] == method and r["lr"] == lr]

    numbers = {"summary": summ, "stable_lrs": {m: sorted(lr for lr, ok in by.items() if ok) for m, by in stable.items()}}
    if "sigma" not in summ or "baseline" not in summ:
        return {"verdict": "not attempted", "numbers": numbers}
    comp = defs.competitive(acc("sigma"), acc("baseline"), definitions=d)
    numbers["competitive"] = comp
    if stable["sigma"].get(summ["sigma"]["chosen_lr"]) and comp:
        verdict = "reproduced"
    elif any(stable["sigma"].values()):
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced at this scale"
    return {"verdict": verdict, "numbers": numbers}


def claim_sensitivity(rows: list[dict]) -> dict[str, str]:
    """Definition name -> claim 5's verdict under it, over :func:`definitions.alternatives`."""
    from sigma_core.experiments import definitions as defs  # noqa: PLC0415

    return {d.name: claim_verdict(rows, d)["verdict"] for d in defs.alternatives()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigma_core.experiments.speech", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate the sweep")
    run.add_argument("--out", default="results/claims/speech")
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    run.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    run.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    run.add_argument("--gamma-init", choices=("one", "sigma"), default="one",
                     help="sigmaReparam's gamma initialisation (sigma: the diagnostic runs, folder sigma-gamma-sigma)")
    show = sub.add_parser("summary", help="print the per-method summary of a finished sweep")
    show.add_argument("--results", default="results/claims/speech")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {args.jobs}")
        run_all(args.out, jobs=args.jobs, lrs=tuple(args.lrs), seeds=tuple(args.seeds), methods=tuple(args.methods),
                gamma_init=args.gamma_init)
        return 0
    rows = load_sweep(args.results)
    print(json.dumps(summarise(rows), indent=2, default=str))
    for r in rows:
        ev = run_events(r)
        print(f"{r['method']:9s} lr {r['lr']:<5g} seed {r['seed']}  val {r['val_error']:.3f}  test {r['test_error']:.3f}"
              f"  min-head entropy {r['entropy_min_head'] if r['entropy_min_head'] is None else round(r['entropy_min_head'], 3)}"
              f"  {ev}")
    print(json.dumps({"verdict": claim_verdict(rows)["verdict"], "sensitivity": claim_sensitivity(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------- the ledger
def rows_from_runs(runs: list[dict]) -> list[dict]:
    """The :func:`load_sweep` rows of the speech runs among ``runs`` (dicts of
    :func:`sigma_core.experiments.claims.read_run`) that have an ``eval.json``."""
    rows = []
    for r in runs:
        c = r["config"]
        if c.get("model") != "speech" or not (Path(r["dir"]) / "eval.json").exists():
            continue
        ev = json.loads((Path(r["dir"]) / "eval.json").read_text())
        rows.append({"dir": r["dir"], "records": r["records"], "summary": r["summary"], "block_size": c["block_size"],
                     "method": method_of(c), "lr": c["lr"], "seed": c["seed"],
                     "steps": c["steps"], "n_layer": c["n_layer"], "val_error": ev["val"]["error_rate"],
                     "test_error": ev["test"]["error_rate"], "diverged": r["summary"]["diverged"],
                     "diverged_step": r["summary"]["diverged_step"],
                     "entropy_min_head": r["summary"].get("entropy_min_head"), "sigma_max": r["summary"].get("sigma_max")})
    return sorted(rows, key=lambda x: (x["method"], x["lr"], x["seed"]))


def ledger_entry(runs: list[dict], definitions=None) -> dict:
    """Claim 5's ``{"verdict", "numbers", "evidence"}`` for the claims ledger (:func:`claim_verdict`)."""
    from sigma_core.experiments import definitions as defs  # noqa: PLC0415

    d = defs.DEFAULT if definitions is None else definitions
    rows = rows_from_runs(runs)
    if not rows:
        return {"verdict": "not attempted", "numbers": {}, "evidence": ["No speech run in this ledger's results."]}
    v = claim_verdict(rows, d)
    n = v["numbers"]
    ev = []
    label = {"baseline": "baseline", "sigma": "sigmaReparam",
             "sigma-gamma-sigma": "Diagnostic, not part of the verdict: sigmaReparam with gamma initialised to sigma(W_0)"}
    for m in label:
        s = n["summary"].get(m)
        if s is None:
            continue
        accs = [1 - r["test_error"] for r in rows if r["method"] == m and r["lr"] == s["chosen_lr"]]
        events = [run_events(r, d) for r in rows if r["method"] == m]
        ev.append(f"{label[m]} (post-LN, SGD, no warm-up): learning rate "
                  f"{s['chosen_lr']:g} chosen on validation error ({100 * s['val_mean']:.1f} %); test digit error rate "
                  f"{100 * s['test_mean']:.1f} % (spread {100 * defs.spread(accs, definitions=d):.1f} points over "
                  f"{s['n']} seeds); stable learning rates {n['stable_lrs'].get(m) or 'none'}; of {len(events)} runs "
                  f"{sum(e['learned'] for e in events)} learned, {sum(e['collapse_step'] is not None for e in events)} "
                  f"collapsed, {sum(e['diverged'] for e in events)} diverged.")
    grads = []
    for m in label:
        s = n["summary"].get(m)
        rs = [r for r in rows if r["method"] == m and s is not None and r["lr"] == s["chosen_lr"]]
        g = [[x["grad_norm"] for x in r["records"] if x.get("grad_norm") is not None and not x.get("diverged")]
             for r in rs]
        g = [x for x in g if len(x) > 4]
        if g:
            grads.append(f"{m} at lr {s['chosen_lr']:g}: {np.median([x[0] for x in g]):.3g} at step 1, "
                         f"{np.median([np.mean(x[-5:]) for x in g]):.3g} over the last 5 logged steps")
    if grads:
        ev.append("Gradient norm (median over seeds) — " + "; ".join(grads) + ". A method whose gradient stays "
                  "near zero while its loss sits at the blank plateau has stopped learning, not become unstable.")
    ev.append(f"Competitive (test accuracy = 1 - error, within {d.competitive_points:g} points of the tuned baseline or "
              f"no difference beyond the spread): {n.get('competitive')}.")
    return {"verdict": v["verdict"], "numbers": n, "evidence": ev}


def plot_sweep(runs: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """``speech_sweep.png``: test error per learning rate (both methods, every seed) and the
    lowest head entropy and training loss over the steps of seed 0."""
    rows = rows_from_runs(runs)
    if not rows:
        return []
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    colors = {"baseline": "tab:red", "sigma": "tab:green", "sigma-gamma-sigma": "tab:blue"}
    names = {"baseline": "baseline (post-LN)", "sigma": "sigmaReparam (post-LN)",
             "sigma-gamma-sigma": "sigmaReparam, gamma_0 = sigma(W_0) (diagnostic)"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in colors:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        lrs = sorted({r["lr"] for r in rs})
        axes[0].plot(lrs, [100 * np.mean([r["test_error"] for r in rs if r["lr"] == lr]) for lr in lrs], "o-",
                     color=colors[m], label=names[m])
        axes[0].scatter([r["lr"] for r in rs], [100 * r["test_error"] for r in rs], color=colors[m], s=12, alpha=0.6)
        for i, lr in enumerate(lrs):
            r0 = next((r for r in rs if r["lr"] == lr and r["seed"] == min(x["seed"] for x in rs)), None)
            if r0 is None:
                continue
            recs = [x for x in r0["records"] if not x.get("diverged") and x.get("entropy_min_head") is not None]
            alpha = 0.35 + 0.65 * (i + 1) / len(lrs)
            axes[1].plot([x["step"] for x in recs], [x["entropy_min_head"] for x in recs], color=colors[m], alpha=alpha,
                         label=f"{m} lr {lr:g}")
            axes[2].plot([x["step"] for x in recs], [x["train_loss"] for x in recs], color=colors[m], alpha=alpha,
                         label=f"{m} lr {lr:g}")
    axes[0].set(xscale="log", xlabel="learning rate (peak)", ylabel="test digit error rate (%)",
                title="spoken digits, CTC, SGD, no warm-up (line: mean of seeds)")
    axes[1].set(yscale="log", xlabel="step", ylabel="nats", title="lowest head entropy (seed 0)")
    axes[2].set(yscale="log", xlabel="step", ylabel="CTC loss per digit", title="training loss (seed 0)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=6, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_dir) / "speech_sweep.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


def ledger_lines(runs: list[dict], base: Path, figures: list[Path]) -> list[str]:
    """The claim-5 section's table, figure, commands and caveats (after its verdict and evidence)."""
    rows = rows_from_runs(runs)
    if not rows:
        return []
    summ = summarise(rows)
    L = ["", "Command: `python -m sigma_core.experiments.speech run --out results/claims/speech --jobs 2` "
         f"(each run `entropy-collapse train --preset {PRESET} --reparam none|sigma --lr LR --seed S`, then its final "
         "model evaluated on the validation and test splits into `eval.json`). Corpus: "
         "`python -m sigma_core.experiments.speech_data build` (espeak-ng "
         f"{rows and json.loads((Path(rows[0]['dir']) / 'config.json').read_text())['data']['espeak_ng'].split(': ')[-1]}).",
         "", "| method | lr | seeds | validation error (mean) | test error (mean, range) | stable seeds | collapsed | diverged |",
         "|---|---|---|---|---|---|---|---|"]
    for m, s in summ.items():
        for lr, p in s["per_lr"].items():
            rs = [r for r in rows if r["method"] == m and r["lr"] == lr]
            ev = [run_events(r) for r in rs]
            te = [100 * r["test_error"] for r in rs]
            chosen = " (chosen)" if lr == s["chosen_lr"] else ""
            L.append(f"| {m} | {lr:g}{chosen} | {len(rs)} | {100 * p['val_mean']:.1f} % | {100 * p['test_mean']:.1f} % "
                     f"({min(te):.1f}-{max(te):.1f}) | {sum(e['stable'] for e in ev)} | "
                     f"{sum(e['collapse_step'] is not None for e in ev)} | {sum(e['diverged'] for e in ev)} |")
    L += [""] + [f"![{p.stem}]({Path(os.path.relpath(p, base)).as_posix()})" for p in figures] + [""]
    r0 = rows[0]
    edge = [f"{m} ({s['chosen_lr']:g})" for m, s in summ.items() if len(s["per_lr"]) > 1
            and s["chosen_lr"] in (min(s["per_lr"]), max(s["per_lr"]))]
    L += [("Validation chose a rate at the edge of the grid for " + ", ".join(edge) + ": a rate beyond it was not "
           "tried, so that method's tuned error may be lower than shown. " if edge else "") + f"Caveats: {r0['n_layer']} post-LN encoder layers of width 64 (80 ms tokens, at most 34 per utterance), "
          f"{r0['steps']} SGD steps (momentum 0.9, cosine decay, batch 32: about 6 passes over 1 500 training "
          "utterances), greedy CTC decoding; a synthetic corpus of one synthesiser (8 accents x 14 voice variants, "
          "120-220 words per minute, white noise 20-35 dB below the speech), split by utterance, so test utterances "
          "share voices with training ones. The paper's speech models are far larger and train on recorded speech. An error "
          "rate of 100 % is an empty transcript (the CTC blank everywhere).", ""]
    return L
