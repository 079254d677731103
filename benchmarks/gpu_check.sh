#!/usr/bin/env bash
# Every GPU check and GPU run the project needs, in one script, sized for a 15-minute device
# lease and one 10-minute device command: each step has its own time limit so a slow step cannot
# eat the rest, and the limits add up to 540 s (9 minutes; LIMITS below, checked on start).
# Never run on a GPU yet (no GPU was lent so far): the timings are estimates from a prototype's
# H200 runs (30-80 s per h200-preset run).  Run it on the device machine from the
# repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# It needs no package registry: it runs the tree with PYTHONPATH=. on the machine's own torch.
# Everything lands in $OUT (at most 8 files come back from the device tool, so the run
# directories are packed into one tarball):
#   env.txt            device, torch, python, commit, date
#   gpu_tests.log      the CUDA-relevant unit tests
#   h200_runs.tar.gz   the h200-preset runs (config.json, metrics.jsonl, summary.json, figures)
#   h200_report.log    training + report output (tokens/s, MFU, violations)
#   bench_reparam.log  sigmaReparam step-time ratios at d=256/6 layers and d=1024
#   compiled.log       the same at d=256/2 layers under torch.compile (inductor), and a short
#                      `train --compile` run of sigmaReparam (compiled.tar.gz: its run folder)
#   bench_entropy.log  dense vs streaming memory/time on the GPU, monitor overhead
#   claims_gpu.log, claims_gpu.tar.gz  the claims ledger's runs at --scale gpu (as far as they got)
# Commit the unpacked runs under results/h200/ (no checkpoints) with env.txt beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
RUNS=${RUNS:-/tmp/h200_runs}
rm -rf "$RUNS"; mkdir -p "$RUNS"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# time limits (s) of the steps, in order; their sum is the script's budget
LIMITS=(75 210 75 120 35 25)
TOTAL=0; for l in "${LIMITS[@]}"; do TOTAL=$((TOTAL + l)); done
echo "time limits: ${LIMITS[*]} (sum ${TOTAL} s)"
[ "$TOTAL" -le 540 ] || { echo "gpu_check.sh: the step limits add up to ${TOTAL} s > 540 s" >&2; exit 2; }

step() {  # step NAME SECONDS CMD...: run one check under its own time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? ($(tail -n 1 "$OUT/$name.log"))"
}

# 1. Unit tests that exercise CUDA paths (autocast bf16, device checks); no slow or notebook tests.
step gpu_tests "${LIMITS[0]}" $PY -m pytest -q -x -m "not slow" -p no:cacheprovider \
  tests/test_reparam.py tests/test_entropy.py tests/test_monitor.py tests/test_model.py

# 2. The h200 preset: baseline at the collapsing lr 1e-2 and at its best lr 1e-3, sigmaReparam at 1e-2.
train() { $PY -m sigma_core.cli train --preset h200 --no-progress "$@"; }
{
  train --out "$RUNS/baseline-lr1e-2" --reparam none --lr 1e-2
  train --out "$RUNS/sigma-lr1e-2" --reparam sigma --lr 1e-2
  train --out "$RUNS/baseline-lr1e-3" --reparam none --lr 1e-3
  $PY -m sigma_core.cli report "$RUNS/baseline-lr1e-2" "$RUNS/sigma-lr1e-2" "$RUNS/baseline-lr1e-3" --out "$RUNS/report"
} > "$OUT/h200_report.log" 2>&1 &
TRAIN_PID=$!
( sleep "${LIMITS[1]}"; kill -TERM $TRAIN_PID 2>/dev/null ) & WATCH=$!
wait $TRAIN_PID; echo "== h200 runs exit $?"; kill $WATCH 2>/dev/null
find "$RUNS" -name 'checkpoint*.pt' -delete
tar -C "$(dirname "$RUNS")" -czf "$OUT/h200_runs.tar.gz" "$(basename "$RUNS")"

# 3. sigmaReparam cost next to plain and spectral_norm at d=256/6 layers and d=1024 (and folded).
step bench_reparam "${LIMITS[2]}" bash -c "$PY benchmarks/bench_reparam.py --device cuda --d-model 256 --n-layer 6 --n-head 8 --seq-len 256 --batch 64 && $PY benchmarks/bench_reparam.py --device cuda --d-model 1024 --n-layer 6 --n-head 16 --seq-len 256 --batch 32"

# 3b. Compiled: sigmaReparam, spectral_norm and plain under torch.compile (inductor), side by side at
#     d=256/2 layers (inductor compiles each variant: 2 layers keep that inside the limit), then 40 steps
#     of `train --compile` with sigmaReparam at the h200 preset's width (the compiled training path).
COMPILED_RUN=${COMPILED_RUN:-/tmp/compiled_run}
rm -rf "$COMPILED_RUN"
step compiled "${LIMITS[3]}" bash -c "$PY benchmarks/bench_reparam.py --device cuda --compile --model gpt --d-model 256 --n-layer 2 --n-head 8 --seq-len 256 --batch 64 --reps 10 && $PY -m sigma_core.cli train --preset h200 --n-layer 2 --reparam sigma --compile --steps 40 --log-every 10 --eval-every 40 --sample-steps 40 --no-progress --out $COMPILED_RUN"
find "$COMPILED_RUN" -name 'checkpoint*.pt' -delete 2>/dev/null
tar -C "$(dirname "$COMPILED_RUN")" -czf "$OUT/compiled.tar.gz" "$(basename "$COMPILED_RUN")" 2>/dev/null

# 4. Entropy measurement on the GPU: dense vs streaming up to T=32768, monitor overhead.
step bench_entropy "${LIMITS[4]}" $PY benchmarks/bench_entropy.py --device cuda --max-T 32768
# 5. The claims ledger's experiments at their GPU scale (4x the ViT steps, seq2seq also at 24+24 layers):
#    whatever finishes in the limit comes back; `claims run` skips finished runs, so a later lease continues.
CLAIMS_RUNS=${CLAIMS_RUNS:-/tmp/claims_gpu}
step claims_gpu "${LIMITS[5]}" $PY -m sigma_core.experiments.claims run --scale gpu --out "$CLAIMS_RUNS" --jobs 1
tar -C "$(dirname "$CLAIMS_RUNS")" -czf "$OUT/claims_gpu.tar.gz" "$(basename "$CLAIMS_RUNS")" 2>/dev/null
echo "== done"; ls -la "$OUT"
