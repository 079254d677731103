"""The report: figures and report.md from run directories, including truncated logs."""
import argparse
import json
import shutil

import numpy as np
import pytest

from sigma_core.cli import report as cmd_report
from sigma_core.experiments.config import preset
from sigma_core.experiments.report import read_metrics, summarise_run, write_report
from sigma_core.experiments.train import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    for reparam in ("none", "sigma"):
        Trainer(preset("cpu-smoke", reparam=reparam, steps=10, log_every=2, eval_every=5,
                       threads=1), root / reparam).run()
    return root


def test_report_writes_figures_and_states_rows_and_violations(runs, tmp_path):
    report = write_report([runs / "none", runs / "sigma"], tmp_path)
    for name in ("loss.png", "entropy.png", "sigma.png", "confirmation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = report.read_text()
    summaries = [summarise_run(runs / r) for r in ("none", "sigma")]
    rows = sum(s["logged_rows"] + s["sample_rows"] for s in summaries)
    assert rows > 0 and f"checked against h_T of eq. (1)/(2): **{rows}**; violations: **0**" in text
    for s in summaries:  # the table shows each run's logged numbers
        last = read_metrics(runs / s["reparam"])[-1]
        assert f"| {format(last['train_loss'], '.3g')} |" in text
        assert s["sample_rows"] == np.load(runs / s["reparam"] / "samples" / "step_000010.npz")["entropy"].size


def test_report_reads_a_truncated_log(runs, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(runs / "none", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    records = read_metrics(run)
    assert [r["step"] for r in records] == [json.loads(x)["step"] for x in lines[:-1]]
    assert summarise_run(run)["steps"] == records[-1]["step"]
    assert write_report([run], tmp_path / "out").exists()


def test_first_collapse_step_is_the_first_logged_head_below_a_tenth(runs):
    records = read_metrics(runs / "none")
    below = [r["step"] for r in records if r["entropy_min_head"] < 0.1]
    assert summarise_run(runs / "none")["first_collapse_step"] == (below[0] if below else None)


def test_report_command_rejects_missing_runs(tmp_path):
    parser = argparse.ArgumentParser()
    cmd_report.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exc:
        args.func(args)
    assert exc.value.code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    args = parser.parse_args(["report", str(empty)])
    with pytest.raises(SystemExit) as exc:
        args.func(args)
    assert exc.value.code == 2


def test_demo_trains_both_runs_and_says_where_the_report_is(tmp_path):
    from sigma_core.experiments.train import run_demo

    said = []
    report = run_demo(tmp_path, preset_name="cpu-smoke", steps=3, log=said.append)
    assert report == tmp_path / "report" / "report.md" and report.exists()
    assert summarise_run(tmp_path / "baseline")["reparam"] == "none"
    assert summarise_run(tmp_path / "sigma-reparam")["reparam"] == "sigma"
    assert said[-1].endswith(str(report))


def test_every_figure_has_an_svg_beside_it_and_the_slide_figure_names_the_collapse(runs, tmp_path):
    write_report([runs / "none", runs / "sigma"], tmp_path)
    pngs = {p.stem for p in tmp_path.glob("*.png")}
    assert {"loss", "entropy", "entropy_over_training", "sigma", "confirmation"} <= pngs
    for stem in pngs:
        assert (tmp_path / f"{stem}.svg").read_text().lstrip().startswith(("<?xml", "<svg")), stem
    slide = (tmp_path / "entropy_over_training.svg").read_text()
    assert "collapse" in slide and "0.1 nats" in slide and "log T = 3.47" in slide  # T = 32
    for reparam, name in (("none", "baseline"), ("sigma", "σReparam")):
        first = summarise_run(runs / reparam)["first_collapse_step"]
        when = f"collapsed at step {first}" if first is not None else "never collapsed"
        assert f"{name}, lr 0.03: least head ({when})" in slide
    assert "collapse threshold (0.1 nats)" in (tmp_path / "entropy.svg").read_text()


def test_report_formats(runs, tmp_path):
    write_report([runs / "sigma"], tmp_path, formats=("pdf",))
    assert (tmp_path / "confirmation.pdf").read_bytes()[:5] == b"%PDF-"
    assert (tmp_path / "confirmation.png").exists() and not (tmp_path / "confirmation.svg").exists()
    with pytest.raises(ValueError, match="formats"):
        write_report([runs / "sigma"], tmp_path / "bad", formats=("png", "gif"))


def _extremal_entropy(s: float, n_keys: int) -> float:
    """Brute force, independent of theory.bound: the entropy of softmax(g (e_1 - 1/T)), g = s sqrt(T/(T-1))."""
    z = np.full(n_keys, -1.0 / n_keys)
    z[0] += 1.0
    z *= s * np.sqrt(n_keys / (n_keys - 1))
    log_z = z.max() + np.log(np.exp(z - z.max()).sum())
    p = np.exp(z - log_z)
    return float(log_z - (p * z).sum())  # -sum p log p without 0 * log 0


def test_confirmation_points_are_each_rows_own_bound(runs):
    from sigma_core.experiments.report import load_samples
    from sigma_core.experiments.report import confirmation_points, rows_below

    _, s = load_samples(runs / "none")
    assert s["n_keys"].min() == 1 and s["n_keys"].max() == 32  # causal: rows of every length
    for variant in ("exact", "centered", "per_query", "theorem"):
        ((bound, entropy),) = confirmation_points({"run": s}, variant).values()
        keep = s["n_keys"] >= 2
        assert bound.size == keep.sum() and np.array_equal(entropy, s["entropy"][keep])
        idx = np.random.default_rng(0).choice(bound.size, 40, replace=False)
        brute = [_extremal_entropy(s[variant][keep][i], int(s["n_keys"][keep][i])) for i in idx]
        np.testing.assert_allclose(bound[idx], brute, rtol=1e-9, atol=1e-12)
        assert rows_below({"run": (bound, entropy)}) == 0
    # a row pushed below its own bound is counted
    bound, entropy = confirmation_points({"run": s}, "exact")["run"]
    i = int(np.argmax(bound))
    bad = entropy.copy()
    bad[i] = bound[i] - 0.01
    assert rows_below({"run": (bound, bad)}) == 1
    with pytest.raises(ValueError, match="variant"):
        confirmation_points({"run": s}, "spectral")


def test_slide_figure_marks_the_first_step_below_the_threshold(tmp_path):
    from sigma_core.experiments.report import plot_entropy_slide

    collapsing = [{"step": 10 * (i + 1), "entropy_min_head": e, "entropy_mean": 3.0}
                  for i, e in enumerate([3.0, 0.5, 0.05, 0.2, 0.01])]
    healthy = [{"step": r["step"], "entropy_min_head": 2.0, "entropy_mean": 3.0} for r in collapsing]
    plot_entropy_slide({"A": collapsing, "B": healthy}, tmp_path / "slide.png", seq_len=64)
    svg = (tmp_path / "slide.svg").read_text()
    assert "A: least head (collapsed at step 30)" in svg and "B: least head (never collapsed)" in svg
    assert "log T = 4.16" in svg and "threshold" in svg


def test_writing_a_report_leaves_the_callers_matplotlib_backend_alone(runs, tmp_path):
    """A notebook that writes a report keeps drawing inline: no backend switch, no figure left open."""
    import matplotlib
    import matplotlib.pyplot as plt

    original = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend other than the Agg a careless writer would force
    try:
        opened = plt.get_fignums()
        write_report([runs / "none"], tmp_path)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == opened
    finally:
        matplotlib.use(original)
