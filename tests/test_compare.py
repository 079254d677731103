"""entropy-collapse compare: the collapse/divergence/stability logic and the sweep's outputs."""
import csv
import json
import math

import pytest

from sigma_core.cli import main
from sigma_core.experiments.compare import (METHODS, RUN_COLUMNS, TABLE_COLUMNS, aggregate, largest_stable_lr,
                                method_of, method_overrides, run_compare, summarise_compare_run,
                                sweep_jobs)


def row(method, lr, seed=0, *, collapsed=False, diverged=False, loss=2.0):
    return dict(method=method, lr=lr, seed=seed, final_val_loss=loss, entropy_min=0.5, entropy_mean=2.0,
                sigma_max=1.0, collapsed=collapsed, diverged=diverged, first_collapse_step=10 if collapsed else None,
                bound_violations=0, train_time_s=1.0)


def test_largest_stable_lr_on_synthetic_summaries():
    rows = [row("a", 1e-3), row("a", 1e-2), row("a", 1e-1, collapsed=True),           # stable up to 1e-2
            row("b", 1e-3, diverged=True), row("b", 1e-2, collapsed=True),          # never stable
            row("c", 1e-3), row("c", 1e-2, collapsed=True), row("c", 1e-1),         # non-monotone: largest
            row("d", 1e-3), row("d", 1e-2), row("d", 1e-2, seed=1, diverged=True)]  # one bad seed spoils a rate
    table = aggregate(rows)
    assert largest_stable_lr(table) == {"a": 1e-2, "b": None, "c": 1e-1, "d": 1e-3}
    d = next(r for r in table if r["method"] == "d" and r["lr"] == 1e-2)
    assert (d["n_seeds"], d["n_diverged"], d["n_collapsed"], d["stable"]) == (2, 1, 0, False)


def test_aggregate_over_seeds():
    rows = [row("a", 1e-2, 0, loss=2.0), row("a", 1e-2, 1, loss=3.0, collapsed=True)]
    rows[1]["entropy_min"], rows[1]["sigma_max"] = 0.01, 9.0
    (r,) = aggregate(rows)
    assert r["final_val_loss"] == pytest.approx(2.5) and r["final_val_loss_std"] == pytest.approx(0.5)
    assert (r["entropy_min"], r["sigma_max"], r["n_collapsed"], r["collapsed"]) == (0.01, 9.0, 1, True)


