"""run(): the training loop, top to bottom. THE place the accumulation boundary is decided.

One optimizer step = one cycle of K micro-batches per rank:
  1. fetch the cycle's K micro-batches (global batch `step`, this rank's slice);
  2. count target tokens over the whole cycle on all ranks (one all-reduce) -> N;
  3. each micro-batch's loss = sum of token cross-entropy / N, so K micro-batches on W ranks are
     exactly one batch of K*b*W samples, ragged lengths included;
  4. backend.run_cycle(K micro-batches, loss_fn): by default one forward_backward per micro-batch
     with last=k == K-1, which the backend maps onto its sync; a pipeline runs one schedule;
  5. backend.step(lr): clip, optimizer, zero grads, once per cycle.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gradcycle import attention, checkpoint, distributed, hardware, offload
from gradcycle.backends import build_backend, check_plan, data_parallel_env
from gradcycle.batching import lr_at, plan_from_config
from gradcycle.data import IGNORE_INDEX
from gradcycle.data.loader import eval_batches, train_loader
from gradcycle.data.reader import open_dataset
from gradcycle.faults import Faults, StopSignal, requeue_under_slurm
from gradcycle.loss import attach as attach_loss
from gradcycle.loss import summed_token_ce
from gradcycle.model import (
    apply_activation_checkpointing,
    build_model,
    checkpointed_layers,
    count_params,
    decoder_layers,
)
from gradcycle.planner import auto as plan_auto
from gradcycle.profiling import StepProfiler
from gradcycle.records import Progress, step_record
from gradcycle.telemetry import CommCounter, MetricsSink, flops_per_token
from gradcycle.validation import validate
from gradcycle.vision import batchnorm
from gradcycle.vision import plan as vision_plan
from gradcycle.vision.data import open_images
from gradcycle.vision.loader import train_loader as image_loader
from gradcycle.vision.model import build_model as build_image_model
from gradcycle.vision.model import image_loss
from gradcycle.vision.task import evaluate as evaluate_images
from gradcycle.vision.task import flops_per_sample
from gradcycle.weights import plan as startup_plan


class NonFiniteHalt(RuntimeError):
    """train.on_nonfinite=halt met a NaN/inf: stop without writing anything new."""


def token_loss(model, batch: dict, norm: torch.Tensor | float, impl: str = "chunked",
               chunk_tokens: int | str = "auto") -> torch.Tensor:  # fmt: skip
    """Sum of next-token cross-entropy over real targets, divided by the cycle's token count.
    The sum is fp32 whatever the precision; `impl`/`chunk_tokens` (loss.*) only change how much
    memory the logits take (gradcycle/loss.py)."""
    return summed_token_ce(model, batch, impl, chunk_tokens) / norm


def count_targets(micro_batches: list[dict]) -> int:
    return sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)


def _to_device(value: float, device: torch.device) -> torch.Tensor:
    # A plain host->GPU copy synchronises the stream (it would wait for the previous optimizer
    # step); a pinned, non-blocking copy keeps the step's only host sync in backend.step().
    t = torch.tensor(float(value), dtype=torch.float64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass
class State:
    """What a resumed run needs besides the backend's model and optimizer state."""

    step: int = 0  # optimizer steps done == the next global batch to train on
    tokens_seen: int = 0  # input tokens trained on, all ranks (padding excluded)
    skipped_steps: int = 0  # non-finite loss/gradient, train.on_nonfinite=skip
    overflow_steps: int = 0  # fp16 loss-scaler overflows (the scaler skipped the update)


def resolve_run_dir(cfg, env) -> Path:
    """One run dir for every rank: explicit, else a job id, else rank 0's timestamp (broadcast)."""
    if cfg.run_dir:
        path = cfg.run_dir
    else:
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("GRADCYCLE_RUN_ID")
        path = f"outputs/{job}" if job else f"outputs/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        path = distributed.broadcast_object(path)
    return Path(path).expanduser().resolve()


