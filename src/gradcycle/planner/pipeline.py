"""Pipeline parallelism (backend.pp): bubble, per-stage activation memory, step time.

Pure arithmetic (no torch), for p stages (ranks), v stages per rank, K micro-batches per cycle
(the cycle's micro-batches are the pipeline's: backends/pipeline.py):

- bubble: every schedule here (interleaved_zb: an upper bound; its deferred weight passes fill
  part of the drain) fills and drains the pipeline once per cycle: (p - 1) idle slots
  of one stage-chunk beside v·K busy ones, so the idle share of the step is (p-1) / (v·K + p-1)
  (the (p-1)/(v·K) of the literature is the same idle time relative to the busy time).
- activations: GPipe runs all K forwards before any backward, so every stage holds K
  micro-batches' activations; 1F1B starts backward after a warm-up of p - s forwards, so stage s
  holds min(K, p - s): stage 0 holds p, whatever K. Interleaved 1F1B holds what torch's schedule
  warms up with, (v-1)·(K/rounds) + 2·(p-1-s) + 1 chunk-forwards (`_get_warmup_ops`), each
  of L/(p·v) layers. The zero-bubble schedules hold a chunk's inputs until its deferred weight
  pass: interleaved_zb min(v·p, v·K), zbv min(2p, K+1+s), dualpipev 2p+1 (K >= 2p). Each count is
  the peak of forwards not yet released by a full or weight backward in torch's own schedule
  order (tests/test_pipeline.py counts it there).
- placement: stage ids rank + c·p (looped), or under the V schedules (zbv, dualpipev) rank r
  holds stages r and 2p-1-r: rank 0 holds the first and the last, and the middle boundary
  (p-1 -> p) stays on one rank.
- time: the step's compute (what one rank computes for its 1/p of the layers, all K micro-
  batches) stretched by the bubble: t_step = t_compute / (1 - bubble).
- memory (`stage_estimates`): each rank is sized as its own model (memory.py): its L/p layers,
  the embedding on the first, final norm, head and loss on the last, sharded or replicated over
  its data-parallel ranks, its saved activations times the micro-batches it holds. The plan's
  peak is the fullest rank's.
- point-to-point: per micro-batch and stage boundary between two ranks, the activations (micro x
  seq x hidden in the residual stream's dtype) go forward and their gradient back: 2·K·(p·v - 1)
  transfers per step and pipeline (V placement: 2·K·(2p - 2), its middle boundary is local).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

V_SHAPED = ("zbv", "dualpipev")  # rank r holds stages r and 2p-1-r


def rank_stages(p: int, v: int, rank: int, schedule: str = "1f1b") -> list[int]:
    """The stage ids pipeline rank `rank` holds (backends/pipeline.py builds these)."""
    if schedule in V_SHAPED:
        return [rank, 2 * p - 1 - rank]
    return [rank + c * p for c in range(v)]


def stage_owner(p: int, v: int, stage: int, schedule: str = "1f1b") -> int:
    return next(r for r in range(p) if stage in rank_stages(p, v, r, schedule))


def rank_crossings(p: int, v: int, schedule: str = "1f1b") -> int:
    """Stage boundaries whose two sides sit on different ranks (each one p2p per direction)."""
    owner = [stage_owner(p, v, s, schedule) for s in range(p * v)]
    return sum(owner[s] != owner[s + 1] for s in range(p * v - 1))


def bubble_fraction(p: int, k: int, v: int = 1) -> float:
    """Share of the step a stage is idle (fill and drain)."""
    return (p - 1) / (v * k + p - 1)


def in_flight(schedule: str, p: int, k: int, stage: int, v: int = 1) -> int:
    """Stage-chunk forwards whose activations `stage` (0 = first rank) holds at its peak."""
    if schedule == "gpipe":
        return k * v
    if schedule == "1f1b":
        return min(k, p - stage)
    if schedule == "looped_bfs":  # all of a chunk's forwards before its backwards
        return k * v
    if schedule == "interleaved_zb":  # inputs held until the deferred weight passes
        return min(v * p, k * v)
    if schedule == "zbv":
        return min(2 * p, k + 1 + stage)
    if schedule == "dualpipev":
        return min(2 * p + 1, k + p)
    if schedule == "interleaved_1f1b":
        per_round = k // max(1, k // p)
        return min((v - 1) * per_round + 2 * (p - 1 - stage) + 1, k * v)
    raise ValueError(f"unknown pipeline schedule {schedule!r}")


@dataclass(frozen=True)
class StagePlan:
    stage: int
    layers: int  # decoder layers on this rank (all its chunks)
    in_flight: int  # chunk-forwards held at the peak
    activation_bytes: float  # their saved activations


def stage_plans(schedule: str, p: int, k: int, v: int, n_layers: int,
                layer_bytes: float) -> list[StagePlan]:  # fmt: skip
    """Per rank: its layers and the activations it holds at its peak. `layer_bytes`: saved bytes
    of one layer for one micro-batch (planner/memory.py: layer_activation_bytes x tokens)."""
    chunk = n_layers // (p * v)
    out = []
    for s in range(p):
        held = in_flight(schedule, p, k, s, v)
        out.append(StagePlan(s, chunk * v, held, held * chunk * layer_bytes))
    return out


def step_time(compute_s: float, p: int, k: int, v: int = 1) -> float:
    """The step's wall time from one rank's compute time (its layers, all K micro-batches)."""
    return compute_s / (1 - bubble_fraction(p, k, v))


def owned_layers(n_layers: int, p: int, v: int, rank: int, schedule: str = "1f1b") -> list[int]:
    """The decoder layers pipeline rank `rank` holds, in stage order."""
    chunk = n_layers // (p * v)
    return [i for s in rank_stages(p, v, rank, schedule) for i in range(s * chunk, (s + 1) * chunk)]


def stage_setups(setup) -> list:
    """One memory.Setup per pipeline rank: its part of the model, its in-flight micro-batches."""
    p, v, k, shape = setup.pp, setup.pp_virtual, setup.accumulation, setup.shape
    out = []
    for rank in range(p):
        owned = owned_layers(shape.layers, p, v, rank, setup.pp_schedule)
        last = stage_owner(p, v, p * v - 1, setup.pp_schedule)
        part = dataclasses.replace(shape, layers=len(owned), first=rank == 0, last=rank == last)
        ckpt = tuple(j for j, i in enumerate(owned) if i in setup.checkpointed)
        # in_flight counts chunk-forwards of L/(p·v) layers: as whole-rank micro-batches / v
        held = in_flight(setup.pp_schedule, p, k, rank, v) / v
        out.append(dataclasses.replace(setup, shape=part, checkpointed=ckpt, in_flight=held,
                                       stage=rank))  # fmt: skip
    return out


def estimate_of(stage_setup):
    from gradcycle.planner.memory import estimate

    return estimate(stage_setup)


def stage_estimates(setup) -> list:
    return [estimate_of(s) for s in stage_setups(setup)]


def activation_bytes(setup) -> int:
    """What crosses one stage boundary per micro-batch, each way."""
    return setup.micro * setup.seq * setup.shape.hidden * setup.num.residual


def p2p_bytes_per_step(setup) -> int:
    """Activations forward and their gradients back, every boundary, all K micro-batches."""
    crossings = rank_crossings(setup.pp, setup.pp_virtual, setup.pp_schedule)
    return 2 * setup.accumulation * crossings * activation_bytes(setup)
