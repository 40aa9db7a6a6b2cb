"""Sharded safetensors written tensor by tensor: no process holds more than one tensor.

A safetensors file is an 8-byte header length, a JSON header (every tensor's dtype, shape and
byte range) and the raw bytes. All shapes are known before any data is read (from checkpoint
metadata), so the header is written first and each tensor is fetched, converted, appended and
freed in turn. Files are split at `max_shard_size` bytes the way `save_pretrained` splits them:
`model.safetensors` when one file suffices, else `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` (weight_map + total_size).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
INDEX = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """'5GB' (10^9, as save_pretrained counts), '500MiB', '2000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(
            f"--max-shard-size {text!r}: expected a positive size such as 5GB, 500MB or 2GiB"
        )
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as written
    fetch: Callable[[], torch.Tensor]  # the full tensor, any dtype (converted on write)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def split(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """In order, a new file whenever the next tensor would overflow this one (a tensor larger
    than max_bytes gets a file of its own)."""
    files: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if files[-1] and size + e.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += e.nbytes
    return files


def write_file(path: Path, entries: list[Entry]) -> None:
    # Wider dtypes first: every tensor's bytes start aligned to its element size.
    entries = sorted(entries, key=lambda e: -e.dtype.itemsize)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}  # fmt: skip
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            tensor = e.fetch().to(e.dtype).contiguous()
            if tuple(tensor.shape) != e.shape:
                raise AssertionError(f"{e.name}: fetched {list(tensor.shape)}, expected {e.shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor


def write_sharded(out_dir: Path, entries: list[Entry], max_bytes: int) -> list[str]:
    """Write `entries` into out_dir as save_pretrained would; returns the file names."""
    files = split(entries, max_bytes)
    if len(files) == 1:
        write_file(out_dir / "model.safetensors", files[0])
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    weight_map = {}
    for name, group in zip(names, files, strict=True):
        write_file(out_dir / name, group)
        weight_map.update({e.name: name for e in group})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]
