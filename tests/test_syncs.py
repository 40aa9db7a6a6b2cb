"""One device -> host sync per optimizer step, over whole trainer steps of K micro-batches.

docs/performance.md promises one: backend.step() fetches the grad norm and the step statistics
together. transformers 5.24 adds one per micro-batch with its own "sdpa" attention: without a 4-D
mask, create_causal_mask looks for packed sequences in the position ids and reads `.all()` on
the host (masking_utils.py:761). gradcycle's attention (gradcycle/attention.py) skips that. The
reads are counted on CPU by tests/syncs.py; one spawn of 2 gloo ranks runs every configuration.
"""

from __future__ import annotations

import pytest
from conftest import TINY, compose
from multiproc import run_on_ranks

K = 3  # global 12 = micro 2 x K 3 x 2 ranks
STEPS = ["train.max_steps=4", "train.global_batch_size=12", "train.micro_batch_size=2",
         "optim=adamw", "train.grad_clip=1.0"]  # fmt: skip
JOBS = {
    "ddp": ["backend=ddp"],
    "fsdp": ["backend=fsdp"],
    "ddp docmask": ["backend=ddp", "data.document_mask=true"],
    "ddp transformers sdpa": ["backend=ddp"],  # before the fix: transformers' own attention
}


def count_syncs(rank: int, world: int, tmp: str) -> dict:
    """Each job's host reads between consecutive metrics records (one record per step)."""
    from syncs import SyncCounter

    from gradcycle import attention, telemetry
    from gradcycle.data.reader import open_dataset
    from gradcycle.trainer import run

    write, choose = telemetry.MetricsSink.write, attention.implementation
    out = {}
    for name, overrides in JOBS.items():
        cfg = compose([*TINY, *STEPS, *overrides, f"run_dir={tmp}/{name.replace(' ', '-')}"])
        open_dataset(cfg, progress=False)  # prepared before counting (rank 0 writes, others wait)
        counter, marks = SyncCounter(), []

        def marked(sink, record, counter=counter, marks=marks):
            marks.append(counter.count)
            return write(sink, record)

        telemetry.MetricsSink.write = marked
        if "transformers" in name:
            attention.implementation = lambda *a: "sdpa"
        try:
            with counter.installed():
                run(cfg)
        finally:
            telemetry.MetricsSink.write, attention.implementation = write, choose
        steps = [b - a for a, b in zip(marks, marks[1:])]  # steps 2.. (step 1 includes start-up)
        out[name] = (steps, dict(counter.where))
    return out


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    return run_on_ranks(count_syncs, 2, args=(str(tmp_path_factory.mktemp("syncs")),))


@pytest.mark.parametrize("job", ["ddp", "fsdp", "ddp docmask"])
def test_one_host_sync_per_optimizer_step(counts, job):
    for rank, result in enumerate(counts):
        steps, where = result[job]
        assert len(steps) == 3 and all(n == 1 for n in steps), (rank, steps, where)


def test_transformers_sdpa_syncs_once_per_micro_batch(counts):
    """The counter sees what the fix removes: K reads in transformers' mask code per step."""
    steps, where = counts[0]["ddp transformers sdpa"]
    assert all(n == 1 + K for n in steps), (steps, where)
    assert any("masking_utils.py" in at for at in where), where
