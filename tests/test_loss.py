"""The chunked loss (gradcycle/loss.py): exact against the full path on every backend, the same
collectives, a fraction of the memory.

ONE 2-rank spawn trains ddp, fsdp and zero3, tied and untied embeddings, loss.impl=full and
chunked (several chunks per micro-batch) on ragged data; each configuration reports on its own.
Everything else runs in this process.
"""

from __future__ import annotations

import sys
import traceback

import pytest
import torch
from conftest import RAGGED, ROOT, TINY, compose, read_metrics
from multiproc import run_on_ranks

from gradcycle import loss
from gradcycle.data.masking import document_ids
from gradcycle.model import build_model

sys.path.insert(0, str(ROOT / "bench"))

STEPS = [*RAGGED, "optim=sgd", "train.max_steps=3", "train.global_batch_size=8",
         "train.micro_batch_size=2", "checkpoint.at_end=false", "train.eval_every=3",
         "train.eval_batches=2", "backend.dist_timeout_s=120"]  # fmt: skip
# ZeRO-3 gathering every module on its own, in forward and again in backward (tests/test_deepspeed)
Z3 = ["backend.param_persistence_threshold=0",
      "+backend.deepspeed_config.zero_optimization.stage3_prefetch_bucket_size=0",
      "+backend.deepspeed_config.zero_optimization.stage3_max_reuse_distance=0"]  # fmt: skip
BACKENDS = {"ddp": ["backend=ddp"], "fsdp": ["backend=fsdp"], "zero3": ["backend=zero3", *Z3]}
IMPLS = {"full": ["loss.impl=full"], "chunked": ["loss.impl=chunked", "loss.chunk_tokens=48"]}
CASES = [(b, tie) for b in BACKENDS for tie in (False, True)]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# -- the 2-rank spawn ---------------------------------------------------------------------------
def _on_rank(rank: int, world: int, jobs: list) -> dict:
    from gradcycle.trainer import run

    out = {}
    for key, run_dir, overrides in jobs:
        try:
            run(compose([*TINY, f"run_dir={run_dir}", *overrides]))
            out[key] = read_metrics(run_dir) if rank == 0 else []
        except Exception:  # reported by this configuration's tests only
            out[key] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def spawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss")
    jobs = [((b, tie, impl), str(root / f"{b}-{tie}-{impl}"),
             [*BACKENDS[b], *IMPLS[impl], f"model.tie_embeddings={str(tie).lower()}", *STEPS])
            for b, tie in CASES for impl in IMPLS]  # fmt: skip
    return run_on_ranks(_on_rank, 2, (jobs,))[0]


def _records(spawn, backend, tie, impl) -> list[dict]:
    got = spawn[(backend, tie, impl)]
    assert not isinstance(got, str), f"{backend} tie={tie} loss.impl={impl} failed:\n{got}"
    return got


