"""One 2-rank optimizer step of every backend, in a venv holding `pip install -e .` alone.

    make core-check        (a part of `make test`: builds .venv-core without extras, runs this)

The suite's own venv carries the dev/slurm extras, which would hide a run-time dependency that
only an extra brings (transformers' HfDeepSpeedConfig needs `accelerate`, so ZeRO-3 once broke
with the core dependencies alone). This script imports nothing outside the core dependencies:
no pytest, no conftest. It prints one row per backend and exits 1 if any backend failed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # multiproc.run_on_ranks: the one N-rank launcher

BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp")
TINY = ["experiment=cpu_smoke", "data.max_documents=300", "logging.progress=false",
        "train.eval_every=0", "train.max_steps=1", "checkpoint.at_end=false"]  # fmt: skip


def one_step_each(rank: int, world: int, root: str) -> list[tuple[str, str, float]]:
    from gradcycle.compose import compose
    from gradcycle.trainer import run

    rows = []
    for backend in BACKENDS:
        t0 = time.perf_counter()
        try:
            record = run(compose([*TINY, f"run_dir={root}/{backend}", f"backend={backend}"]))
            status = f"ok, loss {record['loss']:.4f}"
        except Exception:
            status = "FAILED\n" + traceback.format_exc()
        rows.append((backend, status, time.perf_counter() - t0))
    return rows


def main() -> int:
    from multiproc import run_on_ranks

    os.environ.setdefault("GRADCYCLE_CACHE", tempfile.mkdtemp(prefix="gradcycle-core-"))
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="gradcycle-core-runs-") as root:
        ranks = run_on_ranks(one_step_each, 2, (root,), timeout=1200)
    failed = 0
    print(f"{'backend':<8} {'rank 0':<40} {'rank 1':<40} seconds")
    for (name, s0, dt), (_, s1, _) in zip(*ranks, strict=True):
        print(f"{name:<8} {s0.splitlines()[0]:<40} {s1.splitlines()[0]:<40} {dt:6.1f}")
        for status in (s0, s1):
            if not status.startswith("ok"):
                failed += 1
                print(status, file=sys.stderr)
    print("core dependencies: every backend trains" if not failed else "core dependencies: FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
