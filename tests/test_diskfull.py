"""A full disk while a checkpoint is written: checked before the write (and at start-up), a write
that fails anyway reported in one message with exit code 4, the partial `.tmp-step_N` removed,
the previous checkpoint intact, and resume=auto exact afterwards; DCP (ddp, fsdp) and DeepSpeed,
on 1 and 2 ranks.

The full disk is the kernel's: GRADCYCLE_FAULT=disk_full:<step> sets RLIMIT_FSIZE while that
checkpoint's shards are written, so every write of a file past 64 KiB fails (EFBIG) in Python's
writer, torch's C++ zip writer and DeepSpeed's alike, as on a disk that fills up mid-write; no
root, no special filesystem. no_space:<step> makes the free-space check see 0 bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, read_metrics
from multiproc import free_port, run_on_ranks

# step_1 is written, step_2 (the last) meets the full disk; resume redoes step 2 from step_1.
STEPS = ["train.max_steps=2", "checkpoint.every=1"]
WORDS = ["checkpoint step_2", "filesystem:", "free:", "needed:", "latest = step_1",
         "checkpoint.keep", "run_dir=", "exit code 4"]  # fmt: skip


def _jobs(rank: int, world: int, jobs: list) -> list:
    """Each (run_dir, overrides, GRADCYCLE_FAULT, port) through the command line, in turn: rank 0
    returns its exit code, stderr, the checkpoints dir and the step records, the others their exit
    code and stderr. Exit 4 destroys the
    process group; the next job's rendezvous gets a port of its own (a new store on the old port
    could meet a peer still talking to the old one)."""
    from gradcycle.cli import main

    out = []
    for run_dir, overrides, fault, port in jobs:
        os.environ.update(GRADCYCLE_FAULT=fault, MASTER_PORT=str(port))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([*TINY, f"run_dir={run_dir}", *overrides], str(ROOT / "conf"))
        ckpts = Path(run_dir, "checkpoints")
        superseded = Path(run_dir, "metrics.superseded.jsonl")
        out.append({
            "code": code, "err": err.getvalue(),
            "names": sorted(os.listdir(ckpts)) if ckpts.is_dir() else [],
            "latest": (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else None,
            "records": [r for r in read_metrics(run_dir) if "loss" in r]
                       if Path(run_dir, "metrics.jsonl").exists() else [],
            "superseded": [json.loads(x) for x in superseded.read_text().splitlines()]
                          if superseded.exists() else [],
        } if rank == 0 else {"code": code, "err": err.getvalue()})  # fmt: skip
    os.environ.pop("GRADCYCLE_FAULT", None)
    return out


def _fail_then_resume(base: Path, name: str, overrides: list[str]) -> list:
    run = str(base / name)
    return [(run, [*STEPS, *overrides], "disk_full:2", free_port()),
            (run, [*STEPS, *overrides, "resume=auto"], "", free_port())]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn per world size: the disk-full run and its resume per backend, and (1 rank) the
    start-up checks, (2 ranks) one rank short of space while the other is not."""
    base = tmp_path_factory.mktemp("diskfull")
    one = [*_fail_then_resume(base, "ddp-1", ["backend=ddp"]),
           *_fail_then_resume(base, "zero2-1", ["backend=zero2"]),
           (str(base / "warn"), STEPS, "no_space:0,no_space:2", free_port()),
           (str(base / "require"), [*STEPS, "checkpoint.require_space=true"], "no_space:0",
            free_port())]  # fmt: skip
    two = [*_fail_then_resume(base, "ddp-2", ["backend=ddp"]),
           *_fail_then_resume(base, "fsdp-2", ["backend=fsdp"]),
           *_fail_then_resume(base, "zero2-2", ["backend=zero2"]),
           (str(base / "short-2"), [*STEPS, "backend=ddp"], "no_space:2@1", free_port())]  # fmt: skip
    two_ranks = run_on_ranks(_jobs, 2, args=(two,))
    results = {1: run_on_ranks(_jobs, 1, args=(one,))[0], 2: two_ranks[0]}
    return base, results, two_ranks[1]


CASES = [(1, 0, "ddp"), (1, 2, "zero2"), (2, 0, "ddp"), (2, 2, "fsdp"), (2, 4, "zero2")]


@pytest.mark.parametrize("world, index, backend", CASES)
def test_write_failure_is_one_message_and_resume_is_exact(runs, world, index, backend):
    failed, resumed = runs[1][world][index : index + 2]
    err = failed["err"]
    assert failed["code"] == 4, err
    assert "could not be written" in err and "Traceback" not in err, err
    assert all(w in err for w in WORDS), err
    # EFBIG as the kernel said it, or torch's C++ writer's words (it gives no errno)
    assert "File too large [EFBIG]" in err or "inside torch.save" in err, err
    assert ("on all 2 ranks" if world == 2 else "on rank 0") in err, err
    assert ".tmp-step_2" in err and "written before the failure" in err
    assert failed["names"] == ["latest", "step_1"] and failed["latest"] == "step_1"  # tmp gone
    assert [r["step"] for r in failed["records"]] == [1, 2]  # step 2 trained, its save failed
    if world == 2:  # rank 1 exits 4 too, printing no message of its own: one per run
        other, other_resumed = runs[2][index : index + 2]
        assert other["code"] == 4 and other_resumed["code"] == 0, other
        assert not any(w in other["err"] for w in ("gradcycle: error", "Traceback")), other

    # resume=auto from step_1 redoes step 2 exactly as the uninterrupted run trained it
    assert resumed["code"] == 0, resumed["err"]
    assert resumed["names"] == ["latest", "step_1", "step_2"] and resumed["latest"] == "step_2"
    (redone,) = [r for r in resumed["records"] if r["step"] == 2]
    original = failed["records"][1]
    assert [s["step"] for s in resumed["superseded"]] == [2]
    for key in ("loss", "grad_norm"):
        assert abs(redone[key] - original[key]) <= 1e-6 * max(1.0, abs(original[key])), key
    assert redone["lr"] == original["lr"] and redone["tokens_seen"] == original["tokens_seen"]
    assert redone["world_size"] == world


