"""What gradcycle's loop costs: the same model, data and batch run by

  gradcycle   the real trainer (`gradcycle.trainer.run`: its loop, backend, telemetry, sinks)
  bare        a hand-written PyTorch loop with the same exact accumulation (no_sync on DDP),
              torch.optim.AdamW with its defaults
  bare_fused  the same loop with AdamW(fused=True), gradcycle's kernel: the loop's cost alone
  accelerate  a Hugging Face Accelerate loop (`accelerator.accumulate`), the same loss arithmetic

interleaved (the order rotates every repetition, so background load hits all alike), each
run `--warmup` steps then `--steps` timed ones. A step's time is the wall time between the ends of
consecutive optimizer steps (for gradcycle, between its metrics records), so everything the loop
does counts; the process CPU time of the same steps is reported too, as it hardly moves when other
jobs share the cores. All start from the same weights and see the same batches: the first step's
loss, printed, must agree. On 2 ranks with fsdp, gradcycle runs backend.sync=per_cycle and the
bare loop does the same (gathered parameters and unreduced gradients through the cycle), while
Accelerate's accumulate() defers only the gradient reduction (set_requires_gradient_sync).

    python bench/overhead.py                 # single process, then 2 ranks (ddp, fsdp if present)
    python bench/overhead.py --worlds 1 --reps 3
    python bench/overhead.py --smoke         # tiny model, 1 rep x 1 step, 1 process + 2-rank fsdp

The last line is `ratio gradcycle/bare=<x> gradcycle/accelerate=<y>` for the single process: the
median over repetitions of the ratio of per-run median step times (paired, so slow drifts cancel).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

from _common import backends_available, compose, median, now, run_on_ranks, table, timed_train

# ~4M parameters, 1024 tokens per optimizer step in K=4 micro-batches: ~0.3 s of CPU a step on one
# core, long enough that per-step loop overhead is measured, not Python noise.
MODEL = [
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
    "model.intermediate_size=688", "data.seq_len=64", "data.vocab_size=2048",
    "data.max_documents=1500", "train.global_batch_size=16", "train.micro_batch_size=4",
    "train.eval_every=0", "logging.progress=false", "checkpoint.at_end=false",
    "optim.warmup_steps=2", "seed=7",
]  # fmt: skip
# --smoke: the tiny CI model in place of every MODEL value (given after MODEL, so it wins).
SMOKE = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.intermediate_size=128", "data.vocab_size=512", "data.max_documents=300",
    "train.global_batch_size=8", "train.micro_batch_size=2", "optim.warmup_steps=1",
]  # fmt: skip
IMPLS = ("gradcycle", "bare", "bare_fused", "accelerate")


class NotComparable(Exception):
    """An implementation cannot do this configuration's work here: its row says so, untimed."""


class Workload:
    """Everything the hand-written loops share with the trainer: config, data, batch plan."""

    def __init__(self, overrides: list[str], world: int):
        from gradcycle.batching import plan_from_config
        from gradcycle.data.reader import open_dataset

        self.overrides = overrides
        self.cfg = compose(overrides)
        self.plan = plan_from_config(self.cfg, world)
        self.data = open_dataset(self.cfg, progress=False)
        self.train_set = self.data.samples("train", self.cfg.data)
        self.vocab, self.pad = len(self.data.tokenizer), self.data.pad_id

    def batches(self):
        return _Cycles(self)

    def model(self):
        from gradcycle.distributed import seed_everything
        from gradcycle.model import build_model

        seed_everything(self.cfg.seed)  # as the trainer does before it builds: identical weights
        return build_model(self.cfg.model, self.vocab, "cpu", seed=self.cfg.seed)

    def optimizer(self, params, fused: bool | None = None):
        import torch

        o = self.cfg.optim
        params = [p for p in params if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)

    def lr(self, step: int) -> float:
        from gradcycle.batching import lr_at

        o = self.cfg.optim
        return lr_at(step, self.plan, o.schedule, self.cfg.train.max_steps, o.min_lr_ratio)


class _Cycles:
    """The trainer's global batches, fetched in the loop's process (host tensors on the CPU)."""

    def __init__(self, w: Workload):
        self.w, self._batches = w, None

    def cycle(self, step: int, rank: int, world: int, micro: int) -> list[dict]:
        import torch

        from gradcycle.data.loader import GlobalOrder, MicroBatches, to_device

        w = self.w
        if self._batches is None:  # one sampler per run, as the trainer's loader holds one
            order = GlobalOrder(len(w.train_set), w.cfg.seed)
            self._batches = MicroBatches(
                w.train_set, order, w.plan.global_batch_size, rank, world, micro, w.pad
            )
        return [to_device(h, torch.device("cpu")) for h in self._batches.cycle(step)]


