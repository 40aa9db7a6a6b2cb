"""Pipeline parallelism (`backend.pp` > 1): the cycle's K micro-batches ARE the pipeline's.

The world is a (pp, dp) mesh, pp outermost: rank = pp_rank * dp + dp_rank. Each rank holds
`backend.pp_virtual` (v) stages of the decoder (stage ids pp_rank + c*pp, the looped placement;
under the V schedules zbv / dualpipev stages r and 2p-1-r), the first stage also the embedding,
the last also the final norm and the output head. One
`run_cycle` is one step of a `torch.distributed.pipelining` schedule over all K micro-batches.

Exactness (the same contract as every backend): the last stage computes the trainer's own loss
(summed token CE / N, N = targets of the whole cycle on all data-parallel replicas, the chunked
loss included), the schedule's `scale_grads` is off (its default divides by K: an error of
1 - 1/K), and the data-parallel replicas of a stage SUM their gradients once per cycle (one
flat all-reduce), so pp x dp ranks give the gradient of one big batch.

Names are unchanged: the stage is the Hugging Face model itself with the layers it does not own
replaced by parameterless placeholders (same ModuleList indices) and the embedding / norm / head
set to None where not owned, so state-dict keys are the pp=1 model's and seeded init draws the
same weights (gradcycle.weights.init draws by name).

Across the dp replicas of a stage: backend=ddp sums its gradients in one flat all-reduce per
cycle; backend=fsdp shards it (FSDP2 unit per layer, the stage's rest its root), and the stage
reduce-scatters once per step whatever K (PipelineStage turns gradient sync off per micro-batch);
backend=hsdp likewise on a (pp, replicate, shard) mesh.

Supported: Llama-family decoders (embed_tokens / layers / norm / rotary_emb / lm_head), tied or
untied embeddings (tied, looped placement: the first and last stage each hold the weight; its
gradient is summed between them once per cycle and counted once in the norm; V placement: rank 0
holds both stages and one shared parameter), schedules gpipe | 1f1b | interleaved_1f1b |
looped_bfs | interleaved_zb | zbv | dualpipev (the last three zero bubble: loss.impl=full).
Refused with a message: zero*, the chunked loss under a zero-bubble schedule (its separate
weight-gradient pass re-enters the loss, whose gradients are made in forward), tied embeddings
under a V schedule with fsdp/hsdp, fp16, document masking.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.distributed as dist
from torch import nn

from gradcycle.backends.base import SyncPlan, TorchBackend
from gradcycle.backends.pipeline_checks import SCHEDULES
from gradcycle.backends.pipeline_clock import ComputeClock
from gradcycle.data import IGNORE_INDEX
from gradcycle.model import decoder_layers
from gradcycle.planner.pipeline import V_SHAPED, rank_crossings, rank_stages, stage_owner


def data_parallel(pp: int, rank: int, world: int) -> tuple[int, int]:
    """(dp_rank, dp_size): the ranks of one pipeline read the same data."""
    dp = world // pp
    return rank % dp, dp


def stage_layers(n_layers: int, stages: int, stage: int) -> range:
    per = n_layers // stages
    return range(stage * per, (stage + 1) * per)


REPLICAS = ("replicate", "shard")  # hsdp's mesh dimensions inside one stage


class _Absent(nn.Module):
    """A layer another stage owns: no parameters, so the owned layers keep their indices."""


_LLAMA_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def prune(model: nn.Module, owned: list[int], first: bool, last: bool) -> None:
    """Keep only this rank's layers (and the embedding / norm / head if it owns them), in place.
    Tied embeddings: the last stage keeps the embedding module too, the head's weight under its
    pp=1 name (model.embed_tokens.weight), so init, checkpoints and export see one tensor."""
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, p) for p in _LLAMA_PARTS):
        raise ValueError(
            f"backend.pp > 1 splits Llama-family decoders (model.embed_tokens, model.layers, "
            f"model.norm, model.rotary_emb); {type(model).__name__} is not one: use backend.pp=1"
        )
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings): "
                         "backend.pp > 1 needs one on the last stage; use backend.pp=1")  # fmt: skip
    layers = decoder_layers(model)
    for i in range(len(layers)):
        if i not in owned:
            layers[i] = _Absent()
    if not first and not (last and tied(model)):
        base.embed_tokens = None
    if not last:
        base.norm = None
        model.lm_head = None


class _Head(nn.Module):
    """What the trainer's loss_fn(model, batch) calls on the last stage: the output head over the
    final hidden states, answering like the HF model (`.loss` with loss_targets, else `.logits`).
    Not registered anywhere: the head is the stage's own module."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.__dict__["head"] = head
        self._gradcycle_loss = True  # loss.attach(): already set up (the head is patched)

    def forward(self, hidden_states, loss_targets=None, loss_impl="chunked", loss_chunk_tokens=0):
        if loss_targets is None:
            return types.SimpleNamespace(logits=self.head(hidden_states))
        loss = self.head(hidden_states, loss_targets=loss_targets, impl=loss_impl,
                         chunk_tokens=loss_chunk_tokens)  # fmt: skip
        return types.SimpleNamespace(loss=loss)


