"""What the entropy monitor costs a torch.compile'd model, per training step.

A tiny Hugging Face GPT-2 (random weights from a config, nothing downloaded) is compiled once,
then trained (forward + backward + AdamW step) in three configurations, timed side by side with
the rounds interleaved so that machine load hits all of them alike:

- ``compiled``: the compiled model, no monitor;
- ``attached``: the same with an ``EntropyMonitor(every=10**9)`` attached that records only the
  first step of each block: what the monitor's two root hooks (run eagerly: a graph break at the
  start and the end of the forward) cost a step it does not record;
- ``every=10``: the monitor recording every 10th step; a recorded step runs eagerly
  (``torch.compiler.set_stance("force_eager")``), so this is the average cost including those.

Each block is ``--steps`` steps under a fresh monitor; the first block of each configuration is
a warm-up (compilation) and not timed.  Reported: median process CPU time per step over the
rounds and the ratio to ``compiled``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_compiled_monitor.py --backend inductor
    OMP_NUM_THREADS=1 python benchmarks/bench_compiled_monitor.py --backend aot_eager --rounds 5
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

CONFIGS = ("compiled", "attached", "every=10")


def build(seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                  attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    from sigma_core.monitor import EntropyMonitor

    model = build()
    model.train()
    compiled = torch.compile(model, backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=g)

    def block(config: str) -> float:
        mon = None
        if config == "attached":
            mon = EntropyMonitor(model, every=10 ** 9)
        elif config == "every=10":
            mon = EntropyMonitor(model, every=10)
        t0 = time.process_time()
        for _ in range(args.steps):
            loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = (time.process_time() - t0) / args.steps
        if mon is not None:
            assert mon.n_skipped == 0 and (config != "every=10" or len(mon.last) == 2 * 4)
            mon.close()
        return dt

    for c in CONFIGS:  # warm-up: compilation (and the eager path of recorded steps)
        block(c)
    times = {c: [] for c in CONFIGS}
    for _ in range(args.rounds):
        for c in CONFIGS:
            times[c].append(block(c))
    base = statistics.median(times["compiled"])
    print(f"# torch {torch.__version__}, backend {args.backend}, cpu {platform.processor() or platform.machine()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    print(f"# GPT-2 d=64, 2 layers, 4 heads, batch {args.batch}, T={args.seq}; {args.rounds} rounds of "
          f"{args.steps} steps; process CPU s per training step (median)")
    print(f"{'config':<10} {'s/step':>9} {'ratio':>7}")
    for c in CONFIGS:
        m = statistics.median(times[c])
        print(f"{c:<10} {m:9.5f} {m / base:7.3f}")


if __name__ == "__main__":
    main()
