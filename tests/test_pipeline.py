"""backend.pp: a pipelined cycle is the same big batch as one process (ragged data, 3 steps),
for each schedule and pp x dp; checkpoints resume across pp sizes; the planner's arithmetic;
validation refuses what pp does not support, before any process group."""

from __future__ import annotations

import pytest
from conftest import RAGGED, TINY, compose, rank_train, train_steps
from multiproc import run_on_ranks

from gradcycle.backends.pipeline import stage_layers
from gradcycle.backends.pipeline_checks import check_plan
from gradcycle.planner import pipeline as plan_pp
from gradcycle.validation import validate

# K = 8 / (2 x dp) micro-batches: 4 on pp=2 (dp=1); ragged documents padded per micro-batch
BASE = [*RAGGED, "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=3",
        "model.num_layers=4", "optim.warmup_steps=1"]  # fmt: skip
SCHEDULES = {
    "gpipe": ["backend.pp_schedule=gpipe"],
    "1f1b": ["backend.pp_schedule=1f1b"],
    "interleaved_1f1b": ["backend.pp_schedule=interleaved_1f1b", "backend.pp_virtual=2"],
    "looped_bfs": ["backend.pp_schedule=looped_bfs", "backend.pp_virtual=2"],
    # zero bubble: the weight gradients in a second backward pass (loss.impl=full: compared with
    # a loss.impl=full run); with checkpointed layers, recomputed for both passes
    "interleaved_zb": [
        "backend.pp_schedule=interleaved_zb",
        "backend.pp_virtual=2",
        "loss.impl=full",
        "activation_checkpointing.mode=full",
    ],
    # V placement: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2 (a local boundary)
    "dualpipev": ["backend.pp_schedule=dualpipev", "backend.pp_virtual=2", "loss.impl=full"],
}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_pipelined_steps_equal_one_process_for_every_schedule(tmp_path):
    reference = train_steps(tmp_path / "ref", [*BASE, "checkpoint.every=2"])
    names = list(SCHEDULES)
    jobs = [(str(tmp_path / n), [*BASE, "backend.pp=2", *SCHEDULES[n], "checkpoint.every=2"])
            for n in names]  # fmt: skip
    # pp=1 -> pp=2: the one-process checkpoint of step 2 resumes on the pipeline (same names)
    jobs.append((str(tmp_path / "from-pp1"), [*BASE, "backend.pp=2",
                                               f"resume={tmp_path}/ref/checkpoints/step_2"]))  # fmt: skip
    out = run_on_ranks(rank_train, 2, args=(jobs,))[0]
    results = dict(zip(names, out, strict=False))
    from_pp1 = out[-1]
    _p2p_counted_as_planned(results)
    _bubble_measured(results)
    # pp=2 -> pp=1: the pipeline's checkpoint of step 2 resumes in one process
    from_pp2 = train_steps(
        tmp_path / "from-pp2", [*BASE, f"resume={tmp_path}/1f1b/checkpoints/step_2"]
    )
    _export_loads_with_equal_logits(tmp_path / "1f1b/checkpoints/step_3",
                                    tmp_path / "ref/checkpoints/step_3")  # fmt: skip
    for resumed in (from_pp1, from_pp2):
        assert isinstance(resumed, list), resumed.text
        assert [r["step"] for r in resumed] == [3]
        assert _rel(resumed[0]["loss"], reference[2]["loss"]) < 1e-5, (resumed, reference[2])
        assert _rel(resumed[0]["grad_norm"], reference[2]["grad_norm"]) < 1e-5
    # pp=2 x dp=2: K = 2 per replica; ddp: the replicas' stage gradients summed once per cycle,
    # fsdp: each stage sharded over its replicas, reduce-scattered once per step (the stage's)
    four = {"1f1b pp2 x dp2": [], "1f1b pp2 x fsdp2": ["backend=fsdp"],
            "fsdp K=4": ["backend=fsdp", "train.global_batch_size=16"],
            "gpipe pp2 x hsdp2x1": ["backend=hsdp", "backend.replicate=2",
                                    "backend.pp_schedule=gpipe"]}  # fmt: skip
    jobs = [(str(tmp_path / f"four{i}"), [*BASE, "backend.pp=2", *o])
            for i, o in enumerate(four.values())]  # fmt: skip
    out = run_on_ranks(rank_train, 4, args=(jobs,))[0]
    results.update((n, o) for n, o in zip(four, out, strict=True) if n != "fsdp K=4")
    names += [n for n in four if n != "fsdp K=4"]
    # reduce-scatters per step do not grow with K (3 units per rank: a layer pair's 2 + the root)
    scatters = [[r["comm"]["reduce_scatter"]["calls"] for r in o] for o in (out[1], out[2])]
    assert scatters == [[3, 3, 3], [3, 3, 3]], scatters
    full = train_steps(tmp_path / "ref-full", [*BASE, "loss.impl=full"])
    for name in names:
        steps = results[name]
        want_steps = full if "loss.impl=full" in SCHEDULES.get(name, ()) else reference
        assert not isinstance(steps, list) or len(steps) == 3, steps
        assert isinstance(steps, list), steps.text
        for got, want in zip(steps, want_steps, strict=True):
            # the cycle's normaliser: the targets of the one data-parallel slice, not pp x them
            assert got["target_tokens"] == want["target_tokens"]
            assert got["tokens"] == want["tokens"]
            assert got["accumulation_steps"] == (2 if "2 x " in name else 4)
            assert _rel(got["loss"], want["loss"]) < 1e-5, (name, got["loss"], want["loss"])
            assert _rel(got["grad_norm"], want["grad_norm"]) < 1e-5, (name, got, want)