def _token_count(micro, world: int):
    import torch
    import torch.distributed as dist

    n = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)))
    if world > 1:
        dist.all_reduce(n)
    return n


def _sum_ce(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")  # fmt: skip


def _wrap_bare(model, backend: str, world: int):
    if world == 1:
        return model
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Per cycle, as gradcycle's fsdp runs here: parameters stay gathered and gradients unreduced
    # until the last micro-batch (the loop sets the two flags before each backward).
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:  # one unit per decoder layer + the root
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    return fully_shard(model, mesh=mesh, reshard_after_forward=False)


def run_bare(w: Workload, n: int, rank: int, world: int, backend: str, fused=None):
    import torch
    import torch.distributed as dist

    model = _wrap_bare(w.model(), backend, world)
    opt = w.optimizer(model.parameters(), fused)
    batches, clip, ends, first = w.batches(), w.cfg.train.grad_clip, [], None
    for step in range(n):
        micro = batches.cycle(step, rank, world, w.plan.micro_batch_size)
        n_tok = _token_count(micro, world)
        total = torch.zeros(())
        for k, batch in enumerate(micro):
            last = k == len(micro) - 1
            if backend == "fsdp" and world > 1:
                model.set_requires_gradient_sync(last)
                model.set_reshard_after_backward(last)
            skip_sync = backend == "ddp" and world > 1 and not last
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                loss = _sum_ce(model, batch) / n_tok
                (loss * world).backward()  # DDP/FSDP average over ranks: make it a sum
            total += loss.detach()
        for g in opt.param_groups:
            g["lr"] = w.lr(step)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total)
        loss_v, _ = torch.stack([total, norm.detach()]).tolist()  # the one host sync
        first = loss_v if first is None else first
        ends.append(now())
    return ends, first


_ACCELERATOR = {}


def run_accelerate(w: Workload, n: int, rank: int, world: int, backend: str):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        FullyShardedDataParallelPlugin,
    )

    k = w.plan.accumulation_steps
    if backend not in _ACCELERATOR:  # one Accelerator per process: its state is a singleton
        kw = dict(cpu=True, gradient_accumulation_steps=k)
        if world > 1 and backend == "ddp":
            kw["kwargs_handlers"] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        if world > 1 and backend == "fsdp":
            kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["LlamaDecoderLayer"], cpu_ram_efficient_loading=False,
            )  # fmt: skip
        _ACCELERATOR[backend] = Accelerator(**kw)
    acc = _ACCELERATOR[backend]
    if world > 1 and backend == "fsdp" and acc.distributed_type != DistributedType.FSDP:
        # accelerate enables FSDP only on accelerator devices; on CPU it runs DDP instead, which
        # is not the same work: report it rather than time it.
        raise NotComparable(f"accelerate runs {acc.distributed_type.value} here, not FSDP")
    model = w.model()
    model, opt = acc.prepare(model, w.optimizer(model.parameters()))
    batches, clip, ends, first = w.batches(), w.cfg.train.grad_clip, [], None
    for step in range(n):
        micro = batches.cycle(step, rank, world, w.plan.micro_batch_size)
        n_tok = _token_count(micro, world)
        total, norm = torch.zeros(()), torch.zeros(())
        for batch in micro:
            with acc.accumulate(model):
                loss = _sum_ce(model, batch) / n_tok
                acc.backward(loss * world * k)  # accelerate divides by K; DDP averages ranks
                total += loss.detach()
                if acc.sync_gradients:
                    for g in opt.param_groups:
                        g["lr"] = w.lr(step)
                    norm = acc.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad()
        if world > 1:
            torch.distributed.all_reduce(total)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        loss_v, _ = torch.stack([total, norm.detach()]).tolist()
        first = loss_v if first is None else first
        ends.append(now())
    acc.free_memory()
    return ends, first


def run_gradcycle(w: Workload, n: int, rank: int, world: int, backend: str):
    overrides = [*w.overrides, f"backend={backend}", f"train.max_steps={n}"]
    if backend == "fsdp":  # the policy that defers gradient reduction, as accumulate() does
        overrides.append("backend.sync=per_cycle")
    ends, records, _ = timed_train(overrides, rank, f"overhead-{backend}-{world}")
    return ends, (records[0]["loss"] if records else None)


RUNNERS = {
    "gradcycle": run_gradcycle,
    "bare": run_bare,  # torch.optim.AdamW as most loops write it (foreach on GPU, for-loop on CPU)
    "bare_fused": functools.partial(run_bare, fused=True),  # gradcycle's kernel: loop cost only
    "accelerate": run_accelerate,
}


