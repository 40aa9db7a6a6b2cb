"""Host memory and host-side time per node: what offload puts in the node's RAM, on its PCIe
links, its cores and its NVMe drives (pure arithmetic, no torch).

Per rank, by backend and offload setting (docs/planner.md "Host memory" has the hand count):

- DeepSpeed ZeRO-3, offload_optimizer (stage3.py, deepspeed 0.19.8): the fp32 master partition
  and the optimizer's moments (plain host memory), one pinned flat gradient buffer in the
  accumulation dtype (`grad_partitions_flat_buffer`, l. 790-795) and one pinned fp32 gradient
  buffer per optimizer sub-group (l. 1338-1340). offload_param adds one pinned 16-bit flat buffer
  per parameter group (`_create_param_groups_fp16_flat_cpu_memory`, l. 906); zero.Init pinned each
  partition first (partition_parameters.py l. 1842) and the copy into the flat buffer frees them
  into torch's pinned cache, where they stay until gradcycle empties it after the engine is built:
  the start-up peak holds both.
- ZeRO-1/2 offload_optimizer (stage_1_and_2.py): pinned fp32 master and fp32 gradient partitions
  (l. 561-565, l. 939-941), moments, and with K > 1 a pinned per-parameter accumulation buffer in
  the parameter dtype (l. 1824-1825).
- FSDP2 `CPUOffloadPolicy` (offload_param): each fp32 parameter shard pinned (_fsdp_param.py
  l. 312-315), each fp32 gradient shard copied into pinned memory (_fsdp_collectives.py l. 737),
  AdamW's moments on the host.
- NVMe (ZeRO-Infinity): what is swapped leaves host memory but DeepSpeed keeps pinned swap
  buffers (`buffer_count` of them).

Pinned blocks come from torch's CachingHostAllocator, which rounds every block up to a power of two
(CachingHostAllocator.h `allocate`: `c10::llvm::PowerOf2Ceil(size)`) unless it is larger than
`pinned_max_round_threshold_mb`; gradcycle sets that threshold (gradcycle/offload.py) where torch
has it, so large buffers are allocated exactly.

Beside model states every rank has its process (torch, CUDA and NCCL libraries), its loader
workers and its share of the page cache of the token shards; a checkpoint stages what is on the
device through host memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradcycle.planner import zero

GIB = 2**30
GB = 1e9
PINNED_ROUND_MB = 64  # gradcycle's pinned_max_round_threshold_mb (= pinned_max_cached_size_mb)
PROCESS_GPU = 3.0 * GIB  # one GPU process: torch, CUDA, cuBLAS, NCCL libraries and context
PROCESS_CPU = 0.6 * GIB  # one CPU process: torch and transformers imported
WORKER = 0.5 * GIB  # one DataLoader worker (forked, touches its own pages)
ADAM_BYTES = 28  # fused AdamW per parameter: reads p, g, m, v (fp32), writes p, m, v
MAX_GROUPS = 2  # gradcycle's optimizer groups: weights with decay, 1-D weights without


@dataclass(frozen=True)
class HostInputs:
    """What the host terms read beyond the Setup (config and hardware profile values)."""

    ranks_per_node: int = 8
    device: str = "cuda"  # cuda: pinned memory and PCIe; cpu: neither
    offload_device: str = "cpu"  # cpu | nvme
    nvme_buffer_count: int = 5
    nvme_buffer_size: int = 100_000_000
    workers: int = 2
    prefetch: int = 2
    pinned_round_mb: float | None = PINNED_ROUND_MB  # None: torch's default, everything rounded
    host_memory_gb: float | None = None
    host_reserved_gb: float = 0.0
    host_cores: int | None = None
    adam_gparams: float | None = None  # per core
    host_memory_gbps: float | None = None
    pcie_gbps: float | None = None
    gpus_per_uplink: int = 1
    nvme_gb: float | None = None
    nvme_read_gbps: float | None = None
    nvme_write_gbps: float | None = None


@dataclass
class HostEstimate:
    """Bytes per node. `per_rank` lists each rank's terms (as allocated, rounding included)."""

    per_rank: dict[str, float]
    node: float  # all ranks of the node at the start-up peak
    steady: float  # after start-up (pinned cache emptied)
    pinned_requested: float  # per node, what was asked for
    pinned_allocated: float  # per node, with the rounding that applies
    pinned_power_of_two: float  # per node, had every block been rounded (torch's default)
    nvme: float  # bytes on NVMe per node
    budget: float | None  # host_memory_gb - host_reserved_gb, bytes; None: unknown

    @property
    def fits(self) -> bool:
        return self.budget is None or self.node <= self.budget

    @property
    def rounding_saving(self) -> float:
        return self.pinned_power_of_two - self.pinned_allocated


