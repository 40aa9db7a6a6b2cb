"""FSDP2 and HSDP: collectives per cycle (counted), equivalence with one process, sharded init.

Everything distributed runs in ONE 2-rank spawn (the module-scoped `two_ranks` fixture); the tests below
assert on its results. The references are single-process runs (ddp, world 1, micro = global).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import RAGGED, TINY, JobResults, compose, rank_train, train_steps
from multiproc import run_on_ranks

from gradcycle.backends.fsdp import hsdp_nodes, mesh_shape, mp_policy, resolve_sync, shard_model
from gradcycle.model import build_model, decoder_layers

STEPS = [*RAGGED, "train.global_batch_size=8", "train.max_steps=3", "checkpoint.at_end=false"]
MESHES = {  # 2 ranks
    "fsdp": ["backend=fsdp"],
    "hsdp1x2": ["backend=hsdp"],  # one node of two ranks: replicate 1 x shard 2 (the default)
    "hsdp2x1": ["backend=hsdp", "backend.replicate=2"],  # replicate 2 x shard 1
}
MICRO = {1: 4, 4: 1}  # K -> micro-batch size: global 8 = micro x K x 2 ranks
DOCMASK = ("data.packing=true", "data.document_mask=true")  # the ragged documents packed, masked


def _job(mesh, policy, k, optim="sgd", *extra):
    return (mesh, policy, k, optim, *extra), [
        *MESHES[mesh], f"backend.sync={policy}", f"train.micro_batch_size={MICRO[k]}",
        f"optim={optim}", *STEPS, *extra,
    ]  # fmt: skip


JOBS = dict(
    [_job(m, p, k) for m in MESHES for p in ("per_cycle", "per_micro") for k in (1, 4)]
    + [_job(m, p, 4, "adamw") for m in MESHES for p in ("per_cycle", "per_micro")]
    + [_job(m, "auto", 4) for m in MESHES]
    + [_job("fsdp", "per_cycle", 4, "sgd", "activation_checkpointing.mode=full"),
       _job("hsdp1x2", "per_micro", 4, "sgd", "activation_checkpointing.mode=full"),
       _job("fsdp", "per_cycle", 4, "sgd", "precision=bf16"),
       _job("hsdp1x2", "per_micro", 4, "sgd", "precision=bf16"),
       # an eval forward after every step must leave per_cycle training untouched
       _job("fsdp", "per_cycle", 4, "sgd", "train.eval_every=1", "train.eval_batches=2"),
       _job("fsdp", "per_cycle", 4, "sgd", *DOCMASK)]
)  # fmt: skip


# -- what runs on each of the 2 ranks ---------------------------------------------------------
def _make_model_fn(cfg):
    from gradcycle.data.reader import open_dataset
    from gradcycle.model import apply_activation_checkpointing

    vocab = len(open_dataset(cfg).tokenizer)

    def make_model(where):
        model = build_model(cfg.model, vocab, where)
        apply_activation_checkpointing(model, "none", 1)
        return model

    return make_model


def _sharded_init_matches_rank0(rank, world, mesh) -> dict:
    """Build through the backend (meta + shard + fill the shards locally), gather the full state,
    compare it with the model a single process builds from the same seed."""
    from gradcycle.backends.fsdp import FSDPBackend
    from gradcycle.distributed import seed_everything

    cfg = compose([*TINY, *STEPS, *MESHES[mesh]])
    make_model = _make_model_fn(cfg)
    seed_everything(cfg.seed)
    backend = FSDPBackend(cfg, make_model, torch.device("cpu"), world)
    full = backend.full_state_dict()  # collective; the full CPU state on rank 0 only
    buffers = {n: b.clone() for n, b in backend.module.named_buffers()}
    local = backend.module.model.embed_tokens.weight.to_local().detach().clone()
    plans = {}
    for policy in ("per_cycle", "per_micro"):
        cfg_p = compose([*TINY, *STEPS, *MESHES[mesh], f"backend.sync={policy}"])
        plans[policy] = FSDPBackend(cfg_p, make_model, torch.device("cpu"), world).sync_plan(4)
    if rank != 0:
        return {"local": local, "plans": plans, "full_is_none": full is None}
    seed_everything(cfg.seed)
    reference = make_model("cpu")
    ref_state, ref_buffers = reference.state_dict(), dict(reference.named_buffers())
    return {
        "keys_match": sorted(full) == sorted(ref_state),
        "mismatched": [k for k in ref_state if not torch.equal(full[k], ref_state[k])],
        "buffers_mismatched": [k for k in ref_buffers if not torch.equal(buffers[k], ref_buffers[k])],
        "local": local,
        "reference_embedding": ref_state["model.embed_tokens.weight"].detach().clone(),
        "plans": plans,
    }  # fmt: skip


def _on_rank(rank, world, jobs, run_root):
    from gradcycle.trainer import run

    out = {"records": rank_train(rank, world, jobs)}
    try:  # 3 replica groups cannot split 2 ranks: must fail on every rank, before any collective
        run(compose([*TINY, f"run_dir={run_root}/bad", "backend=hsdp", "backend.replicate=3"]))
        out["bad_mesh"] = None
    except ValueError as e:
        out["bad_mesh"] = str(e)
    out["init"] = {m: _sharded_init_matches_rank0(rank, world, m) for m in ("fsdp", "hsdp1x2")}
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    keys = list(JOBS)
    jobs = [(str(root / f"job{i}"), JOBS[key]) for i, key in enumerate(keys)]
    # Checkpoint at step 2 on fsdp; resume it on hsdp 2x1 (another sharding) for step 3.
    keys += ["saved", "resumed"]
    _, saved = _job("fsdp", "per_cycle", 4, "adamw", "checkpoint.every=2")
    _, resumed = _job("hsdp2x1", "per_micro", 4, "adamw")
    jobs += [(str(root / "saved"), saved),
             (str(root / "resumed"), [*resumed, f"resume={root}/saved/checkpoints/step_2"])]  # fmt: skip
    results = run_on_ranks(_on_rank, 2, (jobs, str(root)))
    records = JobResults(zip(keys, results[0]["records"], strict=True))
    return {"records": records, "ranks": results}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_ref")
    refs = {
        optim: train_steps(root / optim, [*STEPS, f"optim={optim}", "train.micro_batch_size=8"])
        for optim in ("sgd", "adamw")
    }
    refs["docmask"] = train_steps(root / "docmask", [*STEPS, *DOCMASK, "optim=sgd",
                                                     "train.micro_batch_size=8"])  # fmt: skip
    return refs


@pytest.fixture(scope="module")
def sizes():
    """N: parameters of the test model; R: those of the unit backward starts with and does not
    gather again (final norm + head); U: units (embedding, layers, norm + head)."""
    from gradcycle.data.reader import open_dataset

    cfg = compose([*TINY, *STEPS])
    model = build_model(cfg.model, len(open_dataset(cfg).tokenizer), "meta")
    n = sum(p.numel() for p in model.parameters())
    # every parameter's dim 0 is even: no padding when sharding over 2 ranks
    assert all(p.shape[0] % 2 == 0 for p in model.parameters())
    kept = model.model.norm.weight.numel() + model.lm_head.weight.numel()
    return {"N": n, "R": kept, "U": len(decoder_layers(model)) + 2}


# -- the collective contract --------------------------------------------------------------------
def expected(mesh: str, policy: str, k: int, s: dict) -> dict:
    """Per optimizer step: {op: (calls, bytes)}. U units, N params (R in norm + head), fp32 (4 B).
    Bytes are those of the full buffer. 2 ranks."""
    n, r, u = s["N"], s["R"], s["U"]
    per_micro = policy in ("per_micro", "auto")  # auto: per_micro for the intra-shard collectives
    table = {}
    if mesh in ("fsdp", "hsdp1x2"):  # shard group of 2
        if per_micro:
            # each micro-batch: forward gathers all U units; backward re-gathers the U-1 others
            # (the norm + head unit keeps its parameters between its forward and backward)
            table["all_gather"] = (k * (2 * u - 1), k * 4 * (2 * n - r))
            # each micro-batch's backward reduce-scatters every unit's gradient
            table["reduce_scatter"] = (k * u, k * 4 * n)
        else:
            # gathered in the first forward and kept until the last backward: once per unit
            table["all_gather"] = (u, 4 * n)
            # gradients accumulate unsharded; the last backward reduce-scatters each unit once
            table["reduce_scatter"] = (u, 4 * n)
    if mesh == "hsdp1x2":
        # each unit's reduced shard (N/2) all-reduced once, last micro-batch (a group of one)
        table["all_reduce"] = (u, 4 * n // 2)
    if mesh == "hsdp2x1":
        # shard group of one: FSDP skips gathers and reduce-scatters; each unit's full gradient
        # is all-reduced across the 2 replicas once per cycle, whatever the policy
        table["all_reduce"] = (u, 4 * n)
    return table


def _measured(record: dict) -> dict:
    return {op: (c["calls"], c["bytes"]) for op, c in record["comm"].items() if c["calls"]}


COUNT_CASES = [(m, p, k) for m in MESHES for p in ("per_cycle", "per_micro") for k in (1, 4)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh, policy, k", COUNT_CASES + [(m, "auto", 4) for m in MESHES])
def test_collective_counts_match_the_table(two_ranks, sizes, mesh, policy, k):
    records = two_ranks["records"][(mesh, policy, k, "sgd")]
    assert [r["accumulation_steps"] for r in records] == [k] * 3
    for record in records:
        assert _measured(record) == expected(mesh, policy, k, sizes), record["comm"]


@pytest.mark.slow
def test_per_cycle_is_constant_in_k_and_per_micro_scales(two_ranks):
    rec = two_ranks["records"]
    for mesh in MESHES:
        one, four = (_measured(rec[(mesh, "per_cycle", k, "sgd")][0]) for k in (1, 4))
        assert one == four, mesh
        one, four = (_measured(rec[(mesh, "per_micro", k, "sgd")][0]) for k in (1, 4))
        for op in ("all_gather", "reduce_scatter"):
            if op in one:
                assert four[op][0] == 4 * one[op][0], (mesh, op)
        assert four.get("all_reduce") == one.get("all_reduce")  # replica all-reduce once per cycle
    # sharded: per_cycle at K=4 saves 28 - 4 all-gathers and 16 - 4 reduce-scatters per step
    # (U = 4: embedding, 2 layers, norm + head; 3 with one root unit before)
    fsdp = _measured(rec[("fsdp", "per_cycle", 4, "sgd")][0])
    assert (fsdp["all_gather"][0], fsdp["reduce_scatter"][0]) == (4, 4)
    naive = _measured(rec[("fsdp", "per_micro", 4, "sgd")][0])
    assert (naive["all_gather"][0], naive["reduce_scatter"][0]) == (28, 16)


@pytest.mark.slow
def test_sync_plan_states_the_measured_counts(two_ranks):
    names = {"all_gather": "parameter all-gather", "reduce_scatter": "gradient reduce-scatter",
             "all_reduce": "cross-replica gradient all-reduce"}  # fmt: skip
    for mesh in ("fsdp", "hsdp1x2"):
        for policy, plan in two_ranks["ranks"][0]["init"][mesh]["plans"].items():
            rows = {name: int(count.split("x")[0]) for name, count in plan.rows}
            measured = _measured(two_ranks["records"][(mesh, policy, 4, "sgd")][0])
            assert rows == {names[op]: calls for op, (calls, _) in measured.items()}
            assert ("MiB per rank" in plan.extra_memory) == (policy == "per_cycle")


# -- equivalence with one process ---------------------------------------------------------------
def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_losses_and_grad_norms_match_one_process(two_ranks, references, optim):
    ref = references[optim]
    runs = {k: r for k, r in two_ranks["records"].items()
            if isinstance(k, tuple) and k[3] == optim and "precision=bf16" not in k
            and DOCMASK[1] not in k}  # fmt: skip
    assert len(runs) == (18 if optim == "sgd" else 6)  # every fp32 job
    for key, records in runs.items():
        assert [r["tokens"] for r in records] == [r["tokens"] for r in ref], key
        for got, want in zip(records, ref, strict=True):
            assert _rel(got["loss"], want["loss"]) < 1e-5, (key, got["loss"], want["loss"])
            assert _rel(got["grad_norm"], want["grad_norm"]) < 1e-5, (key, got, want)


@pytest.mark.slow
def test_document_masking_matches_one_process(two_ranks, references):
    """Packed rows with document masking (4-D attention mask, position ids) sharded, K=4."""
    records = two_ranks["records"][("fsdp", "per_cycle", 4, "sgd", *DOCMASK)]
    for got, want in zip(records, references["docmask"], strict=True):
        assert got["tokens"] == want["tokens"]
        assert (
            _rel(got["loss"], want["loss"]) < 1e-5
            and _rel(got["grad_norm"], want["grad_norm"]) < 1e-5
        )


@pytest.mark.slow
def test_activation_checkpointing_keeps_losses_and_counts(two_ranks):
    rec = two_ranks["records"]
    for mesh, policy in (("fsdp", "per_cycle"), ("hsdp1x2", "per_micro")):
        plain = rec[(mesh, policy, 4, "sgd")]
        ac = rec[(mesh, policy, 4, "sgd", "activation_checkpointing.mode=full")]
        for a, b in zip(ac, plain, strict=True):
            assert _rel(a["loss"], b["loss"]) < 1e-6 and _rel(a["grad_norm"], b["grad_norm"]) < 1e-6
            assert _measured(a) == _measured(b)


@pytest.mark.slow
def test_eval_between_steps_leaves_per_cycle_training_unchanged(two_ranks):
    rec = two_ranks["records"]
    with_eval = rec[("fsdp", "per_cycle", 4, "sgd", "train.eval_every=1", "train.eval_batches=2")]
    for a, b in zip(with_eval, rec[("fsdp", "per_cycle", 4, "sgd")], strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
        assert _measured(a) == _measured(b)  # eval's own gathers are not counted as the step's


@pytest.mark.slow
def test_bf16_trains_with_bf16_gathers_and_fp32_reductions(two_ranks, sizes, references):
    rec = two_ranks["records"]
    for mesh, policy in (("fsdp", "per_cycle"), ("hsdp1x2", "per_micro")):
        records = rec[(mesh, policy, 4, "sgd", "precision=bf16")]
        for got, want in zip(records, references["sgd"], strict=True):
            assert _rel(got["loss"], want["loss"]) < 2e-2, (mesh, got["loss"], want["loss"])
        fp32 = expected(mesh, policy, 4, sizes)
        comm = _measured(records[0])
        # parameters travel as bf16 (2 B), gradients are reduced in fp32 (4 B)
        assert comm["all_gather"] == (fp32["all_gather"][0], fp32["all_gather"][1] // 2)
        assert comm["reduce_scatter"] == fp32["reduce_scatter"]
        assert records[-1]["loss"] < records[0]["loss"]


# -- initialisation -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp", "hsdp1x2"])
def test_sharded_init_equals_the_single_process_model(two_ranks, mesh):
    rank0, rank1 = (r["init"][mesh] for r in two_ranks["ranks"])
    assert rank1["full_is_none"]
    assert rank0["keys_match"]  # the plain model's keys: what HF export needs
    assert rank0["mismatched"] == []  # no rank drew its own shard: no repeated halves
    assert rank0["buffers_mismatched"] == []  # rotary tables recomputed, not left uninitialised
    # each rank holds its own half of the embedding, rows [0, V/2) and [V/2, V)
    assert rank0["local"].shape == rank1["local"].shape
    assert torch.equal(torch.cat([rank0["local"], rank1["local"]]), rank0["reference_embedding"])
    assert not torch.equal(rank0["local"], rank1["local"])


def test_llama_7b_sharding_plan_on_meta_device():
    """The full plan of a 7B model on a fake 2-rank mesh: no weight is allocated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    cfg = compose(["model=llama-7b"])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = build_model(cfg.model, 32000, "meta")
        units = shard_model(model, init_device_mesh("cpu", (2,)), mp_policy("bf16", "fp32"), True)
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        local = sum(p.to_local().numel() for p in params)
        assert {p.to_local().device.type for p in params} == {"meta"}
    finally:
        dist.destroy_process_group()
    print(f"llama-7b: {total / 1e9:.2f}B parameters in {len(units)} units, {local / 1e9:.2f}B "
          f"per rank, planned in {time.perf_counter() - start:.1f}s")  # fmt: skip
    assert len(units) == 34  # embedding, 32 layers, norm + head (the root keeps none)
    assert round(total / 1e9, 2) == 6.74
    assert local * 2 == total


