"""Benchmark: dense vs streaming attention entropy (memory, time) and the EntropyMonitor's overhead.

Part 1 runs every (method, T) in a fresh subprocess and reports its time and its extra peak
memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call; on
CPU the process's peak resident set (``ru_maxrss``) minus its resident set just before the call
(inputs already allocated), i.e. what the call itself added.  Dense needs ~4 float32 T x T
tensors; when that estimate exceeds ``--dense-budget-gb`` it is reported as skipped rather than
risking the machine (an out-of-memory error is caught and reported too).

Part 2 trains the project's GPT (the cpu-demo shape by default: d=128, 4 layers, 4 heads, T=128,
batch 32) and times a training step with no monitor, a monitor attached but not recording
("attached": the cost of a forward that does not record), one recording every 10th step, one
recording every step with the defaults (every row's entropy on every step, the bound checked on
every 10th: ``bound_every=10``; the compiled kernel of ``sigma_core.native`` when it builds, which
the header line says), one checking the bound on every step too (``bound_every=1``), one without the
compiled kernel (``native=False``: the fast path in PyTorch operations), and one recording every
step with every row through the blocked pass (``fused=False``, the method before the fast path), in blocks of 10 consecutive steps per configuration,
interleaving the configurations round by round so that machine load hits them alike; it prints mean and median step times and the
overhead ratios, all in process CPU time (with one thread, the step's own cost; other
processes on a shared machine disturb it much less than wall-clock time).  Run it with one thread (``OMP_NUM_THREADS=1``) to compare with the numbers in
docs/monitor.md.

    python benchmarks/bench_entropy.py                 # both parts
    python benchmarks/bench_entropy.py --part memory --max-T 8192
    OMP_NUM_THREADS=1 python benchmarks/bench_entropy.py --part overhead
    OMP_NUM_THREADS=1 python benchmarks/bench_entropy.py --part overhead --q-gain 150   # large logits
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(method: str, T: int, device: str, d: int, block: int) -> dict:
    """Run one measurement in this process; return a dict."""
    import torch
    from sigma_core.entropy import attention_entropy

    torch.manual_seed(0)
    q = torch.randn(1, 1, T, d, device=device)
    k = torch.randn(1, 1, T, d, device=device)
    attention_entropy(q[..., :64, :], k[..., :64, :], causal=True, method=method)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    try:
        h = attention_entropy(q, k, causal=True, method=method, block_size=block)
        if device == "cuda":
            torch.cuda.synchronize()
    except (RuntimeError, MemoryError) as err:  # out of memory
        return {"method": method, "T": T, "error": type(err).__name__ + ": " + str(err)[:80]}
    dt = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"method": method, "T": T, "seconds": dt, "peak_mb": max(peak, 0) / 2**20,
            "mean_entropy": float(h.mean())}


def part_memory(args) -> None:
    print(f"# dense vs streaming, causal, B=H=1, d={args.d}, float32, block={args.block}, device={args.device}")
    print(f"{'T':>6} {'method':>10} {'seconds':>9} {'extra peak MB':>14}  note")
    T = 512
    while T <= args.max_T:
        for method in ("dense", "streaming"):
            need_gb = 4 * 4 * T * T / 2**30
            if method == "dense" and need_gb > args.dense_budget_gb:
                print(f"{T:>6} {method:>10} {'-':>9} {'-':>14}  skipped: needs ~{need_gb:.1f} GB "
                      f"> budget {args.dense_budget_gb} GB")
                continue
            cmd = [sys.executable, __file__, "--one", method, str(T), "--device", args.device,
                   "--d", str(args.d), "--block", str(args.block)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{T:>6} {method:>10} {'-':>9} {'-':>14}  failed (rc {out.returncode}): "
                      f"{out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if "error" in r:
                print(f"{T:>6} {method:>10} {'-':>9} {'-':>14}  {r['error']}")
            else:
                print(f"{T:>6} {method:>10} {r['seconds']:>9.3f} {r['peak_mb']:>14.1f}  "
                      f"mean entropy {r['mean_entropy']:.6f}", flush=True)
        T *= 2


def part_overhead(args) -> None:
    import torch
    from sigma_core.models.gpt import GPT, ModelConfig
    from sigma_core import native
    from sigma_core.monitor import EntropyMonitor

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, block_size=args.T)
    model = GPT(cfg)
    if args.q_gain != 1.0:  # large logits, as in a collapsing model
        with torch.no_grad():
            for attn in model.attention_modules():
                attn.q_proj.weight.mul_(args.q_gain)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 256, (args.batch, args.T))

    def step():
        # CPU time of this process: with one thread it is what the step costs, and other processes
        # on a shared machine disturb it far less than wall-clock time
        t0 = time.process_time()
        _, loss = model(idx, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.process_time() - t0

    kernel = native.row_entropy_kernel()  # built (or loaded from its cache) before any timing
    for _ in range(3):
        step()  # warm-up
    # every block is `block_steps` (default 10) consecutive steps under one fresh monitor, so that a
    # block holds exactly one recorded step of "every=10" and one bound check of bound_every=10.
    # "attached": records only its first forward (not timed), then sits idle: what a forward that
    # does not record costs.  "every=1": the defaults (every row's entropy and sigma_h on every
    # step, the bound on every 10th); "bound/1": the bound checked on every step too; "torch": the
    # fast path without the compiled kernel (native=False); "blocked": every row through the blocked
    # pass instead of the fast one (fused=False)
    configs = {"none": None, "attached": dict(every=10**9), "every=10": dict(every=10),
               "every=1": dict(every=1), "every=1 bound/1": dict(every=1, bound_every=1),
               "every=1 torch": dict(every=1, native=False), "every=1 blocked": dict(every=1, fused=False)}
    names = list(configs)
    times = {name: [] for name in names}
    ratios = {name: [] for name in names}  # per round: block mean / the same round's "none" mean
    for r in range(args.rounds):
        block = {}
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            kw = configs[name]
            mon = EntropyMonitor(model, **kw) if kw else None
            if name == "attached":
                step()  # the one recorded forward, untimed
            ts = [step() for _ in range(args.block_steps)]
            if mon:
                mon.close()
            times[name] += ts
            block[name] = statistics.mean(ts)
        for name in names:
            ratios[name].append(block[name] / block["none"])
    base_med = statistics.median(times["none"])
    print(f"# monitor overhead, GPT d={args.d_model} L={args.n_layer} H={args.n_head} T={args.T} "
          f"batch={args.batch}, q gain {args.q_gain:g}, {args.rounds} rounds (configs interleaved, order rotated), "
          f"{args.block_steps} steps per config and round, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, compiled kernel: "
          f"{'yes' if kernel is not None else 'no (' + str(native._state['error'] or native.ENV + '=0') + ')'}")
    print(f"{'config':>16} {'median CPU s/step':>18} {'overhead':>9}   {'paired overhead: median [quartiles]':>36}")
    for name in names:
        q1, q2, q3 = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else [ratios[name][0]] * 3
        md = statistics.median(times[name])
        print(f"{name:>16} {md:>18.4f} {100 * (md / base_med - 1):>8.1f}%   "
              f"{100 * (q2 - 1):>8.1f}% [{100 * (q1 - 1):.1f}%, {100 * (q3 - 1):.1f}%]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "memory", "overhead"], default="all")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--max-T", type=int, default=32768)
    p.add_argument("--dense-budget-gb", type=float, default=4.0)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block-steps", type=int, default=10)
    p.add_argument("--q-gain", type=float, default=1.0,
                   help="multiply every query projection by this (e.g. 150: logits of order 1e2, as in a collapsed model)")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.device, args.d, args.block)))
        return 0
    if args.part in ("all", "memory"):
        part_memory(args)
    if args.part in ("all", "overhead"):
        part_overhead(args)
    return 0


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    sys.exit(main())
