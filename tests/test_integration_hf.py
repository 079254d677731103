"""The Hugging Face Trainer callback (sigma_core.integrations.hf), by real ``Trainer.train()`` runs.

A tiny random-initialised GPT-2 (built from a config, nothing downloaded) trains a few steps on
the CPU.  Checked: the values ``Trainer.log`` received (``trainer.state.log_history``, what every
``report_to`` logger gets) are exactly ``record_scalars`` of the monitor's records; under gradient
accumulation there is one record per optimiser step, taken on its first micro-batch; evaluation
forwards are recorded only when asked (then one per evaluation, under ``eval_`` names); a run
resumed from a checkpoint logs the same steps and values as the uninterrupted run.
"""
import contextlib
import io
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sigma_core.integrations import HFEntropyCallback  # noqa: E402
from sigma_core.integrations._schedule import StepSchedule  # noqa: E402
from sigma_core.sinks import MemorySink, record_scalars  # noqa: E402

T, VOCAB = 16, 64


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=T, vocab_size=VOCAB,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (n, T), generator=g)]


def _trainer(out, model, *, max_steps, accumulation=1, eval_steps=None, save_steps=None, callbacks=(),
             logging_steps=1000):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=logging_steps, report_to=[], disable_tqdm=True, use_cpu=True, seed=0, data_seed=0,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_data(32, 1),
                                eval_dataset=_data(4, 2) if eval_steps else None)


def _train(trainer, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train(**kw)


def _logged(trainer, key="entropy_min_head/all"):
    """The log_history entries the callback wrote: {step: entry without Trainer's own keys}."""
    return {e["step"]: {k: v for k, v in e.items() if k not in ("step", "epoch")}
            for e in trainer.state.log_history if key in e}


def test_trainer_log_gets_the_monitors_records_once_per_optimiser_step(tmp_path):
    mem = MemorySink()
    trainer = _trainer(tmp_path, _model(), max_steps=5, accumulation=2)
    callback = HFEntropyCallback(every=2, sinks=[mem], bound_every=1).add_to(trainer)
    _train(trainer)
    logged = _logged(trainer)
    assert sorted(logged) == [1, 2, 4]  # step 1, then every 2nd optimiser step
    # one record per optimiser step, from its first micro-batch: forwards 0, 2, 6 of the model
    assert [recs[0]["step"] for recs in mem.history] == [0, 2, 6]
    for step, recs in zip(sorted(logged), mem.history):
        assert logged[step] == record_scalars(recs)  # exactly the records, through Trainer.log
        assert len(recs) == 2 * 2  # layers x heads
        assert all(r["violations_exact"] == 0 and r["violations_theorem"] == 0 for r in recs)
        assert all(0 < r["entropy_mean"] <= math.log(T) + 1e-6 for r in recs)
    first = logged[1]
    assert {"entropy/layer1/head1", "entropy_min_head/layer0", "sigma/layer0/head0",
            "bound_margin_theorem/layer1", "violations_centered"} <= set(first)
    assert first["entropy_min_head/layer0"] == min(first["entropy/layer0/head0"], first["entropy/layer0/head1"])
    assert callback.monitor is None  # removed when training ended
    assert not trainer.model._forward_pre_hooks and not trainer.model._forward_hooks


@pytest.mark.parametrize("record_eval", [False, True])
def test_evaluation_is_recorded_only_when_asked(tmp_path, record_eval):
    mem = MemorySink()
    trainer = _trainer(tmp_path, _model(), max_steps=4, eval_steps=2)
    HFEntropyCallback(every=2, first_step=False, record_eval=record_eval, sinks=[mem]).add_to(trainer)
    _train(trainer)
    assert sorted(_logged(trainer)) == [2, 4]
    evals = _logged(trainer, "eval_entropy_min_head/all")
    # two evaluations (steps 2 and 4) of two batches each: the first batch of each is recorded
    assert sorted(evals) == ([2, 4] if record_eval else [])
    assert len(mem.history) == (4 if record_eval else 2)
    if record_eval:
        # forwards: steps 1, 2 are 0, 1; the evaluation after step 2 is 2, 3; steps 3, 4 are 4, 5; then 6, 7
        eval_recs = [recs for recs in mem.history if recs[0]["step"] in (2, 6)]
        assert [recs[0]["step"] for recs in mem.history] == [1, 2, 5, 6]
        for step, recs in zip([2, 4], eval_recs):
            assert evals[step] == record_scalars(recs, prefix="eval_")


def test_a_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path):
    whole = _trainer(tmp_path / "whole", _model(), max_steps=6, save_steps=3)
    HFEntropyCallback(every=2).add_to(whole)
    _train(whole)
    resumed = _trainer(tmp_path / "resumed", _model(), max_steps=6)
    mem = MemorySink()
    HFEntropyCallback(every=2, sinks=[mem]).add_to(resumed)
    _train(resumed, resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    # the resumed run recorded steps 4 and 6 only (its forwards 0 and 2); steps 1, 2 come with the checkpoint's log
    assert [recs[0]["step"] for recs in mem.history] == [0, 2]
    a, b = _logged(whole), _logged(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 4, 6]
    assert b[4] == record_scalars(mem.history[0]) and b[6] == record_scalars(mem.history[1])
    for step in (4, 6):
        assert b[step].keys() == a[step].keys()
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_bad_arguments_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="every"):
        HFEntropyCallback(every=0)
    with pytest.raises(TypeError, match="record_eval"):
        HFEntropyCallback(record_eval="yes")
    with pytest.raises(TypeError, match="every is the callback's own"):
        StepSchedule(2, monitor_options={"every": 3})
    with pytest.raises(TypeError, match="trainer"):
        HFEntropyCallback().add_to(object())
    trainer = _trainer(tmp_path, _model(), max_steps=1)
    trainer.add_callback(HFEntropyCallback())  # no way to reach Trainer.log
    with pytest.raises(RuntimeError, match="add_to"):
        _train(trainer)


def test_the_trainers_own_log_is_kept_on_the_steps_the_callback_logs(tmp_path):
    # Trainer.log clears control.should_log; the callback logs in on_step_end, after the Trainer decided to
    # log its loss on that step: without care the loss log of steps 2 and 4 would be dropped
    trainer = _trainer(tmp_path, _model(), max_steps=4, logging_steps=2)
    HFEntropyCallback(every=2, first_step=False).add_to(trainer)
    _train(trainer)
    assert sorted(_logged(trainer)) == [2, 4]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]


@pytest.mark.parametrize("every", [1, 2, 10])
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("bound_every", [1, 3, 10])
def test_the_bound_is_checked_on_every_bound_every_th_recorded_step_as_the_monitor_does(every, first_step,
                                                                                         bound_every):
    s = StepSchedule(every, first_step=first_step, monitor_options={"bound_every": bound_every})
    due = [n for n in range(1, 401) if s.due(n - 1)]
    # the monitor's own rule (EntropyMonitor(every=1, bound_every=10): forwards 0, 10, 20, ...): the first
    # recorded step and every bound_every-th recorded step after it; never two checks closer than that
    assert [n for n in due if s.checks_bound(n - 1)] == due[::bound_every]
