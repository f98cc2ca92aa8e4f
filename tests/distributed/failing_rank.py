"""`sparsetron train` under torchrun with a bad input on one rank only.

    torchrun --nproc-per-node 2 tests/distributed/failing_rank.py RANK MISSING train RECIPE ...

Rank RANK alone is given `--resume MISSING` (a checkpoint that does not exist), as a rank whose
node lacks a file would be; the others run the command line as it is.
"""

import os
import sys

from sparsetron.launch import cli

RANK, MISSING = int(sys.argv[1]), sys.argv[2]
argv = sys.argv[3:] + (["--resume", MISSING] if int(os.environ["RANK"]) == RANK else [])
sys.exit(cli.main(argv))
