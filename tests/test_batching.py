"""Batch plan: global = micro x K x world, every error, LR/warmup scaling, world-independent order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcycle.batching import lr_at, plan_batch
from gradcycle.data.loader import GlobalOrder, MicroBatches


def plan(**kw):
    args = dict(world_size=1, micro_batch_size=4, seq_len=128, lr=1e-3, warmup_steps=10)
    args.update(kw)
    return plan_batch(**args)


@pytest.mark.parametrize(
    "global_batch, micro, world, k",
    [(16, 4, 1, 4), (16, 2, 8, 1), (64, 1, 8, 8), (512, 4, 64, 2), (8, 8, 1, 1)],
)
def test_accumulation_is_derived_from_world_size(global_batch, micro, world, k):
    p = plan(global_batch_size=global_batch, micro_batch_size=micro, world_size=world)
    assert p.accumulation_steps == k
    assert p.micro_batch_size * p.accumulation_steps * p.world_size == global_batch
    assert p.tokens_per_step == global_batch * 128


def test_accumulation_steps_instead_of_global():
    p = plan(accumulation_steps=3, micro_batch_size=2, world_size=4)
    assert p.global_batch_size == 24 and p.accumulation_steps == 3


def test_table_names_every_quantity():
    text = plan(global_batch_size=32, micro_batch_size=2, world_size=2).table()
    for word in ("global batch", "micro-batch", "accumulation steps K", "world", "tokens/step"):
        assert word in text
    assert " 8\n" in text  # K = 32 / (2 x 2)


def test_indivisible_global_batch_names_numbers_and_choices():
    with pytest.raises(ValueError) as e:
        plan(global_batch_size=30, micro_batch_size=4, world_size=2)
    msg = str(e.value)
    assert "train.global_batch_size=30" in msg and "4 x world size 2 = 8" in msg
    assert "train.global_batch_size=24 or 32" in msg  # the nearest valid global batches
    assert "train.micro_batch_size=" in msg and "3 or 5" in msg  # divisors of 15 per rank


def test_micro_larger_than_global():
    with pytest.raises(ValueError, match="larger than train.global_batch_size=4"):
        plan(global_batch_size=4, micro_batch_size=8)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(global_batch_size=16, world_size=0), "world size 0"),
        (dict(global_batch_size=16, micro_batch_size=0), "micro_batch_size=0"),
        (dict(global_batch_size=None), "exactly one"),
        (dict(global_batch_size=16, accumulation_steps=2), "exactly one"),
        (dict(accumulation_steps=0), "accumulation_steps=0"),
        (dict(global_batch_size=16, scale_rule="linear"), "reference_batch_size"),
    ],
)
def test_every_other_error(kw, match):
    with pytest.raises(ValueError, match=match):
        plan(**kw)


def test_lr_scaling_rules_scale_warmup_too():
    base = dict(global_batch_size=1024, micro_batch_size=4, world_size=8, reference_batch_size=256)
    lin = plan(scale_rule="linear", **base)
    assert lin.lr == pytest.approx(4e-3) and lin.warmup_steps == 40
    sq = plan(scale_rule="sqrt", **base)
    assert sq.lr == pytest.approx(2e-3) and sq.warmup_steps == 20
    assert plan(scale_rule="none", **base).lr == 1e-3


def test_lr_schedule_shapes():
    p = plan(global_batch_size=16)
    assert lr_at(0, p, "cosine", 110, 0.1) == pytest.approx(1e-4)  # warmup 1/10
    assert lr_at(9, p, "cosine", 110, 0.1) == pytest.approx(1e-3)
    assert lr_at(60, p, "cosine", 110, 0.1) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, p, "cosine", 110, 0.1) == pytest.approx(1e-4)
    assert lr_at(60, p, "linear", 110, 0.0) == pytest.approx(0.5e-3)
    assert lr_at(100, p, "constant", 110, 0.1) == 1e-3
    assert all(math.isfinite(lr_at(s, p, "cosine", 110, 0.1)) for s in range(200))


class _Samples:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.array([i, i + 1], dtype=np.int32), None


def _samples_seen(step, world, micro, global_batch=16, seed=7):
    seen = []
    for rank in range(world):
        order = GlobalOrder(37, seed)
        mb = MicroBatches(_Samples(37), order, global_batch, rank, world, micro, pad_id=0)
        for host in mb.cycle(step):
            seen += host.rows[0, :, 0].tolist()
    return seen


@pytest.mark.parametrize("world, micro", [(1, 16), (1, 2), (2, 4), (8, 1), (4, 2)])
def test_global_batch_is_independent_of_world_and_micro(world, micro):
    # 37 samples, 16 per step: steps 0..4 cross two epoch boundaries.
    for step in range(5):
        assert _samples_seen(step, world, micro) == _samples_seen(step, 1, 16)


def test_order_depends_on_seed_and_covers_each_epoch(tmp_path):
    order = GlobalOrder(32, seed=1)
    assert sorted(order.indices(0, 32).tolist()) == list(range(32))
    assert GlobalOrder(32, seed=2).indices(0, 16).tolist() != order.indices(0, 16).tolist()
    # Stored once as .npy (what ranks and workers memory-map) and read back the same.
    stored = GlobalOrder(32, seed=1, store=tmp_path)
    assert stored.indices(20, 30).tolist() == order.indices(20, 30).tolist()  # epochs 0, 1
    files = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert files == ["perm-n32-seed1-epoch0.npy", "perm-n32-seed1-epoch1.npy"]
    assert np.load(tmp_path / files[0]).dtype == np.uint32
