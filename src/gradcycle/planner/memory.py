"""Per-GPU memory and per-step communication of a Llama-style decoder under each backend.

Pure arithmetic (no torch): the planner (`gradcycle.plan`) turns a config into a `Setup` and asks
`estimate(setup)` for the peak. Every term follows what the code in this repository allocates:

- model states (ZeRO paper, Rajbhandari et al. 2020): parameters, gradients and optimizer states
  by backend and precision. DDP keeps fp32 parameters under autocast; FSDP2 keeps fp32 shards
  (each parameter's first dimension padded to the shard count) and gathers units in the compute
  dtype; DeepSpeed keeps 16-bit parameters plus an fp32 master partition (fp32 runs too).
- activations: counted tensor by tensor from the Hugging Face Llama layer (RMSNorm upcasts to
  fp32; a flash-style kernel saves q, k, v, its output and a log-sum-exp, never the s x s
  scores), so the Korthikanti et al. (2022) 34·s·b·h bytes of a GPT layer become ~47.5·s·b·h
  (bf16 parameters) or ~57.5·s·b·h (autocast over fp32 parameters) for a SwiGLU layer. The
  attention kernel that runs on the target (planner/attention.py: fp32 with GQA gets SDPA's math
  kernel and its b·h·s² fp32 scores; a dense document mask adds a bias per layer) replaces the
  flash-style term. A checkpointed layer keeps only its input; its activations come back, one
  layer at a time, during backward.
- the loss (`loss.impl`, gradcycle/loss.py): `full` upcasts the logits of every token to fp32, so
  log-softmax, its gradient and the input gradient (3 x 4 bytes per token and vocabulary entry)
  coexist at the start of backward. `chunked` (and `liger`) hold one chunk's logits at a time (fp32,
  plus their 16-bit matmul output) and the head's gradient, computed in the loss forward; the
  hidden-state gradient it keeps replaces the head's saved input (planner/loss.py).
- temporaries: unsharded units (FSDP2), autocast's bf16 weight copies (DDP's buckets are its
  gradients: `gradient_as_bucket_view`, zeroed in place, held through the step).
  AdamW is torch's fused kernel (backends/base.py), which updates in place: the step adds no
  buffer. DeepSpeed's terms (gathered ZeRO-3 modules, buckets, the fp32 step gradient) are
  derived from its code in zero.py.

The peak is the largest of five moments: end of forward, start of backward (the loss), the top
layer's backward, end of backward and the optimizer step. Checked against measured CPU peaks in
bench/memory_check.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gradcycle.planner import zero
from gradcycle.planner.attention import AttentionBytes, attention_bytes, kernel_for
from gradcycle.planner.loss import loss_bytes

# re-exported: planner modules and tests take the shapes from here
from gradcycle.planner.shapes import Numerics, Shape, numerics  # noqa: F401
from gradcycle.planner.zero import ZeroSettings

GIB = 2**30
DDP_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


@dataclass(frozen=True)
class Setup:
    shape: Shape
    seq: int
    micro: int
    accumulation: int
    backend: str  # ddp | zero1 | zero2 | zero3 | fsdp | hsdp
    world: int  # data-parallel ranks
    shard: int  # ranks a parameter is split over (fsdp: world; hsdp: world/replicate)
    precision: str = "bf16"
    sync: str = "per_micro"
    checkpointed: tuple[int, ...] = ()  # decoder layers recomputed in backward
    optimizer: str = "adamw"
    momentum: float = 0.0
    reduce_dtype: str = "fp32"
    offload_optimizer: bool = False
    offload_param: bool = False
    zero: ZeroSettings = ZeroSettings()  # DeepSpeed's zero_optimization values
    loss: str = "full"  # loss.impl: full | chunked | liger
    loss_chunk: int | str = 2048  # loss.chunk_tokens (or "auto")
    device: str = "cuda"  # the target's device type: cuda | cpu (hardware=cpu)
    attention_mask: str = "none"  # none | dense | flex (planner/attention.py mask_kind)
    pp: int = 1  # pipeline stages (backend.pp); world is then one stage's data-parallel ranks
    pp_schedule: str = "1f1b"
    pp_virtual: int = 1
    in_flight: float = 1.0  # micro-batches whose saved activations are held (a stage's peak)
    stage: int | None = None  # the pipeline stage (rank) this setup sizes; None: all of them

    @property
    def num(self) -> Numerics:
        return numerics(self.backend, self.precision, self.reduce_dtype)

    @property
    def tokens(self) -> int:
        return self.micro * self.seq


@dataclass
class Estimate:
    """Bytes per GPU. `breakdown` sums to `peak` (the components live at the peak moment)."""

    peak: float
    phase: str
    breakdown: dict[str, float]
    model_states: dict[str, float]
    layer_bytes: float  # one layer's saved activations for one micro-batch, no checkpointing
    layer_ckpt_bytes: float  # the same layer checkpointed: its input only
    per_cycle_extra: float  # what sync=per_cycle adds over per_micro
    moments: dict[str, float] = field(default_factory=dict)
    attention: AttentionBytes | None = None  # the target's attention kernel and its bytes
    stages: list[float] = field(default_factory=list)  # backend.pp > 1: each stage's peak


def optimizer_bytes(setup: Setup) -> int:
    if setup.optimizer == "adamw":
        return 8  # exp_avg + exp_avg_sq, fp32
    return 4 if setup.momentum else 0


def model_states(setup: Setup) -> dict[str, float]:
    """Parameters, gradients and optimizer states (incl. fp32 masters) per GPU.

    With mixed precision and Adam (K = 12 bytes of optimizer state) ZeRO-1/2/3 give the paper's
    4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N and 16Ψ/N.
    """
    s, n = setup.shape, setup.num
    psi, k = s.n_params, optimizer_bytes(setup)
    if setup.backend == "ddp":
        return {"parameters": psi * n.param, "gradients": psi * n.grad, "optimizer": psi * k}
    if setup.backend in ("fsdp", "hsdp"):
        local = s.model_shard(setup.shard)
        if setup.offload_param:  # CPUOffloadPolicy: shards, gradients, optimizer on the host
            return {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0}
        return {"parameters": local * 4, "gradients": local * 4, "optimizer": local * k}
    return zero.model_states(setup, setup.zero, k)


def zero_model_states(psi: float, n_gpus: int, stage: int, k: float = 12, param_bytes: int = 2,
                      grad_bytes: int = 2) -> dict[str, float]:  # fmt: skip
    """The ZeRO paper's model states per GPU: Ψ parameters, K bytes of optimizer state per
    parameter (12 for mixed-precision Adam: fp32 master, momentum, variance); stage 0 is plain
    data parallelism."""
    return {
        "parameters": psi * param_bytes / (n_gpus if stage >= 3 else 1),
        "gradients": psi * grad_bytes / (n_gpus if stage >= 2 else 1),
        "optimizer": psi * k / (n_gpus if stage >= 1 else 1),
    }


# ---------------------------------------------------------------- activations (bytes / token)


def _linear_inputs(n: Numerics, consumers: int) -> int:
    """Bytes per hidden element saved as matmul input. Autocast casts the fp32 input once per
    consuming matmul (only leaf tensors are cached), so q/k/v keep three bf16 copies."""
    return consumers * n.compute if n.autocast else n.residual


def layer_activation_bytes(shape: Shape, num: Numerics, kernel_bytes: float | None = None) -> float:
    """Saved bytes per token of one decoder layer without checkpointing. `kernel_bytes`: what
    the attention kernel itself keeps per token (planner/attention.py); default flash-style:
    q, k, v, its output and an fp32 log-sum-exp per head."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    c, r = num.compute, num.residual
    if kernel_bytes is None:
        kernel_bytes = c * (2 * h + 2 * kv) + 4 * shape.heads
    norm = 4 + r  # RMSNorm: its fp32 input (the residual itself when fp32) and the normed value
    attn = norm + _linear_inputs(num, 3) + c + kernel_bytes / h  # + o_proj's input (transposed)
    mlp = norm + _linear_inputs(num, 2) + 4 * c * i / h  # gate, silu(gate), up, product
    return h * (attn + mlp)


