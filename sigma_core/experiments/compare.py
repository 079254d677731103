"""sigmaReparam against the attention stabilisers used instead of it, in one learning-rate sweep.

:func:`run_compare` trains the project's GPT (:mod:`sigma_core.models.gpt`) with each method of
:data:`METHODS` at each learning rate and seed, and writes a table (markdown and CSV), two
figures and the largest stable learning rate per method:

- ``baseline``: nothing added;
- ``sigma-reparam``: sigmaReparam on every linear layer, W_hat = gamma / sigma(W) * W
  (theory/README.md, the sigmaReparam section);
- ``sigma-reparam-no-ln``: the same with every LayerNorm removed (``norm="none"``);
- ``qk-layernorm``: LayerNorm on q and k of every head before the logits (Dehghani et al. 2023);
- ``softcap``: attention logits ``c tanh(a / c)`` (Gemma 2 uses c = 50, the default here);
- ``spectral-norm``: ``torch.nn.utils.parametrizations.spectral_norm`` on every linear layer
  (W / sigma(W), gamma fixed at 1).

Definitions (per run, from its ``metrics.jsonl``, i.e. the logged steps): those of
:mod:`sigma_core.experiments.definitions`, the same as the run report and the claims ledger:

- ``collapsed``: some head's entropy (mean over rows with at least T/2 keys) fell below 0.1 nats
  at a logged step (:func:`~sigma_core.experiments.definitions.first_collapse_step`); that step
  is ``first_collapse_step``, so a run is collapsed exactly when it has one (a head that
  recovers later still collapsed);
- ``diverged``: a non-finite training loss or gradient norm at a logged step, a crashed run, or
  a final validation loss that is missing or non-finite;
- ``learned``: the final validation loss is below that of uniform bytes (``log 256``) by at
  least 0.05 nats;
- ``stable``: at this learning rate every seed learned and none collapsed or diverged.  The
  *largest stable learning rate* of a method is the largest swept rate at which it is stable
  (``None`` when there is none); it says nothing about rates between or beyond the swept ones.

Aggregates over seeds: mean final validation loss (and its standard deviation), the minimum of
the per-seed minimum head entropies, the mean of the mean entropies, the maximum sigma_h, and
the counts of collapsed and diverged seeds.  ``bound_violations`` sums, over seeds, the rows
whose entropy fell below a valid lower bound (eq. (2)): it must be 0 for every method.

Example
-------
>>> rows = [dict(method="a", lr=lr, seed=0, final_val_loss=1.0, entropy_min=1.0, entropy_mean=2.0,
...              sigma_max=1.0, collapsed=lr > 0.02, diverged=False, first_collapse_step=None,
...              learned=True, bound_violations=0, train_time_s=1.0) for lr in (0.001, 0.01, 0.03)]
>>> largest_stable_lr(aggregate(rows))
{'a': 0.01}
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from sigma_core.experiments import definitions as defs

#: Gemma 2's attention-logit cap
DEFAULT_SOFTCAP = 50.0
#: default sweep: a factor of 300 in six steps; the cpu-compare baseline collapses from 1e-2 on
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: config overrides of each method (``softcap`` gets its cap from :func:`method_overrides`)
METHODS: dict[str, dict] = {
    "baseline": {},
    "sigma-reparam": {"reparam": "sigma"},
    "sigma-reparam-no-ln": {"reparam": "sigma", "norm": "none"},
    "qk-layernorm": {"qk_norm": True},
    "softcap": {"logit_softcap": DEFAULT_SOFTCAP},
    "spectral-norm": {"reparam": "spectral"},
}
#: columns of the per-(method, lr) table, in order
TABLE_COLUMNS = ("method", "lr", "n_seeds", "final_val_loss", "final_val_loss_std", "entropy_min",
                 "entropy_mean", "sigma_max", "n_collapsed", "n_diverged", "n_learned", "collapsed", "diverged",
                 "stable", "first_collapse_step", "bound_violations", "train_time_s")
#: columns of the per-run table
RUN_COLUMNS = ("method", "lr", "seed", "final_val_loss", "entropy_min", "entropy_mean", "sigma_max",
               "collapsed", "first_collapse_step", "diverged", "learned", "bound_violations", "train_time_s",
               "run_dir")


def method_overrides(method: str, softcap: float = DEFAULT_SOFTCAP) -> dict:
    """The :class:`~sigma_core.experiments.config.TrainConfig` overrides of ``method`` (see :data:`METHODS`).

    >>> method_overrides("softcap", 30.0), method_overrides("sigma-reparam-no-ln")
    ({'logit_softcap': 30.0}, {'reparam': 'sigma', 'norm': 'none'})
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
    out = dict(METHODS[method])
    if "logit_softcap" in out:
        out["logit_softcap"] = float(softcap)
    return out


