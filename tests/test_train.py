"""Training runs on the cpu-smoke preset: what a run directory promises, and what it shows."""
import argparse
import json
import math
import warnings

import numpy as np
import pytest
import torch

from sigma_core.cli.train import config_from_args, register
from sigma_core.experiments.config import preset
from sigma_core.experiments.train import CONFIG_NAME, METRICS_NAME, Trainer
from theory import entropy_lower_bound

REQUIRED = {"step", "train_loss", "grad_norm", "lr", "entropy_mean", "entropy_min_head", "sigma_max",
            "bound_violations", "entropy", "sigma", "rows_checked"}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The cpu-smoke baseline and sigmaReparam runs at the collapsing learning rate 3e-2."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for reparam in ("none", "sigma"):
        cfg = preset("cpu-smoke", reparam=reparam, threads=1)
        out[reparam] = (root / reparam, Trainer(cfg, root / reparam).run())
    return out


def records(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines()]


def test_run_directory_records_config_provenance_and_metrics(smoke_runs):
    run_dir, summary = smoke_runs["sigma"]
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    for key in ("preset", "reparam", "lr", "git_commit", "versions", "device_name", "corpus_sha256",
                "corpus_size"):
        assert key in config, key
    assert (config["preset"], config["reparam"], config["lr"]) == ("cpu-smoke", "sigma", 3e-2)
    assert len(config["corpus_sha256"]) == 64 and config["corpus_size"] == 2**20
    recs = records(run_dir)
    cfg = preset("cpu-smoke")
    assert [r["step"] for r in recs] == [1, *range(cfg.log_every, cfg.steps + 1, cfg.log_every)]
    for r in recs:
        assert REQUIRED <= set(r)
        assert np.shape(r["entropy"]) == np.shape(r["sigma"]) == (cfg.n_layer, cfg.n_head)
        assert r["entropy_min_head"] <= r["entropy_mean"] <= np.log(cfg.block_size)
        assert r["sigma_max"] == pytest.approx(np.max(r["sigma"]))
        assert set(r["gamma"]) == {f"blocks.{i}.attn.{p}_proj.weight" for i in range(cfg.n_layer)
                                   for p in "qkvo"}
    assert [r["step"] for r in recs if "val_loss" in r] == [15, 30]
    assert (run_dir / "checkpoint.pt").exists() and not list(run_dir.glob(".*tmp*"))
    assert summary["steps"] == cfg.steps and summary["tokens_per_s"] > 0


def test_every_logged_and_sampled_row_respects_the_bound(smoke_runs):
    for run_dir, summary in smoke_runs.values():
        assert summary["bound_violations"] == 0
        assert all(r["bound_violations"] == 0 and r["rows_checked"] > 0 for r in records(run_dir))
        samples = np.load(run_dir / "samples" / "step_000030.npz")
        cfg = preset("cpu-smoke")
        assert samples["entropy"].size == cfg.n_layer * cfg.n_head * cfg.sample_batch * cfg.block_size
        n_keys, entropy = samples["n_keys"], samples["entropy"]
        # the exact-row bound is evaluated in float64 on the same logits: it holds to rounding
        assert entropy.dtype == np.float64
        assert np.all(entropy >= entropy_lower_bound(samples["exact"], n_keys) - 1e-9)
        assert np.all(entropy >= entropy_lower_bound(samples["theorem"], n_keys) - 1e-9)
        # the variants are ordered: the theorem's sigma-bold is the loosest norm bound
        assert np.all(samples["theorem"] >= samples["exact"] * (1 - 1e-6))


def test_sigma_reparam_keeps_entropy_where_the_baseline_collapses(smoke_runs):
    base = records(smoke_runs["none"][0])[-1]
    sigma = records(smoke_runs["sigma"][0])[-1]
    assert base["sigma_max"] > 10 * sigma["sigma_max"]
    assert sigma["entropy_min_head"] > base["entropy_min_head"] + 1.0


def test_checkpoint_resumes_the_exact_trajectory(tmp_path):
    cfg = preset("cpu-smoke", steps=6, threads=1)
    straight = Trainer(cfg)
    losses = [straight.train_step()["train_loss"] for _ in range(6)]
    first = Trainer(cfg, tmp_path)
    resumed = [first.train_step()["train_loss"] for _ in range(3)]
    path = first.save_checkpoint()
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    second = Trainer(cfg)
    second.load_checkpoint(path)
    assert second.step == 3
    resumed += [second.train_step()["train_loss"] for _ in range(3)]
    assert resumed == losses
    with pytest.raises(ValueError, match="config"):
        Trainer(preset("cpu-smoke", steps=6, lr=1e-3)).load_checkpoint(path)


@pytest.mark.parametrize("gamma_init, expected", [("one", 1.0), ("sigma", None)])
def test_gamma_init_choice_reaches_the_model(gamma_init, expected):
    trainer = Trainer(preset("cpu-smoke", reparam="sigma", gamma_init=gamma_init))
    from sigma_core.reparam import sigma_reparam_state

    gammas = [v["gamma"] for v in sigma_reparam_state(trainer.model).values()]
    if expected is None:  # gamma = sigma(W_0): the initial weights are unchanged, gamma ~ 0.02 * width
        assert all(0.05 < g < 2.0 for g in gammas)
    else:
        assert gammas == pytest.approx([expected] * len(gammas))


