"""The ViT on the 8x8 digits: shapes, the fixed split, sigmaReparam on the patch convolution,
the harsh-recipe preset, and a smoke-size run through the one training loop."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from sigma_core.experiments.config import preset
from sigma_core.experiments.tasks import DigitsTask
from sigma_core.experiments.train import CONFIG_NAME, METRICS_NAME, Trainer, build_model, row_samples
from sigma_core.models.vit import ViT, ViTConfig
from sigma_core.reparam import sigma_reparam_state
from theory import entropy_lower_bound


def test_vit_attention_is_bidirectional_and_permutation_aware():
    torch.manual_seed(0)
    model = ViT(ViTConfig(d_model=16, n_layer=2, n_head=2, patch_size=2)).eval()
    x = torch.randn(2, 1, 8, 8)
    logits, _ = model(x)
    # a change in the last patch changes the class-token output: attention is not causal
    x2 = x.clone()
    x2[:, :, -2:, -2:] += 1.0
    assert not torch.allclose(model(x2)[0], logits)
    assert all(not a.causal for a in model.attention_modules())
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(patch_size=3)


def test_digits_split_is_fixed_stratified_and_standardised():
    a, b = DigitsTask(0.2), DigitsTask(0.2)
    assert torch.equal(a.test_x, b.test_x) and a.sha256 == b.sha256
    assert (a.n_train, a.n_test) == (1437, 360)
    assert abs(float(a.train_x.mean())) < 1e-4 and abs(float(a.train_x.std()) - 1) < 1e-3
    # stratified: each class holds 8-12 % of the test set
    counts = np.bincount(a.test_y.numpy(), minlength=10) / a.n_test
    assert counts.min() > 0.08 and counts.max() < 0.12
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsTask(1.0)


def test_sigma_reparam_covers_the_patch_embedding_and_every_linear():
    model = build_model(preset("vit-digits-sgd"))
    names = set(sigma_reparam_state(model))
    assert "patch_emb.weight" in names and "head.weight" in names
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert names == linears
    # the harsh recipe: no LayerNorm anywhere
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    cfg = preset("vit-digits-sgd")
    assert (cfg.optimizer, cfg.warmup_steps, cfg.weight_decay, cfg.norm) == ("sgd", 0, 0.0, "none")
    std = preset("vit-digits")
    assert (std.optimizer, std.norm, std.reparam) == ("adamw", "pre", "none")
    assert std.warmup_steps > 0 and std.weight_decay > 0


@pytest.mark.parametrize("reparam", ["none", "sigma"])
def test_vit_smoke_run_records_accuracy_entropy_and_sigma(tmp_path, reparam):
    cfg = preset("vit-smoke", reparam=reparam, threads=1)
    summary = Trainer(cfg, tmp_path).run()
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in ("model", "norm", "optimizer", "warmup_steps", "weight_decay", "reparam", "git_commit",
                "git_dirty", "data_sha256"):
        assert key in config, key
    assert config["model"] == "vit" and config["data"]["n_test"] == 360
    recs = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert np.shape(recs[-1]["entropy"]) == (cfg.n_layer, cfg.n_head)
    # 4x4 patches of an 8x8 image: 4 patches + class token, every row sees 5 keys
    assert all(r["entropy_mean"] <= np.log(5) + 1e-5 for r in recs)
    assert 0.0 <= summary["final_val_accuracy"] <= 1.0 and summary["bound_violations"] == 0
    assert [r["step"] for r in recs if "val_accuracy" in r] == [6, 12]
    # the learning rate follows the warm-up, then the cosine
    lrs = {r["step"]: r["lr"] for r in recs}
    assert lrs[1] == pytest.approx(cfg.lr / 3 * 0.5 * (1 + np.cos(np.pi / 12)))
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)


def test_vit_row_samples_respect_the_bound():
    torch.manual_seed(0)
    model = build_model(preset("vit-smoke", reparam="sigma"))
    samples = row_samples(model, DigitsTask(0.2).test_x[:4])
    assert samples["violations"] == 0
    assert np.all(samples["entropy"] >= entropy_lower_bound(samples["theorem"], samples["n_keys"]) - 1e-9)
    assert set(samples["n_keys"].tolist()) == {5}  # 4 patches + class token
