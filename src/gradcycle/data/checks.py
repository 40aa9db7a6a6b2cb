"""config.validate()'s checks of data.* and prepare.*: user errors, before anything starts.

Also the local folders data and model are read from (model.pretrained, data.tokenizer): each must
be a complete save_pretrained folder. File-level checks (the manifest, shards, tokenizer of a
prepared directory) and per-example checks of fine-tuning data (gradcycle/data/sft.py) are the
reader's and prepare's, also before any process group starts.
"""

from __future__ import annotations

import glob
import os

NAMES = ("stdlib", "stdlib_sft", "files", "hub", "tokens")
FORMATS = ("text", "prompt_completion", "chat")
_PATH_NEEDS = {
    "files": "a file, folder or glob of jsonl/json/parquet/txt files",
    "hub": "a hub dataset id or a local dataset folder",
    "tokens": "a directory written by python -m gradcycle.prepare ... prepare.out=<dir>",
}


def check_config(cfg) -> None:
    from gradcycle.config import _one_of, _positive

    data, prep = cfg.data, cfg.prepare
    _one_of("data.name", data.name, NAMES)
    if data.seq_len < 2:
        raise ValueError(f"data.seq_len={data.seq_len} must be >= 2 (a token and its target)")
    llama = cfg.model.pretrained is None and cfg.model.config is None  # else: check_architecture
    if llama and data.seq_len > cfg.model.max_position_embeddings:
        raise ValueError(
            f"data.seq_len={data.seq_len} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}: lower data.seq_len or raise the model's limit"
        )
    if not 0 <= data.val_fraction < 1:
        raise ValueError(f"data.val_fraction={data.val_fraction} must be within [0, 1) (0: no "
                         "validation split)")  # fmt: skip
    if data.val_fraction == 0 and cfg.train.eval_every and data.name != "tokens":
        raise ValueError(
            f"data.val_fraction=0 holds out no validation documents, so train.eval_every="
            f"{cfg.train.eval_every} has nothing to evaluate: set train.eval_every=0 (no "
            "evaluation), or data.val_fraction>0 (e.g. 0.02)"
        )
    _positive("data.max_documents", data.max_documents)
    if data.tokenizer is None and data.vocab_size < 260:
        raise ValueError(f"data.vocab_size={data.vocab_size} must be >= 260 (256 bytes + specials)")
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
    check_sft(cfg, local_bpe)

    if data.name in ("stdlib", "stdlib_sft"):
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


def check_sft(cfg, local_bpe: bool) -> None:
    """data.format and the fine-tuning options (per-example checks happen in prepare)."""
    from gradcycle.config import _one_of

    data = cfg.data
    _one_of("data.format", data.format, FORMATS)
    _one_of("data.train_on", data.train_on, ("all", "last"))
    _one_of("data.on_overlong", data.on_overlong, ("skip", "error"))
    for key in ("prompt_field", "completion_field", "messages_field", "text_field"):
        if not str(data[key]).strip():
            raise ValueError(f"data.{key} is empty: name the column to read (e.g. data.{key}="
                             f"{_DEFAULT_FIELD[key]})")  # fmt: skip
    if data.format == "prompt_completion" and data.prompt_field == data.completion_field:
        raise ValueError(
            f"data.prompt_field and data.completion_field are both {data.prompt_field!r}: name two "
            "different columns (defaults: prompt, completion)"
        )
    if data.name == "stdlib" and data.format != "text":
        raise ValueError(f"data=stdlib is plain text, data.format={data.format} needs examples: "
                         "use data=stdlib_sft (prompt/completion pairs) or data.format=text")  # fmt: skip
    if data.name == "stdlib_sft" and data.format != "prompt_completion":
        raise ValueError(f"data=stdlib_sft holds prompt/completion pairs: set "
                         f"data.format=prompt_completion (not {data.format})")  # fmt: skip
    if data.format != "text" and data.packing and not data.document_mask:
        raise ValueError(
            f"data.format={data.format} with data.packing=true needs data.document_mask=true, or "
            "the packed examples would attend to each other (or set data.packing=false: one "
            "example per row, padded)"
        )
    if data.chat_template is not None:
        if data.format != "chat":
            raise ValueError(f"data.chat_template is set but data.format={data.format}: use "
                             "data.format=chat or drop data.chat_template")  # fmt: skip
        if not os.path.isfile(os.path.expanduser(data.chat_template)):
            raise ValueError(f"data.chat_template={data.chat_template!r}: no such file; give a "
                             "jinja chat template file (e.g. the packaged "
                             "src/gradcycle/data/templates/simple.jinja)")  # fmt: skip
    elif data.format == "chat" and local_bpe:
        raise ValueError(
            "data.format=chat with the locally trained tokenizer, which has no chat template: set "
            "data.chat_template=<jinja file> (e.g. src/gradcycle/data/templates/simple.jinja) or "
            "data.tokenizer=<a tokenizer with a chat template>"
        )


_DEFAULT_FIELD = {"prompt_field": "prompt", "completion_field": "completion",
                  "messages_field": "messages", "text_field": "text"}  # fmt: skip


# ---------------------------------------------------------------- local model/tokenizer folders
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip


def check_folders(cfg) -> None:
    m = cfg.model
    if m.pretrained is not None and _looks_local(m.pretrained):
        own_tokenizer = cfg.data.tokenizer is None and cfg.data.name != "tokens"
        check_model_dir("model.pretrained", m.pretrained, tokenizer=own_tokenizer)
    if cfg.data.tokenizer is not None and _looks_local(cfg.data.tokenizer):
        check_model_dir("data.tokenizer", cfg.data.tokenizer, model=False)


def check_model_dir(name: str, path: str, model: bool = True, tokenizer: bool = True) -> None:
    """A local Hugging Face folder: say which field, which folder and what is missing in it."""
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        what = "a save_pretrained folder" if model else "a tokenizer folder (save_pretrained)"
        raise ValueError(f"{name}={path!r}: no such directory; give {what} or a hub id")
    present = set(os.listdir(folder))
    missing = []
    if model and "config.json" not in present:
        missing.append("config.json")
    if model and not present & set(WEIGHT_FILES):
        missing.append("weights (" + " or ".join(WEIGHT_FILES[::2]) + ")")
    if tokenizer and not present & set(TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(TOKENIZER_FILES[:2]) + ")")
    if missing:
        raise ValueError(
            f"{name}={path!r}: the folder lacks {', '.join(missing)}; point it at a complete "
            "save_pretrained folder"
            + (" (or set data.tokenizer=<tokenizer folder>)" if model and tokenizer else "")
        )


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)
