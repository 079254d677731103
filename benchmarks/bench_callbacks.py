"""Benchmark: what the Hugging Face Trainer callback adds to a training step, beside the bare monitor.

A Hugging Face GPT-2 (4 layers, d = 256, 4 heads, T = 256, batch 8, vocabulary 256, dropout 0,
sdpa attention, AdamW, random initialisation from its config) trains with ``transformers.Trainer``
in four configurations: no callback; :class:`sigma_core.integrations.hf.HFEntropyCallback` with
``every=10`` and with ``every=1`` (``first_step=False``, its defaults otherwise: the bound and
``sigma_h`` checked on the first recorded step and every 10th recorded step after it; the scalars
logged with ``Trainer.log``); and the same ``Trainer`` with a bare
:class:`~sigma_core.monitor.EntropyMonitor` ``(every=1)`` attached to its model by hand, which does
the same recording (every forward, the bound on forwards 0, 10, ...) and logs nothing.  Each round
runs, for every configuration in a rotated order, a fresh ``Trainer`` on a copy of the same initial
weights for ``--steps + 1`` optimiser steps and times the ``--steps`` step cycles from the first
step's start to the last step's end (a timing callback's ``on_step_begin``: forward, backward,
optimiser, logging and every callback).  So each block of ``every=10`` holds exactly one recorded
step (step 10), and each block of ``every=1``, callback or monitor, ten recorded steps and one bound
check (step 1).  Times are process CPU time (with one thread, the step's own cost; other processes
on a shared machine disturb it much less than wall-clock time).  Overheads are paired per round:
each configuration against the no-callback block of that round, and the callback's own cost as
``callback every=1`` against ``monitor every=1`` of the same round (median and quartiles over rounds).

    OMP_NUM_THREADS=1 python benchmarks/bench_callbacks.py --rounds 6
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import datetime
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_entropy import machine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps per block (default 10)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be positive")

    import torch
    import transformers
    from sigma_core import native
    from sigma_core.integrations.hf import HFEntropyCallback
    from sigma_core.monitor import EntropyMonitor

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=a.layers, n_embd=a.d_model, n_head=a.heads, n_positions=a.seq_len, vocab_size=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa"))
    n = a.batch * (a.steps + 1)
    ids = torch.randint(0, 256, (n, a.seq_len), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": x, "labels": x} for x in ids]
    out = tempfile.mkdtemp()
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=a.steps + 1, per_device_train_batch_size=a.batch, learning_rate=1e-3,
        logging_steps=10_000, report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, seed=0)

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.starts = []

        def on_step_begin(self, args, state, control, **kw):
            self.starts.append(time.process_time())

        def on_train_end(self, args, state, control, **kw):
            self.starts.append(time.process_time())  # the end of the last step's cycle

    configs = {"no callback": None, "callback every=10": 10, "callback every=1": 1, "monitor every=1": "monitor"}

    def block(every) -> float:
        trainer = transformers.Trainer(model=copy.deepcopy(base), args=args, train_dataset=data)
        clock = Clock()
        trainer.add_callback(clock)  # before the entropy callback: its clock starts first
        monitor = None
        if every == "monitor":  # by hand: every forward of the model records (the bound on 0, 10, ...)
            monitor = EntropyMonitor(trainer.model, every=1)
        elif every is not None:
            HFEntropyCallback(every=every, first_step=False).add_to(trainer)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        if monitor is not None:
            assert len(monitor.last) == a.layers * a.heads  # it did record
            monitor.close()
        # cycles of steps 1..steps: from step 1's begin to step (steps + 1)'s begin
        return (clock.starts[a.steps] - clock.starts[0]) / a.steps

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        if subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                          capture_output=True, text=True, check=True).stdout.strip():
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"

    def stamp() -> str:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{now}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"

    print(f"# commit {commit}, {os.cpu_count()} CPU core(s), start {stamp()}")
    print(machine())
    print(f"model: GPT-2, {a.layers} layers, d={a.d_model}, {a.heads} heads, T={a.seq_len}, batch {a.batch}, sdpa, "
          f"AdamW; {a.rounds} rounds of {a.steps} timed steps per configuration (process CPU time)")
    for every in configs.values():  # untimed: builds the kernel, warms the caches
        block(every)
    print(f"the monitor's fast path: {native.describe().replace(os.path.expanduser('~'), '~')}")
    times = {name: [] for name in configs}
    names = list(configs)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(block(configs[name]))
    def paired(num, den):
        ratios = [t / b for t, b in zip(num, den)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        return f"{100 * (q2 - 1):>8.1f}% [{100 * (q1 - 1):.1f}%, {100 * (q3 - 1):.1f}%]"

    base_med = statistics.median(times["no callback"])
    print(f"{'configuration':>20} {'CPU s / step (median)':>22} {'overhead':>9}   paired overhead (median, quartiles)")
    for name in names:
        md = statistics.median(times[name])
        print(f"{name:>20} {md:>22.4f} {100 * (md / base_med - 1):>8.1f}%   {paired(times[name], times['no callback'])}")
    print(f"the callback's own cost, callback every=1 / monitor every=1 - 1, paired per round (median, quartiles): "
          f"{paired(times['callback every=1'], times['monitor every=1']).strip()}")
    print("per round, CPU s / step: " + "; ".join(
        f"{name} " + " ".join(f"{t:.4f}" for t in times[name]) for name in names))
    print(f"# end {stamp()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
