"""DeepSpeed config generation and every DeepSpeed user error, in process (no ranks): the
generated sections, batch keys and contradicting values refused, fp16 refused where DeepSpeed's
accelerator has no fp16 kernels (simulated, so any CPU proves it), the coalescing guard."""

from __future__ import annotations

import os

import pytest
from conftest import TINY, compose

WORLD = 2


def _plan(cfg):
    from gradcycle.batching import plan_from_config

    return plan_from_config(cfg, WORLD)


def test_generated_config_sections():
    from gradcycle.backends.ds_config import build_ds_config, resolve_sync

    cfg = compose([*TINY, "backend=zero3", "precision=bf16", "backend.offload_optimizer=true",
                   "backend.offload_param=true", "backend.param_persistence_threshold=100",
                   "train.grad_clip=0.5",
                   "+backend.deepspeed_config.zero_optimization.reduce_bucket_size=1000"])  # fmt: skip
    ds = build_ds_config(cfg, _plan(cfg), on_gpu=False)
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds and ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 1000  # merged, not replaced
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_param_persistence_threshold"] == 100
    for stage in (1, 2, 3):  # gradient reduction overlaps backward on every stage
        c = compose([*TINY, f"backend=zero{stage}", "precision=fp32"])
        assert build_ds_config(c, _plan(c), on_gpu=False)["zero_optimization"]["overlap_comm"]
    # bf16: ZeRO-1 accumulates in fp32 (BF16_Optimizer); ZeRO-2/3 have no such mode
    z1, z2 = (compose([*TINY, f"backend={b}", "precision=bf16"]) for b in ("zero1", "zero2"))
    assert build_ds_config(z1, _plan(z1), on_gpu=False)["data_types"]["grad_accum_dtype"] == "fp32"
    assert "data_types" not in build_ds_config(z2, _plan(z2), on_gpu=False)
    cfg16 = compose([*TINY, "backend=zero2", "precision=fp16"])
    fp16 = build_ds_config(cfg16, _plan(cfg16), on_gpu=False)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic loss scaling
    # auto: per_cycle where it is free (ZeRO-1), per_micro where it holds a full gradient
    auto = {b: resolve_sync(compose([*TINY, f"backend={b}"]).backend) for b in ("zero1", "zero2")}
    assert auto == {"zero1": "per_cycle", "zero2": "per_micro"}


def _error(overrides: list[str]) -> str:
    from gradcycle.config import validate

    with pytest.raises(ValueError) as exc:
        validate(compose([*TINY, *overrides]))
    return str(exc.value)


@pytest.mark.parametrize(
    "key", ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
)
def test_batch_key_in_deepspeed_config_is_rejected(key):
    msg = _error(["backend=zero2", f"+backend.deepspeed_config.{key}=64"])
    assert f"backend.deepspeed_config.{key}=64" in msg
    assert "train.global_batch_size" in msg and "train.micro_batch_size" in msg


@pytest.mark.parametrize("overrides,words", [
    (["backend=zero1", "backend.sync=per_micro"], ["backend.sync=per_micro", "zero1", "auto"]),
    (["backend=zero2", "+backend.deepspeed_config.optimizer.type=Adam"], ["optimizer", "optim."]),
    (["backend=zero2", "+backend.deepspeed_config.scheduler.type=WarmupLR"], ["scheduler"]),
    (["backend=zero2", "+backend.deepspeed_config.zero_optimization.stage=3"],
     ["zero_optimization.stage=3", "backend=zero3"]),
    (["backend=zero2", "precision=fp32", "+backend.deepspeed_config.bf16.enabled=true"],
     ["bf16.enabled=True", "precision=fp32"]),
    (["backend=zero2", "+backend.deepspeed_config.gradient_clipping=5.0"],
     ["gradient_clipping", "train.grad_clip"]),
    (["backend=zero2", "backend.param_persistence_threshold=0"],
     ["backend.param_persistence_threshold", "zero3"]),
    (["backend=ddp", "+backend.deepspeed_config.zero_optimization.stage=2"],
     ["backend.deepspeed_config", "backend=ddp"]),
    (["backend=zero3", "precision=bf16", "+backend.deepspeed_config.data_types.grad_accum_dtype=fp32"],
     ["grad_accum_dtype=fp32", "ignore it", "backend=zero1"]),
])  # fmt: skip
def test_deepspeed_user_errors_before_any_process(overrides, words):
    msg = _error(overrides)
    for word in words:
        assert word in msg, (word, msg)


