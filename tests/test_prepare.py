"""python -m gradcycle.prepare: byte-identical for any num_proc, resumable after a kill, and every
bad input refused with one message naming the file or field, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY

from gradcycle.cli import main as train_main
from gradcycle.data.prepare import STATE
from gradcycle.data.prepare import main as prepare_main

PREP = [*TINY, "prepare.shard_mb=0.25"]  # ~17 train shards of the 300 stdlib documents
CONF = str(ROOT / "conf")


def _prepare(out, *extra) -> int:
    return prepare_main([*PREP, f"prepare.out={out}", *extra])


def _files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "np1"
    assert _prepare(out, "prepare.num_proc=1") == 0
    return out


def test_output_is_byte_identical_for_num_proc_1_and_4(reference, tmp_path):
    assert _prepare(tmp_path / "np4", "prepare.num_proc=4") == 0
    assert _files(tmp_path / "np4") == _files(reference)
    m = json.loads((reference / "manifest.json").read_text())
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert len(train["shards"]) > 4 and m["dtype"] == "uint16"
    assert train["documents"] + val["documents"] == 300 and val["documents"] == 6
    for shard in train["shards"]:  # documents end with EOS; offsets cover the shard
        tokens = np.fromfile(reference / shard["files"]["tokens"]["name"], dtype=np.uint16)
        offsets = np.load(reference / shard["files"]["docs"]["name"])
        assert len(tokens) == shard["tokens"] == offsets[-1] and offsets[0] == 0
        assert len(offsets) == shard["documents"] + 1
        assert (tokens[offsets[1:] - 1] == m["tokenizer"]["eos_id"]).all()


def test_resume_after_a_kill_mid_prepare_gives_the_same_bytes(reference, tmp_path, capsys):
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-m", "gradcycle.prepare", *PREP, f"prepare.out={out}",
         "prepare.num_proc=1"],
        env={**os.environ, "GRADCYCLE_FAULT": "kill_in_prepare:4"}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    state = json.loads((out / STATE).read_text())
    assert len(state["shards"]["train"]) == 3 and state["documents_consumed"] > 0
    assert (out / ".tmp-tokens-00003.bin").is_file() and not (out / "manifest.json").exists()
    done = {n: (out / n).stat().st_mtime_ns for n in ("tokens-00000.bin", "tokens-00002.bin")}

    assert _prepare(out, "prepare.num_proc=2") == 0
    assert f"resuming after {state['documents_consumed']} documents" in capsys.readouterr().err
    assert _files(out) == _files(reference)
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # finished shards kept
    assert _prepare(out) == 0 and _files(out) == _files(reference)  # done: a no-op


# ---------------------------------------------------------------- bad input
@pytest.fixture()
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return d


def _missing(d: Path):
    (d / "tokens-00001.bin").unlink()


def _truncated(d: Path):
    p = d / "tokens-00002.bin"
    p.write_bytes(p.read_bytes()[:1000])


def _manifest(**changes):
    def edit(d: Path):
        m = json.loads((d / "manifest.json").read_text())
        for key, value in changes.items():
            node = m
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


def _other_tokenizer(d: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    tok.add_tokens(["<|other|>"])
    tok.save_pretrained(str(d.parent / "other-tokenizer"))
    return [f"data.tokenizer={d.parent / 'other-tokenizer'}"]


TOKENS_CASES = {
    "missing shard": (_missing, ["tokens-00001.bin", "is missing"]),
    "truncated shard": (_truncated, ["tokens-00002.bin", "truncated"]),
    "other format version": (_manifest(format_version=2), ["manifest.json", "format_version=2"]),
    "vocabulary larger than the dtype": (
        _manifest(**{"tokenizer.vocab_size": 70000}),
        ["manifest.json", "tokenizer.vocab_size=70000", "uint16"],
    ),
    "tokenizer differs": (_other_tokenizer, ["data.tokenizer=", "not the tokenizer"]),
}


@pytest.mark.parametrize("case", list(TOKENS_CASES))
def test_bad_prepared_data_is_refused_before_anything_starts(case, reference, tmp_path, run_dir,
                                                             capsys):  # fmt: skip
    damage, words = TOKENS_CASES[case]
    data = tmp_path / "data"
    shutil.copytree(reference, data)
    extra = damage(data) or []
    before, data_before = _files(run_dir), _files(data)
    code = train_main([*TINY, f"run_dir={run_dir}", "data=tokens", f"data.path={data}", *extra],
                      CONF)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert all(w in err for w in words), (words, err)
    assert "Traceback" not in err
    assert _files(run_dir) == before and _files(data) == data_before


def test_bad_prepare_requests_are_refused_and_write_nothing(reference, tmp_path, capsys):
    empty = tmp_path / "blank.jsonl"
    empty.write_text('{"text": "   "}\n{"text": ""}\n')
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine\n")
    cases = [
        (["data=files", f"data.path={empty}"], tmp_path / "e", ["no non-empty document"]),
        (["data.max_documents=200"], reference, ["prepare.out=", "different prepared dataset",
                                                 "source"]),  # fmt: skip
        ([], occupied, ["prepare.out=", "not an empty directory"]),
        (["data.vocab_size=70000", "prepare.dtype=uint16"], tmp_path / "v",
         ["data.vocab_size=70000", "prepare.dtype=uint16"]),
        (["data=tokens", f"data.path={reference}"], tmp_path / "t", ["data=tokens"]),
    ]  # fmt: skip
    for overrides, out, words in cases:
        before = _files(out) if out.exists() else None
        code = _prepare(out, *overrides)
        err = capsys.readouterr().err
        assert code == 2, (overrides, err)
        assert err.startswith("gradcycle.prepare: error: ") and "Traceback" not in err, err
        assert all(w in err for w in words), (words, err)
        assert (_files(out) if out.exists() else None) == before, overrides