def method_of(config: dict) -> str:
    """The :data:`METHODS` name of a run's config (``+``-joined when options are combined).

    >>> method_of({"reparam": "sigma", "norm": "none"}), method_of({"qk_norm": True, "logit_softcap": 5})
    ('sigma-reparam-no-ln', 'qk-layernorm+softcap')
    """
    names = []
    if config.get("reparam") == "sigma":
        names.append("sigma-reparam-no-ln" if config.get("norm") == "none" else "sigma-reparam")
    elif config.get("reparam") == "spectral":
        names.append("spectral-norm")
    if config.get("qk_norm"):
        names.append("qk-layernorm")
    if config.get("logit_softcap"):
        names.append("softcap")
    return "+".join(names) or "baseline"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise_compare_run(run_dir: str | os.PathLike, *,
                          definitions: defs.Definitions = defs.DEFAULT) -> dict:
    """One sweep row from a run directory: final numbers, ``collapsed``, ``diverged`` and
    ``learned`` (module doc; :mod:`~sigma_core.experiments.definitions`).

    Reads ``config.json``, ``metrics.jsonl`` and, when present, ``summary.json`` (a crashed run
    has none and counts as diverged).
    """
    from sigma_core.experiments.report import read_config, read_metrics  # noqa: PLC0415

    run_dir = Path(run_dir)
    config, records = read_config(run_dir), read_metrics(run_dir)
    if not config:
        raise ValueError(f"run_dir {run_dir} has no config.json")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    first_collapse = defs.first_collapse_step(records, seq_len=int(config["block_size"]), definitions=definitions)
    diverged = defs.diverged(records, summary)
    val = defs.final_heldout_loss(records)
    learned = defs.learned(val, defs.chance_loss({"vocab_size": 256, **config}), definitions=definitions)
    last = records[-1] if records else {}
    violations = sum(int(r.get("bound_violations", 0) or 0) + int(r.get("sample_violations", 0) or 0)
                     for r in records)
    return {"method": method_of(config), "lr": float(config["lr"]),
            "seed": int(config["seed"]), "final_val_loss": val,
            "entropy_min": last.get("entropy_min_head"), "entropy_mean": last.get("entropy_mean"),
            "sigma_max": last.get("sigma_max"), "collapsed": first_collapse is not None,
            "first_collapse_step": first_collapse, "diverged": bool(diverged), "learned": bool(learned),
            "bound_violations": int(violations), "train_time_s": last.get("train_time_s"),
            "run_dir": str(run_dir)}


