"""Collective counting, step metrics and the metrics sinks (metrics.jsonl, TensorBoard, wandb).

Collectives are counted by wrapping the leaf functions of `torch.distributed` once per process
(before DeepSpeed or FSDP capture them). In torch 2.13 FSDP2 calls `all_gather_single` /
`reduce_scatter_single`; the deprecated names forward to those, so only the leaves are wrapped and
nothing is counted twice. Older torch (2.11, 2.12) has no *_single functions: there the older
`all_gather_into_tensor` / `reduce_scatter_tensor` are the leaves (`leaf_functions`). DDP's C++
reducer calls no Python: backends/ddp.py records its buckets after each synchronising backward.
Counting is host-side bookkeeping only: no device synchronisation.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# leaf function -> (reported op, how to size it). Bytes are those of the full (unsharded) buffer.
# Callers pass the tensors positionally or by keyword (FSDP2: output=/input=, DeepSpeed: tensor=).
_LEAVES = {
    "all_reduce": ("all_reduce", lambda a, k: _nbytes(_arg(a, k, 0, "tensor"))),
    "broadcast": ("broadcast", lambda a, k: _nbytes(_arg(a, k, 0, "tensor"))),
    "all_gather_single": (
        "all_gather",
        lambda a, k: _nbytes(_arg(a, k, 0, "output_tensor")),
    ),
    "all_gather": (
        "all_gather",
        lambda a, k: _nbytes(_arg(a, k, 1, "tensor")) * len(_arg(a, k, 0, "tensor_list") or ()),
    ),
    "reduce_scatter_single": ("reduce_scatter", lambda a, k: _nbytes(_arg(a, k, 1, "input"))),
    "reduce_scatter": (
        "reduce_scatter",
        lambda a, k: sum(_nbytes(t) for t in _arg(a, k, 1, "input_list") or ()),
    ),
    # Point-to-point (pipeline stages): each send and each receive is one call of its tensor's
    # bytes. batch_isend_irecv runs P2POps whose `op` is isend/irecv, looked up when the op is
    # made, so the wrapped ones: counted there, never twice.
    **{
        name: ("point_to_point", lambda a, k: _nbytes(_arg(a, k, 0, "tensor")))
        for name in ("send", "recv", "isend", "irecv")
    },
}


# torch < 2.13 has no *_single functions: there FSDP2 calls these older names, with the same
# (output, input) positional layout. Only one of each pair is ever wrapped: nothing counts twice.
_OLDER = {
    "all_gather_single": "all_gather_into_tensor",
    "reduce_scatter_single": "reduce_scatter_tensor",
}


def leaf_functions(c10d_module) -> dict[str, tuple]:
    """The collectives to wrap in this torch: {function name: (reported op, sizer)}."""
    out = {}
    for leaf, spec in _LEAVES.items():
        name = leaf if hasattr(c10d_module, leaf) else _OLDER.get(leaf)
        if name is not None and hasattr(c10d_module, name):
            out[name] = spec
    return out


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "point_to_point")


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
        for leaf, (op, size) in leaf_functions(c10d).items():
            original = getattr(c10d, leaf)
            wrapped = self._wrap(original, op, size)
            setattr(c10d, leaf, wrapped)
            setattr(dist, leaf, wrapped)
        self._installed = True

    def _wrap(self, fn, op, size):
        def counted(*args, **kwargs):
            if not getattr(self._suspended, "depth", 0):
                self.record(op, size(args, kwargs))
            with self.suspended():  # one count per call: send() runs isend() inside (2.13)
                return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        counted.__name__ = fn.__name__
        return counted

    def record(self, op: str, nbytes: int, calls: int = 1) -> None:
        if getattr(self._suspended, "depth", 0):
            return
        with self._lock:
            entry = self._counts[op]
            entry[0] += calls
            entry[1] += nbytes

    @contextlib.contextmanager
    def suspended(self):
        """For the trainer's own bookkeeping collectives (token count, logged loss)."""
        self._suspended.depth = getattr(self._suspended, "depth", 0) + 1  # nestable
        try:
            yield
        finally:
            self._suspended.depth -= 1

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


def _numel(p: torch.nn.Parameter) -> int:
    # ZeRO-3 partitions parameters in place (numel 0 locally); ds_numel is the full size.
    return int(getattr(p, "ds_numel", 0) or p.numel())


def flops_per_token(
    model: torch.nn.Module, seq_len: int, checkpointed: list[int]
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token for a decoder-only LM.

    N counts the parameters that take part in a matmul: the input embedding is a table lookup, so
    it is left out unless it is tied to the output projection. Hardware FLOPs add the recomputed
    forward (2·N_layer + 4·h·s per token) of every activation-checkpointed layer: MFU shows useful
    work, HFU what the device actually ran.
    """
    from gradcycle.model import decoder_layers

    cfg = model.config
    layers = decoder_layers(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = set()
    if embed is not None and (out is None or out.weight is not embed.weight):
        skip.add(id(embed.weight))
    n = sum(_numel(p) for p in model.parameters() if id(p) not in skip)
    hidden, n_layers = cfg.hidden_size, len(layers)
    model_flops = model_flops_per_token(n, n_layers, hidden, seq_len)
    recompute = sum(
        2.0 * sum(_numel(p) for p in layers[i].parameters()) + 4.0 * hidden * seq_len
        for i in checkpointed
    )
    return model_flops, model_flops + recompute


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested record as 'comm/all_reduce/calls' etc. (TensorBoard, wandb)."""
    out = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step":
            out[key] = v
    return out


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
        # Wall-clock time of the write: differences between records include the whole loop
        # (bookkeeping and logging too), which is what bench/overhead.py measures.
        record = {**record, "time": time.time()}
        self.file.write(json.dumps(record) + "\n")
        scalars = _flatten({k: v for k, v in record.items() if k != "time"})
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