def _round(nbytes: float, threshold_mb: float | None) -> float:
    if nbytes <= 0:
        return 0.0
    if threshold_mb is not None and nbytes > threshold_mb * 2**20:
        return float(nbytes)
    return float(2 ** math.ceil(math.log2(nbytes)))


def _groups(setup) -> list[int]:
    """Elements of this rank's partition in each optimizer group (2-D weights, 1-D weights)."""
    s, w = setup.shape, setup.world
    tensors = zero._tensors(s)
    return [sum(zero._partition(r * c, w) for r, c in tensors if (c > 1) == two_d)
            for two_d in (True, False)]  # fmt: skip


def _sub_groups(setup) -> list[int]:
    """Optimizer sub-group sizes (elements) as DeepSpeed cuts them (zero.largest_sub_group)."""
    s, w, sub = setup.shape, setup.world, setup.zero.sub_group
    out = []
    for two_d in (True, False):
        size = 0
        for r, c in zero._tensors(s):
            if (c > 1) != two_d:
                continue
            size += zero._partition(r * c, w)
            if size >= sub:
                out.append(size)
                size = 0
        if size:
            out.append(size)
    return out


def model_state_blocks(setup, h: HostInputs) -> tuple[dict[str, float], list[tuple[str, float]],
                                                       list[tuple[str, float]]]:  # fmt: skip
    """(plain host bytes by name, pinned blocks (name, bytes) held in training, pinned blocks
    freed into the cache at start-up) per rank."""
    from gradcycle.planner.memory import optimizer_bytes

    b, n = setup.backend, setup.num
    k = optimizer_bytes(setup)
    plain: dict[str, float] = {}
    pinned: list[tuple[str, float]] = []
    cached: list[tuple[str, float]] = []
    nvme = h.offload_device == "nvme"
    pin = h.device == "cuda"
    if b.startswith("zero") and setup.offload_optimizer:
        part = zero._partitions(setup.shape, setup.world)[0]
        g = setup.zero.grad_accum or n.grad
        if nvme:  # masters, moments and fp32 gradients swapped; pinned swap buffers stay
            sub = max(_sub_groups(setup))
            pinned += [("optimizer NVMe swap buffers", sub * 4.0)] * 4
        else:
            plain["fp32 master partition"] = part * 4.0
            plain["optimizer states"] = part * float(k)
        if b == "zero3":
            pinned.append(("gradient partition buffer", part * float(g)))
            if not nvme:
                pinned += [("fp32 gradient sub-group", x * 4.0) for x in _sub_groups(setup)]
        else:
            if not nvme:
                pinned += [("fp32 master partition", x * 4.0) for x in _groups(setup) if x]
                plain.pop("fp32 master partition")
                pinned += [("fp32 gradient partition", x * 4.0) for x in _groups(setup) if x]
            if setup.accumulation > 1:  # per-parameter accumulation buffers
                pinned += [("accumulated gradients", zero._partition(r * c, setup.world) * n.grad)
                           for r, c in zero._tensors(setup.shape)]  # fmt: skip
    if b == "zero3" and setup.offload_param:
        groups = _groups(setup)
        if h.offload_device == "nvme":
            pinned += [("parameter NVMe swap buffers", h.nvme_buffer_size * float(n.param))] * (
                h.nvme_buffer_count
            )
            pinned.append(("parameter swap-out buffer", max(_sub_groups(setup)) * float(n.param)))
        else:
            pinned += [("16-bit parameter partitions", x * float(n.param)) for x in groups if x]
            cached += [("zero.Init partitions (pinned cache)",
                        zero._partition(r * c, setup.world) * float(n.param))
                       for r, c in zero._tensors(setup.shape)]  # fmt: skip
    if b in ("fsdp", "hsdp") and setup.offload_param:
        s, shard = setup.shape, setup.shard
        tensors = s.layer_tensors() * s.layers + s.root_tensors()
        for r, c in tensors:
            numel = math.ceil(r / shard) * c
            pinned.append(("fp32 parameter shards", numel * 4.0))
            pinned.append(("fp32 gradient shards", numel * 4.0))
        plain["optimizer states"] = s.model_shard(shard) * float(k)
    if not pin:  # a CPU run: nothing is pinned, blocks are exact
        for name, nbytes in pinned:
            plain[name] = plain.get(name, 0.0) + nbytes
        pinned, cached = [], []
    return plain, pinned, cached


