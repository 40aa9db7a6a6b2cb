"""The project's own sbatch scripts on a real Slurm: two slurmd on this machine (node1, node2).

launch/slurm/local_cluster.sh installs Debian's Slurm and munge if missing and starts the cluster;
this module stops it again at the end unless it was already running. Each job trains the tiny
model on 2 nodes x 1 CPU rank (gloo) and must: complete (exit 0), show both ranks on both nodes
agreeing on world size 2, and leave exactly one metrics.jsonl with every step once.

The torchrun job also gets the time-limit warning exactly as `#SBATCH --signal=B:USR1@120` sends
it (USR1 to the batch shell): the ranks checkpoint, the job is requeued, and the second run resumes
in the same run dir. Slurm delays a requeued job by ~2 minutes; the test releases it at once.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, read_metrics

CLUSTER = ROOT / "launch" / "slurm" / "local_cluster.sh"
SLURM_DIR = Path(os.environ.get("GRADCYCLE_SLURM_DIR", "/tmp/gradcycle-slurm"))
STEPS = 3
LONG_STEPS = 60  # long enough that the signal lands mid-run

pytestmark = pytest.mark.slow


def _can_run() -> str | None:
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return None if os.geteuid() == 0 else "the local cluster's daemons need root"
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _cluster(cmd: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), cmd], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def slurm_env():
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    # Both fake nodes share this machine's cores: one thread per rank (the scripts would give
    # each rank its node's share, i.e. every core twice over).
    env = {**os.environ, "GRADCYCLE_SLURM_DIR": str(SLURM_DIR),
           "SLURM_CONF": str(SLURM_DIR / "slurm.conf"), "GRADCYCLE_OMP_THREADS": "1"}  # fmt: skip
    # One test session at a time drives the cluster: another one would stop it under our jobs.
    with open(f"{SLURM_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        already_running = _cluster("status", env, 30).returncode == 0
        started = _cluster("start", env)
        assert started.returncode == 0, f"local cluster did not start:\n{started.stderr}"
        try:
            yield env
        finally:
            if not already_running:
                stopped = _cluster("stop", env, 120)
                assert stopped.returncode == 0, stopped.stderr


def _submit(script: str, out: Path, overrides: list[str], env: dict) -> tuple:
    cmd = ["sbatch", "--wait", "--parsable", "--time=10", f"--output={out}",
           str(ROOT / "launch" / "slurm" / script), *overrides]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    job = proc.stdout.readline().strip().split(";")[0]  # printed at submission, before waiting
    assert job.isdigit(), f"sbatch {script} failed: {proc.communicate()[1]}"
    return proc, job


def _cancel_all(env: dict) -> None:
    """Every job of the local test cluster (nothing else runs there)."""
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                          timeout=30).stdout.split()  # fmt: skip
    if jobs:
        subprocess.run(["scancel", *jobs], env=env, timeout=30)


def _job_state(job: str, env: dict) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                          text=True, timeout=30).stdout  # fmt: skip
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _layout(log: str) -> list[dict]:
    """Every 'ranks:' line of the bootstrap (one per run) -> world, launcher, {rank: (host,
    local rank/of)}."""
    runs = []
    for m in re.finditer(r"^ranks: world (\d+) via (\w+), rendezvous (\S+): (.+)$", log, re.M):
        ranks = {}
        for item in m.group(4).split(", "):
            rank, _, rest = item.partition("=")
            host, _, local = rest.partition(":")
            ranks[int(rank)] = (host, local)
        runs.append({"world": int(m.group(1)), "launcher": m.group(2), "ranks": ranks})
    assert runs, f"no 'ranks:' line in the job log:\n{log[-3000:]}"
    return runs


def _check_run(run_dir: Path, log: str, launcher: str, steps: int) -> None:
    for layout in _layout(log):
        assert layout["world"] == 2 and layout["launcher"] == launcher, layout
        assert sorted(layout["ranks"]) == [0, 1]
        assert {h for h, _ in layout["ranks"].values()} == {"node1", "node2"}  # two nodes
        assert all(local == "0/1" for _, local in layout["ranks"].values())
    assert [p.relative_to(run_dir) for p in run_dir.rglob("metrics.jsonl")] == [
        Path("metrics.jsonl")
    ]
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # each once: rank 0 only
    assert all(r["world_size"] == 2 for r in records)


def _wait(proc: subprocess.Popen, job: str, env: dict, deadline: float) -> None:
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        _cancel_all(env)
        pytest.fail(f"job {job} did not finish in time: {_job_state(job, env)}")
    state = _job_state(job, env)
    assert proc.returncode == 0, f"job {job} failed ({err.strip()}): {state}"
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", state
    assert state.get("NumNodes") == "2", state


def _until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def test_sbatch_scripts_train_on_two_nodes_and_requeue(slurm_env, tmp_path):
    """torchrun.sbatch (torchrun per node, c10d rendezvous; USR1 -> checkpoint -> requeue ->
    resume) and deepspeed.sbatch (one srun task per rank, ZeRO-2 by default) side by side."""
    deadline = time.monotonic() + 540
    tr_dir, ds_dir = tmp_path / "torchrun", tmp_path / "deepspeed"
    tr_log, ds_log = tmp_path / "torchrun.log", tmp_path / "deepspeed.log"
    tr, tr_job = _submit("torchrun.sbatch", tr_log, [*TINY, f"train.max_steps={LONG_STEPS}",
                         "backend=ddp", f"run_dir={tr_dir}"], slurm_env)  # fmt: skip
    ds, ds_job = _submit("deepspeed.sbatch", ds_log, [*TINY, f"train.max_steps={STEPS}",
                         f"run_dir={ds_dir}"], slurm_env)  # fmt: skip
    try:
        # The time-limit warning as Slurm sends it with --signal=B:USR1@...: to the batch shell.
        _until(lambda: (tr_dir / "metrics.jsonl").exists()
               and "loss" in (tr_dir / "metrics.jsonl").read_text(), 300, "the first step")  # fmt: skip
        subprocess.run(["scancel", "--batch", "--signal=USR1", tr_job], env=slurm_env, check=True,
                       timeout=30)  # fmt: skip

        def requeued():
            state = _job_state(tr_job, slurm_env)
            return state.get("Restarts") == "1" and state.get("JobState") == "PENDING"

        _until(requeued, 240, f"job {tr_job} to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={tr_job}", "StartTime=now"], env=slurm_env,
                       check=True, timeout=30)  # fmt: skip
        _wait(ds, ds_job, slurm_env, deadline)
        _wait(tr, tr_job, slurm_env, deadline)
    finally:
        for proc in (tr, ds):
            if proc.poll() is None:
                proc.kill()
                _cancel_all(slurm_env)

    ds_text = ds_log.read_text()
    _check_run(ds_dir, ds_text, "slurm", STEPS)
    assert re.search(r"^backend:\n  name: zero2$", (ds_dir / "config.yaml").read_text(), re.M)

    tr_text = tr_log.read_text()
    _check_run(tr_dir, tr_text, "torchrun", LONG_STEPS)
    assert _job_state(tr_job, slurm_env).get("Restarts") == "1"
    assert len(_layout(tr_text)) == 2  # the first run and the requeued one, same job log
    resumed = re.search(r"^resumed from (\S+)/step_(\d+) at step (\d+)$", tr_text, re.M)
    assert resumed, tr_text[-3000:]
    assert Path(resumed.group(1)) == tr_dir / "checkpoints"
    assert 1 <= int(resumed.group(2)) == int(resumed.group(3)) < LONG_STEPS


def test_submitit_sweep_on_two_nodes(slurm_env, tmp_path):
    """`python train.py -m hydra/launcher=submitit_slurm ...`: one Slurm job per sweep point,
    each on 2 nodes (submitit's srun tasks -> the bootstrap's Slurm mapping)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="pip install -e '.[slurm]' (submitit, hydra-submitit-launcher)")  # fmt: skip
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10",
           "hydra.launcher.nodes=2", *TINY, f"train.max_steps={STEPS}", "backend=ddp,zero2",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=slurm_env, capture_output=True, text=True,
                         timeout=480)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, backend in zip(jobs, ("ddp", "zero2")):
        assert re.search(rf"^backend:\n  name: {backend}$", (job / "config.yaml").read_text(),
                         re.M)  # fmt: skip
        records = [r for r in read_metrics(job) if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert all(r["world_size"] == 2 for r in records)
    layouts = _layout(logs)
    assert len(layouts) == 2 and all(lay["launcher"] == "slurm" for lay in layouts)
    assert all({h for h, _ in lay["ranks"].values()} == {"node1", "node2"} for lay in layouts)
