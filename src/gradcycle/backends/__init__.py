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
    """`make_model(device, dtype=torch.float32)` builds the plain model (activation checkpointing
    applied) on "cpu" or "meta", parameters stored in `dtype`; the backend decides where and how
    (meta + shard + fill the shards, zero.Init + fill the partitions, or a full copy).
    `run_dir` is where a backend may write its own generated files (e.g. ds_config.json)."""
    from gradcycle.hardware import resolve_precision
    from gradcycle.timeouts import long_phase

    cfg = resolve_precision(cfg, device.type)  # no-op after the trainer: for direct callers
    with long_phase(cfg.backend):  # building, filling or loading a big model: startup_timeout_s
        return _build(cfg, make_model, device, world, run_dir)


def _build(cfg, make_model, device: torch.device, world: int, run_dir: Path) -> Backend:
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
