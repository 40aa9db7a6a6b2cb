"""Device memory of the simulated rank, across a whole accumulation cycle: storage accounting.

A TorchDispatchMode above the fake tensor mode sees every op's outputs; each distinct storage
of a fake (device) tensor is counted once, with its size, until it is freed (a weak reference).
Storages FSDP2 frees and refills in place (`UntypedStorage.resize_`: unsharded parameters) are
followed through that method. The live total is exact after every op; the peak of each optimizer
step is its maximum. torch's own FSDPMemTracker refuses a second forward per iteration; this one
has no notion of iterations: it only counts storages, so K forwards and backwards are just ops.

What the bytes are is decided by reference, at snapshots (whenever the live total has grown by
`tolerance` since the last one, and at every phase boundary), in this order:
  parameters             the optimizer's parameters (fsdp: the local shards; ddp: full)
  unsharded parameters   FSDP2's gathered copies (and any registered parameter not the optimizer's)
  gradients              .grad of both
  optimizer state        the optimizer's state tensors
  communication buffers  storages passed to a collective (all-gather/reduce-scatter buffers,
                         DDP's buckets) that are none of the above
  activations            allocated during a micro-batch's forward (saved tensors, the chunked
                         loss's head gradient, checkpointed layers' inputs, forward temporaries)
  temporaries            the rest: backward's activation gradients and recomputed layers, the
                         optimizer step's scratch
So the by-category split at the peak is within `tolerance` of the exact peak, which is exact.
"""

from __future__ import annotations

import contextlib
import heapq
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("parameters", "unsharded parameters", "gradients", "optimizer state",
              "communication buffers", "activations", "temporaries")  # fmt: skip


LARGEST = 12  # storages listed at each window's peak


@dataclass
class StepMemory:
    """One window of the run (start-up, or one optimizer step) and its peak."""

    name: str
    peak_bytes: int = 0
    peak_at: str = ""
    by_category: dict[str, int] = field(default_factory=dict)  # at the peak (snapshot)
    largest: list[tuple] = field(default_factory=list)  # (bytes, category, shape, dtype) at it
    category_max: dict[str, int] = field(default_factory=dict)  # each category's own maximum
    start_bytes: int = 0


