"""The rank bootstrap: every launcher's variables -> ranks, and every bad launch -> a clear error.

The Slurm environments below are the variables a real srun task and batch shell carried on the
local two-node test cluster (launch/slurm/local_cluster.sh), trimmed to what matters.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from gradcycle import distributed
from gradcycle.distributed import (
    DistEnv,
    LaunchError,
    expand_nodelist,
    expand_tasks_per_node,
    read_env,
    strip_local_rank_args,
)

SRUN_TASK_1 = {  # task 1 of `srun` over node[1-2], one task per node
    "SLURM_JOB_ID": "4",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURMD_NODENAME": "node2",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
}
BATCH_SHELL = {  # the batch script itself: SLURM_PROCID/NTASKS are set, but it is no job step
    k: v for k, v in SRUN_TASK_1.items() if not k.startswith("SLURM_STEP")
} | {"SLURM_PROCID": "0", "SLURMD_NODENAME": "node1", "SLURM_NODEID": "0"}
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
            "TORCHELASTIC_RUN_ID": "abc"}  # fmt: skip
DEEPSPEED = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
             "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29500"}  # fmt: skip


def test_launchers_map_to_ranks():
    assert read_env({}) == DistEnv()
    t = read_env(TORCHRUN)
    assert (t.rank, t.local_rank, t.world_size, t.local_world_size, t.launcher) == (
        3, 1, 4, 2, "torchrun")  # fmt: skip
    assert (t.master_addr, t.master_port, t.num_nodes) == ("10.0.0.1", "29400", 2)
    d = read_env(DEEPSPEED)
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size, d.launcher) == (
        1, 1, 2, 2, "deepspeed")  # fmt: skip
    s = read_env(SRUN_TASK_1)
    assert (s.rank, s.local_rank, s.world_size, s.local_world_size, s.launcher) == (
        1, 0, 2, 1, "slurm")  # fmt: skip
    assert s.master_addr == "node1" and s.num_nodes == 2
    assert s.master_port == read_env({**SRUN_TASK_1, "SLURM_PROCID": "0", "SLURMD_NODENAME":
                                      "node1", "SLURM_NODEID": "0"}).master_port  # fmt: skip
    assert s.master_port != read_env({**SRUN_TASK_1, "SLURM_JOB_ID": "5"}).master_port
    # torchrun inside srun: torchrun's variables win over the per-node Slurm task's
    inside = read_env({**SRUN_TASK_1, **TORCHRUN})
    assert (inside.rank, inside.world_size, inside.launcher) == (3, 4, "torchrun")


def test_batch_shell_is_one_process_not_rank_0_of_n():
    # A plain `python train.py` in an sbatch script must not wait for 1 more "rank" forever.
    assert read_env(BATCH_SHELL) == DistEnv()


def test_slurm_multi_task_nodes():
    env = {**SRUN_TASK_1, "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_STEP_NUM_NODES": "3",
           "SLURMD_NODENAME": "gpu08", "SLURM_STEP_NUM_TASKS": "11",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_PROCID": "6",
           "SLURM_LOCALID": "2"}  # fmt: skip
    e = read_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (6, 2, 11, 4)
    assert e.master_addr == "gpu07"


@pytest.mark.parametrize(
    "env, needle",
    [
        ({**SRUN_TASK_1, "SLURM_STEP_NUM_NODES": "3"}, "SLURM_STEP_NUM_NODES=3"),
        ({**SRUN_TASK_1, "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, "SLURM_STEP_NUM_TASKS=2"),
        (
            {**SRUN_TASK_1, "SLURM_STEP_TASKS_PER_NODE": "1(x3)", "SLURM_STEP_NUM_TASKS": "3"},
            "on 2 nodes",
        ),
        ({**SRUN_TASK_1, "SLURM_PROCID": "2"}, "rank 2 is outside world size 2"),
        ({**SRUN_TASK_1, "SLURM_LOCALID": "1"}, "local rank 1 of 1"),
        ({**SRUN_TASK_1, "RANK": "0", "WORLD_SIZE": "2"}, "SLURM_PROCID=1"),
        ({**SRUN_TASK_1, "SLURM_STEP_NODELIST": "node[1-x]"}, "cannot parse Slurm node list"),
        ({**SRUN_TASK_1, "SLURM_STEP_TASKS_PER_NODE": "one"}, "SLURM_STEP_TASKS_PER_NODE"),
        ({**SRUN_TASK_1, "SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, "MASTER_ADDR is unset"),
        ({"RANK": "0"}, "WORLD_SIZE missing"),
        ({**DEEPSPEED, "LOCAL_RANK": "2"}, "local rank 2 of 2"),
        ({**TORCHRUN, "MASTER_PORT": "99999"}, "MASTER_PORT='99999'"),
        ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0"}, "outside world size 0"),
    ],
    ids=[
        "nodes-vs-nodelist",
        "tasks-per-node-vs-tasks",
        "tasks-per-node-vs-nodelist",
        "procid-vs-tasks",
        "localid-vs-tasks-on-node",
        "stale-RANK-in-srun",
        "bad-nodelist",
        "bad-tasks-per-node",
        "non-integer",
        "no-master-addr",
        "rank-without-world",
        "local-rank-vs-local-size",
        "bad-port",
        "world-0",
    ],  # fmt: skip
)
def test_inconsistent_launch_variables_are_named(env, needle):
    with pytest.raises(LaunchError) as err:
        read_env(env)
    assert needle in str(err.value)


def test_expand_nodelist():
    assert expand_nodelist("node[1-2]") == ["node1", "node2"]
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                        "login1"]  # fmt: skip
    assert expand_nodelist("a[9-10]-ib,b") == ["a9-ib", "a10-ib", "b"]
    assert expand_nodelist("host") == ["host"]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_strip_local_rank_args(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank_args(["a=1", "--local_rank=3", "b=2"]) == ["a=1", "b=2"]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank_args(["--local-rank", "1", "x=y"]) == ["x=y"]
    assert os.environ["LOCAL_RANK"] == "1"
    with pytest.raises(LaunchError, match="given 2 times"):
        strip_local_rank_args(["--local_rank=1", "--local-rank=1"])
    with pytest.raises(LaunchError, match="disagrees with LOCAL_RANK=1"):
        strip_local_rank_args(["--local_rank=0"])
    with pytest.raises(LaunchError, match="not an integer"):
        strip_local_rank_args(["--local_rank=x"])
    with pytest.raises(LaunchError, match="not an integer"):
        strip_local_rank_args(["--local_rank"])


def test_cli_rejects_local_rank_twice(capsys, monkeypatch):
    from gradcycle import cli

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.main(["--local_rank=0", "--local_rank=1"]) == cli.EXIT_USAGE
    assert "--local_rank given 2 times" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_rank_env(monkeypatch):
    """init_process_group exports RANK & co: restore them after the test."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):  # fmt: skip
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    return monkeypatch


