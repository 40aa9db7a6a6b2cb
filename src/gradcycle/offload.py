"""Host offload at run time: config checks, the pinned allocator's rounding, the host's numbers.

One naming scheme for both backend families (config.BackendConfig):
- `backend.offload_optimizer` (zero1-3): DeepSpeed's offload_optimizer (fp32 masters, moments and
  fp32 gradients on the host; the optimizer step runs there).
- `backend.offload_param` (zero3; fsdp/hsdp): DeepSpeed's offload_param; on FSDP2 it is
  `CPUOffloadPolicy`, which keeps parameter and gradient shards on the host and therefore runs
  the optimizer step there too (`backend.offload=cpu` in other write-ups). FSDP2 has no
  optimizer-only offload, so fsdp + offload_optimizer alone is refused, never ignored.
- `backend.offload_device=cpu|nvme` + `backend.nvme_path`: ZeRO-Infinity, DeepSpeed only; it needs
  DeepSpeed's async_io op (libaio), checked here before anything starts.

`check_config` runs in validation.validate(); `check_host` before any process group (trainer.run):
the planner's host need (planner/host.py) against this machine's memory, exit 2 with the numbers
and the fix. `configure_pinned` sets torch's `pinned_max_round_threshold_mb` (and the cache limit
with it) so large pinned buffers are not rounded up to a power of two; `HostStepTimer`,
`host_rss_bytes` and `pinned_bytes` feed each step's metrics.
"""

from __future__ import annotations

import os
import shutil
import time

from gradcycle.planner.host import PINNED_ROUND_MB

GIB = 2**30


def offloads(backend_cfg) -> bool:
    return bool(backend_cfg.offload_optimizer or backend_cfg.offload_param)


def check_config(cfg, this_machine: bool = True) -> None:
    """backend.offload_* / nvme_* rules: ValueError naming the field and the fix."""
    b = cfg.backend
    if b.offload_device not in ("cpu", "nvme"):
        raise ValueError(f"backend.offload_device={b.offload_device!r} is not valid: choose cpu "
                         "or nvme")  # fmt: skip
    for name in ("nvme_buffer_count", "nvme_buffer_size"):
        if getattr(b, name) < 1:
            raise ValueError(f"backend.{name}={getattr(b, name)} must be >= 1")
    fsdp = b.name in ("fsdp", "hsdp")
    if b.offload_optimizer and b.name == "ddp" or b.offload_param and b.name in (
            "ddp", "zero1", "zero2"):  # fmt: skip
        which = "offload_optimizer" if b.offload_optimizer and b.name == "ddp" else "offload_param"
        raise ValueError(
            f"backend.{which}=true with backend={b.name}: "
            + ("optimizer offload needs backend=zero1|zero2|zero3 (DeepSpeed) or backend=fsdp "
               "backend.offload_param=true" if which == "offload_optimizer" else
               "parameter offload needs sharded parameters: backend=zero3 or backend=fsdp|hsdp")
        )  # fmt: skip
    if fsdp and b.offload_optimizer and not b.offload_param:
        raise ValueError(
            f"backend.offload_optimizer=true with backend={b.name}: FSDP2 has no optimizer-only "
            "offload; its CPUOffloadPolicy keeps parameter and gradient shards on the host and "
            "runs the optimizer step there: set backend.offload_param=true "
            "backend.offload_optimizer=false, or use backend=zero3 backend.offload_optimizer=true"
        )
    if b.offload_device == "nvme":
        if not offloads(b):
            raise ValueError("backend.offload_device=nvme offloads nothing: set "
                             "backend.offload_optimizer=true and/or backend.offload_param=true")  # fmt: skip
        if fsdp:
            raise ValueError(
                f"backend.offload_device=nvme with backend={b.name}: NVMe offload is DeepSpeed's "
                "(ZeRO-Infinity); use backend=zero3, or backend.offload_device=cpu"
            )
        if b.offload_param and b.name != "zero3":
            raise ValueError("backend.offload_param with NVMe needs backend=zero3")
        if not b.nvme_path:
            raise ValueError("backend.offload_device=nvme needs backend.nvme_path=<a folder on a "
                             "local NVMe drive, the same path on every node>")  # fmt: skip
        if this_machine:
            path = os.path.expanduser(b.nvme_path)
            if not os.path.isdir(path) or not os.access(path, os.W_OK):
                raise ValueError(f"backend.nvme_path={b.nvme_path!r} is not a writable folder "
                                 "here: create it on the local NVMe drive")  # fmt: skip
            check_aio()


