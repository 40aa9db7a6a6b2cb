"""open_dataset(cfg): the one way training data is read, whatever the data group.

data=tokens reads `data.path`; data=stdlib|files|hub first prepare into the cache (once, under a
file lock: N ranks on a shared filesystem prepare once) and then read that directory the same way.
Every file-level check (manifest version, missing or truncated shards, tokenizer mismatch, dtype)
runs here, before any process group starts.

Shards are memory-mapped lazily in each process that reads them (the loader's workers included):
nothing holds the corpus, and what a process touches is the page cache's, shared across ranks.
  packed   (data.packing=true):  sample j = tokens [j*T, (j+1)*T) of the split's token stream,
           across document and shard boundaries (T = data.seq_len)
  unpacked (data.packing=false): sample i = document i, truncated to T tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradcycle.data import shards as fmt
from gradcycle.data.tokenizer import configured_tokenizer, load_tokenizer, tokenizer_hash


class Split:
    """One split's shards as one token stream and one list of documents (lazy memmaps)."""

    def __init__(self, root: Path, manifest: dict, split: str):
        shards = manifest["splits"][split]["shards"]
        self.root, self.dtype = Path(root), np.dtype(manifest["dtype"])
        self.files = [(s["files"]["tokens"]["name"], s["files"]["docs"]["name"]) for s in shards]
        self.token_bounds = np.cumsum([0] + [s["tokens"] for s in shards], dtype=np.int64)
        self.doc_bounds = np.cumsum([0] + [s["documents"] for s in shards], dtype=np.int64)
        self.n_tokens, self.n_docs = int(self.token_bounds[-1]), int(self.doc_bounds[-1])
        self._maps: dict = {}

    def __getstate__(self) -> dict:  # each process maps the files itself
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._maps:
            tokens, docs = self.files[shard]
            self._maps[shard] = (np.memmap(self.root / tokens, dtype=self.dtype, mode="r"),
                                 np.load(self.root / docs, mmap_mode="r"))  # fmt: skip
        return self._maps[shard]

    def _shard_of(self, position: int) -> int:
        return int(np.searchsorted(self.token_bounds, position, side="right")) - 1

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int32, across shard boundaries."""
        parts, pos = [], start
        while pos < stop:
            s = self._shard_of(pos)
            base, end = int(self.token_bounds[s]), int(self.token_bounds[s + 1])
            parts.append(self._map(s)[0][pos - base : min(stop, end) - base])
            pos = min(stop, end)
        return np.concatenate(parts).astype(np.int32)

    def doc_starts(self, start: int, stop: int) -> np.ndarray:
        """Positions (relative to `start`) of the documents that begin in [start, stop)."""
        found, pos = [], start
        while pos < stop:
            s = self._shard_of(pos)
            base, end = int(self.token_bounds[s]), int(self.token_bounds[s + 1])
            offsets = self._map(s)[1]
            lo, hi = np.searchsorted(offsets, [pos - base, min(stop, end) - base], side="left")
            found.append(np.asarray(offsets[lo:hi]) + base - start)
            pos = min(stop, end)
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def document(self, d: int) -> np.ndarray:
        s = int(np.searchsorted(self.doc_bounds, d, side="right")) - 1
        offsets = self._map(s)[1]
        local = d - int(self.doc_bounds[s])
        base = int(self.token_bounds[s])
        return self.tokens(base + int(offsets[local]), base + int(offsets[local + 1]))


class PackedSamples:
    """Sample j: tokens [j*T, (j+1)*T) and the document starts inside it."""

    def __init__(self, split: Split, seq_len: int):
        self.split, self.seq_len = split, seq_len

    def __len__(self) -> int:
        return self.split.n_tokens // self.seq_len

    def __getitem__(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        start = int(j) * self.seq_len
        stop = start + self.seq_len
        return self.split.tokens(start, stop), self.split.doc_starts(start, stop)


class DocumentSamples:
    """Sample i: document i, truncated to T tokens (the loader pads the micro-batch)."""

    def __init__(self, split: Split, seq_len: int):
        self.split, self.seq_len = split, seq_len

    def __len__(self) -> int:
        return self.split.n_docs

    def __getitem__(self, i: int) -> tuple[np.ndarray, None]:
        return self.split.document(int(i))[: self.seq_len], None


@dataclass
class TokenData:
    """A prepared directory, checked: its tokenizer and its splits."""

    root: Path
    manifest: dict
    tokenizer: object

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def pad_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_id"])

    def samples(self, split: str, data_cfg):
        kind = PackedSamples if data_cfg.packing else DocumentSamples
        return kind(Split(self.root, self.manifest, split), data_cfg.seq_len)


def open_dataset(cfg, progress: bool = True) -> TokenData:
    """The dataset cfg.data names, prepared (on first use) and checked; ValueError on bad input."""
    if cfg.data.name == "tokens":
        root = Path(cfg.data.path).expanduser().resolve()
    else:
        from gradcycle.data.prepare import prepare_config

        _, root = prepare_config(cfg, progress=progress)
    manifest = fmt.read_manifest(root)
    fmt.check_files(root, manifest)
    tok_dir = root / manifest["tokenizer"].get("dir", fmt.TOKENIZER_DIR)
    tokenizer = load_tokenizer(str(tok_dir), field=f"{root / fmt.MANIFEST}: tokenizer.dir")
    recorded = manifest["tokenizer"]["hash"]
    if tokenizer_hash(tokenizer) != recorded:
        raise ValueError(f"{tok_dir} is not the tokenizer {fmt.MANIFEST} records (hash "
                         f"{recorded}): the prepared directory is corrupt")  # fmt: skip
    if cfg.data.name == "tokens" and (cfg.data.tokenizer or cfg.model.pretrained):
        _check_configured_tokenizer(cfg, root, recorded)
    data = TokenData(root, manifest, tokenizer)
    _check_samples(cfg, data)
    return data


def _check_configured_tokenizer(cfg, root: Path, recorded: str) -> None:
    try:
        found = configured_tokenizer(cfg)
    except ValueError:
        if cfg.data.tokenizer:
            raise
        return  # model.pretrained without a tokenizer of its own: nothing to compare
    tok, name = found
    if tokenizer_hash(tok) != recorded:
        field = "data.tokenizer" if cfg.data.tokenizer else "model.pretrained"
        raise ValueError(
            f"{field}={name!r} is not the tokenizer {root} was prepared with ({root / fmt.MANIFEST}"
            f" tokenizer.hash={recorded}, this one {tokenizer_hash(tok)}): the token ids would "
            f"mean other words; prepare the data with {field}={name!r} or drop {field}"
        )


def _check_samples(cfg, data: TokenData) -> None:
    d = cfg.data
    if len(data.samples("train", d)) == 0:
        raise ValueError(
            f"data: no training sample of data.seq_len={d.seq_len} tokens in {data.root}: lower "
            "data.seq_len or add data"
        )
    if cfg.train.eval_every and len(data.samples("val", d)) == 0:
        raise ValueError(
            f"data: the validation split of {data.root} holds no sample of data.seq_len="
            f"{d.seq_len} tokens: raise data.val_fraction (prepared again), lower data.seq_len, "
            "or set train.eval_every=0"
        )
