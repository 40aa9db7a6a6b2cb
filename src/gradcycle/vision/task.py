"""What the trainer asks of task=image, behind the same calls the LM path answers.

    data      vision.data.open_images          (LM: data.reader.open_dataset)
    model     vision.model.build_model         (LM: model.build_model)
    loader    vision.loader.train_loader       (LM: data.loader.train_loader); N = images
    loss      vision.model.image_loss          (LM: trainer.token_loss)
    eval      evaluate() below                 (LM: trainer.evaluate); + eval_accuracy
    FLOPs     flops_per_sample() below         (LM: telemetry.flops_per_token)

Throughput records keep their names: for task=image `tokens` and `tokens_per_s` count images.
"""

from __future__ import annotations

import torch

from gradcycle import distributed
from gradcycle.telemetry import CommCounter
from gradcycle.vision.loader import eval_batches
from gradcycle.vision.model import eval_sums


@torch.no_grad()
def evaluate(backend, data, plan, cfg, env, device, loader, pad_id=None) -> dict:
    """Mean cross-entropy and accuracy over the same val images on any world size, with
    BatchNorm's running statistics (eval mode), then back to training mode."""
    module = backend.module
    module.eval()
    try:
        sums, n = [], 0
        for host in eval_batches(data, cfg.data.image, plan.micro_batch_size,
                                 cfg.train.eval_batches, env.rank, env.world_size):  # fmt: skip
            sums.append(backend.eval_loss(loader.to_device(host), eval_sums))
            n += host.targets
    finally:
        module.train()
    total = torch.stack(sums).sum(0)
    with CommCounter.instance().suspended():
        loss, correct, n = distributed.all_reduce_tensor([total[0], total[1], n], device).tolist()
    return {"eval_loss": loss / max(n, 1.0), "eval_accuracy": correct / max(n, 1.0),
            "eval_samples": int(n)}  # fmt: skip


def flops_per_sample(meta_model: torch.nn.Module, size: int, checkpointed: bool) -> tuple:
    """(model FLOPs, hardware FLOPs) per trained image: torch's FLOP counter over one forward of
    the meta-device model (nothing allocated), x3 for forward + backward; activation
    checkpointing adds one more forward of the recomputed blocks (taken as the whole forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(meta_model.parameters())
    x = torch.empty(1, 3, size, size, device="meta", dtype=param.dtype)
    with FlopCounterMode(display=False) as counter:
        meta_model(pixel_values=x)
    forward = float(counter.get_total_flops())
    return 3.0 * forward, (4.0 if checkpointed else 3.0) * forward