def layer_backward_bytes(shape: Shape, num: Numerics) -> float:
    """Net transient bytes per token while one layer runs backward: its gradients appear as its
    saved tensors are released, leaving about one residual-stream gradient and one hidden-size
    input gradient on top (measured on CPU, bench/memory_check.py)."""
    return (num.residual + num.compute) * shape.hidden


def head_activation_bytes(shape: Shape, num: Numerics) -> float:
    return shape.hidden * (4 + num.residual + _linear_inputs(num, 1))


def attention(setup: Setup) -> AttentionBytes:
    """The attention kernel the target runs for this setup, and its bytes per micro-batch."""
    s = setup.shape
    head_dim = s.hidden // s.heads
    kernel = kernel_for(setup.device, setup.precision, s.heads, s.kv_heads, head_dim,
                        setup.attention_mask)  # fmt: skip
    return attention_bytes(kernel, setup.attention_mask, setup.micro, setup.seq, s.heads,
                           s.kv_heads, head_dim, setup.num.compute)  # fmt: skip


def activations(setup: Setup) -> dict[str, float]:
    """Activation-side bytes of one micro-batch at the moments that can be the peak."""
    s, n, tok = setup.shape, setup.num, setup.tokens
    att = attention(setup)
    full = layer_activation_bytes(s, n, att.saved / tok) * tok
    ckpt = n.residual * s.hidden * tok  # a checkpointed layer keeps its input only
    n_ckpt = len(setup.checkpointed)
    head = head_activation_bytes(s, n) * tok if s.last else 0.0
    saved = (s.layers - n_ckpt) * full + n_ckpt * ckpt + head
    saved += att.shared  # the micro-batch's document mask, one for every layer
    saved *= setup.in_flight  # a pipeline stage holds several micro-batches (planner/pipeline.py)
    top_ckpt = s.layers - 1 in setup.checkpointed
    loss_fwd, loss_bwd = loss_bytes(setup) if s.last else (0.0, 0.0)  # forward end, backward start
    return {
        "saved": saved,
        "layer": full,
        "layer_ckpt": ckpt,
        "loss_forward": loss_fwd,
        "loss_backward": loss_bwd,
        # a checkpointed top layer is recomputed whole before its backward runs
        "recompute": (full if top_ckpt else 0.0) + layer_backward_bytes(s, n) * tok + att.temporary,
        "attention": att,
    }


