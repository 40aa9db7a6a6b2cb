"""Global batch s -> this rank's K micro-batches, fetched ahead by DataLoader workers.

Sample order is one permutation per epoch, seeded by (seed, epoch) and stored once as `.npy` in
the cache (written under a file lock by whichever process needs it first, then memory-mapped by
all ranks and workers). Global batch s is stream positions [s*G, (s+1)*G); rank r takes its
contiguous slice of G/W samples and cuts it into K micro-batches of b. So the samples of a global
batch depend only on (seed, data, G): 1 rank with micro 8 and 8 ranks with micro 1 see the same,
and the resumable data position is the step number alone.

Micro-batch i of a rank (step i // K, micro i % K) is a pure function of i, so the order cannot
depend on data.num_workers: the DataLoader only computes them ahead. They travel as int32 (pinned
on CUDA) and are widened to int64 on the device after a non-blocking copy.

Streaming: the workers' stream is, per step, the cycle's target count and then its K
micro-batches. The count comes from the samples' layout (length, document starts, loss mask:
no tokens read, no batch built), so the loop knows N before the first forward, and takes each
micro-batch only when the previous one has been handed to the device: the workers keep
computing ahead during the whole step, whatever K, with at most num_workers x prefetch_factor
items in flight (host memory bounded; one micro-batch at a time on the device).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from gradcycle.data import IGNORE_INDEX
from gradcycle.data.masking import document_ids, row_inputs


class GlobalOrder:
    """Stream position p -> sample index: the permutation of epoch p // n at p % n."""

    def __init__(self, n: int, seed: int, store: Path | None = None):
        self.n, self.seed, self.store = n, seed, store
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        make = lambda: np.random.default_rng([self.seed, epoch]).permutation(self.n)  # noqa: E731
        if self.store is None:
            return make()
        path = self.store / f"perm-n{self.n}-seed{self.seed}-epoch{epoch}.npy"
        if not path.is_file():
            self.store.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"):  # one writer per (shared) cache
                if not path.is_file():
                    dtype = np.uint32 if self.n < 2**32 else np.uint64
                    tmp = path.with_name(f".tmp-{path.name}")
                    np.save(tmp, make().astype(dtype))
                    tmp.replace(path)
        return np.load(path, mmap_mode="r")

    def indices(self, start: int, count: int) -> np.ndarray:
        epochs, at = np.divmod(np.arange(start, start + count, dtype=np.int64), self.n)
        out = np.empty(count, np.int64)
        for epoch in np.unique(epochs):
            if epoch != self._epoch:
                self._epoch, self._perm = int(epoch), self._permutation(int(epoch))
            here = epochs == epoch
            out[here] = self._perm[at[here]]
        return out


ROWS = ("input_ids", "labels", "position_ids")  # stacked in one int32 array on the host


class HostBatch:
    """One micro-batch on the host, as a worker sends it.

    rows      int32 (3, b, width): input ids, labels, position ids (one array: one transfer from
              the worker, one copy to the device); numpy until pinned, so the worker pickles it
              through the pipe instead of a shared-memory handshake per tensor
    targets   its target count: labels after the first position that are not -100
    tokens    its input tokens (padding excluded): what the model computes on, for tokens/s and MFU
    """

    __slots__ = ("rows", "targets", "tokens")

    def __init__(self, rows, targets: int, tokens: int = 0):
        self.rows, self.targets, self.tokens = rows, targets, tokens

    def pin_memory(self) -> HostBatch:  # called by DataLoader's pin-memory thread (CUDA)
        return HostBatch(torch.as_tensor(self.rows).pin_memory(), self.targets, self.tokens)


def collate(samples: list, pad_id: int, document_mask: bool = False) -> HostBatch:
    """Rows right-padded to the longest, labels -100 on padding (and, for fine-tuning samples
    (tokens, starts, mask), where the mask is 0: the prompt).

    No padding mask is needed: with right padding and causal attention no real token attends to
    padding, and padded positions carry no loss.
    """
    width = max(len(sample[0]) for sample in samples)
    rows = np.empty((3, len(samples), width), np.int32)
    rows[0], rows[1], rows[2] = pad_id, IGNORE_INDEX, np.arange(width, dtype=np.int32)
    for row, (tokens, starts, *mask) in enumerate(samples):
        n = len(tokens)
        rows[0, row, :n] = tokens
        labels, rows[2, row, :n] = row_inputs(tokens, starts, document_mask)
        if mask:  # fine-tuning data: only the answer's tokens are targets (labels are unshifted)
            labels[mask[0] == 0] = IGNORE_INDEX
        rows[1, row, :n] = labels
    targets = int((rows[1, :, 1:] != IGNORE_INDEX).sum())
    return HostBatch(rows, targets, tokens=sum(len(sample[0]) for sample in samples))


