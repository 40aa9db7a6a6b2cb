"""build_backend(): THE place the backend is chosen.

Each backend wraps the plain model and translates the trainer's accumulation boundary (see
backends/base.py). The trainer never branches on the backend's name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gradcycle.backends.base import Backend, StepResult, SyncPlan

__all__ = ["Backend", "StepResult", "SyncPlan", "build_backend"]


def build_backend(cfg, make_model: Callable[[str], torch.nn.Module], device: torch.device,
                  world: int, run_dir: Path) -> Backend:  # fmt: skip
    """`make_model(device)` builds the plain model (activation checkpointing applied) on "cpu" or
    "meta"; the backend decides where and how (meta + shard, zero.Init, or a full copy).
    `run_dir` is where a backend may write its own generated files (e.g. ds_config.json)."""
    name = cfg.backend.name
    if name == "ddp":
        from gradcycle.backends.ddp import DDPBackend

        return DDPBackend(cfg, make_model, device, world)
    if name in ("fsdp", "hsdp"):
        from gradcycle.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg, make_model, device, world)
    if name in ("zero1", "zero2", "zero3"):
        from gradcycle.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, make_model, device, world, run_dir)
    raise AssertionError(f"unvalidated backend {name!r}")  # config.validate() rejects it first
