"""The memory/communication planner: formulas against hand-computed cases, `auto`, presets, the
out-of-memory retry, and predicted vs measured peak memory of real CPU runs."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

import pytest
from conftest import ROOT, compose, train_steps

sys.path.insert(0, str(ROOT / "bench"))

PRESETS = ["llama-7b-1node", "llama-13b-1node", "llama-34b-4node", "llama-70b-8node"]


def _setup(**kw):
    from gradcycle.planner.memory import Setup, Shape

    shape = kw.pop("shape", Shape(32000, 4096, 32, 32, 32, 11008))
    base = dict(shape=shape, seq=2048, micro=1, accumulation=4, backend="fsdp", world=8, shard=8,
                precision="bf16")  # fmt: skip
    return Setup(**{**base, **kw})


# ---------------------------------------------------------------- formulas, by hand


def test_zero_paper_model_states():
    """ZeRO paper, Fig. 1: Ψ = 7.5B, N = 64 GPUs, K = 12 -> 120, 31.4, 16.6, 1.9 GB."""
    from gradcycle.planner.memory import zero_model_states

    got = [sum(zero_model_states(7.5e9, 64, stage).values()) / 1e9 for stage in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]


def test_backend_model_states_follow_the_paper():
    """The deepspeed backends with bf16 and Adam are the paper's formulas with Ψ from the shapes;
    fsdp keeps fp32 shards of everything (16 B/param over the shards)."""
    from gradcycle.planner.memory import model_states, zero_model_states
    from gradcycle.planner.zero import ZeroSettings

    for stage in (1, 2, 3):
        s = _setup(backend=f"zero{stage}", zero=ZeroSettings(persistence=0))
        want = zero_model_states(s.shape.n_params, 8, stage)
        assert model_states(s) == pytest.approx(want)
    fsdp = model_states(_setup())
    assert sum(fsdp.values()) == pytest.approx(16 * 6_738_415_616 / 8, rel=1e-3)  # padding only
    ddp = model_states(_setup(backend="ddp", world=1, shard=1))
    assert sum(ddp.values()) == 16 * 6_738_415_616


def test_parameter_counts_of_the_llama_shapes():
    """N from conf/model shapes equals the published Llama-2 counts."""
    from gradcycle.planner.plan import shape_from_config

    counts = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320,
              "llama-70b": 68_976_648_192}  # fmt: skip
    for name, n in counts.items():
        assert shape_from_config(compose([f"model={name}"])).n_params == n


def test_fsdp_padding_per_parameter():
    from gradcycle.planner.memory import Shape

    s = Shape(vocab=10, hidden=4, layers=1, heads=2, kv_heads=2, intermediate=6)
    # 10 rows over 3 shards -> 4 rows each on rank 0; hidden-size tensors 4 -> 2 rows
    assert s.shard_numel([(10, 4)], 3) == 16
    assert s.shard_numel([(4, 1)], 3) == 2
    assert s.model_shard(1) == s.n_params


def test_activation_bytes_by_hand():
    """Llama-7B layer, bf16 FSDP (bf16 residual): RMSNorm 4+2, one matmul input 2, q k v, SDPA
    output and its transpose 5 x 2 = 18 per hidden element for attention; MLP 6 + 2 + 4 x 2 x
    I/h = 29.5; plus SDPA's fp32 log-sum-exp per head. Full recompute keeps 2·s·b·h per layer."""
    from gradcycle.planner.memory import activations, layer_activation_bytes, numerics

    s = _setup(micro=2)
    per_token = layer_activation_bytes(s.shape, numerics("fsdp", "bf16"))
    assert per_token == 4096 * (18 + 8 + 8 * 11008 / 4096) + 4 * 32
    act = activations(_setup(micro=2, checkpointed=tuple(range(32))))
    assert act["layer_ckpt"] == 2 * 2048 * 2 * 4096
    assert act["saved"] < activations(s)["saved"] / 20
    # autocast over fp32 parameters (ddp bf16): fp32 residual and three bf16 casts for q, k, v
    auto = layer_activation_bytes(s.shape, numerics("ddp", "bf16"))
    assert auto == 4096 * (8 + 6 + 10 + 8 + 4 + 8 * 11008 / 4096) + 4 * 32


LLAMA_13B = (32000, 5120, 40, 40, 40, 13824)


