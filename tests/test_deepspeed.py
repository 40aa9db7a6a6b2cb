"""DeepSpeed ZeRO-1/2/3: collectives per cycle, exact accumulation, precision, state round trip.

ONE 2-rank spawn trains every configuration through the real trainer (conftest.rank_train) and
then runs the direct backend checks (init, non-finite skip, save/load); the single-process
references run in this process (conftest.train_steps, backend=ddp, micro-batch = global batch).
The spawn reports per configuration: one that fails fails only its own tests. fp16 runs only
where DeepSpeed's accelerator supports it on this CPU (oneDNN fp16 kernels); elsewhere exactly the
fp16 cases skip, with the reason; the refusal itself is tested by simulating that CPU in
test_ds_config.py (with the other in-process config checks).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from conftest import RAGGED, TINY, JobFailed, JobResults, compose, rank_train, train_steps
from multiproc import run_on_ranks

WORLD, MICRO, STEPS = 2, 2, 3


def _fp16_supported() -> bool:
    from gradcycle.backends.ds_config import deepspeed_supports_fp16

    return deepspeed_supports_fp16("cpu")


FP16 = _fp16_supported()
NO_FP16 = "DeepSpeed reports no fp16 support on this CPU (no oneDNN fp16 kernels)"
# Ragged documents (one per sample, lengths varying > 10x); the vocabulary pinned for the table.
SGD = ["optim=sgd", *RAGGED, "model.vocab_size=512", f"train.max_steps={STEPS}",
       "checkpoint.at_end=false"]  # fmt: skip
# ZeRO-3 gathering every parameter-holding module on its own, in forward and again in backward:
# nothing persistent, no prefetch bucket merging modules, nothing kept from forward to backward.
Z3_PER_MODULE = [
    "backend.param_persistence_threshold=0",
    "+backend.deepspeed_config.zero_optimization.stage3_prefetch_bucket_size=0",
    "+backend.deepspeed_config.zero_optimization.stage3_max_reuse_distance=0",
]
POLICIES = [("zero1", "per_cycle"), ("zero2", "per_cycle"), ("zero2", "per_micro"),
            ("zero3", "per_cycle"), ("zero3", "per_micro")]  # fmt: skip


def _job(backend: str, sync: str, k: int, *extra: str) -> list[str]:
    z3 = Z3_PER_MODULE if backend == "zero3" else []
    return [f"backend={backend}", f"backend.sync={sync}", f"train.micro_batch_size={MICRO}",
            f"train.global_batch_size={MICRO * WORLD * k}", *SGD, *z3, *extra]  # fmt: skip


def _bf16(backend: str, sync: str) -> list[str]:
    return [f"backend={backend}", f"backend.sync={sync}", "precision=bf16", "optim=sgd",
            "train.max_steps=4", f"train.micro_batch_size={MICRO}",
            f"train.global_batch_size={MICRO * WORLD * 2}", "checkpoint.at_end=false"]  # fmt: skip


DOCMASK = ["data.packing=true", "data.document_mask=true"]  # the ragged documents packed, masked
JOBS: dict[str, list[str]] = {f"{b}-{s}-k{k}": _job(b, s, k) for b, s in POLICIES for k in (1, 4)}
JOBS["zero2-per_cycle-k4-adamw"] = _job("zero2", "per_cycle", 4, "optim=adamw")
# Decay large enough to move the loss visibly within 3 steps: a ZeRO-3 run whose matrices landed
# in the no-decay group (partitioned shapes are (0,)) would not match.
WD = ["optim=adamw", "optim.weight_decay=10", "optim.warmup_steps=0"]
JOBS["zero3-per_micro-k4-adamw-wd"] = _job("zero3", "per_micro", 4, *WD)
JOBS["zero2-per_micro-k4-ac"] = _job("zero2", "per_micro", 4, "activation_checkpointing.mode=full")
JOBS["zero3-per_cycle-k4-ac"] = _job("zero3", "per_cycle", 4, "activation_checkpointing.mode=full")
JOBS["zero3-per_cycle-k4-docmask"] = _job("zero3", "per_cycle", 4, *DOCMASK)
JOBS["zero1-bf16"] = _bf16("zero1", "per_cycle")
JOBS["zero2-bf16-per_cycle"] = _bf16("zero2", "per_cycle")
JOBS["zero3-bf16"] = _bf16("zero3", "per_cycle") + ["backend.param_persistence_threshold=0"]

# Direct checks: a backend built by hand, K=2, on random ragged batches (vocabulary fixed).
DIRECT = {
    "zero2": ["backend=zero2", "backend.sync=per_cycle"],
    "zero3": ["backend=zero3", "backend.param_persistence_threshold=0"],
}
if FP16:
    DIRECT["zero2-fp16"] = ["backend=zero2", "precision=fp16"]


# -- what runs on the ranks --------------------------------------------------------------------
def _rank_main(rank: int, world: int, jobs: list, direct_root: str):
    records = rank_train(rank, world, jobs)
    return records, _direct_checks(rank, world, Path(direct_root))


def _batches(rank: int, step: int, k: int, vocab: int) -> list[dict]:
    import torch

    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(1000 * step + 10 * rank + i)
        ids = torch.randint(0, vocab, (MICRO, 32), generator=g)
        labels = ids.clone()
        for row in range(MICRO):  # ragged: each row keeps a different number of targets
            labels[row, int(torch.randint(4, 32, (1,), generator=g)) :] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _direct_checks(rank: int, world: int, root: Path) -> dict | None:
    from gradcycle import distributed

    distributed.init_process_group(distributed.read_env(), _cpu(), 120)
    results = {}
    for name, overrides in DIRECT.items():
        try:
            results[name] = _direct_one(rank, world, root / name, overrides)
        except Exception:
            import traceback

            results[name] = JobFailed(traceback.format_exc())
    return JobResults(results) if rank == 0 else None


def _cpu():
    import torch

    return torch.device("cpu")


def _direct_one(rank: int, world: int, run_dir: Path, overrides: list[str]) -> dict:
    """Init, a NaN step, two steps, save, a step; then a fresh backend loads and repeats it."""
    import functools

    import torch

    from gradcycle import distributed
    from gradcycle.backends import build_backend
    from gradcycle.model import build_model
    from gradcycle.trainer import count_targets, token_loss

    vocab, k = 512, 2
    cfg = compose([*TINY, f"run_dir={run_dir}", "optim=sgd", f"model.vocab_size={vocab}",
                   f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO * world * k}",
                   *overrides])  # fmt: skip

    def build(seed: int):
        torch.manual_seed(seed)
        make = functools.partial(build_model, cfg.model, vocab)
        return build_backend(cfg, make, _cpu(), world, run_dir)

    def step(backend, n: int, poison: bool = False):
        micro = _batches(rank, n, k, vocab)
        tokens = distributed.all_reduce_tensor([count_targets(micro)], _cpu())[0]
        loss_fn = functools.partial(token_loss, norm=tokens * (math.nan if poison else 1.0))
        with backend.cycle():
            losses = [backend.forward_backward(b, loss_fn, last=i == k - 1)
                      for i, b in enumerate(micro)]  # fmt: skip
        total = distributed.all_reduce_tensor([torch.stack(losses).sum()], _cpu())
        r = backend.step(0.1, total)
        return r.stats[0], r.grad_norm, r.skipped

    def same(a, b) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)

    res, sd = {}, {}
    a = build(seed=7)
    sd["init"] = a.full_state_dict()
    res["plan"] = a.sync_plan(4).table(cfg.backend.name, 4)
    res["poison"] = step(a, 0, poison=True)  # NaN loss: every gradient is NaN
    sd["poisoned"] = a.full_state_dict()
    res["steps"] = [step(a, 1), step(a, 2)]
    sd["moved"] = a.full_state_dict()
    a.save_state(run_dir / "state")
    sd["saved"] = a.full_state_dict()
    res["next"] = step(a, 3)
    sd["final"] = a.full_state_dict()
    a.close()
    b = build(seed=8)  # a different init: only the load can make it agree
    b.load_state(run_dir / "state")
    sd["loaded"] = b.full_state_dict()
    res["next_after_load"] = step(b, 3)
    sd["final_b"] = b.full_state_dict()
    b.close()
    if rank != 0:
        return {}
    torch.manual_seed(7)
    res["init_matches_plain_build"] = same(sd["init"], build_model(cfg.model, vocab).state_dict())
    res["embed_std"] = float(sd["init"]["model.embed_tokens.weight"].std())
    res["init_dtypes"] = sorted({str(v.dtype) for v in sd["init"].values()})
    res["poison_left_params"] = same(sd["poisoned"], sd["init"])
    res["params_moved"] = not same(sd["moved"], sd["init"])
    res["load_restores_params"] = same(sd["loaded"], sd["saved"])
    res["resumed_step_same_params"] = same(sd["final_b"], sd["final"])
    return res


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    jobs = [(str(root / name), overrides) for name, overrides in JOBS.items()]
    out = run_on_ranks(_rank_main, WORLD, (jobs, str(root / "direct")))
    records, direct = out[0]
    return {"records": JobResults(zip(JOBS, records, strict=True)), "direct": direct, "root": root}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Single process, plain torch, the whole global batch in one micro-batch."""
    root = tmp_path_factory.mktemp("deepspeed-ref")
    out = {}
    for name, k, extra in (("k1", 1, []), ("k4", 4, []), ("k4-adamw", 4, ["optim=adamw"]),
                           ("k4-adamw-wd", 4, WD), ("k4-adamw-wd0", 4, [*WD, "optim.weight_decay=0"]),
                           ("k4-docmask", 4, DOCMASK)):  # fmt: skip
        g = MICRO * WORLD * k
        out[name] = train_steps(root / name, ["backend=ddp", f"train.micro_batch_size={g}",
                                              f"train.global_batch_size={g}", *SGD, *extra])  # fmt: skip
    return out


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


