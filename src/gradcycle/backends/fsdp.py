"""FSDP2 (`fully_shard`) and HSDP (FSDP2 on a replicate x shard mesh).

Sharding plan (torchtitan's): the input embedding, each decoder layer, and the final norm with the
output head are units of their own, so a model with L layers has U = L + 2 units (the root holds no
parameter left); with tied embeddings the embedding, norm and head stay one root unit (U = L + 1).
Each unit all-gathers its parameters in one collective and reduce-scatters its gradients in one.
Why not one root unit for embedding and head: it would stay unsharded from its forward to the end
of every backward, with the head's gradient (which the chunked loss computes in forward) beside
it: for llama-70b with a 128k vocabulary 5.9 GiB per GPU at the peak, 17% of it (simulated,
docs/planner.md). As units of their own, the embedding is resharded after its forward and the
head unit right after its backward, which reduce-scatters the head's gradient at once.

Accumulation boundary, per `backend.sync`:
- per_micro (FSDP2's default): every micro-batch all-gathers each unit in forward, again in backward
  (except the norm + head unit, which backward needs first and keeps from its forward) and reduce-scatters
  each unit's gradient: K*(2U-1) all-gathers and K*U reduce-scatters per cycle.
- per_cycle: units keep their parameters after forward (`reshard_after_forward=False`) and after
  the backward of every non-last micro-batch (`set_reshard_after_backward(last)`), and gradients
  accumulate unsharded until the last backward (`set_requires_gradient_sync(last)`): U all-gathers
  and U reduce-scatters per cycle, paid for with unsharded parameters and gradients held through
  the cycle. The last backward always reshards: otherwise the optimizer would update the shards
  while the next step computed with the stale unsharded copies.
- hsdp additionally all-reduces each unit's reduced shard across replicas; that all-reduce runs on
  the last micro-batch only, whatever the policy (`set_requires_all_reduce(last)`): the partial sum
  lives in the sharded gradient buffer the step needs anyway, so it costs no memory.
- auto = per_micro (per_cycle costs memory), with hsdp's replica all-reduce still once per cycle.

Initialisation (docs/fsdp.md, "Start-up"): every rank builds the model on the meta device, shards
it and allocates only its own shards; then fills them in place, with no collective and no full
copy anywhere: random weights from gradcycle.weights.init (drawn per block of the full tensor
from (seed, name, block), so they equal what any other backend or world size draws), or its rows
of the pretrained safetensors files (gradcycle.weights.pretrained). Buffers outside the state dict
(rotary tables) are recomputed locally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from gradcycle import offload
from gradcycle.backends.base import SyncPlan, TorchBackend
from gradcycle.distributed import nodes_from_env
from gradcycle.model import decoder_layers
from gradcycle.telemetry import CommCounter
from gradcycle.weights import init, pretrained

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_sync(sync: str) -> str:
    """auto -> per_micro: keeping every unit unsharded through the cycle costs memory."""
    return "per_cycle" if sync == "per_cycle" else "per_micro"


def hsdp_nodes(env=None) -> int | None:
    """Nodes for hsdp's default replicate size; uneven nodes cannot hold one replica each."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        if local < 1 or world % local:
            raise ValueError(
                f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}: the hsdp "
                "default (one replica per node) needs equal nodes; set backend.replicate"
            )
    return nodes_from_env(env)


