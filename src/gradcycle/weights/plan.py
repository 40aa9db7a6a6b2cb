"""The start-up plan: what each rank will allocate for the model, printed before it does.

Computed from the meta-device model's shapes and the backend's layout rules, so it costs no
memory (llama-70b: under a second after the first build):
- fsdp/hsdp: fp32 row shards of every parameter (FSDP2 keeps fp32 masters; bf16 is compute
  only), dim 0 split as torch.chunk splits it over the shard group;
- zero3: 1/W flat partitions in the parameter dtype, plus DeepSpeed's fp32 master partitions;
- zero1/zero2: full parameters in the parameter dtype plus 1/W fp32 master partitions;
- ddp: full fp32 parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradcycle import timeouts


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _rows(n: int, shards: int, index: int) -> int:
    chunk = -(-n // shards)
    return max(0, min(n, (index + 1) * chunk) - index * chunk)


def per_rank_bytes(backend: str, precision: str, model: nn.Module, world: int,
                   shard: int) -> list[tuple[int, int]]:  # fmt: skip
    """(parameter bytes, fp32 master bytes) that each rank 0..world-1 allocates."""
    shapes = [tuple(p.shape) for p in model.parameters()]
    numels = [math.prod(s) for s in shapes]
    low = {"bf16": 2, "fp16": 2}.get(precision, 4)
    if backend in ("fsdp", "hsdp"):
        by_index = [sum(_rows(s[0], shard, i) * (n // s[0]) for s, n in zip(shapes, numels)) * 4
                    for i in range(shard)]  # fmt: skip
        return [(by_index[r % shard], 0) for r in range(world)]
    if backend == "zero3":
        part = sum(-(-n // world) for n in numels)
        return [(part * low, part * 4)] * world
    if backend in ("zero1", "zero2"):
        total = sum(numels)
        return [(total * low, -(-total // world) * 4)] * world
    return [(sum(numels) * 4, 0)] * world


def _runs(values: list) -> list[tuple[int, int, object]]:
    out: list[list] = []
    for rank, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1][1] = rank
        else:
            out.append([rank, rank, v])
    return [tuple(r) for r in out]


def lines(cfg, model: nn.Module, world: int) -> list[str]:
    """The plan for `model` (the meta-device model is enough) on `world` ranks."""
    bc = cfg.backend
    shard = world
    if bc.name in ("fsdp", "hsdp"):
        from gradcycle.backends.fsdp import hsdp_nodes, mesh_shape

        nodes = hsdp_nodes() if bc.name == "hsdp" and bc.replicate is None else None
        shard = mesh_shape(bc.name, world, bc.replicate, nodes)[-1]
    n = sum(p.numel() for p in model.parameters())
    source = (f"pretrained {cfg.model.pretrained}: each rank reads only its own slices"
              if cfg.model.pretrained else
              f"random init, seed {cfg.seed}: each rank draws only its own part")  # fmt: skip
    if bc.name in ("ddp", "zero1", "zero2") and cfg.model.pretrained:
        source = f"pretrained {cfg.model.pretrained}: every rank loads the full model once"
    out = [f"start-up plan: backend={bc.name}, {n / 1e6:.2f}M parameters, {source}"]
    kinds = {"fsdp": "fp32 shards", "hsdp": "fp32 shards", "zero3": "partitions",
             "zero1": "full", "zero2": "full", "ddp": "full fp32"}  # fmt: skip
    for lo, hi, (params, master) in _runs(per_rank_bytes(bc.name, cfg.precision, model, world,
                                                         shard)):  # fmt: skip
        who = f"rank {lo}" if lo == hi else f"ranks {lo}-{hi}"
        what = f"{_gib(params)} parameters ({kinds[bc.name]})"
        if master:
            what += f" + {_gib(master)} fp32 master partition (DeepSpeed optimizer)"
        out.append(f"  {who}: {what}")
    if timeouts.supported():
        out.append(f"  collectives wait up to backend.startup_timeout_s={bc.startup_timeout_s}s "
                   f"during start-up and checkpoints, backend.dist_timeout_s={bc.dist_timeout_s}s "
                   "during steps")  # fmt: skip
    else:
        out.append(f"  torch {torch.__version__} cannot change a group's timeout: start-up and "
                   f"checkpoints are bounded by backend.dist_timeout_s={bc.dist_timeout_s}s too")  # fmt: skip
    return out
