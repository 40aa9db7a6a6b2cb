"""The attention kernel the planner predicts for the target (planner/attention.py), its bytes
against what SDPA keeps on CPU, and the term in `python -m gradcycle.plan plan.format=json`.

The CUDA kernel choice cannot run here; its rules are read from torch 2.13 / transformers 5.24
(planner/attention.py) and pinned as a table. The bytes can: the CPU flash kernel and the math
kernel (the same composite code on CPU and CUDA) are run and what autograd saves is summed.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from gradcycle.planner.attention import attention_bytes, kernel_for, mask_kind

# (device, precision, heads, kv_heads, head_dim, mask) -> kernel
RULES = [
    (("cuda", "bf16", 32, 4, 64, "none"), "flash"),  # GQA through enable_gqa
    (("cuda", "auto", 32, 4, 64, "none"), "flash"),  # auto = bf16 on CUDA
    (("cuda", "fp32", 32, 32, 128, "none"), "efficient"),  # flash is 16-bit only
    (("cuda", "fp32", 32, 4, 64, "none"), "math"),  # llama-1b fp32: efficient refuses GQA
    (("cuda", "fp32", 32, 4, 64, "dense"), "efficient"),  # a mask: K/V repeated, then a bias
    (("cuda", "bf16", 32, 4, 64, "dense"), "efficient"),  # flash takes no mask
    (("cuda", "bf16", 8, 8, 512, "none"), "efficient"),  # flash: head_dim <= 256
    (("cuda", "bf16", 8, 2, 512, "none"), "math"),
    (("cuda", "fp32", 32, 4, 64, "flex"), "flex"),
    (("cpu", "fp32", 32, 4, 64, "none"), "cpu_flash"),  # CPU flash takes fp32, GQA and masks
    (("cpu", "bf16", 32, 4, 64, "dense"), "cpu_flash"),
]


@pytest.mark.parametrize("args, kernel", RULES)
def test_kernel_rules(args, kernel):
    assert kernel_for(*args) == kernel


def _saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (minus `exclude`'s)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(n for p, n in seen.items() if p not in skip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("mask", ["none", "dense"])
@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
def test_bytes_equal_what_sdpa_saves_on_cpu(dtype, kv_heads, mask, kernel):
    """As transformers calls SDPA: no mask -> is_causal + enable_gqa; a mask -> K/V repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d = 2, 8, 96, 16
    q = torch.randn(b, h, t, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, t, d, dtype=dtype, requires_grad=True) for _ in "kv")
    causal = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).contiguous()

    def run():
        kk, vv = k, v
        kw = {"is_causal": True, "enable_gqa": kv_heads != h}
        if mask == "dense":
            kk, vv = (x.repeat_interleave(h // kv_heads, 1) for x in (k, v))
            kw = {"attn_mask": causal}
        backends = [SDPBackend.MATH] if kernel == "math" else [SDPBackend.FLASH_ATTENTION]
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, kk, vv, **kw)

    predicted = attention_bytes(kernel, mask, b, t, h, kv_heads, d, dtype.itemsize)
    assert _saved_bytes(run, exclude=[causal]) == predicted.saved
    if mask == "dense":
        assert predicted.shared == causal.numel()  # the boolean mask, once per micro-batch


def _plan(overrides: list[str]) -> dict:
    from gradcycle.planner.plan import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*overrides, "plan.format=json"]) == 0
    return json.loads(out.getvalue())


def test_plan_json_names_the_kernel_and_its_fp32_scores():
    """llama-1b (32 heads, 4 KV heads) at seq 2048, micro 4 on one H200: fp32 gets the math
    kernel and keeps 4 x b x h x T^2 bytes of scores per layer; bf16 gets flash."""
    base = ["model=llama-1b", "hardware=h200", "data.seq_len=2048", "train.micro_batch_size=4",
            "train.global_batch_size=32", "nodes=1", "gpus_per_node=8", "backend=fsdp"]  # fmt: skip
    fp32, bf16 = _plan([*base, "precision=fp32"]), _plan([*base, "precision=bf16"])
    scores = 4 * 4 * 32 * 2048**2
    assert fp32["attention"]["kernel"] == "math" and bf16["attention"]["kernel"] == "flash"
    assert fp32["attention"]["saved_per_layer_bytes"] > scores
    assert fp32["attention"]["temporary_bytes"] >= 2 * scores
    assert bf16["attention"]["saved_per_layer_bytes"] < scores / 20
    layers = 22
    assert fp32["breakdown"]["activations"] > layers * scores  # in the peak, layer by layer
    assert bf16["breakdown"]["activations"] < layers * scores / 2
    masked = _plan([*base, "precision=bf16", "data.document_mask=true"])
    assert masked["attention"]["kernel"] == "flex" and masked["attention"]["mask"] == "flex"
    assert 0 < masked["attention"]["mask_bytes"] < 4 * 2048 * 64  # tiles, not T x T
    cpu = _plan([*base[:1], "hardware=cpu", *base[2:], "data.document_mask=true"])
    assert cpu["attention"]["mask"] == "dense" and mask_kind(True, "cpu") == "dense"
    assert cpu["attention"]["mask_bytes"] == 4 * 2048**2
