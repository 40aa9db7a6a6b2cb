"""Shared by the bench scripts: environment, config composition, the rank launcher, tables."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # multiproc.run_on_ranks: the one N-rank launcher

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

from multiproc import run_on_ranks  # noqa: E402

__all__ = [
    "ROOT",
    "compose",
    "quiet",
    "read_records",
    "run_on_ranks",
    "table",
    "median",
    "now",
    "timed_train",
]


def compose(overrides: list[str]):
    from gradcycle.cli import compose as _compose

    return _compose(overrides, str(ROOT / "conf"))


@contextlib.contextmanager
def quiet():
    """Swallow the trainer's start-up tables; the bench prints its own."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        yield out


def read_records(run_dir) -> list[dict]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if "loss" in r]


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))  # fmt: skip
    lines = [fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]]
    return "\n".join(line.rstrip() for line in lines)


def backends_available() -> list[str]:
    have = {p.stem for p in (ROOT / "src" / "gradcycle" / "backends").glob("*.py")}
    out = ["ddp"]
    if "fsdp" in have:
        out += ["fsdp", "hsdp"]
    if "deepspeed" in have:
        out += ["zero1", "zero2", "zero3"]
    return out


def now() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time barely moves when other jobs take the cores, so it
    shows a loop's own cost even on a busy machine; wall time is what a user waits for."""
    return time.perf_counter(), time.process_time()


def timed_train(overrides: list[str], rank: int = 0, name: str = "run"):
    """Run gradcycle's trainer in this process; return (clock readings where each optimizer step
    ended, rank 0's step records, what it printed). The clocks are read where the trainer hands a step's record to
    its sink, i.e. after everything the loop does for the step."""
    import gradcycle.trainer
    from gradcycle.telemetry import MetricsSink

    ends = []

    class StampedSink(MetricsSink):
        def write(self, record: dict) -> None:
            if "loss" in record:
                ends.append(now())
            super().write(record)

    # Every rank must name the same run dir: derive it, do not draw it from mkdtemp.
    run_dir = Path(tempfile.gettempdir()) / f"gradcycle-bench-{name}"
    gradcycle.trainer.MetricsSink = StampedSink
    try:
        with quiet() as printed:
            gradcycle.trainer.run(compose([*overrides, f"run_dir={run_dir}"]))
    finally:
        gradcycle.trainer.MetricsSink = MetricsSink
    if rank != 0:
        return ends, [], printed.getvalue()
    records = read_records(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return ends, records, printed.getvalue()
