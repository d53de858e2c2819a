#!/usr/bin/env bash
# One prepared run on a GPU machine (H200, no network, PyTorch preinstalled): build the
# extension, print build_info, run the CUDA tests, then the benchmarks at the GPU shapes.
# Everything (logs, JSON, summary) goes to ${OUT:-bench_out}/. Finishes in < 8 minutes:
# every step runs under `timeout`, capped by what is left of the overall budget; the
# CUDA tests come first (correctness before speed; without -x, so one failure does not
# hide the others), then the eager op and layer benchmarks (they also check mod_ext
# against the baselines), the decode benchmark (eager and CUDA graphs), then the
# torch.compile runs (every benchmark's JSON is rewritten after each row, so a run cut
# short by its timeout keeps what it measured).
#
#   bash benchmarks/run_gpu.sh            # or: OUT=/some/dir bash benchmarks/run_gpu.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-460}
START=$(date +%s)
FAILED=()

# step NAME LIMIT_S CMD...: run CMD under timeout (LIMIT_S, capped by the budget left),
# log to $OUT/NAME.log, record the outcome.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "=== $name: skipped, out of time" | tee -a "$OUT/summary.txt"; FAILED+=("$name(skipped)"); return 1
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  echo "=== $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$OUT/summary.txt"
  ((rc == 0)) || FAILED+=("$name(rc=$rc)")
  return $rc
}

: > "$OUT/summary.txt"
step env 30 bash -c 'nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; which ninja nvcc; nproc'

# pip may not reach the internet here (--no-deps); without ninja setup.py compiles serially.
if ! step build 270 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 \
    pip install --no-build-isolation --no-deps -v -e .; then
  step build_inplace 200 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace
fi
if ! step build_info 30 python -c "import json, mod_ext; i = mod_ext.build_info(); print(json.dumps(i, indent=1)); assert i['cuda_kernels_registered'] and i['cuda_available'], 'no CUDA kernels'"; then
  echo "mod_ext has no usable CUDA kernels; not benchmarking. Failed: ${FAILED[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi

step tests 90 python -m pytest tests -q -k cuda
step ops_eager 60 python benchmarks/bench_ops.py --device cuda --no-compile --json "$OUT/ops_cuda_eager.json"
step block_eager 60 python benchmarks/bench_block.py --device cuda --no-compile --json "$OUT/block_cuda_eager.json"
step decode 120 python benchmarks/bench_decode.py --device cuda --json "$OUT/decode_cuda.json"
step train 120 python benchmarks/bench_train.py --gpu --steps 8 --repeats 1 --json "$OUT/train_gpu.json"
step ops_compiled 120 python benchmarks/bench_ops.py --device cuda --compile --json "$OUT/ops_cuda.json"
step block_compiled 300 python benchmarks/bench_block.py --device cuda --compile --capacity 0.125 \
  --json "$OUT/block_cuda.json"

echo "=== total $(($(date +%s) - START))s; failed: ${FAILED[*]:-none}" | tee -a "$OUT/summary.txt"
((${#FAILED[@]} == 0))
