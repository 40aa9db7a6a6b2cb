"""The loss's memory and the step's time: loss.impl=full vs chunked, vocabulary 4k / 32k / 128k.

    python bench/loss.py                    # the table (a few minutes on one CPU core)
    python bench/loss.py --vocabs 32000 --reps 3
    python bench/loss.py --smoke            # vocabulary 512, 2 layers, seq 128, 1 rep: seconds

Each configuration builds the trainer's backend (ddp, one process, fp32, AdamW) on a small Llama
(hidden 128, 4 layers) and runs optimizer steps of one micro-batch of seq 512 x micro 4 = 2048
random tokens. Memory: CPU allocator events (torch.profiler, profile_memory, as
bench/memory_check.py) over one step's forward + backward, above the memory live before it:
`fwd+bwd peak`. `loss memory` is that minus the same decoder's forward + backward without head
and loss (hidden.sum() as the loss): what the head, the cross-entropy and their gradients add.
Time: the median wall time of `--reps` optimizer steps per configuration, configurations
interleaved so background load hits all alike (and the process CPU time, which moves less when
other jobs share the cores). The chunked rows use 2048 tokens (one chunk here) and 256 tokens
(8 chunks: what loss.chunk_tokens=auto picks here).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

from _common import compose, median, table

MODEL = ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
         "model.intermediate_size=344", "data.seq_len=512", "train.micro_batch_size=4",
         "train.global_batch_size=4", "train.eval_every=0", "logging.progress=false",
         "optim.warmup_steps=0", "hardware=cpu"]  # fmt: skip
SMOKE = ["model.num_layers=2", "data.seq_len=128"]  # 512 tokens: still 2 chunks of 256
IMPLS = (("full", 2048), ("chunked", 2048), ("chunked", 256))
MARK = "gradcycle::loss_bench"


def _peak(fn) -> int:
    """Most bytes allocated above the starting point while `fn` runs (allocator events)."""
    from memory_check import window_peak
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with (profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
          record_function(MARK)):  # fmt: skip
        fn()
    return window_peak(prof, MARK)[0]


def run(vocab: int, reps: int, extra: list[str] = ()) -> list[list]:
    import torch

    from gradcycle import distributed
    from gradcycle.backends import build_backend
    from gradcycle.model import build_model
    from gradcycle.trainer import token_loss

    torch.set_num_threads(1)
    cfg = compose([*MODEL, *extra, f"model.vocab_size={vocab}"])
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, shape, generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    norm = float(ids.numel())
    runs = {}
    for impl, chunk in IMPLS:
        distributed.seed_everything(cfg.seed)
        backend = build_backend(cfg, lambda where: build_model(cfg.model, vocab, where),
                                torch.device("cpu"), 1, Path(tempfile.mkdtemp()))  # fmt: skip
        fn = lambda m, b, i=impl, c=chunk: token_loss(m, b, norm, i, c)  # noqa: E731
        runs[(impl, chunk)] = {"backend": backend, "fn": fn, "wall": [], "cpu": []}

    def step(r):
        loss = r["backend"].forward_backward(batch, r["fn"], last=True)
        r["loss"] = r["backend"].step(1e-4, loss.reshape(1)).stats[0]

    for rep in range(reps + 1):  # the first round warms up
        for r in runs.values():
            w0, c0 = time.perf_counter(), time.process_time()
            step(r)
            if rep:
                r["wall"].append(time.perf_counter() - w0)
                r["cpu"].append(time.process_time() - c0)
    module = next(iter(runs.values()))["backend"].module

    def decoder_only():
        module.model(input_ids=ids).last_hidden_state.sum().backward()

    base = _peak(decoder_only)
    module.zero_grad(set_to_none=True)
    rows = []
    full = None
    for (impl, chunk), r in runs.items():
        backend = r["backend"]
        peak = _peak(lambda b=backend, r=r: b.forward_backward(batch, r["fn"], last=True))
        backend.optimizer.zero_grad(set_to_none=True)
        wall, cpu = median(r["wall"]), median(r["cpu"])
        here = (peak, peak - base, wall, cpu, r["loss"])
        full = full or here
        rows.append([vocab, impl, chunk if impl != "full" else "-",
                     f"{peak / 2**20:.1f}", f"{(peak - base) / 2**20:.1f}",
                     f"{(peak - base) / (full[1]):.3f}", f"{wall:.3f}", f"{wall / full[2]:.3f}",
                     f"{cpu / full[3]:.3f}", f"{r['loss']:.6f}"])  # fmt: skip
        backend.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[4096, 32000, 128000])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="smallest size (checks the script)")
    args = parser.parse_args()
    if args.smoke:
        args.vocabs, args.reps = [512], 1
    extra = SMOKE if args.smoke else []
    rows = [row for vocab in args.vocabs for row in run(vocab, args.reps, extra)]
    print(table(["vocab", "loss.impl", "chunk", "fwd+bwd peak MiB", "loss memory MiB",
                 "vs full", "step s", "time vs full", "cpu vs full", "loss (last step)"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
