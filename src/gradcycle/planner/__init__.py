"""The memory and communication planner: pure arithmetic over the config, no torch at import.

    memory.py   per-GPU bytes by component and moment of the step
    costs.py    collectives per optimizer step and the step time they imply
    plan.py     config -> candidates -> the plan; `python -m gradcycle.plan`
    report.py   the text and JSON reports
    auto.py     inside a training run: `auto` values, start-up lines, first-step OOM handling

Depends on gradcycle.config (and the DeepSpeed config checks) only: never on the CLI or the trainer.
"""
