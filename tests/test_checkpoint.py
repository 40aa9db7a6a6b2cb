"""Checkpoints: layout and keep-N, exact resume (after a stop, after kill -9 in the middle of a cycle,
on fewer ranks), export to Hugging Face, and bad checkpoints refused without touching the run dir."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose, read_metrics, train_steps
from multiproc import run_on_ranks
from rank_procs import launch, logs, wait

# Saves step_2, step_4 and step_5 (at the end); keep=2 leaves step_4 and step_5.
STEPS = ["train.max_steps=5", "checkpoint.every=2", "checkpoint.keep=2"]
BACKENDS = ["ddp", "fsdp", "zero3"]
PROBE = torch.arange(48).reshape(2, 24) * 7 % 500  # token ids for comparing logits


def steps_of(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def assert_same_run(resumed: list[dict], reference: list[dict], tol: float = 1e-6) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(resumed, reference):
        assert abs(a["loss"] - b["loss"]) <= tol, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e3 * tol * max(1.0, b["grad_norm"])
        assert a["lr"] == b["lr"] and a["tokens_seen"] == b["tokens_seen"]


def checkpoint_names(run_dir) -> list[str]:
    return sorted(os.listdir(Path(run_dir) / "checkpoints"))


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("packing", ["true", "false"])
def test_stop_and_resume_reproduces_the_run(tmp_path, monkeypatch, packing):
    """SIGTERM after step 3 -> step_3 saved, exit; resume=auto redoes nothing and matches the
    uninterrupted run exactly. The data position is the step: packed and unpacked alike."""
    overrides = [*STEPS, f"data.packing={packing}"]
    reference = train_steps(tmp_path / "ref", overrides)
    assert checkpoint_names(tmp_path / "ref") == ["latest", "step_4", "step_5"]
    assert (tmp_path / "ref/checkpoints/latest").read_text().strip() == "step_5"

    run = tmp_path / "run"
    monkeypatch.setenv("GRADCYCLE_FAULT", "sigterm:3:1")  # delivered mid-cycle, acted on after it
    first = train_steps(run, overrides)
    monkeypatch.delenv("GRADCYCLE_FAULT")
    assert [r["step"] for r in first] == [1, 2, 3]
    assert checkpoint_names(run) == ["latest", "step_2", "step_3"]
    meta = json.loads((run / "checkpoints/step_3/trainer.json").read_text())
    assert meta["step"] == 3 and meta["state"]["tokens_seen"] == first[-1]["tokens_seen"]
    assert sorted(os.listdir(run / "checkpoints/step_3")) == [
        "config.yaml", "hf", "rng", "state", "trainer.json"]  # fmt: skip

    resumed = train_steps(run, [*overrides, "resume=auto"])
    assert_same_run(resumed, reference)
    assert checkpoint_names(run) == ["latest", "step_4", "step_5"]  # keep=2, older ones deleted
    assert not (run / "metrics.superseded.jsonl").exists()  # nothing ran past the checkpoint


def test_bad_checkpoints_are_refused_naming_the_file(tmp_path, capsys):
    """Each damage -> exit 2, one message naming the file or field; the run dir is untouched."""
    from gradcycle.cli import main

    src = tmp_path / "src"
    train_steps(src, ["train.max_steps=2", "checkpoint.every=1"])
    step = "checkpoints/step_2"

    def patch_size(run: Path, rel: str) -> None:  # keep trainer.json's size record consistent
        meta_path = run / step / "trainer.json"
        meta = json.loads(meta_path.read_text())
        meta["files"][rel] = (run / step / rel).stat().st_size
        meta_path.write_text(json.dumps(meta))

    def missing_shard(run):
        (run / step / "state/__0_0.distcp").unlink()

    def truncated_shard(run):
        p = run / step / "state/__0_0.distcp"
        p.write_bytes(p.read_bytes()[:100])

    def garbage_shard(run):  # same size: only reading it shows the damage
        p = run / step / "state/__0_0.distcp"
        data = bytearray(p.read_bytes())
        data[::5] = bytes(len(data[::5]))
        p.write_bytes(bytes(data))

    def garbage_metadata(run):
        p = run / step / "state/.metadata"
        p.write_bytes(b"\x00" * p.stat().st_size)

    def code_in_metadata(run):  # a pickle that would run a command when loaded
        p = run / step / "state/.metadata"
        p.write_bytes(pickle.dumps(_Exploit(str(run.parent / "pwned"))))
        patch_size(run, "state/.metadata")

    def corrupt_trainer_json(run):
        (run / step / "trainer.json").write_text('{"step": 2, "form')

    def dangling_latest(run):
        (run / "checkpoints/latest").write_text("step_7\n")

    cases = [
        (missing_shard, [], ["__0_0.distcp", "is missing"]),
        (truncated_shard, [], ["__0_0.distcp", "truncated"]),
        (garbage_shard, [], ["__0_0.distcp", "is corrupt"]),
        (garbage_metadata, [], [".metadata", "corrupt"]),
        (code_in_metadata, [], [".metadata", "refusing to load", "system"]),
        (corrupt_trainer_json, [], ["step_2/trainer.json", "corrupt"]),
        (dangling_latest, [], ["latest", "step_7"]),
        (None, ["model.hidden_size=32"], ["model.hidden_size=64", "model.hidden_size=32"]),
        (None, ["model.num_layers=3"], ["model.num_layers=2"]),
        (None, ["train.global_batch_size=16"], ["train.global_batch_size=8"]),
        (None, ["resume=none"], ["already holds checkpoints", "resume=auto"]),
    ]
    for i, (damage, overrides, words) in enumerate(cases):
        run = tmp_path / f"case{i}"
        shutil.copytree(src, run)
        if damage:
            damage(run)
        before = _snapshot(run)
        args = [*TINY, f"run_dir={run}", "train.max_steps=4", "checkpoint.every=1"]
        resume = [] if any(o.startswith("resume=") for o in overrides) else ["resume=auto"]
        code = main([*args, *resume, *overrides], str(ROOT / "conf"))
        err = capsys.readouterr().err
        assert code == 2, (damage, overrides, err)
        assert all(w in err for w in words), (words, err)
        assert "Traceback" not in err
        assert _snapshot(run) == before, f"case {i} changed the run dir"
    assert not (tmp_path / "pwned").exists()


def test_resume_on_other_data_is_refused_unless_allowed(tmp_path, capsys):
    """trainer.json records the prepared dataset's fingerprint and the samples consumed; another
    dataset (here: the first 200 documents instead of 300) is refused by name, exit 2, run dir
    untouched; data.allow_changed=true continues on it."""
    from gradcycle.cli import main

    run = tmp_path / "run"
    train_steps(run, ["train.max_steps=2", "checkpoint.every=1"])
    meta = json.loads((run / "checkpoints/step_2/trainer.json").read_text())
    fingerprint = meta["dataset"]["fingerprint"]
    assert meta["dataset"]["samples_consumed"] == 2 * 8 and len(fingerprint) == 16
    before = _snapshot(run)
    other = ["train.max_steps=3", "resume=auto", "data.max_documents=200"]
    code = main([*TINY, f"run_dir={run}", *other], str(ROOT / "conf"))
    err = capsys.readouterr().err
    assert code == 2, err
    for word in ("step_2/trainer.json", fingerprint, "16 samples consumed", "data.allow_changed"):
        assert word in err, (word, err)
    assert _snapshot(run) == before
    resumed = train_steps(run, [*other, "data.allow_changed=true"])  # metrics.jsonl: all steps
    assert [r["step"] for r in resumed] == [1, 2, 3]


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}  # fmt: skip


# ---------------------------------------------------------------- kill -9, 2 ranks, 3 backends


def _probing(build, probe: torch.Tensor, sink: dict):
    """Wrap build_backend: just before the trained backend closes, record its logits of `probe`
    and its full_state_dict() (collective; rank 0 gets it)."""

    def wrapped(*args, **kwargs):
        backend = build(*args, **kwargs)
        close = backend.close

        def close_after_probe(**kwargs):  # the trainer passes failing=...
            with torch.no_grad():
                # numpy: a tensor would travel by shared memory, gone once this rank exits
                sink["probe"] = backend.model(input_ids=probe).logits.float().numpy()
            full = backend.full_state_dict()
            if full is not None:
                sink["full"] = {k: v.float().numpy() for k, v in full.items()}
            close(**kwargs)

        backend.close = close_after_probe
        return backend

    return wrapped


def _train_jobs(rank: int, world: int, jobs: list, probe: torch.Tensor) -> list:
    """Train each (run_dir, overrides) job; rank 0 returns (step records, logits of `probe` from
    the trained model, its full state dict)."""
    from gradcycle import trainer

    out = []
    build = trainer.build_backend
    for run_dir, overrides in jobs:
        logits: dict = {}
        trainer.build_backend = _probing(build, probe, logits)
        try:
            trainer.run(compose([*TINY, f"run_dir={run_dir}", *overrides]))
        finally:
            trainer.build_backend = build
        out.append((steps_of(run_dir), logits) if rank == 0 else None)
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Per backend, on 2 ranks: an uninterrupted run, and a run SIGKILLed at the start of
    micro-batch 1 of step 4 (checkpoint step_2 on disk, records 1-3 written), then resumed with
    resume=auto. ddp: only rank 1 is killed, rank 0 must fail by itself (no launcher agent kills
    it). All resumes and references share one spawn."""
    base = tmp_path_factory.mktemp("killed")
    runs, procs = {}, {}
    for b in BACKENDS:  # the three launches overlap: start-up (imports) dominates their time
        fault = "kill:4:1@1" if b == "ddp" else "kill:4:1"
        args = [*TINY, *STEPS, f"backend={b}", f"run_dir={base / b}", "backend.dist_timeout_s=30"]
        procs[b] = launch(2, args, base / f"log-{b}", env={"GRADCYCLE_FAULT": fault})
    for b in BACKENDS:
        runs[b] = {"exit": wait(procs[b], timeout=400), "log": logs(base / f"log-{b}")}
        runs[b]["before"] = steps_of(base / b)
        runs[b]["names"] = checkpoint_names(base / b)
    jobs = [(str(base / f"ref-{b}"), [*STEPS, f"backend={b}"]) for b in BACKENDS]
    jobs += [(str(base / b), [*STEPS, f"backend={b}", "resume=auto"]) for b in BACKENDS]
    results = run_on_ranks(_train_jobs, 2, args=(jobs, PROBE))[0]
    for i, b in enumerate(BACKENDS):
        runs[b]["ref"], probed = results[i]
        runs[b]["ref_logits"], runs[b]["ref_full"] = probed["probe"], probed["full"]
        runs[b]["resumed"] = results[len(BACKENDS) + i][0]
    return base, runs


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_mid_cycle_then_resume_matches_uninterrupted(killed, backend):
    base, runs = killed
    r = runs[backend]
    assert r["exit"][1][0] == -9, r["log"]
    assert r["exit"][0][0] not in (0, None), r["log"]  # -9, or failed because its peer died
    assert r["names"] == ["latest", "step_2"]  # step 4 died mid-cycle, before its checkpoint
    assert [s["step"] for s in r["before"]] == [1, 2, 3]
    assert_same_run(r["resumed"], r["ref"])  # steps 1-2 kept, 3 superseded and redone, 4-5 new
    superseded = [json.loads(line) for line in open(base / backend / "metrics.superseded.jsonl")]
    assert [s["step"] for s in superseded] == [3]
    assert superseded[0]["loss"] == pytest.approx(r["ref"][2]["loss"], abs=1e-6)


