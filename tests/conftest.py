"""Shared test setup: one tokenizer/corpus cache per session, small configs, the rank helper."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/multiproc.py

# Inherited by spawned ranks and subprocesses: the corpus is tokenised once per session.
os.environ.setdefault("GRADCYCLE_CACHE", tempfile.mkdtemp(prefix="gradcycle-cache-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

# What an in-process run sets for torch.distributed's env:// rendezvous (RANK=0, WORLD_SIZE=1,
# MASTER_PORT, ...): restored after each test, so a later subprocess (a benchmark, a launcher)
# does not inherit a world it is not part of.
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE")  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_rendezvous_env():
    saved = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# A model and data small enough for many runs on 2 cores; still a real Llama and real data.
TINY = [
    "experiment=cpu_smoke",
    "data.max_documents=300",
    "logging.progress=false",
    "train.eval_every=0",
]


def compose(overrides: list[str]):
    from gradcycle.cli import compose as _compose

    return _compose(overrides, str(ROOT / "conf"))


def read_metrics(run_dir) -> list[dict]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_steps(run_dir, overrides: list[str]) -> list[dict]:
    """Run the real trainer in this process (world 1) and return its step records."""
    from gradcycle.trainer import run

    run(compose([*TINY, f"run_dir={run_dir}", *overrides]))
    return [r for r in read_metrics(run_dir) if "loss" in r]


class JobFailed:
    """What rank_train returns for a configuration that raised: its traceback, so the other
    configurations of the same spawn still report (see JobResults)."""

    def __init__(self, text: str):
        self.text = text


class JobResults(dict):
    """name -> a configuration's result; reading a failed one fails only the test that reads it."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, JobFailed):
            pytest.fail(f"configuration {key!r} failed on the ranks:\n{value.text}", pytrace=False)
        return value


def rank_train(rank: int, world: int, jobs: list[tuple[str, list[str]]]) -> list:
    """For run_on_ranks: train each (run_dir, overrides) job in turn on this rank; rank 0 returns
    each job's step records (others return []), or a JobFailed for a job that raised. One spawn
    serves many configurations; a configuration that fails on every rank (a config or start-up
    error) does not stop the others."""
    import traceback

    from gradcycle.trainer import run

    out: list = []
    for run_dir, overrides in jobs:
        try:
            run(compose([*TINY, f"run_dir={run_dir}", *overrides]))
        except Exception:
            out.append(JobFailed(traceback.format_exc()))
            continue
        out.append([r for r in read_metrics(run_dir) if "loss" in r] if rank == 0 else [])
    return out


def _write_ragged_corpus(path: Path) -> Path:
    """Documents of 20..600 characters cut from the stdlib corpus: sequence lengths vary > 10x, so
    `data.packing=false` batches are ragged (the stdlib files themselves mostly exceed seq_len)."""
    if path.exists():
        return path
    from gradcycle.data.sources import stdlib_files

    text = "".join(Path(f).read_text(encoding="utf-8") for f in stdlib_files()[:40])
    docs, pos, i = [], 0, 0
    while len(docs) < 400:
        n = 20 + (i * 7919) % 580  # deterministic, spread over 20..600 characters
        docs.append(text[pos : pos + n])
        pos, i = pos + n, i + 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tmp.replace(path)
    return path


RAGGED_DATA = _write_ragged_corpus(Path(os.environ["GRADCYCLE_CACHE"]) / "ragged.jsonl")
# Ragged, one document per sample: the setting where wrong normalisation shows.
RAGGED = ["data=files", f"data.path={RAGGED_DATA}", "data.packing=false", "data.seq_len=128"]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
