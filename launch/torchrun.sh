#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh [NPROC] [hydra overrides...]
#
#   launch/torchrun.sh 8 backend=fsdp model=llama-1b
#   launch/torchrun.sh 2 experiment=cpu_smoke          # CPU: 2 gloo ranks
#
# NPROC defaults to the number of visible GPUs (1 without any). Runs the repository's .venv Python
# when there is one. Give run_dir=... to choose the run dir (default: outputs/<timestamp of rank 0>).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
	NPROC=$1
	shift
else
	NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
	((NPROC > 0)) || NPROC=1
fi
PYTHON=${GRADCYCLE_PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3)
# The node's cores split over its ranks: N ranks x all cores thrash, one thread per rank starves
# the host optimizer of an offload run (backend.offload_*: AdamW runs on these threads).
# GRADCYCLE_OMP_THREADS overrides; GRADCYCLE_NUMA_BINDING=node|socket|exclusive pins each rank
# (torchrun --numa-binding, where this torch has it).
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${GRADCYCLE_OMP_THREADS:-$((CORES / NPROC > 0 ? CORES / NPROC : 1))}
export TOKENIZERS_PARALLELISM=false
BIND=()
[[ -n ${GRADCYCLE_NUMA_BINDING:-} ]] && BIND=(--numa-binding="$GRADCYCLE_NUMA_BINDING")
echo "gradcycle: $CORES cores, $NPROC rank(s), OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" "${BIND[@]}" \
	"$ROOT/train.py" "$@"
