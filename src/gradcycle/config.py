"""Typed config schema (Hydra ConfigStore) and validate(): every user error is raised here.

The dataclasses are the schema that Hydra merges `conf/*.yaml` into, so unknown keys and wrong
types are rejected at composition. `validate()` checks values and cross-field rules and raises a
`ValueError` that names the field and the fix; `gradcycle.cli` turns it into exit code 2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    name: str = "tiny"
    pretrained: str | None = None  # local path or hub id for from_pretrained
    pretrained_required: bool = False  # fine-tuning presets: refuse to start without pretrained
    # random init of another architecture: a folder with config.json, the file, or a hub id (the
    # Llama fields below are then unused; vocab_size, if set, replaces the config's)
    config: str | None = None
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (no GQA)
    intermediate_size: int = 384
    vocab_size: int | None = None  # None = the tokenizer's vocabulary
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    sync_batchnorm: bool = False
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    name: str = "stdlib"  # stdlib | stdlib_sft | files | hub | tokens
    # files: file, folder or glob; hub: dataset id or local dataset dir; tokens: a prepared dir
    path: str | None = None
    text_field: str = "text"
    format: str = "text"  # text | prompt_completion | chat (fine-tuning: loss on the answer only)
    prompt_field: str = "prompt"  # prompt_completion: the columns read
    completion_field: str = "completion"
    messages_field: str = "messages"  # chat: [{role, content}, ...]
    chat_template: str | None = None  # chat: a jinja file; None = the tokenizer's own template
    train_on: str = "all"  # chat: loss on all assistant turns, or only the last
    on_overlong: str = "skip"  # an example whose prompt alone fills data.seq_len: skip | error
    split: str = "train"
    seq_len: int = 256
    packing: bool = True
    document_mask: bool = False  # packed rows: positions, attention and targets per document
    tokenizer: str | None = None  # path or hub id; None = byte-level BPE trained locally, cached
    vocab_size: int = 4096  # for the locally trained tokenizer
    max_documents: int | None = None  # prepare: the source's first N documents
    val_fraction: float = 0.02  # prepare: documents held out for eval_loss
    cache_dir: str | None = None  # None = $GRADCYCLE_CACHE or ~/.cache/gradcycle
    num_workers: int = 2  # DataLoader worker processes per rank (0 = in the training process)
    prefetch_factor: int = 2  # micro-batches each worker computes ahead
    allow_changed: bool = False  # resume a checkpoint on a dataset with another fingerprint


@dataclass
class PrepareConfig:
    """python -m gradcycle.prepare, and data=stdlib|files|hub preparing into the cache."""

    out: str | None = None  # python -m gradcycle.prepare: the directory the shards go to
    num_proc: int | None = None  # tokenising processes; None = the machine's cores (at most 32)
    shard_mb: float = 1024.0  # about this many MB of tokens per shard
    dtype: str = "auto"  # auto | uint16 | uint32 (auto: uint16 when the vocabulary fits)


@dataclass
class TrainConfig:
    max_steps: int = 100
    global_batch_size: int | None = 16
    micro_batch_size: Any = 4  # int, or "auto" (planner)
    accumulation_steps: int | None = None  # alternative to global_batch_size
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still reported)
    eval_every: int = 50
    eval_batches: int = 8
    on_nonfinite: str = "skip"  # skip | halt
    log_every: int = 10


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    scale_rule: str = "none"  # none | linear | sqrt
    reference_batch_size: int | None = None  # global batch the lr and warmup were tuned for


@dataclass
class BackendConfig:
    name: str = "ddp"  # ddp | zero1 | zero2 | zero3 | fsdp | hsdp
    sync: str = "auto"  # auto | per_cycle | per_micro
    zero_stage: int = 0  # set by the zero* presets
    offload_optimizer: bool = False  # DeepSpeed: optimizer states in host memory
    offload_param: bool = False  # DeepSpeed ZeRO-3: parameters in host memory
    param_persistence_threshold: int | None = None  # ZeRO-3 stage3_param_persistence_threshold
    deepspeed_config: dict[str, Any] = field(default_factory=dict)  # merged into the generated one
    replicate: int | None = None  # hsdp: replica groups (default: number of nodes)
    # The dtype gradients are reduced in across ranks, every backend: fp32 (default) or the
    # training's 16-bit dtype (half the bytes). ddp: a comm hook; zero*: communication_data_type;
    # fsdp/hsdp: MixedPrecisionPolicy.reduce_dtype.
    reduce_dtype: str = "fp32"
    compile: bool = False
    dist_timeout_s: int = 300  # a dead rank makes the others fail after this, never hang
    startup_timeout_s: int = 1800  # the same bound for build/init/load, resume, checkpoint writes


@dataclass
class ActivationCheckpointingConfig:
    mode: str = "none"  # none | full | selective
    every: int = 2  # selective: checkpoint every Nth decoder layer


@dataclass
class LossConfig:
    impl: str = "chunked"  # chunked | full | liger (gradcycle/loss.py)
    chunk_tokens: Any = "auto"  # chunked: tokens whose fp32 logits exist at a time, or auto


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "gradcycle"
    name: str | None = None


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # 0 = only at the end
    keep: int = 2
    at_end: bool = True
    require_space: bool = False  # start-up: the next checkpoint would not fit -> stop, not warn


@dataclass
class HardwareConfig:
    """A device profile (conf/hardware/). name=auto: detected at start-up (gradcycle/hardware.py);
    a field left None there comes from the detected profile, one set explicitly is kept."""

    name: str = "auto"
    memory_gb: float | None = None
    bf16_tflops: float | None = None  # peak dense bf16 per device, for MFU; None = unknown
    intra_node_gbps: float | None = None  # per-device bus bandwidth, GB/s
    inter_node_gbps: float | None = None
    reserved_gb: float | None = None  # planner: memory_gb not available to tensors (context, NCCL)
    bf16: bool | None = None  # computes bf16 natively: the planner's precision=auto is bf16


@dataclass
class PlanConfig:
    """python -m gradcycle.plan, train.micro_batch_size=auto and backend.sync=auto."""

    format: str = "text"  # text | json
    mfu: float = 0.45  # model FLOPs utilisation assumed for the time and tokens/s estimates
    headroom: float = 0.9  # recommendations keep the predicted peak below this share of memory


@dataclass
class SimulateConfig:
    """python -m gradcycle.simulate: rank `rank` of the nodes x gpus_per_node job, on one CPU."""

    rank: int = 0
    format: str = "text"  # text | json


@dataclass
class Config:
    seed: int = 1234
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: hardware.resolve_precision)
    tf32: bool = True  # CUDA, precision=fp32: fp32 matmuls/convolutions in TF32
    run_dir: str | None = None  # None = outputs/<job id or timestamp>, one for all ranks
    resume: str = "none"  # none | auto | <checkpoint path>
    device: str = "auto"  # auto | cpu | cuda
    nodes: int = 1
    gpus_per_node: int = 8
    profile: bool = False  # torch.profiler trace + time split for profile_steps
    profile_steps: list[int] = field(default_factory=lambda: [2, 3])  # numbered from 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="gradcycle_schema", node=Config)


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

    check_config(cfg)  # data.* and prepare.* (gradcycle/data/checks.py)

    m = cfg.model
    if m.config is not None:
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

    check_folders(cfg)  # model.pretrained / data.tokenizer: a local folder is complete
    for key in ("memory_gb", "bf16_tflops", "intra_node_gbps", "inter_node_gbps"):
        _positive(f"hardware.{key}", cfg.hardware[key])
    _positive("hardware.reserved_gb", cfg.hardware.reserved_gb, allow_zero=True)
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
    if cfg.backend.offload_param and cfg.backend.name != "zero3":
        raise ValueError(
            "backend.offload_param needs backend=zero3 (only ZeRO-3 partitions parameters)"
        )
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
    if cfg.loss.impl == "liger":
        from gradcycle.loss import check_liger

        check_liger(cfg.device)
    if cfg.resume not in ("none", "auto") and not os.path.exists(cfg.resume):
        raise ValueError(
            f"resume={cfg.resume!r}: no such checkpoint (use resume=auto or resume=none)"
        )
