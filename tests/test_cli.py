"""The `entropy-collapse` command line as a stranger meets it: help, errors, the end of a run."""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

from sigma_core.cli import build_parser, main
from sigma_core.cli.train import flags_in_message, format_summary
from sigma_core.experiments import data

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "train", "report", "compare")
FAST = ["--preset", "cpu-smoke", "--steps", "4", "--threads", "1", "--checkpoint-every", "0"]


def help_text(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_text(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = help_text(*([command] if command else []), capsys=capsys)
    # no reStructuredText roles or literals, no help that points at itself
    assert not re.search(r"``|:(class|func|data|mod|meth):|`~", text), text
    assert "see report --help" not in text and "(see train --help)" not in text
    assert "TrainConfig." not in text and "preset value by default" not in text
    assert len(text.splitlines()) > 5


def test_train_help_shows_the_preset_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = help_text("train", capsys=capsys)
    flat = " ".join(text.split())
    assert "--d-model N model width d (cpu-demo: 128)" in flat
    assert "--lr LR peak learning rate (cpu-demo: 0.03)" in flat
    assert "--steps N optimiser steps (cpu-demo: 400)" in flat
    assert "(default: on when the output is a terminal)" in flat
    # the preset table: one row per preset with its real values
    lines = text.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["preset"]).split()
    h200 = dict(zip(header, next(line for line in lines if line.strip().startswith("h200 ")).split()))
    assert {k: h200[k] for k in ("d", "layers", "heads", "T", "batch", "steps", "lr")} == \
        {"d": "256", "layers": "6", "heads": "8", "T": "256", "batch": "64", "steps": "1000", "lr": "0.01"}
    assert "cpu-demo" in text and "classroom" in text


def test_demo_help_says_what_it_does_and_how_long(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    flat = " ".join(help_text("demo", capsys=capsys).split())
    assert "trains the byte-level GPT twice" in flat
    assert "about 5 minutes on a 2-core CPU" in flat and "--no-train" in flat
    top = " ".join(help_text(capsys=capsys).split())
    assert "about 5 min on a CPU" in top


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "abc"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "eight"], "--batch-size"),
    (["--seed", "x"], "--seed"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--d-model", "30", "--n-head", "4"], "--d-model (30) must be divisible by --n-head (4)"),
    (["--norm", "sandwich"], "--norm"),
    (["--compile", "--compile-backend", "no-such-backend"], "--compile-backend must be a registered torch.compile backend"),
])
def test_a_bad_flag_is_one_line_naming_it_and_where_to_look(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # the error, then the pointer to --help; no usage block
    assert lines[0].startswith("entropy-collapse train: error: ") and flag in lines[0]
    assert lines[1] == "(`entropy-collapse train --help` lists the options)"
    assert "usage:" not in err
    # no converter's Python name ("invalid positive_float value")
    assert not re.search(r"invalid \w+ value|positive_float|positive_int|finite_float", err)
    assert not (tmp_path / "run").exists()


def test_inductor_without_a_cpp_compiler_is_refused_before_the_run_naming_the_backend(tmp_path, capsys):
    """torch.compile is lazy: without the check, inductor on the CPU would fail only at the first
    compiled step (after the first, recorded one), with a run folder half written."""
    from torch._inductor import config as inductor_config

    # torch's own config patch (monkeypatch.setattr on a config module restores a hidden entry
    # that later compiles in the same process cannot read)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), *FAST, "--device", "cpu", "--compile"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert err.startswith("entropy-collapse train: error: --compile-backend ('inductor') ") and "aot_eager" in err
    assert not (tmp_path / "run").exists()


def test_no_command_prints_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(c in err for c in COMMANDS)


def test_flags_in_message_rewrites_only_subject_field_names():
    assert flags_in_message("weight_decay must be >= 0, got -1") == "--weight-decay must be >= 0, got -1"
    assert flags_in_message("lr must be a positive finite number") == "--lr must be a positive finite number"
    assert flags_in_message("choose a vit preset, e.g. 'vit-digits'") == "choose a vit preset, e.g. 'vit-digits'"


def test_train_ends_with_a_short_summary_and_keeps_the_json(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    out = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert not re.search(r"\d\.\d{7,}", out), out  # no 16-digit floats
    lines = out.strip().splitlines()
    assert lines[0].startswith("finished 4 steps in ") and "tokens/s" in lines[0]
    assert len(lines) <= 8
    summary = json.loads((run / "summary.json").read_text())
    assert f"train {summary['final_train_loss']:.3f}" in out
    assert f"bound violations  {summary['bound_violations']}" in out
    assert str(run) in out and f"entropy-collapse report {run}" in out


def test_format_summary_reports_divergence_and_accuracy():
    text = format_summary({"steps": 7, "diverged": True, "diverged_step": 8, "final_train_loss": None,
                           "final_val_loss": None, "final_val_accuracy": 0.875, "entropy_mean": None,
                           "entropy_min_head": None, "sigma_max": None, "bound_violations": 0,
                           "train_time_s": 3725.0, "tokens_per_s": 0.0}, "r")
    assert text.splitlines()[0] == "stopped by divergence at step 8 in 1 h 02 min"
    assert "train n/a, validation accuracy 87.5%" in text


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_defaults_to_whether_stderr_is_a_terminal(tty, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    assert json.loads((run / "config.json").read_text())["progress"] is tty
    # an explicit flag wins either way
    run2 = tmp_path / "run2"
    assert main(["train", "--out", str(run2), *FAST, "--no-progress" if tty else "--progress"]) == 0
    assert json.loads((run2 / "config.json").read_text())["progress"] is (not tty)


def test_run_folder_records_no_path_of_this_machine(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    config = json.loads((run / "config.json").read_text())
    assert "root" not in config["corpus"] and config["corpus"]["sha256"] == config["corpus_sha256"]
    for name in ("config.json", "summary.json"):
        record = json.loads((run / name).read_text())
        argv = record.pop("argv", None)  # the command line as typed (pytest's own here) ...
        assert argv is None or "/" not in argv[0]  # ... with the program by name, not its path
        text = json.dumps(record)
        assert str(ROOT) not in text and str(tmp_path) not in text and str(Path.home()) not in text, name


def test_a_damaged_corpus_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "CORPUS_DIR", tmp_path)  # no corpus file there
    data.shipped_corpus_bytes.cache_clear()
    try:
        assert main(["train", "--out", str(tmp_path / "run"), *FAST]) == 2
    finally:
        data.shipped_corpus_bytes.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training corpus" in err[0] and "reinstall" in err[0]
    assert "Traceback" not in "\n".join(err)


def test_report_out_default_is_explained(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    flat = " ".join(help_text("report", capsys=capsys).split())
    assert "default: the run folder itself for one RUN_DIR" in flat


def test_compare_writes_a_committable_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run_dir paths are built from --out as given
    out = Path("sweep")
    assert main(["compare", "--out", str(out), "--preset", "cpu-smoke", "--methods", "baseline",
                 "sigma-reparam", "--lrs", "0.01", "--steps", "3"]) == 0
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row in rows:
        assert not Path(row["run_dir"]).is_absolute() and row["run_dir"].startswith("runs/")
        folder = out / row["run_dir"]  # relative to the sweep folder, wherever it is copied
        assert {"config.json", "metrics.jsonl", "summary.json"} <= {p.name for p in folder.iterdir()}
        assert not list(folder.glob("*.pt"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["wall_time_s"] > 0 and meta["train_time_s_sum"] > 0
    assert meta["train_time_s_sum"] == pytest.approx(sum(float(r["train_time_s"]) for r in rows), abs=1e-3)


def test_the_results_folder_is_not_ignored_by_git():
    # per-run logs under results/*/runs/ must be committable: only the top-level runs/ is ignored
    ignore = (ROOT / ".gitignore").read_text().split()
    assert "/runs/" in ignore and "runs/" not in ignore


def test_every_command_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert tuple(sub.choices) == COMMANDS


def test_demo_without_training_prints_the_bound_only(tmp_path, capsys):
    assert main(["demo", "--no-train", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Theorem 3.1" in out and "the bound is attained" in out
    assert not (tmp_path / "demo").exists()
