"""How long a rank waits in a collective, per phase: a dead peer fails the others, never hangs.

- training steps and evaluation: `backend.dist_timeout_s` (default 300 s), the process group's
  own timeout, set when it is created;
- start-up (build, initialise or load the model, resume) and checkpoint writes:
  `backend.startup_timeout_s` (default 1800 s) while `long_phase()` is open. Filling or reading
  a 70B model's shards, or writing them to a shared filesystem, legitimately takes longer on one
  rank than on another; a step does not.

`long_phase()` raises the timeout of every process group this rank belongs to (and the
rendezvous store's) on entry and sets them back on exit, groups created inside included (FSDP's
mesh, DeepSpeed's groups). It needs `torch.distributed.distributed_c10d._set_pg_timeout`
(gloo and NCCL, torch >= 2.3); where it is missing the phases keep `backend.dist_timeout_s`, and
the start-up plan says so. The one-process export (`python -m gradcycle.export`) has no peers.
"""

from __future__ import annotations

import contextlib
import datetime
import warnings

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def supported() -> bool:
    return hasattr(c10d, "_set_pg_timeout")


def _groups() -> list:
    world = getattr(c10d, "_world", None)
    groups = list(getattr(world, "pg_map", {}) or [c10d._get_default_group()])
    return [g for g in groups if not c10d._rank_not_in_group(g)]


def set_timeout(seconds: float) -> bool:
    """Every group of this rank and the default store wait at most `seconds` from now on."""
    if not (dist.is_initialized() and supported()):
        return False
    timeout = datetime.timedelta(seconds=seconds)
    with warnings.catch_warnings():  # groups of other backends (fake, mpi) keep theirs
        warnings.filterwarnings("ignore", message="Set timeout is now only supported")
        for group in _groups():
            c10d._set_pg_timeout(timeout, group)
    store = getattr(c10d, "_get_default_store", lambda: None)()
    if store is not None and hasattr(store, "set_timeout"):
        store.set_timeout(timeout)
    return True


@contextlib.contextmanager
def long_phase(backend_cfg):
    """Collectives inside may wait backend.startup_timeout_s; afterwards dist_timeout_s again
    (also for the groups created inside: FSDP's mesh, DeepSpeed's groups)."""
    set_timeout(backend_cfg.startup_timeout_s)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the group may be broken: keep the real error
            set_timeout(backend_cfg.dist_timeout_s)
        raise
    set_timeout(backend_cfg.dist_timeout_s)
