"""Training-step cost of sigmaReparam next to a plain model and torch's spectral_norm.

One training step = forward + backward + AdamW step.  Variants, timed side by side in one run
with the repetitions interleaved (plain, spectral, sigma, ..., plain, ...) so that machine load
hits all of them alike; medians are reported, with ratios to the plain model:

- ``plain``: every ``nn.Linear`` as is;
- ``spectral``: ``torch.nn.utils.parametrizations.spectral_norm`` on every ``nn.Linear``;
- ``sigma``: :func:`sigma_core.reparam.convert_to_sigma_reparam` alone: what a user gets by
  default (power-iteration steps batched per weight shape, each group's W_hat in one node);
- ``sigma-per-weight``: the same with ``batched=False`` (one step and one node per weight);
- ``sigma-scale-output``: a Linear computing (gamma/sigma) * (x W^T) instead of materialising
  W_hat (one power-iteration step per weight, sigma = u^T W v with gradient; written here,
  not in the library: see the measured verdict in docs/reparam.md);
- ``sigma-folded``: converted, then :func:`sigma_core.reparam.fold_sigma_reparam`
  (what inference and export pay).
(``sigma-batched`` is accepted as an old name of ``sigma``.)

``--compile``: every variant's model under ``torch.compile`` (``--backend``, default inductor;
forward and backward compiled, the AdamW step eager), by default the variants ``plain``,
``spectral``, ``sigma`` and ``sigma-folded`` (under compile σReparam's batching hooks step
aside and each weight steps in the graph, so ``sigma-per-weight`` is the same program).  The
warm-up steps include the compilation, whose time is printed per variant.

Models: ``--model mlp`` (default) is 12 x (Linear 256->256 + GELU) on ``--rows`` rows;
``--model gpt`` is the project's GPT (:mod:`sigma_core.models.gpt`) on random tokens.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_reparam.py --rows 64 1024     # the documented run
    OMP_NUM_THREADS=1 python benchmarks/bench_reparam.py --compile --rows 64 1024   # compiled, side by side
    OMP_NUM_THREADS=2 python benchmarks/bench_reparam.py --model gpt        # the CPU demo GPT
    python benchmarks/bench_reparam.py --device cuda --rows 4096

On a CPU that other processes load, read the process-CPU-time column and prefer one thread:
with more OpenMP threads than free cores every small operation waits at a barrier, which
inflates the many small operations of the power iteration far more than the large matrix
products of the plain model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.reparam import convert_to_sigma_reparam, fold_sigma_reparam

VARIANTS = ("plain", "spectral", "sigma", "sigma-per-weight", "sigma-scale-output", "sigma-folded")
#: the default variants of ``--compile``
COMPILED_VARIANTS = ("plain", "spectral", "sigma", "sigma-folded")


class ScaleOutputLinear(nn.Module):
    """sigmaReparam'd Linear that never materialises W_hat: y = (gamma/sigma) * (x W^T) + b.

    One power-iteration step per training forward (without gradient), then sigma = u^T W v
    with gradient through W, as in the library; gamma starts at sigma(W0)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        W = linear.weight.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        self.register_buffer("_u", U[:, 0].clone())
        self.register_buffer("_v", Vh[0].clone())
        self.gamma = nn.Parameter(S[0].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self._u.copy_(F.normalize(W @ self._v, dim=0))
                self._v.copy_(F.normalize(W.T @ self._u, dim=0))
        sigma = self._u @ (W @ self._v)  # with gradient through W
        y = F.linear(x, W) * (self.gamma / sigma.clamp_min(1e-12))
        return y + self.bias if self.bias is not None else y


class MLP(nn.Module):
    """``depth`` x (Linear width->width + GELU)."""

    def __init__(self, width: int = 256, depth: int = 12):
        super().__init__()
        self.layers = nn.Sequential(*(m for _ in range(depth) for m in (nn.Linear(width, width), nn.GELU())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_model(args: argparse.Namespace) -> tuple[nn.Module, callable]:
    """The benchmarked model and a ``loss_fn(model) -> scalar`` for one batch (plain weights)."""
    if args.model == "mlp":
        model = MLP(args.width, args.depth)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.rows, args.width, generator=gen).to(args.device)

        def mlp_loss(m: nn.Module) -> torch.Tensor:
            return m(x).square().mean()

        return model, mlp_loss
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
    elif variant in ("sigma", "sigma-folded"):
        convert_to_sigma_reparam(model)  # the default: batched
        if variant == "sigma-folded":
            fold_sigma_reparam(model)
    elif variant == "sigma-per-weight":
        convert_to_sigma_reparam(model, batched=False)
    elif variant == "sigma-scale-output":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, ScaleOutputLinear(child))
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024],
                        help="mlp: rows per batch (one table each)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps-per-rep", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS + ("sigma-batched",),
                        help="default: all; with --compile: " + " ".join(COMPILED_VARIANTS))
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant's model")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (with --compile)")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = list(COMPILED_VARIANTS if args.compile else VARIANTS)
    for name in ("reps", "warmup", "steps_per_rep"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}")
    args.variants = list(dict.fromkeys("sigma" if v == "sigma-batched" else v for v in args.variants))
    results = {}
    for rows in (args.rows if args.model == "mlp" else [None]):
        args.rows_now = rows
        results[rows] = bench(args)
    return results


