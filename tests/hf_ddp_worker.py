"""The worker of tests/test_integration_ddp.py: ``HFEntropyCallback`` in a 2-process
``transformers.Trainer`` run and ``LightningEntropyCallback`` in a 2-process Lightning fit (DDP over
gloo, on the CPU).

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_ddp_worker.py OUT``
(the test starts the two processes itself, with the same ``env://`` variables).
Each rank trains the same tiny GPT-2 (built from a config, seeded, initial weights of std 0.5 so
that the heads do not attend uniformly and the ranks' batches give different entropies) on its share
of the batches (the ``Trainer``'s distributed sampler), with the callback (``every=2``, and a
``MemorySink`` keeping this rank's own records), ``report_to=["tensorboard"]`` (the ``Trainer``'s
own TensorBoard logger, writing under ``OUT/runs``) and a callback that keeps what ``on_log``
receives on this rank.  It writes
``OUT/rank{r}.json``: the world size, whether the ``Trainer`` wrapped the model in
``DistributedDataParallel``, the entries ``on_log`` received, and ``record_scalars`` of each of this
rank's records.  Then it fits the same model with Lightning (:func:`lightning_fit`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

from sigma_core.integrations.hf import HFEntropyCallback
from sigma_core.sinks import MemorySink, record_scalars

T, VOCAB, STEPS = 16, 64, 4


class Logged(transformers.TrainerCallback):
    """Every ``logs`` dict this rank's loggers are handed (``on_log``)."""

    def __init__(self):
        self.entries = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.entries.append({"step": state.global_step, **logs})


def main(out: str) -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, n_positions=T, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.5, attn_implementation="sdpa"))
    ids = torch.randint(0, VOCAB, (2 * 2 * STEPS, T), generator=torch.Generator().manual_seed(1))
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=2,
        report_to=["tensorboard"], disable_tqdm=True, save_strategy="no", use_cpu=True, ddp_backend="gloo", seed=0,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    mem, logged = MemorySink(), Logged()
    trainer.add_callback(logged)
    HFEntropyCallback(every=2, sinks=[mem]).add_to(trainer)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    rank = dist.get_rank()
    result = {"world_size": dist.get_world_size(),
              "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
              "logged": logged.entries, "records": [record_scalars(recs) for recs in mem.history],
              "forwards": [recs[0]["step"] for recs in mem.history]}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()  # both ranks got here: neither waits on the other
    lightning_fit(out, rank)
    dist.barrier()
    dist.destroy_process_group()


def lightning_fit(out: str, rank: int) -> None:
    """The same model under ``lightning.Trainer(strategy="ddp")`` in the same two processes (the process
    group is already there), with ``LightningEntropyCallback(every=2)`` and a ``CSVLogger``: writes
    ``OUT/lightning{r}.json`` (``record_scalars`` of this rank's records)."""
    import lightning
    from lightning.pytorch.loggers import CSVLogger

    from sigma_core.integrations.lightning import LightningEntropyCallback

    class GPT(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=2, n_head=2, n_embd=16, n_positions=T, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
                initializer_range=0.5, attn_implementation="sdpa"))

        def training_step(self, ids, i):
            loss = self.model(input_ids=ids, labels=ids).loss
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    ids = torch.randint(0, VOCAB, (2 * 2 * STEPS, T), generator=torch.Generator().manual_seed(1))
    mem = MemorySink()
    trainer = lightning.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp", logger=CSVLogger(os.path.join(out, "pl")),
        callbacks=[LightningEntropyCallback(every=2, module="model", sinks=[mem])], log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=out)
    trainer.fit(GPT(), torch.utils.data.DataLoader(ids, batch_size=2))
    with open(os.path.join(out, f"lightning{rank}.json"), "w") as fh:
        json.dump({"world_size": trainer.world_size, "records": [record_scalars(recs) for recs in mem.history]}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
