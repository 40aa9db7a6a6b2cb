"""The loader: global batch s is the same samples for any world size, micro-batch size and number
of DataLoader workers; a loader started at step k continues exactly; epochs roll over.

Each step's global batch is compared as the list of its samples' digests (token ids and position
ids of the positions that carry a label), in rank order: padding widths differ with the micro-batch
size, the samples must not. World 2 runs on 2 real ranks (one spawn for every configuration).
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import RAGGED, TINY, compose
from multiproc import run_on_ranks

from gradcycle.batching import plan_from_config
from gradcycle.data import IGNORE_INDEX
from gradcycle.data.loader import CycleLoader, GlobalOrder, HostBatch, MicroBatches, train_loader
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
    micro = list(cycle.micro)  # streamed: read before the loader closes
    loader.close()
    assert len(cycle.micro) == len(micro) == 4 and cycle.wait_s >= 0
    assert cycle.targets == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    assert all(b["input_ids"].dtype == torch.int64 for b in micro)


# -- streaming: the count before the batches, the workers ahead all step ---------------------------
LAYOUTS = {  # every sample kind the reader makes, masks and document starts included
    "documents": RAGGED,
    "packed": ["data.document_mask=false"],
    "packed, document mask": ["data.document_mask=true"],
    "sft documents": [
        "data=stdlib_sft",
        "data.max_documents=1500",
        "data.packing=false",
        "data.document_mask=false",
    ],  # fmt: skip
    "sft packed rows": ["data=stdlib_sft", "data.max_documents=1500"],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_layout_count_is_the_batches_count(name):
    """The cycle's target and input-token counts, taken from the samples' layouts before any batch
    is built, are exactly what the built micro-batches hold (fine-tuning masks, document starts)."""
    cfg = compose([*TINY, *LAYOUTS[name], "train.global_batch_size=8", "train.micro_batch_size=2"])
    plan = plan_from_config(cfg, 1)
    loader = train_loader(cfg, open_dataset(cfg, progress=False), plan,
                          SimpleNamespace(rank=0, world_size=1), torch.device("cpu"), start=0,
                          model=None)  # fmt: skip
    batches = loader.batches
    loader.close()
    counted = [batches.counts(s) for s in range(12)]
    built = [(sum(h.targets for h in c), sum(h.tokens for h in c))
             for c in map(batches.cycle, range(12))]  # fmt: skip
    assert counted == built
    counts = [c[0] for c in counted]
    tokens = [sum(int((h.rows[0] != batches.pad_id).sum()) for h in batches.cycle(s))
              for s in range(12)]  # fmt: skip
    if name.startswith("sft"):  # the prompts are masked: far fewer targets than tokens
        assert all(c < 0.9 * t for c, t in zip(counts, tokens, strict=True))


class _SlowBatches(MicroBatches):
    """A worker that takes 0.1 s per micro-batch and leaves a file when it is done."""

    done: Path

    def __getitem__(self, i):
        time.sleep(0.1)
        out = super().__getitem__(i)
        (self.done / str(int(i))).touch()
        return out


def test_slow_workers_keep_up_when_the_device_is_slower(tmp_path):
    """K = 8 with 2 workers x 2 prefetched: fetching the whole cycle before the first forward
    would find at most 4 of its micro-batches made. Streamed, with a device slower than the
    workers (each micro-batch's "compute" waits until the workers have made the next one),
    every micro-batch of steps 2 and 3 is made before the loop asks for it."""
    cfg = compose([*TINY, "train.global_batch_size=8", "train.micro_batch_size=1"])
    data = open_dataset(cfg, progress=False)
    samples = data.samples("train", cfg.data)
    batches = _SlowBatches(samples, GlobalOrder(len(samples), 0), 8, 0, 1, 1, data.pad_id)
    batches.done = tmp_path
    data_cfg = SimpleNamespace(num_workers=2, prefetch_factor=2, document_mask=False)
    loader = CycleLoader(batches, torch.device("cpu"), 0, 3, data_cfg)
    ready, handed = [], [0]  # made before asked for, per step; micro-batches handed out
    real = loader._it

    class Watch:  # what the loop asks the workers' stream for, and whether it was made
        def __next__(self):
            made = set(os.listdir(tmp_path))
            item = next(real)
            if isinstance(item, HostBatch):
                ready[-1] += str(handed[0]) in made
                handed[0] += 1
            return item

    loader._it = Watch()
    try:
        for step in range(3):
            ready.append(0)
            for _ in loader.cycle(step).micro:  # the device: done when the next one is made
                deadline = time.monotonic() + 60
                while str(handed[0]) not in os.listdir(tmp_path) and handed[0] < 24:
                    assert time.monotonic() < deadline, "the workers stopped"
                    time.sleep(0.01)
    finally:
        loader.close()
    assert ready[1:] == [8, 8], ready