def bench(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One side-by-side run of ``args.variants``; prints the table, returns the medians."""
    model_args = argparse.Namespace(**{**vars(args), "rows": args.rows_now})
    runs = {}
    for variant in args.variants:
        torch.manual_seed(0)
        model, loss_fn = make_model(model_args)
        model = reparametrise(model, variant).to(args.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if args.compile:  # the optimizer holds the parameters; the wrapper shares them
            model = torch.compile(model, backend=args.backend)
        runs[variant] = (model, loss_fn, opt)

    def step(variant: str) -> None:
        model, loss_fn, opt = runs[variant]
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()

    first: dict[str, float] = {}
    for i in range(max(args.warmup, 1 if args.compile else 0)):
        for variant in args.variants:
            t0 = time.perf_counter()
            step(variant)
            if i == 0:
                _sync(args.device)
                first[variant] = time.perf_counter() - t0
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
    what = (f"mlp {args.depth} x (Linear {args.width}->{args.width} + GELU), rows={args.rows_now}"
            if args.model == "mlp" else
            f"gpt d={args.d_model} layers={args.n_layer} heads={args.n_head} T={args.seq_len} batch={args.batch}")
    compiled = f" compile={args.backend}" if args.compile else ""
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}{compiled} {what} "
          f"reps={args.reps} (medians of interleaved repetitions; process CPU time is the steadier "
          f"clock on a shared CPU, wall time is what counts on a GPU)")
    if args.compile:
        print("first step (compilation included), s: "
              + ", ".join(f"{v} {first[v]:.1f}" for v in args.variants))
    print(f"{'variant':<20}{'wall ms/step':>14}{'ratio':>9}{'cpu ms/step':>14}{'ratio':>9}")
    for v in args.variants:
        rw = med_wall[v] / med_wall["plain"] if "plain" in med_wall else float("nan")
        rc = med_cpu[v] / med_cpu["plain"] if "plain" in med_cpu else float("nan")
        print(f"{v:<20}{1e3 * med_wall[v]:>14.3f}{rw:>8.3f}x{1e3 * med_cpu[v]:>14.3f}{rc:>8.3f}x")
    if "spectral" in med_cpu:
        for v in ("sigma", "sigma-per-weight", "sigma-scale-output"):
            if v in med_cpu:
                print(f"{v} / spectral: cpu {med_cpu[v] / med_cpu['spectral']:.3f}, "
                      f"wall {med_wall[v] / med_wall['spectral']:.3f}")
    return {"wall": med_wall, "cpu": med_cpu}


if __name__ == "__main__":
    main()