# -- collective contract -------------------------------------------------------------------------
# The cpu_smoke Llama: vocabulary V, hidden H, MLP width FF, L layers, untied embeddings.
V, H, FF, L = 512, 64, 128, 2
P = 2 * V * H + L * (4 * H * H + 3 * H * FF + 2 * H) + H  # parameters (147,776)
B = 4 * P  # bytes of one fp32 copy of every parameter or gradient
G = 2  # optimizer param groups: decayed matrices, undecayed norms
M = 2 + L * 9 + 1  # parameter-holding modules: embedding, lm_head, 9 per layer, final norm
ZERO = (0, 0)


def expected(backend: str, sync: str, k: int) -> dict[str, tuple[int, int]]:
    """Per optimizer step, steady state (step 3): {op: (calls, bytes)}. One gradient bucket: the
    whole model is below DeepSpeed's 5e8-element reduce_bucket_size."""
    if backend in ("zero1", "zero2"):
        # ZeRO-1 reduces at the boundary; zero2 per_cycle reduces once when the coalescing block
        # exits; zero2 per_micro reduces after every micro-batch's backward: 1 or K bucket
        # all-reduces of B bytes. Then G fp32 grad-norm scalars (4 B each), one per param group,
        # and the updated partitions all-gathered once per param group (B bytes in all).
        n = k if sync == "per_micro" else 1
        return {"all_reduce": (n + G, n * B + 4 * G), "all_gather": (G, B),
                "reduce_scatter": ZERO, "broadcast": ZERO}  # fmt: skip
    # ZeRO-3: each of the M modules is gathered in every micro-batch's forward and again in its
    # backward (2MK calls, 2K copies of the model); gradients reduce-scattered once per cycle
    # (per_cycle) or per micro-batch (per_micro); one fp64 grad-norm scalar per param group.
    n = k if sync == "per_micro" else 1
    return {"all_gather": (2 * M * k, 2 * k * B), "reduce_scatter": (n, n * B),
            "all_reduce": (G, 8 * G), "broadcast": ZERO}  # fmt: skip


