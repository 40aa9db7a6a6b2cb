"""The summed next-token cross-entropy, without full-vocabulary fp32 logits (`loss.impl`).

`full` is the plain path: the model's logits for every token, sliced and upcast to fp32, then
cross-entropy: about 12 bytes per token and vocabulary entry are alive at the start of backward.

`chunked` (the default) never materialises them. The model's output head and the cross-entropy
run over `loss.chunk_tokens` tokens at a time: each chunk's logits are computed, upcast, reduced
to the chunk's summed cross-entropy in fp32 and freed. When a gradient is wanted, the chunk's
gradients (hidden states and head weight) are computed in the same pass from its softmax, before
its logits are freed, so backward only scales them: no recomputed logits, the same matmuls as the
full path, and peak loss memory ~ one chunk x vocabulary in fp32 plus the head's gradient.
That gradient is accumulated over the chunks in fp32 whatever the parameters' dtype (a 16-bit
accumulator rounds the running sum once per chunk, and more chunks made the gradient worse):
on CUDA inside the 16-bit matmul (`addmm(out_dtype=float32)`), elsewhere from the chunk's fp32
logit gradient; it is rounded to the parameters' dtype once, after backward's scaling.
`loss.chunk_tokens=auto` (the default) takes liger-kernel's rule, a chunk's logits about as large
as the micro-batch's hidden states (tokens x hidden / vocabulary tokens), but at least 1024
tokens on CUDA (each chunk reads and writes the whole vocabulary x hidden gradient: fewer, larger
chunks keep that small beside the matmuls) and 256 elsewhere: planner/loss.py `chunk_for`.

`liger` calls liger-kernel's fused linear cross-entropy (CUDA; same contract).

Every backend sees the head where it expects it: `attach()` gives the Hugging Face model an
instance-level `forward` that, called with `loss_targets`, runs the decoder for hidden states and
then calls the output head module itself with the targets. So the chunked loss runs inside the
root module's forward (FSDP2's root unit holds the head's parameters gathered; nothing changes in
its collectives), and the head's own forward hooks fire once in forward and once in backward
(ZeRO-3 gathers and releases it exactly as for the full path). Instance attributes leave the
module tree, state-dict keys, `save_pretrained` and HF export untouched; called without
`loss_targets` the model behaves as before (logits).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gradcycle.data import IGNORE_INDEX
from gradcycle.data.masking import attention_inputs
from gradcycle.planner.loss import chunk_for

# Config fields of architectures that transform logits after the head (soft-capping, scaling):
# the chunked path would compute another loss for them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap")


def summed_token_ce(model, batch: dict, impl: str = "chunked", chunk_tokens: int | str = "auto"):
    """Sum of next-token cross-entropy over real targets (fp32 scalar). `model` may be the plain
    HF model or its backend wrapper (DDP, FSDP2 module, DeepSpeed engine). Every batch key but
    `labels` (input_ids, position_ids, ...) goes to the model; `document_ids` (document masking)
    become the mask the model's attention takes, here, just before this micro-batch's forward."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "document_ids" in inputs or "attention_mask" in inputs:
        attn = getattr(unwrap(model).config, "_attn_implementation", None)
        inputs = attention_inputs(inputs, attn)
    labels = batch["labels"]
    if impl == "full":
        logits = model(**inputs).logits
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    attach(unwrap(model))
    # Position t predicts token t+1: shift the labels, not the logits (no sliced copy).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    out = model(**inputs, loss_targets=targets, loss_impl=impl, loss_chunk_tokens=chunk_tokens)
    return out.loss


def liger_usable() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def check_liger(device: str) -> None:
    """loss.impl=liger: liger-kernel installed and CUDA present (config.validate calls this)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            "loss.impl=liger needs the liger-kernel package (pip install liger-kernel), which is "
            "not installed: install it, or use loss.impl=chunked (the same loss in PyTorch)"
        )
    if device == "cpu" or not torch.cuda.is_available():
        raise ValueError(
            f"loss.impl=liger runs on CUDA only (device={device}, CUDA available: "
            f"{torch.cuda.is_available()}): use loss.impl=chunked (the same loss in PyTorch)"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / a DeepSpeed engine (FSDP2 shards it in place)."""
    from transformers import PreTrainedModel

    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None),
                                                                nn.Module):  # fmt: skip
        model = model.module
    return model


def attach(model: nn.Module) -> nn.Module:
    """Make `model(..., loss_targets=t)` return the summed token loss through its own head.

    Idempotent; call it before or after a backend wraps the model. Raises ValueError for models
    whose output is not a plain linear head over the base model's hidden states."""
    if model.__dict__.get("_gradcycle_loss"):
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    transforms = [a for a in _LOGIT_TRANSFORMS
                  if getattr(getattr(model, "config", None), a, None) not in (None, 0, 1, 1.0)]  # fmt: skip
    if not isinstance(head, nn.Linear) or base is model or transforms:
        why = f"its logits are transformed after the head ({', '.join(transforms)})" if transforms \
            else "it has no linear output head over a base model (get_output_embeddings)"  # fmt: skip
        raise ValueError(
            f"loss.impl=chunked cannot compute the loss of {type(model).__name__}: {why}; "
            "use loss.impl=full"
        )
    model.forward = functools.partial(_model_forward, model, model.forward)
    head.forward = functools.partial(_head_forward, head, head.forward)
    model._gradcycle_loss = True
    return model


