"""Batch arithmetic in one function: global batch, micro-batch and world size -> accumulation.

The user fixes the global batch (samples per optimizer step) and the micro-batch (samples per
forward/backward on one rank); the accumulation steps follow from the data-parallel world size, so
the same config trains identically on 1, 8 or 64 GPUs. The learning rate and warmup scale with the
global batch against a reference batch when `optim.scale_rule` asks for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int  # samples per optimizer step, all ranks
    micro_batch_size: int  # samples per forward/backward, one rank
    accumulation_steps: int  # micro-batches per optimizer step, per rank (K)
    world_size: int  # data-parallel ranks
    seq_len: int
    lr: float  # after scale_rule
    warmup_steps: int  # after scale_rule

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def samples_per_rank(self) -> int:
        return self.micro_batch_size * self.accumulation_steps

    def table(self) -> str:
        rows = [
            ("global batch (samples/step)", self.global_batch_size),
            ("micro-batch (samples/rank)", self.micro_batch_size),
            ("accumulation steps K", self.accumulation_steps),
            ("data-parallel world", self.world_size),
            ("tokens/step (<= seq_len x global)", self.tokens_per_step),
            ("learning rate", f"{self.lr:.3g}"),
            ("warmup steps", self.warmup_steps),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["batch plan: global = micro x K x world"]
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines)


def _divisors_near(n: int, target: int, count: int = 3) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divs, key=lambda d: (abs(d - target), d))[:count])


def plan_batch(
    *,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    lr: float,
    warmup_steps: int,
    global_batch_size: int | None = None,
    accumulation_steps: int | None = None,
    scale_rule: str = "none",
    reference_batch_size: int | None = None,
) -> BatchPlan:
    """THE batch arithmetic. Raises ValueError with the numbers and valid choices."""
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size={micro_batch_size} must be >= 1")
    if (global_batch_size is None) == (accumulation_steps is None):
        raise ValueError("set exactly one of train.global_batch_size and train.accumulation_steps")
    per_step = micro_batch_size * world_size
    if accumulation_steps is not None:
        if accumulation_steps < 1:
            raise ValueError(f"train.accumulation_steps={accumulation_steps} must be >= 1")
        global_batch_size = per_step * accumulation_steps
    assert global_batch_size is not None
    if global_batch_size < 1:
        raise ValueError(f"train.global_batch_size={global_batch_size} must be >= 1")
    if micro_batch_size > global_batch_size:
        raise ValueError(
            f"train.micro_batch_size={micro_batch_size} is larger than "
            f"train.global_batch_size={global_batch_size}: lower the micro-batch to at most "
            f"{global_batch_size // world_size or 1} or raise the global batch"
        )
    if global_batch_size % per_step:
        lo = (global_batch_size // per_step) * per_step
        hi = lo + per_step
        near = [g for g in (lo, hi) if g > 0]
        per_rank, rem = divmod(global_batch_size, world_size)
        micros = _divisors_near(per_rank, micro_batch_size) if rem == 0 else []
        fix = f"train.global_batch_size={' or '.join(map(str, near))}"
        if micros:
            fix += f", or train.micro_batch_size={' or '.join(map(str, micros))}"
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is not divisible by "
            f"train.micro_batch_size={micro_batch_size} x world size {world_size} = {per_step}: "
            f"use {fix}"
        )
    scale = 1.0
    if scale_rule != "none":
        if not reference_batch_size:
            raise ValueError(f"optim.scale_rule={scale_rule} needs optim.reference_batch_size")
        ratio = global_batch_size / reference_batch_size
        scale = ratio if scale_rule == "linear" else math.sqrt(ratio)
    return BatchPlan(
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        accumulation_steps=global_batch_size // per_step,
        world_size=world_size,
        seq_len=seq_len,
        lr=lr * scale,
        # Warmup grows with the LR (Goyal et al.): a larger step size needs a longer ramp.
        warmup_steps=round(warmup_steps * scale) if scale > 1 else warmup_steps,
    )


def plan_from_config(cfg, world_size: int, micro_batch_size: int | None = None) -> BatchPlan:
    t, o = cfg.train, cfg.optim
    return plan_batch(
        world_size=world_size,
        micro_batch_size=micro_batch_size or t.micro_batch_size,
        seq_len=cfg.data.seq_len,
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        global_batch_size=t.global_batch_size,
        accumulation_steps=t.accumulation_steps,
        scale_rule=o.scale_rule,
        reference_batch_size=o.reference_batch_size,
    )


def lr_at(step: int, plan: BatchPlan, schedule: str, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then cosine / linear decay to min_lr_ratio x lr, or constant."""
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    if schedule == "constant":
        return plan.lr
    span = max(1, max_steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return plan.lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)
