"""python -m gradcycle.plan <overrides>: will this run fit, and how should the batch be cut?

Reads the same Hydra config as train.py (plus `hardware=`, `nodes=`, `gpus_per_node=`) and prints,
per GPU, the memory of the configured run by component, the collectives per optimizer step and the
expected tokens/s, then recommends micro-batch, accumulation, sync policy and activation
checkpointing for the configured global batch (or says what would fit); `plan.format=json` as one
JSON object. A batch that train.py would refuse fails here the same way (exit 2, same message).
Inputs: inputs.py; formulas: memory.py, zero.py, costs.py; output: report.py; in training: auto.py.
Depends on the config only, never on the CLI or the trainer.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field

from gradcycle.planner.costs import Collective, StepTime, collectives, step_time
from gradcycle.planner.inputs import (
    UnknownShape,
    budget_bytes,
    check_batch,
    make_setup,
    micro_options,
    shape_from_config,
    sync_options,
    topology,
    zero_settings,
)
from gradcycle.planner.memory import GIB, Estimate, Setup, Shape, estimate

__all__ = ["UnknownShape", "make_plan", "shape_from_config", "main"]

# Checkpointing options the recommendation tries, cheapest recompute first.
AC_OPTIONS = (("none", 2), ("selective", 4), ("selective", 2), ("full", 2))
MANY_MICRO_BATCHES = 8  # bf16 accumulation over more micro-batches loses visible precision


@dataclass
class Candidate:
    setup: Setup
    est: Estimate
    colls: list[Collective]
    time: StepTime
    ac: tuple[str, int]

    micro = property(lambda self: self.setup.micro)
    sync = property(lambda self: self.setup.sync)

    def key(self) -> tuple:
        """Fastest first; then the largest micro-batch, least recompute, least memory, bytes."""
        recompute = len(self.setup.checkpointed)
        comm = sum(c.nbytes for c in self.colls)
        return (float(f"{self.time.step_s:.4g}"), -self.micro, recompute, self.est.peak, comm)


@dataclass
class Plan:
    cfg: object
    shape: Shape
    world: int
    nodes: int
    budget: float  # bytes per GPU available to tensors
    configured: Candidate | None  # None when train.micro_batch_size=auto
    auto: Candidate | None  # what auto picks (configured checkpointing)
    recommended: Candidate | None  # best over checkpointing options too
    alternatives: list[tuple[str, Candidate]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def evaluate(cfg, shape: Shape, world: int, nodes: int, micro: int, sync: str,
             ac: tuple[str, int], backend: str | None = None, zero=None) -> Candidate:  # fmt: skip
    """One cut; `zero`: the backend's ZeroSettings when the caller already has them."""
    setup = make_setup(cfg, shape, world, nodes, micro, sync, ac, backend, zero)
    colls = collectives(setup, max(1, world // nodes))
    hw = cfg.hardware
    # hardware=cpu has no interconnect worth modelling (gloo, test runs), and a device without a
    # profile has no known peak: communication is not timed there, so auto never trades memory
    # for it and keeps each backend's default (compute is then timed at a nominal 1 TFLOP/s).
    known = hw.name != "cpu" and bool(hw.bf16_tflops and hw.intra_node_gbps and hw.inter_node_gbps)
    timed = colls if known else []
    t = step_time(setup, timed, hw.bf16_tflops or 1.0, hw.intra_node_gbps or 1.0,
                  hw.inter_node_gbps or 1.0, cfg.plan.mfu)  # fmt: skip
    return Candidate(setup, estimate(setup), colls, t, ac)


def search(cfg, shape, world, nodes, acs, limit: float, backend=None) -> Candidate | None:
    """The best candidate under `limit` bytes, or None."""
    b = backend or cfg.backend.name
    syncs = sync_options(cfg, b, world)
    zero = zero_settings(cfg, b) if b.startswith("zero") else None  # once, not per cut
    fitting = [
        c
        for micro in micro_options(cfg, world)
        for sync in syncs
        for ac in acs
        if (c := evaluate(cfg, shape, world, nodes, micro, sync, ac, b, zero)).est.peak <= limit
    ]
    return min(fitting, key=Candidate.key) if fitting else None


def _configured_ac(cfg) -> tuple[str, int]:
    return (cfg.activation_checkpointing.mode, cfg.activation_checkpointing.every)


# ---------------------------------------------------------------- the plan


def make_plan(cfg, world: int | None = None, nodes: int | None = None, vocab=None,
              searches: bool = True) -> Plan:  # fmt: skip
    """The configured run, what `auto` picks, the recommendation; `searches=False`: the first."""
    world, nodes, _ = topology(cfg, world, nodes)
    check_batch(cfg, world)  # a batch train.py refuses is refused here, with its words
    cfg = _target(cfg)  # hardware=auto / precision=auto (a training run resolved them first)
    shape = shape_from_config(cfg, vocab)
    budget = budget_bytes(cfg)
    limit = cfg.plan.headroom * budget
    configured = auto = recommended = None
    fixed = cfg.train.micro_batch_size != "auto"
    if fixed:
        sync = sync_options(cfg, cfg.backend.name, world)
        configured = min((evaluate(cfg, shape, world, nodes, int(cfg.train.micro_batch_size), s,
                                   _configured_ac(cfg)) for s in sync), key=_fit_key(limit))  # fmt: skip
    plan = Plan(cfg, shape, world, nodes, budget, configured, auto, recommended)
    if searches or not fixed:
        plan.auto = search(cfg, shape, world, nodes, [_configured_ac(cfg)], limit)
        plan.recommended = search(cfg, shape, world, nodes, AC_OPTIONS, limit)
        if plan.recommended is None:
            plan.alternatives = alternatives(cfg, shape, world, nodes, limit)
    plan.warnings = warnings_for(plan, configured or plan.auto)
    return plan


def _target(cfg):
    """hardware=auto and precision=auto for the machine the planner sizes (no-op if resolved)."""
    from gradcycle import hardware
    from gradcycle.distributed import device_type

    return hardware.resolve(cfg, device_type(cfg.device), for_planner=True)


def _fit_key(limit: float):
    return lambda c: (c.est.peak > limit, c.key())


def alternatives(cfg, shape, world, nodes, limit) -> list[tuple[str, Candidate]]:
    """What would fit when nothing does: a sharding backend, host offload, the fewest nodes."""
    out = []
    backends = list(dict.fromkeys([cfg.backend.name, "fsdp", "zero3"]))
    for factor in (1, 2, 4, 8, 16):
        more = world * factor
        if cfg.train.global_batch_size and cfg.train.global_batch_size % more:
            continue
        for b in backends:
            if factor == 1 and b == cfg.backend.name:
                continue  # that is the recommendation itself
            if (c := search(cfg, shape, more, nodes * factor, AC_OPTIONS, limit, b)) is not None:
                where = f" nodes={nodes * factor} ({more} GPUs)" if factor > 1 else ""
                out.append((f"backend={b}{where}", c))
        if out:
            break
    if not any(what.startswith("backend=") and "nodes=" not in what for what, _ in out):
        off = copy.deepcopy(cfg)
        off.backend.offload_optimizer = True
        if (c := search(off, shape, world, nodes, AC_OPTIONS, limit, "zero3")) is not None:
            out.append(("backend=zero3 backend.offload_optimizer=true (host memory, slower)", c))
    return out[:4]


def warnings_for(plan: Plan, cand: Candidate | None) -> list[str]:
    if cand is None:
        return []
    out, cfg, s = [], plan.cfg, cand.setup
    k = s.accumulation
    t = cand.time
    micro_comm = sum(c.seconds(cfg.hardware.intra_node_gbps, cfg.hardware.inter_node_gbps)
                     for c in cand.colls if c.when == "micro") / k  # fmt: skip
    per_micro_compute = t.compute_s / k
    if micro_comm > per_micro_compute:
        need = s.tokens * micro_comm / per_micro_compute
        per_rank = s.micro * k
        bigger = next((d for d in range(s.micro + 1, per_rank + 1)
                       if per_rank % d == 0 and d * s.seq >= need), None)  # fmt: skip
        remedies = [f"train.micro_batch_size={bigger}" if bigger else "a larger global batch"]
        if s.num.reduce == 4 and s.precision != "fp32":
            remedies.append(f"backend.reduce_dtype={s.precision} (halves the gradient bytes)")
        remedies.append("sync=per_cycle where memory allows")
        out.append(
            f"{s.tokens} tokens per micro-batch are too few to hide communication on "
            f"{cfg.hardware.name}: each micro-batch's collectives take ~{micro_comm:.2f}s against "
            f"~{per_micro_compute:.2f}s of compute (about {need:,.0f} tokens would hide them); "
            f"consider {', '.join(remedies)}"
        )
    share = f"{cand.est.peak / GIB:.1f} GiB is {cand.est.peak / plan.budget:.0%} of the " \
            f"{plan.budget / GIB:.1f} GiB per GPU on {cfg.hardware.name}"  # fmt: skip
    if cand.est.peak > plan.budget:
        out.append(f"predicted peak {share}: this run will not fit;{fixes(plan)}")
    elif cand.est.peak > 0.9 * plan.budget:
        out.append(
            f"predicted peak {share}: fragmentation can push it over; lower "
            "train.micro_batch_size or enable activation checkpointing"
        )
    if k >= MANY_MICRO_BATCHES and s.num.grad == 2 and s.backend.startswith("zero"):
        out.append(
            f"gradients accumulate in bf16 over K={k} micro-batches (DeepSpeed's bf16 ZeRO keeps "
            "its gradients in the parameter dtype), each addition rounding to 8 significant "
            "bits: prefer fewer, larger micro-batches, or fp32 accumulation where DeepSpeed "
            "supports it (backend.deepspeed_config.data_types.grad_accum_dtype=fp32); fsdp keeps "
            "fp32 gradient shards"
        )
    if (k >= MANY_MICRO_BATCHES and s.backend in ("fsdp", "hsdp") and s.sync == "per_cycle"
            and s.num.reduce == 2):  # fmt: skip
        out.append(
            f"unsharded gradients accumulate in bf16 over K={k} micro-batches "
            "(backend.reduce_dtype=bf16 with sync=per_cycle): backend.reduce_dtype=fp32 "
            "accumulates them in fp32"
        )
    return out


# ---------------------------------------------------------------- explanations


def cut(c: Candidate) -> str:
    """The overrides that select candidate `c`."""
    ac = f"activation_checkpointing.mode={c.ac[0]}"
    if c.ac[0] == "selective":
        ac += f" activation_checkpointing.every={c.ac[1]}"
    return f"train.micro_batch_size={c.micro} {ac} backend.sync={c.sync}"


def explain(plan: Plan) -> str:
    """One paragraph: why the configured cut does not fit and what would."""
    cfg = plan.cfg
    text = (f"nothing fits in {plan.budget / GIB:.1f} GiB per GPU ({cfg.hardware.name}, "
            f"{plan.world} GPUs, backend={cfg.backend.name}, activation_checkpointing.mode="
            f"{cfg.activation_checkpointing.mode}).")  # fmt: skip
    c = plan.configured or _smallest(plan)
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in c.est.breakdown.items())
    text += (f" At micro-batch {c.micro} the predicted peak is {c.est.peak / GIB:.1f} GiB "
             f"({parts} GiB).")  # fmt: skip
    text += fixes(plan)
    return text


def fixes(plan: Plan) -> str:
    """What fits instead, as overrides."""
    text = ""
    if plan.recommended is not None:
        r = plan.recommended
        text += f" Fits: {cut(r)} ({r.est.peak / GIB:.1f} GiB)."
    for what, alt in plan.alternatives:
        text += f" Fits: {what} {cut(alt)} ({alt.est.peak / GIB:.1f} GiB)."
    if plan.recommended is None and not plan.alternatives:
        text += " Nothing tried fits: more nodes, a larger GPU or a smaller model is needed."
    return text


def _smallest(plan: Plan) -> Candidate:
    world, nodes = plan.world, plan.nodes
    sync = sync_options(plan.cfg, plan.cfg.backend.name, world)[0]
    return evaluate(plan.cfg, plan.shape, world, nodes, 1, sync, _configured_ac(plan.cfg))


def main(argv: list[str] | None = None) -> int:
    from gradcycle.compose import tool_main

    return tool_main("gradcycle.plan", __doc__, argv, _plan_cli, _report)


def _plan_cli(cfg) -> Plan:
    from gradcycle.config import validate

    validate(cfg, this_machine=False)  # the target's GPUs, not this machine's
    plan = make_plan(cfg)  # resolves hardware=auto and precision=auto for the target
    if plan.cfg.precision != cfg.precision:  # the rules that depend on the precision chosen
        validate(plan.cfg, this_machine=False)
    return plan


def _report(plan: Plan) -> None:
    from gradcycle.planner.report import render_json, render_text

    print(json.dumps(render_json(plan)) if plan.cfg.plan.format == "json" else render_text(plan))


if __name__ == "__main__":
    sys.exit(main())