class StageModule(nn.Module):
    """One pipeline stage: its layers of the rank's (pruned) HF model, run in order. Registers
    only its own modules, so `parameters()` are the stage's (what PipelineStage reduces)."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool,
                 embed_elsewhere: bool = True):  # fmt: skip
        super().__init__()
        base = model.model
        self.__dict__["config"] = model.config
        self.rotary = base.rotary_emb
        self.embed = base.embed_tokens if first else None
        # tied, last stage only, where no stage of this rank embeds: registered so FSDP shards
        # the embedding's reference to the head's weight as well (the forward does not use it)
        mirror = last and not first and tied(model) and embed_elsewhere
        self.tied_embed = base.embed_tokens if mirror else None
        self.layers = nn.ModuleList([decoder_layers(model)[i] for i in layers])
        self.norm = base.norm if last else None
        self.lm_head = model.lm_head if last else None  # registered: a stage parameter
        self.__dict__["head"] = _Head(model.lm_head) if last else None  # the loss's view of it
        self.loss_fn = None  # the trainer's, set per cycle (its N changes)

    def forward(self, x, position_ids, labels):
        from transformers.masking_utils import create_causal_mask

        h = self.embed(x) if self.embed is not None else x
        rotary = self.rotary(h, position_ids=position_ids)
        # positional: the cache argument was renamed across transformers versions
        mask = create_causal_mask(self.config, h, None, None, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
        if self.norm is None:
            return h
        batch = {"hidden_states": self.norm(h), "labels": labels}
        # (1,), not 0-dim: the schedule may concatenate the K outputs
        return self.loss_fn(self.head, batch).reshape(1)


def _pad(batch: dict, seq_len: int) -> dict:
    """Pad a micro-batch to data.seq_len: receive buffers are sized by the first step (a causal
    model: padding after the real tokens changes none of their outputs; labels ignore it)."""
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0}
    n = seq_len - batch["input_ids"].shape[1]
    if set(batch) != set(fill):
        raise AssertionError(f"pipeline batch keys {sorted(batch)}")  # document_mask refused
    return {k: torch.nn.functional.pad(v, (0, n), value=fill[k]) for k, v in batch.items()}


class PipelineBackend(TorchBackend):
    name = "ddp"
    grads_to_none = True

    def __init__(self, cfg, make_model, device: torch.device, world: int):
        from torch.distributed import pipelining
        from torch.distributed.device_mesh import init_device_mesh

        from gradcycle.backends.fsdp import materialise
        from gradcycle.telemetry import CommCounter

        b = cfg.backend
        self.sync, self.pp, self.v, self.seq_len = "per_cycle", b.pp, b.pp_virtual, cfg.data.seq_len
        self.dp = world // self.pp
        self.fsdp, self.name = b.name in ("fsdp", "hsdp"), b.name
        if b.name == "hsdp":  # (pp, replicate, shard): FSDP2's HSDP over each stage's replicas
            from gradcycle.backends.fsdp import hsdp_nodes, mesh_shape

            nodes = hsdp_nodes() if b.replicate is None else None
            shape, names = (self.pp, *mesh_shape("hsdp", self.dp, b.replicate, nodes)), REPLICAS
            self.mesh = init_device_mesh(device.type, shape, mesh_dim_names=("pp", *names))
            self.dp_mesh, self.dp_group = self.mesh[names], None
        else:
            self.mesh = init_device_mesh(
                device.type, (self.pp, self.dp), mesh_dim_names=("pp", "dp")
            )
            self.dp_mesh, self.dp_group = self.mesh["dp"], self.mesh.get_group("dp")
        self.pp_group = self.mesh.get_group("pp")
        self.pp_rank = dist.get_rank() // self.dp
        n_stages = self.pp * self.v
        self.schedule_name = b.pp_schedule
        self.stage_ids = rank_stages(self.pp, self.v, self.pp_rank, b.pp_schedule)
        self._whole = make_model("meta")  # shapes only (checkpoint metadata): nothing allocated
        module = make_model("meta")
        n_layers = len(decoder_layers(module))
        if n_layers % n_stages:
            raise ValueError(f"{n_layers} decoder layers do not split into {n_stages} equal "
                             "stages: choose backend.pp x backend.pp_virtual dividing them")  # fmt: skip
        spans = {s: stage_layers(n_layers, n_stages, s) for s in self.stage_ids}
        owned = [i for s in self.stage_ids for i in spans[s]]
        prune(module, owned, 0 in self.stage_ids, n_stages - 1 in self.stage_ids)
        self.stages = [StageModule(module, spans[s], s == 0, s == n_stages - 1,
                                   embed_elsewhere=0 not in self.stage_ids)
                       for s in self.stage_ids]  # fmt: skip
        if self.fsdp:  # on meta: each layer a unit over the dp ranks, each stage's rest a root
            from torch.distributed.fsdp import fully_shard

            from gradcycle.backends.fsdp import mp_policy

            self.mp = mp_policy(cfg.precision, b.reduce_dtype)
            for stage in self.stages:
                for layer in stage.layers:
                    fully_shard(layer, mesh=self.dp_mesh, mp_policy=self.mp)
                fully_shard(stage, mesh=self.dp_mesh, mp_policy=self.mp)
        with CommCounter.instance().suspended():
            materialise(module, cfg.model, cfg.seed, device)  # this rank's weights, by name
        if tied(module) and module.lm_head is not None and module.model.embed_tokens is not None:
            module.lm_head.weight = module.model.embed_tokens.weight  # to_empty splits a tie
        self._tied_group = self._tied_stages_group(module)
        self.pipe = [pipelining.PipelineStage(m, s, n_stages, device, group=self.pp_group)
                     for m, s in zip(self.stages, self.stage_ids, strict=True)]  # fmt: skip
        self.clock = ComputeClock(device)  # the measured bubble (metrics: pp_bubble_measured)
        for stage in self.pipe:
            self.clock.wrap(stage)
        self._schedule_cls = getattr(pipelining, SCHEDULES[b.pp_schedule], None)
        if self._schedule_cls is None:
            raise ValueError(f"backend.pp_schedule={b.pp_schedule}: this torch "
                             f"({torch.__version__}) has no pipelining.{SCHEDULES[b.pp_schedule]}; "
                             "choose another schedule or a newer torch")  # fmt: skip
        self._schedules: dict[int, object] = {}  # by K (a schedule is built for one K)
        self.has_first = 0 in self.stage_ids
        # FSDP averages gradients over the dp ranks; the loss is already normalised by the
        # whole cycle's N, so its backward is scaled back into a sum (and the logged loss not).
        self.loss_scale = float(self.dp) if self.fsdp else 1.0
        super().__init__(cfg, module, module, device, world)

    def _tied_stages_group(self, module: nn.Module):
        """Tied embeddings: the first and the last stage of each data-parallel slice each hold the
        weight (Megatron's embedding group); its gradient is summed over the two once per cycle.
        Returns this rank's group, or None where it holds no tied weight (or, V placement, holds
        both stages: one shared parameter, its two gradients accumulate in place)."""
        if not tied(module) or self.schedule_name in V_SHAPED:
            return None
        mine = None
        for d in range(self.dp):  # every rank creates every group, in the same order
            pair = [d, (self.pp - 1) * self.dp + d]  # pp ranks 0 and pp-1 (looped placement)
            group = dist.new_group(pair)
            mine = group if dist.get_rank() in pair else mine
        return mine

    def _tied_weight(self):
        embed = self.module.model.embed_tokens
        return None if self._tied_group is None or embed is None else embed.weight

    def _schedule(self, k: int):
        if k not in self._schedules:
            one = self._schedule_cls.__name__ in ("ScheduleGPipe", "Schedule1F1B")
            self._schedules[k] = self._schedule_cls(
                self.pipe[0] if one else self.pipe, n_microbatches=k,
                loss_fn=lambda out, _target: out.sum() * self.loss_scale, scale_grads=False,
            )  # fmt: skip
        return self._schedules[k]

    def run_cycle(self, micro_batches, loss_fn, at_micro=None) -> torch.Tensor:
        # A schedule interleaves all K micro-batches (stage 0 starts micro-batch k+1 while the
        # others work on k), so it needs them up front: the streamed loader's K are taken here.
        regions, batches = [], []
        for k, batch in enumerate(micro_batches):
            regions.append(at_micro(k) if at_micro is not None else contextlib.nullcontext())
            batches.append(_pad(batch, self.seq_len))
        whole = {key: torch.cat([mb[key] for mb in batches]) for key in batches[0]}
        for stage in self.stages:
            stage.loss_fn = loss_fn
        losses: list = []
        args = (whole["input_ids"],) if self.has_first else ()
        with regions[0], self._autocast():
            self.clock.around_step(
                self._schedule(len(batches)).step,
                *args, target=whole["labels"], losses=losses,
                position_ids=whole["position_ids"], labels=whole["labels"],
            )  # fmt: skip
        self._reduce_data_parallel()
        tied_weight = self._tied_weight()
        if tied_weight is not None:
            grad = tied_weight.grad
            dist.all_reduce(getattr(grad, "_local_tensor", grad), group=self._tied_group)
        if not losses:  # not the last stage: its loss is counted where it is computed
            return torch.zeros((), device=self.device)
        return torch.stack([x.detach().reshape(()) for x in losses]).sum() / self.loss_scale

    def cycle_metrics(self) -> dict:
        return self.clock.take()

    def _reduce_data_parallel(self) -> None:
        """SUM (the loss is already normalised by the whole cycle's N) across replicas, once."""
        if self.dp == 1 or self.fsdp:  # FSDP: reduce-scattered by the stage, once per step
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _clip(self, max_norm: float) -> torch.Tensor:
        """The norm over all stages (each parameter lives on one stage; replicas are equal)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        # a tied weight lives on the first and the last stage: counted once, on the first
        twice = self._tied_weight() if not self.has_first else None
        counted = [p.grad for p in params if p is not twice]
        local = torch.nn.utils.get_total_norm(counted) if counted else None
        if hasattr(local, "full_tensor"):  # FSDP shards: the norm over the dp ranks
            local = local.full_tensor()
        sq = (local.double() ** 2) if local is not None else torch.zeros((), dtype=torch.float64)
        sq = sq.to(self.device).reshape(1)
        dist.all_reduce(sq, group=self.pp_group)
        norm = sq.sqrt().reshape(())
        if max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.float())
        return norm

    @torch.no_grad()
    def eval_loss(self, batch: dict, loss_fn) -> torch.Tensor:
        """Forward only, stage by stage in order (point-to-point over the pp group)."""
        batch = _pad({k: v.to(self.device) for k, v in batch.items()}, self.seq_len)
        h, loss = None, torch.zeros((), device=self.device)
        ranks = dist.get_process_group_ranks(self.pp_group)
        n_stages = self.pp * self.v
        shape = (*batch["input_ids"].shape, self.module.config.hidden_size)
        owners = [stage_owner(self.pp, self.v, s, self.schedule_name) for s in range(n_stages)]
        for s in range(n_stages):
            owner, nxt = owners[s], owners[(s + 1) % n_stages]
            if owner == self.pp_rank:
                stage = self.stages[self.stage_ids.index(s)]
                stage.loss_fn = loss_fn
                with self._autocast():
                    out = stage(batch["input_ids"] if s == 0 else h, batch["position_ids"],
                                batch["labels"])  # fmt: skip
                if s == n_stages - 1:
                    loss = out.reshape(())
                elif nxt != owner:
                    dist.send(out.float().contiguous(), ranks[nxt], group=self.pp_group)
                else:
                    h = out
            elif nxt == self.pp_rank and s < n_stages - 1:
                h = torch.empty(shape, dtype=torch.float32, device=self.device)
                dist.recv(h, ranks[owner], group=self.pp_group)
        if self.fsdp:  # a no-grad forward keeps the roots gathered: start the next cycle sharded
            for stage in self.stages:
                for unit in (*stage.layers, stage):
                    unit.reshard()
        return loss

    def _params_in_low_precision(self) -> bool:
        return self.fsdp and self.mp.param_dtype is not None  # FSDP2 casts: no autocast

    def whole_model(self) -> nn.Module:
        return self._whole

    def full_state_dict(self) -> dict | None:
        """Every stage's tensors merged on rank 0 (names are unique across stages)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full tensors on every rank (FSDP: gathered over dp), then every stage's to rank 0
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        local = {k: v.detach().cpu() for k, v in sd.items()}
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, parts, dst=0)
        if parts is None:
            return None
        return {k: v for part in parts for k, v in part.items()}

    def sync_plan(self, k: int) -> SyncPlan:
        bubble = (self.pp - 1) / (self.v * k + self.pp - 1)
        crossings = rank_crossings(self.pp, self.v, self.schedule_name)
        rows = [("pipeline schedule", f"{self.cfg.backend.pp_schedule}, {self.pp} stages x "
                 f"{self.v} per rank, K={k} micro-batches, bubble {bubble:.1%}"),
                ("activations sent per micro-batch", f"{crossings} stage boundaries "
                 "between ranks")]  # fmt: skip
        if self.dp > 1 and self.fsdp:
            units = sum(len(st.layers) + 1 for st in self.stages)
            rows.append(("gradient reduce-scatter", f"{units}x per cycle (once per unit)"))
            rows.append(("parameter all-gather", "per micro-batch and unit (FSDP2's default)"))
        elif self.dp > 1:
            rows.append(("gradient all-reduce (flat, per stage)", "1x per cycle across dp"))
        rows.append(("grad-norm all-reduce across stages", "1x per cycle"))
        from gradcycle.planner.pipeline import in_flight

        schedule = self.cfg.backend.pp_schedule
        held = in_flight(schedule, self.pp, k, self.pp_rank, self.v)
        extra = (f"stage {self.pp_rank} holds {held} micro-batch x stage activations at its peak "
                 f"({schedule}; planner/pipeline.py)")  # fmt: skip
        return SyncPlan(policy="per_cycle", rows=rows, extra_memory=extra,
                        note=f"mesh pp={self.pp} x dp={self.dp}")  # fmt: skip
