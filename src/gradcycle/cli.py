"""Command line: compose the Hydra config from overrides, run, and turn user errors into exit 2.

`python train.py a=b ...` composes with Hydra's compose API (no per-rank output dirs, no logging
setup on every rank); `-m/--multirun` goes through `@hydra.main` so sweeps and launcher plugins
(submitit) work. Either way the task is `trainer.run(cfg)`.
"""

from __future__ import annotations

import os
import sys

from gradcycle.compose import EXIT_USAGE, compose, default_conf_dir, user_error

EXIT_HALT = 3  # train.on_nonfinite=halt


def _fail(message: str, code: int, every_rank: bool = False) -> int:
    rank = os.environ.get("RANK", "0")
    if rank == "0" or every_rank:  # launch errors may hit only some ranks: each one reports
        print(f"gradcycle: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str], conf_dir: str | None = None) -> int:
    from gradcycle.diskspace import EXIT_NO_SPACE, CheckpointSpaceError
    from gradcycle.distributed import LaunchError, strip_local_rank_args
    from gradcycle.trainer import NonFiniteHalt, run

    try:
        argv = strip_local_rank_args(argv)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra/") for a in argv):
        return _hydra_main(argv, conf_dir or default_conf_dir())
    if argv and argv[0] in ("-h", "--help"):
        print(
            __doc__
            + "\nOverrides: key=value (e.g. backend=fsdp train.micro_batch_size=2); see conf/."
        )
        return 0
    try:
        cfg = compose(argv, conf_dir)
        run(cfg)
    except NonFiniteHalt as e:
        return _fail(str(e), EXIT_HALT)
    except CheckpointSpaceError as e:  # every rank raised it at the same point: none is waiting
        _destroy_process_group()
        return _fail(str(e), EXIT_NO_SPACE)
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        return _fail(message, EXIT_USAGE, every_rank=isinstance(e, LaunchError))
    return 0


def _destroy_process_group() -> None:
    """Every rank stopped at the same point, so none waits in a collective: tear the group down
    (through DeepSpeed where it holds references to it, so it forgets them too)."""
    import torch.distributed as dist

    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()


def _hydra_main(argv: list[str], conf_dir: str) -> int:
    import hydra

    from gradcycle.config import register_configs
    from gradcycle.trainer import run

    register_configs()

    @hydra.main(config_path=conf_dir, config_name="config", version_base="1.3")
    def task(cfg):
        from hydra.core.hydra_config import HydraConfig

        if not cfg.run_dir:  # each sweep job gets its own run dir under the sweep dir
            cfg.run_dir = HydraConfig.get().runtime.output_dir
        import torch

        if torch.cuda.is_available():  # the basic launcher runs every job in this process
            torch.cuda.reset_peak_memory_stats()
        return run(cfg)

    sys.argv = [sys.argv[0], *argv]
    task()
    return 0
