"""Other architectures: model.config random init (Qwen2/3, Mistral, Gemma, GPT-NeoX, GPT-2, Llama),
folders whose saved names differ from the module names (transformers 5's key mapping) on the
slice reader and the export, and ddp/zero1/zero2 building straight on the device.

ONE 2-rank spawn runs every distributed configuration (each caught on its own); the references
(HF's own init, from_pretrained, one-process builds) run here. Tiny models from config.json
files written to tmp dirs: nothing downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose, rank_train
from multiproc import run_on_ranks
from test_startup import PROBE, _guard, _local

VOCAB = 515  # > the tokenizer's 512; odd: FSDP row shards uneven, ZeRO-3 partitions padded
_SHAPE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 256, "pad_token_id": 1,
          "bos_token_id": 0, "eos_token_id": 2}  # fmt: skip
_GQA = {"num_key_value_heads": 2, "head_dim": 16}
ARCHS = {  # model_type -> config.json fields beyond _SHAPE
    "llama": _GQA, "mistral": _GQA, "qwen2": _GQA, "qwen3": _GQA, "gemma": _GQA,
    "gpt_neox": {}, "gpt2": {},
}  # fmt: skip
# Saved names differ from module names (transformers 5.24's conversion_mapping.py): GPT-NeoX
# (`GPTNeoXForCausalLM`: embed_out. -> lm_head.), EXAONE (`exaone`, built as LlamaForCausalLM:
# transformer.h. -> model.layers. ...), Granite MoE (`granitemoe`: block_sparse_moe.input_linear
# -> experts.gate_up_proj ...).
RENAMED = {
    "gpt_neox": {},
    "exaone": {"num_key_value_heads": 2, "num_layers": 2},
    "granitemoe": {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
}
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


def write_config(root: Path, arch: str, extra: dict | None = None) -> str:
    from transformers import AutoConfig

    out = root / f"config-{arch}"
    fields = {**_SHAPE, **ARCHS.get(arch, {}), **(extra or {})}
    AutoConfig.for_model(arch, **fields).save_pretrained(out)
    return str(out)


def hf_model(config_dir: str, seed: int = 0):
    """transformers' own model with transformers' own random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))


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


def _file_keys(folder) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys |= set(h.keys())
    return keys


# -- model.config: the architecture's own init, drawn shard by shard -----------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_init_is_the_architectures_own(tmp_path, arch):
    """Against transformers' own from_config init: every constant (norms 1, Gemma's 0, biases 0,
    the padding row) equal, every random tensor drawn with the same spread, buffers equal."""
    from gradcycle.model import build_model

    config = write_config(tmp_path, arch)
    hf = hf_model(config)
    cfg = compose([*TINY, f"model.config={config}"])
    ours = build_model(cfg.model, 512, "cpu", seed=3)  # meta, then allocated and drawn
    assert type(ours) is type(hf)
    theirs, mine = hf.state_dict(), ours.state_dict()
    assert sorted(theirs) == sorted(mine)
    for name, a in theirs.items():
        b = mine[name]
        if a.float().std() == 0:
            assert torch.equal(a, b), name
        else:
            assert abs(b.std() - a.std()) < 0.1 * a.std(), (name, a.std(), b.std())
            assert int((a == 0).sum()) == int((b == 0).sum()), name  # the padding row
    for name, buf in hf.named_buffers():  # rotary tables, Gemma's embedding scale
        assert torch.equal(buf, ours.get_buffer(name)), name
    if arch == "gpt2":  # OpenAI's scaled residual projections, Conv1D's [in, out] layout
        assert ours.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
        for proj in (ours.transformer.h[1].attn.c_proj, ours.transformer.h[1].mlp.c_proj):
            assert abs(proj.weight.std() - 0.02 / 2) < 0.001  # 0.02 / sqrt(2 n_layer)
    if arch == "gemma":  # its RMSNorm computes (1 + weight)
        assert float(ours.model.norm.weight.detach().abs().max()) == 0.0
    if arch == "gpt_neox":  # LayerNorm with bias
        ln = ours.gpt_neox.layers[0].input_layernorm
        assert torch.equal(ln.weight, torch.ones(64)) and torch.equal(ln.bias, torch.zeros(64))


