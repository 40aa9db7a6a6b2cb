"""Document masking for packed rows: positions restart, attention and targets stay in a document.

With data.document_mask=true a packed row of T tokens holding several documents trains as if
each document (or piece of one) were its own sequence:
  - position ids restart at 0 at every document start (and at the row start);
  - no token attends across a boundary: a block-diagonal causal mask;
  - no target crosses one: the label of a document's first token is -100, so the previous
    document's last token (its EOS) is not trained to predict it (labels are shifted in the
    loss: logits[:, t] predict labels[:, t + 1]).
Host side (`row_inputs`, in the loader's workers) makes the ids, labels and positions; after the
copy the loader adds each token's document index (`document_ids`, one cumsum). The mask itself is
built per micro-batch just before its forward (`attention_inputs`, called by the loss), for the
attention the model was built with (gradcycle/attention.py):
  gradcycle_flex_attention  a BlockMask: per 128x128 tile none / partial / full, from each tile's
                            first and last document (no T x T tensor; flex skips empty tiles)
  sdpa, gradcycle_sdpa      a dense (b, 1, T, T) boolean mask, True = may attend (the fallback:
                            SDPA then computes every tile and keeps a T x T bias per layer)
  anything else (eager)     position ids alone: transformers builds the block-diagonal mask from
                            position ids that restart (its packed-sequence detection)
"""

from __future__ import annotations

import numpy as np

from gradcycle.data import IGNORE_INDEX

FLEX_BLOCK = 128  # flex_attention's default tile


def row_inputs(ids: np.ndarray, starts: np.ndarray | None, document_mask: bool):
    """(labels, position ids) of one row; `starts`: document starts within the row (sorted)."""
    labels = ids.astype(np.int32, copy=True)
    width = len(ids)
    if not document_mask:
        return labels, np.arange(width, dtype=np.int32)
    # int64 on both sides: union1d([0], []) is a float array, which cannot index the labels
    given = np.asarray([] if starts is None else starts, np.int64)
    starts = np.union1d(np.zeros(1, np.int64), given)
    index = np.arange(width)
    positions = index - starts[np.searchsorted(starts, index, side="right") - 1]
    labels[starts] = IGNORE_INDEX  # the row start too: nothing predicts it in a row
    return labels, positions.astype(np.int32)


def document_ids(positions):
    """Each token's document within its row: 1, 2, ... (a new one wherever a position is 0).
    Non-decreasing along the row; right padding continues the last document (positions go on)."""
    import torch

    return torch.cumsum(positions == 0, dim=1)


def attention_inputs(inputs: dict, attn_implementation: str | None) -> dict:
    """The model's inputs with the document mask its attention takes (`document_ids` consumed)."""
    import torch

    from gradcycle.attention import FLEX, SDPA

    docs = inputs.get("document_ids")
    padding = inputs.get("attention_mask")
    if padding is not None and padding.dim() == 2 and attn_implementation in (SDPA, FLEX):
        # transformers builds no mask for gradcycle's attention: a caller's 2-D padding mask
        # becomes the 4-D one it would have built (gradcycle's own batches carry none)
        width = padding.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=padding.device).tril()
        inputs = {**inputs, "attention_mask": (causal & padding.bool()[:, None, :])[:, None]}
    if docs is None:
        return inputs
    inputs = {k: v for k, v in inputs.items() if k != "document_ids"}
    if attn_implementation == FLEX:
        inputs["attention_mask"] = block_mask(docs)
    elif attn_implementation in ("sdpa", SDPA):
        inputs["attention_mask"] = dense_mask(docs)
    return inputs


def dense_mask(docs):
    """(b, 1, T, T) boolean: same document and not in the future."""
    import torch

    width = docs.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=docs.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


def block_mask(docs, block: int = FLEX_BLOCK):
    """The flex_attention BlockMask of document-causal attention, built from tiles, not tokens.

    Tile (i, j) of q-block i and kv-block j: empty above the diagonal and where the blocks share
    no document; full below the diagonal when both lie inside one document (and hold no padding
    past T); partial otherwise (the diagonal, tiles crossing a boundary), where the mask function
    decides per token. Documents are non-decreasing along a row, so a block's documents are the
    range from its first to its last token. O(b (T/128)^2) work, no device sync."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    b, width = docs.shape
    n = -(-width // block)
    # Tail padding repeats the last document: the ranges stay ordered, indexing stays in bounds.
    padded = torch.cat([docs, docs[:, -1:].expand(b, n * block - width)], dim=1)
    tiles = padded.view(b, n, block)
    lo, hi = tiles[..., 0], tiles[..., -1]  # (b, n) first and last document of each block
    below = torch.ones(n, n, dtype=torch.bool, device=docs.device).tril(-1)
    diagonal = torch.eye(n, dtype=torch.bool, device=docs.device)
    # j < i: the kv block ends where the q block starts (documents are ordered)
    touches = hi[:, None, :] == lo[:, :, None]
    one_doc = lo == hi
    complete = torch.ones(n, dtype=torch.bool, device=docs.device)
    complete[-1] = n * block == width
    whole = one_doc & complete
    full = below & touches & whole[:, :, None] & whole[:, None, :]
    partial = (below & touches | diagonal) & ~full

    def mask_mod(batch, head, q, kv):
        return (q >= kv) & (padded[batch, q] == padded[batch, kv])

    counts, indices = _ordered(partial)
    full_counts, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(width, width))  # fmt: skip


def _ordered(tiles):
    """(b, n, n) booleans -> BlockMask's (b, 1, n) counts and (b, 1, n, n) kv indices, the
    tiles present first in ascending order (the layout of torch's create_block_mask)."""
    import torch

    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts[:, None], indices.to(torch.int32)[:, None]
