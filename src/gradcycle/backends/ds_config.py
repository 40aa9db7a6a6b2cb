"""The DeepSpeed config, generated from the Hydra config, and the DeepSpeed-specific user checks.

Nothing here imports DeepSpeed: `check_user_config` runs inside `config.validate()`, before any
process group exists, so a bad DeepSpeed setting fails in a second with a message, not in a rank.

Batch fields come from the batch plan only. The engine is driven with
gradient_accumulation_steps = K (the trainer's accumulation steps) and an explicit boundary on
every micro-batch; its own 1/K loss scaling is switched off (`backward(scale_wrt_gas=False)`),
because the trainer's loss is already normalised by the token count of the whole cycle.
"""

from __future__ import annotations

import copy
from typing import Any

# Generated from train.global_batch_size / train.micro_batch_size and the world size.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# The optimizer is a torch one built from optim.*: a DeepSpeed "optimizer" section would swap in
# FusedAdam / CPUAdam (JIT-compiled C++/CUDA ops) and a "scheduler" would fight the trainer's LR.
OWNED_SECTIONS = {
    "optimizer": "optim.* (gradcycle builds a torch optimizer)",
    "scheduler": "optim.schedule / optim.warmup_steps (the trainer sets the LR every step)",
}


def pin_accelerator(device_type: str):
    """Make DeepSpeed's accelerator the run's device, every time: DS_ACCELERATOR from the device
    (never a stale value inherited from the environment), and the accelerator DeepSpeed may
    already have picked when it was imported earlier in this process replaced if it differs.
    Returns the accelerator."""
    import os

    os.environ["DS_ACCELERATOR"] = device_type
    from deepspeed.accelerator import real_accelerator

    current = real_accelerator.ds_accelerator
    if current is None or current._name != device_type:
        if device_type == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        real_accelerator.set_accelerator(Accelerator())
    return real_accelerator.get_accelerator()


def deepspeed_supports_fp16(device_type: str) -> bool:
    """DeepSpeed's own answer (its accelerator's `is_fp16_supported`) for the device the run will
    use: its engine refuses fp16 at start-up otherwise ("Type fp16 is not supported on your
    device."). CPUs differ: oneDNN has fp16 kernels on some x86 CPUs (AVX512-FP16/AMX) only."""
    return bool(pin_accelerator(device_type).is_fp16_supported())


GRAD_ACCUM_ZERO1_BF16 = "fp32"


def grad_accum_dtype(stage: int, precision: str, user: dict | None = None) -> str:
    """The dtype DeepSpeed accumulates gradients in for this stage and precision."""
    if precision == "fp32":
        return "fp32"
    chosen = ((user or {}).get("data_types") or {}).get("grad_accum_dtype")
    if stage == 1 and precision == "bf16":
        return chosen or GRAD_ACCUM_ZERO1_BF16
    return precision


def zero_stage(backend_cfg) -> int:
    return int(backend_cfg.name.removeprefix("zero"))


def resolve_sync(backend_cfg) -> str:
    """auto -> per_cycle where it is free (ZeRO-1), per_micro where it costs a full gradient."""
    if backend_cfg.sync != "auto":
        return backend_cfg.sync
    return "per_cycle" if zero_stage(backend_cfg) == 1 else "per_micro"


