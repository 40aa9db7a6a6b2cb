"""Collectives per optimizer step and the step time they imply (pure arithmetic, no torch).

Bytes are those of the full (unsharded) buffer, as `telemetry.CommCounter` reports them. Time per
collective uses ring algorithms: an all-reduce moves 2(n-1)/n of the buffer through each GPU, an
all-gather or reduce-scatter (n-1)/n, at the hardware's per-GPU bandwidth (inter-node when the
group spans nodes). Overlap: a micro-batch's collectives hide behind that micro-batch's compute,
a cycle's gradient reduction behind one micro-batch, and ZeRO-1/2's parameter all-gather after
the optimizer step is exposed. backend.pp > 1 (planner/pipeline.py): the data-parallel
collectives are those of the largest stage over its replicas, the stages exchange activations
point to point (a boundary's bytes through one link, boundaries in parallel), and the compute of
the slowest stage is stretched by the pipeline bubble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradcycle.planner.memory import DDP_BUCKET_BYTES, Setup


@dataclass(frozen=True)
class Collective:
    op: str  # all_reduce | all_gather | reduce_scatter | point_to_point
    what: str
    calls: int  # per optimizer step
    nbytes: float  # per optimizer step, full buffers
    group: int  # ranks taking part
    inter_node: bool
    when: str  # micro (every micro-batch) | cycle (once per cycle) | step (after the update)

    def seconds(self, intra_gbps: float, inter_gbps: float) -> float:
        if self.group <= 1:
            return 0.0
        if self.op == "point_to_point":  # `group` stages; each boundary has its own link
            return (
                self.nbytes
                / (self.group - 1)
                / ((inter_gbps if self.inter_node else intra_gbps) * 1e9)
            )
        frac = (self.group - 1) / self.group
        moved = self.nbytes * frac * (2 if self.op == "all_reduce" else 1)
        return moved / ((inter_gbps if self.inter_node else intra_gbps) * 1e9)


def collectives(setup: Setup, gpus_per_node: int) -> list[Collective]:
    """What the backend runs per optimizer step (K = setup.accumulation micro-batches)."""
    if setup.pp > 1 and setup.stage is None:
        from gradcycle.planner import pipeline

        stages = pipeline.stage_setups(setup)
        heaviest = max(stages, key=lambda st: st.shape.n_params)
        p2p = [Collective("point_to_point", "activations and their gradients",
                          2 * setup.accumulation * (setup.pp * setup.pp_virtual - 1),
                          pipeline.p2p_bytes_per_step(setup), setup.pp,
                          setup.pp * setup.world > gpus_per_node, "micro")]  # fmt: skip
        return collectives(heaviest, gpus_per_node) + p2p
    s, n, k, w = setup.shape, setup.num, setup.accumulation, setup.world
    psi = s.n_params
    multi = w > gpus_per_node  # the data-parallel group spans nodes
    if w <= 1:
        return []
    syncs = k if setup.sync == "per_micro" else 1
    when = "micro" if setup.sync == "per_micro" else "cycle"
    b = setup.backend
    # backend.reduce_dtype: the bytes of every gradient reduction below
    dtype = "fp32" if n.reduce == 4 else setup.precision
    grads = f"gradients ({dtype})"
    if b == "ddp" and setup.stage is not None:  # a pipeline stage: one flat all-reduce
        return [Collective("all_reduce", grads, 1, psi * n.grad, w, multi, "cycle")]
    if b == "ddp":
        buckets = math.ceil(psi * n.grad / DDP_BUCKET_BYTES) + 1
        return [Collective("all_reduce", grads, syncs * buckets, syncs * psi * n.reduce, w,
                           multi, when)]  # fmt: skip
    if b.startswith("zero"):
        stage = int(b[-1])
        per_bucket = math.ceil(psi / setup.zero.reduce_bucket)
        if stage == 1:
            syncs, when = 1, "cycle"  # ZeRO-1 reduces at the boundary only
        out = []
        if stage == 3:
            persistent = sum(r * c for r, c in s.layer_tensors() * s.layers + s.root_tensors()
                             if r * c <= setup.zero.persistence)  # fmt: skip
            gathered = (psi - persistent) * n.param
            out.append(Collective("all_gather", "parameters (forward + backward)",
                                  2 * k * (s.layers * 7 + 2), 2 * k * gathered, w, multi, "micro"))  # fmt: skip
            out.append(Collective("reduce_scatter", grads, syncs * per_bucket,
                                  syncs * psi * n.reduce, w, multi, when))  # fmt: skip
            return out
        out.append(Collective("all_reduce", grads, syncs * per_bucket, syncs * psi * n.reduce,
                              w, multi, when))  # fmt: skip
        out.append(Collective("all_gather", "updated parameters", per_bucket, psi * n.param, w,
                              multi, "step"))  # fmt: skip
        return out
    # fsdp / hsdp: U = L + 2 units (tied: L + 1); the norm + head unit (tied: the root) keeps its
    # parameters from forward to backward, every other unit is gathered again in backward
    units, shard = s.fsdp_units, setup.shard
    root = s.shard_numel(s.fsdp_kept(), shard) * shard
    total = s.model_shard(shard) * shard
    shard_multi = shard > gpus_per_node
    out = []
    if shard > 1:
        if setup.sync == "per_micro":
            out.append(Collective("all_gather", "parameters (forward + backward)",
                                  k * (2 * units - 1), k * (2 * total - root) * n.compute, shard,
                                  shard_multi, "micro"))  # fmt: skip
        else:
            out.append(Collective("all_gather", "parameters (once per cycle)", units,
                                  total * n.compute, shard, shard_multi, "cycle"))  # fmt: skip
        out.append(Collective("reduce_scatter", grads, syncs * units,
                              syncs * total * n.reduce, shard, shard_multi, when))  # fmt: skip
    if b == "hsdp" and w // shard > 1:
        out.append(Collective("all_reduce", f"gradient shards across replicas ({dtype})", units,
                              total / shard * n.reduce, w // shard, True, "cycle"))  # fmt: skip
    return out


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # all K micro-batches, recomputation included
    exposed_comm_s: float
    comm_s: float  # all collectives, as if none overlapped
    step_s: float
    tokens_per_s: float  # all GPUs
    mfu: float  # model FLOPs utilisation this step time implies
    offload_s: float = 0.0  # of step_s: host offload (PCIe, host optimizer, NVMe; planner/host.py)


def flops_per_token(setup: Setup) -> tuple[float, float]:
    """(model, hardware) FLOPs per token: 6N + 12·L·h·s, plus the recomputed forward (2N_layer +
    4·h·s per checkpointed layer), as telemetry.flops_per_token counts them."""
    s = setup.shape
    model = 6.0 * s.matmul_params + 12.0 * s.layers * s.hidden * setup.seq
    recompute = len(setup.checkpointed) * (2.0 * s.layer_params + 4.0 * s.hidden * setup.seq)
    return model, model + recompute


def step_time(setup: Setup, colls: list[Collective], tflops: float, intra: float, inter: float,
              mfu: float) -> StepTime:  # fmt: skip
    """Assumes the device sustains `mfu` of its peak on whatever it computes (recompute too)."""
    model_fpt, hw_fpt = flops_per_token(setup)
    peak = tflops * 1e12
    micro_s = setup.tokens * hw_fpt / (mfu * peak)
    k = setup.accumulation
    stretch, gpus = 1.0, setup.world * setup.pp
    if setup.pp > 1:  # the slowest stage's compute, idle through the fill and drain
        from gradcycle.planner import pipeline

        slowest = max(flops_per_token(st)[1] for st in pipeline.stage_setups(setup))
        micro_s = setup.tokens * slowest / (mfu * peak)
        stretch = 1 / (1 - pipeline.bubble_fraction(setup.pp, k, setup.pp_virtual))
    by_when = {"micro": 0.0, "cycle": 0.0, "step": 0.0}
    for c in colls:
        by_when[c.when] += c.seconds(intra, inter)
    exposed = k * max(0.0, by_when["micro"] / k - micro_s) if k else 0.0
    exposed += max(0.0, by_when["cycle"] - micro_s) + by_when["step"]
    compute = k * micro_s * stretch  # bubble time included
    step = compute + exposed
    tokens = k * setup.tokens * setup.world
    tps = tokens / step if step > 0 else 0.0
    return StepTime(compute, exposed, sum(by_when.values()), step, tps,
                    tps * model_fpt / (peak * gpus))  # fmt: skip
