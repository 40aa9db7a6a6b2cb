"""In-process checks of gradcycle.weights and the start-up settings (the 2-rank ones are in
test_startup.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose

VOCAB = 515
SMALL = [*TINY, f"model.vocab_size={VOCAB}"]


def test_row_shards_without_dtensor_helpers_split_like_torch_chunk():
    from torch.distributed.tensor import Replicate, Shard

    from gradcycle.weights.pieces import row_shard

    assert row_shard((5, 3), [Shard(0)], [2], [1]) == ((2, 3), (3, 0))
    assert row_shard((7, 4), [Replicate(), Shard(0)], [2, 3], [1, 2]) == ((1, 4), (6, 0))
    assert row_shard((2, 4), [Shard(0)], [3], [2]) == ((0, 4), (2, 0))  # an empty shard
    for i in range(3):  # the pieces of torch.chunk, in order
        piece = torch.arange(10).chunk(3)[i]
        assert row_shard((10,), [Shard(0)], [3], [i]) == ((len(piece),), (int(piece[0]),))


def test_tied_embeddings_are_one_parameter():
    from gradcycle.model import build_model

    cfg = compose([*SMALL, "model.tie_embeddings=true"])
    model = build_model(cfg.model, VOCAB, "cpu", seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_wrong_pretrained_directory_names_the_tensor(tmp_path):
    from gradcycle.model import build_model
    from gradcycle.weights.pretrained import SafetensorsDir, _check

    build_model(compose(SMALL).model, VOCAB, "cpu", seed=1).save_pretrained(tmp_path / "small")
    model = build_model(compose([*TINY, "model.vocab_size=600"]).model, 600, "meta")
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \[515, 64\]"):
        _check(model, SafetensorsDir(tmp_path / "small"))
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        SafetensorsDir(tmp_path)


def test_shard_sizes_parse_like_save_pretrained():
    from gradcycle.weights.safetensors_out import Entry, parse_size, split

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size(1000) == 1000 and parse_size("100KB") == 100_000
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("0MB")
    e = [Entry(str(i), (n,), torch.float32, lambda: None) for i, n in enumerate([10, 10, 30, 5])]
    assert [[x.name for x in f] for f in split(e, 80)] == [["0", "1"], ["2"], ["3"]]


def test_startup_timeout_is_validated():
    from gradcycle.validation import validate

    with pytest.raises(ValueError, match="backend.startup_timeout_s=0"):
        validate(compose([*TINY, "backend.startup_timeout_s=0"]))


def test_llama_70b_start_up_plan_on_meta():
    from gradcycle.model import build_model
    from gradcycle.weights import plan

    cfg = compose(["model=llama-70b", "backend=fsdp", "precision=bf16"])
    lines = plan.lines(cfg, build_model(cfg.model, 32000, "meta"), 64)
    assert lines[0].startswith("start-up plan: backend=fsdp, 68976.65M parameters, random init")
    assert lines[1].startswith("  ranks 0-63: 4.01 GiB parameters (fp32 shards)")
