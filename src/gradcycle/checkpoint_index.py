"""Checkpoints on disk, the read side: find them, resolve a path to one, check it is complete.

No process group, no backend: checkpoint.py (resume) and export.py both use these. The layout is
described in checkpoint.py, the one place checkpoints are written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gradcycle.safe_load import dcp_reader

FORMAT_VERSION = 1
LATEST = "latest"
TMP = ".tmp-"  # a checkpoint being written
TRASH = ".del-"  # a checkpoint being deleted (renamed first, so no half-deleted step_<N> exists)
_STEP_DIR = re.compile(r"step_(\d+)")


def step_of(path: Path) -> int:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else -1


def complete_checkpoints(root: Path) -> list[Path]:
    """step_<N> dirs holding trainer.json, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) >= 0 and (p / "trainer.json").is_file()]
    return sorted(found, key=step_of)


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names; without a pointer, the newest complete one; else None."""
    pointer = root / LATEST
    if pointer.exists():
        name = pointer.read_text(errors="replace").strip()
        target = root / name
        if step_of(target) < 0 or not (target / "trainer.json").is_file():
            raise ValueError(
                f"{pointer} names {name!r}, which is not a complete checkpoint in {root}: point "
                "it at an existing step_<N> directory or resume=<path to a checkpoint>"
            )
        return target
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """A step dir, a checkpoints dir or a run dir -> one step dir (the latest where not explicit)."""
    path = Path(path).expanduser().resolve()
    if (path / "trainer.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists() or complete_checkpoints(root):
            found = find_latest(root)
            if found is not None:
                return found
    if path.name.startswith(TMP) or step_of(path) >= 0:
        raise ValueError(
            f"{path / 'trainer.json'} is missing: {path} is an incomplete checkpoint (its write "
            "was interrupted); use the run's `latest` checkpoint instead"
        )
    raise ValueError(f"{path}: not a checkpoint (no trainer.json) and holds no checkpoints/latest")


def read_meta(step_dir: Path) -> dict:
    path = step_dir / "trainer.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} is unreadable or corrupt ({e}): resume from another checkpoint"
        ) from e
    missing = [k for k in ("format_version", "step", "state", "format", "files", "params")
               if not isinstance(meta, dict) or k not in meta]  # fmt: skip
    if missing:
        raise ValueError(f"{path}: field(s) {', '.join(missing)} missing: the file is corrupt")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={meta['format_version']}, this gradcycle reads "
            f"{FORMAT_VERSION}"
        )
    return meta


def check_files(step_dir: Path, meta: dict) -> None:
    """Every file trainer.json lists exists with its recorded size, and the metadata parses."""
    for rel, size in sorted(meta["files"].items()):
        path = step_dir / rel
        if not path.is_file():
            raise ValueError(
                f"{path} is missing (trainer.json lists it): the checkpoint is incomplete; "
                "resume from an earlier one with resume=<path>"
            )
        if path.stat().st_size != size:
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes, trainer.json records {size}: the file "
                "is truncated or corrupt; resume from an earlier checkpoint with resume=<path>"
            )
    if meta["format"] == "dcp":
        metadata = step_dir / "state" / ".metadata"
        try:
            dcp_reader(step_dir / "state").read_metadata()
        except Exception as e:  # unpickling garbage raises anything
            raise ValueError(f"{metadata} is corrupt ({type(e).__name__}: {e})") from e