def test_a_parameter_gradcycle_cannot_draw_is_named(tmp_path):
    import transformers.initialization as hf_init
    from torch import nn

    from gradcycle.model import build_model
    from gradcycle.weights import init

    cfg = compose([*TINY, f"model.config={write_config(tmp_path, 'llama')}"])

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(4, device="meta"))

    model = build_model(cfg.model, 512, "meta")
    model.model.gate = Gate()
    with pytest.raises(ValueError, match=r"model\.gate\.scale \(Gate\.scale\): LlamaForCausalLM"
                                         r"\._init_weights sets nothing"):  # fmt: skip
        init.init_plan(model)
    model = build_model(cfg.model, 512, "meta")
    own = model._init_weights

    def orthogonal_head(module):
        own(module)
        if module is model.lm_head:
            hf_init.orthogonal_(module.weight)

    model._init_weights = orthogonal_head
    with pytest.raises(ValueError, match=r"lm_head\.weight \(Linear\.weight\): _init_weights uses "
                                         "orthogonal_"):  # fmt: skip
        init.init_plan(model)


def test_model_config_bad_input_fails_in_validation(tmp_path):
    from gradcycle.config import validate
    from gradcycle.model import build_model

    gpt2 = write_config(tmp_path, "gpt2")
    short = write_config(tmp_path / "short", "gpt2", {"max_position_embeddings": 32})
    from transformers import AutoConfig

    AutoConfig.for_model("vit").save_pretrained(tmp_path / "vit")
    cases = {
        str(tmp_path / "none"): ["model.config=", "no such file or directory"],
        str(tmp_path / "vit"): ["ViTConfig is not a causal LM"],
        short: ["data.seq_len=64 exceeds", "max_position_embeddings=32"],
    }
    for source, words in cases.items():
        with pytest.raises(ValueError) as e:
            validate(compose([*TINY, f"model.config={source}"]))
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ValueError, match="model.pretrained=.* are both set"):
        validate(compose([*TINY, f"model.config={gpt2}", f"model.pretrained={tmp_path}"]))
    validate(compose([*TINY, f"model.config={gpt2}/config.json", "backend=fsdp"]))  # the file
    with pytest.raises(ValueError, match="vocab_size=515 is smaller than the tokenizer's 600"):
        build_model(compose([*TINY, f"model.config={gpt2}"]).model, 600, "meta")


# -- saved names that differ from module names ----------------------------------------------------
@pytest.mark.parametrize("arch", list(RENAMED))
def test_saved_names_are_transformers_own(tmp_path, arch):
    """The reader's file keys and the export's names are exactly what save_pretrained writes."""
    from gradcycle.weights import names

    model = hf_model(write_config(tmp_path, arch, RENAMED[arch]))
    model.save_pretrained(tmp_path / "saved")
    keys = _file_keys(tmp_path / "saved")
    modules = {n for n, _ in model.named_parameters()}
    assert keys - modules  # the test means something: some names differ
    mapped, converted = names.file_keys(model, keys)
    assert modules <= set(mapped) and converted == []
    assert set(names.saved_keys(model, modules).values()) == keys


def test_converted_tensors_are_refused_by_name(tmp_path):
    """Qwen2-MoE saves each expert on its own; the model stacks them (a converter, no slices)."""
    from gradcycle.model import build_model
    from gradcycle.weights.pretrained import SafetensorsDir, _check

    config = write_config(tmp_path, "qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2})
    hf_model(config).save_pretrained(tmp_path / "moe")
    cfg = compose([*TINY, f"model.pretrained={tmp_path / 'moe'}"])
    model = build_model(cfg.model, 512, "meta")
    files = SafetensorsDir(tmp_path / "moe")
    files.bind(model)
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj missing.*transformers converts "
                                         r"\d+ of its tensors.*use backend=ddp, zero1 or zero2"):  # fmt: skip
        _check(model, files)


# -- ddp / zero1 / zero2 build on the device ----------------------------------------------------
def test_ddp_allocates_the_model_on_the_device_only(tmp_path, monkeypatch):
    """device="cuda" simulated (to_empty redirected to the CPU): the model is built on meta and
    first allocated by to_empty(device="cuda"), so no host copy of it ever exists (before: built
    and drawn on the CPU in every rank, then moved); its weights are the CPU build's, bit for bit."""
    from gradcycle.backends.ddp import DDPBackend
    from gradcycle.model import build_model

    cfg = compose([*TINY, f"model.config={write_config(tmp_path, 'gpt2')}"])
    reference = build_model(cfg.model, 512, "cpu", seed=cfg.seed).state_dict()
    seen = []
    to_empty = torch.nn.Module.to_empty

    def on_device(self, *, device, recurse=True):
        seen.append((str(device), sorted({p.device.type for p in self.parameters()})))
        return to_empty(self, device="cpu", recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", on_device)
    make = lambda where, dtype=torch.float32: build_model(cfg.model, 512, where, seed=cfg.seed,  # noqa: E731
                                                         dtype=dtype)  # fmt: skip
    backend = DDPBackend(cfg, make, torch.device("cuda"), 1)
    assert seen == [("cuda", ["meta"])]
    got = backend.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in reference.items())


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
