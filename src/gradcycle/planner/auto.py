"""The planner inside a training run: `auto` values, start-up warnings, out-of-memory retries.

- `resolve_auto`: train.micro_batch_size=auto and backend.sync=auto become the planner's choice
  for this world size, before anything else reads them (the global batch is kept; accumulation
  follows). The run's config.yaml records the resolved values.
- `startup_lines`: the predicted peak and the planner's warnings, printed by rank 0.
- `FirstStepOOM` / `after_oom`: an out-of-memory error before the first optimizer step of a
  single-process run (GPU) is retried with half the micro-batch and twice the accumulation, a few
  times, then fails with the planner's explanation. The trainer rebuilds everything for the retry
  (backend, data, checkpoint state), so no half-updated state survives. With more than one rank
  there is no retry: a rank that did not run out of memory may be inside a collective, so the
  ranks that did stop with the planner's advice (exit 2), and the launcher (torchrun, srun
  --kill-on-bad-exit) or backend.dist_timeout_s ends the others.
"""

from __future__ import annotations

import copy
import gc
import os

from gradcycle.planner.memory import GIB
from gradcycle.planner.plan import UnknownShape, cut, fixes, make_plan

MAX_OOM_RETRIES = 3


class MemoryPlanError(ValueError):
    """Out of memory where no smaller micro-batch is left to try: the planner's explanation."""


class FirstStepOOM(Exception):
    """torch.OutOfMemoryError before the run's first optimizer step completed."""

    def __init__(self, micro: int, run_dir: str, message: str):
        super().__init__(message)
        self.micro, self.run_dir, self.message = micro, run_dir, message

    def detached(self) -> FirstStepOOM:
        """The same facts without the traceback and context that keep the failed attempt's
        frames, and so its tensors, alive."""
        return FirstStepOOM(self.micro, self.run_dir, self.message)


def with_device_memory(cfg):
    """On a GPU the device's own memory is the budget when `hardware` names another device."""
    try:
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            return cfg
        total = torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:  # no usable CUDA: the configured hardware stands
        return cfg
    if abs(total - cfg.hardware.memory_gb) <= 0.05 * total:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.hardware.memory_gb = round(total, 1)
    cfg.hardware.reserved_gb = max(cfg.hardware.reserved_gb or 0.0, 2.0)
    return cfg


def resolve_auto(cfg, world: int, nodes: int | None = None):
    """A copy of `cfg` with the `auto` fields resolved (`cfg` itself if there are none).
    Raises ValueError when train.micro_batch_size=auto finds nothing that fits. A model the
    planner cannot size keeps backend.sync=auto: each backend's memory-free default."""
    mbs_auto, sync_auto = cfg.train.micro_batch_size == "auto", cfg.backend.sync == "auto"
    if not (mbs_auto or sync_auto):
        return cfg
    try:
        plan = make_plan(with_device_memory(cfg), world, nodes, searches=mbs_auto)
    except UnknownShape:
        if mbs_auto:
            raise
        return cfg
    chosen = plan.auto if mbs_auto else plan.configured
    if chosen is None:
        from gradcycle.planner.plan import explain

        raise ValueError("train.micro_batch_size=auto: " + explain(plan))
    cfg = copy.deepcopy(cfg)
    cfg.train.micro_batch_size = chosen.micro
    if sync_auto:
        cfg.backend.sync = chosen.sync
    return cfg


def startup_lines(cfg, world: int, nodes: int | None, vocab: int | None) -> list[str]:
    """The planner's summary and warnings for the run as configured."""
    try:
        plan = make_plan(with_device_memory(cfg), world, nodes, vocab)
    except UnknownShape:
        return []
    c = plan.configured
    if c is None:
        return []
    line = (f"plan: predicted peak {c.est.peak / GIB:.2f} GiB per GPU of "
            f"{plan.budget / GIB:.1f} GiB ({plan.cfg.hardware.name}, at {c.est.phase})")  # fmt: skip
    if plan.cfg.hardware.name != "cpu" and plan.cfg.hardware.bf16_tflops:  # cpu: a placeholder
        line += f"; {c.time.tokens_per_s:,.0f} tokens/s expected at {cfg.plan.mfu:.0%} MFU"
    lines = [line]
    return lines + [f"plan warning: {w}" for w in plan.warnings]


def _per_rank(cfg, world: int, micro: int) -> int:
    t = cfg.train
    return t.global_batch_size // world if t.global_batch_size else micro * t.accumulation_steps


def after_oom(cfg, world: int, nodes: int | None, failed: FirstStepOOM, attempt: int):
    """The config to retry with after a first-step out-of-memory error, or MemoryPlanError."""
    try:
        import torch

        gc.collect()  # the failed attempt's frames are gone: return its blocks to the device
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    micro = failed.micro
    per_rank = _per_rank(cfg, world, micro)
    smaller = max((d for d in range(1, micro // 2 + 1) if per_rank % d == 0), default=None)
    if world > 1:
        # Ranks that did not run out of memory are inside a collective of the failed step: a
        # retry in these processes could hang or pair mismatched collectives. Stop with advice.
        retry = f" Relaunch with train.micro_batch_size={smaller}." if smaller else ""
        raise MemoryPlanError(oom_explanation(cfg, world, nodes, failed) + " With "
                              f"{world} ranks the run is not retried in place." + retry)  # fmt: skip
    if attempt >= MAX_OOM_RETRIES or smaller is None:
        raise MemoryPlanError(oom_explanation(cfg, world, nodes, failed))
    cfg = copy.deepcopy(cfg)
    if not cfg.train.global_batch_size:  # keep the global batch, not the accumulation steps
        cfg.train.global_batch_size = per_rank * world
        cfg.train.accumulation_steps = None
    cfg.train.micro_batch_size = smaller
    cfg.run_dir = failed.run_dir  # the same run dir on every rank, not a new timestamp
    if os.environ.get("RANK", "0") == "0":
        print(f"out of memory before the first optimizer step at train.micro_batch_size={micro}; "
              f"retrying with {smaller} (accumulation x{micro // smaller}, global batch kept)",
              flush=True)  # fmt: skip
    return cfg


def oom_explanation(cfg, world: int, nodes: int | None, failed: FirstStepOOM) -> str:
    text = (f"out of memory in the first optimizer step at train.micro_batch_size={failed.micro} "
            f"({failed.message.splitlines()[0] if failed.message else 'no message'}).")  # fmt: skip
    try:
        probe = copy.deepcopy(cfg)
        probe.train.micro_batch_size = failed.micro
        plan = make_plan(with_device_memory(probe), world, nodes)
    except (UnknownShape, ValueError) as e:
        return text + f" The planner cannot size this run ({e})."
    c = plan.configured
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in c.est.breakdown.items())
    text += (f" The planner predicted {c.est.peak / GIB:.1f} GiB per GPU ({parts} GiB) of "
             f"{plan.budget / GIB:.1f} GiB for {cut(c)}.")  # fmt: skip
    if c.est.peak <= plan.budget:
        text += (" The device had less free memory than that: other processes on the GPU, "
                 "fragmentation or a hardware= that does not match the device.")  # fmt: skip
    return text + fixes(plan)
