"""The small interface the training loop talks to, and the shared torch-native implementation.

The trainer decides where an accumulation cycle starts and ends; a backend only translates that
decision: `run_cycle()` runs the K micro-batches (by default inside `cycle()`, one
`forward_backward(..., last)` each, `last` saying whether this micro-batch closes the cycle), and
`step()` applies the accumulated gradient once.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradcycle.telemetry import CommCounter


@dataclass
class StepResult:
    grad_norm: float  # total norm before clipping, all ranks
    skipped: bool  # the update was not applied (non-finite gradient or fp16 overflow)
    stats: list[float]  # the trainer's step statistics, fetched in the same host sync


@dataclass
class SyncPlan:
    """What the start-up plan prints: collectives per cycle and the memory the policy costs."""

    policy: str  # per_cycle | per_micro
    rows: list[tuple[str, str]] = field(default_factory=list)  # (collective, count per cycle)
    extra_memory: str = "none"
    note: str = ""

    def table(self, backend: str, k: int) -> str:
        lines = [f"sync plan: backend={backend} sync={self.policy} K={k}"]
        lines += [f"  {name:<34} {count}" for name, count in self.rows]
        lines.append(f"  {'extra memory held through the cycle':<34} {self.extra_memory}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


class Backend:
    """Interface. `model` is what forward runs on (wrapped); `module` is the plain model."""

    name: str
    model: nn.Module
    module: nn.Module
    sync: str

    def cycle(self):
        """Context around all K micro-batches of one optimizer step."""
        return contextlib.nullcontext()

    def forward_backward(self, batch: dict, loss_fn, last: bool) -> torch.Tensor:
        raise NotImplementedError

    def run_cycle(self, micro_batches, loss_fn, at_micro=None) -> torch.Tensor:
        """Forward and backward of one cycle's K micro-batches (a sized iterable, read once);
        returns their summed loss (a device scalar). THE place the accumulation boundary is
        decided: the K-th micro-batch is `last`. `at_micro(k)`, called as micro-batch k starts,
        returns a context around its work (test fault injection, the profiler's region). A
        pipeline backend overrides this with one schedule step over all K."""
        losses, k_last = [], len(micro_batches) - 1
        with self.cycle():
            for k, batch in enumerate(micro_batches):
                with at_micro(k) if at_micro is not None else contextlib.nullcontext():
                    losses.append(self.forward_backward(batch, loss_fn, last=k == k_last))
        return torch.stack(losses).sum()

    def step(self, lr: float, stats: torch.Tensor) -> StepResult:
        """Clip, optimizer step, zero grads. Fetch the grad norm and `stats` (trainer's device
        scalars) in ONE host sync: the only one per optimizer step."""
        raise NotImplementedError

    def eval_loss(self, batch: dict, loss_fn) -> torch.Tensor:
        raise NotImplementedError

    def sync_plan(self, k: int) -> SyncPlan:
        raise NotImplementedError

    def cycle_metrics(self) -> dict:
        """Fields this backend adds to the last cycle's metrics record, read after step() (its
        host sync); the pipeline's measured bubble."""
        return {}

    def whole_model(self) -> nn.Module:
        """A module with every parameter of the model (its shapes are what checkpoints record):
        `module`, except where each rank holds only a part (pipeline stages)."""
        return self.module

    # -- checkpoint / export (all collective: every rank calls them) -----------------------
    def save_state(self, path) -> None:
        """Write model + optimizer (+ scaler) state, sharded, into directory `path`."""
        raise NotImplementedError

    def load_state(self, path) -> None:
        """Restore what save_state wrote (possibly from another world size where supported)."""
        raise NotImplementedError

    def full_state_dict(self) -> dict | None:
        """The plain model's full CPU state dict (HF keys) on rank 0; None on other ranks."""
        raise NotImplementedError

    def close(self, failing: bool = False) -> None:
        """Release the backend; `failing`: an exception is on its way out (no collectives)."""


