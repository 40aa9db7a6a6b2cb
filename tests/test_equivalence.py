"""K micro-batches are exactly one big batch: ragged lengths, the real trainer, one process."""

from __future__ import annotations

import torch
from conftest import RAGGED, TINY, compose, train_steps

from gradcycle.data import GlobalBatches, load_corpus, split_corpus
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
    corpus = load_corpus(cfg.data, cfg.model)
    train, _ = split_corpus(corpus, cfg.data)
    batches = GlobalBatches(train, 8, cfg.seed, corpus.tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(corpus.tokenizer))

    full = batches.cycle(0, 0, 1, 8)[0]
    micro = batches.cycle(0, 0, 1, 2)
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
