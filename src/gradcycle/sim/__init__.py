"""Simulation of one rank of a large job on one CPU (python -m gradcycle.simulate).

    world.py      the fake world: the bootstrap's fake process group, fake tensors, host values 0
    attention.py  attention as the target GPU's kernel runs it (flash / efficient / math)
    tracker.py    device memory across the whole accumulation cycle, by category
    report.py     the result beside the planner's prediction: JSON and table

The trainer runs unchanged (gradcycle.trainer.run, with `on_backend=` for the tracker).
"""