def aggregate(rows: list[dict], *, definitions: defs.Definitions = defs.DEFAULT) -> list[dict]:
    """Per ``(method, lr)`` over seeds (module doc), sorted by method order then lr; ``stable`` by
    :func:`~sigma_core.experiments.definitions.stable_setting` (every seed, by default).  A row
    without ``learned`` (an older runs.csv) counts as learned."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["lr"])), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}

    def nums(rs, key):
        return [r[key] for r in rs if _finite(r.get(key))]

    out = []
    for (method, lr), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][0], kv[0][1])):
        val, ent_min, ent_mean, sig = (nums(rs, k) for k in ("final_val_loss", "entropy_min",
                                                           "entropy_mean", "sigma_max"))
        n_col, n_div = sum(bool(r["collapsed"]) for r in rs), sum(bool(r["diverged"]) for r in rs)
        ok = [not r["collapsed"] and not r["diverged"] and r.get("learned", True) is not False for r in rs]
        steps = [r["first_collapse_step"] for r in rs if r.get("first_collapse_step") is not None]
        out.append({"method": method, "lr": lr, "n_seeds": len(rs),
                    "final_val_loss": float(np.mean(val)) if val else None,
                    "final_val_loss_std": float(np.std(val)) if len(val) > 1 else None,
                    "entropy_min": min(ent_min) if ent_min else None,
                    "entropy_mean": float(np.mean(ent_mean)) if ent_mean else None,
                    "sigma_max": max(sig) if sig else None,
                    "n_collapsed": n_col, "n_diverged": n_div,
                    "n_learned": sum(r.get("learned", True) is not False for r in rs), "collapsed": n_col > 0,
                    "diverged": n_div > 0, "stable": defs.stable_setting(ok, definitions=definitions),
                    "first_collapse_step": min(steps) if steps else None,
                    "bound_violations": sum(int(r.get("bound_violations") or 0) for r in rs),
                    "train_time_s": float(np.mean(nums(rs, "train_time_s"))) if nums(rs, "train_time_s") else None})
    return out


def largest_stable_lr(table: list[dict]) -> dict[str, float | None]:
    """For each method of ``table`` (:func:`aggregate`), the largest lr whose row is ``stable``, or None."""
    out: dict[str, float | None] = {}
    for row in table:
        best = out.setdefault(row["method"], None)
        if row["stable"] and (best is None or row["lr"] > best):
            out[row["method"]] = row["lr"]
    return out


def _fmt(value, spec=".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _write_csv(path: Path, rows: list[dict], columns) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


#: the lowest entropy the entropy-vs-lr figure shows; smaller values are drawn on this floor
#: as downward triangles (a head at 1e-30 nats and one at 1e-3 are both collapsed)
ENTROPY_FLOOR = 1e-3


def plot_compare(table: list[dict], out_dir: Path, *, seq_len: int | None = None,
                 fraction: float | None = None, formats=("png", "svg")) -> dict[str, Path]:
    """``loss_vs_lr.png`` (final validation loss per method, with ± one standard deviation over
    seeds as error bars when there are several) and ``entropy_vs_lr.png`` (least and mean head
    entropy per method, with the collapse threshold of :mod:`~sigma_core.experiments.definitions`
    (0.1 nats; ``fraction`` given: the line ``fraction * log T`` instead); values below
    :data:`ENTROPY_FLOOR` are drawn on the floor as downward triangles).  Markers: filled circle
    stable, cross collapsed (in at least one seed), open circle diverged; the legend says so.
    Each figure is also written in the other ``formats`` (SVG by default) beside the PNG."""
    import matplotlib  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    from sigma_core.experiments.report import _plt  # noqa: PLC0415 - figures without pyplot's backend

    plt = _plt()

    methods = list(dict.fromkeys(r["method"] for r in table))
    colours = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    marker_key = [Line2D([], [], ls="", marker="o", color="grey", ms=7, label="stable"),
                  Line2D([], [], ls="", marker="x", color="grey", ms=7, mew=2, label="collapsed (some seed)"),
                  Line2D([], [], ls="", marker="o", color="grey", mfc="none", ms=7, label="diverged (some seed)")]

    def draw(ax, key, *, floor=None, errors=None):
        clipped = False
        for m in methods:
            rs = [r for r in table if r["method"] == m and _finite(r.get(key))]
            if not rs:
                continue
            ys = [r[key] if floor is None else max(r[key], floor) for r in rs]
            ax.plot([r["lr"] for r in rs], ys, "-", color=colours[m], label=m)
            if errors:
                err = [r.get(errors) if _finite(r.get(errors)) else 0.0 for r in rs]
                ax.errorbar([r["lr"] for r in rs], ys, yerr=err, fmt="none", ecolor=colours[m],
                            capsize=3, lw=1)
            for r, y in zip(rs, ys):
                if floor is not None and r[key] < floor:
                    clipped = True
                    ax.plot(r["lr"], y, "v", color=colours[m], ms=8, markerfacecolor="none", mew=1.5)
                marker = "x" if r["collapsed"] else "o"
                face = "none" if r["diverged"] else colours[m]
                ax.plot(r["lr"], y, marker, color=colours[m], markerfacecolor=face, ms=7,
                        mew=2 if marker == "x" else 1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        return clipped

    def save(fig, name):
        path = out_dir / name
        fig.savefig(path, dpi=120)
        with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: editable on a slide
            for fmt in formats:
                if fmt != "png":
                    fig.savefig(path.with_suffix("." + fmt), dpi=120)
        plt.close(fig)
        return path

    paths = {}
    fig, ax = plt.subplots(figsize=(8.6, 4.6))
    draw(ax, "final_val_loss", errors="final_val_loss_std")
    seeds = sorted({r["n_seeds"] for r in table})
    ax.set_ylabel("final validation loss (nats/byte)")
    bars = (f"; bars: ± 1 std over {seeds[-1]} seeds" if seeds and seeds[-1] > 1 else "")
    ax.set_title(f"Final loss vs learning rate{bars}", fontsize=10)
    method_legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method",
                              title_fontsize=8)
    ax.add_artist(method_legend)  # the legends sit right of the axes, where they hide no point
    ax.legend(handles=marker_key, fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0), title="marker",
              title_fontsize=8)
    fig.tight_layout()
    paths["loss"] = save(fig, "loss_vs_lr.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    clipped = draw(axes[0], "entropy_min", floor=ENTROPY_FLOOR)
    axes[0].set_yscale("log")
    axes[0].set_ylim(bottom=ENTROPY_FLOOR / 1.6)
    axes[0].set_ylabel("least head entropy at the end (nats)")
    handles = list(marker_key)
    if fraction is not None and seq_len:
        axes[0].axhline(fraction * math.log(seq_len), color="k", ls="--", lw=1)
        handles.append(Line2D([], [], color="k", ls="--", lw=1,
                              label=f"collapse line {fraction:g} log T = {fraction * math.log(seq_len):.2f}"))
    elif fraction is None:
        line = defs.DEFAULT.collapse_threshold(seq_len)
        axes[0].axhline(line, color="k", ls="--", lw=1)
        handles.append(Line2D([], [], color="k", ls="--", lw=1, label=f"collapse threshold {line:g} nats"))
    if clipped:
        handles.append(Line2D([], [], ls="", marker="v", color="grey", mfc="none", ms=8,
                              label=f"below {ENTROPY_FLOOR:g} nats (drawn at the floor)"))
    axes[0].legend(handles=handles, fontsize=8, loc="lower left")
    draw(axes[1], "entropy_mean")
    axes[1].set_ylabel("mean head entropy at the end (nats)")
    if seq_len:
        axes[1].axhline(math.log(seq_len), color="grey", ls=":", lw=1, label=f"uniform: log T")
    axes[1].legend(fontsize=8, loc="lower left", title="method", title_fontsize=8)
    fig.suptitle("Attention entropy vs learning rate")
    fig.tight_layout()
    paths["entropy"] = save(fig, "entropy_vs_lr.png")
    return paths


def _relative_to(path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form when it lies inside it, else unchanged."""
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def write_compare(rows: list[dict], out_dir: str | os.PathLike, *, meta: dict | None = None) -> dict[str, Path]:
    """Write ``runs.csv``, ``compare.csv``, ``compare.md`` and the figures of the sweep ``rows``.

    ``meta`` (preset, device, versions, commit, date, ...) is printed at the top of the markdown
    and saved as ``meta.json``.  Returns the written paths by name.
    """
    if not rows:
        raise ValueError("rows must hold at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    table = aggregate(rows)
    best = largest_stable_lr(table)
    # run folders inside out_dir are written relative to it (runs/METHOD/lr_LR/seed_S), so the
    # table stays valid wherever the folder is copied or committed
    rows = [{**r, "run_dir": _relative_to(r["run_dir"], out)} if r.get("run_dir") else r for r in rows]
    paths = {"runs_csv": _write_csv(out / "runs.csv", rows, RUN_COLUMNS),
             "csv": _write_csv(out / "compare.csv", table, TABLE_COLUMNS)}
    paths.update(plot_compare(table, out, seq_len=meta.get("block_size")))
    (out / "meta.json").write_text(json.dumps({**meta, "largest_stable_lr": best}, indent=2) + "\n")
    paths["meta"] = out / "meta.json"
    lines = ["# sigmaReparam vs the other attention stabilisers: learning-rate sweep", ""]
    for key in ("preset", "device_name", "torch", "git_commit", "date", "steps", "seeds", "model", "rederived"):
        if key in meta:
            lines.append(f"- {key.replace('_', ' ')}: {meta[key]}")
    lines += ["", "Definitions (sigma_core/experiments/definitions.py, the same for the run report and the "
              f"claims ledger): collapsed: some head's entropy (mean over rows with >= T/2 keys) below "
              f"{defs.DEFAULT.collapse_nats:g} nats at a logged step, the first such step being the first "
              "collapse step (a head that recovers later still collapsed). Diverged: non-finite loss or "
              "gradient, a crash, or no finite final validation loss. Learned: final validation loss at least "
              f"{defs.DEFAULT.learn_margin:g} nats below log 256 (uniform bytes). Stable: every seed learned and "
              "none collapsed or diverged.", "",
              "| method | lr | seeds | final val loss | min head entropy | mean entropy | max σ_h "
              "| collapsed | diverged | learned | first collapse step | bound violations |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        loss = _fmt(r["final_val_loss"], ".3f")
        if r["final_val_loss_std"] is not None:
            loss += f" ± {r['final_val_loss_std']:.3f}"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['n_seeds']} | {loss} | {_fmt(r['entropy_min'], '.3g')} "
                     f"| {_fmt(r['entropy_mean'], '.3g')} | {_fmt(r['sigma_max'], '.3g')} "
                     f"| {r['n_collapsed']}/{r['n_seeds']} | {r['n_diverged']}/{r['n_seeds']} "
                     f"| {r['n_learned']}/{r['n_seeds']} | {_fmt(r['first_collapse_step'])} | {r['bound_violations']} |")
    lines += ["", "Largest stable learning rate (of the swept rates):", "", "| method | largest stable lr |",
              "|---|---|"]
    lines += [f"| {m} | {_fmt(v, 'g') if v is not None else 'none'} |" for m, v in best.items()]
    lines += ["", "![final loss vs lr](loss_vs_lr.png)", "", "![entropy vs lr](entropy_vs_lr.png)", ""]
    paths["md"] = out / "compare.md"
    paths["md"].write_text("\n".join(lines))
    return paths


