"""hardware=auto (the default): the device's own profile, detected once at start-up.

A profile (conf/hardware/*.yaml) gives the peak bf16 FLOP/s that MFU is measured against, the
memory the planner budgets and the link bandwidths it times collectives with. `auto` maps the CUDA
device's name and memory to a profile; a GPU without one gets a warning and no MFU (`mfu: null`),
never a number computed against another device's peak. On CPU `auto` is the nominal `cpu` profile.
The planner (`python -m gradcycle.plan`) sizes a target, not this machine: with `auto` it uses the
local GPU's profile and otherwise asks for one by name.

Fields set explicitly (hardware.inter_node_gbps=6.25, ...) are kept; the profile fills the rest.

precision=auto (the default) is resolved here too, by `resolve_precision`, the one rule that
training and the planner share: bf16 where the device computes it natively (a CUDA device of
compute capability 8.0 or later; for the planner, a target profile with `bf16: true`), else fp32,
so CPU runs are fp32 as before. fp32 on CUDA runs its matmuls and convolutions in TF32 (`tf32`,
on by default; `apply_precision`).
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

from omegaconf import OmegaConf

# (device-name pattern, minimum memory in GiB, profile): first match wins. The word boundary keeps
# "GH200" (a different part) from matching "H200"; the PCIe parts ("NVIDIA H100 PCIe") and the NVL
# parts ("NVIDIA H100 NVL", "NVIDIA H200 NVL": PCIe cards, ~15% lower peak) are not the SXM ones.
GPU_PROFILES = (
    (r"\bH200 NVL\b", 0, "h200-nvl"),
    (r"\bH100 NVL\b", 0, "h100-nvl"),
    (r"\bH200\b", 0, "h200"),
    (r"\bH100\b(?!.*\bPCIe\b)", 0, "h100-80gb"),
    (r"\bA100\b", 60, "a100-80gb"),
    (r"\bA100\b", 0, "a100-40gb"),
)
PROFILE_FIELDS = ("memory_gb", "bf16_tflops", "intra_node_gbps", "inter_node_gbps", "reserved_gb",
                  "bf16")  # fmt: skip


def profile_for(device_name: str, memory_gib: float) -> str | None:
    for pattern, min_gib, profile in GPU_PROFILES:
        if re.search(pattern, device_name) and memory_gib >= min_gib:
            return profile
    return None


def query_cuda() -> tuple[str, float]:
    """Name and memory (GiB) of this process's CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, props.total_memory / 2**30


def cuda_supports_bf16() -> bool:
    """Native bf16 (compute capability >= 8.0; ROCm), not the emulation older GPUs offer."""
    import torch

    if not torch.cuda.is_available():
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def load_profile(name: str, conf_dir: str | None = None) -> dict:
    from gradcycle.compose import default_conf_dir

    path = Path(conf_dir or default_conf_dir()) / "hardware" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def resolve(cfg, device_type: str, for_planner: bool = False):
    """`cfg` with hardware=auto replaced by the detected profile and precision=auto by the
    device's precision (a copy), else `cfg` itself."""
    return resolve_precision(_resolve_profile(cfg, device_type, for_planner), device_type,
                             for_planner)  # fmt: skip


def resolve_precision(cfg, device_type: str, for_planner: bool = False):
    """precision=auto -> bf16 or fp32 (a copy), else `cfg` itself. Training asks the device it
    runs on; the planner (`for_planner`) its target's profile, so call it after the profile is
    resolved there (`resolve` does both)."""
    if cfg.precision != "auto":
        return cfg
    if for_planner:
        bf16 = bool(cfg.hardware.bf16)
    else:
        bf16 = device_type == "cuda" and cuda_supports_bf16()
    cfg = copy.deepcopy(cfg)
    cfg.precision = "bf16" if bf16 else "fp32"
    return cfg


def uses_tf32(cfg, device_type: str) -> bool:
    return device_type == "cuda" and cfg.precision == "fp32" and bool(cfg.tf32)


def apply_precision(cfg, device_type: str) -> None:
    """Process-wide math settings for the resolved precision: TF32 for fp32 on CUDA (Ampere and
    later: ~8x the fp32 matmul rate, 10-bit mantissa products, fp32 accumulation)."""
    if uses_tf32(cfg, device_type):
        import torch

        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def precision_line(cfg, requested: str, device_type: str) -> str:
    """The start-up plan's line: the precision, why, and the gradient reduction dtype."""
    why = ""
    if requested == "auto":
        if cfg.precision == "bf16":
            why = " (precision=auto: this CUDA device computes bf16 natively)"
        elif device_type == "cuda":
            why = " (precision=auto: this CUDA device has no native bf16)"
        else:
            why = f" (precision=auto: fp32 on {device_type})"
    if uses_tf32(cfg, device_type):
        why += ", matmuls and convolutions in TF32 (tf32=false for full fp32)"
    return (f"precision: {cfg.precision}{why}; gradients reduced across ranks in "
            f"{cfg.backend.reduce_dtype} (backend.reduce_dtype)")  # fmt: skip


def _resolve_profile(cfg, device_type: str, for_planner: bool):
    hw = cfg.hardware
    if hw.name != "auto":
        return cfg
    if device_type != "cuda":
        if for_planner:
            raise ValueError(
                "hardware=auto: there is no GPU here to detect, and the planner sizes the target "
                "machine: name it, e.g. hardware=a100-40gb (a100-40gb, a100-80gb, h100-80gb, "
                "h100-nvl, h200, h200-nvl)"
            )
        name, profile = "cpu", load_profile("cpu")
    else:
        device, memory = query_cuda()
        name = profile_for(device, memory)
        if name is None:
            warnings.warn(
                f"hardware=auto: no profile for {device!r} ({memory:.1f} GiB): MFU is not "
                "reported (mfu: null) and the planner does not time communication; set "
                "hardware=<profile> or hardware.bf16_tflops=<dense bf16 peak of one device>",
                stacklevel=2,
            )
            name = "unknown"
            profile = {"memory_gb": round(memory, 1), "reserved_gb": 2.0,
                       "bf16": cuda_supports_bf16()}  # fmt: skip
        else:
            profile = load_profile(name)
    cfg = copy.deepcopy(cfg)
    cfg.hardware.name = name
    for key in PROFILE_FIELDS:
        if cfg.hardware[key] is None:  # None: not set explicitly, the profile's value
            cfg.hardware[key] = profile.get(key)
    return cfg
