"""K micro-batches are exactly one big batch: ragged lengths, the real trainer, one process."""

from __future__ import annotations

import torch
from conftest import RAGGED, TINY, compose, train_steps

from gradcycle.data.loader import GlobalOrder, MicroBatches, to_device
from gradcycle.data.reader import open_dataset
from gradcycle.model import build_model
from gradcycle.trainer import count_targets, token_loss

STEPS = [*RAGGED, "train.global_batch_size=8", "train.max_steps=3", "optim=sgd"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_trainer_k4_micro2_equals_k1_micro8_on_ragged_data(tmp_path):
    big = train_steps(tmp_path / "k1", [*STEPS, "train.micro_batch_size=8"])
    acc = train_steps(tmp_path / "k4", [*STEPS, "train.micro_batch_size=2"])
    assert [r["accumulation_steps"] for r in big] == [1, 1, 1]
    assert [r["accumulation_steps"] for r in acc] == [4, 4, 4]
    for a, b in zip(acc, big, strict=True):
        assert a["tokens"] == b["tokens"]
        assert _rel(a["loss"], b["loss"]) < 1e-5, (a["loss"], b["loss"])
        assert _rel(a["grad_norm"], b["grad_norm"]) < 1e-5, (a["grad_norm"], b["grad_norm"])


def _flat_grad(model) -> torch.Tensor:
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grad


def test_token_normalisation_is_exact_and_mean_of_means_is_not():
    """Exact: sum-CE / cycle tokens. Mean of per-micro-batch means / K: another objective."""
    cfg = compose([*TINY, *STEPS])
    data = open_dataset(cfg)
    train = data.samples("train", cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(data.tokenizer))

    def cycle(micro: int) -> list[dict]:  # global batch 0 on one rank, cut into micro-batches
        batches = MicroBatches(
            train, GlobalOrder(len(train), cfg.seed), 8, 0, 1, micro, data.pad_id
        )
        return [to_device(h, torch.device("cpu")) for h in batches.cycle(0)]

    full = cycle(8)[0]
    micro = cycle(2)
    lengths = (full["labels"] != -100).sum(1)
    assert lengths.max() >= 4 * lengths.min(), f"lengths not ragged enough: {lengths.tolist()}"

    token_loss(model, full, count_targets([full])).backward()
    reference = _flat_grad(model)

    n = count_targets(micro)
    for mb in micro:
        token_loss(model, mb, n).backward()
    exact = _flat_grad(model)

    for mb in micro:  # the common bug: each micro-batch's own mean, divided by K
        (token_loss(model, mb, count_targets([mb])) / len(micro)).backward()
    mean_of_means = _flat_grad(model)

    rel = lambda g: float((g - reference).norm() / reference.norm())  # noqa: E731
    assert rel(exact) < 1e-5
    assert rel(mean_of_means) > 1e-2  # a different gradient, not rounding noise