def mesh_shape(name: str, world: int, replicate: int | None, nodes: int | None) -> tuple:
    """(world,) for fsdp; (replicate, shard) for hsdp. Raises ValueError if the world cannot split.

    hsdp replicates across nodes and shards within one by default: replicate = number of nodes.
    """
    if name == "fsdp":
        return (world,)
    groups = replicate if replicate is not None else (nodes or 1)
    if groups < 1 or world % groups:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        field = (
            f"backend.replicate={replicate}"
            if replicate is not None
            else f"the node count {nodes} (backend.replicate=null)"
        )
        raise ValueError(
            f"backend=hsdp cannot split world size {world} into {field} replica groups x shards: "
            f"the replicate size must divide the world size; use backend.replicate="
            f"{' or '.join(map(str, divisors))}"
        )
    return (groups, world // groups)


def mp_policy(precision: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    """bf16: compute with bf16 copies of the fp32 shards, reduce gradients in `reduce_dtype`."""
    param = torch.bfloat16 if precision == "bf16" else None
    reduce = _DTYPES[reduce_dtype]
    if reduce == (param or torch.float32):
        reduce = None  # the parameters' own dtype: nothing to cast
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def shard_model(module: nn.Module, mesh, mp: MixedPrecisionPolicy, per_cycle: bool,
                off: OffloadPolicy | None = None) -> list:  # fmt: skip
    """Apply the sharding plan in place, bottom-up. Returns the units that hold parameters, in
    forward order (embedding, layers, norm + head; tied: layers, root).

    Works on a meta-device model: nothing is allocated, so the plan of a 70B model is cheap.
    """
    reshard = False if per_cycle else None  # None: FSDP2's default (True, root False)
    kw = {"mesh": mesh, "mp_policy": mp, "offload_policy": off or OffloadPolicy()}
    embed, head = _embeddings(module)
    norm = getattr(getattr(module, "base_model", None), "norm", None)
    apart = embed is not None and head is not None and head.weight is not embed.weight
    units = []
    if apart:
        fully_shard(embed, reshard_after_forward=reshard, **kw)
        units.append(embed)
    for layer in decoder_layers(module):
        fully_shard(layer, reshard_after_forward=reshard, **kw)
        units.append(layer)
    if apart:
        # Backward starts here: kept from its forward (no re-gather), resharded after backward.
        fully_shard([m for m in (norm, head) if m is not None], reshard_after_forward=False,
                    **kw)  # fmt: skip
        units.append(head)
    fully_shard(module, reshard_after_forward=reshard, **kw)
    if any(True for _ in _own_parameters(module)):
        units.append(module)
    return units


def _embeddings(module: nn.Module) -> tuple:
    """(input, output) embeddings of a language model; (None, None) for an image model, whose
    transformers class raises instead of returning None."""
    try:
        return module.get_input_embeddings(), module.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def _own_parameters(module: nn.Module):
    """Parameters no FSDP unit below `module` has taken: what the root itself shards."""
    taken = {id(p) for m in module.modules() if m is not module and isinstance(m, FSDPModule)
             for p in m.parameters()}  # fmt: skip
    return (p for p in module.parameters() if id(p) not in taken)


def _init_single_process_group(device: torch.device) -> bool:
    """A device mesh needs a process group; world-1 runs do not create one (trainer)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


@torch.no_grad()
def materialise(module: nn.Module, model_cfg, seed: int, device: torch.device) -> int:
    """Allocate the shards of a meta-device sharded `module` and fill them on this rank alone.
    Returns the bytes read from pretrained files (0 for a random init)."""
    module.to_empty(device=device)
    read = 0
    if model_cfg.pretrained:
        read = pretrained.load_into(module, pretrained.local_dir(model_cfg))
    else:
        init.init_parameters(module, seed)
    init.recompute_buffers(module)
    return read


class FSDPBackend(TorchBackend):
    def __init__(self, cfg, make_model, device: torch.device, world: int):
        bc = cfg.backend
        self.name = bc.name
        self.sync = resolve_sync(bc.sync)
        # Before anything collective: a world the mesh cannot split fails the same way on all ranks.
        nodes = hsdp_nodes() if self.name == "hsdp" and bc.replicate is None else None
        self.shape = mesh_shape(self.name, world, bc.replicate, nodes)
        self._owns_group = _init_single_process_group(device)
        names = ("shard",) if self.name == "fsdp" else ("replicate", "shard")
        # The mesh is host bookkeeping (rank tables): real tensors even under gradcycle.sim's
        # FakeTensorMode, where it would otherwise have no values to find this rank in.
        with unset_fake_temporarily():
            self.mesh = init_device_mesh(device.type, self.shape, mesh_dim_names=names)
        self.mp = mp_policy(cfg.precision, bc.reduce_dtype)
        # backend.offload_param: CPUOffloadPolicy, shards and gradients in (pinned) host memory
        # and the optimizer step on the host; the shards are then allocated there
        off = CPUOffloadPolicy(pin_memory=device.type == "cuda") if bc.offload_param else None
        offload.before_build(cfg, device)
        module = make_model("meta")
        self.units = shard_model(module, self.mesh, self.mp, self.sync == "per_cycle", off)
        self.layers = list(decoder_layers(module))
        with CommCounter.instance().suspended():  # start-up traffic is not a training step's
            home = torch.device("cpu") if off else device
            self.bytes_read = materialise(module, cfg.model, cfg.seed, home)
        if bc.compile:
            # After fully_shard, so FSDP's hooks stay outside the compiled regions.
            for layer in self.layers:
                layer.compile()
        super().__init__(cfg, module, module, device, world)
        offload.after_build(cfg, self.optimizer)

    def _params_in_low_precision(self) -> bool:
        return self.mp.param_dtype is not None  # FSDP2 casts; autocast would be redundant

    def _before_backward(self, last: bool) -> None:
        root: FSDPModule = self.model  # type: ignore[assignment]
        if self.sync == "per_cycle":
            root.set_requires_gradient_sync(last)  # hsdp: the replica all-reduce too
            # True on the last micro-batch, always: the step must see resharded parameters.
            root.set_reshard_after_backward(last)
        elif self.name == "hsdp":
            root.set_requires_all_reduce(last)

    @torch.no_grad()
    def eval_loss(self, batch: dict, loss_fn) -> torch.Tensor:
        loss = super().eval_loss(batch, loss_fn)
        # A no-grad forward keeps what reshard_after_forward=False units (per_cycle; the root
        # always) gathered: free it, so the next cycle starts sharded, as after a step.
        for unit in [*self.units, self.model]:
            unit.reshard()
        return loss

    def sync_plan(self, k: int) -> SyncPlan:
        u = len(self.units)
        shard = self.shape[-1]
        n_params = sum(p.numel() for p in self.module.parameters())
        p_dtype = self.mp.param_dtype or torch.float32
        # Unsharded gradients accumulate in the reduction dtype (FSDP2 upcasts them to it).
        p_bytes, g_bytes = p_dtype.itemsize, (self.mp.reduce_dtype or p_dtype).itemsize
        rows = []
        in_dtype = f", in {'fp32' if g_bytes == 4 else 'bf16'} (backend.reduce_dtype)"
        if shard > 1:
            if self.sync == "per_cycle":
                rows.append(("parameter all-gather", f"{u}x per cycle (once per unit)"))
                rows.append(
                    ("gradient reduce-scatter", f"{u}x per cycle (once per unit){in_dtype}")
                )
            else:
                rows.append(("parameter all-gather",
                             f"{k * (2 * u - 1)}x per cycle (K x (2U-1), U={u} units)"))  # fmt: skip
                rows.append(("gradient reduce-scatter", f"{k * u}x per cycle (K x U){in_dtype}"))
        if self.name == "hsdp":
            alone = " (a group of one: no traffic)" if self.shape[0] == 1 else ""
            rows.append(("cross-replica gradient all-reduce", f"{u}x per cycle{alone}{in_dtype}"))
        if not rows:
            rows.append(("(world of one: no collectives)", "0"))
        extra = "none (at most a unit or two unsharded at a time)"
        if self.sync == "per_cycle" and shard > 1:
            held = n_params * (p_bytes + g_bytes)
            size = f"{held / 2**30:.2f} GiB" if held >= 2**30 else f"{held / 2**20:.2f} MiB"
            extra = (
                f"{size} per rank: unsharded parameters ({p_bytes} B/param) and "
                f"unsharded gradients ({g_bytes} B/param) of all {n_params / 1e6:.1f}M parameters"
            )
        note = f"mesh {'x'.join(map(str, self.shape))}"
        if self.name == "hsdp":
            note += " (replicate x shard); the replica all-reduce runs on the last micro-batch only"
        return SyncPlan(policy=self.sync, rows=rows, extra_memory=extra, note=note)

    def close(self, failing: bool = False) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
