"""The language-modelling claim's verdict rules (sigma_core.experiments.lm_claim) on hand-made runs."""
from __future__ import annotations

from sigma_core.experiments import lm_claim


def _row(method, lr, seed, val, test, *, entropy=1.0, diverged=False):
    records = [{"step": s, "train_loss": 5.0 - 0.2 * s, "entropy_min_head": entropy, "val_loss": val}
               for s in range(1, 6)]
    return {"method": method, "lr": lr, "seed": seed, "val_loss": val, "test_loss": test, "records": records,
            "config": {"model": "gpt", "vocab_size": 256, "block_size": 64},
            "summary": {"diverged": diverged, "diverged_step": 5 if diverged else None}}


def test_lm_verdict_chooses_on_validation_and_counts_stable_rates():
    base = [_row("baseline", 0.01, s, 2.0, 2.1 + 0.01 * s) for s in range(3)] + \
           [_row("baseline", 0.1, s, 1.9, 3.0, entropy=0.01) for s in range(3)]  # best on validation, collapsed
    sig = [_row("sigma", lr, s, 2.0, 2.1 + 0.01 * s) for lr in (0.01, 0.1) for s in range(3)]
    v = lm_claim.claim_verdict(base + sig)
    assert v["numbers"]["baseline"]["chosen_lr"] == 0.1  # chosen on validation loss, not test loss
    assert v["numbers"]["baseline"]["stable_lrs"] == [0.01] and v["numbers"]["sigma"]["stable_lrs"] == [0.01, 0.1]
    assert v["numbers"]["competitive"] and v["numbers"]["robust"] and v["verdict"] == "reproduced"
    worse = [_row("sigma", lr, s, 2.0, 3.5 + 0.01 * s, entropy=0.05) for lr in (0.01, 0.1) for s in range(3)]
    assert lm_claim.claim_verdict(base + worse)["verdict"] == "not reproduced at this scale"
    diverged = [_row("sigma", lr, s, None, None, diverged=True) for lr in (0.01, 0.1) for s in range(3)]
    assert lm_claim.claim_verdict(base + diverged)["numbers"]["sigma"]["test_mean"] > 5.5  # chance, log 256
    assert lm_claim.claim_verdict([])["verdict"] == "not attempted"
