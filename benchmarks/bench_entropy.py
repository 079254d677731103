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
every 10th: ``bound_every=10``; the fast path the library measured to be faster on this machine,
which the header says), one checking the bound on every step too (``bound_every=1``), one with the
compiled kernel (``native=True``) and one without it (``native=False``: the fast path in PyTorch
operations), and one recording every
step with every row through the blocked pass (``fused=False``, the method before the fast path), in blocks of 10 consecutive steps per configuration,
interleaving the configurations round by round so that machine load hits them alike; it prints mean and median step times and the
overhead ratios, all in process CPU time (with one thread, the step's own cost; other
processes on a shared machine disturb it much less than wall-clock time).  Run it with one thread (``OMP_NUM_THREADS=1``) to compare with the numbers in
docs/monitor.md.

    python benchmarks/bench_entropy.py                 # both parts
    python benchmarks/bench_entropy.py --part memory --max-T 8192
    OMP_NUM_THREADS=1 python benchmarks/bench_entropy.py --part overhead
    OMP_NUM_THREADS=1 python benchmarks/bench_entropy.py --part overhead --q-gain 150   # large logits
    OMP_NUM_THREADS=1 python benchmarks/bench_entropy.py --part kernel --rounds 10
    OMP_NUM_THREADS=1 python benchmarks/bench_entropy.py --part hf-gpt2 --rounds 6

``--part kernel`` times the fast path alone, the compiled kernel against the same pass in PyTorch
operations, on causal attention shapes, and says which one the default takes here.

Part 3 (``--part hf-gpt2``, needs ``transformers``) does the same on a model users have: a Hugging
Face GPT-2 (4 layers, d = 256, 4 heads, T = 256, batch 8, vocabulary 256, dropout 0, AdamW, random
initialisation from its config) with ``attn_implementation="sdpa"``.  It compares a step with no
recording ("sdpa"), the monitor recording every step ("monitor every=1": its defaults; with
``native=True``/``False``; with the bound never checked after an untimed first step, to show what
the bound check every 10th step costs), and the way a user writes it by hand: the same model with
eager attention, ``output_attentions=True`` and the entropy of the returned probabilities
(``torch.special.entr``, mean per layer and head, moved to Python floats as a logger would), beside
eager attention without it.  Every configuration trains its own copy of the same initial weights
with its monitor attached throughout; the configurations alternate step by step (the order rotated
every step), and overheads are paired per round (``--block-steps`` steps) with the "sdpa" steps of
that round.
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

    native.row_entropy_kernel()  # built (or loaded from its cache) before any timing
    for _ in range(3):
        step()  # warm-up
    with EntropyMonitor(model, every=1):  # the default path is measured here, once, before any timing
        step()
    # every block is `block_steps` (default 10) consecutive steps under one fresh monitor, so that a
    # block holds exactly one recorded step of "every=10" and one bound check of bound_every=10.
    # "attached": records only its first forward (not timed), then sits idle: what a forward that
    # does not record costs.  "every=1": the defaults (every row's entropy and sigma_h on every
    # step, the bound on every 10th); "bound/1": the bound checked on every step too; "torch": the
    # fast path without the compiled kernel (native=False); "blocked": every row through the blocked
    # pass instead of the fast one (fused=False); "kernel": the compiled kernel whatever the default
    configs = {"none": None, "attached": dict(every=10**9), "every=10": dict(every=10),
               "every=1": dict(every=1), "every=1 bound/1": dict(every=1, bound_every=1),
               "every=1 kernel": dict(every=1, native=True), "every=1 torch": dict(every=1, native=False),
               "every=1 blocked": dict(every=1, fused=False)}
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
          f"threads={torch.get_num_threads()}")
    print(f"# {machine()}")
    print(f"# default fast path (every=1, every=10): {native.describe()}")
    print(f"{'config':>16} {'median CPU s/step':>18} {'overhead':>9}   {'paired overhead: median [quartiles]':>36}")
    for name in names:
        q1, q2, q3 = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else [ratios[name][0]] * 3
        md = statistics.median(times[name])
        print(f"{name:>16} {md:>18.4f} {100 * (md / base_med - 1):>8.1f}%   "
              f"{100 * (q2 - 1):>8.1f}% [{100 * (q1 - 1):.1f}%, {100 * (q3 - 1):.1f}%]")


