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
