"""Runs that survive faults: a kill during a checkpoint write, a stop signal on one rank (and the
Slurm requeue), a hung rank, NaN/inf losses and gradients, fp16 overflow."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, read_metrics, train_steps
from rank_procs import launch, logs, wait

STEPS = ["train.max_steps=5", "checkpoint.every=2", "checkpoint.keep=2"]
# LR independent of max_steps, so runs of different lengths take the same steps.
FLAT_LR = ["optim.schedule=constant", "optim.warmup_steps=0"]


def steps_of(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def model_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    from gradcycle.export import dcp_model_state

    return dcp_model_state(step_dir / "state")


def same_weights(a: Path, b: Path) -> bool:
    ta, tb = model_tensors(a), model_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def fake_scontrol(tmp_path: Path) -> tuple[str, Path]:
    """A `scontrol` on PATH that records its arguments: (PATH value, record file)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    exe = bin_dir / "scontrol"
    exe.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", record


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_latest_valid(tmp_path):
    """SIGKILL after step_4's shards are written, before its rename: step_2 and `latest` stay
    valid, the half-written checkpoint is never loaded, and resume=auto redoes steps 3-4 exactly."""
    run = tmp_path / "run"
    procs = launch(1, [*TINY, *STEPS, f"run_dir={run}"], tmp_path / "log",
                   env={"GRADCYCLE_FAULT": "kill_in_save:4"})  # fmt: skip
    assert wait(procs, timeout=300)[0][0] == -9, logs(tmp_path / "log")
    ckpts = run / "checkpoints"
    assert sorted(os.listdir(ckpts)) == [".tmp-step_4", "latest", "step_2"]
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert (ckpts / ".tmp-step_4/state/.metadata").is_file()  # died after the shards...
    assert not (ckpts / ".tmp-step_4/trainer.json").exists()  # ...before completing it
    assert [r["step"] for r in steps_of(run)] == [1, 2, 3, 4]

    resumed = train_steps(run, [*STEPS, "resume=auto"])
    reference = train_steps(tmp_path / "ref", STEPS)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed, reference):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["lr"] == b["lr"]
    assert sorted(os.listdir(ckpts)) == ["latest", "step_4", "step_5"]  # stale temp dir gone
    superseded = (run / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded] == [3, 4]


@pytest.mark.slow
def test_stop_signal_on_one_rank_stops_all_at_one_boundary_and_requeues(tmp_path):
    """SIGUSR1 reaches rank 1 only: both ranks checkpoint step_2 and exit 0, rank 0 requeues the
    Slurm job once; the run then resumes from step_2 (here on 1 rank, same global batch)."""
    path, record = fake_scontrol(tmp_path)
    run = tmp_path / "run"
    args = [*TINY, "train.max_steps=4", f"run_dir={run}"]
    env = {"GRADCYCLE_FAULT": "sigusr1:2:0@1", "SLURM_JOB_ID": "4242", "PATH": path}
    procs = launch(2, args, tmp_path / "log", env=env)
    exits = wait(procs, timeout=300)
    assert [code for code, _ in exits] == [0, 0], logs(tmp_path / "log")
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_2"]
    meta = json.loads((run / "checkpoints/step_2/trainer.json").read_text())
    assert meta["world_size"] == 2 and sorted(os.listdir(run / "checkpoints/step_2/rng")) == [
        "rank_0.pt", "rank_1.pt"]  # fmt: skip
    assert record.read_text().splitlines() == ["requeue 4242"]
    assert [r["step"] for r in steps_of(run)] == [1, 2]

    resumed = train_steps(run, ["train.max_steps=4", "resume=auto"])
    reference = train_steps(tmp_path / "ref", ["train.max_steps=4"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["world_size"] for r in resumed] == [2, 2, 1, 1]
    for a, b in zip(resumed, reference):  # 2 ranks vs 1: the same batches, summed differently
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_sigterm_checkpoints_without_requeue(tmp_path, monkeypatch):
    """SIGTERM (scancel, preemption) checkpoints and exits 0 but must not requeue the job."""
    path, record = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("GRADCYCLE_FAULT", "sigterm:1:3")
    records = train_steps(tmp_path / "run", ["train.max_steps=4"])
    assert [r["step"] for r in records] == [1]
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_1"
    assert not record.exists()


@pytest.mark.slow
def test_hung_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    """Rank 1 stops responding (SIGSTOP) mid-cycle; rank 0 waits in a collective until
    backend.dist_timeout_s, then exits non-zero instead of hanging forever."""
    timeout = 20
    args = [*TINY, "train.max_steps=4", f"run_dir={tmp_path / 'run'}",
            f"backend.dist_timeout_s={timeout}"]  # fmt: skip
    procs = launch(2, args, tmp_path / "log", env={"GRADCYCLE_FAULT": "hang:2:1@1"})
    try:
        code, _ = wait(procs[:1], timeout=240)[0]
    finally:
        procs[1].kill()
        procs[1].wait()
    text = logs(tmp_path / "log")
    assert code not in (0, None), text
    assert "timed out" in text.lower() or "timeout" in text.lower(), text
    assert [r["step"] for r in steps_of(tmp_path / "run")] == [1]


def test_nonfinite_skip_discards_the_update_and_counts_it(tmp_path, monkeypatch):
    """NaN loss at step 2, inf gradient at step 3, on_nonfinite=skip: neither updates the model
    (step_1 == step_2 == step_3 weights), both are counted, training goes on."""
    monkeypatch.setenv("GRADCYCLE_FAULT", "nan_loss:2,inf_grad:3")
    run = tmp_path / "run"
    records = train_steps(run, [*FLAT_LR, "train.max_steps=4", "checkpoint.every=1",
                                "checkpoint.keep=4"])  # fmt: skip
    assert [r["skipped"] for r in records] == [False, True, True, False]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2]
    assert records[1]["loss"] != records[1]["loss"]  # NaN, reported as such
    assert records[2]["loss"] == records[2]["loss"] and records[2]["grad_norm"] != 0
    ck = run / "checkpoints"
    assert same_weights(ck / "step_1", ck / "step_2") and same_weights(ck / "step_2", ck / "step_3")
    assert not same_weights(ck / "step_3", ck / "step_4")
    assert json.loads((ck / "step_4/trainer.json").read_text())["state"]["skipped_steps"] == 2


