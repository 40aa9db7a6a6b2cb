"""Memory at high resolution: activations per image vs resolution, and micro_batch_size=auto.

Activations are measured, not modelled: one forward of the meta-device model (nothing is
allocated, a ViT-H at 1024x1024 takes a second) at batch 2 and 4 under
`torch.autograd.graph.saved_tensors_hooks`, counting the bytes of every tensor autograd saves
for backward (parameters and their views excluded); half the difference is the bytes per image, and
block hooks split it per block. Activation checkpointing keeps a checkpointed block's input
instead of its saved tensors, and recomputes one block at a time in backward. Attention is
counted as a fused kernel keeps it (no [heads, s, s] score matrix: sdpa on GPU).

    peak = model states (parameters, gradients, AdamW; per backend, below)
         + micro x activations per image (+ one recomputed block under checkpointing)

Model states per rank, P parameters, W ranks, p = bytes of a stored parameter (2 under
bf16/fp16 on zero*, else 4), AdamW's two fp32 moments 8 B, fp32 masters m = 4 where p = 2:
  ddp         (4 + 4 + 8) P
  zero1       (p + p) P + (m + 8) P / W
  zero2       p P + (p + m + 8) P / W
  zero3       (2p + m + 8) P / W  + 2 p x the largest block (gathered)
  fsdp/hsdp   16 P / W + 2 x 4 x the largest block (per_micro); + 8 P (per_cycle: unsharded)

`python -m gradcycle.vision.plan <overrides>` prints the table for every micro-batch size.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

GIB = 2**30


def _dtype(cfg) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)


def _meta_model(cfg, labels: int | None = None) -> nn.Module:
    from gradcycle.vision.model import build_model

    labels = labels or cfg.data.image.num_classes
    return build_model(cfg.model, labels, "meta", dtype=_dtype(cfg), image_size=cfg.data.image.size)


def _saved(model: nn.Module, blocks, x: torch.Tensor, params: set) -> tuple[int, list, list]:
    """(bytes autograd saves, per block, block input bytes) for one meta forward of `x`."""
    seen: dict[int, torch.Tensor] = {}  # holds them: a freed storage's address is reused
    total, marks, inputs = [0], [], []

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in seen and key not in params:
            seen[key] = t
            total[0] += t.untyped_storage().nbytes()
        return t

    def enter(module, args):  # returns None: the block's input stays as it is
        marks.append(total[0])
        inputs.append(args[0].nbytes)

    def fused_sdpa(q, k, v, *args, **kwargs):
        """What a fused kernel saves (q, k, v, out; no [heads, s, s] scores)."""
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        for t in (q, k, v, out):
            pack(t)
        return out + 0 * (q.sum() + k.sum() + v.sum())  # keeps the graph connected

    hooks = []
    for block in blocks:
        hooks.append(block.register_forward_pre_hook(enter))
        hooks.append(block.register_forward_hook(lambda m, a, o: marks.append(total[0])))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(pixel_values=x).logits.float().sum()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return total[0], [marks[2 * i + 1] - marks[2 * i] for i in range(len(blocks))], inputs


def activation_bytes(cfg, size: int | None = None) -> dict:
    """{per_image, blocks (per image, list), block_inputs (per image, list)} at `size` pixels."""
    from gradcycle.vision.model import vision_blocks

    model = _meta_model(cfg)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    size = size or cfg.data.image.size
    blocks = vision_blocks(model) or []
    # batch 2 and 4 (BatchNorm trains on 2 samples or more): half the difference is per image
    (t1, b1, i1), (t2, b2, i2) = (
        _saved(model, blocks, torch.empty(n, 3, size, size, device="meta", dtype=_dtype(cfg)),
               params)
        for n in (2, 4)
    )  # fmt: skip
    return {"per_image": (t2 - t1) // 2, "blocks": [(y - x) // 2 for x, y in zip(b1, b2)],
            "block_inputs": [(y - x) // 2 for x, y in zip(i1, i2)]}  # fmt: skip


def _activation_peak(act: dict, micro: int, mode: str, every: int) -> float:
    from gradcycle.model import checkpointed_layers

    chosen = checkpointed_layers(len(act["blocks"]), mode, every)
    saved = act["per_image"] - sum(act["blocks"][i] - act["block_inputs"][i] for i in chosen)
    recompute = max((act["blocks"][i] for i in chosen), default=0)
    return micro * (saved + recompute)


def model_state_bytes(cfg, model: nn.Module, world: int) -> float:
    from gradcycle.vision.model import vision_blocks

    n = sum(p.numel() for p in model.parameters())
    blocks = vision_blocks(model) or [model]
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    name, low = cfg.backend.name, cfg.precision in ("bf16", "fp16")
    p, m = (2, 4) if low else (4, 0)
    if name == "ddp":
        return 16.0 * n
    if name == "zero1":
        return 2 * p * n + (m + 8) * n / world
    if name == "zero2":
        return p * n + (p + m + 8) * n / world
    if name == "zero3":
        return (2 * p + m + 8) * n / world + 2 * p * largest
    per_cycle = cfg.backend.sync == "per_cycle" and world > 1
    return 16.0 * n / world + (8.0 * n if per_cycle else 8.0 * largest)


def budget(cfg) -> float:
    hw = cfg.hardware
    if hw.memory_gb is None:
        raise ValueError(f"hardware={hw.name} sets no memory_gb: the image planner needs the "
                         "device's memory (e.g. hardware=a100-40gb)")  # fmt: skip
    return (hw.memory_gb - (hw.reserved_gb or 0.0)) * GIB * cfg.plan.headroom


def _per_rank(cfg, world: int) -> int | None:
    t = cfg.train
    return t.global_batch_size // world if t.global_batch_size else None


def table(cfg, world: int) -> list[dict]:
    """One row per micro-batch size that divides this rank's share of the global batch."""
    model = _meta_model(cfg)
    act = activation_bytes(cfg)
    states = model_state_bytes(cfg, model, world)
    ac = cfg.activation_checkpointing
    per_rank = _per_rank(cfg, world) or 64
    rows = []
    for micro in (d for d in range(1, per_rank + 1) if per_rank % d == 0):
        acts = _activation_peak(act, micro, ac.mode, ac.every)
        rows.append({"micro": micro, "k": per_rank // micro, "states": states,
                     "activations": acts, "peak": states + acts})  # fmt: skip
    return rows


