"""config.validate()'s checks of data.* and prepare.*: user errors, before anything starts.

File-level checks (the manifest, shards, tokenizer of a prepared directory) are the reader's
(gradcycle/data/reader.py), also before any process group starts.
"""

from __future__ import annotations

import glob
import os

_PATH_NEEDS = {
    "files": "a file, folder or glob of jsonl/json/parquet/txt files",
    "hub": "a hub dataset id or a local dataset folder",
    "tokens": "a directory written by python -m gradcycle.prepare ... prepare.out=<dir>",
}


def check_config(cfg) -> None:
    from gradcycle.config import _looks_local, _one_of, _positive

    data, prep = cfg.data, cfg.prepare
    _one_of("prepare.dtype", prep.dtype, ("auto", "uint16", "uint32"))
    local_bpe = data.name != "tokens" and data.tokenizer is None and not cfg.model.pretrained
    if local_bpe and prep.dtype == "uint16" and data.vocab_size > 2**16:
        raise ValueError(
            f"data.vocab_size={data.vocab_size} does not fit prepare.dtype=uint16 (at most "
            "65536 ids): use prepare.dtype=uint32 or auto"
        )
    if data.document_mask and not data.packing:
        raise ValueError(
            "data.document_mask=true needs data.packing=true: an unpacked sample is one document "
            "already (set data.document_mask=false)"
        )
    _positive("data.num_workers", data.num_workers, allow_zero=True)
    _positive("data.prefetch_factor", data.prefetch_factor)
    _positive("prepare.num_proc", prep.num_proc)
    _positive("prepare.shard_mb", prep.shard_mb)

    if data.name == "stdlib":
        return
    if not data.path:
        raise ValueError(f"data={data.name} needs data.path: {_PATH_NEEDS[data.name]}")
    path = os.path.expanduser(data.path)
    if data.name == "tokens" and not os.path.isdir(path):
        raise ValueError(f"data.path={data.path!r}: no such directory ({_PATH_NEEDS['tokens']})")
    if data.name == "files" and not glob.glob(path, recursive=True):
        raise ValueError(f"data.path={data.path!r} matches no file or folder")
    if data.name == "hub" and _looks_local(data.path) and not os.path.exists(data.path):
        raise ValueError(f"data.path={data.path!r}: no such local dataset")
