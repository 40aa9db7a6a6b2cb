"""python -m gradcycle.plan <overrides>: will this run fit, and how should the batch be cut?

Reads the same Hydra config as train.py (plus `hardware=`, `nodes=`, `gpus_per_node=`) and prints,
per GPU, the memory of the configured run by component, the collectives per optimizer step and the
expected tokens/s, then recommends micro-batch, accumulation, sync policy and activation
checkpointing for the configured global batch (or says what would fit); `plan.format=json` as one
JSON object. Formulas: memory.py, costs.py; output: report.py; training-run use: auto.py.
Depends on the config only, never on the CLI or the trainer.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field

from gradcycle.planner.costs import Collective, StepTime, collectives, step_time
from gradcycle.planner.memory import GIB, Estimate, Setup, Shape, estimate

# Checkpointing options the recommendation tries, cheapest recompute first.
AC_OPTIONS = (("none", 2), ("selective", 4), ("selective", 2), ("full", 2))
MANY_MICRO_BATCHES = 8  # bf16 accumulation over more micro-batches loses visible precision


class UnknownShape(ValueError):
    """The planner cannot size this model (not Llama-shaped, or no vocabulary size)."""


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


# ---------------------------------------------------------------- config -> setup


def shape_from_config(cfg, vocab: int | None = None) -> Shape:
    m = cfg.model
    if m.pretrained:
        return _pretrained_shape(m)
    vocab = m.vocab_size or vocab or (None if cfg.data.tokenizer else cfg.data.vocab_size)
    if vocab is None:
        raise UnknownShape(
            f"the planner needs the vocabulary size and data.tokenizer={cfg.data.tokenizer!r} is "
            "not read here: set model.vocab_size=<the tokenizer's size>"
        )
    kv = m.num_kv_heads or m.num_heads
    return Shape(int(vocab), m.hidden_size, m.num_layers, m.num_heads, kv, m.intermediate_size,
                 bool(m.tie_embeddings))  # fmt: skip


def _pretrained_shape(m) -> Shape:
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(m.pretrained, local_files_only=True,
                                        trust_remote_code=m.trust_remote_code)  # fmt: skip
        return Shape(hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
                     getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                     hf.intermediate_size, bool(getattr(hf, "tie_word_embeddings", False)))  # fmt: skip
    except Exception as e:  # not local, or not Llama-shaped: the planner cannot size it
        raise UnknownShape(f"model.pretrained={m.pretrained!r}: cannot read a Llama-style "
                           f"config locally ({type(e).__name__}: {e})") from None  # fmt: skip


def topology(cfg, world: int | None = None, nodes: int | None = None) -> tuple[int, int, int]:
    """(data-parallel world, nodes, GPUs per node): the config's nodes x gpus_per_node, or the
    launcher's world when training."""
    if world is None:
        world, nodes = cfg.nodes * cfg.gpus_per_node, cfg.nodes
    nodes = max(1, nodes or cfg.nodes)
    if world % nodes:
        nodes = 1
    return world, nodes, max(1, world // nodes)


def shard_size(cfg, backend: str, world: int, nodes: int) -> int:
    if backend != "hsdp":
        return world
    replicate = cfg.backend.replicate or nodes
    return world // replicate if replicate and world % replicate == 0 else world


def budget_bytes(cfg) -> float:
    return (cfg.hardware.memory_gb - cfg.hardware.reserved_gb) * GIB


def _ds_zero(cfg) -> dict:
    from omegaconf import OmegaConf

    extra = cfg.backend.deepspeed_config
    extra = OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else extra
    return dict((extra or {}).get("zero_optimization") or {})


def sync_options(cfg, backend: str, world: int) -> list[str]:
    """Policies the backend accepts; `auto` chooses among them."""
    if cfg.backend.sync != "auto":
        return [cfg.backend.sync]
    if world == 1 or backend in ("ddp", "zero1"):
        return ["per_cycle"]  # free (nothing to sync, or the gradient is full anyway)
    options = ["per_micro", "per_cycle"]
    if backend.startswith("zero"):  # DeepSpeed rejects some combinations: ask its own check
        from gradcycle.backends.ds_config import check_user_config

        probe = copy.deepcopy(cfg)
        probe.backend.name, probe.backend.zero_stage = backend, int(backend[-1])
        options = [s for s in options if _accepted(check_user_config, probe, s)]
    return options


def _accepted(check, cfg, sync: str) -> bool:
    cfg.backend.sync = sync
    try:
        check(cfg)
    except ValueError:
        return False
    return True


def global_batch(cfg, world: int) -> int:
    """The global batch every cut keeps: train.global_batch_size, or what the configured
    micro-batch and accumulation give."""
    t = cfg.train
    if t.global_batch_size:
        return t.global_batch_size
    if t.micro_batch_size == "auto":
        raise ValueError(
            "train.micro_batch_size=auto keeps the global batch fixed and needs "
            f"train.global_batch_size (got train.accumulation_steps={t.accumulation_steps}): "
            "set train.global_batch_size=<samples per step> train.accumulation_steps=null"
        )
    return int(t.micro_batch_size) * world * t.accumulation_steps


def evaluate(cfg, shape: Shape, world: int, nodes: int, micro: int, sync: str,
             ac: tuple[str, int], backend: str | None = None) -> Candidate:  # fmt: skip
    from gradcycle.model import checkpointed_layers

    b = backend or cfg.backend.name
    zero = _ds_zero(cfg)
    setup = Setup(
        shape=shape, seq=cfg.data.seq_len, micro=micro,
        accumulation=max(1, global_batch(cfg, world) // (micro * world)),
        backend=b, world=world, shard=shard_size(cfg, b, world, nodes), precision=cfg.precision,
        sync=sync, checkpointed=tuple(checkpointed_layers(shape.layers, ac[0], ac[1])),
        optimizer=cfg.optim.name, momentum=cfg.optim.momentum,
        reduce_dtype=cfg.backend.reduce_dtype,
        offload_optimizer=cfg.backend.offload_optimizer and b.startswith("zero"),
        offload_param=cfg.backend.offload_param and b == "zero3",
        reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
        max_live=int(zero.get("stage3_max_live_parameters", 1e9)),
        loss=cfg.loss.impl, loss_chunk=cfg.loss.chunk_tokens,
        persistence=int(cfg.backend.param_persistence_threshold
                        if cfg.backend.param_persistence_threshold is not None
                        else zero.get("stage3_param_persistence_threshold", 1e5)),
    )  # fmt: skip
    colls = collectives(setup, max(1, world // nodes))
    hw = cfg.hardware
    # hardware=cpu has no interconnect worth modelling (gloo, test runs): communication is not
    # timed there, so auto never trades memory for it and keeps each backend's default.
    timed = [] if hw.name == "cpu" else colls
    t = step_time(setup, timed, hw.bf16_tflops, hw.intra_node_gbps, hw.inter_node_gbps,
                  cfg.plan.mfu)  # fmt: skip
    return Candidate(setup, estimate(setup), colls, t, ac)


def micro_options(cfg, world: int) -> list[int]:
    """Every micro-batch that splits this rank's share of the global batch evenly."""
    g = global_batch(cfg, world)
    per_rank, rem = divmod(g, world)
    if rem or not per_rank:
        raise ValueError(
            f"global batch {g} does not split over {world} data-parallel ranks: set "
            f"train.global_batch_size to a multiple of {world}"
        )
    return [d for d in range(1, per_rank + 1) if per_rank % d == 0]


def search(cfg, shape, world, nodes, acs, limit: float, backend=None) -> Candidate | None:
    """The best candidate under `limit` bytes, or None."""
    syncs = sync_options(cfg, backend or cfg.backend.name, world)
    fitting = [
        c
        for micro in micro_options(cfg, world)
        for sync in syncs
        for ac in acs
        if (c := evaluate(cfg, shape, world, nodes, micro, sync, ac, backend)).est.peak <= limit
    ]
    return min(fitting, key=Candidate.key) if fitting else None


def _configured_ac(cfg) -> tuple[str, int]:
    return (cfg.activation_checkpointing.mode, cfg.activation_checkpointing.every)


# ---------------------------------------------------------------- the plan


def make_plan(cfg, world: int | None = None, nodes: int | None = None, vocab=None,
              searches: bool = True) -> Plan:  # fmt: skip
    """The configured run, what `auto` picks, the recommendation; `searches=False`: the first."""
    world, nodes, _ = topology(cfg, world, nodes)
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
        try:
            plan.auto = search(cfg, shape, world, nodes, [_configured_ac(cfg)], limit)
            plan.recommended = search(cfg, shape, world, nodes, AC_OPTIONS, limit)
            if plan.recommended is None:
                plan.alternatives = alternatives(cfg, shape, world, nodes, limit)
        except ValueError:  # a batch that does not split: batching.plan_batch says how to fix it
            if not fixed:
                raise
    plan.warnings = warnings_for(plan, configured or plan.auto)
    return plan


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
        if s.backend in ("fsdp", "hsdp") and s.num.reduce == 4:
            remedies.append("backend.reduce_dtype=bf16 (halves the reduce-scatter)")
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
    from gradcycle.config import EXIT_USAGE, compose, user_error, validate
    from gradcycle.planner.report import render_json, render_text

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = compose(argv)
        validate(cfg)
        plan = make_plan(cfg)
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"gradcycle.plan: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(render_json(plan)) if cfg.plan.format == "json" else render_text(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
