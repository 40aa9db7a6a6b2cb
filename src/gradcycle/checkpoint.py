"""Checkpoints: save, validate, resume, keep-N. THE place checkpoints are written and read.

Layout (every rank writes its own shards; the run dir must be on a filesystem all ranks share):

    run_dir/checkpoints/
        latest                 "step_<N>": written last, atomically (temp file + rename)
        step_<N>/
            state/             the backend's sharded model + optimizer (+ scaler) state:
                               DCP for ddp/fsdp/hsdp, DeepSpeed's save_checkpoint for zero1-3
            rng/rank_<r>.pt    every rank's RNG states
            hf/                HF config.json + tokenizer files (what export needs besides weights)
            config.yaml        the resolved run config
            trainer.json       step, tokens seen, skipped steps, batch plan, model shapes, and the
                               size of every file above: written last, so it marks completeness

A checkpoint is written as `.tmp-step_<N>` and renamed when every rank's shards are on disk; only
then does `latest` move. A crash at any moment leaves the previous checkpoint and `latest` valid.
`checkpoint.keep=N` then deletes only complete checkpoints older than the one just written.
Before each write every rank checks the free space, and a write that fails on any rank (disk
full, EIO, quota) fails it on all of them at the same point, its `.tmp-` removed
(gradcycle/diskspace.py: CheckpointSpaceError, exit code 4).

The data position needs no state of its own: global batch `s` is a pure function of (seed, data,
global batch size, s) (gradcycle/data/loader.py), and the LR schedule is a pure function of the
step. trainer.json records the prepared dataset's fingerprint and the samples consumed; resuming
on data with another fingerprint is refused unless data.allow_changed=true.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from gradcycle import diskspace, distributed
from gradcycle.checkpoint_index import (
    FORMAT_VERSION,
    LATEST,
    TMP,
    TRASH,
    check_files,
    complete_checkpoints,
    find_latest,
    read_meta,
    resolve,
    step_of,
)
from gradcycle.faults import Faults
from gradcycle.safe_load import unreadable_file, weights_only_loads
from gradcycle.telemetry import CommCounter
from gradcycle.timeouts import long_phase

# Model fields that change parameter shapes: a mismatch is named by field, not only by tensor.
SHAPE_FIELDS = ("pretrained", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "intermediate_size", "vocab_size", "tie_embeddings")  # fmt: skip


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def state_format(backend_name: str) -> str:
    return "deepspeed" if backend_name.startswith("zero") else "dcp"


def param_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Full parameter shapes, whatever the sharding (DTensor: global shape; ZeRO-3: ds_shape)."""
    return {name: list(getattr(p, "ds_shape", None) or p.shape)
            for name, p in module.named_parameters()}  # fmt: skip


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_trash(path: Path) -> Path:
    """Rename a directory out of the way: no half-deleted copy keeps a name that looks valid."""
    trash = path.with_name(TRASH + path.name)
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    return trash


