"""The loader: global batch s is the same samples for any world size, micro-batch size and number
of DataLoader workers; a loader started at step k continues exactly; epochs roll over.

Each step's global batch is compared as the list of its samples' digests (token ids and position
ids of the positions that carry a label), in rank order: padding widths differ with the micro-batch
size, the samples must not. World 2 runs on 2 real ranks (one spawn for every configuration).
"""

from __future__ import annotations

import hashlib
import traceback
from types import SimpleNamespace

import pytest
import torch
from conftest import RAGGED, TINY, compose
from multiproc import run_on_ranks

from gradcycle.batching import plan_from_config
from gradcycle.data import IGNORE_INDEX
from gradcycle.data.loader import train_loader
from gradcycle.data.reader import open_dataset

DATA = {
    # 294 ragged train documents (of data.max_documents=300), one per sample, 8 per step:
    # global batch 36 holds the last 6 samples of epoch 0 and the first 2 of epoch 1
    "unpacked": ([*RAGGED, "train.global_batch_size=8"], list(range(34, 40))),
    "packed-masked": (["data.document_mask=true", "train.global_batch_size=8"], list(range(4))),
}
CONFIGS = [(name, micro, workers) for name in DATA for micro in (1, 4) for workers in (0, 2)]


def _loader(name: str, world: int, rank: int, micro: int, workers: int, start: int, stop: int):
    overrides, _ = DATA[name]
    cfg = compose([*TINY, *overrides, f"train.micro_batch_size={micro}",
                   f"data.num_workers={workers}", f"train.max_steps={stop}"])  # fmt: skip
    env = SimpleNamespace(rank=rank, world_size=world)
    plan = plan_from_config(cfg, world)
    return train_loader(cfg, open_dataset(cfg, progress=False), plan, env, torch.device("cpu"),
                        start=start, model=None)  # fmt: skip


def _digests(cycle) -> list[str]:
    out = []
    for batch in cycle.micro:
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            real = labels != IGNORE_INDEX
            blob = ids[real].numpy().tobytes() + pos[real].numpy().tobytes()
            out.append(hashlib.sha256(blob).hexdigest()[:12])
    return out


def _run(name, world, rank, micro, workers, steps) -> list[list[str]]:
    loader = _loader(name, world, rank, micro, workers, steps[0], steps[-1] + 1)
    try:
        return [_digests(loader.cycle(s)) for s in steps]
    finally:
        loader.close()


def _on_rank(rank: int, world: int) -> dict:
    out = {}
    for name, micro, workers in CONFIGS:  # one failing configuration fails only its own test
        try:
            out[(name, micro, workers)] = _run(name, world, rank, micro, workers, DATA[name][1])
        except Exception:
            out[(name, micro, workers)] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    """World 1, micro-batch = global batch, no workers: the definition of global batch s."""
    return {name: _run(name, 1, 0, 8, 0, steps) for name, (_, steps) in DATA.items()}


@pytest.fixture(scope="module")
def two_ranks(reference) -> list[dict]:  # after `reference`: the data is prepared once
    return run_on_ranks(_on_rank, 2)


@pytest.mark.parametrize("name, micro, workers", CONFIGS)
def test_world_1_micro_and_workers_give_the_same_global_batches(reference, name, micro, workers):
    assert _run(name, 1, 0, micro, workers, DATA[name][1]) == reference[name]


@pytest.mark.parametrize("name, micro, workers", CONFIGS)
def test_two_ranks_see_the_global_batches_of_one(reference, two_ranks, name, micro, workers):
    ranks = [r[(name, micro, workers)] for r in two_ranks]
    for r in ranks:
        if isinstance(r, str):
            pytest.fail(f"configuration failed on a rank:\n{r}", pytrace=False)
    combined = [a + b for a, b in zip(*ranks, strict=True)]  # rank 0's slice, then rank 1's
    assert combined == reference[name]
    assert all(set(a).isdisjoint(b) for a, b in zip(*ranks))  # the ranks' slices differ


def test_a_loader_started_at_step_k_continues_exactly(reference):
    steps = DATA["unpacked"][1]
    assert _run("unpacked", 1, 0, 2, 2, steps[3:]) == reference["unpacked"][3:]


def test_each_epoch_is_a_permutation_of_the_split():
    stream = [d for step in _run("unpacked", 1, 0, 8, 0, list(range(74))) for d in step]
    epoch0, epoch1 = stream[:294], stream[294:588]
    assert len(set(epoch0)) == 294  # every train document once
    assert set(epoch1) == set(epoch0) and epoch1 != epoch0  # again, in another order


def test_cycle_reports_targets_and_wait():
    loader = _loader("unpacked", 1, 0, 2, 0, 0, 2)
    cycle = loader.cycle(0)
    loader.close()
    assert len(cycle.micro) == 4 and cycle.wait_s >= 0
    assert cycle.targets == sum(
        int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in cycle.micro
    )
    assert all(b["input_ids"].dtype == torch.int64 for b in cycle.micro)
