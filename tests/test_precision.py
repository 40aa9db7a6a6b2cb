"""CUDA defaults, shown on CPU: precision=auto (bf16 where the device computes it, TF32 for fp32 on
CUDA), one gradient reduction dtype for every backend (the dtype the collectives really carry on
2 ranks, DeepSpeed's generated config, the planner's bytes), and throughput/MFU counted in input
tokens, not loss targets."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY, compose, read_metrics
from multiproc import run_on_ranks

from gradcycle import hardware


# ---------------------------------------------------------------- precision=auto
def _cuda(monkeypatch, major: int, name: str = "NVIDIA H100 80GB HBM3", gib: float = 79.6):
    """A visible CUDA device of compute capability `major`, as torch.cuda's queries report it."""
    props = SimpleNamespace(major=major, minor=0, name=name, total_memory=int(gib * 2**30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.version, "hip", None)


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_cuda_with_native_bf16(monkeypatch):
    cfg = compose(TINY)
    assert cfg.precision == "auto"
    assert hardware.resolve_precision(cfg, "cpu").precision == "fp32"  # CPU runs unchanged
    _cuda(monkeypatch, major=9)
    assert hardware.resolve_precision(cfg, "cuda").precision == "bf16"
    resolved = hardware.resolve(cfg, "cuda")  # hardware=auto + precision=auto in one call
    assert (resolved.hardware.name, resolved.precision) == ("h100-80gb", "bf16")
    explicit = compose([*TINY, "precision=fp32"])
    assert hardware.resolve_precision(explicit, "cuda") is explicit  # an explicit choice stays
    _cuda(monkeypatch, major=7, name="Tesla V100-SXM2-32GB", gib=31.7)  # bf16 only emulated
    assert hardware.resolve_precision(cfg, "cuda").precision == "fp32"
    # the planner sizes a named target: its profile says whether it computes bf16
    plan = lambda hw: hardware.resolve(compose([*TINY, f"hardware={hw}"]), "cpu", True)  # noqa: E731
    assert plan("a100-40gb").precision == "bf16" and plan("h200-nvl").precision == "bf16"
    assert plan("cpu").precision == "fp32"


def test_fp32_on_cuda_runs_matmuls_in_tf32(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fp32 = compose([*TINY, "precision=fp32"])
    hardware.apply_precision(fp32, "cpu")
    hardware.apply_precision(compose([*TINY, "precision=bf16"]), "cuda")
    hardware.apply_precision(compose([*TINY, "precision=fp32", "tf32=false"]), "cuda")
    assert calls == [] and torch.backends.cudnn.allow_tf32 is False  # CPU, bf16, opted out
    hardware.apply_precision(fp32, "cuda")
    assert calls == ["high"] and torch.backends.cudnn.allow_tf32 is True
    line = hardware.precision_line(hardware.resolve_precision(compose(TINY), "cpu"), "auto", "cpu")
    assert (
        line.startswith("precision: fp32 (precision=auto: fp32 on cpu)") and "fp32 (backend" in line
    )
    assert "in TF32" in hardware.precision_line(fp32, "fp32", "cuda")


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))
)
def test_every_preset_keeps_or_states_its_precision(preset):
    cfg = compose([f"experiment={preset}"])
    if cfg.device == "cuda":  # the GPU presets say bf16 themselves
        assert cfg.precision == "bf16"
    else:  # cpu_smoke: auto, which is fp32 on the CPU it is for
        assert hardware.resolve_precision(cfg, "cpu").precision == "fp32"


# ---------------------------------------------------------------- backend.reduce_dtype
def _error(overrides: list[str]) -> str:
    from gradcycle.config import validate

    with pytest.raises(ValueError) as exc:
        validate(compose([*TINY, *overrides]))
    return str(exc.value)


def test_reduce_dtype_is_fp32_or_the_training_dtype():
    from gradcycle.config import validate

    validate(compose([*TINY, "precision=bf16", "backend.reduce_dtype=bf16"]))
    msg = _error(["precision=fp32", "backend.reduce_dtype=bf16"])
    assert "backend.reduce_dtype=bf16 with precision=fp32" in msg and "precision=bf16" in msg
    msg = _error(["precision=bf16", "backend.reduce_dtype=fp16"])
    assert "backend.reduce_dtype=fp32 or bf16" in msg
    msg = _error(["backend=zero2", "precision=bf16",
                  "+backend.deepspeed_config.communication_data_type=bf16"])  # fmt: skip
    assert "communication_data_type=bf16 contradicts backend.reduce_dtype=fp32" in msg