def run(cfg, on_backend=None) -> dict:
    """Train according to `cfg` (a composed config). Returns the last step's record.
    `on_backend(backend)` is called once the backend is built (gradcycle.sim's memory tracker)."""
    requested, where = cfg.precision, distributed.device_type(cfg.device)
    cfg = hardware.resolve_precision(cfg, where)  # auto: bf16 on CUDA that has it, else fp32
    validate(cfg)  # every user error before anything starts or is written
    env = distributed.read_env()
    cfg = hardware.resolve(cfg, where)  # hardware=auto: detect
    hardware.apply_precision(cfg, where)  # fp32 on CUDA: TF32 matmuls
    if env.is_main:
        print(hardware.precision_line(cfg, requested, where), flush=True)
    nodes = distributed.nodes_from_env() or cfg.nodes
    # train.micro_batch_size=auto / backend.sync=auto: the planner's choice, global batch kept
    if cfg.task == "image":  # the image planner: activations per sample at data.image.size
        cfg = vision_plan.resolve_auto(cfg, env.world_size)
    else:
        cfg = plan_auto.resolve_auto(cfg, env.world_size, nodes)
    # before any process group: the host memory an offload run needs against this node's
    offload.check_host(cfg, env.world_size, env.local_world_size, where)
    for attempt in range(plan_auto.MAX_OOM_RETRIES + 1):
        try:
            return _run(cfg, env, nodes, on_backend)
        except plan_auto.FirstStepOOM as oom:
            failed = oom.detached()  # retried below, once this attempt's tensors are freed
        cfg = plan_auto.after_oom(cfg, env.world_size, nodes, failed, attempt)
    raise AssertionError("after_oom raises on the last attempt")


