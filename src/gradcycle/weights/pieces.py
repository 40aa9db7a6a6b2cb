"""What this rank holds of each parameter, as one flat range of the full (row-major) tensor.

- a plain tensor (ddp, zero1/2, one process): the whole tensor, range [0, numel);
- an FSDP2/HSDP DTensor sharded on dim 0: its rows [r0, r1), range [r0 * inner, r1 * inner);
- a ZeRO-3 parameter: its flat partition [rank * P, rank * P + P) of the padded tensor, cut at
  numel (the padding is never written).

Initialisation and pretrained loading fill `Piece.out` and never see a full tensor unless the
rank holds one anyway. ZeRO-3 configurations whose partitions are not plain local tensors
(NVMe offload, ZeRO++ secondary partitions) fall back to gathering one parameter at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Piece:
    name: str  # the parameter's name in the plain model (a tied weight: its first name)
    aliases: tuple[str, ...]  # every name the parameter has (tied weights have several)
    module: nn.Module  # the module that owns it under `name`
    attr: str  # its attribute name in `module` ("weight", "bias")
    shape: tuple[int, ...]  # the full shape
    start: int  # flat offset of `out` in the full tensor
    out: torch.Tensor  # 1-D view of the storage to write: exactly this rank's elements


def row_shard(shape, placements, sizes, coords) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of a tensor sharded on dim 0 (FSDP2's Shard(0)) and
    replicated elsewhere, split as torch.chunk splits it; for a torch without DTensor's own."""
    from torch.distributed.tensor import Replicate, Shard

    lo, size = 0, shape[0]
    for placement, n, i in zip(placements, sizes, coords, strict=True):
        if isinstance(placement, Shard) and placement.dim == 0:
            chunk = -(-size // n)
            lo, size = lo + min(i * chunk, size), max(0, min(chunk, size - i * chunk))
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(f"placement {placement}: gradcycle fills row shards only")
    return (size, *shape[1:]), (lo, *[0] * (len(shape) - 1))


def _shape_and_offset(param) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        mesh = param.device_mesh
        sizes = [mesh.size(d) for d in range(mesh.ndim)]
        return row_shard(tuple(param.shape), param.placements, sizes, mesh.get_coordinate())
    return compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)


def _dtensor_range(param) -> tuple[int, torch.Tensor]:
    local = param._local_tensor
    shape, offset = _shape_and_offset(param)
    if local.numel() == 0:
        return 0, local.reshape(-1)
    rows_only = tuple(shape[1:]) == tuple(param.shape[1:]) and not any(offset[1:])
    assert rows_only and tuple(local.shape) == tuple(shape), (param.placements, shape, offset)
    return offset[0] * math.prod(param.shape[1:]), local.view(-1)


def _zero3_direct(param) -> bool:
    """The partition is a plain local tensor that ZeRO-3 reads as is after initialize()."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    part = param.ds_tensor
    on_nvme = getattr(part, "final_location", None) == OffloadDeviceEnum.nvme
    return not on_nvme and getattr(param, "ds_secondary_tensor", None) is None


def _zero3_range(param) -> tuple[int, torch.Tensor]:
    import torch.distributed as dist

    part = param.ds_tensor
    size = part.ds_numel  # elements per rank, the same on every rank (the tensor is padded)
    start = dist.get_rank(group=param.ds_process_group) * size
    valid = max(0, min(size, param.ds_numel - start))
    return start, part.narrow(0, 0, valid)


def pieces(model: nn.Module) -> Iterator[Piece]:
    """Every parameter once (tied weights once), with this rank's flat range of it."""
    from torch.distributed.tensor import DTensor

    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name, param in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        shape = tuple(getattr(param, "ds_shape", None) or param.shape)
        aliases = tuple(names[id(param)])
        with torch.no_grad():
            if isinstance(param, DTensor):
                start, out = _dtensor_range(param)
            elif hasattr(param, "ds_id"):
                if not _zero3_direct(param):
                    yield from _gathered(param, name, aliases, module, attr, shape)
                    continue
                start, out = _zero3_range(param)
            else:
                assert param.device.type != "meta", f"{name} is on the meta device"
                start, out = 0, param.detach().view(-1)
        yield Piece(name, aliases, module, attr, shape, start, out)


def _gathered(param, name, aliases, module, attr, shape) -> Iterator[Piece]:
    """ZeRO-3 partitions this rank cannot write in place: gather the parameter, let every rank
    fill it the same way, and let ZeRO repartition it from rank 0's copy."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        yield Piece(name, aliases, module, attr, shape, 0, param.data.view(-1))
