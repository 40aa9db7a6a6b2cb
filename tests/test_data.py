"""Corpora through `datasets` (stdlib, local files, hub code path with local files), tokenizer,
packing vs padding, held-out split, and `model.pretrained` from a local directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, compose, train_steps

from gradcycle.data import (
    IGNORE_INDEX,
    collate,
    load_corpus,
    load_texts,
    split_corpus,
    stdlib_files,
)

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
    texts = load_texts(cfg.data)
    assert len(texts) == expected
    assert sorted(texts) == sorted(DOCS[:expected] if fmt != "glob" else DOCS)


def test_hub_group_code_path_with_local_dataset(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    cfg = _cfg(tmp_path, "data=hub", f"data.path={saved}")
    assert load_texts(cfg.data) == DOCS
    laid_out = tmp_path / "hub_layout"  # a folder laid out like a hub dataset repo
    (laid_out / "data").mkdir(parents=True)
    (laid_out / "data" / "train-00000.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in DOCS)
    )
    cfg = _cfg(tmp_path, "data=hub", f"data.path={laid_out}", "data.split=train")
    assert sorted(load_texts(cfg.data)) == sorted(DOCS)


def test_packing_gives_full_blocks_and_padding_marks_labels(tmp_path):
    cfg = _cfg(tmp_path, "data.seq_len=32")
    corpus = load_corpus(cfg.data, cfg.model)
    train, val = split_corpus(corpus, cfg.data)
    assert train.blocks.shape[1] == 32 and len(train) > 100
    eos = corpus.tokenizer.eos_token_id
    assert (corpus.ids[corpus.offsets[1:] - 1] == eos).all()  # every document ends with eos

    cfg = _cfg(tmp_path, "data.seq_len=32", "data.packing=false")
    train, _ = split_corpus(load_corpus(cfg.data, cfg.model), cfg.data)
    assert all(2 <= len(train[i]) <= 32 for i in range(len(train)))
    batch = collate([np.arange(5, dtype=np.int32), np.arange(3, dtype=np.int32)], pad_id=1)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 1, 1]]
    assert batch["labels"][1].tolist() == [0, 1, 2, IGNORE_INDEX, IGNORE_INDEX]


def test_validation_split_is_held_out_and_fixed(tmp_path):
    cfg = _cfg(tmp_path, "data.val_fraction=0.1", "data.packing=false", "data.seq_len=4096")
    corpus = load_corpus(cfg.data, cfg.model)
    train, val = split_corpus(corpus, cfg.data)
    as_set = lambda s: {bytes(s[i].tobytes()) for i in range(len(s))}  # noqa: E731
    assert len(val) == 30 and not as_set(train) & as_set(val)
    # The run's seed does not move documents between the splits.
    cfg2 = _cfg(tmp_path, "data.val_fraction=0.1", "data.packing=false", "data.seq_len=4096",
                "seed=99")  # fmt: skip
    assert as_set(split_corpus(load_corpus(cfg2.data, cfg2.model), cfg2.data)[1]) == as_set(val)


def test_tokenizer_is_trained_locally_once_and_cached(tmp_path):
    cfg = _cfg(tmp_path)
    first = load_corpus(cfg.data, cfg.model)
    tok_files = sorted((tmp_path / "cache").glob("tokenizer-*/tokenizer.json"))
    assert len(tok_files) == 1
    assert len(first.tokenizer) == 512  # data.vocab_size of experiment=cpu_smoke
    mtime = tok_files[0].stat().st_mtime_ns
    second = load_corpus(cfg.data, cfg.model)
    assert tok_files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(first.ids, second.ids)
    text = "import os\nprint(os.getcwd())\n"
    assert first.tokenizer.decode(first.tokenizer(text)["input_ids"]) == text


def test_pretrained_model_and_tokenizer_from_local_dir(tmp_path):
    """model.pretrained=<dir> uses from_pretrained for the model and the tokenizer."""
    from transformers import AutoModelForCausalLM

    from gradcycle.model import build_model

    cfg = _cfg(tmp_path)
    corpus = load_corpus(cfg.data, cfg.model)
    model = build_model(cfg.model, len(corpus.tokenizer))
    out = tmp_path / "pretrained"
    model.save_pretrained(out)
    corpus.tokenizer.save_pretrained(out)

    records = train_steps(tmp_path / "run", [f"model.pretrained={out}", "train.max_steps=2",
                                             f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    # The first loss is that of the saved weights, not of a fresh random init.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
