"""DeepSpeed ZeRO-1/2/3.

Accumulation boundary: the engine runs with gradient_accumulation_steps = K and the trainer states
the boundary itself (`set_gradient_accumulation_boundary(last)` before each backward, `step()` once
per cycle), so DeepSpeed's micro-step counter never decides anything. Sync policy:
  - zero1: gradients are reduced at the boundary only (DeepSpeed's native stage-1 behaviour);
  - zero2/zero3 per_micro: DeepSpeed's bucketed reduction after every micro-batch's backward;
  - zero2/zero3 per_cycle: `engine.coalesce_grad_reduction()` around the whole cycle: every
    backward leaves a full local gradient, one reduction pass runs when the block exits.
ZeRO-3 all-gathers parameters for every micro-batch's forward and backward whatever the policy.

Normalisation: the trainer's loss is sum-CE / N with N the target tokens of the whole cycle on all
ranks. DeepSpeed averages gradients over ranks and (by default) divides the loss by K, so the loss
is multiplied by the world size and backward runs with `scale_wrt_gas=False`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gradcycle.backends.base import Backend, StepResult, SyncPlan, build_optimizer
from gradcycle.backends.ds_config import (
    build_ds_config,
    grad_accum_dtype,
    pin_accelerator,
    resolve_sync,
    zero_stage,
)
from gradcycle.batching import plan_from_config
from gradcycle.model import count_params
from gradcycle.telemetry import CommCounter

CKPT_TAG = "zero"  # save_state(path) writes path/zero/* (+ DeepSpeed's zero_to_fp32.py)


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with its accelerator pinned to our device, without JIT-building ops."""
    pin_accelerator(device.type)  # before DeepSpeed's modules read the accelerator
    import deepspeed
    import deepspeed.ops

    # An inference-only shared-memory op that every CPU start would JIT-compile (~30 s, and a
    # crash where no compiler works); training never uses it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _holding(errors: list, obj, name: str):
    """Within the block, `obj.name(...)` records an exception in `errors` instead of raising."""
    original = getattr(obj, name, None)
    if original is None:  # another DeepSpeed version: nothing to wrap
        yield
        return

    def call(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as e:
            errors.append(e)

    own = name in vars(obj)  # an instance attribute (else the class's method)
    setattr(obj, name, call)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def ensure_process_group(deepspeed, device: torch.device, timeout_s: int) -> None:
    """The trainer owns the group on >1 rank; DeepSpeed needs one even on a single process."""
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):  # fmt: skip
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=timeout_s),
    )


