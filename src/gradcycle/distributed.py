"""Rank bootstrap: torchrun / deepspeed / Slurm environment -> rank, world, process group, seed.

One function, `read_env()`, maps every launcher's variables; it runs before the process group
exists, so a misconfigured launch fails with a clear message instead of hanging:

  torchrun, deepspeed, env://   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE | LOCAL_SIZE,
                                MASTER_ADDR, MASTER_PORT (set by the launcher)
  srun, one task per device     SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_NODEID,
                                SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NODELIST (first host =
                                MASTER_ADDR), SLURM_JOB_ID (-> MASTER_PORT)

A simulated rank (`simulated(env)`, python -m gradcycle.simulate) replaces all of them: read_env
returns that rank's view and init_process_group creates torch's fake process group, in which
every collective is issued and none communicates.

Only a job *step* (srun) counts as a Slurm launch: the batch script itself also carries
SLURM_PROCID=0 and SLURM_NTASKS=N, and a plain `python train.py` there is one process, not rank 0
of N waiting forever for the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# re-exported: LaunchError is what callers catch, the parsers what tests check
from gradcycle.launch_vars import LaunchError, expand_nodelist, expand_tasks_per_node  # noqa: F401


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: str | None = None
    launcher: str = "python"  # python | torchrun | deepspeed | env | slurm | simulate
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def nodes_from_env(env=None) -> int | None:
    """Nodes of this launch: WORLD_SIZE / LOCAL_WORLD_SIZE (torchrun, deepspeed, a mapped srun),
    else SLURM_NNODES; None when no launcher says. Uneven nodes count as the ceiling."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        world, local = int(env["WORLD_SIZE"]), max(1, int(env["LOCAL_WORLD_SIZE"]))
        return max(1, -(-world // local))
    if "SLURM_NNODES" in env:
        return int(env["SLURM_NNODES"])
    return None


def strip_local_rank_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra would reject; move it to env."""
    kept, seen = [], []
    it = iter(argv)
    for arg in it:
        m = re.fullmatch(r"--local[_-]rank(?:=(.*))?", arg)
        if m is None:
            kept.append(arg)
            continue
        value = m.group(1) if m.group(1) is not None else next(it, None)
        if value is None or not value.isdigit():
            raise LaunchError(
                f"--local_rank value {value!r} is not an integer: expected --local_rank=<int>"
            )
        seen.append(value)
    if len(seen) > 1:
        raise LaunchError(
            f"--local_rank given {len(seen)} times ({', '.join(seen)}): pass it once "
            "(the deepspeed launcher already appends it; use --no_local_rank to stop that)"
        )
    if seen:
        if os.environ.get("LOCAL_RANK", seen[0]) != seen[0]:
            raise LaunchError(
                f"--local_rank={seen[0]} disagrees with LOCAL_RANK={os.environ['LOCAL_RANK']}"
            )
        os.environ["LOCAL_RANK"] = seen[0]
    return kept


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment {name}={env[name]!r} is not an integer") from None


_simulated: DistEnv | None = None  # set by simulated(): this process plays that rank


@contextlib.contextmanager
def simulated(env: DistEnv):
    """Inside, this process is rank env.rank of env.world_size (gradcycle.sim): read_env returns
    `env`, its variables are exported (nodes_from_env, hsdp's default, DeepSpeed read them) and
    init_process_group creates the fake process group, destroyed on exit."""
    global _simulated
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    _simulated = env
    export_env(env)
    try:
        yield env
    finally:
        _simulated = None
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_env(env=None) -> DistEnv:
    """The launcher's view of this process, checked; DistEnv() (world 1) when nothing is set."""
    if env is None and _simulated is not None:
        return _simulated
    env = os.environ if env is None else env
    in_step = "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env
    if "RANK" in env or "WORLD_SIZE" in env:
        out = _from_rank_vars(env)
        if in_step and out.launcher == "env":  # plain srun tasks: stale exports would mislead
            _agree_with_slurm(out, _from_slurm(env))
    elif in_step:
        out = _from_slurm(env)
    else:
        return DistEnv()
    return _checked(out)


def _from_rank_vars(env) -> DistEnv:
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in env]
    if missing:
        raise LaunchError(
            f"{' and '.join(missing)} missing: launchers set RANK and WORLD_SIZE together"
        )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:  # set by deepspeed's launcher only
        launcher = "deepspeed"
    else:
        launcher = "env"
    local_world = next((_int(env, v) for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if v in env),
                       max(world, 1))  # fmt: skip
    return DistEnv(rank, local, world, env.get("MASTER_ADDR") or None,
                   env.get("MASTER_PORT") or None, launcher, local_world)  # fmt: skip


def _from_slurm(env) -> DistEnv:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                if env.get(v)), None)  # fmt: skip
    nodes = expand_nodelist(env[var]) if var else []
    if nodes and "SLURM_STEP_NUM_NODES" in env and len(nodes) != _int(env, "SLURM_STEP_NUM_NODES"):
        raise LaunchError(
            f"{var}={env[var]} names {len(nodes)} hosts but "
            f"SLURM_STEP_NUM_NODES={env['SLURM_STEP_NUM_NODES']}: the Slurm variables come from "
            "different jobs or steps (re-exported by a script?); launch with srun inside one job"
        )
    local_world = world
    if env.get("SLURM_STEP_TASKS_PER_NODE"):
        per_node = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
        if sum(per_node) != world or (nodes and len(per_node) != len(nodes)):
            raise LaunchError(
                f"SLURM_STEP_TASKS_PER_NODE={env['SLURM_STEP_TASKS_PER_NODE']} ({sum(per_node)} "
                f"tasks on {len(per_node)} nodes) disagrees with SLURM_STEP_NUM_TASKS={world}"
                + (f" on {len(nodes)} nodes ({var}={env[var]})" if nodes else "")
                + ": the Slurm variables come from different jobs or steps"
            )
        host = env.get("SLURMD_NODENAME")
        node = nodes.index(host) if host in nodes else _int(env, "SLURM_NODEID") if (
            "SLURM_NODEID" in env) else 0  # fmt: skip
        if node >= len(per_node):
            raise LaunchError(
                f"SLURM_NODEID={node} but the step has {len(per_node)} nodes "
                f"(SLURM_STEP_TASKS_PER_NODE={env['SLURM_STEP_TASKS_PER_NODE']})"
            )
        local_world = per_node[node]
    addr = env.get("MASTER_ADDR") or (nodes[0] if nodes else None)
    port = env.get("MASTER_PORT")
    if not port and "SLURM_JOB_ID" in env:  # the same on every task, distinct per job and step
        step = _int(env, "SLURM_STEP_ID") if env.get("SLURM_STEP_ID", "").isdigit() else 0
        port = str(20000 + (_int(env, "SLURM_JOB_ID") * 8 + step) % 40000)
    return DistEnv(rank, local, world, addr, port, "slurm", local_world)


