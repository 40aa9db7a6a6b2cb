"""The prepared format, and every check a reader makes before training starts.

    <dir>/manifest.json          format, version, fingerprint, tokenizer (name, hash, vocabulary,
                                 eos/bos/pad ids), dtype, arrays, and per split its shards:
                                 token and document counts, each file's size and sha256
    <dir>/tokenizer/             the tokenizer the tokens came from (save_pretrained)
    <dir>/tokens-NNNNN.bin       train documents concatenated, each followed by EOS (raw uint16
                                 when the vocabulary fits, else uint32)
    <dir>/docs-NNNNN.npy         int64 document offsets in that shard: documents + 1 entries
    <dir>/mask-NNNNN.bin         fine-tuning data only (data.format=prompt_completion|chat): uint8
                                 per token, 1 = a target (the answer), 0 = context (the prompt)
    <dir>/val-tokens-NNNNN.bin, val-docs-NNNNN.npy   the held-out documents, the same way

`arrays` lists what a shard holds, each with `per` (token | document), `dtype` and a file name
pattern; every shard names one file per array. The loss mask of fine-tuning data is such an
entry (`mask`, per token): readers check the files of every array and read the ones they know, so
adding one is no format break, and text data is written exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMAT = "gradcycle.tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
PREFIX = {"train": "", "val": "val-"}
ID_LIMIT = {"uint16": 2**16, "uint32": 2**32}


def choose_dtype(vocab_size: int, requested: str) -> str:
    """prepare.dtype=auto|uint16|uint32 -> the token dtype; a vocabulary it cannot hold is an error."""
    dtype = requested if requested != "auto" else ("uint16" if vocab_size <= 2**16 else "uint32")
    if vocab_size > ID_LIMIT[dtype]:
        raise ValueError(
            f"prepare.dtype={requested}: the tokenizer's vocabulary of {vocab_size} ids does not "
            f"fit {dtype} (at most {ID_LIMIT[dtype]}): use prepare.dtype=uint32 or auto"
        )
    return dtype


def arrays(dtype: str, masked: bool = False) -> dict:
    out = {
        "tokens": {"per": "token", "dtype": dtype, "file": "{split}tokens-{shard:05d}.bin"},
        "docs": {"per": "document", "dtype": "int64", "file": "{split}docs-{shard:05d}.npy"},
    }
    if masked:
        out["mask"] = {"per": "token", "dtype": "uint8", "file": "{split}mask-{shard:05d}.bin"}
    return out


def file_name(pattern: str, split: str, shard: int) -> str:
    return pattern.format(split=PREFIX[split], shard=shard)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict:
    """The manifest of a prepared dir, checked field by field; ValueError names what is wrong."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: data.path must be a directory written by "
            "`python -m gradcycle.prepare ... prepare.out=<dir>`"
        )
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable or corrupt ({e}): prepare the data again") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gradcycle token manifest (format != {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version={m.get('format_version')!r}, this gradcycle reads version "
            f"{FORMAT_VERSION}: prepare the data again with this version "
            "(python -m gradcycle.prepare ... prepare.out=<new dir>)"
        )
    missing = [k for k in ("fingerprint", "tokenizer", "dtype", "arrays", "splits") if k not in m]
    missing += [f"tokenizer.{k}" for k in ("hash", "vocab_size", "eos_id", "pad_id")
                if k not in m.get("tokenizer", {})]  # fmt: skip
    missing += [f"splits.{s}" for s in SPLITS if s not in m.get("splits", {})]
    if missing:
        raise ValueError(f"{path}: field(s) {', '.join(missing)} missing: the file is corrupt")
    if m["dtype"] not in ID_LIMIT or m["arrays"].get("tokens", {}).get("dtype") != m["dtype"]:
        raise ValueError(f"{path}: dtype={m['dtype']!r} is not uint16 or uint32 (or disagrees "
                         "with arrays.tokens.dtype): the file is corrupt")  # fmt: skip
    vocab = m["tokenizer"]["vocab_size"]
    if vocab > ID_LIMIT[m["dtype"]]:
        raise ValueError(
            f"{path}: tokenizer.vocab_size={vocab} does not fit dtype={m['dtype']} (at most "
            f"{ID_LIMIT[m['dtype']]} ids): token ids would have wrapped; prepare it again with "
            "prepare.dtype=uint32"
        )
    for name, spec in m["arrays"].items():
        if spec.get("per") not in ("token", "document") or "file" not in spec:
            raise ValueError(f"{path}: arrays.{name} needs per=token|document and a file pattern")
    return m


