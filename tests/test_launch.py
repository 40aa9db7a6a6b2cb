"""Real launchers on train.py: torchrun (FSDP), the deepspeed launcher (ZeRO-2), Hydra multirun.

The three launches run side by side (each pays ~6 s of imports per process). None of them names a
run dir: all ranks must still agree on one (rank 0's timestamp, broadcast), and only rank 0 may
print or write. The deepspeed launcher appends --local_rank=N to train.py's arguments, which the
bootstrap must strip before Hydra parses them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, read_metrics
from multiproc import free_port

BIN = Path(sys.executable).parent
STEPS = 3
MICROS = (1, 2, 4, 8)

pytestmark = pytest.mark.slow


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def _finish(proc: subprocess.Popen, what: str, timeout: float = 420) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{what}: no exit within {timeout}s\n{out[-4000:]}")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("torchrun", "deepspeed", "sweep")}
    train = str(ROOT / "train.py")
    run = [*TINY, f"train.max_steps={STEPS}"]
    procs = {
        "torchrun": _start([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                            train, *run, "backend=fsdp"], dirs["torchrun"]),
        "deepspeed": _start([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port",
                             str(free_port()), train, *run, "backend=zero2"], dirs["deepspeed"]),
        "sweep": _start([sys.executable, train, "-m", *run, "train.global_batch_size=8",
                         f"train.micro_batch_size={','.join(map(str, MICROS))}",
                         f"hydra.sweep.dir={dirs['sweep'] / 'sweep'}"], dirs["sweep"]),
    }  # fmt: skip
    return {name: (_finish(p, name), dirs[name]) for name, p in procs.items()}


def _one_run_dir(cwd: Path) -> Path:
    runs = list((cwd / "outputs").iterdir())
    assert len(runs) == 1, f"ranks disagreed on the run dir: {runs}"
    return runs[0]


@pytest.mark.parametrize("name, backend", [("torchrun", "fsdp"), ("deepspeed", "zero2")])
def test_launcher_two_ranks_one_run_dir(launches, name, backend):
    out, cwd = launches[name]
    run_dir = _one_run_dir(cwd)
    assert re.search(rf"^ranks: world 2 via {name}, ", out, re.M), out[-3000:]
    assert out.count("batch plan:") == 1 and out.count("ranks: world") == 1  # rank 0 only
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["world_size"] == 2 for r in steps)
    assert re.search(rf"^backend:\n  name: {backend}$", (run_dir / "config.yaml").read_text(),
                     re.M)  # fmt: skip
    assert not list(cwd.glob("multirun")) and not list(cwd.glob("outputs/*/.hydra"))


def test_multirun_sweep_one_dir_per_job_and_table(launches):
    out, cwd = launches["sweep"]
    sweep = cwd / "sweep"
    rows = {}
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        steps = [r for r in read_metrics(job) if "loss" in r]
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        rows[steps[0]["micro_batch_size"]] = (steps[0]["accumulation_steps"], steps[-1]["loss"])
    # the global batch is held: micro x K == 8 in every job, and so is the objective
    assert rows.keys() == set(MICROS)
    assert all(micro * k == 8 for micro, (k, _) in rows.items())
    losses = [loss for _, loss in rows.values()]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), rows
    assert not (cwd / "outputs").exists()  # no stray per-job timestamp dirs

    table = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep_table.py"), str(sweep)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:7] == ["run", "backend", "world", "micro", "K", "global", "steps"]
    body = [line.split() for line in lines[2:]]
    assert [(int(b[3]), int(b[4])) for b in body] == [(m, 8 // m) for m in MICROS]
    assert all(float(b[7]) > 0 and float(b[8]) > 0 and float(b[9]) > 0 for b in body)
    as_json = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep_table.py"), "--json",
                              str(sweep)], capture_output=True, text=True, timeout=60)  # fmt: skip
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["micro"] for r in records] == list(MICROS)
    assert all(r["steps"] == STEPS and r["tokens_per_s"] > 0 for r in records)


def _shellcheck() -> str | None:
    exe = shutil.which("shellcheck")
    if exe is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "shellcheck"],
                       capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
        exe = shutil.which("shellcheck")
    return exe


def test_launch_scripts_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed and could not be installed (needs root + apt)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "launch").rglob("*")
                     if p.suffix in (".sh", ".sbatch"))  # fmt: skip
    assert {"launch/torchrun.sh", "launch/slurm/torchrun.sbatch", "launch/slurm/deepspeed.sbatch",
            "launch/slurm/local_cluster.sh"} <= set(scripts)  # fmt: skip
    out = subprocess.run([exe, "--external-sources", *scripts], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script", ["torchrun.sbatch", "deepspeed.sbatch"])
def test_sbatch_scripts_hold_the_node_and_give_each_rank_its_cores(script, tmp_path):
    """On a cgroup-enforcing cluster a job that asks for nothing gets one core and DefMemPerCPU:
    the scripts take the node, pass its cores to srun, and set OMP_NUM_THREADS per rank."""
    text = (ROOT / "launch" / "slurm" / script).read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert "--exclusive" in directives and "--mem=0" in directives
    assert "--cpus-per-task=" in text and "gc_threads" in text
    # gc_threads on a 64-core node with 8 ranks: 8 threads per rank, whatever the shell had.
    common = ROOT / "launch" / "slurm" / "_common.sh"
    out = subprocess.run(
        ["bash", "-c", f'source {common}; gc_threads 8 >/dev/null; echo "$OMP_NUM_THREADS '
         f'$GC_CPUS_PER_TASK"'],
        env={"PATH": os.environ["PATH"], "SLURM_CPUS_ON_NODE": "64", "OMP_NUM_THREADS": "99"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.stdout.split() == ["8", "8"], out.stderr
    assert "PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True" in common.read_text()
