#!/usr/bin/env bash
# The GPU part of the step-time benchmark, as one prepared script for one GPU
# (written for an H200) within a hard 8-minute budget. Run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Parts, each under its own timeout (step_time.py rewrites its JSON + Markdown after
# every method, so a part cut short still leaves what it measured):
#   0. environment: a python with CUDA torch (else a venv with torch==2.13.0, needs PyPI)
#   1. build PEFT's BOFT CUDA extension (without it PEFT silently runs BOFT with m=1)
#   2. per-module forms at the 8B widths, bf16: BOFT composed vs factored butterfly per (b, m)
#      (butterfly_forms.py: is the composed rule, c = b·2^(m−1) ≤ 64, right on the GPU?) and
#      LoRA's forward forms (lora_forms.py: in-place addmm_ vs addmm vs mm+add vs PEFT's order)
#   3. 1B shapes, 4×1024 tokens: every method, ours and PEFT's, floor and full FT
#   4. 8B shapes, 2×1024 tokens: floor, our LoRA/BOFT/Hybrid, PEFT LoRA/BOFT (PEFT BOFT
#      is cut to fit --budget-s: ~9 s/step there), our BOFT's factored form (the path before
#      the composed blocks, for the before/after ratio at 8B)
#   5. if bitsandbytes is importable and time is left: 1B with an NF4 base
# Results land in $OUT (default /tmp/gpu_check_out) as cuda-*.json / cuda-*.md plus
# gpu_check.log; copy them to docs/perf/ and commit with the date and card.
#
# GPU_CHECK_DRY=1 runs the same logic on the CPU with the tiny model (a rehearsal).
set -u
START=$SECONDS
TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-470}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

log() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$LOG"; }

# seconds a part may use: its own cap, but never past the total budget (minus a reserve)
allow() {
  local cap=$1 left=$((TOTAL_BUDGET - (SECONDS - START) - 10))
  if [ "$left" -lt "$cap" ]; then echo "$left"; else echo "$cap"; fi
}

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DEVICE=cpu; DTYPE=float32; SIZE1=tiny; SIZE8=tiny; STEPS1="--warmup 1 --steps 1"; STEPS8="--warmup 1 --steps 1"
  TAG_DRY="--tag dry-"  # the tiny stand-ins of 1B and 8B would write the same file names
  FORMS_BOFT="--d 64 --tokens 32 --reps 1 --settings 8x3 4x5"; FORMS_LORA="--size cpu-small --tokens 32 --reps 1"
  log "DRY RUN on the CPU with the tiny model"
else
  DEVICE=cuda; DTYPE=bfloat16; SIZE1=1b; SIZE8=8b; STEPS1="--warmup 3 --steps 10"; STEPS8="--warmup 2 --steps 6"
  TAG_DRY=""
  FORMS_BOFT="--d 4096 --tokens 2048 --reps 10"; FORMS_LORA="--size 8b --tokens 2048 --reps 10"
fi

# ---------------------------------------------------------------- 0. environment
PY=${PYTHON:-python3}
want="import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
if [ "$DEVICE" = cuda ]; then want="$want; assert torch.cuda.is_available(), 'no CUDA device'"; fi
if ! "$PY" -c "$want" >>"$LOG" 2>&1; then
  log "$PY lacks CUDA torch/transformers/peft; creating a venv (needs PyPI)"
  "$PY" -m venv /tmp/gpu_check_venv && PY=/tmp/gpu_check_venv/bin/python
  timeout "$(allow 240)" "$PY" -m pip install -q torch==2.13.0 "transformers>=4.45" "peft>=0.12" accelerate safetensors \
    >>"$LOG" 2>&1 || { log "FAILED to install torch; nothing measured"; exit 1; }
  "$PY" -c "$want" >>"$LOG" 2>&1 || { log "FAILED: still no usable torch"; exit 1; }
fi
log "python: $PY; $("$PY" -c 'import torch,transformers,peft;print("torch",torch.__version__,"transformers",transformers.__version__,"peft",peft.__version__)' 2>/dev/null)"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
HAVE_BNB=0
"$PY" -c "import bitsandbytes" >/dev/null 2>&1 && HAVE_BNB=1