@pytest.mark.slow
def test_checkpoint_resumes_on_another_sharding(two_ranks):
    """DCP: saved sharded over 2 ranks at step 2, loaded replicated (hsdp 2x1), step 3 equal."""
    rec = two_ranks["records"]
    straight, resumed = rec[("fsdp", "per_cycle", 4, "adamw")], rec["resumed"]
    assert [r["step"] for r in resumed] == [3]
    pairs = lambda records: [(r["loss"], r["grad_norm"]) for r in records]  # noqa: E731
    assert pairs(rec["saved"]) == pairs(straight)  # checkpointing changes nothing
    # the same step 3 up to the reduction order of another sharding (~1e-7)
    assert _rel(resumed[0]["loss"], straight[2]["loss"]) < 1e-6
    assert _rel(resumed[0]["grad_norm"], straight[2]["grad_norm"]) < 1e-6


# -- bad input and pure helpers ---------------------------------------------------------------------
@pytest.mark.slow
def test_hsdp_world_the_mesh_cannot_split_fails_on_every_rank(two_ranks):
    for result in two_ranks["ranks"]:
        assert result["bad_mesh"] is not None
        assert "backend.replicate=3" in result["bad_mesh"] and "world size 2" in result["bad_mesh"]
        assert "backend.replicate=1 or 2" in result["bad_mesh"]