class MemoryTracker(TorchDispatchMode):
    def __init__(self, accumulation_steps: int, tolerance: float = 2e-3):
        super().__init__()
        self.k = accumulation_steps
        self.tolerance = tolerance
        # storage key -> [nbytes, phase, in_collective, weak ref, (shape, dtype) first seen]
        self.live: dict[int, list] = {}
        self.total = 0
        self.windows: list[StepMemory] = [StepMemory("start-up")]
        self._snap_total = -1
        self.phase, self.step, self.micro = "start-up", 0, 0
        self.module_stack: list[str] = []
        self.backward_in = ""
        self.backend = None
        self._names: dict[int, str] = {}
        self._fsdp_params: list = []
        self._exit = contextlib.ExitStack()

    # -- the trainer's seam (trainer.run(cfg, on_backend=tracker.attach)) -------------------
    def attach(self, backend) -> None:
        """Follow the backend's phases: forward, backward, optimizer step (instance wrappers)."""
        self.backend = backend
        self._names = {id(m): n for n, m in backend.module.named_modules()}
        self._fsdp_params = list(_fsdp_params(backend.module))
        fb, step = backend.forward_backward, backend.step

        def forward_backward(batch, loss_fn, last):
            self._enter_phase("forward", micro=self.micro + 1)

            def timed_loss(model, b):
                loss = loss_fn(model, b)
                self._enter_phase("backward")
                return loss

            try:
                return fb(batch, timed_loss, last)
            finally:
                self._enter_phase("after backward")

        def optimizer_step(lr, stats):
            self._enter_phase("optimizer step")
            try:
                return step(lr, stats)
            finally:
                self._enter_phase("after the step")
                self._close_window()

        backend.forward_backward, backend.step = forward_backward, optimizer_step
        self._close_window()  # start-up ends here

    def _enter_phase(self, phase: str, micro: int | None = None) -> None:
        self._snapshot()  # the moment before the boundary
        self.phase = phase
        if micro is not None:
            self.micro = micro
            self.module_stack.clear()
        self.backward_in = ""

    def _close_window(self) -> None:
        self._snapshot()
        self.step += 1
        self.micro = 0
        self.windows.append(StepMemory(f"step {self.step}", start_bytes=self.total))
        self.windows[-1].peak_bytes = self.total
        self._snap_total = -1

    @property
    def steps(self) -> list[StepMemory]:
        """The optimizer steps' windows (the last, open one dropped)."""
        return self.windows[1:-1]

    # -- accounting --------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional"):  # buffers a collective touches
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t := _local(t), FakeTensor):
                    self._see(t)[2] = True
        else:
            for t in tree_leaves(out):
                if isinstance(t := _local(t), FakeTensor):
                    self._see(t)
        self._maybe_peak()
        return out

    def _see(self, t: torch.Tensor) -> list:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            entry = [
                nbytes,
                self.phase,
                False,
                weakref.ref(storage, self._freed(key)),
                (tuple(t.shape), str(t.dtype).removeprefix("torch.")),
            ]
            self.live[key] = entry
            self.total += nbytes
        elif entry[0] != (nbytes := storage.nbytes()):
            self.total += nbytes - entry[0]
            entry[0] = nbytes
        return entry

    def _freed(self, key: int):
        def callback(_ref):
            entry = self.live.pop(key, None)
            if entry is not None:
                self.total -= entry[0]

        return callback

    def _resized(self, storage) -> None:
        entry = self.live.get(storage._cdata)
        if entry is not None and entry[0] != storage.nbytes():
            self.total += storage.nbytes() - entry[0]
            entry[0] = storage.nbytes()
            if self.total > entry[0] and self.phase != entry[1]:
                entry[1] = self.phase  # refilled now: FSDP2's unsharded parameters
            self._maybe_peak()

    def _maybe_peak(self) -> None:
        window = self.windows[-1]
        if self.total > window.peak_bytes:
            window.peak_bytes = self.total
            if self.total > self._snap_total * (1 + self.tolerance):
                self._snapshot(peak=True)

    def _snapshot(self, peak: bool = False) -> None:
        window = self.windows[-1]
        by, cats = self.classify()
        for cat, n in by.items():
            window.category_max[cat] = max(window.category_max.get(cat, 0), n)
        if peak or self.total >= window.peak_bytes:
            window.by_category, window.peak_at = by, self.where()
            top = heapq.nlargest(LARGEST, self.live.items(), key=lambda kv: kv[1][0])
            window.largest = [(e[0], cats[k], *e[4]) for k, e in top]
            self._snap_total = self.total

    def classify(self) -> tuple[dict[str, int], dict[int, str]]:
        """Bytes per category, and each live storage's category."""
        refs = self._references()
        by = dict.fromkeys(CATEGORIES, 0)
        cats = {}
        for key, (nbytes, phase, comm, *_) in self.live.items():
            cat = refs.get(key)
            if cat is None:
                cat = ("communication buffers" if comm else
                       "activations" if phase == "forward" else "temporaries")  # fmt: skip
            by[cat] += nbytes
            cats[key] = cat
        return by, cats

    def _references(self) -> dict[int, str]:
        """storage key -> category for what the backend holds by name (see the docstring)."""
        out: dict[int, str] = {}
        b = self.backend
        if b is None:
            return out
        optimizer = getattr(b, "optimizer", None)

        def mark(t, cat):
            if isinstance(t := _local(t), FakeTensor):
                out.setdefault(t.untyped_storage()._cdata, cat)

        own = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
        for p in own:
            mark(p, "parameters")
        unsharded = [*b.module.parameters()]
        for fp in self._fsdp_params:
            unsharded += getattr(fp, "all_gather_outputs", None) or []
            if hasattr(fp, "_unsharded_param"):
                unsharded.append(fp._unsharded_param)
        for p in unsharded:
            mark(p, "unsharded parameters")
        for p in own + unsharded:
            mark(p.grad, "gradients")
        for fp in self._fsdp_params:  # sync=per_cycle: accumulated in the reduction dtype
            mark(getattr(fp, "unsharded_accumulated_grad", None), "gradients")
        if optimizer is not None:
            for state in optimizer.state.values():
                for t in state.values():
                    mark(t, "optimizer state")
        return out

    def where(self) -> str:
        if self.phase == "start-up":
            return "start-up"
        text = f"step {self.step}"
        if self.micro:
            text += f", micro-batch {self.micro}/{self.k}"
        text += f", {self.phase}"
        module = self.module_stack[-1] if self.module_stack else self.backward_in
        if module and self.phase in ("forward", "backward"):
            text += f" ({'recomputing ' if self.phase == 'backward' and self.module_stack else ''}"
            text += f"{module or 'model'})"
        return text

    # -- module and backward location --------------------------------------------------------
    def _pre_forward(self, module, args):
        name = self._names.get(id(module))
        if name is not None:
            self.module_stack.append(name)

    def _post_forward(self, module, args, output):
        if self._names.get(id(module)) is not None and self.module_stack:
            self.module_stack.pop()

    def _pack(self, t):
        return t, self.module_stack[-1] if self.module_stack else ""

    def _unpack(self, packed):
        t, self.backward_in = packed
        return t

    def __enter__(self):
        from torch.nn.modules import module as nn_module

        s = self._exit
        s.enter_context(_resize_hook(self))
        s.callback(nn_module.register_module_forward_pre_hook(self._pre_forward).remove)
        s.callback(nn_module.register_module_forward_hook(self._post_forward).remove)
        s.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._exit.close()


def _local(t):
    """A DTensor's local tensor (its ops run inside DTensor's dispatch, below this mode)."""
    return getattr(t, "_local_tensor", t)


@contextlib.contextmanager
def _resize_hook(tracker: MemoryTracker):
    original = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = original(storage, size)
        tracker._resized(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def _fsdp_params(module: torch.nn.Module):
    """FSDP2's per-parameter records (private API, read defensively: torch 2.11-2.13)."""
    for m in module.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            yield from getattr(group, "fsdp_params", ())