def nvme_bytes(setup, h: HostInputs) -> float:
    """Bytes one rank keeps on NVMe."""
    if h.offload_device != "nvme":
        return 0.0
    from gradcycle.planner.memory import optimizer_bytes

    part = zero._partitions(setup.shape, setup.world)[0]
    out = part * (8.0 + optimizer_bytes(setup)) if setup.offload_optimizer else 0.0
    return out + (part * float(setup.num.param) if setup.offload_param else 0.0)


def estimate(setup, h: HostInputs) -> HostEstimate:
    plain, pinned, cached = model_state_blocks(setup, h)
    r = h.ranks_per_node
    rounded = sum(_round(x, h.pinned_round_mb) for _, x in pinned)
    # blocks above pinned_max_cached_size_mb (set with the threshold) are freed, not cached
    limit = math.inf if h.pinned_round_mb is None else h.pinned_round_mb * 2**20
    cached = [(name, x) for name, x in cached if x <= limit]
    cache = sum(_round(x, h.pinned_round_mb) for _, x in cached)
    per_rank = dict(plain)
    for name, x in pinned:
        per_rank[f"{name} (pinned)"] = per_rank.get(f"{name} (pinned)", 0.0) + _round(
            x, h.pinned_round_mb
        )
    if cache:
        per_rank["zero.Init partitions in the pinned cache (start-up)"] = cache
    per_rank["process (libraries, context)"] = PROCESS_GPU if h.device == "cuda" else PROCESS_CPU
    per_rank["loader workers"] = h.workers * WORKER
    # the token shards are memory-mapped: each worker's prefetched micro-batches, and the pages
    # the kernel reads ahead (a few MiB per reader)
    tokens = setup.micro * setup.seq * max(1, h.workers) * max(1, h.prefetch)
    per_rank["page cache of the shards"] = tokens * 4.0 + max(1, h.workers) * 8 * 2**20
    per_rank["checkpoint staging"] = _staging(setup)
    node = r * sum(per_rank.values())
    return HostEstimate(
        per_rank={k: v for k, v in per_rank.items() if v},
        node=node,
        steady=node - r * cache,
        pinned_requested=r * sum(x for _, x in pinned + cached),
        pinned_allocated=r * (rounded + cache),
        pinned_power_of_two=r * sum(_round(x, None) for _, x in pinned + cached),
        nvme=r * nvme_bytes(setup, h),
        budget=(h.host_memory_gb - h.host_reserved_gb) * GIB if h.host_memory_gb else None,
    )