def check_files(root: Path, manifest: dict) -> None:
    """Every file of every shard exists with its recorded size (a truncated copy is caught)."""
    root = Path(root)
    for split in SPLITS:
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            for name, spec in manifest["arrays"].items():
                entry = shard["files"].get(name)
                if entry is None:
                    raise ValueError(f"{root / MANIFEST}: splits.{split}.shards[{i}] lists no "
                                     f"{name} file: the manifest is corrupt")  # fmt: skip
                path = root / entry["name"]
                if not path.is_file():
                    raise ValueError(
                        f"{path} is missing ({MANIFEST} lists it): the prepared data is "
                        "incomplete; copy it again or prepare it again"
                    )
                size = path.stat().st_size
                if size != entry["bytes"]:
                    raise ValueError(
                        f"{path} has {size} bytes, {MANIFEST} records {entry['bytes']}: the "
                        "shard is truncated or corrupt; copy it again or prepare it again"
                    )
                if spec["per"] == "token":
                    per = np.dtype(spec["dtype"]).itemsize
                    if shard["tokens"] * per != size:
                        raise ValueError(f"{path}: {size} bytes for {shard['tokens']} tokens of "
                                         f"{spec['dtype']}: the shard is corrupt")  # fmt: skip


# ---------------------------------------------------------------- writing (prepare)
class Restart(Exception):
    """A partial output cannot be resumed (a finished shard changed): prepare starts over."""


class ShardWriter:
    """One split's shards: the per-token arrays (tokens, and a loss mask for fine-tuning data)
    streamed to temporary files, renamed with the document offsets when the shard is cut."""

    def __init__(self, out: Path, split: str, dtype: str, done: list[dict], masked: bool = False):
        self.out, self.split, self.arrays = out, split, arrays(dtype, masked)
        self.per_token = [a for a, spec in self.arrays.items() if spec["per"] == "token"]
        self.shards = list(done)
        self.stream = {"tokens": hashlib.sha256(), "lengths": hashlib.sha256()}
        if masked:  # only then: text data keeps the fingerprint it had before masks existed
            self.stream["mask"] = hashlib.sha256()
        self.files, self.hashes, self.lengths = {}, {}, []

    def _name(self, array: str, index: int) -> str:
        return file_name(self.arrays[array]["file"], self.split, index)

    def replay(self) -> None:
        """Resume: check the finished shards byte for byte and feed the stream hashes."""
        for i, shard in enumerate(self.shards):
            for array in self.arrays:
                entry, path = shard["files"][array], self.out / self._name(array, i)
                if not path.is_file() or sha256_file(path) != entry["sha256"]:
                    raise Restart(f"{path} differs from the shard the prepare state records")
            for array in self.per_token:
                with open(self.out / self._name(array, i), "rb") as f:
                    while block := f.read(1 << 24):
                        self.stream[array].update(block)
            offsets = np.load(self.out / self._name("docs", i))
            self.stream["lengths"].update(np.diff(offsets).astype(np.int64).tobytes())

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        if not len(lengths):
            return
        assert (mask is not None) == ("mask" in self.arrays), "a mask for masked data only"
        if not self.files:
            self.out.mkdir(parents=True, exist_ok=True)
            for array in self.per_token:
                self.files[array] = open(self._tmp(array), "wb")  # noqa: SIM115 - closed in cut()
                self.hashes[array] = hashlib.sha256()
        for array, values in (("tokens", tokens), ("mask", mask)):
            if values is None:
                continue
            data = values.tobytes()
            self.files[array].write(data)
            self.hashes[array].update(data)
            self.stream[array].update(data)
        self.stream["lengths"].update(lengths.tobytes())
        self.lengths.append(lengths)

    def _tmp(self, array: str) -> Path:
        return self.out / f".tmp-{self._name(array, len(self.shards))}"

    @property
    def nbytes(self) -> int:
        return self.files["tokens"].tell() if self.files else 0

    def cut(self, fault: Callable[[int], None] | None = None) -> None:
        """Close the shard: fsync, write its offsets, rename all (fault: tests only)."""
        if not self.files:
            return
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        n_tokens = self.files["tokens"].tell() // np.dtype(self.arrays["tokens"]["dtype"]).itemsize
        for f in self.files.values():
            f.close()
        lengths = np.concatenate(self.lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        with open(self._tmp("docs"), "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        if fault is not None:
            fault(len(self.shards) + 1)
        files = {}
        for array in self.arrays:
            final = self.out / self._name(array, len(self.shards))
            os.replace(self._tmp(array), final)
            sha = self.hashes[array].hexdigest() if array in self.hashes else sha256_file(final)
            files[array] = {"name": final.name, "bytes": final.stat().st_size, "sha256": sha}
        self.shards.append({"tokens": int(n_tokens), "documents": len(lengths), "files": files})
        self.files, self.hashes, self.lengths = {}, {}, []

    def close(self) -> None:
        """Drop the shard being written (prepare failed on a bad example)."""
        for f in self.files.values():
            f.close()
        self.files, self.hashes, self.lengths = {}, {}, []

    def summary(self) -> dict:
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards),
                "shards": self.shards}  # fmt: skip