@pytest.mark.parametrize(
    "world, replicate, nodes, shape",
    [(8, None, 2, (2, 4)), (8, 4, None, (4, 2)), (2, None, None, (1, 2)), (2, 2, 1, (2, 1))],
)
def test_hsdp_mesh_shape(world, replicate, nodes, shape):
    assert mesh_shape("hsdp", world, replicate, nodes) == shape
    assert mesh_shape("fsdp", world, replicate, nodes) == (world,)


def test_hsdp_mesh_shape_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"world size 6 .*backend.replicate=4.*1 or 2 or 3 or 6"):
        mesh_shape("hsdp", 6, 4, None)
    with pytest.raises(ValueError, match=r"world size 6 .*node count 4"):
        mesh_shape("hsdp", 6, None, 4)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=6 .*LOCAL_WORLD_SIZE=4"):
        hsdp_nodes({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "4"})
    assert hsdp_nodes({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == 2
    assert hsdp_nodes({"SLURM_NNODES": "3"}) == 3


def test_auto_is_per_micro_and_bf16_reduces_in_fp32():
    assert resolve_sync("auto") == "per_micro"
    policy = mp_policy("bf16", "fp32")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mp_policy("fp32", "fp32").param_dtype is None


def test_world_one_fsdp_matches_ddp(tmp_path):
    """One process: the mesh has one rank and the backend makes its own process group."""
    base = [*STEPS, "optim=sgd", "train.micro_batch_size=2"]
    ddp = train_steps(tmp_path / "ddp", base)
    fsdp = train_steps(tmp_path / "fsdp", [*base, "backend=fsdp", "backend.sync=per_cycle"])
    for a, b in zip(fsdp, ddp, strict=True):
        assert _rel(a["loss"], b["loss"]) < 1e-6 and _rel(a["grad_norm"], b["grad_norm"]) < 1e-6


@pytest.mark.skipif(
    os.environ.get("GRADCYCLE_TEST_COMPILE") != "1",
    reason="torch.compile takes about a minute on CPU: set GRADCYCLE_TEST_COMPILE=1",
)
def test_compiled_layers_train_like_eager(tmp_path):
    base = [*STEPS, "optim=sgd", "train.micro_batch_size=4", "train.max_steps=2", "backend=fsdp"]
    eager = train_steps(tmp_path / "eager", base)
    compiled = train_steps(tmp_path / "compiled", [*base, "backend.compile=true"])
    for a, b in zip(compiled, eager, strict=True):
        assert _rel(a["loss"], b["loss"]) < 1e-4 and _rel(a["grad_norm"], b["grad_norm"]) < 1e-4