def test_tied_embeddings_across_stages(tmp_path):
    """Tied: stage 0's embedding and the last stage's head are one weight on two ranks; its two
    gradients are summed once per cycle and counted once in the norm. Equal to one process for
    1f1b, interleaved_1f1b and pp2 x fsdp2; under zbv (V placement) rank 0 holds both stages and
    one shared parameter. A tied pp=2 checkpoint resumes in one process and exports to the
    one-process model's logits."""
    tie = [*BASE, "model.tie_embeddings=true"]
    reference = train_steps(tmp_path / "ref", [*tie, "checkpoint.every=2"])
    two = {
        "tied 1f1b": ["checkpoint.every=2"],
        "tied interleaved_1f1b": SCHEDULES["interleaved_1f1b"],
        "tied zbv": ["backend.pp_schedule=zbv", "backend.pp_virtual=2", "loss.impl=full"],
    }
    jobs = [
        (str(tmp_path / f"two{i}"), [*tie, "backend.pp=2", *o]) for i, o in enumerate(two.values())
    ]
    results = dict(zip(two, run_on_ranks(rank_train, 2, args=(jobs,))[0], strict=True))
    jobs = [(str(tmp_path / "four"), [*tie, "backend.pp=2", "backend=fsdp"])]
    results["tied 1f1b pp2 x fsdp2"] = run_on_ranks(rank_train, 4, args=(jobs,))[0][0]
    resumed = train_steps(
        tmp_path / "resumed", [*tie, f"resume={tmp_path}/two0/checkpoints/step_2"]
    )
    results["tied pp2 -> pp1 resume"] = resumed
    full = train_steps(tmp_path / "ref-full", [*tie, "loss.impl=full"])
    for name, steps in results.items():
        assert isinstance(steps, list), (name, steps.text)
        for got in steps:
            want = (full if "zbv" in name else reference)[got["step"] - 1]
            assert _rel(got["loss"], want["loss"]) < 1e-5, (name, got["loss"], want["loss"])
            assert _rel(got["grad_norm"], want["grad_norm"]) < 1e-5, (name, got, want)
    assert [r["step"] for r in resumed] == [3]
    _export_loads_with_equal_logits(tmp_path / "two0/checkpoints/step_3",
                                    tmp_path / "ref/checkpoints/step_3")  # fmt: skip


