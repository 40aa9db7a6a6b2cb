"""Data wait per optimizer step vs accumulation steps K: the whole cycle fetched before the first
forward (the loader before streaming) against micro-batches streamed as the loop reaches them.

    python bench/loader.py            # K = 1, 4, 8, 32; worker delay 0 and 10 ms
    python bench/loader.py --smoke    # K = 1, 8, 10 ms delay, two steps: a few seconds

The device is simulated (no GPU here): each micro-batch "computes" for --device-ms while the host
is free, as a GPU does once the host has enqueued its kernels. The workers are the real ones
(data.num_workers=2, data.prefetch_factor=2, the stdlib corpus), optionally slowed by a fixed
delay per micro-batch (slow storage, heavy tokenised rows). Both modes use the same loader; the
"whole cycle" mode materialises `cycle.micro` before the first compute, which is what the loop
did before. Reported over steps 2..N (step 1 starts the workers): data_wait_s per step (what the
trainer logs) and its share of the step, i.e. the time the device would sit idle waiting for data.
Nothing is asserted; the numbers are the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

from _common import ROOT, compose, table

sys.path.insert(0, str(ROOT / "src"))


def run(samples, pad_id, k: int, delay_s: float, device_s: float, streamed: bool, steps: int):
    """Mean (data wait, step time) per step over steps 2..N."""
    import torch

    from gradcycle.data.loader import CycleLoader, GlobalOrder, MicroBatches

    class Delayed(MicroBatches):
        def __getitem__(self, i):
            time.sleep(delay_s)
            return super().__getitem__(i)

    micro = 2
    batches = Delayed(samples, GlobalOrder(len(samples), 0), k * micro, 0, 1, micro, pad_id)
    data_cfg = SimpleNamespace(num_workers=2, prefetch_factor=2, document_mask=False)
    loader = CycleLoader(batches, torch.device("cpu"), 0, steps, data_cfg)
    waits, totals = [], []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            cycle = loader.cycle(step)
            for _ in cycle.micro if streamed else list(cycle.micro):
                time.sleep(device_s)  # the device computes; the host and the workers are free
            waits.append(cycle.wait_s)
            totals.append(time.perf_counter() - t0)
    finally:
        loader.close()
    return sum(waits[1:]) / (steps - 1), sum(totals[1:]) / (steps - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="K = 1, 8; 10 ms; two steps; 64 tokens")
    ap.add_argument("--ks", default="1,4,8,32")
    ap.add_argument("--delays-ms", default="0,10", help="extra worker time per micro-batch")
    ap.add_argument("--device-ms", type=float, default=20.0, help="compute per micro-batch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if args.smoke:
        args.ks, args.delays_ms, args.steps, args.seq = "1,8", "10", 2, 64
    from gradcycle.data.reader import open_dataset

    cfg = compose(["experiment=cpu_smoke", f"data.seq_len={args.seq}", "logging.progress=false"])
    data = open_dataset(cfg, progress=False)
    samples = data.samples("train", cfg.data)
    rows = []
    header = ["K", "worker delay", "device/step", "whole cycle: wait/step", "share",
              "streamed: wait/step", "share"]  # fmt: skip
    for delay in (float(d) / 1e3 for d in args.delays_ms.split(",")):
        for k in (int(x) for x in args.ks.split(",")):
            row = [k, f"{delay * 1e3:.0f} ms", f"{k * args.device_ms:.0f} ms"]
            for streamed in (False, True):
                wait, total = run(samples, data.pad_id, k, delay, args.device_ms / 1e3,
                                  streamed, args.steps)  # fmt: skip
                row += [f"{wait * 1e3:.1f} ms", f"{wait / total:.1%}"]
            rows.append(row)
            print(table(header, rows[-1:]), flush=True)
    print()
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
