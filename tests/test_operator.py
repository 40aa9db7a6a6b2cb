"""Small things an operator meets: no validation split (data.val_fraction=0), and a 2-rank ddp
log without a FutureWarning of ours (torch 2.13 renamed DDP's broadcast_buffers)."""

from __future__ import annotations

import inspect

import pytest
from conftest import TINY, compose, read_metrics
from multiproc import run_on_ranks

from gradcycle.backends import ddp


def _train_recording_warnings(rank: int, world: int, run_dir: str) -> dict:
    """2-rank ddp with no validation split; every warning raised in the run, and what it held."""
    import warnings

    from gradcycle.data.reader import open_dataset
    from gradcycle.trainer import run

    cfg = compose([*TINY, f"run_dir={run_dir}", "backend=ddp", "train.max_steps=2",
                   "data.val_fraction=0"])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg)
    splits = open_dataset(cfg, progress=False).manifest["splits"]
    return {
        "warnings": [(w.category.__name__, w.filename, str(w.message)[:200]) for w in caught],
        "documents": {s: splits[s]["documents"] for s in ("train", "val")},
        "steps": [r["step"] for r in read_metrics(run_dir) if "loss" in r],
    }


def test_two_rank_ddp_without_validation_split_and_without_our_future_warnings(tmp_path):
    result = run_on_ranks(_train_recording_warnings, 2, args=(str(tmp_path / "run"),))[0]
    assert result["steps"] == [1, 2]
    assert result["documents"] == {"train": 300, "val": 0}  # data.max_documents=300, all trained
    ours = [w for w in result["warnings"] if w[0] == "FutureWarning" and "gradcycle" in w[1]]
    assert ours == [], ours
    assert not any("broadcast_buffers" in w[2] for w in result["warnings"]), result["warnings"]


def test_ddp_buffer_sync_uses_the_name_the_running_torch_has(monkeypatch):
    """torch >= 2.13: forward_sync_buffers; torch 2.11 (no such parameter): broadcast_buffers."""
    has_new = "forward_sync_buffers" in inspect.signature(ddp.DDP.__init__).parameters
    expected = "forward_sync_buffers" if has_new else "broadcast_buffers"
    assert ddp._no_forward_buffer_sync() == {expected: False}

    class OldDDP:  # torch 2.11's signature
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    monkeypatch.setattr(ddp, "DDP", OldDDP)
    assert ddp._no_forward_buffer_sync() == {"broadcast_buffers": False}


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data.val_fraction=0", "train.eval_every=5"],
         ["data.val_fraction=0", "train.eval_every=5", "nothing to evaluate", "train.eval_every=0"]),
        (["data.val_fraction=1"], ["data.val_fraction=1", "[0, 1)"]),
    ],
)  # fmt: skip
def test_val_fraction_refusals_name_the_fix(overrides, words):
    from gradcycle.config import validate

    with pytest.raises(ValueError) as e:
        validate(compose([*TINY, *overrides]))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_prepare_without_validation_split_then_evaluation_is_refused(tmp_path, capsys):
    """python -m gradcycle.prepare data.val_fraction=0 (an eval_every in the overrides is no
    reason to refuse: prepare trains nothing); data=tokens of it with train.eval_every>0 stops
    with the fix, exit 2."""
    import json

    from conftest import ROOT

    from gradcycle.cli import main as train_main
    from gradcycle.data.prepare import main as prepare_main

    out = tmp_path / "tokens"
    assert prepare_main([*TINY, "data.val_fraction=0", "train.eval_every=5",
                         f"prepare.out={out}"]) == 0  # fmt: skip
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert splits["val"]["documents"] == 0 and splits["train"]["documents"] == 300
    capsys.readouterr()
    code = train_main([*TINY, f"run_dir={tmp_path / 'run'}", "data=tokens", f"data.path={out}",
                       "train.eval_every=5"], str(ROOT / "conf"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "validation split" in err and "train.eval_every=0" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
