"""The tokenizer a dataset is prepared with: configured (data.tokenizer / model.pretrained) or a
byte-level BPE trained locally on the source's first documents and cached (no download).

Its identity is `tokenizer_hash`: the sha256 of the fast tokenizer's serialised form (vocabulary,
merges, normaliser, pre-tokeniser, special tokens). A prepared dataset records it, so training
with another tokenizer than the one the tokens came from is caught by name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

EOS, PAD = "<|endoftext|>", "<|pad|>"
_TRAIN_CHARS = 4_000_000  # enough text for a small vocabulary, seconds on 2 cores


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE on the first ~4M characters of `texts`; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    budget, sample = _TRAIN_CHARS, []
    for t in texts:
        sample.append(t)
        budget -= len(t)
        if budget < 0:
            break
    if not sample:
        raise ValueError("data: the source holds no non-empty document: check data.path and "
                         "data.text_field")  # fmt: skip
    tok.train_from_iterator(sample, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   bos_token=None)  # fmt: skip
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    os.replace(tmp, out_dir)


def load_tokenizer(path: str, trust_remote_code: bool = False, field: str = "data.tokenizer"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}={path!r}: cannot load a tokenizer from it ({e})") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{field}={path!r} has no fast (Rust) tokenizer: prepare needs one "
                         "(a tokenizer.json)")  # fmt: skip
    if tok.eos_token_id is None:
        raise ValueError(f"{field}={path!r} has no eos token: pick a causal-LM tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def tokenizer_info(tok, name: str) -> dict:
    """What a manifest records about the tokenizer."""
    return {"name": name, "hash": tokenizer_hash(tok), "vocab_size": len(tok),
            "eos_id": tok.eos_token_id, "bos_id": tok.bos_token_id,
            "pad_id": tok.pad_token_id}  # fmt: skip


def configured_tokenizer(cfg) -> tuple[object, str] | None:
    """data.tokenizer, else model.pretrained's tokenizer; None when neither is set."""
    name = cfg.data.tokenizer or cfg.model.pretrained
    if not name:
        return None
    field = "data.tokenizer" if cfg.data.tokenizer else "model.pretrained"
    return load_tokenizer(name, cfg.model.trust_remote_code, field), name


def source_tokenizer(cfg, source, cache: Path) -> tuple[object, str]:
    """The tokenizer to prepare `source` with: configured, or a local BPE trained once on it."""
    found = configured_tokenizer(cfg)
    if found is not None:
        return found
    name = f"bpe{cfg.data.vocab_size}"
    corpus = source.tokenizer_corpus()  # data=stdlib_sft: data=stdlib's, shared in the cache
    out = cache / "tokenizers" / f"{name}-{corpus.fingerprint}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "tokenizer.json").is_file():
            train_tokenizer(corpus.texts(), cfg.data.vocab_size, out)
        # Loaded back even when just trained: the hash is that of what every later run loads.
        return load_tokenizer(str(out)), name
