"""Predicted vs measured peak memory on one CUDA GPU (a prepared check for a lent GPU).

    python bench/gpu_memory.py [--out results.json] [--quick]
    python bench/gpu_memory.py --smoke        # no GPU: every case, tiny, one step on CPU, no measurement

Runs real optimizer steps of Llama-shaped models (the 1.1B TinyLlama shapes of conf/model/llama-1b
and 4 layers of the Llama-2-7B shapes: real hidden size, real vocabulary) through the same
build_backend / activation checkpointing / loss (loss.impl, loss.chunk_tokens: the config's, the
same the planner predicts with) the trainer uses, on random tokens, with ddp and fsdp (world 1) in
bf16 at seq 2048. The measurement is torch.cuda.max_memory_allocated() from before the model is
built; the prediction is the planner's peak for the same config, hardware=auto (the detected
device's profile) and the device's own memory as the budget. Planned to finish well inside 10
minutes on an A100/H100/H200 (model construction on the host dominates); each case prints as soon
as it is done, and --out is rewritten after each, so a run killed at its limit keeps what it had.
On a bare machine it first installs what is missing (bench/_gpu_env.py; bench/gpu.sh runs it too).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a lent GPU has no network: never wait on one
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA7B_4L = ["model=llama-7b", "model.num_layers=4"]
CASES = [  # (name, overrides)
    ("1.1B ddp b=1 ac=none", ["model=llama-1b", "backend=ddp", "train.micro_batch_size=1"]),
    ("1.1B ddp b=4 ac=none", ["model=llama-1b", "backend=ddp", "train.micro_batch_size=4"]),
    ("1.1B ddp b=8 ac=full", ["model=llama-1b", "backend=ddp", "train.micro_batch_size=8",
                              "activation_checkpointing.mode=full"]),
    ("1.1B fsdp b=4 ac=none", ["model=llama-1b", "backend=fsdp", "train.micro_batch_size=4"]),
    ("7B-shape 4 layers ddp b=2 ac=none", [*LLAMA7B_4L, "backend=ddp", "train.micro_batch_size=2"]),
    ("7B-shape 4 layers fsdp b=4 ac=full", [*LLAMA7B_4L, "backend=fsdp",
                                            "train.micro_batch_size=4",
                                            "activation_checkpointing.mode=full"]),
    ("7B-shape 4 layers fsdp b=2 selective", [*LLAMA7B_4L, "backend=fsdp",
                                              "train.micro_batch_size=2",
                                              "activation_checkpointing.mode=selective"]),
]  # fmt: skip
COMMON = ["precision=bf16", "data.seq_len=2048", "train.global_batch_size=null",
          "train.accumulation_steps=2", "train.eval_every=0", "logging.progress=false",
          "optim.warmup_steps=0", "nodes=1", "gpus_per_node=1"]  # fmt: skip


def run_case(overrides: list[str], device, steps: int) -> tuple[int | None, object, object]:
    import torch

    from gradcycle import distributed, hardware
    from gradcycle.backends import build_backend
    from gradcycle.batching import plan_from_config
    from gradcycle.cli import compose
    from gradcycle.loss import attach as attach_loss
    from gradcycle.model import apply_activation_checkpointing, build_model
    from gradcycle.planner.auto import resolve_auto, with_device_memory
    from gradcycle.planner.plan import make_plan
    from gradcycle.trainer import token_loss

    over = [*COMMON, *overrides, f"device={device.type}", "hardware=auto"]
    # As train.py does: the detected device's profile (CPU: the nominal one); budget: its memory
    cfg = resolve_auto(hardware.resolve(compose(over), device.type), 1, 1)
    bp = plan_from_config(cfg, 1)
    distributed.seed_everything(cfg.seed)
    ac = cfg.activation_checkpointing

    def make_model(where, dtype=torch.float32):
        model = build_model(cfg.model, cfg.model.vocab_size, where, dtype=dtype)
        apply_activation_checkpointing(model, ac.mode, ac.every)
        if cfg.loss.impl != "full":
            attach_loss(model)  # as the trainer does: the chunked loss inside the model's forward
        return model

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with tempfile.TemporaryDirectory() as run_dir:
        backend = build_backend(cfg, make_model, device, 1, Path(run_dir))
        shape = (bp.micro_batch_size, cfg.data.seq_len)
        norm = float(shape[0] * shape[1] * bp.accumulation_steps)
        loss_args = {"impl": cfg.loss.impl, "chunk_tokens": cfg.loss.chunk_tokens}
        for _ in range(steps):
            with backend.cycle():
                for k in range(bp.accumulation_steps):
                    ids = torch.randint(0, cfg.model.vocab_size, shape, device=device)
                    backend.forward_backward({"input_ids": ids, "labels": ids},
                                             lambda m, b: token_loss(m, b, norm, **loss_args),
                                             last=k == bp.accumulation_steps - 1)  # fmt: skip
            backend.step(1e-4, torch.zeros(2, device=device))
        measured = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            measured = torch.cuda.max_memory_allocated(device) - base
        backend.close()
        del backend
    est = make_plan(with_device_memory(cfg), 1, 1).configured.est
    return measured, est, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here too")
    parser.add_argument("--quick", action="store_true", help="the first three cases only")
    parser.add_argument("--smoke", "--dry-run", action="store_true",
                        help="CPU, tiny shapes, one step: the code path only")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get("GRADCYCLE_GPU_ENV_OK") != "1":  # bench/gpu.sh has checked already
        sys.path.insert(0, str(ROOT / "bench"))
        from _gpu_env import ensure

        ensure()
    import torch

    cases = CASES[:3] if args.quick else CASES
    if args.smoke:
        device = torch.device("cpu")
        tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
                "model.num_kv_heads=4", "model.intermediate_size=172", "model.vocab_size=512",
                "data.seq_len=64"]  # fmt: skip
        cases = [(name, [*over, *tiny]) for name, over in cases]
        args.steps = 1
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: use --smoke to check the script on CPU")
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        print(f"device: {torch.cuda.get_device_name(device)}, "
              f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")  # fmt: skip
    os.environ.setdefault("GRADCYCLE_CACHE", tempfile.mkdtemp(prefix="gradcycle-cache-"))
    rows = []
    print(f"{'case':<40} {'measured GiB':>13} {'predicted GiB':>14} {'error':>7}  peak at  "
          f"(seconds)")  # fmt: skip
    for name, over in cases:
        t0 = time.time()
        measured, est, cfg = run_case(over, device, args.steps)
        err = "" if measured is None else f"{(est.peak - measured) / measured:+7.1%}"
        got = "n/a" if measured is None else f"{measured / 2**30:13.2f}"
        print(f"{name:<40} {got:>13} {est.peak / 2**30:14.2f} {err:>7}  {est.phase}  "
              f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        rows.append({"case": name, "measured_bytes": measured, "predicted_bytes": est.peak,
                     "phase": est.phase, "breakdown": est.breakdown, "loss_impl": cfg.loss.impl,
                     "loss_chunk_tokens": cfg.loss.chunk_tokens, "hardware": cfg.hardware.name})  # fmt: skip
        if args.out:  # after every case: a kill at the time limit keeps the cases done
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