def _counts(record: dict) -> dict[str, tuple[int, int]]:
    return {op: (v["calls"], v["bytes"]) for op, v in record["comm"].items()}


@pytest.mark.parametrize("backend,sync", POLICIES)
@pytest.mark.parametrize("k", [1, 4])
def test_collectives_match_the_expectation_table(spawn, backend, sync, k):
    recs = spawn["records"][f"{backend}-{sync}-k{k}"]
    assert len(recs) == STEPS
    assert _counts(recs[-1]) == expected(backend, sync, k)


@pytest.mark.parametrize("backend,sync", POLICIES)
def test_gradient_reductions_per_cycle_do_not_scale_with_k(spawn, backend, sync):
    one, four = (_counts(spawn["records"][f"{backend}-{sync}-k{k}"][-1]) for k in (1, 4))
    op = "reduce_scatter" if backend == "zero3" else "all_reduce"
    if sync == "per_cycle":
        assert four[op] == one[op]
    else:  # K=4 reduces 3 more times than K=1, each a full gradient
        assert four[op][0] - one[op][0] == 3 and four[op][1] - one[op][1] == 3 * B
    if backend == "zero3":  # parameters are gathered for every micro-batch whatever the policy
        assert four["all_gather"] == (4 * one["all_gather"][0], 4 * one["all_gather"][1])