def _staging(setup) -> float:
    """Host bytes a checkpoint save holds at once: what is already on the host is written from
    there; DeepSpeed's torch.save copies each device tensor (its flat fp32 partition of a
    group: one sub-group) to host memory; DCP copies one tensor at a time."""
    s = setup.shape
    if setup.offload_optimizer or setup.offload_param:
        return 0.0
    if setup.backend.startswith("zero"):
        return zero.largest_sub_group(s, setup.zero, setup.world) * 4.0
    largest = max(r * c for r, c in s.layer_tensors() + s.root_tensors())
    return largest * 4.0 / (setup.shard if setup.backend in ("fsdp", "hsdp") else 1)


# ---------------------------------------------------------------- time


@dataclass(frozen=True)
class OffloadTime:
    """Host-side traffic and time of one optimizer step, per GPU (bytes) and in seconds."""

    pcie_down_micro: float = 0.0  # GPU -> host bytes per micro-batch
    pcie_up_micro: float = 0.0  # host -> GPU bytes per micro-batch
    pcie_up_step: float = 0.0  # after the optimizer step
    pcie_gbps: float = 0.0  # per GPU when all GPUs of an uplink transfer at once
    pcie_micro_s: float = 0.0
    pcie_step_s: float = 0.0
    host_params: int = 0  # parameters this rank's host optimizer updates
    host_step_s: float = 0.0
    nvme_read: float = 0.0  # bytes per step, node
    nvme_write: float = 0.0
    nvme_s: float = 0.0
    rows: list[tuple[str, str]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.host_params or self.pcie_micro_s or self.pcie_step_s)


def host_adam_rate(h: HostInputs) -> float:
    """Parameters per second one rank's host optimizer updates: its share of the node's cores
    at the per-core rate, capped by its share of the memory bandwidth."""
    cores = max(1.0, (h.host_cores or 1) / h.ranks_per_node)
    rate = cores * (h.adam_gparams or 0.0) * 1e9
    if h.host_memory_gbps:
        rate = min(rate, h.host_memory_gbps * GB / h.ranks_per_node / ADAM_BYTES)
    return rate


def offload_time(setup, h: HostInputs) -> OffloadTime:
    b, n, k = setup.backend, setup.num, setup.accumulation
    host = (b.startswith("zero") and setup.offload_optimizer) or (
        b in ("fsdp", "hsdp") and setup.offload_param
    )
    if not host and not setup.offload_param:
        return OffloadTime()
    down = up_micro = up_step = host_add = 0.0
    if b in ("fsdp", "hsdp"):
        shard = setup.shape.model_shard(setup.shard)
        params = shard
        syncs = k if setup.sync == "per_micro" else 1
        up_micro = 2 * shard * 4.0  # every all-gather copies its fp32 shard up (forward, backward)
        down = shard * float(n.reduce) * syncs / k  # reduced gradient shards
        # from the second reduction on, FSDP2 adds the copy to the host gradient on the CPU
        # (_fsdp_collectives.py l. 744-749): read two fp32 shards, write one
        host_add = max(0, syncs - 1) * shard * 12.0
    else:
        part = zero._partitions(setup.shape, setup.world)[0]
        params = part if setup.offload_optimizer else 0
        g = setup.zero.grad_accum or n.grad
        stage = int(b[-1])
        if setup.offload_optimizer:
            per_micro = stage > 1 and setup.sync == "per_micro"
            syncs = k if per_micro else 1
            down = part * g * syncs / k
            # the host-side running sum comes back to the GPU to be added to (stage3.py l. 2035)
            up_micro = part * g * max(0, syncs - 1) / k
            if not setup.offload_param:
                up_step = part * float(n.param)  # the updated 16-bit partition
        if setup.offload_param:  # every gather's input partition comes up, forward and backward
            up_micro += 2 * part * float(n.param)
    bw = (h.pcie_gbps or 0.0) * GB / max(1, h.gpus_per_uplink)
    micro_s = max(down, up_micro) / bw if bw and h.device == "cuda" else 0.0
    step_s = up_step / bw if bw and h.device == "cuda" else 0.0
    rate = host_adam_rate(h)
    host_s = params / rate if params and rate else 0.0
    if host_add and h.host_memory_gbps:
        host_s += host_add / (h.host_memory_gbps * GB / h.ranks_per_node)
    nv_r = nv_w = 0.0
    if h.offload_device == "nvme":
        part = zero._partitions(setup.shape, setup.world)[0]
        if setup.offload_optimizer:  # masters, moments, gradients in; masters, moments out
            from gradcycle.planner.memory import optimizer_bytes

            opt = part * (4.0 + optimizer_bytes(setup))
            nv_r, nv_w = opt + part * 4.0, opt + part * 4.0
        if setup.offload_param:  # read for every forward and backward, written after the step
            nv_r += 2 * k * part * float(n.param)
            nv_w += part * float(n.param)
        nv_r, nv_w = nv_r * h.ranks_per_node, nv_w * h.ranks_per_node
    nvme_s = 0.0
    if nv_r or nv_w:
        nvme_s = nv_r / ((h.nvme_read_gbps or math.inf) * GB)
        nvme_s += nv_w / ((h.nvme_write_gbps or math.inf) * GB)
    return OffloadTime(down, up_micro, up_step, bw / GB, micro_s, step_s, int(params), host_s,
                       nv_r, nv_w, nvme_s)  # fmt: skip


