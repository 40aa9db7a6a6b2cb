"""Other architectures on 2 ranks: model.config random init on fsdp, hsdp, zero2/3 equal to one
process bit for bit, GPT-2/Qwen2/NeoX trained from model.config and exported, `save_pretrained`
folders whose saved names differ from the module names (GPT-NeoX, EXAONE, Granite MoE) loaded on
fsdp, hsdp and zero3 with from_pretrained's logits, and a NeoX fine-tune exported and read back.

ONE 2-rank spawn runs every configuration (each caught on its own); the references (one-process
builds, from_pretrained) run here. In-process checks: test_model_config.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose, rank_train
from multiproc import run_on_ranks
from test_model_config import RENAMED, VOCAB, _file_keys, hf_model, write_config
from test_startup import PROBE, _guard, _local

SPAWN_INIT = ("gpt2", "qwen2", "gpt_neox")  # the ones the issue trains on ddp and fsdp
INIT_BACKENDS = {"fsdp": ["backend=fsdp"], "hsdp": ["backend=hsdp"], "zero3": ["backend=zero3"],
                 "zero2": ["backend=zero2"]}  # fmt: skip
LOAD_BACKENDS = {"fsdp": ["backend=fsdp"], "hsdp": ["backend=hsdp"], "zero3": ["backend=zero3"]}
TRAIN = {  # (arch, backend overrides): one step, checkpoint at the end, exported here
    "gpt2-ddp": ("gpt2", ["backend=ddp"]),
    "gpt2-fsdp": ("gpt2", ["backend=fsdp", "activation_checkpointing.mode=full"]),
    "gpt2-zero2": ("gpt2", ["backend=zero2"]),
    "qwen2-ddp": ("qwen2", ["backend=ddp"]),
    "qwen2-fsdp": ("qwen2", ["backend=fsdp"]),
    "gpt_neox-ddp": ("gpt_neox", ["backend=ddp", "activation_checkpointing.mode=selective"]),
    "gpt_neox-fsdp": ("gpt_neox", ["backend=fsdp"]),
    "gpt_neox-zero3": ("gpt_neox", ["backend=zero3", "activation_checkpointing.mode=full"]),
}


# -- on the ranks --------------------------------------------------------------------------------
def _build(cfg, run_dir, spy: dict | None = None):
    """The backend on 2 ranks; `spy` records what make_model is asked for and how often the
    model is moved (.to) before deepspeed.initialize, i.e. by gradcycle rather than DeepSpeed."""
    import deepspeed

    from gradcycle.backends import build_backend
    from gradcycle.model import build_model

    spy = {} if spy is None else spy
    spy.update(asked=[], moves=[], moves_before_engine=None)

    def make(where, dtype=torch.float32):
        spy["asked"].append(str(where))
        model = build_model(cfg.model, VOCAB, where, seed=cfg.seed, dtype=dtype)
        move = model.to
        model.to = lambda *a, **k: (spy["moves"].append(a), move(*a, **k))[1]
        return model

    initialize = deepspeed.initialize

    def engine(*args, **kwargs):
        spy["moves_before_engine"] = len(spy["moves"])
        return initialize(*args, **kwargs)

    deepspeed.initialize = engine
    try:
        return build_backend(cfg, make, torch.device("cpu"), 2, Path(run_dir))
    finally:
        deepspeed.initialize = initialize


def _init(rank, root, arch, overrides):
    cfg = compose([*TINY, f"model.config={root}/config-{arch}", *overrides])
    spy: dict = {}
    backend = _build(cfg, f"{root}/init-{arch}", spy)
    local = sum(_local(p).numel() for p in backend.module.parameters())
    full = backend.full_state_dict()
    backend.close()
    return {"spy": spy, "local": local,
            "full": {k: v.numpy() for k, v in full.items()} if rank == 0 else None}  # fmt: skip


def _load(rank, root, pretrained, overrides, slices=False):
    import gradcycle.weights.pretrained as pre

    cfg = compose([*TINY, f"model.pretrained={pretrained}", *overrides])
    original = pre._hf_reader_class
    if slices:
        pre._hf_reader_class = lambda: None
    try:
        backend = _build(cfg, f"{root}/load")
    finally:
        pre._hf_reader_class = original
    with torch.no_grad():
        logits = backend.model(input_ids=PROBE).logits.float().numpy()
    backend.close()
    return {"logits": logits}


def _round_trip(rank, root):
    """Export the NeoX fine-tuned on fsdp (rank 0), then read the export back on fsdp."""
    import torch.distributed as dist

    from gradcycle.export import main

    out = f"{root}/neox-export"
    if rank == 0:
        assert main([f"{root}/train-neox-pretrained", out, "--max-shard-size", "100KB"]) == 0
    dist.barrier()
    return _load(rank, root, out, ["backend=fsdp"])


def _on_rank(rank, world, root, dirs, jobs):
    from gradcycle import distributed

    distributed.init_process_group(distributed.read_env(), torch.device("cpu"), 120)
    out = {"init": {}, "load": {}}
    for arch in SPAWN_INIT:
        for name, ov in INIT_BACKENDS.items():
            if name != "zero2" or arch == "gpt2":
                out["init"][f"{arch}-{name}"] = _guard(_init, rank, root, arch, ov)
    for arch, path in dirs.items():
        for name, ov in LOAD_BACKENDS.items():
            out["load"][f"{arch}-{name}"] = _guard(_load, rank, root, path, ov)
    out["load"]["gpt_neox-fsdp-slices"] = _guard(_load, rank, root, dirs["gpt_neox"],
                                                 ["backend=fsdp"], True)  # fmt: skip
    out["train"] = _guard(rank_train, rank, world, jobs)
    out["round_trip"] = _guard(_round_trip, rank, root)
    return out


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spawn(tmp_path_factory):
    from gradcycle.data.reader import open_dataset

    root = tmp_path_factory.mktemp("arch")
    for arch in SPAWN_INIT:
        write_config(root, arch)
    dirs = {}
    for arch, extra in RENAMED.items():
        dirs[arch] = str(root / f"saved-{arch}")
        hf_model(write_config(root, arch, extra), seed=7).save_pretrained(dirs[arch])
    open_dataset(compose(TINY)).tokenizer.save_pretrained(dirs["gpt_neox"])  # for fine-tuning
    jobs = [(f"{root}/train-{name}", [f"model.config={root}/config-{arch}", "train.max_steps=1",
                                      *ov]) for name, (arch, ov) in TRAIN.items()]  # fmt: skip
    jobs.append((f"{root}/train-neox-pretrained", [f"model.pretrained={dirs['gpt_neox']}",
                                                   "backend=fsdp", "train.max_steps=1"]))  # fmt: skip
    ranks = run_on_ranks(_on_rank, 2, (str(root), dirs, jobs))
    return {"ranks": ranks, "root": root, "dirs": dirs}


def _ok(result):
    if isinstance(result, dict) and "error" in result:
        pytest.fail(result["error"])
    return result


# -- 2 ranks --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(spawn):
    """The weights on one process (ddp's build) and from_pretrained's logits: the references."""
    from transformers import AutoModelForCausalLM

    from gradcycle.model import build_model

    weights = {}
    for arch in SPAWN_INIT:
        cfg = compose([*TINY, f"model.config={spawn['root']}/config-{arch}"])
        model = build_model(cfg.model, VOCAB, "cpu", seed=cfg.seed)
        weights[arch] = {k: v.numpy() for k, v in model.state_dict().items()}
    logits = {}
    for arch, path in spawn["dirs"].items():
        with torch.no_grad():
            logits[arch] = AutoModelForCausalLM.from_pretrained(path)(input_ids=PROBE).logits
    return {"weights": weights, "logits": logits}


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{a}-{b}" for a in SPAWN_INIT for b in INIT_BACKENDS
                                  if b != "zero2" or a == "gpt2"])  # fmt: skip
def test_initial_weights_equal_one_process_bit_for_bit(spawn, one_process, name):
    import numpy as np

    arch, backend = name.split("-")
    ranks = [_ok(r["init"][name]) for r in spawn["ranks"]]
    got, ref = ranks[0]["full"], one_process["weights"][arch]
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if not np.array_equal(got[k], ref[k])] == []
    total = sum(v.size for k, v in ref.items() if k != "lm_head.weight" or arch != "gpt2")
    spy = ranks[0]["spy"]
    if backend == "zero2":  # built on the device (cpu here), never moved by gradcycle
        assert spy["asked"] == ["cpu"] and spy["moves_before_engine"] == 0
        assert all(r["local"] == total for r in ranks)
    else:  # each rank holds its own shards or partitions only
        assert all(r["local"] < 0.6 * total for r in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{a}-{b}" for a in RENAMED for b in LOAD_BACKENDS]
                         + ["gpt_neox-fsdp-slices"])  # fmt: skip
def test_renamed_folder_loads_with_from_pretrained_logits(spawn, one_process, name):
    reference = one_process["logits"][name.split("-")[0]]
    for rank in spawn["ranks"]:
        logits = torch.from_numpy(_ok(rank["load"][name])["logits"])
        assert (logits - reference).abs().max().item() <= 1e-5


def _checkpoint_weights(run: Path) -> dict:
    from gradcycle.checkpoint_index import read_meta, resolve
    from gradcycle.export import dcp_model_state
    from gradcycle.weights import zero_source

    step = resolve(run)
    if read_meta(step)["format"] == "dcp":
        return dcp_model_state(step / "state")
    return {k: fetch() for k, (_, _, fetch) in zero_source.load(step / "state").items()}


def _export_matches_checkpoint(run: Path, out: Path):
    from transformers import AutoModelForCausalLM

    from gradcycle.export import main

    assert main([str(run), str(out)]) == 0
    expected = _checkpoint_weights(run)
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAIN))
def test_a_model_from_config_trains_and_exports(spawn, tmp_path, name):
    records = _ok(spawn["ranks"][0]["train"])[list(TRAIN).index(name)]
    if not isinstance(records, list):
        pytest.fail(records.text)
    assert len(records) == 1 and records[0]["loss"] == records[0]["loss"]  # finite, one step
    model = _export_matches_checkpoint(spawn["root"] / f"train-{name}", tmp_path / "hf")
    model.save_pretrained(tmp_path / "save_pretrained")  # the names it writes, e.g. embed_out
    assert _file_keys(tmp_path / "hf") == _file_keys(tmp_path / "save_pretrained")


@pytest.mark.slow
def test_neox_fine_tuned_on_fsdp_exports_save_pretrained_names_and_loads_back(spawn, tmp_path):
    from transformers import AutoModelForCausalLM

    records = _ok(spawn["ranks"][0]["train"])[-1]
    if not isinstance(records, list):
        pytest.fail(records.text)
    run = spawn["root"] / "train-neox-pretrained"
    model = _export_matches_checkpoint(run, tmp_path / "hf")
    # the names save_pretrained gave the original folder (embed_out.weight, not lm_head.weight)
    assert _file_keys(tmp_path / "hf") == _file_keys(spawn["dirs"]["gpt_neox"])
    assert "embed_out.weight" in _file_keys(tmp_path / "hf")
    # the rank-0 export of the same checkpoint, read back on fsdp: from_pretrained's logits
    again = AutoModelForCausalLM.from_pretrained(spawn["root"] / "neox-export")
    with torch.no_grad():
        reference = again(input_ids=PROBE).logits
        assert torch.equal(reference, model(input_ids=PROBE).logits)
    for rank in spawn["ranks"]:
        logits = torch.from_numpy(_ok(rank["round_trip"])["logits"])
        assert (logits - reference).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt_neox"
