#!/usr/bin/env bash
# One lent-GPU session in one command: build _C for the card, run the CUDA tests, run the GPU
# checks (CPU-vs-GPU agreement, eager vs CUDA-graph decode), the LiSA-vs-full attention kernel
# times, and the speed grid with and without LiSA next to HF transformers (gpu_bench.py, which
# ends with the GPU-speed issue's targets, met or not). Logs and JSON go to $OUT.
#   bash benchmarks/gpu_run.sh            (on the GPU machine, from the repository root)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lisa-rt-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
start=$(date +%s)
if ! python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  tail -30 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
# Every test file with CUDA tests (the others need packages the GPU machine may lack).
cuda_tests=$(grep -l "pytest.mark.cuda" tests/test_*.py)
python3 -m pytest -q -m cuda -p no:cacheprovider $cuda_tests 2>&1 | tee "$OUT/test_cuda.log" | tail -30
python3 benchmarks/gpu_check.py --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log" | tail -25
python3 benchmarks/lisa_kernels.py --json "$OUT/lisa_kernels.json" 2>&1 | tee "$OUT/lisa_kernels.log" | tail -16
python3 benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | tail -40