def sample_targets(length: int, starts, mask, document_mask: bool) -> int:
    """The targets collate() gives one sample, from its layout alone: positions 1..length-1,
    less document starts under document masking, less mask-0 (prompt) positions."""
    if length < 2:
        return 0
    if mask is None and not (document_mask and starts is not None and len(starts)):
        return length - 1
    keep = np.ones(length, bool)
    keep[0] = False
    if document_mask and starts is not None:
        keep[np.asarray(starts, np.int64)] = False
    if mask is not None:
        keep &= np.asarray(mask[:length]) != 0
    return int(keep.sum())


def _worker_context():
    """fork on Linux: a worker starts in milliseconds and needs nothing re-imported (spawn or
    forkserver, the default where a launcher set it or from Python 3.14, re-import torch and the
    main module per worker: seconds). Workers only read memory-mapped files, never CUDA."""
    import multiprocessing

    return multiprocessing.get_context("fork") if sys.platform == "linux" else None


def _as_is(item):  # DataLoader's default would turn the numpy arrays into shared-memory tensors
    return item


class MicroBatches(torch.utils.data.Dataset):
    """Item i: micro-batch i % K of global batch i // K for one rank (what workers compute)."""

    def __init__(self, samples, order: GlobalOrder, global_batch: int, rank: int, world: int,
                 micro: int, pad_id: int, document_mask: bool = False):  # fmt: skip
        assert global_batch % (world * micro) == 0, (global_batch, world, micro)
        self.samples, self.order, self.global_batch = samples, order, global_batch
        self.rank, self.world, self.micro, self.pad_id = rank, world, micro, pad_id
        self.document_mask = document_mask
        self.per_rank = global_batch // world
        self.k = self.per_rank // micro

    def indices(self, step: int, k: int) -> np.ndarray:
        start = step * self.global_batch + self.rank * self.per_rank + k * self.micro
        return self.order.indices(start, self.micro)

    def __getitem__(self, i: int) -> HostBatch:
        step, k = divmod(int(i), self.k)
        rows = [self.samples[j] for j in self.indices(step, k)]
        return collate(rows, self.pad_id, self.document_mask)

    def cycle(self, step: int) -> list[HostBatch]:
        """This rank's K micro-batches of global batch `step`, in this process (host tensors)."""
        return [self[step * self.k + k] for k in range(self.k)]

    def counts(self, step: int) -> tuple[int, int]:
        """(target tokens, input tokens) of this rank's K micro-batches of `step`, from the
        samples' layouts alone."""
        targets = tokens = 0
        for k in range(self.k):
            for j in self.indices(step, k):
                length, starts, mask = self.samples.layout(j)
                targets += sample_targets(length, starts, mask, self.document_mask)
                tokens += length
        return targets, tokens


class _Stream(torch.utils.data.Dataset):
    """What the workers compute, in order: item i of step i // (K+1) is its (target, input)
    token counts (i % (K+1) == 0), then its K micro-batches."""

    def __init__(self, batches: MicroBatches):
        self.batches, self.width = batches, batches.k + 1

    def __getitem__(self, i: int):
        step, j = divmod(int(i), self.width)
        if j == 0:
            return self.batches.counts(step)
        return self.batches[step * self.batches.k + j - 1]


class Micro:
    """One cycle's K micro-batches on the device, fetched one at a time as the loop asks for them
    (iterate once, in full, before the next cycle)."""

    def __init__(self, loader: CycleLoader, k: int, targets: int, wait_s: float):
        self.loader, self.k, self.targets, self.wait_s = loader, k, targets, wait_s
        self.taken = 0

    def __len__(self) -> int:
        return self.k

    def __iter__(self):
        assert self.taken == 0, "a cycle's micro-batches are read once"
        counted = 0
        for _ in range(self.k):
            t0 = time.perf_counter()
            host = next(self.loader._it)
            batch = self.loader.to_device(host)
            self.wait_s += time.perf_counter() - t0
            self.taken += 1
            counted += host.targets
            yield batch
        assert counted == self.targets, ("layout count and batches disagree", self.targets, counted)


