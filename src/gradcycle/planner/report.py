"""The planner's output: a text report for people, one JSON object for tools (plan.format=json).

The top level describes the run as configured (`auto` fields resolved the way training resolves
them); `recommendation` is the planner's best cut of the same global batch, checkpointing included.
"""

from __future__ import annotations

from gradcycle.planner.costs import flops_per_token
from gradcycle.planner.memory import GIB
from gradcycle.planner.plan import Candidate, Plan, cut, explain

WHEN = {"micro": "every micro-batch", "cycle": "once per cycle", "step": "after the step"}


def _run(plan: Plan) -> Candidate | None:
    return plan.configured if plan.configured is not None else plan.auto


def _fields(c: Candidate, budget: float) -> dict:
    return {
        "fits": c.est.peak <= budget,
        "micro_batch_size": c.micro,
        "accumulation_steps": c.setup.accumulation,
        "sync": c.sync,
        "activation_checkpointing": {
            "mode": c.ac[0],
            "every": c.ac[1],
            "layers": len(c.setup.checkpointed),
        },  # fmt: skip
        "peak_bytes_per_gpu": int(c.est.peak),
        "peak_moment": c.est.phase,
        "breakdown": {k: int(v) for k, v in c.est.breakdown.items()},
        "step_time_s": c.time.step_s,
        "exposed_comm_s": c.time.exposed_comm_s,
        "tokens_per_s": c.time.tokens_per_s,
    }


def render_json(plan: Plan) -> dict:
    cfg, s = plan.cfg, plan.shape
    run = _run(plan)
    out = {"fits": False, "micro_batch_size": None, "accumulation_steps": None, "sync": None,
           "activation_checkpointing": None, "peak_bytes_per_gpu": None, "breakdown": {}}  # fmt: skip
    if run is not None:
        out.update(_fields(run, plan.budget))
        out["model_states"] = {k: int(v) for k, v in run.est.model_states.items()}
        out["activations_per_layer_bytes"] = {"no_checkpointing": int(run.est.layer_bytes),
                                              "checkpointed": int(run.est.layer_ckpt_bytes)}  # fmt: skip
        out["per_cycle_extra_bytes"] = int(run.est.per_cycle_extra)
        out["attention"] = _attention(run)
        out["collectives"] = [{"op": c.op, "what": c.what, "calls": c.calls,
                               "bytes": int(c.nbytes), "group": c.group, "when": c.when,
                               "inter_node": c.inter_node} for c in run.colls]  # fmt: skip
        model_fpt = flops_per_token(run.setup)[0]
        per_gpu = cfg.plan.mfu * cfg.hardware.bf16_tflops * 1e12 / model_fpt
        out["flops_per_token"] = model_fpt
        out["tokens_per_s_at_mfu"] = per_gpu * plan.world
    else:
        out["explanation"] = explain(plan)
    out.update(
        budget_bytes_per_gpu=int(plan.budget),
        hardware=cfg.hardware.name, world=plan.world, nodes=plan.nodes,
        backend=cfg.backend.name, precision=cfg.precision, reduce_dtype=cfg.backend.reduce_dtype,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.train.global_batch_size,
        model={"name": cfg.model.name, "params": s.n_params, "layers": s.layers,
               "hidden": s.hidden, "vocab": s.vocab},
        recommendation=_fields(plan.recommended, plan.budget) if plan.recommended else None,
        alternatives=[{"change": what, **_fields(c, plan.budget)} for what, c in plan.alternatives],
        warnings=plan.warnings,
    )  # fmt: skip
    return out


def _attention(c: Candidate) -> dict:
    a = c.est.attention
    return {"kernel": a.kernel, "mask": a.mask, "saved_per_layer_bytes": int(a.saved),
            "temporary_bytes": int(a.temporary), "mask_bytes": int(a.shared)}  # fmt: skip


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def _describe(c: Candidate) -> str:
    return f"{cut(c)} (K={c.setup.accumulation})"


