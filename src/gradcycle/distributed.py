"""Rank bootstrap: torchrun / deepspeed / Slurm environment -> rank, world, process group, seed.

One function, `read_env()`, maps every launcher's variables; it runs before the process group
exists, so a misconfigured launch fails with a clear message instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: str | None = None
    launcher: str = "python"  # python | torchrun | deepspeed | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_local_rank_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra would reject; move it to env."""
    kept, seen = [], []
    it = iter(argv)
    for arg in it:
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", arg)
        if m is None:
            kept.append(arg)
            continue
        value = m.group(1) if m.group(1) is not None else next(it, None)
        if value is None or not value.isdigit():
            raise ValueError(f"{arg}: expected --local_rank=<int>")
        seen.append(value)
    if len(seen) > 1:
        raise ValueError(f"--local_rank given {len(seen)} times ({', '.join(seen)}): pass it once")
    if seen:
        if os.environ.get("LOCAL_RANK", seen[0]) != seen[0]:
            raise ValueError(
                f"--local_rank={seen[0]} disagrees with LOCAL_RANK={os.environ['LOCAL_RANK']}"
            )
        os.environ["LOCAL_RANK"] = seen[0]
    return kept


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ('gpu[01-03,07],login1') -> host names, without scontrol."""
    hosts, depth, token = [], 0, ""
    parts = []
    for ch in nodelist:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    for part in filter(None, parts):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if m is None:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment {name}={env[name]!r} is not an integer") from None


def read_env(env=None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, or already mapped
        missing = [v for v in ("RANK", "WORLD_SIZE") if v not in env]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} missing: launchers set RANK and WORLD_SIZE together"
            )
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else (
            "deepspeed" if "CROSS_RANK" in env or "DS_ACCELERATOR" in env else "env")  # fmt: skip
        addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun with one task per GPU
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        addr = env.get("MASTER_ADDR") or (nodes[0] if nodes else None)
        port = env.get("MASTER_PORT") or str(20000 + _int(env, "SLURM_JOB_ID") % 20000
                                             if "SLURM_JOB_ID" in env else 29500)  # fmt: skip
        if "SLURM_NNODES" in env and nodes and len(nodes) != _int(env, "SLURM_NNODES"):
            raise ValueError(
                f"SLURM_JOB_NODELIST has {len(nodes)} hosts but SLURM_NNODES={env['SLURM_NNODES']}"
            )
    else:
        return DistEnv()
    if not 0 <= rank < world:
        raise ValueError(
            f"rank {rank} is outside world size {world}: check the launcher's variables"
        )
    if not 0 <= local <= rank:
        raise ValueError(f"local rank {local} cannot exceed global rank {rank}")
    if world > 1 and not addr:
        raise ValueError(
            f"world size {world} but MASTER_ADDR is unset: export MASTER_ADDR=<rank-0 host> "
            "(torchrun and deepspeed set it; under srun it comes from SLURM_JOB_NODELIST)"
        )
    return DistEnv(rank, local, world, addr, port, launcher)


def export_env(env: DistEnv) -> None:
    """Make the mapped values visible to torch.distributed's env:// rendezvous and DeepSpeed."""
    os.environ.update(
        RANK=str(env.rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size)
    )
    if env.master_addr:
        os.environ["MASTER_ADDR"] = env.master_addr
    os.environ.setdefault("MASTER_PORT", env.master_port or "29500")


def pick_device(env: DistEnv, wanted: str) -> torch.device:
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible: use device=cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_process_group(env: DistEnv, device: torch.device, timeout_s: int) -> None:
    if env.world_size == 1 or dist.is_initialized():
        return
    export_env(env)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


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
