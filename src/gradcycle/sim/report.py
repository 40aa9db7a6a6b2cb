"""The simulation's result beside the planner's prediction: one dict (JSON) and its table.

The planner's memory components are mapped onto the tracker's categories (PLANNER_TERMS); a
planner component with no counterpart (fsdp per_cycle's "per_cycle extra": unsharded parameters
and gradients together) keeps a row of its own. Collectives are compared per op with
planner/costs.py's `collectives()`, the numbers behind the start-up sync plan.
"""

from __future__ import annotations

from gradcycle.sim.tracker import CATEGORIES

GIB = 2**30
OPS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "point_to_point")
PLANNER_TERMS = {
    "parameters": ("parameters",),
    "unsharded parameters": ("unsharded / cast parameters",),
    "gradients": ("gradients",),
    "optimizer state": ("optimizer states",),
    "communication buffers": ("communication buffers",),
    "activations": ("activations", "logits and loss"),
    "temporaries": ("layer backward (recomputed layer)", "optimizer step buffers"),
}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def planner_comm(colls) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in colls:
        entry = out.setdefault(c.op, {"calls": 0, "bytes": 0})
        entry["calls"] += int(c.calls)
        entry["bytes"] += int(c.nbytes)
    return out


def result(*, cfg, env, batch, tracker, record, candidate, attention, wall_s: float,
           host_rss: int) -> dict:  # fmt: skip
    """Everything the CLI prints, as plain data (simulate.format=json writes it as is)."""
    steps = tracker.steps
    steady = steps[-1]
    est = candidate.est if candidate is not None else None
    planner_by = {}
    if est is not None:
        known = {t for terms in PLANNER_TERMS.values() for t in terms}
        planner_by = {cat: sum(est.breakdown.get(t, 0.0) for t in terms)
                      for cat, terms in PLANNER_TERMS.items()}  # fmt: skip
        planner_by.update({k: v for k, v in est.breakdown.items() if k not in known})
    comm = {op: dict(v) for op, v in record["comm"].items() if v["calls"]}
    p_comm = planner_comm(candidate.colls) if candidate is not None else {}
    comm_ratio = {
        op: {k: _ratio(comm.get(op, {}).get(k, 0), p_comm.get(op, {}).get(k, 0))
             for k in ("calls", "bytes")}
        for op in sorted(set(comm) | set(p_comm), key=OPS.index)
    }  # fmt: skip
    return {
        "backend": cfg.backend.name,
        "sync": tracker.backend.sync,
        "rank": env.rank,
        "world_size": env.world_size,
        "nodes": env.num_nodes,
        "gpus_per_node": env.local_world_size,
        "hardware": cfg.hardware.name,
        "model": cfg.model.name,
        "accumulation_steps": batch.accumulation_steps,
        "micro_batch_size": batch.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "precision": cfg.precision,
        "activation_checkpointing": cfg.activation_checkpointing.mode,
        "attention_kernels": dict(attention.seen),
        "peak_bytes": steady.peak_bytes,
        "peak_at": steady.peak_at,
        "by_category": steady.by_category,
        "category_max": steady.category_max,
        "largest_at_peak": [
            {"bytes": b, "category": c, "shape": list(shape), "dtype": d}
            for b, c, shape, d in steady.largest
        ],  # fmt: skip
        "first_step_peak_bytes": steps[0].peak_bytes,
        "planner_peak_bytes": est.peak if est is not None else None,
        "planner_phase": est.phase if est is not None else None,
        "planner_by_category": planner_by,
        "peak_ratio": _ratio(steady.peak_bytes, est.peak) if est is not None else None,
        "comm": comm,
        "planner_comm": p_comm,
        "comm_ratio": comm_ratio,
        "sync_plan": [
            list(row) for row in tracker.backend.sync_plan(batch.accumulation_steps).rows
        ],
        "steps": [
            {
                "name": s.name,
                "peak_bytes": s.peak_bytes,
                "peak_at": s.peak_at,
                "start_bytes": s.start_bytes,
                "by_category": s.by_category,
            }
            for s in steps
        ],  # fmt: skip
        "host_rss_bytes": host_rss,
        "wall_s": wall_s,
    }


UNIT = [GIB, "GiB"]  # the table's unit: GiB, or MiB for a small model (render_text)


def _gib(n) -> str:
    return "-" if n is None else f"{n / UNIT[0]:.2f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}"


def render_text(r: dict) -> str:
    UNIT[:] = [GIB, "GiB"] if r["peak_bytes"] >= GIB else [2**20, "MiB"]
    kernels = ", ".join(f"{k} x{n}" for k, n in r["attention_kernels"].items()) or "none"
    lines = [
        f"simulated rank {r['rank']} of {r['world_size']} ({r['nodes']} nodes x "
        f"{r['gpus_per_node']}), backend={r['backend']} sync={r['sync']}, K={r['accumulation_steps']}"
        f" x micro-batch {r['micro_batch_size']} x {r['seq_len']} tokens, {r['precision']}, "
        f"checkpointing {r['activation_checkpointing']}, on {r['hardware']} (attention: {kernels})",
        "",
        f"{'memory of the steady-state step (' + UNIT[1] + ')':<40} {'simulated':>10} {'planner':>10} "
        f"{'sim/plan':>9}",
    ]
    planner = r["planner_by_category"]
    for cat in CATEGORIES:
        sim, plan = r["by_category"].get(cat, 0), planner.get(cat)
        lines.append(f"  {cat:<38} {_gib(sim):>10} {_gib(plan):>10} "
                     f"{_x(_ratio(sim, plan or 0)):>9}")  # fmt: skip
    for key, value in planner.items():
        if key not in CATEGORIES:
            lines.append(f"  {'(planner) ' + key:<38} {'-':>10} {_gib(value):>10} {'-':>9}")
    lines.append(f"  {'peak':<38} {_gib(r['peak_bytes']):>10} {_gib(r['planner_peak_bytes']):>10}"
                 f" {_x(r['peak_ratio']):>9}")  # fmt: skip
    lines.append(f"  simulated peak at: {r['peak_at']}; planner's: {r['planner_phase']}")
    lines.append(
        f"  first step (optimizer state created): {_gib(r['first_step_peak_bytes'])} {UNIT[1]}"
    )
    lines += ["", f"{'collectives per step':<22} {'calls':>8} {'planner':>8} {'ratio':>6} "
              f"{UNIT[1]:>9} {'planner':>9} {'ratio':>6}"]  # fmt: skip
    for op, ratio in r["comm_ratio"].items():
        sim, plan = r["comm"].get(op, {}), r["planner_comm"].get(op, {})
        lines.append(f"  {op:<20} {sim.get('calls', 0):>8} {plan.get('calls', 0):>8} "
                     f"{_x(ratio['calls']):>6} {_gib(sim.get('bytes', 0)):>9} "
                     f"{_gib(plan.get('bytes', 0)):>9} {_x(ratio['bytes']):>6}")  # fmt: skip
    lines += ["", f"wall {r['wall_s']:.1f} s, host RSS {r['host_rss_bytes'] / GIB:.2f} GiB"]
    return "\n".join(lines)
