"""The memory and communication planner: pure arithmetic over the config, no torch at import.

    inputs.py   config -> model shape, topology, batch check, one Setup
    memory.py   per-GPU bytes by component and moment of the step
    zero.py     DeepSpeed ZeRO-1/2/3 terms, from DeepSpeed 0.19's code
    costs.py    collectives per optimizer step and the step time they imply
    plan.py     config -> candidates -> the plan; `python -m gradcycle.plan`
    report.py   the text and JSON reports
    auto.py     inside a training run: `auto` values, start-up lines, first-step OOM handling

Depends on gradcycle.config, gradcycle.batching (training's batch check) and the DeepSpeed config
builder and checks (backends/ds_config.py, no DeepSpeed import) only: never on the CLI or the trainer.
"""