@pytest.mark.parametrize("rank", [0, 1], ids=["rank0-alone", "rank1-no-server"])
def test_rendezvous_nobody_answers_fails_within_timeout(clean_rank_env, rank):
    env = DistEnv(rank, 0, 2, "127.0.0.1", str(_free_port()), "env", 1)
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:
        distributed.init_process_group(env, torch.device("cpu"), timeout_s=2)
    elapsed = time.monotonic() - t0
    assert elapsed < 20, f"took {elapsed:.1f}s with a 2s timeout"
    assert f"rank {rank} of 2: rendezvous at 127.0.0.1:" in str(err.value)
    assert "backend.dist_timeout_s=2s" in str(err.value)


def test_rendezvous_unresolvable_host_fails_at_once(clean_rank_env):
    env = DistEnv(1, 0, 2, "no-such-host.invalid", "29500", "env", 1)
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="MASTER_ADDR=no-such-host.invalid does not resolve"):
        distributed.init_process_group(env, torch.device("cpu"), timeout_s=60)
    assert time.monotonic() - t0 < 10


def test_cli_unreachable_rendezvous_exits_2_on_that_rank(clean_rank_env, capsys, tmp_path):
    """The whole path (train.py's main, bootstrap, trainer) on a rank whose rank 0 never comes:
    exit code 2 and one message on this rank, within the configured timeout."""
    from conftest import TINY

    from gradcycle import cli

    clean_rank_env.setenv("RANK", "1")
    clean_rank_env.setenv("WORLD_SIZE", "2")
    clean_rank_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_rank_env.setenv("MASTER_PORT", str(_free_port()))
    t0 = time.monotonic()
    code = cli.main([*TINY, f"run_dir={tmp_path / 'run'}", "backend.dist_timeout_s=2"])
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "gradcycle: error: rank 1 of 2: rendezvous at 127.0.0.1:" in err
    assert time.monotonic() - t0 < 60
    assert not Path(tmp_path / "run").exists()  # nothing written by a rank that never joined


def test_resolve_run_dir_uses_the_job_id(monkeypatch, tmp_path):
    from conftest import compose

    from gradcycle.trainer import resolve_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose(["run_dir=null"])
    assert resolve_run_dir(cfg, DistEnv()) == tmp_path / "outputs" / "4242"
    cfg = compose([f"run_dir={tmp_path / 'explicit'}"])
    assert resolve_run_dir(cfg, DistEnv()) == tmp_path / "explicit"