def test_zero3_plan_says_parameters_are_gathered_every_micro_batch(spawn):
    plan = spawn["direct"]["zero3"]["plan"]
    assert "forward" in plan and "backward" in plan and "every micro-batch" in plan
    assert "gradient reduce-scatter" in plan and "4x per cycle" in plan  # auto -> per_micro
    zero2 = spawn["direct"]["zero2"]["plan"]  # per_cycle: one reduction, a full gradient held
    assert "1x per cycle" in zero2 and "full local gradient" in zero2


# -- exact accumulation --------------------------------------------------------------------------
@pytest.mark.parametrize("backend,sync", POLICIES)
@pytest.mark.parametrize("k", [1, 4])
def test_matches_single_process_reference(spawn, refs, backend, sync, k):
    got, ref = spawn["records"][f"{backend}-{sync}-k{k}"], refs[f"k{k}"]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]  # the same global batches
    for g, r in zip(got, ref, strict=True):
        assert _close(g["loss"], r["loss"]), (g["step"], g["loss"], r["loss"])
        assert _close(g["grad_norm"], r["grad_norm"]), (g["step"], g["grad_norm"], r["grad_norm"])


def test_adamw_with_warmup_matches_reference(spawn, refs):
    # Warmup changes the LR every step: this also checks that step(lr) reaches DeepSpeed.
    got, ref = spawn["records"]["zero2-per_cycle-k4-adamw"], refs["k4-adamw"]
    assert len({r["lr"] for r in got}) == STEPS
    for g, r in zip(got, ref, strict=True):
        assert _close(g["loss"], r["loss"]) and _close(g["grad_norm"], r["grad_norm"])


def test_zero3_decays_its_partitioned_matrices_like_ddp(spawn, refs):
    got, ref, no_decay = (
        spawn["records"]["zero3-per_micro-k4-adamw-wd"],
        refs["k4-adamw-wd"],
        refs["k4-adamw-wd0"],
    )
    assert abs(ref[-1]["loss"] - no_decay[-1]["loss"]) > 1e-4 * abs(ref[-1]["loss"])  # can fail
    for g, r in zip(got, ref, strict=True):
        assert _close(g["loss"], r["loss"]) and _close(g["grad_norm"], r["grad_norm"])


def test_document_masking_matches_reference(spawn, refs):
    """Packed rows with document masking (4-D attention mask, position ids) on ZeRO-3, K=4."""
    got, ref = spawn["records"]["zero3-per_cycle-k4-docmask"], refs["k4-docmask"]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    for g, r in zip(got, ref, strict=True):
        assert _close(g["loss"], r["loss"]) and _close(g["grad_norm"], r["grad_norm"])


@pytest.mark.parametrize("job", ["zero2-per_micro-k4", "zero3-per_cycle-k4"])
def test_activation_checkpointing_changes_nothing(spawn, job):
    plain, ac = spawn["records"][job], spawn["records"][f"{job}-ac"]
    for p, a in zip(plain, ac, strict=True):
        assert _close(p["loss"], a["loss"]) and _close(p["grad_norm"], a["grad_norm"])


