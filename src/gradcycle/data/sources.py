"""The documents of data=stdlib|files|hub, streamed in one fixed order, and their fingerprint.

Nothing here collects the corpus: text files are read one at a time, jsonl/json/parquet files and
hub datasets through `datasets` with `streaming=True` (a local `save_to_disk` folder is memory-
mapped Arrow), so peak memory does not grow with the corpus. A document is one non-empty text:
a whole file for stdlib and .txt, one row's `data.text_field` otherwise. Fine-tuning formats
(data.format=prompt_completion|chat) yield examples instead: one dict of the format's columns per
row, every row (bad ones are prepare's errors, by index); data=stdlib_sft yields the stdlib's
function/docstring pairs (gradcycle/data/sft.py).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXT_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_ROWS_PER_READ = 128  # rows per read: memory ~ rows x document size, never the corpus


def cache_root(data_cfg) -> Path:
    root = data_cfg.cache_dir or os.environ.get("GRADCYCLE_CACHE") or "~/.cache/gradcycle"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def stdlib_files() -> list[str]:
    """The Python standard library's own sources: an embedded corpus that needs no download."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # pruned, not walked (site-packages is big)
        found += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(found)


def data_files(path: str) -> tuple[str, list[str]]:
    """data=files: the files a path, folder or glob names, and the one `datasets` builder for them."""
    path = os.path.expanduser(path)
    files = []
    for hit in sorted(glob.glob(path, recursive=True)):
        if os.path.isdir(hit):
            files += sorted(
                str(p) for p in Path(hit).rglob("*") if p.suffix in EXT_BUILDER and p.is_file()
            )
        elif os.path.isfile(hit):
            files.append(hit)
    if not files:
        raise ValueError(f"data.path={path!r} holds no .jsonl/.json/.parquet/.txt file")
    builders = {EXT_BUILDER.get(Path(f).suffix) for f in files}
    if None in builders:
        bad = next(f for f in files if Path(f).suffix not in EXT_BUILDER)
        raise ValueError(f"data.path: {bad!r} is not .jsonl/.json/.parquet/.txt")
    if len(builders) > 1:
        raise ValueError(f"data.path={path!r} mixes formats {sorted(builders)}: use one format")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ValueError(f"data.path: {empty[0]!r} is empty")
    return builders.pop(), files


def _read_utf8(path: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data.path: {path} (byte {e.start}) is not valid UTF-8: re-encode it as UTF-8"
        ) from None


