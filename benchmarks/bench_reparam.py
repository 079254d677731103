"""Training-step cost of sigmaReparam next to a plain model and torch's spectral_norm.

One training step = forward + backward + AdamW step of the project's GPT
(:mod:`sigma_core.models.gpt`) on random tokens.  Variants, timed side by side in one run with the
repetitions interleaved (plain, spectral, sigma, sigma-batched, folded, plain, ...) so that machine load hits
all of them alike; medians are reported, with ratios to the plain model:

- ``plain``: every ``nn.Linear`` as is;
- ``spectral``: ``torch.nn.utils.parametrizations.spectral_norm`` on every ``nn.Linear``;
- ``sigma``: :func:`sigma_core.reparam.convert_to_sigma_reparam` (sigmaReparam, one power-iteration
  step per weight);
- ``sigma-batched``: the same plus :func:`sigma_core.reparam.batch_power_iterations` (the steps of
  equal-shaped weights batched into one operation per shape);
- ``sigma-folded``: the same, then :func:`sigma_core.reparam.fold_sigma_reparam`
  (what inference and export pay).

Usage (defaults: the CPU demo model, d=128, 4 layers, 4 heads, T=128, batch 32)::

    OMP_NUM_THREADS=2 python benchmarks/bench_reparam.py    # an otherwise idle 2-core machine
    OMP_NUM_THREADS=1 python benchmarks/bench_reparam.py    # a shared, loaded machine
    python benchmarks/bench_reparam.py --device cuda --d-model 256 --n-layer 6 --n-head 8 --seq-len 256 --batch 64

To benchmark another model, change :func:`make_model` only.  On a CPU that other processes
load, read the process-CPU-time column and prefer one thread: with more OpenMP threads than free
cores every small operation waits at a barrier, which inflates the many small operations of
the power iteration far more than the large matrix products of the plain model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sigma_core.reparam import batch_power_iterations, convert_to_sigma_reparam, fold_sigma_reparam

VARIANTS = ("plain", "spectral", "sigma", "sigma-batched", "sigma-folded")


def make_model(args: argparse.Namespace) -> tuple[nn.Module, callable]:
    """The benchmarked model and a ``loss_fn(model) -> scalar`` for one batch (plain weights)."""
    from sigma_core.models.gpt import GPT, ModelConfig

    cfg = ModelConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                      block_size=args.seq_len)
    model = GPT(cfg)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    idx = idx.to(args.device)
    x, y = idx[:, :-1], idx[:, 1:]  # (B, T) each

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return m(x, y)[1]

    return model, loss_fn


def reparametrise(model: nn.Module, variant: str) -> nn.Module:
    """Apply ``variant`` to every ``nn.Linear`` of ``model`` in place."""
    if variant == "spectral":
        from torch.nn.utils.parametrizations import spectral_norm

        for module in list(model.modules()):
            if isinstance(module, nn.Linear):
                spectral_norm(module)
    elif variant in ("sigma", "sigma-batched", "sigma-folded"):
        convert_to_sigma_reparam(model)
        if variant == "sigma-batched":
            batch_power_iterations(model)
        if variant == "sigma-folded":
            fold_sigma_reparam(model)
    return model


def reparam_only_seconds(model: nn.Module, reps: int, device: str) -> float:
    """Median time of the reparametrisation alone: every parametrised weight read once in
    training mode, plus the backward through it (what a training step adds to a plain one).
    With :func:`~sigma_core.reparam.batch_power_iterations` its hooks run around the reads,
    as around a forward."""
    from torch.nn.utils import parametrize

    from sigma_core.reparam import _batched_post_hook, _batched_pre_hook

    weights = [(m, n) for m in model.modules() if parametrize.is_parametrized(m)
               for n in m.parametrizations]
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        batched = _batched_pre_hook in model._forward_pre_hooks.values()
        if batched:
            _batched_pre_hook(model, ())
        total = sum(getattr(m, n).sum() for m, n in weights)
        if batched:
            _batched_post_hook(model, (), None)
        total.backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps-per-rep", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)

    runs = {}
    for variant in args.variants:
        torch.manual_seed(0)
        model, loss_fn = make_model(args)
        model = reparametrise(model, variant).to(args.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs[variant] = (model, loss_fn, opt)

    def step(variant: str) -> None:
        model, loss_fn, opt = runs[variant]
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()

    for _ in range(args.warmup):
        for variant in args.variants:
            step(variant)
    wall: dict[str, list[float]] = {v: [] for v in args.variants}
    cpu: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.reps):
        for variant in args.variants:
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps_per_rep):
                step(variant)
            _sync(args.device)
            wall[variant].append((time.perf_counter() - t0) / args.steps_per_rep)
            cpu[variant].append((time.process_time() - c0) / args.steps_per_rep)

    med_wall = {v: statistics.median(t) for v, t in wall.items()}
    med_cpu = {v: statistics.median(t) for v, t in cpu.items()}
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"d={args.d_model} layers={args.n_layer} heads={args.n_head} T={args.seq_len} "
          f"batch={args.batch} reps={args.reps} (medians; process CPU time is the steadier "
          f"clock on a shared CPU, wall time is what counts on a GPU)")
    print(f"{'variant':<15}{'wall ms/step':>14}{'ratio':>9}{'cpu ms/step':>14}{'ratio':>9}")
    for v in args.variants:
        rw = med_wall[v] / med_wall["plain"] if "plain" in med_wall else float("nan")
        rc = med_cpu[v] / med_cpu["plain"] if "plain" in med_cpu else float("nan")
        print(f"{v:<15}{1e3 * med_wall[v]:>14.2f}{rw:>8.3f}x{1e3 * med_cpu[v]:>14.2f}{rc:>8.3f}x")
    for v in ("spectral", "sigma", "sigma-batched"):
        if v in runs:
            t = reparam_only_seconds(runs[v][0], args.reps, args.device)
            print(f"{v}: the reparametrisation alone (all weights, forward + backward) takes "
                  f"{1e3 * t:.2f} ms = {t / med_wall.get('plain', float('nan')):.3f} of a plain step")
    return {"wall": med_wall, "cpu": med_cpu}


if __name__ == "__main__":
    main()
