"""task=image: data order, bad input, BatchNorm (guard, momentum, SyncBatchNorm), exactness on every
backend, checkpoint/resume, export, pretrained, activation checkpointing, bf16, the planner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, JobResults, compose, rank_train, read_metrics, train_steps
from multiproc import run_on_ranks

from gradcycle.cli import main

# A LayerNorm ConvNeXt on 16x16 shapes, SGD (Adam would hide scaling errors), no workers.
IMG = ["task=image", "data=shapes", "model=convnext-cpu", "data.image.size=16",
       "data.image.train_samples=256", "data.image.val_samples=64", "data.num_workers=0",
       "optim=sgd", "optim.lr=0.05", "train.max_steps=3", "train.global_batch_size=16"]  # fmt: skip
CONF = str(ROOT / "conf")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _same(runs: list[list[dict]], tol: float = 1e-5) -> None:
    ref = runs[0]
    for other in runs[1:]:
        assert len(other) == len(ref)
        for a, b in zip(other, ref):
            assert _rel(a["loss"], b["loss"]) < tol, (a["loss"], b["loss"])
            assert _rel(a["grad_norm"], b["grad_norm"]) < tol, (a["grad_norm"], b["grad_norm"])


# -- data ------------------------------------------------------------------------------------
def test_global_batch_is_world_independent_and_augmentation_seeded():
    from gradcycle.data.loader import GlobalOrder
    from gradcycle.vision.data import open_images
    from gradcycle.vision.loader import ImageMicroBatches

    cfg = compose([*IMG])
    data = open_images(cfg)

    def global_batch(world: int, micro: int, step: int) -> np.ndarray:
        parts = []
        for rank in range(world):
            mb = ImageMicroBatches(data.train, GlobalOrder(len(data.train), 7), 16, rank, world,
                                   micro, cfg.data.image, data.tokenizer, seed=7)  # fmt: skip
            parts += [h.pixels for h in mb.cycle(step)]
        return np.concatenate(parts)

    one = global_batch(1, 16, 3)
    assert one.shape == (16, 3, 16, 16) and one.dtype == np.float32
    np.testing.assert_array_equal(one, global_batch(2, 2, 3))  # 2 ranks x K 4: the same images
    np.testing.assert_array_equal(one, global_batch(4, 4, 3))
    assert not np.array_equal(one, global_batch(1, 16, 4))
    # per-channel normalisation: the processor's mean/std (0.5 without a pretrained processor)
    assert one.min() >= -1.01 and one.max() <= 1.01 and list(data.tokenizer.image_mean) == [0.5] * 3


def _write_folder(root, classes=("a", "b"), n=3, mode="RGB", size=12):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, (size, size), color=(i * 40) if mode == "L" else (i * 40, 0, 0)).save(
                root / c / f"{i}.png"
            )
    return root


def test_imagefolder_trains_and_bad_folders_exit_2(tmp_path, capsys):
    good = _write_folder(tmp_path / "good", n=6)
    recs = train_steps(tmp_path / "run", [*IMG, "data=imagefolder", f"data.path={good}",
                                          "train.max_steps=1", "train.global_batch_size=4"])  # fmt: skip
    assert len(recs) == 1 and np.isfinite(recs[0]["loss"])

    empty = _write_folder(tmp_path / "empty", n=2)
    for f in (empty / "b").iterdir():
        f.unlink()
    trunc = _write_folder(tmp_path / "trunc")
    png = trunc / "a" / "1.png"
    png.write_bytes(png.read_bytes()[:40])
    mixed = _write_folder(tmp_path / "mixed")
    _write_folder(mixed, classes=("b",), n=1, mode="L", size=12)  # b/0.png becomes grayscale
    rgba = _write_folder(tmp_path / "rgba", mode="RGBA")
    cases = [
        ([f"data.path={tmp_path / 'nothing'}"], ["no such folder"]),
        ([f"data.path={empty}"], [str(empty / "b"), "no images"]),
        ([f"data.path={trunc}"], [str(png), "truncated"]),
        ([f"data.path={mixed}"], [str(mixed / "b" / "0.png"), "mode L", "convert_rgb=true"]),
        ([f"data.path={rgba}"], ["mode RGBA", "convert_rgb"]),
        ([f"data.path={good}", "+model.image.num_labels=3"], ["3 labels", "2 classes"]),
    ]
    for overrides, words in cases:
        run = tmp_path / "untouched"
        code = main([*IMG, "data=imagefolder", *overrides, f"run_dir={run}"], CONF)
        err = capsys.readouterr().err
        assert code == 2, (overrides, err)
        for w in words:
            assert w in err, (w, err)
        assert not run.exists()
    # the documented way out of a mode mix: convert on read
    recs = train_steps(tmp_path / "run2", [*IMG, "data=imagefolder", f"data.path={rgba}",
                                           "data.image.convert_rgb=true", "train.max_steps=1",
                                           "train.global_batch_size=2"])  # fmt: skip
    assert np.isfinite(recs[0]["loss"])


def test_config_mistakes_name_the_field(capsys):
    cases = [
        (["task=image", "data=stdlib"], ["data=stdlib", "data=shapes"]),
        (["data=shapes"], ["task=image"]),
        (["task=image", "data=shapes", "model=tiny"], ["model.image.model_type"]),
        ([*IMG, "model=vit-cpu", "+model.image.image_size=32"], ["data.image.size=32"]),
        ([*IMG, "model=resnet-cpu", "train.micro_batch_size=4"],
         ["BatchNorm", "4 samples", "train.micro_batch_size to >= 8", "model.sync_batchnorm=true",
          "model.batchnorm_guard=false"]),
        ([*IMG, "model.bn_momentum=sometimes"], ["model.bn_momentum"]),
    ]  # fmt: skip
    for overrides, words in cases:
        assert main([*overrides, "run_dir=/nonexistent/never"], CONF) == 2, overrides
        err = capsys.readouterr().err
        for w in words:
            assert w in err, (w, err)


# -- BatchNorm -------------------------------------------------------------------------------
def test_bn_momentum_per_cycle_matches_one_update_per_step():
    from gradcycle.vision.batchnorm import per_cycle_momentum, prepare

    cfg = compose([*IMG, "model=resnet-cpu", "model.bn_momentum=per_cycle"])
    k, m = 4, 0.1
    assert per_cycle_momentum(m, k) == pytest.approx(1 - 0.9**0.25)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=m))
    net[0].running_mean.fill_(5.0)
    prepare(net, cfg.model, k, 1, "cpu")
    x = torch.randn(8, 3, 4, 4) + 2.0
    for _ in range(k):  # K micro-batch updates with the same statistics...
        net(x)
    mean = x.mean((0, 2, 3))
    # ...decay the old value like one update with the configured momentum: (1-m) r0 + m mean
    torch.testing.assert_close(net[0].running_mean, (1 - m) * 5.0 + m * mean, rtol=1e-6, atol=1e-6)


def _syncbn_on_rank(rank: int, world: int) -> dict:
    """GlooSyncBatchNorm on 2 ranks == BatchNorm over the union of both ranks' samples."""
    import torch.distributed as dist

    from gradcycle.vision.batchnorm import convert_gloo

    torch.manual_seed(0)
    x = torch.randn(2 * world, 3, 5, 5) * 3 + 1
    w = torch.randn(3)
    ref = torch.nn.BatchNorm2d(3)
    ref.weight.data.copy_(w)
    ref(x.requires_grad_()).mul(torch.arange(x.numel()).view_as(x).sin()).sum().backward()
    mine = convert_gloo(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    mine[0].weight.data.copy_(w)
    part = x.detach()[2 * rank : 2 * rank + 2].clone().requires_grad_()
    coef = torch.arange(x.numel()).view_as(x).sin()[2 * rank : 2 * rank + 2]
    mine(part).mul(coef).sum().backward()
    wgrad = mine[0].weight.grad.clone()
    dist.all_reduce(wgrad)
    return {"mean": (mine[0].running_mean - ref.running_mean).abs().max().item(),
            "var": (mine[0].running_var - ref.running_var).abs().max().item(),
            "xgrad": (part.grad - x.grad[2 * rank : 2 * rank + 2]).abs().max().item(),
            "wgrad": (wgrad - ref.weight.grad).abs().max().item()}  # fmt: skip


# -- 2 ranks: every backend == one process, SyncBatchNorm, pretrained slices --------------------
BACKENDS = ("ddp", "fsdp", "zero2", "zero3")
SYNC_BACKENDS = ("ddp", "fsdp", "zero3")


def _on_rank(rank: int, world: int, jobs, root: str):
    import torch.distributed as dist

    dist.init_process_group("gloo")  # first: the trainer then reuses this group for every job
    syncbn = _syncbn_on_rank(rank, world)
    return {"syncbn": syncbn, "records": rank_train(rank, world, jobs)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision2")
    pre = _pretrained_dir(root / "pretrained")
    jobs = [(str(root / b), [*IMG, f"backend={b}", "train.micro_batch_size=2"]) for b in BACKENDS]
    jobs.append((str(root / "fsdp_pre"), [*IMG, "backend=fsdp", "train.micro_batch_size=2",
                                          "model=vit-cpu", f"model.pretrained={pre}"]))  # fmt: skip
    sync = [*IMG, "model=resnet-cpu", "model.sync_batchnorm=true", "train.micro_batch_size=4",
            "train.max_steps=2"]  # fmt: skip
    jobs += [(str(root / f"syncbn_{b}"), [*sync, f"backend={b}"]) for b in SYNC_BACKENDS]
    ranks = run_on_ranks(_on_rank, 2, (jobs, str(root)))
    names = [*BACKENDS, "fsdp_pre", *(f"syncbn_{b}" for b in SYNC_BACKENDS)]
    return JobResults(zip(names, ranks[0]["records"])), [r["syncbn"] for r in ranks]


def _pretrained_dir(path):
    """A save_pretrained folder of vit-cpu holding exactly the seeded init (seed 1234)."""
    from gradcycle.vision.model import build_model

    cfg = compose([*IMG, "model=vit-cpu"])
    model = build_model(cfg.model, 8, "cpu", seed=cfg.seed, image_size=16)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision1")
    return {
        "k1": train_steps(root / "k1", [*IMG, "train.micro_batch_size=16"]),
        "k8": train_steps(root / "k8", [*IMG, "train.micro_batch_size=2"]),
        "vit": train_steps(root / "vit", [*IMG, "model=vit-cpu", "train.micro_batch_size=16"]),
    }


def test_k_micro_batches_equal_one_big_batch(reference):
    assert [r["accumulation_steps"] for r in reference["k8"]] == [8, 8, 8]
    _same([reference["k1"], reference["k8"]])
    assert reference["k1"][0]["target_tokens"] == 16  # the normaliser counts images


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_equal_one_process(two_ranks, reference, backend):
    recs = two_ranks[0][backend]
    assert [r["accumulation_steps"] for r in recs] == [4, 4, 4] and recs[0]["world_size"] == 2
    _same([reference["k1"], recs])


def test_pretrained_folder_on_fsdp_and_syncbn_on_every_backend(two_ranks, reference):
    runs, syncbn = two_ranks
    # the saved folder holds the seeded init: loading its slices trains exactly like the init
    _same([reference["vit"], runs["fsdp_pre"]])
    # SyncBatchNorm (GlooSyncBatchNorm on CPU) trains on every backend, identically
    assert all(np.isfinite(r["loss"]) for r in runs["syncbn_ddp"])
    _same([runs[f"syncbn_{b}"] for b in SYNC_BACKENDS])
    for rank in syncbn:
        assert max(rank.values()) < 1e-5, rank


# -- everything else ---------------------------------------------------------------------------
def test_resume_export_eval_accuracy_ac_bf16(tmp_path, reference):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from gradcycle.export import export
    from gradcycle.vision.data import open_images
    from gradcycle.vision.loader import eval_batches

    base = [*IMG, "model=vit-cpu", "train.micro_batch_size=16", "train.max_steps=4"]
    straight = train_steps(tmp_path / "a", [*base, "train.eval_every=4", "train.eval_batches=2"])
    train_steps(tmp_path / "b", [*base, "train.max_steps=2", "checkpoint.every=2"])
    resumed = train_steps(tmp_path / "b", [*base, "resume=auto"])
    _same([straight[2:], resumed[-2:]])

    ev = [r for r in read_metrics(tmp_path / "a") if "eval_accuracy" in r][-1]
    assert 0.0 <= ev["eval_accuracy"] <= 1.0 and ev["eval_samples"] == 32
    out = export(tmp_path / "a", tmp_path / "export")
    model = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    processor = AutoImageProcessor.from_pretrained(str(out))
    assert processor.size == {"height": 16, "width": 16}
    cfg = compose([*base, "train.eval_batches=2"])
    data = open_images(cfg)
    loss, n = 0.0, 0
    with torch.no_grad():
        for host in eval_batches(data, cfg.data.image, 16, 2, 0, 1):
            logits = model(pixel_values=torch.as_tensor(host.pixels)).logits
            loss += torch.nn.functional.cross_entropy(logits, torch.as_tensor(host.labels),
                                                      reduction="sum").item()  # fmt: skip
            n += len(host.labels)
    assert _rel(loss / n, ev["eval_loss"]) < 1e-5  # the export computes what training evaluated

    ac = train_steps(tmp_path / "ac", [*IMG, "model=vit-cpu", "train.micro_batch_size=16",
                                       "activation_checkpointing.mode=full"])  # fmt: skip
    _same([reference["vit"], ac])
    bf16 = train_steps(tmp_path / "bf16", [*IMG, "model=vit-cpu", "train.micro_batch_size=16",
                                           "precision=bf16"])  # fmt: skip
    for a, b in zip(bf16, reference["vit"]):
        assert _rel(a["loss"], b["loss"]) < 2e-2


def test_planner_activations_grow_with_resolution_and_auto_fits():
    from gradcycle.vision import plan

    cfg = compose(
        [
            *IMG,
            "model=resnet-cpu",
            "hardware=a100-40gb",
            "train.global_batch_size=64",
            "data.image.size=32",
        ]
    )
    small, large = (plan.activation_bytes(cfg, s)["per_image"] for s in (32, 64))
    assert 3.5 < large / small < 4.5  # a CNN's activations scale with the pixel count
    cfg.hardware.memory_gb = (
        2.0
        + (
            plan.model_state_bytes(cfg, plan._meta_model(cfg), 1)
            + 8.5 * plan.activation_bytes(cfg)["per_image"]
        )
        / 2**30
        / 0.9
    )
    cfg.hardware.reserved_gb = 2.0
    cfg.train.micro_batch_size = "auto"
    auto = plan.resolve_auto(cfg, 1)
    assert auto.train.micro_batch_size == 8  # the largest divisor of 64 below 8.5 images
    cfg.data.image.size = 64  # 4x the pixels: a quarter of the images fit, and BatchNorm stops it
    with pytest.raises(ValueError, match="BatchNorm"):
        plan.resolve_auto(cfg, 1)
    vit = compose([*IMG, "model=vit-cpu", "activation_checkpointing.mode=full"])
    act = plan.activation_bytes(vit)
    assert len(act["blocks"]) == 4 and plan._activation_peak(act, 1, "full", 1) < act["per_image"]
