"""Bad input: one clear message naming the field and the fix, exit code 2, nothing touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY

from gradcycle.cli import main

CONF = str(ROOT / "conf")


@pytest.fixture()
def run_dir(tmp_path):
    """An existing run dir with files a bad invocation must not touch."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (d / "config.yaml").write_text("seed: 1\n")
    return d


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _data_file(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


CASES = [
    # (overrides, words the message must contain)
    (["foo=1"], ["foo"]),
    (["train.max_steps=abc"], ["train.max_steps", "abc"]),
    (["optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    (
        ["train.global_batch_size=16", "train.micro_batch_size=32"],
        ["micro_batch_size=32", "larger"],
    ),
    (
        ["train.global_batch_size=30", "train.micro_batch_size=4"],
        ["global_batch_size=30", "28 or 32"],
    ),
    (["data.seq_len=1"], ["data.seq_len=1", ">= 2"]),
    (["backend=megatron"], ["backend", "megatron"]),
    (["backend.name=megatron"], ["backend.name='megatron'", "ddp"]),
    (["precision=fp8"], ["precision='fp8'", "bf16"]),
    (["activation_checkpointing.mode=some"], ["activation_checkpointing.mode", "selective"]),
    (["data=files", "data.path=/nonexistent/*.jsonl"], ["data.path", "matches no file"]),
    (["data=files"], ["data.path"]),
    (["train.accumulation_steps=2"], ["exactly one", "train.accumulation_steps"]),
    (["optim.scale_rule=linear"], ["optim.reference_batch_size"]),
    (["model.hidden_size=100", "model.num_heads=3"], ["model.hidden_size=100", "num_heads=3"]),
    (["optim.lr=nan"], ["optim.lr=nan", "finite"]),
    (["optim.lr=inf"], ["optim.lr=inf", "finite"]),
    (["optim.weight_decay=nan"], ["optim.weight_decay=nan", "finite"]),
    (["optim.beta2=1.5"], ["optim.beta2=1.5", "[0, 1)"]),
    (["data.tokenizer=/no/such/dir"], ["data.tokenizer='/no/such/dir'", "no such directory"]),
    (["hardware.bf16_tflops=-1"], ["hardware.bf16_tflops=-1", "> 0"]),
]


@pytest.mark.parametrize("overrides, words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_config_errors(overrides, words, run_dir, capsys):
    before = _snapshot(run_dir)
    code = main([*TINY, f"run_dir={run_dir}", *overrides], CONF)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gradcycle: error: ") and err.count("\n") <= 2, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.jsonl", b"", ["empty.jsonl", "is empty"]),
        (
            "docs.jsonl",
            b'{"content": "def f(): pass"}\n' * 3,
            ["data.text_field='text'", "content"],
        ),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1") * 5, ["latin1.txt", "not valid UTF-8"]),
        ("notes.md", b"# hi\n", ["notes.md", ".jsonl/.json/.parquet/.txt"]),
    ],
)
def test_data_errors(name, content, words, tmp_path, run_dir, capsys):
    path = _data_file(tmp_path, name, content)
    before = _snapshot(run_dir)
    code = main([*TINY, f"run_dir={run_dir}", "data=files", f"data.path={path}",
                 f"data.cache_dir={tmp_path / 'cache'}"], CONF)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    for w in words:
        assert w in err, (w, err)
    assert _snapshot(run_dir) == before


def test_train_py_exit_code_and_single_message(run_dir):
    """Through the real entry point: exit status 2, no traceback wall, run dir untouched."""
    before = _snapshot(run_dir)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"run_dir={run_dir}", "optim.lr=-1"],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr=-1.0 must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(run_dir) == before


def test_local_rank_twice_is_rejected(capsys):
    code = main(["--local_rank=0", "--local_rank=1"], CONF)
    assert code == 2
    assert "--local_rank given 2 times" in capsys.readouterr().err


def test_metrics_untouched_json_still_valid(run_dir):
    # guards the fixture itself: the snapshot compares real content
    assert json.loads((run_dir / "metrics.jsonl").read_text())["step"] == 1


@pytest.mark.parametrize("field", ["model.pretrained", "data.tokenizer"])
def test_incomplete_local_model_folder_names_field_folder_and_what_is_missing(
    field, tmp_path, run_dir, capsys
):
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _snapshot(run_dir)
    code = main([*TINY, f"run_dir={run_dir}", f"{field}={empty}"], CONF)
    err = capsys.readouterr().err
    assert code == 2 and err.count("gradcycle: error:") == 1, err
    assert f"{field}='{empty}'" in err and "tokenizer files" in err
    if field == "model.pretrained":
        assert "config.json" in err and "weights" in err
    assert "sentencepiece" not in err and "Traceback" not in err
    assert _snapshot(run_dir) == before
