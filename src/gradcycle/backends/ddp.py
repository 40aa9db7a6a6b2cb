"""DDP (and plain single-process training when the world is 1).

Accumulation boundary: every non-last micro-batch runs forward AND backward inside `no_sync()`, so
the bucketed all-reduce runs once per cycle. `no_sync` around backward alone saves nothing: DDP
prepares the reducer in forward. This costs no memory (DDP's gradient buckets exist anyway), so it
is also what `sync=auto` picks.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcycle.backends.base import SyncPlan, TorchBackend


class DDPBackend(TorchBackend):
    name = "ddp"

    def __init__(self, cfg, make_model, device: torch.device, world: int):
        self.sync = "per_micro" if cfg.backend.sync == "per_micro" else "per_cycle"
        module = make_model("cpu")
        if device.type != "cpu":  # (a fake module, gradcycle.sim, cannot move onto itself)
            module = module.to(device)
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
            model.register_comm_hook(None, default_hooks.allreduce_hook)
        super().__init__(cfg, model, module, device, world)

    def _sync_context(self, last: bool):
        if self.world > 1 and self.sync == "per_cycle" and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def sync_plan(self, k: int) -> SyncPlan:
        n = 1 if self.sync == "per_cycle" else k
        return SyncPlan(
            policy=self.sync,
            rows=[("gradient all-reduce (all buckets)", f"{n}x per cycle")],
            extra_memory="none (DDP keeps full gradients anyway)",
        )
