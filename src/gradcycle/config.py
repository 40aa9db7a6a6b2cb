"""Typed config schema (Hydra ConfigStore).

The dataclasses are the schema that Hydra merges `conf/*.yaml` into, so unknown keys and wrong
types are rejected at composition. Values and cross-field rules: `gradcycle.validation.validate()`.
"""

from __future__ import annotations

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
    sync_batchnorm: bool = False  # BatchNorm statistics over all ranks' micro-batches
    # BatchNorm with fewer than 8 samples per statistic (micro, x ranks under sync): stop (false:
    # train anyway); bn_momentum=per_cycle: m' = 1-(1-m)^(1/K), K updates decay like one per step
    batchnorm_guard: bool = True
    bn_momentum: str = "as_is"  # as_is | per_cycle
    # task=image: the HF config of an AutoModelForImageClassification (model_type + its fields)
    image: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False


@dataclass
class ImageDataConfig:
    """task=image: data=shapes (generated, embedded) or data=imagefolder (data.path)."""

    size: int = 32  # pixels per side, what the model sees
    num_classes: int = 8  # shapes: classes generated (imagefolder: its class folders)
    train_samples: int = 8192  # shapes: images in the train split (generated on the fly)
    val_samples: int = 512
    augment: bool = True  # train split: random resized crop + horizontal flip, seeded per sample
    crop_scale: float = 0.6  # augment: the smallest share of the image a crop keeps
    mean: list[float] | None = None  # None: the image processor's (model.pretrained), else 0.5
    std: list[float] | None = None
    convert_rgb: bool = False  # imagefolder: convert grayscale/RGBA images instead of refusing
    verify: str = "header"  # imagefolder start-up check: header (+ PNG CRCs) | full decode | off


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
    image: ImageDataConfig = field(default_factory=ImageDataConfig)  # task=image


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
    # Host offload (docs/planner.md "Host memory"): zero1-3 offload the optimizer (fp32 masters,
    # moments, fp32 gradients) and zero3 the parameters too; fsdp/hsdp: offload_param=true is
    # FSDP2's CPUOffloadPolicy (parameter and gradient shards on the host, optimizer step there).
    offload_optimizer: bool = False
    offload_param: bool = False
    offload_device: str = "cpu"  # cpu | nvme (DeepSpeed's ZeRO-Infinity; needs nvme_path)
    nvme_path: str | None = None  # a folder on a local NVMe drive, one per node
    nvme_buffer_count: int = 5  # DeepSpeed offload_param.buffer_count (pinned swap buffers)
    nvme_buffer_size: int = 100_000_000  # elements per parameter swap buffer (buffer_size)
    param_persistence_threshold: int | None = None  # ZeRO-3 stage3_param_persistence_threshold
    deepspeed_config: dict[str, Any] = field(default_factory=dict)  # merged into the generated one
    replicate: int | None = None  # hsdp: replica groups (default: number of nodes)
    # The dtype gradients are reduced in across ranks, every backend: fp32 (default) or the
    # training's 16-bit dtype (half the bytes). ddp: a comm hook; zero*: communication_data_type;
    # fsdp/hsdp: MixedPrecisionPolicy.reduce_dtype.
    reduce_dtype: str = "fp32"
    compile: bool = False
    pp: int = 1  # pipeline stages (backends/pipeline.py) with ddp/fsdp/hsdp; mesh pp x dp
    # gpipe | 1f1b | interleaved_1f1b | looped_bfs | interleaved_zb | zbv | dualpipev
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1  # stages per rank (interleaved*, looped_bfs: >= 2; zbv, dualpipev: 2)
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
    # The node around the GPUs (planner/host.py): host memory, cores, links; auto: this machine's
    # memory and cores, the profile's links.
    host_memory_gb: float | None = None  # GiB of host memory per node
    host_reserved_gb: float | None = None  # of it, kept for the OS, daemons, file systems
    host_cores: int | None = None  # physical cores per node (host optimizer threads)
    host_adam_gparams: float | None = None  # torch fused AdamW on the host, Gparam/s per core
    host_memory_gbps: float | None = None  # host memory bandwidth per node (caps the AdamW rate)
    pcie_gbps: float | None = None  # host <-> GPU per GPU and direction, GB/s
    gpus_per_pcie_uplink: int | None = None  # GPUs sharing one PCIe uplink to the CPU
    nvme_gb: float | None = None  # local NVMe capacity per node, GB
    nvme_read_gbps: float | None = None  # per node, GB/s
    nvme_write_gbps: float | None = None


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
    task: str = "lm"  # lm (causal LM) | image (image classification: gradcycle/vision)
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