def _delete_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path) -> None:
    _delete_all([_to_trash(path)])


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Save / resume for one run. Every method is collective: all ranks call it."""

    def __init__(self, cfg, run_dir: Path, backend, plan, tokenizer=None, faults=None,
                 data_fingerprint: str | None = None):  # fmt: skip
        self.cfg, self.backend, self.plan, self.tokenizer = cfg, backend, plan, tokenizer
        self.data_fingerprint = data_fingerprint
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.rank = _rank()
        self.world = plan.world_size
        self.faults = faults if faults is not None else Faults.from_env(self.rank)
        self.format = state_format(cfg.backend.name)
        self.room = diskspace.Room(cfg, self.root, self.run_dir, backend, self.faults, self.world)
        self._pruner: threading.Thread | None = None

    # -- resume ----------------------------------------------------------------------------
    def resume(self, state) -> Path | None:
        """Apply cfg.resume to `state` and the backend. Every check runs before anything is
        written: bad input raises ValueError naming the file or field, the run dir untouched."""
        with long_phase(self.cfg.backend):  # reading a big state: backend.startup_timeout_s
            return self._resume(state)

    def _resume(self, state) -> Path | None:
        mode = self.cfg.resume
        if mode == "none":
            if (self.root / LATEST).exists() or complete_checkpoints(self.root):
                raise ValueError(
                    f"run_dir={self.run_dir} already holds checkpoints and resume=none would "
                    "overwrite them: use resume=auto to continue that run, or a new run_dir"
                )
            self._supersede_metrics(0)  # a fresh start: earlier records are another timeline
            return None
        path = find_latest(self.root) if mode == "auto" else resolve(mode)
        if path is None:  # resume=auto with nothing saved yet: a fresh start
            self._supersede_metrics(0)
            return None
        meta = read_meta(path)
        check_files(path, meta)
        self._check_compatible(path, meta)
        comm = CommCounter.instance()
        with comm.suspended(), weights_only_loads():
            try:
                self.backend.load_state(path / "state")
            except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                bad = unreadable_file(path / "state", meta["format"])
                if bad is None:  # not the checkpoint's fault
                    raise
                raise ValueError(
                    f"{bad} is corrupt ({type(e).__name__}): resume from an earlier checkpoint "
                    "with resume=<path>"
                ) from e
            rng_file = path / "rng" / f"rank_{self.rank}.pt"
            if rng_file.is_file():  # absent when resuming on more ranks than were saved
                distributed.set_rng_state(torch.load(rng_file, weights_only=True))
        comm.take()  # the load's collectives belong to no training step
        for key, value in meta["state"].items():
            if hasattr(state, key):
                setattr(state, key, value)
        self._supersede_metrics(state.step)
        return path

    def _check_compatible(self, path: Path, meta: dict) -> None:
        where = path / "trainer.json"
        if meta["format"] != self.format:
            raise ValueError(
                f"{where}: written by backend={meta.get('backend')} ({meta['format']} format); "
                f"backend={self.cfg.backend.name} reads {self.format} checkpoints: resume with "
                f"backend={meta.get('backend')}, or export it (python -m gradcycle.export) and "
                "start from model.pretrained=<export dir>"
            )
        if self.format == "deepspeed" and meta.get("world_size") != self.world:
            raise ValueError(
                f"{where}: DeepSpeed ZeRO partitions are saved per rank for world size "
                f"{meta.get('world_size')}, this run has {self.world}: resume on "
                f"{meta.get('world_size')} ranks (DCP backends ddp/fsdp/hsdp reshard on load)"
            )
        saved_model = meta.get("model", {})
        for key in SHAPE_FIELDS:
            if key in saved_model and saved_model[key] != self.cfg.model.get(key):
                raise ValueError(
                    f"{where}: the checkpoint has model.{key}={saved_model[key]!r}, this config "
                    f"has model.{key}={self.cfg.model.get(key)!r}: resume with the same model"
                )
        ours = param_shapes(self.backend.module)
        theirs = meta["params"]
        for name in sorted(set(ours) | set(theirs)):
            if ours.get(name) != theirs.get(name):
                raise ValueError(
                    f"{where}: parameter {name} has shape {theirs.get(name)} in the checkpoint "
                    f"and {ours.get(name)} in this model (None = absent): the checkpoint belongs "
                    "to a different model shape (check model.* and the tokenizer's vocabulary)"
                )
        saved_data = meta.get("dataset", {}).get("fingerprint")
        if (saved_data and self.data_fingerprint and saved_data != self.data_fingerprint
                and not self.cfg.data.allow_changed):  # fmt: skip
            raise ValueError(
                f"{where}: trained on the prepared dataset with fingerprint {saved_data} "
                f"({meta['dataset'].get('samples_consumed')} samples consumed), this run's data "
                f"has fingerprint {self.data_fingerprint}: resume with the same data (data.* and "
                "the tokenizer), or set data.allow_changed=true to continue on this data"
            )
        if meta.get("global_batch_size") != self.plan.global_batch_size:
            raise ValueError(
                f"{where}: trained with a global batch of {meta.get('global_batch_size')} "
                f"samples, this run's plan gives {self.plan.global_batch_size}: set "
                f"train.global_batch_size={meta.get('global_batch_size')} "
                "train.accumulation_steps=null so the data order and the update stay the same"
            )

    def _supersede_metrics(self, step: int) -> None:
        """Records of steps after `step` (from a run killed after that checkpoint) are redone by
        this run: move them from metrics.jsonl to metrics.superseded.jsonl."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        keep, drop = [], []
        for line in path.read_text().splitlines(keepends=True):
            try:
                record_step = json.loads(line).get("step", 0)
            except (json.JSONDecodeError, AttributeError):  # a line cut short by the kill
                record_step = step + 1
            (drop if record_step > step else keep).append(line if line.endswith("\n")
                                                          else line + "\n")  # fmt: skip
        if not drop:
            return
        with open(self.run_dir / "metrics.superseded.jsonl", "a") as f:
            f.writelines(drop)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)

    # -- save ------------------------------------------------------------------------------
    def due(self, step: int, final: bool) -> bool:
        c = self.cfg.checkpoint
        at_end = c.at_end and step == self.cfg.train.max_steps
        return final or at_end or bool(c.every and step % c.every == 0)

    def maybe_save(self, state, final: bool = False) -> Path | None:
        """Save after this step if checkpoint.every / checkpoint.at_end / `final` asks for it."""
        return self.save(state) if self.due(state.step, final) else None

    def save(self, state) -> Path:
        with long_phase(self.cfg.backend):  # writing a big state: backend.startup_timeout_s
            return self._save(state)

    def _save(self, state) -> Path:
        name = f"step_{state.step}"
        done, tmp = self.root / name, self.root / f"{TMP}{name}"
        main = self.rank == 0
        comm = CommCounter.instance()
        error = None
        if main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                # Writes and deletions that died with an earlier process of this run (our own
                # background deletion, if still running, finishes first).
                self.wait_for_pruning()
                for stale in [*self.root.glob(f"{TMP}*"), *self.root.glob(f"{TRASH}*")]:
                    shutil.rmtree(stale, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
            except OSError as e:
                error = e
        with comm.suspended():
            self.room.agree(error, name, tmp)  # a barrier that fails on every rank if one failed
            self.room.check(name, state.step, tmp)  # all stop here if one rank lacks the space
            try:
                with self.faults.disk_full(state.step):
                    self.backend.save_state(tmp / "state")
                    torch.save(distributed.rng_state(), tmp / "rng" / f"rank_{self.rank}.pt")
            except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                error = e
            self.room.agree(error, name, tmp)  # every rank's shards are on disk
        self.faults.in_save(state.step)
        if main:
            try:
                self._finish(state, tmp, done)
            except (Exception, CheckpointException) as e:
                error = e
        self.room.agree(error, name, tmp)
        comm.take()  # the save's collectives belong to no training step
        if main:  # after the barrier, in the background: nobody waits for the deletion
            self._prune(state.step)
        return done

    def check_room_at_start(self, state) -> None:
        """Before the first step: warn, or stop (checkpoint.require_space=true), if the next
        checkpoint would not fit (gradcycle/diskspace.py)."""
        with CommCounter.instance().suspended():  # not the first step's traffic
            self.room.check_at_start(state.step)

    def _finish(self, state, tmp: Path, done: Path) -> None:
        """Rank 0: describe the checkpoint, rename it complete, move `latest`, prune."""
        hf = tmp / "hf"
        config = getattr(self.backend.module, "config", None)
        if config is not None:
            config.save_pretrained(str(hf))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(hf))
        OmegaConf.save(self.cfg, tmp / "config.yaml", resolve=True)
        files = {str(p.relative_to(tmp)): p.stat().st_size
                 for p in sorted(tmp.rglob("*")) if p.is_file()}  # fmt: skip
        meta = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "state": dataclasses.asdict(state),
            "format": self.format,
            "backend": self.cfg.backend.name,
            "world_size": self.world,
            "global_batch_size": self.plan.global_batch_size,
            "micro_batch_size": self.plan.micro_batch_size,
            "accumulation_steps": self.plan.accumulation_steps,
            "precision": self.cfg.precision,
            "seed": self.cfg.seed,
            "data": OmegaConf.to_container(self.cfg.data, resolve=True),
            "dataset": {
                "fingerprint": self.data_fingerprint,
                "samples_consumed": state.step * self.plan.global_batch_size,
            },  # fmt: skip
            "model": {k: self.cfg.model.get(k) for k in SHAPE_FIELDS},
            "trust_remote_code": bool(self.cfg.model.trust_remote_code),
            "params": param_shapes(self.backend.module),
            "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": files,
        }
        _fsync_write(tmp / "trainer.json", json.dumps(meta, indent=1) + "\n")
        _fsync_dir(tmp)
        if done.exists():  # the same step saved by an earlier run of this timeline
            _discard(done)
        tmp.rename(done)
        pointer = self.root / f"{LATEST}.tmp"
        _fsync_write(pointer, done.name + "\n")
        os.replace(pointer, self.root / LATEST)
        _fsync_dir(self.root)

    def _prune(self, step: int) -> None:
        """Keep the `checkpoint.keep` newest complete checkpoints up to `step`; never touch the
        one just written nor any from a later step (those belong to a superseded timeline).

        Each old checkpoint is renamed to `.del-step_<N>` at once (so no half-deleted directory
        keeps a valid name) and deleted by a background thread: at 70B that is hundreds of GB,
        which must not hold rank 0 back while the other ranks wait in the next collective.
        A deletion cut short by the process ending is finished by the next save."""
        self.wait_for_pruning()
        older = [p for p in complete_checkpoints(self.root) if step_of(p) < step]
        excess = len(older) - (self.cfg.checkpoint.keep - 1)
        trash = [_to_trash(path) for path in older[: max(0, excess)]]
        if trash:
            self._pruner = threading.Thread(target=_delete_all, args=(trash,), daemon=True,
                                            name="gradcycle-prune")  # fmt: skip
            self._pruner.start()

    def wait_for_pruning(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None
