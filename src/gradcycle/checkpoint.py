"""Checkpoints: save / load / atomic rename / latest / keep-N. THE place checkpoints are written.

Layout: run_dir/checkpoints/step_<N>/ holding the backend's sharded state (DCP or DeepSpeed) and
trainer.json (+ per-rank RNG states). A checkpoint is written under a temporary name and renamed
when complete; `latest` is updated last, so a crash mid-write leaves the previous one valid.
"""

from __future__ import annotations

import signal


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption) -> checkpoint at the next boundary and exit 0."""

    def __init__(self):
        self._flag = False
        self._previous = {}

    @classmethod
    def install(cls) -> StopSignal:
        stop = cls()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                stop._previous[sig] = signal.signal(sig, stop._handle)
            except ValueError:  # not the main thread
                pass
        return stop

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self) -> bool:
        return self._flag

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def maybe_resume(cfg, run_dir, backend, state):
    return None


def maybe_save(cfg, run_dir, backend, state, plan, final: bool = False) -> None:
    return None
