"""Corpora, tokenizer, packing/padding, and a global-batch order independent of world size.

Global batch `s` is a fixed set of samples chosen by (seed, data, global batch size) alone: rank r
takes a contiguous slice of it and cuts that into K micro-batches. So 1 process with micro 8 and
8 ranks with micro 1 train on exactly the same batches, and the resumable data position is just
the step number.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

IGNORE_INDEX = -100
_EXT_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def cache_root(data_cfg) -> Path:
    root = data_cfg.cache_dir or os.environ.get("GRADCYCLE_CACHE") or "~/.cache/gradcycle"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- corpora (through `datasets`)


def stdlib_files() -> list[str]:
    """The Python standard library's own sources: an embedded corpus that needs no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    return sorted(str(p) for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _data_files(path: str) -> tuple[str, list[str]]:
    path = os.path.expanduser(path)
    files = []
    for hit in sorted(glob.glob(path, recursive=True)):
        if os.path.isdir(hit):
            files += sorted(
                str(p) for p in Path(hit).rglob("*") if p.suffix in _EXT_BUILDER and p.is_file()
            )
        elif os.path.isfile(hit):
            files.append(hit)
    if not files:
        raise ValueError(f"data.path={path!r} holds no .jsonl/.json/.parquet/.txt file")
    builders = {_EXT_BUILDER.get(Path(f).suffix) for f in files}
    if None in builders:
        bad = next(f for f in files if Path(f).suffix not in _EXT_BUILDER)
        raise ValueError(f"data.path: {bad!r} is not .jsonl/.json/.parquet/.txt")
    if len(builders) > 1:
        raise ValueError(f"data.path={path!r} mixes formats {sorted(builders)}: use one format")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ValueError(f"data.path: {empty[0]!r} is empty")
    return builders.pop(), files


def _first_undecodable(files: list[str]) -> str | None:
    for f in files:
        try:
            Path(f).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            return f"{f} (byte {e.start})"
    return None


def load_texts(data_cfg) -> list[str]:
    """Return the documents' texts; every failure is a ValueError naming the field."""
    import datasets

    datasets.disable_progress_bars()
    field = data_cfg.text_field
    if data_cfg.name == "stdlib":
        builder, files, field = "text", stdlib_files(), "text"
    elif data_cfg.name == "files":
        builder, files = _data_files(data_cfg.path)
    else:
        builder, files = None, []
    try:
        if builder == "text":
            ds = datasets.load_dataset(
                "text", data_files=files, sample_by="document", split="train"
            )
        elif builder is not None:
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        elif os.path.isfile(os.path.join(data_cfg.path, "state.json")):
            ds = datasets.load_from_disk(data_cfg.path)
        else:  # hub id, or a local folder laid out like a hub dataset
            ds = datasets.load_dataset(data_cfg.path, split=data_cfg.split)
    except Exception as e:
        bad = _first_undecodable(files) if builder == "text" else None
        if bad:
            raise ValueError(f"data.path: {bad} is not valid UTF-8: re-encode it as UTF-8") from e
        raise ValueError(f"data.path={data_cfg.path!r} could not be loaded: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[data_cfg.split]
    if field not in ds.column_names:
        raise ValueError(
            f"data.text_field={field!r} is not a column of {data_cfg.path!r}: "
            f"set data.text_field to one of {ds.column_names}"
        )
    texts = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    if data_cfg.max_documents:
        texts = texts[: data_cfg.max_documents]
    if len(texts) < 2:
        raise ValueError(f"data: {len(texts)} non-empty documents in {data_cfg.path!r}; need >= 2")
    return texts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE trained locally (no download); deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    budget, sample = 4_000_000, []  # characters: enough for a small vocabulary, fast on 2 cores
    for t in texts:
        sample.append(t)
        budget -= len(t)
        if budget < 0:
            break
    tok.train_from_iterator(sample, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token=None
    )
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer={path!r} has no eos token: pick a causal-LM tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------- tokenised corpus (cached)


@dataclass
class Corpus:
    ids: np.ndarray  # all documents' token ids, each followed by eos
    offsets: np.ndarray  # document i is ids[offsets[i]:offsets[i + 1]]
    tokenizer: object
    tokenizer_dir: str | None  # where the tokenizer lives (for export)


def _fingerprint(data_cfg, tokenizer_name: str) -> str:
    key = {
        "name": data_cfg.name,
        "path": data_cfg.path,
        "field": data_cfg.text_field,
        "split": data_cfg.split,
        "max_documents": data_cfg.max_documents,
        "tokenizer": tokenizer_name,
        "python": sys.version_info[:2] if data_cfg.name == "stdlib" else None,
    }
    if data_cfg.path and data_cfg.name == "files":
        key["files"] = [
            (f, os.path.getmtime(f), os.path.getsize(f)) for f in _data_files(data_cfg.path)[1]
        ]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]


