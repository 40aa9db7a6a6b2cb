"""What only a CUDA device can show of issue N's fixes (all skipped without one; the CPU side of
each is tested beside its code):

- the kernel table of planner/attention.py is the kernel CUDA SDPA really runs: the predicted one
  runs when it is the only one allowed, and where math is predicted flash/efficient refuse;
- the bytes the planner counts for that kernel are what autograd keeps on the device;
- precision=auto trains in bf16 on CUDA, and fp32 on CUDA runs its matmuls in TF32;
- build on meta, allocated on the device: the model's parameters are born on the GPU and equal
  the CPU build's (one seed, the same weights everywhere).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose, read_metrics

from gradcycle.planner.attention import attention_bytes, kernel_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (precision, heads, kv_heads, head_dim, mask) as transformers calls SDPA (mask "none": is_causal
# and enable_gqa; "dense": K/V repeated to every head and a boolean mask)
CASES = [
    ("bf16", 32, 4, 64, "none"),
    ("fp32", 32, 32, 128, "none"),
    ("fp32", 32, 4, 64, "none"),
    ("fp32", 32, 4, 64, "dense"),
    ("bf16", 32, 4, 64, "dense"),
    ("bf16", 8, 2, 512, "none"),
]


def _backend(kernel: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}[kernel]  # fmt: skip


def _inputs(precision, heads, kv_heads, head_dim, mask, b=2, t=256):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q = torch.randn(b, heads, t, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, t, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            for _ in "kv")  # fmt: skip
    causal = torch.ones(t, t, dtype=torch.bool, device="cuda").tril().expand(b, 1, t, t)
    causal = causal.contiguous()

    def call():
        if mask == "dense":
            kk, vv = (x.repeat_interleave(heads // kv_heads, 1) for x in (k, v))
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=kv_heads != heads)  # fmt: skip

    return call, causal


@pytest.mark.parametrize("case", CASES)
def test_the_predicted_kernel_is_the_one_cuda_runs(case):
    from torch.nn.attention import sdpa_kernel

    kernel = kernel_for("cuda", *case)
    call, _ = _inputs(*case)
    with sdpa_kernel([_backend(kernel)]):
        call().sum().backward()  # the predicted kernel accepts these inputs
    faster = {"flash": [], "efficient": ["flash"], "math": ["flash", "efficient"]}[kernel]
    if faster:  # ... and none SDPA prefers over it does (else it would have picked that one)
        with sdpa_kernel([_backend(k) for k in faster]), pytest.raises(RuntimeError):
            call()


@pytest.mark.parametrize("case", CASES)
def test_attention_bytes_are_what_the_device_keeps(case):
    """Device memory held after the forward (for backward) minus the output, vs the planner's
    `saved` (math: fp32 scores; flash/efficient: q, k, v, out, lse; dense: the bias)."""
    precision, heads, kv_heads, head_dim, mask = case
    kernel = kernel_for("cuda", *case)
    b, t = 2, 256
    call, causal = _inputs(*case, b=b, t=t)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    compute = 2 if precision == "bf16" else 4
    predicted = attention_bytes(kernel, mask, b, t, heads, kv_heads, head_dim, compute)
    q = compute * b * t * heads * head_dim
    if kernel == "math":  # it saves its own fp32 copies, not the output: that is held too
        expected = predicted.saved + q
    else:  # the kernel saves q, k, v, out: q existed before, and so did k, v unless repeated
        expected = predicted.saved - q - (2 * q * kv_heads // heads if mask == "none" else 0)
    assert 0.75 * expected <= held <= 1.35 * expected + 2**20, (kernel, held, expected)
    del out, causal


def test_auto_precision_trains_in_bf16_on_cuda(tmp_path):
    from gradcycle.trainer import run

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no native bf16")
    from gradcycle import hardware

    cfg = compose([*TINY, "device=cuda", "precision=auto", f"run_dir={tmp_path}",
                   "train.max_steps=2", "checkpoint.at_end=false"])  # fmt: skip
    assert hardware.resolve_precision(cfg, "cuda").precision == "bf16"
    run(cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_fp32_on_cuda_runs_matmuls_in_tf32():
    from gradcycle import hardware

    before = torch.get_float32_matmul_precision()
    try:
        hardware.apply_precision(compose(["precision=fp32"]), "cuda")
        assert torch.get_float32_matmul_precision() == "high"
        a = torch.randn(1024, 1024, device="cuda")
        exact = (a.double() @ a.double()).float()
        err = ((a @ a) - exact).abs().max() / exact.abs().max()
        assert err > 1e-6  # TF32's 10-bit mantissa products, not fp32's
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_model_is_built_on_the_device_equal_to_the_cpu_build():
    from gradcycle.model import build_model

    cfg = compose(TINY)
    vocab = 512
    on_gpu = build_model(cfg.model, vocab, "cuda", seed=3)
    on_cpu = build_model(cfg.model, vocab, "cpu", seed=3)
    for (name, g), c in zip(on_gpu.named_parameters(), on_cpu.parameters(), strict=True):
        assert g.device.type == "cuda", name
        assert torch.equal(g.cpu(), c), name
