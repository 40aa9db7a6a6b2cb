"""The model's attention implementation: plain causal SDPA without a host sync, or flex_attention.

transformers 5.24 builds the attention mask inside every forward (masking_utils.create_causal_mask)
and, given position ids but no mask, looks for packed sequences in them
(`find_packed_sequence_indices`, masking_utils.py:761): a `.all()` read on the host, i.e. one
device -> host sync per micro-batch. Mask building is skipped for an implementation it has no
mask function for (`_preprocess_mask_arguments`, masking_utils.py:830) and for a 4-D mask passed
in (masking_utils.py:818). So gradcycle registers its own two names:

  gradcycle_sdpa            transformers' own SDPA forward, called with no mask (is_causal=True:
                            flash / efficient / cuDNN, GQA through enable_gqa) or with the dense
                            document mask the batch carries;
  gradcycle_flex_attention  flex_attention with the block-sparse BlockMask of the batch's
                            documents (data/masking.py), compiled once on CUDA.

Which one a run gets, and which document mask: planner/attention.py (`mask_kind`), the rule the
planner sizes. A model whose layers are not all plain causal attention (sliding windows, ...)
keeps transformers' "sdpa" and its own masks.
"""

from __future__ import annotations

import functools

from gradcycle.planner.attention import mask_kind

SDPA = "gradcycle_sdpa"
FLEX = "gradcycle_flex_attention"


def implementation(document_mask: bool, device_type: str) -> str:
    """The attention a run's model gets: flex for document masking on CUDA (where Triton can
    compile it), else SDPA (with a dense mask under document masking)."""
    if mask_kind(document_mask, device_type) == "flex" and flex_available():
        return FLEX
    return SDPA


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def for_config(name: str, config) -> str:
    """`name`, or transformers' "sdpa" where the model needs the masks transformers builds."""
    windows = [getattr(config, a, None) for a in ("sliding_window", "attention_chunk_size")]
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    causal = getattr(config, "is_causal", True)
    return name if not any(windows) and layer_types == {"full_attention"} and causal else "sdpa"


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):  # e.g. a batch without documents
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("flex_attention here has no dropout: set the model's attention_dropout=0")
    heads = query.shape[1]
    gqa = key.shape[1] != heads
    if gqa and heads & (heads - 1):  # as transformers does: flex's GQA wants 2^n query heads
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // key.shape[1])
        gqa = False
    out = _flex_fn(query.device.type)(query, key, value, block_mask=attention_mask, scale=scaling,
                                      enable_gqa=gqa)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _flex_fn(device_type: str):
    """Compiled on CUDA (the fused kernel: q, k, v, out and a log-sum-exp kept, no scores).
    Elsewhere the eager reference (scores materialised, forward only on CPU): tests only."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        import torch

        return torch.compile(flex_attention)  # widths vary: dynamic after a recompile

    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    return eager


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SDPA, _sdpa)
    AttentionInterface.register(FLEX, _flex)


_register()