def test_generated_deepspeed_config_reduces_in_reduce_dtype():
    """Without communication_data_type DeepSpeed reduces bf16 runs in bf16 (its engine's
    communication_data_type property falls back to the model dtype); the generated config always
    states backend.reduce_dtype, in a form DeepSpeed's own parser reads."""
    from deepspeed.runtime.config import get_communication_data_type

    from gradcycle.backends.ds_config import build_ds_config
    from gradcycle.batching import plan_from_config

    def ds(*over):
        cfg = compose([*TINY, *over])
        return build_ds_config(cfg, plan_from_config(cfg, 2), on_gpu=False)

    for stage in (1, 2, 3):
        got = ds(f"backend=zero{stage}", "precision=bf16")
        assert get_communication_data_type(got) == torch.float32, stage
        half = ds(f"backend=zero{stage}", "precision=bf16", "backend.reduce_dtype=bf16")
        assert get_communication_data_type(half) == torch.bfloat16, stage
    assert ds("backend=zero2", "precision=fp16")["communication_data_type"] == "fp32"
    with pytest.raises(AssertionError, match="precision=auto"):
        ds("backend=zero2")  # an unresolved precision never reaches DeepSpeed


def _planned(backend: str, *over: str):
    from gradcycle.planner.plan import make_plan

    cfg = compose([f"backend={backend}", "model=llama-1b", "hardware=a100-40gb", "nodes=2",
                   "precision=bf16", "data.seq_len=2048", "train.global_batch_size=64",
                   "train.micro_batch_size=1", *over])  # fmt: skip
    return make_plan(cfg, searches=False).configured


@pytest.mark.parametrize("backend", ["ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp"])
def test_planner_prices_the_reduction_dtype(backend):
    fp32, bf16 = _planned(backend), _planned(backend, "backend.reduce_dtype=bf16")
    grads = lambda c: [x for x in c.colls if x.what.startswith(("gradients", "gradient "))]  # noqa: E731
    assert grads(fp32) and all("(fp32" in c.what for c in grads(fp32))
    assert all("(bf16" in c.what for c in grads(bf16))
    for a, b in zip(grads(fp32), grads(bf16), strict=True):
        assert a.nbytes == 2 * b.nbytes and a.calls == b.calls  # twice the bytes, same calls
    if backend == "zero3":  # the reduction bucket is allocated in the reduction dtype
        from gradcycle.planner.zero import temporaries

        static = [temporaries(c.setup, c.setup.zero)["static"] for c in (fp32, bf16)]
        assert static == [4 * 500_000_000, 2 * 500_000_000]
    if backend == "ddp":  # the comm hook's 16-bit copy of one 25 MiB bucket
        from gradcycle.planner.memory import temporaries

        assert temporaries(bf16.setup)["end"] == 25 * 2**20 / 2
        assert temporaries(fp32.setup)["end"] == 0


