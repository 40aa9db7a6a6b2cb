"""backend.pp: a pipelined cycle is the same big batch as one process (ragged data, 3 steps),
for each schedule; validation refuses what pp does not support, before any process group."""

from __future__ import annotations

import pytest
from conftest import RAGGED, TINY, compose, rank_train, train_steps
from multiproc import run_on_ranks

from gradcycle.backends.pipeline import check_plan, stage_layers
from gradcycle.config import validate

# K = 8 / (2 x dp) micro-batches: 4 on pp=2 (dp=1); ragged documents padded per micro-batch
BASE = [*RAGGED, "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=3",
        "model.num_layers=4", "optim.warmup_steps=1"]  # fmt: skip
SCHEDULES = {
    "gpipe": ["backend.pp_schedule=gpipe"],
    "1f1b": ["backend.pp_schedule=1f1b"],
    "interleaved_1f1b": ["backend.pp_schedule=interleaved_1f1b", "backend.pp_virtual=2"],
    "looped_bfs": ["backend.pp_schedule=looped_bfs", "backend.pp_virtual=2"],
}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_pipelined_steps_equal_one_process_for_every_schedule(tmp_path):
    reference = train_steps(tmp_path / "ref", BASE)
    names = list(SCHEDULES)
    jobs = [(str(tmp_path / n), [*BASE, "backend.pp=2", *SCHEDULES[n]]) for n in names]
    results = dict(zip(names, run_on_ranks(rank_train, 2, args=(jobs,))[0], strict=True))
    for name in names:
        steps = results[name]
        assert not isinstance(steps, list) or len(steps) == 3, steps
        assert isinstance(steps, list), steps.text
        for got, want in zip(steps, reference, strict=True):
            # the cycle's normaliser: the targets of the one data-parallel slice, not pp x them
            assert got["target_tokens"] == want["target_tokens"]
            assert got["tokens"] == want["tokens"]
            assert got["accumulation_steps"] == want["accumulation_steps"] == 4
            assert _rel(got["loss"], want["loss"]) < 1e-5, (name, got["loss"], want["loss"])
            assert _rel(got["grad_norm"], want["grad_norm"]) < 1e-5, (name, got, want)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend.pp=2", "backend=zero2"], "PipelineModule"),
        (["backend.pp=2", "backend=fsdp"], "FSDP2 inside pipeline stages"),
        (["backend.pp=2", "backend.pp_schedule=zbv"], "zero-bubble"),
        (["backend.pp=2", "backend.pp_schedule=nope"], "choose one of"),
        (["backend.pp=2", "backend.pp_schedule=interleaved_1f1b"], "pp_virtual=2"),
        (["backend.pp=2", "backend.pp_virtual=2"], "needs an interleaved schedule"),
        (["backend.pp=3"], "does not split into backend.pp=3"),
        (["backend.pp=2", "model.tie_embeddings=true"], "tied embeddings"),
        (["backend.pp=2", "precision=fp16"], "precision=fp16"),
        (["backend.pp=0"], "must be >= 1"),
    ],
)
def test_validation_refuses_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose([*TINY, "model.num_layers=4", *overrides]))


def test_plan_checks_k_and_world():
    cfg = compose([*TINY, "model.num_layers=4", "backend.pp=4"])
    with pytest.raises(ValueError, match="needs K >= backend.pp=4 .* got K=2"):
        check_plan(cfg, 2, 8)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        check_plan(cfg, 8, 6)
    check_plan(cfg, 4, 8)  # K = stages: fine for 1f1b
    cfg = compose([*TINY, "model.num_layers=8", "backend.pp=4", "backend.pp_virtual=2",
                   "backend.pp_schedule=interleaved_1f1b"])  # fmt: skip
    with pytest.raises(ValueError, match="divisible by max"):
        check_plan(cfg, 9, 4)  # rounds = 9 // 4 = 2 does not divide 9
    check_plan(cfg, 10, 4)
    assert list(stage_layers(8, 4, 3)) == [6, 7]
