"""The optimizer step (backends/base.py) and DDP's gradient buckets (backends/ddp.py).

- The update is enqueued BEFORE the step's one host fetch (fused AdamW, fp32 and fp16): the device
  never idles while the host reads the norm. SGD, which has no on-device skip, fetches first.
- grad_clip=0 multiplies no gradient (clip_grad_norm_ with an infinite bound multiplies by 1.0).
- A NaN loss / inf gradient step still leaves the parameters as they were, on ddp and fsdp.
- DDP's gradients are views into its buckets (no second gradient), kept between steps, and the
  all-reduces recorded from the bucket layout equal what DDP's reducer hands a comm hook.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY, compose, train_steps
from multiproc import run_on_ranks
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradcycle.backends.base import TorchBackend

FLAT_LR = ["optim.schedule=constant", "optim.warmup_steps=0"]


# -- in one process: order, syncs and multiplies inside backend.step() ----------------------------
def _record_step(tmp_path, monkeypatch, overrides: list[str]) -> list[list[str]]:
    """Train 2 steps; per step, what happened inside backend.step(): 'update' (optimizer.step),
    'fetch' (Tensor.tolist), 'item' (Tensor.item), 'mul' (torch._foreach_mul_)."""
    steps: list[list[str]] = []
    inside = []

    def log(name):
        if inside:
            steps[-1].append(name)

    real_step, real_tolist, real_item = TorchBackend.step, torch.Tensor.tolist, torch.Tensor.item
    real_mul = torch._foreach_mul_

    def step(self, lr, stats):
        steps.append([])
        inside.append(True)
        try:
            return real_step(self, lr, stats)
        finally:
            inside.pop()

    def tolist(self):
        log("fetch")
        return real_tolist(self)

    def item(self):
        log("item")
        return real_item(self)

    def mul(*args, **kwargs):
        log("mul")
        return real_mul(*args, **kwargs)

    monkeypatch.setattr(TorchBackend, "step", step)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch, "_foreach_mul_", mul)
    hook = register_optimizer_step_pre_hook(lambda *a: log("update"))
    try:
        records = train_steps(tmp_path, ["train.max_steps=2", *overrides])
    finally:
        hook.remove()
    assert len(records) == 2 and not any(r["skipped"] for r in records)
    return steps


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.grad_clip=0"], ["update", "fetch"]),  # fused AdamW: no multiply, no other sync
        (["train.grad_clip=1.0"], ["mul", "update", "fetch"]),  # clipping: one foreach multiply
        (["precision=fp16", "train.grad_clip=0"], ["update", "fetch"]),  # GradScaler + fused
        (["optim=sgd", "train.grad_clip=0"], ["fetch", "update"]),  # no on-device skip: fallback
    ],
)
def test_step_enqueues_the_update_before_its_one_host_fetch(tmp_path, monkeypatch, overrides,
                                                            expected):  # fmt: skip
    assert _record_step(tmp_path, monkeypatch, overrides) == [expected, expected]


# -- on 2 ranks: NaN/inf steps skipped on ddp and fsdp; DDP's bucket views -------------------------
FAULTS = "nan_loss:2,inf_grad:3"
JOBS = {
    "ddp": ["backend=ddp"],
    "fsdp": ["backend=fsdp"],
    "ddp-sgd": ["backend=ddp", "optim=sgd"],  # the fetch-first fallback
}


def _faulty_jobs(tmp) -> dict[str, tuple[str, list[str]]]:
    return {name: (str(tmp / name), [*o, *FLAT_LR, "train.max_steps=4", "checkpoint.every=1",
                                     "checkpoint.keep=4", "train.global_batch_size=8",
                                     "train.micro_batch_size=2"])  # fmt: skip
            for name, o in JOBS.items()}  # fmt: skip


def _grad_storages(module) -> dict[int, int]:
    out = {}
    for p in module.parameters():
        if p.grad is not None:
            s = p.grad.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _ddp_buckets(rank: int, world: int) -> dict:
    """DDPBackend on 2 ranks, 3 cycles of K=2: gradient storages and recorded all-reduces."""
    from gradcycle.backends.ddp import DDPBackend
    from gradcycle.model import build_model
    from gradcycle.telemetry import CommCounter

    cfg = compose([*TINY, "backend=ddp", "optim=sgd"])
    backend = DDPBackend(cfg, lambda where: build_model(cfg.model, 512, where, seed=0),
                         torch.device("cpu"), world)  # fmt: skip
    n_params = sum(p.numel() for p in backend.module.parameters())
    comm = CommCounter.instance()
    comm.take()
    out = {"n_params": n_params, "storages": [_grad_storages(backend.module)], "comm": []}
    gen = torch.Generator().manual_seed(rank)
    loss_fn = lambda m, b: m(**b).loss  # noqa: E731
    for _ in range(3):
        for k in range(2):
            ids = torch.randint(0, 512, (2, 16), generator=gen)
            backend.forward_backward({"input_ids": ids, "labels": ids}, loss_fn, last=k == 1)
        backend.step(1e-3, torch.zeros(1))
        out["comm"].append(comm.take()["all_reduce"])
        out["storages"].append(_grad_storages(backend.module))
    out["zeroed"] = all(
        p.grad is not None and not p.grad.any() for p in backend.module.parameters()
    )
    return out


def _on_ranks(rank: int, world: int, jobs: dict) -> dict:
    from conftest import rank_train

    out = {}
    os.environ["GRADCYCLE_FAULT"] = FAULTS
    try:
        for name, job in jobs.items():
            out[name] = rank_train(rank, world, [job])[0]
    finally:
        del os.environ["GRADCYCLE_FAULT"]
    out["buckets"] = _ddp_buckets(rank, world)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step")
    jobs = _faulty_jobs(tmp)
    rank0 = run_on_ranks(_on_ranks, 2, args=(jobs,))[0]
    return rank0, {name: run_dir for name, (run_dir, _) in jobs.items()}


def _weights(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    from gradcycle.export import dcp_model_state

    return dcp_model_state(os.path.join(run_dir, "checkpoints", f"step_{step}", "state"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(JOBS))
def test_nonfinite_steps_leave_the_parameters_unchanged(two_ranks, name):
    from conftest import JobFailed

    records, run_dir = two_ranks[0][name], two_ranks[1][name]
    if isinstance(records, JobFailed):
        pytest.fail(records.text, pytrace=False)
    assert [r["skipped"] for r in records] == [False, True, True, False]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2]
    w = [_weights(run_dir, s) for s in (1, 2, 3, 4)]
    assert _same(w[0], w[1]) and _same(w[1], w[2])  # NaN loss, then inf gradients: no update
    assert not _same(w[2], w[3])  # and the next step trains (DDP: its zeroed buckets are clean)


def test_ddp_gradients_are_the_buckets_and_stay_allocated(two_ranks):
    b = two_ranks[0]["buckets"]
    n = b["n_params"]
    assert 4 * n < 1024**2  # one bucket, first iteration and after DDP's rebuild alike
    # before the first backward, and after every step: one fp32 gradient in all (no second copy)
    assert [sum(s.values()) for s in b["storages"]] == [4 * n] * 4
    assert [len(s) for s in b["storages"]] == [1] * 4
    assert b["storages"][2] == b["storages"][3]  # after the rebuild: the same buffer, kept
    assert b["zeroed"]  # zeroed in place by the step, not freed
    assert b["comm"] == [{"calls": 1, "bytes": 4 * n}] * 3  # per_cycle K=2: one all-reduce


def test_bucket_sizes_equal_what_the_reducer_hands_a_comm_hook():
    """Several buckets (bucket_cap_mb small), across DDP's bucket rebuild: Buckets.sizes() after
    each synchronising backward == the buckets DDP's C++ reducer passed to a comm hook."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradcycle.backends.ddp import Buckets

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 300),
                                  torch.nn.Linear(300, 4))  # fmt: skip
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        ddp = DDP(net, gradient_as_bucket_view=True, bucket_cap_mb=0.3)
        seen = []

        def hook(state, bucket):
            seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        buckets, got, truth = Buckets(ddp), [], []
        for _ in range(3):
            seen.clear()
            with ddp.no_sync():
                ddp(torch.randn(2, 300)).sum().backward()
            ddp(torch.randn(2, 300)).sum().backward()
            got.append(buckets.sizes())
            truth.append((sum(seen), len(seen)))
        assert got == truth
        assert truth[0][1] == 1 and truth[2][1] > 1  # one bucket, then DDP's rebuilt layout
    finally:
        dist.destroy_process_group()


