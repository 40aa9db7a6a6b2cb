"""The model's shape and the bytes per element a backend and precision store and compute in:
the inputs of every term in planner/memory.py. Pure arithmetic (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A Llama decoder's shapes; everything else (parameter counts, padding) is derived."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie: bool = False
    first: bool = True  # holds the embedding (a pipeline stage may not: planner/pipeline.py)
    last: bool = True  # holds the final norm, the output head and the loss

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_tensors(self) -> list[tuple[int, int]]:
        """(rows, columns) of every parameter of one decoder layer, as stored (out, in)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h, 1), (h, 1)]

    def root_tensors(self) -> list[tuple[int, int]]:
        """Embedding, final norm and (untied) output projection: FSDP's root unit."""
        out = [(self.vocab, self.hidden)] if self.first else []
        if not self.last:
            return out
        out.append((self.hidden, 1))
        return out if self.tie else [*out, (self.vocab, self.hidden)]

    @property
    def layer_params(self) -> int:
        return sum(r * c for r, c in self.layer_tensors())

    @property
    def fsdp_units(self) -> int:
        """FSDP units (backends/fsdp.py): embedding, layers, norm + head; tied: layers + root."""
        return self.layers + (1 if self.tie else 2)

    def fsdp_kept(self) -> list[tuple[int, int]]:
        """The unit backward starts with, gathered from its forward to its backward and not
        re-gathered: the final norm and the head (tied embeddings: the root, embedding too)."""
        return self.root_tensors() if self.tie else self.root_tensors()[1:]

    def fsdp_last(self) -> list[tuple[int, int]]:
        """The unit whose backward ends the pass: the embedding (tied: the root)."""
        return self.root_tensors() if self.tie else self.root_tensors()[:1]

    @property
    def root_params(self) -> int:
        return sum(r * c for r, c in self.root_tensors())

    @property
    def n_params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def matmul_params(self) -> int:
        """N of the FLOP count: the input embedding is a lookup unless tied to the head."""
        return self.n_params - (0 if self.tie or not self.first else self.vocab * self.hidden)

    def shard_numel(self, tensors: list[tuple[int, int]], shards: int) -> int:
        """FSDP2 pads each parameter's dim 0 to a multiple of the shard count; rank 0 holds the
        largest shard, so this is the per-GPU maximum."""
        return sum(math.ceil(r / shards) * c for r, c in tensors)

    def model_shard(self, shards: int) -> int:
        return self.layers * self.shard_numel(self.layer_tensors(), shards) + self.shard_numel(
            self.root_tensors(), shards
        )


@dataclass(frozen=True)
class Numerics:
    """Bytes per element of each kind of tensor, fixed by backend and precision."""

    param: int  # stored parameters (full or shard)
    compute: int  # matmul inputs/outputs: most activations, gathered units
    residual: int  # the residual stream between sub-blocks
    autocast: bool  # fp32 parameters cast per op (torch.autocast)
    grad: int  # gradients as accumulated
    reduce: int  # gradients as communicated


def numerics(backend: str, precision: str, reduce_dtype: str = "fp32") -> Numerics:
    half = precision in ("bf16", "fp16")
    # backend.reduce_dtype on every backend: fp32, or the 16-bit training dtype
    reduce = 2 if half and reduce_dtype != "fp32" else 4
    if backend == "ddp":  # fp32 parameters; autocast computes in 16 bits
        return Numerics(4, 2 if half else 4, 4, half, 4, reduce)
    if backend in ("fsdp", "hsdp"):  # fp32 shards; MixedPrecisionPolicy gathers 16-bit units
        c = 2 if half else 4
        return Numerics(4, c, c, False, 4, reduce)
    p = 2 if half else 4  # DeepSpeed: the module itself is cast (fp32 masters: zero.py)
    return Numerics(p, p, p, False, p, reduce)
