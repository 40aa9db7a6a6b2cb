"""Random initialisation that every backend and world size draws identically, shard by shard.

HF Llama's distribution (`PreTrainedModel._init_weights`): Linear and Embedding weights
~ normal(0, initializer_range), an Embedding's padding row 0, norm weights 1, biases 0. The
values come from torch's CPU generator, seeded per block of BLOCK consecutive elements of the
full tensor from (seed, parameter name, block index). A rank draws only the blocks that overlap
its own range (`pieces.Piece`), so:
- the weights are the same bit for bit on ddp, fsdp, hsdp and zero1-3, on any world size and on
  CPU or GPU (the draw is always on the CPU, in fp32, then cast to the storage dtype);
- a rank allocates its shards plus one block (4 MiB), and draws ~1/W of the values: start-up
  time falls with the world size instead of one rank drawing the whole model.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from gradcycle.weights.pieces import Piece, pieces

BLOCK = 1 << 20  # elements per generator block (4 MiB in fp32)
_NORMS = ("RMSNorm", "LayerNorm", "GroupNorm", "BatchNorm")


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rule(piece: Piece) -> str:
    """normal | ones | zeros: what HF's _init_weights does to this parameter."""
    module, attr = piece.module, piece.attr
    if attr == "bias":
        return "zeros"
    if attr == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
        return "normal"
    if attr == "weight" and any(n in type(module).__name__ for n in _NORMS):
        return "ones"
    raise NotImplementedError(
        f"{piece.name}: no initialisation rule for {type(module).__name__}.{attr} "
        "(gradcycle initialises Llama-style models: Linear, Embedding, norms)"
    )


def fill_normal(out: torch.Tensor, seed: int, name: str, start: int, numel: int, std: float):
    """out = elements [start, start + len(out)) of the full tensor's draw (numel elements)."""
    end = start + out.numel()
    gen = torch.Generator(device="cpu")
    pos = start
    while pos < end:
        first = pos // BLOCK * BLOCK
        length = min(BLOCK, numel - first)
        gen.manual_seed(block_seed(seed, name, first // BLOCK))
        block = torch.empty(length, dtype=torch.float32).normal_(0.0, std, generator=gen)
        stop = min(end, first + length)
        out[pos - start : stop - start].copy_(block[pos - first : stop - first])
        pos = stop


def init_std(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    return getattr(config, "initializer_range", None) or 0.02


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialise this rank's part of every parameter in place (any backend's layout)."""
    std = init_std(model)
    for piece in pieces(model):
        kind = rule(piece)
        if kind != "normal":
            piece.out.fill_(1.0 if kind == "ones" else 0.0)
            continue
        numel = 1
        for d in piece.shape:
            numel *= d
        fill_normal(piece.out, seed, piece.name, piece.start, numel, std)
        pad = getattr(piece.module, "padding_idx", None)
        if isinstance(piece.module, nn.Embedding) and pad is not None:
            width = piece.shape[1]
            lo = max(pad * width, piece.start) - piece.start
            hi = min((pad + 1) * width, piece.start + piece.out.numel()) - piece.start
            if lo < hi:
                piece.out[lo:hi].zero_()


@torch.no_grad()
def recompute_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inverse frequencies) of a model built on the meta device
    and then allocated: recompute them here with the model's own init; nothing is broadcast."""
    for module in model.modules():
        transient = sorted(n for n in module._non_persistent_buffers_set
                           if module._buffers.get(n) is not None)  # fmt: skip
        if not transient:
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(
            model, "_init_weights"
        ):
            raise NotImplementedError(
                f"{type(module).__name__} has buffers {transient} outside the state dict that "
                "gradcycle cannot recompute after a meta-device build"
            )
        model._init_weights(module)  # HF: rotary tables from the config, on the CPU
