#!/usr/bin/env bash
# Fits the default model's LiSA adapter on a lent GPU, going on from the shipped one: an H100
# fits 8 sequences of 1,024 tokens in 0.77 s, where this project's 2-core CPU machine fits one in
# about 19 s. The model (its 98 MB GGUF) is larger than one device call carries (64 MiB), so it
# travels in two halves, in two calls made back to back (a lent machine stays warm 30 s):
#   here:    bash benchmarks/gpu_fit.sh pack     # .devrun/fit/: half1, half2, model.sha256, data.tar.xz
#   call 1:  bash benchmarks/gpu_fit.sh stash    # carry .devrun/fit/half1; keeps it in /tmp/lisa-fit and
#                                                #   runs the fitter's CUDA test
#   call 2:  bash benchmarks/gpu_fit.sh fit      # carry .devrun/fit/half2 .devrun/fit/model.sha256
#                                                #       .devrun/fit/data.tar.xz
# `fit` checks the reassembled GGUF against its hash, times a 20-step probe fit, then runs as many
# end-to-end steps as fit in FIT_SECONDS (default 420) and writes $OUT/adapter.safetensors and
# $OUT/fit.log; measure the adapter here with `lisa-rt eval smollm2 --lisa FILE --text ...`.
# Other settings: BATCH (8), LR (1e-3), SEED (0), SEQ_LEN (1024), ATTN_WEIGHT (8, what refits of
# this adapter did best with on the CPU; BENCHMARKS.md), DEVICE (cuda), TF32 (1), DATA
# (the fitting texts, e.g. DATA="calibration.txt manuals.txt self32.jsonl" to leave the man pages
# out), INIT (the adapter to go on from: the shipped one by default; `last` for the adapter the
# previous `fit` on this warm machine wrote, to chain fits without copying each one home and back),
# LAYERS (e.g. LAYERS=4,5,6,7,11,...: move the adapter onto these layers first; the layers new to
# it start from head matching and get LAYERWISE_STEPS (400) layer-wise steps with LAYERWISE_LOSS
# (output) before the end-to-end fit; the probe skips them).
# Each `fit` on the same warm machine reuses the stash: several fits can follow one stash.
set -uo pipefail
export PYTHONUNBUFFERED=1
PACK=.devrun/fit
STASH=/tmp/lisa-fit
ADAPTER=lisa_rt/adapters/smollm2-135m-instruct.safetensors
# The fitting texts, in --data order; DATA picks some of them (as `fit` runs, or as `pack` packs).
read -r -a DATA_FILES <<< "${DATA:-calibration.txt manuals.txt man_pages.txt self32.jsonl}"
# TF32 GEMMs (10-bit mantissa) for the fit unless TF32=0: about 3x the float32 GEMM rate on
# Hopper, and the fitted adapter is measured afterwards in float32 here, where it is used.
lisa_rt() {
  local precision=high
  [ "${TF32:-1}" = 0 ] && precision=highest
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -c \
    "import sys, torch; torch.set_float32_matmul_precision('$precision'); from lisa_rt.cli import main; sys.exit(main(sys.argv[1:]))" "$@"
}

pack() {
  local gguf data=${DATA_DIR:-/tmp/lisa-data}
  gguf=$(python3 -c 'from lisa_rt.registry import alias_source; print(alias_source("smollm2"))') || return 2
  for f in "${DATA_FILES[@]}"; do
    [ -f "$data/$f" ] || { echo "error: $data/$f is missing (python benchmarks/lisa_data.py $data; self32.jsonl:" \
                                 "see lisa_rt/adapters/README.md)" >&2; return 2; }
  done
  rm -rf "$PACK" && mkdir -p "$PACK"
  local size half
  size=$(stat -c %s "$gguf")
  half=$(( (size + 1) / 2 ))
  head -c "$half" "$gguf" > "$PACK/half1"
  tail -c +"$(( half + 1 ))" "$gguf" > "$PACK/half2"
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$PACK/model.sha256"
  tar -C "$data" -cJf "$PACK/data.tar.xz" "${DATA_FILES[@]}"
  ls -l "$PACK"
}

stash() {
  mkdir -p "$STASH" && cp "$PACK/half1" "$STASH/half1" && ls -l "$STASH" || return 2
  # A fit on a tiny model, on the GPU beside the CPU, before the long call is spent on it.
  python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_lisa_model.py -k fit_on_cuda 2>&1 | tail -3
  return "${PIPESTATUS[0]}"
}

