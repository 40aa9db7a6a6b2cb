"""Stop signals, Slurm requeue, and the fault injection the fault tests drive.

Stop signals: SIGTERM and SIGUSR1 only set a flag. The trainer adds the flags to the all-reduce it
already runs for its step statistics, so every rank learns at the same boundary that some rank was
signalled, all of them checkpoint together and exit 0; no rank can be left waiting in a collective
the others skipped. SIGUSR1 (what `#SBATCH --signal=USR1@<seconds>` sends before the time limit)
also requeues the job; SIGTERM (scancel, preemption) does not: a cancelled job must stay cancelled,
and Slurm requeues preempted jobs itself under PreemptMode=REQUEUE.

Fault injection (tests only; unset in normal runs, and then every hook is a no-op):
    GRADCYCLE_FAULT="<kind>:<step>[:<micro>][@<rank>],..."
  step is numbered as in metrics.jsonl and checkpoint names (1 = the first optimizer step), micro
  is the micro-batch index within that step's cycle, @rank limits the fault to one rank.
    kill:<step>:<micro>      SIGKILL this process when that micro-batch starts (kill -9 mid-cycle)
    sigterm:<step>:<micro>   send SIGTERM to this process there (a preemption notice)
    sigusr1:<step>:<micro>   send SIGUSR1 to this process there (a time-limit warning)
    hang:<step>:<micro>      SIGSTOP this process there (alive but unresponsive)
    kill_in_save:<step>      SIGKILL inside checkpoint step_<step>, after every shard is written
                             and before the rename that completes it
    disk_full:<step>         while checkpoint step_<step>'s shards are written, every write past
                             64 KiB of a file fails in the kernel (RLIMIT_FSIZE: EFBIG), as on a
                             disk that fills up mid-write: in Python's and torch's C++ writers alike
    no_space:<step>          the free-space check before checkpoint step_<step> sees 0 bytes free
                             (step 0: the check at start-up)
    nan_loss:<step>          that step's loss becomes NaN (so do its gradients)
    inf_grad:<step>          that step's gradients become inf, its loss stays finite
    oom:<step>:<micro>       raise torch.OutOfMemoryError there (a device out of memory)
    kill_in_prepare:<shard>  SIGKILL gradcycle.prepare while it cuts train shard <shard> (1 = the
                             first): its data is in temporary files, not yet renamed
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch

ENV_VAR = "GRADCYCLE_FAULT"
KINDS = ("kill", "sigterm", "sigusr1", "hang", "kill_in_save", "nan_loss", "inf_grad", "oom")
KINDS += ("kill_in_prepare",)  # gradcycle.prepare
KINDS += ("disk_full", "no_space")  # checkpoint writes (gradcycle/diskspace.py)
FULL_AFTER = 64 * 1024  # disk_full: bytes a file may reach
_AT_MICRO = {"kill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1,
             "hang": signal.SIGSTOP}  # fmt: skip


class StopSignal:
    """SIGTERM / SIGUSR1 -> a flag; the trainer agrees on it across ranks at each boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: set[int] = set()
        self._previous = {}

    @classmethod
    def install(cls) -> StopSignal:
        stop = cls()
        for sig in cls.SIGNALS:
            try:
                stop._previous[sig] = signal.signal(sig, stop._handle)
            except ValueError:  # not the main thread: the launcher's default handling stays
                pass
        return stop

    def _handle(self, signum, frame):
        self.received.add(signum)

    def votes(self) -> list[float]:
        """[terminate, requeue] flags of this rank, summed over ranks by the stats all-reduce."""
        return [float(bool(self.received)), float(signal.SIGUSR1 in self.received)]

    def requested(self) -> bool:
        return bool(self.received)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


def requeue_under_slurm() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` when running under Slurm; never raises."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    exe = shutil.which("scontrol")
    if exe is None:
        print("gradcycle: SLURM_JOB_ID is set but scontrol is not on PATH: not requeued",
              file=sys.stderr, flush=True)  # fmt: skip
        return False
    try:
        subprocess.run([exe, "requeue", job], check=True, timeout=60, capture_output=True,
                       text=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        print(f"gradcycle: scontrol requeue {job} failed: {detail.strip()}", file=sys.stderr,
              flush=True)  # fmt: skip
        return False
    print(f"gradcycle: requeued Slurm job {job}", flush=True)
    return True


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    micro: int | None = None
    rank: int | None = None


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        body, _, rank = item.partition("@")
        kind, *nums = body.split(":")
        if kind not in KINDS or not 1 <= len(nums) <= 2 or not all(n.isdigit() for n in nums):
            raise ValueError(
                f"{ENV_VAR}={spec!r}: cannot parse {item!r}; expected <kind>:<step>[:<micro>]"
                f"[@<rank>] with kind one of {', '.join(KINDS)}"
            )
        micro = int(nums[1]) if len(nums) > 1 else (0 if kind in (*_AT_MICRO, "oom") else None)
        faults.append(Fault(kind, int(nums[0]), micro, int(rank) if rank else None))
    return faults


class Faults:
    """The hooks the trainer and the checkpointer call; no-ops unless GRADCYCLE_FAULT is set."""

    def __init__(self, faults: list[Fault], rank: int):
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        return cls(parse(os.environ.get(ENV_VAR, "")), rank)

    def _hit(self, kind: str, step: int, micro: int | None = None) -> bool:
        return any(f.kind == kind and f.step == step and f.micro == micro for f in self.faults)

    def at_micro(self, step0: int, micro: int) -> None:
        """Called as micro-batch `micro` of the step with 0-based index `step0` starts."""
        if not self.faults:
            return
        for kind, sig in _AT_MICRO.items():
            if self._hit(kind, step0 + 1, micro):
                _flush_and_kill(sig)
        if self._hit("oom", step0 + 1, micro):
            raise torch.OutOfMemoryError("CUDA out of memory (injected: GRADCYCLE_FAULT=oom)")

    def wrap_loss(self, step0: int, loss_fn):
        if not self.faults:
            return loss_fn
        step = step0 + 1
        if self._hit("nan_loss", step):
            return lambda model, batch: loss_fn(model, batch) * float("nan")
        if self._hit("inf_grad", step):
            return lambda model, batch: _InfGrad.apply(loss_fn(model, batch))
        return loss_fn

    def in_save(self, step: int) -> None:
        if self.faults and self._hit("kill_in_save", step):
            _flush_and_kill(signal.SIGKILL)

    def disk_full(self, step: int):
        """Context for the write of checkpoint step_<step>: files stop growing past FULL_AFTER."""
        if self.faults and self._hit("disk_full", step):
            return _file_size_limit(FULL_AFTER)
        return contextlib.nullcontext()

    def free_space(self, step: int, free: int) -> int:
        return 0 if self.faults and self._hit("no_space", step) else free

    def in_prepare(self, shard: int) -> None:
        if self.faults and self._hit("kill_in_prepare", shard):
            _flush_and_kill(signal.SIGKILL)


def _flush_and_kill(sig: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process: a write past `nbytes` fails with EFBIG (SIGXFSZ ignored,
    else it would kill the process). Needs no privilege; restored on exit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (what an fp16 overflow looks like)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")