def _agree_with_slurm(mine: DistEnv, slurm: DistEnv) -> None:
    if (mine.rank, mine.world_size) != (slurm.rank, slurm.world_size):
        raise LaunchError(
            f"RANK={mine.rank} WORLD_SIZE={mine.world_size} disagree with this Slurm task "
            f"(SLURM_PROCID={slurm.rank}, SLURM_STEP_NUM_TASKS={slurm.world_size}): unset "
            "RANK/WORLD_SIZE in the job script (srun tasks need no exports), or start the ranks "
            "with torchrun inside srun"
        )


def _checked(e: DistEnv) -> DistEnv:
    if e.world_size < 1 or not 0 <= e.rank < e.world_size:
        raise LaunchError(
            f"rank {e.rank} is outside world size {e.world_size} ({e.launcher} variables): "
            "check how the job was launched"
        )
    if not 1 <= e.local_world_size <= e.world_size or not 0 <= e.local_rank < e.local_world_size:
        raise LaunchError(
            f"local rank {e.local_rank} of {e.local_world_size} processes on this node does not "
            f"fit world size {e.world_size} ({e.launcher} variables)"
        )
    if e.local_rank > e.rank:
        raise LaunchError(f"local rank {e.local_rank} cannot exceed global rank {e.rank}")
    if e.world_size > 1 and not e.master_addr:
        raise LaunchError(
            f"world size {e.world_size} but MASTER_ADDR is unset: export MASTER_ADDR=<rank-0 host>"
            " (torchrun and deepspeed set it; under srun it comes from SLURM_STEP_NODELIST)"
        )
    if e.master_port is not None and not (e.master_port.isdigit()
                                          and 0 < int(e.master_port) < 65536):  # fmt: skip
        raise LaunchError(f"MASTER_PORT={e.master_port!r} is not a port number (1-65535)")
    return e


