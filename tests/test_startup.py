"""Start-up without a full copy: peak memory, one seed = one model everywhere, pretrained slices,
streaming export, per-phase timeouts.

ONE 2-rank spawn runs every configuration (each caught on its own: one failure fails its own
test only); the single-process references (ddp on one process, from_pretrained) run here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose, rank_train
from multiproc import run_on_ranks

PROBE = torch.arange(48).reshape(2, 24) * 7 % 500
VOCAB = 515  # odd: FSDP row shards are uneven, ZeRO-3 partitions padded
SMALL = [*TINY, f"model.vocab_size={VOCAB}", "optim=sgd"]
# ~77M parameters, 309 MB in fp32: "a few hundred MB", embedding rows uneven over 2 ranks
BIG = [*TINY, "model.vocab_size=32001", "model.hidden_size=768", "model.num_heads=12",
       "model.intermediate_size=2048", "model.num_layers=4", "optim=sgd"]  # fmt: skip
INIT = {  # random init, 2 ranks; the reference is ddp on one process
    "fsdp": ["backend=fsdp"],
    "fsdp-tied": ["backend=fsdp", "model.tie_embeddings=true"],
    "hsdp1x2": ["backend=hsdp"],
    "hsdp2x1": ["backend=hsdp", "backend.replicate=2"],
    "zero3": ["backend=zero3"],
    "zero3-tied": ["backend=zero3", "model.tie_embeddings=true"],
    # partitions ZeRO-3 cannot have written in place (NVMe, ZeRO++): one gathered parameter at a time
    "zero3-gathered": ["backend=zero3"],
}
LOAD = {  # (pretrained dir, overrides); the reference is from_pretrained in one process
    "fsdp": ("untied", ["backend=fsdp"]),
    "fsdp-slices": ("untied", ["backend=fsdp"]),  # the get_slice path (torch without DCP's reader)
    "fsdp-tied": ("tied", ["backend=fsdp"]),
    "hsdp2x1": ("untied", ["backend=hsdp", "backend.replicate=2"]),
    "zero3": ("untied", ["backend=zero3"]),
    "zero3-tied": ("tied", ["backend=zero3"]),
    "fsdp-bf16": ("bf16", ["backend=fsdp", "precision=bf16"]),
    "zero3-bf16": ("bf16", ["backend=zero3", "precision=bf16"]),
    "zero2-bf16": ("bf16", ["backend=zero2", "precision=bf16"]),
}
EXPORT = {b: [f"backend={b}", "train.max_steps=1"] for b in ("fsdp", "zero2")}


# -- on the ranks ---------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_growth(build) -> dict:
    """Peak RSS while `build()` runs, above the RSS just before it (bytes)."""
    import ctypes
    import gc

    gc.collect()
    try:  # return freed heap to the OS, so memory reused from earlier work is not hidden
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    backend = build()
    out = {"growth": (_status_kb("VmHWM") - base) * 1024,
           "shard_bytes": sum(_local(p).numel() * 4 for p in backend.module.parameters())}  # fmt: skip
    backend.close()
    return out


def _local(param) -> torch.Tensor:
    """What this rank stores of a parameter: its ZeRO-3 partition, FSDP shard, or all of it."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def _backend(cfg, world, run_dir, vocab):
    from gradcycle.backends import build_backend
    from gradcycle.model import build_model

    def make(where, dtype=torch.float32):
        return build_model(cfg.model, vocab, where, seed=cfg.seed, dtype=dtype)

    return build_backend(cfg, make, torch.device("cpu"), world, Path(run_dir))


def _guard(fn, *args):
    import traceback

    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def _memory(world, root, dirs, big_dir):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return {"skip": "needs Linux /proc/self/clear_refs to reset the peak RSS"}
    # Imports and first-use caches (FSDP, DCP, the model class) are not model memory.
    _backend(compose([*SMALL, "backend=fsdp", f"model.pretrained={dirs['untied']}"]), world,
             f"{root}/warm", VOCAB).close()  # fmt: skip
    out = {}
    for name, extra in (("random", []), ("pretrained", [f"model.pretrained={big_dir}"])):
        cfg = compose([*BIG, "backend=fsdp", *extra])
        build = lambda c=cfg: _backend(c, world, f"{root}/m", c.model.vocab_size)  # noqa: E731
        out[name] = _guard(_peak_growth, build)
    return out


def _init(rank, world, root, overrides, gathered):
    import gradcycle.weights.pieces as pieces

    cfg = compose([*SMALL, *overrides])
    direct = pieces._zero3_direct
    if gathered:
        pieces._zero3_direct = lambda param: False
    try:
        backend = _backend(cfg, world, f"{root}/init", VOCAB)
    finally:
        pieces._zero3_direct = direct
    local = sum(_local(p).numel() * 4 for p in backend.module.parameters())
    full = backend.full_state_dict()
    backend.close()
    return {"local_bytes": local, "full": {k: v.numpy() for k, v in full.items()} if rank == 0
            else None}  # fmt: skip


