"""Memory of the loss (`loss.impl`, gradcycle/loss.py) at the two moments it can set the peak.

Pure arithmetic on a `memory.Setup`: (bytes at the end of forward, bytes at the start of backward).
`chunk_for` is also the training's `loss.chunk_tokens=auto`.
"""

from __future__ import annotations

import math

# loss.chunk_tokens=auto never goes below this many tokens per chunk: every chunk reads and
# writes the whole vocab x hidden head gradient (8 bytes per element in fp32), which costs about
# 275/chunk of the chunk's matmul time on an H100/H200 (989 TFLOP/s, 4.8 TB/s): ~27% at 1024.
MIN_CHUNK = {"cuda": 1024}
MIN_CHUNK_ELSEWHERE = 256


def chunk_for(tokens: int, hidden: int, vocab: int, device: str = "cuda") -> int:
    """loss.chunk_tokens=auto: liger-kernel's rule (inc_factor = ceil(V / H), chunk = the power
    of two >= ceil(tokens / inc_factor), at most the tokens: a chunk's logits about the size of
    the hidden states), with a device floor."""
    ratio = max(1, math.ceil(vocab / hidden))
    liger = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / ratio))))
    return max(1, min(tokens, max(liger, MIN_CHUNK.get(device, MIN_CHUNK_ELSEWHERE))))


def loss_bytes(setup) -> tuple[float, float]:
    s, n, tok = setup.shape, setup.num, setup.tokens
    if setup.loss == "full":
        logits = s.vocab * tok
        # forward end: logits (compute dtype), their fp32 copy and the fp32 log-softmax;
        # backward start: log-softmax output, its gradient and the input gradient (fp32)
        return float(logits * (n.compute + 8)), float(logits * 12)
    return chunked_loss_bytes(setup)


def loss_chunk_tokens(setup) -> int:
    """Tokens whose logits exist at a time: loss.chunk_tokens (auto: `chunk_for`), or
    liger-kernel's own choice (a chunk's logits about the size of the micro-batch's hidden
    states)."""
    s, tok = setup.shape, setup.tokens
    if setup.loss == "liger":
        ratio = math.ceil(s.vocab / s.hidden)
        return min(tok, 2 ** math.ceil(math.log2(max(1, math.ceil(tok / ratio)))))
    if setup.loss_chunk == "auto":
        return chunk_for(tok, s.hidden, s.vocab, setup.device)
    return min(tok, int(setup.loss_chunk))


def chunked_loss_bytes(setup) -> tuple[float, float]:
    """Forward, last chunk: its logits in fp32 beside their 16-bit matmul output (later the
    16-bit logit gradient), and the head's gradient: fp32 when accumulated over several chunks,
    else the compute dtype (one matmul). Backward scales it in place and rounds it to the head's
    dtype (a second copy for a moment: 16-bit heads of fsdp / DeepSpeed, or autocast's fp32 head
    from a single 16-bit chunk). The hidden-state gradient replaces the head's saved input,
    which the activations count."""
    s, n = setup.shape, setup.num
    c, vh = n.compute, s.vocab * s.hidden
    chunk = loss_chunk_tokens(setup)
    rows = chunk * s.vocab
    acc = 4 if setup.tokens > chunk else c  # the gradient as computed
    head = 4 if n.autocast else c  # the head's own dtype
    forward = acc * vh + rows * (4 + (c if c != 4 else 0))
    if acc == 4 and c != 4 and setup.device != "cuda":
        forward += chunk * s.hidden * 4  # the chunk's inputs upcast (no fp32-output matmul)
    backward = acc * vh + (head * vh if head != acc else 0)
    return float(forward), float(backward)