def export_env(env: DistEnv) -> None:
    """Make the mapped values visible to torch.distributed's env:// rendezvous and DeepSpeed."""
    os.environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
    )
    if env.master_addr:
        os.environ["MASTER_ADDR"] = env.master_addr
    os.environ["MASTER_PORT"] = env.master_port or os.environ.get("MASTER_PORT", "29500")


def device_type(wanted: str) -> str:
    """What `device=auto|cpu|cuda` resolves to on this machine: "cuda" or "cpu"."""
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(env: DistEnv, wanted: str) -> torch.device:
    if _simulated is not None:  # the target's tensors are fake CPU tensors (gradcycle.sim)
        return torch.device("cpu")
    if device_type(wanted) == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible: use device=cpu")
        if env.local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"local rank {env.local_rank} but only {torch.cuda.device_count()} CUDA devices "
                "are visible: start one process per GPU (e.g. --ntasks-per-node = GPUs per node, "
                "without per-task GPU binding)"
            )
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_process_group(env: DistEnv, device: torch.device, timeout_s: int) -> None:
    """env:// rendezvous bounded by `timeout_s` (backend.dist_timeout_s): a wrong address, a busy
    port or a missing rank is a LaunchError after at most about that long, never a hang."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if _simulated is not None:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

        dist.init_process_group("fake", rank=env.rank, world_size=env.world_size, store=FakeStore())
        return
    export_env(env)
    where = f"{env.master_addr}:{os.environ['MASTER_PORT']}"
    try:
        socket.getaddrinfo(env.master_addr, None)
    except OSError as e:
        raise LaunchError(
            f"MASTER_ADDR={env.master_addr} does not resolve ({e}): use rank 0's host name or IP"
        ) from None
    try:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    except dist.DistError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LaunchError(
            f"rank {env.rank} of {env.world_size}: rendezvous at {where} failed within "
            f"backend.dist_timeout_s={timeout_s}s ({reason}). Check that MASTER_ADDR is rank 0's "
            f"host and reachable from every node, that port {os.environ['MASTER_PORT']} is free "
            f"there, and that all {env.world_size} ranks were started"
        ) from None
    _announce(env)


def _announce(env: DistEnv) -> None:
    """Gather every rank's own view of the launch; rank 0 prints the layout in one line (the
    job log then shows which host runs which rank), and any disagreement stops the run."""
    from gradcycle.telemetry import CommCounter

    mine = (env.rank, env.world_size, env.local_rank, env.local_world_size,
            os.environ.get("SLURMD_NODENAME") or socket.gethostname(), env.launcher)  # fmt: skip
    views: list = [None] * env.world_size
    with CommCounter.instance().suspended():  # bookkeeping, not the backend's traffic
        dist.all_gather_object(views, mine)
    odd = [v for v in views if v[1] != env.world_size or v[5] != env.launcher]
    if odd or sorted(v[0] for v in views) != list(range(env.world_size)):
        raise LaunchError(f"ranks disagree about the launch (rank, world, local, of, host, "
                          f"launcher): {views}")  # fmt: skip
    if env.is_main:
        layout = ", ".join(f"{r}={host}:{lr}/{lw}" for r, _, lr, lw, host, _ in sorted(views))
        print(f"ranks: world {env.world_size} via {env.launcher}, rendezvous "
              f"{env.master_addr}:{os.environ['MASTER_PORT']}: {layout}", flush=True)  # fmt: skip


def seed_everything(seed: int) -> None:
    """The same seed on every rank: initial weights must agree (FSDP2 does not sync them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_tensor(values: list, device: torch.device) -> torch.Tensor:
    """Sum a few scalars (numbers or 0-d tensors) over ranks in one collective, no host sync."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rng_state() -> dict:
    """Every generator a rank draws from, for exact resume (saved per rank)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))
