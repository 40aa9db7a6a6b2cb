"""Telemetry: every metrics record carries consistent throughput, MFU, memory and comm fields;
TensorBoard / wandb (offline) sinks and profile=true write what they promise."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import compose, rank_train, train_steps
from multiproc import run_on_ranks

from gradcycle.config import validate
from gradcycle.profiling import time_split

# conf/experiment/cpu_smoke.yaml: the shapes the analytic FLOP counts below are written for.
H, L, FFN, SEQ, VOCAB = 64, 2, 128, 64, 512
LAYER_PARAMS = 4 * H * H + 3 * H * FFN + 2 * H  # q,k,v,o (no GQA) + gate/up/down + 2 RMSNorms
MATMUL_PARAMS = L * LAYER_PARAMS + H + VOCAB * H  # + final norm + lm_head (input table: lookup)
MODEL_FLOPS = 6 * MATMUL_PARAMS + 12 * L * H * SEQ  # per token (PaLM appendix B)
RECOMPUTE_FLOPS = L * (2 * LAYER_PARAMS + 4 * H * SEQ)  # one more forward of every layer
PEAK = 1.0e12  # conf/hardware/cpu.yaml: bf16_tflops=1.0, world 1


def test_every_record_has_consistent_throughput_mfu_memory_and_comm(tmp_path):
    records = train_steps(tmp_path, ["train.max_steps=3"])
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["tokens"] > 0 and r["step_time_s"] > 0
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["tokens"], rel=1e-9)
        assert 0 < r["mfu"] <= 1
        # MFU is the analytic model FLOPs of these shapes over the configured peak.
        assert r["mfu"] * PEAK / r["tokens_per_s"] == pytest.approx(MODEL_FLOPS, rel=1e-9)
        assert r["hfu"] == pytest.approx(r["mfu"], rel=1e-12)  # nothing is recomputed
        assert r["peak_mem_bytes"] > 10 * 2**20  # at least the interpreter + torch
        assert set(r["comm"]) == {"all_reduce", "all_gather", "reduce_scatter", "broadcast",
                                  "point_to_point"}  # fmt: skip
        assert all(v == {"calls": 0, "bytes": 0} for v in r["comm"].values())  # world 1
        assert "profile" not in r
    times = [r["time"] for r in records]
    assert times == sorted(times)


def test_recompute_tensorboard_wandb_offline_and_profile_trace(tmp_path):
    run_dir = tmp_path / "run"
    records = train_steps(run_dir, [
        "train.max_steps=3", "activation_checkpointing.mode=full", "logging.tensorboard=true",
        "logging.wandb.mode=offline", "profile=true", "profile_steps=[2]",
    ])  # fmt: skip
    k = records[0]["accumulation_steps"]
    for r in records:
        # Full checkpointing runs every layer's forward twice: hardware FLOPs, not model FLOPs.
        ratio = (MODEL_FLOPS + RECOMPUTE_FLOPS) / MODEL_FLOPS
        assert r["hfu"] / r["mfu"] == pytest.approx(ratio, rel=1e-9)
        assert 0 < r["mfu"] < r["hfu"] <= 1

    # profile=true: only the chosen step is profiled; its split partitions the step's wall time.
    assert [("profile" in r) for r in records] == [False, True, False]
    p = records[1]["profile"]
    parts = p["forward_backward_s"] + p["optimizer_s"] + p["comm_wait_s"] + p["other_s"]
    assert parts == pytest.approx(p["step_s"], abs=1e-6)
    assert p["forward_backward_s"] > p["other_s"] and p["optimizer_s"] > 0
    assert p["comm_wait_s"] == 0 and p["comm_busy_s"] == 0  # world 1: no collective
    assert p["step_s"] >= 0.99 * records[1]["step_time_s"]  # the profiled range encloses it
    assert p["alloc_peak_bytes"] > 0
    traces = sorted((run_dir / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0.step2.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = [e.get("name") for e in events]
    assert names.count("gradcycle.forward_backward") == k
    assert names.count("gradcycle.optimizer_step") == 1

    # TensorBoard: scalars per step, nested comm counts flattened into tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "tokens_per_s", "mfu", "hfu", "comm/all_reduce/calls"} <= tags
    assert "profile/comm_wait_s" in tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in records])

    # wandb offline: a local run file, no network.
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_profile_steps_outside_the_run_is_a_config_error():
    cfg = compose(["experiment=cpu_smoke", "profile=true", "profile_steps=[9]"])
    with pytest.raises(ValueError, match=r"profile_steps=\[9\].*train.max_steps=5"):
        validate(cfg)


def _ev(name, start, end, thread=1, children=(), device="cpu"):
    from torch.autograd import DeviceType

    dev = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           thread=thread, cpu_children=list(children), device_type=dev)  # fmt: skip


def test_time_split_counts_only_collective_time_not_hidden_behind_compute():
    # Step 0..100 us: forward/backward 0..60 (compute 0..30 and 50..60), optimizer 70..90
    # (compute 70..90). A collective runs 20..65 on a worker thread: 20..30 and 50..60 overlap
    # compute, so 30..50 and 60..65 are waiting (25 us), 20 of them inside forward/backward.
    events = [
        _ev("gradcycle.step", 0, 100),
        _ev("gradcycle.forward_backward", 0, 60),
        _ev("aten::mm", 0, 30),
        _ev("aten::mm", 50, 60),
        _ev("gradcycle.optimizer_step", 70, 90),
        _ev("aten::add_", 70, 90),
        _ev("gloo:all_reduce", 20, 65, thread=2),
        _ev("aten::linear", 0, 30, children=[object()]),  # a parent op is not counted twice
    ]
    s = time_split(events, "cpu")
    assert s["comm_wait_s"] == pytest.approx(25e-6)
    assert s["comm_busy_s"] == pytest.approx(45e-6)
    assert s["forward_backward_s"] == pytest.approx(40e-6)
    assert s["optimizer_s"] == pytest.approx(20e-6)
    assert s["other_s"] == pytest.approx(15e-6)
    assert s["step_s"] == pytest.approx(100e-6)


def test_two_rank_ddp_profile_sees_the_gradient_all_reduce(tmp_path):
    jobs = [(str(tmp_path / "ddp"), ["train.max_steps=2", "profile=true", "profile_steps=[2]"])]
    (records,) = run_on_ranks(rank_train, 2, (jobs,))[0]
    r = records[1]
    assert r["comm"]["all_reduce"]["calls"] == 1  # per_cycle: one bucketed all-reduce
    assert r["profile"]["comm_busy_s"] > 0
    assert 0 <= r["profile"]["comm_wait_s"] <= r["profile"]["comm_busy_s"] + 1e-9
    assert math.isfinite(r["mfu"]) and 0 < r["mfu"] <= 1
    traces = sorted(p.name for p in (tmp_path / "ddp" / "profile").iterdir())
    assert traces == ["rank0.step2.pt.trace.json", "rank1.step2.pt.trace.json"]


def test_collective_leaves_follow_the_installed_torch():
    """torch 2.13 counts the *_single leaves; a torch without them (2.11) counts the older names
    FSDP2 calls there, and never both."""
    from types import SimpleNamespace

    from gradcycle.telemetry import leaf_functions

    fn = lambda *a, **k: None  # noqa: E731
    new = SimpleNamespace(all_reduce=fn, broadcast=fn, all_gather=fn, reduce_scatter=fn,
                          all_gather_single=fn, reduce_scatter_single=fn,
                          all_gather_into_tensor=fn, reduce_scatter_tensor=fn)  # fmt: skip
    old = SimpleNamespace(all_reduce=fn, broadcast=fn, all_gather=fn, reduce_scatter=fn,
                          all_gather_into_tensor=fn, reduce_scatter_tensor=fn)  # fmt: skip
    assert "all_gather_single" in leaf_functions(new)
    assert "all_gather_into_tensor" not in leaf_functions(new)
    got = leaf_functions(old)
    assert {"all_gather_into_tensor", "reduce_scatter_tensor"} <= set(got)
    assert got["all_gather_into_tensor"][0] == "all_gather"
    assert got["reduce_scatter_tensor"][0] == "reduce_scatter"