@dataclass(frozen=True)
class Source:
    """What prepare reads: one data group's documents, in order."""

    name: str  # stdlib | files | hub
    path: str | None
    text_field: str
    split: str
    max_documents: int | None
    builder: str | None  # "text" (a file per document), "json", "parquet", "stdlib_sft", None (hub)
    files: tuple[str, ...]
    format: str = "text"  # text: documents are strings; else examples (dicts of `fields`)
    fields: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, data_cfg) -> Source:
        from gradcycle.data.sft import fields

        field, builder, files = data_cfg.text_field, None, []
        if data_cfg.name == "stdlib":
            builder, files, field = "text", stdlib_files(), "text"
        elif data_cfg.name == "stdlib_sft":
            builder, files = "stdlib_sft", stdlib_files()
        elif data_cfg.name == "files":
            builder, files = data_files(data_cfg.path)
        sft = data_cfg.format != "text"
        return cls(data_cfg.name, data_cfg.path, field, data_cfg.split, data_cfg.max_documents,
                   builder, tuple(files), data_cfg.format, fields(data_cfg) if sft else ())  # fmt: skip

    def describe(self) -> dict:
        out = {"name": self.name, "path": self.path, "text_field": self.text_field,
               "split": self.split, "max_documents": self.max_documents}  # fmt: skip
        if self.format != "text":  # text keeps its descriptions (and cache keys) of before
            out.update(format=self.format, fields=list(self.fields))
        return out

    def tokenizer_corpus(self) -> Source:
        """What a local BPE is trained on: data=stdlib_sft shares data=stdlib's (and its cache)."""
        if self.name != "stdlib_sft":
            return self
        return Source("stdlib", None, "text", self.split, None, "text", self.files)

    def texts(self) -> Iterator[str]:
        """Documents as text (examples: their strings joined), for training the local BPE."""
        if self.format == "text":
            yield from self.documents()
            return
        from gradcycle.data.sft import training_text

        for example in self.documents():
            yield training_text(example, self.fields)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes when the documents may have: files by (path, size, mtime); a hub id by name."""
        key: dict = {**self.describe()}
        if self.name in ("stdlib", "stdlib_sft"):  # one Python minor version, one set of sources
            root = sysconfig.get_paths()["stdlib"]
            key["python"] = list(sys.version_info[:2])
            key["files"] = [(os.path.relpath(f, root), os.path.getsize(f)) for f in self.files]
        elif self.files:
            key["files"] = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in self.files]
        elif self.path and os.path.isdir(self.path):
            key["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime)
                            for p in sorted(Path(self.path).rglob("*")) if p.is_file()]  # fmt: skip
        blob = json.dumps(key, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def total_bytes(self) -> int | None:
        """For the progress bar: the size of the files read (None for a hub stream)."""
        return sum(os.path.getsize(f) for f in self.files) if self.files else None

    def documents(self, skip: int = 0) -> Iterator:
        """Non-empty documents (or every example) in order, data.max_documents applied, the first
        `skip` dropped."""
        n, sft = 0, self.format != "text"
        for text in self._texts():
            if not sft and not (isinstance(text, str) and text.strip()):
                continue
            if self.max_documents is not None and n >= self.max_documents:
                return
            if n >= skip:
                yield text
            n += 1

    def _texts(self) -> Iterator[str]:
        if self.builder == "text":
            for f in self.files:
                yield _read_utf8(f)
            return
        if self.builder == "stdlib_sft":
            from gradcycle.data.sft import stdlib_examples

            yield from stdlib_examples(self.files, *self.fields)
            return
        wanted = self.fields or (self.text_field,)
        try:
            dataset = self._open()
            columns = dataset.column_names  # None for a stream whose features are unknown
            for batch in dataset.iter(batch_size=_ROWS_PER_READ):
                missing = [f for f in wanted if f not in (columns or batch)]
                if missing:
                    raise self._no_field(missing[0], list(columns or batch))
                if not self.fields:
                    yield from batch[self.text_field]
                    continue
                rows = len(batch[wanted[0]])
                for i in range(rows):  # the example's columns, plus the others for messages
                    yield {k: v[i] for k, v in batch.items()}
        except ValueError:
            raise
        except Exception as e:  # datasets raises anything for a file it cannot parse
            raise ValueError(f"data.path={self.path!r} could not be read: {e}") from e

    def _no_field(self, name: str, columns: list[str]) -> ValueError:
        key = {"text": "text_field", "prompt_completion": "prompt_field"}.get(self.format)
        if self.format == "prompt_completion" and name != self.fields[0]:
            key = "completion_field"
        key = key or "messages_field"
        return ValueError(
            f"data.{key}={name!r} is not a column of {self.path!r}: "
            f"set data.{key} to one of {columns}"
        )

    def _open(self):
        import datasets

        datasets.disable_progress_bars()
        if self.builder is not None:
            return datasets.load_dataset(self.builder, data_files=list(self.files),
                                         split="train", streaming=True)  # fmt: skip
        if os.path.isdir(self.path) and (
            os.path.isfile(os.path.join(self.path, "state.json"))
            or os.path.isfile(os.path.join(self.path, "dataset_dict.json"))
        ):  # save_to_disk: memory-mapped Arrow, read in batches
            ds = datasets.load_from_disk(self.path)
            return ds[self.split] if isinstance(ds, datasets.DatasetDict) else ds
        # A hub id (streamed: never materialised twice) or a folder laid out like a hub dataset
        return datasets.load_dataset(self.path, split=self.split, streaming=True)