def exposed(t: OffloadTime, micro_compute_s: float, k: int) -> float:
    """Seconds the offload adds to a step: PCIe beyond each micro-batch's compute (the copies
    overlap backward), the parameter upload, the host optimizer and NVMe after backward
    (DeepSpeed runs them between backward and the next forward)."""
    return k * max(0.0, t.pcie_micro_s - micro_compute_s) + t.pcie_step_s + t.host_step_s + t.nvme_s


def inputs_from_config(cfg, ranks_per_node: int, device: str = "cuda") -> HostInputs:
    hw, b = cfg.hardware, cfg.backend
    return HostInputs(
        ranks_per_node=ranks_per_node, device=device, offload_device=b.offload_device,
        nvme_buffer_count=b.nvme_buffer_count, nvme_buffer_size=b.nvme_buffer_size,
        workers=cfg.data.num_workers, prefetch=cfg.data.prefetch_factor,
        pinned_round_mb=PINNED_ROUND_MB if pinned_threshold_supported() else None,
        host_memory_gb=hw.host_memory_gb, host_reserved_gb=hw.host_reserved_gb or 0.0,
        host_cores=hw.host_cores, adam_gparams=hw.host_adam_gparams,
        host_memory_gbps=hw.host_memory_gbps, pcie_gbps=hw.pcie_gbps,
        gpus_per_uplink=hw.gpus_per_pcie_uplink or 1, nvme_gb=hw.nvme_gb,
        nvme_read_gbps=hw.nvme_read_gbps, nvme_write_gbps=hw.nvme_write_gbps,
    )  # fmt: skip


def pinned_threshold_supported() -> bool:
    """torch's pinned allocator knows pinned_max_round_threshold_mb (added after 2.11; the
    installed torch decides, since the planner sizes the stack it runs with)."""
    from gradcycle.offload import pinned_threshold_supported as supported

    return supported()


def verdict(est: HostEstimate) -> str:
    """One sentence: the host need against the host memory."""
    if est.budget is None:
        return f"{est.node / GIB:,.0f} GiB per node (hardware.host_memory_gb unknown)"
    share = f"{est.node / GIB:,.0f} GiB per node of {est.budget / GIB:,.0f} usable"
    return f"{share}: {'fits' if est.fits else 'DOES NOT FIT ON THE HOST'}"