def _train_one(job: dict) -> dict:
    """Worker: train one (method, lr, seed) into its run directory and summarise it."""
    from sigma_core.experiments.config import preset  # noqa: PLC0415
    from sigma_core.experiments.train import Trainer, clear_run_dir  # noqa: PLC0415

    run_dir = Path(job["run_dir"])
    cfg = preset(job["preset"], **job["overrides"])
    summary = run_dir / "summary.json"
    if summary.exists() and job.get("reuse", True):
        try:
            old = json.loads((run_dir / "config.json").read_text())
            new = cfg.to_dict()  # config.json holds the resolved device, not "auto"
            if all(old.get(k) == v for k, v in new.items() if k != "device"):
                return _tag(summarise_compare_run(run_dir), job)
        except (OSError, ValueError):
            pass
    clear_run_dir(run_dir)  # only what a run wrote; a user's file stops the sweep instead
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        Trainer(cfg, run_dir).run()
    except OSError:  # a full disk or an unwritable folder is no result about the method
        raise
    except Exception as err:  # noqa: BLE001 - a crashed run (e.g. NaN weights) is a diverged run
        (run_dir / "error.txt").write_text(f"{type(err).__name__}: {err}\n")
    if not job.get("keep_checkpoints", False):
        for p in run_dir.glob("*.pt"):
            p.unlink()
    return _tag(summarise_compare_run(run_dir), job)