def part_kernel(args) -> None:
    """The fast path alone: the compiled kernel (native=True) against its PyTorch operations
    (native=False) on causal (B, H, T, d) views of (B, T, H d) projections, interleaved, process time."""
    import torch
    from sigma_core import native
    from sigma_core.entropy import fused_row_entropy

    shapes = ((32, 4, 128, 32), (8, 4, 256, 64), (8, 12, 512, 64))
    g = torch.Generator().manual_seed(0)
    cases = []
    for B, H, T, d in shapes:
        q, k = (torch.randn(B, T, H * d, generator=g).view(B, T, H, d).transpose(1, 2) for _ in range(2))
        assert torch.allclose(fused_row_entropy(q, k, causal=True, native=True),
                              fused_row_entropy(q, k, causal=True, native=False), atol=1e-5)
        cases.append((q, k))
    fused_row_entropy(*cases[0], causal=True)  # the default path's choice, made here before timing
    print(f"# fused_row_entropy(q, k, causal=True), q and k strided views, best of {args.rounds} rounds "
          f"of 5 calls per path (paths interleaved), process CPU time")
    print(f"# {machine()}")
    print(f"# default path (native=None): {native.describe()}")
    print(f"{'(B, H, T, d)':>18} {'kernel ms':>10} {'PyTorch ms':>11} {'kernel / PyTorch':>17}")
    for (q, k), shape in zip(cases, shapes):
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.rounds):
            for flag in (True, False):
                t0 = time.process_time()
                for _ in range(5):
                    fused_row_entropy(q, k, causal=True, native=flag)
                best[flag] = min(best[flag], (time.process_time() - t0) / 5)
        print(f"{str(shape):>18} {1e3 * best[True]:>10.2f} {1e3 * best[False]:>11.2f} {best[True] / best[False]:>16.2f}x")