def test_one_rank_short_of_space_stops_every_rank_before_writing(runs):
    """no_space on rank 1 only: both ranks stop at the same check (no rank waits in a write the
    other never starts), exit 4, nothing of step_2 on disk, the message names rank 1."""
    r = runs[1][2][6]
    assert r["code"] == 4 and runs[2][6]["code"] == 4, (r["err"], runs[2][6])
    assert not any(w in runs[2][6]["err"] for w in ("gradcycle: error", "Traceback"))
    assert "checkpoint step_2 was not written: too little free space" in r["err"], r["err"]
    assert "free: 0 B (on rank 1: the least any rank sees)" in r["err"], r["err"]
    assert all(w in r["err"] for w in WORDS) and "Traceback" not in r["err"]
    assert r["names"] == ["latest", "step_1"] and r["latest"] == "step_1"


def test_start_up_check_warns_or_stops(runs):
    """At start-up the next checkpoint would not fit: a warning (training goes on and the check
    before step_2 stops it), or with checkpoint.require_space=true a stop before any step."""
    warned, required = runs[1][1][4:6]
    assert "gradcycle: warning: checkpoint step_1, the next this run writes, will not fit" in (
        warned["err"])  # fmt: skip
    assert "parameters x 12 B of model and optimizer state" in warned["err"]  # no checkpoint yet
    assert warned["code"] == 4 and [r["step"] for r in warned["records"]] == [1, 2]
    assert "checkpoint step_2 was not written" in warned["err"]
    assert warned["names"] == ["latest", "step_1"]
    # the first checkpoint's estimate (model + optimizer bytes) is near what step_1 took on disk
    from gradcycle.diskspace import recorded_bytes

    estimate = float(re.search(r"needed: about ([\d.]+) MiB", warned["err"])[1]) * 2**20
    written = recorded_bytes(runs[0] / "warn" / "checkpoints" / "step_1")
    assert 0.9 < estimate / written < 1.3, (estimate, written)

    assert required["code"] == 4, required["err"]
    assert "checkpoint.require_space=true: stopped before training" in required["err"]
    assert "no checkpoint of this run exists yet" in required["err"]
    assert required["records"] == [] and required["names"] == []


def test_write_failure_recognises_what_writers_raise_on_a_full_disk(tmp_path):
    """The real errors (the kernel refusing the write), not hand-made ones: Python's writer, torch's
    C++ zip writer (no errno), DCP's CheckpointException, the tokenizers library; other errors
    are not write failures."""
    from tokenizers import Tokenizer, models
    from torch.distributed.checkpoint.api import CheckpointException

    from gradcycle.diskspace import write_failure
    from gradcycle.faults import FULL_AFTER, _file_size_limit

    big = torch.zeros(FULL_AFTER)  # 4 B each: past the limit
    attempts = {
        "python": lambda: (tmp_path / "a.bin").write_bytes(bytes(2 * FULL_AFTER)),
        "torch.save(path)": lambda: torch.save(big, tmp_path / "b.pt"),
        "torch.save(stream)": lambda: _save_to_stream(big, tmp_path / "c.pt"),
        "dcp.save": lambda: _dcp_save(big, tmp_path / "d"),
        "tokenizers": lambda: Tokenizer(models.WordLevel({f"w{i}": i for i in range(9000)},
                                                          unk_token="w0")).save(str(tmp_path / "t.json")),
    }  # fmt: skip
    seen = {}
    for name, attempt in attempts.items():
        with _file_size_limit(FULL_AFTER):
            try:
                attempt()
            except (Exception, CheckpointException) as e:
                seen[name] = (type(e).__name__, write_failure(e))
    assert set(seen) == set(attempts), seen  # every writer failed
    assert seen["python"] == ("OSError", "File too large [EFBIG]")
    assert seen["dcp.save"][0] == "CheckpointException" and "EFBIG" in seen["dcp.save"][1]
    assert seen["tokenizers"][1] == "File too large [EFBIG]"
    assert "inside torch.save" in seen["torch.save(path)"][1]  # C++: no errno to report
    assert seen["torch.save(stream)"][1]
    for other in (ValueError("bad"), RuntimeError("boom"), KeyError("w")):
        assert write_failure(other) is None
    torch.save(big, tmp_path / "after.pt")  # the limit is lifted again


def _save_to_stream(tensor: torch.Tensor, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(tensor, f)


def _dcp_save(tensor: torch.Tensor, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from gradcycle.safe_load import quiet_single_process

    with quiet_single_process():
        dcp.save({"w": tensor}, checkpoint_id=str(path), no_dist=True)
