"""validate(): every user error in a composed config is raised here, before anything starts.

It checks values and cross-field rules and raises a `ValueError` that names the field, the
numbers and the fix; `gradcycle.cli` turns it into exit code 2. Checks that belong to one area
live beside it and are called from here (data/checks.py, vision/checks.py, offload.py,
backends/pipeline_checks.py, backends/ds_config.py). The schema itself: config.py.
"""

from __future__ import annotations

import math
import os
from typing import Any

BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(
            f"{name}={value!r} is not valid: choose one of {', '.join(map(str, choices))}"
        )


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        raise ValueError(f"{name}={value} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value} is out of range: it must be {bound}")


def validate(cfg: Any, this_machine: bool = True) -> None:
    """Check every user-facing value; raise ValueError naming the field and the fix.
    `this_machine=False` (the planner, sizing a target cluster) skips the checks that ask this
    machine's devices (DeepSpeed's fp16 support)."""
    _one_of("task", cfg.task, ("lm", "image"))
    _one_of("precision", cfg.precision, ("auto", "fp32", "bf16", "fp16"))
    _one_of("device", cfg.device, ("auto", "cpu", "cuda"))
    _one_of("backend.name", cfg.backend.name, BACKENDS)
    _one_of("backend.sync", cfg.backend.sync, ("auto", "per_cycle", "per_micro"))
    _one_of("backend.reduce_dtype", cfg.backend.reduce_dtype, ("fp32", "bf16", "fp16"))
    if cfg.precision != "auto" and cfg.backend.reduce_dtype not in ("fp32", cfg.precision):
        other = cfg.precision if cfg.precision != "fp32" else None
        raise ValueError(
            f"backend.reduce_dtype={cfg.backend.reduce_dtype} with precision={cfg.precision}: "
            "gradients are reduced in fp32 or in the training's 16-bit dtype; use "
            f"backend.reduce_dtype=fp32{f' or {other}' if other else ''}, or "
            f"precision={cfg.backend.reduce_dtype}"
        )
    _one_of("optim.name", cfg.optim.name, ("adamw", "sgd"))
    _one_of("optim.schedule", cfg.optim.schedule, ("cosine", "linear", "constant"))
    _one_of("optim.scale_rule", cfg.optim.scale_rule, ("none", "linear", "sqrt"))
    _one_of("activation_checkpointing.mode", cfg.activation_checkpointing.mode,
            ("none", "full", "selective"))  # fmt: skip
    _one_of("train.on_nonfinite", cfg.train.on_nonfinite, ("skip", "halt"))
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("disabled", "offline", "online"))
    _one_of("plan.format", cfg.plan.format, ("text", "json"))
    _one_of("simulate.format", cfg.simulate.format, ("text", "json"))
    if not (0 < cfg.plan.mfu <= 1 and 0 < cfg.plan.headroom <= 1):
        raise ValueError(
            f"plan.mfu={cfg.plan.mfu} and plan.headroom={cfg.plan.headroom} must be within (0, 1]"
        )

    if not math.isfinite(cfg.optim.lr) or cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr={cfg.optim.lr} must be > 0 and finite (e.g. optim.lr=3e-4)")
    for name in ("beta1", "beta2"):
        if not 0 <= cfg.optim[name] < 1:
            raise ValueError(f"optim.{name}={cfg.optim[name]} must be within [0, 1), e.g. 0.9")
    _positive("optim.eps", cfg.optim.eps)
    _positive("optim.momentum", cfg.optim.momentum, allow_zero=True)
    _positive("optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _positive("optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be within [0, 1]")
    if cfg.optim.scale_rule != "none" and cfg.optim.reference_batch_size is None:
        raise ValueError(
            f"optim.scale_rule={cfg.optim.scale_rule} needs optim.reference_batch_size: the global "
            "batch size optim.lr was tuned for (e.g. optim.reference_batch_size=256)"
        )
    _positive("optim.reference_batch_size", cfg.optim.reference_batch_size)
    if cfg.model.pretrained_required and not cfg.model.pretrained:
        raise ValueError("model.pretrained is required by this config (a fine-tuning preset, "
                         "model.pretrained_required=true): set model.pretrained=<save_pretrained "
                         "folder or hub id> of the model to fine-tune")  # fmt: skip
    _positive("train.max_steps", cfg.train.max_steps)
    _positive("train.grad_clip", cfg.train.grad_clip, allow_zero=True)
    _positive("train.eval_every", cfg.train.eval_every, allow_zero=True)
    _positive("train.eval_batches", cfg.train.eval_batches)
    _positive("train.log_every", cfg.train.log_every)
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("nodes", cfg.nodes)
    _positive("gpus_per_node", cfg.gpus_per_node)
    _positive("backend.dist_timeout_s", cfg.backend.dist_timeout_s)
    _positive("backend.startup_timeout_s", cfg.backend.startup_timeout_s)
    _positive("backend.replicate", cfg.backend.replicate)
    _positive("activation_checkpointing.every", cfg.activation_checkpointing.every)
    if cfg.profile and not any(1 <= s <= cfg.train.max_steps for s in cfg.profile_steps):
        raise ValueError(
            f"profile=true but profile_steps={list(cfg.profile_steps)} names no step in "
            f"1..train.max_steps={cfg.train.max_steps}: e.g. profile_steps=[2,3]"
        )

    # The batch sizes are checked in full by batching.plan_batch once the world size is known.
    mbs = cfg.train.micro_batch_size
    if not (mbs == "auto" or (isinstance(mbs, int) and not isinstance(mbs, bool))):
        raise ValueError(f"train.micro_batch_size={mbs!r} must be a positive integer or 'auto'")
    if isinstance(mbs, int):
        _positive("train.micro_batch_size", mbs)
    _positive("train.global_batch_size", cfg.train.global_batch_size)
    _positive("train.accumulation_steps", cfg.train.accumulation_steps)
    if (cfg.train.global_batch_size is None) == (cfg.train.accumulation_steps is None):
        raise ValueError(
            "set exactly one of train.global_batch_size and train.accumulation_steps "
            f"(got {cfg.train.global_batch_size} and {cfg.train.accumulation_steps}); "
            "e.g. train.accumulation_steps=null to derive it from the global batch"
        )

    from gradcycle.data.checks import check_config

    image = cfg.task == "image"
    if image:
        from gradcycle.vision.checks import check_image

        check_image(cfg)  # data=shapes|imagefolder, model.image / model.pretrained, BatchNorm
    elif cfg.model.image or cfg.data.name in ("shapes", "imagefolder"):
        raise ValueError(f"model.image / data={cfg.data.name} are image classification settings: "
                         "set task=image (or use a causal-LM model and text data)")  # fmt: skip
    else:
        check_config(cfg)  # data.* and prepare.* (gradcycle/data/checks.py)

    m = cfg.model
    if image:
        pass
    elif m.config is not None:
        from gradcycle.model import check_architecture

        check_architecture(cfg)  # readable, a causal LM, every parameter drawable shard by shard
    elif m.pretrained is None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _positive(f"model.{name}", getattr(m, name))
        if m.hidden_size % m.num_heads:
            raise ValueError(
                f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}"
            )
        kv = m.num_kv_heads or m.num_heads
        if m.num_heads % kv:
            raise ValueError(
                f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={kv}"
            )
    from gradcycle.data.checks import check_folders

    if not image:
        check_folders(cfg)  # model.pretrained / data.tokenizer: a local folder is complete
    for key in ("memory_gb", "bf16_tflops", "intra_node_gbps", "inter_node_gbps"):
        _positive(f"hardware.{key}", cfg.hardware[key])
    _positive("hardware.reserved_gb", cfg.hardware.reserved_gb, allow_zero=True)
    for key in ("host_memory_gb", "host_cores", "host_adam_gparams", "host_memory_gbps",
                "pcie_gbps", "gpus_per_pcie_uplink", "nvme_gb", "nvme_read_gbps",
                "nvme_write_gbps"):  # fmt: skip
        _positive(f"hardware.{key}", cfg.hardware[key])
    _positive("hardware.host_reserved_gb", cfg.hardware.host_reserved_gb, allow_zero=True)
    if cfg.hardware.name != "auto" and cfg.hardware.memory_gb is None:
        raise ValueError(
            f"hardware={cfg.hardware.name} sets no hardware.memory_gb: give the profile its memory "
            "(GiB per device), or use hardware=auto"
        )

    if cfg.backend.deepspeed_config and not cfg.backend.name.startswith("zero"):
        raise ValueError(
            f"backend.deepspeed_config is set but backend={cfg.backend.name} is not DeepSpeed: "
            "use backend=zero1|zero2|zero3 or remove backend.deepspeed_config"
        )
    from gradcycle.offload import check_config as check_offload

    check_offload(cfg, this_machine)  # backend.offload_* / nvme_*: gradcycle/offload.py
    from gradcycle.backends.ds_config import check_user_config

    check_user_config(cfg)  # DeepSpeed's own rules (batch keys, sync), before any process group
    if this_machine and cfg.precision == "fp16" and cfg.backend.name.startswith("zero"):
        from gradcycle.backends.ds_config import deepspeed_supports_fp16
        from gradcycle.distributed import device_type

        where = device_type(cfg.device)
        if not deepspeed_supports_fp16(where):
            raise ValueError(
                f"precision=fp16 with backend={cfg.backend.name}: DeepSpeed does not support fp16 "
                f"on this {where.upper()} (its accelerator reports no fp16 kernels, e.g. a CPU "
                "without AVX512-FP16/AMX); use precision=bf16 or precision=fp32, or "
                "backend=ddp for fp16 autocast with a GradScaler"
            )
    if cfg.precision == "fp16" and cfg.backend.name in ("fsdp", "hsdp"):
        raise ValueError(
            f"precision=fp16 with backend={cfg.backend.name}: FSDP2 has no sharded fp16 loss scaler "
            "here; use precision=bf16"
        )
    _one_of("loss.impl", cfg.loss.impl, ("chunked", "full", "liger"))
    chunk = cfg.loss.chunk_tokens
    if chunk != "auto" and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
        raise ValueError(f"loss.chunk_tokens={chunk!r} must be a positive integer or 'auto' "
                         "(liger-kernel's rule: planner/loss.py chunk_for)")  # fmt: skip
    from gradcycle.backends.pipeline_checks import check_config as check_pipeline

    check_pipeline(cfg)  # backend.pp*: schedules, stages, what pp does not support yet
    if cfg.loss.impl == "liger":
        from gradcycle.loss import check_liger

        check_liger(cfg.device)
    if cfg.resume not in ("none", "auto") and not os.path.exists(cfg.resume):
        raise ValueError(
            f"resume={cfg.resume!r}: no such checkpoint (use resume=auto or resume=none)"
        )
