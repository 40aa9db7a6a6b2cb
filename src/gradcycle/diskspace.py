"""Room for a checkpoint: free space checked before every write, a failed write reported, not traced.

The most common checkpoint failure on a cluster is a full filesystem, found hours into a run.
checkpoint.py asks this module, on every rank, before each checkpoint is written:
  - needed: the size of the newest complete checkpoint (trainer.json records every file's size),
    or, before the first, the model and optimizer bytes (`state_bytes`), plus 5%;
  - free: what `statvfs` reports for the run dir's filesystem on this rank;
and the ranks agree (one all-reduce of the least free space) so every rank stops at the same
point, with one message and exit code EXIT_NO_SPACE, instead of some writing while others wait.

A write that fails anyway (another job filled the disk, EIO, a quota: `statvfs` knows no quota)
is recognised by `write_failure()`: an OSError anywhere in the exception chain, inside DCP's
CheckpointException, torch's zip writer's own errors (`torch.save(path)` reports ENOSPC as
"unexpected pos ..." or "iostream error", with no errno), or the tokenizers library's
"... (os error 28)" (a plain Exception). The ranks agree on it the same way.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_NO_SPACE = 4  # a checkpoint did not fit or its write failed; `latest` is intact
MARGIN = 1.05
# What torch's C++ file writer raises when the write underneath it fails (no errno attached).
_WRITER_ERRORS = ("PytorchStreamWriter failed", "unexpected pos", "file write failed",
                  "iostream error", "write(): fd")  # fmt: skip
# The tokenizers library reports a Rust io::Error as a plain Exception "... (os error 28)".
_RUST_IO = re.compile(r"\(os error (\d+)\)")


class CheckpointSpaceError(RuntimeError):
    """No room for a checkpoint, or its write failed: the previous one is intact (exit 4)."""

    def __init__(self, text: str):
        super().__init__(f"{text}\n  exit code {EXIT_NO_SPACE}: fix the space, then resume=auto")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def existing(path: Path) -> Path:
    """`path`, or its nearest existing ancestor (a run dir not created yet lies on its parent's)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing(path)).free  # f_bavail: what an unprivileged user may use


def filesystem(path: Path) -> str:
    """'<mount point> (<type>)' of the filesystem holding `path` (the type where /proc says)."""
    path = existing(path).resolve()
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[1] == str(mount):
                return f"{mount} ({fields[2]})"
    except OSError:
        pass
    return str(mount)


def state_bytes(cfg, n_params: int) -> int:
    """Model + optimizer bytes of a checkpoint: fp32 parameters (DeepSpeed under bf16/fp16: the
    low-precision copy plus the optimizer's fp32 master) and the optimizer's per-parameter state."""
    deepspeed = cfg.backend.name.startswith("zero")
    param = 2 if deepspeed and cfg.precision in ("bf16", "fp16") else 4
    master = 4 if deepspeed else 0
    optim = 8 if cfg.optim.name == "adamw" else (4 if cfg.optim.momentum else 0)
    return n_params * (param + master + optim)


def recorded_bytes(step_dir: Path) -> int | None:
    """The total size trainer.json records for a complete checkpoint; None if unreadable."""
    import json

    try:
        return sum(json.loads((step_dir / "trainer.json").read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_failure(exc: BaseException) -> str | None:
    """A short description if `exc` is a failed file write (disk full, I/O error, quota), else
    None. Looks through __cause__/__context__ and DCP's per-rank failures."""
    seen, todo, writer = set(), [exc], None
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            name = errno.errorcode.get(e.errno or -1)
            return f"{e.strerror or e}" + (f" [{name}]" if name else "")
        rust = _RUST_IO.search(str(e))
        if rust:
            return f"{os.strerror(int(rust[1]))} [{errno.errorcode.get(int(rust[1]), rust[1])}]"
        said = [w for w in _WRITER_ERRORS if isinstance(e, RuntimeError) and w in str(e)]
        if said and writer is None:  # the same words on every rank (the numbers differ)
            writer = f"a write failed inside torch.save (its C++ writer: '{said[0]}', no errno)"
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> (exc, tb)
        if isinstance(failures, dict):
            todo += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
        todo += [e.__cause__, e.__context__]
    return writer


# ---------------------------------------------------------------- agreement between ranks
def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def least_free(path: Path, device: torch.device, reported=None) -> tuple[int, int]:
    """(least free bytes any rank sees on `path`'s filesystem, that rank). Collective.
    `reported`: the fault hook (tests) that may replace this rank's figure."""
    free = free_bytes(path)
    free = reported(free) if reported is not None else free
    if _world() == 1:
        return free, 0
    rank = dist.get_rank()
    t = torch.zeros(_world(), dtype=torch.float64, device=device)
    t[rank] = float(free)
    dist.all_reduce(t)
    values = t.tolist()
    low = min(range(len(values)), key=values.__getitem__)
    return int(values[low]), low


def failed_ranks(error: BaseException | None, device: torch.device) -> list[tuple[int, str, bool]]:
    """Every rank's write outcome -> [(rank, description, is_a_write_failure)] of the ranks that
    failed ([] when none did). Collective: one all-reduce, and a gather only when one failed."""
    mine = None
    if error is not None:
        text = write_failure(error)
        mine = (text, True) if text else (f"{type(error).__name__}: {error}".splitlines()[0], False)
    if _world() == 1:
        return [] if mine is None else [(0, *mine)]
    flag = torch.tensor([0.0 if mine is None else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(flag)
    if flag.item() == 0:
        return []
    views: list = [None] * _world()
    dist.all_gather_object(views, mine)
    return [(r, *v) for r, v in enumerate(views) if v is not None]


def ranks_text(ranks: list[int], world: int) -> str:
    if len(ranks) == world and world > 1:
        return f"all {world} ranks"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def message(head: str, space: str, root: Path, run_dir: Path, keep: int) -> str:
    """The one message a user reads: what happened, the filesystem, free vs needed (`space`),
    what is intact, and the fix."""
    from gradcycle.checkpoint_index import LATEST, complete_checkpoints

    pointer = root / LATEST
    latest = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    intact = (f"{pointer} = {latest} (resume=auto continues from it)" if latest
              else "no checkpoint of this run exists yet")  # fmt: skip
    older = [p for p in complete_checkpoints(root) if p.name != latest]
    spare = ""
    if older:
        sizes = ", ".join(f"{p.name} {fmt_bytes(recorded_bytes(p) or 0)}" for p in older)
        spare = f" (complete checkpoints older than `latest`: {sizes})"
    move = f"run_dir=<new dir> resume={run_dir}" if latest else "run_dir=<new dir>"
    return (
        f"{head}\n"
        f"  filesystem: {filesystem(run_dir)}, run dir {run_dir}\n"
        f"  {space}\n"
        f"  intact: {intact}\n"
        f"  fix: free space on that filesystem{spare}; or lower checkpoint.keep (now {keep}; "
        f"up to keep+1 checkpoints exist while one is written); or move the run to a roomier "
        f"filesystem: {move}"
    )


# ---------------------------------------------------------------- what the checkpointer asks
class Room:
    """The checkpointer's side of it: the need, the checks, the agreement after each phase."""

    def __init__(self, cfg, root: Path, run_dir: Path, backend, faults, world: int):
        self.cfg, self.root, self.run_dir, self.backend = cfg, root, run_dir, backend
        self.faults, self.world = faults, world
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = getattr(backend, "device", torch.device("cpu"))  # NCCL: a CUDA tensor

    def needed(self) -> tuple[int, str]:
        """Bytes the next checkpoint needs: the last one's recorded size, else model+optimizer."""
        from gradcycle.checkpoint_index import complete_checkpoints
        from gradcycle.model import count_params

        saved = complete_checkpoints(self.root)
        size = recorded_bytes(saved[-1]) if saved else None
        if size:
            return int(size * MARGIN), f"the size of {saved[-1].name}, the last one, + 5%"
        n = count_params(self.backend.module)
        per = state_bytes(self.cfg, 1)
        return (int(state_bytes(self.cfg, n) * MARGIN),
                f"{n / 1e6:.2f}M parameters x {per} B of model and optimizer state, + 5%")  # fmt: skip

    def _shortfall(self, step: int) -> str | None:
        need, how = self.needed()
        free, rank = least_free(self.root, self.device, lambda f: self.faults.free_space(step, f))
        if free >= need:
            return None
        note = f" (on rank {rank}: the least any rank sees)" if self.world > 1 else ""
        return f"free: {fmt_bytes(free)}{note}; needed: about {fmt_bytes(need)} ({how})"

    def _message(self, head: str, space: str) -> str:
        return message(head, space, self.root, self.run_dir, self.cfg.checkpoint.keep)

    def check(self, name: str, step: int, tmp: Path) -> None:
        """Collective: every rank raises CheckpointSpaceError if any rank lacks the space."""
        short = self._shortfall(step)
        if short is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        head = f"checkpoint {name} was not written: too little free space for it"
        raise CheckpointSpaceError(self._message(head, short))

    def check_at_start(self, step: int) -> None:
        """Before the first step: the next checkpoint would not fit -> a warning on rank 0, or
        (checkpoint.require_space=true) CheckpointSpaceError on every rank."""
        due = next_due(self.cfg, step)
        short = None if due is None else self._shortfall(0)
        if short is None:
            return
        head = f"checkpoint step_{due}, the next this run writes, will not fit"
        if self.cfg.checkpoint.require_space:
            raise CheckpointSpaceError(
                self._message(
                    f"{head} (checkpoint.require_space=true: stopped before training)", short
                )
            )
        if self.rank == 0:
            text = self._message(f"{head}: training starts anyway and will stop there "
                                 "(checkpoint.require_space=true stops now)", short)  # fmt: skip
            print(f"gradcycle: warning: {text}", file=sys.stderr, flush=True)

    def agree(self, error: BaseException | None, name: str, tmp: Path) -> None:
        """Collective, after each phase of a save: return if no rank failed, else raise on every
        rank. Failed writes: the partial checkpoint removed (its space freed), one
        CheckpointSpaceError. Anything else is re-raised where it happened (its traceback) and
        named on the other ranks."""
        failed = failed_ranks(error, self.device)
        if not failed:
            return
        ranks = ranks_text([r for r, _, _ in failed], self.world)
        if not all(is_write for _, _, is_write in failed):
            if error is not None:
                raise error
            raise RuntimeError(f"checkpoint {name}: {ranks} failed writing it: {failed[0][1]}")
        written = 0
        if self.rank == 0:  # every rank has stopped writing: free the partial checkpoint's space
            written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            shutil.rmtree(tmp, ignore_errors=True)
            (self.root / "latest.tmp").unlink(missing_ok=True)
        causes = "; ".join(sorted({text for _, text, _ in failed}))
        head = f"checkpoint {name} could not be written: {causes} on {ranks}"
        need, how = self.needed()
        need_text = f"about {fmt_bytes(need)} ({how})"
        if written >= need:  # the estimate was short
            need_text = f"more than {fmt_bytes(written)} (estimated: {need_text})"
        space = (f"free: {fmt_bytes(free_bytes(self.root))} now, after removing the partial "
                 f"{tmp.name} ({fmt_bytes(written)} written before the failure); needed: "
                 f"{need_text}")  # fmt: skip
        cause = error if isinstance(error, Exception) else None
        raise CheckpointSpaceError(self._message(head, space)) from cause


def next_due(cfg, step: int) -> int | None:
    """The step of the next checkpoint after `step` (checkpoint.every / at_end); None if none."""
    c, last = cfg.checkpoint, cfg.train.max_steps
    if c.every and (step // c.every + 1) * c.every <= last:
        return (step // c.every + 1) * c.every
    return last if c.at_end and step < last else None