def check_aio() -> None:
    """DeepSpeed's async_io op, prebuilt (DS_BUILD_AIO=1) or JIT-buildable (libaio present)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if installed_ops.get("async_io") or AsyncIOBuilder().is_compatible(verbose=False):
            return
    except Exception as e:  # DeepSpeed missing or its builder failing: the same remedy
        reason = f" ({type(e).__name__}: {e})"
    else:
        reason = ""
    raise ValueError(
        "backend.offload_device=nvme needs DeepSpeed's async_io op, which cannot load here"
        f"{reason}: install the libaio headers (apt-get install libaio-dev, the Dockerfile "
        "has them) so DeepSpeed can JIT-build it, or reinstall DeepSpeed with DS_BUILD_AIO=1 "
        "pip install deepspeed; or use backend.offload_device=cpu"
    )


# ---------------------------------------------------------------- host memory check


def machine_host_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def check_host(cfg, world: int, ranks_per_node: int, device: str,
               memory_gib: float | None = None) -> None:  # fmt: skip
    """Refuse (ValueError) an offload run whose host need exceeds this node's memory (the
    machine's own, not a profile's; `memory_gib` to size another), or whose NVMe need exceeds
    the free space at backend.nvme_path. Runs before any process group."""
    if not offloads(cfg.backend):
        return
    from gradcycle.planner import host
    from gradcycle.planner.inputs import make_setup, shape_from_config
    from gradcycle.planner.plan import UnknownShape

    try:
        shape = shape_from_config(cfg)
    except UnknownShape:
        return  # the planner cannot size it (its own warning says so)
    micro = cfg.train.micro_batch_size if isinstance(cfg.train.micro_batch_size, int) else 1
    ac = (cfg.activation_checkpointing.mode, cfg.activation_checkpointing.every)
    setup = make_setup(cfg, shape, world, max(1, world // ranks_per_node), micro,
                       cfg.backend.sync if cfg.backend.sync != "auto" else "per_micro", ac)  # fmt: skip
    h = host.inputs_from_config(cfg, ranks_per_node, device)
    memory = memory_gib or machine_host_gib()
    nvme_free = None
    if cfg.backend.offload_device == "nvme" and cfg.backend.nvme_path:
        nvme_free = shutil.disk_usage(os.path.expanduser(cfg.backend.nvme_path)).free
    h = host.HostInputs(**{**h.__dict__, "host_memory_gb": memory})
    est = host.estimate(setup, h)
    _refuse(cfg, est, ranks_per_node, memory, nvme_free)


def _refuse(cfg, est, ranks: int, memory_gib: float, nvme_free: float | None) -> None:
    if not est.fits:
        terms = ", ".join(f"{k} {v / GIB:,.1f}" for k, v in est.per_rank.items())
        raise ValueError(
            f"host memory: backend={cfg.backend.name} offload_optimizer="
            f"{cfg.backend.offload_optimizer} offload_param={cfg.backend.offload_param} needs "
            f"{est.node / GIB:,.0f} GiB per node ({ranks} ranks x [{terms}] GiB) but the node "
            f"has {memory_gib:,.0f} GiB ({est.budget / GIB:,.0f} usable, "
            "hardware.host_memory_gb / host_reserved_gb): use more nodes (each holds 1/nodes of "
            "the offloaded states), backend.offload_device=nvme backend.nvme_path=<NVMe folder> "
            "(zero3), or less offload (backend.offload_param=false); python -m gradcycle.plan "
            "shows the host term per node"
        )
    if nvme_free is not None and est.nvme > nvme_free:
        raise ValueError(
            f"backend.nvme_path={cfg.backend.nvme_path!r}: NVMe offload needs "
            f"{est.nvme / GIB:,.0f} GiB per node, {nvme_free / GIB:,.0f} GiB are free there: "
            "free space, use another drive, or more nodes"
        )


# ---------------------------------------------------------------- pinned memory


def _set_allocator(settings: str) -> None:
    import torch

    fn = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
        torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None
    )
    if fn is not None:
        fn(settings)


_SUPPORTED: bool | None = None


def pinned_threshold_supported() -> bool:
    """Whether this torch's pinned allocator knows pinned_max_round_threshold_mb. Its settings
    parser accepts unknown keys silently, so the library itself is asked: the key's name is in
    libc10 where the option exists (torch 2.13: AllocatorConfig.h l. 228)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        from pathlib import Path

        import torch

        lib = Path(torch.__file__).parent / "lib"
        found = False
        for path in sorted(lib.glob("libc10.*")) + sorted(lib.glob("c10.*")):
            try:
                found = found or b"pinned_max_round_threshold_mb" in path.read_bytes()
            except OSError:
                continue
        _SUPPORTED = found
    return _SUPPORTED


