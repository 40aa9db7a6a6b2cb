"""Launch `python train.py` once per rank as plain subprocesses, as torchrun would set them up.

No agent sits above the ranks: when one dies, nothing kills the others for it, so a test sees
whether the survivors fail by themselves (and how fast). Used by the kill / signal tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from multiproc import free_port

ROOT = Path(__file__).resolve().parents[1]


def launch(world: int, args: list[str], log_dir: Path, env: dict | None = None,
           rank_env: dict[int, dict] | None = None) -> list[subprocess.Popen]:  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        penv = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            **(env or {}),
            **(rank_env or {}).get(rank, {}),
        }
        if world > 1:
            penv.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=penv,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT)))  # fmt: skip
        log.close()
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, float]]:
    """(return code, seconds since the first rank exited) per rank; None = still running at the
    deadline (then killed). The second value measures how long survivors outlived a dead rank."""
    deadline = time.monotonic() + timeout
    first_exit = None
    ended: dict[int, tuple[int, float]] = {}
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                now = time.monotonic()
                first_exit = first_exit or now
                ended[i] = (p.returncode, now - first_exit)
        time.sleep(0.1)
    out = []
    for i, p in enumerate(procs):
        if i not in ended:
            p.kill()
            p.wait()
        out.append(ended.get(i, (None, float("inf"))))
    return out


def logs(log_dir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(log_dir.glob("*.log"))
    )
