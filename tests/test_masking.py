"""Document masking: a packed row computes what each of its documents computes alone.

In process, one tiny model: the logits of a packed row (several ragged documents, masked) equal
those of every document run on its own within 1e-5, for SDPA (a block-diagonal causal mask) and
eager attention (position ids restarting); no target crosses a boundary. The backends' runs with
document masking are in test_ddp.py, test_fsdp.py and test_deepspeed.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RAGGED, TINY, compose

from gradcycle.data import IGNORE_INDEX
from gradcycle.data.loader import collate, to_device
from gradcycle.data.masking import row_inputs, uses_flash, varlen_lengths
from gradcycle.data.reader import open_dataset
from gradcycle.model import build_model
from gradcycle.trainer import token_loss

PACKED = [*RAGGED, "data.packing=true", "data.document_mask=true"]


def _rows_with_documents(samples, n_rows: int = 2, at_least: int = 3) -> list:
    """Rows that start mid-document and hold at least `at_least` document starts."""
    rows = [samples[j] for j in range(len(samples))]
    rows = [r for r in rows if len(r[1]) >= at_least and r[1][0] > 0]
    assert len(rows) >= n_rows, "the ragged corpus should pack several documents per row"
    return rows[:n_rows]


def test_positions_and_labels_restart_at_document_starts():
    ids = np.arange(10, 20, dtype=np.int32)
    labels, positions = row_inputs(ids, np.array([3, 7]), document_mask=True)
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    assert [i for i, v in enumerate(labels) if v == IGNORE_INDEX] == [0, 3, 7]
    assert varlen_lengths(np.stack([positions, positions])).tolist() == [3, 4, 3, 3, 4, 3]
    labels, positions = row_inputs(ids, np.array([3, 7]), document_mask=False)
    assert positions.tolist() == list(range(10)) and labels.tolist() == ids.tolist()
    assert not uses_flash("sdpa")  # flash-attention varlen only where it is installed and chosen


@pytest.fixture(scope="module")
def packed():
    cfg = compose([*TINY, *PACKED])
    data = open_dataset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(data.tokenizer)).eval()
    return model, _rows_with_documents(data.samples("train", cfg.data)), data.pad_id


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_logits_equal_each_document_alone(packed, attn):
    model, rows, pad = packed
    model.set_attn_implementation(attn)
    batch = to_device(collate(rows, pad, document_mask=True), torch.device("cpu"), attn, True)
    assert ("attention_mask" in batch) == (attn == "sdpa")  # eager: from the position ids
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        plain = model(input_ids=batch["input_ids"]).logits  # no masking: documents mix
        loss = token_loss(model, batch, 1.0)
        alone_loss, worst, mixed = 0.0, 0.0, 0.0
        for r, (ids, starts) in enumerate(rows):
            bounds = [0, *starts.tolist(), len(ids)]
            for a, b in zip(bounds, bounds[1:]):
                doc = torch.as_tensor(ids[a:b], dtype=torch.long)[None]
                alone = model(input_ids=doc).logits[0]
                worst = max(worst, float((logits[r, a:b] - alone).abs().max()))
                mixed = max(mixed, float((plain[r, a:b] - alone).abs().max()))
                alone_loss += float(token_loss(model, {"input_ids": doc, "labels": doc}, 1.0))
    model.set_attn_implementation("sdpa")
    assert worst < 1e-5, worst
    assert mixed > 1e-3, mixed  # masking matters: without it later documents see earlier ones
    # No target crosses a boundary: the row's loss is the sum of its documents' own losses.
    assert float(loss) == pytest.approx(alone_loss, rel=1e-5)
