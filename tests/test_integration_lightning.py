"""The Lightning callback (sigma_core.integrations.lightning), by real ``lightning.Trainer.fit()`` runs.

A LightningModule around a tiny random-initialised Hugging Face GPT-2 (built from a config,
nothing downloaded; ``training_step`` calls ``self.model``, so the callback watches
``module="model"``) trains a few steps on the CPU.  Checked: the trainer's logger receives
exactly ``record_scalars`` of the monitor's records, at the step Lightning gives that optimiser
step's own metrics; under ``accumulate_grad_batches`` one record per optimiser step, from its
first micro-batch; validation is recorded only when asked (never the sanity check); a fit
resumed from a checkpoint records and logs the optimiser steps the uninterrupted fit does.
"""
import math

import pytest
import torch

lightning = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")

from lightning.pytorch.loggers import Logger  # noqa: E402

from sigma_core.integrations import LightningEntropyCallback  # noqa: E402
from sigma_core.sinks import MemorySink, record_scalars  # noqa: E402

T, VOCAB = 16, 64


class GPT(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=16, n_positions=T, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0))

    def training_step(self, ids, i):
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, ids, i):
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Keep(Logger):
    """A logger that keeps what Lightning hands it."""

    def __init__(self):
        super().__init__()
        self.logged = []

    name, version = "keep", 0

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def entropy(self, key="entropy_min_head/all"):
        return {step: m for step, m in self.logged if key in m}


def _data(n, seed):
    ids = torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(ids, batch_size=2, shuffle=False)


def _fit(tmp_path, callback, *, ckpt_path=None, callbacks=(), val=False, **kw):
    logger = Keep()
    trainer = lightning.Trainer(
        logger=logger, callbacks=[callback, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(callbacks), default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
        log_every_n_steps=1, limit_val_batches=2 if val else 0, num_sanity_val_steps=2 if val else 0, **kw)
    trainer.fit(GPT(), _data(8, 1), _data(4, 2) if val else None, ckpt_path=ckpt_path)
    return trainer, logger


def test_the_logger_gets_the_monitors_records_once_per_optimiser_step(tmp_path):
    mem = MemorySink()
    cb = LightningEntropyCallback(every=2, module="model", sinks=[mem], bound_every=1)
    trainer, logger = _fit(tmp_path, cb, max_steps=5, accumulate_grad_batches=2)
    logged = logger.entropy()
    losses = [step for step, m in logger.logged if "train_loss" in m]
    # optimiser steps 1, 2, 4 at Lightning's own step numbers for them (those of train_loss)
    assert sorted(logged) == [losses[0], losses[1], losses[3]] == [0, 1, 3]
    assert [recs[0]["step"] for recs in mem.history] == [0, 2, 6]  # the first micro-batch of each
    for step, recs in zip(sorted(logged), mem.history):
        assert logged[step] == record_scalars(recs)
        assert len(recs) == 4 and all(r["violations_exact"] == 0 == r["violations_theorem"] for r in recs)
        assert all(0 < r["entropy_mean"] <= math.log(T) + 1e-6 for r in recs)
    assert "sigma/layer1/head0" in logged[0] and "bound_margin_centered/layer0" in logged[0]
    assert cb.monitor is None and not trainer.lightning_module.model._forward_pre_hooks


@pytest.mark.parametrize("record_eval", [False, True])
def test_validation_is_recorded_only_when_asked_never_the_sanity_check(tmp_path, record_eval):
    mem = MemorySink()
    cb = LightningEntropyCallback(every=2, module="model", first_step=False, record_eval=record_eval, sinks=[mem])
    _, logger = _fit(tmp_path, cb, max_steps=4, val=True, val_check_interval=2)
    assert sorted(logger.entropy()) == [1, 3]
    evals = logger.entropy("val_entropy_min_head/all")
    assert len(evals) == (2 if record_eval else 0)  # two validation runs after steps 2 and 4, one record each
    assert len(mem.history) == (4 if record_eval else 2)
    if record_eval:
        eval_recs = [mem.history[1], mem.history[3]]  # forwards: sanity check unrecorded; train, val, train, val
        for (step, m), recs in zip(sorted(evals.items()), eval_recs):
            assert m == record_scalars(recs, prefix="val_")


class Steps(lightning.pytorch.Callback):
    """trainer.global_step at each micro-batch (one forward of the model each)."""

    def __init__(self):
        self.at = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at.append(trainer.global_step)


def test_a_resumed_fit_records_the_steps_the_uninterrupted_fit_records(tmp_path):
    keep = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    mem_a, steps_a = MemorySink(), Steps()
    _, whole = _fit(tmp_path / "a", LightningEntropyCallback(every=2, module="model", sinks=[mem_a]), max_steps=4,
                    accumulate_grad_batches=2, callbacks=[keep, steps_a])
    ckpt = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]  # after optimiser step 2 (one epoch)
    mem_b, steps_b = MemorySink(), Steps()
    _, resumed = _fit(tmp_path / "b", LightningEntropyCallback(every=2, module="model", sinks=[mem_b]), max_steps=4,
                      accumulate_grad_batches=2, ckpt_path=str(ckpt), callbacks=[steps_b])
    assert steps_b.at[0] == 2  # resumed after two optimiser steps
    a, b = whole.entropy(), resumed.entropy()
    assert sorted(a) == [0, 1, 3] and sorted(b) == [3]  # the resumed fit: optimiser step 4 only, at the same step
    # each record is the first micro-batch of its optimiser step (Lightning's resume may replay a different
    # number of micro-batches before it, so the forwards, and the values, are compared within each run)
    for mem, at in ((mem_a, steps_a.at), (mem_b, steps_b.at)):
        assert [recs[0]["step"] for recs in mem.history] == [at.index(n - 1) for n in (1, 2, 4) if n - 1 in at]
    assert b[3] == record_scalars(mem_b.history[0]) and b[3].keys() == a[3].keys()


def test_a_module_that_does_not_exist_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="module='encoder'"):
        _fit(tmp_path, LightningEntropyCallback(every=1, module="encoder"), max_steps=1)
    with pytest.raises(TypeError, match="module"):
        LightningEntropyCallback(module=3)
    with pytest.raises(ValueError, match="every"):
        LightningEntropyCallback(every=-1)
    with pytest.warns(RuntimeWarning, match="module='name'"):  # the LightningModule's own forward never runs
        _fit(tmp_path / "w", LightningEntropyCallback(every=1), max_steps=1)
