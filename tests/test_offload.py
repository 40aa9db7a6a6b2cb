"""Host offload: ZeRO-3 / FSDP2 offload runs equal the plain runs, DeepSpeed's fp32 gradient
accumulation buffers, the planner's host and PCIe terms against hand arithmetic, the checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import TINY, compose, rank_train
from multiproc import run_on_ranks

from gradcycle.planner import host, zero
from gradcycle.planner.inputs import make_setup, shape_from_config

GIB = 2**30
RUNS = [
    ("zero3", ["backend=zero3"]),
    ("zero3-opt", ["backend=zero3", "backend.offload_optimizer=true"]),
    (
        "zero3-both",
        ["backend=zero3", "backend.offload_optimizer=true", "backend.offload_param=true"],
    ),
    ("fsdp", ["backend=fsdp"]),
    ("fsdp-off", ["backend=fsdp", "backend.offload_param=true"]),
]


def _ranks(rank: int, world: int, tmp: str) -> dict:
    """Every training run of the module in one spawn, then DeepSpeed's accumulation buffers."""
    import functools

    import torch

    from gradcycle.backends import build_backend
    from gradcycle.model import build_model
    from gradcycle.trainer import token_loss

    jobs = [(f"{tmp}/{name}", [*o, "train.max_steps=3", "checkpoint.at_end=false"])
            for name, o in RUNS]  # fmt: skip
    out = {"runs": dict(zip([n for n, _ in RUNS], rank_train(rank, world, jobs), strict=True))}
    dtypes = {}
    for stage in (2, 3):
        cfg = compose([*TINY, f"run_dir={tmp}/accum{stage}", f"backend=zero{stage}",
                       "precision=bf16", "model.vocab_size=512",
                       "+backend.deepspeed_config.data_types.grad_accum_dtype=fp32"])  # fmt: skip
        b = build_backend(cfg, functools.partial(build_model, cfg.model, 512),
                          torch.device("cpu"), world, Path(cfg.run_dir))  # fmt: skip
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(rank))
        batch = {"input_ids": ids, "labels": ids.clone()}
        b.forward_backward(batch, functools.partial(token_loss, norm=64.0), last=True)
        opt = b.engine.optimizer
        if stage == 3:
            dtypes[stage] = str(opt.grad_partitions_flat_buffer.dtype)
        else:  # the compact fp32 partition the boundary builds (stage_1_and_2.py l. 1259-1290)
            dtypes[stage] = str(opt.averaged_gradients[0][0].dtype)
        b.close()
    out["accum"] = dtypes
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(_ranks, 2, args=(str(tmp_path_factory.mktemp("offload")),))[0]


@pytest.mark.parametrize("plain,offloaded", [("zero3", "zero3-opt"), ("zero3", "zero3-both"),
                                             ("fsdp", "fsdp-off")])  # fmt: skip
def test_offload_trains_like_the_plain_run(ranks, plain, offloaded):
    a, b = ranks["runs"][plain], ranks["runs"][offloaded]
    assert not hasattr(a, "traceback") and not hasattr(b, "traceback"), (a, b)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-6), (x["loss"], y["loss"])
        assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-6)
        assert x["host_step_s"] is None and y["host_step_s"] > 0  # the host optimizer, timed
        assert y["host_rss_bytes"] > 2**27 and y["pinned_bytes"] == 0  # CPU: nothing pinned
    assert a[-1]["loss"] != a[0]["loss"]  # it trained


def test_zero2_and_zero3_accumulate_in_fp32_when_asked(ranks):
    assert ranks["accum"] == {2: "torch.float32", 3: "torch.float32"}


# ---------------------------------------------------------------- planner terms, by hand

P70 = ["experiment=llama-70b-1node-offload"]


def _setup(overrides, world=8, nodes=1):
    from gradcycle.planner.plan import _target

    cfg = _target(compose(overrides))
    setup = make_setup(cfg, shape_from_config(cfg), world, nodes, 1, "per_micro", ("full", 2))
    return cfg, setup


