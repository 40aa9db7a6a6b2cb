"""Collectives per optimizer step for every backend x sync policy at K = 1, 2, 4, 8 on 2 CPU ranks.

Each configuration is a real 2-rank training run of gradcycle's trainer (tiny Llama, fp32, gloo);
the counts are its metrics.jsonl `comm` field for the second optimizer step (the first may include
lazy start-up traffic), and the extra memory is what the backend's start-up sync plan states for
that policy. `auto` is run at K=4 to show what it resolves to. ZeRO-3 runs with
backend.param_persistence_threshold=0, so the tiny model's parameters are gathered as a large
model's would be (DeepSpeed otherwise keeps small parameters resident). hsdp runs as 2 replicas of
1 shard (backend.replicate=2): on 2 ranks a 1x2 mesh would be plain fsdp.

    python bench/comm.py                       # every backend present in src/gradcycle/backends
    python bench/comm.py --backends ddp,fsdp --ks 1,4
    python bench/comm.py --smoke               # K=2 per_cycle, ddp/hsdp/zero3 in one spawn

Bytes are those of the full buffers handed to each collective (gloo on CPU runs reduce-scatter
as an all-reduce underneath; the counts are what the backend asks for, as on NCCL).
"""

from __future__ import annotations

import argparse
import time

from _common import backends_available, run_on_ranks, table, timed_train

TINY = ["experiment=cpu_smoke", "data.max_documents=300", "train.eval_every=0",
        "logging.progress=false", "checkpoint.at_end=false", "train.micro_batch_size=2",
        "train.global_batch_size=null", "train.max_steps=2", "backend.dist_timeout_s=120"]  # fmt: skip
OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def _plan_lines(text: str) -> tuple[str, str, str]:
    """(resolved policy, extra memory, note) from the start-up sync plan the trainer prints."""
    policy = memory = note = ""
    for line in text.splitlines():
        if line.startswith("sync plan:"):
            policy = next((w[5:] for w in line.split() if w.startswith("sync=")), "")
        elif "extra memory held through the cycle" in line:
            memory = line.split("extra memory held through the cycle", 1)[1].strip()
        elif line.strip().startswith("note:"):
            note = line.strip()[5:].strip()
    return policy, memory, note


def backend_runs(rank: int, world: int, backends: list[str], jobs: list[tuple[str, int]]) -> list:
    """On each rank: every (policy, K) job of each backend in turn; rank 0 returns the results,
    one list per backend."""
    import torch

    torch.set_num_threads(1)
    return [_one_backend(rank, backend, jobs) for backend in backends]


def _one_backend(rank: int, backend: str, jobs: list[tuple[str, int]]) -> list[dict]:
    out = []
    for policy, k in jobs:
        over = [*TINY, f"backend={backend}", f"backend.sync={policy}",
                f"train.accumulation_steps={k}"]  # fmt: skip
        if backend == "zero3":
            over.append("backend.param_persistence_threshold=0")
        if backend == "hsdp":  # 2 replicas x 1 shard: the replica all-reduce is what hsdp adds
            over.append("backend.replicate=2")
        try:
            _, records, printed = timed_train(over, rank, f"comm-{backend}-{policy}-{k}")
        except ValueError as e:  # a policy this backend refuses: its message is the answer
            out.append({"policy": policy, "k": k, "error": str(e).splitlines()[0]})
            continue
        if rank == 0:
            resolved, memory, note = _plan_lines(printed)
            out.append({"policy": policy, "k": k, "comm": records[-1]["comm"],
                        "resolved": resolved, "memory": memory, "note": note})  # fmt: skip
    return out if rank == 0 else []


def _fmt(entry: dict) -> str:
    if not entry["calls"]:
        return "-"
    kib = entry["bytes"] / 1024
    return f"{entry['calls']} / {kib:.0f}K" if kib >= 10 else f"{entry['calls']} / {kib:.1f}K"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=None, help="default: every backend present")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--policies", default="per_cycle,per_micro")
    ap.add_argument("--smoke", action="store_true", help="smallest size (checks the script)")
    a = ap.parse_args()
    backends = a.backends.split(",") if a.backends else backends_available()
    if a.smoke:  # one backend of each module (ddp.py, fsdp.py, deepspeed.py), comm's overrides
        a.ks, a.policies = "2", "per_cycle"
        backends = a.backends.split(",") if a.backends else ["ddp", "hsdp", "zero3"]
    ks = [int(x) for x in a.ks.split(",")]
    jobs = [(p, k) for p in a.policies.split(",") for k in ks] + ([] if a.smoke else [("auto", 4)])
    # One spawn per backend, so a crash costs that backend's rows only; smoke: one for all.
    groups = [backends] if a.smoke else [[b] for b in backends]
    rows, notes = [], {}
    for group in groups:
        t0 = time.time()
        try:
            per_backend = run_on_ranks(backend_runs, 2, (group, jobs), timeout=1800)[0]
        except RuntimeError as e:
            rows.append([",".join(group), "", "", *[""] * len(OPS), f"failed: {str(e)[-120:]}"])
            continue
        for backend, results in zip(group, per_backend):
            for r in results:
                if "error" in r:
                    rows.append(
                        [backend, r["policy"], r["k"], *["n/a"] * len(OPS), "refused (note)"]
                    )
                    notes[(backend, r["policy"])] = r["error"]
                    continue
                policy = (
                    r["policy"]
                    if r["policy"] == r["resolved"]
                    else f"{r['policy']}->{r['resolved']}"
                )
                rows.append(
                    [backend, policy, r["k"], *[_fmt(r["comm"][op]) for op in OPS], r["memory"]]
                )
                if r["note"]:
                    notes[(backend, r["resolved"])] = r["note"]
        print(f"  {','.join(group)}: {time.time() - t0:.0f}s", flush=True)
    print("collectives per optimizer step on 2 CPU ranks (calls / bytes), tiny Llama: "
          "2 decoder layers, fp32, micro-batch 2")  # fmt: skip
    print(table(["backend", "sync", "K", *OPS, "extra memory held (sync plan)"], rows))
    for (backend, policy), note in notes.items():
        print(f"note {backend} {policy}: {note}")


if __name__ == "__main__":
    main()