def _load(rank, world, root, pretrained, overrides, slices):
    import gradcycle.weights.pretrained as pre

    cfg = compose([*SMALL, f"model.pretrained={pretrained}", *overrides])
    original = pre._hf_reader_class
    if slices:
        pre._hf_reader_class = lambda: None
    try:
        backend = _backend(cfg, world, f"{root}/load", VOCAB)
    finally:
        pre._hf_reader_class = original
    storage = {str(_local(p).dtype) for p in backend.module.parameters()}  # before a forward
    with torch.no_grad():
        logits = backend.model(input_ids=PROBE).logits.float().numpy()
    full = backend.full_state_dict()
    backend.close()
    return {"logits": logits, "storage": sorted(storage), "bytes_read": getattr(backend,
            "bytes_read", None), "full": {k: v.float().numpy() for k, v in full.items()}
            if rank == 0 else None}  # fmt: skip


def _timeouts(rank):
    """dist_timeout_s=1, startup_timeout_s=10: a 3 s wait inside long_phase passes, a 2.5 s wait
    after it fails rank 0 after ~1 s."""
    import time
    from types import SimpleNamespace

    import torch.distributed as dist

    from gradcycle.timeouts import long_phase, set_timeout

    bc = SimpleNamespace(dist_timeout_s=1, startup_timeout_s=10)
    set_timeout(bc.dist_timeout_s)
    out = {}
    with long_phase(bc):
        if rank == 1:
            time.sleep(3)
        dist.barrier()
        out["inside"] = "ok"
    start = time.monotonic()
    try:
        if rank == 1:
            time.sleep(2.5)
        else:
            dist.all_reduce(torch.ones(1))
        out["after"] = "ok"
    except Exception as e:
        out["after"] = str(e).lower()
    out["after_s"] = time.monotonic() - start
    return out


def _on_rank(rank, world, root, dirs, big_dir, export_jobs):
    from gradcycle import distributed

    distributed.init_process_group(distributed.read_env(), torch.device("cpu"), 120)
    out = {"memory": _memory(world, root, dirs, big_dir)}  # first: a fresh process
    out["init"] = {k: _guard(_init, rank, world, root, ov, k.endswith("gathered"))
                   for k, ov in INIT.items()}  # fmt: skip
    out["load"] = {k: _guard(_load, rank, world, root, dirs[d], ov, k.endswith("slices"))
                   for k, (d, ov) in LOAD.items()}  # fmt: skip
    out["export"] = _guard(rank_train, rank, world, export_jobs)
    out["timeouts"] = _guard(_timeouts, rank)  # last: the group is broken afterwards
    return out


# -- fixtures ---------------------------------------------------------------------------------
def _save(path: Path, overrides: list[str], dtype, shard: str | None = None) -> str:
    from gradcycle.model import build_model

    cfg = compose(overrides)
    model = build_model(cfg.model, cfg.model.vocab_size, "cpu", seed=99).to(dtype)
    model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    return str(path)


@pytest.fixture(scope="module")
def spawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    dirs = {
        "untied": _save(root / "untied", SMALL, torch.float32, "100KB"),  # several files
        "tied": _save(root / "tied", [*SMALL, "model.tie_embeddings=true"], torch.float32),
        "bf16": _save(root / "bf16", SMALL, torch.bfloat16),
    }
    big = _save(root / "big", BIG, torch.float32)
    jobs = [(str(root / f"train-{b}"), [*SMALL, *ov]) for b, ov in EXPORT.items()]
    ranks = run_on_ranks(_on_rank, 2, (str(root), dirs, big, jobs))
    return {"ranks": ranks, "dirs": dirs, "root": root}


def _ok(result):
    if isinstance(result, dict) and "error" in result:
        pytest.fail(result["error"])
    return result


# -- peak memory --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("source", ["random", "pretrained"])
def test_start_up_peak_rss_stays_below_the_full_model(spawn, source):
    from gradcycle.model import build_model

    memory = spawn["ranks"][0]["memory"]
    if "skip" in memory:
        pytest.skip(memory["skip"])
    cfg = compose(BIG)
    full = 4 * sum(p.numel() for p in build_model(cfg.model, 32001, "meta").parameters())
    for rank in spawn["ranks"]:
        got = _ok(rank["memory"][source])
        print(f"{source}: peak growth {got['growth'] / 2**20:.0f} MiB, shards "
              f"{got['shard_bytes'] / 2**20:.0f} MiB, full model {full / 2**20:.0f} MiB")  # fmt: skip
        assert got["growth"] < 0.7 * full
        assert got["shard_bytes"] < 0.51 * full


