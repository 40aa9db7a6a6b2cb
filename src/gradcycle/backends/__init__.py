"""build_backend(): THE place the backend is chosen.

Each backend wraps the plain model and translates the trainer's accumulation boundary (see
backends/base.py). The trainer never branches on the backend's name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gradcycle.backends.base import Backend, StepResult, SyncPlan

__all__ = ["Backend", "StepResult", "SyncPlan", "build_backend", "check_plan", "data_parallel_env"]


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


def data_parallel_env(cfg, env):
    """The ranks the data is split over: all of them, except that under backend.pp > 1 the
    stages of one pipeline read the same slice (the env of its data-parallel replica)."""
    if cfg.backend.pp == 1:
        return env
    import dataclasses

    from gradcycle.backends.pipeline import data_parallel
    from gradcycle.backends.pipeline_checks import check_plan

    check_plan(cfg, 1 << 30, env.world_size)  # the world splits into pp x dp (K: check_plan)
    rank, size = data_parallel(cfg.backend.pp, env.rank, env.world_size)
    return dataclasses.replace(env, rank=rank, world_size=size)


def check_plan(cfg, k: int, world: int) -> None:
    """K micro-batches per cycle suit the backend (a pipeline schedule's rules)."""
    if cfg.backend.pp > 1:
        from gradcycle.backends.pipeline_checks import check_plan as check

        check(cfg, k, world)


def _build(cfg, make_model, device: torch.device, world: int, run_dir: Path) -> Backend:
    name = cfg.backend.name
    if cfg.backend.pp > 1:
        from gradcycle.backends.pipeline import PipelineBackend

        return PipelineBackend(cfg, make_model, device, world)
    if name == "ddp":
        from gradcycle.backends.ddp import DDPBackend

        return DDPBackend(cfg, make_model, device, world)
    if name in ("fsdp", "hsdp"):
        from gradcycle.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg, make_model, device, world)
    if name in ("zero1", "zero2", "zero3"):
        from gradcycle.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, make_model, device, world, run_dir)
    raise AssertionError(f"unvalidated backend {name!r}")  # validation.validate() rejects it first