def test_host_terms_of_the_70b_preset_by_hand():
    cfg, s = _setup(P70)
    h = host.inputs_from_config(cfg, 8, "cuda")
    est = host.estimate(s, h)
    # a decoder layer: 2h^2 (q, o) + 2*1024*h (k, v) + 3*h*28672 (MLP) + 2h = 855,654,400; 80 of
    # them + 2*32000*h + h = 68,976,648,192 parameters, every tensor divisible by 8 ranks
    part = 68_976_648_192 // 8
    assert s.shape.n_params == 68_976_648_192 and zero_partition(s) == part
    # pinned: the fp32 accumulation buffer (34.49 GB, one block) and the fp32 gradient of each
    # optimizer sub-group: nine of ~1e9 elements (2-D weights) and the 1-D weights' 164,864;
    # above gradcycle's 64 MiB threshold blocks are exact, below it a power of two
    subs = host._sub_groups(s)
    assert len(subs) == 10 and sum(subs) == part and subs[-1] == 161 * 8192 // 8

    def rounded(b, threshold=64 * 2**20):
        return b if b > threshold else 2 ** math.ceil(math.log2(b))

    pinned = part * 4 + sum(rounded(x * 4) for x in subs)
    plain = part * (4 + 8)  # fp32 master + AdamW moments
    other = 3 * GIB + 2 * 0.5 * GIB + 4096 * 2 * 2 * 4 + 2 * 8 * 2**20  # process, workers, cache
    assert est.node == pytest.approx(8 * (pinned + plain + other), rel=1e-12)
    assert est.pinned_requested == 8 * part * 8
    # torch's default rounding: 34.49 GB -> 64 GiB, each ~4.1 GB sub-group -> 4 GiB
    by_hand = 64 * GIB + sum(rounded(x * 4, math.inf) for x in subs)
    assert est.pinned_power_of_two == pytest.approx(8 * by_hand)
    assert est.rounding_saving == pytest.approx(8 * (by_hand - pinned))
    # PCIe per GPU and micro-batch: the gradient partition down, from the second micro-batch on
    # the running fp32 sum up and down again; 24 GB/s shared by two GPUs per uplink
    t = host.offload_time(s, h)
    assert t.pcie_down_micro == part * 4 and t.pcie_up_micro == pytest.approx(part * 4 * 63 / 64)
    assert t.pcie_micro_s == pytest.approx(part * 4 / 12e9)
    assert t.pcie_step_s == pytest.approx(part * 2 / 12e9)  # the updated bf16 partition up
    # host AdamW: 16 cores x 0.5 Gparam/s, capped by 300 GB/s / 8 ranks / 28 B per parameter
    assert t.host_step_s == pytest.approx(part / (300e9 / 8 / 28))


def test_host_terms_of_fsdp_cpu_offload_by_hand():
    cfg, s = _setup(["model=llama-7b", "hardware=a100-40gb", "backend=fsdp", "precision=bf16",
                     "backend.offload_param=true", "data.seq_len=2048", "data.num_workers=0",
                     "train.global_batch_size=64", "train.micro_batch_size=1"])  # fmt: skip
    h = host.inputs_from_config(cfg, 8, "cuda")
    est = host.estimate(s, h)
    shard = s.shape.model_shard(8)
    blocks = [math.ceil(r / 8) * c * 4 for r, c in s.shape.layer_tensors() * 32
              + s.shape.root_tensors()]  # fmt: skip
    pinned = 2 * sum(2 ** math.ceil(math.log2(b)) if b <= 64 * 2**20 else b for b in blocks)
    assert est.pinned_allocated == pytest.approx(8 * pinned)
    assert est.per_rank["optimizer states"] == shard * 8
    t = host.offload_time(s, h)
    assert t.pcie_up_micro == 2 * shard * 4 and t.pcie_down_micro == shard * 4  # fp32 reduce
    assert t.host_params == shard


