"""Throughput table of a micro-batch x accumulation sweep, from the runs' metrics.jsonl.

    python train.py -m train.micro_batch_size=1,2,4,8 train.global_batch_size=8 \
        hydra.sweep.dir=outputs/sweep-micro
    python bench/sweep_table.py outputs/sweep-micro
    python bench/sweep_table.py --smoke     # tabulates two tiny runs it trains first (seconds)

Every run dir below the given paths (a dir holding metrics.jsonl) is one row: micro-batch size,
accumulation steps K, world size and global batch (from its records), median tokens/s and step
time over the steps after the first `--skip` (start-up, allocator warm-up), peak memory and the
last loss. With the global batch held, every row trains the same objective, so tokens/s compares
only the cost of the micro x K split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


def read_steps(metrics: Path) -> list[dict]:
    """Step records (not eval records); a resumed run's superseded lines are kept last-wins."""
    by_step: dict[int, dict] = {}
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "loss" in record and "step_time_s" in record:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def backend_of(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return "?"
    lines = config.read_text().splitlines()
    for i, line in enumerate(lines):  # backend:\n  name: <x>  (no YAML parser needed)
        if line == "backend:" and i + 1 < len(lines) and lines[i + 1].strip().startswith("name:"):
            return lines[i + 1].split(":", 1)[1].strip()
    return "?"


def summarize(run_dir: Path, skip: int) -> dict | None:
    steps = read_steps(run_dir / "metrics.jsonl")
    if not steps:
        return None
    timed = steps[skip:] or steps[-1:]
    first = steps[0]
    return {
        "run": str(run_dir),
        "backend": backend_of(run_dir),
        "world": first["world_size"],
        "micro": first["micro_batch_size"],
        "K": first["accumulation_steps"],
        "global": first["samples"],
        "steps": len(steps),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_mem_gib": max(r.get("peak_mem_bytes", 0) for r in steps) / 2**30,
        "last_loss": steps[-1]["loss"],
    }


def find_runs(paths: list[Path]) -> list[Path]:
    runs = set()
    for p in paths:
        if (p / "metrics.jsonl").is_file():
            runs.add(p)
        runs.update(m.parent for m in p.rglob("metrics.jsonl"))
    return sorted(runs)


def table(rows: list[dict], root: Path | None = None) -> str:
    head = ("run", "backend", "world", "micro", "K", "global", "steps", "tokens/s", "step s",
            "peak GiB", "last loss")  # fmt: skip
    body = []
    for r in rows:
        name = r["run"]
        if root is not None:
            try:
                name = str(Path(name).relative_to(root)) or "."
            except ValueError:
                pass
        body.append((name, r["backend"], str(r["world"]), str(r["micro"]), str(r["K"]),
                     str(r["global"]), str(r["steps"]), f"{r['tokens_per_s']:.0f}",
                     f"{r['step_time_s']:.4f}", f"{r['peak_mem_gib']:.3f}",
                     f"{r['last_loss']:.4f}"))  # fmt: skip
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


def smoke_runs(dest: Path) -> Path:
    """Two tiny real runs, micro-batch 1 and 2 at a global batch of 4, as a sweep would leave
    them: the script is checked against the records the trainer writes today."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import compose, quiet

    from gradcycle.trainer import run

    for micro in (1, 2):
        over = ["experiment=cpu_smoke", "data.max_documents=300", "train.eval_every=0",
                "logging.progress=false", "checkpoint.at_end=false", "train.max_steps=3",
                "train.global_batch_size=4", f"train.micro_batch_size={micro}",
                f"run_dir={dest / f'micro{micro}'}"]  # fmt: skip
        with quiet():
            run(compose(over))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path, help="sweep dirs or run dirs")
    ap.add_argument("--skip", type=int, default=1, help="leading steps left out of the medians")
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead")
    ap.add_argument("--smoke", action="store_true", help="train two tiny runs and tabulate them")
    args = ap.parse_args(argv)
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="gradcycle-sweep-"))
        try:
            return tabulate([smoke_runs(tmp)], args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not args.paths:
        ap.error("give the sweep dirs or run dirs to tabulate (or --smoke)")
    return tabulate(args.paths, args)


def tabulate(paths: list[Path], args) -> int:
    runs = find_runs(paths)
    rows = [r for r in (summarize(d, args.skip) for d in runs) if r is not None]
    if not rows:
        print(f"no metrics.jsonl with step records under {', '.join(map(str, paths))}",
              file=sys.stderr)  # fmt: skip
        return 1
    rows.sort(key=lambda r: (r["backend"], r["world"], r["global"], r["micro"]))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        root = paths[0] if len(paths) == 1 else None
        print(table(rows, root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
