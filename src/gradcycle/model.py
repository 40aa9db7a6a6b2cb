"""Build the causal LM (from a config or pretrained), activation checkpointing, BatchNorm guard.

Activation checkpointing is applied here, once, before any backend wraps the model, so DDP,
FSDP2 and DeepSpeed all reuse it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradcycle import attention as attention_impl


def llama_config(model_cfg, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=model_cfg.vocab_size or vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads or model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rope_theta=model_cfg.rope_theta,
        tie_word_embeddings=model_cfg.tie_embeddings,
        use_cache=False,  # the KV cache breaks recomputation under activation checkpointing
    )


def architecture_config(model_cfg, vocab_size: int | None = None):
    """model.config: the config.json (a folder, the file, or a hub id) of the architecture to
    initialise at random, with model.vocab_size (if set) replacing its vocabulary size."""
    from transformers import AutoConfig

    from gradcycle.data.checks import _looks_local

    source = Path(model_cfg.config).expanduser()
    if _looks_local(model_cfg.config) and not source.exists():
        raise ValueError(f"model.config={model_cfg.config}: no such file or directory; give a "
                         "folder holding config.json, the file itself, or a hub id")  # fmt: skip
    if not source.exists():
        source = model_cfg.config  # a hub id: transformers fetches config.json (once, cached)
    try:
        config = AutoConfig.from_pretrained(
            str(source), trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model.config={model_cfg.config}: cannot read a config.json there ({e}); give a "
            "folder holding config.json, the file itself, or a hub id"
        ) from None
    if model_cfg.vocab_size:
        config.vocab_size = model_cfg.vocab_size
    if vocab_size is not None and getattr(config, "vocab_size", vocab_size) < vocab_size:
        raise ValueError(
            f"model.config={model_cfg.config}: its vocab_size={config.vocab_size} is smaller than "
            f"the tokenizer's {vocab_size} tokens: set model.vocab_size={vocab_size} (or more), "
            "or train with the architecture's own tokenizer (data.tokenizer=...)"
        )
    return config


def check_architecture(cfg) -> None:
    """model.config, in validation (before any process group): the config reads, is a causal LM
    transformers builds, fits data.seq_len, and every parameter has an init gradcycle can draw
    shard by shard; the chunked loss, FSDP and activation checkpointing find what they need."""
    from gradcycle.loss import attach
    from gradcycle.weights import init

    m = cfg.model
    if m.pretrained:
        raise ValueError(
            f"model.config={m.config} and model.pretrained={m.pretrained} are both set: "
            "model.config initialises an architecture at random, model.pretrained loads weights "
            "(with its own config.json); drop one"
        )
    config = architecture_config(m)
    try:
        with torch.device("meta"):
            model = _from_config(config, m, torch.float32)
    except ValueError as e:
        raise ValueError(f"model.config={m.config}: {type(config).__name__} is not a causal LM "
                         f"that transformers builds ({e})") from None  # fmt: skip
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.data.seq_len > limit:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.config={m.config}'s "
            f"max_position_embeddings={limit}: lower data.seq_len or raise it in the config.json"
        )
    try:
        init.init_plan(model)
        if cfg.backend.name in ("fsdp", "hsdp") or cfg.activation_checkpointing.mode != "none":
            decoder_layers(model)
        if cfg.loss.impl != "full":
            attach(model)
    except ValueError as e:
        raise ValueError(f"model.config={m.config}: {e}") from None


def hf_config(model_cfg, vocab_size: int):
    """The HF config: the pretrained model's own, model.config's architecture, or a Llama from
    model.* (training settings)."""
    if model_cfg.config:
        config = architecture_config(model_cfg, vocab_size)
    elif not model_cfg.pretrained:
        return llama_config(model_cfg, vocab_size)
    else:
        from transformers import AutoConfig

        from gradcycle.weights.pretrained import local_dir

        config = AutoConfig.from_pretrained(
            str(local_dir(model_cfg)), trust_remote_code=model_cfg.trust_remote_code
        )
    config.use_cache = False  # the KV cache breaks recomputation under activation checkpointing
    return config


def _from_config(config, model_cfg, dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
    from transformers import AutoModelForCausalLM

    from gradcycle.weights import names

    model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code,
                                             dtype=dtype, attn_implementation=attention)  # fmt: skip
    names.remember(model)  # the checkpoint key mapping, before FSDP2 renames the class
    return model


def build_model(model_cfg, vocab_size: int, device: str | torch.device = "cpu",
                seed: int | None = None, dtype: torch.dtype = torch.float32,
                attention: str = attention_impl.SDPA) -> nn.Module:  # fmt: skip
    """The causal LM (Llama from model.*, model.config's architecture, or model.pretrained) with
    its parameters in `dtype` on `device`, its attention `attention` (gradcycle/attention.py: SDPA
    without transformers' per-forward host sync, or flex for document masking; "sdpa" where the
    model needs transformers' own masks).

    "meta" builds the shapes without allocating, for a backend that allocates and fills its
    shards itself (gradcycle.weights). Any other device gets a real model, built on the meta
    device and allocated directly there (no host copy of a GPU model): random weights from
    `seed` (default: torch.initial_seed(), what seed_everything set) through
    gradcycle.weights.init, which every backend uses, so one seed gives the same weights
    everywhere; or the pretrained weights. Under ZeRO-3 (transformers' HfDeepSpeedConfig active)
    the parameters are partitioned as they are created and each rank fills only its partitions,
    from the same generator or straight from the safetensors files.
    """
    from transformers import AutoModelForCausalLM, initialization
    from transformers.integrations import is_deepspeed_zero3_enabled

    from gradcycle.weights import init, names, pretrained

    seed = torch.initial_seed() if seed is None else seed
    zero3 = is_deepspeed_zero3_enabled()
    config = hf_config(model_cfg, vocab_size)
    attention = attention_impl.for_config(attention, config)
    if model_cfg.pretrained and str(device) != "meta" and not zero3:
        # ddp, zero1/2 keep full parameters: transformers' loader, once, in the storage dtype.
        model = AutoModelForCausalLM.from_pretrained(
            str(pretrained.local_dir(model_cfg)), trust_remote_code=model_cfg.trust_remote_code,
            dtype=dtype, attn_implementation=attention,
        )  # fmt: skip
        model.config.use_cache = False
        names.remember(model)
        return model.to(device)
    if str(device) == "meta" or not zero3:
        with torch.device("meta"):
            model = _from_config(config, model_cfg, dtype, attention)
        if str(device) == "meta":
            return model
        model.to_empty(device=device)
        model.tie_weights()  # to_empty gives each module its own tensor: one parameter again
        init.init_parameters(model, seed)
        init.recompute_buffers(model)
        return model
    # ZeRO-3: no init at construction (transformers' own would gather every module).
    with torch.device(device), initialization.no_init_weights(), _no_zero3_hf_init():
        model = _from_config(config, model_cfg, dtype, attention)
    model.tie_weights()  # skipped with the init above; tied embeddings are one parameter
    if model_cfg.pretrained:
        pretrained.load_into(model, pretrained.local_dir(model_cfg))
    else:
        init.init_parameters(model, seed)
    return model


@contextlib.contextmanager
def _no_zero3_hf_init():
    """transformers' from_config under ZeRO-3 re-initialises every module on gathered full
    parameters (initialize_weights_zero3); gradcycle fills the partitions itself."""
    from transformers.integrations import deepspeed as hf_ds

    original = getattr(hf_ds, "initialize_weights_zero3", None)
    if original is None:  # another transformers: its init runs and is overwritten, just slower
        yield
        return
    hf_ds.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_ds.initialize_weights_zero3 = original


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks: the unit of checkpointing and of FSDP sharding."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(
        f"{type(model).__name__}: cannot find its decoder layers (looked for model.layers, "
        "transformer.h, gpt_neox.layers): activation checkpointing and FSDP need them"
    )


def checkpointed_layers(n_layers: int, mode: str, every: int) -> list[int]:
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_layers))
    return [i for i in range(n_layers) if i % every == every - 1]


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> list[int]:
    """Recompute the chosen decoder layers in backward (non-reentrant torch checkpoint).

    The layer's own `forward` is wrapped rather than the module replaced, so state-dict keys stay
    those of the plain model (checkpoints and HF export need no key rewriting) and the hooks that
    FSDP2 and ZeRO-3 attach to the module still run outside the recomputed region.
    """
    layers = decoder_layers(model)
    chosen = checkpointed_layers(len(layers), mode, every)
    for i in chosen:
        layer = layers[i]
        inner = layer.forward
        layer.forward = functools.partial(_checkpointed, inner)
    return chosen


def _checkpointed(inner, *args, **kwargs):
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def batchnorm_guard(
    model: nn.Module, micro_batch_size: int, sync_batchnorm: bool, distributed: bool
):
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_bn:
        return model
    if sync_batchnorm and distributed:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if micro_batch_size < 8:
        warnings.warn(
            f"the model has BatchNorm layers and train.micro_batch_size={micro_batch_size} < 8: "
            "batch statistics over so few samples are noisy and accumulation does not fix them. "
            "Set model.sync_batchnorm=true (SyncBatchNorm across ranks) or use GroupNorm/LayerNorm.",
            stacklevel=2,
        )
    return model


def count_params(model: nn.Module) -> int:
    # ZeRO-3 leaves an empty local tensor in each parameter; ds_numel is its full size.
    return sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters())
