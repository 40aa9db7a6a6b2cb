"""Collective counting, step metrics and the metrics sinks (metrics.jsonl, TensorBoard, wandb).

Collectives are counted by wrapping the leaf functions of `torch.distributed` once per process
(before DeepSpeed or FSDP capture them). In torch 2.13 FSDP2 calls `all_gather_single` /
`reduce_scatter_single`; the deprecated names forward to those, so only the leaves are wrapped and
nothing is counted twice. DDP's C++ reducer is routed through a Python comm hook (backends/ddp.py).
Counting is host-side bookkeeping only: no device synchronisation.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# leaf function -> (reported op, how to size it). Bytes are those of the full (unsharded) buffer.
_LEAVES = {
    "all_reduce": ("all_reduce", lambda a, k: _nbytes(a[0])),
    "broadcast": ("broadcast", lambda a, k: _nbytes(a[0])),
    "all_gather_single": ("all_gather", lambda a, k: _nbytes(a[0])),
    "all_gather": ("all_gather", lambda a, k: _nbytes(a[1]) * len(a[0])),
    "reduce_scatter_single": ("reduce_scatter", lambda a, k: _nbytes(a[1])),
    "reduce_scatter": ("reduce_scatter", lambda a, k: sum(_nbytes(t) for t in a[1])),
}
OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class CommCounter:
    """Process-wide counts of collective calls and bytes since the last `take()`."""

    _instance: CommCounter | None = None

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = defaultdict(lambda: [0, 0])
        self._suspended = threading.local()
        self._installed = False

    @classmethod
    def instance(cls) -> CommCounter:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def install(self) -> None:
        if self._installed:
            return
        for leaf, (op, size) in _LEAVES.items():
            original = getattr(c10d, leaf)
            wrapped = self._wrap(original, op, size)
            setattr(c10d, leaf, wrapped)
            setattr(dist, leaf, wrapped)
        self._installed = True

    def _wrap(self, fn, op, size):
        def counted(*args, **kwargs):
            if not getattr(self._suspended, "on", False):
                self.record(op, size(args, kwargs))
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        counted.__name__ = fn.__name__
        return counted

    def record(self, op: str, nbytes: int) -> None:
        with self._lock:
            entry = self._counts[op]
            entry[0] += 1
            entry[1] += nbytes

    @contextlib.contextmanager
    def suspended(self):
        """For the trainer's own bookkeeping collectives (token count, logged loss)."""
        self._suspended.on = True
        try:
            yield
        finally:
            self._suspended.on = False

    def take(self) -> dict[str, dict[str, int]]:
        with self._lock:
            out = {op: {"calls": self._counts[op][0], "bytes": self._counts[op][1]} for op in OPS}
            self._counts.clear()
        return out


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # CPU: the process's peak resident set (Linux reports KiB).
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def model_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """6N + 12·L·h·s (PaLM appendix B): forward+backward, attention included, recompute not."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


class MetricsSink:
    """Rank 0 writes metrics.jsonl (+ TensorBoard, wandb); other ranks write nothing."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, resolved_cfg: dict | None = None):
        self.enabled = enabled
        self.tb = self.wandb_run = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)  # appends: a resumed run continues the file
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.logging.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.logging.wandb.project,
                name=cfg.logging.wandb.name,
                mode=cfg.logging.wandb.mode,
                dir=str(run_dir),
                config=resolved_cfg,
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
