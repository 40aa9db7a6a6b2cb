"""What gradient accumulation costs in time and saves in memory, measured with gradcycle's trainer.

(a) Time per sample against K = 1..16 at a fixed micro-batch. Each optimizer step does K
    forward/backward passes and one optimizer step, so the time per sample should stay flat (it
    falls slightly as the optimizer step is shared by more samples). Runs interleave the K values.
(b) Peak memory against the micro-batch at a fixed global batch (K = global / micro), each point a
    fresh `train.py` process so nothing carries over. Two measurements per point:
      - alloc peak: the most tensor bytes the step allocated above what was live when it began
        (activations, gradients, temporaries), from the CPU allocator via profile=true;
      - peak RSS of the process (monotone; includes ~0.5 GB of interpreter, torch and data).
    "activations" = alloc peak minus the gradients (4 B/parameter, allocated in the step), the
    part accumulation divides by K; compared with the 4-16x saving claimed for K = 4..16.

    python bench/accumulation.py               # both tables
    python bench/accumulation.py --part time   # or --part memory
    python bench/accumulation.py --smoke       # tiny model, K = 1, 2, micro 1, 2: seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, compose, median, table, timed_train

# (a) ~4M parameters; 4 samples of 64 tokens per micro-batch.
TIME_MODEL = [
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
    "model.intermediate_size=688", "data.seq_len=64", "data.vocab_size=2048",
    "data.max_documents=1500", "train.micro_batch_size=4", "train.global_batch_size=null",
    "train.eval_every=0", "logging.progress=false", "checkpoint.at_end=false", "seed=7",
]  # fmt: skip
# (b) activation-heavy: 256-token samples, global batch 16.
MEM_MODEL = [
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
    "model.intermediate_size=688", "data.seq_len=256", "data.vocab_size=2048",
    "data.max_documents=1500", "train.global_batch_size=16", "train.eval_every=0",
    "logging.progress=false", "checkpoint.at_end=false", "seed=7",
]  # fmt: skip
# --smoke: a tiny model (after either list, so its values win) and a global batch of 4.
SMOKE = ["model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
         "data.seq_len=64", "data.vocab_size=512", "data.max_documents=300",
         "train.global_batch_size=4"]  # fmt: skip


def part_time(ks: list[int], reps: int, warmup: int, steps: int, extra=()) -> str:
    import torch

    torch.set_num_threads(1)
    wall = {k: [] for k in ks}
    cpu = {k: [] for k in ks}
    samples = {}
    for rep in range(reps):
        order = ks[rep % len(ks) :] + ks[: rep % len(ks)]
        for k in order:
            over = [*TIME_MODEL, *extra, "train.global_batch_size=null",
                    f"train.accumulation_steps={k}",
                    f"train.max_steps={warmup + steps}"]  # fmt: skip
            ends, records, _ = timed_train(over, 0, f"accumulation-k{k}")
            samples[k] = records[0]["samples"]
            timed = list(zip(ends[warmup - 1 :], ends[warmup:]))
            wall[k] += [(b[0] - a[0]) / samples[k] for a, b in timed]
            cpu[k] += [(b[1] - a[1]) / samples[k] for a, b in timed]
    base_w, base_c = median(wall[ks[0]]), median(cpu[ks[0]])
    rows = [
        [k, samples[k], f"{median(wall[k]) * 1e3:.2f}", f"{median(wall[k]) / base_w:.3f}",
         f"{median(cpu[k]) * 1e3:.2f}", f"{median(cpu[k]) / base_c:.3f}"]
        for k in ks
    ]  # fmt: skip
    head = ["K", "samples/step", "wall ms/sample", f"vs K={ks[0]}", "cpu ms/sample",
            f"vs K={ks[0]}"]  # fmt: skip
    return (f"(a) time per sample vs accumulation steps K, micro-batch 4 x 64 tokens, "
            f"{reps} interleaved reps x {steps} steps\n" + table(head, rows))  # fmt: skip


def _point(micro: int, ac: str, extra=()) -> dict:
    """One fresh trainer process; returns its profiled step's record."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, str(ROOT / "train.py"), *MEM_MODEL, *extra,
               f"train.micro_batch_size={micro}", f"activation_checkpointing.mode={ac}",
               "train.max_steps=2", "profile=true", "profile_steps=[2]", f"run_dir={run_dir}"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
        lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines if x.strip()]
        return next(r for r in records if "profile" in r)


def part_memory(micros: list[int], modes: list[str], extra=()) -> str:
    from gradcycle.data.reader import open_dataset
    from gradcycle.model import build_model, count_params

    cfg = compose([*MEM_MODEL, *extra])
    vocab = len(open_dataset(cfg).tokenizer)  # what the trainer sizes the model by
    n_params = count_params(build_model(cfg.model, vocab, "meta"))
    grads = 4 * n_params
    rows, act = [], {}
    for ac in modes:
        for micro in micros:
            r = _point(micro, ac, extra)
            alloc = r["profile"]["alloc_peak_bytes"]
            act[(ac, micro)] = alloc - grads
            rows.append([ac, micro, r["accumulation_steps"], f"{alloc / 2**20:.1f}",
                         f"{(alloc - grads) / 2**20:.1f}", f"{r['peak_mem_bytes'] / 2**20:.0f}"])  # fmt: skip
    for row in rows:  # saving against the same global batch in one micro-batch (K = 1)
        full = act.get((row[0], max(micros)))
        mine = act[(row[0], row[1])]
        row.insert(5, f"{full / mine:.1f}x" if full and mine > 0 else "")
    head = ["checkpointing", "micro", "K", "alloc peak MiB", "activations MiB",
            "saving vs K=1", "peak RSS MiB"]  # fmt: skip
    return (f"(b) peak memory vs micro-batch at global batch {cfg.train.global_batch_size} "
            f"x {cfg.data.seq_len} tokens ({n_params / 1e6:.1f}M parameters, gradients "
            f"{grads / 2**20:.1f} MiB)\n" + table(head, rows))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("time", "memory", "both"), default="both")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--micros", default="1,2,4,8,16")
    ap.add_argument("--checkpointing", default="none,full", help="activation_checkpointing.mode")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="smallest size (checks the script)")
    a = ap.parse_args()
    extra = SMOKE if a.smoke else []
    if a.smoke:
        a.ks, a.micros, a.checkpointing, a.reps, a.steps = "1,2", "1,2", "none", 1, 1
    if a.part in ("time", "both"):
        ks = [int(x) for x in a.ks.split(",")]
        print(part_time(ks, a.reps, a.warmup, a.steps, extra), flush=True)
    if a.part in ("memory", "both"):
        micros = [int(x) for x in a.micros.split(",")]
        print(part_memory(micros, a.checkpointing.split(","), extra), flush=True)


if __name__ == "__main__":
    main()
