"""Attention as the target GPU runs it, on fake CPU tensors.

CPU SDPA is not what a GPU runs: it picks its own kernels, and on fake tensors the memory of
attention would be the CPU's. While the simulation runs, `torch.nn.functional.
scaled_dot_product_attention` (what transformers' "sdpa" attention calls) is replaced by the
aten op of the kernel the target would pick, so autograd saves what that kernel saves:

  flash      `_scaled_dot_product_flash_attention`: output + log-sum-exp (b·h·T fp32); no mask,
             16-bit only; grouped K/V heads natively
  efficient  `_scaled_dot_product_efficient_attention`: output + log-sum-exp, and the mask as an
             additive bias (b·1·T·T in the compute dtype), saved for backward; no grouped heads
  math       `_scaled_dot_product_attention_math`: the composite path, which materialises and
             saves the b·h·T·T scores and their softmax
  cpu_flash  hardware=cpu: torch's own CPU SDPA, unchanged

Which one runs is the planner's own rule (`gradcycle.planner.attention.kernel_for`), so the
simulated peak checks the planner's attention term instead of restating it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gradcycle.planner.attention import kernel_for

aten = torch.ops.aten
_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def kernel(hardware: str, query, key, attn_mask) -> str:
    """The planner's kernel for this call's shapes and dtype on `hardware` (a GPU profile or cpu)."""
    device = "cpu" if hardware == "cpu" else "cuda"
    return kernel_for(device, _PRECISION.get(query.dtype, "fp32"), query.shape[-3],
                      key.shape[-3], query.shape[-1],
                      "none" if attn_mask is None else "dense")  # fmt: skip


class TargetAttention:
    """`scaled_dot_product_attention` with the target's kernel; `seen` counts calls per kernel."""

    def __init__(self, hardware: str):
        self.hardware = hardware
        self.seen: dict[str, int] = {}
        self._original = F.scaled_dot_product_attention

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False):  # fmt: skip
        name = kernel(self.hardware, query, key, attn_mask)
        self.seen[name] = self.seen.get(name, 0) + 1
        if name == "flash":
            return aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        if name == "efficient":
            bias = attn_mask
            if bias is not None and bias.dtype == torch.bool:  # what SDPA converts it to
                bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device)
                bias = bias.masked_fill_(attn_mask.logical_not(), float("-inf"))
            return aten._scaled_dot_product_efficient_attention(
                query, key, value, bias, True, dropout_p, is_causal, scale=scale
            )[0]
        if name == "math":
            return aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale,
                enable_gqa=enable_gqa,
            )[0]  # fmt: skip
        return self._original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)  # fmt: skip

    @contextlib.contextmanager
    def installed(self):
        F.scaled_dot_product_attention = self
        try:
            yield self
        finally:
            F.scaled_dot_product_attention = self._original
