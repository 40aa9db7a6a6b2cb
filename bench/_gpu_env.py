"""Make the GPU benchmarks' imports work on a bare machine, never touching its torch.

    python bench/_gpu_env.py [--wheels DIR]     # what bench/gpu.sh runs first; gpu_memory.py too

A lent GPU machine brings Python, a CUDA torch and some of gradcycle's dependencies, and no
network. This checks in a fresh interpreter which of the modules the benchmarks import are
missing and installs only those, offline, from a folder of wheels made beforehand where a network
exists (`bash bench/_gpu_prep.sh` writes bench/gpu_wheels/, which travels with the working tree):

- nothing is installed when everything imports (CI, a dev venv: `make setup` was run);
- gradcycle itself is not pip-installed: this tree's src/ goes first on PYTHONPATH, so the
  benchmark measures this checkout (also where a venv holds an editable install of another one);
- pip runs with --no-index and the wheel folder only (pip's config files and PIP_* index
  variables are dropped) under a constraints file made of constraints.txt's pins for what is not
  installed yet plus `torch==<the installed version>`: pip can neither replace torch nor downgrade
  a package the machine brings. torch's version and location are read before and after, and a
  change is an error;
- where the interpreter's site-packages is not writable (or GRADCYCLE_GPU_TARGET=1), the wheels
  of every distribution not installed go with --no-deps into GRADCYCLE_GPU_SITE (default
  $TMPDIR/gradcycle-gpu/site), which follows src/ on PYTHONPATH; torch is never among them;
- afterwards `import gradcycle, deepspeed, transformers, hydra` (and the rest) must work, else
  exit 1 with each import's error.

GRADCYCLE_PIP replaces `python -m pip` (tests put a recording fake there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / "gpu_wheels"
SITE = Path(
    os.environ.get("GRADCYCLE_GPU_SITE") or Path(tempfile.gettempdir(), "gradcycle-gpu", "site")
)
# (module, distribution): what the benchmark runs import (data=stdlib, no wandb or tensorboard,
# so datasets/wandb/tensorboard stay out: they would add ~60 MB of wheels to carry).
NEEDED = (
    ("deepspeed", "deepspeed"),
    ("hydra", "hydra-core"),
    ("omegaconf", "omegaconf"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("numpy", "numpy"),
    ("filelock", "filelock"),
    ("psutil", "psutil"),
    ("jinja2", "Jinja2"),
    ("tqdm", "tqdm"),
    ("yaml", "PyYAML"),
)
# gradcycle is a namespace package (no __init__): import what train.py runs to check it.
CHECKED = ("gradcycle.trainer", "deepspeed", "transformers", "hydra")
# Run in a fresh interpreter: which modules import (and why not), torch's identity, and the
# installed distributions (so constraints never pin what the machine already has).
PROBE = r"""
import importlib, importlib.metadata as md, json, os, sys, sysconfig
out = {"errors": {}, "versions": {}, "dists": sorted({(d.metadata["Name"] or "").lower()
       for d in md.distributions()}),
       "writable": os.access(sysconfig.get_paths()["purelib"], os.W_OK)}
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        out["versions"][name] = str(getattr(mod, "__version__", ""))
    except BaseException as e:  # a broken install raises anything
        out["errors"][name] = f"{type(e).__name__}: {e}"
try:
    import torch
    out["torch"] = [torch.__version__, torch.__file__]
except BaseException as e:
    out["torch"] = None
    out["errors"]["torch"] = f"{type(e).__name__}: {e}"
