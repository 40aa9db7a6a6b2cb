"""BatchNorm under accumulation, measured: K x b vs 1 x (K*b), beside the exact GroupNorm/LayerNorm.

    python bench/batchnorm.py            # the table in docs/vision.md (a few minutes on 2 cores)
    python bench/batchnorm.py --smoke    # b = 2, 16 on the BatchNorm ResNet, 2 steps: ~20 s of CPU

The effective batch is 32 images of data=shapes (32x32, 8 classes). For each micro-batch b
(K = 32 / b) and each model, from the same seeded init and the same images:
- `grad cos`, `grad err`: the gradient of the first cycle accumulated over K micro-batches of b
  (each micro-batch's loss = summed CE / 32, gradcycle's normaliser) vs the gradient of one batch
  of 32: cosine similarity and |g_K - g_1| / |g_1|;
- `param diff`: |w_K - w_1| / |w_1| after `--steps` SGD steps (lr 0.05, momentum 0.9) trained
  both ways. Even an exact case drifts here: fp32 rounding (1e-8) grows about tenfold every 4-5
  steps in this chaotic regime (measured for GroupNorm: 7e-9 after 1 step, 9e-5 after 11, 2e-2
  after 31), so compare it across rows at the same step count, not with zero;
- `loss K x b`, `loss 1 x Kb`: eval loss (eval mode: BatchNorm's running statistics) on 256 val
  images after those steps; `acc`: accuracy.
Models: the ResNet of model=resnet-cpu (BatchNorm), the same ResNet with every BatchNorm2d
replaced by GroupNorm(8 groups) and the ConvNeXt of model=convnext-cpu (LayerNorm). `SyncBN`
rows run 2 gloo ranks with b per rank (GlooSyncBatchNorm: statistics over 2b images); their
1 x Kb is the same one-process reference.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import compose, run_on_ranks, table

BATCH, SIZE, LR = 32, 32, 0.05


def _cfg(model: str):
    return compose(["task=image", "data=shapes", f"model={model}", f"data.image.size={SIZE}",
                    "data.image.val_samples=256", "data.num_workers=0",
                    "model.batchnorm_guard=false"])  # fmt: skip


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    from gradcycle.vision.model import build_model

    model_name = "convnext-cpu" if name == "layernorm" else "resnet-cpu"
    cfg = _cfg(model_name)
    model = build_model(cfg.model, 8, "cpu", seed=seed, image_size=SIZE)
    if name == "groupnorm":
        _to_groupnorm(model)
    return model


def _to_groupnorm(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(
                module, name, torch.nn.GroupNorm(min(8, child.num_features), child.num_features)
            )
        else:
            _to_groupnorm(child)


def _batches(steps: int):
    """Global batches 0..steps-1 (pixels, labels) in the trainer's order, and the val images."""
    from gradcycle.data.loader import GlobalOrder
    from gradcycle.vision.data import open_images
    from gradcycle.vision.loader import ImageMicroBatches, eval_batches

    cfg = _cfg("resnet-cpu")
    data = open_images(cfg)
    mb = ImageMicroBatches(data.train, GlobalOrder(len(data.train), 1234), BATCH, 0, 1, BATCH,
                           cfg.data.image, data.tokenizer, seed=1234)  # fmt: skip
    train = [(torch.as_tensor(h.pixels), torch.as_tensor(h.labels))
             for h in (mb[s] for s in range(steps))]  # fmt: skip
    val = [(torch.as_tensor(h.pixels), torch.as_tensor(h.labels))
           for h in eval_batches(data, cfg.data.image, 32, 8, 0, 1)]  # fmt: skip
    return train, val


def _cycle(model, x, y, micro: int, rank: int = 0, world: int = 1) -> None:
    """One cycle's backward: this rank's contiguous share cut into micro-batches (loader rule)."""
    share = x.shape[0] // world
    xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    for i in range(0, share, micro):
        logits = model(pixel_values=xs[i : i + micro]).logits
        (F.cross_entropy(logits, ys[i : i + micro], reduction="sum") / x.shape[0]).backward()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@torch.no_grad()
def _evaluate(model, val) -> tuple[float, float]:
    model.eval()
    loss = correct = n = 0.0
    for x, y in val:
        logits = model(pixel_values=x).logits
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        n += len(y)
    model.train()
    return loss / n, correct / n


def _train(model, train, micro: int, rank: int = 0, world: int = 1):
    """(first-cycle gradient, trained model): SGD over the global batches, gradients summed
    over ranks (one all-reduce per step, as the backends do)."""
    import torch.distributed as dist

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    first = None
    for x, y in train:
        _cycle(model, x, y, micro, rank, world)
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        if first is None:
            first = _flat(model).clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return first, model


def _sync_rank(rank: int, world: int, micros: list[int], steps: int) -> list | None:
    """Every SyncBN row in one spawn (a process start costs seconds)."""
    import torch.distributed as dist

    from gradcycle.vision.batchnorm import convert_gloo

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    train, val = _batches(steps)
    out = []
    for micro in micros:
        grad, model = _train(convert_gloo(_model("batchnorm")), train, micro, rank, world)
        # plain lists: a tensor would travel as a file descriptor that dies with this process
        out.append((grad.tolist(), _evaluate(model, val), _params(model).tolist()))
    return out if rank == 0 else None


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _row(name, micro: int, sync: bool, grad, ref_grad, result, ref_result, drift) -> list:
    cos = F.cosine_similarity(grad, ref_grad, dim=0).item()
    err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    k = BATCH // micro // (2 if sync else 1)
    return [name, f"{micro}{' x 2 ranks' if sync else ''}", k, "yes" if sync else "no",
            f"{cos:.6f}", f"{err:.2e}", f"{drift:.1e}", f"{result[0]:.4f}", f"{ref_result[0]:.4f}",
            f"{result[1]:.3f}", f"{ref_result[1]:.3f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: b = 2, 16, 2 steps")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    steps = 2 if args.smoke else args.steps
    micros = (2, 16) if args.smoke else (2, 4, 8, 16)
    names = ("batchnorm",) if args.smoke else ("batchnorm", "groupnorm", "layernorm")
    torch.manual_seed(0)
    train, val = _batches(steps)
    rows, sync_micros = [], [m for m in micros if m <= BATCH // 2][: 1 if args.smoke else None]
    synced = dict(zip(sync_micros, run_on_ranks(_sync_rank, 2, (sync_micros, steps))[0]))
    for name in names:
        ref_grad, ref_model = _train(_model(name), train, BATCH)
        ref, ref_w = _evaluate(ref_model, val), _params(ref_model)
        drift = lambda w, r=ref_w: ((w - r).norm() / r.norm()).item()  # noqa: E731
        for micro in micros:
            grad, model = _train(_model(name), train, micro)
            rows.append(_row(name, micro, False, grad, ref_grad, _evaluate(model, val), ref,
                             drift(_params(model))))  # fmt: skip
            if name == "batchnorm" and micro in synced:
                grad, result, w = synced[micro]
                rows.append(_row("batchnorm", micro, True, torch.tensor(grad), ref_grad, result,
                                 ref, drift(torch.tensor(w))))  # fmt: skip
    print(f"effective batch {BATCH} images of data=shapes at {SIZE}x{SIZE}, {steps} SGD steps "
          f"(lr {LR}, momentum 0.9); reference: 1 x {BATCH} in one process")  # fmt: skip
    print(table(["norm", "micro b", "K", "SyncBN", "grad cos", "grad err", "param diff", "loss K x b",
                 "loss 1 x Kb", "acc K x b", "acc 1 x Kb"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