def _bubble_measured(results) -> None:
    """Rank 0 times every compute chunk the schedule runs on it: K forwards and K backwards per
    stage it holds, and under zero bubble K deferred weight passes more; the rest of the step is
    the measured bubble (bench/pipeline.py sets it beside the formula)."""
    # dualpipev (torch's order for p=2, K=4): 8 forwards, 5 full backwards, 3 input + 3 weight
    chunks = {"gpipe": 8, "1f1b": 8, "interleaved_1f1b": 16, "looped_bfs": 16,
              "interleaved_zb": 24, "dualpipev": 19}  # fmt: skip
    for name, want in chunks.items():
        steps = results[name]
        assert isinstance(steps, list), steps.text
        assert [r["pp_chunks"] for r in steps] == [want] * 3, (name, steps)
        for r in steps:
            assert 0 < r["pp_compute_s"] < r["step_time_s"], (name, r)
            assert 0 <= r["pp_bubble_measured"] < 1, (name, r)


def _p2p_counted_as_planned(results) -> None:
    """Rank 0 (stage 0 of pp=2, K=4) sends each micro-batch's activations and receives their
    gradient: 2K calls of micro x seq x hidden fp32, 2K(p·v - 1) with v=2 (it is on all three
    boundaries), 2K·2 under the V placement (stages 0 and 3: the 1 -> 2 boundary is rank 1's,
    local); the planner's p2p bytes per step are the same. Step 1 adds the stages' shape
    probe (send_object_list: size and pickled metadata), so steps 2 and 3 are compared."""
    from gradcycle.planner.plan import make_plan

    cfg = compose([*TINY, *BASE, "backend.pp=2", "hardware=cpu"])
    per_call = 2 * 128 * cfg.model.hidden_size * 4
    planned = make_plan(cfg, world=2, nodes=1, searches=False).configured
    for name, boundaries in (("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 3), ("dualpipev", 2)):
        steps = results[name]
        assert isinstance(steps, list), steps.text
        p2p = [r["comm"]["point_to_point"] for r in steps]
        assert p2p[1:] == [{"calls": 8 * boundaries, "bytes": 8 * boundaries * per_call}] * 2, p2p
        assert p2p[0]["calls"] > p2p[1]["calls"]  # the shape probe
        v = 1 if boundaries == 1 else 2
        assert [r["pp_bubble"] for r in steps] == [plan_pp.bubble_fraction(2, 4, v)] * 3
    assert plan_pp.p2p_bytes_per_step(planned.setup) == 8 * per_call  # = rank 0's at p = 2
    v_cfg = compose([*TINY, *BASE, *SCHEDULES["dualpipev"], "backend.pp=2", "hardware=cpu"])
    v_plan = make_plan(v_cfg, world=2, nodes=1, searches=False).configured
    assert plan_pp.p2p_bytes_per_step(v_plan.setup) == 16 * per_call


def _export_loads_with_equal_logits(pipelined, single) -> None:
    """HF export of a pp=2 checkpoint: from_pretrained loads it; logits equal pp=1's export."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradcycle.export import export

    a, b = (AutoModelForCausalLM.from_pretrained(str(export(d, d.parent / f"hf-{d.parent.parent.name}")))
            for d in (pipelined, single))  # fmt: skip
    x = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    assert float((la - lb).abs().max() / lb.abs().max()) < 1e-5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend.pp=2", "backend=zero2"], "PipelineModule"),
        (["backend.pp=2", "backend.pp_schedule=zbv", "loss.impl=full"], "exactly two stages"),
        (
            ["backend.pp=2", "backend.pp_schedule=zbv", "backend.pp_virtual=2"],
            "use loss.impl=full",
        ),
        (
            [
                "backend.pp=2",
                "backend.pp_schedule=dualpipev",
                "backend.pp_virtual=2",
                "loss.impl=full",
                "model.tie_embeddings=true",
                "backend=fsdp",
            ],
            "FSDP2 cannot shard",
        ),
        (
            ["backend.pp=2", "backend.pp_schedule=interleaved_zb", "backend.pp_virtual=2"],
            "use loss.impl=full",
        ),
        (["backend.pp=2", "backend.pp_schedule=nope"], "choose one of"),
        (["backend.pp=2", "backend.pp_schedule=interleaved_1f1b"], "pp_virtual=2"),
        (["backend.pp=2", "backend.pp_virtual=2"], "needs an interleaved schedule"),
        (["backend.pp=3"], "does not split into backend.pp=3"),
        (["backend.pp=2", "precision=fp16"], "precision=fp16"),
        (["backend.pp=0"], "must be >= 1"),
        (["backend.pp=2", "experiment=vision_smoke"], "image models train data-parallel"),
    ],
)
def test_validation_refuses_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose([*TINY, "model.num_layers=4", *overrides]))


def test_plan_checks_k_and_world():
    cfg = compose([*TINY, "model.num_layers=4", "backend.pp=4"])
    with pytest.raises(ValueError, match="needs K >= backend.pp=4 .* got K=2"):
        check_plan(cfg, 2, 8)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        check_plan(cfg, 8, 6)
    hsdp = compose(
        [*TINY, "model.num_layers=4", "backend.pp=2", "backend=hsdp", "backend.replicate=3"]
    )
    with pytest.raises(ValueError, match="backend.replicate=3 does not divide the 4 ranks"):
        check_plan(hsdp, 4, 8)
    check_plan(cfg, 4, 8)  # K = stages: fine for 1f1b
    cfg = compose([*TINY, "model.num_layers=8", "backend.pp=4", "backend.pp_virtual=2",
                   "backend.pp_schedule=interleaved_1f1b"])  # fmt: skip
    with pytest.raises(ValueError, match="divisible by max"):
        check_plan(cfg, 9, 4)  # rounds = 9 // 4 = 2 does not divide 9
    check_plan(cfg, 10, 4)
    v = compose([*TINY, "model.num_layers=8", "backend.pp=2", "backend.pp_virtual=2",
                 "backend.pp_schedule=dualpipev", "loss.impl=full"])  # fmt: skip
    with pytest.raises(ValueError, match="dualpipev needs K >= 2 x backend.pp = 4 .* got K=3"):
        check_plan(v, 3, 2)
    check_plan(v, 4, 2)
    assert list(stage_layers(8, 4, 3)) == [6, 7]


def test_planner_bubble_and_stage_memory_by_hand():
    # p=4, K=8: GPipe/1F1B idle 3 of 11 slots; interleaved v=2: 3 of 19
    assert plan_pp.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert plan_pp.bubble_fraction(4, 8, v=2) == pytest.approx(3 / 19)
    assert plan_pp.step_time(8.0, 4, 8) == pytest.approx(11.0)
    # GPipe holds all K micro-batches on every stage; 1F1B holds p - s (stage 0: p, any K)
    assert [plan_pp.in_flight("gpipe", 4, 8, s) for s in range(4)] == [8, 8, 8, 8]
    assert [plan_pp.in_flight("1f1b", 4, 8, s) for s in range(4)] == [4, 3, 2, 1]
    assert plan_pp.in_flight("1f1b", 4, 64, 0) == 4 and plan_pp.in_flight("1f1b", 4, 2, 0) == 2
    # interleaved, p=4 v=2 K=8: rounds 2, 4 per round: stage 0 warms up (2-1)*4 + 2*3 = 10, +1
    assert plan_pp.in_flight("interleaved_1f1b", 4, 8, 0, v=2) == 11
    assert plan_pp.in_flight("interleaved_1f1b", 4, 8, 3, v=2) == 5
    stages = plan_pp.stage_plans("1f1b", 4, 8, 1, n_layers=32, layer_bytes=100.0)
    assert [(s.layers, s.in_flight, s.activation_bytes) for s in stages] == [
        (8, 4, 3200.0), (8, 3, 2400.0), (8, 2, 1600.0), (8, 1, 800.0)]  # fmt: skip


def _torch_peak(schedule: str, p: int, k: int, v: int, rank: int) -> int:
    """Peak of chunk-forwards rank `rank` holds in torch's own schedule order: a forward holds
    its activations until its full backward, or under zero bubble until its weight pass. The
    order is what each schedule computes for every rank at construction; it needs no stages."""
    from torch.distributed.pipelining import schedules

    from gradcycle.backends.pipeline_checks import SCHEDULES as CLASSES

    order = object.__new__(getattr(schedules, CLASSES[schedule]))
    order.pp_group_size, order._n_microbatches, order.n_local_stages = p, k, v
    order._num_stages = order.num_stages = p * v
    order.number_of_rounds = max(1, k // p)
    order.microbatches_per_round = k // order.number_of_rounds
    held = peak = 0
    for action in order._calculate_single_rank_operations(rank):
        for a in (action.sub_actions or (action,)) if action is not None else ():
            if a.computation_type == schedules.FORWARD:
                held += 1
            elif a.computation_type in (schedules.FULL_BACKWARD, schedules.BACKWARD_WEIGHT):
                held -= 1
            peak = max(peak, held)
    return peak


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev"])
def test_planner_in_flight_is_the_peak_of_torchs_schedule(schedule):
    for p in (2, 4, 8):
        for k in (p, 2 * p, 4 * p):
            if schedule == "dualpipev" and k < 2 * p:
                continue  # refused (check_plan)
            got = [plan_pp.in_flight(schedule, p, k, r, 2) for r in range(p)]
            assert got == [_torch_peak(schedule, p, k, 2, r) for r in range(p)], (p, k)


def test_v_placement_by_hand():
    # p=4: rank r holds stages r and 7-r; rank 0 the first and the last (embedding and head)
    assert [plan_pp.rank_stages(4, 2, r, "zbv") for r in range(4)] == [[0, 7], [1, 6], [2, 5],
                                                                      [3, 4]]  # fmt: skip
    assert plan_pp.owned_layers(16, 4, 2, 1, "zbv") == [2, 3, 12, 13]
    assert plan_pp.stage_owner(4, 2, 7, "dualpipev") == 0
    assert plan_pp.stage_owner(4, 2, 7, "interleaved_1f1b") == 3  # looped: stage 7 on rank 3


def test_model_config_architectures_are_checked_before_start(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    GPT2Config(n_layer=4).save_pretrained(tmp_path / "gpt2")
    LlamaConfig(num_hidden_layers=6, hidden_size=64, intermediate_size=128,
                num_attention_heads=4).save_pretrained(tmp_path / "llama6")  # fmt: skip
    validate(compose([*TINY, f"model.config={tmp_path / 'llama6'}", "backend.pp=2",
                      "backend.pp_schedule=interleaved_1f1b", "backend.pp_virtual=3"]))  # fmt: skip
    for folder, message in (("gpt2", "model_type='gpt2'"), ("llama6", "has 6 layers")):
        with pytest.raises(ValueError, match=message):
            validate(compose([*TINY, f"model.config={tmp_path / folder}", "backend.pp=4"]))


def test_planner_sizes_each_stage_by_hand():
    """llama-7b shapes, ddp, pp=4 on 2 x 8 GPUs (dp 4), micro 1 x 2048, K=8: each rank's
    parameters, its in-flight activations, the p2p bytes and the bubble in the step time."""
    from gradcycle.planner.memory import activations
    from gradcycle.planner.plan import make_plan
    from gradcycle.planner.report import render_json

    over = ["model=llama-7b", "hardware=a100-40gb", "nodes=2", "gpus_per_node=8", "backend=ddp",
            "data.seq_len=2048", "train.global_batch_size=32", "train.micro_batch_size=1"]  # fmt: skip
    plan = make_plan(compose([*over, "backend.pp=4"]), searches=False)
    run = plan.configured
    s = run.setup
    assert (s.world, s.accumulation, s.pp) == (4, 8, 4)  # 16 GPUs = pp 4 x dp 4; 32 / (1 x 4)
    h, v, lp = s.shape.hidden, s.shape.vocab, s.shape.layer_params
    stages = plan_pp.stage_setups(s)
    assert [st.shape.layers for st in stages] == [8, 8, 8, 8]
    params = [plan_pp.estimate_of(st).model_states["parameters"] for st in stages]
    # ddp keeps fp32 parameters: 8 layers each, the embedding on the first, norm + head on the last
    assert params == [4 * (8 * lp + v * h), 4 * 8 * lp, 4 * 8 * lp, 4 * (8 * lp + h + v * h)]
    # 1F1B: rank s holds p - s micro-batches' activations of its 8 layers (+ the head's input)
    one = activations(stages[1])["layer"]  # one layer, one micro-batch (bytes)
    saved = [activations(st)["saved"] for st in stages]
    assert saved[:3] == pytest.approx([4 * 8 * one, 3 * 8 * one, 2 * 8 * one])
    assert saved[3] > 1 * 8 * one and saved[3] < 1.1 * 8 * one
    gpipe = make_plan(compose([*over, "backend.pp=4", "backend.pp_schedule=gpipe"]), searches=False)
    assert activations(plan_pp.stage_setups(gpipe.configured.setup)[0])["saved"] == pytest.approx(
        8 * 8 * one)  # fmt: skip  # K = 8 micro-batches on every stage
    # p2p: b·T·H fp32 (ddp's residual stream) each way, per micro-batch and boundary
    assert plan_pp.p2p_bytes_per_step(s) == 2 * 8 * 3 * (1 * 2048 * h * 4)
    # the step: the slowest (last: the head) stage's compute stretched by the bubble 3 / (8 + 3)
    fpt_last = 6 * (8 * lp + h + v * h) + 12 * 8 * h * 2048  # 6N + 12·L·h·s of its part
    hw = plan.cfg.hardware
    micro_s = 2048 * fpt_last / (plan.cfg.plan.mfu * hw.bf16_tflops * 1e12)
    assert run.time.compute_s == pytest.approx(8 * micro_s / (1 - 3 / 11), rel=1e-12)
    j = render_json(plan)["pipeline"]
    assert j["stages"] == 4 and j["schedule"] == "1f1b" and j["bubble_fraction"] == 3 / 11
    assert j["per_stage_bytes"] == [int(p) for p in run.est.stages] and j["peak_stage"] == 0
    assert render_json(plan)["peak_bytes_per_gpu"] == max(j["per_stage_bytes"])
    assert j["p2p_bytes_per_step"] == plan_pp.p2p_bytes_per_step(s)
    assert j["per_stage_bytes"] == sorted(j["per_stage_bytes"], reverse=True)  # fewer in flight


def test_planner_proposes_a_stage_per_node_for_a_slow_link():
    from gradcycle.planner.plan import make_plan, pipelined

    over = ["model=llama-13b", "hardware=a100-40gb", "nodes=4", "gpus_per_node=8", "backend=fsdp",
            "data.seq_len=2048", "train.global_batch_size=128", "train.micro_batch_size=1",
            "activation_checkpointing.mode=full"]  # fmt: skip
    plan = make_plan(compose(over), searches=False)
    run, piped = plan.configured, pipelined(plan, plan.configured)
    assert run.time.exposed_comm_s > 0.5 * run.time.step_s  # fsdp's gathers over the nodes
    assert piped.setup.pp == 4 and piped.setup.world == 8 and piped.time.step_s < run.time.step_s
    assert piped.est.peak <= plan.cfg.plan.headroom * plan.budget
    assert any("backend.pp=4 (one stage per node" in w for w in plan.warnings), plan.warnings
    one_node = make_plan(compose([*over, "nodes=1"]), searches=False)
    assert pipelined(one_node, one_node.configured) is None  # no inter-node link to spare