@dataclass
class Cycle:
    micro: Micro  # K micro-batches, each moved to the device as the loop reaches it
    targets: int  # target tokens of the K micro-batches (this rank), known before the first
    tokens: int  # input tokens of the K micro-batches (this rank, padding excluded), likewise

    @property
    def wait_s(self) -> float:  # how long the loop waited for the count and the micro-batches
        return self.micro.wait_s


def to_device(host: HostBatch, device: torch.device, document_mask: bool = False) -> dict:
    """Host micro-batch -> the model's batch: a non-blocking copy, widened to int64 on the device."""
    rows = torch.as_tensor(host.rows).to(device, non_blocking=True).long()
    batch = dict(zip(ROWS, rows.unbind(0)))
    if document_mask:  # the mask itself is built just before the forward (data/masking.py)
        batch["document_ids"] = document_ids(batch["position_ids"])
    return batch


class CycleLoader:
    """The training loop's data: `cycle(step)` -> this rank's K micro-batches of global batch
    `step`, steps consumed in order from `start`. Workers compute ahead (data.num_workers,
    data.prefetch_factor items each: a cycle's count or one micro-batch); 0 workers computes
    them in the loop's process."""

    def __init__(self, batches: MicroBatches, device: torch.device, start: int, stop: int,
                 data_cfg):  # fmt: skip
        self.batches, self.device, self.next_step = batches, device, start
        self.document_mask = data_cfg.document_mask
        self._open: Micro | None = None
        workers, width = data_cfg.num_workers, batches.k + 1
        self.loader = torch.utils.data.DataLoader(
            _Stream(batches), batch_size=None, sampler=range(start * width, stop * width),
            num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=data_cfg.prefetch_factor if workers else None,
            persistent_workers=workers > 0, collate_fn=_as_is,
            multiprocessing_context=_worker_context() if workers else None,
        )  # fmt: skip
        self._it = iter(self.loader)

    def to_device(self, host: HostBatch) -> dict:
        return to_device(host, self.device, self.document_mask)

    def cycle(self, step: int) -> Cycle:
        """The count now (computed ahead by a worker); the micro-batches as they are iterated."""
        assert step == self.next_step, f"the loader is at step {self.next_step}, asked for {step}"
        assert self._open is None or self._open.taken == self._open.k, "previous cycle unread"
        t0 = time.perf_counter()
        targets, tokens = next(self._it)
        self._open = Micro(self, self.batches.k, targets, time.perf_counter() - t0)
        self.next_step += 1
        return Cycle(self._open, targets, tokens)

    def close(self) -> None:
        self._it = None  # the iterator's finaliser stops the workers
        self.loader = None


def eval_batches(samples, micro: int, n_batches: int, rank: int, world: int, pad_id: int,
                 document_mask: bool = False):  # fmt: skip
    """n_batches micro-batches per rank from the validation split, the same count on every rank.

    Equal counts matter: sharded backends run collectives inside forward, so a rank with one
    batch fewer would leave the others waiting. The eval samples are spread evenly over the split
    (not its first ones, which may all come from one document); small splits wrap around.
    """
    n, total = len(samples), n_batches * world * micro
    pick = (lambda p: p * n // total) if total <= n else (lambda p: p % n)  # noqa: E731
    for b in range(n_batches):
        start = (b * world + rank) * micro
        rows = [samples[pick(start + j)] for j in range(micro)]
        yield collate(rows, pad_id, document_mask)


def train_loader(cfg, data, plan, env, device: torch.device, start: int, model) -> CycleLoader:
    """The trainer's loader: global batches of `data`'s train split from step `start` on."""
    from gradcycle.data.sources import cache_root

    samples = data.samples("train", cfg.data)
    order = GlobalOrder(len(samples), cfg.seed, cache_root(cfg.data) / "order")
    batches = MicroBatches(samples, order, plan.global_batch_size, env.rank, env.world_size,
                           plan.micro_batch_size, data.pad_id, cfg.data.document_mask)  # fmt: skip
    return CycleLoader(batches, device, start, cfg.train.max_steps, cfg.data)