def render_text(plan: Plan) -> str:
    cfg, s = plan.cfg, plan.shape
    gpn = plan.world // plan.nodes
    tokens = (cfg.train.global_batch_size or 0) * cfg.data.seq_len
    lines = [
        f"gradcycle plan: {cfg.model.name} shapes, {s.n_params / 1e9:.2f}B parameters ({s.layers} "
        f"layers, hidden {s.hidden}, vocab {s.vocab}), seq {cfg.data.seq_len}, {cfg.precision}",
        f"hardware: {plan.nodes} node(s) x {gpn} {cfg.hardware.name} = {plan.world} GPUs, "
        f"{cfg.hardware.memory_gb:.1f} GiB each, {plan.budget / GIB:.1f} GiB usable; "
        f"backend={cfg.backend.name}, gradients reduced in {cfg.backend.reduce_dtype}",
    ]
    if tokens:
        lines.append(f"global batch: {cfg.train.global_batch_size} samples = {tokens:,} tokens "
                     "per optimizer step")  # fmt: skip
    run = _run(plan)
    if run is None:
        lines += ["", "train.micro_batch_size=auto: " + explain(plan)]
        return "\n".join(lines + _warnings(plan))
    label = "configured" if plan.configured is not None else "auto"
    verdict = "fits" if run.est.peak <= plan.budget else "DOES NOT FIT"
    lines += ["", f"{label}: {_describe(run)}",
              f"{'memory per GPU at its peak: ' + run.est.phase:<46}{'GiB':>8}"]  # fmt: skip
    for name, value in run.est.breakdown.items():
        lines.append(f"  {name:<44}{_gib(value)}")
    lines.append(f"  {'total':<44}{_gib(run.est.peak)}  of {plan.budget / GIB:.1f} usable "
                 f"({run.est.peak / plan.budget:.0%}): {verdict}")  # fmt: skip
    lines.append(f"activations per layer and micro-batch: {run.est.layer_bytes / GIB:.3f} GiB "
                 f"without checkpointing, {run.est.layer_ckpt_bytes / GIB:.3f} GiB checkpointed")  # fmt: skip
    a = run.est.attention
    lines.append(f"attention: {a.kernel} kernel (document mask: {a.mask}), "
                 f"{a.saved / GIB:.3f} GiB kept per layer and micro-batch"
                 + (f", {a.temporary / GIB:.3f} GiB transient (fp32 scores)" if a.temporary else "")
                 + (f", mask {a.shared / GIB:.3f} GiB" if a.shared else ""))  # fmt: skip
    if run.est.per_cycle_extra > 0:
        lines.append(f"sync=per_cycle holds {run.est.per_cycle_extra / GIB:.2f} GiB more per GPU "
                     "than per_micro through the cycle")  # fmt: skip
    lines += _collectives(plan, run)
    model_fpt = flops_per_token(run.setup)[0]
    per_gpu = cfg.plan.mfu * cfg.hardware.bf16_tflops * 1e12 / model_fpt
    lines.append(f"throughput: {model_fpt:.3g} FLOP/token (6N + 12·L·h·s); at {cfg.plan.mfu:.0%} "
                 f"MFU {per_gpu:,.0f} tokens/s per GPU, {per_gpu * plan.world:,.0f} in all")  # fmt: skip
    lines.append(f"  with recompute and exposed communication: step {run.time.step_s:.2f} s, "
                 f"{run.time.tokens_per_s:,.0f} tokens/s (MFU {run.time.mfu:.0%})")  # fmt: skip
    lines.append("")
    if plan.recommended is not None:
        r = plan.recommended
        lines.append(f"recommendation (peak under {cfg.plan.headroom:.0%} of usable memory):")
        lines.append(f"  {_describe(r)}")
        lines.append(f"  peak {r.est.peak / GIB:.1f} GiB, step ~{r.time.step_s:.2f} s, "
                     f"~{r.time.tokens_per_s:,.0f} tokens/s (MFU {r.time.mfu:.0%})")  # fmt: skip
    else:
        lines.append("NOTHING FITS: " + explain(plan))
    return "\n".join(lines + _warnings(plan))


def _collectives(plan: Plan, run: Candidate) -> list[str]:
    hw = plan.cfg.hardware
    if not run.colls:
        return ["collectives per optimizer step: none (one rank)"]
    out = [f"collectives per optimizer step{'':<22} calls       GiB   est. s  when"]
    for c in run.colls:
        t = c.seconds(hw.intra_node_gbps, hw.inter_node_gbps)
        link = "inter-node" if c.inter_node else "intra-node"
        out.append(f"  {c.op + ' ' + c.what:<50}{c.calls:>6} {c.nbytes / GIB:9.2f} {t:8.2f}  "
                   f"{WHEN[c.when]}, {link}")  # fmt: skip
    return out


def _warnings(plan: Plan) -> list[str]:
    # "will not fit" repeats the verdict and the fixes the report already shows
    return [f"warning: {w}" for w in plan.warnings if "will not fit" not in w]