def part_hf_gpt2(args) -> None:
    import copy

    import torch
    import transformers
    from sigma_core import native
    from sigma_core.monitor import EntropyMonitor

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    cfg = dict(vocab_size=256, n_positions=args.hf_T, n_embd=args.hf_d, n_layer=args.hf_layers,
               n_head=args.hf_heads, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
               bos_token_id=0, eos_token_id=0)
    base = {impl: transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation=impl))
            for impl in ("sdpa", "eager")}
    base["eager"].load_state_dict(base["sdpa"].state_dict())
    assert all(m.config._attn_implementation == impl for impl, m in base.items())
    idx = torch.randint(0, 256, (args.hf_batch, args.hf_T))
    native.row_entropy_kernel()  # built (or loaded from its cache) before any timing
    probe = copy.deepcopy(base["sdpa"])
    with EntropyMonitor(probe, every=1) as mon:  # the default path is measured here, before any timing
        probe(input_ids=idx)
        assert len(mon.last) == args.hf_layers * args.hf_heads, "the monitor did not see every layer"
    # config -> (attention, by hand, monitor keywords); every config trains its own copy of the same
    # initial weights, with its monitor attached throughout, so that configurations alternate step
    # by step (machine load hits them alike) and every=1's bound check falls on every 10th step
    configs = {"sdpa": ("sdpa", False, None),
               "monitor every=1": ("sdpa", False, dict(every=1)),
               "monitor every=1 kernel": ("sdpa", False, dict(every=1, native=True)),
               "monitor every=1 torch": ("sdpa", False, dict(every=1, native=False)),
               "monitor every=1 no bound": ("sdpa", False, dict(every=1, bound_every=10**9)),
               "eager": ("eager", False, None),
               "eager by hand": ("eager", True, None)}
    runs = {}
    for name, (impl, by_hand, kw) in configs.items():
        model = copy.deepcopy(base[impl])
        runs[name] = dict(model=model, opt=torch.optim.AdamW(model.parameters(), lr=1e-4), by_hand=by_hand,
                          mon=EntropyMonitor(model, **kw) if kw else None)
    sink = []  # what the hand-written way logs: per layer, per head mean entropy as Python floats

    def step(name):
        run = runs[name]
        model, opt = run["model"], run["opt"]
        t0 = time.process_time()
        out = model(input_ids=idx, labels=idx, output_attentions=run["by_hand"])
        if run["by_hand"]:
            with torch.no_grad():
                sink.append([torch.special.entr(p).sum(-1).mean((0, 2)).tolist() for p in out.attentions])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return time.process_time() - t0

    names = list(configs)
    step("monitor every=1 no bound")  # its one bound check (the first recorded forward), untimed
    for name in names:
        step(name)  # warm-up
    times = {name: [] for name in names}
    ratios = {name: [] for name in names}  # per round: the config's mean / the same round's "sdpa" mean
    for r in range(args.rounds):
        block = {name: [] for name in names}
        for i in range(args.block_steps):
            shift = (r * args.block_steps + i) % len(names)
            for name in names[shift:] + names[:shift]:  # rotate the order every step
                block[name].append(step(name))
        for name in names:
            times[name] += block[name]
            ratios[name].append(statistics.mean(block[name]) / statistics.mean(block["sdpa"]))
        print(f"# round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {100 * (ratios[n][-1] - 1):+.1f}%"
                                                            for n in names[1:]), file=sys.stderr, flush=True)
    for run in runs.values():
        if run["mon"] is not None:
            assert len(run["mon"].last) == args.hf_layers * args.hf_heads  # the last step was recorded
            run["mon"].close()
    base_med = statistics.median(times["sdpa"])
    print(f"# HF GPT-2 training step, {args.hf_layers} layers, d={args.hf_d}, {args.hf_heads} heads, T={args.hf_T}, "
          f"batch {args.hf_batch}, vocabulary 256, AdamW, {args.rounds} rounds of {args.block_steps} steps per "
          f"config (configs alternate step by step, order rotated), process CPU time")
    print(f"# {machine()}")
    print(f"# default fast path (monitor every=1): {native.describe()}")
    print(f"{'config':>26} {'median CPU s/step':>18} {'overhead':>9}   {'paired overhead: median [quartiles]':>36}")
    for name in names:
        q1, q2, q3 = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else [ratios[name][0]] * 3
        md = statistics.median(times[name])
        print(f"{name:>26} {md:>18.4f} {100 * (md / base_med - 1):>8.1f}%   "
              f"{100 * (q2 - 1):>8.1f}% [{100 * (q1 - 1):.1f}%, {100 * (q3 - 1):.1f}%]")


def machine() -> str:
    """The CPU (lscpu's model name), PyTorch's CPU capability, the thread count and library versions."""
    import platform

    import numpy
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    libs = f"torch {torch.__version__}, numpy {numpy.__version__}"
    try:
        import transformers
        libs += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    return (f"CPU: {cpu}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}, {libs}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "memory", "overhead", "kernel", "hf-gpt2"], default="all",
                   help="all: memory and overhead (kernel and hf-gpt2 only when named)")
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
    p.add_argument("--hf-layers", type=int, default=4)
    p.add_argument("--hf-d", type=int, default=256)
    p.add_argument("--hf-heads", type=int, default=4)
    p.add_argument("--hf-T", type=int, default=256)
    p.add_argument("--hf-batch", type=int, default=8)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.device, args.d, args.block)))
        return 0
    if args.part in ("all", "memory"):
        part_memory(args)
    if args.part in ("all", "overhead"):
        part_overhead(args)
    if args.part == "kernel":
        part_kernel(args)
    if args.part == "hf-gpt2":
        part_hf_gpt2(args)
    return 0


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    sys.exit(main())