def amp_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def build_optimizer(params, optim_cfg, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            # Norm weights and biases (1-D) are not decayed: standard for transformer LMs. The
            # full shape decides: under ZeRO-3's zero.Init a parameter is already partitioned
            # (local shape (0,)) and only `ds_shape` says it is a matrix.
            ndim = len(getattr(p, "ds_shape", None) or p.shape)
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    # The fused kernel: the same update as foreach to ~1e-8, ~3x faster on CPU (bench/overhead.py)
    # and the fastest on GPUs. Works on every backend here (DTensor shards, ZeRO partitions).
    return torch.optim.AdamW(
        groups, lr=lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps, fused=True
    )


def _nested_optimizer_state(path) -> bool:
    """A checkpoint written before the optimizer state was flattened (param_groups by index)."""
    from gradcycle.safe_load import dcp_reader

    keys = dcp_reader(path).read_metadata().state_dict_metadata
    return any(k.startswith("optim.param_groups.0.") for k in keys)


def _step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device where `found_inf` is true: a fused optimizer
    (`_step_supports_amp_scaling`) reads `optimizer.found_inf` and `grad_scale` as GradScaler.step
    passes them, and its kernel then leaves parameters, moments and step counts as they were."""
    optimizer.grad_scale, optimizer.found_inf = None, found_inf.to(torch.float32).reshape(())
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


class TorchBackend(Backend):
    """Shared by ddp and fsdp/hsdp: autocast, fp16 GradScaler, clip, optimizer, skip on non-finite.

    Subclasses provide `_sync_context(last)` / `_before_backward(last)`, the gradient-averaging
    factor and `_clip()`; nothing else differs between them. `grads_to_none`: whether zero_grad
    frees the gradients (DDP keeps them: they are views into its reduction buckets).
    """

    grads_to_none = True

    def __init__(self, cfg, model: nn.Module, module: nn.Module, device: torch.device, world: int):
        self.cfg, self.model, self.module, self.device = cfg, model, module, device
        self.world = world
        self.precision = cfg.precision
        self.optimizer = build_optimizer(model.parameters(), cfg.optim, cfg.optim.lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.comm = CommCounter.instance()
        # DDP/FSDP average gradients over ranks; the loss is already normalised by the token count
        # of the whole cycle on all ranks, so multiply the average back into a sum.
        self.loss_factor = float(world)

    def _autocast(self):
        dtype = amp_dtype(self.precision)
        if dtype is None or self._params_in_low_precision():
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _params_in_low_precision(self) -> bool:
        return False

    def _sync_context(self, last: bool):
        return contextlib.nullcontext()

    def _before_backward(self, last: bool) -> None:
        pass

    def forward_backward(self, batch: dict, loss_fn, last: bool) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._sync_context(last):
            self._before_backward(last)
            with self._autocast():
                loss = loss_fn(self.model, batch)
            # fp16: every micro-batch is scaled; unscale/step/update happen once, in step().
            self.scaler.scale(loss * self.loss_factor).backward()
        return loss.detach()

    def _clip(self, max_norm: float) -> torch.Tensor:
        """The total gradient norm (all ranks, on the device); clipped only when max_norm > 0:
        clip_grad_norm_ with an infinite bound would still multiply every gradient by 1.0."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self, lr: float, stats: torch.Tensor) -> StepResult:
        """Enqueue the update before the step's one host sync, so the device never waits for the
        host: a non-finite norm skips it on the device (`found_inf`, read by the fused kernels).
        Only an optimizer without that input (SGD) fetches first and steps if finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        norm = self._clip(self.cfg.train.grad_clip).detach().reshape(1).double()
        flags = []  # device scalars fetched with the norm and the trainer's statistics
        on_device = getattr(self.optimizer, "_step_supports_amp_scaling", False)
        if self.scaler.is_enabled():
            # The scaler skips an overflowing update itself (fused: via found_inf, no sync) and
            # halves its scale: a smaller scale after update() is a skipped step.
            before = self.scaler._get_scale_async().clone()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            flags = [(self.scaler._get_scale_async() < before).reshape(1).double()]
        elif on_device:
            _step_unless(self.optimizer, ~torch.isfinite(norm[0]))
        fetched = torch.cat([norm, *flags, stats.double()]).tolist()  # the one host sync
        norm_value, stats_values = fetched[0], fetched[1 + len(flags) :]
        skipped = bool(fetched[1]) if flags else not math.isfinite(norm_value)
        if not (self.scaler.is_enabled() or on_device or skipped):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.grads_to_none)
        return StepResult(grad_norm=norm_value, skipped=skipped, stats=stats_values)

    @torch.no_grad()
    def eval_loss(self, batch: dict, loss_fn) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._autocast():
            return loss_fn(self.model, batch)

    # -- checkpoint / export: torch.distributed.checkpoint (DCP) ------------------------------
    # Model and optimizer state are keyed by the plain model's parameter names whatever the
    # wrapper (DDP, FSDP2 shards as DTensors), so DCP reshards on load: a checkpoint written on
    # W ranks loads on any other number of ranks, and on ddp as well as fsdp/hsdp.
    def _dcp_state(self, flat: bool = True) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # The optimizer state keyed by parameter name (flattened), so it loads on whichever rank
        # holds a parameter: the nested form numbers parameters per rank, which collides across
        # pipeline stages (backend.pp) and keeps pp=1 and pp>1 from resuming each other.
        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model_sd, "optim": optim_sd}

    def save_state(self, path) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from gradcycle.safe_load import quiet_single_process

        with quiet_single_process():
            dcp.save(self._dcp_state(), checkpoint_id=str(path), no_dist=not dist.is_initialized())
        if not dist.is_initialized() or dist.get_rank() == 0:
            # The scaler is the same on every rank (it sees the all-reduced gradients).
            (Path(path) / "scaler.json").write_text(json.dumps(self.scaler.state_dict()) + "\n")

    def load_state(self, path) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from gradcycle.safe_load import dcp_load

        self._init_optimizer_state()
        state = self._dcp_state(flat=not _nested_optimizer_state(path))
        dcp_load(state, path, no_dist=not dist.is_initialized())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])  # fmt: skip
        scaler = Path(path) / "scaler.json"
        saved = json.loads(scaler.read_text()) if scaler.is_file() else {}
        if self.scaler.is_enabled() and saved:  # an fp32/bf16 checkpoint has no scale to restore
            self.scaler.load_state_dict(saved)

    @torch.no_grad()
    def _init_optimizer_state(self) -> None:
        """Create the optimizer's state (moments, step) so that a load has tensors to fill.
        torch's get_state_dict does this only when no parameter has a gradient; DDP's gradients
        exist from the start (views into its buckets), so there it would skip it and a resume
        would silently restart Adam's moments from zero. A zero-gradient step at lr 0 (before any
        backward) changes no parameter."""
        if self.optimizer.state:
            return
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=self.grads_to_none)

    def full_state_dict(self) -> dict | None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=options)
        return sd if not dist.is_initialized() or dist.get_rank() == 0 else None
