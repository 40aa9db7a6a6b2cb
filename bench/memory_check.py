"""Predicted vs measured peak memory of real training steps on CPU (the planner's check).

    python bench/memory_check.py            # the full table (several minutes on 2 cores)
    python bench/memory_check.py --quick    # ddp on one rank only
    python bench/memory_check.py --smoke    # the smallest model on fsdp and zero3: 2 ranks, 1 step

Each case builds the backend exactly as the trainer does (build_backend, activation checkpointing,
token_loss) and runs a few optimizer steps of K micro-batches on random tokens. The measurement is
the CPU allocator's own count: torch.profiler(profile_memory=True) reports, with every allocation
and free of c10's CPU allocator, the bytes allocated since profiling began (`total_allocated`).
Profiling starts before the model is built, so parameters, optimizer states, buffers allocated in
C++ (DDP's reducer buckets, DeepSpeed's flat buffers) and FSDP2's storage resizes are all counted;
process RSS is not used (it counts Python, the tokenizer and freed-but-cached pages). The peak is
taken over the training steps only: model construction transients are not a training peak.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # multiproc.run_on_ranks

MARK = "gradcycle::train_steps"
BASE = ["data.vocab_size=512", "train.eval_every=0", "logging.progress=false", "hardware=cpu",
        "train.grad_clip=1.0", "optim.warmup_steps=0"]  # fmt: skip
# Small Llamas: (hidden, layers, heads, intermediate, vocab, seq)
MODELS = {
    "h64-L2": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
               "model.intermediate_size=172", "model.vocab_size=512", "data.seq_len=128"],
    "h128-L4": ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
                "model.intermediate_size=344", "model.vocab_size=1024", "data.seq_len=128"],
    "h256-L4": ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=8",
                "model.num_kv_heads=4", "model.intermediate_size=688", "model.vocab_size=2048",
                "data.seq_len=256"],
}  # fmt: skip
SMALL_BUCKETS = ["+backend.deepspeed_config.zero_optimization.reduce_bucket_size=200000",
                 "+backend.deepspeed_config.zero_optimization.stage3_prefetch_bucket_size=200000"]  # fmt: skip


def case(model: str, backend: str, micro: int, k: int, ac: str = "none", precision="fp32",
         extra=()) -> tuple[str, list[str]]:  # fmt: skip
    short = {"stage3_": "", "param_persistence_threshold": "persistence",
             "max_reuse_distance": "reuse", "max_live_parameters": "live"}  # fmt: skip
    tail = " ".join(e.split(".")[-1] for e in extra)
    for long, abbreviation in short.items():
        tail = tail.replace(long, abbreviation)
    name = f"{model} {backend} b={micro} K={k} ac={ac} {precision} {tail}".strip()
    over = [*BASE, *MODELS[model], f"backend={backend}", f"train.micro_batch_size={micro}",
            "train.global_batch_size=null", f"train.accumulation_steps={k}",
            f"activation_checkpointing.mode={ac}", f"precision={precision}", *extra]  # fmt: skip
    if backend.startswith("zero"):
        over += SMALL_BUCKETS
    return name, over


def window_peak(prof, mark: str) -> tuple[int, int]:
    """Most bytes live in the CPU allocator inside the `mark` region, replayed from this profiling
    session's allocation events (pointer, signed size). The profiler only sees its own thread: a
    block freed by another thread (gloo's workers) is dropped when its address is handed out again,
    and the bytes so found are returned too, as a measure of how much the peak may be inflated."""
    start = end = None
    events = []

    def walk(node):
        nonlocal start, end
        if node.name == mark:
            start, end = node.start_time_ns, node.start_time_ns + node.duration_time_ns
        ef = getattr(node, "extra_fields", None)
        if ef is not None and hasattr(ef, "alloc_size") and ef.device.type == "cpu":
            events.append((node.start_time_ns, ef.alloc_size, ef.ptr))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    assert start is not None, f"no {mark} region in the profile"
    live: dict[int, int] = {}
    total = peak = unreported = 0
    for t, size, ptr in sorted(events):
        if size > 0 and ptr in live:  # address handed out again: its free went unreported
            unreported += live[ptr]
        total -= live.pop(ptr, 0)
        if size > 0:
            live[ptr] = size
            total += size
        if start <= t <= end:
            peak = max(peak, total)
    return peak, unreported


def measure(rank: int, world: int, cases: list[tuple[str, list[str]]], steps: int = 2) -> list:
    """Run each case on this rank: (name, world, measured, predicted, phase, unreported)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from gradcycle import distributed
    from gradcycle.backends import build_backend
    from gradcycle.batching import plan_from_config
    from gradcycle.cli import compose
    from gradcycle.model import apply_activation_checkpointing, build_model
    from gradcycle.planner import auto as plan_auto
    from gradcycle.planner import plan
    from gradcycle.telemetry import CommCounter
    from gradcycle.trainer import token_loss

    torch.set_num_threads(1)
    env = distributed.read_env()
    device = torch.device("cpu")
    CommCounter.instance().install()
    distributed.init_process_group(env, device, 300)
    out = []
    for name, overrides in cases:
        cfg = plan_auto.resolve_auto(compose(overrides), world, 1)  # as the trainer does
        bp = plan_from_config(cfg, world)
        distributed.seed_everything(cfg.seed)
        ac = cfg.activation_checkpointing

        def make_model(where, dtype=torch.float32, cfg=cfg, ac=ac):
            model = build_model(cfg.model, cfg.model.vocab_size, where, dtype=dtype)
            apply_activation_checkpointing(model, ac.mode, ac.every)
            return model

        gen = torch.Generator().manual_seed(rank)
        gc.collect()  # the previous case's tensors are gone before this one is counted
        shape = (bp.micro_batch_size, cfg.data.seq_len)
        with tempfile.TemporaryDirectory() as run_dir:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                backend = build_backend(cfg, make_model, device, world, Path(run_dir))
                norm = float(bp.micro_batch_size * cfg.data.seq_len * bp.accumulation_steps * world)
                with record_function(MARK):
                    for _ in range(steps):
                        with backend.cycle():
                            for k in range(bp.accumulation_steps):
                                ids = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
                                batch = {"input_ids": ids, "labels": ids}
                                backend.forward_backward(
                                    batch, lambda m, b, n=norm: token_loss(m, b, n),
                                    last=k == bp.accumulation_steps - 1,
                                )  # fmt: skip
                        backend.step(1e-3, torch.zeros(2))
            measured, unreported = window_peak(prof, MARK)
            backend.close()
        del backend, prof
        est = plan.make_plan(cfg, world, 1).configured.est
        out.append((name, world, measured, est.peak, est.phase, unreported))
    return out


DDP_CASES = [
    case("h64-L2", "ddp", 2, 1),
    case("h64-L2", "ddp", 4, 2),
    case("h128-L4", "ddp", 2, 2),
    case("h128-L4", "ddp", 8, 2),
    case("h128-L4", "ddp", 8, 2, ac="full"),
    case("h128-L4", "ddp", 8, 2, ac="selective"),
    case("h256-L4", "ddp", 4, 2),
    case("h256-L4", "ddp", 4, 2, ac="full"),
    case("h128-L4", "ddp", 4, 2, precision="bf16"),
]
SHORT = ["data.seq_len=32"]  # parameters and gathered units dominate, not activations
ZERO = "+backend.deepspeed_config.zero_optimization."
# ZeRO-3 releasing after every module: no reuse distance, a live bound below the model's size
RELEASE = ["backend.param_persistence_threshold=0", ZERO + "stage3_max_reuse_distance=0",
           ZERO + "stage3_max_live_parameters=300000"]  # fmt: skip
TWO_RANK_CASES = [
    case("h128-L4", "ddp", 4, 2),
    case("h128-L4", "fsdp", 4, 2),
    case("h128-L4", "fsdp", 8, 2, ac="full"),
    case("h256-L4", "fsdp", 4, 2),
    case("h256-L4", "fsdp", 1, 2, extra=SHORT),
    case("h128-L4", "fsdp", 4, 2, extra=["backend.sync=per_cycle"]),
    case("h128-L4", "fsdp", 4, 2, precision="bf16"),
    case("h128-L4", "zero3", 4, 2),
    case("h256-L4", "zero3", 4, 2, ac="full"),
    case("h256-L4", "zero3", 1, 2, extra=SHORT),
    case("h128-L4", "zero3", 4, 2, extra=["backend.sync=per_cycle"]),
    case("h256-L4", "zero3", 2, 2, extra=RELEASE),
    case("h256-L4", "zero3", 2, 2, precision="bf16"),
    case("h128-L4", "zero1", 4, 2),
    case("h128-L4", "zero2", 4, 2),
    case("h128-L4", "zero2", 4, 2, extra=["backend.sync=per_cycle"]),
    # backend.reduce_dtype: fp32 (default) casts each bucket for the all-reduce, bf16 does not
    case("h128-L4", "zero2", 4, 2, precision="bf16"),
    case("h128-L4", "zero2", 4, 2, precision="bf16", extra=["backend.reduce_dtype=bf16"]),
    case("h128-L4", "ddp", 4, 2, precision="bf16", extra=["backend.reduce_dtype=bf16"]),
]

SMOKE_CASES = [case("h64-L2", b, 2, 2, extra=SHORT) for b in ("fsdp", "zero3")]


def max_over_ranks(per_rank: list[list]) -> list:
    """The per-GPU peak of a run is its largest rank's."""
    return [max(rows, key=lambda r: r[2]) for rows in zip(*per_rank)]


def table(rows) -> str:
    lines = [f"{'case':<70} {'ranks':>5} {'measured':>9} {'predicted':>9} {'error':>7}  "
             f"{'unseen frees':>12}  peak at (MiB)"]  # fmt: skip
    for name, world, measured, predicted, phase, unreported in rows:
        err = (predicted - measured) / measured
        lines.append(f"{name:<70} {world:>5} {measured / 2**20:9.2f} {predicted / 2**20:9.2f} "
                     f"{err:+7.1%}  {unreported / 2**20:12.2f}  {phase}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ddp on one rank only")
    parser.add_argument("--smoke", action="store_true", help="smallest size (checks the script)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GRADCYCLE_CACHE", tempfile.mkdtemp(prefix="gradcycle-cache-"))
    from multiproc import run_on_ranks

    if args.smoke:
        print(table(max_over_ranks(run_on_ranks(measure, world_size=2, args=(SMOKE_CASES, 1)))))
        return
    rows = run_on_ranks(measure, world_size=1, args=(DDP_CASES,))[0]
    if not args.quick:
        rows += max_over_ranks(run_on_ranks(measure, world_size=2, args=(TWO_RANK_CASES,)))
    print(table(rows))


if __name__ == "__main__":
    main()
