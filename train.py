"""gradcycle entry point - the same file under python, torchrun, deepspeed and sbatch.

    python train.py [hydra overrides]                  e.g. backend=fsdp train.micro_batch_size=2
    torchrun --nproc_per_node 8 train.py backend=fsdp
    deepspeed --num_gpus 8 train.py backend=zero2
    python train.py -m train.micro_batch_size=1,2,4    (Hydra multirun / submitit sweeps)

Composes the config in conf/ with the overrides and calls gradcycle.cli.main, which runs
gradcycle.trainer.run(cfg). User errors exit with code 2 and one clear message.
"""

import sys
from pathlib import Path

from gradcycle.cli import main

CONF_DIR = str(Path(__file__).resolve().parent / "conf")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], CONF_DIR))