def test_zero3_step_holds_one_sub_group_not_foreach_temporaries():
    """13B ZeRO-3 on 8 GPUs, micro-batch 1, full checkpointing (issue 10): the step converts one
    sub-group (sub_group_size = 1e9 elements) from a 16-bit flat copy to fp32, 6 bytes per
    element; fused AdamW adds nothing. Model states: 16-bit partition, 16-bit gradient partition
    buffer, fp32 master + moments = 16 bytes over 8 GPUs, and one 5e8-element bucket."""
    from gradcycle.planner.memory import GIB, Shape, estimate, temporaries
    from gradcycle.planner.zero import ZeroSettings, largest_sub_group, persistent_numel

    shape = Shape(*LLAMA_13B)
    setup = _setup(shape=shape, backend="zero3", accumulation=256, checkpointed=tuple(range(40)))
    sub = largest_sub_group(shape, setup.zero, 8)
    assert 1e9 <= sub < 1e9 + 13824 * 5120 / 8  # cut after the partition that reaches 1e9
    est = estimate(setup)
    assert est.phase == "optimizer step"
    assert est.breakdown["optimizer step buffers"] == 6 * sub
    psi, persistent = shape.n_params, persistent_numel(shape, setup.zero)
    # the 5e8-element bucket is allocated in the reduction dtype: fp32 (backend.reduce_dtype)
    want = 16 * psi / 8 + 2 * persistent + 4 * 5e8 + 6 * sub
    assert est.peak == pytest.approx(want, rel=1e-6) and est.peak / GIB < 32  # was 37.3
    smaller = _setup(shape=shape, backend="zero3", zero=ZeroSettings(sub_group=100_000_000))
    assert temporaries(smaller)["step"] < 6 * 1.1e8
    # fp32 models keep a master copy too (DeepSpeed's aliasing branch never matches)
    fp32 = _setup(shape=shape, backend="zero3", precision="fp32", zero=ZeroSettings(persistence=0))
    assert estimate(fp32).model_states["optimizer"] == pytest.approx(12 * psi / 8, rel=1e-6)


def test_fused_adamw_adds_no_step_buffer():
    """The optimizer is torch's fused AdamW: ddp and fsdp steps need no temporary; ZeRO-1/2 only
    the fp32 copy of the gradient partition (plus its 16-bit flat copy in bf16)."""
    from gradcycle.planner.memory import temporaries

    for backend, shard in (("ddp", 1), ("fsdp", 8), ("hsdp", 4)):
        assert temporaries(_setup(backend=backend, shard=shard))["step"] == 0
    psi = 6_738_415_616
    assert temporaries(_setup(backend="zero2"))["step"] == pytest.approx(6 * psi / 8, rel=1e-6)
    fp32 = temporaries(_setup(backend="zero1", precision="fp32"))
    assert fp32["step"] == pytest.approx(4 * psi / 8, rel=1e-6)


def test_zero3_gathered_parameters_follow_the_coordinator():
    """Replaying DeepSpeed's fetch/prefetch/release: a small model stays gathered whole (every
    reuse lies within stage3_max_reuse_distance); a large one runs at stage3_max_live_parameters
    (each fetch prefetches until that bound); reuse distance 0 with a low live bound keeps only
    the current module and the prefetch."""
    from gradcycle.planner.memory import Shape
    from gradcycle.planner.zero import ZeroSettings, gathered

    small = Shape(1024, 128, 4, 4, 4, 344)
    z = ZeroSettings(persistence=0, prefetch_bucket=200_000)
    assert gathered(small, (), z, 2)["at_loss"] == small.n_params
    lean = ZeroSettings(persistence=0, prefetch_bucket=50_000, max_reuse=0, max_live=100_000)
    largest_module = 344 * 128
    assert max(gathered(small, (), lean, 2).values()) <= 100_000 + 2 * (50_000 + largest_module)
    big = Shape(*LLAMA_13B)
    live = gathered(big, tuple(range(40)), ZeroSettings(), 8)
    assert all(1e9 <= v <= 1e9 + 2 * (5e7 + 5120 * 13824) for v in live.values())