def write_run(tmp_path, entropies, *, losses=None, val=2.0, summary=True, T=64):
    """A synthetic run directory: one logged step per entry of ``entropies`` ([[per head]] per layer)."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"block_size": T, "lr": 0.01, "seed": 0, "reparam": "none",
                                               "norm": "pre", "qk_norm": True, "vocab_size": 256}))
    losses = losses or [2.0] * len(entropies)
    with open(d / "metrics.jsonl", "w") as fh:
        for i, (ent, loss) in enumerate(zip(entropies, losses)):
            rec = {"step": 10 * (i + 1), "train_loss": loss, "grad_norm": 1.0, "entropy": ent,
                   "entropy_min_head": min(min(layer) for layer in ent), "entropy_mean": 1.0, "sigma_max": 2.0,
                   "bound_violations": 0, "train_time_s": 1.0}
            if i == len(entropies) - 1:
                rec["val_loss"] = val
            fh.write(json.dumps(rec).replace("NaN", "NaN") + "\n")
    if summary:
        (d / "summary.json").write_text("{}")
    return d


def test_collapse_rule_is_the_one_of_definitions_py(tmp_path):
    """0.1 nats at any logged step (definitions.py), the rule of the report and the ledger too;
    0.05 log T (0.208 nats at T = 64, the live monitor's line) is not it."""
    line = 0.05 * math.log(64)
    r = summarise_compare_run(write_run(tmp_path, [[[3.0, 3.0]], [[0.15, 3.0]], [[0.099, 3.0]]]))
    assert r["method"] == "qk-layernorm"
    assert 0.15 < line and (r["collapsed"], r["first_collapse_step"], r["diverged"]) == (True, 30, False)
    from sigma_core.experiments.definitions import first_collapse_step
    from sigma_core.experiments.report import read_metrics, summarise_run
    run = tmp_path / "run"
    assert summarise_run(run)["first_collapse_step"] == first_collapse_step(read_metrics(run)) == 30


def test_a_recovered_head_still_collapsed_and_the_table_says_so(tmp_path):
    """collapsed and first collapse step come from one rule: never 'collapsed 0/3' next to a
    first collapse step (the committed sweep printed both once)."""
    r = summarise_compare_run(write_run(tmp_path, [[[0.05, 3.0]], [[1.1, 3.0]]]))
    assert (r["collapsed"], r["first_collapse_step"]) == (True, 10)
    rows = [{**r, "seed": s} for s in range(3)]
    t = aggregate(rows)[0]
    assert (t["n_collapsed"], t["first_collapse_step"], t["stable"]) == (3, 10, False)


@pytest.mark.parametrize("case", ["nan_loss", "crashed", "no_val"])
def test_divergence_rule(tmp_path, case):
    kw = {"nan_loss": dict(losses=[2.0, float("nan")]), "crashed": dict(summary=False),
          "no_val": dict(val=float("nan"))}[case]
    r = summarise_compare_run(write_run(tmp_path, [[[3.0]], [[3.0]]], **kw))
    assert r["diverged"] and not r["collapsed"]


def test_a_run_at_chance_did_not_learn_and_is_not_stable(tmp_path):
    r = summarise_compare_run(write_run(tmp_path, [[[3.0]], [[3.0]]], val=math.log(256) - 0.01))
    assert not r["diverged"] and not r["collapsed"] and not r["learned"]
    assert not aggregate([r])[0]["stable"]
    (tmp_path / "b").mkdir()
    ok = summarise_compare_run(write_run(tmp_path / "b", [[[3.0]], [[3.0]]], val=2.0))
    assert ok["learned"] and aggregate([ok])[0]["stable"]


def test_methods_map_onto_config_options_and_back():
    for m in METHODS:
        assert method_of(method_overrides(m)) == m
    assert method_overrides("softcap", 20.0) == {"logit_softcap": 20.0}
    with pytest.raises(ValueError, match="method"):
        method_overrides("layernorm-everywhere")
    with pytest.raises(ValueError, match="lrs"):
        sweep_jobs("x", preset_name="cpu-smoke", methods=["baseline"], lrs=[-1.0], seeds=[0])


def test_tiny_sweep_writes_table_csv_figures_and_no_checkpoints(tmp_path):
    paths = run_compare(tmp_path, preset_name="cpu-smoke", methods=("baseline", "qk-layernorm"),
                        lrs=(1e-2, 1e-1), seeds=(0,), steps=4, log=lambda *a: None)
    with open(paths["csv"]) as fh:
        reader = csv.DictReader(fh)
        table = list(reader)
    assert tuple(reader.fieldnames) == TABLE_COLUMNS
    assert [(r["method"], float(r["lr"])) for r in table] == [
        ("baseline", 0.01), ("baseline", 0.1), ("qk-layernorm", 0.01), ("qk-layernorm", 0.1)]
    with open(paths["runs_csv"]) as fh:
        reader = csv.DictReader(fh)
        runs = list(reader)
    assert tuple(reader.fieldnames) == RUN_COLUMNS and len(runs) == 4
    assert all(int(r["bound_violations"]) == 0 for r in runs)
    meta = json.loads(paths["meta"].read_text())
    expected = largest_stable_lr(aggregate([{**r, "lr": float(r["lr"]), "collapsed": r["collapsed"] == "True",
                                             "diverged": r["diverged"] == "True"} for r in runs]))
    assert meta["largest_stable_lr"] == expected
    assert "torch" in meta and "git_commit" in meta and "device_name" in meta
    md = paths["md"].read_text()
    assert "| method | lr |" in md and "largest stable lr" in md and "qk-layernorm" in md
    for key in ("loss", "entropy"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.pt"))
    assert len(list(tmp_path.rglob("config.json"))) == 4
    # an interrupted sweep continues: finished runs of the same config are reused, not retrained
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")}
    run_compare(tmp_path, preset_name="cpu-smoke", methods=("baseline", "qk-layernorm"),
                lrs=(1e-2, 1e-1), seeds=(0,), steps=4, log=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")} == stamps


def test_cli_compare_rejects_bad_arguments():
    with pytest.raises(SystemExit) as err:
        main(["compare", "--lrs", "-1"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "nope"])


def test_compare_figures_say_what_markers_and_bars_mean_and_clip_tiny_entropies(tmp_path):
    from sigma_core.experiments.compare import ENTROPY_FLOOR, plot_compare

    rows = [row("baseline", lr, s, collapsed=lr > 0.02, loss=2.0 + lr + 0.1 * s) for lr in (1e-2, 1e-1)
            for s in (0, 1)] + [row("sigma-reparam", lr, s) for lr in (1e-2, 1e-1) for s in (0, 1)]
    rows[2]["entropy_min"] = rows[3]["entropy_min"] = 1e-32  # a collapsed head far below the floor
    paths = plot_compare(aggregate(rows), tmp_path, seq_len=64)
    loss_svg = paths["loss"].with_suffix(".svg").read_text()
    assert "collapsed (some seed)" in loss_svg and "diverged (some seed)" in loss_svg
    assert "± 1 std over 2 seeds" in loss_svg
    assert loss_svg.count('id="LineCollection_') == 2  # one set of error bars per method
    ent_svg = paths["entropy"].with_suffix(".svg").read_text()
    assert f"below {ENTROPY_FLOOR:g} nats (drawn at the floor)" in ent_svg
    assert "collapse threshold 0.1 nats" in ent_svg  # definitions.py, as in the table
    # no tiny entropy: no floor legend
    plot_compare(aggregate([row("baseline", 1e-2), row("baseline", 1e-1)]), tmp_path)
    assert "drawn at the floor" not in (tmp_path / "entropy_vs_lr.svg").read_text()
