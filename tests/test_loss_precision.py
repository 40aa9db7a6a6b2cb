"""The chunked loss with 16-bit parameters: the head's gradient accumulates in fp32, so its error
against the fp32 full path is the full bf16 path's, whatever the number of chunks; and
loss.chunk_tokens=auto follows liger-kernel's rule with a floor (planner/loss.py `chunk_for`).

Before (a bf16 accumulator, one rounding of the running sum per chunk) the error grew with the
chunks: 64 chunks of 256 tokens were ~5x worse than the full bf16 path, 256 chunks of 64 ~14x. The old accumulation is rebuilt
here as the reference for "large".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradcycle.loss import linear_cross_entropy
from gradcycle.planner.loss import chunk_for

V, H, N = 1024, 64, 8 * 2048  # 8 x 2048 tokens: 64 chunks of 256


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    h = torch.randn(N, H).bfloat16()
    w = (0.05 * torch.randn(V, H)).bfloat16()
    t = torch.randint(0, V, (N,))
    t[::11] = -100
    w32 = w.float().requires_grad_()
    F.cross_entropy(h.float() @ w32.t(), t, reduction="sum", ignore_index=-100).backward()
    return h, w, t, w32.grad


def _rel(g, ref) -> float:
    return float((g.float() - ref).norm() / ref.norm())


def _bf16_accumulator(h, w, t, chunk: int) -> torch.Tensor:
    """What the chunked path did before: the head's gradient summed in bf16, chunk by chunk."""
    acc = torch.zeros_like(w)
    for s in range(0, N, chunk):
        hc, tc = h[s : s + chunk], t[s : s + chunk]
        p = (hc @ w.t()).float().softmax(1)
        valid = tc != -100
        p[valid.nonzero()[:, 0], tc[valid]] -= 1
        p[~valid] = 0
        acc.addmm_(p.bfloat16().t(), hc)
    return acc


@pytest.mark.parametrize("chunk", [256, 64])
def test_bf16_head_gradient_error_is_the_full_paths(head, chunk):
    h, w, t, ref = head
    full = w.clone().requires_grad_()
    F.cross_entropy((h @ full.t()).float(), t, reduction="sum").backward()
    chunked = w.clone().requires_grad_()
    hidden = h.clone().requires_grad_()
    (linear_cross_entropy(hidden, chunked, None, t, chunk) / 3.0).backward()
    assert chunked.grad.dtype == torch.bfloat16
    err_full, err_chunked = _rel(full.grad, ref), _rel(3.0 * chunked.grad.float(), ref)
    err_before = _rel(_bf16_accumulator(h, w, t, chunk), ref)
    assert err_chunked <= 1.1 * err_full, (err_chunked, err_full)  # ~1.7e-3: bf16's own rounding
    assert err_before >= 4 * err_chunked, (err_before, err_chunked)  # 256: 5.8x, 64: 17x


def test_auto_chunk_is_liger_rule_with_a_device_floor():
    # liger: inc_factor = ceil(V / H), chunk = next power of two of ceil(tokens / inc_factor)
    assert chunk_for(4 * 4096, 4096, 32000, "cuda") == 2048  # liger's own example
    assert chunk_for(8 * 2048, 2048, 128256, "cuda") == 1024  # liger: 512, below the floor
    assert chunk_for(2048, 4096, 128256, "cuda") == 1024
    assert chunk_for(512, 4096, 128256, "cuda") == 512  # never more than the micro-batch
    assert chunk_for(8 * 64, 64, 512, "cpu") == 256  # the tiny CPU model: 64, floor 256
    assert chunk_for(65536, 8192, 32000, "cuda") == 16384


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_fp32_accumulation_on_cuda(head):
    """CUDA accumulates inside the bf16 matmul (addmm out_dtype=float32): the same error."""
    h, w, t, ref = (x.cuda() for x in head)
    chunked = w.clone().requires_grad_()
    linear_cross_entropy(h.clone().requires_grad_(), chunked, None, t, 64).backward()
    full = w.clone().requires_grad_()
    F.cross_entropy((h @ full.t()).float(), t, reduction="sum").backward()
    assert _rel(chunked.grad, ref) <= 1.1 * _rel(full.grad, ref)
