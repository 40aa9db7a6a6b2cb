"""What each optimizer step reports: its metrics record (metrics.jsonl, TensorBoard, wandb) and
the rank-0 progress bar and log lines. Field meanings: docs/performance.md."""

from __future__ import annotations

import sys

from gradcycle import offload
from gradcycle.batching import BatchPlan
from gradcycle.telemetry import peak_memory_bytes


def step_record(state, plan: BatchPlan, cfg, env, loss, result, tokens, dt, lr, fpt, device, comm,
            data_wait_s):  # fmt: skip
    # Throughput and MFU count input tokens (what the model computed on, padding excluded), the
    # loss its targets: with masked prompts or padded rows the two differ by 2x and more.
    n_inputs, n_targets = tokens
    tokens_per_s = n_inputs / dt if dt > 0 else 0.0
    # FLOP/s of all ranks together; an unknown device has no peak, hence no MFU (never a guess)
    peak = (cfg.hardware.bf16_tflops or 0.0) * 1e12 * env.world_size
    return {
        "step": state.step,
        "loss": loss,
        "grad_norm": result.grad_norm,
        "lr": lr,
        "tokens": int(n_inputs),  # all ranks, padding excluded
        "target_tokens": int(n_targets),  # tokens with a loss: the normalisation N
        "samples": plan.global_batch_size,
        "accumulation_steps": plan.accumulation_steps,
        "micro_batch_size": plan.micro_batch_size,
        "world_size": env.world_size,
        "step_time_s": dt,
        "data_wait_s": data_wait_s,  # of step_time_s: waiting for this cycle's micro-batches
        "tokens_per_s": tokens_per_s,
        "mfu": fpt[0] * tokens_per_s / peak if peak else None,
        "hfu": fpt[1] * tokens_per_s / peak if peak else None,  # + activation recompute
        "peak_mem_bytes": peak_memory_bytes(device),
        # host offload: the host optimizer's step (None without offload), RSS, pinned memory
        "host_step_s": offload.HostStepTimer.instance().take(),
        "host_rss_bytes": offload.host_rss_bytes(),
        "pinned_bytes": offload.pinned_bytes(),
        "skipped": bool(result.skipped),
        "skipped_steps": state.skipped_steps,
        "overflow_steps": state.overflow_steps,
        "tokens_seen": state.tokens_seen,
        "comm": comm,
        **_pipeline_fields(cfg, plan.accumulation_steps),
    }


def _pipeline_fields(cfg, k: int) -> dict:
    """backend.pp > 1: the schedule's idle share of the step, (p-1)/(v·K + p-1) (planner/
    pipeline.py; bench/pipeline.py measures it); the stages' point-to-point is in `comm`."""
    b = cfg.backend
    if b.pp == 1:
        return {}
    from gradcycle.planner.pipeline import bubble_fraction

    return {"pp_bubble": bubble_fraction(b.pp, k, b.pp_virtual)}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


class Progress:
    """tqdm on rank 0 only (step, loss, tokens/s, MFU, peak memory); silent elsewhere."""

    def __init__(self, cfg, env, start: int):
        self.bar = None
        self.every = cfg.train.log_every
        if env.is_main and cfg.logging.progress:
            from tqdm import tqdm

            # Redrawn in place on a terminal; in a log file only the periodic lines are written.
            self.bar = tqdm(total=cfg.train.max_steps, initial=start, desc="train", file=sys.stdout,
                            mininterval=1.0, dynamic_ncols=True,
                            disable=not sys.stdout.isatty())  # fmt: skip
        self.first_loss = None
        self.main = env.is_main

    def update(self, r: dict) -> None:
        if self.first_loss is None:
            self.first_loss = r["loss"]
            if self.main:
                self.note(f"step {r['step']}: first loss {r['loss']:.4f}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{r['tokens_per_s']:.0f}",
                                 mfu=_pct(r["mfu"]), mem=_gib(r["peak_mem_bytes"]),
                                 refresh=False)  # fmt: skip
            self.bar.update(1)
        if self.main and (r["step"] % self.every == 0):
            self.note(f"step {r['step']}: loss {r['loss']:.4f} grad_norm {r['grad_norm']:.3f} "
                      f"lr {r['lr']:.2e} tokens/s {r['tokens_per_s']:.0f} mfu {_pct(r['mfu'])} "
                      f"peak mem {_gib(r['peak_mem_bytes'])}")  # fmt: skip
        if "profile" in r:
            p = r["profile"]
            self.note(f"step {r['step']} profile: forward/backward {p['forward_backward_s']:.3f}s "
                      f"comm wait {p['comm_wait_s']:.3f}s optimizer {p['optimizer_s']:.3f}s "
                      f"other {p['other_s']:.3f}s")  # fmt: skip

    def note(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, last: dict) -> None:
        if self.first_loss is not None and last:
            self.note(f"done: {last['step']} steps, first loss {self.first_loss:.4f} -> last loss "
                      f"{last['loss']:.4f}")  # fmt: skip
