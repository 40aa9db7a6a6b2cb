# Two commands on a fresh machine: `make train` and `make test`. Both create .venv if missing and
# install the pinned stack once (a stamp file makes re-runs instant). Versions: constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# `pip install -e .` alone, no extras: proves every backend runs on the core dependencies.
CORE_VENV := .venv-core
CORE_STAMP := $(CORE_VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PIP_C := -c constraints.txt
PYTEST_JOBS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test core-check lint format lock clean slurm-start slurm-stop

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: it comes from the local wheel where one exists (no CUDA download)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# slurm: submitit + hydra-submitit-launcher, for the sweeps tests/test_slurm.py submits
	$(BIN)/python -m pip install -q $(PIP_C) -e ".[dev,slurm]"
	rm -f $(VENV)/.installed-*
	touch $@

$(CORE_STAMP): pyproject.toml constraints.txt
	test -x $(CORE_VENV)/bin/python || $(PY) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install -q --upgrade pip
	$(CORE_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(CORE_VENV)/bin/python -m pip install -q $(PIP_C) -e .
	rm -f $(CORE_VENV)/.installed-*
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# one thread per process; two pytest workers (a module stays on one: its fixtures run once), so
	# one worker's imports and single-process steps overlap the other's 2-rank jobs on 2 cores.
	# PYTEST_JOBS=0 runs in this process (no workers).
	# the core-dependency venv installs meanwhile (mostly download and unpacking)
	$(MAKE) -s $(CORE_STAMP) > $(CORE_VENV).log 2>&1 & core=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_JOBS) --dist loadscope $(PYTEST_ARGS); \
	rc=$$?; wait $$core || { cat $(CORE_VENV).log; exit 1; }; exit $$rc
	$(MAKE) core-check

# One 2-rank step of ddp, zero1, zero2, zero3, fsdp and hsdp with the core dependencies only.
core-check: $(CORE_STAMP)
	OMP_NUM_THREADS=1 $(CORE_VENV)/bin/python tests/core_deps_check.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# Re-pin constraints.txt to what the dev venv holds now (after changing pyproject.toml).
lock: setup
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# A two-node Slurm cluster on this machine (root; installs Slurm and munge with apt if missing).
# tests/test_slurm.py starts and stops it by itself; these are for trying the sbatch scripts.
slurm-start:
	launch/slurm/local_cluster.sh start
	@echo 'now: eval "$$(launch/slurm/local_cluster.sh env)"'

slurm-stop:
	launch/slurm/local_cluster.sh stop

clean:
	rm -rf $(VENV) $(CORE_VENV) $(CORE_VENV).log outputs .pytest_cache .ruff_cache
