"""Sources through `datasets` (stdlib, local files, hub code path with local files), tokenizer,
packing vs padding, held-out split, one data path (cache = data=tokens), and `model.pretrained`
from a local directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, compose, train_steps

from gradcycle.data import IGNORE_INDEX
from gradcycle.data.loader import collate, to_device
from gradcycle.data.reader import open_dataset
from gradcycle.data.sources import Source, stdlib_files

DOCS = [f"def f{i}():\n    return {i} * {'x' * (i % 17)!r}\n" * (1 + i % 5) for i in range(60)]


def _cfg(tmp_path, *overrides):
    return compose([*TINY, f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_stdlib_corpus_is_local_python_source():
    files = stdlib_files()
    assert len(files) > 300
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt", "folder", "glob"])
def test_files_group_reads_every_format(tmp_path, fmt):
    import datasets

    d = tmp_path / "data"
    d.mkdir()
    if fmt in ("jsonl", "folder", "glob"):
        for part in range(2):
            rows = DOCS[part * 30 : (part + 1) * 30]
            (d / f"part{part}.jsonl").write_text(
                "".join(json.dumps({"body": t}) + "\n" for t in rows)
            )
        path = {"jsonl": d / "part0.jsonl", "folder": d, "glob": d / "part*.jsonl"}[fmt]
        expected = 30 if fmt == "jsonl" else 60
    elif fmt == "json":
        (d / "all.json").write_text(json.dumps([{"body": t} for t in DOCS]))
        path, expected = d / "all.json", 60
    elif fmt == "parquet":
        datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(d / "all.parquet"))
        path, expected = d / "all.parquet", 60
    else:
        for i, t in enumerate(DOCS[:10]):
            (d / f"doc{i}.txt").write_text(t)
        path, expected = d / "doc*.txt", 10
    field = "text" if fmt == "txt" else "body"
    cfg = _cfg(tmp_path, "data=files", f"data.path={path}", f"data.text_field={field}")
    texts = list(Source.from_config(cfg.data).documents())
    assert len(texts) == expected
    assert sorted(texts) == sorted(DOCS[:expected] if fmt != "glob" else DOCS)


def test_hub_group_code_path_with_local_dataset(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    cfg = _cfg(tmp_path, "data=hub", f"data.path={saved}")
    assert list(Source.from_config(cfg.data).documents()) == DOCS
    laid_out = tmp_path / "hub_layout"  # a folder laid out like a hub dataset repo (streamed)
    (laid_out / "data").mkdir(parents=True)
    (laid_out / "data" / "train-00000.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in DOCS)
    )
    cfg = _cfg(tmp_path, "data=hub", f"data.path={laid_out}", "data.split=train")
    source = Source.from_config(cfg.data)
    assert sorted(source.documents()) == sorted(DOCS)
    assert list(source.documents(skip=55)) == list(source.documents())[55:]  # resume point


def test_packing_gives_full_blocks_and_padding_marks_labels(tmp_path):
    cfg = _cfg(tmp_path, "data.seq_len=32")
    data = open_dataset(cfg)
    train = data.samples("train", cfg.data)
    assert len(train) > 100 and all(len(train[j][0]) == 32 for j in (0, 1, len(train) - 1))
    split = train.split
    eos = data.tokenizer.eos_token_id
    assert all(split.document(d)[-1] == eos for d in range(split.n_docs))  # each ends with eos
    # Packed samples tile the token stream, across document and shard boundaries.
    assert np.array_equal(np.concatenate([train[0][0], train[1][0]]), split.tokens(0, 64))

    cfg = _cfg(tmp_path, "data.seq_len=32", "data.packing=false")
    train = open_dataset(cfg).samples("train", cfg.data)
    assert len(train) == split.n_docs and all(2 <= len(train[i][0]) <= 32 for i in range(50))
    host = collate([(np.arange(5), None), (np.arange(3), None)], pad_id=1)
    batch = to_device(host, torch.device("cpu"))
    assert batch["input_ids"].dtype == torch.int64 and host.rows.dtype == np.int32
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 1, 1]]
    assert batch["labels"][1].tolist() == [0, 1, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert host.targets == 4 + 2  # labels after the first position that carry a loss


def test_validation_split_is_held_out_and_fixed(tmp_path):
    cfg = _cfg(tmp_path, "data.val_fraction=0.1", "data.packing=false", "data.seq_len=4096")
    data = open_dataset(cfg)
    train, val = data.samples("train", cfg.data), data.samples("val", cfg.data)
    as_set = lambda s: {bytes(s[i][0].tobytes()) for i in range(len(s))}  # noqa: E731
    assert len(val) == 30 and len(train) + len(val) == 300 and not as_set(train) & as_set(val)
    # The run's seed does not move documents between the splits: the same prepared data.
    cfg2 = _cfg(tmp_path, "data.val_fraction=0.1", "data.packing=false", "data.seq_len=4096",
                "seed=99")  # fmt: skip
    again = open_dataset(cfg2)
    assert again.root == data.root and as_set(again.samples("val", cfg2.data)) == as_set(val)


def test_tokenizer_is_trained_locally_once_and_cached(tmp_path):
    cfg = _cfg(tmp_path)
    first = open_dataset(cfg)
    tok_files = sorted((tmp_path / "cache").glob("tokenizers/*/tokenizer.json"))
    assert len(tok_files) == 1
    assert len(first.tokenizer) == 512  # data.vocab_size of experiment=cpu_smoke
    mtime = tok_files[0].stat().st_mtime_ns
    manifest = (first.root / "manifest.json").stat().st_mtime_ns
    second = open_dataset(cfg)
    assert tok_files[0].stat().st_mtime_ns == mtime  # neither trained nor prepared again
    assert (second.root / "manifest.json").stat().st_mtime_ns == manifest
    assert second.fingerprint == first.fingerprint
    text = "import os\nprint(os.getcwd())\n"
    assert first.tokenizer.decode(first.tokenizer(text)["input_ids"]) == text


def test_one_data_path_cache_and_tokens_train_the_same(tmp_path):
    """data=stdlib prepares into the cache; data=tokens on that directory is the same run."""
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    cached = train_steps(tmp_path / "stdlib", [cache, "train.max_steps=2"])
    root = open_dataset(_cfg(tmp_path)).root
    tokens = train_steps(tmp_path / "tokens", [cache, "train.max_steps=2", "data=tokens",
                                               f"data.path={root}", "data.seq_len=64"])  # fmt: skip
    assert [r["loss"] for r in tokens] == [r["loss"] for r in cached]
    assert all(0 <= r["data_wait_s"] <= r["step_time_s"] for r in cached + tokens)


def test_pretrained_model_and_tokenizer_from_local_dir(tmp_path):
    """model.pretrained=<dir> uses from_pretrained for the model and the tokenizer."""
    from transformers import AutoModelForCausalLM

    from gradcycle.model import build_model

    cfg = _cfg(tmp_path)
    data = open_dataset(cfg)
    model = build_model(cfg.model, len(data.tokenizer))
    out = tmp_path / "pretrained"
    model.save_pretrained(out)
    data.tokenizer.save_pretrained(out)

    records = train_steps(tmp_path / "run", [f"model.pretrained={out}", "train.max_steps=2",
                                             f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    # The first loss is that of the saved weights, not of a fresh random init.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
