"""The planner's inputs from the config: model shape, topology, batch cuts and one `Setup`.

Training and planning must agree on what a config means, so the batch check is training's own
(`batching.plan_from_config`) and the DeepSpeed values are read from the DeepSpeed config that
`backends/ds_config.build_ds_config` generates for the run (user extras merged), never re-guessed.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

from gradcycle.planner.attention import mask_kind, resolve_precision
from gradcycle.planner.memory import GIB, Setup, Shape
from gradcycle.planner.zero import ZeroSettings, settings


class UnknownShape(ValueError):
    """The planner cannot size this model (not Llama-shaped, or no vocabulary size)."""


def shape_from_config(cfg, vocab: int | None = None) -> Shape:
    m = cfg.model
    if m.pretrained or m.config:
        return _pretrained_shape(m)
    vocab = m.vocab_size or vocab or (None if cfg.data.tokenizer else cfg.data.vocab_size)
    if vocab is None:
        raise UnknownShape(
            f"the planner needs the vocabulary size and data.tokenizer={cfg.data.tokenizer!r} is "
            "not read here: set model.vocab_size=<the tokenizer's size>"
        )
    kv = m.num_kv_heads or m.num_heads
    return Shape(int(vocab), m.hidden_size, m.num_layers, m.num_heads, kv, m.intermediate_size,
                 bool(m.tie_embeddings))  # fmt: skip


def _pretrained_shape(m) -> Shape:
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(m.pretrained or m.config, local_files_only=True,
                                        trust_remote_code=m.trust_remote_code)  # fmt: skip
        return Shape(m.vocab_size or hf.vocab_size, hf.hidden_size, hf.num_hidden_layers,
                     hf.num_attention_heads,
                     getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                     hf.intermediate_size, bool(getattr(hf, "tie_word_embeddings", False)))  # fmt: skip
    except Exception as e:  # not local, or not Llama-shaped: the planner cannot size it
        field = (
            f"model.pretrained={m.pretrained!r}" if m.pretrained else f"model.config={m.config!r}"
        )
        raise UnknownShape(f"{field}: cannot read a Llama-style "
                           f"config locally ({type(e).__name__}: {e})") from None  # fmt: skip


def topology(cfg, world: int | None = None, nodes: int | None = None) -> tuple[int, int, int]:
    """(data-parallel world, nodes, GPUs per node): the config's nodes x gpus_per_node, or the
    launcher's world when training."""
    if world is None:
        world, nodes = cfg.nodes * cfg.gpus_per_node, cfg.nodes
    nodes = max(1, nodes or cfg.nodes)
    if world % nodes:
        nodes = 1
    return world, nodes, max(1, world // nodes)


def shard_size(cfg, backend: str, world: int, nodes: int) -> int:
    if backend != "hsdp":
        return world
    replicate = cfg.backend.replicate or nodes
    return world // replicate if replicate and world % replicate == 0 else world


def budget_bytes(cfg) -> float:
    return (cfg.hardware.memory_gb - (cfg.hardware.reserved_gb or 0.0)) * GIB


def zero_settings(cfg, backend: str) -> ZeroSettings:
    """The zero_optimization values of the DeepSpeed config this run would get."""
    from gradcycle.backends.ds_config import build_ds_config

    probe = cfg
    if cfg.backend.name != backend:  # an alternative backend: the same extras under its stage
        probe = copy.deepcopy(cfg)
        probe.backend.name, probe.backend.zero_stage = backend, int(backend[-1])
    batch = SimpleNamespace(global_batch_size=1, micro_batch_size=1, accumulation_steps=1)
    ds = build_ds_config(probe, batch, on_gpu=True)
    return settings(ds.get("zero_optimization") or {}, ds.get("data_types"),
                    ds.get("communication_data_type"))  # fmt: skip


def sync_options(cfg, backend: str, world: int) -> list[str]:
    """Policies the backend accepts; `auto` chooses among them."""
    if cfg.backend.sync != "auto":
        return [cfg.backend.sync]
    if world == 1 or backend in ("ddp", "zero1"):
        return ["per_cycle"]  # free (nothing to sync, or the gradient is full anyway)
    options = ["per_micro", "per_cycle"]
    if backend.startswith("zero"):  # DeepSpeed rejects some combinations: ask its own check
        from gradcycle.backends.ds_config import check_user_config

        probe = copy.deepcopy(cfg)
        probe.backend.name, probe.backend.zero_stage = backend, int(backend[-1])
        options = [s for s in options if _accepted(check_user_config, probe, s)]
    return options


def _accepted(check, cfg, sync: str) -> bool:
    cfg.backend.sync = sync
    try:
        check(cfg)
    except ValueError:
        return False
    return True


def global_batch(cfg, world: int) -> int:
    """The global batch every cut keeps: train.global_batch_size, or what the configured
    micro-batch and accumulation give."""
    t = cfg.train
    if t.global_batch_size:
        return t.global_batch_size
    if t.micro_batch_size == "auto":
        raise ValueError(
            "train.micro_batch_size=auto keeps the global batch fixed and needs "
            f"train.global_batch_size (got train.accumulation_steps={t.accumulation_steps}): "
            "set train.global_batch_size=<samples per step> train.accumulation_steps=null"
        )
    return int(t.micro_batch_size) * world * t.accumulation_steps


def check_batch(cfg, world: int) -> None:
    """Training's batch arithmetic for a fixed micro-batch: the same ValueError, word for word,
    that train.py raises for this world size."""
    from gradcycle.batching import plan_from_config

    if cfg.train.micro_batch_size != "auto":
        plan_from_config(cfg, world)


def micro_options(cfg, world: int) -> list[int]:
    """Every micro-batch that splits this rank's share of the global batch evenly."""
    g = global_batch(cfg, world)
    per_rank, rem = divmod(g, world)
    if rem or not per_rank:
        raise ValueError(
            f"global batch {g} does not split over {world} data-parallel ranks: set "
            f"train.global_batch_size to a multiple of {world}"
        )
    return [d for d in range(1, per_rank + 1) if per_rank % d == 0]


def make_setup(cfg, shape: Shape, world: int, nodes: int, micro: int, sync: str,
               ac: tuple[str, int], backend: str | None = None,
               zero: ZeroSettings | None = None) -> Setup:  # fmt: skip
    from gradcycle.model import checkpointed_layers

    b = backend or cfg.backend.name
    target = "cpu" if cfg.hardware.name == "cpu" else "cuda"  # the device the plan sizes
    if zero is None:
        zero = zero_settings(cfg, b) if b.startswith("zero") else ZeroSettings()
    return Setup(
        shape=shape, seq=cfg.data.seq_len, micro=micro,
        accumulation=max(1, global_batch(cfg, world) // (micro * world)),
        backend=b, world=world, shard=shard_size(cfg, b, world, nodes),
        precision=resolve_precision(cfg.precision, target),
        sync=sync, checkpointed=tuple(checkpointed_layers(shape.layers, ac[0], ac[1])),
        optimizer=cfg.optim.name, momentum=cfg.optim.momentum,
        reduce_dtype=cfg.backend.reduce_dtype,
        offload_optimizer=cfg.backend.offload_optimizer and b.startswith("zero"),
        offload_param=cfg.backend.offload_param and b == "zero3",
        zero=zero, loss=cfg.loss.impl, loss_chunk=cfg.loss.chunk_tokens,
        device=target, attention_mask=mask_kind(cfg.data.document_mask, target),
    )  # fmt: skip
