"""DDP (and plain single-process training when the world is 1).

Accumulation boundary: every non-last micro-batch runs forward AND backward inside `no_sync()`, so
the bucketed all-reduce runs once per cycle. `no_sync` around backward alone saves nothing: DDP
prepares the reducer in forward. This costs no memory (DDP's gradient buckets exist anyway), so it
is also what `sync=auto` picks.

Gradients are views into DDP's buckets (`gradient_as_bucket_view=True`) from the start and are
zeroed, not freed, after each step: one fp32 gradient per parameter, never a second copy beside
the buckets, and no copy between them. The C++ reducer calls no Python per bucket; the step's
all-reduces are recorded from the bucket layout after each synchronising backward (`Buckets`).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcycle.backends.base import SyncPlan, TorchBackend


def comm_hook(reduce_dtype: str):
    """DDP's parameters (so its gradient buckets) are fp32 under every precision (autocast
    computes in 16 bits): bf16/fp16 casts each bucket for the all-reduce and back (half the
    bytes). torch's own bf16_compress_hook does the same but refuses anything but NCCL by its
    name, so the CPU tests could not run it."""
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
        model, self.buckets = module, None
        if world > 1:
            # Gradients that exist when DDP builds its buckets become views into them at once:
            # without this the first cycle's no_sync backwards would allocate a second gradient.
            for p in module.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            model = DDP(
                module,
                device_ids=[device.index] if device.type == "cuda" else None,
                # Rotary tables are recomputed identically on each rank: no per-forward broadcast.
                **_no_forward_buffer_sync(),
                gradient_as_bucket_view=True,
            )
            # Zeroed in place after a step: freeing the views would not free the buckets.
            self.grads_to_none = False
            # fp32 stays in the C++ reducer (no Python per bucket; recorded from the buckets).
            # 16-bit reduction goes through a Python hook, whose all_reduce the counter sees.
            if cfg.backend.reduce_dtype != "fp32":
                model.register_comm_hook(None, comm_hook(cfg.backend.reduce_dtype))
            else:
                self.buckets = Buckets(model)
        super().__init__(cfg, model, module, device, world)

    def _syncs(self, last: bool) -> bool:
        return self.world > 1 and (self.sync == "per_micro" or last)

    def _sync_context(self, last: bool):
        if self.world > 1 and not self._syncs(last):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def forward_backward(self, batch: dict, loss_fn, last: bool) -> torch.Tensor:
        loss = super().forward_backward(batch, loss_fn, last)
        if self.buckets is not None and self._syncs(last):  # the reducer reduced each bucket
            self.comm.record("all_reduce", *self.buckets.sizes())
        return loss

    def sync_plan(self, k: int) -> SyncPlan:
        n = 1 if self.sync == "per_cycle" else k
        # the buckets themselves are fp32; backend.reduce_dtype is what travels
        count = f"{n}x per cycle, in {self.cfg.backend.reduce_dtype} (backend.reduce_dtype)"
        return SyncPlan(
            policy=self.sync,
            rows=[("gradient all-reduce (all buckets)", count)],
            extra_memory="none (DDP keeps full gradients anyway)",
        )


class Buckets:
    """(total bytes, all-reduce calls) of one synchronising backward: DDP's buckets, read from
    the gradients, which are views into them (one storage per bucket). The layout changes once,
    when DDP rebuilds its buckets in the order gradients became ready (in the forward after the
    first synchronising backward); after that it is cached and recording costs nothing."""

    def __init__(self, ddp: DDP):
        self.ddp, self._final = ddp, None

    def sizes(self) -> tuple[int, int]:
        if self._final is not None:
            return self._final
        storages = {}
        for p in self.ddp.module.parameters():
            if p.grad is not None:
                s = p.grad.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        found = (sum(storages.values()), len(storages))
        if getattr(self.ddp, "_has_rebuilt_buckets", False):  # torch without it: read each time
            self._final = found
        return found


def _no_forward_buffer_sync() -> dict:
    """torch 2.13 deprecates `broadcast_buffers` (a FutureWarning) for `forward_sync_buffers`;
    2.11 has only the old name. The new one still broadcasts buffers once at init: harmless for
    buffers that are equal on every rank anyway."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
