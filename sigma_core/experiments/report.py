"""Figures and a markdown report from training run directories.

``write_report(run_dirs, out_dir)`` reads each run's ``config.json``, ``metrics.jsonl`` (partial
or truncated logs included: a half-written last line is skipped) and ``samples/*.npz`` written by
:mod:`sigma_core.experiments.train`, and writes to ``out_dir``:

- ``loss.png``: training and validation loss over steps;
- ``entropy.png``: mean attention entropy per layer and the minimum head entropy over steps
  (log scale, the 0.1-nat collapse threshold drawn and labelled);
- ``entropy_over_training.png``: the slide-ready figure: every run's least head entropy (thick)
  and mean entropy (thin) in one panel, large type, the collapse threshold labelled and the
  first step below it marked;
- ``sigma.png``: sigma_h = scale * ||W_Q^h W_K^h^T||_2 of every head over steps (eq. (1));
- ``confirmation.png``: one panel per bound variant (exact, centred, per query, theorem): every
  sampled attention row's measured entropy against its own bound h_{T_i}(s_i) of eq. (2), with
  T_i its number of keys and s_i the variant's logit-norm bound.  No point may lie below the
  diagonal, whatever its number of keys; how far right the points sit shows how much each
  variant knows (the theorem's sits at 0 in a trained model);
- ``report.md``: a table of the final numbers, the rows checked and the bound violations.

Every figure is written as PNG and, beside it, in the vector formats of ``formats`` (SVG by
default; ``"pdf"`` too for LaTeX slides), with the same stem.

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
import zipfile
from pathlib import Path

import numpy as np

from sigma_core.experiments import definitions as defs
from theory import entropy_lower_bound

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
#: the collapse threshold of :mod:`sigma_core.experiments.definitions`
COLLAPSE_NATS = defs.COLLAPSE_NATS
#: a row counts as below its bound when entropy < bound - BELOW_TOL (the trainer's tolerance)
BELOW_TOL = 1e-4
#: the formats every figure is written in besides PNG (the first is always PNG)
FIGURE_FORMATS = ("png", "svg")
#: the figures write_report makes (file stems)
FIGURE_NAMES = ("loss", "entropy", "entropy_over_training", "sigma", "confirmation")
#: the bound variants of the confirmation figure, tightest first, with their panel titles
CONFIRMATION_VARIANTS = {
    "exact": "exact: $s_i$ = the row's centred logit norm",
    "centered": r"centred: $\sigma_h\|x_i\|\,\|(I - \frac{1}{T}\mathbf{1}\mathbf{1}^\top)X\|_2$",
    "per_query": r"per query: $\sigma_h\|x_i\|\,\|X\|_2$",
    "theorem": r"theorem: $\boldsymbol{\sigma} = \sigma_h\|X\|_2^2$ (eq. (1))",
}


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
            record = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                warnings.warn(f"{path}:{i + 1}: skipping a malformed record", stacklevel=2)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            warnings.warn(f"{path}:{i + 1}: skipping a line that is not a record (a JSON object with a "
                          f"whole-number step)", stacklevel=2)
            continue
        records.append(record)
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
    try:
        with np.load(files[-1]) as data:
            return int(files[-1].stem.split("_")[1]), {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{files[-1]} is truncated or corrupted ({type(exc).__name__}: {exc}); "
                         f"remove it to report without the row samples") from exc


def run_label(run_dir: str | os.PathLike, config: dict) -> str:
    """``"<dir name> (<reparam>, lr=<lr>)"``."""
    return f"{Path(run_dir).name} ({config.get('reparam', '?')}, lr={config.get('lr', '?')})"


def summarise_run(run_dir: str | os.PathLike) -> dict:
    """The numbers of one run that the report tabulates (``None`` where a run has not logged them)."""
    records = read_metrics(run_dir)
    config = read_config(run_dir)
    last = records[-1] if records else {}
    val = [r for r in records if r.get("val_loss") is not None]
    first_collapse = defs.first_collapse_step(records, seq_len=config.get("block_size"))
    sample_step, samples = load_samples(run_dir)
    rows = int(samples["entropy"].size) if samples else 0
    slack = None
    if samples:
        slack = float(np.min(samples["entropy"] - entropy_lower_bound(samples["exact"], samples["n_keys"], rounding="down")))
    return {
        "label": run_label(run_dir, config), "reparam": config.get("reparam"), "lr": config.get("lr"),
        "preset": config.get("preset"), "steps": last.get("step"),
        "final_train_loss": last.get("train_loss"), "final_val_loss": val[-1]["val_loss"] if val else None,
        "best_val_loss": min(r["val_loss"] for r in val) if val else None,
        "entropy_mean": last.get("entropy_mean"), "entropy_min_head": last.get("entropy_min_head"),
        "sigma_max": last.get("sigma_max"), "first_collapse_step": first_collapse,
        "logged_rows": int(sum(r.get("rows_checked", 0) for r in records)),
        "logged_violations": int(sum(r.get("bound_violations", 0) for r in records)),
        "sample_step": sample_step, "sample_rows": rows,
        "sample_violations": int(sum(r.get("sample_violations", 0) for r in records)),
        "min_slack": slack, "tokens_per_s": last.get("tokens_per_s"),
        "train_time_s": last.get("train_time_s"), "device_name": config.get("device_name"),
        "diverged": any(r.get("diverged") for r in records), "n_records": len(records),
    }


class _Figures:
    """The few pyplot names the plots use, without pyplot: figures are plain
    ``matplotlib.figure.Figure`` objects, so writing a report never switches the backend of the
    caller (a notebook keeps showing its own figures inline) and never leaks open figures."""

    @staticmethod
    def subplots(*args, figsize=None, **kwargs):
        from matplotlib.figure import Figure  # noqa: PLC0415

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    @staticmethod
    def rc_context(rc):
        import matplotlib  # noqa: PLC0415

        return matplotlib.rc_context(rc)

    @staticmethod
    def close(fig):
        return None

    @property
    def Line2D(self):  # noqa: N802 - the matplotlib name
        from matplotlib.lines import Line2D  # noqa: PLC0415

        return Line2D


def _plt():
    return _Figures()


def _save(fig, path: Path, formats=FIGURE_FORMATS) -> Path:
    """Save ``fig`` as ``path`` (PNG) and beside it in every other format of ``formats``."""
    plt = _plt()
    path = Path(path)
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise ValueError(f"formats must be among 'png', 'svg', 'pdf', got {bad}")
    fig.savefig(path, dpi=120)
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: editable on a slide
        for fmt in formats:
            if fmt != path.suffix.lstrip("."):
                fig.savefig(path.with_suffix("." + fmt), dpi=120)
    plt.close(fig)
    return path


def matplotlib_transforms():
    import matplotlib.transforms  # noqa: PLC0415

    return matplotlib.transforms


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def plot_loss(runs: dict[str, list[dict]], path: Path, formats=FIGURE_FORMATS) -> Path:
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
    return _save(fig, path, formats)


def plot_entropy(runs: dict[str, list[dict]], path: Path, formats=FIGURE_FORMATS) -> Path:
    """Per run: mean attention entropy of each layer (wide coloured lines) and the minimum head
    entropy (thin black line on top, so a layer whose heads all collapsed stays visible under
    it) over steps, on a log scale, with the collapse threshold drawn and labelled."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.3), squeeze=False, sharey=True)
    for ax, (label, records) in zip(axes[0], runs.items()):
        recs = [r for r in records if r.get("entropy")]
        if recs:
            steps = [r["step"] for r in recs]
            per_layer = np.array([[np.mean(layer) for layer in r["entropy"]] for r in recs])  # (S, L)
            for layer in range(per_layer.shape[1]):
                ax.plot(steps, per_layer[:, layer], lw=3, alpha=0.75, color=f"C{layer}",
                        label=f"layer {layer}: mean over heads", zorder=2)
        ax.plot(*_series(records, "entropy_min_head"), color="k", lw=1, ls="--", marker=".", ms=3,
                label="least head entropy", zorder=4)
        ax.axhline(COLLAPSE_NATS, color="r", lw=1, ls=":", zorder=3,
                   label=f"collapse threshold ({COLLAPSE_NATS:g} nats)")
        ax.set(xlabel="step", title=label, yscale="log")
        ax.grid(alpha=0.3, which="major")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # runs may have different depths: collect every label once
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    axes[0][0].set_ylabel("attention entropy (nats, log scale)")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    return _save(fig, path, formats)