def measure(rank: int, world: int, backend: str, reps: int, warmup: int, steps: int,
            threads: int, extra: list[str]) -> dict:  # fmt: skip
    """Interleaved repetitions on this rank; returns {impl: [per-run step times]} and losses."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    n = warmup + steps
    w = Workload([*MODEL, *extra, f"train.max_steps={n}"], world)
    runs = {impl: [] for impl in IMPLS}
    cpu = {impl: [] for impl in IMPLS}
    first_loss, errors = {}, {}
    for rep in range(reps):
        order = IMPLS[rep % len(IMPLS) :] + IMPLS[: rep % len(IMPLS)]
        for impl in order:
            if impl in errors:
                continue
            try:
                ends, loss = RUNNERS[impl](w, n, rank, world, backend)
            except NotComparable as e:
                errors[impl] = f"not run: {e}"
                continue
            except Exception as e:  # reported in its row; the other implementations still run
                errors[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                continue
            if rank == 0:
                timed = list(zip(ends[warmup - 1 :], ends[warmup:]))
                runs[impl].append([b[0] - a[0] for a, b in timed])
                cpu[impl].append([b[1] - a[1] for a, b in timed])
                first_loss[impl] = loss
    return {"runs": runs, "cpu": cpu, "first_loss": first_loss, "errors": errors}


def _ratio(runs, a: str, b: str) -> float:
    pairs = [median(x) / median(y) for x, y in zip(runs[a], runs[b]) if x and y]
    return statistics.median(pairs) if pairs else float("nan")


def rows_for(world: int, backend: str, res: dict) -> list[list]:
    runs, cpu, rows = res["runs"], res["cpu"], []
    for impl in IMPLS:
        if impl in res["errors"]:
            rows.append([world, backend, impl, "n/a", "", "", "", "", "", res["errors"][impl]])
            continue
        per_run = [median(r) for r in runs[impl]]
        rows.append([
            world, backend, impl,
            f"{median([t for r in runs[impl] for t in r]) * 1e3:.1f}",
            f"{min(per_run) * 1e3:.1f}-{max(per_run) * 1e3:.1f}",
            f"{_ratio(runs, impl, 'bare'):.3f}" if runs["bare"] else "",
            f"{median([t for r in cpu[impl] for t in r]) * 1e3:.1f}",
            f"{_ratio(cpu, impl, 'bare'):.3f}" if cpu["bare"] else "",
            f"{res['first_loss'].get(impl, float('nan')):.6f}", "",
        ])  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2", help="process counts to run, e.g. 1 or 1,2")
    ap.add_argument("--backends", default=None, help="2-rank backends (default: ddp, fsdp)")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--smoke", action="store_true", help="smallest size (checks the script)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    a = ap.parse_args()
    if a.smoke:  # fsdp: the 2-rank path with the most of this script's own code
        a.reps, a.warmup, a.steps, a.overrides = 1, 1, 1, [*SMOKE, *a.overrides]
        a.backends = a.backends or "fsdp"
    worlds = [int(x) for x in a.worlds.split(",")]
    backends = a.backends.split(",") if a.backends else [
        b for b in ("ddp", "fsdp") if b in backends_available()]  # fmt: skip
    print(f"overhead: {' '.join(MODEL[:5])} {' '.join(a.overrides)}; {a.reps} interleaved reps x "
          f"{a.steps} timed steps after {a.warmup} warm-up, {a.threads} thread(s)/rank", flush=True)  # fmt: skip
    rows, single = [], None
    args = (a.reps, a.warmup, a.steps, a.threads, a.overrides)
    for world in worlds:
        for backend in ["ddp"] if world == 1 else backends:
            t0 = time.time()
            if world == 1:
                res = measure(0, 1, backend, *args)
                single = res
            else:
                res = run_on_ranks(measure, world, (backend, *args), timeout=3600)[0]
            rows += rows_for(world, "-" if world == 1 else backend, res)
            print(f"  world {world} {backend}: {time.time() - t0:.0f}s", flush=True)
    header = ["world", "backend", "impl", "wall ms/step", "run medians", "wall vs bare",
              "cpu ms/step", "cpu vs bare", "loss@1", "note"]  # fmt: skip
    print(table(header, rows))
    if single is not None:
        r, c = single["runs"], single["cpu"]
        print(f"cpu-time ratio gradcycle/bare={_ratio(c, 'gradcycle', 'bare'):.3f} "
              f"gradcycle/accelerate={_ratio(c, 'gradcycle', 'accelerate'):.3f}")  # fmt: skip
        print(
            f"loop only (same fused AdamW): gradcycle/bare_fused wall="
            f"{_ratio(r, 'gradcycle', 'bare_fused'):.3f} cpu={_ratio(c, 'gradcycle', 'bare_fused'):.3f}"
        )
        print(f"ratio gradcycle/bare={_ratio(r, 'gradcycle', 'bare'):.3f} "
              f"gradcycle/accelerate={_ratio(r, 'gradcycle', 'accelerate'):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
