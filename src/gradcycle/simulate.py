"""python -m gradcycle.simulate <train.py overrides> simulate.rank=<r>: rank r of the job, on one CPU.

Runs rank r of the nodes x gpus_per_node job through the trainer itself (gradcycle.trainer.run:
config checks, start-up plan, the backend's build and sharding, the loader's micro-batches for
rank r, a whole accumulation cycle of K micro-batches and the optimizer step, then a second,
steady-state step) over a fake process group on fake tensors: every shape, dtype, shard and
collective is the real one, no FLOP is computed and no device byte allocated (gradcycle/sim/).
Prints rank r's device memory by category and where the step peaks, every collective of the step
(calls and bytes), and the planner's prediction of both beside it; simulate.format=json as one
JSON object (peak_bytes, planner_peak_bytes, by_category, comm, planner_comm, world_size,
accumulation_steps, wall_s, ...).

    python -m gradcycle.simulate experiment=llama-70b-8node simulate.rank=0
    python -m gradcycle.simulate model=llama-7b backend=hsdp nodes=2 hardware=h100-80gb \\
        precision=bf16 train.global_batch_size=64 train.micro_batch_size=1 simulate.format=json

`hardware=` names the target (attention runs its kernel); the run itself is fixed to two steps
with nothing written (no checkpoint, no eval, a temporary run dir) and real data read on the host
(data=stdlib prepares into the cache on first use). Backends: ddp, fsdp, hsdp (DeepSpeed cannot
run over the fake group: docs/planner.md, "Simulation"). Bad input exits 2 before anything runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import resource
import sys
import tempfile
import time

SIMULATED_BACKENDS = ("ddp", "fsdp", "hsdp")
NOT_SIMULATED = (
    "DeepSpeed's engine cannot run over the fake process group on fake tensors (its flat "
    "buffers and ZeRO partitions are filled through real data pointers); simulate "
    "backend=fsdp or hsdp (the same sharding as zero3) or ddp"
)


def check(cfg) -> None:
    """Every simulation-specific user error, before anything is built (ValueError)."""
    from gradcycle.batching import plan_from_config
    from gradcycle.planner.inputs import micro_options
    from gradcycle.validation import validate

    validate(cfg, this_machine=False)  # the target's GPUs, not this machine's
    if cfg.backend.name not in SIMULATED_BACKENDS:
        raise ValueError(f"backend={cfg.backend.name} cannot be simulated: {NOT_SIMULATED}")
    if cfg.hardware.name == "auto":
        raise ValueError(
            "hardware=auto: the simulation sizes a target GPU: name it, e.g. hardware=a100-40gb "
            "(a100-40gb, a100-80gb, h100-80gb, h200; cpu for CPU attention)"
        )
    world = cfg.nodes * cfg.gpus_per_node
    if not 0 <= cfg.simulate.rank < world:
        raise ValueError(
            f"simulate.rank={cfg.simulate.rank} is outside the job's ranks 0..{world - 1} "
            f"(nodes={cfg.nodes} x gpus_per_node={cfg.gpus_per_node}): use simulate.rank=0.."
            f"{world - 1}, or raise nodes/gpus_per_node"
        )
    if cfg.model.pretrained:
        raise ValueError(
            f"model.pretrained={cfg.model.pretrained!r}: the simulation builds the model from its "
            "shape and reads no weights; drop model.pretrained and give the shape "
            "(model=<preset> or model.hidden_size=... ; model.pretrained_required=false)"
        )
    if cfg.train.micro_batch_size == "auto":
        micro_options(cfg, world)  # the global batch splits over the world
    else:
        plan_from_config(cfg, world)  # training's own words for an indivisible batch
    if cfg.backend.name == "hsdp":
        from gradcycle.backends.fsdp import mesh_shape

        mesh_shape("hsdp", world, cfg.backend.replicate, cfg.nodes)


def run_config(cfg, run_dir: str):
    """The configured run cut to two steps that write nothing and keep no workers."""
    cfg = copy.deepcopy(cfg)
    cfg.train.max_steps = 2
    cfg.train.eval_every = 0
    cfg.checkpoint.every, cfg.checkpoint.at_end = 0, False
    cfg.resume, cfg.run_dir, cfg.profile = "none", run_dir, False
    cfg.logging.progress, cfg.logging.tensorboard = False, False
    cfg.logging.wandb.mode = "disabled"
    cfg.data.num_workers = 0  # workers only compute the same micro-batches ahead
    return cfg


def simulate(cfg) -> dict:
    from gradcycle import hardware, trainer
    from gradcycle.batching import plan_from_config
    from gradcycle.data.reader import open_dataset
    from gradcycle.planner import auto as plan_auto
    from gradcycle.planner.plan import make_plan
    from gradcycle.sim import report
    from gradcycle.sim.tracker import MemoryTracker
    from gradcycle.sim.world import fake_world, rank_env, valueless_reducer

    check(cfg)
    # precision=auto as on the target (bf16 where its profile has it), not as on this CPU
    cfg = hardware.resolve(cfg, "cpu" if cfg.hardware.name == "cpu" else "cuda", for_planner=True)
    world, nodes = cfg.nodes * cfg.gpus_per_node, cfg.nodes
    vocab = len(open_dataset(cfg).tokenizer)  # prepared on the host, before the fake world
    cfg = plan_auto.resolve_auto(cfg, world, nodes)
    candidate = make_plan(cfg, world, nodes, vocab=vocab, searches=False).configured
    batch = plan_from_config(cfg, world)
    env = rank_env(cfg.simulate.rank, nodes, cfg.gpus_per_node)
    tracker = MemoryTracker(batch.accumulation_steps)
    out = sys.stderr if cfg.simulate.format == "json" else sys.stdout
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradcycle-sim-") as run_dir, \
            contextlib.redirect_stdout(out), fake_world(env, cfg.hardware.name) as attention, \
            tracker:  # fmt: skip

        def on_backend(backend):
            valueless_reducer(backend)
            tracker.attach(backend)

        record = trainer.run(run_config(cfg, run_dir), on_backend=on_backend)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report.result(cfg=cfg, env=env, batch=batch, tracker=tracker, record=record,
                         candidate=candidate, attention=attention, wall_s=wall,
                         host_rss=rss)  # fmt: skip


def _report(result: dict) -> None:
    from gradcycle.sim.report import render_text

    fmt = result.pop("_format", "text")
    print(json.dumps(result) if fmt == "json" else render_text(result), flush=True)


def _simulate_cli(cfg) -> dict:
    result = simulate(cfg)
    result["_format"] = cfg.simulate.format
    return result


def main(argv: list[str] | None = None) -> int:
    from gradcycle.compose import tool_main

    return tool_main("gradcycle.simulate", __doc__, argv, _simulate_cli, _report)


if __name__ == "__main__":
    sys.exit(main())