def load_corpus(data_cfg, model_cfg) -> Corpus:
    """Load, tokenise and cache the corpus. Safe to call on every rank at once (file lock)."""
    root = cache_root(data_cfg)
    tok_name = data_cfg.tokenizer or model_cfg.pretrained or f"bpe{data_cfg.vocab_size}"
    fp = _fingerprint(data_cfg, tok_name)
    cache = root / f"corpus-{fp}.npz"
    with FileLock(str(root / f"corpus-{fp}.lock")):
        texts = None
        if data_cfg.tokenizer or model_cfg.pretrained:
            tok_dir = data_cfg.tokenizer or model_cfg.pretrained
            tokenizer = load_tokenizer(tok_dir, model_cfg.trust_remote_code)
        else:
            tok_dir = str(root / f"tokenizer-{data_cfg.name}-{fp}")
            if (Path(tok_dir) / "tokenizer.json").exists():
                tokenizer = load_tokenizer(tok_dir)
            else:
                texts = load_texts(data_cfg)
                tokenizer = train_tokenizer(texts, data_cfg.vocab_size, Path(tok_dir))
        if cache.exists():
            z = np.load(cache)
            return Corpus(z["ids"], z["offsets"], tokenizer, tok_dir)
        texts = texts if texts is not None else load_texts(data_cfg)
        eos = tokenizer.eos_token_id
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = np.array([len(e) + 1 for e in enc], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.fromiter((t for e in enc for t in (*e, eos)), dtype=np.int32, count=offsets[-1])
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids, offsets=offsets)
        os.replace(tmp, cache)
        return Corpus(ids, offsets, tokenizer, tok_dir)


# ---------------------------------------------------------------- samples


class TokenSamples:
    """Fixed-length packed blocks or one (truncated) document per sample."""

    def __init__(self, corpus: Corpus, docs: np.ndarray, seq_len: int, packing: bool):
        self.packing = packing
        chunks = [corpus.ids[corpus.offsets[d] : corpus.offsets[d + 1]] for d in docs]
        if packing:
            stream = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
            n = len(stream) // seq_len
            self.blocks = stream[: n * seq_len].reshape(n, seq_len)
            self.docs = None
        else:
            self.docs = [c[:seq_len] for c in chunks if len(c) >= 2]
            self.blocks = None

    def __len__(self) -> int:
        return len(self.blocks) if self.packing else len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.blocks[i] if self.packing else self.docs[i]


def split_corpus(corpus: Corpus, data_cfg) -> tuple[TokenSamples, TokenSamples]:
    """Held-out split by document with a fixed seed, so it never depends on the run's seed."""
    n_docs = len(corpus.offsets) - 1
    order = np.random.default_rng(0).permutation(n_docs)
    n_val = max(1, round(n_docs * data_cfg.val_fraction))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    train_s = TokenSamples(corpus, train, data_cfg.seq_len, data_cfg.packing)
    val_s = TokenSamples(corpus, val, data_cfg.seq_len, data_cfg.packing)
    if len(train_s) == 0:
        raise ValueError(
            f"data: no training sample of data.seq_len={data_cfg.seq_len} tokens: lower data.seq_len "
            "or add data"
        )
    return train_s, val_s


def collate(samples: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; labels are -100 on padding.

    No attention mask is needed: with right padding and causal attention no real token attends to
    padding, and padded positions carry no loss.
    """
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        t = torch.from_numpy(s.astype(np.int64))
        ids[row, : len(s)] = t
        labels[row, : len(s)] = t
    return {"input_ids": ids, "labels": labels}


class GlobalBatches:
    """Global batch s -> the cycle's micro-batches for one rank.

    Sample order is a permutation per epoch seeded by (seed, epoch); global batch s covers
    positions [s*G, (s+1)*G) of that endless stream. Nothing here depends on world size or
    micro-batch size except how the fixed set of samples is cut up.
    """

    def __init__(self, samples: TokenSamples, global_batch: int, seed: int, pad_id: int):
        self.samples, self.global_batch, self.seed, self.pad_id = (
            samples,
            global_batch,
            seed,
            pad_id,
        )
        self._perm_epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        n = len(self.samples)
        epoch = position // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[position % n])

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        return [self._index(p) for p in range(start, start + self.global_batch)]

    def cycle(self, step: int, rank: int, world: int, micro: int) -> list[dict[str, torch.Tensor]]:
        idx = self.global_indices(step)
        per_rank = self.global_batch // world
        mine = idx[rank * per_rank : (rank + 1) * per_rank]
        return [
            collate([self.samples[i] for i in mine[k : k + micro]], self.pad_id)
            for k in range(0, per_rank, micro)
        ]


def eval_batches(
    samples: TokenSamples, micro: int, n_batches: int, rank: int, world: int, pad_id: int
):
    """n_batches micro-batches per rank from the validation split, the same count on every rank.

    Equal counts matter: sharded backends run collectives inside forward, so a rank with one
    batch fewer would leave the others waiting. Small splits wrap around.
    """
    n = len(samples)
    for b in range(n_batches):
        start = (b * world + rank) * micro
        yield collate([samples[(start + j) % n] for j in range(micro)], pad_id)
