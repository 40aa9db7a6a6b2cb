"""Launch variables that need parsing (distributed.read_env uses these): Slurm's compressed host
list and tasks-per-node spec, and the error a bad launch environment raises."""

from __future__ import annotations

import re


class LaunchError(ValueError):
    """The launch environment is inconsistent or the rendezvous failed: fixed where the job is
    launched (variables, host names, ports), not in the config. Reported by every rank."""


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: 'gpu[01-03,07],login1' -> ['gpu[01-03,07]', 'login1']."""
    parts, depth, token = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    return [p for p in parts if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ('gpu[01-03,07],login1') -> host names, without scontrol."""
    hosts = []
    for part in _split_top(nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if m is None:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise LaunchError(f"cannot parse Slurm node list {nodelist!r} (range {r!r})")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE ('2(x3),1') -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LaunchError(f"cannot parse SLURM_STEP_TASKS_PER_NODE={spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts
