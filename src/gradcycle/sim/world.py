"""The fake world: rank r of a W-rank job in this process, at the real sizes, no FLOP, no byte.

- `distributed.simulated(env)`: the bootstrap itself plays rank r (read_env, the fake process
  group of torch.testing._internal.distributed.fake_pg): every collective is issued with its
  real shapes and counted by telemetry.CommCounter; none moves data;
- `SimTensorMode` (FakeTensorMode): every tensor the model, the backend and the optimizer make
  has its shape, dtype and a meta storage, none has values or memory. Ops on real tensors only
  (the loader's token ids, position ids and labels, the trainer's scalars) run for real: the
  model's data-dependent decisions (transformers asks whether the position ids restart, i.e. a
  packed row that needs a mask, and so which attention kernel runs) see the real data. The few
  values the host asks of fake tensors (`.item()`, `.tolist()`: the step's one host sync, a loss
  scaler's overflow flag) read 0: loss and grad norm 0.0 (finite, so the optimizer step runs),
  no stop signal voted, no overflow;
- attention runs the target's kernel (gradcycle.sim.attention);
- what only real ranks can do is skipped (`REPLACED`): DDP's check that every rank holds the
  same parameter shapes and its start-up broadcast of rank 0's weights (C++ routines that read
  tensor data, which fake tensors have not; every rank builds the same model anyway); DDP's
  all-reduce comm hook runs the same all-reduce but does not wait on the fake group's future,
  which carries no value; fp32 DDP, whose C++ reducer would wait on that future itself, gets
  that hook too (`valueless_reducer`), so its all-reduces are counted as the 16-bit hook's are.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves

from gradcycle import distributed
from gradcycle.sim.attention import TargetAttention

_SCALAR = torch.ops.aten._local_scalar_dense.default


class SimTensorMode(FakeTensorMode):
    """FakeTensorMode in which ops on real tensors alone stay real, and fake values read 0."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # Factories (no tensor input) are fake: parameters, buffers, activations, gradients.
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is _SCALAR:
            (t,) = args
            if isinstance(t, FakeTensor):
                if t.constant is not None:
                    return t.constant.item()
                return False if t.dtype == torch.bool else 0 if not t.is_floating_point() else 0.0
            with unset_fake_temporarily():
                return t.item()
        return super().__torch_dispatch__(func, types, args, kwargs)


def rank_env(rank: int, nodes: int, gpus_per_node: int) -> distributed.DistEnv:
    world = nodes * gpus_per_node
    return distributed.DistEnv(rank=rank, local_rank=rank % gpus_per_node, world_size=world,
                               master_addr="127.0.0.1", master_port="29500",
                               launcher="simulate", local_world_size=gpus_per_node)  # fmt: skip


def _skip(*args, **kwargs):
    return None


def _allreduce_fut(process_group, tensor):
    """DDP's comm hook (default_hooks.allreduce_hook) over the fake group, whose futures carry
    no value: the same all-reduce, then a future that holds the bucket itself."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    tensor.div_(group.size())
    dist.all_reduce(tensor, group=group)
    fut = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def _allreduce_hook(process_group, bucket):
    return _allreduce_fut(process_group, bucket.buffer())


def valueless_reducer(backend) -> None:
    """fp32 DDP all-reduces in its C++ reducer, which needs the fake group's future to hold the
    reduced bucket: run the same all-reduce through the Python hook (counted by CommCounter)
    instead of recording it from the bucket layout (`Buckets`, which reads storage addresses)."""
    if getattr(backend, "buckets", None) is not None:
        backend.model.register_comm_hook(None, _allreduce_hook)
        backend.buckets = None


REPLACED = (  # (module, function, what runs instead inside the fake world)
    ("torch.nn.parallel.distributed", "_verify_param_shape_across_processes", _skip),
    ("torch.nn.parallel.distributed", "_sync_module_states", _skip),
    ("torch.distributed.algorithms.ddp_comm_hooks.default_hooks", "_allreduce_fut",
     _allreduce_fut),
    # DDP re-buckets once, after the first backward, by syncing bucket indices from rank 0 (in
    # C++, through tensor data): the buckets keep their first layout, the same bytes in total.
    ("torch._C._distributed_c10d", "Reducer._rebuild_buckets", lambda self: False),
)  # fmt: skip


@contextlib.contextmanager
def _replaced():
    import importlib

    saved = []
    for module_name, path, replacement in REPLACED:
        module = importlib.import_module(module_name)
        *owner, name = path.split(".")
        for part in owner:
            module = getattr(module, part)
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def fake_world(env: distributed.DistEnv, hardware: str):
    """Everything inside runs as rank env.rank on fake tensors. Yields the attention patch
    (its `seen` says which kernels ran)."""
    attention = TargetAttention(hardware)
    with distributed.simulated(env), _replaced(), SimTensorMode(), \
            attention.installed():  # fmt: skip
        yield attention