def _pretty_label(config: dict, run_dir) -> str:
    """``"baseline, lr 0.03"`` / ``"σReparam, lr 0.03"``: the name a slide shows."""
    name = {"none": "baseline", "sigma": "σReparam", "spectral": "spectral norm"}.get(
        config.get("reparam"), str(config.get("reparam", Path(run_dir).name)))
    extras = [x for x, on in (("QK-LayerNorm", config.get("qk_norm")),
                              ("soft-cap", config.get("logit_softcap")),
                              ("no LayerNorm", config.get("norm") == "none")) if on]
    lr = config.get("lr")
    return ", ".join([name, *extras] + ([f"lr {lr:g}"] if isinstance(lr, (int, float)) else []))


def plot_entropy_slide(runs: dict[str, list[dict]], path: Path, *, seq_len: int | None = None,
                       formats=FIGURE_FORMATS) -> Path:
    """The slide-ready figure: every run's least head entropy (thick) and mean entropy (thin,
    dashed) over training in one 16:9 panel with large type, the collapse threshold labelled on
    the plot, the first step below it marked, and the uniform entropy log T when ``seq_len`` is
    given."""
    plt = _plt()
    with plt.rc_context({"font.size": 15, "axes.titlesize": 18, "axes.labelsize": 16,
                         "legend.fontsize": 13}):
        fig, ax = plt.subplots(figsize=(11, 6.2))
        last_step = 1
        for i, (label, records) in enumerate(runs.items()):
            colour = f"C{i}"
            steps, least = _series(records, "entropy_min_head")
            if not steps:
                continue
            last_step = max(last_step, steps[-1])
            below = [(s, e) for s, e in zip(steps, least) if e < COLLAPSE_NATS]
            when = f" (collapsed at step {below[0][0]})" if below else " (never collapsed)"
            ax.plot(steps, least, color=colour, lw=3.5, label=f"{label}: least head{when}")
            ax.plot(*_series(records, "entropy_mean"), color=colour, lw=1.8, ls="--",
                    label=f"{label}: mean of heads")
            if below:
                ax.plot([below[0][0]], [below[0][1]], "o", color=colour, ms=12, mfc="none", mew=2.5)
        # the horizontal lines are labelled in the right margin, where no curve can hide them
        edge = matplotlib_transforms().blended_transform_factory(ax.transAxes, ax.transData)
        ax.axhline(COLLAPSE_NATS, color="r", lw=1.8, ls=":")
        ax.text(1.01, COLLAPSE_NATS, f"collapse\nthreshold\n{COLLAPSE_NATS:g} nats", transform=edge,
                color="r", ha="left", va="center", fontsize=13)
        if seq_len:
            ax.axhline(math.log(seq_len), color="grey", lw=1.2, ls=":")
            ax.text(1.01, math.log(seq_len), f"uniform:\nlog T = {math.log(seq_len):.2f}", transform=edge,
                    color="grey", ha="left", va="center", fontsize=13)
        ax.set(yscale="log", xlabel="training step", ylabel="attention entropy (nats)",
               title="Attention entropy during training")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False, fontsize=12)
        fig.tight_layout()
        return _save(fig, path, formats)


