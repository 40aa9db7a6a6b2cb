"""The pipeline bubble, measured: how much of a schedule step this rank spent computing.

The schedule calls three methods of each PipelineStage for its compute (a chunk's forward, its
input-gradient backward, and under zero-bubble schedules the deferred weight-gradient backward);
everything else in the step is waiting for a neighbour (the bubble) or moving activations. The
measured bubble is 1 - compute / step. On CUDA both spans are CUDA events on the stream (the
host only launches; the wall clock would show launch time), read after the step's host sync; on
the CPU they are wall time.
"""

from __future__ import annotations

import functools
import time

import torch

COMPUTE = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")


class ComputeClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.compute: list = []  # CUDA: (start, end) event pairs; CPU: seconds
        self.step: list = []
        self.chunks = 0

    def wrap(self, stage) -> None:
        """Time this stage's compute methods (on the instance: the schedule calls them there)."""
        for name in COMPUTE:
            if hasattr(stage, name):
                setattr(stage, name, functools.partial(self._timed, self.compute,
                                                       getattr(stage, name)))  # fmt: skip

    def around_step(self, fn, *args, **kwargs):
        return self._timed(self.step, fn, *args, **kwargs)

    def _timed(self, into: list, fn, *args, **kwargs):
        if into is self.compute:
            self.chunks += 1
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            into.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(time.perf_counter() - t0)
        return out

    def take(self) -> dict:
        """The last step's fields (call after the step's host sync): compute seconds, chunks
        run, the measured bubble. Resets."""
        compute, step = self._seconds(self.compute), self._seconds(self.step)
        out = {"pp_compute_s": compute, "pp_chunks": self.chunks,
               "pp_bubble_measured": max(0.0, 1.0 - compute / step) if step > 0 else None}  # fmt: skip
        self.compute.clear()  # in place: each wrapped method holds this list
        self.step.clear()
        self.chunks = 0
        return out

    def _seconds(self, spans: list) -> float:
        if self.cuda:
            return sum(s.elapsed_time(e) for s, e in spans) / 1e3
        return float(sum(spans))