def test_train_flags_map_onto_the_config_and_bad_values_exit_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    args = parser.parse_args(["train", "--preset", "cpu-smoke", "--out", str(tmp_path), "--lr", "0.01",
                              "--reparam", "spectral", "--steps", "7", "--no-progress"])
    cfg = config_from_args(args)
    assert (cfg.preset, cfg.lr, cfg.reparam, cfg.steps, cfg.progress) == ("cpu-smoke", 0.01, "spectral", 7, False)
    assert cfg.sample_steps == (7,)
    for bad in (["--lr", "-1"], ["--reparam", "weightnorm"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["train", "--out", str(tmp_path), *bad])
        assert exc.value.code == 2


def test_run_into_results_from_a_dirty_tree_is_refused_or_marked(tmp_path, monkeypatch):
    from sigma_core.experiments import train

    monkeypatch.setattr(train, "git_state", lambda: (str(tmp_path), "0" * 40, True))
    cfg = preset("cpu-smoke", steps=2, log_every=1, eval_every=2, threads=1)
    with pytest.raises(train.DirtyTreeError, match="allow_dirty"):
        Trainer(cfg, tmp_path / "results" / "run")
    with pytest.warns(train.DirtyTreeWarning, match="git_dirty"):
        trainer = Trainer(cfg, tmp_path / "results" / "run", allow_dirty=True)
    assert trainer.run()["git_dirty"] is True
    assert json.loads((tmp_path / "results" / "run" / CONFIG_NAME).read_text())["git_dirty"] is True
    Trainer(cfg, tmp_path / "elsewhere")  # outside results/: allowed (and marked in config.json)
    monkeypatch.setattr(train, "git_state", lambda: (str(tmp_path), "0" * 40, False))
    Trainer(cfg, tmp_path / "results" / "clean")


def test_learning_rate_warmup_then_cosine_or_constant():
    from sigma_core.experiments.train import learning_rate

    cfg = preset("cpu-smoke", lr=0.1, warmup_steps=10, lr_schedule="cosine", steps=100)
    assert learning_rate(cfg, 5) == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * 5 / 100)))
    assert learning_rate(cfg, 100) == pytest.approx(0.0, abs=1e-15)
    flat = preset("cpu-smoke", lr=0.1)
    assert {learning_rate(flat, s) for s in (1, 7, 30)} == {0.1}
    with pytest.raises(ValueError, match="warmup_steps"):
        preset("cpu-smoke", warmup_steps=-1)
    with pytest.raises(ValueError, match="model='vit' does not fit preset 'cpu-smoke'"):
        preset("cpu-smoke", model="vit")


def test_an_overflowing_logit_norm_keeps_every_layer_in_the_metrics_until_the_run_diverges(tmp_path):
    """Issue 24: a diverging run whose attention logits outgrow float32's norm (their squares pass
    3.4e38) while loss and gradients are still finite.  After step 3 the last layer's W_Q and W_K
    are scaled by 1e12 (logits ~1e23); with SGD, step 4 is logged with every layer and head, the
    overflowing rows counted in ``rows_nonfinite`` and left out of ``rows_checked``, no
    violation; step 5's loss is NaN and the run ends with its ``diverged`` record."""
    cfg = preset("cpu-smoke", optimizer="sgd", steps=10, log_every=1, eval_every=100, sample_steps=(),
                 checkpoint_every=0, threads=1)
    trainer = Trainer(cfg, tmp_path)
    plain_step = trainer.train_step

    def step(*, observe=False):
        if trainer.step == 3:
            with torch.no_grad():
                attn = trainer.model.attention_modules()[-1]
                attn.q_proj.weight.mul_(1e12)
                attn.k_proj.weight.mul_(1e12)
        return plain_step(observe=observe)

    trainer.train_step = step  # the run calls it once per step
    with warnings.catch_warnings():  # step 5's NaN queries: that call is skipped and counted, as always
        warnings.filterwarnings("ignore", message="EntropyMonitor: .* non-finite queries or keys")
        summary = trainer.run()
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert summary["diverged"] and summary["diverged_step"] == 5
    assert recs[-1]["diverged"] and "non-finite loss" in recs[-1]["reason"]
    before, last = recs[:3], recs[3]
    rows = cfg.block_size  # the monitor checks the first sample of each head: T rows per head
    assert all("rows_nonfinite" not in r and r["rows_checked"] == cfg.n_layer * cfg.n_head * rows for r in before)
    assert np.shape(last["entropy"]) == np.shape(last["sigma"]) == (cfg.n_layer, cfg.n_head)
    assert np.all(np.isfinite(last["entropy"])) and np.all(np.isfinite(last["sigma"]))  # no layer missing
    assert last["rows_nonfinite"] > 0 and last["bound_violations"] == 0
    assert last["rows_checked"] + last["rows_nonfinite"] == cfg.n_layer * cfg.n_head * rows
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["grad_norm"])
