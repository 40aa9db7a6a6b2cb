"""Memory of the loss (`loss.impl`, gradcycle/loss.py) at the two moments it can set the peak.

Pure arithmetic on a `memory.Setup`: (bytes at the end of forward, bytes at the start of backward).
"""

from __future__ import annotations

import math


def loss_bytes(setup) -> tuple[float, float]:
    s, n, tok = setup.shape, setup.num, setup.tokens
    if setup.loss == "full":
        logits = s.vocab * tok
        # forward end: logits (compute dtype), their fp32 copy and the fp32 log-softmax;
        # backward start: log-softmax output, its gradient and the input gradient (fp32)
        return float(logits * (n.compute + 8)), float(logits * 12)
    return chunked_loss_bytes(setup)


def loss_chunk_tokens(setup) -> int:
    """Tokens whose logits exist at a time: loss.chunk_tokens, or liger-kernel's own choice
    (a chunk's logits about the size of the micro-batch's hidden states)."""
    s, tok = setup.shape, setup.tokens
    if setup.loss == "liger":
        ratio = math.ceil(s.vocab / s.hidden)
        return min(tok, 2 ** math.ceil(math.log2(max(1, math.ceil(tok / ratio)))))
    return min(tok, setup.loss_chunk)


def chunked_loss_bytes(setup) -> tuple[float, float]:
    """Forward, last chunk: its logits in fp32 beside their 16-bit matmul output (later the
    16-bit logit gradient), and the head's gradient, accumulated over chunks in the head's dtype
    (autocast: fp32, with a 16-bit partial product). Backward scales the saved gradients in place
    (autocast: casts the head's to fp32). The hidden-state gradient replaces the head's saved
    input, which the activations count."""
    s, n = setup.shape, setup.num
    c, vh = n.compute, s.vocab * s.hidden
    rows = loss_chunk_tokens(setup) * s.vocab
    head = vh * (4 if n.autocast else c)
    cast = c * vh if n.autocast else 0
    forward = head + rows * (4 + (c if c != 4 else 0)) + cast
    return float(forward), float(head + cast)