def resolve_auto(cfg, world: int):
    """train.micro_batch_size=auto -> the largest micro-batch whose predicted peak fits (the
    global batch kept, K follows); then the BatchNorm guard for it."""
    if cfg.train.micro_batch_size != "auto":
        return cfg
    if not cfg.train.global_batch_size:
        raise ValueError("train.micro_batch_size=auto needs train.global_batch_size (the "
                         "planner keeps the global batch and derives K)")  # fmt: skip
    limit = budget(cfg)
    rows = [r for r in table(cfg, world) if r["peak"] <= limit]
    if not rows:
        raise ValueError(f"train.micro_batch_size=auto: not even micro-batch 1 fits in "
                         f"{limit / GIB:.1f} GiB at data.image.size={cfg.data.image.size}; use "
                         "activation_checkpointing.mode=full, a sharded backend (fsdp, zero3), "
                         "or a lower resolution")  # fmt: skip
    cfg = copy.deepcopy(cfg)
    cfg.train.micro_batch_size = rows[-1]["micro"]
    from gradcycle.vision.batchnorm import check_guard, has_batchnorm

    if has_batchnorm(_meta_model(cfg)):
        check_guard(cfg.model, cfg.train.micro_batch_size, world, "train.micro_batch_size=auto: ")
    return cfg


def startup_lines(cfg, world: int) -> list[str]:
    try:
        act = activation_bytes(cfg)
        micro = cfg.train.micro_batch_size
        row = next(r for r in table(cfg, world) if r["micro"] == micro)
        limit = budget(cfg)
    except (ValueError, StopIteration, RuntimeError, NotImplementedError):
        return []
    return [
        f"plan (image): {act['per_image'] / 2**20:.1f} MiB activations per image at "
        f"{cfg.data.image.size}x{cfg.data.image.size}; predicted peak {_size(row['peak'])} per "
        f"rank (states {_size(row['states'])} + activations {_size(row['activations'])}) of "
        f"{limit / GIB:.1f} GiB ({cfg.hardware.name})"
    ]


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    from gradcycle.compose import compose
    from gradcycle.validation import validate

    args = list(sys.argv[1:] if argv is None else argv)
    world = int(next((a.split("=", 1)[1] for a in args if a.startswith("world=")), 1))
    cfg = compose([a for a in args if not a.startswith("world=")])
    if cfg.precision == "auto":
        cfg.precision = "bf16" if cfg.hardware.bf16 else "fp32"
    validate(cfg, this_machine=False)
    act = activation_bytes(cfg)
    s, limit = cfg.data.image.size, budget(cfg)
    print(
        f"{cfg.model.name} at {s}x{s}, {cfg.precision}, backend={cfg.backend.name}, world {world}"
        f", activation_checkpointing={cfg.activation_checkpointing.mode}: "
        f"{act['per_image'] / 2**20:.1f} MiB saved activations per image (no checkpointing); "
        f"budget {limit / GIB:.1f} GiB ({cfg.hardware.name}, headroom {cfg.plan.headroom})"
    )
    print(f"{'micro':>5} {'K':>4} {'states GiB':>10} {'activations GiB':>15} {'peak GiB':>9}  fits")
    for r in table(cfg, world):
        print(f"{r['micro']:>5} {r['k']:>4} {r['states'] / GIB:>10.2f} "
              f"{r['activations'] / GIB:>15.2f} {r['peak'] / GIB:>9.2f}  "
              f"{'yes' if r['peak'] <= limit else 'no'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
