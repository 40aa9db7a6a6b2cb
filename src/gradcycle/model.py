"""Build the causal LM (from a config or pretrained), activation checkpointing, BatchNorm guard.

Activation checkpointing is applied here, once, before any backend wraps the model, so DDP,
FSDP2 and DeepSpeed all reuse it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

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


def hf_config(model_cfg, vocab_size: int):
    """The HF config: the pretrained model's own, or a Llama from model.* (training settings)."""
    if not model_cfg.pretrained:
        return llama_config(model_cfg, vocab_size)
    from transformers import AutoConfig

    from gradcycle.weights.pretrained import local_dir

    config = AutoConfig.from_pretrained(
        str(local_dir(model_cfg)), trust_remote_code=model_cfg.trust_remote_code
    )
    config.use_cache = False
    return config


def build_model(model_cfg, vocab_size: int, device: str | torch.device = "cpu",
                seed: int | None = None, dtype: torch.dtype = torch.float32,
                attention: str = attention_impl.SDPA) -> nn.Module:  # fmt: skip
    """A Llama-style causal LM on `device`, its parameters stored in `dtype`, its attention
    `attention` (gradcycle/attention.py: SDPA without transformers' per-forward host sync, or
    flex for document masking; "sdpa" where the model needs transformers' own masks).

    "meta" builds the shapes without allocating (fp32: FSDP2's shards are fp32 masters), for a
    backend that allocates and fills its shards itself (gradcycle.weights). Otherwise the model
    is real: random weights from `seed` (default: torch.initial_seed(), what seed_everything set)
    through gradcycle.weights.init, which every backend uses, so one seed gives the same weights
    everywhere; or the pretrained weights. Under ZeRO-3 (transformers' HfDeepSpeedConfig
    active) the parameters are partitioned as they are created and each rank fills only its
    partitions, from the same generator or straight from the safetensors files.
    """
    from transformers import AutoModelForCausalLM, initialization
    from transformers.integrations import is_deepspeed_zero3_enabled

    from gradcycle.weights import init, pretrained

    remote = model_cfg.trust_remote_code
    config = hf_config(model_cfg, vocab_size)
    attention = attention_impl.for_config(attention, config)
    if model_cfg.pretrained and str(device) != "meta" and not is_deepspeed_zero3_enabled():
        # ddp, zero1/2 keep full parameters: transformers' loader, once, in the storage dtype.
        model = AutoModelForCausalLM.from_pretrained(
            str(pretrained.local_dir(model_cfg)), trust_remote_code=remote, dtype=dtype,
            attn_implementation=attention,
        )  # fmt: skip
        model.config.use_cache = False
        return model.to(device)
    if str(device) == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=remote, dtype=torch.float32, attn_implementation=attention
            )
    # No init at construction (transformers' own ZeRO-3 init would gather every module).
    with torch.device(device), initialization.no_init_weights(), _no_zero3_hf_init():
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=remote, dtype=dtype, attn_implementation=attention
        )
    model.tie_weights()  # skipped with the init above; tied embeddings are one parameter
    if model_cfg.pretrained:
        pretrained.load_into(model, pretrained.local_dir(model_cfg))
    else:
        init.init_parameters(model, torch.initial_seed() if seed is None else seed)
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
