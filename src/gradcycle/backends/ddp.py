"""DDP (and plain single-process training when the world is 1).

Accumulation boundary: every non-last micro-batch runs forward AND backward inside `no_sync()`, so
the bucketed all-reduce runs once per cycle. `no_sync` around backward alone saves nothing: DDP
prepares the reducer in forward. This costs no memory (DDP's gradient buckets exist anyway), so it
is also what `sync=auto` picks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcycle.backends.base import SyncPlan, TorchBackend


def comm_hook(reduce_dtype: str):
    """DDP's parameters (so its gradient buckets) are fp32 under every precision (autocast
    computes in 16 bits): fp32 all-reduces the buckets as they are; bf16/fp16 casts each bucket
    for the all-reduce and back (half the bytes). torch's own bf16_compress_hook does the same but
    refuses anything but NCCL by its name, so the CPU tests could not run it."""
    if reduce_dtype == "fp32":
        return default_hooks.allreduce_hook
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[reduce_dtype]

    def reduce_in_16_bits(process_group, bucket):
        group = process_group if process_group is not None else dist.group.WORLD
        buffer = bucket.buffer()
        sent = buffer.to(dtype).div_(group.size())  # divide first: fp16 would overflow the sum

        def back(fut):
            return buffer.copy_(fut.value()[0])

        return dist.all_reduce(sent, group=group, async_op=True).get_future().then(back)

    return reduce_in_16_bits


class DDPBackend(TorchBackend):
    name = "ddp"

    def __init__(self, cfg, make_model, device: torch.device, world: int):
        self.sync = "per_micro" if cfg.backend.sync == "per_micro" else "per_cycle"
        module = make_model(device)  # built on meta, allocated and drawn on the device itself
        model = module
        if world > 1:
            model = DDP(
                module,
                device_ids=[device.index] if device.type == "cuda" else None,
                # Rotary tables are recomputed identically on each rank: no per-forward broadcast.
                broadcast_buffers=False,
            )
            # Same arithmetic as DDP's built-in reducer, but through torch.distributed.all_reduce
            # in Python, where the collective counter sees it (the C++ reducer bypasses Python).
            model.register_comm_hook(None, comm_hook(cfg.backend.reduce_dtype))
        super().__init__(cfg, model, module, device, world)

    def _sync_context(self, last: bool):
        if self.world > 1 and self.sync == "per_cycle" and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def sync_plan(self, k: int) -> SyncPlan:
        n = 1 if self.sync == "per_cycle" else k
        # the buckets themselves are fp32; backend.reduce_dtype is what travels
        count = f"{n}x per cycle, in {self.cfg.backend.reduce_dtype} (backend.reduce_dtype)"
        return SyncPlan(
            policy=self.sync,
            rows=[("gradient all-reduce (all buckets)", count)],
            extra_memory="none (DDP keeps full gradients anyway)",
        )