def plot_sigma(runs: dict[str, list[dict]], path: Path, formats=FIGURE_FORMATS) -> Path:
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
    return _save(fig, path, formats)


def confirmation_points(samples: dict[str, dict[str, np.ndarray]], variant: str
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per run: ``(bound, entropy)`` of every sampled row with at least 2 keys, where ``bound`` is
    ``h_{T_i}(s_i)`` of eq. (2) with T_i the row's number of keys and s_i its ``variant`` norm."""
    if variant not in CONFIRMATION_VARIANTS:
        raise ValueError(f"variant must be one of {list(CONFIRMATION_VARIANTS)}, got {variant!r}")
    out = {}
    for label, s in samples.items():
        if not s:
            continue
        keep = s["n_keys"] >= 2
        out[label] = (entropy_lower_bound(s[variant][keep], s["n_keys"][keep], rounding="down"), s["entropy"][keep])
    return out


def rows_below(points: dict[str, tuple[np.ndarray, np.ndarray]], tol: float = BELOW_TOL) -> int:
    """How many rows of :func:`confirmation_points` lie below their bound by more than ``tol``."""
    return int(sum(np.count_nonzero(entropy < bound - tol) for bound, entropy in points.values()))


def plot_confirmation(samples: dict[str, dict[str, np.ndarray]], path: Path,
                      formats=FIGURE_FORMATS) -> Path:
    """Each sampled row's measured entropy against its own bound, one panel per bound variant.

    A row with T_i visible keys (T_i >= 2) and variant logit-norm bound s_i is drawn at
    (h_{T_i}(s_i), entropy): Theorem 3.1 (and its sharper variants, eq. (7)) puts every point on
    or above the diagonal, the red region is where no row may lie.  The panel's note gives the
    rows drawn, how many lie below the diagonal by more than :data:`BELOW_TOL` (rounding: 0 on
    every run) and the median bound: a variant whose points crowd at 0 says nothing about this
    model.
    """
    plt = _plt()
    runs = {label: s for label, s in samples.items() if s}
    variants = [v for v in CONFIRMATION_VARIANTS if all(v in s for s in runs.values())]
    if not runs or not variants:
        raise ValueError("samples must hold at least one run with n_keys, entropy and a bound variant")
    top = max(math.log(max(2, int(s["n_keys"].max()))) for s in runs.values()) * 1.05
    fig, axes = plt.subplots(1, len(variants), figsize=(3.5 * len(variants) + 0.5, 4.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, v in zip(axes[0], variants):
        ax.fill_between([0, top], [0, 0], [0, top], color="r", alpha=0.08, lw=0, zorder=0)
        ax.plot([0, top], [0, top], color="k", lw=1, zorder=3)
        ax.text(0.97 * top, 0.04 * top, "no row\nmay lie here", color="r", alpha=0.7, ha="right",
                va="bottom", fontsize=8)
        points = confirmation_points(runs, v)
        medians = []
        for i, (bound, entropy) in enumerate(points.values()):
            ax.scatter(bound, entropy, s=6, alpha=0.3, color=f"C{i}", lw=0,
                       zorder=2 + 0.1 * (len(runs) - i), rasterized=True)  # the first run on top
            medians.append(float(np.median(bound)) if bound.size else float("nan"))
        n_rows = sum(b.size for b, _ in points.values())
        below = rows_below(points)
        ax.text(0.03 * top, 0.97 * top, f"{below} of {n_rows} rows below the diagonal",
                va="top", fontsize=8, bbox=dict(facecolor="white", alpha=0.8, lw=0))
        for i, med in enumerate(medians):
            ax.text(0.03 * top, (0.89 - 0.07 * i) * top, f"median bound, run {i + 1}: {med:.2f} nats",
                    color=f"C{i}", va="top", fontsize=8, bbox=dict(facecolor="white", alpha=0.8, lw=0))
        ax.set(title=CONFIRMATION_VARIANTS[v], xlim=(-0.02 * top, top), ylim=(-0.02 * top, top),
               xlabel=r"bound $h_{T_i}(s_i)$ (nats)", aspect="equal")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("measured row entropy (nats)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=f"C{i}", label=f"run {i + 1}: {label}")
               for i, label in enumerate(runs)]
    handles.append(plt.Line2D([], [], color="k", lw=1, label="entropy = bound"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    fig.suptitle("Every attention row lies on or above its own bound (one panel per bound variant, "
                 "tightest first)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(handles) - 1) // 3), 1, 1))
    return _save(fig, path, formats)


def _fmt(value, spec=".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def write_report(run_dirs, out_dir: str | os.PathLike, *, formats=FIGURE_FORMATS) -> Path:
    """Write the figures (PNG plus ``formats``) and ``report.md`` for ``run_dirs`` into ``out_dir``;
    returns report.md's path."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("run_dirs must name at least one run directory")
    for d in run_dirs:
        if not (d / METRICS_NAME).exists() and not (d / CONFIG_NAME).exists():
            raise ValueError(f"run_dirs: {d} has neither {METRICS_NAME} nor {CONFIG_NAME}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from sigma_core.experiments.train import check_no_links  # noqa: PLC0415

    check_no_links(out, ["report.md", "summary.json", *(f"{n}.{fmt}" for n in FIGURE_NAMES
                                                         for fmt in ("png", "svg", "pdf"))])
    formats = tuple(formats)
    if "png" not in formats:
        formats = ("png", *formats)
    summaries = [summarise_run(d) for d in run_dirs]
    runs = {s["label"]: read_metrics(d) for s, d in zip(summaries, run_dirs)}
    samples = {s["label"]: load_samples(d)[1] for s, d in zip(summaries, run_dirs)}
    configs = [read_config(d) for d in run_dirs]
    pretty = [_pretty_label(c, d) for c, d in zip(configs, run_dirs)]
    if len(set(pretty)) < len(pretty):  # e.g. two seeds: keep the labels apart
        pretty = [f"{p} ({Path(d).name})" for p, d in zip(pretty, run_dirs)]
    seq_lens = {c.get("block_size") for c in configs}
    figures = {"loss": plot_loss(runs, out / "loss.png", formats),
               "entropy": plot_entropy(runs, out / "entropy.png", formats),
               "entropy_over_training": plot_entropy_slide(
                   dict(zip(pretty, runs.values())), out / "entropy_over_training.png",
                   seq_len=seq_lens.pop() if len(seq_lens) == 1 else None, formats=formats),
               "sigma": plot_sigma(runs, out / "sigma.png", formats)}
    if any(samples.values()):
        figures["confirmation"] = plot_confirmation(samples, out / "confirmation.png", formats)
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
                "entropy": "Mean attention entropy per layer and the least head entropy (log scale); "
                           "the dotted red line is the 0.1-nat collapse threshold.",
                "entropy_over_training": "Least and mean head entropy of every run over training, "
                                         "with the collapse threshold (slide version).",
                "sigma": "σ_h of every head (log scale).",
                "confirmation": "Every sampled row's entropy against its own bound h_{T_i}(s_i), one "
                                "panel per bound variant: no point may lie below the diagonal."}
    for name, fig in figures.items():
        lines += [f"![{captions[name]}]({fig.name})", "", captions[name], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return report