fit() {
  local name out=${OUT:-/tmp/lisa-fit-out} began
  began=$(date +%s)
  mkdir -p "$out"
  [ -f "$STASH/half1" ] || { echo "error: $STASH/half1 is missing: run 'stash' first, on the same warm machine" >&2; return 2; }
  local init=${INIT:-$ADAPTER}
  if [ "$init" = last ]; then
    init=$STASH/last.safetensors
    [ -f "$init" ] || { echo "error: INIT=last: no earlier fit on this warm machine" >&2; return 2; }
  fi
  [ -f "$init" ] || { echo "error: INIT: $init is missing" >&2; return 2; }
  name=$(awk '{print $2}' "$PACK/model.sha256")
  cat "$STASH/half1" "$PACK/half2" > "$STASH/$name"
  (cd "$STASH" && sha256sum -c --quiet "$OLDPWD/$PACK/model.sha256") || { echo "error: the reassembled $name does not match its hash" >&2; return 2; }
  mkdir -p "$STASH/data" && tar -C "$STASH/data" -xJf "$PACK/data.tar.xz" || return 2
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  local common
  common=(--data "${DATA_FILES[@]/#/$STASH/data/}" --init "$init"
          --seq-len "${SEQ_LEN:-1024}" --batch-size "${BATCH:-8}" --lr "${LR:-1e-3}" --seed "${SEED:-0}"
          --attn-weight "${ATTN_WEIGHT:-8}"
          --device "${DEVICE:-cuda}" --force)
  local layerwise=() probe_layerwise=()
  if [ -n "${LAYERS:-}" ]; then
    common+=(--layers "$LAYERS")
    layerwise=(--layerwise-steps "${LAYERWISE_STEPS:-400}" --layerwise-loss "${LAYERWISE_LOSS:-output}")
    probe_layerwise=(--layerwise-steps 0)
  fi
  # The probe converts the model (cached for the real fit) and gives the time of a step.
  lisa_rt fit "$STASH/$name" "${common[@]}" "${probe_layerwise[@]}" --steps 20 --max-sequences 256 \
    --out "$STASH/probe.safetensors" \
    > "$out/probe.log" 2>&1 || { tail -20 "$out/probe.log"; return 1; }
  local per_step steps left
  # The end-to-end bar's rate at its last step (tqdm: "1.32step/s" or "2.74s/step"), a moving
  # average that leaves out most of the slow first steps: the 20 steps' mean time (19 s on the
  # H200, the first step 5.6 s) overstated a step by a quarter and left a third of the time unused.
  per_step=$(tr '\r' '\n' < "$out/probe.log" | grep "20/20 \[" | tail -1 | grep -oE "[0-9.]+(step/s|s/step)" |
             python3 -c "import sys; r=sys.stdin.read().strip(); print(max(0.05, 1 / float(r[:-6]) if r.endswith('step/s') else float(r[:-6])))")
  [ -n "$per_step" ] || { echo "error: no step time in the probe's log" >&2; tail -5 "$out/probe.log"; return 1; }
  left=$(( ${FIT_SECONDS:-420} - ($(date +%s) - began) ))
  steps=$(python3 -c "print(max(0, int(0.85 * ($left - 60) / $per_step)))")
  echo "probe: $per_step s per step; $left s left: $steps steps"
  [ "$steps" -gt 0 ] || { echo "error: no time left for the fit" >&2; return 1; }
  lisa_rt fit "$STASH/$name" "${common[@]}" "${layerwise[@]}" --steps "$steps" --max-sequences 8192 \
    --out "$out/adapter.safetensors" \
    > "$out/fit.log" 2>&1
  local rc=$?
  [ $rc = 0 ] && cp "$out/adapter.safetensors" "$STASH/last.safetensors"
  tr '\r' '\n' < "$out/fit.log" | grep -v "^fit: end-to-end" | tail -5
  echo "fit: exit $rc, $(( $(date +%s) - began )) s in all"
  return $rc
}

case "${1:-}" in
  pack|stash|fit) "$1" ;;
  *) echo "usage: bash benchmarks/gpu_fit.sh pack|stash|fit" >&2; exit 2 ;;
esac