def _fp16_kernels(monkeypatch, cpu: bool, cuda: bool | None = None):
    """Simulate a machine: DeepSpeed's CPU accelerator with or without fp16 support and, when
    `cuda` is given, a visible GPU whose accelerator answers `cuda`. Restores DeepSpeed's chosen
    accelerator and DS_ACCELERATOR afterwards."""
    import torch
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.ds_accelerator)
    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: cpu)
    if cuda is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(CUDA_Accelerator, "is_fp16_supported", lambda self: cuda)


@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3"])
def test_fp16_is_refused_where_deepspeed_has_no_fp16(monkeypatch, backend):
    # An AMD EPYC with avx512_bf16 but no oneDNN fp16 kernels, simulated on any CPU.
    _fp16_kernels(monkeypatch, cpu=False)
    msg = _error([f"backend={backend}", "precision=fp16"])
    assert f"precision=fp16 with backend={backend}" in msg
    assert "precision=bf16" in msg and "precision=fp32" in msg
    _fp16_kernels(monkeypatch, cpu=True)  # a CPU with the kernels: accepted
    from gradcycle.config import validate

    validate(compose([*TINY, f"backend={backend}", "precision=fp16"]))


def test_fp16_refusal_exits_2_before_anything_starts(monkeypatch, tmp_path, capsys):
    from gradcycle.cli import main

    _fp16_kernels(monkeypatch, cpu=False)
    run_dir = tmp_path / "run"
    code = main([*TINY, f"run_dir={run_dir}", "backend=zero2", "precision=fp16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("gradcycle: error:") == 1 and "precision=fp16" in err
    assert not run_dir.exists()  # nothing written, no process group


def test_fp16_check_asks_the_gpus_accelerator_on_a_gpu(monkeypatch):
    from gradcycle.config import validate

    # The CPU has no fp16 kernels but the run goes to the GPU, whose accelerator supports fp16.
    _fp16_kernels(monkeypatch, cpu=False, cuda=True)
    validate(compose([*TINY, "backend=zero2", "precision=fp16"]))
    assert "precision=fp16" in _error(["backend=zero2", "precision=fp16", "device=cpu"])
    _fp16_kernels(monkeypatch, cpu=False, cuda=False)  # e.g. a Pascal GPU: DeepSpeed says no
    assert "on this CUDA" in _error(["backend=zero2", "precision=fp16"])


def test_coalescing_with_bf16_on_zero2_is_valid(monkeypatch):
    # The spawn shows it coalesces (test_bf16_zero2_coalesces_gradient_reduction).
    from gradcycle.config import validate

    _fp16_kernels(monkeypatch, cpu=True)  # fp16 validity here is about coalescing, not kernels
    for backend in ("zero2", "zero3"):
        for precision in ("bf16", "fp16"):
            validate(compose([*TINY, f"backend={backend}", "backend.sync=per_cycle",
                              f"precision={precision}"]))  # fmt: skip


def test_optimizer_wrapper_without_coalescing_is_a_clear_error():
    # Should a DeepSpeed version pick a BF16/FP16_Optimizer wrapper for ZeRO-2/3, per_cycle must
    # fail with the fields to change, not DeepSpeed's NotImplementedError mid-cycle.
    from types import SimpleNamespace

    from gradcycle.backends.deepspeed import DeepSpeedBackend

    class BF16_Optimizer:  # what DeepSpeed names its wrapper; it has no coalescing hook
        pass

    be = DeepSpeedBackend.__new__(DeepSpeedBackend)
    be.name, be.cfg = "zero2", SimpleNamespace(precision="bf16")
    be.engine = SimpleNamespace(optimizer=BF16_Optimizer())
    with pytest.raises(ValueError, match="backend.sync=per_cycle.*precision=bf16.*BF16_Optimizer"):
        be._check_coalescing()