def test_zero_settings_come_from_the_generated_deepspeed_config():
    """The planner reads the zero_optimization DeepSpeed gets (either key spelling, extras and
    backend.param_persistence_threshold included) and the accumulation dtype."""
    from gradcycle.planner.inputs import zero_settings
    from gradcycle.planner.zero import settings

    z = settings({"prefetch_bucket_size": 7, "stage3_max_live_parameters": 3e7},
                 {"grad_accum_dtype": "fp32"}, "bf16")  # fmt: skip
    assert (z.prefetch_bucket, z.max_live, z.grad_accum, z.comm) == (7, 30_000_000, 4, 2)
    zo = "+backend.deepspeed_config.zero_optimization"
    cfg = compose(["backend=zero3", "precision=bf16", "backend.param_persistence_threshold=0",
                   f"{zo}.reduce_bucket_size=1000", f"{zo}.sub_group_size=5"])  # fmt: skip
    z = zero_settings(cfg, "zero3")
    assert (z.persistence, z.reduce_bucket, z.sub_group, z.max_reuse) == (0, 1000, 5, 10**9)


def test_collectives_per_step():
    from gradcycle.planner.costs import collectives
    from gradcycle.planner.memory import Shape

    s = _setup(accumulation=4)
    psi = s.shape.n_params
    ops = {c.op: c for c in collectives(s, gpus_per_node=8)}
    # U = 34: embedding, 32 layers, norm + head (backends/fsdp.py)
    assert ops["all_gather"].calls == 4 * (2 * 34 - 1)  # K x (2U - 1)
    assert ops["reduce_scatter"].calls == 4 * 34  # K x U
    assert ops["reduce_scatter"].nbytes == pytest.approx(4 * psi * 4, rel=1e-3)  # fp32, K times
    cyc = {c.op: c for c in collectives(_setup(sync="per_cycle"), gpus_per_node=8)}
    assert cyc["all_gather"].calls == cyc["reduce_scatter"].calls == 34
    tied = _setup(shape=Shape(32000, 4096, 32, 32, 32, 11008, tie=True))  # one root unit
    assert {c.op: c.calls for c in collectives(tied, 8)}["reduce_scatter"] == 4 * 33
    ddp = collectives(_setup(backend="ddp", sync="per_cycle"), gpus_per_node=8)
    assert [c.op for c in ddp] == ["all_reduce"] and ddp[0].nbytes == 4 * psi


# ---------------------------------------------------------------- the plan and auto


def _plan_json(overrides: list[str]) -> dict:
    from gradcycle.planner.plan import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*overrides, "plan.format=json"]) == 0
    return json.loads(out.getvalue())


def test_presets_compose_build_on_meta_and_fit():
    from gradcycle.model import build_model, count_params
    from gradcycle.planner.plan import make_plan
    from gradcycle.validation import validate

    for name in PRESETS:
        cfg = compose([f"experiment={name}"])
        validate(cfg)
        assert cfg.hardware.name == "a100-40gb" and cfg.gpus_per_node == 8
        assert cfg.data.seq_len * cfg.train.global_batch_size == 4_194_304
        model = build_model(cfg.model, 32000, "meta")
        plan = make_plan(cfg)
        assert count_params(model) == plan.shape.n_params, name
        c = plan.configured
        assert c.est.peak <= plan.budget * cfg.plan.headroom, name
        assert c.micro * c.setup.accumulation * plan.world == cfg.train.global_batch_size
    js = _plan_json(["experiment=llama-70b-8node"])
    assert js["fits"] is True and js["world"] == 64 and js["micro_batch_size"] == 2
    for key in ("accumulation_steps", "sync", "activation_checkpointing", "peak_bytes_per_gpu"):
        assert js[key] is not None
    assert sum(js["breakdown"].values()) == pytest.approx(js["peak_bytes_per_gpu"], abs=16)