print("GPU_ENV_PROBE " + json.dumps(out))
"""


def norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def child_env() -> dict:
    """This tree's src first on PYTHONPATH, then SITE: the probes, pip and the runs see the same
    gradcycle and the same installed wheels."""
    env = dict(os.environ)
    first = [str(ROOT / "src"), str(SITE)]
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
    env["PYTHONPATH"] = os.pathsep.join([*first, *parts])
    return env


def probe(modules) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, *modules], env=child_env(),
                         capture_output=True, text=True)  # fmt: skip
    for line in res.stdout.splitlines():
        if line.startswith("GPU_ENV_PROBE "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"_gpu_env: the import probe failed (exit {res.returncode}):\n{res.stderr}")


def pins(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[norm(name)] = f"{name.strip()}=={version.strip()}"
    return out


def install_plan(state: dict) -> tuple[list[str], list[str]]:
    """(requirements, constraint lines) for the modules that do not import. A distribution that
    is installed but does not import (a dependency of it is missing) is asked for by name only:
    pip keeps its version and installs what it lacks."""
    pinned = pins()
    installed = {norm(d) for d in state["dists"]}
    reqs = [dist if norm(dist) in installed else pinned.get(norm(dist), dist)
            for mod, dist in NEEDED if mod in state["errors"]]  # fmt: skip
    torch_version = state["torch"][0]
    lines = [f"torch=={torch_version}"]  # the machine's own torch and no other
    lines += [spec for name, spec in pinned.items() if name != "torch" and name not in installed]
    return reqs, lines


def target_plan(state: dict, wheels: Path) -> list[str]:
    """Without a writable site-packages: every distribution in the wheel folder that is not
    installed (the folder holds the closure of what may be missing, no torch), pinned."""
    pinned, installed = pins(), {norm(d) for d in state["dists"]}
    names = {norm(w.name.split("-")[0]): w.name.split("-")[1] for w in wheels.glob("*.whl")}
    return [pinned.get(n, f"{n}=={v}") for n, v in sorted(names.items())
            if n not in installed and n != "torch"]  # fmt: skip


def pip_env() -> dict:
    """Only the wheel folder: no pip config file, no index or constraint from the environment."""
    env = child_env()
    for key in list(env):
        if key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT",
                   "PIP_REQUIREMENT", "PIP_NO_INDEX", "PIP_TARGET", "PIP_PREFIX", "PIP_USER"):  # fmt: skip
            del env[key]
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def ensure(wheels: Path = WHEELS) -> dict:
    """Install what is missing (see the module docstring); returns the final probe.
    Raises SystemExit with the reason when something still does not import."""
    modules = [m for m, _ in NEEDED] + ["gradcycle.cli", "gradcycle.trainer"]
    state = probe(modules)
    if state["torch"] is None:
        raise SystemExit(f"_gpu_env: torch does not import ({state['errors']['torch']}): these "
                         "benchmarks use the machine's own torch and never install one")  # fmt: skip
    torch_before = state["torch"]
    print(f"_gpu_env: torch {torch_before[0]} ({Path(torch_before[1]).parent})", flush=True)
    reqs, constraints = install_plan(state)
    if not reqs:
        print("_gpu_env: everything imports, nothing to install", flush=True)
    else:
        found = sorted(p.name for p in wheels.glob("*.whl")) if wheels.is_dir() else []
        if not found:
            raise SystemExit(
                f"_gpu_env: {', '.join(reqs)} must be installed but {wheels} holds no wheels "
                "(no network here): run `bash bench/_gpu_prep.sh` where a network exists and "
                "carry bench/gpu_wheels (docs/performance.md, 'Running the GPU benchmark')"
            )
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(constraints) + "\n")
        pip = shlex.split(os.environ.get("GRADCYCLE_PIP", "")) or [sys.executable, "-m", "pip"]
        cmd = [*pip, "install", "--no-index", "--find-links", str(wheels), "-c", f.name]
        if state["writable"] and os.environ.get("GRADCYCLE_GPU_TARGET") != "1":
            cmd += reqs
        else:  # --target ignores what is installed: no resolver, the folder's closure instead
            reqs = target_plan(state, wheels)
            cmd += ["--no-deps", "--target", str(SITE), *reqs]
        print(f"_gpu_env: installing {' '.join(reqs)} from {wheels} ({len(found)} wheels)",
              flush=True)  # fmt: skip
        rc = subprocess.run(cmd, env=pip_env()).returncode
        os.unlink(f.name)
        if rc:
            raise SystemExit(f"_gpu_env: pip failed (exit {rc}): {shlex.join(cmd)}")
        state = probe(modules)
        if state["torch"] != torch_before:
            raise SystemExit(f"_gpu_env: torch CHANGED during the install: {torch_before} -> "
                             f"{state['torch']}; the machine's torch must stay")  # fmt: skip
    bad = {m: e for m, e in state["errors"].items() if m != "torch"}
    if bad:
        raise SystemExit("_gpu_env: still missing after the install:\n" +
                         "\n".join(f"  import {m}: {e}" for m, e in bad.items()))  # fmt: skip
    os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]  # for this process's children
    if str(SITE) not in sys.path:
        sys.path.insert(1, str(SITE))  # and itself (gpu_memory.py imports after this)
    shown = ", ".join(f"{m} {state['versions'].get(m, '')}".strip() for m in CHECKED)
    print(f"_gpu_env: imports ok: {shown}; torch {state['torch'][0]} unchanged", flush=True)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the wheel folder")
    ensure(parser.parse_args().wheels)


if __name__ == "__main__":
    main()
