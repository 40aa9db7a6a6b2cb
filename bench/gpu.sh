#!/usr/bin/env bash
# One lent GPU, one command of at most 600 s, install included: a ~1.1B Llama (model=llama-1b,
# TinyLlama shapes) in bf16 on fsdp, zero2 and zero3, activation checkpointing off/full, K = 8 and
# 1 (micro-batch 8 x 2048 tokens): tokens/s, MFU, HFU and peak memory from each run's
# metrics.jsonl; then, in the time left, bench/gpu_memory.py --quick (planner vs measured memory).
#
#   bash bench/gpu.sh [OUT]                 # OUT defaults to ./gpu_results
#   SMOKE=1 bash bench/gpu.sh OUT           # three rows (each backend, both AC modes, K 1 and 2) as one step on CPU, tiny model
#   PEAK_TFLOPS=989 bash bench/gpu.sh OUT   # override the detected profile's bf16 peak for MFU
#
# On a bare machine (Python + a CUDA torch, no network) bench/_gpu_env.py first installs what is
# missing from bench/gpu_wheels/ (made beforehand by bench/_gpu_prep.sh), never touching torch;
# where everything imports it installs nothing. Procedure: docs/performance.md, "Running the GPU
# benchmark".
#
# OUT receives only gpu.jsonl (one row per planned run, appended as each ends), gpu_table.md
# (reprinted after each run), metrics.jsonl (every run's records, tagged with `run`), gpu.log and
# gpu_memory.json. Run dirs, caches and full logs live in GPU_WORK (default /tmp/gradcycle-gpu):
# a run that wrote a checkpoint there never travels back. Every run is one process under
# `timeout -s KILL` (SIGTERM would make gradcycle write a final checkpoint: 13 GB for this model
# with Adam); a crash, OOM or kill costs that row only, and rows the time budget leaves out are
# written as skipped. World size 1: no collectives run, so this measures each backend's per-GPU
# memory layout and recompute cost, not communication.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
SMOKE="${SMOKE:-0}"
OUT="${1:-${OUT:-$ROOT/gpu_results}}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 1
WORK="${GPU_WORK:-${TMPDIR:-/tmp}/gradcycle-gpu}"
mkdir -p "$WORK/runs" "$WORK/logs" && WORK="$(cd "$WORK" && pwd)" || exit 1
case "$WORK/" in "$OUT"/*) echo "gpu.sh: GPU_WORK=$WORK is inside OUT=$OUT" >&2; exit 2 ;; esac
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || echo python)}"
if [ "$SMOKE" = 1 ]; then
  RUNS_S="${RUNS_S:-1200}" PER_RUN_S="${PER_RUN_S:-180}" MEMORY_S="${MEMORY_S:-0}"
  DEADLINE_S="${DEADLINE_S:-3600}"
else
  RUNS_S="${RUNS_S:-350}"          # the rows' share of the 600 s command: no run starts beyond it
  PER_RUN_S="${PER_RUN_S:-100}"    # one run's KILL limit (start-up ~30-40 s + a few steps)
  MEMORY_S="${MEMORY_S:-150}"      # bench/gpu_memory.py --quick afterwards, if this much is left
  DEADLINE_S="${DEADLINE_S:-570}"  # everything, install included, ends before this
fi
MIN_RUN_S=30
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
LOG="$OUT/gpu.log"
: > "$LOG"
: > "$OUT/gpu.jsonl"
: > "$OUT/metrics.jsonl"
rm -f "$OUT/gpu_table.md" "$OUT/gpu_memory.json"
say() { echo "$*" | tee -a "$LOG"; }

# This tree's gradcycle, not an installed one; then what _gpu_env.py installs where the
# interpreter's site-packages is read-only.
export GRADCYCLE_GPU_SITE="$WORK/site"
export PYTHONPATH="$ROOT/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$WORK/hf"  # no network there: never wait on one
export GRADCYCLE_CACHE="${GRADCYCLE_CACHE:-$WORK/cache}"
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions" TRITON_CACHE_DIR="$WORK/triton"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# 1. What is missing, from the carried wheels; torch untouched; the imports checked.
timeout -s KILL 180 "$PY" bench/_gpu_env.py --wheels "${GPU_WHEELS:-$ROOT/bench/gpu_wheels}" 2>&1 \
  | tee -a "$LOG" || { say "gpu.sh: the install or import check failed (above)"; exit 1; }
export GRADCYCLE_GPU_ENV_OK=1  # gpu_memory.py below skips its own check

COMMON=(
  model=llama-1b precision=bf16 device=cuda hardware=auto
  data.seq_len=2048 data.max_documents=3000
  train.micro_batch_size=8 train.global_batch_size=null train.eval_every=0
  checkpoint.at_end=false checkpoint.every=0 logging.progress=false optim.warmup_steps=2
)
[ -n "${PEAK_TFLOPS:-}" ] && COMMON+=("hardware.bf16_tflops=$PEAK_TFLOPS")
if [ "$SMOKE" = 1 ]; then
  # The same flow on CPU with a tiny model: checks the script where no GPU is lent.
  COMMON=(experiment=cpu_smoke data.max_documents=300 precision=bf16 device=cpu hardware=auto
          train.micro_batch_size=2 train.global_batch_size=null train.eval_every=0
          checkpoint.at_end=false checkpoint.every=0 logging.progress=false)
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  export DS_ACCELERATOR=cuda
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG" || { say "gpu.sh: no CUDA device visible to torch"; exit 1; }
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB; torch {torch.__version__}")
EOF
fi

# 2. Tokenizer and token cache once, outside the timed runs (CPU only). `-c`, not a script on
# stdin: prepare's process pool re-imports the main module, and "<stdin>" is no file.
if timeout -s KILL 120 "$PY" -c '
import sys
from gradcycle.cli import compose
from gradcycle.data.reader import open_dataset
d = open_dataset(compose(sys.argv[1:]))
print("data: %d tokens, vocab %d" % (d.manifest["splits"]["train"]["tokens"], len(d.tokenizer)))
' "${COMMON[@]}" > "$WORK/logs/data.log" 2>&1; then
  tail -n 1 "$WORK/logs/data.log" | tee -a "$LOG"
else
  say "data warm-up failed (each run prepares the data itself):"
  tail -n 20 "$WORK/logs/data.log" | tee -a "$LOG"
fi
say "ready after $(elapsed)s; rows: ${RUNS_S}s of runs, ${PER_RUN_S}s each at most"

# 3. The rows, in priority order: no checkpointing on all three backends at K=8 first (the point
# of accumulation), then full checkpointing, then K=1.
CONFIGS=(
  "fsdp none 8" "zero2 none 8" "zero3 none 8" "fsdp full 8" "zero2 full 8" "zero3 full 8"
  "fsdp none 1" "zero2 none 1" "zero3 none 1" "fsdp full 1" "zero2 full 1" "zero3 full 1"
)
# Smoke (CI, CPU): every backend, both checkpointing modes and both K once, not all 12 rows.
[ "$SMOKE" = 1 ] && CONFIGS=("fsdp none 2" "zero2 full 1" "zero3 none 2")
RUNS_START=$(date +%s)
i=0
for c in "${CONFIGS[@]}"; do
  read -r backend ac k <<< "$c"
  name="${backend}_${ac}_k${k}"
  dir="$WORK/runs/$name"
  rm -rf "$dir"
  left=$(( RUNS_S - ($(date +%s) - RUNS_START) ))
  hard=$(( DEADLINE_S - $(elapsed) - 20 ))
  (( hard < left )) && left=$hard
  if (( left < MIN_RUN_S )); then
    say "== $c: skipped (time budget spent)"
    "$PY" bench/_gpu_table.py row "$OUT" "$name" "skipped: budget" 0
    continue
  fi
  limit=$(( left < PER_RUN_S ? left : PER_RUN_S ))
  if [ "$SMOKE" = 1 ]; then steps=1; elif [ "$k" = 1 ]; then steps=6; else steps=4; fi
  say "== $c: $steps steps, limit ${limit}s (at $(elapsed)s)"
  t0=$(date +%s)
  MASTER_PORT=$(( 29517 + i )) timeout -s KILL "$limit" "$PY" train.py "${COMMON[@]}" \
    backend="$backend" activation_checkpointing.mode="$ac" train.accumulation_steps="$k" \
    train.max_steps="$steps" run_dir="$dir" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  i=$(( i + 1 ))
  case $rc in
    0) status=ok ;;
    137) status="killed at ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ "$status" = ok ] || { say "   $status; the end of its log:"; tail -n 25 "$WORK/logs/$name.log" >> "$LOG"; }
  "$PY" bench/_gpu_table.py row "$OUT" "$name" "$status" $(( $(date +%s) - t0 )) "$dir"
  "$PY" bench/_gpu_table.py table "$OUT"
done

# 4. Planner vs measured peak memory in what is left (it prints each case as it ends).
left=$(( DEADLINE_S - $(elapsed) - 10 ))
(( left > MEMORY_S )) && left=$MEMORY_S
if (( MEMORY_S > 0 && left >= 60 )); then
  mode=$([ "$SMOKE" = 1 ] && echo --smoke || echo --quick)
  say "== bench/gpu_memory.py $mode, limit ${left}s (at $(elapsed)s)"
  timeout -s KILL "$left" "$PY" bench/gpu_memory.py "$mode" --out "$OUT/gpu_memory.json" 2>&1 \
    | tee -a "$LOG" || say "   gpu_memory.py failed or was killed (rows so far: gpu_memory.json)"
elif (( MEMORY_S > 0 )); then
  say "== bench/gpu_memory.py: skipped (${left}s left)"
fi
say "total $(elapsed)s; rows: $OUT/gpu.jsonl; table: $OUT/gpu_table.md; run logs: $WORK/logs"
