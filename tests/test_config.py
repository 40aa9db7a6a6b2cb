"""Every config under conf/ composes against the typed schema and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RAGGED_DATA, ROOT, compose
from omegaconf import OmegaConf

from gradcycle.config import validate

GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
# Groups whose options need a user value to be complete.
# data=tokens: config-level, any directory (its manifest is checked when the data is opened).
NEEDS = {("data", "files"): [f"data.path={RAGGED_DATA}"], ("data", "hub"): [f"data.path={ROOT}"],
         ("data", "tokens"): [f"data.path={ROOT}"],
         # a hub id is not read by validate(): no download
         ("experiment", "sft-llama-7b-1node"): ["model.pretrained=meta-llama/Llama-2-7b-chat-hf",
                                                f"data.path={RAGGED_DATA}"]}  # fmt: skip


def _options():
    for group in GROUPS:
        for f in sorted((ROOT / "conf" / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group, option", list(_options()))
def test_every_config_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}", *NEEDS.get((group, option), [])])
    validate(cfg)
    if group == "backend":
        assert cfg.backend.name == option
    elif group in ("model", "data", "optim", "hardware"):
        assert cfg[group].name == option


def test_groups_are_the_documented_ones():
    assert {"backend", "model", "data", "optim", "experiment"} <= set(GROUPS)
    backends = {p.stem for p in (ROOT / "conf/backend").glob("*.yaml")}
    assert backends == {"ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp"}
    models = {p.stem for p in (ROOT / "conf/model").glob("*.yaml")}
    assert {
        "tiny",
        "small",
        "llama-1b",
        "llama-7b",
        "llama-13b",
        "llama-34b",
        "llama-70b",
    } <= models


def test_defaults_are_the_cpu_default_run():
    cfg = compose([])
    assert (cfg.backend.name, cfg.model.name, cfg.data.name, cfg.precision) == (
        "ddp", "tiny", "stdlib", "auto")  # fmt: skip
    from gradcycle.hardware import resolve_precision

    assert resolve_precision(cfg, "cpu").precision == "fp32"  # on CPU: fp32, as it always was
    # The key names tools and scripts rely on.
    for key in ("seed", "precision", "run_dir", "train.max_steps", "train.global_batch_size",
                "train.micro_batch_size", "train.accumulation_steps", "train.eval_every",
                "optim.lr", "activation_checkpointing.mode", "activation_checkpointing.every",
                "data.seq_len", "data.packing", "model.pretrained"):  # fmt: skip
        assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or key in (
            "run_dir", "train.accumulation_steps", "model.pretrained")  # fmt: skip


def test_model_presets_have_real_llama_shapes():
    from gradcycle.model import build_model

    expected = {"llama-7b": 6.74e9, "llama-13b": 13.0e9, "llama-70b": 69.0e9}
    for name, n in expected.items():
        cfg = compose([f"model={name}"])
        model = build_model(cfg.model, 32000, "meta")
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - n) / n < 0.01, (name, count)


def test_conf_dir_default_points_at_repo():
    from gradcycle.compose import default_conf_dir

    assert Path(default_conf_dir()) == ROOT / "conf"