def test_planner_refuses_a_host_that_cannot_hold_it():
    from gradcycle.model import build_model, count_params
    from gradcycle.planner.plan import make_plan
    from gradcycle.planner.report import render_json
    from gradcycle.validation import validate

    cfg = compose(P70)
    validate(cfg)
    assert cfg.data.seq_len * cfg.train.global_batch_size == 4096 * 512
    plan = make_plan(cfg)
    assert count_params(build_model(cfg.model, 32000, "meta")) == plan.shape.n_params
    assert plan.configured.setup.accumulation == 64 and plan.configured.micro == 1
    ok = render_json(plan)
    assert ok["fits"] and ok["host_fits"] and ok["step_time_s"] > ok["exposed_comm_s"]
    assert ok["offload"]["exposed_s"] > ok["offload"]["host_step_s"] > 0
    small = render_json(make_plan(compose([*P70, "hardware.host_memory_gb=1024"])))
    assert small["fits_gpu"] and not small["host_fits"] and not small["fits"]
    assert any("DOES NOT FIT ON THE HOST" in w for w in small["warnings"])
    assert small["host_memory_bytes"] == ok["host_memory_bytes"] > 1024 * GIB


def test_start_up_check_refuses_before_any_process_group():
    from gradcycle.offload import check_host

    cfg = compose(P70)
    need = 1317  # GiB per node, test above
    check_host(cfg, 8, 8, "cuda", memory_gib=2048)  # fits
    with pytest.raises(ValueError, match=r"host memory: .* needs 1,3\d\d GiB per node") as e:
        check_host(cfg, 8, 8, "cuda", memory_gib=need - 100)
    assert "more nodes" in str(e.value) and "offload_device=nvme" in str(e.value)


@pytest.mark.parametrize("overrides,words", [
    (["backend=fsdp", "backend.offload_optimizer=true"], ["no optimizer-only", "offload_param=true"]),
    (["backend=ddp", "backend.offload_optimizer=true"], ["backend=zero1|zero2|zero3"]),
    (["backend=zero2", "backend.offload_param=true"], ["zero3", "fsdp"]),
    (["backend=fsdp", "backend.offload_param=true", "backend.offload_device=nvme"], ["DeepSpeed"]),
    (["backend=zero3", "backend.offload_optimizer=true", "backend.offload_device=nvme"],
     ["backend.nvme_path"]),
    (["backend=zero3", "backend.offload_device=nvme", "backend.nvme_path=/tmp"], ["offloads nothing"]),
])  # fmt: skip
def test_offload_config_errors(overrides, words):
    from gradcycle.validation import validate

    with pytest.raises(ValueError) as e:
        validate(compose(overrides))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_nvme_needs_the_async_io_op(monkeypatch, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from gradcycle.validation import validate

    cfg = compose(["backend=zero3", "backend.offload_optimizer=true",
                   "backend.offload_device=nvme", f"backend.nvme_path={tmp_path}"])  # fmt: skip
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"async_io": False})
    with pytest.raises(ValueError, match="libaio-dev.*DS_BUILD_AIO=1"):
        validate(cfg)
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    validate(cfg)
    from gradcycle.backends.ds_config import build_ds_config
    from gradcycle.batching import plan_from_config

    z = build_ds_config(compose([*cfg_overrides(cfg), "precision=fp32"]), plan_from_config(cfg, 1),
                        on_gpu=False)["zero_optimization"]  # fmt: skip
    assert z["offload_optimizer"] == {"device": "nvme", "pin_memory": False,
                                      "nvme_path": str(tmp_path)}  # fmt: skip


def cfg_overrides(cfg) -> list[str]:
    return ["backend=zero3", "backend.offload_optimizer=true", "backend.offload_device=nvme",
            f"backend.nvme_path={cfg.backend.nvme_path}"]  # fmt: skip


def test_pinned_threshold_is_known_to_this_torch():
    from gradcycle import offload

    assert offload.pinned_threshold_supported()  # torch 2.13 (constraints.txt) has the option
    assert "pinned_max_cached_size_mb:64" in offload.PINNED_SETTINGS


def zero_partition(s) -> int:
    return zero._partitions(s.shape, s.world)[0]