# ---------------------------------------------------------------- buffers and temporaries


def temporaries(setup: Setup) -> dict[str, float]:
    """Buffers that are neither model states nor activations, at each moment of a step:
    forward end, loss backward, top layer's backward, backward end, optimizer step; `static`
    lives throughout, `per_cycle` is what sync=per_cycle holds on top during the cycle."""
    if setup.backend.startswith("zero"):
        return zero.temporaries(setup, setup.zero)
    s, n, psi = setup.shape, setup.num, setup.shape.n_params
    out = dict.fromkeys(("static", "forward", "loss", "layer", "end", "step", "per_cycle"), 0.0)
    if setup.backend == "ddp":
        # W > 1: the reducer's buckets are the gradients (gradient_as_bucket_view=True, kept
        # between steps), so no second copy; estimate() holds them throughout
        if setup.world > 1 and n.reduce < n.grad:  # a bucket's 16-bit copy (comm hook)
            out["end"] = min(psi * n.grad, DDP_BUCKET_BYTES) * n.reduce / n.grad
        if setup.stage is not None and setup.world > 1:  # pipeline: one flat all-reduce buffer
            out["end"] = psi * n.grad
        if n.autocast:
            # autocast caches a bf16 copy of every matmul weight for the forward; autograd keeps
            # those of layers that are not recomputed until their backward
            head = 0 if s.tie else s.vocab * s.hidden
            per_layer = s.layer_params - 2 * s.hidden
            kept = (s.layers - len(setup.checkpointed)) * per_layer
            out["forward"] = n.compute * (s.layers * per_layer + head)
            out["loss"] = out["layer"] = n.compute * (kept + head)
        return out
    unit = s.shard_numel(s.layer_tensors(), setup.shard) * setup.shard
    kept = s.shard_numel(s.fsdp_kept(), setup.shard) * setup.shard
    last = s.shard_numel(s.fsdp_last(), setup.shard) * setup.shard
    c, g = n.compute, n.reduce
    # The norm + head unit stays gathered from its forward to its own backward, the first one
    # (tied: the root, to the end of backward); layers and the embedding are resharded after
    # forward. In a layer's backward: that layer and the prefetched next one gathered (plus the
    # all-gather copy-out), its gradient and the reduce-scatter input.
    out["forward"] = out["loss"] = kept * c
    through = s.tie or setup.sync == "per_cycle"  # still gathered in the layers' backward
    out["layer"] = (kept * c if through else 0.0) + unit * (3 * c + g)
    out["end"] = last * (2 * c + g)
    if setup.shard > 1:
        # every unit stays gathered, and gradients accumulate unsharded in the reduction dtype
        # instead of in the shards (which only the last micro-batch creates)
        local_grads = 4 * s.model_shard(setup.shard) if setup.accumulation > 1 else 0.0
        out["per_cycle"] = psi * c - kept * c + psi * g - local_grads
    return out


