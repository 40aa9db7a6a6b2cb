"""Pipeline bubble, measured (backend.pp=2 on CPU gloo ranks) beside the planner's.

For each schedule and K = p..8p micro-batches per cycle, the trainer runs pp=2 on 2 ranks and
pp=1 on one process with the same global batch. With perfect overlap a stage computes 1/p of the
pp=1 step's work, so the measured bubble is 1 - (t_pp1 / p) / t_pp (it also carries the p2p
copies and the per-step schedule overhead); `in-step` is rank 0's own record, 1 - its stage
compute / the schedule step (backends/pipeline_clock.py), which needs no second run; the planner's is (p-1) / (v·K + p-1)
(gradcycle/planner/pipeline.py; for the zero-bubble schedules an upper bound). loss.impl=full everywhere
(what the zero-bubble schedule needs). Packed rows (no padding), so both runs compute the same tokens.
Medians over the steps after the first. On a busy 2-core machine the numbers are noisy; the
trend in K is the point.

    python bench/pipeline.py            # K = 2..16, gpipe / 1f1b / interleaved_1f1b / _zb / zbv (v=2)
    python bench/pipeline.py --schedules 1f1b,interleaved_zb,zbv
    python bench/pipeline.py --smoke    # K = 2, 4; 1f1b only; a few seconds of steps
"""

from __future__ import annotations

import argparse

from _common import median, run_on_ranks, table, timed_train

from gradcycle.planner.pipeline import bubble_fraction

MODEL = [
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
    "model.intermediate_size=688", "data.seq_len=128", "data.vocab_size=2048",
    "data.max_documents=600", "train.micro_batch_size=2", "train.accumulation_steps=null",
    "train.eval_every=0", "logging.progress=false", "checkpoint.at_end=false", "seed=7",
    "optim.warmup_steps=1",
]  # fmt: skip
SCHEDULES = {
    "gpipe": [],
    "1f1b": [],
    "interleaved_1f1b": ["backend.pp_virtual=2"],
    "interleaved_zb": ["backend.pp_virtual=2"],
    "zbv": ["backend.pp_virtual=2"],
}
LOSS = ["loss.impl=full"]  # every row and pp=1 alike: the zero-bubble schedule needs it
P = 2


def _overrides(k: int, steps: int) -> list[str]:
    return [*MODEL, *LOSS, f"train.global_batch_size={2 * k}", f"train.max_steps={steps}"]


def _step_times(records: list[dict]) -> float:
    return median([r["step_time_s"] for r in records[1:]])


def _ranks(rank: int, world: int, jobs: list) -> list:
    out = []
    for name, overrides in jobs:  # every rank trains; rank 0 has the records
        records = timed_train(overrides, rank, name)[1]
        inside = median([r["pp_bubble_measured"] for r in records[1:]]) if rank == 0 else None
        out.append((_step_times(records), inside) if rank == 0 else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="K = 2, 4 with 1f1b; 3 steps each")
    ap.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated")
    args = ap.parse_args()
    ks = [P, 2 * P] if args.smoke else [P, 2 * P, 4 * P, 8 * P]
    schedules = ["1f1b"] if args.smoke else args.schedules.split(",")
    steps = 3 if args.smoke else 6
    single = {k: _step_times(timed_train(_overrides(k, steps), 0, f"pp1-k{k}")[1]) for k in ks}
    jobs = [(f"pp-{s}-k{k}", [*_overrides(k, steps), f"backend.pp={P}", f"backend.pp_schedule={s}",
             *SCHEDULES[s]]) for s in schedules for k in ks]  # fmt: skip
    times = run_on_ranks(_ranks, P, args=(jobs,))[0]
    rows = []
    for (name, _), (t, inside) in zip(jobs, times, strict=True):
        s, k = name.split("-")[1], int(name.rsplit("k", 1)[1])
        v = 2 if "pp_virtual=2" in " ".join(SCHEDULES[s]) else 1
        measured = 1 - (single[k] / P) / t
        rows.append([s, k, v, f"{single[k] * 1e3:.0f}", f"{t * 1e3:.0f}", f"{measured:.1%}",
                     f"{inside:.1%}", f"{bubble_fraction(P, k, v):.1%}"])  # fmt: skip
    print(f"pipeline bubble: pp={P} CPU ranks (gloo), micro-batch 2 x 128 tokens, "
          f"{'3' if args.smoke else '6'} steps (median after the first)")  # fmt: skip
    print(table(["schedule", "K", "v", "pp=1 step ms", "pp=2 step ms", "measured bubble",
                 "in-step (pp_bubble_measured)", "planner (p-1)/(vK+p-1)"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
