"""DDP on 2 gloo ranks: the collective contract and exact equivalence with one process.

One spawn runs every configuration (imports dominate the cost).
"""

from __future__ import annotations

import pytest
from conftest import RAGGED, TINY, JobResults, compose, rank_train, train_steps
from multiproc import run_on_ranks

from gradcycle.data import load_corpus
from gradcycle.model import build_model

STEPS = [*RAGGED, "train.max_steps=3", "optim=sgd"]


def _jobs(tmp):
    jobs = {}
    for sync in ("per_cycle", "per_micro"):
        for k, micro in ((1, 4), (4, 1)):  # global 8 on 2 ranks
            jobs[(sync, k)] = [f"backend.sync={sync}", "train.global_batch_size=8",
                               f"train.micro_batch_size={micro}"]  # fmt: skip
    jobs[("ac", 4)] = ["activation_checkpointing.mode=full", "train.global_batch_size=8",
                       "train.micro_batch_size=1"]  # fmt: skip
    jobs[("bf16", 4)] = ["precision=bf16", "train.global_batch_size=8", "train.micro_batch_size=1"]
    jobs[("adamw", 2)] = ["optim=adamw", "train.global_batch_size=8", "train.micro_batch_size=2"]
    return [
        (str(tmp / f"{a}-{b}"), ["backend=ddp", *STEPS, *o]) for (a, b), o in jobs.items()
    ], list(jobs)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    jobs, keys = _jobs(tmp)
    results = run_on_ranks(rank_train, 2, args=(jobs,))[0]
    return JobResults(zip(keys, results, strict=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, one micro-batch of the whole global batch: the definition of correct."""
    tmp = tmp_path_factory.mktemp("ref")
    sgd = train_steps(
        tmp / "sgd", [*STEPS, "train.global_batch_size=8", "train.micro_batch_size=8"]
    )
    adamw = train_steps(tmp / "adamw", [*STEPS, "optim=adamw", "train.global_batch_size=8",
                                        "train.micro_batch_size=8"])  # fmt: skip
    return {"sgd": sgd, "adamw": adamw}


def _n_params() -> int:
    cfg = compose([*TINY, *STEPS])
    vocab = len(load_corpus(cfg.data, cfg.model).tokenizer)
    return sum(p.numel() for p in build_model(cfg.model, vocab, "meta").parameters())


# Collective contract per optimizer step, 2 ranks, fp32 gradients, model < DDP's first 1 MB
# bucket so all gradients travel in ONE bucket of 4 x n_params bytes.
#   per_cycle: no_sync() on micro-batches 1..K-1 -> one bucket all-reduce at the boundary
#   per_micro: every backward all-reduces the bucket -> K all-reduces
EXPECTED = {  # (sync, K): all_reduce calls per step
    ("per_cycle", 1): 1,
    ("per_cycle", 4): 1,
    ("per_micro", 1): 1,
    ("per_micro", 4): 4,
}


@pytest.mark.parametrize("sync, k", list(EXPECTED))
def test_collective_contract(ddp_runs, sync, k):
    n_params = _n_params()
    assert 4 * n_params < 1024**2, "model must fit DDP's first bucket for this table"
    for record in ddp_runs[(sync, k)]:
        assert record["accumulation_steps"] == k
        comm = record["comm"]
        calls = EXPECTED[(sync, k)]
        assert comm["all_reduce"] == {"calls": calls, "bytes": calls * 4 * n_params}
        assert comm["all_gather"]["calls"] == comm["reduce_scatter"]["calls"] == 0
        assert comm["broadcast"]["calls"] == 0  # broadcast_buffers=False: no per-forward sync


def test_per_cycle_reduction_count_is_independent_of_k(ddp_runs):
    one = [r["comm"] for r in ddp_runs[("per_cycle", 1)]]
    four = [r["comm"] for r in ddp_runs[("per_cycle", 4)]]
    assert one == four


@pytest.mark.parametrize("key", [("per_cycle", 1), ("per_cycle", 4), ("per_micro", 4), ("ac", 4)])
def test_matches_single_process_reference(ddp_runs, reference, key):
    for got, ref in zip(ddp_runs[key], reference["sgd"], strict=True):
        assert got["world_size"] == 2
        assert got["tokens"] == ref["tokens"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


def test_adamw_matches_reference(ddp_runs, reference):
    for got, ref in zip(ddp_runs[("adamw", 2)], reference["adamw"], strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


def test_bf16_smoke(ddp_runs, reference):
    records = ddp_runs[("bf16", 4)]
    assert len(records) == 3
    for got, ref in zip(records, reference["sgd"], strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=2e-2)  # bf16 autocast, same data