@pytest.mark.slow
@pytest.mark.parametrize("backend, tie", CASES)
def test_chunked_equals_full_per_step(spawn, backend, tie):
    full, chunked = (_records(spawn, backend, tie, impl) for impl in IMPLS)
    steps = lambda rs: [r for r in rs if "loss" in r]  # noqa: E731
    assert len(steps(full)) == len(steps(chunked)) == 3
    for a, b in zip(steps(chunked), steps(full), strict=True):
        assert a["tokens"] == b["tokens"]
        assert _rel(a["loss"], b["loss"]) < 1e-6, (a["loss"], b["loss"])
        assert _rel(a["grad_norm"], b["grad_norm"]) < 1e-6, (a["grad_norm"], b["grad_norm"])
    # evaluation runs the chunked path too, and agrees
    (ev_a,), (ev_b,) = ([r for r in rs if "eval_loss" in r] for rs in (chunked, full))
    assert ev_a["eval_tokens"] == ev_b["eval_tokens"] > 0
    assert _rel(ev_a["eval_loss"], ev_b["eval_loss"]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("backend, tie", CASES)
def test_collectives_per_step_unchanged(spawn, backend, tie):
    full, chunked = (_records(spawn, backend, tie, impl) for impl in IMPLS)
    for a, b in zip((r for r in chunked if "loss" in r), (r for r in full if "loss" in r),
                    strict=True):  # fmt: skip
        assert a["comm"] == b["comm"]
    if backend != "ddp":  # the counts mean something: parameters are gathered
        assert chunked[0]["comm"]["all_gather"]["calls"] > 0


# -- in this process ------------------------------------------------------------------------------
def _model(tie: bool = False, vocab: int = 300, **over):
    cfg = compose([*TINY, f"model.tie_embeddings={str(tie).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab)
    for key, value in over.items():
        setattr(model.config, key, value)
    return model


def _batch(vocab: int = 300, rows: int = 3, width: int = 40, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[0, 25:] = -100  # ragged rows, and one with no target at all
    labels[rows - 1, :] = -100
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, batch, impl, chunk=2048, norm=37.0):
    from gradcycle.trainer import token_loss

    model.zero_grad(set_to_none=True)
    value = token_loss(model, batch, norm, impl, chunk)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
def test_every_chunk_size_gives_the_full_paths_loss_and_gradients(tie):
    model = _model(tie)
    batch = _batch()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ref_loss, ref = _loss_and_grads(model, batch, "full")
    assert ref_loss.dtype == torch.float32
    for chunk in (1, 7, 39, 40, 119, 120, 10_000):  # 120 tokens: uneven last chunk, one chunk
        got_loss, got = _loss_and_grads(model, batch, "chunked", chunk)
        assert got_loss.dtype == torch.float32
        assert _rel(got_loss.item(), ref_loss.item()) < 1e-6, chunk
        for name, g in ref.items():
            assert (got[name] - g).norm() <= 1e-6 * g.norm() + 1e-12, (chunk, name)


def test_extra_batch_keys_reach_the_decoder():
    """position_ids, a padding attention_mask and document_ids (document masking: the mask is
    built in the loss, data/masking.py) reach the decoder on both paths."""
    model = _model()
    batch = _batch()
    rows, width = batch["input_ids"].shape
    # two documents per row: positions restart (rotary attention is relative: a uniform shift
    # would change nothing)
    restart = torch.cat([torch.arange(width // 2), torch.arange(width - width // 2)])
    shifted = {**batch, "position_ids": restart.expand(rows, width)}
    mask = {**batch, "attention_mask": (batch["labels"] != -100).long()}
    documents = {**shifted, "document_ids": document_ids(shifted["position_ids"])}
    for extra in (shifted, mask, documents):
        full, chunked = (_loss_and_grads(model, extra, impl, 16)[0] for impl in ("full", "chunked"))
        assert _rel(chunked.item(), full.item()) < 1e-6
    plain = _loss_and_grads(model, batch, "chunked", 16)[0]
    assert _rel(_loss_and_grads(model, shifted, "chunked", 16)[0].item(), plain.item()) > 1e-6
    assert _rel(_loss_and_grads(model, documents, "chunked", 16)[0].item(), plain.item()) > 1e-4


def test_attached_model_keeps_logits_keys_and_hf_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model, plain = _model(), _model()
    keys = list(model.state_dict())
    assert loss.attach(loss.attach(model)) is model  # idempotent
    ids = _batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert list(model.state_dict()) == keys  # instance attributes: no new module, no new key
    model.save_pretrained(tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(back) is type(plain)
    for name, value in plain.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_eval_without_grad_and_bf16_autocast():
    model = _model()
    batch = _batch()
    with torch.no_grad():
        full = loss.summed_token_ce(model, batch, "full")
        chunked = loss.summed_token_ce(model, batch, "chunked", 16)
    assert not chunked.requires_grad and _rel(chunked.item(), full.item()) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ddp precision=bf16
        (ref_loss, ref), (got_loss, got) = (_loss_and_grads(model, batch, impl, 16)
                                            for impl in ("full", "chunked"))  # fmt: skip
    assert got_loss.dtype == torch.float32 and _rel(got_loss.item(), ref_loss.item()) < 1e-3
    for name, g in ref.items():
        assert got[name].dtype == g.dtype == torch.float32
        assert (got[name] - g).norm() <= 2e-2 * g.norm(), name


def test_16_bit_parameters_and_the_scale_applied_in_fp32():
    """fsdp/DeepSpeed bf16: the head is bf16; the incoming gradient scale is not rounded."""
    model = _model().to(torch.bfloat16)
    batch = _batch()
    (ref_loss, ref), (got_loss, got) = (_loss_and_grads(model, batch, impl, 16, norm=3.0001)
                                        for impl in ("full", "chunked"))  # fmt: skip
    assert got_loss.dtype == torch.float32 and _rel(got_loss.item(), ref_loss.item()) < 1e-2
    for name, g in ref.items():
        assert got[name].dtype == torch.bfloat16
        assert (got[name].float() - g.float()).norm() <= 3e-2 * g.float().norm(), name
    g = torch.randn(64, 8).bfloat16()
    scale = torch.tensor(1 / 3.0001)
    assert torch.equal(g.clone().mul_(scale), (g.float() * scale).bfloat16())


def test_backward_twice_is_refused():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    out = loss.linear_cross_entropy(h, w, None, torch.randint(0, 11, (6,)), 4)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="loss.impl=full"):
        out.backward()


def test_linear_head_with_bias():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    t = torch.randint(0, 13, (10,))
    t[3] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.t() + b, t, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    got = loss.linear_cross_entropy(h, w, b, t, 3)
    assert _rel(got.item(), ref.item()) < 1e-6
    for a, r in zip(torch.autograd.grad(got, (h, w, b)), ref_grads, strict=True):
        assert (a - r).norm() <= 1e-6 * r.norm()


def test_models_whose_logits_are_transformed_are_refused():
    with pytest.raises(ValueError, match="final_logit_softcapping.*loss.impl=full"):
        loss.attach(_model(final_logit_softcapping=30.0))


@pytest.mark.parametrize(
    "override, match",
    [("loss.impl=fast", "loss.impl='fast' is not valid"),
     ("loss.chunk_tokens=0", "loss.chunk_tokens=0"),
     ("loss.impl=liger", "loss.impl=liger")],
)  # fmt: skip
def test_loss_config_errors_name_the_field(override, match):
    from gradcycle.validation import validate

    if override == "loss.impl=liger" and loss.liger_usable():
        pytest.skip("liger-kernel and CUDA are present here: loss.impl=liger is valid")
    with pytest.raises(ValueError, match=match):
        validate(compose([*TINY, override]))


def test_loss_memory_is_an_eighth_of_the_full_paths():
    """seq 512 x micro 4 x vocab 32k on CPU, allocator events of the loss forward + backward
    (and the tiny decoder's, counted against the chunked path): chunks of 256 tokens hold at most
    1/8 of the full path's peak; one chunk of all 2048 tokens still less than half (no copy of
    the logits, no separate log-softmax or gradient buffers)."""
    import gc

    import memory_check as mc
    from torch.profiler import ProfilerActivity, profile, record_function

    from gradcycle.trainer import token_loss

    vocab = 32_000
    cfg = compose([*TINY, f"model.vocab_size={vocab}", "data.seq_len=512"])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab)
    ids = torch.randint(0, vocab, (4, 512))
    batch = {"input_ids": ids, "labels": ids}
    peaks, losses = {}, {}
    for impl, chunk in (("full", 0), ("chunked", 256), ("chunked", 2048)):
        model.zero_grad(set_to_none=True)
        gc.collect()
        with (profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
              record_function(mc.MARK)):  # fmt: skip
            value = token_loss(model, batch, 2047.0, impl, chunk)
            value.backward()
        peaks[(impl, chunk)] = mc.window_peak(prof, mc.MARK)[0]
        losses[(impl, chunk)] = value.item()
        del prof, value
    full = peaks[("full", 0)]
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()})
    assert full > 12 * 2048 * vocab * 0.9  # what it holds: ~12 B per token and vocabulary entry
    assert peaks[("chunked", 256)] <= full / 8
    assert peaks[("chunked", 2048)] <= full / 2
    assert all(_rel(v, losses[("full", 0)]) < 1e-6 for v in losses.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_matches_chunked_on_cuda():
    if not loss.liger_usable():
        pytest.skip("liger-kernel is not installed")
    torch.manual_seed(0)
    h = torch.randn(4096, 256, device="cuda", requires_grad=True)
    w = (0.05 * torch.randn(32_000, 256, device="cuda")).requires_grad_()
    t = torch.randint(0, 32_000, (4096,), device="cuda")
    t[::7] = -100
    results = []
    for impl in ("chunked", "liger"):
        value = loss.linear_cross_entropy(h, w, None, t, 1024, impl)
        results.append((value.detach(), *torch.autograd.grad(value / 3.0, (h, w))))
    for a, b in zip(*results, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm(), (a, b)


# -- the planner ----------------------------------------------------------------------------------
PLAN_7B = ["model=llama-7b", "hardware=a100-40gb", "backend=fsdp", "precision=bf16",
           "data.seq_len=2048", "train.global_batch_size=2048", "nodes=1",
           "activation_checkpointing.mode=full"]  # fmt: skip


def _candidates(impl: str, micros, *extra: str) -> list:
    from gradcycle.planner import plan

    cfg = compose([*PLAN_7B, f"loss.impl={impl}", *extra])
    shape = plan.shape_from_config(cfg)
    limit = cfg.plan.headroom * plan.budget_bytes(cfg)
    cands = [plan.evaluate(cfg, shape, 8, 1, m, "per_micro", ("full", 2)) for m in micros]
    return [(c, c.est.peak <= limit) for c in cands]


def test_planner_models_one_chunk_and_the_head_gradient():
    from gradcycle.planner.loss import loss_chunk_tokens
    from gradcycle.planner.memory import activations

    (full, _), (chunked, _) = (_candidates(impl, [16])[0] for impl in ("full", "chunked"))
    chunk = loss_chunk_tokens(chunked.setup)  # auto: 16 x 2048 tokens / ceil(32000 / 4096)
    assert (full.setup.loss, chunked.setup.loss, chunk) == ("full", "chunked", 4096)
    v, h, tokens = 32000, 4096, 16 * 2048
    a_full, a_chunk = activations(full.setup), activations(chunked.setup)
    # full: bf16 logits + fp32 copy + fp32 log-softmax; then 3 fp32 buffers at backward start
    assert (a_full["loss_forward"], a_full["loss_backward"]) == (10 * tokens * v, 12 * tokens * v)
    # chunked: one chunk's fp32 logits beside their bf16 matmul output, the head's gradient
    # accumulated in fp32; backward rounds it to the bf16 head (both for a moment)
    assert a_chunk["loss_forward"] == 6 * chunk * v + 4 * v * h
    assert a_chunk["loss_backward"] == (4 + 2) * v * h
    assert a_chunk["loss_backward"] <= a_full["loss_backward"] / 8
    assert full.est.phase == "backward start" and chunked.est.peak < full.est.peak


def test_planner_fits_a_larger_micro_batch():
    """7B with full checkpointing on 8 x A100-40GB: the memory-bound micro-batch grows 16 -> 20
    (32k vocabulary) and 5 -> 18 (a 128k vocabulary). The layers' backward no longer holds the
    gathered head (FSDP's norm + head unit is resharded after its own backward)."""

    def largest(impl: str, *extra: str) -> int:
        return max(c.micro for c, fits in _candidates(impl, range(1, 24), *extra) if fits)

    assert (largest("full"), largest("chunked")) == (16, 20)
    big = "model.vocab_size=128256"
    assert (largest("full", big), largest("chunked", big)) == (5, 18)
