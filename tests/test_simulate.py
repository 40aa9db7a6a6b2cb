"""python -m gradcycle.simulate: one rank of a large job on fake tensors, held to the planner.

All in this process (the fake process group needs no peers): the contract at scale on llama-1b
widths with 4 layers over 16 fake ranks, the other backends on the CPU test model, the attention
kernels, point-to-point counting and bad input.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose

from gradcycle.simulate import main, simulate

# llama-1b widths (vocab 32000, hidden 2048, GQA 32/4), 4 layers, over 2 nodes x 8 = 16 ranks
DATA = [t for t in TINY if not t.startswith("experiment=")]  # the small corpus, not its model
SCALE = [*DATA, "model=llama-1b", "model.num_layers=4", "backend=fsdp", "nodes=2", "gpus_per_node=8",
         "hardware=a100-40gb", "precision=bf16", "train.global_batch_size=null"]  # fmt: skip


def _sim(*overrides: str) -> dict:
    return simulate(compose(list(overrides)))


def _ops(comm: dict) -> dict:
    return {op: (c["calls"], c["bytes"]) for op, c in comm.items() if c["calls"]}


@pytest.fixture(scope="module")
def scale():
    runs = {}
    for sync in ("per_cycle", "per_micro"):
        for micro, k in ((1, 4), (1, 8), (2, 4)):
            if sync == "per_micro" and (micro, k) != (1, 4):
                continue
            runs[sync, micro, k] = _sim(*SCALE, f"backend.sync={sync}", "simulate.rank=5",
                                        f"train.micro_batch_size={micro}",
                                        f"train.accumulation_steps={k}")  # fmt: skip
    return runs


def test_reductions_do_not_grow_with_k_on_per_cycle(scale):
    k4, k8 = scale["per_cycle", 1, 4], scale["per_cycle", 1, 8]
    assert (k4["world_size"], k4["accumulation_steps"], k8["accumulation_steps"]) == (16, 4, 8)
    units = 4 + 2  # embedding, 4 layers, norm + head
    for op in ("reduce_scatter", "all_reduce", "all_gather"):
        assert _ops(k4["comm"]).get(op) == _ops(k8["comm"]).get(op), op
    assert _ops(k4["comm"])["reduce_scatter"][0] == units
    assert _ops(k4["comm"])["all_gather"][0] == units
    assert "all_reduce" not in _ops(k4["comm"])


def test_all_gathers_follow_the_sync_plan(scale):
    for key, r in scale.items():
        # the planner's numbers (planner/costs.py) and the start-up sync plan's text, exactly
        assert _ops(r["comm"]) == _ops(r["planner_comm"]), key
        claimed = {name: int(count.split("x")[0]) for name, count in r["sync_plan"]}
        assert claimed["parameter all-gather"] == r["comm"]["all_gather"]["calls"], key
        assert claimed["gradient reduce-scatter"] == r["comm"]["reduce_scatter"]["calls"], key
    per_micro = scale["per_micro", 1, 4]["comm"]
    assert per_micro["all_gather"]["calls"] == 4 * (2 * 6 - 1)  # K x (2U - 1)
    assert per_micro["reduce_scatter"]["calls"] == 4 * 6


def test_peak_grows_with_the_micro_batch_not_with_k(scale):
    k4, k8, m2 = (scale[("per_cycle", *c)]["peak_bytes"] for c in ((1, 4), (1, 8), (2, 4)))
    assert abs(k8 - k4) <= 0.01 * k4, (k4, k8)
    assert m2 > 1.05 * k4, (k4, m2)
    # Each category's own maximum: the step's peak moves (micro 1: the head's forward; micro 2:
    # the top layer's backward), so the split at the peak compares two different points. The
    # activations' maximum is the micro-batch's saved tensors, which double, plus the chunked
    # loss's head gradient (vocab x hidden, the same size at any micro-batch): more than 1.6x,
    # never more than 2x.
    act1, act2 = (scale[("per_cycle", m, 4)]["category_max"]["activations"] for m in (1, 2))
    assert 1.6 * act1 < act2 <= 2.05 * act1, (act1, act2)
    for r in scale.values():
        # a whole cycle ran: the steady-state step peaks after its first micro-batch
        assert r["steps"][1]["peak_at"].startswith("step 2, micro-batch"), r["steps"][1]
        assert r["attention_kernels"] == {"flash": 2 * r["accumulation_steps"] * 4}
        assert 0.85 < r["peak_ratio"] < 1.15, (r["peak_bytes"], r["planner_peak_bytes"])


def test_sharded_states_are_one_sixteenth(scale):
    r = scale["per_cycle", 1, 4]
    shard = r["by_category"]["parameters"]
    assert r["by_category"]["optimizer state"] == pytest.approx(2 * shard, rel=1e-3)  # AdamW
    assert shard == pytest.approx(r["planner_by_category"]["parameters"], rel=1e-6)


def test_other_backends_and_the_json_output(capsys):
    small = ["hardware=a100-40gb", "train.global_batch_size=8", "train.micro_batch_size=1"]
    assert main([*TINY, *small, "backend=hsdp", "nodes=2", "gpus_per_node=2",
                 "simulate.rank=3", "simulate.format=json"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    for key in ("peak_bytes", "planner_peak_bytes", "by_category", "comm", "planner_comm",
                "world_size", "accumulation_steps", "wall_s"):  # fmt: skip
        assert key in r, key
    assert (r["world_size"], r["accumulation_steps"], r["backend"]) == (4, 2, "hsdp")
    # hsdp 2 x 2: the replica all-reduce once per cycle, as the planner says
    assert _ops(r["comm"]) == _ops(r["planner_comm"])
    assert r["comm"]["all_reduce"]["calls"] == 4  # U
    ddp = _sim(*TINY, *small, "backend=ddp", "nodes=1", "gpus_per_node=2", "simulate.rank=1")
    assert ddp["comm"]["all_reduce"]["calls"] == 1  # one bucket per cycle (no_sync before)
    assert ddp["by_category"]["parameters"] == ddp["planner_by_category"]["parameters"]
    assert 0.8 < ddp["peak_ratio"] < 1.2


def test_attention_allocates_what_the_target_kernel_saves():
    """flash and efficient save the output and a log-sum-exp; math saves b·h·T² scores."""
    from gradcycle.sim.attention import TargetAttention, kernel
    from gradcycle.sim.tracker import MemoryTracker
    from gradcycle.sim.world import SimTensorMode

    bf16, b, h, t, d = torch.bfloat16, 2, 8, 1024, 64
    q, kv, mask = (torch.empty(b, h, t, d, dtype=bf16), torch.empty(b, h // 2, t, d, dtype=bf16),
                   torch.ones(1, 1, t, t, dtype=torch.bool))  # fmt: skip
    assert kernel("a100-40gb", q, kv, None) == "flash"
    assert kernel("a100-40gb", q, q, mask) == "efficient"
    assert kernel("a100-40gb", q.float(), kv.float(), None) == "math"  # fp32 + GQA
    assert kernel("cpu", q, kv, None) == "cpu_flash"
    saved = {}
    for dtype, gqa in ((bf16, True), (torch.float32, False), (torch.float32, True)):
        tracker = MemoryTracker(1)
        with SimTensorMode(), tracker:
            q = torch.empty(b, h, t, d, dtype=dtype, requires_grad=True)
            k, v = (torch.empty(b, h // 2 if gqa else h, t, d, dtype=dtype) for _ in "kv")
            before = tracker.total
            attention = TargetAttention("a100-40gb")
            out = attention(q, k, v, is_causal=True, enable_gqa=gqa)
            saved[next(iter(attention.seen))] = tracker.total - before
            del out
    out_bytes = b * h * t * d
    assert saved["flash"] == pytest.approx(out_bytes * 2 + b * h * t * 4, rel=0.01)  # + lse
    assert saved["efficient"] == pytest.approx(out_bytes * 4 + b * h * t * 4, rel=0.01)
    assert saved["math"] >= b * h * t * t * 4  # the fp32 scores (and their softmax)


def test_point_to_point_is_counted():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from gradcycle.telemetry import CommCounter

    counter = CommCounter.instance()
    counter.install()
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        counter.take()
        t = torch.zeros(256)
        dist.send(t, dst=1)
        dist.recv(t, src=1)
        ops = [dist.P2POp(dist.isend, t, 1), dist.P2POp(dist.irecv, t, 1)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        assert counter.take()["point_to_point"] == {"calls": 4, "bytes": 4 * 1024}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overrides, field", [
    (["nodes=2", "gpus_per_node=8", "simulate.rank=16"], "simulate.rank=16"),
    (["nodes=3", "gpus_per_node=8", "train.global_batch_size=16"], "train.global_batch_size"),
    (["backend=zero3"], "backend=zero3"),
    (["hardware=auto"], "hardware=auto"),
    (["backend=hsdp", "backend.replicate=3"], "backend.replicate=3"),
])  # fmt: skip
def test_bad_input_exits_2_before_anything_runs(capsys, overrides, field):
    base = ["hardware=a100-40gb", "train.micro_batch_size=1"]
    assert main([*TINY, *base, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradcycle.simulate: error:") and field in err, err
    assert err.count("\n") == 1  # one message