# -- precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("job", ["zero1-bf16", "zero2-bf16-per_cycle", "zero3-bf16"])
def test_bf16_trains(spawn, job):
    recs = spawn["records"][job]
    assert len(recs) == 4 and not any(r["skipped"] for r in recs)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
    assert min(r["loss"] for r in recs[2:]) < recs[0]["loss"]


def test_bf16_zero1_accumulates_in_fp32_and_still_reduces_once_per_cycle(spawn):
    # BF16_Optimizer adds each micro-batch's bf16 gradient into an fp32 buffer and all-reduces
    # that sum once at the boundary in backend.reduce_dtype=fp32 (communication_data_type; without
    # it DeepSpeed casts the sum to bf16 first): 4P bytes.
    comm = spawn["records"]["zero1-bf16"][-1]["comm"]["all_reduce"]
    assert comm["calls"] == 1 and comm["bytes"] == 4 * P


def test_sync_plan_shows_overlap_and_accumulation_dtype(spawn):
    plan = spawn["direct"]["zero2"]["plan"]
    assert "reduction overlaps backward" in plan and "yes (overlap_comm)" in plan
    assert "gradients accumulate in" in plan and "fp32" in plan


def test_stale_ds_accelerator_in_the_environment_never_drives_the_run(monkeypatch):
    import torch
    from deepspeed.accelerator import get_accelerator, real_accelerator

    from gradcycle.backends.deepspeed import import_deepspeed
    from gradcycle.backends.ds_config import pin_accelerator

    monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.ds_accelerator)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # left over from another job
    import_deepspeed(torch.device("cpu"))
    assert get_accelerator()._name == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"
    # and a CPU accelerator DeepSpeed already chose is replaced for a CUDA run
    assert pin_accelerator("cuda")._name == "cuda" and os.environ["DS_ACCELERATOR"] == "cuda"
    assert pin_accelerator("cpu")._name == "cpu"


def test_bf16_zero2_coalesces_gradient_reduction(spawn):
    # DeepSpeed 0.19 runs bf16 ZeRO-2 on its ZeRO optimizer, not the BF16_Optimizer wrapper, so
    # coalesce_grad_reduction works: at K=2 one gradient all-reduce of the bf16 gradient cast to
    # backend.reduce_dtype=fp32 (4P bytes), the G grad-norm scalars (4 B) and bf16's 1-byte
    # overflow flag; per_micro would add one more.
    comm = spawn["records"]["zero2-bf16-per_cycle"][-1]["comm"]["all_reduce"]
    assert (comm["calls"], comm["bytes"]) == (1 + G + 1, 4 * P + 4 * G + 1)


# -- the backend directly --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_initial_weights_are_those_of_the_plain_model(spawn, name):
    d = spawn["direct"][name]
    # zero3 builds under zero.Init (partitioned as created) and still draws the same weights.
    assert d["init_matches_plain_build"]
    assert 0.015 < d["embed_std"] < 0.025 and d["init_dtypes"] == ["torch.float32"]


DIRECT_CASES = ["zero2", "zero3", pytest.param("zero2-fp16", marks=pytest.mark.skipif(not FP16, reason=NO_FP16))]  # fmt: skip


@pytest.mark.parametrize("name", DIRECT_CASES)
def test_non_finite_gradient_skips_the_update(spawn, name):
    d = spawn["direct"][name]
    loss, norm, skipped = d["poison"]
    assert skipped and not math.isfinite(norm)
    assert d["poison_left_params"]
    assert not any(s for _, _, s in d["steps"]) and d["params_moved"]


@pytest.mark.parametrize("name", DIRECT_CASES)
def test_save_load_round_trip_continues_identically(spawn, name):
    d = spawn["direct"][name]
    assert d["load_restores_params"]
    assert d["next_after_load"] == d["next"]  # loss, grad norm, skipped: bitwise
    assert d["resumed_step_same_params"]


def test_generated_config_written_to_run_dir(spawn):
    import json

    ds = json.loads((spawn["root"] / "zero3-per_micro-k4" / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (MICRO * WORLD * 4, MICRO, 4)  # fmt: skip
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0
    assert z["stage3_max_reuse_distance"] == 0  # merged from backend.deepspeed_config
    assert "optimizer" not in ds and "bf16" not in ds and "fp16" not in ds
