"""bench/gpu.sh's bookkeeping: one JSON row per planned run, and the markdown table of them.

    python bench/_gpu_table.py row OUT NAME STATUS WALL_S [RUN_DIR]   # appends to OUT/gpu.jsonl
    python bench/_gpu_table.py table OUT                              # prints, writes OUT/gpu_table.md

`row` also appends the run's metrics.jsonl records (each tagged with `run`) to OUT/metrics.jsonl,
so the output folder holds a few files whatever the number of runs (the device tool returns at
most 8) and never a run dir or checkpoint. The first two steps pay CUDA and allocator warm-up:
the medians are over the later steps when there are any.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _records(run_dir: str | None) -> list[dict]:
    f = Path(run_dir or "/nonexistent") / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def _median(recs: list[dict], key: str):
    xs = [r[key] for r in recs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def row(out: Path, name: str, status: str, wall_s: float, run_dir: str | None = None) -> dict:
    backend, ac, k = name.split("_")
    recs = _records(run_dir)
    with (out / "metrics.jsonl").open("a") as f:
        for r in recs:
            f.write(json.dumps({"run": name, **r}) + "\n")
    steps = [r for r in recs if "loss" in r]
    steady = steps[2:] or steps[1:] or steps
    rec = {"run": name, "backend": backend, "activation_checkpointing": ac,
           "accumulation_steps": int(k[1:]), "status": status, "wall_s": round(wall_s, 1),
           "steps": len(steps)}  # fmt: skip
    if steps:
        peak = max(r.get("peak_mem_bytes") or 0 for r in steps)
        rec.update(tokens_per_step=steps[-1]["tokens"], micro_batch_size=steps[-1].get(
            "micro_batch_size"), step_time_s=_median(steady, "step_time_s"),
            tokens_per_s=_median(steady, "tokens_per_s"), mfu=_median(steady, "mfu"),
            hfu=_median(steady, "hfu"), peak_mem_gib=round(peak / 2**30, 2),
            loss=steps[-1]["loss"])  # fmt: skip
    with (out / "gpu.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def table(out: Path) -> str:
    rows = ["| backend | checkpointing | K | status | steps | tokens/step | step s | tokens/s | "
            "MFU | HFU | peak mem GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    path = out / "gpu.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        cells = [r["backend"], r["activation_checkpointing"], r["accumulation_steps"],
                 r["status"], r["steps"]]  # fmt: skip
        if r.get("tokens_per_step") is not None:
            cells += [r["tokens_per_step"], f"{r['step_time_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      _pct(r["mfu"]), _pct(r["hfu"]), f"{r['peak_mem_gib']:.1f}"]  # fmt: skip
        else:
            cells += [""] * 6
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    text = "\n".join(rows)
    (out / "gpu_table.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    cmd, out, *rest = sys.argv[1:]
    if cmd == "row":
        name, status, wall = rest[:3]
        row(Path(out), name, status, float(wall), rest[3] if len(rest) > 3 else None)
    elif cmd == "table":
        print(table(Path(out)), flush=True)
    else:
        sys.exit(f"unknown command {cmd!r}: row or table")
