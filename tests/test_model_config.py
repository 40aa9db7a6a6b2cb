"""model.config (random init of another architecture, the architecture's own init replayed),
saved names that differ from module names (transformers 5's key mapping), and ddp building
straight on its device: the in-process checks (the 2-rank ones are in test_architectures.py).
Tiny models from config.json files written to tmp dirs: nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, compose

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