@pytest.mark.slow
def test_killed_rank_makes_the_survivor_exit_nonzero(killed):
    """Rank 1 SIGKILLed mid-cycle: rank 0 exits non-zero on its own, well within
    backend.dist_timeout_s=30 (the dead peer's closed connection fails its next collective)."""
    r = killed[1]["ddp"]
    (code0, after0), (code1, _) = r["exit"]
    assert code1 == -9 and code0 not in (0, None, -9), r["log"]
    assert after0 < 30, r["log"]
    assert "Traceback" in r["log"]  # a clear failure on rank 0, not a silent exit


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed_on", [("fsdp", "fsdp"), ("fsdp", "ddp"), ("ddp", "hsdp")])
def test_resume_on_one_rank_keeps_the_global_batch(killed, tmp_path, saved, resumed_on):
    """A 2-rank DCP checkpoint (FSDP: really sharded) resumes on 1 rank, on the same or another DCP
    backend: accumulation doubles, the global batch and the next loss stay the 2-rank run's."""
    base, runs = killed
    ref = runs[saved]["ref"]
    resumed = train_steps(tmp_path, [*STEPS, f"backend={resumed_on}",
                                     f"resume={base}/ref-{saved}/checkpoints/step_4"])  # fmt: skip
    assert [r["step"] for r in resumed] == [5]
    assert resumed[0]["world_size"] == 1 and ref[-1]["world_size"] == 2
    assert resumed[0]["accumulation_steps"] == 2 * ref[-1]["accumulation_steps"]
    assert resumed[0]["samples"] == ref[-1]["samples"]
    assert resumed[0]["tokens_seen"] == ref[-1]["tokens_seen"]
    assert resumed[0]["loss"] == pytest.approx(ref[-1]["loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_gives_the_trained_models_logits(killed, tmp_path, backend):
    """DCP shards or ZeRO-3 partitions of 2 ranks -> one save_pretrained dir, in this process."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradcycle.export import main

    base, runs = killed
    out = tmp_path / "hf"
    assert main([str(base / f"ref-{backend}"), str(out)]) == 0  # run dir -> checkpoint `latest`
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    expected = torch.from_numpy(runs[backend]["ref_logits"])
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-5
    # the live model's full_state_dict() is exactly what was exported
    exported = load_file(out / "model.safetensors")
    full = runs[backend]["ref_full"]
    assert set(exported) <= set(full) and "model.embed_tokens.weight" in exported
    assert all(torch.equal(exported[k], torch.from_numpy(full[k])) for k in exported)
    assert AutoTokenizer.from_pretrained(out)("def f():")["input_ids"]
    assert main([str(base / f"ref-{backend}"), str(out)]) == 2  # never overwrites


def test_old_checkpoints_are_deleted_after_the_barrier_in_the_background(tmp_path, monkeypatch):
    """keep=1: the previous checkpoint is renamed away at once, but its (at scale, hundreds of
    GB) deletion runs on a thread after the save's last barrier, so no rank waits for it."""
    import threading

    from torch import nn

    from gradcycle import checkpoint
    from gradcycle.batching import plan_from_config
    from gradcycle.trainer import State

    class Backend:  # what Checkpointer.save needs of a backend
        module = nn.Linear(2, 2)

        def save_state(self, path):
            path.mkdir(parents=True)
            (path / "shard").write_text("x")

    events, release = [], threading.Event()

    def slow_delete(paths):
        events.append(("delete", threading.current_thread().name))
        release.wait(30)
        events.append(("deleted", [p.name for p in paths]))

    # the save's last agreement between ranks (a barrier that also carries failures)
    monkeypatch.setattr(checkpoint.diskspace, "failed_ranks",
                        lambda error, device: events.append(("barrier",)) or [])  # fmt: skip
    monkeypatch.setattr(checkpoint, "_delete_all", slow_delete)
    cfg = compose([*TINY, "checkpoint.keep=1"])
    ckpt = checkpoint.Checkpointer(cfg, tmp_path, Backend(), plan_from_config(cfg, 1))
    ckpt.save(State(step=1))
    ckpt.save(State(step=2))  # returns while step_1's deletion is still blocked
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".del-step_1", "latest", "step_2"]
    assert events[-2:] == [("barrier",), ("delete", "gradcycle-prune")]
    release.set()
    ckpt.wait_for_pruning()
    assert events[-1] == ("deleted", [".del-step_1"])
