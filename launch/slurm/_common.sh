# shellcheck shell=bash
# Sourced by the sbatch scripts next to it (never run on its own): finds the repository and its
# Python, sets thread counts, and relays the time-limit signal:
#   #SBATCH --signal=B:USR1@120 -> this shell traps USR1 -> `scancel --signal=USR1` delivers it to
#   every process of the job steps (not to this shell) -> all ranks agree on it at the next
#   optimizer step, checkpoint, and rank 0 runs `scontrol requeue` -> the job restarts with the
#   same job id, hence the same run dir (outputs/<job id>), and gc_overrides adds resume=auto.
# B: (signal the batch shell only) matters: a USR1 sent straight to the steps would also reach
# torchrun, which dies of it; the torchrun script therefore starts torchrun with USR1 ignored.

gc_setup() {
	GC_ROOT=${GRADCYCLE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
	if [[ ! -f $GC_ROOT/train.py ]]; then
		echo "gradcycle: no train.py in $GC_ROOT: submit from the repository root or set GRADCYCLE_ROOT" >&2
		exit 2
	fi
	cd "$GC_ROOT" || exit 2
	# The repository's own environment first (make setup creates .venv), else the image's Python.
	if [[ -n ${GRADCYCLE_PYTHON:-} ]]; then
		GC_PYTHON=$GRADCYCLE_PYTHON
	elif [[ -x $GC_ROOT/.venv/bin/python ]]; then
		GC_PYTHON=$GC_ROOT/.venv/bin/python
	else
		GC_PYTHON=$(command -v python3 || command -v python)
	fi
	export TOKENIZERS_PARALLELISM=false
	# Fewer fragmentation OOMs when shapes vary (ragged batches, evaluation).
	export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
	GC_MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
	GC_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
	GC_RESTART=${SLURM_RESTART_COUNT:-0}
	echo "gradcycle: job $SLURM_JOB_ID (restart $GC_RESTART) on $SLURM_JOB_NODELIST," \
		"python $GC_PYTHON, rendezvous $GC_MASTER:$GC_PORT"
}

# gc_threads <ranks per node>: the node's cores split over its ranks. The job holds the whole node
# (--exclusive --mem=0), but a step's task only gets the CPUs srun gives it (--cpus-per-task, set
# from GC_CPUS_PER_TASK by the scripts); OMP_NUM_THREADS is set to the cores of one rank (never a
# stale value from the submitting shell: N ranks x all cores thrash). GRADCYCLE_OMP_THREADS
# overrides the thread count.
gc_threads() {
	local ranks=$1 cores=${SLURM_CPUS_ON_NODE:-1}
	((ranks > 0)) || ranks=1
	GC_CPUS_PER_TASK=$((cores / ranks > 0 ? cores / ranks : 1))
	export OMP_NUM_THREADS=${GRADCYCLE_OMP_THREADS:-$GC_CPUS_PER_TASK}
	echo "gradcycle: $cores cores on this node, $ranks rank(s) per node, OMP_NUM_THREADS=$OMP_NUM_THREADS"
}

# gc_overrides <hydra overrides...>: the job's overrides plus resume=auto on a requeued run
# (unless the user chose resume=...). Prints one per line.
gc_overrides() {
	local arg resume=0
	for arg in "$@"; do
		[[ $arg == resume=* ]] && resume=1
		printf '%s\n' "$arg"
	done
	if ((GC_RESTART > 0 && !resume)); then printf '%s\n' resume=auto; fi
}

gc_on_signal() {
	echo "gradcycle: USR1 (time limit near): the ranks checkpoint, then the job is requeued" >&2
	scancel --signal=USR1 "$SLURM_JOB_ID" # every job step, not this batch shell
}

# gc_run_step <srun arguments...>: srun in the background so the USR1 trap runs while it works.
gc_run_step() {
	trap gc_on_signal USR1
	srun "$@" &
	local step=$! rc=0
	while :; do
		wait "$step" && rc=0 || rc=$?
		kill -0 "$step" 2>/dev/null || break # wait returned because of the trap: keep waiting
	done
	trap - USR1
	return "$rc"
}
