"""profile=true: torch.profiler around the chosen optimizer steps, a trace and a time split.

Each profiled step writes `run_dir/profile/rank<r>.step<s>.pt.trace.json` (Chrome trace format:
open it in https://ui.perfetto.dev or TensorBoard's profiler plugin) and adds to that step's
metrics record a `profile` entry splitting the step's wall time into

  forward_backward_s  inside backend.forward_backward, minus exposed collective time
  optimizer_s         inside backend.step (clip, optimizer, zero grads), minus exposed collectives
  comm_wait_s         collectives in flight while no compute ran: time spent waiting on them
  other_s             the rest (data, token count, bookkeeping)

plus comm_busy_s (all time with a collective in flight, overlapped or not) and alloc_peak_bytes
(the most bytes the step had allocated above what was live when it began: activations, gradients,
optimizer temporaries; on CPU, where peak RSS only grows, this is the honest per-step number. The
profiler does not see frees of blocks allocated before it started, so it is an upper bound).
On CUDA the regions synchronise the device at their end while profiling, so host ranges are device
time; unprofiled steps are untouched.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.autograd import DeviceType

_COMM_PREFIXES = ("gloo:", "nccl:", "c10d::", "record_param_comms", "mpi:", "ccl:")


def _merge(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(merged) -> float:
    return sum(b - a for a, b in merged)


def _intersect(x, y) -> list[tuple[float, float]]:
    """Intersection of two merged interval lists."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(x, y) -> list[tuple[float, float]]:
    """x minus y, both merged."""
    out = []
    for a, b in x:
        start = a
        for c, d in y:
            if d <= start or c >= b:
                continue
            if c > start:
                out.append((start, c))
            start = max(start, d)
        if start < b:
            out.append((start, b))
    return out


def _is_comm(name: str) -> bool:
    return name.startswith(_COMM_PREFIXES) or "nccl" in name.lower()


def time_split(events, device_type: str) -> dict[str, float]:
    """Split the profiled step (the `gradcycle.step` range) into the parts listed above."""
    span = lambda e: (e.time_range.start, e.time_range.end)  # noqa: E731 (microseconds)
    step = [e for e in events if e.name == "gradcycle.step"]
    if not step:
        return {}
    main = step[0].thread
    s = _merge([span(e) for e in step])
    fb = _merge([span(e) for e in events if e.name == "gradcycle.forward_backward"])
    opt = _merge([span(e) for e in events if e.name == "gradcycle.optimizer_step"])
    comm = _merge([span(e) for e in events if _is_comm(e.name)])
    if device_type == "cuda":  # compute = the device's non-collective kernels
        compute = [span(e) for e in events
                   if e.device_type == DeviceType.CUDA and not _is_comm(e.name)]  # fmt: skip
    else:  # compute = innermost aten ops on the training thread
        compute = [span(e) for e in events if e.thread == main and e.device_type == DeviceType.CPU
                   and e.name.startswith("aten::") and not e.cpu_children]  # fmt: skip
    wait = _subtract(_intersect(comm, s), _merge(compute))
    us = 1e-6
    fb_s = (_length(fb) - _length(_intersect(fb, wait))) * us
    opt_s = (_length(opt) - _length(_intersect(opt, wait))) * us
    wait_s = _length(wait) * us
    total = _length(s) * us
    return {
        "step_s": total,
        "forward_backward_s": fb_s,
        "optimizer_s": opt_s,
        "comm_wait_s": wait_s,
        "other_s": max(0.0, total - fb_s - opt_s - wait_s),
        "comm_busy_s": _length(_intersect(comm, s)) * us,
    }


def alloc_peak_bytes(prof, device_type: str) -> int:
    """Peak of bytes allocated (minus freed) on the device since the profiler started."""
    want = DeviceType.CUDA if device_type == "cuda" else DeviceType.CPU
    live = peak = 0
    mem = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(mem, key=lambda e: e.start_ns()):
        if e.device_type() == want:
            live += e.nbytes()
            peak = max(peak, live)
    return int(peak)


class StepProfiler:
    """start(step) / region(name) / stop(): a no-op unless `step` is one of the chosen ones."""

    def __init__(self, enabled: bool, steps, run_dir: Path, rank: int, device: torch.device):
        self.steps = {int(s) for s in steps} if enabled else set()
        self.dir = Path(run_dir) / "profile"
        self.rank, self.device = rank, device
        self.prof = None
        self.step = 0
        self._step_range = None

    def start(self, step: int) -> None:
        """`step` numbers the optimizer step about to run as the metrics records do (from 1)."""
        if step not in self.steps:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts, profile_memory=True)
        self.prof.start()
        self.step = step
        self._step_range = torch.profiler.record_function("gradcycle.step")
        self._step_range.__enter__()

    @property
    def active(self) -> bool:
        return self.prof is not None

    @contextlib.contextmanager
    def region(self, name: str):
        if self.prof is None:
            yield
            return
        with torch.profiler.record_function(f"gradcycle.{name}"):
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def stop(self) -> dict | None:
        """End the profiled step: write its trace, return its time split (None if unprofiled)."""
        if self.prof is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._step_range.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"rank{self.rank}.step{self.step}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        split = time_split(prof.events(), self.device.type)
        split["alloc_peak_bytes"] = alloc_peak_bytes(prof, self.device.type)
        return split