def _model_forward(model, original, *args, loss_targets=None, loss_impl="chunked",
                   loss_chunk_tokens="auto", **kwargs):  # fmt: skip
    if loss_targets is None:
        return original(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    hidden = model.base_model(*args, **kwargs)[0]  # last hidden state
    # The head module itself, hidden states positional: its hooks see them as its input.
    head = model.get_output_embeddings()
    loss = head(hidden, loss_targets=loss_targets, impl=loss_impl, chunk_tokens=loss_chunk_tokens)
    return CausalLMOutputWithPast(loss=loss)


def _head_forward(head, original, hidden, loss_targets=None, impl="chunked", chunk_tokens="auto"):
    if loss_targets is None:
        return original(hidden)
    return linear_cross_entropy(hidden, head.weight, head.bias, loss_targets, chunk_tokens, impl)


def linear_cross_entropy(hidden, weight, bias, targets, chunk_tokens, impl: str = "chunked"):
    """sum_t CE(hidden_t @ weight.T + bias, targets_t) over targets != IGNORE_INDEX, in fp32."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if chunk_tokens == "auto":
        chunk_tokens = chunk_for(h.shape[0], h.shape[1], weight.shape[0], h.device.type)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        out = fn(weight, h.contiguous(), t, bias)
        return (out[0] if isinstance(out, tuple) else out).float()
    dtype = _compute_dtype(h)
    wants = [torch.is_grad_enabled() and x is not None and x.requires_grad
             for x in (h, weight, bias)]  # fmt: skip
    if any(wants):
        return _LinearCrossEntropy.apply(h, weight, bias, t, chunk_tokens, dtype)
    with _no_autocast(h):
        return _chunks(h, weight, bias, t, chunk_tokens, dtype, (False, False, False))[0]


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmul dtype the full path gets: autocast's where it is on (ddp bf16/fp16), else the
    dtype of the hidden states (fp32, or the 16-bit parameters of fsdp/DeepSpeed)."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


def _no_autocast(h: torch.Tensor):
    return torch.autocast(h.device.type, enabled=False)


def _chunks(h, weight, bias, t, chunk: int, dtype, wants):
    """The summed loss and, for each input in `wants`, the gradient of the SUM (unscaled)."""
    want_h, want_w, want_b = wants
    n_tokens = h.shape[0]
    w = weight.to(dtype)  # a copy only under autocast (fp32 parameters, 16-bit matmuls)
    b = bias.to(dtype) if bias is not None else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if want_h else None
    # Over several chunks the head's gradient accumulates in fp32; one chunk writes it directly.
    several = n_tokens > chunk
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w and several \
        else None  # fmt: skip
    fused = several and dtype != torch.float32 and _fp32_accumulating_matmul(h.device)
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=h.device) if want_b else None
    for start in range(0, n_tokens, chunk):
        hc = h[start : start + chunk].to(dtype)
        tc = t[start : start + chunk]
        logits = hc @ w.t()
        if b is not None:
            logits += b
        logits = logits.float()  # no copy when the matmul ran in fp32
        valid = tc != IGNORE_INDEX
        tgt = torch.where(valid, tc, 0).unsqueeze(1)
        picked = logits.gather(1, tgt).squeeze(1)
        # log-sum-exp in place (torch.logsumexp would allocate a second chunk x vocab buffer)
        top = logits.amax(dim=1, keepdim=True)
        p = logits.sub_(top).exp_()
        norm = p.sum(dim=1, keepdim=True)
        lse = (top + norm.log()).squeeze(1)
        total += torch.where(valid, lse - picked, 0.0).sum()
        del logits  # p: the same buffer; it must be gone before the next chunk's is allocated
        if not any(wants):
            del p
            continue
        # d(sum CE)/d logits = softmax - onehot(target), zero for ignored positions; in place
        p.div_(norm)
        p.masked_fill_(~valid.unsqueeze(1), 0.0)
        p.scatter_add_(1, tgt, -valid.unsqueeze(1).to(p.dtype))
        g = p.to(dtype)  # p itself when the matmuls run in fp32
        if want_h:
            torch.mm(g, w, out=grad_h[start : start + chunk])
        if want_w:
            if grad_w is None:
                grad_w = g.t() @ hc
            elif fused:  # 16-bit operands, fp32 accumulation in the GEMM: no extra buffer
                torch.addmm(grad_w, g.t(), hc, out_dtype=torch.float32, out=grad_w)
            else:  # fp32 operands: the logit gradient as computed, the chunk's inputs upcast
                grad_w.addmm_(p.t(), hc.float())
        if want_b:
            grad_b += g.sum(0, dtype=torch.float32)
        del g, p
    return total, grad_h, grad_w, grad_b


@functools.cache
def _fp32_accumulating_matmul(device: torch.device) -> bool:
    """addmm with 16-bit operands into an fp32 output: CUDA sm80+ (torch >= 2.8; not on CPU)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and the gradients of its sum chunk by chunk; backward scales
    them by the incoming gradient (the trainer's 1/N, world size, loss scale)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int, dtype):
        wants = tuple(ctx.needs_input_grad[:3])
        with _no_autocast(h):
            total, grad_h, grad_w, grad_b = _chunks(h, weight, bias, targets, chunk, dtype, wants)
        # Held on ctx, not saved tensors: backward drops them, so the head's gradient is handed
        # to autograd without a second reference (accumulated in place, not copied).
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError(
                "backward ran twice through the chunked loss (retain_graph=True): its gradients "
                "are computed once in forward; use loss.impl=full for double backward"
            )
        saved, ctx.grads = ctx.grads, None
        grads = []
        while saved:
            g, dtype = saved.pop(0), ctx.dtypes[len(grads)]
            # In place: the fp32 factor is applied in fp32 to each element, also for 16-bit
            # gradients (tests/test_loss.py checks it).
            grads.append(None if g is None else g.mul_(grad_total).to(dtype))
            del g
        return (*grads, None, None, None)
