"""`sparsetron train` under torchrun, with one rank that stops answering before a step.

    torchrun --nproc-per-node 2 tests/distributed/sleeping_rank.py RANK STEP SECONDS train RECIPE ...

Rank RANK sleeps SECONDS before training step STEP + 1, outside any collective, as a rank
stuck on a file system or in a loop would; it writes the time it fell asleep to
`<trainer.run_dir>/asleep`. Everything after the first three arguments is the command line.
"""

import sys
import time
from pathlib import Path

from sparsetron.launch import cli
from sparsetron.train import trainer

RANK, STEP, SECONDS = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
train_step = trainer.Trainer.train_step


def sleeping_train_step(self):
    if self.step == STEP and trainer.rank() == RANK:
        (Path(self.job.trainer.run_dir) / "asleep").write_text(str(time.time()))
        time.sleep(SECONDS)
    return train_step(self)


trainer.Trainer.train_step = sleeping_train_step
sys.exit(cli.main(sys.argv[4:]))
