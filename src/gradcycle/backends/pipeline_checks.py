"""backend.pp* validation (no torch import): the schedules, the stage split, K per schedule,
and what pipeline parallelism does not support yet. validation.validate and the trainer call these
before any process group starts."""

from __future__ import annotations

from gradcycle.planner.pipeline import V_SHAPED  # rank r holds stages r and 2p-1-r: two per rank

SCHEDULES = {  # backend.pp_schedule -> torch.distributed.pipelining class
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "looped_bfs": "ScheduleLoopedBFS",
    "interleaved_zb": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
MULTI = ("interleaved_1f1b", "looped_bfs", "interleaved_zb", *V_SHAPED)  # v > 1 stages per rank
ZERO_BUBBLE = ("interleaved_zb", *V_SHAPED)  # backward split into an input and a weight pass


def check_config(cfg) -> None:
    """backend.pp* rules that need no world size (validation.validate calls this)."""
    b = cfg.backend
    if b.pp < 1 or b.pp_virtual < 1:
        raise ValueError(f"backend.pp={b.pp} and backend.pp_virtual={b.pp_virtual} must be >= 1")
    if b.pp == 1:
        return
    if getattr(cfg, "task", "lm") != "lm":
        raise ValueError(f"backend.pp={b.pp} with task={cfg.task}: pipeline stages split a "
                         "causal LM's decoder layers; image models train data-parallel: use "
                         "backend.pp=1")  # fmt: skip
    if b.pp_schedule not in SCHEDULES:
        raise ValueError(f"backend.pp_schedule={b.pp_schedule!r} is not valid: choose one of "
                         f"{', '.join(SCHEDULES)}")  # fmt: skip
    if b.pp_schedule in V_SHAPED and b.pp_virtual != 2:
        raise ValueError(f"backend.pp_schedule={b.pp_schedule} places exactly two stages on each "
                         f"rank (r and 2p-1-r), got backend.pp_virtual={b.pp_virtual}: set "
                         "backend.pp_virtual=2")  # fmt: skip
    if b.pp_schedule in ZERO_BUBBLE and cfg.loss.impl != "full":
        raise ValueError(
            f"backend.pp_schedule={b.pp_schedule} with loss.impl={cfg.loss.impl}: a zero-bubble "
            "schedule runs the weight gradients in a second backward pass, and the chunked loss "
            "computes its gradients once, in forward; use loss.impl=full, or "
            "backend.pp_schedule=interleaved_1f1b"
        )
    if b.name.startswith("zero"):
        raise ValueError(f"backend.pp={b.pp} with backend={b.name}: DeepSpeed's own pipeline "
                         "needs its PipelineModule and ZeRO <= 1; use backend=ddp, fsdp or hsdp "
                         "(across the pipeline replicas), or backend.pp=1")  # fmt: skip
    if b.pp_schedule in MULTI and b.pp_virtual < 2:
        raise ValueError(f"backend.pp_schedule={b.pp_schedule} runs several stages per rank: "
                         "set backend.pp_virtual=2 (or more), or use backend.pp_schedule=1f1b")  # fmt: skip
    if b.pp_schedule not in MULTI and b.pp_virtual != 1:
        raise ValueError(f"backend.pp_virtual={b.pp_virtual} needs an interleaved schedule: use "
                         "backend.pp_schedule=interleaved_1f1b or backend.pp_virtual=1")  # fmt: skip
    stages = b.pp * b.pp_virtual
    tied = _check_architecture(cfg, stages)
    tied = cfg.model.tie_embeddings if tied is None else tied
    if tied and b.pp_schedule in V_SHAPED and b.name in ("fsdp", "hsdp"):
        raise ValueError(
            f"backend.pp_schedule={b.pp_schedule} with tied embeddings and backend={b.name}: "
            "rank 0 holds the first and the last stage, two FSDP roots sharing one weight, "
            "which FSDP2 cannot shard twice; use backend=ddp, an interleaved schedule "
            "(backend.pp_schedule=interleaved_zb), or model.tie_embeddings=false"
        )
    if cfg.model.config is None and cfg.model.pretrained is None:
        layers = cfg.model.num_layers
        if layers % stages:
            raise ValueError(
                f"model.num_layers={layers} does not split into backend.pp={b.pp} x "
                f"backend.pp_virtual={b.pp_virtual} = {stages} equal stages: choose pp x "
                f"pp_virtual dividing {layers}"
            )
    for bad, why in ((cfg.precision == "fp16", "precision=fp16 (its loss scaler would have to "
                      "decide across stages): use precision=bf16"),
                     (cfg.data.document_mask, "data.document_mask=true (per-document masks do "
                      "not travel between stages yet): use data.document_mask=false"),
                     (cfg.train.micro_batch_size == "auto", "train.micro_batch_size=auto (the "
                      "planner does not size stages yet): give a number"),
                     (cfg.backend.sync == "per_micro", "backend.sync=per_micro (the stage "
                      "gradients are reduced once per cycle): use backend.sync=auto")):  # fmt: skip
        if bad:
            raise ValueError(f"backend.pp={b.pp} does not support {why}")


def check_plan(cfg, k: int, world: int) -> None:
    """The world splits into pp x dp, and K micro-batches suit the schedule. Before any process
    group starts (the trainer calls this right after the batch plan)."""
    b = cfg.backend
    if b.pp == 1:
        return
    if world % b.pp:
        raise ValueError(f"backend.pp={b.pp} does not divide the world size {world}: the mesh is "
                         f"pp x dp; use a backend.pp dividing {world}")  # fmt: skip
    if b.pp_schedule in ("1f1b", "interleaved_1f1b") and k < b.pp:
        raise ValueError(
            f"backend.pp_schedule={b.pp_schedule} needs K >= backend.pp={b.pp} micro-batches per "
            f"cycle, got K={k}: raise train.global_batch_size or lower train.micro_batch_size "
            "(K = global / (micro x data-parallel ranks))"
        )
    if b.name == "hsdp" and b.replicate is not None and (world // b.pp) % b.replicate:
        raise ValueError(f"backend=hsdp backend.pp={b.pp}: backend.replicate={b.replicate} does "
                         f"not divide the {world // b.pp} ranks of each stage (world {world} / pp); "
                         "choose a backend.replicate dividing them")  # fmt: skip
    if b.pp_schedule == "dualpipev" and k < 2 * b.pp:
        raise ValueError(f"backend.pp_schedule=dualpipev needs K >= 2 x backend.pp = {2 * b.pp} "
                         f"micro-batches per cycle (one per stage), got K={k}: raise "
                         "train.global_batch_size or lower train.micro_batch_size")  # fmt: skip
    rounds = max(1, k // b.pp)
    if b.pp_schedule in ("interleaved_1f1b", "interleaved_zb") and k % rounds:
        raise ValueError(f"backend.pp_schedule={b.pp_schedule} needs K divisible by "
                         f"max(1, K // pp) = {rounds}, got K={k}: use K a multiple of pp={b.pp}")  # fmt: skip


def _check_architecture(cfg, stages: int) -> bool | None:
    """model.config / a local model.pretrained: a Llama decoder (the stage split's shape), its
    layers splitting into equal stages. (A hub id is checked when the stages are built.)
    Returns whether its embeddings are tied, None where no config file says."""
    import json
    from pathlib import Path

    m = cfg.model
    if m.config is not None:
        from gradcycle.model import architecture_config

        config = architecture_config(m).to_dict()
        where = f"model.config={m.config}"
    elif m.pretrained is not None and (Path(m.pretrained).expanduser() / "config.json").is_file():
        config = json.loads((Path(m.pretrained).expanduser() / "config.json").read_text())
        where = f"model.pretrained={m.pretrained}"
    else:
        return None
    kind, layers = config.get("model_type"), config.get("num_hidden_layers")
    if kind != "llama":
        raise ValueError(f"backend.pp={cfg.backend.pp} splits Llama decoders into stages; {where} "
                         f"is model_type={kind!r}, not supported with pp yet: use backend.pp=1")  # fmt: skip
    if layers is not None and layers % stages:
        raise ValueError(f"{where} has {layers} layers: they do not split into backend.pp x "
                         f"backend.pp_virtual = {stages} equal stages; choose pp x pp_virtual "
                         f"dividing {layers}")  # fmt: skip
    return bool(config.get("tie_word_embeddings", False))
