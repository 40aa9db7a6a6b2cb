# Two commands on a fresh machine: `make train` and `make test`. Both create .venv if missing and
# install the pinned stack once (a stamp file makes re-runs instant).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test lint format clean slurm-start slurm-stop

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: it comes from the local wheel where one exists (no CUDA download)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# slurm: submitit + hydra-submitit-launcher, for the sweeps tests/test_slurm.py submits
	$(BIN)/python -m pip install -q -e ".[dev,bench,slurm]"
	rm -f $(VENV)/.installed-*
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# one thread per process: the suite runs 2-rank jobs on 2 cores
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# A two-node Slurm cluster on this machine (root; installs Slurm and munge with apt if missing).
# tests/test_slurm.py starts and stops it by itself; these are for trying the sbatch scripts.
slurm-start:
	launch/slurm/local_cluster.sh start
	@echo 'now: eval "$$(launch/slurm/local_cluster.sh env)"'

slurm-stop:
	launch/slurm/local_cluster.sh stop

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
