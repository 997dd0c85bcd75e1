#!/usr/bin/env bash
# One lent-GPU session in one command: build _C for the card, run the CUDA tests, profile decode
# steps, run the GPU checks (CPU-vs-GPU agreement, eager vs CUDA-graph decode), the LiSA-vs-full
# attention kernel times, and the speed grid with and without LiSA next to HF transformers
# (gpu_bench.py, which ends with the GPU-speed issue's targets, met or not), and what sampling
# costs on the device (sampling.py; its on-device sampler had not run on a GPU when this stage
# was added, 2026-11-28). Every stage has a
# time limit so that one slow stage cannot eat the lease; build.log, run.log (every stage's
# output) and JSON go to $OUT.
#   bash benchmarks/gpu_run.sh [STAGE...]   (on the GPU machine, from the repository root)
#   stages: diag tests profile check kernels bench sampling ncu (default: these, in this order),
#   and fitprofile (named only: where an end-to-end step of gpu_fit.sh's fit spends its time,
#   fit_profile.py on random SmolLM2-shaped weights, 8 x 1,024 tokens; never run on a GPU yet)
# Measured on the lent H200 (2026-11-27): build 37-43 s, diag 11, tests 67-74 (8 workers),
# profile 20, kernels 6, bench 64 (--steps 16), ncu 15 (sampling: not yet run there); the
# default limits below, 595 s in all, keep a whole run inside one device call (timeout_s 600).
# LIMIT_<STAGE>=seconds overrides one.
# Not yet run on a GPU (2026-11-28, twentieth session; BENCHMARKS.md "GPU: written on the CPU
# machine" lists each change with the figure it should move): overlapped decode steps (check's
# "cuda graph + overlap" rows, bench), the decode attention's table look-ahead (kernels, ncu),
# the four-threads-a-key LiSA logits kernel, rotary_cache_write and the small-batch GEMV
# (profile); their CUDA tests run in the tests stage.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lisa-rt-gpu}
mkdir -p "$OUT"
stages=${*:-diag tests profile check kernels bench sampling ncu}
limit() { echo "${LIMIT[$1]:-300}"; }
declare -A LIMIT=([build]=120 [diag]=30 [tests]=120 [profile]=45 [check]=60 [kernels]=20 [bench]=130 [sampling]=30
                  [ncu]=40 [fitprofile]=60)
for s in "${!LIMIT[@]}"; do v="LIMIT_${s^^}"; [ -n "${!v:-}" ] && LIMIT[$s]=${!v}; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# The system compiler when there is one (SYSTEM_CXX=0: the default one): on the lent H100 the
# default g++ (/opt/gcc, 13.3) built a _C whose error messages with numbers crashed.
if [ "${SYSTEM_CXX:-1}" = 1 ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
echo "c++: $(command -v "${CXX:-c++}") -> $(readlink -f "$(command -v "${CXX:-c++}")"), $(${CXX:-c++} --version | head -1)"
build() { timeout "$(limit build)" python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; }
start=$(date +%s)
if ! build; then
  grep -E "error|Error" "$OUT/build.log" | head -20
  if [ -n "${CXX:-}" ]; then
    echo "build with $CXX failed; again with the default compiler"
    unset CXX CUDAHOSTCXX
    rm -rf build
    build || { grep -E "error|Error" "$OUT/build.log" | head -40; tail -30 "$OUT/build.log"; exit 1; }
  else
    tail -30 "$OUT/build.log"
    exit 1
  fi
fi
echo "build: $(( $(date +%s) - start )) s"
stage() {  # stage NAME COMMAND...: runs under the stage's time limit, output to $OUT/NAME.log
  local name=$1; shift
  [[ " $stages " == *" $name "* ]] || return 0
  local began=$(date +%s)
  echo "== $name"
  timeout "$(limit "$name")" "$@" > "$OUT/stage.log" 2>&1
  local rc=$?
  { echo "== $name"; cat "$OUT/stage.log"; } >> "$OUT/run.log"  # at most 8 files come back
  tail -n "${TAIL:-40}" "$OUT/stage.log"
  rm -f "$OUT/stage.log"
  echo "== $name: exit $rc, $(( $(date +%s) - began )) s"
}
# What the extension links and how its argument errors behave on each device (a crash there
# exits 139).
diag() {
  ldd lisa_rt/_C*.so | grep -E "stdc|gcc_s"
  echo "libstdc++ the compiler links: $(${CXX:-c++} -print-file-name=libstdc++.so)"
  head -c 300 "$(${CXX:-c++} -print-file-name=libstdc++.so)" | tr -d '\0' | grep -a GROUP || true
  for dev in cpu cuda; do
    python3 -m pytest -q -p no:cacheprovider tests/test_lisa_ops.py -k "bad_arguments and $dev" 2>&1 | tail -2
    echo "argument errors on $dev: pytest exit ${PIPESTATUS[0]}"
  done
}
stage diag bash -c "$(declare -f diag); diag"
# Every CUDA test, in 8 worker processes (a crashing test takes down its worker only); files
# whose imports need packages the GPU machine lacks are reported as collection errors and the
# rest still run.
stage tests python3 -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors \
  --timeout 120 -rfE -n ${TEST_WORKERS:-8} tests
stage profile python3 benchmarks/gpu_profile.py --json "$OUT/gpu_profile.json"
stage check python3 benchmarks/gpu_check.py --json "$OUT/gpu_check.json"
stage kernels python3 benchmarks/lisa_kernels.py --json "$OUT/lisa_kernels.json"
stage bench python3 benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" ${BENCH_ARGS:-}
stage sampling python3 benchmarks/sampling.py --random-weights --batches 1 64 --json "$OUT/sampling.json"
stage fitprofile python3 benchmarks/fit_profile.py --shape smollm2 --batch 8 --seq-len 1024 --json "$OUT/fit_profile.json"
# Hardware counters of one launch each of the split decode attention and the LiSA logits
# kernel (LLaMA-2-7B shapes, batch 32, context 2048): where their time goes.
ncu_kernels() {
  for kernel in split_kernel logits_kernel; do
    ncu --kernel-name "regex:$kernel" --launch-count 1 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section SchedulerStats \
      python3 benchmarks/lisa_kernels.py --shapes llama2-7b --contexts 2048 --batches 32 --reps 2 2>&1 |
      grep -vE "^==PROF==|^ +-+( +-+)*$|^ *$" | grep -vE "^ *(OPT|INF|WRN) " | head -70
  done
}
stage ncu bash -c "$(declare -f ncu_kernels); ncu_kernels"