# -- one seed, one model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """ddp on one process, through the backend: the weights every other layout must equal."""
    root = tmp_path_factory.mktemp("ddp-ref")
    out = {}
    for tied in ("false", "true"):
        cfg = compose([*SMALL, "backend=ddp", f"model.tie_embeddings={tied}"])
        backend = _backend(cfg, 1, root, VOCAB)
        out[tied] = {k: v.numpy() for k, v in backend.full_state_dict().items()}
        backend.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(INIT))
def test_initial_weights_equal_ddp_bit_for_bit(spawn, ddp_reference, name):
    import numpy as np

    from gradcycle.model import build_model
    from gradcycle.weights import plan

    got = _ok(spawn["ranks"][0]["init"][name])["full"]
    ref = ddp_reference["true" if "tied" in name else "false"]
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if not np.array_equal(got[k], ref[k])] == []
    emb = ref["model.embed_tokens.weight"]
    assert abs(float(emb.std()) - 0.02) < 1e-3 and float(ref["model.norm.weight"].min()) == 1.0
    # the start-up plan states what each rank allocated (fsdp/hsdp shards, zero3 partitions)
    cfg = compose([*SMALL, *INIT[name]])
    meta = build_model(cfg.model, VOCAB, "meta")
    shard = 1 if name == "hsdp2x1" else 2
    planned = [p for p, _ in plan.per_rank_bytes(cfg.backend.name, "fp32", meta, 2, shard)]
    local = [_ok(r["init"][name])["local_bytes"] for r in spawn["ranks"]]
    assert local == planned


# -- pretrained ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_logits(spawn):
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in spawn["dirs"].items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            out[name] = (model(input_ids=PROBE).logits, model.state_dict())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOAD))
def test_pretrained_load_gives_from_pretrained_logits(spawn, hf_logits, name):
    source, overrides = LOAD[name]
    ranks = [_ok(r["load"][name]) for r in spawn["ranks"]]
    logits, state = hf_logits[source]
    if "precision=bf16" not in overrides:
        for r in ranks:
            assert (torch.from_numpy(r["logits"]) - logits).abs().max().item() <= 1e-5
    # the master weights are the file's values exactly (bf16 files: upcast, no rounding)
    full = ranks[0]["full"]
    assert all(torch.equal(torch.from_numpy(full[k]), state[k].float()) for k in full)
    read = [r["bytes_read"] for r in ranks]
    if name.startswith("fsdp"):  # each rank read its own rows: together, the files once
        files = sum(v.numel() * v.element_size() for k, v in state.items()
                    if k != "lm_head.weight" or "tied" not in name)  # fmt: skip
        file_bytes = files // 2 if source == "bf16" else files  # state is fp32; bf16 on disk
        assert sum(read) == file_bytes and max(read) < 0.6 * file_bytes


@pytest.mark.slow
def test_bf16_load_keeps_the_backends_storage_dtype(spawn):
    load = {k: _ok(spawn["ranks"][0]["load"][k]) for k in LOAD}
    assert load["zero3-bf16"]["storage"] == ["torch.bfloat16"]  # partitions stay bf16
    assert load["zero2-bf16"]["storage"] == ["torch.bfloat16"]  # no fp32 full copy first
    assert load["fsdp-bf16"]["storage"] == ["torch.float32"]  # FSDP2: fp32 shards, bf16 compute
    assert load["zero3"]["storage"] == ["torch.float32"]


# -- export ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", list(EXPORT))
def test_export_streams_into_several_shards_that_load_with_equal_logits(spawn, tmp_path, backend):
    from transformers import AutoModelForCausalLM

    from gradcycle.export import dcp_model_state, main
    from gradcycle.weights import zero_source

    _ok(spawn["ranks"][0]["export"])
    run = spawn["root"] / f"train-{backend}"
    out = tmp_path / "hf"
    assert main([str(run), str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert (out / "tokenizer.json").is_file()
    state_dir = run / "checkpoints/step_1/state"
    if backend == "fsdp":
        expected = dcp_model_state(state_dir)
    else:
        expected = {k: fetch() for k, (_, _, fetch) in zero_source.load(state_dir).items()}
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    reference = AutoModelForCausalLM.from_pretrained(out)
    reference.load_state_dict(expected)
    with torch.no_grad():
        diff = (model(input_ids=PROBE).logits - reference(input_ids=PROBE).logits).abs().max()
    assert diff.item() <= 1e-5
    assert main([str(run), str(tmp_path / "bad"), "--max-shard-size", "lots"]) == 2


# -- timeouts ------------------------------------------------------------------------------
@pytest.mark.slow
def test_long_phase_waits_startup_timeout_then_steps_fail_after_dist_timeout(spawn):
    rank0, rank1 = (_ok(r["timeouts"]) for r in spawn["ranks"])
    assert rank0["inside"] == rank1["inside"] == "ok"  # waited 3 s with dist_timeout_s=1
    assert "timed out" in rank0["after"] or "timeout" in rank0["after"]
    assert 0.5 < rank0["after_s"] < 2.4  # failed before its peer came back
