"""python -m gradcycle.prepare <the same data overrides as train.py> prepare.out=<dir>

Streams the documents of any data group, tokenises them in `prepare.num_proc` processes with the
fast tokenizer's batch encoder, and writes the shards of gradcycle/data/shards.py. The output is a
function of (source, tokenizer, data.val_fraction, prepare.dtype, prepare.shard_mb) only: batches
are tokenised in parallel but written in source order, so num_proc=1 and num_proc=64 give the same
bytes. Peak memory is a few batches of text, whatever the corpus size.

Resumable: every shard is written under a temporary name and renamed when complete, and then
`.prepare-state.json` records the shards done and the documents consumed. A rerun after a kill
checks the finished shards (sha256) and continues after them; `manifest.json` is written last.

Fine-tuning data (data.format=prompt_completion|chat) is rendered and masked by
gradcycle/data/sft.py in the same workers, and each shard gets a per-token loss mask beside its
tokens; examples whose prompt alone fills data.seq_len are skipped, counted in the manifest
(`sft.skipped_overlong`) and the summary line.

Validation split: document i (in source order) is held out when round(i * f) steps up at i, which
holds out round(n * f) documents spread evenly over the source (f = data.val_fraction).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from gradcycle.data import shards as fmt
from gradcycle.data.progress import Progress
from gradcycle.data.sft import chars as _chars
from gradcycle.data.sft import encode_examples
from gradcycle.data.sources import Source, cache_root
from gradcycle.data.tokenizer import source_tokenizer, tokenizer_info

STATE = ".prepare-state.json"
BATCH_CHARS = 1 << 20  # characters per tokenisation task: ~0.5 s of work, bounded memory


def is_val(index: int, fraction: float) -> bool:
    return math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)


# ---------------------------------------------------------------- tokenisation (any process)
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eos: int, dtype: str, val_fraction: float,
                 spec=None) -> None:  # fmt: skip
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype),
                   val_fraction=val_fraction, spec=spec)  # fmt: skip


def _encode(first: int, texts: list) -> dict:
    """Tokenise documents first.. of the source; EOS after each; split into train and val."""
    w = _WORKER
    if w["spec"] is not None:  # fine-tuning examples: tokens, loss mask, skipped (sft.py)
        split_of = lambda i: "val" if is_val(i, w["val_fraction"]) else "train"  # noqa: E731
        return encode_examples(texts, first, w["tok"], w["eos"], w["dtype"], w["spec"], split_of)
    encode = getattr(w["tok"], "encode_batch_fast", w["tok"].encode_batch)
    t0 = time.process_time()
    encoded = encode(texts, add_special_tokens=False)
    out = {"bytes": sum(len(t.encode()) for t in texts), "encode_s": time.process_time() - t0}
    ids = [e.ids for e in encoded]
    for split in fmt.SPLITS:
        keep = [d for i, d in enumerate(ids)
                if d and is_val(first + i, w["val_fraction"]) == (split == "val")]  # fmt: skip
        lengths = np.fromiter((len(d) + 1 for d in keep), np.int64, len(keep))
        tokens = np.empty(int(lengths.sum()), w["dtype"])
        pos = 0
        for d in keep:
            tokens[pos : pos + len(d)] = d
            tokens[pos + len(d)] = w["eos"]
            pos += len(d) + 1
        out[split] = (tokens, lengths)
    return out


def _batches(docs, first: int):
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += _chars(text)
        if chars >= BATCH_CHARS:
            yield first, batch
            first, batch, chars = first + len(batch), [], 0
    if batch:
        yield first, batch


def _encoded(batches, num_proc: int, init_args: tuple):
    """Results in source order: inline for one process (or one batch), else a bounded window of
    tasks in `num_proc` processes."""
    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    if num_proc <= 1 or len(head) < 2:  # a small source is not worth starting processes for
        _init_worker(*init_args)
        for first, texts in batches:
            yield len(texts), _encode(first, texts)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the caller may be a training rank with threads running; workers import no torch
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                             initargs=init_args) as pool:  # fmt: skip
        window: deque = deque()
        for first, texts in batches:
            window.append((len(texts), pool.submit(_encode, first, texts)))
            if len(window) >= 2 * num_proc:
                n, fut = window.popleft()
                yield n, fut.result()
        while window:
            n, fut = window.popleft()
            yield n, fut.result()


def _fault_hook():
    from gradcycle import faults  # tests only: imports torch

    hook = faults.Faults.from_env(0)
    return hook.in_prepare if hook.faults else None


# ---------------------------------------------------------------- the pipeline
def request(source: Source, info: dict, dtype: str, val_fraction: float, spec=None) -> dict:
    """What was asked for; equal requests give equal prepared data (the cache key)."""
    req = {"format_version": fmt.FORMAT_VERSION, "source": source.describe(),
           "source_fingerprint": source.fingerprint, "tokenizer_hash": info["hash"],
           "dtype": dtype, "val_fraction": val_fraction}  # fmt: skip
    if spec is not None:  # only then: text requests (and cache keys) stay what they were
        req["sft"] = spec.describe()
    req["key"] = hashlib.sha256(repr(sorted(req.items())).encode()).hexdigest()[:16]
    return req


def _check_out(out: Path, req: dict) -> tuple[dict | None, dict | None]:
    """(an existing complete manifest, resumable state) of `out` for this request, or raise."""
    if (out / fmt.MANIFEST).is_file():
        manifest = fmt.read_manifest(out)
        theirs = manifest.get("request", {})
        if theirs.get("key") != req["key"]:
            diff = [k for k in req if k != "key" and theirs.get(k) != req[k]]
            raise ValueError(
                f"prepare.out={out} already holds a different prepared dataset ({', '.join(diff)} "
                f"differ: {fmt.MANIFEST} has {[theirs.get(k) for k in diff]}, this run "
                f"{[req[k] for k in diff]}): choose another prepare.out, or delete it first"
            )
        fmt.check_files(out, manifest)
        return manifest, None
    if (out / STATE).is_file():
        state = _read_state(out)
        if state.get("request", {}).get("key") != req["key"]:
            raise ValueError(
                f"prepare.out={out} holds an unfinished prepare of a different dataset "
                f"({STATE}): choose another prepare.out, or delete it first"
            )
        return None, state
    if out.exists() and (not out.is_dir() or not all(_ours(p.name) for p in out.iterdir())):
        raise ValueError(f"prepare.out={out} exists and is not an empty directory: choose a new "
                         "or empty directory")  # fmt: skip
    return None, None


def _read_state(out: Path) -> dict:
    import json

    try:
        return json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return {}


def prepare(
    source: Source,
    tokenizer,
    tok_name: str,
    out: Path,
    *,
    val_fraction: float,
    num_proc: int,
    shard_mb: float,
    dtype: str = "auto",
    progress: bool = True,
    spec=None,
) -> dict:
    """Prepare `source` into `out` (or resume, or find it done). Returns the manifest."""  # fmt: skip
    out = Path(out).expanduser().resolve()
    info = tokenizer_info(tokenizer, tok_name)
    dtype = fmt.choose_dtype(info["vocab_size"], dtype)
    req = request(source, info, dtype, val_fraction, spec)
    manifest, state = _check_out(out, req)
    if manifest is not None:
        return manifest
    masked, fresh = spec is not None, state is None
    try:
        writers, consumed, skipped = _resume(out, state, dtype, masked)
    except fmt.Restart as why:
        print(f"gradcycle.prepare: starting over in {out}: {why}", file=sys.stderr)
        _clean(out, keep=set())
        (writers, consumed, skipped), fresh = _resume(out, None, dtype, masked), True
    fault = _fault_hook() if os.environ.get("GRADCYCLE_FAULT") else None
    shard_bytes = max(1, int(shard_mb * 2**20))
    init = (tokenizer.backend_tokenizer.to_str(), info["eos_id"], dtype, val_fraction, spec)
    docs = source.documents(skip=consumed)
    head = list(itertools.islice(docs, 1))  # opens the source: imports and setup are not timed
    docs = itertools.chain(head, docs)
    bar = Progress(source.total_bytes(), progress, consumed)
    try:
        for n_docs, enc in _encoded(_batches(docs, consumed), max(1, num_proc), init):
            for split in fmt.SPLITS:
                writers[split].add(*enc[split])
                skipped[split] += enc.get("skipped", {}).get(split, 0)
            consumed += n_docs
            n_tokens = sum(len(enc[s][0]) for s in fmt.SPLITS)
            bar.update(enc["bytes"], n_tokens, enc.get("encode_s", 0.0))
            if any(w.nbytes >= shard_bytes for w in writers.values()):
                _checkpoint(out, writers, consumed, req, fault, skipped)
    except ValueError:  # a bad example: a fresh output is removed, a resumed one kept as it was
        for w in writers.values():
            w.close()
        _clean(out, keep=set() if fresh else {*_listed(_read_state(out)), STATE})
        if fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    bar.close(skipped if masked else None)
    for split, w in writers.items():
        w.cut(fault if split == "train" else None)
    if not writers["train"].shards:
        _clean(out, keep=set())
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise ValueError(
            f"data: the source ({source.describe()}) holds no non-empty document"
            + ("" if consumed == 0 else " outside the validation split: lower data.val_fraction")
        )
    streams = {s: {k: h.hexdigest() for k, h in writers[s].stream.items()} for s in fmt.SPLITS}
    blob = repr((info["hash"], dtype, sorted((s, sorted(v.items())) for s, v in streams.items())))
    manifest = {
        "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
        "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "request": req, "source": {**source.describe(), "fingerprint": req["source_fingerprint"]},
        "tokenizer": {**info, "dir": fmt.TOKENIZER_DIR}, "dtype": dtype,
        "arrays": fmt.arrays(dtype, masked), "val_fraction": val_fraction, "shard_mb": shard_mb,
        "splits": {s: {**writers[s].summary(), "stream_sha256": streams[s]} for s in fmt.SPLITS},
    }  # fmt: skip
    if masked:
        manifest["sft"] = {**spec.describe(), "skipped_overlong": skipped}
        tokenizer.chat_template = spec.template or getattr(tokenizer, "chat_template", None)
    _save_tokenizer(tokenizer, out / fmt.TOKENIZER_DIR)  # with the chat template trained on
    fmt.write_json(out / fmt.MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    return manifest


def _listed(state: dict | None) -> set[str]:
    done = (state or {}).get("shards", {})
    return {e["name"] for shards in done.values() for sh in shards for e in sh["files"].values()}


def _resume(out: Path, state: dict | None, dtype: str, masked: bool = False):
    done = (state or {}).get("shards", {})
    writers = {s: fmt.ShardWriter(out, s, dtype, done.get(s, []), masked) for s in fmt.SPLITS}
    if out.is_dir():
        _clean(out, keep=_listed(state) | {STATE})
    for w in writers.values():
        w.replay()
    skipped = {s: 0 for s in fmt.SPLITS} | (state or {}).get("skipped_overlong", {})
    return writers, int((state or {}).get("documents_consumed", 0)), skipped


_LEFTOVERS = (".tmp-", "tokens-", "docs-", "mask-", "val-")


def _ours(name: str) -> bool:
    """A file an interrupted prepare may leave behind (temporary files, shards, state)."""
    return name.startswith(_LEFTOVERS) or name in (STATE, fmt.TOKENIZER_DIR)


def _clean(out: Path, keep: set[str]) -> None:
    """Remove what an interrupted prepare left that no state lists (temporary or extra shards)."""
    for p in out.iterdir() if out.is_dir() else []:
        if p.name not in keep and _ours(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _checkpoint(out: Path, writers: dict, consumed: int, req: dict, fault, skipped: dict) -> None:
    for split, w in writers.items():  # cut together: the state names one point in the source
        w.cut(fault if split == "train" else None)
    shards = {s: w.shards for s, w in writers.items()}
    fmt.write_json(out / STATE, {"request": req, "documents_consumed": consumed, "shards": shards,
                                 "skipped_overlong": skipped})  # fmt: skip


def _save_tokenizer(tokenizer, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------- from a config
def num_proc(cfg) -> int:
    return cfg.prepare.num_proc or min(os.cpu_count() or 1, 32)


def prepare_config(cfg, out: Path | None = None, progress: bool = True) -> tuple[dict, Path]:
    """Prepare cfg.data into `out`, or (out=None) into the cache under a file lock, once."""
    from filelock import FileLock

    from gradcycle.data.sft import spec_from_config

    source = Source.from_config(cfg.data)
    cache = cache_root(cfg.data)
    tokenizer, tok_name = source_tokenizer(cfg, source, cache)
    where = f"data.path={cfg.data.path!r}" if cfg.data.path else f"data={cfg.data.name}"
    spec = spec_from_config(cfg, tokenizer, where)
    kwargs = dict(val_fraction=cfg.data.val_fraction, num_proc=num_proc(cfg),
                  shard_mb=cfg.prepare.shard_mb, dtype=cfg.prepare.dtype, progress=progress,
                  spec=spec)  # fmt: skip
    if out is not None:
        return prepare(source, tokenizer, tok_name, out, **kwargs), Path(out)
    dtype = fmt.choose_dtype(len(tokenizer), cfg.prepare.dtype)
    key = request(source, tokenizer_info(tokenizer, tok_name), dtype, cfg.data.val_fraction, spec)
    out = cache / "prepared" / key["key"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # N ranks on a shared cache: one prepares, all read
        return prepare(source, tokenizer, tok_name, out, **kwargs), out


def main(argv: list[str] | None = None) -> int:
    from gradcycle.compose import tool_main

    return tool_main("gradcycle.prepare", __doc__, argv, _prepare_cli, _report)


def _prepare_cli(cfg) -> tuple[dict, Path]:
    from gradcycle.config import validate

    cfg.train.eval_every = 0  # nothing is trained here: data.val_fraction=0 needs no eval check
    validate(cfg)
    if not cfg.prepare.out:
        raise ValueError("prepare.out=<dir> is required: the directory the shards go to")
    if cfg.data.name == "tokens":
        raise ValueError("data=tokens is prepared already: pick the source group to prepare "
                         "(data=stdlib|files|hub)")  # fmt: skip
    return prepare_config(cfg, Path(cfg.prepare.out))


def _report(result: tuple[dict, Path]) -> None:
    manifest, out = result
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"prepared {out}: {train['documents']} + {val['documents']} documents (train + val), "
          f"{train['tokens']} + {val['tokens']} tokens, {len(train['shards'])} + "
          f"{len(val['shards'])} shards, {manifest['dtype']}, fingerprint "
          f"{manifest['fingerprint']}{_skipped_note(manifest)}\n"
          f"train on it: python train.py data=tokens data.path={out}")  # fmt: skip


def _skipped_note(manifest: dict) -> str:
    if "sft" not in manifest:
        return ""
    n = manifest["sft"]["skipped_overlong"]
    return f", {manifest['sft']['format']} examples; skipped as overlong: {n['train']} + {n['val']}"
