"""DeepSpeed ZeRO-1/2/3 per-GPU memory, term by term from DeepSpeed 0.19's own code.

Pure arithmetic (no torch, no DeepSpeed import). docs/planner.md cites the functions and lines of
deepspeed 0.19.8 that each term follows; in short:

- ZeRO-3 keeps each parameter's 16-bit partition (ceil(numel/W) elements), an fp32 master copy of
  it (fp32 runs too: the aliasing branch compares a torch.device with a string, never equal),
  Adam's two fp32 moments, one flat gradient-partition buffer in the accumulation dtype
  (`grad_partitions_flat_buffer`) and one `reduce_bucket_size` reduction bucket, all allocated
  at start-up. Parameters of at most `stage3_param_persistence_threshold` elements stay gathered.
- Gathered parameters follow the parameter coordinator: a module's parameters are gathered for
  its forward or backward and released afterwards unless they are used again within
  `stage3_max_reuse_distance` elements of the recorded module trace; every module's fetch also
  prefetches up to `stage3_prefetch_bucket_size` elements ahead while fewer than
  `stage3_max_live_parameters` are gathered. `gathered` replays that over the model's trace.
- The optimizer step runs one sub-group (`sub_group_size` elements) at a time: its gradient is
  flattened (16 bits) and converted to fp32 for the step, and freed after it. AdamW is torch's
  fused kernel (backends/base.py): it updates in place, without foreach temporaries.
- ZeRO-1 + bf16 runs on DeepSpeed's BF16_Optimizer (gradcycle accumulates its gradients in fp32):
  a full fp32 gradient buffer beside the bf16 gradients, one bucketed all-reduce per cycle.
- ZeRO-1/2 keep the full 16-bit model, fp32 master and moment partitions; gradients go through
  `reduce_bucket_size` buckets (two with `overlap_comm`) allocated for each backward, ZeRO-2
  copies its partition out of them, and the step flattens and converts one parameter group's
  gradient partition to fp32.
- The reduction dtype (`communication_data_type`, from backend.reduce_dtype): ZeRO-1/2 and the
  BF16_Optimizer flatten each reduced bucket and cast the flat copy to it for the all-reduce
  (`allreduce_bucket`); ZeRO-3 allocates its reduction bucket in it (stage3.py l. 782), so
  gradients are copied into it before the reduce-scatter.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradcycle.planner.memory import Setup, Shape


@dataclass(frozen=True)
class ZeroSettings:
    """The zero_optimization values the memory terms read (DeepSpeed's defaults)."""

    reduce_bucket: int = 500_000_000  # reduce_bucket_size (elements)
    prefetch_bucket: int = 50_000_000  # stage3_prefetch_bucket_size
    persistence: int = 100_000  # stage3_param_persistence_threshold
    max_live: int = 1_000_000_000  # stage3_max_live_parameters
    max_reuse: int = 1_000_000_000  # stage3_max_reuse_distance
    sub_group: int = 1_000_000_000  # sub_group_size
    overlap_comm: bool | None = None  # None: DeepSpeed's default, on for stage 3 only
    grad_accum: int = 0  # bytes per gradient element as accumulated; 0: the model dtype
    comm: int = 0  # bytes per element of communication_data_type; 0: the model dtype


def settings(zero: dict, data_types: dict | None = None, comm_dtype: str | None = None,
             ) -> ZeroSettings:  # fmt: skip
    """ZeroSettings from a DeepSpeed config's `zero_optimization` section (either spelling of
    the stage-3 keys) and its `data_types.grad_accum_dtype` / `communication_data_type`."""

    def get(*names, default):
        return next((zero[n] for n in names if zero.get(n) is not None), default)

    def nbytes(dtype) -> int:
        return {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}.get(
            str(dtype).lower().removeprefix("torch."), 0
        )

    d = ZeroSettings()
    return ZeroSettings(
        reduce_bucket=int(get("reduce_bucket_size", default=d.reduce_bucket)),
        prefetch_bucket=int(get("stage3_prefetch_bucket_size", "prefetch_bucket_size",
                                default=d.prefetch_bucket)),
        persistence=int(get("stage3_param_persistence_threshold", "param_persistence_threshold",
                            default=d.persistence)),
        max_live=int(get("stage3_max_live_parameters", "max_live_parameters", default=d.max_live)),
        max_reuse=int(get("stage3_max_reuse_distance", "max_reuse_distance", default=d.max_reuse)),
        sub_group=int(get("sub_group_size", default=d.sub_group)),
        overlap_comm=zero.get("overlap_comm"),
        grad_accum=nbytes((data_types or {}).get("grad_accum_dtype")),
        comm=nbytes(comm_dtype),
    )  # fmt: skip


def _tensors(s: Shape) -> list[tuple[int, int]]:
    """Every parameter, in module.parameters() order (the order of DeepSpeed's groups)."""
    layer = s.layer_tensors()
    root = s.root_tensors()
    return [root[0], *layer * s.layers, *root[1:]]


def persistent_numel(s: Shape, z: ZeroSettings) -> int:
    return sum(r * c for r, c in _tensors(s) if r * c <= z.persistence)


def _partition(numel: int, world: int) -> int:
    return math.ceil(numel / world)


@lru_cache(maxsize=256)
def _partitions(s: Shape, world: int) -> tuple[int, int]:
    """(elements of all partitions on one rank, elements of the largest parameter)."""
    tensors = _tensors(s)
    return sum(_partition(r * c, world) for r, c in tensors), max(r * c for r, c in tensors)


@lru_cache(maxsize=256)
def largest_sub_group(s: Shape, z: ZeroSettings, world: int) -> int:
    """Elements of the largest optimizer sub-group: each parameter group (weights with decay,
    1-D weights without) is cut after the partition that reaches sub_group_size."""
    best = 0
    for group in ([t for t in _tensors(s) if t[1] > 1], [t for t in _tensors(s) if t[1] == 1]):
        size = 0
        for r, c in group:
            size += _partition(r * c, world)
            if size >= z.sub_group:
                best, size = max(best, size), 0
        best = max(best, size)
    return best


def bf16_optimizer(setup: Setup, z: ZeroSettings) -> bool:
    """ZeRO-1 + bf16 + fp32 accumulation: DeepSpeed's BF16_Optimizer, not its ZeRO optimizer
    (engine.py::_do_optimizer_sanity_check); gradcycle's default for ZeRO-1 under bf16."""
    return setup.backend == "zero1" and setup.precision == "bf16" and z.grad_accum == 4


def model_states(setup: Setup, z: ZeroSettings, k: int) -> dict[str, float]:
    """Parameters, gradients, optimizer states (fp32 masters included) per GPU; `k` is the
    optimizer's bytes of state per parameter."""
    s, n, w = setup.shape, setup.num, setup.world
    stage = int(setup.backend[-1])
    psi = s.n_params
    part = _partitions(s, w)[0]
    grad = z.grad_accum or n.grad
    optimizer = 0.0 if setup.offload_optimizer else part * (4 + k)
    if bf16_optimizer(setup, z):
        # BF16_Optimizer: each micro-batch's bf16 gradients plus the full fp32 accumulation
        # buffer (`fp32_groups_gradients_flat`, the size of the whole flat group)
        return {"parameters": psi * n.param, "gradients": psi * (n.grad + 4),
                "optimizer": optimizer}  # fmt: skip
    if stage < 3:  # ZeRO-2 with offload accumulates its partition on the host
        grads = psi * n.grad if stage == 1 else 0.0 if setup.offload_optimizer else part * grad
        return {"parameters": psi * n.param, "gradients": grads, "optimizer": optimizer}
    persistent = persistent_numel(s, z)
    params = 0.0 if setup.offload_param else part * n.param
    return {"parameters": params + persistent * n.param,
            "gradients": 0.0 if setup.offload_optimizer else part * grad,
            "optimizer": optimizer}  # fmt: skip


# ---------------------------------------------------------------- ZeRO-3's gathered parameters


def _trace(s: Shape, checkpointed: tuple[int, ...]):
    """The module trace DeepSpeed records for one forward + backward of the Hugging Face Llama:
    (part, parameter ids) for every module its hooks fetch, those without parameters included
    (each fetch also prefetches); numel per id. part: forward, top (the backward down to and
    including the top decoder layer, its recomputation included) or rest."""
    numel: list[int] = []

    def new(n: int) -> list[int]:
        numel.append(n)
        return [len(numel) - 1]

    h, kv, i = s.hidden, s.kv_dim, s.intermediate
    embed = new(s.vocab * h)
    # decoder layer, input norm, attention, q, k, v, o, post-attention norm, MLP, gate, SiLU, up,
    # down ([] = a module without parameters)
    shapes = [None, (h, 1), None, (h, h), (kv, h), (kv, h), (h, h), (h, 1), None, (i, h), None,
              (i, h), (h, i)]  # fmt: skip
    layers = [[new(r * c) if (r, c) != (0, 0) else [] for r, c in
               (t or (0, 0) for t in shapes)] for _ in range(s.layers)]  # fmt: skip
    norm = new(h)
    head = embed if s.tie else new(s.vocab * h)
    # causal LM, model, embedding, rotary embedding (forward only), layers, norm, head
    trace = [("forward", []), ("forward", []), ("forward", embed), ("forward", [])]
    trace += [("forward", m) for mods in layers for m in mods]
    trace += [("forward", norm), ("forward", head), ("top", []), ("top", head), ("top", []),
              ("top", norm)]  # fmt: skip
    for j in reversed(range(s.layers)):
        part = "top" if j == s.layers - 1 else "rest"
        if j in checkpointed:  # non-reentrant recomputation runs the layer's forward again
            trace += [(part, m) for m in layers[j]]
        trace += [(part, m) for m in layers[j][:1] + layers[j][:0:-1]]
    return trace + [("rest", embed)], numel


@lru_cache(maxsize=256)
def gathered(s: Shape, checkpointed: tuple[int, ...], z: ZeroSettings, world: int) -> dict:
    """Most gathered (non-persistent) parameter elements alive per part of the step, replaying
    PartitionedParameterCoordinator's fetch / prefetch / release over the module trace; `at_loss`
    is what is gathered while the logits and the loss are computed. Each fetch prefetches up to
    the bucket while fewer than max_live elements are gathered, so on a large model the gathered
    set runs at about max_live; a small one stays gathered whole (every reuse is near)."""
    trace, numel = _trace(s, checkpointed)
    persist = {p for p, n in enumerate(numel) if n <= z.persistence}
    size = [_partition(n, world) * world for n in numel]  # a gathered buffer is padded
    queue = [(p, t) for t, (_, mods) in enumerate(trace) for p in mods]
    uses: dict[int, list[int]] = {}  # trace positions where each parameter is used, ascending
    for t, (_, mods) in enumerate(trace):
        for p in mods:
            uses.setdefault(p, []).append(t)
    cum = [0]  # elements used by the trace before each position
    for _, mods in trace:
        cum.append(cum[-1] + sum(numel[p] for p in mods))
    pos, available, live = 0, set(), 0
    last_fetched: dict[int, int] = {}
    # prefetches of several parameters share one flat buffer; the first wait copies every
    # parameter out, and the buffer is freed once the last of them was waited on
    staging: list[list] = []  # [flat elements, parameters not waited on, waited on yet]
    out = {"forward": 0, "at_loss": 0, "top": 0, "rest": 0}
    for t, (part, mods) in enumerate(trace):
        for p in mods:  # fetch (a lone parameter is gathered straight into its own buffer)
            if p not in available and p not in persist:
                available.add(p)
                live += size[p]
            for group in staging:
                if p in group[1]:
                    group[1].discard(p)
                    group[2] = True
        staging = [g for g in staging if g[1]]
        # the module's own entries leave the queue, then prefetch up to the bucket
        for _ in range(sum(last_fetched.get(p, -1) < t for p in mods)):
            q, step = queue[pos]
            pos, last_fetched[q] = pos + 1, step
        budget, fetch, fetched = min(z.max_live - live, z.prefetch_bucket), [], 0
        while pos < len(queue) and fetched < budget:
            q, step = queue[pos]
            pos += 1
            last_fetched[q] = max(last_fetched.get(q, -1), step)
            if q not in available and q not in persist and q not in fetch:
                fetch.append(q)
                fetched += size[q]
        available.update(fetch)
        live += fetched
        if len(fetch) > 1:
            staging.append([fetched, set(fetch), False])
        now = live + sum(g[0] for g in staging if g[2])
        out[part] = max(out[part], now)
        if part == "forward" and trace[t + 1][0] != "forward":  # the head: logits, loss
            out["at_loss"] = now
        # release, unless reused within max_reuse elements (the modules after this one whose
        # predecessors use fewer) or a prefetch already passed a reuse
        horizon = bisect_left(cum, cum[t + 1] + z.max_reuse) - 1  # last module still looked at
        for p in mods:
            later = uses[p][bisect_right(uses[p], t) :]
            reused = bool(later) and later[0] <= horizon
            if p in available and not reused and last_fetched.get(p, -1) <= t + 1:
                available.discard(p)
                live -= size[p]
    return out


# ---------------------------------------------------------------- temporaries by moment


def temporaries(setup: Setup, z: ZeroSettings) -> dict[str, float]:
    """Buffers beside model states and activations, per moment (see memory.temporaries);
    `step_gradients`: the gradients alive during the optimizer step."""
    s, n, w = setup.shape, setup.num, setup.world
    stage = int(setup.backend[-1])
    psi = s.n_params
    g = z.grad_accum or n.grad
    comm = z.comm or n.reduce
    out = dict.fromkeys(("static", "forward", "loss", "layer", "end", "step", "per_cycle"), 0.0)
    out["step_gradients"] = model_states(setup, z, 0)["gradients"]
    bucket = z.reduce_bucket * comm
    # ZeRO-3: the reduce-scatter input, the bucket's gradients copied out with padding
    # (torch.cat); ZeRO-1/2: the flattened bucket, plus its cast to the reduction dtype
    flat = comm if stage == 3 else n.grad + (comm if comm != n.grad else 0)
    reduce_copy = min(z.reduce_bucket, psi) * flat if w > 1 else 0.0
    part, largest = _partitions(s, w)
    if stage == 3:
        out["static"] = bucket
        live = gathered(s, tuple(setup.checkpointed), z, w)
        out["forward"] = out["loss"] = live["at_loss"] * n.param
        # a parameter's full gradient before its copy into the bucket, and the reduce copy
        out["layer"] = live["top"] * n.param + largest * n.grad + reduce_copy
        out["end"] = live["rest"] * n.param + reduce_copy
        if not setup.offload_optimizer:
            sub = largest_sub_group(s, z, w)
            flat = sub * g + (4 * sub if g != 4 else 0)  # the 16-bit flat copy, then fp32
            norm = 8 * _partition(largest, w)  # each partition's fp64 copy for the grad norm
            out["step"] = max(flat, norm)
        if w > 1:
            out["per_cycle"] = psi * n.grad  # coalesced: every micro-batch's full gradient
        return out
    if bf16_optimizer(setup, z):
        # the boundary's all-reduce flattens the fp32 sum in buckets of MEMORY_OPT_ALLREDUCE_SIZE
        # (5e8) elements (engine.buffered_allreduce_fallback) and casts each flat bucket to the
        # communication dtype unless it is fp32; the step uses views of the fp32 buffer
        flat = 4 + (comm if comm != 4 else 0)
        out["end"] = min(500_000_000, psi) * flat if w > 1 else 0.0
        out["step_gradients"] = psi * (n.grad + 4)
        return out
    overlap = z.overlap_comm if z.overlap_comm is not None else False
    # ZeRO-1 stages fp32 accumulation in its buckets, ZeRO-2 reduces in the model dtype
    buckets = (2 if overlap else 1) * z.reduce_bucket * (g if stage == 1 else n.grad)
    if stage == 2 and setup.sync == "per_micro":
        # the buckets appear with the first gradient hook, after the loss's own backward
        out["layer"] = buckets + largest * n.grad + reduce_copy
        # from the second micro-batch on the new partition fills beside the accumulated one
        out["end"] = buckets + (part * g if setup.accumulation > 1 else 0.0)
    else:  # one coalesced reduction after the cycle (ZeRO-1 always)
        out["end"] = buckets + reduce_copy + (part * g if stage == 1 else 0.0)
    if not setup.offload_optimizer:
        out["step"] = part * g + (4 * part if g != 4 else 0)
    # the reduction left the owned partition only (ZeRO-1 drops the full gradients with it)
    out["step_gradients"] = 0.0 if setup.offload_optimizer else part * g
    if stage == 2 and w > 1:
        out["per_cycle"] = psi * n.grad - part * g  # a full local gradient, no partition yet
    return out