def _tag(row: dict, job: dict) -> dict:
    row["method"] = job["method"]
    return row


def sweep_jobs(out_dir, *, preset_name: str, methods, lrs, seeds, softcap: float = DEFAULT_SOFTCAP,
               overrides: dict | None = None, keep_checkpoints: bool = False) -> list[dict]:
    """One job per (method, lr, seed), with run directories ``out_dir/runs/METHOD/lr_LR/seed_S``."""
    from sigma_core.experiments.config import PRESETS  # noqa: PLC0415

    if preset_name not in PRESETS:
        raise ValueError(f"preset_name must be one of {sorted(PRESETS)}, got {preset_name!r}")
    lrs = [float(x) for x in lrs]
    if not lrs or not all(x > 0 and math.isfinite(x) for x in lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {lrs!r}")
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, got {seeds!r}")
    jobs = []
    for method in methods:
        base = method_overrides(method, softcap)
        for lr in lrs:
            for seed in seeds:
                ov = {**(overrides or {}), **base, "lr": lr, "seed": int(seed)}
                jobs.append({"method": method, "preset": preset_name, "overrides": ov,
                             "keep_checkpoints": keep_checkpoints,
                             "run_dir": str(Path(out_dir) / "runs" / method / f"lr_{lr:g}" / f"seed_{seed}")})
    return jobs


def run_compare(out_dir, *, preset_name: str = "cpu-compare", methods=tuple(METHODS), lrs=DEFAULT_LRS,
                seeds=(0,), jobs: int = 1, threads: int = 1, steps: int | None = None,
                softcap: float = DEFAULT_SOFTCAP, keep_checkpoints: bool = False, log=print) -> dict[str, Path]:
    """Run the sweep (``jobs`` processes with ``threads`` torch threads each) and write its outputs.

    Runs whose directory already holds a ``summary.json`` of the same config are reused, so an
    interrupted sweep continues where it stopped.  Returns the paths of :func:`write_compare`.
    """
    from sigma_core.experiments.config import preset  # noqa: PLC0415
    from sigma_core.experiments.train import device_name, git_commit, package_versions, resolve_device  # noqa: PLC0415

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    overrides = {"threads": threads, "progress": False}
    if steps is not None:
        overrides["steps"] = steps
    overrides["checkpoint_every"] = 0  # only the final checkpoint (deleted unless keep_checkpoints)
    started = time.perf_counter()
    todo = sweep_jobs(out_dir, preset_name=preset_name, methods=methods, lrs=lrs, seeds=seeds,
                      softcap=softcap, overrides=overrides, keep_checkpoints=keep_checkpoints)
    rows = []

    def done(row):
        rows.append(row)
        log(f"[compare] {len(rows)}/{len(todo)} {row['method']} lr={row['lr']:g} seed={row['seed']}: "
            f"val {_fmt(row['final_val_loss'], '.3f')}, min head entropy {_fmt(row['entropy_min'], '.3g')}, "
            f"max sigma_h {_fmt(row['sigma_max'], '.3g')}, collapsed {_fmt(row['collapsed'])}, "
            f"diverged {_fmt(row['diverged'])}, violations {row['bound_violations']}")

    if jobs == 1:
        for job in todo:
            done(_train_one(job))
    else:
        import multiprocessing  # noqa: PLC0415

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for row in pool.map(_train_one, todo):
                done(row)
    cfg = preset(preset_name, **overrides)
    config = json.loads((Path(rows[0]["run_dir"]) / "config.json").read_text())
    meta = {"preset": preset_name, "device_name": config.get("device_name", device_name(resolve_device(cfg.device))),
            "torch": config.get("versions", package_versions()).get("torch"),
            "git_commit": config.get("git_commit", git_commit()),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "steps": cfg.steps, "seeds": list(seeds), "lrs": [float(x) for x in lrs], "methods": list(methods),
            "softcap": softcap, "block_size": cfg.block_size, "jobs": jobs, "threads": threads,
            # wall-clock time of this invocation (reused runs cost nothing) and the runs' own
            # training time summed (with --jobs N it exceeds the wall time up to N times)
            "wall_time_s": round(time.perf_counter() - started, 3),
            "train_time_s_sum": round(sum(r.get("train_time_s") or 0.0 for r in rows), 3),
            "model": f"d={cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads, T={cfg.block_size}, "
                     f"batch {cfg.batch_size}"}
    paths = write_compare(rows, out_dir, meta=meta)
    log(f"[compare] table written to {paths['md']}")
    return paths


def rederive(out_dir: str | os.PathLike, *, log=print) -> dict[str, Path]:
    """Rewrite a finished sweep's tables and figures from its committed run folders
    (``out_dir/runs/METHOD/lr_LR/seed_S``) under the current definitions, without training.

    The sweep's ``meta.json`` is kept (preset, versions, commit, wall time of the training) and
    gains ``rederived`` (the date); a run folder without ``summary.json`` (a crash) counts as diverged.
    """
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if not (out / "runs").is_dir():
        raise ValueError(f"out_dir {out} has no runs/ folder to re-derive from")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.pop("largest_stable_lr", None)
    dirs = sorted(p.parent for p in (out / "runs").rglob("config.json"))
    rows = []
    for d in dirs:
        row = summarise_compare_run(d)
        row["method"] = d.relative_to(out / "runs").parts[0]  # the sweep's own name of the method
        rows.append(row)
    meta["rederived"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    paths = write_compare(rows, out, meta=meta)
    log(f"[compare] {len(rows)} runs re-derived into {paths['md']}")
    return paths


if __name__ == "__main__":  # python -m sigma_core.experiments.compare rederive results/compare-cpu
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "rederive":
        sys.exit("usage: python -m sigma_core.experiments.compare rederive SWEEP_FOLDER")
    rederive(sys.argv[2])
