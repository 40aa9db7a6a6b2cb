"""Which attention kernel a run gets on its target device, and the bytes it keeps (no torch).

One rule for three users: the planner (memory.py), the runtime's choice of implementation and
document mask (gradcycle/attention.py) and a simulator that makes fake SDPA allocate what the
target's kernel does. Read from the installed sources:

transformers 5.24 (integrations/sdpa_attention.py `use_gqa_in_sdpa`, `sdpa_attention_forward`):
  without a mask SDPA gets `is_causal=True` and, for GQA, `enable_gqa=True`; with a mask it gets
  `repeat_kv`-expanded K/V (every head materialised) and the mask.
torch 2.13 on CUDA (aten/.../cuda/sdp_utils.cpp, header sdp_utils_cpp.h:397 in the wheel):
  flash      fp16/bf16 only, no attn_mask, head_dim <= 256, GQA through enable_gqa;
  efficient  fp32/fp16/bf16, takes a mask (converted to an additive bias in the query dtype, one
             per call, saved for backward), head_dim a multiple of 8 (16-bit) / 4 (fp32), but
             NOT enable_gqa (`check_batch_size_and_num_heads_dense<false>`; native GQA in the
             efficient kernel landed later, pytorch#191085);
  cuDNN      16-bit only; where torch prefers it (recent cuDNN on sm90/sm100) it replaces flash or
             efficient with the same O(T) memory per head, so it is not told apart here;
  math       anything: saves q and k scaled (k at every query head), v (expanded for GQA) and the
             b·h·T² softmax in fp32.
  So fp32 with GQA and no mask (llama-1b, llama-70b at precision=fp32) runs the math kernel.
torch 2.13 on CPU: the CPU flash kernel takes fp32/bf16, masks and GQA (saves q, k, v, out, a
  log-sum-exp and, with a mask, the bias in the query dtype): measured, tests/test_attention.py.
flex_attention: compiled (CUDA) it keeps q, k, v, out and a log-sum-exp like flash, in any dtype,
  GQA native; uncompiled it materialises the scores (gradcycle only runs it compiled on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

from gradcycle.data.masking import FLEX_BLOCK  # the tile the BlockMask is built from


def resolve_precision(precision: str, device: str) -> str:
    """precision=auto: bf16 on a CUDA device (every GPU profile here supports it), else fp32."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def mask_kind(document_mask: bool, device: str) -> str:
    """How packed documents are kept apart: `none` (no document masking: SDPA with is_causal),
    `flex` (a block-sparse BlockMask, CUDA) or `dense` (a (b,1,T,T) boolean mask for SDPA, the
    fallback: on CPU, where flex_attention has no backward, or without Triton)."""
    if not document_mask:
        return "none"
    return "flex" if device == "cuda" else "dense"


def kernel_for(device: str, precision: str, heads: int, kv_heads: int, head_dim: int,
               mask: str = "none") -> str:  # fmt: skip
    """The kernel that runs: flash | efficient | math | flex | cpu_flash."""
    if mask == "flex":
        return "flex"
    if device != "cuda":
        return "cpu_flash"
    half = resolve_precision(precision, device) in ("bf16", "fp16")
    gqa = kv_heads != heads and mask == "none"  # with a mask transformers expands K/V itself
    if mask == "none" and half and head_dim <= 256 and head_dim % 8 == 0:
        return "flash"
    if not gqa and head_dim % (8 if half else 4) == 0:
        return "efficient"
    return "math"


@dataclass(frozen=True)
class AttentionBytes:
    """Bytes of one micro-batch's attention (SDPA / flex itself, not the projections around it)."""

    kernel: str
    mask: str
    saved: float  # per layer: what the kernel keeps for backward (its inputs, output, lse, bias)
    temporary: float  # one layer at a time: transient buffers in forward or backward
    shared: float  # once per micro-batch, alive through its forward and backward: the mask


def attention_bytes(kernel: str, mask: str, micro: int, seq: int, heads: int, kv_heads: int,
                    head_dim: int, compute: int) -> AttentionBytes:  # fmt: skip
    """`compute`: bytes per element of q, k, v (2 for 16-bit compute, 4 for fp32)."""
    tokens, t = micro * seq, seq
    q = tokens * heads * head_dim  # elements of q (and of the output)
    kv = tokens * (kv_heads if mask == "none" or kernel == "flex" else heads) * head_dim
    lse = 4 * tokens * heads
    if kernel == "math":
        scores = 4 * micro * heads * t * t  # fp32 softmax, kept for backward
        # fp32 q and k scaled, v (k and v at every query head: repeat_interleave) and the scores
        saved = 3 * 4 * q + scores
        temporary = 2 * scores + 5 * t * t  # pre-softmax scores / their gradients; causal mask
    else:
        saved = compute * (2 * q + 2 * kv) + lse  # q, k, v, out and the log-sum-exp
        temporary = 0.0
    if mask == "dense" and kernel != "math":  # math adds the mask in place, keeping nothing
        saved += compute * micro * t * t  # the boolean mask as an additive bias, per call
    shared = 0.0
    if mask == "dense":
        shared = micro * t * t  # the boolean (b, 1, T, T) mask
    elif mask == "flex":
        n = -(-t // FLEX_BLOCK)
        # int32 block counts and indices (partial and full, kv- and q-major) and int64 doc ids
        shared = micro * (16 * n * n + 16 * n) + 8 * micro * n * FLEX_BLOCK
    return AttentionBytes(kernel, mask, float(saved), float(temporary), float(shared))
