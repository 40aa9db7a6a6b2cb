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
Fine-tuning data (a `mask` array in the manifest) adds the loss mask to every sample, and packs
whole examples: row r = examples [first_r, first_{r+1}) laid end to end, as many as fit in T in
source order (an example longer than T alone, truncated), so no example is cut across rows.
Every kind also gives `layout(j)`: a sample's length, document starts and loss mask without its
tokens, from which the loader counts a cycle's targets before it builds the micro-batches.
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
        self.masked = "mask" in manifest["arrays"]
        names = ("tokens", "docs", "mask") if self.masked else ("tokens", "docs")
        self.files = [tuple(s["files"][a]["name"] for a in names) for s in shards]
        self.token_bounds = np.cumsum([0] + [s["tokens"] for s in shards], dtype=np.int64)
        self.doc_bounds = np.cumsum([0] + [s["documents"] for s in shards], dtype=np.int64)
        self.n_tokens, self.n_docs = int(self.token_bounds[-1]), int(self.doc_bounds[-1])
        self._maps: dict = {}

    def __getstate__(self) -> dict:  # each process maps the files itself
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard: int) -> tuple:
        if shard not in self._maps:
            tokens, docs, *mask = self.files[shard]
            self._maps[shard] = (np.memmap(self.root / tokens, dtype=self.dtype, mode="r"),
                                 np.load(self.root / docs, mmap_mode="r"),
                                 *(np.memmap(self.root / m, dtype=np.uint8, mode="r")
                                   for m in mask))  # fmt: skip
        return self._maps[shard]

    def _shard_of(self, position: int) -> int:
        return int(np.searchsorted(self.token_bounds, position, side="right")) - 1

    def tokens(self, start: int, stop: int, array: int = 0) -> np.ndarray:
        """Tokens [start, stop) of the stream as int32 (array=2: the loss mask), across shards."""
        parts, pos = [], start
        while pos < stop:
            s = self._shard_of(pos)
            base, end = int(self.token_bounds[s]), int(self.token_bounds[s + 1])
            parts.append(self._map(s)[array][pos - base : min(stop, end) - base])
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

    def span(self, d: int) -> tuple[int, int]:
        """Document d's [start, stop) in the split's token stream."""
        s = int(np.searchsorted(self.doc_bounds, d, side="right")) - 1
        offsets = self._map(s)[1]
        local = d - int(self.doc_bounds[s])
        base = int(self.token_bounds[s])
        return base + int(offsets[local]), base + int(offsets[local + 1])

    def document(self, d: int) -> np.ndarray:
        return self.tokens(*self.span(d))

    def lengths(self) -> np.ndarray:
        """Every document's length (int64, documents entries: 8 bytes each, not the tokens)."""
        parts = [np.diff(self._map(s)[1]) for s in range(len(self.files))]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


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

    def layout(self, j: int) -> tuple:
        """(length, document starts, loss mask) of sample j without reading its tokens."""
        start = int(j) * self.seq_len
        return self.seq_len, self.split.doc_starts(start, start + self.seq_len), None


class DocumentSamples:
    """Sample i: document i, truncated to T tokens (the loader pads the micro-batch); masked
    data: (tokens, None, loss mask)."""

    def __init__(self, split: Split, seq_len: int):
        self.split, self.seq_len = split, seq_len

    def __len__(self) -> int:
        return self.split.n_docs

    def _span(self, i: int) -> tuple[int, int]:
        start, stop = self.split.span(int(i))
        return start, min(stop, start + self.seq_len)

    def __getitem__(self, i: int) -> tuple:
        start, stop = self._span(i)
        if not self.split.masked:
            return self.split.tokens(start, stop), None
        return self.split.tokens(start, stop), None, self.split.tokens(start, stop, array=2)

    def layout(self, i: int) -> tuple:
        start, stop = self._span(i)
        mask = self.split.tokens(start, stop, array=2) if self.split.masked else None
        return stop - start, None, mask


def pack_whole(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """First example of every row, and one past the last: greedy in source order, whole
    examples only (one longer than seq_len takes a row alone)."""
    firsts, fill = [0], 0
    for i, n in enumerate(np.minimum(lengths, seq_len).tolist()):
        if fill and fill + n > seq_len:
            firsts.append(i)
            fill = 0
        fill += n
    return np.asarray(firsts + [len(lengths)], np.int64)


class ExampleRows:
    """Masked data packed: row r = whole examples [firsts[r], firsts[r+1]) end to end (<= T
    tokens; the loader pads), their starts, and their loss mask."""

    def __init__(self, split: Split, seq_len: int):
        self.split, self.seq_len = split, seq_len
        self.firsts = pack_whole(split.lengths(), seq_len)  # one int64 per row

    def __len__(self) -> int:
        return len(self.firsts) - 1

    def _span(self, r: int) -> tuple[int, int]:
        a, b = int(self.firsts[r]), int(self.firsts[r + 1])
        start, stop = self.split.span(a)[0], self.split.span(b - 1)[1]
        return start, min(stop, start + self.seq_len)

    def __getitem__(self, r: int) -> tuple:
        start, stop = self._span(r)
        tokens, mask = self.split.tokens(start, stop), self.split.tokens(start, stop, array=2)
        return tokens, self.split.doc_starts(start, stop), mask

    def layout(self, r: int) -> tuple:
        start, stop = self._span(r)
        return stop - start, self.split.doc_starts(start, stop), self.split.tokens(start, stop, 2)


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

    @property
    def masked(self) -> bool:
        return "mask" in self.manifest["arrays"]

    def samples(self, split: str, data_cfg):
        kind = DocumentSamples
        if data_cfg.packing:
            kind = ExampleRows if self.masked else PackedSamples
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
    made = data.manifest.get("sft", {}).get("format", "text")
    if d.name == "tokens" and d.format not in ("text", made):
        raise ValueError(f"data.format={d.format} but {data.root} holds {made} data: drop "
                         f"data.format (it comes from the manifest) or prepare again")  # fmt: skip
    if data.masked and d.packing and not d.document_mask:
        raise ValueError(
            f"{data.root} holds {made} examples: data.packing=true needs data.document_mask=true, "
            "or the packed examples would attend to each other (or set data.packing=false)"
        )
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
