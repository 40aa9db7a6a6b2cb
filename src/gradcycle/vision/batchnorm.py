"""BatchNorm under accumulation: the guard, SyncBatchNorm, and the running-statistics momentum.

Accumulation makes K micro-batches one batch for the gradient, but a BatchNorm layer normalises
each micro-batch by its own statistics: b samples, not K*b. So (bench/batchnorm.py measures it):
- `model.batchnorm_guard=true` (default) stops a run whose statistics would come from fewer than
  8 samples (micro-batch, times the ranks under SyncBatchNorm), with the ways out;
- `model.sync_batchnorm=true` computes them over all ranks' micro-batches (b*W samples). On CUDA
  that is torch's nn.SyncBatchNorm; torch's refuses CPU tensors (its forward raises "SyncBatchNorm
  expected input tensor to be on GPU"), so on CPU gradcycle converts to `GlooSyncBatchNorm`, the
  same statistics through one differentiable all-reduce of [sum, sum of squares, count];
- running statistics are updated once per micro-batch, K times per optimizer step:
  `model.bn_momentum=per_cycle` sets m' = 1 - (1 - m)^(1/K), so K updates decay the old value
  by (1 - m), as one update per step would.
GroupNorm and LayerNorm normalise each sample alone: exact under accumulation, nothing to do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

MIN_SAMPLES = 8


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def check_guard(model_cfg, micro: int, world: int, where: str = "") -> None:
    """ValueError when BatchNorm statistics would come from fewer than MIN_SAMPLES samples."""
    if not model_cfg.batchnorm_guard:
        return
    per_stat = micro * (world if model_cfg.sync_batchnorm and world > 1 else 1)
    if per_stat >= MIN_SAMPLES:
        return
    sync = "" if model_cfg.sync_batchnorm else (
        f", or model.sync_batchnorm=true (statistics over all ranks: needs micro x ranks >= "
        f"{MIN_SAMPLES}, here {micro} x {world})"
    )  # fmt: skip
    raise ValueError(
        f"{where}the model has BatchNorm layers and each batch statistic would come from "
        f"{per_stat} samples (train.micro_batch_size={micro}"
        f"{f' x {world} ranks' if model_cfg.sync_batchnorm and world > 1 else ''}) < "
        f"{MIN_SAMPLES}: accumulation does not enlarge it, the statistics are noisy and "
        f"K x b is not 1 x (K*b). Raise train.micro_batch_size to >= {MIN_SAMPLES}{sync}; or use "
        "a GroupNorm/LayerNorm model (e.g. model=convnext-cpu, model=vit-cpu); or set "
        "model.batchnorm_guard=false to train with these statistics anyway"
    )


def per_cycle_momentum(momentum: float, k: int) -> float:
    """m' with (1 - m')^K = 1 - m: K micro-batch updates decay like one update per step."""
    return 1.0 - (1.0 - momentum) ** (1.0 / k)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks (every rank's loss
    depends on every rank's statistics). torch's own torch.distributed.nn.functional.all_reduce
    is deprecated in 2.13."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(_BatchNorm):
    """nn.SyncBatchNorm's arithmetic where torch's cannot run (CPU, gloo): in training, the batch
    mean and (biased) variance over every rank's samples; running stats get the unbiased one."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):  # fmt: skip
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        local = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        total = _AllReduceSum.apply(local)
        c = x.shape[1]
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_gloo(module: nn.Module) -> nn.Module:
    """Every BatchNorm*d -> GlooSyncBatchNorm, sharing its parameters and buffers."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device="meta")  # fmt: skip
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(out, name, getattr(module, name))
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_gloo(child))
    return out


def prepare(model: nn.Module, model_cfg, k: int, world: int, device_type: str) -> nn.Module:
    """model.sync_batchnorm and model.bn_momentum applied (no-op without BatchNorm)."""
    if not has_batchnorm(model):
        return model
    if model_cfg.bn_momentum == "per_cycle" and k > 1:
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.momentum is not None:
                m.momentum = per_cycle_momentum(m.momentum, k)
    if model_cfg.sync_batchnorm and world > 1:
        if device_type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return convert_gloo(model)
    return model
