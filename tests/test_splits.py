"""The held-out test split (``test_split``): disjoint from the validation split, the same data as
before split in two, evaluated once at the last step, and absent unless asked for."""
import json

import torch

from sigma_core.experiments.config import preset
from sigma_core.experiments.tasks import DigitsTask, SequenceTask, make_task
from sigma_core.experiments.train import Trainer


def _rows(x):
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_digits_validation_and_test_halves_partition_the_old_held_out_set():
    old, new = DigitsTask(0.2), DigitsTask(0.2, test_split=True)
    assert new.test_batches() is not None and old.test_batches() is None
    val = torch.cat([x for x, _ in new.eval_batches()])
    test = torch.cat([x for x, _ in new.test_batches()])
    assert not (_rows(val) & _rows(test))  # disjoint
    assert _rows(val) | _rows(test) == _rows(old.test_x)  # together: the held-out images as before
    assert torch.equal(new.train_x, old.train_x)  # training data untouched
    # stratified: every class in both halves, in nearly equal numbers
    yv, yt = torch.cat([y for _, y in new.eval_batches()]), torch.cat([y for _, y in new.test_batches()])
    assert (torch.bincount(yv, minlength=10) - torch.bincount(yt, minlength=10)).abs().max() <= 1


def test_sequence_test_set_differs_from_validation_and_lm_halves_the_held_out_bytes():
    t = SequenceTask(test_split=True)
    assert not any(torch.equal(a[0], b[0]) for a in t.eval_batches() for b in t.test_batches())
    assert SequenceTask().test_batches() is None
    lm = make_task(preset("cpu-smoke", test_split=True))
    assert lm.val.numel() + lm.test.numel() == lm.corpus.val.numel()
    assert lm.val.data_ptr() != lm.test.data_ptr()


def test_the_test_split_is_evaluated_once_at_the_last_step(tmp_path):
    summary = Trainer(preset("seq2seq-smoke", test_split=True), tmp_path / "run").run()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with_test = [r["step"] for r in recs if "test_loss" in r]
    assert with_test == [recs[-1]["step"]] and "test_accuracy" in recs[-1]
    assert summary["final_test_accuracy"] == recs[-1]["test_accuracy"]
    assert summary["final_val_accuracy"] == recs[-1]["val_accuracy"]  # the validation number stays the validation's
    plain = Trainer(preset("seq2seq-smoke"), tmp_path / "plain").run()
    assert "final_test_accuracy" not in plain
