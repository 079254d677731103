"""Figures and a markdown report from training run directories.

``write_report(run_dirs, out_dir)`` reads each run's ``config.json``, ``metrics.jsonl`` (partial
or truncated logs included: a half-written last line is skipped) and ``samples/*.npz`` written by
:mod:`sigma_core.experiments.train`, and writes to ``out_dir``:

- ``loss.png``: training and validation loss over steps;
- ``entropy.png``: mean attention entropy per layer and the minimum head entropy over steps;
- ``sigma.png``: sigma_h = scale * ||W_Q^h W_K^h^T||_2 of every head over steps (eq. (1));
- ``confirmation.png``: every sampled attention row's measured entropy against its centred logit
  norm (left) and against the theorem's sigma-bold = sigma_h ||X||_2^2 (right), with the bound
  h_T(s) of eq. (2) drawn underneath, all runs in one picture;
- ``report.md``: a table of the final numbers, the rows checked and the bound violations.

Example
-------
>>> import json, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 5.0}) + "\\n{\\"step\\": 2, \\"tra")
>>> [r["step"] for r in read_metrics(d)]  # the half-written last record is skipped
[1]
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from theory import entropy_lower_bound

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
COLLAPSE_NATS = 0.1


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``; an unparsable line (a killed writer's last one,
    or a corrupted one, with a warning) is skipped; a missing file gives ``[]``."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                warnings.warn(f"{path}:{i + 1}: skipping a malformed record", stacklevel=2)
    return records


def read_config(run_dir: str | os.PathLike) -> dict:
    """``RUN_DIR/config.json`` ({} when absent)."""
    path = Path(run_dir) / CONFIG_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def load_samples(run_dir: str | os.PathLike) -> tuple[int | None, dict[str, np.ndarray]]:
    """The row samples of the latest sampled step: ``(step, arrays)``, or ``(None, {})``."""
    files = sorted((Path(run_dir) / "samples").glob("step_*.npz"))
    if not files:
        return None, {}
    with np.load(files[-1]) as data:
        return int(files[-1].stem.split("_")[1]), {k: data[k] for k in data.files}


def run_label(run_dir: str | os.PathLike, config: dict) -> str:
    """``"<dir name> (<reparam>, lr=<lr>)"``."""
    return f"{Path(run_dir).name} ({config.get('reparam', '?')}, lr={config.get('lr', '?')})"


def summarise_run(run_dir: str | os.PathLike) -> dict:
    """The numbers of one run that the report tabulates (``None`` where a run has not logged them)."""
    records = read_metrics(run_dir)
    config = read_config(run_dir)
    last = records[-1] if records else {}
    val = [r for r in records if r.get("val_loss") is not None]
    collapsed = [r["step"] for r in records if r.get("entropy_min_head", math.inf) < COLLAPSE_NATS]
    sample_step, samples = load_samples(run_dir)
    rows = int(samples["entropy"].size) if samples else 0
    slack = None
    if samples:
        slack = float(np.min(samples["entropy"] - entropy_lower_bound(samples["exact"], samples["n_keys"])))
    return {
        "label": run_label(run_dir, config), "reparam": config.get("reparam"), "lr": config.get("lr"),
        "preset": config.get("preset"), "steps": last.get("step"),
        "final_train_loss": last.get("train_loss"), "final_val_loss": val[-1]["val_loss"] if val else None,
        "best_val_loss": min(r["val_loss"] for r in val) if val else None,
        "entropy_mean": last.get("entropy_mean"), "entropy_min_head": last.get("entropy_min_head"),
        "sigma_max": last.get("sigma_max"), "first_collapse_step": collapsed[0] if collapsed else None,
        "logged_rows": int(sum(r.get("rows_checked", 0) for r in records)),
        "logged_violations": int(sum(r.get("bound_violations", 0) for r in records)),
        "sample_step": sample_step, "sample_rows": rows,
        "sample_violations": int(sum(r.get("sample_violations", 0) for r in records)),
        "min_slack": slack, "tokens_per_s": last.get("tokens_per_s"),
        "train_time_s": last.get("train_time_s"), "device_name": config.get("device_name"),
        "diverged": any(r.get("diverged") for r in records), "n_records": len(records),
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def plot_loss(runs: dict[str, list[dict]], path: Path) -> Path:
    """Training (solid) and validation (markers) loss of every run over steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        ax.plot(*_series(records, "train_loss"), color=color, label=f"{label} train")
        ax.plot(*_series(records, "val_loss"), "o--", color=color, label=f"{label} val")
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title="Loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_entropy(runs: dict[str, list[dict]], path: Path) -> Path:
    """Per run: mean attention entropy of each layer and the minimum head entropy over steps."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False, sharey=True)
    for ax, (label, records) in zip(axes[0], runs.items()):
        recs = [r for r in records if r.get("entropy")]
        if recs:
            steps = [r["step"] for r in recs]
            per_layer = np.array([[np.mean(layer) for layer in r["entropy"]] for r in recs])  # (S, L)
            for layer in range(per_layer.shape[1]):
                ax.plot(steps, per_layer[:, layer], label=f"layer {layer} mean")
        ax.plot(*_series(records, "entropy_min_head"), "k--", label="min head")
        ax.axhline(COLLAPSE_NATS, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="step", title=label)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("attention entropy (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sigma(runs: dict[str, list[dict]], path: Path) -> Path:
    """Per run: sigma_h of every (layer, head) over steps, log scale."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False, sharey=True)
    for ax, (label, records) in zip(axes[0], runs.items()):
        recs = [r for r in records if r.get("sigma")]
        if recs:
            steps = [r["step"] for r in recs]
            sig = np.array([np.ravel(r["sigma"]) for r in recs])  # (S, L*H)
            n_head = len(recs[0]["sigma"][0])
            for j in range(sig.shape[1]):
                ax.plot(steps, sig[:, j], color=f"C{j // n_head}", lw=0.8,
                        label=f"layer {j // n_head}" if j % n_head == 0 else None)
        ax.set(xlabel="step", yscale="log", title=label)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(r"$\sigma_h$ = scale $\cdot\|W_Q^h W_K^{h\top}\|_2$")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confirmation(samples: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Measured row entropy vs centred logit norm and vs the theorem's sigma-bold, with h_T(s).

    Each point is one attention row with at least T/2 visible keys (every layer and head of every
    run; T = the context length); the curves are the bound h_T(s) of eq. (2) for T/2 keys (solid:
    every plotted row must lie above it, since a row with T_i keys lies above h_{T_i} and h_T
    grows with T) and for T keys (dashed).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    t_max = max((int(s["n_keys"].max()) for s in samples.values() if s), default=2)
    t_half = max(2, (t_max + 1) // 2)
    keeps = {label: s["n_keys"] >= t_half for label, s in samples.items() if s}
    for ax, key, xlabel in ((axes[0], "exact", r"centred logit norm $\|z_i - \bar z_i\|_2$"),
                            (axes[1], "theorem", r"theorem's $\boldsymbol{\sigma} = \sigma_h \|X\|_2^2$")):
        vals = np.concatenate([samples[label][key][keep] for label, keep in keeps.items()] or [np.ones(1)])
        vals = vals[vals > 0]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (1e-3, 10.0)
        grid = np.geomspace(max(lo / 2, 1e-6), max(hi * 2, 20.0), 400)
        ax.plot(grid, entropy_lower_bound(grid, t_half), color="k", lw=1.5, zorder=3,
                label=f"$h_T(s)$, T={t_half} (fewest keys plotted)")
        ax.plot(grid, entropy_lower_bound(grid, t_max), color="grey", lw=1.2, ls="--", zorder=3,
                label=f"$h_T(s)$, T={t_max}")
        for i, (label, keep) in enumerate(keeps.items()):
            s = samples[label]
            ax.scatter(s[key][keep], s["entropy"][keep], s=2, alpha=0.25, color=f"C{i}",
                       zorder=2, label=f"{label}: {int(keep.sum())} rows", rasterized=True)
        ax.set(xscale="log", xlabel=xlabel)
        ax.legend(fontsize=7, markerscale=4, loc="lower left")
    axes[0].set_ylabel("measured row entropy (nats)")
    axes[0].set_title("rows lie above $h_T$ of their centred logit norm")
    axes[1].set_title("and above $h_T$ of the theorem's $\\boldsymbol{\\sigma}$ (eq. (1))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value, spec=".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def write_report(run_dirs, out_dir: str | os.PathLike) -> Path:
    """Write the figures and ``report.md`` for ``run_dirs`` into ``out_dir``; returns report.md's path."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("run_dirs must name at least one run directory")
    for d in run_dirs:
        if not (d / METRICS_NAME).exists() and not (d / CONFIG_NAME).exists():
            raise ValueError(f"run_dirs: {d} has neither {METRICS_NAME} nor {CONFIG_NAME}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarise_run(d) for d in run_dirs]
    runs = {s["label"]: read_metrics(d) for s, d in zip(summaries, run_dirs)}
    samples = {s["label"]: load_samples(d)[1] for s, d in zip(summaries, run_dirs)}
    figures = {"loss": plot_loss(runs, out / "loss.png"),
               "entropy": plot_entropy(runs, out / "entropy.png"),
               "sigma": plot_sigma(runs, out / "sigma.png")}
    if any(samples.values()):
        figures["confirmation"] = plot_confirmation(samples, out / "confirmation.png")
    rows_checked = sum(s["logged_rows"] + s["sample_rows"] for s in summaries)
    violations = sum(s["logged_violations"] + s["sample_violations"] for s in summaries)
    lines = ["# Attention entropy collapse: training report", "",
             "| run | steps | final train loss | final val loss | mean entropy | min head entropy "
             "| max σ_h | first step with a head < 0.1 nats | tokens/s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(
            f"| {s['label']}{' (diverged)' if s['diverged'] else ''} | {_fmt(s['steps'])} "
            f"| {_fmt(s['final_train_loss'])} | {_fmt(s['final_val_loss'])} | {_fmt(s['entropy_mean'])} "
            f"| {_fmt(s['entropy_min_head'])} | {_fmt(s['sigma_max'])} | {_fmt(s['first_collapse_step'] or 'never')} "
            f"| {_fmt(s['tokens_per_s'], '.0f')} | {_fmt(s['train_time_s'], '.1f')} |")
    lines += ["", "## The bound, checked",
              f"Attention rows checked against h_T of eq. (1)/(2): **{rows_checked}**; "
              f"violations: **{violations}**.", ""]
    for s in summaries:
        lines.append(f"- {s['label']}: {s['logged_rows']} rows in the logged steps "
                     f"({s['logged_violations']} violations); {s['sample_rows']} sampled rows at step "
                     f"{_fmt(s['sample_step'])} ({s['sample_violations']} violations), smallest margin "
                     f"entropy − h_T(centred norm) = {_fmt(s['min_slack'])} nats; device {s['device_name']}.")
    lines += ["", "## Figures", ""]
    captions = {"loss": "Training and validation loss.",
                "entropy": "Mean attention entropy per layer and the minimum head entropy.",
                "sigma": "σ_h of every head (log scale).",
                "confirmation": "Every sampled row's entropy against its centred logit norm (left) and "
                                "the theorem's 𝛔 (right), with h_T(s) underneath."}
    for name, fig in figures.items():
        lines += [f"![{captions[name]}]({fig.name})", "", captions[name], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return report
