"""hardware=auto (the default): the device's own profile, detected once at start-up.

A profile (conf/hardware/*.yaml) gives the peak bf16 FLOP/s that MFU is measured against, the
memory the planner budgets and the link bandwidths it times collectives with. `auto` maps the CUDA
device's name and memory to a profile; a GPU without one gets a warning and no MFU (`mfu: null`),
never a number computed against another device's peak. On CPU `auto` is the nominal `cpu` profile.
The planner (`python -m gradcycle.plan`) sizes a target, not this machine: with `auto` it uses the
local GPU's profile and otherwise asks for one by name.

Fields set explicitly (hardware.inter_node_gbps=6.25, ...) are kept; the profile fills the rest.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

from omegaconf import OmegaConf

# (device-name pattern, minimum memory in GiB, profile): first match wins. The word boundary keeps
# "GH200" (a different part) from matching "H200"; PCIe H100s have a lower peak than the SXM part.
GPU_PROFILES = (
    (r"\bH200\b", 0, "h200"),
    (r"\bH100\b(?!.*\bPCIe\b)", 0, "h100-80gb"),
    (r"\bA100\b", 60, "a100-80gb"),
    (r"\bA100\b", 0, "a100-40gb"),
)
PROFILE_FIELDS = ("memory_gb", "bf16_tflops", "intra_node_gbps", "inter_node_gbps", "reserved_gb")


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


def load_profile(name: str, conf_dir: str | None = None) -> dict:
    from gradcycle.compose import default_conf_dir

    path = Path(conf_dir or default_conf_dir()) / "hardware" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def resolve(cfg, device_type: str, for_planner: bool = False):
    """`cfg` with hardware=auto replaced by the detected profile (a copy), else `cfg` itself."""
    hw = cfg.hardware
    if hw.name != "auto":
        return cfg
    if device_type != "cuda":
        if for_planner:
            raise ValueError(
                "hardware=auto: there is no GPU here to detect, and the planner sizes the target "
                "machine: name it, e.g. hardware=a100-40gb (a100-40gb, a100-80gb, h100-80gb, h200)"
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
            profile = {"memory_gb": round(memory, 1), "reserved_gb": 2.0}
        else:
            profile = load_profile(name)
    cfg = copy.deepcopy(cfg)
    cfg.hardware.name = name
    for key in PROFILE_FIELDS:
        if cfg.hardware[key] is None:  # None: not set explicitly, the profile's value
            cfg.hardware[key] = profile.get(key)
    return cfg
