"""Count device -> host syncs on CPU: every read of a tensor's values by the host.

On CUDA each of these blocks the host until the GPU has caught up; on CPU nothing blocks, so they
are counted where they happen instead:
  - `aten._local_scalar_dense`: `.item()`, `bool(t)` (`if t.all(): ...`), `int(t)`, `float(t)`,
    from Python or C++ (a TorchDispatchMode sees every aten op);
  - ops whose output size depends on the values (`nonzero`, boolean indexing, `masked_select`,
    `unique`, `repeat_interleave` without a size): CUDA syncs to size their output;
  - `Tensor.tolist()` / `.numpy()` (on CPU no aten op runs; on CUDA they copy to the host).
`where` keeps a short stack per counted read, to say which line it was.
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_VALUE_SIZED = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                "unique_consecutive", "repeat_interleave"}  # fmt: skip


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.where: collections.Counter = collections.Counter()

    def hit(self, what: str) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-3] if "syncs.py" not in f.filename]
        here = " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[-4:][::-1])
        self.where[f"{what} at {here}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        sized = name == "repeat_interleave" and (kwargs or {}).get("output_size")
        if func is aten._local_scalar_dense.default or (name in _VALUE_SIZED and not sized):
            self.hit(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def installed(self):
        """The mode on this thread plus the host reads that run no aten op on CPU."""
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def counted(name):
            def read(tensor, *args, **kwargs):
                self.hit(name)
                return originals[name](tensor, *args, **kwargs)

            return read

        for name in originals:
            setattr(torch.Tensor, name, counted(name))
        try:
            with self:
                yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