def test_plan_json_states_the_reduction_dtype(capsys):
    from gradcycle.planner.plan import main

    assert main(["backend=zero2", "model=llama-1b", "hardware=a100-40gb", "data.seq_len=2048",
                 "train.global_batch_size=64", "train.micro_batch_size=1",
                 "plan.format=json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == "bf16"  # precision=auto on an A100 target
    assert out["reduce_dtype"] == "fp32"
    reduce = [c for c in out["collectives"] if c["what"].startswith("gradients")]
    assert reduce and reduce[0]["what"] == "gradients (fp32)"


# The dtype each gradient collective carries, recorded under the collective counter (any
# floating tensor over 16 elements: the trainer's own float64 counts and scalar norms are not).
REDUCE_JOBS = {
    "ddp": ["backend=ddp"],
    "ddp bf16": ["backend=ddp", "backend.reduce_dtype=bf16"],
    "zero1": ["backend=zero1"],
    "zero2": ["backend=zero2"],
    "zero3": ["backend=zero3"],
    "fsdp": ["backend=fsdp"],
}
EXPECTED = {"ddp": "float32", "ddp bf16": "bfloat16", "zero1": "float32", "zero2": "float32",
            "zero3": "float32", "fsdp": "float32"}  # fmt: skip


def _reduced_dtypes(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from gradcycle.telemetry import leaf_functions
    from gradcycle.trainer import run

    seen: set = set()

    def tensor_of(name, args, kwargs):
        if name == "all_reduce":
            return args[0] if args else kwargs.get("tensor")
        if name == "reduce_scatter":
            return (args[1] if len(args) > 1 else kwargs.get("input_list"))[0]
        return args[1] if len(args) > 1 else kwargs.get("input")  # reduce_scatter_single/tensor

    for name in leaf_functions(c10d):
        if name.startswith(("all_reduce", "reduce_scatter")):
            original = getattr(c10d, name)

            def recorded(*args, _fn=original, _name=name, **kwargs):
                t = tensor_of(_name, args, kwargs)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 16:
                    seen.add((_name.removesuffix("_single"), str(t.dtype).removeprefix("torch.")))
                return _fn(*args, **kwargs)

            setattr(c10d, name, recorded)  # under the counter CommCounter.install() adds
            setattr(dist, name, recorded)
    out = {}
    for key, over in REDUCE_JOBS.items():
        seen.clear()
        run_dir = f"{root}/{key.replace(' ', '-')}"
        run(compose([*TINY, f"run_dir={run_dir}", "train.max_steps=1", "precision=bf16",
                     "checkpoint.at_end=false", *over]))  # fmt: skip
        out[key] = (sorted(seen), read_metrics(run_dir)[-1] if rank == 0 else None)
    return out


def test_two_ranks_reduce_gradients_in_the_configured_dtype(tmp_path):
    """bf16 on 2 gloo ranks: every backend's gradient collectives carry fp32 by default (ZeRO-1/2/3
    carried bf16 before, DeepSpeed's default), and bf16 when backend.reduce_dtype=bf16. DDP in
    fp32 reduces its fp32 buckets in the C++ reducer (no Python collective to see): the step
    records them from the buckets: twice the bf16 hook's bytes."""
    got = run_on_ranks(_reduced_dtypes, 2, args=(str(tmp_path),))[0]
    ops, record = got["ddp"]
    assert ops == [], ops
    sent = got["ddp bf16"][1]["comm"]["all_reduce"]  # the hook's bf16 copies, seen in Python
    assert record["comm"]["all_reduce"]["bytes"] == 2 * sent["bytes"] > 0, (record, sent)
    for key, want in EXPECTED.items():
        ops, record = got[key]
        if key == "ddp":
            continue
        assert ops and {dtype for _, dtype in ops} == {want}, (key, ops)
        assert {op for op, _ in ops} == ({"reduce_scatter"} if key in ("zero3", "fsdp")
                                         else {"all_reduce"}), (key, ops)  # fmt: skip
    a, b = got["ddp"][1], got["ddp bf16"][1]
    assert a["loss"] == b["loss"]  # the same forward; only the gradient's rounding differs
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-2 * a["grad_norm"]


# ---------------------------------------------------------------- tokens/s and MFU
def test_collate_counts_input_tokens_without_padding():
    import numpy as np

    from gradcycle.data.loader import collate

    host = collate([(np.arange(3), None), (np.arange(7), None)], pad_id=0)
    assert host.rows.shape[1:] == (2, 7)  # padded to the longest row: 14 positions
    assert (host.tokens, host.targets) == (10, 2 + 6)


def test_fine_tuning_mfu_counts_input_tokens(tmp_path, capsys):
    """data=stdlib_sft: the loss is on the docstring only, rows are padded. `tokens` (and so
    tokens/s and MFU) are the step's input tokens counted on the host from the batch, the loss's
    targets are `target_tokens`."""
    from gradcycle.data.loader import GlobalOrder
    from gradcycle.data.reader import open_dataset
    from gradcycle.data.sources import cache_root
    from gradcycle.trainer import run

    over = [*TINY, "data=stdlib_sft", "data.max_documents=1500", "train.max_steps=2",
            f"run_dir={tmp_path}", "checkpoint.at_end=false"]  # fmt: skip
    run(compose(over))
    assert "precision: fp32 (precision=auto: fp32 on cpu)" in capsys.readouterr().out
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    cfg = compose(over)
    samples = open_dataset(cfg, progress=False).samples("train", cfg.data)
    order = GlobalOrder(len(samples), cfg.seed, cache_root(cfg.data) / "order")
    g = cfg.train.global_batch_size
    for step, r in enumerate(records):
        inputs = sum(len(samples[int(i)][0]) for i in order.indices(step * g, g))
        assert r["tokens"] == inputs
        assert r["target_tokens"] < 0.8 * inputs  # prompts carry no loss: MFU was under-reported
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(inputs, rel=1e-9)
        # MFU is model FLOPs per token x input tokens/s over the peak (hardware=cpu: 1 TFLOP/s)
        mfu_per_token_s = r["mfu"] / r["tokens_per_s"]
        assert mfu_per_token_s * 1e12 == pytest.approx(_model_flops(cfg), rel=1e-9)
    assert records[-1]["tokens_seen"] == sum(r["tokens"] for r in records)


def _model_flops(cfg) -> float:
    m, seq, vocab = cfg.model, cfg.data.seq_len, cfg.data.vocab_size
    layer = 4 * m.hidden_size**2 + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size
    matmul = m.num_layers * layer + m.hidden_size + vocab * m.hidden_size
    return 6 * matmul + 12 * m.num_layers * m.hidden_size * seq
