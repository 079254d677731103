"""Why a collapsed baseline trains slower on a CPU: subnormal floats in its attention.

``entropy-collapse demo`` on a CPU reports more tokens/s for sigmaReparam than for the baseline,
although ``bench_reparam.py`` measures sigmaReparam's training step as slower than a plain one.
Both are right: ``bench_reparam.py`` times models at initialisation, while in the demo the
baseline's attention collapses within a few dozen steps.  A collapsed row holds probabilities
like e^-90 ~ 1e-39, below float32's smallest normal number (1.2e-38): *subnormal* numbers, which
x86 CPUs process one to two orders of magnitude slower than normal ones (GPUs do not slow down).

This script shows it side by side in one run: it trains the ``cpu-demo`` baseline and its
sigmaReparam twin for ``--warm`` steps at the preset's learning rate 3e-2 (the baseline
collapses), then times further training steps of both, interleaved, first as is, then with
``torch.set_flush_denormal(True)`` (subnormals read and written as zero), then as is again, and
counts the subnormal attention probabilities of one batch.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_collapsed_step.py            # about 4 minutes on a shared 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/bench_collapsed_step.py --warm 40 --reps 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sigma_core.experiments.config import preset
from sigma_core.experiments.train import Trainer

TINY = torch.finfo(torch.float32).tiny  # smallest normal float32, 1.18e-38


def subnormal_fraction(trainer: Trainer) -> float:
    """Fraction of the visible attention probabilities of one training batch that are subnormal."""
    counts = [0, 0]

    def hook(module, args, output):
        _, q, k = args  # (B, H, T, d_head) each
        owner = owners[module]
        logits = owner.scale * (q.float() @ k.float().transpose(-1, -2))  # (B, H, T, T)
        t = logits.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, T, T)
        visible = p[..., mask]
        counts[0] += int(((visible > 0) & (visible < TINY)).sum())
        counts[1] += visible.numel()

    owners = {m.probe: m for m in trainer.model.modules() if hasattr(m, "probe")}
    handles = [probe.register_forward_hook(hook) for probe in owners]
    try:
        with torch.no_grad():
            x, y = trainer.task.train_batch(trainer.cfg.batch_size, torch.Generator().manual_seed(123),
                                            trainer.device)
            trainer.model(x, y)
    finally:
        for h in handles:
            h.remove()
    return counts[0] / max(counts[1], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", type=int, default=60, help="training steps before timing (default 60)")
    parser.add_argument("--reps", type=int, default=15, help="timed steps per model and mode (default 15)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainers = {name: Trainer(preset("cpu-demo", reparam=name, threads=1, progress=False, steps=10**6), None)
                for name in ("none", "sigma")}

    def timed(trainer: Trainer) -> float:
        t0 = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - t0

    def measure(label: str) -> None:
        times = {name: [] for name in trainers}
        for _ in range(args.reps):  # interleaved: machine load hits both alike
            for name, trainer in trainers.items():
                times[name].append(timed(trainer))
        base, sigma = (statistics.median(times[n]) for n in ("none", "sigma"))
        print(f"| {label} | {base * 1e3:.0f} | {sigma * 1e3:.0f} | {sigma / base:.2f}x |", flush=True)

    print(f"cpu-demo GPT (d=128, 4 layers, 4 heads, T=128, batch 32), lr 3e-2, 1 thread, "
          f"median of {args.reps} interleaved steps\n")
    print("| when | baseline ms/step | sigmaReparam ms/step | sigmaReparam / baseline |")
    print("|---|---|---|---|")
    measure(f"steps 1-{args.reps} (from initialisation)")
    for trainer in trainers.values():
        for _ in range(args.warm):
            trainer.train_step()
    frac = {name: subnormal_fraction(t) for name, t in trainers.items()}
    measure(f"after {trainers['none'].step} steps")
    if not torch.set_flush_denormal(True):
        print("\nthis CPU does not support flushing subnormals (torch.set_flush_denormal returned False)")
        return
    try:
        measure(f"after {trainers['none'].step} steps, subnormals flushed to zero")
    finally:
        torch.set_flush_denormal(False)
    measure(f"after {trainers['none'].step} steps, subnormals kept again")
    print(f"\nsubnormal attention probabilities after {trainers['none'].step} steps: baseline "
          f"{frac['none']:.2%}, sigmaReparam {frac['sigma']:.2%}")


if __name__ == "__main__":
    main()
