"""fp32 weights of a DeepSpeed ZeRO-1/2/3 checkpoint, one parameter at a time (for the export).

DeepSpeed's zero_to_fp32 reads the layout; every file is memory-mapped, so nothing is read until
a parameter is fetched, and a fetch assembles that parameter alone from its pieces in each rank's
fp32 partition:
- ZeRO-3: each rank's flat groups hold ceil(numel/W) elements of every parameter in turn;
  zero_to_fp32's lazy mode (GatheredTensor) gathers one parameter's pieces;
- ZeRO-1/2: a param group's flat vector is the concatenation of the ranks' partitions and each
  parameter is a range of it (with DeepSpeed's alignment padding). zero_to_fp32 concatenates the
  whole vector (a full fp32 copy), so the range is cut from the partitions here instead.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch


@contextlib.contextmanager
def _mmap_loads():
    """torch.load(mmap=True) inside: model-state files hold full stage-1/2 parameters that the
    layout parsing never needs in memory."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("mmap", True)
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


class _Range:
    """Elements [offset, offset + numel) of the concatenated per-rank partitions, as `shape`."""

    def __init__(self, parts: list[torch.Tensor], offset: int, shape):
        self.parts, self.offset, self.shape = parts, offset, torch.Size(shape)
        self.dtype = parts[0].dtype

    def contiguous(self) -> torch.Tensor:
        lo, hi = self.offset, self.offset + math.prod(self.shape)
        pieces, pos = [], 0
        for part in self.parts:
            a, b = max(lo, pos), min(hi, pos + part.numel())
            if a < b:
                pieces.append(part[a - pos : b - pos])
            pos += part.numel()
        return torch.cat(pieces).view(self.shape)


def _stage12(ds_dir: Path, z2f, parsed: tuple) -> dict:
    model_states = z2f.parse_model_states(z2f.get_model_state_files(str(ds_dir)))
    world, flat_groups = parsed[1], parsed[2]
    paddings = parsed[3] if len(parsed) > 3 else None
    first = model_states[0]
    state: dict = dict(first.buffers)
    for name, value in (getattr(first, "frozen_param_fragments", None) or {}).items():
        state[name] = value  # frozen parameters are saved whole at stages 1/2
    for g, shapes in enumerate(first.param_shapes):
        parts = [flat_groups[r][g] for r in range(world)]
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            state[name] = _Range(parts, offset, shape)
            offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
    for alias, source in first.shared_params:
        if source in state:
            state[alias] = state[source]
    return state


def load(state_dir: Path) -> dict[str, tuple]:
    """name -> (shape, dtype, fetch()) for the fp32 weights under state_dir/<tag>/."""
    from gradcycle.backends.deepspeed import import_deepspeed
    from gradcycle.safe_load import weights_only_loads

    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils import zero_to_fp32 as z2f

    tags = [p.name for p in state_dir.iterdir() if p.is_dir()]
    if len(tags) != 1:
        raise ValueError(f"{state_dir}: expected one DeepSpeed checkpoint tag dir, found {tags}")
    ds_dir = state_dir / tags[0]
    # weights_only after DeepSpeed is imported: it admits DeepSpeed's few checkpoint classes
    with weights_only_loads(), _mmap_loads(), contextlib.redirect_stdout(None):
        # (stage, world size, fp32 flat groups per rank[, alignment paddings]), memory-mapped
        parsed = z2f.parse_optim_states(z2f.get_optim_files(str(ds_dir)), str(ds_dir))
        if parsed[0] <= 2:
            state = _stage12(ds_dir, z2f, parsed)
        else:
            state = z2f.get_fp32_state_dict_from_zero_checkpoint(
                str(state_dir), tag=tags[0], lazy_mode=True
            )
    out = {}
    for name, value in state.items():
        fetch = value.contiguous if not isinstance(value, torch.Tensor) else (lambda v=value: v)
        out[name] = (tuple(value.shape), value.dtype, fetch)
    return out