class DeepSpeedBackend(Backend):
    def __init__(self, cfg, make_model, device: torch.device, world: int, run_dir: Path):
        self.cfg, self.device, self.world = cfg, device, world
        self.name = cfg.backend.name
        self.stage = zero_stage(cfg.backend)
        self.sync = resolve_sync(cfg.backend)
        self.comm = CommCounter.instance()
        deepspeed = import_deepspeed(device)
        ensure_process_group(deepspeed, device, cfg.backend.dist_timeout_s)
        plan = plan_from_config(cfg, world)
        self.ds_config = build_ds_config(cfg, plan, on_gpu=device.type == "cuda")
        self.rank = dist.get_rank()
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")

        self._hf_ds_config = None
        # Parameters are built in the dtype the engine keeps them in (bf16/fp16 under those
        # precisions; the fp32 masters live in the optimizer's partitions): no fp32 full copy.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
        if self.stage == 3:
            # transformers builds the model under deepspeed.zero.Init (parameters partitioned as
            # they are created); build_model then fills each rank's partitions in place. The
            # object is held only by a weak reference inside transformers: keep it alive.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        try:
            # zero1/2: allocated and drawn on the device (the engine's own .to() is then a no-op);
            # zero3: zero.Init places the partitions.
            module = make_model("cpu" if self.stage == 3 else device, dtype=dtype)
            self.module = module
            self.optimizer = build_optimizer(module.parameters(), cfg.optim, cfg.optim.lr)
            self.engine, *_ = deepspeed.initialize(
                model=module, optimizer=self.optimizer, config=self.ds_config
            )
        except BaseException:
            # Later models in this process (tests, the OOM retry) must not build under zero.Init.
            self._forget_hf_ds_config()
            raise
        self.model = self.engine
        if self.stage > 1 and self.sync == "per_cycle":
            self._check_coalescing()
        self.loss_factor = float(dist.get_world_size())
        # Initial parameter broadcasts are not any optimizer step's collectives.
        self.comm.take()

    def _check_coalescing(self) -> None:
        # DeepSpeed 0.19 selects its BF16/FP16_Optimizer wrappers (which cannot coalesce) only
        # for ZeRO-1 or no ZeRO; this keeps the error readable should a version change that.
        wrapper = type(self.engine.optimizer).__name__
        if not hasattr(self.engine.optimizer, "_coalesce_grad_reduction"):
            raise ValueError(
                f"backend.sync=per_cycle with backend={self.name} and precision="
                f"{self.cfg.precision}: DeepSpeed chose its {wrapper} optimizer wrapper, which "
                "cannot coalesce gradient reduction; use backend.sync=per_micro"
            )

    # -- the cycle ---------------------------------------------------------------------------
    def cycle(self):
        if self.stage > 1 and self.sync == "per_cycle":
            return self.engine.coalesce_grad_reduction()
        return contextlib.nullcontext()

    def forward_backward(self, batch: dict, loss_fn, last: bool) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # The boundary tells ZeRO-1 when to reduce and ZeRO-2/3 when the gradient is complete.
        self.engine.set_gradient_accumulation_boundary(last)
        loss = loss_fn(self.engine, batch)
        self.engine.backward(loss * self.loss_factor, scale_wrt_gas=False)
        return loss.detach()

    def step(self, lr: float, stats: torch.Tensor) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # coalesce_grad_reduction restores the boundary it found on entry: state it again.
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clips to gradient_clipping; skips the update on a non-finite norm
        skipped = not self.engine.was_step_applied()  # a host flag: no device sync
        # ZeRO-3 leaves the previous step's norm in place when it skips one.
        norm = float("inf") if skipped else self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, device=stats.device)
        fetched = torch.cat([norm.detach().reshape(1).double(), stats.double()]).tolist()
        return StepResult(grad_norm=fetched[0], skipped=skipped, stats=fetched[1:])

    @torch.no_grad()
    def eval_loss(self, batch: dict, loss_fn) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # ZeRO-3 gathers parameters here too; they belong to evaluation, not to a step's record.
        with self.comm.suspended():
            return loss_fn(self.engine, batch)

    # -- the start-up plan -------------------------------------------------------------------
    def sync_plan(self, k: int) -> SyncPlan:
        n_params = count_params(self.module)
        grad_bytes = {"bf16": 2, "fp16": 2}.get(self.cfg.precision, 4)
        n = 1 if self.sync == "per_cycle" else k
        when = {1: "at the boundary", 2: "coalesced", 3: "coalesced"}[self.stage]
        if self.sync == "per_micro":
            when = "after every micro-batch's backward"
        op = "reduce-scatter" if self.stage == 3 else "all-reduce"
        comm = self.ds_config["communication_data_type"]
        rows = [(f"gradient {op} (per bucket)", f"{n}x per cycle, {when}, in {comm} "
                 "(backend.reduce_dtype: communication_data_type)")]  # fmt: skip
        if self.stage < 3:
            rows.append(("updated-parameter all-gather", "1x per cycle, after the step"))
        else:
            rows.append(("parameter all-gather (per module)", f"every micro-batch: in forward and "
                         f"again in backward, {k}x-{2 * k}x per cycle"))  # fmt: skip
        rows.append(("grad-norm scalar all-reduce", "1x per cycle"))
        rows.append(
            (
                "reduction overlaps backward",
                "yes (overlap_comm)"
                if self.ds_config["zero_optimization"].get("overlap_comm")
                else "no",
            )
        )
        accum = grad_accum_dtype(self.stage, self.cfg.precision, self.ds_config)
        rows.append(("gradients accumulate in", accum + (" (DeepSpeed keeps ZeRO-2/3 gradients in "
                     "the parameter dtype)" if accum == "bf16" and self.stage > 1 else "")))  # fmt: skip
        extra = "none"
        if self.stage == 1:
            extra = "none (ZeRO-1 keeps a full local gradient anyway)"
        elif self.sync == "per_cycle":
            full = n_params * grad_bytes * (1 - 1 / self.world)
            extra = (f"a full local gradient ({grad_bytes} B/param instead of a 1/{self.world} "
                     f"shard): +{full / 2**20:.1f} MiB per rank")  # fmt: skip
        note = ""
        if self.stage == 3:
            note = ("ZeRO-3 gathers parameters for every micro-batch whatever the policy; "
                    "per_cycle defers only the gradient reduction. Backward re-gathers a module "
                    "unless it is still held (stage3_max_reuse_distance); parameters under "
                    "stage3_param_persistence_threshold stay resident and are never gathered.")  # fmt: skip
        return SyncPlan(policy=self.sync, rows=rows, extra_memory=extra, note=note)

    # -- checkpoint / export -----------------------------------------------------------------
    # The caller keeps these collectives out of the step records (checkpoint.py suspends counting).
    def save_state(self, path) -> None:
        """path/zero/: model states (rank 0) + one optimizer shard per rank, DeepSpeed's layout;
        path/zero_to_fp32.py consolidates it offline.

        A write that fails on this rank (a full disk) must not make it leave save_checkpoint
        early: the other ranks would wait in its closing barrier. Its file writes run with the
        error held, and the first one is raised once save_checkpoint returns on every rank."""
        held: list[Exception] = []
        engine = self.engine.checkpoint_engine
        with _holding(held, engine, "save"), _holding(held, engine, "makedirs"), \
                _holding(held, self.engine, "_copy_recovery_script"):  # fmt: skip
            self.engine.save_checkpoint(str(path), tag=CKPT_TAG, save_latest=False)
        if held:
            raise held[0]

    def load_state(self, path) -> None:
        """Same world size only: DeepSpeed's ZeRO shards are per data-parallel rank."""
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint under {CKPT_TAG}/")

    def full_state_dict(self) -> dict | None:
        """Gathers every parameter's fp32 master copy (a collective per parameter, all stages)."""
        from deepspeed.utils import safe_get_full_fp32_param

        gathered: dict[int, torch.Tensor] = {}
        for _, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is None:  # not managed by the ZeRO optimizer (frozen)
                full = param.detach()
            if self.rank == 0:
                gathered[id(param)] = full.detach().float().cpu().clone()
        if self.rank != 0:
            return None
        out = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            if id(value) in gathered:
                out[key] = gathered[id(value)]
            else:  # persistent buffers are whole on every rank
                value = value.detach().cpu().clone()
                out[key] = value.float() if value.is_floating_point() else value
        return out

    def close(self, failing: bool = False) -> None:
        if getattr(self, "engine", None) is None:
            return
        self.engine.destroy()
        # ZeRO-3 ranks occasionally abort at exit when one leaves while another still tears down;
        # a failing rank skips the barrier: the others may be inside another collective.
        if not failing and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        self.engine = self.model = None
        self._forget_hf_ds_config()

    def _forget_hf_ds_config(self) -> None:
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            # Later models in this process must not be built under zero.Init.
            unset_hf_deepspeed_config()
            self._hf_ds_config = None