def test_sft_preset_needs_its_pretrained_model_and_fits(tmp_path, capsys):
    """experiment=sft-llama-7b-1node: refused without model.pretrained (one message naming it),
    and with a local Llama-2-7B-shaped folder the planner reads its shape and the preset fits."""
    from transformers import LlamaConfig

    from gradcycle.planner.plan import main, make_plan
    from gradcycle.validation import validate

    assert main(["experiment=sft-llama-7b-1node"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained is required" in err and "set model.pretrained=" in err
    LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=11008,
        max_position_embeddings=4096,
    ).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # the planner reads config.json only
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg = compose(["experiment=sft-llama-7b-1node", f"model.pretrained={tmp_path}",
                   f"data.path={ROOT / 'README.md'}"])  # fmt: skip
    validate(cfg, this_machine=False)
    assert (cfg.data.format, cfg.precision, cfg.backend.name) == ("chat", "bf16", "fsdp")
    plan = make_plan(cfg)
    assert round(plan.shape.n_params / 1e9, 2) == 6.74 and plan.world == 8
    c = plan.configured
    assert c.est.peak <= plan.budget * cfg.plan.headroom
    assert c.micro * c.setup.accumulation * plan.world == cfg.train.global_batch_size


def test_auto_keeps_the_global_batch():
    from gradcycle.batching import plan_from_config
    from gradcycle.planner.auto import resolve_auto

    base = ["model=llama-13b", "hardware=a100-40gb", "backend=fsdp", "precision=bf16",
            "data.seq_len=2048", "train.global_batch_size=2048", "train.micro_batch_size=auto",
            "activation_checkpointing.mode=full"]  # fmt: skip
    for world in (8, 16, 64):
        cfg = resolve_auto(compose(base), world, world // 8)
        bp = plan_from_config(cfg, world)
        assert bp.global_batch_size == 2048
        assert bp.micro_batch_size * bp.accumulation_steps * world == 2048
        assert cfg.backend.sync in ("per_micro", "per_cycle")
    # more GPUs shard the model states further: the chosen micro-batch never shrinks
    micros = [resolve_auto(compose(base), w, w // 8).train.micro_batch_size for w in (8, 64)]
    assert micros[1] >= micros[0] > 1


def test_auto_trains_with_the_same_global_batch(tmp_path):
    records = train_steps(tmp_path / "auto", ["train.micro_batch_size=auto", "train.max_steps=2"])
    r = records[-1]
    assert r["samples"] == 8 and r["micro_batch_size"] * r["accumulation_steps"] == 8


def test_planner_refuses_the_batch_training_refuses(capsys):
    """Global 16, micro 4 on 8 GPUs is 32 samples per pass: train.py refuses it, so must the
    planner (exit 2, training's own message), including the start-up path with sync=auto."""
    from gradcycle.batching import plan_from_config
    from gradcycle.planner.auto import resolve_auto
    from gradcycle.planner.plan import main, make_plan

    over = ["model=llama-7b", "backend=zero3", "nodes=1", "gpus_per_node=8"]
    with pytest.raises(ValueError) as training:
        plan_from_config(compose(over), 8)
    message = str(training.value)
    assert "train.global_batch_size=16" in message and "train.micro_batch_size=4" in message
    assert main(over) == 2
    out = capsys.readouterr()
    assert out.err.strip() == f"gradcycle.plan: error: {message}" and out.out == ""
    with pytest.raises(ValueError, match="is not divisible by") as planned:
        make_plan(compose(over))
    assert str(planned.value) == message
    with pytest.raises(ValueError) as started:
        resolve_auto(compose([*over, "backend.sync=auto"]), 8, 1)
    assert str(started.value) == message
    # micro_batch_size=auto cuts the same global batch and still plans
    js = _plan_json([*over, "hardware=a100-40gb", "precision=bf16", "train.micro_batch_size=auto"])
    assert js["fits"] and js["micro_batch_size"] * js["accumulation_steps"] * 8 == 16


def test_nothing_fits_says_what_would():
    from gradcycle.planner.auto import resolve_auto

    over = ["model=llama-70b", "hardware=a100-40gb", "backend=ddp", "precision=bf16",
            "data.seq_len=2048", "train.global_batch_size=512", "nodes=1"]  # fmt: skip
    js = _plan_json([*over, "train.micro_batch_size=1"])
    assert js["fits"] is False and js["recommendation"] is None
    changes = " ".join(a["change"] for a in js["alternatives"])
    assert "backend=zero3" in changes or "nodes=" in changes
    with pytest.raises(ValueError, match="nothing fits.*Fits: "):
        resolve_auto(compose([*over, "train.micro_batch_size=auto"]), 8, 1)


def test_warnings():
    from gradcycle.planner.plan import make_plan

    comm = make_plan(compose(["experiment=llama-70b-8node", "backend.reduce_dtype=fp32"]))
    assert any("too few to hide communication" in w for w in comm.warnings)
    tight = make_plan(compose(["experiment=llama-13b-1node", "train.micro_batch_size=8"]))
    assert any("% of the" in w for w in tight.warnings)
    bf16 = make_plan(compose(["experiment=llama-7b-1node", "backend=zero3", "backend.sync=auto"]))
    assert any("bf16 over K=256" in w for w in bf16.warnings)
    assert not make_plan(compose(["experiment=llama-7b-1node"])).warnings


def test_cli_text_report():
    from gradcycle.planner.plan import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["experiment=llama-13b-1node"]) == 0
    text = out.getvalue()
    for part in ("optimizer states", "activations per layer", "reduce_scatter gradients",
                 "tokens/s per GPU", "recommendation"):  # fmt: skip
        assert part in text


# ---------------------------------------------------------------- out of memory in the first step


def _oom_above(monkeypatch, limit: int):
    import torch

    from gradcycle.backends.ddp import DDPBackend

    real = DDPBackend.forward_backward

    def forward_backward(self, batch, loss_fn, last):
        if batch["input_ids"].shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch, loss_fn, last)

    monkeypatch.setattr(DDPBackend, "forward_backward", forward_backward)


def test_first_step_oom_halves_the_micro_batch(tmp_path, monkeypatch):
    _oom_above(monkeypatch, 1)
    records = train_steps(tmp_path / "oom", ["train.micro_batch_size=4", "train.max_steps=2"])
    assert [r["micro_batch_size"] for r in records] == [1, 1]
    assert [r["accumulation_steps"] for r in records] == [8, 8]  # global batch 8 kept


def test_oom_without_a_smaller_micro_batch_explains(tmp_path, monkeypatch):
    from gradcycle.planner.auto import MemoryPlanError

    _oom_above(monkeypatch, 0)
    with pytest.raises(MemoryPlanError, match="micro_batch_size=1.*planner predicted"):
        train_steps(tmp_path / "oom", ["train.micro_batch_size=2", "train.max_steps=2"])


# ---------------------------------------------------------------- predicted vs measured (CPU)


def test_cpu_peak_prediction_within_15_percent():
    """Real steps of small Llamas on one CPU rank, measured by the allocator (memory_check)."""
    import memory_check as mc

    cases = [mc.case("h128-L4", "ddp", 4, 2), mc.case("h128-L4", "ddp", 8, 2, ac="full"),
             mc.case("h64-L2", "ddp", 2, 1, precision="bf16")]  # fmt: skip
    for name, _, measured, predicted, _, _ in mc.measure(0, 1, cases):
        assert abs(predicted - measured) / measured < 0.15, (name, measured, predicted)


@pytest.mark.slow
def test_two_rank_peak_prediction_within_15_percent():
    import memory_check as mc
    from multiproc import run_on_ranks

    cases = [mc.case("h128-L4", "ddp", 4, 2), mc.case("h128-L4", "fsdp", 4, 2),
             mc.case("h128-L4", "fsdp", 8, 2, ac="full"), mc.case("h128-L4", "zero3", 4, 2)]  # fmt: skip
    rows = mc.max_over_ranks(run_on_ranks(mc.measure, 2, args=(cases,)))
    for name, _, measured, predicted, _, _ in rows:
        assert abs(predicted - measured) / measured < 0.15, (name, measured, predicted)


def test_planner_sizes_fp16_zero_for_the_target_not_this_cpu(monkeypatch):
    """A login node's CPU without fp16 kernels must not refuse to plan fp16 ZeRO for a GPU."""
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from gradcycle.planner.plan import main

    monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.ds_accelerator)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: False)
    js = _plan_json(["experiment=llama-13b-1node", "backend=zero3", "precision=fp16"])
    assert js["peak_bytes_per_gpu"] > 0
    with redirect_stdout(io.StringIO()):
        assert main(["experiment=llama-13b-1node", "backend=zero3", "precision=fp16"]) == 0


def test_zero1_bf16_counts_the_fp32_accumulation_buffer():
    from gradcycle.planner.plan import make_plan

    base = ["model=llama-1b", "hardware=a100-80gb", "backend=zero1", "data.seq_len=2048",
            "train.global_batch_size=64", "train.micro_batch_size=1", "nodes=1"]  # fmt: skip
    bf16 = make_plan(compose([*base, "precision=bf16"]))
    bf16_accum = make_plan(compose([*base, "precision=bf16",
                                    "+backend.deepspeed_config.data_types.grad_accum_dtype=bf16"]))  # fmt: skip
    psi = bf16.shape.n_params
    assert bf16.configured.est.model_states["gradients"] == psi * 6  # bf16 grads + fp32 sum
    assert bf16_accum.configured.est.model_states["gradients"] == psi * 2
