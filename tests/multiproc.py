"""Run a function on N gloo ranks (CPU) for tests: THE one helper for every distributed test.

    results = run_on_ranks(fn, world_size=2, args=(...))   # fn(rank, world_size, *args) -> value

Each rank is a fresh spawned process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set
exactly as torchrun would, so the code under test bootstraps itself the normal way. Return values
must be picklable; a failing rank fails the call with its traceback. Group several configurations
into one call: each spawn costs ~6 s of imports.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args, queue, env):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn, world_size: int = 2, args: tuple = (), env: dict | None = None,
                 timeout: float = 600) -> list:  # fmt: skip
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, fn, world_size, port, args, queue, env or {}))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, value = queue.get(timeout=1.0)
        except queue_mod.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            gone = all(p.exitcode is not None for p in procs)
            if dead or gone:  # a rank died, or exited without a (picklable) result
                time.sleep(1.0)
                if queue.empty():
                    errors.append(f"ranks ended without a result: exit codes "
                                  f"{[p.exitcode for p in procs]} (a crash, or an unpicklable "
                                  "return value)")  # fmt: skip
            elif time.monotonic() > deadline:
                errors.append(f"no result within {timeout}s")
            continue
        if status == "ok":
            results[rank] = value
        else:
            errors.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(timeout=30 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks exited non-zero: {bad}"
    return [results[r] for r in range(world_size)]