def estimate(setup: Setup) -> Estimate:
    """The per-GPU peak and what is alive at that moment (backend.pp > 1: the fullest stage's)."""
    if setup.pp > 1 and setup.stage is None:
        from gradcycle.planner.pipeline import stage_estimates

        stages = stage_estimates(setup)
        worst = max(stages, key=lambda e: e.peak)
        worst.stages = [e.peak for e in stages]
        return worst
    ms = model_states(setup)
    act = activations(setup)
    tmp = temporaries(setup)
    per_cycle = tmp["per_cycle"] if setup.sync == "per_cycle" else 0.0
    static = ms["parameters"] + ms["optimizer"] + tmp["static"]
    # Gradients are freed by the step (set_to_none): the first micro-batch of a cycle builds them
    # while it frees activations; from the second on they are alive for the whole backward.
    grads_held = ms["gradients"] if setup.accumulation > 1 else 0.0
    if setup.backend in ("zero2", "zero3") or (setup.backend == "ddp" and setup.world > 1):
        grads_held = ms["gradients"]  # a preallocated partition buffer; DDP's buckets
    held = {"gradients": grads_held, "per_cycle extra": per_cycle}
    unsharded = "unsharded / cast parameters"
    moments = {
        "forward end": {
            "activations": act["saved"],
            "logits and loss": act["loss_forward"],
            unsharded: tmp["forward"],
            **held,
        },
        "backward start": {
            "activations": act["saved"],
            "logits and loss": act["loss_backward"],
            unsharded: tmp["loss"],
            **held,
        },
        "backward (top layer)": {
            "activations": act["saved"],
            "layer backward (recomputed layer)": act["recompute"],
            unsharded: tmp["layer"],
            **held,
        },
        "backward end": {unsharded: tmp["end"], "gradients": ms["gradients"], **held},
        "optimizer step": {
            "gradients": tmp.get("step_gradients", ms["gradients"]),
            "optimizer step buffers": tmp["step"],
        },
    }
    moments["backward end"]["gradients"] = max(ms["gradients"], grads_held)
    totals = {k: static + sum(v.values()) for k, v in moments.items()}
    phase = max(totals, key=totals.get)
    breakdown = {
        "parameters": ms["parameters"],
        "optimizer states": ms["optimizer"],
        "communication buffers": tmp["static"],
        **moments[phase],
    }
    return Estimate(
        peak=totals[phase],
        phase=phase,
        breakdown={k: v for k, v in breakdown.items() if v},
        model_states=ms,
        layer_bytes=act["layer"],
        layer_ckpt_bytes=act["layer_ckpt"],
        per_cycle_extra=tmp["per_cycle"],
        moments=totals,
        attention=act["attention"],
    )