run_part() {  # name, cap seconds, step_time args...
  local name=$1 cap; cap=$(allow "$2"); shift 2
  if [ "$cap" -lt 20 ]; then log "SKIP $name: budget spent"; return 1; fi
  log "START $name (timeout ${cap}s)"
  timeout --kill-after=5 "$cap" "$PY" benchmarks/step_time.py --device "$DEVICE" --dtype "$DTYPE" --out "$OUT" \
    --no-isolate $TAG_DRY${TAG_DRY:+$name} "$@" \
    2>&1 | grep -v -e "^  warnings.warn" -e "UserWarning" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then log "TIMEOUT $name after ${cap}s (partial results kept)"; fi
  log "END $name rc=$rc"
}

# ---------------------------------------------------------------- 1. PEFT's BOFT extension
BOFT_EXT=off
if [ "$DEVICE" = cuda ]; then
  cap=$(allow 90)
  log "building PEFT's BOFT CUDA extension (timeout ${cap}s)"
  if timeout "$cap" "$PY" -c "
import sys
from peft.tuners.boft.layer import get_fbd_cuda
sys.exit(0 if get_fbd_cuda() else 1)" >>"$LOG" 2>&1; then
    BOFT_EXT=auto; log "PEFT BOFT extension: built"
  else
    log "PEFT BOFT extension: NOT available; PEFT BOFT will run with m=1 (compare with our boft-m1)"
  fi
fi

# ---------------------------------------------------------------- 2. per-module forms (seconds of work; first, because they write only at the end)
run_script() {  # name, cap seconds, script args...
  local name=$1 cap; cap=$(allow "$2"); shift 2
  if [ "$cap" -lt 20 ]; then log "SKIP $name: budget spent"; return 1; fi
  log "START $name (timeout ${cap}s)"
  timeout --kill-after=5 "$cap" "$PY" "$@" 2>&1 | grep -v -e "^  warnings.warn" -e "UserWarning" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then log "TIMEOUT $name after ${cap}s (nothing written: these write at the end)"; fi
  log "END $name rc=$rc"
}
run_script "butterfly-forms" 45 benchmarks/butterfly_forms.py --device "$DEVICE" --dtype "$DTYPE" $FORMS_BOFT --out "$OUT"
run_script "lora-forms" 30 benchmarks/lora_forms.py --device "$DEVICE" --dtype "$DTYPE" $FORMS_LORA \
  --tag "${TAG_DRY:+dry-}$DEVICE" --out "$OUT"

# ---------------------------------------------------------------- 3. 1B, every method
# most important first: a part cut short by its timeout loses the tail
ALL1="floor lora peft-lora boft hybrid peft-boft unitary unitary-full peft-oft full lora_ga full-bwd boft-factored hybrid-factored hybrid-recompute boft-recompute unitary-full-f32 boft-m1 unitary-recompute boft-layerwise hybrid-layerwise"
run_part "1b" 210 --size "$SIZE1" $STEPS1 --methods $ALL1 --peft-boft-ext "$BOFT_EXT" --budget-s 20

# ---------------------------------------------------------------- 4. 8B, the large-shape subset
ALL8="floor lora boft hybrid peft-lora peft-boft boft-factored hybrid-recompute hybrid-factored boft-layerwise hybrid-layerwise"
run_part "8b" 150 --size "$SIZE8" $STEPS8 --methods $ALL8 --peft-boft-ext "$BOFT_EXT" --budget-s 40 --no-ga-init

# ---------------------------------------------------------------- 5. NF4 base (optional)
if [ "$HAVE_BNB" = 1 ]; then
  run_part "1b-nf4" 90 --size "$SIZE1" $STEPS1 --quant nf4 --methods floor lora boft unitary hybrid peft-lora \
    --budget-s 10 --no-ga-init
else
  log "SKIP nf4: bitsandbytes is not importable"
fi

# ---------------------------------------------------------------- summary
log "done in $((SECONDS - START))s; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
for f in "$OUT"/*.md; do
  [ -e "$f" ] || continue
  echo; echo "==== $(basename "$f")"; sed -n '/^|/,$p' "$f"  # from each file's first table row
done
