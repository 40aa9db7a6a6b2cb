"""Global batch s -> this rank's K micro-batches of images: the text loader's order and workers.

`ImageMicroBatches` is the text `MicroBatches` with images in place of token rows: item i is
micro-batch i % K of global batch i // K, a pure function of i (so of nothing the world size or
the worker count changes). A micro-batch's target count is its sample count: the trainer's
cycle-wide normaliser N is then the number of images of the whole cycle on all ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from gradcycle.data.loader import CycleLoader, GlobalOrder, MicroBatches
from gradcycle.vision.processor import channel_stats, to_pixels


class HostImages:
    """One micro-batch on the host: float32 pixels [b, 3, S, S] and int64 labels."""

    __slots__ = ("pixels", "labels", "targets", "tokens")

    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels
        self.targets = self.tokens = len(labels)  # the loss's N counts images

    def pin_memory(self) -> HostImages:  # DataLoader's pin-memory thread (CUDA)
        return HostImages(torch.as_tensor(self.pixels).pin_memory(),
                          torch.as_tensor(self.labels).pin_memory())  # fmt: skip


def collate_images(split, indices, positions, image_cfg, processor, seed: int | None) -> HostImages:
    """`seed` set: the train augmentation, drawn from (seed, stream position) per sample."""
    mean, std = channel_stats(processor)
    pixels = np.empty((len(indices), 3, image_cfg.size, image_cfg.size), np.float32)
    labels = np.empty(len(indices), np.int64)
    for row, (j, p) in enumerate(zip(indices, positions)):
        array, labels[row] = split[int(j)]
        rng = np.random.default_rng([seed, int(p)]) if seed is not None else None
        pixels[row] = to_pixels(array, image_cfg.size, mean, std, rng, image_cfg.crop_scale)
    return HostImages(pixels, labels)


class ImageMicroBatches(MicroBatches):
    def __init__(self, split, order: GlobalOrder, global_batch: int, rank: int, world: int,
                 micro: int, image_cfg, processor, seed: int):  # fmt: skip
        super().__init__(split, order, global_batch, rank, world, micro, pad_id=0)
        self.image_cfg, self.processor = image_cfg, processor
        self.seed = seed if image_cfg.augment else None

    def __getitem__(self, i: int) -> HostImages:
        step, k = divmod(int(i), self.k)
        start = step * self.global_batch + self.rank * self.per_rank + k * self.micro
        positions = np.arange(start, start + self.micro)
        return collate_images(self.samples, self.indices(step, k), positions, self.image_cfg,
                              self.processor, self.seed)  # fmt: skip

    def counts(self, step: int) -> tuple[int, int]:
        """(targets, inputs) of the cycle before any image is decoded: one per image."""
        return self.per_rank, self.per_rank


def to_device(host: HostImages, device: torch.device) -> dict:
    return {
        "pixel_values": torch.as_tensor(host.pixels).to(device, non_blocking=True),
        "labels": torch.as_tensor(host.labels).to(device, non_blocking=True),
    }


class ImageCycleLoader(CycleLoader):
    def to_device(self, host: HostImages) -> dict:
        return to_device(host, self.device)


def train_loader(cfg, data, plan, env, device: torch.device, start: int, model=None):
    """The trainer's loader for task=image (same signature as gradcycle.data.loader's)."""
    from gradcycle.data.sources import cache_root

    order = GlobalOrder(len(data.train), cfg.seed, cache_root(cfg.data) / "order")
    batches = ImageMicroBatches(data.train, order, plan.global_batch_size, env.rank,
                                env.world_size, plan.micro_batch_size, cfg.data.image,
                                data.tokenizer, cfg.seed)  # fmt: skip
    return ImageCycleLoader(batches, device, start, cfg.train.max_steps, cfg.data)


def eval_batches(data, image_cfg, micro: int, n_batches: int, rank: int, world: int):
    """n_batches micro-batches per rank, spread evenly over the val split (the text rule: equal
    counts on every rank, small splits wrap around); no augmentation."""
    split = data.val
    n, total = len(split), n_batches * world * micro
    for b in range(n_batches):
        start = (b * world + rank) * micro
        picks = [(start + j) * n // total if total <= n else (start + j) % n for j in range(micro)]
        yield collate_images(split, picks, picks, image_cfg, data.tokenizer, seed=None)
