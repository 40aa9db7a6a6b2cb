"""Document masking: a packed row computes what each of its documents computes alone.

In process, one tiny model: the logits of a packed row (several ragged documents, masked) equal
those of every document run on its own within 1e-5, for each attention that can run here: SDPA
with the dense mask (gradcycle_sdpa and transformers' sdpa), flex_attention with the block mask
(uncompiled: forward only on CPU; training selects it on CUDA) and eager attention (position ids
restarting); no target crosses a boundary. The block mask, built from tiles, equals torch's own
create_block_mask evaluated token by token. The backends' runs with document masking are in
test_ddp.py, test_fsdp.py and test_deepspeed.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RAGGED, TINY, compose

from gradcycle import attention
from gradcycle.data import IGNORE_INDEX
from gradcycle.data.loader import collate, to_device
from gradcycle.data.masking import attention_inputs, block_mask, document_ids, row_inputs
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
    docs = document_ids(torch.as_tensor(positions)[None])
    assert docs.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3, 3, 3]]
    labels, positions = row_inputs(ids, np.array([3, 7]), document_mask=False)
    assert positions.tolist() == list(range(10)) and labels.tolist() == ids.tolist()


def test_rows_without_document_starts():
    """A sample with no starts (an unpacked document: `None`; a packed row inside one document:
    an empty array) is one document from the row start, not an IndexError from a float index.
    The config that would send unpacked samples here is refused before anything starts."""
    ids = np.arange(10, 15, dtype=np.int32)
    for starts in (None, np.zeros(0, np.int64), np.zeros(0, np.uint32), []):
        labels, positions = row_inputs(ids, starts, document_mask=True)
        assert positions.tolist() == [0, 1, 2, 3, 4], starts
        assert labels.tolist() == [IGNORE_INDEX, 11, 12, 13, 14], starts
    _, positions = row_inputs(ids, np.array([2], np.uint32), document_mask=True)
    assert positions.tolist() == [0, 1, 0, 1, 2]
    host = collate([(ids, None), (ids[:3], None)], pad_id=0, document_mask=True)
    assert host.rows[2].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]  # padding continues
    from gradcycle.config import validate

    with pytest.raises(ValueError, match="data.document_mask=true needs data.packing=true"):
        validate(compose([*TINY, "data.packing=false", "data.document_mask=true"]))


@pytest.mark.parametrize("width, block", [(200, 16), (256, 32), (7, 16)])
def test_block_mask_equals_torch_create_block_mask(width, block):
    """Partial and full tiles, block counts and indices as torch computes them from every token
    (documents longer than two tiles give full tiles; a width off the tile grid pads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rng = np.random.default_rng(width)
    rows = []
    for _ in range(3):
        starts = np.sort(rng.choice(np.arange(1, width), size=min(4, width - 1), replace=False))
        rows.append(row_inputs(np.zeros(width, np.int32), starts, True)[1])
    rows.append(np.arange(width))  # one document: the causal mask alone
    docs = document_ids(torch.as_tensor(np.stack(rows)))
    mine = block_mask(docs, block)
    ref = create_block_mask(mine.mask_mod, B=len(rows), H=None, Q_LEN=width, KV_LEN=width,
                            device="cpu", BLOCK_SIZE=block, _compile=False)  # fmt: skip
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(mine, name), getattr(ref, name)), name
    assert torch.equal(mine.to_dense(), ref.to_dense())
    assert int(mine.full_kv_num_blocks.sum()) > 0 or width < 3 * block  # full tiles exist
    assert mine.seq_lengths == (width, width)


@pytest.fixture(scope="module")
def packed():
    cfg = compose([*TINY, *PACKED])
    data = open_dataset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(data.tokenizer)).eval()
    return model, _rows_with_documents(data.samples("train", cfg.data)), data.pad_id


@pytest.mark.parametrize("attn", [attention.SDPA, "sdpa", attention.FLEX, "eager"])
def test_packed_row_logits_equal_each_document_alone(packed, attn):
    model, rows, pad = packed
    model.set_attn_implementation(attn)
    batch = to_device(collate(rows, pad, document_mask=True), torch.device("cpu"), True)
    inputs = attention_inputs({k: v for k, v in batch.items() if k != "labels"}, attn)
    kind = type(inputs.get("attention_mask")).__name__
    assert kind == {"eager": "NoneType", attention.FLEX: "BlockMask"}.get(attn, "Tensor")
    with torch.no_grad():
        logits = model(**inputs).logits
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
    model.set_attn_implementation(attention.SDPA)
    assert worst < 1e-5, worst
    assert mixed > 1e-3, mixed  # masking matters: without it later documents see earlier ones
    # No target crosses a boundary: the row's loss is the sum of its documents' own losses.
    assert float(loss) == pytest.approx(alone_loss, rel=1e-5)


def test_attention_choice_follows_the_planner_rule():
    from gradcycle.planner.attention import mask_kind

    assert attention.implementation(False, "cuda") == attention.SDPA
    # dense mask on CPU: flex_attention has no backward there
    assert attention.implementation(True, "cpu") == attention.SDPA
    assert mask_kind(True, "cpu") == "dense" and mask_kind(True, "cuda") == "flex"
    want = attention.FLEX if attention.flex_available() else attention.SDPA  # needs Triton
    assert attention.implementation(True, "cuda") == want
    cfg = compose(TINY)
    assert build_model(cfg.model, 512, "meta").config._attn_implementation == attention.SDPA
    # a model needing transformers' own masks (a sliding window) keeps its "sdpa"
    assert attention.for_config(attention.SDPA, type("C", (), {"sliding_window": 64})) == "sdpa"