def _run(cfg, env, nodes: int, on_backend=None) -> dict:
    image = cfg.task == "image"  # image classification (gradcycle/vision): the same loop
    # backend.pp > 1: a pipeline's stages read the same data (their data-parallel replica's)
    data_env = data_parallel_env(cfg, env)
    copies = env.world_size // data_env.world_size  # ranks reading each data slice
    plan = plan_from_config(cfg, data_env.world_size)
    check_plan(cfg, plan.accumulation_steps, env.world_size)  # e.g. K >= pipeline stages
    # Every rank; data=stdlib|files|hub prepare into the cache on first use (file-locked, once).
    data = (open_images if image else open_dataset)(cfg, progress=env.is_main)  # errors: here
    val_set = data.samples("val", cfg.data)

    device = distributed.pick_device(env, cfg.device)
    comm = CommCounter.instance()
    comm.install()  # before DeepSpeed/FSDP capture torch.distributed's functions
    distributed.init_process_group(env, device, cfg.backend.dist_timeout_s)
    run_dir = resolve_run_dir(cfg, env)
    distributed.seed_everything(cfg.seed)

    vocab = data.num_labels if image else len(data.tokenizer)
    ac = cfg.activation_checkpointing

    attn = attention.implementation(cfg.data.document_mask, device.type)  # gradcycle/attention.py

    def make_model(where: str, dtype: torch.dtype = torch.float32):
        if image:
            model = build_image_model(cfg.model, vocab, where, seed=cfg.seed, dtype=dtype,
                                      image_size=cfg.data.image.size)  # fmt: skip
        else:
            model = build_model(cfg.model, vocab, where, seed=cfg.seed, dtype=dtype, attention=attn)
        apply_activation_checkpointing(model, ac.mode, ac.every)
        if cfg.loss.impl != "full" and not image:
            attach_loss(model)  # the chunked loss runs inside the model's own forward
        # model.sync_batchnorm, model.bn_momentum (the guard ran in validation)
        return batchnorm.prepare(model, cfg.model, plan.accumulation_steps, env.world_size,
                                 device.type)  # fmt: skip

    if env.is_main:  # before anything is allocated: what each rank is about to hold
        for line in startup_plan.lines(cfg, make_model("meta"), env.world_size):
            print(line, flush=True)
    backend = build_backend(cfg, make_model, device, env.world_size, run_dir)
    if on_backend is not None:  # gradcycle.simulate: its memory tracker sees the whole step
        on_backend(backend)
    whole = backend.whole_model()  # every parameter (a pipeline rank holds one stage)
    n_params = count_params(whole)
    state = State()
    faults = Faults.from_env(env.rank)  # test-only fault injection (GRADCYCLE_FAULT); else no-op
    ckpt = checkpoint.Checkpointer(
        cfg, run_dir, backend, plan, data.tokenizer, faults, data_fingerprint=data.fingerprint
    )
    # Before anything is written: a bad checkpoint or resume mismatch leaves the run dir as it was.
    resumed_from = ckpt.resume(state)
    ckpt.check_room_at_start(state)  # a run that cannot save must not train for hours first
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(plan.table(), flush=True)
        print(
            backend.sync_plan(plan.accumulation_steps).table(
                cfg.backend.name, plan.accumulation_steps
            )
        )
        print(f"model: {n_params / 1e6:.2f}M parameters, run dir: {run_dir}", flush=True)
        lines = (vision_plan.startup_lines(cfg, env.world_size) if image
                 else plan_auto.startup_lines(cfg, env.world_size, nodes, vocab))  # fmt: skip
        for line in lines:
            print(line, flush=True)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            OmegaConf.save(cfg, cfg_path, resolve=True)
    if resumed_from and env.is_main:
        print(f"resumed from {resumed_from} at step {state.step}", flush=True)

    loss_args = {"impl": cfg.loss.impl, "chunk_tokens": cfg.loss.chunk_tokens}
    sink = MetricsSink(run_dir, cfg, env.is_main, OmegaConf.to_container(cfg, resolve=True))
    # this rank's micro-batches from global batch `state.step` on, computed ahead by workers
    loader = (image_loader if image else train_loader)(
        cfg, data, plan, data_env, device, start=state.step, model=backend.module
    )
    recomputed = checkpointed_layers(len(decoder_layers(whole)), ac.mode, ac.every)
    if image:  # per image
        fpt = flops_per_sample(make_model("meta"), cfg.data.image.size, bool(recomputed))
    else:
        fpt = flops_per_token(whole, cfg.data.seq_len, recomputed)  # (model, hardware)
    profiler = StepProfiler(cfg.profile, cfg.profile_steps, run_dir, env.rank, device)
    progress = Progress(cfg, env, state.step)
    stop = StopSignal.install()
    record: dict = {}
    first_step = state.step
    try:
        while state.step < cfg.train.max_steps:
            profiler.start(state.step + 1)  # a no-op unless profile=true chose this step
            t0 = time.perf_counter()
            step = state.step
            # -- the cycle: K micro-batches, one token count, one boundary ---------------------
            cycle = loader.cycle(step)  # this rank's K micro-batches of global batch `step`
            # targets (the loss's N) and input tokens (throughput, MFU), counted on the host
            counts = [_to_device(n, device) for n in (cycle.targets, cycle.tokens)]
            with comm.suspended():  # the trainer's own collectives are not the backend's
                n_tokens = distributed.all_reduce_tensor(counts, device)
            n_tokens = n_tokens / copies  # each pipeline stage counted its replica's slice
            loss_fn = functools.partial(image_loss if image else token_loss,
                                        norm=n_tokens[0].clamp(min=1), **loss_args)  # fmt: skip
            loss_fn = faults.wrap_loss(step, loss_fn)  # tests only: an injected NaN/inf
            # all K micro-batches: the backend's per-micro loop, or one pipeline schedule
            at_micro = functools.partial(_micro_region, faults, profiler, step)
            loss_sum = backend.run_cycle(cycle.micro, loss_fn, at_micro)
            lr = lr_at(step, plan, cfg.optim.schedule, cfg.train.max_steps, cfg.optim.min_lr_ratio)
            # Stop votes ride along (no extra collective): every rank stops at the same boundary.
            votes = [_to_device(v, device) for v in stop.votes()]
            with comm.suspended():
                stats = distributed.all_reduce_tensor([loss_sum, *votes], device)
            with profiler.region("optimizer_step"):
                result = backend.step(lr, torch.cat([stats, n_tokens]))  # the step's one host sync
            comm_counts = comm.take()
            # -- bookkeeping ---------------------------------------------------------------------
            loss, stop_votes, requeue_votes, n_targets, n_inputs = result.stats
            # fp16: a skipped update with a finite loss is a loss-scale overflow, the scaler's job.
            overflow = result.skipped and cfg.precision == "fp16" and math.isfinite(loss)
            if overflow:
                state.overflow_steps += 1
            elif result.skipped or not math.isfinite(loss):
                if cfg.train.on_nonfinite == "halt":
                    raise NonFiniteHalt(
                        f"step {step + 1}: non-finite loss {loss} / grad norm {result.grad_norm}; "
                        "train.on_nonfinite=halt stopped the run and saved nothing new "
                        "(lower optim.lr, use precision=bf16, or train.on_nonfinite=skip)"
                    )
                state.skipped_steps += 1
            state.step += 1
            state.tokens_seen += int(n_inputs)
            dt = time.perf_counter() - t0
            record = step_record(state, plan, cfg, env, loss, result, (n_inputs, n_targets), dt, lr,
                             fpt, device, comm_counts, cycle.wait_s)  # fmt: skip
            record.update(backend.cycle_metrics())
            split = profiler.stop()
            if split is not None:
                record["profile"] = split
            sink.write(record)
            progress.update(record)
            if cfg.train.eval_every and (state.step % cfg.train.eval_every == 0
                                         or state.step == cfg.train.max_steps):  # fmt: skip
                if image:  # + eval_accuracy
                    ev = evaluate_images(backend, data, plan, cfg, data_env, device, loader)
                else:
                    ev = evaluate(backend, val_set, plan, cfg, data_env, device, loader,
                                  data.pad_id, copies)  # fmt: skip
                comm.take()  # eval's parameter gathers (fsdp, hsdp, zero3) are no step's
                sink.write({"step": state.step, **ev})
                acc = f" eval_accuracy {ev['eval_accuracy']:.3f}" if image else ""
                progress.note(f"step {state.step}: eval_loss {ev['eval_loss']:.4f}{acc}")
            stopping = stop_votes > 0
            ckpt.maybe_save(state, final=stopping)
            if stopping:
                progress.note(f"stop signal: checkpointed at step {state.step}, exiting")
                # SIGUSR1 (the time-limit warning): requeue, unless the run is complete anyway
                if requeue_votes > 0 and env.is_main and state.step < cfg.train.max_steps:
                    requeue_under_slurm()
                break
    except torch.OutOfMemoryError as e:
        if state.step != first_step:
            raise
        raise plan_auto.FirstStepOOM(plan.micro_batch_size, str(run_dir), str(e)) from None
    finally:
        loader.close()
        progress.close()
        sink.close()
        stop.uninstall()
        # A failing rank must not wait in a teardown barrier the others never reach.
        backend.close(failing=sys.exc_info()[0] is not None)
        ckpt.wait_for_pruning()  # rank 0's background deletion of old checkpoints
    progress.summary(record)
    return record


def _micro_region(faults, profiler, step: int, k: int):
    """As micro-batch k of `step` starts: a test-injected fault, then its profiler region."""
    faults.at_micro(step, k)
    return profiler.region("forward_backward")


@torch.no_grad()
def evaluate(backend, val_set, plan, cfg, env, device, loader, pad_id, copies: int = 1) -> dict:
    """Token-weighted validation loss over the same batches on any world size. `env`: the
    data-parallel ranks; `copies`: ranks reading each slice (pipeline stages; their loss is
    counted on the last stage only)."""
    losses, tokens = [], 0
    loss_fn = functools.partial(token_loss, norm=1.0, impl=cfg.loss.impl,
                                chunk_tokens=cfg.loss.chunk_tokens)  # fmt: skip
    for host in eval_batches(val_set, plan.micro_batch_size, cfg.train.eval_batches, env.rank,
                             env.world_size, pad_id, cfg.data.document_mask):  # fmt: skip
        losses.append(backend.eval_loss(loader.to_device(host), loss_fn))
        tokens += host.targets
    with CommCounter.instance().suspended():
        sums = distributed.all_reduce_tensor([torch.stack(losses).sum(), tokens], device)
    total, tokens = sums.tolist()
    tokens /= copies
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}