def test_planner_holds_one_ddp_gradient():
    """W > 1 adds no bucket copy beside the gradient (gradient_as_bucket_view): with K > 1, where
    one rank also holds its gradient through the cycle, 8 ranks peak exactly like one."""
    from gradcycle.planner.memory import Setup, Shape, estimate

    shape = Shape(32000, 2048, 16, 16, 16, 5504)
    one, eight = (estimate(Setup(shape=shape, seq=2048, micro=1, accumulation=4, backend="ddp",
                                 world=w, shard=1)) for w in (1, 8))  # fmt: skip
    assert "communication buffers" not in eight.breakdown
    assert eight.peak == one.peak
    k1 = estimate(Setup(shape=shape, seq=2048, micro=1, accumulation=1, backend="ddp", world=8,
                        shard=1))  # fmt: skip
    assert k1.breakdown["gradients"] == 4 * shape.n_params  # the buckets live through the step


def test_a_resume_restores_adam_moments_when_gradients_already_exist(tmp_path):
    """DDP's gradients exist before the first step (views into its buckets); torch's
    get_state_dict creates the optimizer state it loads into only when no gradient exists, so a
    ddp resume silently restarted Adam from zero moments (a 6e-5 loss gap two steps later)."""
    from gradcycle.backends import build_backend

    def make(where, dtype=torch.float32):
        torch.manual_seed(0)
        return torch.nn.Linear(8, 8, device=where, dtype=dtype)

    cfg = compose([*TINY, "backend=ddp"])
    saved = build_backend(cfg, make, torch.device("cpu"), 1, tmp_path)
    saved.model(torch.ones(2, 8)).pow(2).sum().backward()
    saved.step(1e-2, torch.zeros(1))
    saved.save_state(tmp_path / "ck")
    loaded = build_backend(cfg, make, torch.device("cpu"), 1, tmp_path)
    for p in loaded.model.parameters():
        p.grad = torch.zeros_like(p)  # as DDP's bucket views are at a resume
    loaded.load_state(tmp_path / "ck")
    want = [saved.optimizer.state[p] for p in saved.model.parameters()]
    got = [loaded.optimizer.state[p] for p in loaded.model.parameters()]
    for w, g in zip(want, got, strict=True):
        assert float(w["exp_avg"].abs().sum()) > 0
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(w[key]), torch.as_tensor(g[key])), key
    for a, b in zip(saved.model.parameters(), loaded.model.parameters(), strict=True):
        assert torch.equal(a, b) and (b.grad is None or not b.grad.any())
