#!/usr/bin/env bash
# One lent GPU, at most ~10 minutes: a ~1.1B Llama (model=llama-1b, TinyLlama shapes) in bf16 on
# fsdp, zero3 and zero2, activation checkpointing off/full, K = 1 and 8 (micro-batch 8 x 2048
# tokens): tokens/s, MFU, HFU and peak memory from each run's metrics.jsonl, as a markdown table.
#
#   bash bench/gpu.sh                      # writes $OUT/gpu_table.md (OUT defaults to ./gpu_results)
#   PEAK_TFLOPS=989 bash bench/gpu.sh      # the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989)
#   SMOKE=1 bash bench/gpu.sh              # the same flow on CPU with a tiny model (checks the script)
#
# One process per configuration (a crash or OOM costs that row only), each under `timeout`;
# configurations left when the time budget runs out are reported as skipped, not silently dropped.
# World size 1: no collectives run, so this measures the per-GPU cost of each backend's memory
# layout and of recompute, not communication.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
OUT="${OUT:-$ROOT/gpu_results}"
BUDGET_S="${BUDGET_S:-540}"          # stop starting new configurations after this
PER_RUN_S="${PER_RUN_S:-150}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
mkdir -p "$OUT"
LOG="$OUT/gpu_runs.log"
: > "$LOG"
START=$(date +%s)

# World-1 launch variables: DeepSpeed's init_distributed reads them; gradcycle sees world 1.
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517
export DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export GRADCYCLE_CACHE="${GRADCYCLE_CACHE:-$OUT/cache}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

COMMON=(
  model=llama-1b precision=bf16 device=cuda
  data.seq_len=2048 data.max_documents=3000
  train.micro_batch_size=8 train.global_batch_size=null
  train.eval_every=0 checkpoint.at_end=false logging.progress=false optim.warmup_steps=2
  hardware.name=gpu hardware.bf16_tflops="$PEAK_TFLOPS" hardware.memory_gb=140
)
if [ "${SMOKE:-0}" = 1 ]; then
  # The same flow on CPU with a tiny model, to check the script itself where no GPU is lent.
  COMMON=(experiment=cpu_smoke data.max_documents=300 precision=bf16 device=cpu
          train.micro_batch_size=2 train.global_batch_size=null train.eval_every=0
          checkpoint.at_end=false logging.progress=false)
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
else
  "$PY" - <<'EOF' || { echo "gpu.sh: no CUDA device visible to torch" | tee -a "$LOG"; exit 1; }
import torch
assert torch.cuda.is_available()
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
EOF
fi

# Tokenizer and token cache once, outside the timed runs (CPU only).
timeout 300 "$PY" - "${COMMON[@]}" <<'EOF' >> "$LOG" 2>&1 || echo "data warm-up failed (see $LOG)"
import sys
from gradcycle.cli import compose
from gradcycle.data.reader import open_dataset
cfg = compose(sys.argv[1:])
d = open_dataset(cfg)
print(f"data: {d.manifest['splits']['train']['tokens']} tokens, vocab {len(d.tokenizer)}")
EOF

# Priority order: if the budget runs out, the K=8 rows (the point of accumulation) exist.
CONFIGS=(
  "fsdp none 8" "fsdp full 8" "zero3 none 8" "zero3 full 8" "zero2 none 8" "zero2 full 8"
  "fsdp none 1" "fsdp full 1" "zero3 none 1" "zero3 full 1" "zero2 none 1" "zero2 full 1"
)
for c in "${CONFIGS[@]}"; do
  read -r backend ac k <<< "$c"
  dir="$OUT/runs/${backend}_${ac}_k${k}"
  rm -rf "$dir"
  if (( $(date +%s) - START > BUDGET_S )); then
    echo "skip $c: time budget ${BUDGET_S}s spent" | tee -a "$LOG"
    continue
  fi
  steps=$([ "$k" = 1 ] && echo 6 || echo 4)
  echo "== $c ($(( $(date +%s) - START ))s)" | tee -a "$LOG"
  timeout "$PER_RUN_S" "$PY" train.py "${COMMON[@]}" backend="$backend" \
    activation_checkpointing.mode="$ac" train.accumulation_steps="$k" train.max_steps="$steps" \
    run_dir="$dir" >> "$LOG" 2>&1 || echo "   failed or timed out (exit $?): see $LOG" | tee -a "$LOG"
done

"$PY" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| backend | checkpointing | K | tokens/step | step s | tokens/s | MFU | HFU | peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|"]
for d in sorted((out / "runs").glob("*")):
    backend, ac, k = d.name.split("_")
    f = d / "metrics.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
    recs = [r for r in recs if "loss" in r]
    steady = recs[2:] or recs[1:]  # the first steps pay CUDA/allocator warm-up
    if not steady:
        rows.append(f"| {backend} | {ac} | {k[1:]} | | | failed | | | |")
        continue
    med = lambda key: statistics.median(r[key] for r in steady)
    rows.append(f"| {backend} | {ac} | {k[1:]} | {recs[-1]['tokens']} | {med('step_time_s'):.2f} | "
                f"{med('tokens_per_s'):,.0f} | {med('mfu'):.1%} | {med('hfu'):.1%} | "
                f"{max(r['peak_mem_bytes'] for r in recs) / 2**30:.1f} |")
text = "\n".join(rows)
(out / "gpu_table.md").write_text(text + "\n")
print(text)
EOF
echo "total $(( $(date +%s) - START ))s; table: $OUT/gpu_table.md; log: $LOG"
