"""The loop end to end: outputs, falling loss, fp16 scaler once per cycle, checkpointing modes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, read_metrics, train_steps

REQUIRED = {"step", "loss", "grad_norm", "lr", "tokens", "samples", "accumulation_steps",
            "micro_batch_size", "world_size", "step_time_s", "tokens_per_s", "peak_mem_bytes",
            "comm"}  # fmt: skip


def test_train_py_end_to_end_loss_falls(tmp_path):
    """train.py as a subprocess on the embedded corpus: ~30 steps, metrics well-formed."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, f"run_dir={run_dir}",
         "train.max_steps=30", "train.eval_every=15", "optim.lr=1e-2", "optim.warmup_steps=3"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch plan" in proc.stdout and "accumulation steps K" in proc.stdout
    assert "first loss" in proc.stdout
    assert (run_dir / "config.yaml").exists()
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert [r["step"] for r in evals] == [15, 30]
    for r in steps:
        assert r.keys() >= REQUIRED
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["samples"] == 8 and r["accumulation_steps"] == 4 and r["world_size"] == 1
        assert 0 < r["tokens"] <= 8 * 64
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(e["eval_ppl"] == pytest.approx(math.exp(e["eval_loss"])) for e in evals)


def test_fp16_scaler_steps_once_per_cycle(tmp_path, monkeypatch):
    calls = {"step": 0, "update": 0, "unscale_": 0}
    for name in calls:
        original = getattr(torch.amp.GradScaler, name)

        def counting(self, *a, _name=name, _orig=original, **k):
            calls[_name] += self.is_enabled()
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.amp.GradScaler, name, counting)
    records = train_steps(tmp_path, ["precision=fp16", "train.max_steps=3"])
    assert records[0]["accumulation_steps"] == 4
    assert calls == {"step": 3, "update": 3, "unscale_": 3}  # 3 cycles x K=4 micro-batches


def test_bf16_autocast_run_is_finite(tmp_path):
    records = train_steps(tmp_path, ["precision=bf16", "train.max_steps=3"])
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_losses(tmp_path, mode):
    base = ["train.max_steps=3", "model.num_layers=4"]
    plain = train_steps(tmp_path / "plain", base)
    ac = train_steps(tmp_path / mode, [*base, f"activation_checkpointing.mode={mode}"])
    for a, b in zip(ac, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_checkpointed_layers_are_chosen_and_recomputed():
    from gradcycle.cli import compose
    from gradcycle.model import apply_activation_checkpointing, build_model, checkpointed_layers

    assert checkpointed_layers(6, "selective", 2) == [1, 3, 5]
    assert checkpointed_layers(6, "selective", 3) == [2, 5]
    assert checkpointed_layers(3, "full", 2) == [0, 1, 2]
    assert checkpointed_layers(3, "none", 2) == []

    cfg = compose([*TINY], str(ROOT / "conf"))
    model = build_model(cfg.model, 300)
    layers = model.model.layers
    assert apply_activation_checkpointing(model, "selective", 2) == [1]
    # A checkpointed layer's inner forward runs again in backward; hooks fire once per call.
    inner = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inner.__setitem__(i, inner[i] + 1))
    model(input_ids=torch.randint(0, 300, (2, 8))).logits.sum().backward()
    assert inner == [1, 2]
    assert set(model.state_dict()) == set(build_model(cfg.model, 300).state_dict())


def test_config_yaml_is_resolved_and_metrics_append(tmp_path):
    train_steps(tmp_path, ["train.max_steps=2"])
    saved = (tmp_path / "config.yaml").read_text()
    assert "max_steps: 2" in saved and "backend:" in saved
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
