"""Document masking for packed rows: positions restart, attention and targets stay in a document.

With data.document_mask=true a packed row of T tokens holding several documents trains as if
each document (or piece of one) were its own sequence:
  - position ids restart at 0 at every document start (and at the row start);
  - no token attends across a boundary: a block-diagonal causal mask;
  - no target crosses one: the label of a document's first token is -100, so the previous
    document's last token (its EOS) is not trained to predict it (labels are shifted in the
    loss: logits[:, t] predict labels[:, t + 1]).
Host side (`row_inputs`, in the loader's workers) makes the ids, labels and positions; device side
(`attention_inputs`, after the copy) turns the positions into what the model's attention takes:
  sdpa              a 4-D boolean mask (batch, 1, T, T), True = may attend
  flash_attention*  rows flattened into one sequence with cu_seq_lens / max_length (varlen
                    kwargs), used only where flash-attn is installed
  anything else     position ids alone: transformers >= 5 builds the block-diagonal mask for its
                    eager/flex attention from position ids that restart (packed-sequence format)
"""

from __future__ import annotations

import importlib.util

import numpy as np

from gradcycle.data import IGNORE_INDEX


def row_inputs(ids: np.ndarray, starts: np.ndarray | None, document_mask: bool):
    """(labels, position ids) of one row; `starts`: document starts within the row (sorted)."""
    labels = ids.astype(np.int32, copy=True)
    width = len(ids)
    if not document_mask:
        return labels, np.arange(width, dtype=np.int32)
    starts = np.union1d([0], starts if starts is not None else [])
    index = np.arange(width)
    positions = index - starts[np.searchsorted(starts, index, side="right") - 1]
    # The row start too: nothing predicts it in a row, and flattened rows (varlen) stay apart.
    labels[starts] = IGNORE_INDEX
    return labels, positions.astype(np.int32)


def varlen_lengths(positions: np.ndarray) -> np.ndarray:
    """Sequence lengths of rows flattened into one: a new sequence wherever a position is 0."""
    starts = np.flatnonzero(positions.reshape(-1) == 0)
    return np.diff(np.append(starts, positions.size))


def uses_flash(attn_implementation: str | None) -> bool:
    return bool(attn_implementation and "flash" in attn_implementation
                and importlib.util.find_spec("flash_attn") is not None)  # fmt: skip


def attention_inputs(batch: dict, attn_implementation: str | None) -> dict:
    """Add what the model's attention needs to keep documents apart (batch already on device)."""
    import torch

    pos = batch["position_ids"]
    if uses_flash(attn_implementation):
        lengths = batch.pop("seq_lens")  # made on the host: no device sync to find them
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = lengths.max()
        flat = {k: batch[k].reshape(1, -1) for k in ("input_ids", "labels", "position_ids")}
        return {**batch, **flat, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}  # fmt: skip
    batch.pop("seq_lens", None)
    if attn_implementation == "sdpa":
        doc = torch.cumsum(pos == 0, dim=1)
        width = pos.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=pos.device).tril()
        batch["attention_mask"] = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
    return batch