# Both limits together: a threshold below the cache limit lets unrounded blocks into the
# power-of-two free lists, where torch 2.13's get_free_block hands out a block without comparing
# sizes (fixed upstream later, pytorch#192722); above the limit a block is allocated exactly and
# freed when released. DeepSpeed's and FSDP2's large host buffers live for the whole run.
PINNED_SETTINGS = (f"pinned_max_round_threshold_mb:{PINNED_ROUND_MB},"
                   f"pinned_max_cached_size_mb:{PINNED_ROUND_MB}")  # fmt: skip


def configure_pinned() -> bool:
    """Before the first pinned allocation of an offload run. Returns whether torch has it."""
    if not pinned_threshold_supported():
        return False
    _set_allocator(PINNED_SETTINGS)
    return True


def release_pinned_cache() -> None:
    """Return the pinned blocks freed during start-up (zero.Init's partitions) to the system."""
    import torch

    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        fn()


def pinned_bytes() -> int:
    """Bytes the pinned host allocator holds (0 without CUDA)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return 0
    for key in ("allocated_bytes.current", "allocated_bytes.all.current"):
        if key in stats:
            return int(stats[key])
    return 0


def host_rss_bytes() -> int:
    """This process's resident set (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HostStepTimer:
    """Wall time of the host optimizer's step (offload runs), via optimizer step hooks."""

    _instance: HostStepTimer | None = None

    def __init__(self):
        self.seconds = 0.0
        self.attached = False
        self._t0 = 0.0

    @classmethod
    def instance(cls) -> HostStepTimer:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def attach(self, optimizer) -> None:
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)
        self.attached = True

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._t0

    def take(self) -> float | None:
        """Seconds since the last call; None when no host optimizer is attached."""
        if not self.attached:
            return None
        out, self.seconds = self.seconds, 0.0
        return out


def before_build(cfg, device) -> None:
    """Before a backend allocates: the pinned allocator's rounding threshold (CUDA only; a CPU
    run pins nothing)."""
    if offloads(cfg.backend) and device.type == "cuda":
        configure_pinned()


def after_build(cfg, optimizer) -> None:
    """Once the backend is built: release start-up's cached pinned blocks and time the host
    optimizer's step (its own field in every metrics record)."""
    HostStepTimer._instance = None  # a new run in this process (tests, the OOM retry)
    if offloads(cfg.backend):
        release_pinned_cache()
        HostStepTimer.instance().attach(optimizer)
