"""hardware=auto: the device's profile from its name and memory; an unknown GPU reports no MFU."""

from __future__ import annotations

import pytest
from conftest import TINY, compose, train_steps

from gradcycle import hardware


@pytest.mark.parametrize("name, gib, profile", [
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 79.1, "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", 79.1, "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", 79.1, "h100-80gb"),
    ("NVIDIA H200", 139.8, "h200"),
    ("NVIDIA H100 NVL", 93.6, "h100-nvl"),  # PCIe cards: 835 dense bf16 TFLOP/s, not 989
    ("NVIDIA H200 NVL", 140.4, "h200-nvl"),
    ("NVIDIA H100 PCIe", 79.1, None),  # a lower peak than the SXM profile
    ("NVIDIA GH200 480GB", 94.5, None),  # not an H200
    ("NVIDIA L40S", 44.4, None),
])  # fmt: skip
def test_device_name_and_memory_pick_the_profile(name, gib, profile):
    assert hardware.profile_for(name, gib) == profile


def _on_gpu(monkeypatch, name: str, gib: float):
    monkeypatch.setattr(hardware, "query_cuda", lambda: (name, gib))


def test_auto_on_a_known_gpu_takes_its_profile_and_keeps_explicit_fields(monkeypatch):
    _on_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", 39.4)
    cfg = hardware.resolve(compose([*TINY, "hardware.inter_node_gbps=6.25"]), "cuda")
    hw = cfg.hardware
    assert (hw.name, hw.bf16_tflops, hw.memory_gb, hw.intra_node_gbps) == (
        "a100-40gb",
        312,
        40,
        300,
    )
    assert hw.inter_node_gbps == 6.25  # set on the command line: kept


@pytest.mark.parametrize("device, gib, profile, peak, memory", [
    ("NVIDIA H100 NVL", 95830 / 1024, "h100-nvl", 835, 93.6),
    ("NVIDIA H200 NVL", 143771 / 1024, "h200-nvl", 835, 140.4),
    ("NVIDIA H200", 143771 / 1024, "h200", 989, 140.4),
])  # fmt: skip
def test_nvl_parts_get_their_own_peak(monkeypatch, device, gib, profile, peak, memory):
    _on_gpu(monkeypatch, device, gib)  # nvidia-smi's MiB for these parts
    hw = hardware.resolve(compose([*TINY, "precision=bf16"]), "cuda").hardware
    assert (hw.name, hw.bf16_tflops, hw.memory_gb, hw.bf16) == (profile, peak, memory, True)


def test_every_profile_states_its_figures():
    from pathlib import Path

    from gradcycle.compose import default_conf_dir

    names = [p.stem for p in (Path(default_conf_dir()) / "hardware").glob("*.yaml")]
    for name in sorted(set(names) - {"auto"}):
        profile = hardware.load_profile(name)
        assert profile["name"] == name and isinstance(profile["bf16"], bool), name
        assert all(profile[k] > 0 for k in ("memory_gb", "bf16_tflops", "intra_node_gbps")), name
    assert {p for _, _, p in hardware.GPU_PROFILES} <= set(names)  # detection finds real files


def test_auto_on_an_unknown_gpu_warns_and_reports_no_mfu(monkeypatch):
    _on_gpu(monkeypatch, "NVIDIA L40S", 44.4)
    with pytest.warns(UserWarning, match="no profile for 'NVIDIA L40S'.*mfu: null"):
        cfg = hardware.resolve(compose(TINY), "cuda")
    assert cfg.hardware.name == "unknown" and cfg.hardware.bf16_tflops is None
    assert cfg.hardware.memory_gb == 44.4  # the planner still budgets the device's memory
    from gradcycle.planner.plan import make_plan  # and plans without timing communication

    assert make_plan(cfg, 1, 1).configured is not None


def test_auto_on_cpu_is_the_nominal_cpu_profile_and_the_planner_wants_a_target():
    cfg = hardware.resolve(compose(TINY), "cpu")
    assert cfg.hardware.name == "cpu" and cfg.hardware.bf16_tflops == 1.0
    with pytest.raises(ValueError, match="hardware=auto.*hardware=a100-40gb"):
        hardware.resolve(compose(TINY), "cpu", for_planner=True)
    explicit = compose([*TINY, "hardware=h200", "precision=bf16"])
    assert hardware.resolve(explicit, "cuda") is explicit  # a named profile is never replaced


def test_unknown_gpu_trains_with_null_mfu(tmp_path, monkeypatch):
    # A CPU run whose profile has no peak: what an unknown GPU produces after resolve().
    records = train_steps(
        tmp_path, ["train.max_steps=2", "hardware=cpu", "hardware.bf16_tflops=null"]
    )
    assert [r["mfu"] for r in records] == [None, None] and records[-1]["tokens_per_s"] > 0