def test_nonfinite_halt_exits_3_and_saves_nothing_new(tmp_path, monkeypatch, capsys):
    from gradcycle.cli import main

    monkeypatch.setenv("GRADCYCLE_FAULT", "nan_loss:2")
    run = tmp_path / "run"
    code = main([*TINY, f"run_dir={run}", "train.max_steps=4", "checkpoint.every=1",
                 "train.on_nonfinite=halt"], str(ROOT / "conf"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3, err
    assert "non-finite loss" in err and "train.on_nonfinite=halt" in err
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_1"]
    assert [r["step"] for r in steps_of(run)] == [1]


def test_fp16_overflow_is_the_scalers_job_not_a_halt(tmp_path, monkeypatch):
    """precision=fp16 with an inf gradient and finite loss: the scaler skips the update and halves
    its scale; counted as an overflow, even under on_nonfinite=halt. The scale is checkpointed."""
    monkeypatch.setenv("GRADCYCLE_FAULT", "inf_grad:2")
    run = tmp_path / "run"
    records = train_steps(run, [*FLAT_LR, "precision=fp16", "train.on_nonfinite=halt",
                                "train.max_steps=3", "checkpoint.every=1",
                                "checkpoint.keep=3"])  # fmt: skip
    assert [r["skipped"] for r in records] == [False, True, False]
    assert [r["overflow_steps"] for r in records] == [0, 1, 1]
    assert [r["skipped_steps"] for r in records] == [0, 0, 0]
    ck = run / "checkpoints"
    assert same_weights(ck / "step_1", ck / "step_2")
    scale = [json.loads((ck / f"step_{i}/state/scaler.json").read_text())["scale"] for i in (1, 2)]
    assert scale[1] == scale[0] / 2


@pytest.mark.slow
def test_first_step_oom_on_two_ranks_stops_with_advice_instead_of_retrying(tmp_path):
    """No in-place retry with more than one rank: every rank that ran out of memory exits 2 with
    the planner's advice; one that did not (its peer left mid-collective) fails soon after."""
    args = [*TINY, "train.max_steps=2", "checkpoint.at_end=false", "backend.dist_timeout_s=60"]
    both = launch(2, [*args, f"run_dir={tmp_path / 'both'}"], tmp_path / "both-log",
                  env={"GRADCYCLE_FAULT": "oom:1:0"})  # fmt: skip
    codes = [code for code, _ in wait(both, timeout=240)]
    text = logs(tmp_path / "both-log")
    assert codes == [2, 2], text
    assert "out of memory in the first optimizer step" in text and "not retried in place" in text
    assert "retrying with" not in text

    one = launch(2, [*args, f"run_dir={tmp_path / 'one'}"], tmp_path / "one-log",
                 env={"GRADCYCLE_FAULT": "oom:1:1@1"})  # fmt: skip
    (code0, _), (code1, _) = wait(one, timeout=240)
    assert code1 == 2 and code0 not in (0, None), logs(tmp_path / "one-log")
