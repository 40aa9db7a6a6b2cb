"""The data layer: text sources -> prepared token shards -> world-independent micro-batches.

    sources.py    documents (or fine-tuning examples) of data=stdlib|stdlib_sft|files|hub, streamed
                  in a fixed order, and their fingerprint
    sft.py        fine-tuning examples -> tokens + loss mask (prompt/completion, chat templates);
                  data=stdlib_sft's function/docstring pairs
    tokenizer.py  the locally trained byte-level BPE (cached) or a configured tokenizer; its hash
    shards.py     the prepared format: manifest.json, tokens-NNNNN.bin, docs-NNNNN.npy (and
                  mask-NNNNN.bin for fine-tuning data); checks
    prepare.py    python -m gradcycle.prepare: parallel, resumable, byte-identical for any num_proc
    progress.py   prepare's progress bar and summary line
    reader.py     open_dataset(cfg): prepare on first use (file-locked), then memory-mapped samples
    loader.py     global batch s -> this rank's K micro-batches (DataLoader workers, device copy)
    masking.py    position ids, document-boundary labels and attention inputs (document masking)
    checks.py     validation.validate()'s checks of data.* and prepare.* (and local model folders)

Every data group reaches the trainer through the same reader: data=stdlib|files|hub prepare into
the cache on first use and read from there exactly as data=tokens data.path=<prepared dir> does.

This module stays import-light (no torch): prepare's worker processes import the package.
"""

IGNORE_INDEX = -100  # labels that carry no loss (padding, document starts under masking)