def _user_dict(backend_cfg) -> dict:
    extra = backend_cfg.deepspeed_config
    if extra is None:
        return {}
    try:  # an OmegaConf node from Hydra, or a plain dict
        from omegaconf import OmegaConf

        if OmegaConf.is_config(extra):
            return OmegaConf.to_container(extra, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(extra)


def _enabled(section: Any) -> bool | None:
    if isinstance(section, dict) and "enabled" in section:
        return bool(section["enabled"])
    return None


def check_user_config(cfg) -> None:
    """DeepSpeed user errors, raised from config.validate() before anything starts."""
    b = cfg.backend
    if b.param_persistence_threshold is not None and b.name != "zero3":
        raise ValueError(
            f"backend.param_persistence_threshold={b.param_persistence_threshold} needs "
            "backend=zero3 (only ZeRO-3 partitions parameters)"
        )
    if not b.name.startswith("zero"):
        return
    if b.param_persistence_threshold is not None and b.param_persistence_threshold < 0:
        raise ValueError(
            f"backend.param_persistence_threshold={b.param_persistence_threshold} must be >= 0 "
            "(0 gathers every parameter; null keeps DeepSpeed's default of 1e5 elements)"
        )
    stage = zero_stage(b)
    if b.zero_stage not in (0, stage):
        raise ValueError(
            f"backend.zero_stage={b.zero_stage} contradicts backend={b.name}: "
            f"choose the stage with backend=zero1|zero2|zero3 and leave backend.zero_stage alone"
        )
    extra = _user_dict(b)
    for key in BATCH_KEYS:
        if key in extra:
            raise ValueError(
                f"backend.deepspeed_config.{key}={extra[key]} is not allowed: DeepSpeed's batch "
                "fields are generated from the batch plan. Use train.global_batch_size (samples per "
                "optimizer step, all ranks) and train.micro_batch_size (samples per forward on one "
                "rank) instead; the accumulation steps follow from the world size"
            )
    for key, use in OWNED_SECTIONS.items():
        if key in extra:
            raise ValueError(
                f"backend.deepspeed_config.{key} is not allowed: set it through {use} instead"
            )
    zero = extra.get("zero_optimization", {}) or {}
    if "stage" in zero and int(zero["stage"]) != stage:
        raise ValueError(
            f"backend.deepspeed_config.zero_optimization.stage={zero['stage']} contradicts "
            f"backend={b.name}: pick the stage with backend=zero{zero['stage']} instead"
        )
    if "gradient_clipping" in extra and float(extra["gradient_clipping"]) != cfg.train.grad_clip:
        raise ValueError(
            f"backend.deepspeed_config.gradient_clipping={extra['gradient_clipping']} contradicts "
            f"train.grad_clip={cfg.train.grad_clip}: set train.grad_clip only"
        )
    for section, prec in (("bf16", "bf16"), ("fp16", "fp16")):
        on = _enabled(extra.get(section))
        if on is not None and cfg.precision != "auto" and on != (cfg.precision == prec):
            raise ValueError(
                f"backend.deepspeed_config.{section}.enabled={on} contradicts "
                f"precision={cfg.precision}: choose it with precision=fp32|bf16|fp16 and drop "
                f"{section}.enabled"
            )
    comm = extra.get("communication_data_type")
    if comm is not None and str(comm).lower() != b.reduce_dtype:
        raise ValueError(
            f"backend.deepspeed_config.communication_data_type={comm} contradicts "
            f"backend.reduce_dtype={b.reduce_dtype}: the gradient reduction dtype is one setting "
            f"for every backend; set backend.reduce_dtype={str(comm).lower()} and drop the key"
        )
    accum = (extra.get("data_types") or {}).get("grad_accum_dtype")
    if accum is not None and stage > 1 and str(accum) != cfg.precision:
        raise ValueError(
            f"backend.deepspeed_config.data_types.grad_accum_dtype={accum} with backend={b.name}: "
            "DeepSpeed ZeRO-2/3 ignore it and accumulate gradients in the parameter dtype; for "
            "fp32 accumulation under bf16 use backend=zero1 (its default here) or backend=fsdp "
            "(fp32 gradient shards), or drop the key"
        )
    sync = resolve_sync(b)
    if stage == 1 and sync == "per_micro":
        raise ValueError(
            "backend.sync=per_micro with backend=zero1: ZeRO-1 reduces gradients at the "
            "accumulation boundary only (once per cycle, at no memory cost); use backend.sync=auto "
            "or per_cycle, or backend=zero2 to reduce on every micro-batch"
        )


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(cfg, plan, on_gpu: bool) -> dict:
    """The full DeepSpeed config for this run (user extras merged over the generated keys)."""
    b = cfg.backend
    stage = zero_stage(b)
    assert cfg.precision != "auto", "resolve precision=auto first (hardware.resolve_precision)"
    # overlap_comm: reduce gradient buckets on a side stream while backward goes on. DeepSpeed
    # turns it on by default for stage 3 only; stages 1/2 would reduce serially with backward.
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True}
    if b.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if b.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3 and b.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(b.param_persistence_threshold)
    ds = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "gradient_clipping": float(cfg.train.grad_clip),
        "zero_optimization": zero,
        # The torch optimizer (AdamW/SGD) is not on DeepSpeed's ZeRO-tested list.
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload with a torch optimizer: DeepSpeed would insist on CPUAdam (a JIT build).
        "zero_force_ds_cpu_optimizer": False,
        # backend.reduce_dtype: without it DeepSpeed reduces in the model dtype (bf16/fp16: its
        # engine's communication_data_type property), where fsdp reduces in fp32. ZeRO-1/2 cast
        # each bucket to it for the all-reduce; ZeRO-3 allocates its gradient bucket in it.
        "communication_data_type": b.reduce_dtype,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if stage == 1:
            # ZeRO-1 + bf16: accumulate the K micro-batches' gradients in fp32 (DeepSpeed's
            # BF16_Optimizer, the Megatron-DeepSpeed recipe) instead of rounding the running sum to
            # bf16 K times; it holds a full fp32 gradient (+4 B/param). ZeRO-2/3 have no such
            # mode: they accumulate in the parameter dtype (the planner warns for large K).
            ds["data_types"] = {"grad_accum_dtype": GRAD_ACCUM_ZERO1_BF16}
    elif cfg.precision == "fp16":
        # loss_scale 0 = dynamic loss scaling; an overflowing step is skipped and the scale halved.
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}  # fmt: skip
    return _merge(ds, _user_dict(b))
