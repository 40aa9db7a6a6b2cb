"""Build the causal LM (from a config or pretrained), activation checkpointing, BatchNorm guard.

Activation checkpointing is applied here, once, before any backend wraps the model, so DDP,
FSDP2 and DeepSpeed all reuse it.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


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
        attn_implementation="sdpa",
    )


def build_model(model_cfg, vocab_size: int, device: str | torch.device = "cpu") -> nn.Module:
    """A Llama-style causal LM on `device` ("meta" builds the shapes without allocating)."""
    from transformers import AutoModelForCausalLM

    if model_cfg.pretrained:
        if str(device) == "meta":
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(
                model_cfg.pretrained, trust_remote_code=model_cfg.trust_remote_code
            )
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(
                    hf_cfg, trust_remote_code=model_cfg.trust_remote_code
                )
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.pretrained,
            trust_remote_code=model_cfg.trust_remote_code,
            dtype=torch.float32,
            attn_implementation="sdpa",
        )
        model.config.use_cache = False
        return model.to(device)
    from transformers import initialization

    # Construct without torch's default init, then run HF's init once: exactly what transformers
    # does under ZeRO-3's zero.Init, so one seed gives the same initial weights on every backend
    # (a plain from_config draws the default init first and ends on different values).
    with torch.device(device), initialization.no_init_weights():
        model = AutoModelForCausalLM.from_config(llama_config(model_cfg, vocab_size))
    model.initialize_weights()
    model.tie_weights()  # model.tie_embeddings=true: initialize_weights() alone leaves them untied
    return model


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
